"""One conformance suite, run against every hypervisor driver.

The fake driver runs the suite in memory; qemu and libvirt boot the real test
guest (tools/guest/build-test-guest.sh) under the accelerator the probe picks.
"""
import os
import re
import time

from vmcloud import exception
from vmcloud.drivers import base as driver_base
from tests import base
from tests import guest

BOOT_TIMEOUT = 60


class DriverConformance:
    """Mixed into a TestCase with ``driver_name`` set."""

    driver_name: str
    boots_real_guest = True

    def setUp(self):
        super().setUp()
        self.driver = driver_base.load(self.conf, self.driver_name)
        self.names = []
        self.addCleanup(self._destroy_all)

    def _destroy_all(self):
        for name in self.names:
            if name in self.driver.list_instances():
                self.driver.destroy(name)

    def make_spec(self, **flags) -> driver_base.InstanceSpec:
        name = guest.unique_name(self.driver_name)
        self.names.append(name)
        return guest.spec(name, guest.overlay(self.tmp, name), **flags)

    def boot(self, **flags) -> driver_base.InstanceSpec:
        spec = self.make_spec(**flags)
        self.driver.boot(spec, BOOT_TIMEOUT)
        return spec

    def assert_gone(self, name: str) -> None:
        self.assertNotIn(name, self.driver.list_instances())
        self.assertEqual([], guest.qemu_processes_named(name))

    def ticks(self, name: str) -> int:
        found = re.findall(r'^VMCLOUD-TICK (\d+)', self.driver.console_log(name), re.MULTILINE)
        return int(found[-1]) if found else 0

    # -- booting and stopping ---------------------------------------------------------

    def test_boot_phases_and_the_file_the_guest_wrote(self):
        spec = self.boot()
        self.driver.wait_for_event(spec.name, driver_base.APP_RUNNING, BOOT_TIMEOUT)
        self.assertEqual(driver_base.PowerState.RUNNING, self.driver.power_state(spec.name))
        self.assertFalse(self.driver.stop(spec.name, timeout=BOOT_TIMEOUT))
        self.assertEqual(driver_base.PowerState.SHUTDOWN, self.driver.power_state(spec.name))
        log = self.driver.console_log(spec.name)
        phases = re.findall(r'^VMCLOUD-PHASE (\S+)', log, re.MULTILINE)
        self.assertEqual(list(driver_base.PHASES), phases)
        if self.boots_real_guest:
            with open(guest.path('data.md5')) as f:
                self.assertIn(f'VMCLOUD-DATA data.txt md5 {f.read().strip()}', log)
            wrote = guest.read_guest_file(spec.disk, '/guest-wrote.txt')
            self.assertEqual(spec.name + '\n', wrote)
            self.assertEqual([], guest.qemu_processes_named(spec.name))

    def test_pause_and_resume(self):
        spec = self.boot()
        self.driver.wait_for_event(spec.name, driver_base.APP_RUNNING, BOOT_TIMEOUT)
        self.driver.pause(spec.name)
        self.assertEqual(driver_base.PowerState.PAUSED, self.driver.power_state(spec.name))
        if self.boots_real_guest:
            paused_at = self.ticks(spec.name)
            time.sleep(1.5)  # the guest ticks every 0.5 s while it runs
            self.assertEqual(paused_at, self.ticks(spec.name))
        self.driver.resume(spec.name)
        self.assertEqual(driver_base.PowerState.RUNNING, self.driver.power_state(spec.name))
        if self.boots_real_guest:
            deadline = time.monotonic() + 20
            while self.ticks(spec.name) <= paused_at and time.monotonic() < deadline:
                time.sleep(0.1)
            self.assertGreater(self.ticks(spec.name), paused_at)

    def test_freeze_and_thaw_io(self):
        spec = self.boot()
        self.driver.freeze_io(spec.name)
        self.assertEqual(driver_base.PowerState.PAUSED, self.driver.power_state(spec.name))
        self.driver.thaw_io(spec.name)
        self.assertEqual(driver_base.PowerState.RUNNING, self.driver.power_state(spec.name))

    def test_forced_stop_of_a_guest_that_ignores_acpi(self):
        spec = self.boot()
        # A paused guest cannot answer the power button, on any hypervisor.
        self.driver.pause(spec.name)
        self.assertTrue(self.driver.stop(spec.name, timeout=1))
        self.assertEqual(driver_base.PowerState.SHUTDOWN, self.driver.power_state(spec.name))
        if self.boots_real_guest:
            self.assertEqual([], guest.qemu_processes_named(spec.name))

    def test_destroy_forgets_the_instance(self):
        spec = self.boot()
        self.driver.destroy(spec.name)
        self.assert_gone(spec.name)
        self.assertRaises(exception.InstanceNotFound, self.driver.power_state, spec.name)

    # -- errors -----------------------------------------------------------------------

    def test_missing_disk(self):
        spec = self.make_spec()
        os.unlink(spec.disk)
        error = self.assertRaises(exception.DiskNotFound, self.driver.spawn, spec)
        self.assertIn(spec.disk, str(error))
        self.assert_gone(spec.name)

    def test_unknown_nbd_host(self):
        spec = self.make_spec()
        spec = driver_base.InstanceSpec(**{**spec.__dict__, 'disk': 'nbd://no-such-host.invalid/x',
                                           'disk_format': 'raw'})
        error = self.assertRaises(exception.DiskNotFound, self.driver.spawn, spec)
        self.assertIn('unknown NBD host no-such-host.invalid', str(error))
        self.assert_gone(spec.name)

    def test_missing_nbd_socket(self):
        spec = self.make_spec()
        socket = os.path.join(self.tmp, 'no.sock')
        spec = driver_base.InstanceSpec(**{**spec.__dict__, 'disk_format': 'raw',
                                           'disk': f'nbd+unix:///disk?socket={socket}'})
        error = self.assertRaises(exception.DiskNotFound, self.driver.spawn, spec)
        self.assertIn(socket, str(error))

    def test_unknown_instance(self):
        for call in (self.driver.power_state, self.driver.pause, self.driver.resume,
                     self.driver.stop, self.driver.destroy, self.driver.console_log):
            self.assertRaises(exception.InstanceNotFound, call, 'no-such-instance')
        self.assertRaises(exception.InstanceNotFound, self.driver.wait_for_event,
                          'no-such-instance', driver_base.BOOT_DONE, 1)

    def test_duplicate_name(self):
        spec = self.boot()
        self.assertRaises(exception.InstanceExists, self.driver.spawn, spec)
        self.assertEqual(driver_base.PowerState.RUNNING, self.driver.power_state(spec.name))

    def test_host_capacity(self):
        capacity = self.driver.host_capacity()
        self.assertGreater(capacity.cpus, 0)
        self.assertGreater(capacity.memory_mib, 0)
        self.assertGreater(capacity.free_disk_bytes, 0)


class RealGuestConformance(DriverConformance):
    """What only a real guest can show: hangs and a guest ignoring the power button."""

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


class FakeDriverTest(DriverConformance, base.TestCase):
    driver_name = 'fake'
    boots_real_guest = False


class QemuDriverTest(RealGuestConformance, base.TestCase):
    driver_name = 'qemu'

    def test_qemu_not_installed(self):
        self.conf.set_override('qemu_binary', '/no/such/qemu-system-x86_64', 'compute')
        spec = self.make_spec()
        error = self.assertRaises(exception.HypervisorUnavailable, self.driver.spawn, spec)
        self.assertIn('/no/such/qemu-system-x86_64', str(error))
        self.assert_gone(spec.name)

    def test_qemu_refusing_the_disk(self):
        spec = self.make_spec()
        spec = driver_base.InstanceSpec(**{**spec.__dict__, 'disk_format': 'vmdk'})
        error = self.assertRaises(exception.SpawnFailed, self.driver.spawn, spec)
        self.assertIn('qemu refused to start', str(error))
        self.assert_gone(spec.name)


class LibvirtDriverTest(RealGuestConformance, base.TestCase):
    driver_name = 'libvirt'

    def test_libvirtd_not_running(self):
        socket = os.path.join(self.tmp, 'no-libvirtd.sock')
        self.conf.set_override('libvirt_uri', f'qemu:///system?socket={socket}', 'compute')
        error = self.assertRaises(exception.HypervisorUnavailable, self.driver.spawn,
                                  self.make_spec())
        self.assertIn(socket, str(error))

    def test_unknown_libvirt_host(self):
        self.conf.set_override('libvirt_uri', 'qemu+tcp://no-such-host.invalid/system',
                               'compute')
        error = self.assertRaises(exception.HypervisorUnavailable, self.driver.spawn,
                                  self.make_spec())
        self.assertIn('no-such-host.invalid', str(error))


class SimDriverTest(DriverConformance, base.TestCase):
    driver_name = 'sim'
    boots_real_guest = False
