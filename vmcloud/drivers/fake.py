"""An in-memory driver for testing the layers above drivers. Nothing is booted.

It behaves like a guest that boots at once: spawn prints boot-done and
app-running, a stop prints shutdown-started and powers off.
"""
import dataclasses
import threading

from vmcloud import exception
from vmcloud.drivers import base
from vmcloud.drivers import console


@dataclasses.dataclass
class FakeInstance:
    spec: base.InstanceSpec
    state: base.PowerState = base.PowerState.RUNNING
    console: list[str] = dataclasses.field(default_factory=list)
    io_frozen: bool = False


class FakeDriver(base.Driver):
    def __init__(self, conf, capacity: base.HostCapacity | None = None):
        super().__init__(conf)
        self.instances: dict[str, FakeInstance] = {}
        self.capacity = capacity or base.HostCapacity(cpus=8, memory_mib=16384,
                                                      free_disk_bytes=100 * 1024 ** 3)
        self._lock = threading.Lock()

    def _get(self, name: str) -> FakeInstance:
        try:
            return self.instances[name]
        except KeyError:
            raise exception.InstanceNotFound(name) from None

    def _print(self, instance: FakeInstance, event: str) -> None:
        instance.console.append(f'{console.MARKER} {event}')

    def _admit(self, spec: base.InstanceSpec) -> None:
        """Called with the lock held before an instance is created; may refuse it.

        :raises: SpawnFailed.
        """

    def spawn(self, spec: base.InstanceSpec) -> None:
        base.check_disk(spec)
        with self._lock:
            existing = self.instances.get(spec.name)
            if existing is not None and existing.state != base.PowerState.SHUTDOWN:
                raise exception.InstanceExists(spec.name)
            self._admit(spec)
            instance = FakeInstance(spec)
            self.instances[spec.name] = instance
        self._print(instance, base.BOOT_DONE)
        self._print(instance, base.APP_RUNNING)

    def list_instances(self) -> list[str]:
        return sorted(self.instances)

    def power_state(self, name: str) -> base.PowerState:
        return self._get(name).state

    def _require_state(self, instance: FakeInstance, *states: base.PowerState) -> None:
        if instance.state not in states:
            raise exception.DriverError(
                f'instance {instance.spec.name} is {instance.state.value}')

    def pause(self, name: str) -> None:
        instance = self._get(name)
        self._require_state(instance, base.PowerState.RUNNING, base.PowerState.PAUSED)
        instance.state = base.PowerState.PAUSED

    def resume(self, name: str) -> None:
        instance = self._get(name)
        self._require_state(instance, base.PowerState.RUNNING, base.PowerState.PAUSED)
        instance.state = base.PowerState.RUNNING

    def stop(self, name: str, timeout: float | None = None) -> bool:
        instance = self._get(name)
        if instance.state == base.PowerState.SHUTDOWN:
            return False
        forced = instance.state == base.PowerState.PAUSED  # a paused guest ignores ACPI
        if not forced:
            self._print(instance, base.SHUTDOWN_STARTED)
        instance.state = base.PowerState.SHUTDOWN
        return forced

    def destroy(self, name: str) -> None:
        self._get(name)
        del self.instances[name]

    def console_log(self, name: str) -> str:
        return '\n'.join(self._get(name).console) + '\n'

    def wait_for_event(self, name: str, event: str, timeout: float) -> None:
        if not console.has_marker(self.console_log(name), event):
            raise exception.GuestTimeout(
                f'instance {name} did not reach {event}: the fake guest never prints it')

    def freeze_io(self, name: str) -> None:
        self.pause(name)
        self._get(name).io_frozen = True

    def thaw_io(self, name: str) -> None:
        self._get(name).io_frozen = False
        self.resume(name)

    def host_capacity(self) -> base.HostCapacity:
        return self.capacity
