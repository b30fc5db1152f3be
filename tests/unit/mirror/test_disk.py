"""The mirror's disk, cache, dirty map and profiles, without NBD."""
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
from vmcloud.storage import warehouse
from tests import base

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
        count = self.manifest.chunk_count
        self.assertEqual(set(), dirtymap.DirtyMap(path, count).indexes())
        disk.flush()
        self.assertEqual({0}, dirtymap.DirtyMap(path, count).indexes())
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
            self.assertEqual(CHUNK, barrier.copied_bytes)
            self.assertRaises(KeyError, barrier.read_chunk, 2)
            self.assertRaises(exception.MirrorError, disk.barrier)
        self.assertEqual(b'1' * 10 + b'new', disk.read(0, 13))
        disk.barrier().close()  # a new barrier once the last one closed


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
