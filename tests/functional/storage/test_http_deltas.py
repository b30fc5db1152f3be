"""Delta objects and format 3 manifests through the warehouse service (issue 19).

The service moves objects and manifests without reading them: a delta is a chunk whose
id is the sha256 of its bytes, a format 3 manifest bytes like any other. These tests
show both cross the wire, and that what a client wrote reads, verifies and survives gc
on another client.
"""
import random

from vmcloud.storage import delta
from vmcloud.storage import warehouse as warehouse_mod
from tests import base
from tests.functional.storage.test_http_backend import ServiceFixtureMixin

BLOCK = 4096


class DeltasOverHttpTest(ServiceFixtureMixin, base.TestCase):
    def setUp(self):
        super().setUp()
        self.conf.set_override('chunk_size', 64 * 1024, 'storage')
        self.start_service()
        self.warehouse = warehouse_mod.Warehouse(self.conf, backend=self.client())
        self.chunk_size = self.conf.storage.chunk_size
        self.rng = random.Random(5)
        self.data = bytearray(self.rng.randbytes(6 * self.chunk_size))
        raw = f'{self.tmp}/disk.raw'
        with open(raw, 'wb') as f:
            f.write(self.data)
        self.base = self.warehouse.import_image(raw, 'disk', 'raw').manifest

    def write(self, index: int, block: int) -> delta.BlockChanges:
        data = self.rng.randbytes(BLOCK)
        start = index * self.chunk_size + block * BLOCK
        self.data[start:start + BLOCK] = data
        return delta.BlockChanges(BLOCK, {block: data})

    def test_block_changes_snapshot_reads_verifies_and_survives_gc_on_another_client(self):
        counters = self.service.app.counters
        puts, put_bytes = counters['chunk_puts'], counters['chunk_put_bytes']
        results = self.warehouse.snapshot_many(
            [(self.base.ref, {1: self.write(1, 3), 4: self.write(4, 0)})], targets=['vm'])
        first = results[0].manifest
        self.assertTrue(first.is_delta(1) and first.is_delta(4))
        # Two deltas crossed, each about a block, not a chunk.
        self.assertEqual(puts + 2, counters['chunk_puts'])
        self.assertLess(counters['chunk_put_bytes'] - put_bytes, 2 * (BLOCK + 256))
        second = self.warehouse.snapshot_chunks(first.ref, {1: self.write(1, 7)}).manifest
        self.assertEqual(3, len(second.chunks[1]))

        other = warehouse_mod.Warehouse(self.conf, backend=self.client())
        latest = other.lookup('vm:2')
        self.assertBytesEqual(bytes(self.data), other.read(latest, 0, len(self.data)))
        self.assertEqual([], other.verify().problems)
        other.delete('vm', 2)
        other.gc()
        # vm:1's deltas are kept; vm:2's own delta is freed.
        stored = {chunk_id for chunk_id, _ in self.file_store.iter_chunks()}
        self.assertLessEqual(first.data_chunk_ids(), stored)
        self.assertNotIn(second.chunks[1][0], stored)
        self.assertEqual([], other.verify().problems)
