"""The conformance suite (tests/unit/drivers/conformance.py) against drivers that boot guests.

qemu and libvirt boot the real test guest (tools/guest/build-test-guest.sh) under the
accelerator the probe picks; the fake and sim drivers run the same suite at unit level.
"""
import os
import shutil
import signal
import time

from vmcloud import exception
from vmcloud.drivers import base as driver_base
from vmcloud.nbd import file_device
from vmcloud.nbd import server as server_mod
from tests import base
from tests import guest
from tests.unit.drivers import conformance

BOOT_TIMEOUT = conformance.BOOT_TIMEOUT


class RecordingDevice(file_device.FileDevice):
    """A file served over NBD that logs every write and flush the guest sends, in order."""

    def __init__(self, path: str):
        super().__init__(path)
        self.events: list[tuple] = []

    def write(self, offset, data, fua=False):
        super().write(offset, data, fua)
        # a FUA write is durable on its own: as good as a write and a flush
        self.events.append(('write', offset, len(data)))
        if fua:
            self.events.append(('flush',))

    def write_zeroes(self, offset, length, fua=False):
        super().write_zeroes(offset, length, fua)
        self.events.append(('write', offset, length))
        if fua:
            self.events.append(('flush',))

    def flush(self):
        super().flush()
        self.events.append(('flush',))


class RealGuestConformance(conformance.DriverConformance):
    """The suite on the real test guest, and what only a real guest can show."""

    def instance_spec(self, name: str, nics=(), **flags) -> driver_base.InstanceSpec:
        return guest.spec(name, guest.overlay(self.tmp, name), nics=nics, **flags)

    def assert_gone(self, name: str) -> None:
        super().assert_gone(name)
        self.assertEqual([], guest.qemu_processes_named(name))

    # -- NICs on real bridges ------------------------------------------------------------

    def _destroy_all(self):
        try:
            super()._destroy_all()
        finally:
            # what a failing driver left: no test leaves a device behind
            for name in self.names:
                guest.remove_taps(name)

    def make_bridge(self, mtu: int = 1500) -> str:
        return guest.make_bridge(self, mtu)

    def assert_attached(self, spec: driver_base.InstanceSpec) -> None:
        for index, nic in enumerate(spec.nics):
            tap = driver_base.tap_name(spec.name, index)
            self.assertEqual(nic.bridge,
                             os.path.basename(os.readlink(f'/sys/class/net/{tap}/master')))
            with open(f'/sys/class/net/{tap}/mtu') as f, \
                    open(f'/sys/class/net/{nic.bridge}/mtu') as g:
                self.assertEqual(g.read(), f.read())

    def assert_detached(self, spec: driver_base.InstanceSpec) -> None:
        for index in range(driver_base.MAX_NICS):
            self.assertFalse(guest.link_exists(driver_base.tap_name(spec.name, index)))

    def nic_spec(self, **flags) -> driver_base.InstanceSpec:
        bridge = self.make_bridge(mtu=1450)
        return self.make_spec(nics=(driver_base.Nic('52:54:00:99:02:01', bridge),
                                    driver_base.Nic('52:54:00:99:02:02', bridge)), **flags)

    def test_taps_go_with_the_instance(self):
        # no boot needed: the taps exist once spawn returns
        spec = self.nic_spec()
        self.driver.spawn(spec)
        self.assert_attached(spec)
        self.driver.stop(spec.name, timeout=0)    # forced off: the instance stays known
        self.driver.spawn(spec)                   # its name reused: the taps are made anew
        self.assert_attached(spec)
        # a driver restarted since the spawn removes them too
        driver_base.load(self.conf, self.driver_name).destroy(spec.name)
        self.assert_detached(spec)
        self.assert_gone(spec.name)

    def test_taps_go_when_the_hypervisor_died_first(self):
        spec = self.nic_spec()
        self.driver.spawn(spec)
        for pid in guest.qemu_processes_named(spec.name):
            os.kill(pid, signal.SIGKILL)
        self.driver.destroy(spec.name)
        self.assert_detached(spec)
        self.assert_gone(spec.name)

    # -- the snapshot barrier over vmcloud's NBD server ----------------------------------

    def writing_guest(self):
        raw = os.path.join(self.tmp, 'barrier.raw')
        shutil.copyfile(guest.path('disk.img'), raw)
        device = RecordingDevice(raw)
        self.addCleanup(device.close)
        server = server_mod.NbdServer()
        self.addCleanup(server.stop)
        socket = os.path.join(self.tmp, 'barrier.sock')
        server.add_export('disk', device)
        server.listen_unix(socket)
        server.start()
        name = guest.unique_name(self.driver_name)
        self.names.append(name)
        # the guest writes 24 MiB at boot: the kernel's writeback sends it without a flush
        spec = guest.spec(name, f'nbd+unix:///disk?socket={socket}', disk_format='raw',
                          write_mib='24')
        self.driver.spawn(spec)
        self.addCleanup(self._destroy_all)       # before the server stops
        self.driver.wait_for_event(name, driver_base.BOOT_DONE, BOOT_TIMEOUT)
        return spec, device.events

    def guest_writes(self, spec, events):
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            last_flush = max((i for i, e in enumerate(events) if e[0] == 'flush'), default=-1)
            if any(e[0] == 'write' for e in events[last_flush + 1:]):
                return
            time.sleep(0.005)
        self.fail(f'the guest sent no write without a flush after it: {events[-5:]}')

    def while_frozen(self, spec):
        time.sleep(1.0)   # the guest was in the middle of writing: it would go on

    # -- a real guest -----------------------------------------------------------------

    def test_the_guest_reads_and_writes_its_disk(self):
        spec = self.boot()
        self.driver.wait_for_event(spec.name, driver_base.APP_RUNNING, BOOT_TIMEOUT)
        self.assertFalse(self.driver.stop(spec.name, timeout=BOOT_TIMEOUT))
        log = self.driver.console_log(spec.name)
        with open(guest.path('data.md5')) as f:
            self.assertIn(f'VMCLOUD-DATA data.txt md5 {f.read().strip()}', log)
        wrote = guest.read_guest_file(spec.disk, '/guest-wrote.txt')
        self.assertEqual(spec.name + '\n', wrote)
        self.assertEqual([], guest.qemu_processes_named(spec.name))

    def test_guest_ignoring_the_power_button_is_forced_off(self):
        spec = self.boot(ignore_acpi='1')
        self.driver.wait_for_event(spec.name, driver_base.APP_RUNNING, BOOT_TIMEOUT)
        started = time.monotonic()
        self.assertTrue(self.driver.stop(spec.name, timeout=2))
        self.assertGreaterEqual(time.monotonic() - started, 2)
        self.assertEqual(driver_base.PowerState.SHUTDOWN, self.driver.power_state(spec.name))
        self.assertEqual([], guest.qemu_processes_named(spec.name))

    def test_destroy_a_hung_guest(self):
        spec = self.make_spec(hang='1')
        self.driver.spawn(spec)
        error = self.assertRaises(exception.GuestTimeout, self.driver.wait_for_event,
                                  spec.name, driver_base.BOOT_DONE, 3)
        self.assertIn(f'instance {spec.name} did not reach boot-done', str(error))
        self.assertEqual(driver_base.PowerState.RUNNING, self.driver.power_state(spec.name))
        self.driver.destroy(spec.name)
        self.assert_gone(spec.name)

    def test_boot_timeout_leaves_nothing_running(self):
        spec = self.make_spec(hang='1')
        error = self.assertRaises(exception.GuestTimeout, self.driver.boot, spec, 3)
        self.assertIn('not within 3 s', str(error))
        self.assert_gone(spec.name)


class QemuDriverTest(RealGuestConformance, base.TestCase):
    driver_name = 'qemu'

    def test_qemu_not_installed(self):
        self.conf.set_override('binary', '/no/such/qemu-system-x86_64', 'qemu')
        spec = self.make_spec()
        error = self.assertRaises(exception.HypervisorUnavailable, self.driver.spawn, spec)
        self.assertIn('/no/such/qemu-system-x86_64', str(error))
        self.assert_gone(spec.name)

    def test_qemu_refusing_the_disk(self):
        # declared qcow2, but raw bytes: validate cannot tell, qemu can
        spec = self.nic_spec()
        with open(spec.disk, 'wb') as f:
            f.write(b'not a qcow2 header' * 100)
        error = self.assertRaises(exception.SpawnFailed, self.driver.spawn, spec)
        self.assertIn('qemu refused to start', str(error))
        self.assert_gone(spec.name)
        self.assert_detached(spec)      # made before qemu started, removed after it failed


class LibvirtDriverTest(RealGuestConformance, base.TestCase):
    driver_name = 'libvirt'

    def test_libvirtd_not_running(self):
        socket = os.path.join(self.tmp, 'no-libvirtd.sock')
        self.conf.set_override('uri', f'qemu:///system?socket={socket}', 'libvirt')
        error = self.assertRaises(exception.HypervisorUnavailable, self.driver.spawn,
                                  self.make_spec())
        self.assertIn(socket, str(error))

    def test_unknown_libvirt_host(self):
        self.conf.set_override('uri', 'qemu+tcp://no-such-host.invalid/system', 'libvirt')
        error = self.assertRaises(exception.HypervisorUnavailable, self.driver.spawn,
                                  self.make_spec())
        self.assertIn('no-such-host.invalid', str(error))
