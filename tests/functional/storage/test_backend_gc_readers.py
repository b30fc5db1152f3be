"""A long-lived reader keeps reading while gc rewrites packs in another process.

A compute manager, a mirror or a streaming ``image export -`` holds one
Warehouse for hours; ``vmcloud image gc`` runs meanwhile in a process of its
own and moves the chunks the reader needs to new packs.
"""
import json
import os
import random
import subprocess
import sys

from vmcloud.storage import warehouse
from tests import base

CHUNK = 64 * 1024
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))


class GcInAnotherProcessTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.conf.set_override('chunk_size', CHUNK, 'storage')
        self.config = self.write_config(storage={'chunk_size': CHUNK})
        rng = random.Random(99)
        # 'keep' and 'drop' are imported in one write session each, but 'drop'
        # shares every other chunk with 'keep' only through 'mixed': deleting
        # 'drop' leaves its pack half used, so gc must rewrite it.
        shared = [rng.randbytes(CHUNK) for _ in range(8)]
        own = [rng.randbytes(CHUNK) for _ in range(8)]
        self.keep_data = b''.join(shared)
        self.drop_data = b''.join(s if i % 2 else o for i, (s, o) in enumerate(zip(shared, own)))
        self.store = warehouse.Warehouse(self.conf)  # the long-lived reader
        self.drop = self.store.import_image(self._write('drop.raw', self.drop_data),
                                            'drop').manifest
        self.keep = self.store.import_image(self._write('keep.raw', self.keep_data),
                                            'keep').manifest

    def _write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.tmp, name)
        with open(path, 'wb') as f:
            f.write(data)
        return path

    def _gc_in_child(self) -> dict:
        result = subprocess.run(
            [sys.executable, '-m', 'tests.functional.storage.gc_child', self.config],
            cwd=REPO, capture_output=True, text=True, timeout=120)
        self.assertEqual(0, result.returncode, result.stderr)
        return json.loads(result.stdout)

    def _packs(self) -> set[str]:
        return {n for n in os.listdir(self.store.backend.packs_dir) if n.endswith('.pack')}

    def test_reads_continue_across_gc_in_another_process(self):
        # Every chunk of 'keep' read once, so the reader knows where each one was;
        # half of them sit in 'drop''s pack, deduplicated there at import.
        self.assertBytesEqual(self.keep_data, self.store.read(self.keep, 0, self.keep.size))
        packs_before = self._packs()
        reader = self.store.open(self.keep)  # a streaming export in progress
        self.assertBytesEqual(self.keep_data[:3 * CHUNK], reader.read(3 * CHUNK))
        self.store.delete('drop')

        report = self._gc_in_child()

        self.assertEqual(4, report['removed_chunks'])
        self.assertTrue(packs_before - self._packs(), 'gc rewrote no pack')
        self.assertBytesEqual(self.keep_data[3 * CHUNK:], reader.read())
        self.assertBytesEqual(self.keep_data, self.store.read(self.keep, 0, self.keep.size))
        self.assertEqual(8, sum(1 for _ in self.store.backend.iter_chunks()))
        self.assertTrue(self.store.verify().ok)

    def test_write_after_gc_elsewhere_does_not_dedup_against_removed_chunks(self):
        self.assertBytesEqual(self.drop_data, self.store.read(self.drop, 0, self.drop.size))
        self.store.delete('drop')
        self._gc_in_child()
        # Our instance still remembers 'drop''s own chunks; importing them again
        # must store them again, not name chunks gc just removed.
        again = self.store.import_image(self._write('again.raw', self.drop_data),
                                        'again').manifest
        self.assertBytesEqual(self.drop_data,
                              warehouse.Warehouse(self.conf).read(again, 0, again.size))
