"""The one driver conformance suite, mixed into a TestCase per driver.

The fake and sim drivers run it at unit level (tests/unit/drivers/test_conformance.py);
qemu and libvirt boot the real test guest (tests/functional/drivers/test_conformance.py).
A subclass sets ``driver_name`` and may override ``instance_spec`` (how a spec of this
driver's guest is made) and the writing-guest hooks of the snapshot barrier case.
"""
import dataclasses
import os
import re
import time
import uuid

from vmcloud import exception
from vmcloud.drivers import base as driver_base

BOOT_TIMEOUT = 60
Capability = driver_base.Capability


def replace(spec: driver_base.InstanceSpec, **changes) -> driver_base.InstanceSpec:
    return dataclasses.replace(spec, **changes)


def assert_barrier_held(test, events: list[tuple]) -> None:
    """freeze_io's contract on a disk's event log, between the test's marks.

    Every write that reached the disk before freeze_io returned is followed by a
    flush before it returned, and no write reaches it from then until thaw_io.
    """
    def at(mark):
        return events.index(('mark', mark))
    called, returned, thawing = at('freeze'), at('frozen'), at('thaw')
    writes = [i for i, e in enumerate(events[:returned]) if e[0] == 'write']
    test.assertTrue(writes, 'the guest wrote nothing before the freeze: nothing was tested')
    flushes = [i for i, e in enumerate(events[:returned]) if e[0] == 'flush']
    test.assertTrue(flushes and flushes[-1] > writes[-1],
                    f'a write before the freeze returned was not flushed: events '
                    f'{called}..{returned} are {events[called:returned + 1]}')
    held = [e for e in events[returned:thawing] if e[0] == 'write']
    test.assertEqual([], held, 'writes reached the disk while the guest was frozen')


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

    def instance_spec(self, name: str, **flags) -> driver_base.InstanceSpec:
        """A spec of this driver's guest called ``name``; ``flags`` go to the guest."""
        raise NotImplementedError

    def make_spec(self, **flags) -> driver_base.InstanceSpec:
        name = f'{self.driver_name}-{uuid.uuid4().hex[:8]}'
        self.names.append(name)
        return self.instance_spec(name, **flags)

    def boot(self, **flags) -> driver_base.InstanceSpec:
        spec = self.make_spec(**flags)
        self.driver.boot(spec, BOOT_TIMEOUT)
        return spec

    def assert_gone(self, name: str) -> None:
        self.assertNotIn(name, self.driver.list_instances())

    def ticks(self, name: str) -> int:
        found = re.findall(r'^VMCLOUD-TICK (\d+)', self.driver.console_log(name), re.MULTILINE)
        return int(found[-1]) if found else 0

    # -- booting and stopping ---------------------------------------------------------

    def test_boot_phases(self):
        spec = self.boot()
        self.driver.wait_for_event(spec.name, driver_base.APP_RUNNING, BOOT_TIMEOUT)
        self.assertEqual(driver_base.PowerState.RUNNING, self.driver.power_state(spec.name))
        self.assertFalse(self.driver.stop(spec.name, timeout=BOOT_TIMEOUT))
        self.assertEqual(driver_base.PowerState.SHUTDOWN, self.driver.power_state(spec.name))
        self.assertIn(spec.name, self.driver.list_instances())   # known until destroyed
        self.assertFalse(self.driver.stop(spec.name, timeout=1))  # already off
        log = self.driver.console_log(spec.name)
        phases = re.findall(r'^VMCLOUD-PHASE (\S+)', log, re.MULTILINE)
        self.assertEqual(list(driver_base.PHASES), phases)

    def test_pause_and_resume(self):
        spec = self.boot()
        self.driver.wait_for_event(spec.name, driver_base.APP_RUNNING, BOOT_TIMEOUT)
        self.driver.pause(spec.name)
        self.driver.pause(spec.name)        # pausing a paused guest does nothing
        self.assertEqual(driver_base.PowerState.PAUSED, self.driver.power_state(spec.name))
        if self.boots_real_guest:
            paused_at = self.ticks(spec.name)
            time.sleep(1.5)  # the guest ticks every 0.5 s while it runs
            self.assertEqual(paused_at, self.ticks(spec.name))
        self.driver.resume(spec.name)
        self.driver.resume(spec.name)       # resuming a running guest does nothing
        self.assertEqual(driver_base.PowerState.RUNNING, self.driver.power_state(spec.name))
        if self.boots_real_guest:
            deadline = time.monotonic() + 20
            while self.ticks(spec.name) <= paused_at and time.monotonic() < deadline:
                time.sleep(0.1)
            self.assertGreater(self.ticks(spec.name), paused_at)

    def test_pause_of_a_stopped_guest_is_refused(self):
        spec = self.boot()
        self.driver.stop(spec.name, timeout=BOOT_TIMEOUT)
        for call in (self.driver.pause, self.driver.resume, self.driver.freeze_io):
            error = self.assertRaises(exception.DriverError, call, spec.name)
            self.assertNotIsInstance(error, exception.NotSupported)
        self.assertEqual(driver_base.PowerState.SHUTDOWN, self.driver.power_state(spec.name))

    def test_freeze_and_thaw_io(self):
        spec = self.boot()
        self.driver.freeze_io(spec.name)
        self.assertEqual(driver_base.PowerState.PAUSED, self.driver.power_state(spec.name))
        self.driver.thaw_io(spec.name)
        self.assertEqual(driver_base.PowerState.RUNNING, self.driver.power_state(spec.name))

    # -- the snapshot barrier: a flush reaches the disk, then nothing until thaw ------

    def writing_guest(self) -> tuple[driver_base.InstanceSpec, list[tuple]]:
        """A booted guest that writes to its disk, and the disk's event log."""
        raise NotImplementedError

    def guest_writes(self, spec: driver_base.InstanceSpec, events: list[tuple]) -> None:
        """Return once the guest has writes on its disk that were not flushed yet."""
        raise NotImplementedError

    def while_frozen(self, spec: driver_base.InstanceSpec) -> None:
        """What the guest tries while frozen (a real guest keeps trying by itself)."""

    def test_freeze_flushes_the_guests_writes_and_holds_new_ones(self):
        spec, events = self.writing_guest()
        self.guest_writes(spec, events)
        events.append(('mark', 'freeze'))
        self.driver.freeze_io(spec.name)
        events.append(('mark', 'frozen'))
        self.while_frozen(spec)
        events.append(('mark', 'thaw'))
        self.driver.thaw_io(spec.name)
        assert_barrier_held(self, events)
        self.assertEqual(driver_base.PowerState.RUNNING, self.driver.power_state(spec.name))

    def test_forced_stop_of_a_guest_that_ignores_acpi(self):
        spec = self.boot()
        # A paused guest cannot answer the power button, on any hypervisor.
        self.driver.pause(spec.name)
        self.assertTrue(self.driver.stop(spec.name, timeout=1))
        self.assertEqual(driver_base.PowerState.SHUTDOWN, self.driver.power_state(spec.name))

    def test_destroy_forgets_the_instance(self):
        spec = self.boot()
        self.driver.destroy(spec.name)
        self.assert_gone(spec.name)
        self.assertRaises(exception.InstanceNotFound, self.driver.power_state, spec.name)

    # -- capabilities -------------------------------------------------------------------

    def test_capabilities_are_declared_and_kept(self):
        capabilities = self.driver.capabilities
        self.assertIsInstance(capabilities, Capability)
        # Every driver here runs the compute manager's whole job.
        for needed in (Capability.PAUSE, Capability.SNAPSHOT_BARRIER, Capability.CONSOLE_LOG,
                       Capability.PHASE_EVENTS, Capability.NBD_DISK):
            self.assertTrue(self.driver.has(needed), f'{self.driver_name} lacks {needed}')
        spec = self.boot()
        self.assertTrue(self.driver.has(Capability.CONSOLE_LOG))
        self.assertIn('VMCLOUD-PHASE boot-done', self.driver.console_log(spec.name))

    # -- validate: a spec the driver cannot run is refused before anything starts ------

    def invalid_specs(self, spec: driver_base.InstanceSpec) -> list[tuple]:
        """(spec, words the error must contain) the driver must refuse."""
        missing = os.path.join(self.tmp, 'no-such-vmlinuz')
        return [
            (replace(spec, name='a/b'), "'a/b'"),
            (replace(spec, name='a,b'), "'a,b'"),
            (replace(spec, name=''), "''"),
            (replace(spec, memory_mib=0), 'memory_mib 0'),
            (replace(spec, memory_mib='256'), "memory_mib '256'"),
            (replace(spec, vcpus=0), 'vcpus 0'),
            (replace(spec, vcpus=100000), 'vcpus 100000'),
            (replace(spec, disk_format='vmdk'), "'vmdk'"),
            (replace(spec, disk='http://example.com/disk.img'), 'unsupported disk URI'),
            (replace(spec, disk=f'nbd+unix:///d?socket={self.tmp}/s', disk_format='qcow2'),
             'an NBD disk is raw'),
            (replace(spec, kernel=missing), missing),
            (replace(spec, kernel=None, initrd=spec.initrd or missing), 'initrd without'),
        ]

    def test_validate_refuses_what_the_driver_cannot_run(self):
        good = self.make_spec()
        self.driver.validate(good)
        for spec, words in self.invalid_specs(good):
            with self.subTest(spec=spec):
                error = self.assertRaises(exception.InvalidSpec, self.driver.validate, spec)
                self.assertIn(words, str(error))
                error = self.assertRaises(exception.InvalidSpec, self.driver.spawn, spec)
                self.assertIn(words, str(error))
                if isinstance(spec.name, str) and spec.name and '/' not in spec.name:
                    self.assert_gone(spec.name)
        self.assertEqual([], self.driver.list_instances())

    # -- errors -----------------------------------------------------------------------

    def test_missing_disk(self):
        spec = self.make_spec()
        os.unlink(spec.disk)
        error = self.assertRaises(exception.DiskNotFound, self.driver.spawn, spec)
        self.assertIn(spec.disk, str(error))
        self.assert_gone(spec.name)

    def test_unknown_nbd_host(self):
        spec = replace(self.make_spec(), disk='nbd://no-such-host.invalid/x', disk_format='raw')
        error = self.assertRaises(exception.DiskNotFound, self.driver.spawn, spec)
        self.assertIn('unknown NBD host no-such-host.invalid', str(error))
        self.assert_gone(spec.name)

    def test_missing_nbd_socket(self):
        socket = os.path.join(self.tmp, 'no.sock')
        spec = replace(self.make_spec(), disk_format='raw',
                       disk=f'nbd+unix:///disk?socket={socket}')
        error = self.assertRaises(exception.DiskNotFound, self.driver.spawn, spec)
        self.assertIn(socket, str(error))

    def test_unknown_instance(self):
        for call in (self.driver.power_state, self.driver.pause, self.driver.resume,
                     self.driver.stop, self.driver.destroy, self.driver.console_log,
                     self.driver.freeze_io, self.driver.thaw_io):
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
