"""Real NBD clients (nbdcopy, qemu-img, qemu-io, nbdinfo) reading and writing mirrors."""
import json
import os
import random
import subprocess

from vmcloud import exception
from vmcloud.mirror import manager as manager_mod
from vmcloud.storage import warehouse
from tests import base

CHUNK = 64 * 1024


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=60)


class MirrorClientsTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.conf.set_override('chunk_size', CHUNK, 'storage')
        self.warehouse = warehouse.Warehouse(self.conf)
        rng = random.Random(3)
        self.image = b''.join(rng.randbytes(CHUNK) if kind == 'r' else bytes(CHUNK)
                              for kind in 'rrhhrhrrrrhh' * 8) + rng.randbytes(1000)
        self.path = os.path.join(self.tmp, 'image.raw')
        with open(self.path, 'wb') as f:
            f.write(self.image)
        self.manifest = self.warehouse.import_image(self.path, 'img').manifest
        self.manager = manager_mod.MirrorManager(self.conf, self.warehouse)
        self.addCleanup(self.manager.close)
        self.mirror = self.manager.create('vm1', 'img')

    def test_nbdcopy_and_qemu_img_read_exactly_the_image(self):
        out = os.path.join(self.tmp, 'copy.raw')
        run('nbdcopy', '--connections=4', self.mirror.uri, out)
        with open(out, 'rb') as f:
            self.assertBytesEqual(self.image, f.read())
        run('qemu-img', 'compare', '-f', 'raw', '-F', 'raw', self.path, self.mirror.uri)
        # Each distinct data chunk came from the warehouse once, for both clients.
        self.assertEqual(len(self.manifest.data_chunk_ids()),
                         self.manager.cache.stats.fetched_chunks)

    def test_holes_stay_holes(self):
        extents = json.loads(run('nbdinfo', '--map', '--json', self.mirror.uri).stdout)
        holes = sum(e['length'] for e in extents if e['type'] & 1)
        self.assertEqual(sum(CHUNK for c in self.manifest.chunks if c is None), holes)
        self.assertEqual(0, self.manager.cache.stats.fetched_chunks)

    def test_qemu_io_writes_land_in_the_dirty_set(self):
        uri = self.mirror.uri
        result = run('qemu-io', '-f', 'raw', '-c', f'write -P 0xab {CHUNK + 512} 4096',
                     '-c', f'write -z {4 * CHUNK} {CHUNK}', '-c', 'flush', uri)
        self.assertNotIn('failed', result.stdout + result.stderr)
        self.assertEqual({1, 4}, self.mirror.disk.dirty.indexes())
        expected = bytearray(self.image)
        expected[CHUNK + 512:CHUNK + 4608] = b'\xab' * 4096
        expected[4 * CHUNK:5 * CHUNK] = bytes(CHUNK)
        out = os.path.join(self.tmp, 'copy.raw')
        run('nbdcopy', uri, out)
        with open(out, 'rb') as f:
            self.assertBytesEqual(bytes(expected), f.read())

    def test_wrong_export_name_is_named(self):
        uri = self.mirror.uri.replace('vm1', 'nosuchvm')
        result = run('nbdinfo', uri, check=False)
        self.assertNotEqual(0, result.returncode)
        self.assertIn('nosuchvm', result.stderr)

    def test_a_vanished_warehouse_gives_eio_then_recovers(self):
        store = self.warehouse.backend.root  # as an unmounted network share would
        os.rename(store, store + '.gone')
        try:
            result = run('qemu-io', '-f', 'raw', '-c', 'read 0 4096', self.mirror.uri, check=False)
            self.assertIn('Input/output error', result.stdout + result.stderr)
        finally:
            os.rename(store + '.gone', store)
        result = run('qemu-io', '-f', 'raw', '-c', 'read -P 0 %d %d' % (2 * CHUNK, CHUNK),
                     '-c', 'read 0 4096', self.mirror.uri)
        self.assertNotIn('error', result.stdout + result.stderr)
        self.assertEqual(self.image[:4096], self.mirror.disk.read(0, 4096))

    def test_duplicate_and_unknown_mirrors(self):
        self.assertRaises(exception.MirrorExists, self.manager.create, 'vm1', 'img')
        self.assertRaises(exception.MirrorNotFound, self.manager.open, 'vm9')
        self.assertRaises(exception.ImageNotFound, self.manager.create, 'vm2', 'nosuch')
        self.assertFalse(os.path.exists(os.path.join(self.conf.mirror.mirrors_path, 'vm2')))
