"""Boot artifacts: pinned by the dispatcher, exported once per node, never used torn."""
import os
import signal
import subprocess
import sys
import threading
import time

import fixtures

from vmcloud import exception
from vmcloud.compute import artifacts
from vmcloud.nbd import statelock
from vmcloud.storage import delta
from vmcloud.storage import reader
from vmcloud.storage import warehouse as warehouse_mod
from tests import base

CHUNK = 4096
# Neither a multiple of 512 nor of the chunk size: a kernel's size is whatever it is.
SIZE = 3 * CHUNK + 1001

CRASHING_FETCH = """
import os, signal, sys
from oslo_config import cfg
import vmcloud.conf
from vmcloud.compute import artifacts
from vmcloud.storage import reader, warehouse
cfg.CONF(['--config-file', sys.argv[1]], project='vmcloud')
store = warehouse.Warehouse(cfg.CONF)
reader.BATCH_BYTES = 1  # a chunk a read: part of the file is written by the third
read_objects, reads = store.read_objects, []
def dying(object_ids):
    reads.append(object_ids)
    if len(reads) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return read_objects(object_ids)
store.read_objects = dying
artifacts.BootArtifacts(sys.argv[2], store, 30).path_of('vmlinuz:1')
"""


def write_artifact(directory: str, leaf: str, seed: int, size: int = SIZE) -> str:
    path = os.path.join(directory, leaf)
    with open(path, 'wb') as f:
        f.write(bytes((seed + i * 7) % 251 + 1 for i in range(size)))
    return path


def read(path: str) -> bytes:
    with open(path, 'rb') as f:
        return f.read()


class ArtifactTestCase(base.TestCase):
    def setUp(self):
        super().setUp()
        self.conf.set_override('chunk_size', CHUNK, 'storage')
        self.warehouse = warehouse_mod.Warehouse(self.conf)
        self.source = write_artifact(self.tmp, 'vmlinuz', seed=1)
        self.warehouse.import_image(self.source, 'vmlinuz', fmt='raw')
        self.cache_dir = os.path.join(self.tmp, 'artifacts')
        self.cache = artifacts.BootArtifacts(self.cache_dir, self.warehouse, lock_timeout=30)

    def count_exports(self) -> list[str]:
        exported = []
        export = self.warehouse.export

        def counting(manifest, dest, *args, **kwargs):
            exported.append(str(manifest.ref))
            return export(manifest, dest, *args, **kwargs)
        self.warehouse.export = counting
        return exported


class BootArtifactsTest(ArtifactTestCase):
    def test_a_pinned_image_is_exported_byte_identical_and_then_reused(self):
        exported = self.count_exports()
        path = self.cache.path_of('vmlinuz:1')
        self.assertTrue(path.startswith(self.cache_dir + os.sep))
        self.assertBytesEqual(read(self.source), read(path))
        self.assertEqual(path, self.cache.path_of('vmlinuz:1'))
        self.assertEqual(['vmlinuz:1'], exported)

    def test_concurrent_builds_fetch_it_once(self):
        builds = 6
        exported = self.count_exports()
        # The first fetch goes on only once every other build has found the artifact
        # missing and is waiting for the lock: they all overlap with it.
        waiting = threading.Semaphore(0)
        take = statelock.StateLock

        class CountingLock(take):
            def __init__(self, what, path):
                try:
                    super().__init__(what, path)
                except exception.StateLocked:
                    waiting.release()
                    raise
        self.patch(statelock, 'StateLock', CountingLock)
        export = self.warehouse.export

        def slow_export(manifest, dest):
            deadline = time.monotonic() + 10
            for _ in range(builds - 1):
                waiting.acquire(timeout=max(0, deadline - time.monotonic()))
            return export(manifest, dest)
        self.warehouse.export = slow_export
        paths, errors = [], []

        def build():
            try:
                paths.append(self.cache.path_of('vmlinuz:1'))
            except Exception as exc:
                errors.append(exc)
        threads = [threading.Thread(target=build) for _ in range(builds)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        self.assertEqual([], errors)
        self.assertEqual(builds, len(paths))
        self.assertEqual(1, len(set(paths)))
        self.assertEqual(['vmlinuz:1'], exported)
        self.assertBytesEqual(read(self.source), read(paths[0]))

    def test_a_torn_file_is_fetched_again(self):
        path = self.cache.path_of('vmlinuz:1')
        with open(path, 'r+b') as f:
            f.truncate(SIZE - 100)
        exported = self.count_exports()
        self.assertEqual(path, self.cache.path_of('vmlinuz:1'))
        self.assertBytesEqual(read(self.source), read(path))
        self.assertEqual(['vmlinuz:1'], exported)

    def test_what_a_crash_left_half_written_is_never_used_and_is_removed(self):
        config = self.write_config(storage={'chunk_size': CHUNK})
        # A fetch killed after it wrote part of the file, with no chance to clean up.
        child = subprocess.run([sys.executable, '-c', CRASHING_FETCH, config, self.cache_dir],
                               capture_output=True, timeout=120)
        self.assertEqual(-signal.SIGKILL, child.returncode, child.stderr)
        left = [leaf for leaf in os.listdir(self.cache_dir) if not leaf.endswith('.lock')]
        self.assertEqual(1, len(left), left)
        self.assertTrue(left[0].endswith('.partial'), left)
        self.assertNotEqual([], os.listdir(os.path.join(self.cache_dir, left[0])))
        path = self.cache.path_of('vmlinuz:1')
        self.assertBytesEqual(read(self.source), read(path))
        self.assertEqual([os.path.basename(path)], [
            leaf for leaf in os.listdir(self.cache_dir) if not leaf.endswith('.lock')])

    def test_a_failed_fetch_leaves_nothing_and_names_the_artifact(self):
        read_objects = self.warehouse.read_objects
        reads = []

        def failing(object_ids):
            reads.append(object_ids)
            if len(reads) == 2:  # part of the file is written by then
                raise exception.ChunkNotFound(object_ids[0])
            return read_objects(object_ids)
        self.warehouse.read_objects = failing
        self.useFixture(fixtures.MockPatchObject(reader, 'BATCH_BYTES', 1))
        error = self.assertRaises(exception.BootArtifactError, self.cache.path_of, 'vmlinuz:1')
        self.assertIn('vmlinuz:1', str(error))
        self.assertIsInstance(error.__cause__, exception.ChunkNotFound)
        self.assertEqual([], [leaf for leaf in os.listdir(self.cache_dir)
                              if not leaf.endswith('.lock')])
        self.warehouse.read_objects = read_objects
        self.assertBytesEqual(read(self.source), read(self.cache.path_of('vmlinuz:1')))

    def test_an_unknown_image_or_version_is_named(self):
        for ref in ('nosuch:1', 'vmlinuz:2'):
            error = self.assertRaises(exception.BootArtifactError, self.cache.path_of, ref)
            self.assertIn(f'boot artifact {ref}', str(error))
            self.assertIsInstance(error.__cause__, exception.ImageNotFound)
        self.assertFalse(os.path.exists(self.cache_dir))

    def test_an_unpinned_or_invalid_name_is_refused(self):
        error = self.assertRaises(exception.BootArtifactError, self.cache.path_of, 'vmlinuz')
        self.assertIn('names no version', str(error))
        self.assertRaises(exception.BootArtifactError, self.cache.path_of, './vmlinuz')

    def test_an_absolute_path_is_a_file_of_the_node(self):
        exported = self.count_exports()
        self.assertEqual(self.source, self.cache.path_of(self.source))
        self.assertEqual([], exported)

    def test_a_version_deleted_and_imported_again_is_not_confused_with_the_old(self):
        old = self.cache.path_of('vmlinuz:1')
        self.warehouse.delete('vmlinuz')
        other = write_artifact(self.tmp, 'other', seed=2)
        self.warehouse.import_image(other, 'vmlinuz', fmt='raw')
        new = self.cache.path_of('vmlinuz:1')
        self.assertNotEqual(old, new)
        self.assertBytesEqual(read(other), read(new))

    def test_another_holder_that_keeps_the_lock_too_long_is_named(self):
        self.cache.lock_timeout = 0
        manifest = self.warehouse.lookup('vmlinuz:1')
        os.makedirs(self.cache_dir)
        leaf = f'vmlinuz@1-{manifest.identity()}'
        with statelock.StateLock('test', os.path.join(self.cache_dir, f'.{leaf}.lock')):
            error = self.assertRaises(exception.BootArtifactError, self.cache.path_of,
                                      'vmlinuz:1')
        self.assertIn('another build on this node', str(error))
        self.assertIn(f'pid {os.getpid()}', str(error))


class PinnedTest(ArtifactTestCase):
    def test_images_are_pinned_and_paths_kept(self):
        boot = {'kernel': 'vmlinuz', 'initrd': '/boot/initrd.img', 'cmdline': 'quiet'}
        self.assertEqual({'kernel': 'vmlinuz:1', 'initrd': '/boot/initrd.img',
                          'cmdline': 'quiet'}, artifacts.pinned(boot, self.warehouse.lookup))
        self.assertEqual({}, artifacts.pinned({}, self.warehouse.lookup))

    def test_a_later_version_does_not_move_a_pin(self):
        pinned = artifacts.pinned({'kernel': 'vmlinuz'}, self.warehouse.lookup)
        parent = self.warehouse.lookup('vmlinuz').ref
        self.warehouse.snapshot_chunks(parent, {0: b'\x01' * CHUNK})
        self.assertEqual({'kernel': 'vmlinuz:2'},
                         artifacts.pinned({'kernel': 'vmlinuz'}, self.warehouse.lookup))
        self.assertEqual(pinned, artifacts.pinned(pinned, self.warehouse.lookup))

    def test_unknown_and_invalid_artifacts_are_refused(self):
        self.assertRaises(exception.ImageNotFound, artifacts.pinned,
                          {'kernel': 'nosuch'}, self.warehouse.lookup)
        self.assertRaises(exception.ImageNotFound, artifacts.pinned,
                          {'initrd': 'vmlinuz:7'}, self.warehouse.lookup)
        for bad in ('boot/vmlinuz', '', 42):
            error = self.assertRaises(exception.InvalidRequest, artifacts.pinned,
                                      {'kernel': bad}, self.warehouse.lookup)
            self.assertIn('boot kernel', str(error))


def write_with_repeats_and_a_hole(directory: str) -> str:
    """An artifact whose chunks 0 and 2 are equal and whose chunk 1 is all zeros."""
    path = os.path.join(directory, 'repeating')
    first = write_artifact(directory, 'first-chunk', seed=5, size=CHUNK)
    with open(path, 'wb') as f:
        f.write(read(first) + bytes(CHUNK) + read(first) + b'tail' * 100)
    return path


class ChunkByChunkTest(ArtifactTestCase):
    """An artifact fetched through a reader of chunks (the peer exchange's fetch)."""

    def reader(self) -> list[str]:
        reads = []

        def read_chunk(chunk_id):
            reads.append(chunk_id)
            return self.warehouse.read_chunk(chunk_id)
        self.cache.read_chunks_with(read_chunk)
        return reads

    def test_every_chunk_comes_from_the_reader_not_an_export(self):
        exported = self.count_exports()
        reads = self.reader()
        path = self.cache.path_of('vmlinuz:1')
        self.assertBytesEqual(read(self.source), read(path))
        self.assertEqual([], exported)
        manifest = self.warehouse.lookup('vmlinuz:1')
        self.assertEqual([c for c in manifest.chunks if c is not None], reads)
        self.assertEqual(path, self.cache.path_of('vmlinuz:1'))  # kept, not read again
        self.assertEqual(len([c for c in manifest.chunks if c is not None]), len(reads))

    def test_a_repeated_chunk_is_read_once_and_a_hole_not_at_all(self):
        source = write_with_repeats_and_a_hole(self.tmp)
        manifest = self.warehouse.import_image(source, 'repeating', fmt='raw').manifest
        self.assertIsNone(manifest.chunks[1])
        self.assertEqual(manifest.chunks[0], manifest.chunks[2])
        reads = self.reader()
        path = self.cache.path_of('repeating:1')
        self.assertBytesEqual(read(source), read(path))
        self.assertEqual([manifest.chunks[0], manifest.chunks[3]], reads)

    def test_a_snapshot_of_deltas_is_resolved_from_the_reader(self):
        expected = bytearray(read(self.source))
        parent = self.warehouse.lookup('vmlinuz:1').ref
        for generation, (index, block) in enumerate(((0, 1), (0, 3), (2, 0)), start=1):
            data = bytes([generation]) * 512
            change = delta.BlockChanges(512, {block: data})
            parent = self.warehouse.snapshot_chunks(parent, {index: change}).manifest.ref
            start = index * CHUNK + block * 512
            expected[start:start + 512] = data
        manifest = self.warehouse.lookup(str(parent))
        self.assertTrue(manifest.is_delta(0) and manifest.is_delta(2))
        reads = self.reader()
        self.assertBytesEqual(bytes(expected), read(self.cache.path_of(str(parent))))
        self.assertEqual(sorted(manifest.data_chunk_ids()), sorted(set(reads)))

    def test_a_reader_that_fails_fails_the_fetch_naming_the_artifact(self):
        for failure in (exception.ChunkNotFound('ab' * 32), OSError(5, 'the peer went')):
            def failing(chunk_id, failure=failure):
                raise failure
            self.cache.read_chunks_with(failing)
            error = self.assertRaises(exception.BootArtifactError, self.cache.path_of,
                                      'vmlinuz:1')
            self.assertIn('boot artifact vmlinuz:1: cannot fetch it', str(error))
            self.assertIn(str(failure), str(error))
            self.assertEqual([], [leaf for leaf in os.listdir(self.cache_dir)
                                  if not leaf.endswith('.lock')])

    def test_a_chunk_shorter_than_its_place_is_refused(self):
        self.cache.read_chunks_with(lambda chunk_id: self.warehouse.read_chunk(chunk_id)[:10])
        error = self.assertRaises(exception.BootArtifactError, self.cache.path_of, 'vmlinuz:1')
        self.assertIn(f'holds 10 bytes, not the {CHUNK} of its place at offset 0', str(error))

    def test_none_goes_back_to_the_export(self):
        self.reader()
        self.cache.read_chunks_with(None)
        exported = self.count_exports()
        self.assertBytesEqual(read(self.source), read(self.cache.path_of('vmlinuz:1')))
        self.assertEqual(['vmlinuz:1'], exported)
