import os
import random
import subprocess
import threading

from vmcloud import exception
from vmcloud.storage import backend as backend_mod
from vmcloud.storage import warehouse
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

    def test_unknown_export_format(self):
        self.assertRaises(exception.StorageError, self.warehouse.export,
                          self.manifest, os.path.join(self.tmp, 'out.vmdk'), 'vmdk')


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


class BackendLoadingTest(base.TestCase):
    def test_unknown_backend_fails_loudly(self):
        self.conf.set_override('backend', 'tape', 'storage')
        error = self.assertRaises(exception.PluginNotFound, backend_mod.load, self.conf)
        self.assertIn("'tape'", str(error))
        self.assertIn('file', str(error))

    def test_file_backend_registers_its_own_options(self):
        store = backend_mod.load(self.conf)
        self.assertEqual(os.path.join(self.state_path, 'warehouse'), store.root)
