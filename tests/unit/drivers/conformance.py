"""The one driver conformance suite, mixed into a TestCase per driver.

The fake and sim drivers run it at unit level (tests/unit/drivers/test_conformance.py);
qemu and libvirt boot the real test guest (tests/functional/drivers/test_conformance.py).
A subclass sets ``driver_name`` and may override ``instance_spec`` (how a spec of this
driver's guest is made) and the writing-guest hooks of the snapshot barrier case.

Tests that need what not every driver has are in groups: a capability
(``GROUP_CAPABILITIES``), or a guest that answers on its network (``GUEST_NETWORK``). A
driver without it leaves the group out of ``groups``, and those tests are then not
collected for it at all (they do not apply; a skip would say they might).
"""
import dataclasses
import os
import re
import time
import uuid

from vmcloud import exception
from vmcloud.drivers import base as driver_base

BOOT_TIMEOUT = 60
# Guests probe each other once a second after boot-done; under TCG on a loaded host a
# round can take several seconds (an unreachable target costs wget's 2 s timeout).
REACH_TIMEOUT = 180
Capability = driver_base.Capability
# The guests of the network case share one subnet, so an address on the other bridge
# is asked for on the segment (ARP) and not refused for want of a route: what keeps
# it unreachable is the bridge alone.
A1, A2, B1 = '10.99.1.2', '10.99.1.3', '10.99.1.4'
PREFIX = 24

# The groups of tests that only a driver with the capability runs.
GROUP_CAPABILITIES = {'pause': Capability.PAUSE, 'barrier': Capability.SNAPSHOT_BARRIER,
                      'nics': Capability.BRIDGED_NIC}
# Tests of a guest that talks on its NICs (DHCP, HTTP): there is one to boot.
GUEST_NETWORK = 'guest-network'
GROUPS = frozenset(GROUP_CAPABILITIES) | {GUEST_NETWORK}


def needs(*groups: str):
    """Put a test of the suite in ``groups``: it runs for a driver that has them all."""
    def mark(test):
        test.conformance_groups = frozenset(groups)
        return test
    return mark


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
    #: the test groups this driver runs (see GROUP_CAPABILITIES and GUEST_NETWORK)
    groups: frozenset[str] = GROUPS

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for attr, test in vars(DriverConformance).items():
            if getattr(cls, attr) is test and \
                    not getattr(test, 'conformance_groups', frozenset()) <= cls.groups:
                setattr(cls, attr, None)  # not callable: the test loader passes it by

    def setUp(self):
        super().setUp()
        self.driver = driver_base.load(self.conf, self.driver_name)
        self.names = []
        self.addCleanup(self._destroy_all)

    def _destroy_all(self):
        for name in self.names:
            if name in self.driver.list_instances():
                self.driver.destroy(name)

    def instance_spec(self, name: str, nics: tuple[driver_base.Nic, ...] = (),
                      **flags) -> driver_base.InstanceSpec:
        """A spec of this driver's guest called ``name`` with ``nics``; ``flags`` go to
        the guest."""
        raise NotImplementedError

    def make_bridge(self, mtu: int = 1500) -> str:
        """A bridge this driver's NICs may join, isolated, gone when the test ends."""
        raise NotImplementedError

    def assert_attached(self, spec: driver_base.InstanceSpec) -> None:
        """Whatever the host shows of ``spec``'s NICs while it runs."""

    def assert_detached(self, spec: driver_base.InstanceSpec) -> None:
        """Nothing of ``spec``'s NICs is left on the host."""

    def make_spec(self, nics: tuple[driver_base.Nic, ...] = (),
                  **flags) -> driver_base.InstanceSpec:
        name = f'{self.driver_name}-{uuid.uuid4().hex[:8]}'
        self.names.append(name)
        return self.instance_spec(name, nics=nics, **flags)

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

    @needs('pause')
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

    @needs('pause', 'barrier')
    def test_pause_of_a_stopped_guest_is_refused(self):
        spec = self.boot()
        self.driver.stop(spec.name, timeout=BOOT_TIMEOUT)
        for call in (self.driver.pause, self.driver.resume, self.driver.freeze_io):
            error = self.assertRaises(exception.DriverError, call, spec.name)
            self.assertNotIsInstance(error, exception.NotSupported)
        self.assertEqual(driver_base.PowerState.SHUTDOWN, self.driver.power_state(spec.name))

    @needs('barrier')
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

    @needs('barrier')
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

    @needs('pause')
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
        # Every driver here boots from a mirror and shows the compute manager its phases.
        for needed in (Capability.CONSOLE_LOG, Capability.PHASE_EVENTS, Capability.NBD_DISK):
            self.assertTrue(self.driver.has(needed), f'{self.driver_name} lacks {needed}')
        # A group is left out exactly when the driver does not claim its capability.
        for group, capability in GROUP_CAPABILITIES.items():
            self.assertEqual(group in self.groups, self.driver.has(capability),
                             f'{self.driver_name}: test group {group} and {capability}')
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

    # -- NICs: guests on one bridge reach each other and nothing else -------------------

    def reach_lines(self, name: str, address: str) -> list[str]:
        """The answers ``name`` printed for ``address``:80 so far, in order: 'no' or
        the first line of the body that answered."""
        return re.findall(rf'^VMCLOUD-REACH {re.escape(address)}:80 (no|yes .*?)\r?$',
                          self.driver.console_log(name), re.MULTILINE)

    def wait_for_reach(self, name: str, address: str, predicate, what: str) -> list[str]:
        deadline = time.monotonic() + REACH_TIMEOUT
        while True:
            lines = self.reach_lines(name, address)
            if predicate(lines):
                return lines
            if self.driver.power_state(name) != driver_base.PowerState.RUNNING:
                self.fail(f'{name} stopped before {what}: {lines}')
            if time.monotonic() >= deadline:
                self.fail(f'{name}: {what} not within {REACH_TIMEOUT} s; its answers for '
                          f'{address}: {lines}; console ends: '
                          f'{self.driver.console_log(name)[-600:]}')
            time.sleep(0.5)

    @needs('nics', GUEST_NETWORK)
    def test_guests_on_one_bridge_reach_each_other_and_no_other(self):
        # bridge 1 as small as the network agent's (VXLAN room): the NIC follows it
        bridge1, bridge2 = self.make_bridge(mtu=1450), self.make_bridge()
        tries = str(REACH_TIMEOUT)   # rounds take at least a second: they outlast the wait
        a1 = self.make_spec(nics=(driver_base.Nic('52:54:00:99:01:02', bridge1),),
                            ip=f'{A1}/{PREFIX}', reach=f'{A2},{B1}', reach_tries=tries)
        a2 = self.make_spec(nics=(driver_base.Nic('52:54:00:99:01:03', bridge1),),
                            ip=f'{A2}/{PREFIX}')
        # B1 asks itself too: its server answers, so A1's "no" is the bridges' doing
        b1 = self.make_spec(nics=(driver_base.Nic('52:54:00:99:01:04', bridge2),),
                            ip=f'{B1}/{PREFIX}', reach=f'{A1},{B1}', reach_tries=tries)
        specs = {a1: A1, a2: A2, b1: B1}
        for spec in specs:          # all three boot at once
            self.driver.spawn(spec)
        for spec, address in specs.items():
            self.driver.wait_for_event(spec.name, driver_base.BOOT_DONE, BOOT_TIMEOUT)
            self.assertIn(f'VMCLOUD-NET eth0 {address}/{PREFIX}',
                          self.driver.console_log(spec.name))
            self.assert_attached(spec)

        def answered_by(spec):
            return lambda lines: any(line.startswith(f'yes {spec.name} ') for line in lines)

        self.wait_for_reach(a1.name, A2, answered_by(a2), f'an answer from {a2.name}')
        self.wait_for_reach(b1.name, B1, answered_by(b1), 'an answer from itself')
        # one more round of each after both servers were seen answering
        seen_a1 = len(self.reach_lines(a1.name, B1))
        seen_b1 = len(self.reach_lines(b1.name, A1))
        a1_to_b1 = self.wait_for_reach(a1.name, B1, lambda lines: len(lines) > seen_a1,
                                       'a round after B1 answered itself')
        b1_to_a1 = self.wait_for_reach(b1.name, A1, lambda lines: len(lines) > seen_b1,
                                       'a round after A1 reached A2')
        self.assertEqual(['no'] * len(a1_to_b1), a1_to_b1, 'A1 reached B1 across bridges')
        self.assertEqual(['no'] * len(b1_to_a1), b1_to_a1, 'B1 reached A1 across bridges')
        for spec in specs:
            self.driver.destroy(spec.name)
            self.assert_detached(spec)

    def invalid_nics(self, bridge: str) -> list[tuple]:
        """(nics, words the error must contain) validate must refuse."""
        nic = driver_base.Nic
        return [
            ((nic('52:54:00:12:34', bridge),), "'52:54:00:12:34' is not six hex bytes"),
            ((nic('52-54-00-12-34-56', bridge),), 'not six hex bytes'),
            ((nic('53:54:00:12:34:56', bridge),), '53:54:00:12:34:56 is a multicast'),
            ((nic('00:16:3e:12:34:56', bridge),), 'not locally administered'),
            ((nic('52:54:00:12:34:56', 'no-such-bridge'),), 'no bridge no-such-bridge'),
            ((nic('52:54:00:12:34:56', 'a/b'),), "'a/b' is not an interface name"),
            ((nic('52:54:00:12:34:56', bridge), nic('52:54:00:12:34:56', bridge)),
             'NIC 1: the MAC 52:54:00:12:34:56 is already on another NIC'),
            (tuple(nic(f'52:54:00:12:34:{i:02x}', bridge) for i in range(9)),
             '9 NICs, at most 8'),
            (({'mac': '52:54:00:12:34:56', 'bridge': bridge},), 'NIC 0 is a dict'),
        ]

    @needs('nics')
    def test_validate_refuses_bad_nics(self):
        bridge = self.make_bridge()
        good = self.make_spec(nics=(driver_base.Nic('52:54:00:12:34:56', bridge),
                                    driver_base.Nic('fe:00:00:00:00:01', bridge)))
        self.driver.validate(good)
        for nics, words in self.invalid_nics(bridge):
            with self.subTest(nics=nics):
                spec = replace(good, nics=nics)
                error = self.assertRaises(exception.InvalidSpec, self.driver.spawn, spec)
                self.assertIn(words, str(error))
                self.assert_gone(spec.name)
                self.assert_detached(spec)

    # -- errors -----------------------------------------------------------------------

    def remove_disk(self, spec: driver_base.InstanceSpec) -> None:
        """Make ``spec``'s disk go away: by default a file, removed."""
        os.unlink(spec.disk)

    def test_missing_disk(self):
        spec = self.make_spec()
        self.remove_disk(spec)
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
