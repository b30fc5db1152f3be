import contextlib
import dataclasses
import errno
import os
import random
import stat
import subprocess
import threading
from unittest import mock

from vmcloud import exception
from vmcloud.storage import backend as backend_mod
from vmcloud.storage import manifest as manifest_mod
from vmcloud.storage import qemu_img
from vmcloud.storage import warehouse
from vmcloud.storage.backends import file as file_backend
from vmcloud.storage.manifest import Manifest
from vmcloud.storage.manifest import VersionRef
from tests import base
from tests import damage

CHUNK = 64 * 1024


class WarehouseTestCase(base.TestCase):
    def setUp(self):
        super().setUp()
        self.conf.set_override('chunk_size', CHUNK, 'storage')
        self.warehouse = warehouse.Warehouse(self.conf)
        self.backend = self.warehouse.backend
        self.rng = random.Random(42)

    def make_raw(self, name: str, layout: str) -> str:
        """A raw file, one character per chunk: 'r' random, 'z' written zeros, 'h' hole,
        'A'/'B' fixed repeated content, 's' a short random tail of CHUNK // 3 bytes."""
        path = os.path.join(self.tmp, name)
        with open(path, 'wb') as f:
            for kind in layout:
                if kind == 'r':
                    f.write(self.rng.randbytes(CHUNK))
                elif kind == 'z':
                    f.write(bytes(CHUNK))
                elif kind == 'h':
                    f.seek(CHUNK, os.SEEK_CUR)
                elif kind in 'AB':
                    f.write(kind.encode() * CHUNK)
                elif kind == 's':
                    f.write(self.rng.randbytes(CHUNK // 3))
            f.truncate()
        return path

    def stored_chunk_files(self) -> set[str]:
        return {chunk_id for chunk_id, _ in self.backend.iter_chunks()}

    def pack_bytes(self) -> int:
        packs = self.backend.packs_dir
        return sum(os.path.getsize(os.path.join(packs, name))
                   for name in os.listdir(packs) if name.endswith('.pack'))

    def read_all(self, manifest) -> bytes:
        return self.warehouse.read(manifest, 0, manifest.size)


class ImportTest(WarehouseTestCase):
    def test_raw_import_reads_back_identically(self):
        path = self.make_raw('a.raw', 'rrzhArBs')
        result = self.warehouse.import_image(path, 'a')
        with open(path, 'rb') as f:
            self.assertBytesEqual(f.read(), self.read_all(result.manifest))
        self.assertEqual(VersionRef('a', 1), result.manifest.ref)
        self.assertIsNone(result.manifest.parent)

    def test_a_batched_writer_keeps_each_chunk_it_holds_for_the_question(self):
        # A remote store's session asks about many chunks at once; the chunker reuses
        # its buffer meanwhile, so the chunks waiting for the answer must be copies.
        self.patch(file_backend.PackWriteSession, 'MISSING_BATCH', 64)
        path = self.make_raw('a.raw', 'r' * 40 + 'As')  # more than the chunker's ring
        result = self.warehouse.import_image(path, 'a')
        with open(path, 'rb') as f:
            self.assertBytesEqual(f.read(), self.read_all(result.manifest))
        self.assertTrue(self.warehouse.verify().ok)

    def test_holes_and_duplicates_are_not_stored_twice(self):
        path = self.make_raw('a.raw', 'rzhAAAAr')
        result = self.warehouse.import_image(path, 'a')
        chunks = result.manifest.chunks
        self.assertEqual([None, None], [chunks[1], chunks[2]])
        self.assertEqual(1, len({chunks[3], chunks[4], chunks[5], chunks[6]}))
        self.assertEqual(3, len(self.stored_chunk_files()))
        self.assertEqual(3 * CHUNK, result.new_bytes)

    def test_second_import_of_same_content_stores_nothing(self):
        path = self.make_raw('a.raw', 'rrr')
        self.warehouse.import_image(path, 'a')
        self.assertEqual(0, self.warehouse.import_image(path, 'b').new_bytes)

    def test_qcow2_import_matches_raw(self):
        # Not 's': qcow2 sizes are whole 512-byte sectors.
        raw = self.make_raw('a.raw', 'rzhArr')
        qcow2 = os.path.join(self.tmp, 'a.qcow2')
        subprocess.run(['qemu-img', 'convert', '-f', 'raw', '-O', 'qcow2', raw, qcow2],
                       check=True)
        result = self.warehouse.import_image(qcow2, 'q', 'qcow2')
        with open(raw, 'rb') as f:
            self.assertBytesEqual(f.read(), self.read_all(result.manifest))
        self.assertEqual('qcow2', result.manifest.source['format'])
        self.assertEqual([], os.listdir(self.backend.staging_dir))

    def test_existing_name_is_refused_and_unchanged(self):
        self.warehouse.import_image(self.make_raw('a.raw', 'r'), 'a')
        before = self.stored_chunk_files()
        self.assertRaises(exception.ImageExists, self.warehouse.import_image,
                          self.make_raw('b.raw', 'rr'), 'a')
        self.assertEqual(before, self.stored_chunk_files())
        self.assertEqual([1], self.backend.list_versions('a'))

    def test_empty_file_is_refused(self):
        path = self.make_raw('empty.raw', '')
        for fmt in (None, 'raw'):
            error = self.assertRaises(exception.UnsafeImage, self.warehouse.import_image,
                                      path, 'empty', fmt)
            self.assertIn('it is empty (0 bytes)', str(error))
        self.assertEqual([], self.warehouse.images())

    def test_zero_size_qcow2_is_refused(self):
        path = os.path.join(self.tmp, 'empty.qcow2')
        subprocess.run(['qemu-img', 'create', '-f', 'qcow2', path, '0'], check=True,
                       capture_output=True)
        error = self.assertRaises(exception.UnsafeImage, self.warehouse.import_image,
                                  path, 'empty')
        self.assertIn('virtual size is 0 bytes', str(error))

    def test_disk_full_while_storing_the_manifest_leaves_nothing(self):
        self.warehouse.import_image(self.make_raw('a.raw', 'r'), 'a')
        full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        with mock.patch('vmcloud.storage.durable.atomic_create', side_effect=full):
            error = self.assertRaises(exception.StorageError, self.warehouse.import_image,
                                      self.make_raw('b.raw', 'rr'), 'b')
        self.assertIn('No space left on device', str(error))
        self.assertIs(full, error.__cause__)
        self.assertEqual(['a'], sorted(os.listdir(self.backend.images_dir)))
        self.assertEqual(['a'], self.warehouse.images())
        self.assertEqual([], os.listdir(self.backend.staging_dir))
        self.assertRaises(exception.ImageNotFound, self.warehouse.manifest, 'b')
        self.assertEqual(2, self.warehouse.gc().removed_chunks)  # b's, never referenced

    def test_invalid_names_are_refused_before_anything_is_read(self):
        path = self.make_raw('a.raw', 'r')
        for name in ('a\n', 'a/b', '\u00b2'):
            self.assertRaises(exception.InvalidName, self.warehouse.import_image, path, name)
        for spec in ('a:\u00b2', 'a\n:1', 'a:1\n'):
            self.assertRaises(exception.InvalidName, self.warehouse.lookup, spec)
        self.assertEqual([], os.listdir(self.backend.images_dir))

    def test_chunk_size_is_configurable(self):
        self.conf.set_override('chunk_size', CHUNK * 2, 'storage')
        result = self.warehouse.import_image(self.make_raw('a.raw', 'rrrr'), 'a')
        self.assertEqual(CHUNK * 2, result.manifest.chunk_size)
        self.assertEqual(2, result.manifest.chunk_count)

    def test_concurrent_imports_of_shared_content(self):
        paths = [self.make_raw(f'{i}.raw', 'AB' + 'r') for i in range(4)]
        errors = []

        def run(i):
            try:
                self.warehouse.import_image(paths[i], f'img{i}')
            except Exception as exc:  # noqa: B902 - reported below
                errors.append(exc)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual([], errors)
        self.assertTrue(self.warehouse.verify().ok)
        self.assertEqual(2 + 4, len(self.stored_chunk_files()))


class SnapshotTest(WarehouseTestCase):
    def setUp(self):
        super().setUp()
        self.path = self.make_raw('base.raw', 'rrrrhs')
        self.base = self.warehouse.import_image(self.path, 'img').manifest

    def test_snapshot_shares_unchanged_chunks(self):
        new = self.rng.randbytes(CHUNK)
        result = self.warehouse.snapshot_chunks(self.base.ref, {1: new})
        snap = result.manifest
        self.assertEqual(VersionRef('img', 2), snap.ref)
        self.assertEqual(self.base.ref, snap.parent)
        self.assertEqual(CHUNK, result.new_bytes)
        self.assertEqual([c for i, c in enumerate(self.base.chunks) if i != 1],
                         [c for i, c in enumerate(snap.chunks) if i != 1])
        with open(self.path, 'rb') as f:
            expected = bytearray(f.read())
        expected[CHUNK:2 * CHUNK] = new
        self.assertBytesEqual(bytes(expected), self.read_all(snap))

    def test_zeroed_chunk_becomes_a_hole(self):
        snap = self.warehouse.snapshot_chunks(self.base.ref, {0: bytes(CHUNK)}).manifest
        self.assertIsNone(snap.chunks[0])
        self.assertEqual(bytes(CHUNK), self.warehouse.read(snap, 0, CHUNK))

    def test_snapshot_of_snapshot_and_into_other_image(self):
        snap = self.warehouse.snapshot_chunks(self.base.ref, {0: b'x' * CHUNK}).manifest
        other = self.warehouse.snapshot_chunks(snap.ref, {5: b'y' * (CHUNK // 3)},
                                               image='copy').manifest
        self.assertEqual(VersionRef('copy', 1), other.ref)
        self.assertEqual(snap.ref, other.parent)
        self.assertEqual(b'x' * CHUNK, self.warehouse.read(other, 0, CHUNK))

    def test_changes_must_fit(self):
        stored = self.stored_chunk_files()
        for changes in ({9: b'x' * CHUNK}, {0: b'short'}, {5: b'x' * CHUNK},
                        {1: b'y' * CHUNK, 2: b'short'}):
            self.assertRaises(exception.InvalidRange, self.warehouse.snapshot_chunks,
                              self.base.ref, changes)
        self.assertEqual([1], self.backend.list_versions('img'))
        self.assertEqual(stored, self.stored_chunk_files())  # not even the chunk that fit

    def test_snapshot_from_modified_file_stores_only_changes(self):
        modified = os.path.join(self.tmp, 'modified.raw')
        with open(self.path, 'rb') as src, open(modified, 'wb') as dst:
            dst.write(src.read())
        with open(modified, 'r+b') as f:
            f.seek(2 * CHUNK + 100)
            f.write(b'changed')
        result = self.warehouse.snapshot_file(self.base.ref, modified)
        self.assertEqual(CHUNK, result.new_bytes)
        with open(modified, 'rb') as f:
            self.assertBytesEqual(f.read(), self.read_all(result.manifest))

    def test_snapshot_of_deleted_parent_is_refused(self):
        self.warehouse.delete('img')
        self.assertRaises(exception.ImageNotFound, self.warehouse.snapshot_chunks,
                          self.base.ref, {0: b'x' * CHUNK})

    def other_host(self) -> warehouse.Warehouse:
        """A warehouse on the same store whose image locks do not reach this one's, as on
        another host over a store without CROSS_HOST_LOCKING."""
        other = warehouse.Warehouse(self.conf)
        self.patch(other.backend, 'image_lock', lambda image: contextlib.nullcontext())
        return other

    def race_on_versions(self, writers_first: int) -> None:
        """Writers on another host each create the next version of img right after this
        warehouse listed the versions."""
        other = self.other_host()
        list_versions = self.backend.list_versions
        racing = iter(range(writers_first))

        def listed_then_raced(image):
            versions = list_versions(image)
            if next(racing, None) is not None:
                other.snapshot_chunks(self.base.ref, {0: b'o' * CHUNK})
            return versions
        self.patch(self.backend, 'list_versions', listed_then_raced)

    def test_a_version_taken_on_another_host_goes_to_the_next_number(self):
        self.race_on_versions(writers_first=3)
        mine = self.warehouse.snapshot_chunks(self.base.ref, {0: b'm' * CHUNK}).manifest
        self.assertEqual(5, mine.version)
        self.assertEqual([1, 2, 3, 4, 5], self.backend.list_versions('img'))
        self.assertEqual(b'm' * CHUNK, self.warehouse.read(self.warehouse.manifest('img', 5),
                                                           0, CHUNK))
        for version in (2, 3, 4):
            self.assertEqual(b'o' * CHUNK, self.warehouse.read(
                self.warehouse.manifest('img', version), 0, CHUNK))

    def test_an_image_created_on_another_host_first_is_refused(self):
        other = self.other_host()
        path = self.make_raw('new.raw', 'rr')
        list_versions = self.backend.list_versions
        calls = []

        def listed_then_raced(image):
            # The second look is the one under the image lock, just before the create.
            versions = list_versions(image)
            calls.append(image)
            if calls.count('new') == 2:
                other.import_image(path, 'new')
            return versions
        self.patch(self.backend, 'list_versions', listed_then_raced)
        self.assertRaises(exception.ImageExists, self.warehouse.import_image, path, 'new')
        self.assertEqual([1], list_versions('new'))


class SnapshotManyTest(WarehouseTestCase):
    def setUp(self):
        super().setUp()
        self.path = self.make_raw('base.raw', 'rrrrhs')
        self.base = self.warehouse.import_image(self.path, 'img').manifest
        self.other = self.warehouse.import_image(self.make_raw('o.raw', 'rr'), 'other').manifest

    def test_items_share_one_session_and_each_shared_chunk_once(self):
        shared, own = b'S' * CHUNK, [self.rng.randbytes(CHUNK) for _ in range(3)]
        stored = self.stored_chunk_files()
        sessions = []
        begin_write = self.backend.begin_write
        self.patch(self.backend, 'begin_write', lambda: sessions.append(1) or begin_write())
        results = self.warehouse.snapshot_many([
            (self.base.ref, {1: shared, 2: own[0]}),
            (self.base.ref, {1: shared, 3: own[1]}),
            (self.other.ref, {0: shared, 1: own[2]}),
        ])
        self.assertEqual(1, len(sessions))
        self.assertEqual([VersionRef('img', 2), VersionRef('img', 3), VersionRef('other', 2)],
                         [r.manifest.ref for r in results])
        self.assertEqual([2 * CHUNK, CHUNK, CHUNK], [r.new_bytes for r in results])
        self.assertEqual(4, len(self.stored_chunk_files() - stored))
        self.assertEqual({'changed_chunks': 2}, results[0].manifest.source)
        for result in results:
            ref = result.manifest.ref
            self.assertEqual(result.manifest, self.warehouse.manifest(ref.image, ref.version))
        self.assertEqual(self.base.ref, results[1].manifest.parent)
        self.assertEqual(shared, self.warehouse.read(results[1].manifest, CHUNK, CHUNK))
        self.assertEqual(own[1], self.warehouse.read(results[1].manifest, 3 * CHUNK, CHUNK))
        self.assertEqual(shared + own[2], self.read_all(results[2].manifest))
        self.assertTrue(self.warehouse.verify().ok)

    def test_a_failed_item_is_its_own_result_only(self):
        good = self.rng.randbytes(CHUNK)
        results = self.warehouse.snapshot_many([
            (self.base.ref, {9: b'x' * CHUNK}),             # outside the image
            (self.base.ref, {0: good}),
            (self.base.ref, {1: b'y' * CHUNK, 2: b'short'}),  # a wrong length part-way
            (VersionRef('none', 1), {0: good}),             # no such parent
            (VersionRef('img', 7), {0: good}),
            (self.other.ref, {1: good}),
        ])
        self.assertIsInstance(results[0], exception.InvalidRange)
        self.assertIn('chunk 9', str(results[0]))
        self.assertIsInstance(results[2], exception.InvalidRange)
        self.assertIn('chunk 2 (5 bytes)', str(results[2]))
        self.assertIsInstance(results[3], exception.ImageNotFound)
        self.assertIsInstance(results[4], exception.ImageNotFound)
        self.assertEqual(VersionRef('img', 2), results[1].manifest.ref)
        self.assertEqual(VersionRef('other', 2), results[5].manifest.ref)
        self.assertEqual(CHUNK, results[1].new_bytes)
        self.assertEqual(0, results[5].new_bytes)  # the chunk counts for the first item
        self.assertEqual([1, 2], self.backend.list_versions('img'))
        self.assertEqual(good, self.warehouse.read(results[5].manifest, CHUNK, CHUNK))

    def test_a_parent_deleted_during_the_upload_fails_that_item(self):
        commit = file_backend.PackWriteSession.commit

        def commit_then_delete(session):
            commit(session)
            self.warehouse.delete('other')  # before the manifests are written
        self.patch(file_backend.PackWriteSession, 'commit', commit_then_delete)
        results = self.warehouse.snapshot_many([(self.other.ref, {0: b'a' * CHUNK}),
                                                (self.base.ref, {0: b'a' * CHUNK})])
        self.assertIsInstance(results[0], exception.ImageNotFound)
        self.assertEqual(VersionRef('img', 2), results[1].manifest.ref)
        self.assertEqual([], self.backend.list_versions('other'))

    def test_a_failed_session_fails_every_item_and_writes_no_manifest(self):
        stored = self.stored_chunk_files()
        self.patch(file_backend.PackWriteSession, 'commit', mock.Mock(
            side_effect=exception.StorageError('disk on fire')))
        error = self.assertRaises(exception.StorageError, self.warehouse.snapshot_many,
                                  [(self.base.ref, {0: b'a' * CHUNK}),
                                   (self.other.ref, {0: b'b' * CHUNK})])
        self.assertIn('disk on fire', str(error))
        self.assertEqual([1], self.backend.list_versions('img'))
        self.assertEqual([1], self.backend.list_versions('other'))
        self.assertEqual(stored, self.stored_chunk_files())
        self.assertEqual([], os.listdir(self.backend.staging_dir))

    def test_a_failed_put_fails_every_item(self):
        self.patch(file_backend.PackWriteSession, 'put_chunk', mock.Mock(
            side_effect=exception.StorageError('no space')))
        self.assertRaises(exception.StorageError, self.warehouse.snapshot_many,
                          [(self.base.ref, {0: b'a' * CHUNK})])
        self.assertEqual([1], self.backend.list_versions('img'))

    def test_versions_taken_on_another_host_go_to_the_next_numbers(self):
        other = warehouse.Warehouse(self.conf)
        self.patch(other.backend, 'image_lock', lambda image: contextlib.nullcontext())
        list_versions = self.backend.list_versions
        racing = iter(range(2))

        def listed_then_raced(image):
            versions = list_versions(image)
            if image == 'img' and next(racing, None) is not None:
                other.snapshot_chunks(self.base.ref, {0: b'o' * CHUNK})
            return versions
        self.patch(self.backend, 'list_versions', listed_then_raced)
        results = self.warehouse.snapshot_many([(self.base.ref, {0: b'm' * CHUNK}),
                                                (self.base.ref, {0: b'n' * CHUNK})])
        # The first item lost 2, then 3, to the other host; the second follows it.
        self.assertEqual([4, 5], [r.manifest.version for r in results])
        for version, data in ((2, b'o'), (3, b'o'), (4, b'm'), (5, b'n')):
            self.assertEqual(data * CHUNK, self.warehouse.read(
                self.warehouse.manifest('img', version), 0, CHUNK))

    def test_a_parent_shared_by_items_is_read_once(self):
        reads = []
        read_manifest = self.backend.read_manifest
        self.patch(self.backend, 'read_manifest',
                   lambda image, version: reads.append((image, version))
                   or read_manifest(image, version))
        results = self.warehouse.snapshot_many(
            [(self.base.ref, {n: bytes([n + 1]) * CHUNK}) for n in range(4)])
        self.assertEqual([2, 3, 4, 5], [r.manifest.version for r in results])
        self.assertEqual([('img', 1)], reads)  # neither per item nor again to check it

    def test_nothing_to_snapshot(self):
        self.assertEqual([], self.warehouse.snapshot_many([]))
        self.assertEqual([], self.warehouse.snapshot_many([], targets=[]))

    def test_instance_snapshots_go_to_their_own_images_deduplicated_against_the_base(self):
        shared, own = b'S' * CHUNK, self.rng.randbytes(CHUNK)
        stored = dict(self.backend.iter_chunks())
        results = self.warehouse.snapshot_many(
            [(self.base.ref, {1: shared}), (self.base.ref, {1: shared, 2: own}),
             (self.base.ref, {0: self.read_all(self.base)[:CHUNK]})],  # unchanged bytes
            targets=['vm-1a2b3c4d-0', 'vm-1a2b3c4d-1', 'vm-1a2b3c4d-2'])
        self.assertEqual([VersionRef('vm-1a2b3c4d-0', 1), VersionRef('vm-1a2b3c4d-1', 1),
                          VersionRef('vm-1a2b3c4d-2', 1)], [r.manifest.ref for r in results])
        # What deploying the image means has not moved.
        self.assertEqual(self.base, self.warehouse.lookup('img'))
        self.assertEqual([1], self.backend.list_versions('img'))
        for result in results:
            self.assertEqual(self.base.ref,
                             self.warehouse.lookup(str(result.manifest.ref)).parent)
        # Only the two new chunks were stored; the rest is the base's.
        added = set(dict(self.backend.iter_chunks()).items()) - set(stored.items())
        self.assertEqual({(manifest_mod.chunk_id(shared), CHUNK),
                          (manifest_mod.chunk_id(own), CHUNK)}, added)
        self.assertEqual([CHUNK, CHUNK, 0], [r.new_bytes for r in results])
        self.assertEqual(shared + own, self.read_all(results[1].manifest)[CHUNK:3 * CHUNK])
        self.assertEqual(self.read_all(self.base), self.read_all(results[2].manifest))
        # The next snapshot of an instance is the next version of its own image.
        [again] = self.warehouse.snapshot_many([(results[0].manifest.ref, {3: own})],
                                               targets=['vm-1a2b3c4d-0'])
        self.assertEqual(VersionRef('vm-1a2b3c4d-0', 2), again.manifest.ref)
        self.assertEqual(VersionRef('vm-1a2b3c4d-0', 1), again.manifest.parent)
        self.assertEqual(0, again.new_bytes)
        # The base now has dependents in other images: it cannot be deleted from under them.
        self.assertRaises(exception.ImageInUse, self.warehouse.delete, 'img', 1)
        self.assertTrue(self.warehouse.verify().ok)

    def test_a_bad_target_fails_its_item_alone(self):
        results = self.warehouse.snapshot_many(
            [(self.base.ref, {0: b'a' * CHUNK}), (self.base.ref, {0: b'b' * CHUNK})],
            targets=['bad:name', 'vm-2'])
        self.assertIsInstance(results[0], exception.InvalidName)
        self.assertEqual(VersionRef('vm-2', 1), results[1].manifest.ref)
        self.assertEqual(['img', 'other', 'vm-2'], self.warehouse.images())

    def test_targets_must_match_the_items(self):
        stored = self.stored_chunk_files()
        error = self.assertRaises(exception.StorageError, self.warehouse.snapshot_many,
                                  [(self.base.ref, {0: b'a' * CHUNK})], targets=['a', 'b'])
        self.assertIn('2 targets for 1 items', str(error))
        self.assertEqual(['img', 'other'], self.warehouse.images())
        self.assertEqual(stored, self.stored_chunk_files())


class ReadExportTest(WarehouseTestCase):
    def setUp(self):
        super().setUp()
        self.path = self.make_raw('base.raw', 'rhrzArs')
        with open(self.path, 'rb') as f:
            self.data = f.read()
        self.manifest = self.warehouse.import_image(self.path, 'img').manifest

    def test_any_byte_range(self):
        for _ in range(50):
            offset = self.rng.randrange(len(self.data))
            length = self.rng.randrange(len(self.data) - offset + 1)
            self.assertBytesEqual(self.data[offset:offset + length],
                                  self.warehouse.read(self.manifest, offset, length))

    def test_range_outside_the_image(self):
        for offset, length in ((-1, 1), (len(self.data), 1), (0, len(self.data) + 1)):
            self.assertRaises(exception.InvalidRange, self.warehouse.read,
                              self.manifest, offset, length)

    def test_streaming_reader(self):
        with self.warehouse.open(self.manifest) as reader:
            pieces = iter(lambda: reader.read(10_000), b'')
            self.assertBytesEqual(self.data, b''.join(pieces))
            reader.seek(-5, os.SEEK_END)
            self.assertEqual(self.data[-5:], reader.read())

    def test_export_raw_is_sparse_and_identical(self):
        dest = os.path.join(self.tmp, 'out.raw')
        self.warehouse.export(self.manifest, dest)
        with open(dest, 'rb') as f:
            self.assertBytesEqual(self.data, f.read())
        # The hole and the zero chunk are not allocated (one block of slack for the tail).
        self.assertLessEqual(os.stat(dest).st_blocks * 512, len(self.data) - 2 * CHUNK + 4096)

    def test_export_qcow2(self):
        dest = os.path.join(self.tmp, 'out.qcow2')
        self.warehouse.export(self.manifest, dest, 'qcow2')
        subprocess.run(['qemu-img', 'compare', '-f', 'qcow2', '-F', 'raw', dest, self.path],
                       check=True, capture_output=True)
        self.assertEqual(['base.raw', 'out.qcow2', 'state'], sorted(os.listdir(self.tmp)))

    def test_export_to_missing_directory_leaves_nothing(self):
        error = self.assertRaises(exception.StorageError, self.warehouse.export,
                                  self.manifest, os.path.join(self.tmp, 'no', 'out.raw'))
        self.assertIn('does not exist', str(error))

    def test_export_failure_leaves_no_partial_file(self):
        damage.lose_pack_of(self.backend, self.manifest.chunks[2])
        self.assertRaises(exception.ChunkNotFound, self.warehouse.export,
                          self.manifest, os.path.join(self.tmp, 'out.raw'))
        self.assertEqual(['base.raw', 'state'], sorted(os.listdir(self.tmp)))

    def test_export_writes_through_a_fifo_and_leaves_it_a_fifo(self):
        fifo = os.path.join(self.tmp, 'pipe')
        os.mkfifo(fifo)
        received = []

        def read():
            with open(fifo, 'rb') as f:
                received.append(f.read())
        # A daemon: if export replaced the FIFO, nobody would ever open it for writing.
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        self.warehouse.export(self.manifest, fifo)
        reader.join(60)
        self.assertTrue(stat.S_ISFIFO(os.lstat(fifo).st_mode))
        self.assertBytesEqual(self.data, received[0])

    def test_export_writes_through_a_device_and_never_replaces_it(self):
        device = os.path.join(self.tmp, 'null')
        try:
            # The device numbers of /dev/null: writes vanish, and a test that went
            # wrong replaces only this node, never the real /dev/null.
            os.mknod(device, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
            os.close(os.open(device, os.O_WRONLY))
        except OSError as exc:
            self.fail(f'cannot make a device node here (the tests run as root): {exc}')
        self.warehouse.export(self.manifest, device)
        st = os.lstat(device)
        self.assertTrue(stat.S_ISCHR(st.st_mode))
        self.assertEqual(os.makedev(1, 3), st.st_rdev)
        error = self.assertRaises(exception.StorageError, self.warehouse.export,
                                  self.manifest, device, 'qcow2')
        self.assertIn('only raw can be written to a device or FIFO', str(error))

    def loop_device(self, size: int) -> str:
        """A block device node in self.tmp over a file of ``size`` bytes of 0xff."""
        backing = os.path.join(self.tmp, f'loop-{size}.img')
        with open(backing, 'wb') as f:
            f.write(b'\xff' * size)
        try:
            attached = subprocess.run(['losetup', '--find', '--show', backing], check=True,
                                      capture_output=True, text=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError) as exc:
            self.fail(f'no loop device (the tests run as root): {exc}')
        self.addCleanup(subprocess.run, ['losetup', '-d', attached], check=False)
        # A node of our own: an export gone wrong replaces it, never /dev/loopN.
        node = os.path.join(self.tmp, f'blk-{size}')
        os.mknod(node, 0o600 | stat.S_IFBLK, os.stat(attached).st_rdev)
        return node

    def test_export_writes_through_a_block_device_holes_included(self):
        node = self.loop_device(len(self.data) + 2 * 4096 - len(self.data) % 4096)
        self.warehouse.export(self.manifest, node)
        self.assertTrue(stat.S_ISBLK(os.lstat(node).st_mode))
        with open(node, 'rb') as f:
            written = f.read()
        # The device's old bytes under the hole and the zero chunk are zeroed; past the
        # image they stay.
        self.assertBytesEqual(self.data, written[:len(self.data)])
        self.assertEqual(b'\xff' * 4096, written[-4096:])

    def test_export_to_a_block_device_too_small_writes_nothing(self):
        node = self.loop_device(64 * 1024)
        error = self.assertRaises(exception.StorageError, self.warehouse.export,
                                  self.manifest, node)
        self.assertIn(f'({len(self.data)} bytes)', str(error))
        self.assertIn('the device holds only 65536 bytes', str(error))
        with open(node, 'rb') as f:
            self.assertEqual(b'\xff' * 64 * 1024, f.read())

    def test_export_refuses_a_symlink_and_leaves_it_and_its_target(self):
        target = os.path.join(self.tmp, 'target')
        with open(target, 'wb') as f:
            f.write(b'keep me')
        link = os.path.join(self.tmp, 'link')
        os.symlink(target, link)
        error = self.assertRaises(exception.StorageError, self.warehouse.export,
                                  self.manifest, link)
        self.assertIn(f'{link}: it is a symbolic link (to {target})', str(error))
        self.assertEqual(target, os.readlink(link))
        with open(target, 'rb') as f:
            self.assertEqual(b'keep me', f.read())
        self.assertEqual(['base.raw', 'link', 'state', 'target'], sorted(os.listdir(self.tmp)))

    def test_export_refuses_a_directory_or_socket(self):
        directory = os.path.join(self.tmp, 'dir')
        os.mkdir(directory)
        error = self.assertRaises(exception.StorageError, self.warehouse.export,
                                  self.manifest, directory)
        self.assertIn('neither a regular file', str(error))
        self.assertEqual([], os.listdir(directory))

    def test_export_replaces_a_regular_file_whole(self):
        dest = os.path.join(self.tmp, 'out.raw')
        with open(dest, 'wb') as f:
            f.write(b'old' * 100_000)
        self.warehouse.export(self.manifest, dest)
        with open(dest, 'rb') as f:
            self.assertBytesEqual(self.data, f.read())

    def test_unknown_export_format(self):
        self.assertRaises(exception.StorageError, self.warehouse.export,
                          self.manifest, os.path.join(self.tmp, 'out.vmdk'), 'vmdk')


class WindowedConversionTest(WarehouseTestCase):
    """A qcow2 file is converted a window at a time: scratch use is bounded."""

    def setUp(self):
        super().setUp()
        self.conf.set_override('scratch_window', 4 * CHUNK, 'storage')
        self.scratch_sizes = []
        real = qemu_img.convert_range

        def spy(conf, src, fmt, offset, length, dst):
            real(conf, src, fmt, offset, length, dst)
            self.scratch_sizes.append(os.stat(dst).st_size)
        patcher = mock.patch.object(qemu_img, 'convert_range', spy)
        patcher.start()
        self.addCleanup(patcher.stop)

    def qcow2_of(self, raw: str, *options: str) -> str:
        path = raw + '.qcow2'
        subprocess.run(['qemu-img', 'convert', *options, '-f', 'raw', '-O', 'qcow2', raw, path],
                       check=True)
        return path

    def assert_imported_as(self, raw: str, manifest) -> None:
        with open(raw, 'rb') as f:
            self.assertBytesEqual(f.read(), self.read_all(manifest))

    def test_scratch_use_is_one_window_however_far_the_image_expands(self):
        # 4 MiB of one repeated byte compresses to a few KiB, as a 3 MB file
        # expanding to 2 GiB does.
        raw = self.make_raw('same.raw', 'A' * 64)
        qcow2 = self.qcow2_of(raw, '-c')
        self.assertLess(os.path.getsize(qcow2), 64 * CHUNK // 8)
        result = self.warehouse.import_image(qcow2, 'same')
        self.assert_imported_as(raw, result.manifest)
        self.assertEqual(CHUNK, result.new_bytes)
        self.assertEqual([4 * CHUNK] * 16, self.scratch_sizes)
        self.assertEqual([], os.listdir(self.backend.staging_dir))

    def test_windows_without_data_are_not_converted(self):
        raw = self.make_raw('sparse.raw', 'h' * 21 + 'r' + 'h' * 9 + 's')
        result = self.warehouse.import_image(self.qcow2_of(raw), 'sparse')
        with open(raw, 'rb') as f:
            data = f.read()
        # qcow2 rounds the size up to whole sectors.
        self.assertEqual(-(-len(data) // 512) * 512, result.manifest.size)
        # Only windows 5 (chunks 20-23) and 7 (the short tail) hold data.
        self.assertEqual([4 * CHUNK, result.manifest.size - 28 * CHUNK], self.scratch_sizes)
        self.assertBytesEqual(data, self.read_all(result.manifest)[:len(data)])
        self.assertEqual([None] * 21, list(result.manifest.chunks[:21]))

    def test_a_failing_map_is_a_storage_error_naming_qemu_img_message(self):
        not_qcow2 = self.make_raw('not.qcow2', 'r')
        error = self.assertRaises(exception.StorageError, list,
                                  qemu_img.data_extents(self.conf, not_qcow2, 'qcow2'))
        self.assertIn('qemu-img map failed (exit 1)', str(error))
        self.assertIn('qcow2', str(error))

    def test_a_window_converted_short_is_refused_and_leaves_nothing(self):
        # A window shorter than asked would shift every chunk after it.
        qcow2 = self.qcow2_of(self.make_raw('a.raw', 'rrrrrrrr'))
        converted = qemu_img.convert_range

        def short(conf, src, fmt, offset, length, dst):
            converted(conf, src, fmt, offset, length, dst)
            os.truncate(dst, length - 1)

        with mock.patch.object(qemu_img, 'convert_range', short):
            error = self.assertRaises(exception.UnsafeImage, self.warehouse.import_image,
                                      qcow2, 'a')
        self.assertIn(f'qemu-img converted {4 * CHUNK - 1} bytes of a {4 * CHUNK}-byte window',
                      str(error))
        self.assertEqual([], self.warehouse.images())
        self.assertEqual([], os.listdir(self.backend.staging_dir))

    def test_too_little_scratch_space_is_refused_before_starting(self):
        qcow2 = self.qcow2_of(self.make_raw('a.raw', 'rrrrrrrr'))
        with mock.patch.object(warehouse.shutil, 'disk_usage') as usage:
            usage.return_value.free = 1000
            error = self.assertRaises(exception.ScratchSpaceExhausted,
                                      self.warehouse.import_image, qcow2, 'a')
        self.assertIn(f'needs {4 * CHUNK} bytes of scratch space', str(error))
        self.assertIn('only 1000 are free', str(error))
        self.assertEqual([], self.scratch_sizes)
        self.assertEqual([], self.warehouse.images())
        self.assertEqual([], os.listdir(self.backend.staging_dir))


class MaintenanceTest(WarehouseTestCase):
    def setUp(self):
        super().setUp()
        self.base = self.warehouse.import_image(self.make_raw('a.raw', 'rrrA'), 'img').manifest
        self.snap = self.warehouse.snapshot_chunks(self.base.ref, {0: b's' * CHUNK}).manifest

    def test_verify_clean(self):
        report = self.warehouse.verify()
        self.assertTrue(report.ok)
        self.assertEqual((2, 5), (report.versions, report.chunks))

    def test_verify_finds_flipped_bit(self):
        chunk_id = self.base.chunks[1]
        damage.corrupt_chunk(self.backend, chunk_id)
        report = self.warehouse.verify()
        self.assertFalse(report.ok)
        self.assertEqual(1, len(report.problems))
        self.assertIn(chunk_id, report.problems[0])
        self.assertIn('corrupt', report.problems[0])
        self.assertIn('img:1, img:2', report.problems[0])

    def test_corrupt_chunk_is_never_served(self):
        damage.corrupt_chunk(self.backend, self.base.chunks[2])
        error = self.assertRaises(exception.CorruptChunk, self.warehouse.read,
                                  self.base, 0, self.base.size)
        self.assertIn(self.base.chunks[2], str(error))
        self.assertRaises(exception.CorruptChunk, self.warehouse.export,
                          self.base, os.path.join(self.tmp, 'out.raw'))
        self.assertFalse(os.path.exists(os.path.join(self.tmp, 'out.raw')))

    def test_verify_finds_missing_chunk_and_corrupt_manifest(self):
        damage.lose_pack_of(self.backend, self.snap.chunks[0])
        manifest_path = os.path.join(self.backend.images_dir, 'img', '1.json')
        with open(manifest_path, 'r+b') as f:
            f.seek(40)
            f.write(b'#')
        problems = self.warehouse.verify().problems
        self.assertEqual(2, len(problems))
        self.assertTrue(any('is missing from the warehouse; used by img:2' in p for p in problems))
        self.assertTrue(any('img:1 is corrupt' in p for p in problems))
        self.assertRaises(exception.CorruptManifest, self.warehouse.gc)

    def test_manifest_stored_under_wrong_name_is_corrupt(self):
        images = self.backend.images_dir
        os.rename(os.path.join(images, 'img', '2.json'), os.path.join(images, 'img', '3.json'))
        error = self.assertRaises(exception.CorruptManifest, self.warehouse.manifest, 'img', 3)
        self.assertIn('describes img:2', str(error))

    def test_delete_with_dependents_is_refused(self):
        error = self.assertRaises(exception.ImageInUse, self.warehouse.delete, 'img', 1)
        self.assertIn('img:2', str(error))
        self.assertEqual([1, 2], self.backend.list_versions('img'))
        self.warehouse.snapshot_chunks(self.snap.ref, {1: b'o' * CHUNK}, image='other')
        error = self.assertRaises(exception.ImageInUse, self.warehouse.delete, 'img')
        self.assertIn('other:1', str(error))

    def test_delete_children_then_parent_then_gc(self):
        self.warehouse.delete('img', 2)
        report = self.warehouse.gc()
        self.assertEqual((1, CHUNK), (report.removed_chunks, report.freed_bytes))
        self.warehouse.delete('img')
        self.assertEqual([], self.warehouse.images())
        self.assertEqual(4, self.warehouse.gc().removed_chunks)
        self.assertEqual(set(), self.stored_chunk_files())

    def test_delete_whole_chain(self):
        self.assertEqual([VersionRef('img', 1), VersionRef('img', 2)],
                         self.warehouse.delete('img'))
        self.assertRaises(exception.ImageNotFound, self.warehouse.delete, 'img')

    def test_gc_keeps_shared_chunks(self):
        self.warehouse.snapshot_chunks(self.snap.ref, {1: b'o' * CHUNK}, image='other')
        self.warehouse.delete('other')
        self.assertEqual(1, self.warehouse.gc().removed_chunks)
        self.assertTrue(self.warehouse.verify().ok)

    def test_gc_rewrites_a_partly_used_pack(self):
        # 'copy' shares chunks 1 and 3 with img:1 without being its snapshot,
        # so deleting img leaves img:1's pack half used.
        with open(os.path.join(self.tmp, 'a.raw'), 'rb') as f:
            data = bytearray(f.read())
        data[0:CHUNK] = b'c' * CHUNK
        data[2 * CHUNK:3 * CHUNK] = b'd' * CHUNK
        copy_path = os.path.join(self.tmp, 'copy.raw')
        with open(copy_path, 'wb') as f:
            f.write(data)
        copy = self.warehouse.import_image(copy_path, 'copy').manifest
        self.warehouse.delete('img')
        before = self.pack_bytes()
        report = self.warehouse.gc()
        self.assertEqual((3, 3 * CHUNK), (report.removed_chunks, report.freed_bytes))
        self.assertEqual(before - 3 * CHUNK, self.pack_bytes())
        self.assertBytesEqual(bytes(data), self.read_all(copy))
        self.assertTrue(self.warehouse.verify().ok)
        self.assertEqual(4, len(self.stored_chunk_files()))

    def test_gc_waits_for_writes_in_progress(self):
        with self.backend.shared_lock():
            self.assertRaises(exception.WarehouseBusy, self.warehouse.gc, 0.2)

    def test_gc_purges_abandoned_staging(self):
        session = self.backend.begin_write()
        session.put_chunk('f' * 64, b'data')
        # The session is never committed nor aborted, as after a crash.
        self.assertEqual(1, self.warehouse.gc().purged_files)
        self.assertEqual([], os.listdir(self.backend.staging_dir))
        self.assertFalse(self.backend.has_chunk('f' * 64))
        self.assertEqual([], [n for n in os.listdir(self.backend.packs_dir)
                              if n.endswith('.pack') and n[:-5] not in
                              {i[:-4] for i in os.listdir(self.backend.packs_dir)}])

    def test_stats(self):
        stats = self.warehouse.stats()
        self.assertEqual((1, 2, 5), (stats.images, stats.versions, stats.chunks))
        self.assertEqual(5 * CHUNK, sum(size for _, size in self.backend.iter_chunks()))
        self.assertGreater(stats.chunk_bytes, 5 * CHUNK)  # with the pack indexes
        self.assertEqual(8 * CHUNK, stats.referenced_bytes)
        self.assertGreater(stats.manifest_bytes, 0)


class HoldTest(WarehouseTestCase):
    def setUp(self):
        super().setUp()
        self.base = self.warehouse.import_image(self.make_raw('a.raw', 'rrA'), 'img').manifest
        self.snap = self.warehouse.snapshot_chunks(self.base.ref, {0: b's' * CHUNK}).manifest

    def test_hold_release_and_holders(self):
        other = warehouse.Warehouse(self.conf)  # another process on the same store
        self.warehouse.hold('img:1', 'mirror.node1.vm-1a2b3c4d-0')
        self.warehouse.hold('img:1', 'mirror.node1.vm-1a2b3c4d-0')  # twice is once
        other.hold('img:1', 'snapshot.7f3e')
        other.hold('img:2', 'mirror.node2.vm-9-1')
        self.assertEqual(['mirror.node1.vm-1a2b3c4d-0', 'snapshot.7f3e'],
                         other.holders('img', 1))
        self.assertEqual(['mirror.node2.vm-9-1'], self.warehouse.holders('img', 2))
        self.assertEqual([], self.warehouse.holders('img', 3))
        other.release('img:1', 'mirror.node1.vm-1a2b3c4d-0')
        other.release('img:1', 'mirror.node1.vm-1a2b3c4d-0')  # released already: no error
        self.warehouse.release('img:9', 'nobody')
        self.assertEqual(['snapshot.7f3e'], self.warehouse.holders('img', 1))
        # Holds are no attachments a user writes or gc and stats count.
        self.assertEqual(2, self.warehouse.stats().versions)
        self.assertTrue(self.warehouse.verify().ok)

    def test_bad_holds_are_refused_and_nothing_is_written(self):
        for ref, holder in (('img', 'a'), ('img:x', 'a'), ('img:1', ''), ('img:1', 'a/b'),
                            ('img:1', '.a'), ('img:1', 'a:b'), ('img:1', 'a' * 97),
                            ('img:1', 'a\n')):
            self.assertRaises(exception.InvalidName, self.warehouse.hold, ref, holder)
        self.warehouse.hold('img:1', 'a' * warehouse.MAX_HOLDER_LENGTH)  # the longest
        error = self.assertRaises(exception.ImageNotFound, self.warehouse.hold, 'img:3', 'a')
        self.assertEqual(('img', 3), (error.image, error.version))
        self.assertRaises(exception.ImageNotFound, self.warehouse.hold, 'none:1', 'a')
        self.assertEqual(['a' * warehouse.MAX_HOLDER_LENGTH], self.warehouse.holders('img', 1))
        self.assertEqual([], self.warehouse.holders('img', 3))
        self.assertEqual([], self.backend.list_attachments('none'))
        # A user's attachment cannot pose as a hold.
        self.assertRaises(exception.InvalidName, self.warehouse.write_attachment,
                          'img', 'hold.2.forged', b'')
        self.assertEqual([], self.warehouse.holders('img', 2))

    def test_a_held_version_is_refused_with_its_holders_named(self):
        self.warehouse.hold('img:2', 'mirror.node1.vm-a-0')
        self.warehouse.hold('img:2', 'mirror.node2.vm-b-0')
        error = self.assertRaises(exception.ImageInUse, self.warehouse.delete, 'img', 2)
        self.assertIsInstance(error, exception.ImageHeld)
        self.assertEqual(('img', 2, ['mirror.node1.vm-a-0', 'mirror.node2.vm-b-0']),
                         (error.image, error.version, error.holders))
        self.assertIn('img:2 is in use by mirror.node1.vm-a-0, mirror.node2.vm-b-0', str(error))
        self.assertNotIn('\n', str(error))
        self.assertEqual([1, 2], self.backend.list_versions('img'))
        self.warehouse.release('img:2', 'mirror.node1.vm-a-0')
        self.warehouse.release('img:2', 'mirror.node2.vm-b-0')
        self.assertEqual([VersionRef('img', 2)], self.warehouse.delete('img', 2))

    def test_a_whole_image_with_a_held_version_is_refused_whole(self):
        self.warehouse.hold('img:1', 'snapshot.s1')
        self.warehouse.write_attachment('img', 'boot-profile', b'p')
        error = self.assertRaises(exception.ImageHeld, self.warehouse.delete, 'img')
        self.assertEqual((None, ['snapshot.s1 (img:1)']), (error.version, error.holders))
        self.assertIn('image img is in use by snapshot.s1 (img:1)', str(error))
        self.assertEqual([1, 2], self.backend.list_versions('img'))
        self.assertEqual(b'p', self.warehouse.read_attachment('img', 'boot-profile'))
        # An unheld version of it can go.
        self.warehouse.delete('img', 2)
        self.assertEqual([1], self.backend.list_versions('img'))

    def test_force_deletes_a_held_version_and_its_holds(self):
        self.warehouse.hold('img:2', 'mirror.node1.vm-a-0')
        self.warehouse.hold('img:1', 'mirror.node1.vm-b-0')
        self.assertEqual([VersionRef('img', 2)], self.warehouse.delete('img', 2, force=True))
        self.assertEqual([1], self.backend.list_versions('img'))
        self.assertEqual(['hold.1.mirror.node1.vm-b-0'], self.backend.list_attachments('img'))
        # The next snapshot takes number 2 again: it must not inherit the old holds.
        again = self.warehouse.snapshot_chunks(self.base.ref, {1: b't' * CHUNK}).manifest
        self.assertEqual(VersionRef('img', 2), again.ref)
        self.assertEqual([], self.warehouse.holders('img', 2))
        self.warehouse.delete('img', 2)

    def test_force_deletes_a_held_image_and_every_hold(self):
        self.warehouse.hold('img:1', 'mirror.node1.vm-b-0')
        self.warehouse.delete('img', force=True)
        self.assertEqual([], self.warehouse.images())
        self.warehouse.import_image(self.make_raw('b.raw', 'r'), 'img')
        self.assertEqual([], self.warehouse.holders('img', 1))

    def test_force_does_not_orphan_dependents(self):
        self.warehouse.hold('img:1', 'mirror.node1.vm-b-0')
        error = self.assertRaises(exception.ImageInUse, self.warehouse.delete, 'img', 1,
                                  force=True)
        self.assertNotIsInstance(error, exception.ImageHeld)
        self.assertIn('img:2', str(error))
        self.assertEqual(['mirror.node1.vm-b-0'], self.warehouse.holders('img', 1))

    def test_a_hold_checks_its_version_under_the_lock_delete_takes(self):
        # Else a delete between the check and the write leaves a hold on nothing,
        # which a later version of that number would inherit.
        events = []
        image_lock, list_versions = self.backend.image_lock, self.backend.list_versions
        write_attachment = self.backend.write_attachment

        @contextlib.contextmanager
        def spied_lock(image):
            with image_lock(image):
                events.append(('lock', image))
                yield
                events.append(('unlock', image))
        self.patch(self.backend, 'image_lock', spied_lock)
        self.patch(self.backend, 'list_versions',
                   lambda image: events.append(('list', image)) or list_versions(image))
        self.patch(self.backend, 'write_attachment',
                   lambda *args: events.append(('hold', args[1])) or write_attachment(*args))
        self.warehouse.hold('img:2', 'h')
        self.assertEqual([('lock', 'img'), ('list', 'img'), ('hold', 'hold.2.h'),
                          ('unlock', 'img')], events)
        del events[:]
        self.assertRaises(exception.ImageHeld, self.warehouse.delete, 'img', 2)
        self.assertEqual(('lock', 'img'), events[0])  # holders are read under it too


class AttachmentTest(WarehouseTestCase):
    def setUp(self):
        super().setUp()
        self.base = self.warehouse.import_image(self.make_raw('a.raw', 'rrA'), 'img').manifest

    def test_write_replace_read(self):
        self.assertIsNone(self.warehouse.read_attachment('img', 'boot-profile'))
        self.warehouse.write_attachment('img', 'boot-profile', b'first')
        self.warehouse.write_attachment('img', 'boot-profile', memoryview(b'second'))
        other = warehouse.Warehouse(self.conf)  # another process on the same store
        self.assertEqual(b'second', other.read_attachment('img', 'boot-profile'))
        self.assertIsNone(other.read_attachment('img', 'other'))

    def test_an_image_without_a_version_is_refused(self):
        error = self.assertRaises(exception.ImageNotFound, self.warehouse.write_attachment,
                                  'none', 'boot-profile', b'p')
        self.assertEqual('none', error.image)
        # An image directory without a manifest (a crash left it) is no version either.
        os.mkdir(os.path.join(self.backend.images_dir, 'none'))
        self.assertRaises(exception.ImageNotFound, self.warehouse.write_attachment,
                          'none', 'boot-profile', b'p')
        self.assertEqual(['img'], self.warehouse.images())
        self.assertIsNone(self.warehouse.read_attachment('none', 'boot-profile'))

    def test_bad_names_and_sizes_are_refused_and_keep_the_old_bytes(self):
        self.warehouse.write_attachment('img', 'p', b'old')
        for image, name in (('img', '../x'), ('img', ''), ('img', '.hidden'),
                            ('img', 'a/b'), ('../img', 'p'), ('img', 'x' * 129)):
            self.assertRaises(exception.InvalidName, self.warehouse.write_attachment,
                              image, name, b'new')
            self.assertRaises(exception.InvalidName, self.warehouse.read_attachment,
                              image, name)
        too_big = bytes(backend_mod.MAX_ATTACHMENT_BYTES + 1)
        error = self.assertRaises(exception.AttachmentTooLarge,
                                  self.warehouse.write_attachment, 'img', 'p', too_big)
        self.assertIsInstance(error, exception.StorageError)
        self.assertIn(str(backend_mod.MAX_ATTACHMENT_BYTES), str(error))
        self.assertEqual(b'old', self.warehouse.read_attachment('img', 'p'))
        self.assertEqual([], os.listdir(self.backend.staging_dir))

    def test_a_failed_write_keeps_the_old_bytes_and_leaves_nothing(self):
        self.warehouse.write_attachment('img', 'p', b'old')
        with mock.patch.object(os, 'replace',
                               side_effect=OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))):
            error = self.assertRaises(exception.StorageError, self.warehouse.write_attachment,
                                      'img', 'p', b'new')
        self.assertIn('attachment p of image img', str(error))
        self.assertIsInstance(error.__cause__, OSError)
        self.assertEqual(b'old', self.warehouse.read_attachment('img', 'p'))
        self.assertEqual([], os.listdir(self.backend.staging_dir))

    def test_gc_cannot_purge_an_attachment_being_written(self):
        write = self.backend.write_attachment
        seen = []

        def write_while_gc_tries(image, name, data):
            # gc's exclusive lock, taken now, would purge the staged temp file.
            seen.append(self.assertRaises(exception.WarehouseBusy, self.warehouse.gc, 0.1))
            write(image, name, data)

        with mock.patch.object(self.backend, 'write_attachment', write_while_gc_tries):
            self.warehouse.write_attachment('img', 'p', b'bytes')
        self.assertEqual(1, len(seen))
        self.assertEqual(b'bytes', self.warehouse.read_attachment('img', 'p'))

    def test_deleting_the_last_version_deletes_the_attachments(self):
        snap = self.warehouse.snapshot_chunks(self.base.ref, {0: b's' * CHUNK}).manifest
        self.warehouse.write_attachment('img', 'boot-profile', b'p')
        self.warehouse.delete('img', snap.version)  # not the last one: kept
        self.assertEqual(b'p', self.warehouse.read_attachment('img', 'boot-profile'))
        self.warehouse.delete('img', self.base.version)
        self.assertIsNone(self.warehouse.read_attachment('img', 'boot-profile'))
        self.assertEqual([], os.listdir(self.backend.images_dir))  # no orphan left
        again = self.warehouse.import_image(self.make_raw('b.raw', 'rA'), 'img').manifest
        self.assertEqual(1, again.version)
        self.assertIsNone(self.warehouse.read_attachment('img', 'boot-profile'))

    def test_deleting_a_whole_image_deletes_its_attachments_only(self):
        self.warehouse.import_image(self.make_raw('b.raw', 'rA'), 'other')
        self.warehouse.write_attachment('img', 'boot-profile', b'p')
        self.warehouse.write_attachment('other', 'boot-profile', b'o')
        self.warehouse.delete('img')
        self.assertIsNone(self.warehouse.read_attachment('img', 'boot-profile'))
        self.assertEqual(b'o', self.warehouse.read_attachment('other', 'boot-profile'))

    def test_a_refused_delete_keeps_the_attachments(self):
        self.warehouse.snapshot_chunks(self.base.ref, {0: b's' * CHUNK})
        self.warehouse.write_attachment('img', 'boot-profile', b'p')
        self.assertRaises(exception.ImageInUse, self.warehouse.delete, 'img', 1)
        self.assertEqual(b'p', self.warehouse.read_attachment('img', 'boot-profile'))

    def test_gc_verify_and_stats_ignore_attachments(self):
        before = self.warehouse.stats()
        self.warehouse.write_attachment('img', 'boot-profile', b'p' * 5000)
        report = self.warehouse.verify()
        self.assertTrue(report.ok, report.problems)
        self.assertEqual((1, 3), (report.versions, report.chunks))
        self.assertEqual(dataclasses.asdict(before), dataclasses.asdict(self.warehouse.stats()))
        gc = self.warehouse.gc()
        self.assertEqual((0, 3), (gc.removed_chunks, gc.kept_chunks))
        self.assertEqual(b'p' * 5000, self.warehouse.read_attachment('img', 'boot-profile'))


class DamageStaysLocalTest(WarehouseTestCase):
    """One damaged item costs the versions that need it, never the whole warehouse."""

    def setUp(self):
        super().setUp()
        self.good = self.warehouse.import_image(self.make_raw('good.raw', 'rrA'), 'good').manifest
        self.bad = self.warehouse.import_image(self.make_raw('bad.raw', 'rrh'), 'bad').manifest
        self.bad2 = self.warehouse.snapshot_chunks(self.bad.ref, {2: b'n' * CHUNK}).manifest
        damage.corrupt_manifest(self.backend, 'bad', 2)

    def test_listing_names_the_damaged_version_and_lists_the_rest(self):
        listing = self.warehouse.listing()
        self.assertEqual([VersionRef('bad', 1), VersionRef('good', 1)],
                         [s.ref for s in listing.versions])
        self.assertEqual([VersionRef('bad', 2)], list(listing.damaged))
        self.assertIn('bad:2 is corrupt', listing.damaged[VersionRef('bad', 2)])

    def test_unrelated_images_keep_working(self):
        other = self.warehouse.import_image(self.make_raw('other.raw', 'rB'), 'other').manifest
        self.warehouse.snapshot_chunks(self.good.ref, {0: b'g' * CHUNK})
        dest = os.path.join(self.tmp, 'good.out')
        self.warehouse.export(self.good, dest)
        with open(os.path.join(self.tmp, 'good.raw'), 'rb') as f, open(dest, 'rb') as out:
            self.assertBytesEqual(f.read(), out.read())
        self.assertEqual(3, self.warehouse.stats().images)
        self.assertEqual(1, self.warehouse.stats().damaged_versions)
        with open(os.path.join(self.tmp, 'other.raw'), 'rb') as f:
            self.assertBytesEqual(f.read(), self.read_all(other))
        self.assertEqual([VersionRef('good', 1), VersionRef('good', 2)],
                         [m.ref for m in self.warehouse.versions('good')])
        self.assertEqual([VersionRef('other', 1)], self.warehouse.delete('other'))

    def test_damaged_version_can_be_deleted_then_gc_runs(self):
        self.assertEqual([VersionRef('bad', 2)], self.warehouse.delete('bad', 2))
        self.assertEqual({}, self.warehouse.listing().damaged)
        self.assertEqual(1, self.warehouse.gc().removed_chunks)  # bad:2's new chunk
        self.assertTrue(self.warehouse.verify().ok)

    def test_gc_refuses_naming_every_damaged_manifest_and_frees_nothing(self):
        damage.corrupt_manifest(self.backend, 'good', 1)
        self.warehouse.delete('bad', 1)  # not blocked by the unreadable bad:2
        stored = self.stored_chunk_files()
        error = self.assertRaises(exception.CorruptManifest, self.warehouse.gc)
        self.assertIn('bad:2, good:1', str(error))
        self.assertIn("'vmcloud image rm IMAGE:VERSION'", str(error))
        self.assertEqual(stored, self.stored_chunk_files())

    def test_verify_reports_every_damaged_item_and_goes_on(self):
        third = self.warehouse.import_image(self.make_raw('third.raw', 'rr'), 'third').manifest
        fourth = self.warehouse.import_image(self.make_raw('fourth.raw', 'rr'), 'fourth').manifest
        damage.lose_pack_of(self.backend, self.good.chunks[0])
        damage.corrupt_chunk(self.backend, third.chunks[1])
        damage.corrupt_pack_index_of(self.backend, fourth.chunks[0])
        report = warehouse.Warehouse(self.conf).verify()
        problems = '\n'.join(report.problems)
        self.assertIn('manifest bad:2 is corrupt', problems)
        self.assertEqual(3, problems.count('is missing from the warehouse; used by good:1'))
        self.assertIn(f'chunk {third.chunks[1]} is corrupt', problems)
        self.assertIn('.idx', problems)  # the pack index, as the backend names it
        self.assertEqual(2, problems.count('is missing from the warehouse; used by fourth:1'))
        self.assertEqual(['bad:2', 'fourth:1', 'good:1', 'third:1'], report.damaged_versions)
        self.assertEqual(4, report.versions)  # bad:1, fourth:1, good:1, third:1

    def test_unreadable_manifest_of_any_shape_stays_local(self):
        # Valid checksums around a field that makes no sense: integrity is not sense.
        crafted = Manifest(image='odd', version=1, size=10, chunk_size=0, chunks=())
        os.mkdir(os.path.join(self.backend.images_dir, 'odd'))
        with open(damage.manifest_path(self.backend, 'odd', 1), 'wb') as f:
            f.write(crafted.encode())
        os.mkdir(damage.manifest_path(self.backend, 'odd', 2))
        listing = self.warehouse.listing()
        self.assertEqual({VersionRef('bad', 2), VersionRef('odd', 1), VersionRef('odd', 2)},
                         set(listing.damaged))
        self.assertIn('invalid chunk_size 0', listing.damaged[VersionRef('odd', 1)])
        self.assertIn('directory', listing.damaged[VersionRef('odd', 2)])
        self.assertRaises(exception.CorruptManifest, self.warehouse.lookup, 'odd:1')
        self.assertRaises(exception.CorruptManifest, self.warehouse.lookup, 'odd:2')
        self.assertEqual(['bad:2', 'odd:1', 'odd:2'], self.warehouse.verify().damaged_versions)
        self.warehouse.delete('odd')
        self.assertNotIn('odd', self.warehouse.images())


class CountingBackend:
    """Passes everything to a backend, counting the manifest bytes it returns."""

    def __init__(self, inner: backend_mod.Backend):
        self._inner = inner
        self.manifest_bytes_read = 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def read_manifest(self, image, version):
        data = self._inner.read_manifest(image, version)
        self.manifest_bytes_read += len(data)
        return data

    def read_manifest_prefix(self, image, version, length):
        data = self._inner.read_manifest_prefix(image, version, length)
        self.manifest_bytes_read += len(data)
        return data


class ListingTest(WarehouseTestCase):
    """Listing reads a bounded header of each manifest, however many chunks it lists."""

    def store(self, manifest: Manifest, data: bytes | None = None) -> None:
        self.backend.create_manifest(manifest.image, manifest.version,
                                     data if data is not None else manifest.encode())

    def test_list_reads_a_bounded_prefix_of_huge_manifests(self):
        chunk_ids = tuple(f'{i:064x}' for i in range(20_000))
        for version in (1, 2, 3):
            self.store(Manifest(image='huge', version=version, size=len(chunk_ids) * CHUNK,
                                chunk_size=CHUNK, chunks=chunk_ids, created_at='t',
                                source={'file': 'huge.raw'}))
        self.assertGreater(len(self.backend.read_manifest('huge', 1)), 1024 ** 2)
        counting = CountingBackend(self.backend)
        listing = warehouse.Warehouse(self.conf, backend=counting).listing()
        self.assertEqual([20_000] * 3, [s.data_chunks for s in listing.versions])
        self.assertEqual([1, 2, 3], [s.version for s in listing.versions])
        self.assertLessEqual(counting.manifest_bytes_read, 3 * manifest_mod.HEADER_LIMIT)

    def test_an_all_hole_image_has_a_tiny_manifest(self):
        # 64 GiB of holes in 64 KiB chunks: 5 MB of nulls in format 1.
        hole = Manifest(image='hole', version=1, size=64 * 1024 ** 3, chunk_size=CHUNK,
                        chunks=(None,) * (1024 ** 2))
        self.store(hole)
        counting = CountingBackend(self.backend)
        store = warehouse.Warehouse(self.conf, backend=counting)
        [summary] = store.listing().versions
        self.assertEqual((0, 1024 ** 2), (summary.data_chunks, summary.chunk_count))
        self.assertEqual(hole.chunks, store.manifest('hole', 1).chunks)
        self.assertLess(counting.manifest_bytes_read, 1024)

    def test_format_1_manifests_are_still_listed_and_read(self):
        old = Manifest(image='old', version=1, size=3 * CHUNK, chunk_size=CHUNK,
                       chunks=('a' * 64, None, 'b' * 64), created_at='t')
        self.store(old, old.encode_v1())
        [summary] = self.warehouse.listing().versions
        self.assertEqual(old.summary(), summary)
        self.assertEqual(old, self.warehouse.manifest('old', 1))

    def test_a_manifest_named_for_another_version_is_corrupt_in_a_listing_too(self):
        self.store(Manifest(image='img', version=1, size=CHUNK, chunk_size=CHUNK,
                            chunks=(None,)))
        images = self.backend.images_dir
        os.rename(os.path.join(images, 'img', '1.json'), os.path.join(images, 'img', '4.json'))
        listing = self.warehouse.listing()
        self.assertEqual([], listing.versions)
        self.assertIn('describes img:1', listing.damaged[VersionRef('img', 4)])


class BackendLoadingTest(base.TestCase):
    def test_unknown_backend_fails_loudly(self):
        self.conf.set_override('backend', 'tape', 'storage')
        error = self.assertRaises(exception.PluginNotFound, backend_mod.load, self.conf)
        self.assertIn("'tape'", str(error))
        self.assertIn('file', str(error))

    def test_file_backend_registers_its_own_options(self):
        store = backend_mod.load(self.conf)
        self.assertEqual(os.path.join(self.state_path, 'warehouse'), store.root)
