"""Pre-staging: which chunks of a version, in which order, to which owners; what a peer
that fails costs; the progress told. The peers are a recording stand-in here
(tests/functional/mirror/test_staging.py stages on real peer chunk servers)."""
import os
import threading

import fixtures

from vmcloud import exception
from vmcloud.mirror import ownership
from vmcloud.mirror import profile as profile_mod
from vmcloud.mirror import staging
from vmcloud.storage import delta
from vmcloud.storage import warehouse as warehouse_mod
from tests import base

CHUNK = 4096
PEERS = {f'node{i}': f'http://10.0.0.{i}:9495' for i in (1, 2, 3, 4)}


def chunk_bytes(index: int) -> bytes:
    return bytes([index + 1]) * CHUNK


class FakePeers:
    """Records every stage request as (url, chunk id), in order; ``failures``: url -> how
    many of its next requests fail (-1: all), with a PeerError as PeerClient's.
    ``replicas``: url -> the replicas its stats tell (default 2, a node's default; None:
    its stats have none); ``silent``: the urls whose stats fail."""

    def __init__(self):
        self.requests: list[tuple[str, str]] = []
        self.failures: dict[str, int] = {}
        self.replicas: dict[str, object] = {}
        self.silent: set[str] = set()
        self.lock = threading.Lock()

    def stats(self, url: str) -> dict:
        if url in self.silent:
            raise exception.PeerError(url, None, 'connection refused, on purpose')
        replicas = self.replicas.get(url, 2)
        return {'served_chunks': 0} if replicas is None else {'replicas': replicas}

    def stage(self, url: str, chunk_id: str) -> None:
        with self.lock:
            self.requests.append((url, chunk_id))
            left = self.failures.get(url, 0)
            if left:
                self.failures[url] = left - 1 if left > 0 else left
                raise exception.PeerError(url, chunk_id, 'connection refused, on purpose')

    def staged(self, url: str) -> list[str]:
        return [c for u, c in self.requests if u == url]


class StagingTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.conf.set_override('chunk_size', CHUNK, 'storage')
        self.warehouse = warehouse_mod.Warehouse(self.conf)
        # Chunks 0-7 distinct, 8 a hole, 9 equal to 1, 10 a short one.
        data = (b''.join(chunk_bytes(i) for i in range(8)) + bytes(CHUNK) + chunk_bytes(1)
                + b'\xaa' * 1000)
        path = os.path.join(self.tmp, 'disk.raw')
        with open(path, 'wb') as f:
            f.write(data)
        self.manifest = self.warehouse.import_image(path, 'disk', 'raw').manifest
        self.ids = self.manifest.chunks
        self.peers = FakePeers()

    # -- what to stage -------------------------------------------------------------

    def test_without_a_profile_every_stored_chunk_once_in_disk_order(self):
        planned = staging.plan(self.warehouse, 'disk')
        self.assertEqual((staging.STORED_CHUNKS, 'disk:1'), (planned.source, planned.ref))
        self.assertEqual([self.ids[i] for i in (0, 1, 2, 3, 4, 5, 6, 7, 10)],
                         planned.chunk_ids)
        self.assertIsNone(self.ids[8])
        self.assertEqual(8 * CHUNK + 1000, planned.total_bytes)
        self.assertEqual(planned.chunk_ids, staging.chunks_to_stage(self.warehouse, 'disk:1'))

    def test_a_boot_profile_gives_its_chunks_in_phase_order(self):
        # Recorded out of index order, across phases, with a hole and a chunk named twice.
        profile_mod.ProfileStore(self.warehouse).save(self.manifest, {
            profile_mod.BOOT: [5, 8, 2], profile_mod.APPLICATION: [9, 1, 0],
            profile_mod.SHUTDOWN: [7]})
        planned = staging.plan(self.warehouse, 'disk:1')
        self.assertEqual(staging.BOOT_PROFILE, planned.source)
        self.assertEqual([self.ids[i] for i in (5, 2, 9, 0, 7)], planned.chunk_ids)

    def test_a_version_of_deltas_stages_every_object_its_chains_need(self):
        snapshot = self.warehouse.snapshot_chunks(self.manifest.ref, {
            2: delta.BlockChanges(512, {0: b'd' * 512}),
            8: delta.BlockChanges(512, {1: b'h' * 512})}).manifest  # over the hole
        delta2, base2 = snapshot.chunks[2]
        delta8, hole = snapshot.chunks[8]
        self.assertEqual((self.ids[2], None), (base2, hole))
        planned = staging.plan(self.warehouse, str(snapshot.ref))
        self.assertEqual([self.ids[i] for i in (0, 1)] + [delta2, base2]
                         + [self.ids[i] for i in (3, 4, 5, 6, 7)] + [delta8, self.ids[10]],
                         planned.chunk_ids)
        profile_mod.ProfileStore(self.warehouse).save(snapshot, {profile_mod.BOOT: [8, 2]})
        planned = staging.plan(self.warehouse, str(snapshot.ref))
        self.assertEqual([delta8, delta2, base2], planned.chunk_ids)
        # A delta counts as the chunk it yields: its stored size is not in the manifest.
        self.assertEqual(3 * CHUNK, planned.total_bytes)

    def test_a_profile_that_does_not_fit_the_version_is_not_used(self):
        # Naming a chunk the version does not have: another layout's.
        profile_mod.ProfileStore(self.warehouse).save(self.manifest,
                                                      {profile_mod.BOOT: [3, 50]})
        logged = self.useFixture(fixtures.FakeLogger())
        planned = staging.plan(self.warehouse, 'disk')
        self.assertEqual(staging.STORED_CHUNKS, planned.source)
        self.assertEqual(9, len(planned.chunk_ids))
        self.assertIn('ignoring the boot profile of disk', logged.output)

    def test_a_profile_of_holes_only_stages_every_chunk(self):
        profile_mod.ProfileStore(self.warehouse).save(self.manifest, {profile_mod.BOOT: [8]})
        self.assertEqual(staging.STORED_CHUNKS, staging.plan(self.warehouse, 'disk').source)

    def test_an_unknown_version_is_named(self):
        error = self.assertRaises(exception.ImageNotFound, staging.plan, self.warehouse,
                                  'disk:7')
        self.assertIn('disk:7', str(error))

    # -- staging -------------------------------------------------------------------

    def test_each_chunk_goes_to_each_of_its_owners_primary_first(self):
        chunk_ids = staging.chunks_to_stage(self.warehouse, 'disk')
        result = staging.stage(chunk_ids, PEERS, 2, self.peers, threads=1)
        self.assertEqual((9, 4, 18, {}, {}), (result.chunks, result.peers, result.copies,
                                              result.short, result.failed_peers))
        expected = []
        for chunk_id in chunk_ids:
            expected += [(PEERS[host], chunk_id)
                         for host in ownership.owners(chunk_id, PEERS, 2)]
        self.assertEqual(expected, self.peers.requests)
        # Striped: every peer owns some of them.
        self.assertEqual(set(PEERS.values()), {url for url, _ in self.peers.requests})

    def test_many_threads_stage_the_same_pairs_each_primary_before_its_secondary(self):
        chunk_ids = staging.chunks_to_stage(self.warehouse, 'disk')
        result = staging.stage(chunk_ids, PEERS, 2, self.peers, threads=4)
        self.assertEqual(18, result.copies)
        for chunk_id in chunk_ids:
            primary, secondary = ownership.owners(chunk_id, PEERS, 2)
            asked = [url for url, c in self.peers.requests if c == chunk_id]
            self.assertEqual([PEERS[primary], PEERS[secondary]], asked)

    def test_fewer_peers_than_replicas_each_takes_every_chunk(self):
        peers = {'node1': PEERS['node1']}
        chunk_ids = staging.chunks_to_stage(self.warehouse, 'disk')
        result = staging.stage(chunk_ids, peers, 2, self.peers)
        self.assertEqual((9, 9), (result.chunks, result.copies))
        self.assertEqual(sorted(chunk_ids), sorted(self.peers.staged(PEERS['node1'])))

    def test_a_peer_that_fails_once_is_asked_again(self):
        chunk_id = self.ids[0]
        primary = ownership.owners(chunk_id, PEERS, 2)[0]
        self.peers.failures[PEERS[primary]] = 1
        result = staging.stage([chunk_id], PEERS, 2, self.peers)
        self.assertEqual((1, 2, {}, {}), (result.chunks, result.copies, result.short,
                                          result.failed_peers))
        self.assertEqual([chunk_id, chunk_id], self.peers.staged(PEERS[primary]))

    def test_a_peer_that_fails_twice_is_given_up_and_its_chunks_are_a_copy_short(self):
        chunk_ids = staging.chunks_to_stage(self.warehouse, 'disk')
        self.peers.failures[PEERS['node2']] = -1  # dead
        logged = self.useFixture(fixtures.FakeLogger())
        result = staging.stage(chunk_ids, PEERS, 2, self.peers, threads=1)
        owned = [c for c in chunk_ids if 'node2' in ownership.owners(c, PEERS, 2)]
        self.assertLess(1, len(owned))
        self.assertEqual((9, 18 - len(owned)), (result.chunks, result.copies))
        self.assertEqual({c: ['node2'] for c in owned}, result.short)
        self.assertEqual(['node2'], list(result.failed_peers))
        self.assertIn('connection refused, on purpose', result.failed_peers['node2'])
        # Two attempts at its first chunk, then none: a dead peer costs two timeouts.
        self.assertEqual([owned[0]] * 2, self.peers.staged(PEERS['node2']))
        self.assertIn('giving node2 at http://10.0.0.2:9495 up', logged.output)

    def test_a_chunk_no_owner_takes_is_an_error_naming_it_and_them(self):
        chunk_ids = staging.chunks_to_stage(self.warehouse, 'disk')
        victim = chunk_ids[3]
        owners = ownership.owners(victim, PEERS, 2)
        for host in owners:
            self.peers.failures[PEERS[host]] = -1
        error = self.assertRaises(staging.StagingFailed, staging.stage, chunk_ids, PEERS, 2,
                                  self.peers, threads=1)
        # The first chunk both owners failed, whichever it is; they own the victim at least.
        self.assertIn(error.chunk_id, chunk_ids[:4])
        self.assertEqual(set(owners), set(error.failures))
        for host in owners:
            self.assertIn(f'{host} at {PEERS[host]}', str(error))
        self.assertIn(f'chunk {error.chunk_id} could not be staged', str(error))
        self.assertIn('connection refused, on purpose', str(error))
        # No chunk after it was started.
        later = chunk_ids[chunk_ids.index(error.chunk_id) + 1:]
        self.assertEqual([], [c for _, c in self.peers.requests if c in later])

    def test_no_peer_is_an_error(self):
        error = self.assertRaises(staging.NoPeers, staging.stage, ['a' * 64], {}, 2,
                                  self.peers)
        self.assertIn('no peer to stage to', str(error))
        self.assertEqual([], self.peers.requests)

    def test_nothing_to_stage_asks_nobody(self):
        result = staging.stage([], PEERS, 2, self.peers)
        self.assertEqual((0, 0, 0), (result.chunks, result.bytes, result.copies))
        self.assertEqual([], self.peers.requests)

    # -- the nodes' replicas ---------------------------------------------------------

    def test_the_replicas_are_the_ones_the_peers_tell(self):
        for count in (1, 3):
            for url in PEERS.values():
                self.peers.replicas[url] = count
            self.assertEqual(count, staging.peer_replicas(PEERS, self.peers))
        self.assertEqual([], self.peers.requests)

    def test_a_peer_that_tells_none_is_left_out(self):
        self.peers.silent.add(PEERS['node2'])
        self.peers.replicas[PEERS['node3']] = None
        for url in (PEERS['node1'], PEERS['node4']):
            self.peers.replicas[url] = 3
        logged = self.useFixture(fixtures.FakeLogger())
        self.assertEqual(3, staging.peer_replicas(PEERS, self.peers))
        self.assertIn('staging: node2 told no replicas count, the other peers decide: peer '
                      'http://10.0.0.2:9495', logged.output)
        self.assertIn('node3 told no replicas count, the other peers decide: its stats at '
                      'http://10.0.0.3:9495 have no replicas count: None', logged.output)

    def test_peers_that_disagree_or_tell_nothing_are_refused_naming_them(self):
        self.peers.replicas.update({PEERS['node1']: 1, PEERS['node3']: 3})
        self.peers.silent.add(PEERS['node4'])
        error = self.assertRaises(staging.ReplicasUnknown, staging.peer_replicas, PEERS,
                                  self.peers)
        self.assertEqual({'node1': 1, 'node2': 2, 'node3': 3}, error.told)
        self.assertTrue(str(error).startswith(
            'cannot stage: the peers disagree on the owners of a chunk ([mirror] '
            'peer_replicas): node1 has 1, node2 has 2, node3 has 3; give the nodes one '
            'value (node4: peer http://10.0.0.4:9495'), str(error))
        self.peers.silent.update(PEERS.values())
        error = self.assertRaises(staging.ReplicasUnknown, staging.peer_replicas, PEERS,
                                  self.peers)
        self.assertEqual(({}, sorted(PEERS)), (error.told, sorted(error.failures)))
        self.assertIn('cannot stage: no peer told its [mirror] peer_replicas (node1: peer '
                      'http://10.0.0.1:9495', str(error))
        self.peers.silent.clear()
        for bad in (0, 'two', True, None):
            with self.subTest(bad=bad):
                self.peers.replicas = {url: bad for url in PEERS.values()}
                error = self.assertRaises(staging.ReplicasUnknown, staging.peer_replicas,
                                          PEERS, self.peers)
                self.assertIn(f'have no replicas count: {bad!r}', str(error))
        self.assertRaises(staging.NoPeers, staging.peer_replicas, {}, self.peers)

    def test_bad_replicas_or_threads_are_refused(self):
        self.assertRaises(exception.MirrorError, staging.stage, ['a' * 64], PEERS, 0,
                          self.peers)
        self.assertRaises(exception.MirrorError, staging.stage, ['a' * 64], PEERS, 2,
                          self.peers, threads=0)
        self.assertEqual([], self.peers.requests)

    def test_progress_counts_chunks_and_their_bytes_one_call_at_a_time(self):
        planned = staging.plan(self.warehouse, 'disk')
        calls = []
        inside = threading.Semaphore(1)
        overlapped = threading.Event()

        def progress(done: int, total: int, done_bytes: int) -> None:
            if not inside.acquire(blocking=False):
                overlapped.set()
                return
            if not calls:
                # The other threads' chunks end meanwhile: called one at a time, none
                # of them calls it before this call returns.
                overlapped.wait(1)
            calls.append((done, total, done_bytes))
            inside.release()
        result = staging.stage(planned.chunk_ids, PEERS, 2, self.peers, progress=progress,
                               threads=4, sizes=planned.sizes)
        self.assertFalse(overlapped.is_set(), 'progress was called concurrently')
        self.assertEqual(list(range(1, 10)), [done for done, _, _ in calls])
        self.assertEqual({9}, {total for _, total, _ in calls})
        self.assertEqual(8 * CHUNK + 1000, calls[-1][2])
        self.assertEqual(sorted(b for _, _, b in calls), [b for _, _, b in calls])
        self.assertEqual(8 * CHUNK + 1000, result.bytes)

    def test_a_bug_in_the_client_reaches_the_caller(self):
        class Broken:
            def stage(self, url, chunk_id):
                raise KeyError('a bug, on purpose')
        self.assertRaises(KeyError, staging.stage, ['a' * 64, 'b' * 64], PEERS, 2, Broken())
