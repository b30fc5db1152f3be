"""The ``vmcloud image`` command, run as a user runs it."""
import json
import os
import random
import subprocess
import sys

from tests import base
from tests import damage


class ImageCliTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.config = self.write_config()
        self.raw = os.path.join(self.tmp, 'disk.raw')
        rng = random.Random(7)
        with open(self.raw, 'wb') as f:
            f.write(rng.randbytes(1024 * 1024))
            f.truncate(4 * 1024 * 1024)

    def vmcloud(self, *args: str, config: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, '-m', 'vmcloud.cmd.cli', '--config-file', config or self.config,
             *args], capture_output=True, timeout=120)

    def json_of(self, *args: str):
        result = self.vmcloud(*args, '-f', 'json')
        self.assertEqual(0, result.returncode, result.stderr)
        return json.loads(result.stdout)

    def test_full_cycle(self):
        imported = self.json_of('image', 'import', self.raw, 'disk', '--format', 'raw')
        self.assertEqual((1, 1024 * 1024), (imported['version'], imported['stored_bytes']))

        modified = os.path.join(self.tmp, 'modified.raw')
        with open(self.raw, 'rb') as src, open(modified, 'wb') as dst:
            dst.write(src.read())
        with open(modified, 'r+b') as f:
            f.seek(3 * 1024 * 1024)
            f.write(b'new data')
        snap = self.json_of('image', 'snapshot', 'disk', modified)
        self.assertEqual(('disk:1', 256 * 1024), (snap['parent'], snap['stored_bytes']))

        listed = self.json_of('image', 'list')
        self.assertEqual([('disk', 1), ('disk', 2)], [(r['image'], r['version']) for r in listed])
        shown = self.json_of('image', 'show', 'disk:2')
        self.assertEqual(4, shown['chunks_shared_with_parent'])

        exported = os.path.join(self.tmp, 'out.qcow2')
        self.json_of('image', 'export', 'disk:2', exported, '--format', 'qcow2')
        compare = subprocess.run(['qemu-img', 'compare', '-F', 'raw', exported, modified],
                                 capture_output=True)
        self.assertEqual(0, compare.returncode, compare.stdout)
        streamed = self.vmcloud('image', 'export', 'disk:1', '-')
        self.assertEqual(0, streamed.returncode)
        with open(self.raw, 'rb') as f:
            self.assertTrue(f.read() == streamed.stdout)

        self.assertTrue(self.json_of('image', 'verify')['ok'])
        refused = self.vmcloud('image', 'rm', 'disk:1')
        self.assertEqual(1, refused.returncode)
        self.assertIn(b'vmcloud: error: disk:1 has dependent snapshots: disk:2', refused.stderr)
        self.json_of('image', 'rm', 'disk:2')
        self.assertEqual(1, self.json_of('image', 'gc')['removed_chunks'])
        stats = self.json_of('image', 'stats')
        self.assertEqual((1, 1, 4), (stats['images'], stats['versions'], stats['chunks']))

    def test_verify_exits_nonzero_on_corruption(self):
        self.json_of('image', 'import', self.raw, 'disk')
        packs = os.path.join(self.state_path, 'warehouse', 'packs')
        [pack] = [name for name in os.listdir(packs) if name.endswith('.pack')]
        damage.flip_bit(os.path.join(packs, pack), 1000)
        result = self.vmcloud('image', 'verify')
        self.assertEqual(1, result.returncode)
        self.assertIn(b'is corrupt', result.stderr)
        self.assertIn(b'used by disk:1', result.stderr)

    def test_clear_errors(self):
        cases = [
            (('image', 'show', 'nothing'), b'image nothing not found'),
            (('image', 'import', '/no/such.raw', 'x'), b'image file /no/such.raw does not exist'),
            (('image', 'export', 'nothing', '-'), b'image nothing not found'),
            (('image', 'import', self.raw, 'bad/name'), b"invalid image name 'bad/name'"),
        ]
        for args, message in cases:
            result = self.vmcloud(*args)
            self.assertEqual(1, result.returncode, args)
            self.assertIn(message, result.stderr)
        unknown = self.write_config(storage={'backend': 'tape'})
        result = self.vmcloud('image', 'list', config=unknown)
        self.assertEqual(1, result.returncode)
        self.assertIn(b"unknown vmcloud.storage.backends plugin 'tape'", result.stderr)
        result = self.vmcloud('image', 'list', config='/no/such.conf')
        self.assertEqual(1, result.returncode)
        self.assertIn(b'/no/such.conf', result.stderr)
        self.assertEqual(['disk.raw', 'state', 'vmcloud.conf'], sorted(os.listdir(self.tmp)))
