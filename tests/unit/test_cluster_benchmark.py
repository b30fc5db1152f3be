"""benchmarks/cluster.py's multi-snapshot phase: what it counts as unique dirty data,
when it calls a snapshot replicated and persistent, and the goal lines it writes; the
workers' events and sockets of (a) and (b)."""
import io
import json
import os
import socket
import sys
import threading
import time
from unittest import mock

from benchmarks import cluster
from tests import base
from vmcloud.drivers import base as driver_base
from vmcloud.nbd import trace as trace_mod
from vmcloud.storage import manifest as manifest_mod

KIB = 1024


def event(ms: float, op: str, offset: int = 0, length: int = 0, service_ms: float = 0.0,
          marker: str = '') -> trace_mod.Event:
    return trace_mod.Event(ms, op, offset, length, service_ms, marker)


def a_trace(*events: trace_mod.Event) -> trace_mod.Trace:
    return trace_mod.Trace('boot.trace', 1 << 30, 256 * KIB, tuple(events))


def snapshot_run(**fields) -> cluster.SnapshotRun:
    values = dict(n=16, k=4, items=16, replicated=2.0, persistent=5.0, qemu_pause_ms=40.0,
                  longest_pause_ms=60.0, repository_bytes=110, new_chunks=4,
                  new_chunk_bytes=100, written_block_bytes=50)
    values.update(fields)
    return cluster.SnapshotRun(**values)


class UniqueDirtyTest(base.TestCase):
    def test_written_blocks_are_the_4k_blocks_written_with_data(self):
        events = [event(0, trace_mod.WRITE, 4000, 200),        # blocks 0 and 1
                  event(1, trace_mod.WRITE, 8192, 4096),       # block 2 exactly
                  event(2, trace_mod.READ, 40960, 4096),       # read: not dirty
                  event(3, trace_mod.WRITE_ZEROES, 81920, 8192),  # zeros: no data
                  event(4, trace_mod.TRIM, 122880, 4096),
                  event(5, trace_mod.WRITE, 163840, 0)]        # nothing written
        self.assertEqual({0, 1, 2}, cluster.written_blocks(events))

    def test_a_replay_writes_what_its_trace_writes_before_the_shutdown_marker(self):
        trace = a_trace(event(0, trace_mod.WRITE, 0, 4096),
                        event(10, trace_mod.PHASE, marker=driver_base.SHUTDOWN_STARTED),
                        event(20, trace_mod.WRITE, 65536, 4096))
        self.assertEqual({0}, cluster.written_blocks(cluster.replayed_events(trace)))

    def test_new_chunks_are_the_distinct_ones_the_parent_lacks(self):
        chunk = 256 * KIB
        parent = manifest_mod.Manifest('realistic', 1, 3 * chunk, chunk, ('a', 'x', 'y'))
        ref = manifest_mod.VersionRef('realistic', 1)
        # Two instances, one writing what the image has elsewhere ('y'), both sharing
        # one new chunk ('b'), one ending in a short last chunk ('c').
        first = manifest_mod.Manifest('i1', 1, 3 * chunk, chunk, ('a', 'b', 'y'), ref)
        second = manifest_mod.Manifest('i2', 1, 2 * chunk + 100, chunk, ('y', 'b', 'c'), ref)
        holes = manifest_mod.Manifest('i3', 1, 3 * chunk, chunk, (None, None, 'y'), ref)
        found = cluster.new_chunks([(first, parent), (second, parent), (holes, parent)])
        self.assertEqual({'b': chunk, 'c': 100}, found)

    def test_a_chain_is_new_by_its_deltas_at_their_stored_size(self):
        chunk = 256 * KIB
        parent = manifest_mod.Manifest('realistic', 1, 2 * chunk, chunk, ('a', None))
        ref = manifest_mod.VersionRef('realistic', 1)
        # A delta over the image's chunk, one over a hole; a second instance's version
        # stacks a delta on the first's chain and shares its first delta.
        first = manifest_mod.Manifest('i1', 1, 2 * chunk, chunk, (('d1', 'a'), ('d2', None)),
                                      ref)
        second = manifest_mod.Manifest('i2', 1, 2 * chunk, chunk, (('d3', 'd1', 'a'), None),
                                       ref)
        sizes = {'d1': 4200, 'd2': 8300, 'd3': 4200}
        found = cluster.new_chunks([(first, parent), (second, parent)], sizes.__getitem__)
        self.assertEqual(sizes, found)

    def test_a_version_without_parent_is_new_whole(self):
        chunk = 256 * KIB
        alone = manifest_mod.Manifest('i1', 1, 2 * chunk, chunk, ('a', 'a'))
        self.assertEqual({'a': chunk}, cluster.new_chunks([(alone, None)]))

    def test_the_replay_tail_runs_from_boot_done_to_the_last_request(self):
        trace = a_trace(event(0, trace_mod.READ, 0, 4096, 5),
                        event(1000, trace_mod.PHASE, marker=driver_base.BOOT_DONE),
                        event(3000, trace_mod.WRITE, 0, 4096, 500),
                        event(4000, trace_mod.PHASE, marker=driver_base.SHUTDOWN_STARTED),
                        event(9000, trace_mod.WRITE, 0, 4096, 500))
        self.assertEqual(2.5, cluster.replay_tail(trace, 1.0))
        self.assertEqual(5.0, cluster.replay_tail(trace, 2.0))
        self.assertEqual(0.0, cluster.replay_tail(a_trace(event(0, trace_mod.READ, 0, 1)),
                                                  1.0))


def snapshot(state: str, reason: str = '') -> dict:
    return {'id': 's1', 'state': state, 'created': 100.0, 'reason': reason}


def item(state: str = 'available', replicated: bool = True, persistent: bool = False,
         name: str = 'i1', reason: str = '') -> dict:
    return {'snapshot': 's1', 'state': state, 'replicated': replicated,
            'persistent': persistent, 'name': name, 'reason': reason}


class ProgressTest(base.TestCase):
    def test_not_yet_while_a_snapshot_or_an_item_is_missing(self):
        self.assertEqual((False, False), cluster.snapshot_progress(
            [snapshot('available')], [item(persistent=True)], 2, 1))
        self.assertEqual((False, False), cluster.snapshot_progress(
            [snapshot('available')], [item(persistent=True)], 1, 2))

    def test_not_replicated_while_uploading_or_an_item_is_not(self):
        self.assertEqual((False, False), cluster.snapshot_progress(
            [snapshot('uploading')], [item()], 1, 1))
        self.assertEqual((False, False), cluster.snapshot_progress(
            [snapshot('available')], [item(), item(replicated=False, name='i2')], 1, 2))

    def test_replicated_then_persistent_once_every_item_is(self):
        self.assertEqual((True, False), cluster.snapshot_progress(
            [snapshot('available')], [item(persistent=True), item(name='i2')], 1, 2))
        self.assertEqual((True, True), cluster.snapshot_progress(
            [snapshot('available')], [item(persistent=True), item(persistent=True)], 1, 2))

    def test_a_failed_item_or_snapshot_is_an_error_naming_it(self):
        failed = self.assertRaises(cluster.BenchError, cluster.snapshot_progress,
                                   [snapshot('uploading')],
                                   [item(), item('error', name='i2', reason='host gone')], 1, 2)
        self.assertIn('i2', str(failed))
        self.assertIn('host gone', str(failed))
        failed = self.assertRaises(cluster.BenchError, cluster.snapshot_progress,
                                   [snapshot('partial', 'i3 missing')], [item()], 1, 1)
        self.assertIn('partial', str(failed))
        self.assertIn('i3 missing', str(failed))

    def test_sql_strings_are_quoted(self):
        self.assertEqual("'it''s'", cluster.sql_string("it's"))


class GoalsTest(base.TestCase):
    def goal(self, snapshots: list, words: str) -> str:
        found = [line for line in cluster.snapshot_goals(snapshots) if words in line]
        self.assertEqual(1, len(found), cluster.snapshot_goals(snapshots))
        return found[0]

    def test_bytes_to_the_repository_against_the_new_chunks(self):
        line = self.goal([snapshot_run(repository_bytes=120)], 'bytes to the repository')
        self.assertTrue(line.startswith('PASS'), line)
        self.assertIn('1.20x', line)
        self.assertIn('2.40x', line)  # against the 4 KiB blocks, shown, not the goal
        line = self.goal([snapshot_run(), snapshot_run(n=64, repository_bytes=121)],
                         'bytes to the repository')
        self.assertTrue(line.startswith('FAIL'), line)
        self.assertIn('N=64', line)

    def test_the_longest_pause_of_the_qemu_guests(self):
        line = self.goal([snapshot_run(qemu_pause_ms=100.0, longest_pause_ms=400.0)],
                         'longest pause')
        self.assertTrue(line.startswith('PASS'), line)
        self.assertIn('400 ms', line)
        line = self.goal([snapshot_run(qemu_pause_ms=101.0)], 'longest pause')
        self.assertTrue(line.startswith('FAIL'), line)
        line = self.goal([snapshot_run(qemu_pause_ms=None)], 'longest pause')
        self.assertTrue(line.startswith('not measured'), line)

    def test_the_worst_pause_is_the_qemu_guests_not_the_replays(self):
        line = self.goal([snapshot_run(qemu_pause_ms=30.0, longest_pause_ms=900.0),
                          snapshot_run(n=64, qemu_pause_ms=90.0, longest_pause_ms=95.0)],
                         'longest pause')
        self.assertIn('N=64 K=4: 90 ms', line)

    def test_the_times_until_replicated_and_persistent_are_reported(self):
        line = self.goal([snapshot_run(replicated=1.25, persistent=7.5)], 'replicated')
        self.assertIn('N=16 K=4: 1.2 s / 7.5 s', line)

    def test_a_failed_snapshot_fails_the_goals_and_is_named(self):
        snapshots = [snapshot_run(), snapshot_run(k=8, error='BenchError: timed out')]
        for words in ('bytes to the repository', 'longest pause'):
            line = self.goal(snapshots, words)
            self.assertTrue(line.startswith('FAIL'), line)
            self.assertIn('failed at N=16 K=8', line)
        line = self.goal([snapshot_run(error='BenchError: timed out')], 'multi-snapshot')
        self.assertTrue(line.startswith('FAIL'), line)

    def test_no_snapshot_is_not_measured(self):
        self.assertEqual(1, len(cluster.snapshot_goals([])))
        self.assertTrue(cluster.snapshot_goals([])[0].startswith('not measured'))

    def test_a_row_per_snapshot(self):
        rows = cluster.snapshot_rows_of([snapshot_run(written_block_bytes=None)])
        self.assertEqual(1, len(rows))
        self.assertEqual(len(cluster.SNAPSHOT_COLUMNS), len(rows[0]))
        self.assertIn('n/a', rows[0])


class FreezeTimesTest(base.TestCase):
    def test_each_guest_s_last_freeze_from_the_compute_log(self):
        log = ('2026-12-02 19:00:00.1 INFO vmcloud.compute.manager [-] q0 frozen in 12.5 ms\n'
               '2026-12-02 19:00:00.2 INFO vmcloud.compute.manager [-] snapshot s froze 2\n'
               '2026-12-02 19:00:01.0 INFO vmcloud.compute.manager [-] q1 frozen in 250.0 ms\n'
               '2026-12-02 19:00:09.0 INFO vmcloud.compute.manager [-] q0 frozen in 7 ms\n')
        self.assertEqual({'q0': 7.0, 'q1': 250.0}, cluster.freeze_times(log))

    def test_a_snapshot_row_shows_the_qemu_guests_freeze(self):
        row = cluster.snapshot_rows_of([snapshot_run(qemu_freeze_ms=23.4)])[0]
        self.assertEqual('23', row[cluster.SNAPSHOT_COLUMNS.index("qemu guests' freeze ms")])
        self.assertIn('of which the freeze 23 ms', self.pause_goal(qemu_freeze_ms=23.4))
        self.assertIn('of which the freeze n/a ms', self.pause_goal(qemu_freeze_ms=None))

    @staticmethod
    def pause_goal(**fields) -> str:
        return next(line for line in cluster.snapshot_goals([snapshot_run(**fields)])
                    if 'longest pause' in line)


class YieldingOutput(io.StringIO):
    """A stdout that lets other threads run after each write, as a pipe may."""

    def write(self, text: str) -> int:
        written = super().write(text)
        time.sleep(0.0001)
        return written


class WorkerTest(base.TestCase):
    def test_events_from_many_threads_stay_a_line_each(self):
        out = YieldingOutput()
        with mock.patch.object(sys, 'stdout', out):
            threads = [threading.Thread(target=lambda i=i: [
                cluster.emit(event='booted', name=f'r{i}-{j}', t=1.0) for j in range(50)])
                for i in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        names = [json.loads(line)['name'] for line in out.getvalue().splitlines()]
        self.assertEqual(400, len(set(names)))

    def test_a_unix_socket_accepts_once_it_listens_not_once_it_is_bound(self):
        path = os.path.join(self.tmp, 'disk.sock')
        self.assertFalse(cluster.accepts(path))
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(server.close)
        server.bind(path)
        self.assertTrue(os.path.exists(path))
        self.assertFalse(cluster.accepts(path))
        server.listen()
        self.assertTrue(cluster.accepts(path))


class CpuFactTest(base.TestCase):
    def test_the_results_say_whether_the_replay_hosts_yielded_the_cpu(self):
        self.assertIn('all at nice 0', cluster.cpu_fact(0, set()))
        self.assertIn('runs at autogroup nice 10', cluster.cpu_fact(10, set()))
        refused = cluster.cpu_fact(10, {'FileNotFoundError: /proc/7/autogroup'})
        self.assertIn('not applied to all', refused)
        self.assertIn('/proc/7/autogroup', refused)


class ArgumentsTest(base.TestCase):
    def parse(self, *argv: str):
        with mock.patch.object(sys, 'argv', ['cluster.py', *argv]):
            return cluster.parse_arguments()

    def test_the_snapshot_is_taken_at_the_largest_n_unless_told(self):
        self.assertEqual({128}, self.parse().snapshot_ns)
        self.assertEqual({16}, self.parse('--quick').snapshot_ns)
        self.assertEqual({16, 64}, self.parse('--snapshot-n', '16,64').snapshot_ns)
        self.assertEqual(set(), self.parse('--no-snapshot').snapshot_ns)

    def test_a_snapshot_n_not_deployed_is_refused(self):
        with mock.patch.object(sys, 'stderr'):
            self.assertRaises(SystemExit, self.parse, '--snapshot-n', '32')
            self.assertRaises(SystemExit, self.parse, '--snapshot-n', 'x')
