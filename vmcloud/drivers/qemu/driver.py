"""The qemu driver: one qemu-system process per instance, driven over QMP.

NICs: the driver makes each NIC's tap (see vmcloud.drivers.tap) before qemu starts
and removes it when the instance is destroyed or fails to spawn, also when qemu is
already dead; taps are named from the instance's name (base.tap_name), so a driver
restarted since the spawn removes them too.
"""
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time

import tenacity
from oslo_config import cfg
from qemu.qmp import legacy as qmp

from vmcloud import exception
from vmcloud.drivers import base
from vmcloud.drivers import console
from vmcloud.drivers import tap
from vmcloud.drivers.qemu import accel
from vmcloud.drivers.qemu import cmdline

LOG = logging.getLogger(__name__)
_QMP_CONNECT_SECONDS = 15


class QemuDriver(base.Driver):
    OPTION_GROUP = cfg.OptGroup('qemu', title='qemu driver',
                                help='One qemu-system process per instance, driven over QMP.')
    OPTIONS = [
        cfg.StrOpt('binary', default='qemu-system-x86_64',
                   deprecated_name='qemu_binary', deprecated_group='compute',
                   help='QEMU system emulator, a name on PATH or an absolute path.'),
    ]
    capabilities = (base.Capability.PAUSE | base.Capability.SNAPSHOT_BARRIER
                    | base.Capability.CONSOLE_LOG | base.Capability.PHASE_EVENTS
                    | base.Capability.ACPI_STOP | base.Capability.FILE_DISK
                    | base.Capability.NBD_DISK | base.Capability.DIRECT_KERNEL_BOOT
                    | base.Capability.BRIDGED_NIC)

    def __init__(self, conf):
        super().__init__(conf)
        self.instances_path = conf.compute.instances_path
        # Processes started by this driver object, so they can be reaped.
        self._children: dict[str, subprocess.Popen] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    # -- bookkeeping ------------------------------------------------------------

    def _dir(self, name: str) -> str:
        return os.path.join(self.instances_path, name)

    def _path(self, name: str, leaf: str) -> str:
        return os.path.join(self._dir(name), leaf)

    def _lock(self, name: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(name, threading.Lock())

    def _require(self, name: str) -> None:
        if not os.path.exists(self._path(name, 'spec.json')):
            raise exception.InstanceNotFound(name)

    def _pid(self, name: str) -> int | None:
        try:
            with open(self._path(name, 'pid')) as f:
                return int(f.read())
        except (OSError, ValueError):
            return None

    def _alive(self, name: str) -> bool:
        child = self._children.get(name)
        if child is not None:
            return child.poll() is None
        pid = self._pid(name)
        if pid is None:
            return False
        try:
            with open(f'/proc/{pid}/stat') as f:
                state = f.read().rsplit(')', 1)[1].split()[0]
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                ours = self._path(name, 'qmp.sock').encode() in f.read()
        except OSError:
            return False
        return ours and state != 'Z'

    def list_instances(self) -> list[str]:
        if not os.path.isdir(self.instances_path):
            return []
        return sorted(n for n in os.listdir(self.instances_path)
                      if os.path.exists(self._path(n, 'spec.json')))

    # -- QMP ------------------------------------------------------------------------

    def _qmp(self, name: str, command: str, **arguments):
        with self._lock(name):
            monitor = qmp.QEMUMonitorProtocol(self._path(name, 'qmp.sock'))
            try:
                monitor.connect()
                return monitor.cmd(command, **arguments)
            except (OSError, qmp.QMPError) as exc:
                raise exception.DriverError(
                    f'QMP {command} on instance {name} failed: {exc}') from exc
            finally:
                monitor.close()

    def _require_running(self, name: str) -> None:
        self._require(name)
        if not self._alive(name):
            raise exception.DriverError(f'instance {name} is not running')

    # -- lifecycle -----------------------------------------------------------------

    def spawn(self, spec: base.InstanceSpec) -> None:
        self.validate(spec)
        binary = shutil.which(self.conf.qemu.binary)
        if binary is None:
            raise exception.HypervisorUnavailable(
                f'qemu binary {self.conf.qemu.binary} not found')
        if os.path.exists(self._path(spec.name, 'spec.json')) and self._alive(spec.name):
            raise exception.InstanceExists(spec.name)
        if os.path.lexists(self._dir(spec.name)):
            # a shut-down instance's, or one left half made (a crash before spec.json)
            self._delete_taps(spec.name)
            shutil.rmtree(self._dir(spec.name))
        os.makedirs(self._dir(spec.name))
        try:
            self._start(binary, spec)
        except BaseException:
            self._kill(spec.name)
            try:
                self._delete_taps(spec.name)
            except exception.DriverError as cleanup:
                LOG.warning('removing the taps of %s after it failed to spawn failed: %s',
                            spec.name, cleanup)
            shutil.rmtree(self._dir(spec.name), ignore_errors=True)
            raise

    def _start(self, binary: str, spec: base.InstanceSpec) -> None:
        # spec.json first: it records the NICs before their taps exist
        with open(self._path(spec.name, 'spec.json'), 'w') as f:
            json.dump(dataclasses.asdict(spec), f)
        mtus = []
        for index, nic in enumerate(spec.nics):
            device = base.tap_name(spec.name, index)
            try:
                tap.create(device, nic.bridge)
                mtus.append(tap.mtu(device))
            except exception.DriverError as exc:
                raise exception.SpawnFailed(
                    f'cannot attach NIC {index} of instance {spec.name} to bridge '
                    f'{nic.bridge}: {exc}') from exc
        command = cmdline.build(binary, spec, accel.choose(self.conf, binary, spec),
                                self._path(spec.name, 'qmp.sock'),
                                self._path(spec.name, 'console.log'), mtus)
        with open(self._path(spec.name, 'qemu.log'), 'wb') as log:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                       stdout=log, stderr=log, start_new_session=True)
        self._children[spec.name] = process
        with open(self._path(spec.name, 'pid'), 'w') as f:
            f.write(str(process.pid))
        self._wait_for_monitor(spec.name, process)

    def _wait_for_monitor(self, name: str, process: subprocess.Popen) -> None:
        @tenacity.retry(stop=tenacity.stop_after_delay(_QMP_CONNECT_SECONDS),
                        wait=tenacity.wait_fixed(0.05), reraise=True,
                        retry=tenacity.retry_if_exception(
                            lambda e: not isinstance(e, exception.SpawnFailed)))
        def connect():
            if process.poll() is not None:
                with open(self._path(name, 'qemu.log'), 'rb') as f:
                    message = f.read().decode('utf-8', 'replace').strip()
                raise exception.SpawnFailed(
                    f'qemu refused to start instance {name}: {message or "no message"}')
            if not os.path.exists(self._path(name, 'qmp.sock')):
                raise exception.DriverError(f'instance {name} has no monitor yet')
            self._qmp(name, 'query-status')
        connect()

    def _kill(self, name: str) -> None:
        pid = self._pid(name)
        if pid is not None and self._alive(name):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        child = self._children.pop(name, None)
        if child is not None:
            child.wait()
        elif pid is not None:
            deadline = time.monotonic() + 5
            while self._alive(name) and time.monotonic() < deadline:
                time.sleep(0.02)

    def _delete_taps(self, name: str) -> None:
        """Remove every tap ``name`` may have. Every possible name is tried, not only
        those spec.json records, so an unreadable spec.json leaks nothing.

        :raises: DriverError if one stays.
        """
        for index in range(base.MAX_NICS):
            tap.delete(base.tap_name(name, index))

    def power_state(self, name: str) -> base.PowerState:
        self._require(name)
        if not self._alive(name):
            return base.PowerState.SHUTDOWN
        try:
            status = self._qmp(name, 'query-status')['status']
        except exception.DriverError:
            if not self._alive(name):
                return base.PowerState.SHUTDOWN
            raise
        if status in ('paused', 'suspended'):
            return base.PowerState.PAUSED
        if status == 'shutdown':
            return base.PowerState.SHUTDOWN
        return base.PowerState.RUNNING

    def pause(self, name: str) -> None:
        self._require_running(name)
        self._qmp(name, 'stop')

    def resume(self, name: str) -> None:
        self._require_running(name)
        self._qmp(name, 'cont')

    def stop(self, name: str, timeout: float | None = None) -> bool:
        self._require(name)
        if not self._alive(name):
            return False
        timeout = self.conf.compute.stop_timeout if timeout is None else timeout

        def press():
            with contextlib.suppress(exception.DriverError):  # it may have just gone
                self._qmp(name, 'system_powerdown')

        went_off = base.press_power_button_until_off(press, lambda: not self._alive(name), timeout)
        self._kill(name)  # reaps it, or forces it off
        return not went_off

    def destroy(self, name: str) -> None:
        """:raises: InstanceNotFound; DriverError if a tap cannot be removed (the
        instance is then still known, and a second destroy tries again)."""
        self._require(name)
        self._kill(name)
        self._delete_taps(name)
        shutil.rmtree(self._dir(name), ignore_errors=True)
        with self._locks_lock:
            self._locks.pop(name, None)

    def console_log(self, name: str) -> str:
        self._require(name)
        return console.read(self._path(name, 'console.log'))

    def wait_for_event(self, name: str, event: str, timeout: float) -> None:
        self._require(name)
        console.wait_for_marker(self._path(name, 'console.log'), name, event, timeout,
                                lambda: self._alive(name))

    def freeze_io(self, name: str) -> None:
        # 'stop' stops the vCPUs, drains every block device and flushes it (an NBD
        # disk gets a FLUSH if it was written since its last one) before it returns;
        # stopped vCPUs issue no new I/O.
        self.pause(name)

    def thaw_io(self, name: str) -> None:
        self.resume(name)
