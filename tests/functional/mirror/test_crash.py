"""kill -9 of the serving process during writes loses no flushed write.

Every write the server acknowledged (FUA, or followed by an acknowledged flush)
must read back after the kill and a restart, byte for byte; a write refused
while the server was alive fails the test (a server that refuses every write
would otherwise pass); only the one write the kill cut off may have happened or
not, and even then each of its bytes is either the old one or the new one.
"""
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
        acknowledged = 0
        for round_number in range(ROUNDS):
            uncertain: list[tuple[int, int, int]] = []
            refused: list[tuple[int, int]] = []
            acked: list[int] = []
            stop = threading.Event()
            killing = threading.Event()

            def writer():
                while not stop.is_set():
                    offset, length, pattern, ok = self.write(rng)
                    if not ok:
                        if not killing.is_set():
                            refused.append((offset, length))  # the server was alive
                        uncertain.append((offset, length, pattern))
                        return
                    acked.append(offset)
                    self.model[offset:offset + length] = bytes([pattern]) * length

            thread = threading.Thread(target=writer)
            thread.start()
            time.sleep(rng.uniform(0.1, 1.0))
            killing.set()
            server.send_signal(signal.SIGKILL)
            server.wait()
            stop.set()
            thread.join()
            self.assertEqual([], refused, f'round {round_number}: writes refused')
            acknowledged += len(acked)
            server = self.start_server()
            actual = self.read_all()
            # The write cut off by the kill may or may not have happened, even in part,
            # but each of its bytes is the old one or the new one.
            for offset, length, pattern in uncertain:
                for position in range(offset, offset + length):
                    if actual[position] not in (self.model[position], pattern):
                        self.fail(f'round {round_number}: byte {position} of an unfinished '
                                  f'write is {actual[position]}, neither old nor new')
                self.model[offset:offset + length] = actual[offset:offset + length]
            self.assertBytesEqual(bytes(self.model), actual)
        # Not vacuous: most rounds had acknowledged writes to lose.
        self.assertGreaterEqual(acknowledged, ROUNDS)
        server.terminate()
        self.assertEqual(0, server.wait())
