"""SIGKILL at many points of import, snapshot and gc never corrupts the warehouse."""
import os
import random
import shutil
import signal
import subprocess
import sys

from vmcloud.storage import manifest as manifest_mod
from vmcloud.storage import warehouse
from tests import base

CHUNK = 64 * 1024
KILL_POINTS = 24
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))


class CrashSafetyTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.conf.set_override('chunk_size', CHUNK, 'storage')
        self.config = self.write_config(storage={'chunk_size': CHUNK})
        self.rng = random.Random(1234)
        shared = self.rng.randbytes(16 * CHUNK)
        # 'base' shares its first 16 chunks with 'new', so the crashing import
        # deduplicates against chunks that are already stored.
        self.base_raw = self._write('base.raw', shared + self.rng.randbytes(16 * CHUNK))
        self.new_raw = self._write('new.raw', shared + bytes(8 * CHUNK)
                                   + self.rng.randbytes(40 * CHUNK))
        warehouse.Warehouse(self.conf).import_image(self.base_raw, 'base')
        self.template = os.path.join(self.tmp, 'template')
        shutil.copytree(self.state_path, self.template)

    def _write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.tmp, name)
        with open(path, 'wb') as f:
            f.write(data)
        return path

    def _reset_state(self) -> None:
        shutil.rmtree(self.state_path)
        shutil.copytree(self.template, self.state_path)

    def _run_child(self, kill_at: int, *operation: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, '-m', 'tests.functional.storage.crash_child',
             self.config, str(kill_at), *operation],
            cwd=REPO, capture_output=True, text=True, timeout=120)

    def _count_calls(self, *operation: str) -> int:
        result = self._run_child(0, *operation)
        self.assertEqual(0, result.returncode, result.stderr)
        return int(result.stdout.split()[-1])

    def _kill_points(self, total: int) -> list[int]:
        """Evenly spread points plus random ones, always including the first and last call."""
        points = {1, total} | {1 + i * (total - 1) // (KILL_POINTS // 2)
                               for i in range(KILL_POINTS // 2)}
        while len(points) < min(KILL_POINTS, total):
            points.add(self.rng.randint(1, total))
        return sorted(points)

    def _assert_consistent(self, store: warehouse.Warehouse, expected: dict[str, bytes]) -> None:
        """Every visible version is whole and correct, and every stored chunk is intact."""
        report = store.verify()
        self.assertTrue(report.ok, report.problems)
        for chunk_id, _ in store.backend.iter_chunks():
            self.assertEqual(chunk_id, manifest_mod.chunk_id(store.backend.read_chunk(chunk_id)),
                             'a chunk under chunks/ is not what its name says')
        for image in store.images():
            manifest = store.manifest(image)
            self.assertIn(image, expected)
            self.assertBytesEqual(expected[image], store.read(manifest, 0, manifest.size))

    def _expected(self, *paths_by_name: tuple[str, str]) -> dict[str, bytes]:
        expected = {}
        for name, path in paths_by_name:
            with open(path, 'rb') as f:
                expected[name] = f.read()
        return expected

    def test_kill_during_import(self):
        expected = self._expected(('base', self.base_raw), ('new', self.new_raw))
        total = self._count_calls('import', self.new_raw, 'new')
        outcomes = {'visible': 0, 'absent': 0}
        for kill_at in self._kill_points(total):
            self._reset_state()
            result = self._run_child(kill_at, 'import', self.new_raw, 'new')
            self.assertEqual(-signal.SIGKILL, result.returncode,
                             f'child did not die at call {kill_at}: {result.stderr}')
            store = warehouse.Warehouse(self.conf)
            self._assert_consistent(store, expected)
            outcomes['visible' if 'new' in store.images() else 'absent'] += 1
            # gc cleans up after the crash, and the import then succeeds.
            store.gc()
            self.assertEqual([], os.listdir(store.backend.staging_dir))
            self._assert_consistent(store, expected)
            if 'new' not in store.images():
                store.import_image(self.new_raw, 'new')
            self._assert_consistent(store, expected)
        self.assertGreaterEqual(sum(outcomes.values()), 20)
        # Kills before the manifest landed leave nothing; only the very last calls
        # (after the manifest's link) leave the version visible.
        self.assertGreater(outcomes['absent'], 0)
        self.assertGreater(outcomes['visible'], 0)

    def test_kill_during_snapshot(self):
        modified = bytearray(open(self.base_raw, 'rb').read())
        for _ in range(5):
            offset = self.rng.randrange(len(modified) - 100)
            modified[offset:offset + 100] = self.rng.randbytes(100)
        modified_raw = self._write('modified.raw', bytes(modified))
        total = self._count_calls('snapshot', 'base', '1', modified_raw)
        expected_base = self._expected(('base', self.base_raw))['base']
        for kill_at in self._kill_points(total):
            self._reset_state()
            result = self._run_child(kill_at, 'snapshot', 'base', '1', modified_raw)
            self.assertEqual(-signal.SIGKILL, result.returncode, result.stderr)
            store = warehouse.Warehouse(self.conf)
            versions = store.versions('base')
            self.assertBytesEqual(expected_base, store.read(versions[0], 0, versions[0].size))
            if len(versions) == 2:
                self.assertBytesEqual(bytes(modified),
                                      store.read(versions[1], 0, versions[1].size))
            self.assertTrue(store.verify().ok)

    def test_kill_during_gc(self):
        store = warehouse.Warehouse(self.conf)
        store.import_image(self.new_raw, 'new')
        store.snapshot_chunks(store.manifest('base').ref, {3: b'x' * CHUNK, 20: b'y' * CHUNK})
        # base:1's pack keeps the 16 chunks 'new' shares: gc must rewrite it.
        store.delete('base')
        # An abandoned write session, as a crashed import leaves it.
        store.backend.begin_write().put_chunk('e' * 64, b'abandoned')
        shutil.rmtree(self.template)
        shutil.copytree(self.state_path, self.template)
        expected = self._expected(('new', self.new_raw))
        total = self._count_calls('gc')
        for kill_at in self._kill_points(total):
            self._reset_state()
            result = self._run_child(kill_at, 'gc')
            self.assertEqual(-signal.SIGKILL, result.returncode, result.stderr)
            store = warehouse.Warehouse(self.conf)
            self._assert_consistent(store, expected)
            store.gc()
            self._assert_consistent(store, expected)
            # Only new:1's 16 + 40 chunks survive, however far the killed gc got.
            self.assertEqual(56, len(list(store.backend.iter_chunks())))
            self.assertEqual(56 * CHUNK, sum(
                os.path.getsize(os.path.join(store.backend.packs_dir, name))
                for name in os.listdir(store.backend.packs_dir) if name.endswith('.pack')))
            self.assertEqual([], os.listdir(store.backend.staging_dir))
