"""kill -9 of the serving process during writes loses no flushed write."""
import os
import random
import signal
import subprocess
import sys
import threading
import time

from vmcloud.storage import warehouse
from tests import base

CHUNK = 64 * 1024
ROUNDS = 24


class ServerKillTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.conf.set_override('chunk_size', CHUNK, 'storage')
        rng = random.Random(11)
        self.size = 64 * CHUNK
        self.model = bytearray(b''.join(rng.randbytes(CHUNK) if rng.random() < 0.6
                                        else bytes(CHUNK) for _ in range(64)))
        path = os.path.join(self.tmp, 'base.raw')
        with open(path, 'wb') as f:
            f.write(self.model)
        warehouse.Warehouse(self.conf).import_image(path, 'base')
        self.config = self.write_config(storage={'chunk_size': CHUNK})
        self.uri = None
        self.server_log = open(os.path.join(self.tmp, 'server.log'), 'a')
        self.addCleanup(self.server_log.close)

    def start_server(self) -> subprocess.Popen:
        server = subprocess.Popen(
            [sys.executable, '-m', 'vmcloud.cmd.cli', '--config-file', self.config,
             'mirror', 'serve', 'vm1', '--image', 'base'],
            stdout=subprocess.PIPE, stderr=self.server_log, text=True)
        self.addCleanup(lambda: server.poll() is None and server.kill())
        self.uri = server.stdout.readline().strip()
        if server.stdout.readline().strip() != 'serving':
            server.kill()
            server.wait()
            with open(self.server_log.name) as f:
                self.fail(f'the mirror server did not start: {f.read()}')
        return server

    def read_all(self) -> bytes:
        out = os.path.join(self.tmp, 'readback.raw')
        subprocess.run(['nbdcopy', self.uri, out], check=True, timeout=60)
        with open(out, 'rb') as f:
            return f.read()

    def write(self, rng: random.Random) -> tuple[int, int, int, str]:
        """One write of a random size and place, with FUA or followed by a flush."""
        length = rng.choice([512, 4096, 20000, CHUNK, 3 * CHUNK // 2])
        offset = rng.randrange(0, self.size - length) // 512 * 512
        pattern = rng.randrange(1, 256)
        how = rng.choice(['fua', 'flush'])
        commands = ['-c', f'write -P {pattern} {"-f " if how == "fua" else ""}{offset} {length}']
        if how == 'flush':
            commands += ['-c', 'flush']
        result = subprocess.run(['qemu-io', '-f', 'raw', *commands, self.uri],
                                capture_output=True, text=True, timeout=60)
        ok = result.returncode == 0 and 'failed' not in result.stdout + result.stderr
        return offset, length, pattern, ok

    def test_flushed_writes_survive_kill_9(self):
        rng = random.Random(2024)
        server = self.start_server()
        self.assertBytesEqual(bytes(self.model), self.read_all())
        for _ in range(ROUNDS):
            uncertain: list[tuple[int, int]] = []
            stop = threading.Event()

            def writer():
                while not stop.is_set():
                    offset, length, pattern, ok = self.write(rng)
                    if not ok:
                        uncertain.append((offset, length))
                        return
                    self.model[offset:offset + length] = bytes([pattern]) * length

            thread = threading.Thread(target=writer)
            thread.start()
            time.sleep(rng.uniform(0.1, 1.0))
            server.send_signal(signal.SIGKILL)
            server.wait()
            stop.set()
            thread.join()
            server = self.start_server()
            actual = self.read_all()
            # A write cut off by the kill may or may not have happened: take what is there.
            for offset, length in uncertain:
                self.model[offset:offset + length] = actual[offset:offset + length]
            self.assertBytesEqual(bytes(self.model), actual)
        server.terminate()
        self.assertEqual(0, server.wait())
