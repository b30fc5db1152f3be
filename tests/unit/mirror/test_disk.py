"""The mirror's disk, cache, dirty map and profiles, without NBD."""
import dataclasses
import errno
import json
import os
import random
import threading
import time

import fixtures

from vmcloud import exception
from vmcloud.mirror import cache as cache_mod
from vmcloud.mirror import dirtymap
from vmcloud.mirror import disk as disk_mod
from vmcloud.mirror import manager as manager_mod
from vmcloud.mirror import profile as profile_mod
from vmcloud.nbd import device
from vmcloud.storage import delta
from vmcloud.storage import warehouse
from tests import base
from tests.unit.mirror import test_dirtymap

CHUNK = 64 * 1024


def abandon(disk: disk_mod.MirrorDisk) -> None:
    """What a kill -9 leaves of a disk: no last flush; the kernel closes its files and
    so drops its lock."""
    os.close(disk._fd)
    disk._owner.release()


class MirrorTestCase(base.TestCase):
    def setUp(self):
        super().setUp()
        self.conf.set_override('chunk_size', CHUNK, 'storage')
        self.warehouse = warehouse.Warehouse(self.conf)
        rng = random.Random(7)
        # r: random data, h: hole, A: a chunk repeated twice, s: a short tail
        parts = {'r': lambda: rng.randbytes(CHUNK), 'h': lambda: bytes(CHUNK),
                 'A': lambda: b'A' * CHUNK, 's': lambda: rng.randbytes(CHUNK // 3)}
        self.image = b''.join(parts[kind]() for kind in 'rrhArAhrs')
        path = os.path.join(self.tmp, 'image.raw')
        with open(path, 'wb') as f:
            f.write(self.image)
        self.manifest = self.warehouse.import_image(path, 'img').manifest
        self.fetches: list[str] = []
        self.cache = self.new_cache()

    def fetch(self, chunk_id: str) -> bytes:
        self.fetches.append(chunk_id)
        return self.warehouse.read_chunk(chunk_id)

    def new_cache(self, capacity: int = 1 << 30, fetch=None,
                  name: str = 'cache') -> cache_mod.ChunkCache:
        cache = cache_mod.ChunkCache(os.path.join(self.tmp, name), capacity,
                                     fetch or self.fetch, attempts=3, retry_wait=0.01)
        self.addCleanup(cache.close)
        return cache

    def new_disk(self, cache=None) -> disk_mod.MirrorDisk:
        disk = disk_mod.MirrorDisk(os.path.join(self.tmp, 'mirror'), self.manifest,
                                   cache or self.cache)
        return disk

    def fetched_bytes_for(self, indexes) -> int:
        ids = {self.manifest.chunks[i] for i in indexes} - {None}
        return sum(len(self.warehouse.read_chunk(c)) for c in ids)


class ReadTest(MirrorTestCase):
    def test_reads_the_image_and_fetches_each_chunk_once(self):
        disk = self.new_disk()
        self.assertBytesEqual(self.image, disk.read(0, len(self.image)))
        distinct = self.manifest.data_chunk_ids()
        self.assertEqual(sorted(distinct), sorted(self.fetches))  # holes and repeats: no fetch
        self.assertEqual(self.fetched_bytes_for(range(self.manifest.chunk_count)),
                         self.cache.stats.fetched_bytes)
        # Present now: a second read is served locally.
        self.assertBytesEqual(self.image[1000:300000], disk.read(1000, 299000))
        self.assertEqual(len(distinct), len(self.fetches))
        disk.close()

    def test_second_mirror_on_the_node_fetches_nothing(self):
        self.new_disk().read(0, len(self.image))
        other = disk_mod.MirrorDisk(os.path.join(self.tmp, 'other'), self.manifest, self.cache)
        before = len(self.fetches)
        self.assertBytesEqual(self.image, other.read(0, len(self.image)))
        self.assertEqual(before, len(self.fetches))

    def test_concurrent_reads_of_a_missing_chunk_fetch_it_once(self):
        gate = threading.Event()

        def slow_fetch(chunk_id):
            gate.wait(5)
            return self.fetch(chunk_id)

        disk = self.new_disk(self.new_cache(fetch=slow_fetch, name='slow'))
        results = []
        threads = [threading.Thread(target=lambda: results.append(disk.read(CHUNK + 10, 100)))
                   for _ in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(0.2)
        gate.set()
        for thread in threads:
            thread.join()
        self.assertEqual([self.image[CHUNK + 10:CHUNK + 110]] * 8, results)
        self.assertEqual([self.manifest.chunks[1]], self.fetches)

    def test_out_of_range(self):
        disk = self.new_disk()
        self.assertRaises(exception.InvalidRange, disk.read, len(self.image) - 1, 2)

    def test_block_status_keeps_holes(self):
        disk = self.new_disk()
        hole = device.STATE_HOLE | device.STATE_ZERO
        self.assertEqual([device.Extent(2 * CHUNK, 0), device.Extent(CHUNK, hole),
                          device.Extent(3 * CHUNK, 0), device.Extent(CHUNK, hole),
                          device.Extent(CHUNK + CHUNK // 3, 0)],
                         disk.block_status(0, len(self.image)))
        self.assertEqual([], self.fetches)  # status needs no data


class WriteTest(MirrorTestCase):
    def test_partial_write_fills_the_chunk(self):
        disk = self.new_disk()
        disk.write(CHUNK + 100, b'x' * 10)
        expected = bytearray(self.image)
        expected[CHUNK + 100:CHUNK + 110] = b'x' * 10
        self.assertBytesEqual(bytes(expected), disk.read(0, len(expected)))
        self.assertEqual({1}, disk.dirty.indexes())
        self.assertEqual([self.manifest.chunks[1]], self.fetches[:1])

    def test_whole_chunk_write_fetches_nothing(self):
        disk = self.new_disk()
        disk.write(0, b'y' * (2 * CHUNK))
        self.assertEqual([], self.fetches)
        self.assertEqual({0, 1}, disk.dirty.indexes())

    def test_flushed_writes_survive_a_restart_with_an_empty_cache(self):
        disk = self.new_disk()
        disk.write(3 * CHUNK - 5, b'z' * 10, fua=True)
        disk.write(8 * CHUNK, b'q' * 7)
        disk.flush()
        expected = bytearray(self.image)
        expected[3 * CHUNK - 5:3 * CHUNK + 5] = b'z' * 10
        expected[8 * CHUNK:8 * CHUNK + 7] = b'q' * 7
        abandon(disk)  # as if the process had been killed after the flush
        self.cache.close()
        fresh = cache_mod.ChunkCache(os.path.join(self.tmp, 'cache2'), 1 << 30, self.fetch)
        self.addCleanup(fresh.close)
        reopened = self.new_disk(fresh)
        self.assertEqual({2, 3, 8}, reopened.dirty.indexes())
        self.assertBytesEqual(bytes(expected), reopened.read(0, len(expected)))

    def test_unflushed_marks_are_not_on_disk(self):
        disk = self.new_disk()
        disk.write(0, b'a' * CHUNK)
        path = os.path.join(self.tmp, 'mirror', 'dirty')
        shape = (self.manifest.chunk_count, CHUNK, self.manifest.size)
        self.assertEqual(set(), dirtymap.DirtyMap(path, *shape).indexes())
        disk.flush()
        self.assertEqual({0}, dirtymap.DirtyMap(path, *shape).indexes())
        disk.close()

    def test_write_zeroes_makes_holes(self):
        disk = self.new_disk()
        disk.write_zeroes(0, CHUNK + 10)
        hole = device.STATE_HOLE | device.STATE_ZERO
        self.assertEqual(device.Extent(CHUNK, hole), disk.block_status(0, CHUNK)[0])
        self.assertBytesEqual(bytes(CHUNK + 10) + self.image[CHUNK + 10:2 * CHUNK],
                              disk.read(0, 2 * CHUNK))

    def test_corrupt_dirty_map_is_refused(self):
        disk = self.new_disk()
        disk.write(0, b'a' * CHUNK, fua=True)
        disk.close()
        with open(os.path.join(self.tmp, 'mirror', 'dirty'), 'r+b') as f:
            f.seek(16)
            f.write(b'\xff')
        self.assertRaises(exception.CorruptMirrorState, self.new_disk)

    def flushed_mirror(self) -> str:
        """A closed mirror with flushed writes in chunks 2 and 5; the overlay's path."""
        disk = self.new_disk()
        disk.write(2 * CHUNK, b'd' * 10, fua=True)
        disk.write(5 * CHUNK + 7, b'e' * 10, fua=True)
        disk.close()
        return os.path.join(self.tmp, 'mirror', 'overlay')

    def test_missing_overlay_with_a_dirty_map_is_refused(self):
        overlay = self.flushed_mirror()
        os.unlink(overlay)
        error = self.assertRaises(exception.CorruptMirrorState, self.new_disk)
        self.assertIn(overlay, str(error))
        self.assertIn('missing', str(error))
        self.assertFalse(os.path.exists(overlay))  # no empty file put in its place
        self.assertTrue(os.path.exists(os.path.join(self.tmp, 'mirror', 'dirty')))

    def test_overlay_cut_short_is_refused(self):
        overlay = self.flushed_mirror()
        # Cut only past the last written chunk, it loses nothing: the mirror opens.
        os.truncate(overlay, 6 * CHUNK)
        disk = self.new_disk()
        self.assertEqual(b'e' * 10, disk.read(5 * CHUNK + 7, 10))
        self.assertEqual(self.image[8 * CHUNK:], disk.read(8 * CHUNK, len(self.image) - 8 * CHUNK))
        disk.close()
        os.truncate(overlay, 5 * CHUNK + 10)  # chunk 2 whole, chunk 5 cut
        error = self.assertRaises(exception.CorruptMirrorState, self.new_disk)
        self.assertIn(overlay, str(error))
        self.assertIn('chunk 5', str(error))
        self.assertEqual(5 * CHUNK + 10, os.path.getsize(overlay))  # not extended

    def test_a_refused_mirror_is_not_left_locked(self):
        overlay = self.flushed_mirror()
        os.unlink(overlay)
        self.assertRaises(exception.CorruptMirrorState, self.new_disk)
        self.assertRaises(exception.CorruptMirrorState, self.new_disk)  # not StateLocked

    def test_a_failed_last_flush_is_raised_and_still_gives_the_mirror_up(self):
        disk = self.new_disk()
        disk.write(2 * CHUNK, b'd' * 10, fua=True)
        disk.write(5 * CHUNK, b'e' * 10)  # never flushed
        with fixtures.MockPatch('os.fdatasync', side_effect=OSError(errno.EIO, 'I/O error')):
            error = self.assertRaises(OSError, disk.close)
        self.assertEqual(errno.EIO, error.errno)
        fd_error = self.assertRaises(OSError, os.fstat, disk._fd)  # the overlay was closed
        self.assertEqual(errno.EBADF, fd_error.errno)
        # Not StateLocked: the next owner gets what the last good flush left.
        reopened = self.new_disk()
        self.assertEqual({2}, reopened.dirty.indexes())
        self.assertEqual(b'd' * 10, reopened.read(2 * CHUNK, 10))
        reopened.close()


class BarrierTest(MirrorTestCase):
    def test_copy_before_overwrite(self):
        disk = self.new_disk()
        disk.write(0, b'1' * CHUNK)
        disk.write(CHUNK, b'2' * CHUNK)
        with disk.barrier() as barrier:
            self.assertEqual({0, 1}, barrier.indexes)
            barrier.uploaded(1)
            disk.write(10, b'new')          # chunk 0 is copied aside first
            disk.write(CHUNK + 10, b'new')  # chunk 1 was uploaded: no copy
            disk.write(2 * CHUNK, b'3')     # not dirty at the barrier
            self.assertEqual(b'1' * CHUNK, barrier.read_chunk(0))
            self.assertEqual(4096, barrier.copied_bytes)  # the one block overwritten
            self.assertRaises(KeyError, barrier.read_chunk, 2)
            self.assertRaises(exception.MirrorError, disk.barrier)
        self.assertEqual(b'1' * 10 + b'new', disk.read(0, 13))
        disk.barrier().close()  # a new barrier once the last one closed


class BlockTest(MirrorTestCase):
    """Dirty tracking by guest blocks (4096 bytes) within 64 KiB chunks."""

    def test_a_whole_block_write_to_a_chunk_never_read_fetches_nothing(self):
        disk = self.new_disk()
        disk.write(CHUNK + 4096, b'w' * 8192)
        disk.write(7 * CHUNK, b'v' * 4096, fua=True)
        self.assertEqual([], self.fetches)
        self.assertEqual(frozenset({1, 2}), disk.dirty.blocks(1))
        self.assertEqual(frozenset({0}), disk.dirty.blocks(7))
        self.assertFalse(disk.dirty.is_whole(1))
        # The written blocks read from the overlay: still no fetch.
        self.assertEqual(b'w' * 8192, disk.read(CHUNK + 4096, 8192))
        self.assertEqual([], self.fetches)
        self.assertEqual(set(), disk.fetched_indexes())
        # The rest of the chunk is the image's, fetched now.
        expected = bytearray(self.image[CHUNK:2 * CHUNK])
        expected[4096:12288] = b'w' * 8192
        self.assertBytesEqual(bytes(expected), disk.read_chunk(1))
        self.assertEqual([self.manifest.chunks[1]], self.fetches)
        disk.close()

    def test_a_512_byte_write_fetches_its_block(self):
        disk = self.new_disk()
        disk.write(CHUNK + 4096 + 512, b'p' * 512)
        self.assertEqual([self.manifest.chunks[1]], self.fetches)
        self.assertEqual({1}, disk.fetched_indexes())
        self.assertEqual(frozenset({1}), disk.dirty.blocks(1))
        expected = self.image[CHUNK + 4096:CHUNK + 4608] + b'p' * 512 + \
            self.image[CHUNK + 5120:CHUNK + 8192]
        self.assertBytesEqual(expected, disk.read(CHUNK + 4096, 4096))
        # A second partial write to the now dirty block needs the image no more.
        self.fetches.clear()
        self.cache.close()
        disk2_cache = self.new_cache(name='cache2')
        disk.close()
        disk = self.new_disk(disk2_cache)
        disk.write(CHUNK + 4096 + 100, b'q' * 10)
        self.assertEqual([], self.fetches)
        disk.close()

    def test_a_write_spanning_blocks_fetches_only_for_its_partial_ends(self):
        disk = self.new_disk()
        disk.write(4 * CHUNK, b'a' * 8192)  # blocks 0 and 1 whole
        disk.write(4 * CHUNK + 8192 - 100, b'b' * 200)  # the end of block 1, part of 2
        self.assertEqual([self.manifest.chunks[4]], self.fetches)
        expected = bytearray(self.image)
        expected[4 * CHUNK:4 * CHUNK + 8192] = b'a' * 8192
        expected[4 * CHUNK + 8092:4 * CHUNK + 8292] = b'b' * 200
        self.assertBytesEqual(bytes(expected), disk.read(0, len(expected)))
        self.assertEqual(frozenset({0, 1, 2}), disk.dirty.blocks(4))

    def test_the_short_last_block(self):
        disk = self.new_disk()
        tail = 8 * CHUNK + 5 * 4096  # chunk 8 is CHUNK // 3 bytes: its block 5 is short
        disk.write(tail, b't' * (len(self.image) - tail))
        self.assertEqual([], self.fetches)
        self.assertEqual(frozenset({5}), disk.dirty.blocks(8))
        disk.write(len(self.image) - 10, b'u' * 10)
        self.assertEqual([], self.fetches)
        disk.write(tail - 10, b'x' * 10)  # the end of block 4: a fetch
        self.assertEqual([self.manifest.chunks[8]], self.fetches)
        expected = bytearray(self.image)
        expected[tail:] = b't' * (len(self.image) - tail)
        expected[-10:] = b'u' * 10
        expected[tail - 10:tail] = b'x' * 10
        disk.close()
        self.assertBytesEqual(bytes(expected), self.new_disk().read(0, len(expected)))

    def test_write_zeroes_of_whole_blocks_fetches_nothing(self):
        disk = self.new_disk()
        disk.write_zeroes(CHUNK + 4096, 3 * 4096)
        self.assertEqual([], self.fetches)
        self.assertEqual(frozenset({1, 2, 3}), disk.dirty.blocks(1))
        self.assertEqual(bytes(3 * 4096), disk.read(CHUNK + 4096, 3 * 4096))
        disk.write_zeroes(4 * CHUNK + 4000, 200)  # inside blocks 0 and 1: the image's rest
        self.assertEqual([self.manifest.chunks[4]], self.fetches)
        expected = bytearray(self.image)
        expected[CHUNK + 4096:CHUNK + 4 * 4096] = bytes(3 * 4096)
        expected[4 * CHUNK + 4000:4 * CHUNK + 4200] = bytes(200)
        self.assertBytesEqual(bytes(expected), disk.read(0, len(expected)))
        # Not whole blocks at the ends, whole ones between them.
        disk.write_zeroes(7 * CHUNK + 100, 3 * 4096)
        expected[7 * CHUNK + 100:7 * CHUNK + 100 + 3 * 4096] = bytes(3 * 4096)
        self.assertBytesEqual(bytes(expected), disk.read(0, len(expected)))
        self.assertEqual(frozenset({0, 1, 2, 3}), disk.dirty.blocks(7))

    def test_block_status_of_partly_written_chunks(self):
        disk = self.new_disk()
        hole = device.STATE_HOLE | device.STATE_ZERO
        disk.write_zeroes(2 * CHUNK, 4096)  # a hole chunk, one block zeroed: still a hole
        disk.write_zeroes(CHUNK, 4096)  # a data chunk, one block zeroed: still data
        self.assertEqual([device.Extent(CHUNK, 0), device.Extent(CHUNK, hole)],
                         disk.block_status(CHUNK, 2 * CHUNK))
        disk.write(6 * CHUNK + 8192, b'd' * 4096)  # a hole chunk with one block of data
        self.assertEqual([device.Extent(CHUNK, 0)], disk.block_status(6 * CHUNK, CHUNK))
        disk.write_zeroes(6 * CHUNK + 8192, 4096)  # and zeroed again
        self.assertEqual([device.Extent(CHUNK, hole)], disk.block_status(6 * CHUNK, CHUNK))
        disk.write_zeroes(0, CHUNK)  # every block of a data chunk punched
        self.assertEqual([device.Extent(CHUNK, hole)], disk.block_status(0, CHUNK))
        tail = len(self.image) - 8 * CHUNK  # the short last chunk, its short block too
        disk.write_zeroes(8 * CHUNK, tail)
        self.assertEqual([device.Extent(tail, hole)], disk.block_status(8 * CHUNK, tail))
        self.assertEqual([], self.fetches)

    def test_prefetch_fetches_a_partly_written_chunk_not_a_whole_one(self):
        disk = self.new_disk()
        disk.write(0, b'w' * CHUNK)
        disk.write(CHUNK, b'w' * 4096)
        disk.prefetch(0)
        self.assertEqual([], self.fetches)
        disk.prefetch(1)
        self.assertEqual([self.manifest.chunks[1]], self.fetches)

    def test_a_bad_block_size_is_refused_and_leaves_nothing_locked(self):
        directory = os.path.join(self.tmp, 'mirror')
        for block_size in (3000, 128 * 1024):
            error = self.assertRaises(exception.ConfigError, disk_mod.MirrorDisk, directory,
                                      self.manifest, self.cache, block_size)
            self.assertIn('dirty_block_size', str(error))
        disk_mod.MirrorDisk(directory, self.manifest, self.cache, 512).close()

    def test_a_mirror_keeps_its_block_size(self):
        directory = os.path.join(self.tmp, 'mirror')
        disk = disk_mod.MirrorDisk(directory, self.manifest, self.cache, 512)
        disk.write(CHUNK + 512, b'k' * 512, fua=True)
        disk.close()
        disk = disk_mod.MirrorDisk(directory, self.manifest, self.cache, 4096)
        self.assertEqual(512, disk.dirty.block_size)
        self.assertEqual(frozenset({1}), disk.dirty.blocks(1))
        self.assertEqual(b'k' * 512, disk.read(CHUNK + 512, 512))
        disk.close()

    def test_a_mirror_of_the_chunk_granular_format_still_reads(self):
        """A mirror the chunk-granular code wrote: a VMDIRTY1 map, whole chunks in the
        overlay; it reads back, takes block writes and is written in version 2."""
        directory = os.path.join(self.tmp, 'mirror')
        os.makedirs(directory)
        expected = bytearray(self.image)
        expected[CHUNK:2 * CHUNK] = b'1' * CHUNK
        expected[8 * CHUNK:] = b'8' * (len(self.image) - 8 * CHUNK)
        with open(os.path.join(directory, 'overlay'), 'wb') as f:
            f.write(b'\0' * CHUNK + expected[CHUNK:2 * CHUNK])
            f.seek(8 * CHUNK)
            f.write(expected[8 * CHUNK:])
        with open(os.path.join(directory, 'dirty'), 'wb') as f:
            f.write(test_dirtymap.v1_map(self.manifest.chunk_count, [1, 8]))
        disk = self.new_disk()
        self.assertTrue(disk.dirty.is_whole(1))
        self.assertTrue(disk.dirty.is_whole(8))
        self.assertBytesEqual(bytes(expected), disk.read(0, len(expected)))
        self.assertNotIn(self.manifest.chunks[1], self.fetches)
        with disk.barrier() as barrier:
            self.assertEqual(frozenset({1, 8}), barrier.indexes)
            self.assertEqual(bytes(expected[CHUNK:2 * CHUNK]), barrier.read_chunk(1))
        disk.write(3 * CHUNK, b'3' * 4096, fua=True)
        expected[3 * CHUNK:3 * CHUNK + 4096] = b'3' * 4096
        disk.close()
        with open(os.path.join(directory, 'dirty'), 'rb') as f:
            self.assertEqual(b'VMDIRTY2', f.read(8))
        disk = self.new_disk()
        self.assertTrue(disk.dirty.is_whole(1))
        self.assertBytesEqual(bytes(expected), disk.read(0, len(expected)))
        disk.close()

    def test_barrier_copies_aside_only_the_blocks_it_needs(self):
        disk = self.new_disk()
        disk.write(CHUNK + 4096, b'1' * 8192)  # blocks 1 and 2 of chunk 1
        disk.write(3 * CHUNK, b'3' * CHUNK)  # chunk 3 whole
        at_barrier = disk.read(0, len(self.image))
        with disk.barrier() as barrier:
            self.assertEqual({1, 3}, barrier.indexes)
            self.assertEqual(frozenset({1, 2}), barrier.blocks(1))
            self.assertEqual(2 * 4096 + CHUNK, barrier.dirty_bytes)
            disk.write(CHUNK + 4096 + 10, b'new')  # block 1: copied aside first
            disk.write(CHUNK + 5 * 4096, b'n' * 4096)  # block 5, not dirty then: no copy
            disk.write(CHUNK + 4096 + 20, b'again')  # block 1 again: copied once
            disk.write_zeroes(3 * CHUNK + 4096, 2 * 4096)  # blocks 1 and 2 of chunk 3
            self.assertEqual(3 * 4096, barrier.copied_bytes)
            self.assertBytesEqual(at_barrier[CHUNK:2 * CHUNK], barrier.read_chunk(1))
            self.assertBytesEqual(at_barrier[3 * CHUNK:4 * CHUNK], barrier.read_chunk(3))
            self.assertEqual({1: b'1' * 4096, 2: b'1' * 4096}, barrier.read_blocks(1))
            self.assertEqual(16, len(barrier.read_blocks(3)))
            self.assertRaises(KeyError, barrier.read_chunk, 2)
            self.assertRaises(KeyError, barrier.read_blocks, 2)
            barrier.uploaded(3)
            disk.write(3 * CHUNK, b'z')  # uploaded: no more copies
            self.assertEqual(3 * 4096, barrier.copied_bytes)
        now = bytearray(at_barrier)
        now[CHUNK + 4096 + 10:CHUNK + 4096 + 13] = b'new'
        now[CHUNK + 5 * 4096:CHUNK + 6 * 4096] = b'n' * 4096
        now[CHUNK + 4096 + 20:CHUNK + 4096 + 25] = b'again'
        now[3 * CHUNK + 4096:3 * CHUNK + 3 * 4096] = bytes(2 * 4096)
        now[3 * CHUNK] = ord('z')
        self.assertBytesEqual(bytes(now), disk.read(0, len(now)))
        disk.close()

    def test_concurrent_writers_sharing_blocks(self):
        """Threads writing 512-byte sectors of the same blocks, each its own sectors:
        a block one of them fills from the image must not undo another's write."""
        disk = self.new_disk()
        model = bytearray(self.image)
        threads_count, span = 8, 4 * CHUNK

        def writer(number: int) -> None:
            rng = random.Random(number)
            for _ in range(60):
                sector = rng.randrange(span // 512 // threads_count) * threads_count + number
                data = bytes([number + 1]) * 512
                disk.write(CHUNK + sector * 512, data)
                model[CHUNK + sector * 512:CHUNK + sector * 512 + 512] = data

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(threads_count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertBytesEqual(bytes(model), disk.read(0, len(model)))
        disk.close()
        self.assertBytesEqual(bytes(model), self.new_disk().read(0, len(model)))


class RandomIOTest(base.TestCase):
    """Random reads and writes of 512 B to 1 MiB against a model, across reopens."""

    def test_random_io_matches_a_model_across_reopens(self):
        self.conf.set_override('chunk_size', CHUNK, 'storage')
        store = warehouse.Warehouse(self.conf)
        rng = random.Random(19)
        size = 40 * CHUNK + 5000
        image = bytearray(rng.randbytes(size))
        for index in rng.sample(range(40), 12):
            image[index * CHUNK:(index + 1) * CHUNK] = bytes(CHUNK)
        path = os.path.join(self.tmp, 'image.raw')
        with open(path, 'wb') as f:
            f.write(image)
        manifest = store.import_image(path, 'img').manifest
        cache = cache_mod.ChunkCache(os.path.join(self.tmp, 'cache'), 1 << 30,
                                     store.read_chunk)
        self.addCleanup(cache.close)
        directory = os.path.join(self.tmp, 'mirror')
        model = bytearray(image)
        disk = disk_mod.MirrorDisk(directory, manifest, cache)
        for step in range(400):
            length = rng.choice([512, 4096, 8192, 20 * 512, CHUNK, 1024 ** 2,
                                 rng.randrange(1, 2049) * 512])
            offset = rng.randrange(0, size - length + 1)
            if rng.random() < 0.5:
                offset = offset // 512 * 512
            action = rng.random()
            if action < 0.45:
                data = rng.randbytes(length)
                disk.write(offset, data, fua=rng.random() < 0.2)
                model[offset:offset + length] = data
            elif action < 0.55:
                disk.write_zeroes(offset, length)
                model[offset:offset + length] = bytes(length)
            else:
                self.assertBytesEqual(bytes(model[offset:offset + length]),
                                      disk.read(offset, length))
            if step % 50 == 49:
                if rng.random() < 0.5:
                    disk.close()
                else:
                    disk.flush()
                    abandon(disk)  # a kill -9 after a flush
                disk = disk_mod.MirrorDisk(directory, manifest, cache)
                self.assertBytesEqual(bytes(model), disk.read(0, size))
        self.assertBytesEqual(bytes(model), disk.read(0, size))
        self.assertGreater(len(disk.dirty.indexes()), 20)
        self.assertTrue(any(not disk.dirty.is_whole(i) for i in disk.dirty.indexes()))
        disk.close()


class DeltaChainTest(MirrorTestCase):
    """A mirror of a version whose chunks are chains of deltas (issue 19)."""

    BLOCK = 4096

    def setUp(self):
        super().setUp()
        rng = random.Random(19)
        self.expected = bytearray(self.image)
        version = self.manifest
        # Two generations: chunk 0 (data) and 2 (a hole) become chains of two deltas,
        # the short last chunk one delta on its short last block, chunk 3 stays plain.
        for generation in range(2):
            changes = {}
            for index, block in ((0, 1 + generation), (2, 3 * generation), (8, 5)):
                if index == 8 and generation:
                    continue
                length = delta.block_length(block, version.chunk_length(index), self.BLOCK)
                data = rng.randbytes(length)
                at = index * CHUNK + block * self.BLOCK
                self.expected[at:at + length] = data
                changes[index] = delta.BlockChanges(self.BLOCK, {block: data})
            version = self.warehouse.snapshot_chunks(version.ref, changes).manifest
        self.assertEqual([0, 2, 8], [i for i in range(version.chunk_count)
                                     if version.is_delta(i)])
        self.assertEqual(3, len(version.chunks[0]))  # two deltas and the base
        self.manifest = version

    def test_reads_resolve_the_chains_byte_exact(self):
        disk = self.new_disk()
        self.assertBytesEqual(bytes(self.expected), disk.read(0, len(self.expected)))
        self.assertBytesEqual(self.warehouse.read(self.manifest, 0, self.manifest.size),
                              bytes(self.expected))
        # Every object of every chain came through the cache, each once.
        self.assertEqual(sorted(self.manifest.data_chunk_ids()), sorted(self.fetches))
        # Reads across a chain chunk's blocks, in small requests.
        for offset in range(0, CHUNK, 5000):
            end = min(offset + 5000, CHUNK)
            self.assertBytesEqual(bytes(self.expected[offset:end]),
                                  disk.read(offset, end - offset))
        disk.close()

    def test_prefetch_brings_every_object_of_a_chain(self):
        disk = self.new_disk()
        disk.prefetch(0)
        self.assertEqual(sorted(self.manifest.object_ids(0)), sorted(self.fetches))
        self.assertEqual(3, len(self.fetches))
        disk.read(0, CHUNK)
        self.assertEqual(3, len(self.fetches))  # nothing more: all of it was brought
        disk.close()

    def test_a_partial_write_to_a_chain_chunk_fills_from_the_resolved_chunk(self):
        disk = self.new_disk()
        disk.write(CHUNK * 2 + 100, b'w' * 10)
        self.expected[CHUNK * 2 + 100:CHUNK * 2 + 110] = b'w' * 10
        self.assertBytesEqual(bytes(self.expected[2 * CHUNK:3 * CHUNK]),
                              disk.read(2 * CHUNK, CHUNK))
        disk.close()

    def test_a_chain_whose_delta_does_not_fit_is_a_fetch_failure_naming_it(self):
        newest, _middle, base = self.manifest.chunks[0]
        spliced = dataclasses.replace(self.manifest,
                                      chunks=((newest, base),) + self.manifest.chunks[1:])
        disk = disk_mod.MirrorDisk(os.path.join(self.tmp, 'spliced'), spliced, self.cache)
        error = self.assertRaises(exception.FetchFailed, disk.read, 0, 10)
        self.assertEqual(newest, error.chunk_id)
        self.assertIn('its chain names', str(error))
        # The other chunks read on.
        self.assertBytesEqual(bytes(self.expected[CHUNK:2 * CHUNK]), disk.read(CHUNK, CHUNK))
        disk.close()


class CacheTest(MirrorTestCase):
    def test_a_full_disk_serves_fetched_chunks_without_keeping_them(self):
        disk = self.new_disk()
        full = OSError(errno.ENOSPC, 'No space left on device')
        with fixtures.MockPatch('vmcloud.storage.durable.write_all_at', side_effect=full):
            self.assertBytesEqual(self.image, disk.read(0, len(self.image)))
        self.assertNotIn(self.manifest.chunks[0], self.cache)
        # Once there is room again, chunks are kept, in the slots handed back.
        fetched = len(self.fetches)
        self.assertBytesEqual(self.image, disk.read(0, len(self.image)))
        self.assertIn(self.manifest.chunks[0], self.cache)
        self.assertEqual(len(self.manifest.data_chunk_ids()), len(self.fetches) - fetched)
        # No slot was lost to the failed writes: one slot per distinct chunk in all.
        self.assertEqual(len(self.manifest.data_chunk_ids()),
                         sum(self.cache._next_slot.values()))
        disk.close()

    def test_a_vanished_warehouse_fails_after_bounded_retries_then_recovers(self):
        broken = [True]

        def fetch(chunk_id):
            if broken[0]:
                raise OSError(107, 'warehouse unreachable')
            return self.fetch(chunk_id)

        disk = self.new_disk(self.new_cache(fetch=fetch, name='flaky'))
        error = self.assertRaises(exception.FetchFailed, disk.read, 0, 10)
        self.assertIn('after 3 attempts', str(error))
        broken[0] = False
        self.assertEqual(self.image[:10], disk.read(0, 10))

    def test_survives_a_restart_and_refetches_a_damaged_slot(self):
        disk = self.new_disk()
        disk.read(0, len(self.image))
        disk.close()
        self.cache.close()
        slots = [n for n in os.listdir(os.path.join(self.tmp, 'cache')) if n.startswith('slots')]
        with open(os.path.join(self.tmp, 'cache', slots[0]), 'r+b') as f:
            f.write(b'garbage')  # slot 0: the first chunk fetched
        before = len(self.fetches)
        reopened = self.new_cache()
        self.assertBytesEqual(self.image, self.new_disk(reopened).read(0, len(self.image)))
        self.assertEqual([self.manifest.chunks[0]], self.fetches[before:])

    def test_least_recently_used_chunks_are_evicted(self):
        cache = self.new_cache(capacity=2 * CHUNK, name='small')
        disk = self.new_disk(cache)
        self.assertBytesEqual(self.image, disk.read(0, len(self.image)))
        self.assertNotIn(self.manifest.chunks[0], cache)
        self.assertIn(self.manifest.chunks[8], cache)


class ProfileTest(MirrorTestCase):
    def test_first_touches_by_phase_then_prefetch(self):
        disk = self.new_disk()
        disk.read(4 * CHUNK, 10)
        disk.read(0, 10)
        disk.recorder.set_phase(profile_mod.APPLICATION)
        disk.read(0, 2 * CHUNK)
        disk.write(7 * CHUNK, b'w')
        disk.recorder.set_phase(profile_mod.SHUTDOWN)
        disk.read(8 * CHUNK, 1)
        profile = disk.recorder.profile()
        self.assertEqual({'boot': [4, 0], 'application': [1, 7], 'shutdown': [8]}, profile)
        store = profile_mod.ProfileStore(self.warehouse)
        store.save(self.manifest, profile)
        self.assertEqual(profile, store.load(self.manifest))

        cache = cache_mod.ChunkCache(os.path.join(self.tmp, 'cache2'), 1 << 30, self.fetch)
        self.addCleanup(cache.close)
        other = disk_mod.MirrorDisk(os.path.join(self.tmp, 'other'), self.manifest, cache)
        before = len(self.fetches)
        profile_mod.Prefetcher(profile, other.prefetch, threads=2).start().wait()
        ids = [self.manifest.chunks[i] for i in (4, 0, 1, 7, 8)]
        self.assertEqual(sorted(set(ids)), sorted(self.fetches[before:]))
        other.read(0, len(self.image))
        self.assertEqual(len(self.manifest.data_chunk_ids()), len(self.fetches) - before)

    def test_prefetch_goes_on_after_a_local_error(self):
        fetched = []

        def fetch(index):
            if index == 4:
                raise OSError(errno.EMFILE, 'Too many open files')
            fetched.append(index)

        profile = {'boot': [4, 0], 'application': [1, 7], 'shutdown': [8]}
        profile_mod.Prefetcher(profile, fetch, threads=1).start().wait()
        self.assertEqual([0, 1, 7, 8], fetched)


class ProfileValidationTest(MirrorTestCase):
    PROFILE = {'boot': [4, 0], 'application': [1, 7], 'shutdown': [8]}

    def setUp(self):
        super().setUp()
        self.logs = self.useFixture(fixtures.FakeLogger(name='vmcloud.mirror.profile'))
        self.store = profile_mod.ProfileStore(self.warehouse)

    def saved(self) -> dict:
        self.store.save(self.manifest, self.PROFILE)
        return json.loads(self.warehouse.read_attachment('img', 'boot-profile'))

    def assertIgnored(self, content: bytes, why: str) -> None:
        self.warehouse.write_attachment('img', 'boot-profile', content)
        self.logs.reset_output()
        self.assertIsNone(self.store.load(self.manifest), content[:80])
        self.assertIn('ignoring the boot profile of img', self.logs.output)
        self.assertIn(why, self.logs.output)

    def test_a_good_profile_is_used(self):
        self.saved()
        self.assertEqual(self.PROFILE, self.store.load(self.manifest))
        self.assertEqual('', self.logs.output)

    def test_no_profile_is_no_warning(self):
        self.assertIsNone(self.store.load(self.manifest))
        self.assertEqual('', self.logs.output)

    def test_a_profile_the_warehouse_cannot_read_is_ignored_with_a_warning(self):
        self.saved()

        def broken(image, name):
            raise exception.StorageError(f'attachment {name} of {image}: broken, on purpose')
        self.warehouse.read_attachment = broken
        self.assertIsNone(self.store.load(self.manifest))
        self.assertIn('ignoring the boot profile of img: cannot read it from the warehouse',
                      self.logs.output)
        self.assertIn('broken, on purpose', self.logs.output)

    def test_profiles_of_the_wrong_shape_are_ignored_with_a_warning(self):
        good = self.saved()

        def variant(**changes) -> bytes:
            return json.dumps({**good, **changes}).encode()

        count = self.manifest.chunk_count
        cases = [
            (b'[1, 2, 3]', 'not a format 2 profile'),
            (b'"boot"', 'not a format 2 profile'),
            (json.dumps(self.PROFILE).encode(), 'not a format 2 profile'),  # the old format
            (variant(phases=[0, 1]), "'phases' is missing or not of type dict"),
            (variant(chunk_count='9'), "'chunk_count' is missing or not of type int"),
            (variant(chunk_size=True), "'chunk_size' is missing or not of type int"),
            (variant(phases={'boot': 'abc'}), "phase 'boot' is not a list"),
            (variant(phases={'boot': [1, '2']}), "phase 'boot' is not a list"),
            (variant(phases={'boot': [1, 2.0]}), "phase 'boot' is not a list"),
            (variant(phases={'boot': [True]}), "phase 'boot' is not a list"),
            (variant(phases={'application': [[3]]}), "phase 'application' is not a list"),
            (variant(phases={'boot': [0, count]}), f'chunk {count} is out of range'),
            (variant(phases={'shutdown': [-1]}), 'chunk -1 is out of range'),
            (variant(chunk_size=CHUNK * 2), f'recorded for {count} chunks of {CHUNK * 2}'),
            (b'{"format": 2, "phases": ', 'cannot read it'),
            (b'\xff\xfe not text', 'cannot read it'),
        ]
        for content, why in cases:
            self.assertIgnored(content, why)

    def test_a_profile_of_a_deleted_image_is_ignored(self):
        old = self.saved()
        self.warehouse.delete('img')
        path = os.path.join(self.tmp, 'new.raw')
        with open(path, 'wb') as f:
            f.write(random.Random(99).randbytes(len(self.image)))
        new = self.warehouse.import_image(path, 'img').manifest  # img:1 again, other bytes
        self.assertEqual(self.manifest.ref, new.ref)
        self.manifest = new
        self.logs.reset_output()
        # The warehouse drops an image's attachments with its last version: put the
        # old profile back, as a node that saved it late (or a foreign copy) would.
        self.warehouse.write_attachment('img', 'boot-profile', json.dumps(old).encode())
        self.assertIsNone(self.store.load(new))
        self.assertIn('ignoring the boot profile of img', self.logs.output)
        self.assertIn('deleted image', self.logs.output)

    def test_versions_share_a_profile_while_its_version_exists(self):
        snapshot = self.warehouse.snapshot_chunks(self.manifest.ref, {3: b'S' * CHUNK}).manifest
        self.store.save(snapshot, self.PROFILE)  # recorded on img:2
        self.assertEqual(self.PROFILE, self.store.load(self.manifest))
        self.warehouse.delete('img', snapshot.version)
        self.assertIsNone(self.store.load(self.manifest))
        self.assertIn('recorded for img:2, which is gone', self.logs.output)

    def test_a_bad_profile_does_not_stop_a_deployment(self):
        self.warehouse.write_attachment('img', 'boot-profile', json.dumps(
            {'format': 2, 'phases': {'boot': ['x']}}).encode())
        with manager_mod.MirrorManager(self.conf, self.warehouse,
                                       root=os.path.join(self.tmp, 'node')) as node:
            mirror = node.create('vm1', 'img')
            self.assertIsNone(mirror.prefetcher)
            self.assertTrue(mirror.records_profile)
            self.assertEqual(self.image[:100], mirror.disk.read(0, 100))
            node.set_phase('vm1', 'boot-done')
            mirror.disk.read(8 * CHUNK, 1)
            node.remove('vm1')
        # The first deployment since recorded a good one in its place.
        self.assertEqual({'boot': [0], 'application': [8], 'shutdown': []},
                         self.store.load(self.manifest))


class PhaseTest(MirrorTestCase):
    def test_set_phase_takes_the_guest_markers_and_only_moves_forward(self):
        with manager_mod.MirrorManager(self.conf, self.warehouse,
                                       root=os.path.join(self.tmp, 'node')) as node:
            recorder = node.create('vm1', 'img').disk.recorder
            self.assertEqual(profile_mod.BOOT, recorder.phase)
            node.set_phase('vm1', 'boot-done')
            self.assertEqual(profile_mod.APPLICATION, recorder.phase)
            node.set_phase('vm1', 'app-running')
            self.assertEqual(profile_mod.APPLICATION, recorder.phase)
            node.set_phase('vm1', 'shutdown-started')
            self.assertEqual(profile_mod.SHUTDOWN, recorder.phase)
            node.set_phase('vm1', 'boot-done')  # late: changes nothing
            self.assertEqual(profile_mod.SHUTDOWN, recorder.phase)
            error = self.assertRaises(exception.MirrorError, node.set_phase, 'vm1', 'booted')
            self.assertIn("unknown guest phase 'booted'", str(error))
            self.assertRaises(exception.MirrorNotFound, node.set_phase, 'vm9', 'boot-done')

    def test_the_mirror_does_not_import_the_drivers(self):
        package = os.path.dirname(manager_mod.__file__)
        for name in sorted(os.listdir(package)):
            if name.endswith('.py'):
                with open(os.path.join(package, name)) as f:
                    self.assertNotIn('vmcloud.drivers', f.read(), name)

    def test_the_markers_are_the_ones_the_drivers_report(self):
        # Written twice so that the mirror need not import the drivers: kept equal here.
        from vmcloud.drivers import base as driver_base
        self.assertEqual(set(driver_base.PHASES), set(profile_mod.MARKERS))
        for marker in driver_base.PHASES:
            self.assertEqual(marker, getattr(profile_mod, marker.upper().replace('-', '_')))

    def test_the_nbd_buffers_come_from_the_configuration(self):
        self.conf.set_override('nbd_connection_buffer', 3 * 1024 ** 2, 'mirror')
        self.conf.set_override('nbd_buffer', 5 * 1024 ** 2, 'mirror')
        with manager_mod.MirrorManager(self.conf, self.warehouse,
                                       root=os.path.join(self.tmp, 'node')) as node:
            self.assertEqual(3 * 1024 ** 2, node.server.max_connection_bytes)
            self.assertEqual(5 * 1024 ** 2, node.server.max_buffered_bytes)
