"""An in-memory driver for testing the layers above drivers. Nothing is booted.

It behaves like a guest that boots at once: spawn prints boot-done and
app-running, a stop prints shutdown-started and powers off. Its disk is a
FakeDisk that records what the guest wrote and when it was flushed, so the
snapshot barrier can be checked as for a real guest; tests make the guest write
with guest_write().
"""
import dataclasses
import threading

from vmcloud import exception
from vmcloud.drivers import base
from vmcloud.drivers import console


class FakeDisk:
    """What reached an instance's disk, in order: ``('write', offset, length)`` and
    ``('flush',)`` events. Appending is atomic, so a test may add its own marks."""

    def __init__(self):
        self.events: list[tuple] = []

    def write(self, offset: int, length: int) -> None:
        self.events.append(('write', offset, length))

    def flush(self) -> None:
        self.events.append(('flush',))

    def unflushed_writes(self) -> int:
        """Writes after the last flush: those a crash now could lose."""
        count = 0
        for event in reversed(self.events):
            if event[0] == 'flush':
                break
            count += event[0] == 'write'
        return count


@dataclasses.dataclass
class FakeInstance:
    spec: base.InstanceSpec
    state: base.PowerState = base.PowerState.RUNNING
    console: list[str] = dataclasses.field(default_factory=list)
    io_frozen: bool = False
    disk: FakeDisk = dataclasses.field(default_factory=FakeDisk)
    # writes the guest issued while paused: they reach the disk when it runs again
    held_writes: list[tuple[int, int]] = dataclasses.field(default_factory=list)


class FakeDriver(base.Driver):
    capabilities = (base.Capability.PAUSE | base.Capability.SNAPSHOT_BARRIER
                    | base.Capability.CONSOLE_LOG | base.Capability.PHASE_EVENTS
                    | base.Capability.ACPI_STOP | base.Capability.FILE_DISK
                    | base.Capability.NBD_DISK | base.Capability.DIRECT_KERNEL_BOOT)

    def __init__(self, conf, capacity: base.HostCapacity | None = None):
        super().__init__(conf)
        self.instances: dict[str, FakeInstance] = {}
        self.capacity = capacity or base.HostCapacity(cpus=8, memory_mib=16384,
                                                      free_disk_bytes=100 * 1024 ** 3)
        # Guards ``instances`` and every instance's state: readers may come from any
        # thread while another spawns or destroys (see base.Driver). Reentrant so that
        # _admit, called with it held, may read what host_capacity reads.
        self._lock = threading.RLock()

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
        self.validate(spec)
        with self._lock:
            existing = self.instances.get(spec.name)
            if existing is not None and existing.state != base.PowerState.SHUTDOWN:
                raise exception.InstanceExists(spec.name)
            self._admit(spec)
            instance = FakeInstance(spec)
            self._print(instance, base.BOOT_DONE)
            self._print(instance, base.APP_RUNNING)
            self.instances[spec.name] = instance

    def list_instances(self) -> list[str]:
        with self._lock:
            return sorted(self.instances)

    def power_state(self, name: str) -> base.PowerState:
        return self._get(name).state

    def _require_state(self, instance: FakeInstance, *states: base.PowerState) -> None:
        if instance.state not in states:
            raise exception.DriverError(
                f'instance {instance.spec.name} is {instance.state.value}')

    def pause(self, name: str) -> None:
        with self._lock:
            instance = self._get(name)
            self._require_state(instance, base.PowerState.RUNNING, base.PowerState.PAUSED)
            instance.state = base.PowerState.PAUSED

    def resume(self, name: str) -> None:
        with self._lock:
            instance = self._get(name)
            self._require_state(instance, base.PowerState.RUNNING, base.PowerState.PAUSED)
            instance.state = base.PowerState.RUNNING
            for offset, length in instance.held_writes:
                instance.disk.write(offset, length)
            instance.held_writes.clear()

    def stop(self, name: str, timeout: float | None = None) -> bool:
        with self._lock:
            instance = self._get(name)
            if instance.state == base.PowerState.SHUTDOWN:
                return False
            forced = instance.state == base.PowerState.PAUSED  # a paused guest ignores ACPI
            if not forced:
                self._print(instance, base.SHUTDOWN_STARTED)
            instance.state = base.PowerState.SHUTDOWN
            return forced

    def destroy(self, name: str) -> None:
        with self._lock:
            self._get(name)
            del self.instances[name]

    def console_log(self, name: str) -> str:
        return '\n'.join(list(self._get(name).console)) + '\n'

    def wait_for_event(self, name: str, event: str, timeout: float) -> None:
        if not console.has_marker(self.console_log(name), event):
            raise exception.GuestTimeout(
                f'instance {name} did not reach {event}: the fake guest never prints it')

    def guest_write(self, name: str, offset: int, length: int) -> None:
        """The fake guest writes to its disk: at once, or when it runs again if paused
        (a real guest's stopped vCPUs issue nothing).

        :raises: InstanceNotFound; DriverError if it is shut down.
        """
        with self._lock:
            instance = self._get(name)
            self._require_state(instance, base.PowerState.RUNNING, base.PowerState.PAUSED)
            if instance.state == base.PowerState.PAUSED:
                instance.held_writes.append((offset, length))
            else:
                instance.disk.write(offset, length)

    def freeze_io(self, name: str) -> None:
        with self._lock:
            self.pause(name)
            instance = self._get(name)
            instance.disk.flush()
            instance.io_frozen = True

    def thaw_io(self, name: str) -> None:
        with self._lock:
            instance = self._get(name)
            instance.io_frozen = False
            self.resume(name)

    def host_capacity(self) -> base.HostCapacity:
        return self.capacity
