"""The peer exchange's order and skips with a fake peer client, and the chunk cache's
whole-chunk reads and owned-first eviction (no HTTP: tests/functional/mirror/test_peers.py)."""
import hashlib
import logging
import os
import threading

import fixtures

from vmcloud import exception
from vmcloud.mirror import cache as cache_mod
from vmcloud.mirror import ownership
from vmcloud.mirror import peers as peers_mod
from tests import base

NODES = ['node-a', 'node-b', 'node-c', 'node-d']
DATA = {hashlib.sha256(body).hexdigest(): body
        for body in (f'chunk {i:03d} '.encode() * 1000 for i in range(64))}


def chunk_where(primary: str, second: str | None = None, nodes=NODES) -> str:
    """A chunk whose owners (R = 2) among ``nodes`` are ``primary`` then ``second``."""
    return next(c for c in DATA
                if ownership.owners(c, nodes, 2)[0] == primary
                and (second is None or ownership.owners(c, nodes, 2)[1] == second))


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakePeers:
    """Peers by URL: each serves DATA, or does what ``behaviour[url]`` says."""

    def __init__(self):
        self.asked: list[tuple[str, str]] = []
        self.behaviour: dict[str, object] = {}

    def get(self, url: str, chunk_id: str) -> bytes:
        self.asked.append((url, chunk_id))
        what = self.behaviour.get(url)
        if isinstance(what, Exception):
            raise what
        if callable(what):
            return what(chunk_id)
        return DATA[chunk_id]


def url(node: str) -> str:
    return f'http://{node}:9495'


class ExchangeTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.client = FakePeers()
        self.clock = FakeClock()
        self.repository_reads: list[str] = []
        self.logs = self.useFixture(fixtures.FakeLogger(level=logging.INFO))

    def repository(self, chunk_id: str) -> bytes:
        self.repository_reads.append(chunk_id)
        try:
            return DATA[chunk_id]
        except KeyError:
            raise exception.ChunkNotFound(chunk_id) from None

    def exchange(self, me: str = 'node-a', nodes=NODES, replicas: int = 2,
                 skip_time: float = 10.0) -> peers_mod.PeerExchange:
        exchange = peers_mod.PeerExchange(self.repository, self.client, replicas, skip_time,
                                          clock=self.clock)
        if nodes:
            exchange.update(me, {node: url(node) for node in nodes})
        return exchange

    def asked_nodes(self) -> list[str]:
        return [asked.split('//')[1].split(':')[0] for asked, _ in self.client.asked]

    def test_alone_or_without_a_view_the_repository(self):
        chunk = next(iter(DATA))
        for exchange in (self.exchange(nodes=[]), self.exchange(nodes=['node-a'])):
            self.assertEqual(DATA[chunk], exchange.fetch(chunk))
        self.assertEqual([], self.client.asked)
        self.assertEqual([chunk, chunk], self.repository_reads)

    def test_the_primary_goes_to_the_repository(self):
        chunk = chunk_where('node-a')
        exchange = self.exchange()
        self.assertEqual(DATA[chunk], exchange.fetch(chunk))
        self.assertEqual([], self.client.asked)
        self.assertEqual({'repository_chunks': 1, 'repository_bytes': len(DATA[chunk]),
                          'peer_chunks': 0, 'peer_bytes': 0, 'peer_failures': 0,
                          'peer_busy': 0, 'corrupt_from_peers': 0}, exchange.stats())

    def test_a_node_that_owns_nothing_asks_the_primary(self):
        chunk = chunk_where('node-b', 'node-c')
        exchange = self.exchange()
        self.assertEqual(DATA[chunk], exchange.fetch(chunk))
        self.assertEqual([(url('node-b'), chunk)], self.client.asked)
        self.assertEqual([], self.repository_reads)
        stats = exchange.stats()
        self.assertEqual((1, len(DATA[chunk]), 0),
                         (stats['peer_chunks'], stats['peer_bytes'], stats['repository_chunks']))

    def test_a_secondary_owner_asks_the_primary_first(self):
        chunk = chunk_where('node-b', 'node-a')
        self.assertEqual(DATA[chunk], self.exchange().fetch(chunk))
        self.assertEqual(['node-b'], self.asked_nodes())
        self.assertEqual([], self.repository_reads)

    def test_a_failed_primary_is_skipped_for_the_skip_time(self):
        chunks = [c for c in DATA if ownership.owners(c, NODES, 2)[0] == 'node-b'
                  and 'node-a' not in ownership.owners(c, NODES, 2)]
        self.client.behaviour[url('node-b')] = exception.PeerError(
            url('node-b'), None, 'connection refused')
        exchange = self.exchange()
        self.assertEqual(DATA[chunks[0]], exchange.fetch(chunks[0]))
        second = ownership.owners(chunks[0], NODES, 2)[1]
        self.assertEqual(['node-b', second], self.asked_nodes())
        # Skipped: the next reads do not wait for it, they ask the other owner.
        self.clock.now += 9.9
        for chunk in chunks[1:4]:
            self.assertEqual(DATA[chunk], exchange.fetch(chunk))
        self.assertNotIn('node-b', self.asked_nodes()[2:])
        warnings = [r for r in self.logs.output.splitlines() if 'skipped' in r]
        self.assertEqual(1, len(warnings), self.logs.output)
        self.assertIn('node-b', warnings[0])
        self.assertIn(chunks[0], warnings[0])
        self.assertIn('connection refused', warnings[0])
        # The skip time has passed: asked again.
        self.clock.now += 0.2
        del self.client.behaviour[url('node-b')]
        self.client.asked.clear()
        self.assertEqual(DATA[chunks[4]], exchange.fetch(chunks[4]))
        self.assertEqual(['node-b'], self.asked_nodes())
        self.assertEqual(1, exchange.stats()['peer_failures'])
        self.assertEqual([], self.repository_reads)

    def test_a_busy_owner_is_passed_over_this_time_only(self):
        chunk = chunk_where('node-b', 'node-c')
        busy = exception.PeerError(url('node-b'), chunk, 'HTTP 503: busy')
        busy.__cause__ = exception.WarehouseBusy('64 peer requests at once')
        self.client.behaviour[url('node-b')] = busy
        exchange = self.exchange()
        self.assertEqual(DATA[chunk], exchange.fetch(chunk))
        self.assertEqual(['node-b', 'node-c'], self.asked_nodes())
        stats = exchange.stats()
        self.assertEqual((1, 0), (stats['peer_busy'], stats['peer_failures']))
        # Not skipped: the next read asks it again.
        del self.client.behaviour[url('node-b')]
        self.client.asked.clear()
        self.assertEqual(DATA[chunk], exchange.fetch(chunk))
        self.assertEqual(['node-b'], self.asked_nodes())
        self.assertEqual([], self.repository_reads)

    def test_corrupt_bytes_are_counted_and_the_next_owner_asked(self):
        chunk = chunk_where('node-b', 'node-c')
        self.client.behaviour[url('node-b')] = lambda chunk_id: DATA[chunk_id][:-1] + b'X'
        exchange = self.exchange()
        self.assertEqual(DATA[chunk], exchange.fetch(chunk))
        self.assertEqual(['node-b', 'node-c'], self.asked_nodes())
        stats = exchange.stats()
        self.assertEqual((1, 1, 1), (stats['corrupt_from_peers'], stats['peer_failures'],
                                     stats['peer_chunks']))
        self.assertIn('is corrupt', self.logs.output)
        # node-b is skipped from now on
        self.client.asked.clear()
        other = next(c for c in DATA if c != chunk
                     and ownership.owners(c, NODES, 2) == ['node-b', 'node-c'])
        exchange.fetch(other)
        self.assertEqual(['node-c'], self.asked_nodes())

    def test_every_owner_failing_ends_at_the_repository(self):
        chunk = chunk_where('node-b', 'node-c')
        for node in ('node-b', 'node-c'):
            self.client.behaviour[url(node)] = exception.PeerError(url(node), chunk, 'timed out')
        exchange = self.exchange()
        self.assertEqual(DATA[chunk], exchange.fetch(chunk))
        self.assertEqual(['node-b', 'node-c'], self.asked_nodes())
        self.assertEqual([chunk], self.repository_reads)
        self.assertEqual(2, exchange.stats()['peer_failures'])
        # Both skipped: the next read goes to the repository at once.
        self.client.asked.clear()
        exchange.fetch(chunk)
        self.assertEqual([], self.client.asked)

    def test_the_warehouse_speaking_through_a_peer_sends_the_read_to_the_warehouse(self):
        missing = next(c for c in (f'{i:064x}' for i in range(1000))
                       if ownership.owners(c, NODES, 2) == ['node-b', 'node-c'])
        self.client.behaviour[url('node-b')] = exception.CorruptManifest('its store is hurt')
        exchange = self.exchange()
        self.assertRaises(exception.ChunkNotFound, exchange.fetch, missing)
        self.assertEqual(['node-b'], self.asked_nodes())  # not node-c: the answer is known
        self.assertEqual([missing], self.repository_reads)
        self.assertEqual(0, exchange.stats()['peer_failures'])  # the peer did nothing wrong

    def test_a_peer_whose_repository_failed_is_asked_again_by_the_next_read(self):
        chunk = chunk_where('node-b', 'node-c')
        self.client.behaviour[url('node-b')] = exception.StorageError('FetchFailed: EIO')
        exchange = self.exchange()
        self.assertEqual(DATA[chunk], exchange.fetch(chunk))
        del self.client.behaviour[url('node-b')]
        self.assertEqual(DATA[chunk], exchange.fetch(chunk))
        self.assertEqual(['node-b', 'node-b'], self.asked_nodes())
        self.assertEqual([chunk], self.repository_reads)  # the first read's, once
        self.assertEqual((0, 1), (exchange.stats()['peer_failures'],
                                  exchange.stats()['peer_chunks']))

    def test_asking_peers_is_true_while_a_fetch_asks_them(self):
        chunk = chunk_where('node-b', 'node-c')
        exchange = self.exchange()
        seen = []

        def look(chunk_id):
            seen.append((exchange.asking_peers(chunk_id), exchange.asking_peers(
                next(c for c in DATA if c != chunk_id))))
            raise exception.PeerError(url('node-b'), chunk_id, 'timed out')

        self.client.behaviour[url('node-b')] = look
        self.client.behaviour[url('node-c')] = look
        self.assertEqual(DATA[chunk], exchange.fetch(chunk))  # from the repository
        self.assertEqual([(True, False), (True, False)], seen)
        self.assertFalse(exchange.asking_peers(chunk))

    def test_a_chunk_the_repository_lacks_is_asked_of_every_owner(self):
        # A snapshot's chunk on its owners only (an unpersisted replica), its primary new.
        missing = next(c for c in (f'{i:064x}' for i in range(1000))
                       if ownership.owners(c, NODES, 2) == ['node-b', 'node-c'])
        self.client.behaviour[url('node-b')] = exception.ChunkNotFound(missing)
        self.client.behaviour[url('node-c')] = lambda chunk_id: b'kept by node-c'
        self.patch(peers_mod.manifest_mod, 'chunk_id', lambda data: missing)
        exchange = self.exchange()
        self.assertEqual(b'kept by node-c', exchange.fetch(missing))
        self.assertEqual(['node-b', 'node-c'], self.asked_nodes())
        self.assertEqual([], self.repository_reads)
        self.assertEqual(0, exchange.stats()['peer_failures'])

    def test_a_primary_the_repository_fails_asks_the_other_owners(self):
        missing = next(c for c in (f'{i:064x}' for i in range(1000))
                       if ownership.owners(c, NODES, 2) == ['node-a', 'node-c'])
        self.client.behaviour[url('node-c')] = lambda chunk_id: b'kept by node-c'
        self.patch(peers_mod.manifest_mod, 'chunk_id', lambda data: missing)
        exchange = self.exchange(me='node-a')
        self.assertEqual(b'kept by node-c', exchange.fetch(missing))
        self.assertEqual([missing], self.repository_reads)  # asked first, lacking it
        self.assertEqual(['node-c'], self.asked_nodes())

    def test_any_peer_error_or_socket_error_is_a_failure(self):
        chunk = chunk_where('node-b', 'node-c')
        self.client.behaviour[url('node-b')] = exception.Unauthorized('bad token')
        self.client.behaviour[url('node-c')] = ConnectionResetError(104, 'reset')
        exchange = self.exchange()
        self.assertEqual(DATA[chunk], exchange.fetch(chunk))
        self.assertEqual([chunk], self.repository_reads)
        self.assertEqual(2, exchange.stats()['peer_failures'])

    def test_concurrent_failures_warn_once(self):
        chunk = chunk_where('node-b', 'node-c')
        together = threading.Barrier(8)

        def fail(chunk_id):
            together.wait(10)
            raise exception.PeerError(url('node-b'), chunk_id, 'timed out')

        self.client.behaviour[url('node-b')] = fail
        exchange = self.exchange()
        threads = [threading.Thread(target=exchange.fetch, args=(chunk,)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        self.assertEqual(8, exchange.stats()['peer_chunks'])  # all from node-c
        self.assertEqual(1, self.logs.output.count('peer node-b skipped'), self.logs.output)

    def test_owns_and_the_view(self):
        exchange = self.exchange(nodes=[])
        self.assertTrue(exchange.owns(next(iter(DATA))))  # no view: a node alone owns all
        self.assertTrue(exchange.update('node-a', {n: url(n) for n in NODES}))
        self.assertFalse(exchange.update('node-a', {n: url(n) for n in NODES}))
        self.assertTrue(exchange.update('node-a', {n: url(n) for n in NODES[:3]}))
        self.assertEqual('node-a', exchange.me)
        self.assertEqual({n: url(n) for n in NODES[:3]}, exchange.peers())
        self.assertEqual(2, exchange.replicas)
        for chunk in DATA:
            self.assertEqual('node-a' in ownership.owners(chunk, NODES[:3], 2),
                             exchange.owns(chunk))
        # Not listed (not up yet as the dispatcher sees it), still one of the nodes.
        exchange.update('node-a', {n: url(n) for n in NODES[1:]})
        for chunk in DATA:
            self.assertEqual(ownership.owners(chunk, NODES, 2), exchange.owners(chunk))

    def test_a_bad_view_is_refused_by_name(self):
        exchange = self.exchange(nodes=[])
        for me, peers, problem in (('', {}, 'host name'), (None, {}, 'host name'),
                                   ('a', ['b'], 'mapping'), ('a', {'b': ''}, "peer 'b'"),
                                   ('a', {'b': 3}, "peer 'b'")):
            error = self.assertRaises(exception.MirrorError, exchange.update, me, peers)
            self.assertIn(problem, str(error))
        self.assertEqual('', exchange.me)

    def test_bad_settings_are_refused_by_name(self):
        self.assertRaises(exception.MirrorError, self.exchange, replicas=0)
        error = self.assertRaises(exception.MirrorError, self.exchange, skip_time=-1)
        self.assertIn('skip time', str(error))


CHUNK_IDS = list(DATA)


class CacheTest(base.TestCase):
    """Chunks of DATA are 10,000 bytes: 16 KiB slots."""
    SLOT = 16 * 1024

    def setUp(self):
        super().setUp()
        self.fetches: list[str] = []
        self.owned: set[str] = set()

    def fetch(self, chunk_id: str) -> bytes:
        self.fetches.append(chunk_id)
        return DATA[chunk_id]

    def new_cache(self, slots: int = 64, owned_share: float = 0.5,
                  name: str = 'cache') -> cache_mod.ChunkCache:
        cache = cache_mod.ChunkCache(os.path.join(self.tmp, name), slots * self.SLOT,
                                     self.fetch, attempts=2, retry_wait=0.01,
                                     owned=lambda chunk_id: chunk_id in self.owned,
                                     owned_share=owned_share)
        self.addCleanup(cache.close)
        return cache

    def fill(self, cache: cache_mod.ChunkCache, chunks: list[str]) -> None:
        for chunk in chunks:
            cache.ensure(chunk)

    def test_read_chunk_reads_the_whole_chunk_once(self):
        cache = self.new_cache()
        chunk = CHUNK_IDS[0]
        self.assertEqual(DATA[chunk], cache.read_chunk(chunk))
        self.assertEqual(DATA[chunk], cache.read_chunk(chunk))
        self.assertEqual([chunk], self.fetches)
        self.assertEqual((1, 1), (cache.stats.hits, cache.stats.misses))

    def test_a_fetch_given_is_used_for_that_miss_alone(self):
        cache = self.new_cache()
        other: list[str] = []

        def from_elsewhere(chunk_id):
            other.append(chunk_id)
            return DATA[chunk_id]

        self.assertEqual(DATA[CHUNK_IDS[0]], cache.read_chunk(CHUNK_IDS[0], fetch=from_elsewhere))
        self.assertEqual(DATA[CHUNK_IDS[0]], cache.read_chunk(CHUNK_IDS[0], fetch=from_elsewhere))
        cache.read_chunk(CHUNK_IDS[1])
        self.assertEqual([CHUNK_IDS[0]], other)  # the hit needed no fetch
        self.assertEqual([CHUNK_IDS[1]], self.fetches)

    def test_a_read_with_its_own_fetch_joins_a_fetch_under_way(self):
        gate = threading.Event()
        started = threading.Event()

        def slow(chunk_id):
            started.set()
            gate.wait(10)
            return self.fetch(chunk_id)

        cache = cache_mod.ChunkCache(os.path.join(self.tmp, 'slow'), 1 << 20, slow)
        self.addCleanup(cache.close)
        chunk = CHUNK_IDS[0]
        first = threading.Thread(target=cache.ensure, args=(chunk,))
        first.start()
        started.wait(10)
        results = []
        joined = threading.Thread(target=lambda: results.append(
            cache.read_chunk(chunk, fetch=lambda c: self.fail('a second fetch'))))
        joined.start()
        gate.set()
        first.join(10)
        joined.join(10)
        self.assertEqual([DATA[chunk]], results)
        self.assertEqual([chunk], self.fetches)

    def test_read_chunk_checks_a_slot_after_a_restart(self):
        cache = self.new_cache()
        cache.read_chunk(CHUNK_IDS[0])
        cache.close()
        with open(os.path.join(self.tmp, 'cache', f'slots-{self.SLOT}'), 'r+b') as f:
            f.write(b'garbage')
        self.assertEqual(DATA[CHUNK_IDS[0]], self.new_cache().read_chunk(CHUNK_IDS[0]))
        self.assertEqual([CHUNK_IDS[0]] * 2, self.fetches)

    def test_chunks_not_owned_are_evicted_first(self):
        cache = self.new_cache(slots=4)
        owned, other = CHUNK_IDS[:2], CHUNK_IDS[2:6]
        self.owned.update(owned)
        self.fill(cache, owned + other[:2])  # owned ones least recently used
        self.fill(cache, other[2:])
        for chunk in owned + other[2:]:
            self.assertIn(chunk, cache)
        for chunk in other[:2]:
            self.assertNotIn(chunk, cache)
        self.assertEqual(2 * self.SLOT, cache.owned_bytes)

    def test_owned_chunks_over_their_share_go_first(self):
        cache = self.new_cache(slots=4)
        owned, other = CHUNK_IDS[:3], CHUNK_IDS[3:6]
        self.owned.update(owned)
        self.fill(cache, [other[0]] + owned)  # 3 owned slots of 4: over the half
        self.fill(cache, other[1:])
        # The least recently used owned one went, then owned ones held just their share.
        self.assertEqual([False, True, True, False, True, True],
                         [c in cache for c in owned + other])
        self.assertEqual(2 * self.SLOT, cache.owned_bytes)

    def test_either_kind_alone_is_evicted_least_recently_used_first(self):
        for kind in ('owned', 'other'):
            self.owned = set(CHUNK_IDS) if kind == 'owned' else set()
            cache = self.new_cache(slots=3, name=kind)
            self.fill(cache, CHUNK_IDS[:3])
            cache.read_chunk(CHUNK_IDS[0])  # now the most recently used
            self.fill(cache, CHUNK_IDS[3:4])
            self.assertEqual([True, False, True, True], [c in cache for c in CHUNK_IDS[:4]],
                             kind)

    def test_without_owners_the_cache_is_lru(self):
        cache = cache_mod.ChunkCache(os.path.join(self.tmp, 'plain'), 2 * self.SLOT,
                                     self.fetch)
        self.addCleanup(cache.close)
        self.fill(cache, CHUNK_IDS[:3])
        self.assertEqual([False, True, True], [c in cache for c in CHUNK_IDS[:3]])
        self.assertEqual(0, cache.owned_bytes)

    def test_reclassify_follows_a_new_node_set_and_keeps_recency(self):
        cache = self.new_cache(slots=4)
        self.fill(cache, CHUNK_IDS[:4])  # nothing owned
        cache.read_chunk(CHUNK_IDS[2])  # 3 is the least recently used of 2 and 3 now
        self.owned = set(CHUNK_IDS[:2])
        cache.reclassify()
        self.assertEqual(2 * self.SLOT, cache.owned_bytes)
        self.fill(cache, CHUNK_IDS[4:5])
        self.assertEqual([True, True, True, False, True], [c in cache for c in CHUNK_IDS[:5]])

    def test_a_restarted_cache_sorts_its_chunks(self):
        cache = self.new_cache()
        self.fill(cache, CHUNK_IDS[:3])
        cache.close()
        self.owned = {CHUNK_IDS[1]}
        self.assertEqual(self.SLOT, self.new_cache().owned_bytes)

    def test_a_bad_share_is_refused_by_name(self):
        error = self.assertRaises(exception.MirrorError, self.new_cache, owned_share=1.5)
        self.assertIn('within 0..1', str(error))

    def test_a_chunk_journaled_in_two_slots_frees_one_slot_once(self):
        cache = self.new_cache(slots=64)
        self.fill(cache, CHUNK_IDS[:2])
        # An eviction rewrites no record: the journal may name a chunk in two slots.
        cache._journal.write(cache_mod._record(CHUNK_IDS[0], self.SLOT, 2, len(DATA[CHUNK_IDS[0]])))
        cache.close()
        reopened = self.new_cache()
        self.fill(reopened, CHUNK_IDS[2:4])
        for chunk in CHUNK_IDS[:4]:
            self.assertEqual(DATA[chunk], reopened.read_chunk(chunk), chunk)
