"""The libvirt driver: one transient libvirt domain per instance.

NICs are ``<interface type='bridge'>``: libvirt makes each tap (named base.tap_name)
and removes it when the domain ends.
"""
import dataclasses
import json
import os
import shutil
import threading

import libvirt
from oslo_config import cfg

from vmcloud import exception
from vmcloud.drivers import base
from vmcloud.drivers import console
from vmcloud.drivers import tap
from vmcloud.drivers.libvirt import domain_xml
from vmcloud.drivers.qemu import accel

_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: base.PowerState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: base.PowerState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: base.PowerState.PAUSED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: base.PowerState.PAUSED,
}


def _ignore_libvirt_errors(_context, _error) -> None:
    """libvirt prints every error to stderr as well; we raise them instead."""


libvirt.registerErrorHandler(_ignore_libvirt_errors, None)


class LibvirtDriver(base.Driver):
    OPTION_GROUP = cfg.OptGroup('libvirt', title='libvirt driver',
                                help='One transient libvirt domain per instance.')
    OPTIONS = [
        cfg.StrOpt('uri', default='qemu:///system',
                   deprecated_name='libvirt_uri', deprecated_group='compute',
                   help='libvirt connection URI.'),
        cfg.StrOpt('dac_label', default='+0:+0',
                   deprecated_name='libvirt_dac_label', deprecated_group='compute',
                   help='user:group that libvirt runs qemu as (a static DAC label, no '
                        'relabelling). Empty for libvirt\'s own default user, which then '
                        'must be able to reach the instances path, the disks and the NBD '
                        'sockets.'),
        cfg.StrOpt('qemu_binary', default='qemu-system-x86_64', deprecated_group='compute',
                   help='The QEMU emulator that libvirt runs, for the [compute] accelerator '
                        'probe: a name on PATH or an absolute path.'),
    ]
    capabilities = (base.Capability.PAUSE | base.Capability.SNAPSHOT_BARRIER
                    | base.Capability.CONSOLE_LOG | base.Capability.PHASE_EVENTS
                    | base.Capability.ACPI_STOP | base.Capability.FILE_DISK
                    | base.Capability.NBD_DISK | base.Capability.DIRECT_KERNEL_BOOT
                    | base.Capability.BRIDGED_NIC)

    def __init__(self, conf):
        super().__init__(conf)
        self.instances_path = conf.compute.instances_path
        self._connection: libvirt.virConnect | None = None
        self._connection_lock = threading.Lock()

    # -- connection and bookkeeping ------------------------------------------------------

    def _connect(self) -> libvirt.virConnect:
        uri = self.conf.libvirt.uri
        with self._connection_lock:
            if (self._connection is None or not self._connection.isAlive()
                    or self._connection.getURI() != uri):
                try:
                    self._connection = libvirt.open(uri)
                except libvirt.libvirtError as exc:
                    raise exception.HypervisorUnavailable(
                        f'cannot connect to libvirt at {uri}: '
                        f'{exc.get_error_message()}') from exc
            return self._connection

    def _path(self, name: str, leaf: str = '') -> str:
        return os.path.join(self.instances_path, name, leaf)

    def _require(self, name: str) -> None:
        if not os.path.exists(self._path(name, 'spec.json')):
            raise exception.InstanceNotFound(name)

    def _domain(self, name: str) -> libvirt.virDomain | None:
        """The running domain, or None once it has powered off (transient domains vanish)."""
        try:
            return self._connect().lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise exception.DriverError(
                f'libvirt cannot look up {name}: {exc.get_error_message()}') from exc

    def _running_domain(self, name: str) -> libvirt.virDomain:
        self._require(name)
        domain = self._domain(name)
        if domain is None:
            raise exception.DriverError(f'instance {name} is not running')
        return domain

    def _call(self, name: str, what: str, method, *args):
        try:
            return method(*args)
        except libvirt.libvirtError as exc:
            raise exception.DriverError(
                f'libvirt {what} of instance {name} failed: {exc.get_error_message()}') from exc

    def list_instances(self) -> list[str]:
        if not os.path.isdir(self.instances_path):
            return []
        return sorted(n for n in os.listdir(self.instances_path)
                      if os.path.exists(self._path(n, 'spec.json')))

    # -- lifecycle -----------------------------------------------------------------

    def spawn(self, spec: base.InstanceSpec) -> None:
        self.validate(spec)
        connection = self._connect()
        if (os.path.exists(self._path(spec.name, 'spec.json'))
                and self._domain(spec.name) is not None):
            raise exception.InstanceExists(spec.name)
        if os.path.lexists(self._path(spec.name)):
            # a shut-down instance's, or one left half made (a crash before spec.json)
            shutil.rmtree(self._path(spec.name))
        os.makedirs(self._path(spec.name))
        try:
            with open(self._path(spec.name, 'spec.json'), 'w') as f:
                json.dump(dataclasses.asdict(spec), f)
            binary = shutil.which(self.conf.libvirt.qemu_binary) or self.conf.libvirt.qemu_binary
            domain_type = 'kvm' if accel.choose(self.conf, binary, spec) == 'kvm' else 'qemu'
            xml = domain_xml.build(spec, domain_type, self._path(spec.name, 'console.log'),
                                   self.conf.libvirt.dac_label, self._nic_mtus(spec))
            try:
                connection.createXML(xml, 0)
            except libvirt.libvirtError as exc:
                raise exception.SpawnFailed(
                    f'libvirt refused to start instance {spec.name}: '
                    f'{exc.get_error_message()}') from exc
        except BaseException:
            shutil.rmtree(self._path(spec.name), ignore_errors=True)
            raise

    def _nic_mtus(self, spec: base.InstanceSpec) -> list[int]:
        """Each NIC's bridge's MTU, after removing a tap of its name that a dead
        domain left (libvirt refuses to make a tap whose name is taken).

        :raises: SpawnFailed.
        """
        mtus = []
        for index, nic in enumerate(spec.nics):
            try:
                tap.delete(base.tap_name(spec.name, index))
                mtus.append(tap.mtu(nic.bridge))
            except exception.DriverError as exc:
                raise exception.SpawnFailed(
                    f'cannot attach NIC {index} of instance {spec.name} to bridge '
                    f'{nic.bridge}: {exc}') from exc
        return mtus

    def power_state(self, name: str) -> base.PowerState:
        self._require(name)
        domain = self._domain(name)
        if domain is None:
            return base.PowerState.SHUTDOWN
        return self._state(name, domain)

    def _state(self, name: str, domain: libvirt.virDomain) -> base.PowerState:
        try:
            state, _ = domain.state()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                # powered off since it was looked up (a transient domain vanishes)
                return base.PowerState.SHUTDOWN
            raise exception.DriverError(
                f'libvirt state of instance {name} failed: {exc.get_error_message()}') from exc
        return _STATES.get(state, base.PowerState.SHUTDOWN)

    def pause(self, name: str) -> None:
        domain = self._running_domain(name)
        if self._state(name, domain) != base.PowerState.PAUSED:
            self._call(name, 'suspend', domain.suspend)

    def resume(self, name: str) -> None:
        # libvirt refuses to resume a running domain; the interface lets that do nothing
        domain = self._running_domain(name)
        if self._state(name, domain) != base.PowerState.RUNNING:
            self._call(name, 'resume', domain.resume)

    def stop(self, name: str, timeout: float | None = None) -> bool:
        self._require(name)
        domain = self._domain(name)
        if domain is None:
            return False
        timeout = self.conf.compute.stop_timeout if timeout is None else timeout

        def press():
            try:
                domain.shutdown()
            except libvirt.libvirtError:
                pass  # a paused or vanished guest refuses; the forced stop still ends it

        if base.press_power_button_until_off(press, lambda: self._domain(name) is None, timeout):
            return False
        self._destroy_domain(name)
        return True

    def _destroy_domain(self, name: str) -> None:
        domain = self._domain(name)
        if domain is None:
            return
        try:
            domain.destroy()
        except libvirt.libvirtError as exc:
            if self._domain(name) is not None:
                raise exception.DriverError(
                    f'libvirt cannot destroy {name}: {exc.get_error_message()}') from exc

    def destroy(self, name: str) -> None:
        self._require(name)
        self._destroy_domain(name)
        shutil.rmtree(self._path(name), ignore_errors=True)

    def console_log(self, name: str) -> str:
        self._require(name)
        return console.read(self._path(name, 'console.log'))

    def wait_for_event(self, name: str, event: str, timeout: float) -> None:
        self._require(name)
        console.wait_for_marker(self._path(name, 'console.log'), name, event, timeout,
                                lambda: self._domain(name) is not None)

    def freeze_io(self, name: str) -> None:
        # Suspending is qemu's 'stop': the vCPUs stop, then the disks are drained and
        # flushed before it returns (see the qemu driver).
        self.pause(name)

    def thaw_io(self, name: str) -> None:
        self.resume(name)
