"""``vmcloud mirror serve`` refuses bad input by name and leaves nothing behind."""
import os
import random
import signal
import subprocess
import sys

from vmcloud.storage import warehouse
from tests import base

CHUNK = 64 * 1024


class MirrorCliTest(base.TestCase):
    def serve(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, '-m', 'vmcloud.cmd.cli', '--config-file', self.write_config(),
             'mirror', 'serve', *args], capture_output=True, text=True, timeout=60)

    def test_bad_input(self):
        for args, message in ((('vm1', '--image', 'nosuch'), 'image nosuch not found'),
                              (('vm1',), 'mirror vm1 not found'),
                              (('a/b', '--image', 'x'), "invalid mirror name 'a/b'")):
            result = self.serve(*args)
            self.assertEqual(1, result.returncode, result.stderr)
            self.assertIn(message, result.stderr)
            self.assertEqual('', result.stdout)
        mirrors = os.path.join(self.state_path, 'mirrors')
        self.assertEqual([], os.listdir(mirrors) if os.path.exists(mirrors) else [])


class OneOwnerCliTest(base.TestCase):
    """A second ``vmcloud mirror serve`` on a node's state is refused by name; the first
    goes on serving the right bytes and keeps its acknowledged FUA writes."""

    def setUp(self):
        super().setUp()
        self.conf.set_override('chunk_size', CHUNK, 'storage')
        self.image = random.Random(4).randbytes(16 * CHUNK)
        path = os.path.join(self.tmp, 'base.raw')
        with open(path, 'wb') as f:
            f.write(self.image)
        warehouse.Warehouse(self.conf).import_image(path, 'base')

    def config(self, name: str, **mirror: str) -> str:
        path = os.path.join(self.tmp, f'{name}.conf')
        with open(path, 'w') as f:
            f.write(f'[DEFAULT]\nstate_path = {self.state_path}\n'
                    f'[storage]\nchunk_size = {CHUNK}\n[mirror]\n')
            f.writelines(f'{key} = {value}\n' for key, value in mirror.items())
        return path

    def start(self, config: str) -> tuple[subprocess.Popen, str]:
        server = subprocess.Popen(
            [sys.executable, '-m', 'vmcloud.cmd.cli', '--config-file', config, 'mirror',
             'serve', 'vm1', '--image', 'base'], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: server.poll() is None and server.kill())
        uri = server.stdout.readline().strip()
        self.assertEqual('serving', server.stdout.readline().strip(), server.stderr)
        return server, uri

    def read_all(self, uri: str) -> bytes:
        out = os.path.join(self.tmp, 'readback.raw')
        subprocess.run(['nbdcopy', uri, out], check=True, timeout=60)
        with open(out, 'rb') as f:
            return f.read()

    def test_second_server_is_refused_and_the_first_keeps_its_writes(self):
        first, uri = self.start(self.config('first'))
        expected = bytearray(self.image)
        result = subprocess.run(['qemu-io', '-f', 'raw', '-c', f'write -f -P 171 {CHUNK} 4096',
                                 uri], capture_output=True, text=True, timeout=60)
        self.assertEqual(0, result.returncode, result.stderr)
        self.assertNotIn('failed', result.stdout + result.stderr)
        expected[CHUNK:CHUNK + 4096] = bytes([171]) * 4096

        other = os.path.join(self.tmp, 'other')
        attempts = {  # what the second one shares with the first: refused for the first of it
            'chunk cache': self.config('same'),
            'NBD socket': self.config('socket', cache_path=f'{other}/cache'),
            'mirror': self.config('mirror', cache_path=f'{other}/cache',
                                  nbd_socket=f'{other}/nbd.sock'),
        }
        for what, config in attempts.items():
            second = subprocess.run(
                [sys.executable, '-m', 'vmcloud.cmd.cli', '--config-file', config, 'mirror',
                 'serve', 'vm1', '--image', 'base'], capture_output=True, text=True, timeout=60)
            self.assertEqual(1, second.returncode, second.stderr)
            self.assertEqual('', second.stdout)
            self.assertEqual(1, len(second.stderr.splitlines()), second.stderr)
            self.assertIn(f'{what} at ', second.stderr)
            self.assertIn(f'in use by pid {first.pid} (', second.stderr)
            self.assertIn('mirror serve vm1', second.stderr)

        # The first still serves its own mirror, write included...
        self.assertBytesEqual(bytes(expected), self.read_all(uri))
        # ... and the write was durable: it survives kill -9 and a restart.
        first.send_signal(signal.SIGKILL)
        first.wait()
        first.stdout.close()
        first.stderr.close()
        again, uri = self.start(self.config('first'))
        self.assertBytesEqual(bytes(expected), self.read_all(uri))
        again.terminate()
        self.assertEqual(0, again.wait())
