"""An in-memory driver for testing the layers above drivers. Nothing is booted.

It behaves like a guest that boots at once: spawn prints boot-done and
app-running, a stop prints shutdown-started and powers off. Its disk is a
FakeDisk that records what the guest wrote and when it was flushed, so the
snapshot barrier can be checked as for a real guest; tests make the guest write
with guest_write().

NICs model Ethernet segments, one per bridge: fake guests of one driver whose NICs
are on the same bridge reach each other, others do not. A bridge exists for the
fake only if it was added with add_bridge() (the fake network agent does it), never
because the machine has one of that name. Each guest takes the
test guest's network flags from its command line (tools/guest/init): with a NIC,
``vmcloud.ip=ADDR/PREFIX`` (or, without it, the address ``leases`` holds for its
first MAC: the fake's DHCP) prints ``VMCLOUD-NET eth0 ADDR/PREFIX``; it serves
``GET /`` on ``vmcloud.http_port`` (80) unless ``vmcloud.http=0``, answering
"ID N"; and ``vmcloud.reach=ADDR[:PORT],...`` prints one round of
``VMCLOUD-REACH ADDR:PORT yes ID N`` or ``... no`` lines each time its console is
read (standing in for the real guest's round per second), ``vmcloud.reach_tries``
rounds (30). A guest answers only while running.
"""
import dataclasses
import re
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
    # the test guest's network (see the module's docstring)
    address: str | None = None
    http_port: int | None = None
    http_requests: int = 0
    reach: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    reach_rounds_left: int = 0

    @property
    def bridges(self) -> set[str]:
        return {nic.bridge for nic in self.spec.nics}


_FLAG = re.compile(r'(?:^|\s)vmcloud\.([a-z_]+)=(\S*)')
DEFAULT_HTTP_PORT = 80
DEFAULT_REACH_TRIES = 30


def guest_flags(cmdline: str) -> dict[str, str]:
    """The test guest's ``vmcloud.KEY=VALUE`` flags on a kernel command line."""
    return dict(_FLAG.findall(cmdline or ''))


def _targets(value: str) -> list[tuple[str, int]]:
    """``ADDR[:PORT],...`` as (address, port) pairs; what does not parse is dropped,
    as the real guest's wget would fail on it."""
    targets = []
    for item in filter(None, value.split(',')):
        address, _, port = item.partition(':')
        try:
            targets.append((address, int(port) if port else DEFAULT_HTTP_PORT))
        except ValueError:
            continue
    return targets


class FakeDriver(base.Driver):
    capabilities = (base.Capability.PAUSE | base.Capability.SNAPSHOT_BARRIER
                    | base.Capability.CONSOLE_LOG | base.Capability.PHASE_EVENTS
                    | base.Capability.ACPI_STOP | base.Capability.FILE_DISK
                    | base.Capability.NBD_DISK | base.Capability.DIRECT_KERNEL_BOOT
                    | base.Capability.BRIDGED_NIC)

    def __init__(self, conf, capacity: base.HostCapacity | None = None):
        super().__init__(conf)
        self.instances: dict[str, FakeInstance] = {}
        self.capacity = capacity or base.HostCapacity(cpus=8, memory_mib=16384,
                                                      free_disk_bytes=100 * 1024 ** 3)
        #: bridges the fake has besides the host's (add_bridge)
        self.bridges: set[str] = set()
        #: the fake's DHCP: MAC (lower case) -> the 'ADDR/PREFIX' its guest gets without vmcloud.ip=
        self.leases: dict[str, str] = {}
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

    def add_bridge(self, bridge: str) -> None:
        """A bridge that exists for this fake only: its guests' segment."""
        with self._lock:
            self.bridges.add(bridge)

    def remove_bridge(self, bridge: str) -> None:
        with self._lock:
            self.bridges.discard(bridge)

    def bridge_exists(self, bridge: str) -> bool:
        # Only its own: a real bridge of the machine (another cloud's) is no segment of
        # the fake's guests, and tests must not depend on what the machine has.
        with self._lock:
            return bridge in self.bridges

    def _configure_network(self, instance: FakeInstance) -> None:
        """What the test guest's init does with its network flags before boot-done."""
        flags = guest_flags(instance.spec.cmdline)
        if flags.get('http') != '0':
            try:
                instance.http_port = int(flags.get('http_port', DEFAULT_HTTP_PORT))
            except ValueError:
                instance.http_port = None
        instance.reach = _targets(flags.get('reach', ''))
        try:
            instance.reach_rounds_left = int(flags.get('reach_tries', DEFAULT_REACH_TRIES))
        except ValueError:
            instance.reach_rounds_left = DEFAULT_REACH_TRIES
        if not instance.spec.nics:
            return
        configured = flags.get('ip') or self.leases.get(instance.spec.nics[0].mac.lower())
        if configured:
            instance.address = configured.partition('/')[0]
            instance.console.append(f'VMCLOUD-NET eth0 {configured}')
        else:
            instance.console.append('VMCLOUD-NET-FAILED no DHCP lease on eth0')

    def reach(self, name: str, address: str, port: int = DEFAULT_HTTP_PORT) -> str | None:
        """What the fake guest ``name`` gets from ``GET http://ADDRESS:PORT/``: the
        answering guest's "ID N", or None if nothing answers (no running guest with
        that address and port on one of its bridges, or it is not running itself).

        :raises: InstanceNotFound.
        """
        with self._lock:
            source = self._get(name)
            if source.state != base.PowerState.RUNNING:
                return None
            return self._serve(address, port, lambda target: (
                target is source or bool(source.bridges & target.bridges)))

    def answer(self, bridge: str, address: str, port: int = DEFAULT_HTTP_PORT,
               request: bool = True) -> str | None:
        """What a port of ``bridge`` that is no guest (the host's side of a network, as
        its DHCP namespace) gets from ``GET http://ADDRESS:PORT/``: as reach().
        ``request=False``: a connection only, opened and closed (nothing is counted);
        the answer is then '' if something listens."""
        with self._lock:
            return self._serve(address, port, lambda target: bridge in target.bridges,
                               request)

    def _serve(self, address: str, port: int, reachable, request: bool = True
               ) -> str | None:
        """The running guest with ``address`` serving ``port`` that ``reachable(guest)``
        answers the GET: its "ID N"; None if there is none. Called with the lock held."""
        for target in self.instances.values():
            if (target.state == base.PowerState.RUNNING and target.address == address
                    and target.http_port == port and reachable(target)):
                if not request:
                    return ''
                target.http_requests += 1
                guest_id = guest_flags(target.spec.cmdline).get('id', target.spec.name)
                return f'{guest_id} {target.http_requests}'
        return None

    def _reach_round(self, instance: FakeInstance) -> None:
        if instance.state != base.PowerState.RUNNING or not instance.reach_rounds_left:
            return
        instance.reach_rounds_left -= 1
        for address, port in instance.reach:
            answer = self.reach(instance.spec.name, address, port)
            instance.console.append(f'VMCLOUD-REACH {address}:{port} '
                                    + (f'yes {answer}' if answer is not None else 'no'))

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
            self._configure_network(instance)
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
        with self._lock:
            instance = self._get(name)
            if instance.reach:
                self._reach_round(instance)
            return '\n'.join(instance.console) + '\n'

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
