"""The libvirt driver: one transient libvirt domain per instance."""
import dataclasses
import json
import os
import shutil
import threading

import libvirt

from vmcloud import exception
from vmcloud.drivers import base
from vmcloud.drivers import console
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
    def __init__(self, conf):
        super().__init__(conf)
        self.instances_path = conf.compute.instances_path
        self._connection: libvirt.virConnect | None = None
        self._connection_lock = threading.Lock()

    # -- connection and bookkeeping ------------------------------------------------------

    def _connect(self) -> libvirt.virConnect:
        uri = self.conf.compute.libvirt_uri
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
        connection = self._connect()
        base.check_disk(spec)
        if os.path.exists(self._path(spec.name, 'spec.json')):
            if self._domain(spec.name) is not None:
                raise exception.InstanceExists(spec.name)
            shutil.rmtree(self._path(spec.name))
        os.makedirs(self._path(spec.name))
        try:
            with open(self._path(spec.name, 'spec.json'), 'w') as f:
                json.dump(dataclasses.asdict(spec), f)
            binary = shutil.which(self.conf.compute.qemu_binary) or 'qemu-system-x86_64'
            domain_type = 'kvm' if accel.choose(self.conf, binary, spec) == 'kvm' else 'qemu'
            xml = domain_xml.build(spec, domain_type, self._path(spec.name, 'console.log'),
                                   self.conf.compute.libvirt_dac_label)
            try:
                connection.createXML(xml, 0)
            except libvirt.libvirtError as exc:
                raise exception.SpawnFailed(
                    f'libvirt refused to start instance {spec.name}: '
                    f'{exc.get_error_message()}') from exc
        except BaseException:
            shutil.rmtree(self._path(spec.name), ignore_errors=True)
            raise

    def power_state(self, name: str) -> base.PowerState:
        self._require(name)
        domain = self._domain(name)
        if domain is None:
            return base.PowerState.SHUTDOWN
        state, _ = self._call(name, 'state', domain.state)
        return _STATES.get(state, base.PowerState.SHUTDOWN)

    def pause(self, name: str) -> None:
        domain = self._running_domain(name)
        self._call(name, 'suspend', domain.suspend)

    def resume(self, name: str) -> None:
        domain = self._running_domain(name)
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
        # Suspending stops the vCPUs after qemu has drained and flushed the disks.
        self.pause(name)

    def thaw_io(self, name: str) -> None:
        self.resume(name)

    def host_capacity(self) -> base.HostCapacity:
        return base.host_capacity(self.instances_path)
