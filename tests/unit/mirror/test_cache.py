"""The chunk cache's fetches: one per chunk however the misses interleave, a missing
chunk not asked again, and a closed cache that refuses cleanly."""
import hashlib
import logging
import os
import threading

import fixtures

from vmcloud import exception
from vmcloud.mirror import cache as cache_mod
from tests import base

DATA = {hashlib.sha256(body).hexdigest(): body
        for body in (f'chunk {i:03d} '.encode() * 1000 for i in range(4))}
CHUNK_IDS = sorted(DATA)


class CacheTestCase(base.TestCase):
    def setUp(self):
        super().setUp()
        self.fetches: list[str] = []
        self.gate: threading.Event | None = None
        self.fetching = threading.Event()

    def fetch(self, chunk_id: str) -> bytes:
        self.fetches.append(chunk_id)
        self.fetching.set()
        if self.gate is not None:
            self.assertTrue(self.gate.wait(30))
        return DATA[chunk_id]

    def new_cache(self, attempts: int = 4, fetch=None,
                  name: str = 'cache') -> cache_mod.ChunkCache:
        cache = cache_mod.ChunkCache(os.path.join(self.tmp, name), 1 << 24,
                                     fetch or self.fetch, attempts=attempts,
                                     retry_wait=0.001)
        self.addCleanup(cache.close)
        return cache


class SingleFlightTest(CacheTestCase):
    def finish_a_fetch_after_the_miss(self, cache: cache_mod.ChunkCache, chunk: str) -> None:
        """Make the first miss of ``chunk`` see another thread fetch and keep it between
        the miss and the fetch it goes on to."""
        pin = cache._pin
        done = []

        def miss_then_another_fetch(chunk_id):
            entry = pin(chunk_id)
            if entry is None and not done:
                done.append(True)
                other = threading.Thread(target=cache.read_chunk, args=(chunk_id,))
                other.start()
                other.join(30)
            return entry

        self.patch(cache, '_pin', miss_then_another_fetch)

    def test_a_chunk_kept_between_a_miss_and_its_fetch_is_fetched_once(self):
        for read in ('read_chunk', 'read_into'):
            self.fetches.clear()
            cache = self.new_cache(name=read)
            chunk = CHUNK_IDS[0]
            self.finish_a_fetch_after_the_miss(cache, chunk)
            if read == 'read_chunk':
                self.assertEqual(DATA[chunk], cache.read_chunk(chunk))
            else:
                target = bytearray(100)
                cache.read_into(chunk, 50, memoryview(target))
                self.assertEqual(DATA[chunk][50:150], bytes(target))
            self.assertEqual([chunk], self.fetches, read)

    def test_concurrent_misses_share_one_fetch(self):
        cache = self.new_cache()
        self.gate = threading.Event()
        chunk = CHUNK_IDS[1]
        results = []
        readers = [threading.Thread(target=lambda: results.append(cache.read_chunk(chunk)))
                   for _ in range(8)]
        for reader in readers:
            reader.start()
        self.assertTrue(self.fetching.wait(30))
        self.gate.set()
        for reader in readers:
            reader.join(30)
        cache.ensure(chunk)
        self.assertEqual([DATA[chunk]] * 8, results)
        self.assertEqual([chunk], self.fetches)


class MissingChunkTest(CacheTestCase):
    def test_a_chunk_not_found_is_asked_once(self):
        asked = []

        def missing(chunk_id):
            asked.append(chunk_id)
            raise exception.ChunkNotFound(chunk_id)

        cache = self.new_cache(attempts=4, fetch=missing)
        error = self.assertRaises(exception.FetchFailed, cache.read_chunk, CHUNK_IDS[0])
        self.assertEqual([CHUNK_IDS[0]], asked)
        self.assertIsInstance(error.__cause__, exception.ChunkNotFound)
        self.assertIn('after 1 attempts', str(error))
        self.assertEqual(1, cache.stats.failed_fetches)

    def test_other_failures_are_still_retried(self):
        asked = []

        def failing(chunk_id):
            asked.append(chunk_id)
            raise exception.StorageError('the warehouse is down')

        cache = self.new_cache(attempts=3, fetch=failing)
        error = self.assertRaises(exception.FetchFailed, cache.read_chunk, CHUNK_IDS[0])
        self.assertEqual([CHUNK_IDS[0]] * 3, asked)
        self.assertIn('after 3 attempts', str(error))


class ClosedTest(CacheTestCase):
    def test_a_closed_cache_refuses_reads_and_puts_and_ignores_persisted(self):
        cache = self.new_cache()
        cache.put(CHUNK_IDS[0], DATA[CHUNK_IDS[0]])
        cache.close()
        for call in (lambda: cache.read_chunk(CHUNK_IDS[0]),
                     lambda: cache.read_into(CHUNK_IDS[0], 0, memoryview(bytearray(1))),
                     lambda: cache.ensure(CHUNK_IDS[1]),
                     lambda: cache.put(CHUNK_IDS[1], DATA[CHUNK_IDS[1]])):
            error = self.assertRaises(cache_mod.CacheClosed, call)
            self.assertIn(cache.path, str(error))
            self.assertIsInstance(error, exception.MirrorError)
        cache.mark_persisted([CHUNK_IDS[0]])
        cache.close()
        self.assertEqual([], self.fetches)
        # Nothing was written after the close: the replica is still one after a restart.
        self.assertEqual({CHUNK_IDS[0]: ''}, self.new_cache().unpersisted())

    def test_a_fetch_that_ends_after_the_close_is_served_and_not_kept(self):
        logs = self.useFixture(fixtures.FakeLogger(level=logging.DEBUG))
        cache = self.new_cache()
        self.gate = threading.Event()
        results = []
        reader = threading.Thread(target=lambda: results.append(cache.read_chunk(CHUNK_IDS[0])))
        reader.start()
        self.assertTrue(self.fetching.wait(30))
        cache.close()
        self.gate.set()
        reader.join(30)
        self.assertEqual([DATA[CHUNK_IDS[0]]], results)
        self.assertNotIn(CHUNK_IDS[0], cache)
        self.assertNotIn('Traceback', logs.output)
        self.assertNotIn(CHUNK_IDS[0], self.new_cache())

    def test_close_waits_for_a_write_under_way(self):
        cache = self.new_cache()
        writing, release = threading.Event(), threading.Event()
        write_all_at = cache_mod.durable.write_all_at

        def slow_write(fd, data, offset):
            writing.set()
            self.assertTrue(release.wait(30))
            return write_all_at(fd, data, offset)

        self.patch(cache_mod.durable, 'write_all_at', slow_write)
        results = []
        reader = threading.Thread(target=lambda: results.append(cache.read_chunk(CHUNK_IDS[0])))
        reader.start()
        self.assertTrue(writing.wait(30))
        closer = threading.Thread(target=cache.close)
        closer.start()
        closer.join(0.2)
        self.assertTrue(closer.is_alive())  # the slot file is still being written
        release.set()
        reader.join(30)
        closer.join(30)
        self.assertFalse(closer.is_alive())
        self.assertEqual([DATA[CHUNK_IDS[0]]], results)
        # The write finished into the file it began in: the chunk is there after a restart.
        self.assertEqual(DATA[CHUNK_IDS[0]], self.new_cache().read_chunk(CHUNK_IDS[0]))
        self.assertEqual([CHUNK_IDS[0]], self.fetches)
