"""The hypervisor interface every compute driver implements.

A driver runs instances on one host. Instances are named by the caller; a
driver keeps what it needs to find them again (a process, a libvirt domain)
under ``[compute] instances_path/NAME``, so a restarted compute manager can
still stop what the previous one started.

Guests report progress by printing phase markers on their first serial port:
``VMCLOUD-PHASE boot-done``, ``VMCLOUD-PHASE app-running``,
``VMCLOUD-PHASE shutdown-started``. ``wait_for_event`` waits for them.
"""
import abc
import dataclasses
import enum
import os
import time
import typing

from oslo_config import cfg

from vmcloud import exception
from vmcloud import plugins

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
class InstanceSpec:
    """What to boot.

    ``disk`` is a local file (raw or qcow2, see ``disk_format``) or an NBD URI:
    ``nbd://HOST[:PORT]/EXPORT`` or ``nbd+unix:///EXPORT?socket=PATH`` (always raw).
    With ``kernel`` set, the guest boots that kernel directly (with ``initrd``
    and ``cmdline``) and the disk is its first virtio disk, ``/dev/vda``.
    """

    name: str
    disk: str
    disk_format: str = 'raw'
    memory_mib: int = 256
    vcpus: int = 1
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str = ''


@dataclasses.dataclass(frozen=True)
class HostCapacity:
    cpus: int
    memory_mib: int
    free_disk_bytes: int


class Driver(abc.ABC):
    def __init__(self, conf: cfg.ConfigOpts):
        self.conf = conf

    @abc.abstractmethod
    def spawn(self, spec: InstanceSpec) -> None:
        """Start an instance; returns once the hypervisor runs it (not once it has booted).

        :raises: InstanceExists, DiskNotFound (a missing file, an unknown NBD host),
            HypervisorUnavailable, SpawnFailed. On error nothing is left running.
        """

    @abc.abstractmethod
    def list_instances(self) -> list[str]:
        """Names of the instances this driver knows, running or stopped."""

    @abc.abstractmethod
    def power_state(self, name: str) -> PowerState:
        """:raises: InstanceNotFound."""

    @abc.abstractmethod
    def pause(self, name: str) -> None:
        """Stop the guest's vCPUs. :raises: InstanceNotFound, DriverError if not running."""

    @abc.abstractmethod
    def resume(self, name: str) -> None:
        """:raises: InstanceNotFound, DriverError if not paused."""

    @abc.abstractmethod
    def stop(self, name: str, timeout: float | None = None) -> bool:
        """Press the ACPI power button; force the guest off after ``timeout`` seconds.

        :returns: True if the guest had to be forced off.
        :raises: InstanceNotFound.
        """

    @abc.abstractmethod
    def destroy(self, name: str) -> None:
        """Kill the instance at once, however it is doing, and forget it.

        :raises: InstanceNotFound.
        """

    @abc.abstractmethod
    def console_log(self, name: str) -> str:
        """Everything the guest printed on its serial console. :raises: InstanceNotFound."""

    @abc.abstractmethod
    def wait_for_event(self, name: str, event: str, timeout: float) -> None:
        """Wait until the guest prints the phase marker ``event``.

        :raises: GuestTimeout naming the event, if it does not come within
            ``timeout`` seconds or the guest stops first; InstanceNotFound.
        """

    @abc.abstractmethod
    def freeze_io(self, name: str) -> None:
        """The snapshot barrier: pause the guest with its disk writes drained and flushed.

        :raises: InstanceNotFound, DriverError.
        """

    @abc.abstractmethod
    def thaw_io(self, name: str) -> None:
        """Let a frozen guest run again. :raises: InstanceNotFound, DriverError."""

    @abc.abstractmethod
    def host_capacity(self) -> HostCapacity:
        """What this host offers to instances."""

    def boot(self, spec: InstanceSpec, timeout: float, event: str = BOOT_DONE) -> None:
        """Spawn and wait for ``event``; an instance that does not get there is destroyed.

        :raises: the errors of spawn() and wait_for_event().
        """
        self.spawn(spec)
        try:
            self.wait_for_event(spec.name, event, timeout)
        except BaseException:
            self.destroy(spec.name)
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
    from vmcloud.drivers import nbd_uri
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
