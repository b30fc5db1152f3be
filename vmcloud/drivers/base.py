"""The hypervisor interface every compute driver implements.

A driver runs instances on one host. Instances are named by the caller; a
driver keeps what it needs to find them again (a process, a libvirt domain)
under ``[compute] instances_path/NAME``, so a restarted compute manager can
still stop what the previous one started.

Guests report progress by printing phase markers on their first serial port:
``VMCLOUD-PHASE boot-done``, ``VMCLOUD-PHASE app-running``,
``VMCLOUD-PHASE shutdown-started``. ``wait_for_event`` waits for them.

An instance may have NICs (``InstanceSpec.nics``, Capability.BRIDGED_NIC): each is a
virtio NIC on a tap device enslaved to a Linux bridge that already exists on the
host (the network agent makes it); the tap is named ``tap_name(instance, index)``
and is made and removed by the driver, never left behind by a destroy.
"""
import abc
import dataclasses
import enum
import hashlib
import logging
import os
import re
import time
import typing

from oslo_config import cfg

from vmcloud import exception
from vmcloud import plugins
from vmcloud.drivers import console
from vmcloud.drivers import nbd_uri

LOG = logging.getLogger(__name__)

NAMESPACE = 'vmcloud.drivers'

BOOT_DONE = 'boot-done'
APP_RUNNING = 'app-running'
SHUTDOWN_STARTED = 'shutdown-started'
PHASES = (BOOT_DONE, APP_RUNNING, SHUTDOWN_STARTED)

# A guest may miss a press (too early in its boot, or while busy), so stop()
# presses again at this interval until its timeout, as a person would.
POWER_BUTTON_INTERVAL = 5.0


class PowerState(enum.Enum):
    RUNNING = 'running'
    PAUSED = 'paused'
    SHUTDOWN = 'shutdown'


@dataclasses.dataclass(frozen=True)
class Nic:
    """A virtio NIC with this MAC on a tap enslaved to the host's Linux bridge ``bridge``."""

    mac: str
    bridge: str


@dataclasses.dataclass(frozen=True)
class InstanceSpec:
    """What to boot.

    ``disk`` is a local file (raw or qcow2, see ``disk_format``) or an NBD URI:
    ``nbd://HOST[:PORT]/EXPORT`` or ``nbd+unix:///EXPORT?socket=PATH`` (always raw).
    With ``kernel`` set, the guest boots that kernel directly (with ``initrd``
    and ``cmdline``) and the disk is its first virtio disk, ``/dev/vda``.
    ``nics`` become the guest's NICs in order (``eth0`` first).
    """

    name: str
    disk: str
    disk_format: str = 'raw'
    memory_mib: int = 256
    vcpus: int = 1
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str = ''
    nics: tuple[Nic, ...] = ()


@dataclasses.dataclass(frozen=True)
class HostCapacity:
    cpus: int
    memory_mib: int
    free_disk_bytes: int


class Capability(enum.Flag):
    """What a driver can do beyond the required lifecycle; callers consult
    ``Driver.capabilities`` instead of trying and catching."""

    NONE = 0
    #: pause() and resume() stop and restart the guest's vCPUs.
    PAUSE = enum.auto()
    #: freeze_io() and thaw_io() keep their contract (see Driver.freeze_io).
    SNAPSHOT_BARRIER = enum.auto()
    #: console_log() returns what the guest printed on its first serial port.
    CONSOLE_LOG = enum.auto()
    #: wait_for_event() sees the guest's phase markers.
    PHASE_EVENTS = enum.auto()
    #: stop() presses the ACPI power button before it forces the guest off.
    ACPI_STOP = enum.auto()
    #: the disk may be a local file (in one of ``Driver.FILE_DISK_FORMATS``).
    FILE_DISK = enum.auto()
    #: the disk may be an NBD URI (``nbd://`` or ``nbd+unix://``, raw).
    NBD_DISK = enum.auto()
    #: ``kernel``, ``initrd`` and ``cmdline`` boot a kernel directly.
    DIRECT_KERNEL_BOOT = enum.auto()
    #: ``nics`` attach the guest to Linux bridges of this host (see tap_name).
    BRIDGED_NIC = enum.auto()


# Instance names become directory names and hypervisor object names (qemu -name
# parses commas as options), so they are kept to a safe alphabet.
NAME_PATTERN = re.compile(r'[A-Za-z0-9][A-Za-z0-9._-]{0,63}')
MAC_PATTERN = re.compile(r'[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}')
# A Linux interface name: at most 15 bytes (IFNAMSIZ - 1), no '/', ':' or blanks.
IFNAME_PATTERN = re.compile(r'[A-Za-z0-9_.-]{1,15}')
#: virtio NICs per instance; a guest needs few, and each costs a tap and a PCI slot.
MAX_NICS = 8
TAP_PREFIX = 'vmct'


def tap_name(instance: str, index: int) -> str:
    """The tap device of NIC ``index`` of ``instance``: 'vmct' + 10 hex digits.

    Derived from the names alone so that a restarted driver, or one that lost its
    records, finds (and removes) the taps of an instance; interface names have at
    most 15 characters, so the instance name itself cannot be in it.
    """
    return TAP_PREFIX + hashlib.sha1(f'{instance}/{index}'.encode()).hexdigest()[:10]


def check_mac(mac: object) -> str | None:
    """Why ``mac`` cannot be a guest NIC's MAC, or None if it can.

    A guest's MAC must be unicast and locally administered (qemu's 52:54:00 prefix
    is), so it can never be a real NIC's address on the same segment.
    """
    if not isinstance(mac, str) or not MAC_PATTERN.fullmatch(mac):
        return f'the MAC {mac!r} is not six hex bytes separated by ":"'
    first = int(mac[:2], 16)
    if first & 1:
        return f'the MAC {mac} is a multicast address'
    if not first & 2:
        return f'the MAC {mac} is not locally administered (like 52:54:00:xx:xx:xx)'
    return None


def bridge_exists(bridge: str) -> bool:
    """Whether ``bridge`` is a Linux bridge in this host's network namespace."""
    return os.path.isdir(f'/sys/class/net/{bridge}/bridge')


class Driver(abc.ABC):
    """One host's hypervisor. A driver is written from this interface alone.

    Required: spawn, list_instances, power_state, stop, destroy. Everything else
    has a default that is safe: it either works from the required methods
    (validate, wait_for_event from console_log, boot, host_capacity) or refuses
    with NotSupported, changing nothing (pause, resume, freeze_io, thaw_io); what a
    driver really does is declared in ``capabilities``, which callers check first.

    Options: a driver declares its own as ``OPTION_GROUP`` and ``OPTIONS``, which
    ``__init__`` registers (and ``tox -e genconfig`` lists); what every driver shares
    (``driver``, ``instances_path``, timeouts, the accelerator) is in ``[compute]``.

    Thread safety: one driver object serves a whole node, called from many threads.
    Calls for different instances may run concurrently, any with any (the compute
    manager builds, freezes and thaws instances in parallel). For one instance the
    caller never runs two of spawn, pause, resume, stop, destroy, freeze_io and
    thaw_io at once; list_instances, power_state, console_log, wait_for_event and
    host_capacity may be called at any time, also during those, and then see the
    state before or after the change, never an error caused by it.
    """

    OPTION_GROUP: cfg.OptGroup | None = None
    OPTIONS: list[cfg.Opt] = []

    capabilities: Capability = Capability.NONE
    #: formats a local disk file may have, with Capability.FILE_DISK
    FILE_DISK_FORMATS: frozenset[str] = frozenset({'raw', 'qcow2'})
    MIN_MEMORY_MIB = 16
    #: qemu's pc machine, and so the qemu and libvirt drivers, run at most 255 vCPUs
    MAX_VCPUS = 255

    def __init__(self, conf: cfg.ConfigOpts):
        if self.OPTION_GROUP is not None:
            conf.register_group(self.OPTION_GROUP)
            conf.register_opts(self.OPTIONS, group=self.OPTION_GROUP)
        self.conf = conf

    @property
    def name(self) -> str:
        """The driver's name in messages."""
        return type(self).__name__.removesuffix('Driver').lower() or type(self).__name__

    def has(self, capability: Capability) -> bool:
        """Whether this driver has every capability in ``capability``."""
        return capability in self.capabilities

    def _require_known(self, name: str) -> None:
        """:raises: InstanceNotFound unless list_instances() has ``name``."""
        if name not in self.list_instances():
            raise exception.InstanceNotFound(name)

    # -- required -------------------------------------------------------------------

    @abc.abstractmethod
    def spawn(self, spec: InstanceSpec) -> None:
        """Start an instance; returns once the hypervisor runs it (not once it has booted).

        Calls validate(spec) first. A name may be reused once its instance is shut down.

        :raises: InvalidSpec (from validate), InstanceExists, DiskNotFound (a missing
            file, an unknown NBD host), HypervisorUnavailable, SpawnFailed. On error
            nothing is left running and nothing is kept of the instance.
        """

    @abc.abstractmethod
    def list_instances(self) -> list[str]:
        """Names of the instances this driver knows, running or shut down, sorted."""

    @abc.abstractmethod
    def power_state(self, name: str) -> PowerState:
        """:raises: InstanceNotFound."""

    @abc.abstractmethod
    def stop(self, name: str, timeout: float | None = None) -> bool:
        """Shut the guest down: with Capability.ACPI_STOP, press the ACPI power button
        and force it off after ``timeout`` seconds (None: ``[compute] stop_timeout``).

        The instance stays known (power state SHUTDOWN) until destroy().

        :returns: True if the guest had to be forced off; False if it went off by
            itself or was already off.
        :raises: InstanceNotFound.
        """

    @abc.abstractmethod
    def destroy(self, name: str) -> None:
        """Kill the instance at once, however it is doing, and forget it.

        :raises: InstanceNotFound.
        """

    # -- optional, with safe defaults --------------------------------------------------

    def validate(self, spec: InstanceSpec) -> None:
        """Refuse a spec this driver cannot run, before anything is started.

        The default checks what ``capabilities`` and the class limits say: the name,
        memory and vCPUs, the disk (a file in FILE_DISK_FORMATS or a raw NBD URI,
        and that it exists or its server resolves), the kernel and initrd, and the
        NICs (at most MAX_NICS, each with a valid, distinct MAC (see check_mac) and
        a bridge that bridge_exists()).

        :raises: InvalidSpec naming the problem; DiskNotFound for a disk that does
            not exist or whose NBD socket or host cannot be found.
        """
        def invalid(problem: str) -> exception.InvalidSpec:
            return exception.InvalidSpec(str(spec.name), problem)

        if not isinstance(spec.name, str) or not NAME_PATTERN.fullmatch(spec.name):
            raise invalid(f'the name {spec.name!r} is not 1-64 letters, digits, ".", "_" or '
                          '"-", starting with a letter or digit')
        for field, low, high in (('memory_mib', self.MIN_MEMORY_MIB, None),
                                 ('vcpus', 1, self.MAX_VCPUS)):
            value = getattr(spec, field)
            if (not isinstance(value, int) or isinstance(value, bool) or value < low
                    or (high is not None and value > high)):
                limit = f'{low}..{high}' if high is not None else f'at least {low}'
                raise invalid(f'{field} {value!r} is out of range ({limit})')
        if not isinstance(spec.disk, str) or not spec.disk:
            raise invalid('no disk')
        if nbd_uri.is_nbd(spec.disk):
            if not self.has(Capability.NBD_DISK):
                raise invalid(f'the {self.name} driver cannot boot from an NBD URI')
            if spec.disk_format != 'raw':
                raise invalid(f'an NBD disk is raw, not {spec.disk_format!r}')
        elif '://' in spec.disk:
            raise invalid(f'unsupported disk URI {spec.disk}')
        else:
            if not self.has(Capability.FILE_DISK):
                raise invalid(f'the {self.name} driver cannot boot from a local file')
            if spec.disk_format not in self.FILE_DISK_FORMATS:
                raise invalid(f'disk format {spec.disk_format!r} is not one of '
                              f'{", ".join(sorted(self.FILE_DISK_FORMATS))}')
        if spec.kernel is not None or spec.initrd is not None:
            if not self.has(Capability.DIRECT_KERNEL_BOOT):
                raise invalid(f'the {self.name} driver cannot boot a kernel directly')
            if spec.kernel is None:
                raise invalid('an initrd without a kernel')
            for what in ('kernel', 'initrd'):
                path = getattr(spec, what)
                if path is not None and not os.path.isfile(path):
                    raise invalid(f'{what} {path} is not a file')
        self._validate_nics(spec, invalid)
        check_disk(spec)

    def bridge_exists(self, bridge: str) -> bool:
        """Whether a NIC may join ``bridge`` here; the default asks the host's kernel."""
        return bridge_exists(bridge)

    def _validate_nics(self, spec: InstanceSpec,
                       invalid: typing.Callable[[str], exception.InvalidSpec]) -> None:
        if not isinstance(spec.nics, tuple):
            raise invalid(f'nics must be a tuple of Nic, not {type(spec.nics).__name__}')
        if not spec.nics:
            return
        if not self.has(Capability.BRIDGED_NIC):
            raise invalid(f'the {self.name} driver cannot attach NICs')
        if len(spec.nics) > MAX_NICS:
            raise invalid(f'{len(spec.nics)} NICs, at most {MAX_NICS}')
        macs = set()
        for index, nic in enumerate(spec.nics):
            if not isinstance(nic, Nic):
                raise invalid(f'NIC {index} is a {type(nic).__name__}, not a Nic')
            problem = check_mac(nic.mac)
            if problem is not None:
                raise invalid(f'NIC {index}: {problem}')
            if nic.mac.lower() in macs:
                raise invalid(f'NIC {index}: the MAC {nic.mac} is already on another NIC')
            macs.add(nic.mac.lower())
            if not isinstance(nic.bridge, str) or not IFNAME_PATTERN.fullmatch(nic.bridge):
                raise invalid(f'NIC {index}: {nic.bridge!r} is not an interface name')
            if not self.bridge_exists(nic.bridge):
                raise invalid(f'NIC {index}: there is no bridge {nic.bridge} on this host')

    def pause(self, name: str) -> None:
        """Stop the guest's vCPUs (Capability.PAUSE); pausing a paused guest does nothing.

        :raises: InstanceNotFound; DriverError if it is shut down; NotSupported.
        """
        self._require_known(name)
        raise exception.NotSupported(self.name, 'pause a guest')

    def resume(self, name: str) -> None:
        """Run a paused guest again (Capability.PAUSE); resuming a running one does nothing.

        :raises: InstanceNotFound; DriverError if it is shut down; NotSupported.
        """
        self._require_known(name)
        raise exception.NotSupported(self.name, 'resume a guest')

    def console_log(self, name: str) -> str:
        """Everything the guest printed on its serial console (Capability.CONSOLE_LOG).

        The default, for a driver without a console: nothing.

        :raises: InstanceNotFound.
        """
        self._require_known(name)
        return ''

    def wait_for_event(self, name: str, event: str, timeout: float) -> None:
        """Wait until the guest prints the phase marker ``event`` (Capability.PHASE_EVENTS).

        The default polls console_log().

        :raises: GuestTimeout naming the event, if it does not come within
            ``timeout`` seconds or the guest stops first; InstanceNotFound;
            NotSupported without a console.
        """
        if not self.has(Capability.CONSOLE_LOG):
            self._require_known(name)
            raise exception.NotSupported(self.name, 'see the guest\'s phase markers')
        deadline = time.monotonic() + timeout
        while True:
            if console.has_marker(self.console_log(name), event):
                return
            if self.power_state(name) == PowerState.SHUTDOWN:
                reason = 'the guest stopped first'
            elif time.monotonic() >= deadline:
                reason = f'not within {timeout:g} s'
            else:
                time.sleep(0.05)
                continue
            raise exception.GuestTimeout(f'instance {name} did not reach {event}: {reason}')

    def freeze_io(self, name: str) -> None:
        """The snapshot barrier (Capability.SNAPSHOT_BARRIER): pause the guest so that
        every write it issued before this call is on the disk, and hold it there.

        When this returns, every write the guest issued before it has been flushed
        (the disk's server received a FLUSH after it, or the write was made durable
        with FUA), and no new write reaches the disk until thaw_io(). The guest is
        PAUSED meanwhile.

        The default refuses: without a barrier a snapshot would not be consistent.

        :raises: InstanceNotFound, DriverError (the guest is shut down, the flush
            failed), NotSupported.
        """
        self._require_known(name)
        raise exception.NotSupported(self.name, 'freeze a guest\'s I/O')

    def thaw_io(self, name: str) -> None:
        """Let a frozen guest run and write again.

        :raises: InstanceNotFound, DriverError, NotSupported.
        """
        self._require_known(name)
        raise exception.NotSupported(self.name, 'thaw a guest\'s I/O')

    def host_capacity(self) -> HostCapacity:
        """What this host offers to instances; the default measures the machine."""
        return host_capacity(self.conf.compute.instances_path)

    def boot(self, spec: InstanceSpec, timeout: float, event: str = BOOT_DONE) -> None:
        """Spawn and wait for ``event``; an instance that does not get there is destroyed.

        :raises: the errors of spawn() and wait_for_event(): the reason it did not get
            there, also when the destroy after it fails too (that is logged, and the
            instance may then still be listed).
        """
        self.spawn(spec)
        try:
            self.wait_for_event(spec.name, event, timeout)
        except BaseException:
            try:
                self.destroy(spec.name)
            except Exception as cleanup:
                LOG.warning('destroying %s after it did not reach %s failed: %s',
                            spec.name, event, cleanup)
            raise


def load(conf: cfg.ConfigOpts, name: str | None = None) -> Driver:
    """The driver named ``name`` or ``[compute] driver``. :raises: PluginNotFound."""
    return plugins.load(NAMESPACE, name or conf.compute.driver, conf)


def host_capacity(path: str) -> HostCapacity:
    """CPUs, RAM and free disk space of this host, disk measured where ``path`` lives."""
    with open('/proc/meminfo') as f:
        meminfo = dict(line.split(':', 1) for line in f)
    os.makedirs(path, exist_ok=True)
    st = os.statvfs(path)
    return HostCapacity(cpus=len(os.sched_getaffinity(0)),
                        memory_mib=int(meminfo['MemTotal'].split()[0]) // 1024,
                        free_disk_bytes=st.f_bavail * st.f_frsize)


def check_disk(spec: InstanceSpec) -> None:
    """Refuse a disk that cannot be opened, before a hypervisor tries.

    :raises: DiskNotFound naming the file, socket or host.
    """
    if nbd_uri.is_nbd(spec.disk):
        nbd_uri.check_reachable(spec.disk)
    elif not os.path.isfile(spec.disk):
        raise exception.DiskNotFound(f'disk {spec.disk} of instance {spec.name} does not exist')


def press_power_button_until_off(press: typing.Callable[[], None],
                                 is_off: typing.Callable[[], bool], timeout: float) -> bool:
    """Press the power button every POWER_BUTTON_INTERVAL seconds until the guest is off.

    :returns: True if it went off within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    next_press = 0.0
    while time.monotonic() < deadline:
        if time.monotonic() >= next_press:
            press()
            next_press = time.monotonic() + POWER_BUTTON_INTERVAL
        if is_off():
            return True
        time.sleep(0.05)
    return is_off()
