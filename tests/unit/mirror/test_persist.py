"""Snapshot chunks placed on their owners, then persisted by the uploader or, if it dies,
by the owners' sweeps: persist.ReplicaPlacer and persist.Persister over a real (file)
warehouse, with fake node caches and a fake peer client."""
import random
import threading
import types

from vmcloud import exception
from vmcloud.mirror import api
from vmcloud.mirror import ownership
from vmcloud.mirror import persist
from vmcloud.mirror import service as service_mod
from vmcloud.storage import manifest as manifest_mod
from vmcloud.storage import warehouse as warehouse_mod
from vmcloud.storage.backends import file as file_backend
from tests import base

CHUNK = 64 * 1024
NODES = ('node-a', 'node-b', 'node-c', 'node-d')


class FakeCache:
    """A node's cache as the persister sees it: replicas (with their origin) and entries."""

    def __init__(self, budget: int = 1 << 40):
        self.budget = budget
        self.replicas: dict[str, tuple[bytes, str]] = {}
        self.entries: dict[str, bytes] = {}
        self.reads: list[str] = []

    def put(self, chunk_id, data, replica=True, origin=''):
        held = sum(len(d) for d, _ in self.replicas.values())
        if held + len(data) > self.budget:
            raise exception.ReplicaBudgetFull(chunk_id, held, self.budget)
        self.replicas[chunk_id] = (bytes(data), origin)

    def mark_persisted(self, chunk_ids):
        for chunk_id in chunk_ids:
            if chunk_id in self.replicas:
                self.entries[chunk_id] = self.replicas.pop(chunk_id)[0]

    def unpersisted(self):
        return {chunk_id: origin for chunk_id, (_, origin) in self.replicas.items()}

    def read_chunk(self, chunk_id):
        self.reads.append(chunk_id)
        if chunk_id in self.replicas:
            return self.replicas[chunk_id][0]
        if chunk_id in self.entries:
            return self.entries[chunk_id]
        raise exception.FetchFailed(chunk_id, 1, exception.ChunkNotFound(chunk_id))


class FakePeers:
    """The peer client, delivering to the other nodes' FakeCaches by URL."""

    def __init__(self, caches: dict[str, FakeCache]):
        self.caches = caches
        self.down: set[str] = set()
        self.puts: list[tuple[str, str]] = []  # (host, chunk id)
        self.told: list[tuple[str, list[str]]] = []
        self._lock = threading.Lock()

    def _cache(self, url: str) -> FakeCache:
        host = url.removeprefix('http://')
        if host in self.down:
            raise exception.PeerError(url, None, 'connection refused')
        return self.caches[host]

    def put(self, url, chunk_id, data, origin=''):
        with self._lock:
            self.puts.append((url.removeprefix('http://'), chunk_id))
        cache = self._cache(url)
        try:
            cache.put(chunk_id, data, replica=True, origin=origin)
        except exception.ReplicaBudgetFull as exc:
            raise exception.PeerError(url, chunk_id, f'HTTP 507: {exc}') from exc

    def persisted(self, url, chunk_ids):
        self.told.append((url.removeprefix('http://'), list(chunk_ids)))
        self._cache(url).mark_persisted(chunk_ids)


class FakeNodes:
    def __init__(self, me: str, live: tuple[str, ...] = NODES, replicas: int = 2):
        self.me = me
        self.live = set(live)
        self.replicas = replicas

    def peers(self):
        return {host: f'http://{host}' for host in self.live}

    def owners(self, chunk_id):
        return ownership.owners(chunk_id, self.live, self.replicas)


class PersistTestCase(base.TestCase):
    def setUp(self):
        super().setUp()
        self.conf.set_override('chunk_size', CHUNK, 'storage')
        self.warehouse = warehouse_mod.Warehouse(self.conf)
        self.rng = random.Random(5)
        self.caches = {host: FakeCache() for host in NODES}
        self.client = FakePeers(self.caches)
        self.clock = 1000.0
        self.persisters: dict[str, persist.Persister] = {}
        self.written: list[str] = []  # every chunk put to the store, in order
        put_chunk = file_backend.PackWriteSession.put_chunk

        def counted(session, chunk_id, data):
            self.written.append(chunk_id)
            return put_chunk(session, chunk_id, data)
        self.patch(file_backend.PackWriteSession, 'put_chunk', counted)

    def chunks(self, count: int) -> dict[str, bytes]:
        data = [self.rng.randbytes(CHUNK) for _ in range(count)]
        return {manifest_mod.chunk_id(d): d for d in data}

    def placer(self, me: str = 'node-a', **kwargs) -> persist.ReplicaPlacer:
        return persist.ReplicaPlacer(self.caches[me], FakeNodes(me, **kwargs), self.client)

    def persister(self, me: str, live: tuple[str, ...] = NODES) -> persist.Persister:
        """Node ``me``'s persister (one per node, made on first use)."""
        if me not in self.persisters:
            self.persisters[me] = persist.Persister(
                self.warehouse, self.caches[me], FakeNodes(me, live), self.client,
                check_interval=30, clock=lambda: self.clock)
            self.addCleanup(self.persisters[me].stop)
        return self.persisters[me]

    def holders(self, chunk_id: str) -> set[str]:
        return {host for host, cache in self.caches.items() if chunk_id in cache.replicas}


class PlacerTest(PersistTestCase):
    def test_each_chunk_lands_on_every_owner_and_on_the_uploader(self):
        chunks = self.chunks(20)
        placer = self.placer()
        self.assertEqual(set(chunks), placer.take(chunks))
        for chunk_id, data in chunks.items():
            expected = set(ownership.owners(chunk_id, NODES, 2)) | {'node-a'}
            self.assertEqual(expected, self.holders(chunk_id))
            self.assertEqual(expected, placer.holders[chunk_id])
            for host in expected:
                self.assertEqual((data, 'node-a'), self.caches[host].replicas[chunk_id])

    def test_a_chunk_an_owner_refuses_is_not_taken(self):
        chunks = self.chunks(30)
        self.caches['node-c'].budget = 0
        placer = self.placer()
        taken = placer.take(chunks)
        for chunk_id in chunks:
            owners = ownership.owners(chunk_id, NODES, 2)
            self.assertEqual('node-c' not in owners, chunk_id in taken)
        self.assertTrue(set(chunks) - taken)  # some chunk node-c owns

    def test_a_node_that_fails_gets_no_more_chunks_of_the_upload(self):
        self.client.down.add('node-b')
        placer = self.placer()
        with self.assertLogs('vmcloud.mirror.persist', 'WARNING') as logs:
            placer.take(self.chunks(20))
            placer.take(self.chunks(20))
        self.assertEqual(1, [host for host, _ in self.client.puts].count('node-b'))
        self.assertEqual(1, len(logs.output))
        self.assertIn('node-b takes no more chunks', logs.output[0])

    def test_the_uploaders_own_copy_is_needed_too(self):
        self.caches['node-a'].budget = 0
        self.assertEqual(set(), self.placer().take(self.chunks(5)))

    def test_alone_nothing_is_taken(self):
        placer = self.placer(live=('node-a',))
        self.assertEqual(set(), placer.take(self.chunks(3)))
        self.assertEqual([], self.client.puts)

    def test_settle_releases_every_chunk_no_version_waits_for(self):
        chunks = self.chunks(10)
        placer = self.placer()
        placer.take(chunks)
        pending = set(list(chunks)[:4])
        holders = placer.settle(pending)
        self.assertEqual(pending, set(holders))
        for chunk_id in chunks:
            self.assertEqual(chunk_id in pending, bool(self.holders(chunk_id)))
            if chunk_id not in pending:  # released: an ordinary entry where it was
                self.assertIn(chunk_id, self.caches['node-a'].entries)


class UploaderPersistsTest(PersistTestCase):
    def snapshot(self, names: list[str]) -> tuple[dict, persist.ReplicaPlacer]:
        base = self.warehouse.import_image(self.raw(8), 'base').manifest
        placer = self.placer()
        results = self.warehouse.snapshot_many(
            [(base.ref, {i: self.rng.randbytes(CHUNK) for i in range(n, n + 3)})
             for n, _ in enumerate(names)], targets=names, chunk_sink=placer)
        return dict(zip(names, results)), placer

    def raw(self, chunks: int) -> str:
        path = f'{self.tmp}/base.raw'
        with open(path, 'wb') as f:
            f.write(self.rng.randbytes(chunks * CHUNK))
        return path

    def test_the_chunks_reach_the_repository_the_owners_are_told_wait_answers(self):
        written, placer = self.snapshot(['vm1', 'vm2'])
        pending = set().union(*(r.pending for r in written.values()))
        self.assertTrue(pending)
        self.assertEqual(pending, self.warehouse.missing(pending))
        persister = self.persister('node-a')
        del self.written[:]
        persister.submit('snap-1', {name: set(r.pending) for name, r in written.items()},
                         placer.settle(pending))
        self.assertEqual({'vm1': True, 'vm2': True}, persister.wait('snap-1', 30))
        self.assertEqual(set(), self.warehouse.missing(pending))
        self.assertEqual(sorted(pending), sorted(self.written))  # each once
        self.assertTrue(self.warehouse.is_whole('vm1', 1))
        for chunk_id in pending:
            self.assertEqual(set(), self.holders(chunk_id))  # no replica left anywhere
        # From the uploader's own copies, never from a peer.
        self.assertEqual(sorted(pending), sorted(self.caches['node-a'].reads))

    def test_a_repository_away_is_asked_again_until_it_answers(self):
        written, placer = self.snapshot(['vm1'])
        pending = set(written['vm1'].pending)
        store_chunks = self.warehouse.store_chunks
        failures = [exception.StorageError('warehouse unreachable')] * 2

        def flaky(*args):
            if failures:
                raise failures.pop()
            return store_chunks(*args)
        self.patch(self.warehouse, 'store_chunks', flaky)
        persister = persist.Persister(self.warehouse, self.caches['node-a'],
                                      FakeNodes('node-a'), self.client, check_interval=0.01)
        self.addCleanup(persister.stop)
        with self.assertLogs('vmcloud.mirror.persist', 'WARNING') as logs:
            persister.submit('snap-1', {'vm1': pending}, placer.settle(pending))
            self.assertEqual({'vm1': True}, persister.wait('snap-1', 30))
        self.assertEqual(2, sum('unreachable' in line for line in logs.output))

    def test_an_unknown_snapshot_waits_for_nothing(self):
        self.assertEqual({}, self.persister('node-a').wait('never-uploaded', 0))

    def test_a_chunk_it_cannot_read_leaves_its_item_not_persistent(self):
        written, placer = self.snapshot(['vm1', 'vm2'])
        lost = sorted(written['vm2'].pending - written['vm1'].pending)[0]
        del self.caches['node-a'].replicas[lost]
        persister = self.persister('node-a')
        with self.assertLogs('vmcloud.mirror.persist', 'ERROR') as logs:
            persister.submit('snap-1', {n: set(r.pending) for n, r in written.items()},
                             placer.settle(set().union(*(r.pending
                                                         for r in written.values()))))
            self.assertEqual({'vm1': True, 'vm2': False}, persister.wait('snap-1', 30))
        self.assertIn(lost, logs.output[0])
        # The owners keep it for their sweeps.
        self.assertTrue(self.holders(lost))


class SweepTest(PersistTestCase):
    def replicate(self, count: int, origin: str = 'node-z') -> dict[str, bytes]:
        """Chunks placed as an uploader ``origin`` (not one of the nodes) would."""
        chunks = self.chunks(count)
        for chunk_id, data in chunks.items():
            for host in ownership.owners(chunk_id, NODES, 2):
                self.caches[host].put(chunk_id, data, origin=origin)
        return chunks

    def sweep_all(self, live: tuple[str, ...] = NODES) -> None:
        for host in live:
            self.persister(host, live).sweep()

    def test_a_replica_younger_than_the_interval_is_left_alone(self):
        chunks = self.replicate(6)
        asked = []
        self.patch(self.warehouse, 'missing', lambda ids: asked.append(ids) or set(ids))
        persister = self.persister('node-a')
        persister.sweep()
        self.clock += 29
        persister.sweep()
        self.assertEqual([], asked)
        self.clock += 1
        persister.sweep()
        mine = {c for c in chunks if c in self.caches['node-a'].replicas}
        self.assertEqual([sorted(mine)], [sorted(ids) for ids in asked])

    def test_a_replica_the_repository_holds_becomes_an_ordinary_entry(self):
        chunks = self.replicate(6)
        self.warehouse.store_chunks(chunks, chunks.__getitem__)
        persister = self.persister('node-a')
        persister.sweep()
        self.clock += 30
        persister.sweep()
        self.assertEqual({}, self.caches['node-a'].unpersisted())
        self.assertTrue(self.caches['node-a'].entries)

    def test_a_live_uploaders_replicas_are_left_to_it(self):
        chunks = self.replicate(8, origin='node-z')
        live = NODES + ('node-z',)  # up, and still writing them
        for _ in range(3):
            for host in NODES:
                self.persister(host, live).sweep()
            self.clock += 30
        self.assertEqual(set(chunks), self.warehouse.missing(chunks))

    def test_a_dead_uploaders_replicas_are_written_by_their_primary_once(self):
        chunks = self.replicate(12, origin='node-d')
        live = NODES[:3]  # node-d uploaded them and died before it persisted them
        self.sweep_all(live)
        self.clock += 30
        self.sweep_all(live)
        self.assertEqual(set(), self.warehouse.missing(chunks))
        # Once each: by the primary among the live nodes, which holds every one of them.
        self.assertEqual(sorted(chunks), sorted(self.written))
        for chunk_id in chunks:
            self.assertEqual(set(), self.holders(chunk_id) & set(live))

    def test_a_chunk_whose_new_primary_lacks_it_is_written_a_sweep_later(self):
        self.caches['node-e'] = FakeCache()
        chunks = self.replicate(16)
        live = NODES + ('node-e',)  # joined since: the primary of some, holding none
        new = {c for c in chunks if ownership.owners(c, live, 2)[0] == 'node-e'}
        self.assertTrue(new)
        self.sweep_all(live)
        self.clock += 30
        self.sweep_all(live)
        self.assertEqual(new, self.warehouse.missing(chunks))
        self.clock += 30
        self.sweep_all(live)
        self.assertEqual(set(), self.warehouse.missing(chunks))

    def test_a_repository_that_cannot_be_asked_is_a_warning(self):
        for chunk_id, data in self.chunks(2).items():
            self.caches['node-a'].put(chunk_id, data)
        self.patch(self.warehouse, 'missing', self.away)
        persister = self.persister('node-a')
        persister.sweep()
        self.clock += 30
        with self.assertLogs('vmcloud.mirror.persist', 'WARNING') as logs:
            persister.sweep()
        self.assertIn('cannot ask the repository', logs.output[0])

    @staticmethod
    def away(ids):
        raise exception.StorageError('warehouse unreachable')


class RemoteWaitTest(base.TestCase):
    def test_the_service_and_its_client_carry_wait_persistent(self):
        calls = []
        remote = api.RemoteMirrors(self.conf)
        self.patch(remote, 'call', lambda method, timeout=None, **args: calls.append(
            (method, timeout, args)) or {'vm1': True})
        self.assertEqual({'vm1': True}, remote.wait_persistent('snap', 30))
        # The call waits for the service's wait, and its own time on top.
        self.assertEqual([('wait_persistent', 30 + remote.timeout,
                           {'key': 'snap', 'seconds': 30})], calls)
        waited = []
        mirrors = types.SimpleNamespace(
            wait_persistent=lambda key, timeout: waited.append((key, timeout)) or {})
        self.assertEqual({}, service_mod.METHODS['wait_persistent'](mirrors, **calls[0][2]))
        self.assertEqual([('snap', 30)], waited)
