"""Unpersisted replicas in the chunk cache: durable when put, never evicted, within their
budget, flagged in the journal across restarts (journals of format 1 still load), made
ordinary entries once persisted."""
import hashlib
import logging
import os
import struct
import zlib

import fixtures

from vmcloud import exception
from vmcloud.mirror import cache as cache_mod
from tests import base

DATA = {hashlib.sha256(body).hexdigest(): body
        for body in (f'chunk {i:03d} '.encode() * 1000 for i in range(40))}
IDS = list(DATA)
SLOT = 16 * 1024  # every chunk of DATA is 10 000 bytes


class ReplicaCacheTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.fetched: list[str] = []
        self.logs = self.useFixture(fixtures.FakeLogger(level=logging.INFO))

    def fetch(self, chunk_id: str) -> bytes:
        self.fetched.append(chunk_id)
        return DATA[chunk_id]

    def cache(self, slots: int = 8, replica_slots: int | None = None) -> cache_mod.ChunkCache:
        cache = cache_mod.ChunkCache(
            os.path.join(self.tmp, 'cache'), slots * SLOT, self.fetch, retry_wait=0,
            replica_size=None if replica_slots is None else replica_slots * SLOT)
        self.addCleanup(cache.close)
        return cache

    def reopen(self, cache: cache_mod.ChunkCache, **kwargs) -> cache_mod.ChunkCache:
        cache.close()
        return self.cache(**kwargs)

    def test_a_replica_is_held_with_its_origin_and_read_without_a_fetch(self):
        cache = self.cache()
        cache.put(IDS[0], DATA[IDS[0]], origin='node-b')
        self.assertEqual({IDS[0]: 'node-b'}, cache.unpersisted())
        self.assertEqual(SLOT, cache.replica_bytes)
        self.assertEqual(DATA[IDS[0]], cache.read_chunk(IDS[0]))
        self.assertEqual([], self.fetched)
        cache.put(IDS[0], DATA[IDS[0]], origin='node-b')  # twice is once
        self.assertEqual(SLOT, cache.replica_bytes)

    def test_replicas_are_never_evicted_ordinary_chunks_are(self):
        cache = self.cache(slots=4)
        for chunk_id in IDS[:3]:
            cache.put(chunk_id, DATA[chunk_id])
        for chunk_id in IDS[3:20]:  # far more than the one slot left
            cache.read_chunk(chunk_id)
        self.assertEqual(set(IDS[:3]), set(cache.unpersisted()))
        for chunk_id in IDS[:3]:
            self.assertIn(chunk_id, cache)
        self.assertEqual(4 * SLOT, cache.held_bytes)
        self.assertNotIn(IDS[3], cache)

    def test_the_flag_survives_a_restart_and_its_origin_does_not(self):
        cache = self.cache()
        cache.put(IDS[0], DATA[IDS[0]], origin='node-b')
        cache.read_chunk(IDS[1])
        cache = self.reopen(cache, slots=2)
        self.assertEqual({IDS[0]: ''}, cache.unpersisted())
        for chunk_id in IDS[2:10]:  # only the ordinary chunk may go
            cache.read_chunk(chunk_id)
        self.assertEqual({IDS[0]: ''}, cache.unpersisted())
        self.assertEqual(DATA[IDS[0]], cache.read_chunk(IDS[0]))  # verified on first read
        self.assertNotIn(IDS[0], self.fetched)

    def test_a_full_budget_refuses_until_replicas_are_persisted(self):
        cache = self.cache(slots=8, replica_slots=2)
        cache.put(IDS[0], DATA[IDS[0]])
        cache.put(IDS[1], DATA[IDS[1]])
        error = self.assertRaises(exception.ReplicaBudgetFull, cache.put, IDS[2],
                                  DATA[IDS[2]])
        self.assertEqual((IDS[2], 2 * SLOT, 2 * SLOT),
                         (error.chunk_id, error.held, error.budget))
        self.assertIn('replica_size', str(error))
        cache.mark_persisted([IDS[0], 'f' * 64])  # one not held is passed over
        cache.put(IDS[2], DATA[IDS[2]])
        self.assertEqual({IDS[1], IDS[2]}, set(cache.unpersisted()))

    def test_a_persisted_replica_is_an_ordinary_entry_across_a_restart(self):
        cache = self.cache(slots=2)
        cache.put(IDS[0], DATA[IDS[0]])
        cache.mark_persisted([IDS[0]])
        self.assertEqual({}, cache.unpersisted())
        cache = self.reopen(cache, slots=2)
        self.assertEqual({}, cache.unpersisted())
        self.assertIn(IDS[0], cache)
        for chunk_id in IDS[1:4]:
            cache.read_chunk(chunk_id)
        self.assertNotIn(IDS[0], cache)  # evicted like any

    def test_a_chunk_held_already_becomes_a_replica_in_its_slot(self):
        cache = self.cache()
        cache.read_chunk(IDS[0])
        cache.put(IDS[0], DATA[IDS[0]], origin='node-c')
        self.assertEqual({IDS[0]: 'node-c'}, cache.unpersisted())
        self.assertEqual(SLOT, cache.held_bytes)
        cache = self.reopen(cache)
        self.assertEqual([IDS[0]], list(cache.unpersisted()))

    def test_bytes_that_are_not_the_chunk_are_refused(self):
        cache = self.cache()
        error = self.assertRaises(exception.CorruptChunk, cache.put, IDS[0], DATA[IDS[1]])
        self.assertIn(IDS[0], str(error))
        self.assertEqual({}, cache.unpersisted())

    def test_a_replica_that_cannot_be_synced_is_not_kept_as_one(self):
        cache = self.cache()
        self.patch(os, 'fdatasync', self.broken_sync)
        self.assertRaises(OSError, cache.put, IDS[0], DATA[IDS[0]])
        self.assertEqual({}, cache.unpersisted())
        self.assertEqual(0, cache.replica_bytes)

    @staticmethod
    def broken_sync(fd):
        raise OSError(5, 'Input/output error')

    def test_a_corrupt_replica_after_a_restart_is_an_error_naming_it(self):
        cache = self.cache()
        cache.put(IDS[0], DATA[IDS[0]])
        cache.close()
        with open(os.path.join(self.tmp, 'cache', f'slots-{SLOT}'), 'r+b') as f:
            f.write(b'rot')
        cache = self.cache()
        with self.assertLogs('vmcloud.mirror.cache', 'ERROR') as logs:
            self.assertEqual(DATA[IDS[0]], cache.read_chunk(IDS[0]))  # fetched again
        self.assertEqual([IDS[0]], self.fetched)
        self.assertIn(f'unpersisted replica of chunk {IDS[0]} is corrupt', logs.output[0])
        self.assertEqual({}, cache.unpersisted())


class JournalFormatTest(base.TestCase):
    def fetch(self, chunk_id: str) -> bytes:
        return DATA[chunk_id]

    def journal(self) -> str:
        return os.path.join(self.tmp, 'cache', 'journal')

    def test_a_journal_of_format_1_loads_and_is_rewritten_in_the_current_one(self):
        os.makedirs(os.path.join(self.tmp, 'cache'))
        with open(os.path.join(self.tmp, 'cache', f'slots-{SLOT}'), 'wb') as f:
            for chunk_id in IDS[:2]:
                f.write(DATA[chunk_id].ljust(SLOT, b'\0'))
        with open(self.journal(), 'wb') as f:
            for slot, chunk_id in enumerate(IDS[:2]):
                body = struct.pack('<32sIII', bytes.fromhex(chunk_id), SLOT, slot,
                                   len(DATA[chunk_id]))
                f.write(body + struct.pack('<L', zlib.crc32(body)))
        cache = cache_mod.ChunkCache(os.path.join(self.tmp, 'cache'), 1 << 20, self.fetch)
        self.addCleanup(cache.close)
        self.assertEqual(DATA[IDS[1]], cache.read_chunk(IDS[1]))
        self.assertEqual(2 * SLOT, cache.held_bytes)
        self.assertEqual({}, cache.unpersisted())
        with open(self.journal(), 'rb') as f:
            self.assertEqual(cache_mod._header(), f.read(len(cache_mod._header())))

    def test_a_journal_of_a_newer_format_is_refused_naming_it(self):
        os.makedirs(os.path.join(self.tmp, 'cache'))
        body = struct.pack('<8sI', b'vmcjrnl\0', cache_mod.JOURNAL_FORMAT + 1)
        with open(self.journal(), 'wb') as f:
            f.write(body + struct.pack('<L', zlib.crc32(body)))
        error = self.assertRaises(exception.MirrorError, cache_mod.ChunkCache,
                                  os.path.join(self.tmp, 'cache'), 1 << 20, self.fetch)
        self.assertIn(f'format {cache_mod.JOURNAL_FORMAT + 1}', str(error))
        self.assertIn(self.journal(), str(error))
        # The directory was given up: it can be opened once the journal is dealt with.
        os.unlink(self.journal())
        cache_mod.ChunkCache(os.path.join(self.tmp, 'cache'), 1 << 20, self.fetch).close()
