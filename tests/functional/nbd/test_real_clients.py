"""The NBD server against real clients: qemu-img, qemu-io, nbdcopy and nbdinfo."""
import errno
import json
import os
import random
import subprocess

from tests import base
from tests.unit.nbd import BLOCK
from tests.unit.nbd import MemoryDevice
from vmcloud.nbd import file_device
from vmcloud.nbd import server as server_mod

MIB = 1024 * 1024
SIZE = 8 * MIB


def run(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f'{" ".join(command)} failed ({result.returncode}): '
                             f'{result.stdout}{result.stderr}')
    return result


class RealClientTest(base.TestCase):
    def setUp(self):
        super().setUp()
        rng = random.Random(5)
        # 1 MiB data, 2 MiB hole, 1 MiB data, then a hole to the end.
        self.raw = os.path.join(self.tmp, 'disk.raw')
        self.content = bytearray(SIZE)
        with open(self.raw, 'wb') as f:
            for offset in (0, 3 * MIB):
                chunk = rng.randbytes(MIB)
                self.content[offset:offset + MIB] = chunk
                f.seek(offset)
                f.write(chunk)
            f.truncate(SIZE)
        self.file_device = file_device.FileDevice(self.raw)
        self.addCleanup(self.file_device.close)
        self.memory = MemoryDevice(SIZE)
        self.server = server_mod.NbdServer()
        self.addCleanup(self.server.stop)
        self.server.add_export('file', self.file_device)
        self.server.add_export('memory', self.memory, 'scratch space')
        self.socket = os.path.join(self.tmp, 'nbd.sock')
        self.server.listen_unix(self.socket)
        self.port = self.server.listen_tcp()
        self.server.start()

    def uri(self, export: str, tcp: bool = False) -> str:
        if tcp:
            return f'nbd://127.0.0.1:{self.port}/{export}'
        return f'nbd+unix:///{export}?socket={self.socket}'

    def read_file(self, path: str) -> bytes:
        with open(path, 'rb') as f:
            return f.read()

    def test_qemu_img_compare_and_convert_read_exactly_the_bytes(self):
        for tcp in (False, True):
            run('qemu-img', 'compare', '-f', 'raw', '-F', 'raw', self.raw,
                self.uri('file', tcp))
            out = os.path.join(self.tmp, f'out-{tcp}.raw')
            run('qemu-img', 'convert', '-f', 'raw', '-O', 'raw', self.uri('file', tcp), out)
            self.assertBytesEqual(bytes(self.content), self.read_file(out))

    def test_qemu_img_compare_notices_a_difference(self):
        with open(self.raw, 'r+b') as f:
            f.seek(5 * MIB)
            f.write(b'!')
        result = run('qemu-img', 'compare', '-f', 'raw', '-F', 'raw', self.raw,
                     self.uri('memory'), check=False)
        self.assertEqual(1, result.returncode, result.stderr)

    def test_nbdcopy_reads_exactly_the_bytes(self):
        for tcp in (False, True):
            out = os.path.join(self.tmp, f'copy-{tcp}.raw')
            run('nbdcopy', self.uri('file', tcp), out)
            self.assertBytesEqual(bytes(self.content), self.read_file(out))

    def test_nbdcopy_with_four_connections(self):
        out = os.path.join(self.tmp, 'copy.raw')
        # nbdcopy drops to one connection unless the server advertises multi-conn.
        result = run('nbdcopy', '-v', '--connections=4', '--threads=4', self.uri('file'), out)
        self.assertIn('connections=4', result.stderr)
        self.assertBytesEqual(bytes(self.content), self.read_file(out))
        # And writing through four connections, then reading back through one.
        run('nbdcopy', '--connections=4', '--threads=4', '--flush', self.raw,
            self.uri('memory'))
        self.assertBytesEqual(bytes(self.content), bytes(self.memory.data))
        self.assertIn(('flush',), self.memory.calls)

    def map(self, export: str) -> list[tuple[int, int, int]]:
        result = run('nbdinfo', '--map', '--json', self.uri(export))
        return [(e['offset'], e['length'], e['type']) for e in json.loads(result.stdout)]

    def test_nbdinfo_map_shows_holes(self):
        self.assertEqual([(0, MIB, 0), (MIB, 2 * MIB, 3), (3 * MIB, MIB, 0),
                          (4 * MIB, 4 * MIB, 3)], self.map('file'))
        self.memory.write(2 * MIB, b'x')
        self.assertEqual(
            [(0, 2 * MIB, 3), (2 * MIB, BLOCK, 0), (2 * MIB + BLOCK, 6 * MIB - BLOCK, 3)],
            self.map('memory'))

    def test_qemu_io_writes_zeroes_discards_and_flushes(self):
        for export, device, before in (('memory', self.memory, bytes(SIZE)),
                                       ('file', self.file_device, self.content)):
            run('qemu-io', '-f', 'raw',
                '-c', 'write -P 0xab 0 64k',
                '-c', 'write -f -P 0xcd 64k 64k',
                '-c', f'write -z {MIB} {MIB}',
                '-c', f'discard {3 * MIB} {MIB}',
                '-c', 'flush',
                self.uri(export))
            expected = bytearray(before)
            expected[0:BLOCK] = b'\xab' * BLOCK
            expected[BLOCK:2 * BLOCK] = b'\xcd' * BLOCK
            expected[3 * MIB:4 * MIB] = bytes(MIB)
            actual = device.read(0, SIZE)
            self.assertBytesEqual(bytes(expected), actual)
            # qemu-io reads back through the server and checks the patterns itself.
            result = run('qemu-io', '-f', 'raw', '-r',
                         '-c', 'read -P 0xab 0 64k', '-c', 'read -P 0xcd 64k 64k',
                         '-c', f'read -P 0 {3 * MIB} {MIB}', self.uri(export))
            self.assertNotIn('fail', result.stdout + result.stderr)
        self.assertIn(('flush',), self.memory.calls)
        self.assertIn(('write', BLOCK, BLOCK, True), self.memory.calls)  # the FUA write
        # Zeroed and discarded ranges of the file became holes, merging with the old ones.
        self.assertEqual([(0, MIB, 0), (MIB, 7 * MIB, 3)], self.map('file'))

    def test_device_error_reaches_the_client_and_the_connection_goes_on(self):
        self.memory.failures['read'] = OSError(errno.EIO, 'the store is on fire')
        result = run('qemu-io', '-f', 'raw', '-r', '-c', 'read 0 4k', self.uri('memory'),
                     check=False)
        self.assertIn('Input/output error', result.stdout + result.stderr)
        del self.memory.failures['read']
        result = run('qemu-io', '-f', 'raw', '-r', '-c', 'read -P 0 0 4k', self.uri('memory'))
        self.assertNotIn('fail', result.stdout + result.stderr)

    def test_wrong_export_name_fails_with_the_name(self):
        result = run('nbdinfo', self.uri('no-such-disk'), check=False)
        self.assertNotEqual(0, result.returncode)
        self.assertIn('no-such-disk', result.stderr)
        result = run('qemu-img', 'info', self.uri('no-such-disk'), check=False)
        self.assertNotEqual(0, result.returncode)

    def test_list_names_exports(self):
        for tcp in (False, True):
            result = run('nbdinfo', '--list', self.uri('', tcp))
            self.assertIn('export="file"', result.stdout)
            self.assertIn('export="memory"', result.stdout)
            self.assertIn('scratch space', result.stdout)

    def test_nbdinfo_reports_size_and_capabilities(self):
        result = run('nbdinfo', '--json', self.uri('memory'))
        info = json.loads(result.stdout)
        export = info['exports'][0]
        self.assertEqual(SIZE, export['export-size'])
        self.assertTrue(export['can_multi_conn'])
        self.assertTrue(export['can_zero'])
        self.assertTrue(export['can_trim'])
        self.assertTrue(export['can_fua'])
        self.assertFalse(export['is_read_only'])
        self.assertIn('base:allocation', export['contexts'])

    def test_read_only_file_export(self):
        self.server.add_export('ro', file_device.FileDevice(self.raw, read_only=True))
        # qemu honours the read-only flag: it will not even open the export for writing.
        result = run('qemu-io', '-f', 'raw', '-c', 'write 0 4k', self.uri('ro'), check=False)
        self.assertNotEqual(0, result.returncode)
        self.assertIn('Permission denied', result.stderr)
        out = os.path.join(self.tmp, 'copy.raw')
        run('nbdcopy', self.uri('ro'), out)
        self.assertBytesEqual(bytes(self.content), self.read_file(out))
        self.assertBytesEqual(bytes(self.content), self.read_file(self.raw))
