"""The replay driver against vmcloud's NBD server serving an in-memory disk."""
import errno
import os
import socket
import threading
import time
from unittest import mock

import fixtures

from vmcloud import exception
from vmcloud.drivers import base as driver_base
from vmcloud.drivers import replay
from vmcloud.nbd import client as client_mod
from vmcloud.nbd import server as server_mod
from vmcloud.nbd import trace as trace_mod
from tests import base
from tests.unit import test_layering
from tests.unit.nbd import MemoryDevice

SIZE = 1024 * 1024
TIMEOUT = 30
E = trace_mod.Event


def wait_until(predicate, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f'not within {timeout} s: {what}')
        time.sleep(0.005)


class PlanTest(base.TestCase):
    def test_think_time_is_the_time_nothing_was_outstanding(self):
        trace = trace_mod.Trace('t', SIZE, 4096, (
            E(10, 'R', 0, 512, 5), E(12, 'R', 4096, 512, 1),   # the second overlaps the first
            E(20, 'W', 0, 512, 2), E(30, 'P', marker='boot-done'), E(31, 'R', 0, 512, 1),
            E(40, 'P', marker='shutdown-started'), E(45, 'W', 0, 512), E(46, 'F')))
        plan = replay.plan(trace)
        self.assertEqual([('R', 0.010, False), ('R', 0.0, True), ('W', 0.005, False),
                          ('P', 0.008, False), ('R', 0.001, False)],
                         [(s.event.op, round(s.think, 6), s.overlaps) for s in plan.running])
        self.assertEqual([('W', 0.005, False), ('F', 0.001, False)],
                         [(s.event.op, round(s.think, 6), s.overlaps) for s in plan.shutdown])

    def test_without_a_shutdown_marker_everything_runs_before_the_button(self):
        plan = replay.plan(trace_mod.Trace('t', SIZE, 4096, (E(1, 'R', 0, 1), E(2, 'F'))))
        self.assertEqual(2, len(plan.running))
        self.assertEqual((), plan.shutdown)

    def test_written_data_is_deterministic_and_each_instance_its_own(self):
        self.assertEqual(replay.write_data('vm1', 4096, 100), replay.write_data('vm1', 4096, 100))
        self.assertEqual(100, len(replay.write_data('vm1', 4096, 100)))
        self.assertNotEqual(replay.write_data('vm1', 4096, 100),
                            replay.write_data('vm2', 4096, 100))
        self.assertNotEqual(replay.write_data('vm1', 4096, 100),
                            replay.write_data('vm1', 8192, 100))


class LayeringTest(base.TestCase):
    def test_the_driver_knows_traces_by_their_format_not_by_the_mirror(self):
        with open(replay.__file__) as f:
            imported = test_layering.imported_modules(f.read(), replay.__name__)
        self.assertIn(trace_mod.__name__, imported)
        self.assertEqual([], sorted(m for m in imported
                                    if m == 'vmcloud.mirror' or m.startswith('vmcloud.mirror.')))


class ReplayTestCase(base.TestCase):
    def setUp(self):
        super().setUp()
        self.device = MemoryDevice(SIZE)
        self.server = server_mod.NbdServer()
        self.addCleanup(self.server.stop)
        self.server.add_export('disk', self.device)
        self.socket = os.path.join(self.tmp, 'nbd.sock')
        self.server.listen_unix(self.socket)
        self.server.start()
        self.conf.set_override('time_scale', 0, 'replay')
        self.driver = driver_base.load(self.conf, 'replay')
        self.addCleanup(self.destroy_all)

    def destroy_all(self):
        for gate in self.device.gates.values():
            gate.set()
        for name in self.driver.list_instances():
            self.driver.destroy(name)

    def use_trace(self, *events: trace_mod.Event, size: int = SIZE) -> str:
        path = os.path.join(self.tmp, f'{len(os.listdir(self.tmp))}.trace')
        trace_mod.write(path, size, 4096, events)
        self.conf.set_override('trace', path, 'replay')
        return path

    def spec(self, name: str = 'vm1', export: str = 'disk', **changes) -> driver_base.InstanceSpec:
        return driver_base.InstanceSpec(
            name=name, disk=f'nbd+unix:///{export}?socket={self.socket}', **changes)

    def gate(self, offset: int) -> threading.Event:
        gate = threading.Event()
        self.device.gates[offset] = gate
        return gate

    def phases(self, name: str) -> list[str]:
        return [line.split()[1] for line in self.driver.console_log(name).splitlines()
                if line.startswith('VMCLOUD-PHASE ')]


class LifecycleTest(ReplayTestCase):
    def test_boot_replays_the_trace_in_order_and_stop_replays_the_shutdown(self):
        self.use_trace(E(0, 'R', 0, 4096), E(1, 'W', 65536, 512), E(2, 'P', marker='boot-done'),
                       E(3, 'Z', 8192, 4096), E(4, 'T', 16384, 4096),
                       E(5, 'P', marker='app-running'), E(6, 'F'),
                       E(7, 'P', marker='shutdown-started'), E(8, 'W', 131072, 100),
                       E(9, 'F'))
        spec = self.spec()
        self.driver.boot(spec, TIMEOUT)
        self.driver.wait_for_event('vm1', 'app-running', TIMEOUT)
        wait_until(lambda: ('flush',) in self.device.calls, 'the flush')
        self.assertEqual([('read', 0, 4096), ('write', 65536, 512, False),
                          ('write_zeroes', 8192, 4096, False), ('trim', 16384, 4096),
                          ('write_zeroes', 16384, 4096, False), ('flush',)], self.device.calls)
        self.assertEqual(replay.write_data('vm1', 65536, 512), self.device.data[65536:66048])
        # the trace is over: the guest idles until its power button
        self.assertEqual(driver_base.PowerState.RUNNING, self.driver.power_state('vm1'))
        self.assertEqual(['boot-done', 'app-running'], self.phases('vm1'))
        self.assertFalse(self.driver.stop('vm1', timeout=TIMEOUT))
        self.assertEqual([('write', 131072, 100, False), ('flush',)], self.device.calls[-2:])
        self.assertEqual(['boot-done', 'app-running', 'shutdown-started'], self.phases('vm1'))
        self.assertEqual(driver_base.PowerState.SHUTDOWN, self.driver.power_state('vm1'))
        self.assertFalse(self.driver.stop('vm1', timeout=1))
        # known until destroyed; the name may be used again once it is off
        self.assertEqual(['vm1'], self.driver.list_instances())
        self.driver.boot(spec, TIMEOUT)
        self.driver.destroy('vm1')
        self.assertEqual([], self.driver.list_instances())
        self.assertRaises(exception.InstanceNotFound, self.driver.power_state, 'vm1')

    def test_the_power_button_cuts_the_replay_short(self):
        self.conf.set_override('time_scale', 1, 'replay')
        # an hour of thinking after boot-done: the button comes first
        self.use_trace(E(0, 'P', marker='boot-done'), E(3_600_000, 'W', 0, 512),
                       E(3_600_001, 'P', marker='shutdown-started'), E(3_600_002, 'W', 4096, 8))
        self.driver.boot(self.spec(), TIMEOUT)
        self.assertFalse(self.driver.stop('vm1', timeout=TIMEOUT))
        self.assertEqual([('write', 4096, 8, False)], self.device.calls)
        self.assertEqual(['boot-done', 'shutdown-started'], self.phases('vm1'))

    def test_a_trace_without_markers_still_stops(self):
        self.use_trace(E(0, 'R', 0, 512))
        self.driver.spawn(self.spec())
        wait_until(lambda: self.device.calls, 'the read')
        self.assertFalse(self.driver.stop('vm1', timeout=TIMEOUT))
        self.assertEqual(['shutdown-started'], self.phases('vm1'))

    def test_think_time_is_scaled(self):
        self.use_trace(E(10, 'R', 0, 512, 5), E(12, 'R', 4096, 512, 1),
                       E(20, 'P', marker='boot-done'))
        for scale, expected in ((2.0, [0.020, 0.010]), (0.0, [0.0, 0.0])):
            with self.subTest(scale=scale):
                self.conf.set_override('time_scale', scale, 'replay')
                thought = []

                def think(instance, seconds, until_pressed):
                    thought.append(round(seconds, 6))
                with mock.patch.object(replay.ReplayInstance, 'think', autospec=True,
                                       side_effect=think):
                    self.driver.boot(self.spec(f'vm{scale:g}'), TIMEOUT)
                # the overlapping read has no think time of its own
                self.assertEqual(expected, thought)

    def test_queue_depth_lets_overlapping_requests_overlap(self):
        # the second read was issued while the first was outstanding
        self.use_trace(E(0, 'R', 0, 512, 10), E(1, 'R', 65536, 512, 1),
                       E(20, 'P', marker='boot-done'))
        gate = self.gate(0)
        self.driver.spawn(self.spec('one'))
        instance = self.driver.instances['one']
        wait_until(lambda: self.server.buffered_bytes, 'the first read at the server')
        # one at a time: the first is stuck, so the second was not sent
        self.assertEqual((1, 0, []), (instance.in_flight, instance.done, self.device.calls))
        gate.set()
        self.driver.wait_for_event('one', 'boot-done', TIMEOUT)
        self.assertEqual([('read', 0, 512), ('read', 65536, 512)], self.device.calls)

        self.device.calls.clear()
        self.conf.set_override('queue_depth', 2, 'replay')
        gate = self.gate(0)
        self.driver.spawn(self.spec('two'))
        wait_until(lambda: ('read', 65536, 512) in self.device.calls,
                   'the second read while the first is stuck')
        self.assertNotIn(('read', 0, 512), self.device.calls)
        gate.set()
        self.driver.wait_for_event('two', 'boot-done', TIMEOUT)
        self.assertEqual(2, self.driver.instances['two'].done)

    def test_a_failed_read_crashes_the_instance_and_its_console_says_why(self):
        self.use_trace(E(0, 'R', 0, 4096), E(1, 'P', marker='boot-done'))
        self.device.failures['read'] = OSError(errno.EIO, 'chunk fetch failed')
        for depth in (1, 3):
            with self.subTest(depth=depth):
                self.conf.set_override('queue_depth', depth, 'replay')
                name = f'vm{depth}'
                self.driver.spawn(self.spec(name))
                error = self.assertRaises(exception.GuestTimeout, self.driver.wait_for_event,
                                          name, 'boot-done', TIMEOUT)
                self.assertIn(f'instance {name} did not reach boot-done: the guest stopped '
                              'first', str(error))
                self.assertEqual(driver_base.PowerState.SHUTDOWN,
                                 self.driver.power_state(name))
                log = self.driver.console_log(name)
                self.assertIn("VMCLOUD-REPLAY I/O error: NBD export 'disk': read of 4096 bytes "
                              "at 0 failed: EIO", log)
                self.assertIn('VMCLOUD-REPLAY the guest crashed', log)
                self.assertIn('crashed', str(error))
                self.assertFalse(self.driver.stop(name, timeout=1))

    def test_any_error_of_a_request_crashes_the_instance_naming_it(self):
        # Not an NBD error: a bug, in the client or the driver, on the request's thread.
        def broken_read(client, offset, length):
            raise RuntimeError('a bug in the client')
        self.useFixture(fixtures.MockPatchObject(client_mod.NbdClient, 'read', broken_read))
        logs = self.useFixture(fixtures.FakeLogger(name='vmcloud.drivers.replay'))
        self.use_trace(E(0, 'R', 0, 4096), E(1, 'P', marker='boot-done'))
        for depth in (1, 3):
            with self.subTest(depth=depth):
                self.conf.set_override('queue_depth', depth, 'replay')
                name = f'vm{depth}'
                self.driver.spawn(self.spec(name))
                instance = self.driver.instances[name]
                error = self.assertRaises(exception.GuestTimeout, self.driver.wait_for_event,
                                          name, 'boot-done', TIMEOUT)
                self.assertIn('the guest stopped first', str(error))
                self.assertEqual(driver_base.PowerState.SHUTDOWN,
                                 self.driver.power_state(name))
                self.assertIn('VMCLOUD-REPLAY I/O error: internal error in request '
                              '"0.000 R 0 4096 0.000": RuntimeError: a bug in the client',
                              self.driver.console_log(name))
                self.assertEqual((0, 0), (instance.in_flight, instance.done))
                wait_until(lambda: not any(t.is_alive() for t in instance._threads),
                           'the instance\'s threads ending')
        self.assertIn('RuntimeError: a bug in the client', logs.output)

    def test_destroy_and_a_forced_stop_end_a_replay_stuck_in_a_request(self):
        self.use_trace(E(0, 'R', 0, 512), E(1, 'P', marker='boot-done'))
        for depth in (1, 2):
            self.conf.set_override('queue_depth', depth, 'replay')
            for how in ('destroy', 'stop'):
                with self.subTest(depth=depth, how=how):
                    gate = self.gate(0)
                    self.addCleanup(gate.set)
                    self.driver.spawn(self.spec())
                    instance = self.driver.instances['vm1']
                    wait_until(lambda: instance.in_flight, 'the read in flight')
                    if how == 'destroy':
                        self.driver.destroy('vm1')
                        self.assertEqual([], self.driver.list_instances())
                    else:
                        self.assertTrue(self.driver.stop('vm1', timeout=0))
                        self.assertEqual(driver_base.PowerState.SHUTDOWN,
                                         self.driver.power_state('vm1'))
                        self.assertNotIn('crashed', self.driver.console_log('vm1'))
                        self.driver.destroy('vm1')
                    self.assertEqual([], [t for t in instance._threads if t.is_alive()])
                    gate.set()


class PauseTest(ReplayTestCase):
    def writing(self, scale: float = 1.0) -> None:
        """A replay writing, 2 ms apart as recorded (or back to back), a flush every 50."""
        self.conf.set_override('time_scale', scale, 'replay')
        events = [E(0, 'P', marker='boot-done')]
        for i in range(2000 if scale else 50000):
            events.append(E(1 + 2 * i, 'W', 4096 * (i % 200), 4096, 0.5))
            if i % 50 == 49:
                events.append(E(2 + 2 * i, 'F'))
        self.use_trace(*events)
        self.driver.boot(self.spec(), TIMEOUT)
        wait_until(lambda: self.device.calls and self.device.calls[-1][0] == 'write',
                   'a write after the last flush')

    def test_freeze_flushes_and_holds_every_request_until_thaw(self):
        # back to back, pausing is up to the requests alone; as recorded, the think time too
        for scale in (1.0, 0.0):
            with self.subTest(scale=scale):
                self.device.calls.clear()
                self.writing(scale)
                self.driver.freeze_io('vm1')
                self.assertEqual(driver_base.PowerState.PAUSED, self.driver.power_state('vm1'))
                frozen = len(self.device.calls)
                self.assertEqual(('flush',), self.device.calls[-1])
                time.sleep(0.3)  # a running replay would write 150 times meanwhile, or more
                self.assertEqual(frozen, len(self.device.calls))
                self.driver.thaw_io('vm1')
                wait_until(lambda: len(self.device.calls) > frozen, 'writes after the thaw')
                self.assertEqual(driver_base.PowerState.RUNNING,
                                 self.driver.power_state('vm1'))
                self.driver.destroy('vm1')

    def test_freeze_waits_for_the_requests_in_flight_before_its_flush(self):
        self.conf.set_override('queue_depth', 2, 'replay')
        # the write overlaps the read, so it goes on the other connection at once (a
        # request takes the first idle connection: the read the first, the write the last,
        # which the freeze's flush then finds idle)
        self.use_trace(E(0, 'R', 0, 512, 10), E(1, 'W', 65536, 512, 1),
                       E(20, 'P', marker='boot-done'))
        gate = self.gate(0)
        self.driver.spawn(self.spec())
        wait_until(lambda: ('write', 65536, 512, False) in self.device.calls,
                   'the write while the read is stuck')
        threading.Timer(0.2, gate.set).start()
        self.driver.freeze_io('vm1')
        self.assertEqual([('write', 65536, 512, False), ('read', 0, 512), ('flush',)],
                         self.device.calls)
        self.driver.thaw_io('vm1')
        self.driver.wait_for_event('vm1', 'boot-done', TIMEOUT)

    def test_pause_and_resume_are_idempotent_and_refused_once_off(self):
        self.writing()
        self.driver.pause('vm1')
        self.driver.pause('vm1')
        self.assertEqual(driver_base.PowerState.PAUSED, self.driver.power_state('vm1'))
        self.driver.resume('vm1')
        self.driver.resume('vm1')
        self.assertEqual(driver_base.PowerState.RUNNING, self.driver.power_state('vm1'))
        self.driver.pause('vm1')
        # a paused guest does not answer its power button: forced off
        self.assertTrue(self.driver.stop('vm1', timeout=0.1))
        for call in (self.driver.pause, self.driver.resume, self.driver.freeze_io,
                     self.driver.thaw_io):
            error = self.assertRaises(exception.DriverError, call, 'vm1')
            self.assertEqual('instance vm1 is shutdown', str(error))


class RefusalTest(ReplayTestCase):
    def assert_refused(self, error_class, words: str, spec=None) -> None:
        spec = spec or self.spec()
        error = self.assertRaises(error_class, self.driver.spawn, spec)
        self.assertIn(words, str(error))
        self.assertEqual([], self.driver.list_instances())

    def test_no_trace_or_one_that_does_not_parse(self):
        self.assert_refused(exception.SpawnFailed, 'no trace to replay: set [replay] trace')
        missing = os.path.join(self.tmp, 'none.trace')
        self.conf.set_override('trace', missing, 'replay')
        self.assert_refused(exception.SpawnFailed, f'the replay trace {missing} cannot be read')
        bad = os.path.join(self.tmp, 'bad.trace')
        with open(bad, 'w') as f:
            f.write('vmcloud-trace 1 size=100 block=10\n1 R 0 10\n2 Q 0 10\n')
        self.conf.set_override('trace', bad, 'replay')
        self.assert_refused(exception.SpawnFailed, f"trace {bad} line 3: unknown operation 'Q'")

    def test_a_disk_the_trace_does_not_fit(self):
        path = self.use_trace(E(0, 'R', 0, 512), size=2 * SIZE)
        self.assert_refused(exception.SpawnFailed, f'the trace {path} is of a disk of '
                                                   f'{2 * SIZE} bytes, larger than its disk')
        self.server.add_export('ro', MemoryDevice(SIZE, read_only=True))
        self.use_trace(E(0, 'W', 0, 512))
        self.assert_refused(exception.SpawnFailed, 'is read-only and the trace', self.spec(
            export='ro'))

    def test_a_disk_that_is_not_there(self):
        self.use_trace(E(0, 'R', 0, 512))
        spec = self.spec(export='gone')
        self.assert_refused(exception.DiskNotFound, f'disk {spec.disk} of instance vm1 does '
                                                    'not exist', spec)
        # a socket nobody listens on
        dead = os.path.join(self.tmp, 'dead.sock')
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(dead)
        spec = driver_base.InstanceSpec(name='vm1', disk=f'nbd+unix:///disk?socket={dead}')
        self.assert_refused(exception.SpawnFailed, 'cannot open its disk', spec)
        self.assert_refused(exception.DiskNotFound, 'does not exist', driver_base.InstanceSpec(
            name='vm1', disk=f'nbd+unix:///disk?socket={self.tmp}/none.sock'))

    def test_no_nics_on_missing_bridges_no_file_disks_and_no_name_twice(self):
        self.use_trace(E(0, 'P', marker='boot-done'))
        nics = (driver_base.Nic('52:54:00:00:00:01', 'vtbr-none'),)
        self.assert_refused(exception.InvalidSpec,
                            'NIC 0: there is no bridge vtbr-none on this host',
                            self.spec(nics=nics))
        disk = os.path.join(self.tmp, 'disk.raw')
        open(disk, 'wb').close()
        self.assert_refused(exception.InvalidSpec, 'cannot boot from a local file',
                            driver_base.InstanceSpec(name='vm1', disk=disk))
        self.driver.boot(self.spec(), TIMEOUT)
        self.assertRaises(exception.InstanceExists, self.driver.spawn, self.spec())
        self.assertEqual(driver_base.PowerState.RUNNING, self.driver.power_state('vm1'))

    def test_a_nic_that_cannot_be_attached_leaves_no_tap(self):
        self.use_trace(E(0, 'P', marker='boot-done'))
        made, deleted = [], []

        def create(device, bridge):
            if bridge == 'broken':
                raise exception.DriverError('ip link set dev ... failed: no such bridge')
            made.append(device)
        self.useFixture(fixtures.MockPatchObject(self.driver, 'bridge_exists',
                                                 lambda bridge: True))
        self.useFixture(fixtures.MockPatch('vmcloud.drivers.tap.create', side_effect=create))
        self.useFixture(fixtures.MockPatch('vmcloud.drivers.tap.delete',
                                           side_effect=deleted.append))
        spec = self.spec(nics=(driver_base.Nic('52:54:00:00:00:01', 'br0'),
                               driver_base.Nic('52:54:00:00:00:02', 'broken')))
        self.assert_refused(exception.SpawnFailed, 'cannot attach NIC 1 of instance vm1 to '
                                                   'bridge broken: ip link set', spec)
        self.assertEqual([driver_base.tap_name('vm1', 0)], made)
        self.assertEqual([driver_base.tap_name('vm1', i) for i in range(driver_base.MAX_NICS)],
                         deleted)
        self.assertEqual(0, self.server.buffered_bytes)

    def test_host_capacity_is_what_it_is_configured_to_offer(self):
        self.conf.set_override('host_cpus', 96, 'replay')
        self.conf.set_override('host_memory_mib', 50000, 'replay')
        capacity = self.driver.host_capacity()
        self.assertEqual((96, 50000), (capacity.cpus, capacity.memory_mib))
        self.assertGreater(capacity.free_disk_bytes, 0)
