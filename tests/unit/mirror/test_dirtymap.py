"""The mirror's dirty map at guest-block granularity, on its own."""
import os
import struct
import zlib

import fixtures

from vmcloud import exception
from vmcloud.mirror import dirtymap
from tests import base

CHUNK = 64 * 1024
BLOCK = 4096


def v1_map(chunk_count: int, indexes) -> bytes:
    """A dirty map file exactly as the chunk-granular code (VMDIRTY1) wrote it."""
    bits = bytearray((chunk_count + 7) // 8)
    for index in indexes:
        bits[index >> 3] |= 1 << (index & 7)
    body = struct.pack('<8sQ', b'VMDIRTY1', chunk_count) + bytes(bits)
    return body + struct.pack('<L', zlib.crc32(body))


def v2_map(chunk_count: int, chunk_size: int, block_size: int, records, width=None) -> bytes:
    """A version 2 file with a good checksum, whatever its records say."""
    width = width or (chunk_size // block_size + 7) // 8
    body = struct.pack('<8sQQQQ', b'VMDIRTY2', chunk_count, chunk_size, block_size,
                       len(records))
    for index, mask in records:
        body += struct.pack('<Q', index) + mask.to_bytes(width, 'little')
    return body + struct.pack('<L', zlib.crc32(body))


class DirtyMapTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.path = os.path.join(self.tmp, 'dirty')
        # 10 chunks, the last one 10000 bytes: 3 blocks, the third short.
        self.count, self.size = 10, 9 * CHUNK + 10000

    def new_map(self, block_size: int = BLOCK) -> dirtymap.DirtyMap:
        return dirtymap.DirtyMap(self.path, self.count, CHUNK, self.size, block_size)

    def write_file(self, data: bytes) -> None:
        with open(self.path, 'wb') as f:
            f.write(data)

    def test_round_trip(self):
        dirty = self.new_map()
        dirty.add_blocks(0, 0, 1)
        dirty.add_blocks(0, 5, 7)
        dirty.add_blocks(4, 0, 16)
        dirty.add_blocks(9, 2, 3)  # the short last block
        dirty.add(7)
        dirty.persist_after(lambda: None)
        loaded = self.new_map()
        self.assertEqual({0, 4, 7, 9}, loaded.indexes())
        self.assertEqual(frozenset({0, 5, 6}), loaded.blocks(0))
        self.assertEqual(frozenset({2}), loaded.blocks(9))
        self.assertEqual(frozenset(), loaded.blocks(3))
        self.assertTrue(loaded.is_whole(4))
        self.assertTrue(loaded.is_whole(7))
        self.assertFalse(loaded.is_whole(0))
        self.assertIn(9, loaded)
        self.assertNotIn(3, loaded)
        self.assertEqual(dirty.masks(), loaded.masks())
        self.assertEqual(3, loaded.block_count(9))
        self.assertTrue(loaded.is_whole(9) is False)
        loaded.add_blocks(9, 0, 2)
        self.assertTrue(loaded.is_whole(9))

    def test_blocks_outside_the_chunk_are_refused(self):
        dirty = self.new_map()
        self.assertRaises(IndexError, dirty.add_blocks, 9, 0, 4)  # chunk 9 has 3 blocks
        self.assertRaises(IndexError, dirty.add_blocks, 10, 0, 1)
        self.assertRaises(IndexError, dirty.add_blocks, 0, 3, 3)
        self.assertEqual(set(), dirty.indexes())

    def test_version_1_loads_as_whole_chunks(self):
        self.write_file(v1_map(self.count, [1, 3, 9]))
        dirty = self.new_map()
        self.assertEqual({1, 3, 9}, dirty.indexes())
        for index in (1, 3, 9):
            self.assertTrue(dirty.is_whole(index))
        self.assertEqual(frozenset(range(16)), dirty.blocks(1))
        self.assertEqual(frozenset(range(3)), dirty.blocks(9))
        # The next persist writes version 2, which keeps the old chunks whole.
        dirty.add_blocks(5, 1, 2)
        dirty.persist_after(lambda: None)
        with open(self.path, 'rb') as f:
            self.assertEqual(b'VMDIRTY2', f.read(8))
        self.assertEqual({1: 0xffff, 3: 0xffff, 5: 0b10, 9: 0b111}, self.new_map().masks())

    def test_size_follows_the_dirty_chunks_not_the_disk(self):
        chunk_size = 256 * 1024
        count = 100 * 1024 ** 3 // chunk_size
        dirty = dirtymap.DirtyMap(self.path, count, chunk_size, count * chunk_size, BLOCK)
        for index in range(0, count, count // 10)[:10]:
            dirty.add_blocks(index, 3, 9)
        dirty.persist_after(lambda: None)
        # A 40-byte header, 10 records of an index and a 64-bit bitmap, a checksum.
        self.assertEqual(40 + 10 * 16 + 4, os.path.getsize(self.path))
        loaded = dirtymap.DirtyMap(self.path, count, chunk_size, count * chunk_size, BLOCK)
        self.assertEqual(dirty.masks(), loaded.masks())

    def test_bits_are_taken_before_the_sync(self):
        dirty = self.new_map()
        dirty.add_blocks(0, 0, 1)

        def sync():  # a write that lands while the overlay is synced
            dirty.add_blocks(2, 4, 5)

        dirty.persist_after(sync)
        self.assertEqual({0: 1}, self.new_map().masks())
        dirty.persist_after(lambda: None)
        self.assertEqual({0: 1, 2: 1 << 4}, self.new_map().masks())

    def test_a_failed_sync_writes_nothing_and_the_next_persist_writes(self):
        dirty = self.new_map()
        dirty.add_blocks(1, 0, 2)

        def failing():
            raise OSError(5, 'I/O error')

        self.assertRaises(OSError, dirty.persist_after, failing)
        self.assertFalse(os.path.exists(self.path))
        dirty.persist_after(lambda: None)
        self.assertEqual({1: 0b11}, self.new_map().masks())

    def test_a_failed_replace_leaves_the_old_map_and_the_next_persist_writes(self):
        dirty = self.new_map()
        dirty.add_blocks(1, 0, 1)
        dirty.persist_after(lambda: None)
        dirty.add_blocks(2, 0, 1)
        with fixtures.MockPatch('os.replace', side_effect=OSError(28, 'No space')):
            self.assertRaises(OSError, dirty.persist_after, lambda: None)
        self.assertEqual({1: 1}, self.new_map().masks())
        dirty.persist_after(lambda: None)
        self.assertEqual({1: 1, 2: 1}, self.new_map().masks())

    def assertCorrupt(self, data: bytes, problem: str) -> None:
        self.write_file(data)
        error = self.assertRaises(exception.CorruptMirrorState, self.new_map)
        self.assertIn(self.path, str(error))
        self.assertIn(problem, str(error))

    def test_corrupt_files_are_refused(self):
        good = v2_map(self.count, CHUNK, BLOCK, [(1, 0b1), (4, 0b110)])
        self.write_file(good)
        self.assertEqual({1: 1, 4: 6}, self.new_map().masks())
        flipped = bytearray(good)
        flipped[44] ^= 1
        self.assertCorrupt(bytes(flipped), 'checksum')
        self.assertCorrupt(good[:-1], 'checksum')
        self.assertCorrupt(b'', 'checksum')
        bad_magic = b'VMDIRTY9' + good[8:-4]
        self.assertCorrupt(bad_magic + struct.pack('<L', zlib.crc32(bad_magic)), 'format')
        self.assertCorrupt(v2_map(self.count + 1, CHUNK, BLOCK, []), '11 chunks')
        self.assertCorrupt(v2_map(self.count, CHUNK, 3000, []), 'power of two')
        self.assertCorrupt(v2_map(self.count, CHUNK, BLOCK, [(4, 1), (1, 1)]), 'out of order')
        self.assertCorrupt(v2_map(self.count, CHUNK, BLOCK, [(10, 1)]), 'outside the disk')
        self.assertCorrupt(v2_map(self.count, CHUNK, BLOCK, [(2, 0)]), 'empty bitmap')
        self.assertCorrupt(v2_map(self.count, CHUNK, BLOCK, [(9, 0b1000)]), 'past its end')
        self.assertCorrupt(v2_map(self.count, CHUNK, BLOCK, [(1, 1)], width=3), 'records')
        self.assertCorrupt(v1_map(self.count + 1, [1]), 'version 1')

    def test_the_file_keeps_its_block_size(self):
        self.write_file(v2_map(self.count, CHUNK, 512, [(3, 1 << 127)]))
        dirty = self.new_map(block_size=BLOCK)
        self.assertEqual(512, dirty.block_size)
        self.assertEqual(frozenset({127}), dirty.blocks(3))
        self.assertTrue(dirty.add_blocks(9, 19, 20) is None)  # 10000 bytes: 20 blocks
        self.assertRaises(IndexError, dirty.add_blocks, 9, 20, 21)

    def test_a_bad_block_size_is_refused(self):
        for block_size, problem in ((3000, 'not a power of two'), (0, 'not a power of two'),
                                    (128 * 1024, 'does not divide')):
            error = self.assertRaises(exception.ConfigError, self.new_map, block_size)
            self.assertIn(str(block_size), str(error))
            self.assertIn(problem, str(error))
        self.write_file(v1_map(self.count, [1]))
        self.assertRaises(exception.ConfigError, self.new_map, 3000)

    def test_runs(self):
        self.assertEqual([], list(dirtymap.runs(0)))
        self.assertEqual([(0, 1)], list(dirtymap.runs(1)))
        self.assertEqual([(1, 3), (5, 6), (8, 72)],
                         list(dirtymap.runs(0b100110 | (((1 << 64) - 1) << 8))))
