"""The ``vmcloud image`` command, run as a user runs it."""
import json
import os
import random
import subprocess
import sys

from vmcloud.storage import delta
from vmcloud.storage import warehouse
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

    def test_rm_of_a_held_version_is_refused_naming_its_holders(self):
        self.json_of('image', 'import', self.raw, 'disk', '--format', 'raw')
        # A mirror on a node holds the version a guest runs on.
        warehouse.Warehouse(self.conf).hold('disk:1', 'mirror.node1.vm-1a2b3c4d-0')
        shown = self.json_of('image', 'show', 'disk:1')
        self.assertEqual(['mirror.node1.vm-1a2b3c4d-0'], shown['holders'])
        for target in ('disk:1', 'disk'):
            refused = self.vmcloud('image', 'rm', target)
            self.assertEqual(1, refused.returncode)
            lines = refused.stderr.decode().splitlines()
            self.assertEqual(1, len(lines), lines)
            self.assertIn('vmcloud: error: image disk', lines[0])
            self.assertIn('is in use by mirror.node1.vm-1a2b3c4d-0', lines[0])
            self.assertIn('--force', lines[0])
        self.assertEqual(1, len(self.json_of('image', 'list')))
        self.assertEqual([{'deleted': 'disk:1'}],
                         self.json_of('image', 'rm', 'disk:1', '--force'))
        self.assertEqual([], self.json_of('image', 'list'))

    def test_a_hold_left_behind_is_released_by_the_operator(self):
        self.json_of('image', 'import', self.raw, 'disk', '--format', 'raw')
        warehouse.Warehouse(self.conf).hold('disk:1', 'mirror.gone.vm-1')
        self.json_of('image', 'release', 'disk:1', 'mirror.gone.vm-1')
        self.assertEqual([], self.json_of('image', 'show', 'disk:1')['holders'])
        self.json_of('image', 'rm', 'disk:1')
        refused = self.vmcloud('image', 'release', 'disk', 'mirror.gone.vm-1')
        self.assertEqual(1, refused.returncode)
        self.assertIn(b'a hold names one version', refused.stderr)

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

    def test_export_into_a_closed_pipe_is_one_line(self):
        big = os.path.join(self.tmp, 'big.raw')
        with open(self.raw, 'rb') as src, open(big, 'wb') as dst:
            dst.write(src.read())
            dst.truncate(64 * 1024 * 1024)  # far more than any pipe buffers
        self.json_of('image', 'import', big, 'disk')
        process = subprocess.Popen(
            [sys.executable, '-m', 'vmcloud.cmd.cli', '--config-file', self.config,
             'image', 'export', 'disk', '-'],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        process.stdout.read(1)  # it has started writing
        process.stdout.close()
        stderr = process.stderr.read()
        process.stderr.close()
        result = subprocess.CompletedProcess(process.args, process.wait(), b'', stderr)
        self.assert_one_line_error(result, b'export of disk:1 to standard output stopped')
        self.assertNotIn(b'Exception ignored', stderr)

    def test_export_of_a_small_image_into_a_closed_pipe_is_one_line(self):
        # Short enough to wait in stdout's buffer, which Python flushes again at exit.
        small = os.path.join(self.tmp, 'small.raw')
        with open(small, 'wb') as f:
            f.write(b'small' * 200)
        self.json_of('image', 'import', small, 'small')
        process = subprocess.Popen(
            [sys.executable, '-m', 'vmcloud.cmd.cli', '--config-file', self.config,
             'image', 'export', 'small', '-'],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        process.stdout.close()  # before it writes anything
        stderr = process.stderr.read()
        process.stderr.close()
        result = subprocess.CompletedProcess(process.args, process.wait(), b'', stderr)
        self.assert_one_line_error(result, b'export of small:1 to standard output stopped')

    def test_damage_stays_local_from_the_command_line(self):
        self.json_of('image', 'import', self.raw, 'disk')
        other = os.path.join(self.tmp, 'other.raw')
        with open(other, 'wb') as f:
            f.write(random.Random(8).randbytes(512 * 1024))
        self.json_of('image', 'import', other, 'other')
        images = os.path.join(self.state_path, 'warehouse', 'images')
        damage.flip_bit(os.path.join(images, 'other', '1.json'), 40)
        os.mkdir(os.path.join(images, 'disk', '2.json'))

        listed = self.vmcloud('image', 'list', '-f', 'json')
        self.assertEqual(0, listed.returncode, listed.stderr)
        self.assertEqual([('disk', 1)], [(r['image'], r['version'])
                                         for r in json.loads(listed.stdout)])
        warnings = listed.stderr.decode().splitlines()
        self.assertEqual(2, len(warnings), warnings)
        self.assertIn('vmcloud: warning: disk:2 is not listed', warnings[0])
        self.assertIn('directory', warnings[0])
        self.assertIn("other:1 is not listed: manifest other:1 is corrupt", warnings[1])
        self.assertIn("'vmcloud image rm other:1' removes it", warnings[1])

        self.assert_one_line_error(self.vmcloud('image', 'show', 'disk:2'), b'disk:2')
        self.assert_one_line_error(self.vmcloud('image', 'show', 'other'), b'other:1 is corrupt')
        self.assert_one_line_error(self.vmcloud('image', 'gc'), b'gc refused',
                                   b'disk:2, other:1', b'vmcloud image rm')
        verify = self.vmcloud('image', 'verify', '-f', 'json')
        self.assertEqual(1, verify.returncode)
        self.assertEqual('disk:2 other:1', json.loads(verify.stdout)['damaged_versions'])
        self.assertEqual(2, len(verify.stderr.splitlines()), verify.stderr)

        self.json_of('image', 'rm', 'other:1')
        self.json_of('image', 'rm', 'disk:2')
        self.assertEqual(2, self.json_of('image', 'gc')['removed_chunks'])  # other's
        self.assertTrue(self.json_of('image', 'verify')['ok'])

    def test_bad_input_is_one_line(self):
        empty = os.path.join(self.tmp, 'empty.raw')
        open(empty, 'wb').close()
        self.json_of('image', 'import', self.raw, 'disk')
        cases = [
            (('image', 'show', 'disk:\u00b2'), b'invalid version'),
            (('image', 'rm', 'disk:\u0663'), b'invalid version'),
            (('image', 'import', self.raw, 'x\n'), b"invalid image name 'x\\n'"),
            (('image', 'import', empty, 'empty'), b'it is empty (0 bytes)'),
        ]
        for args, message in cases:
            self.assert_one_line_error(self.vmcloud(*args), message)
        self.assertEqual([('disk', 1)], [(r['image'], r['version'])
                                         for r in self.json_of('image', 'list')])

    def test_show_counts_a_chunk_stored_as_a_delta_as_not_shared(self):
        self.json_of('image', 'import', self.raw, 'disk', '--format', 'raw')
        store = warehouse.Warehouse(self.conf)
        # Chunk 0 (data) changed in one block: a delta over the parent's chunk.
        snap = store.snapshot_chunks(store.lookup('disk').ref,
                                     {0: delta.BlockChanges(4096, {3: b'x' * 4096})}).manifest
        self.assertTrue(snap.is_delta(0))
        shown = self.json_of('image', 'show', str(snap.ref))
        self.assertEqual(3, shown['chunks_shared_with_parent'])
        # Its child shares the chain whole.
        child = store.snapshot_chunks(snap.ref, {1: b'y' * (256 * 1024)}).manifest
        self.assertEqual(3, self.json_of('image', 'show', str(child.ref))[
            'chunks_shared_with_parent'])

    def test_show_of_a_version_whose_parent_is_damaged(self):
        self.json_of('image', 'import', self.raw, 'disk')
        self.json_of('image', 'snapshot', 'disk', self.raw, '--into', 'kid')
        damage.flip_bit(os.path.join(self.state_path, 'warehouse', 'images', 'disk', '1.json'),
                        40)
        shown = self.json_of('image', 'show', 'kid')
        self.assertEqual('disk:1', shown['parent'])
        self.assertTrue(shown['chunks_shared_with_parent'].startswith(
            'unknown: manifest disk:1 is corrupt'), shown)
