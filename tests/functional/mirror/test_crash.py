"""kill -9 of the serving process during writes loses no flushed write.

Every write the server acknowledged (FUA, or followed by an acknowledged flush)
must read back after the kill and a restart, byte for byte; a write refused
while the server was alive fails the test (a server that refuses every write
would otherwise pass); only the one write the kill cut off may have happened or
not, and even then each of its bytes is either the old one or the new one.
"""
import collections
import os
import random
import signal
import subprocess
import sys
import threading
import time

from vmcloud.mirror import cache as cache_mod
from vmcloud.mirror import disk as disk_mod
from vmcloud.storage import warehouse
from tests import base

CHUNK = 64 * 1024
BLOCK = 4096  # [mirror] dirty_block_size's default
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
        """One write of a random size and place, with FUA or followed by a flush: within
        a block, across blocks, whole blocks (no fetch), whole or several chunks."""
        length = rng.choice([512, 20000, BLOCK, 2 * BLOCK, 3 * BLOCK, CHUNK, 3 * CHUNK // 2])
        alignment = BLOCK if length % BLOCK == 0 and rng.random() < 0.7 else 512
        offset = rng.randrange(0, self.size - length) // alignment * alignment
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


# -- kill -9 inside the dirty map's persist -------------------------------------------

# Where in a FLUSH the child kills itself: before the overlay's sync, after it, in the
# middle of the new map's temp file, with the temp file synced, after the rename.
KILL_POINTS = ('before-sync', 'after-sync', 'mid-temp', 'temp-written', 'renamed')
KILL_AT_CALL = (1, 4, 9, 16)  # the Nth time the child reaches the point
WORKLOAD_OPS = 80
IMAGE_CHUNKS = 64


def workload(seed: int) -> list[tuple[str, int, int, int, bool]]:
    """(kind, offset, length, data seed, fua) of the child's operations, scattered
    sub-block, sub-chunk, whole-block and whole-chunk writes and zeroes; every one is
    followed by a flush unless it has FUA, so at most one is unacknowledged at a kill."""
    rng = random.Random(seed)
    size = IMAGE_CHUNKS * CHUNK
    ops = []
    for _ in range(WORKLOAD_OPS):
        length = rng.choice([512, 1000, 3000, BLOCK, 2 * BLOCK, 5 * BLOCK, 20000, CHUNK,
                             3 * CHUNK // 2])
        alignment = BLOCK if length % BLOCK == 0 and rng.random() < 0.7 else 512
        offset = rng.randrange(0, size - length) // alignment * alignment
        kind = 'zeroes' if rng.random() < 0.15 else 'write'
        ops.append((kind, offset, length, rng.randrange(1 << 30), rng.random() < 0.5))
    return ops


def op_data(kind: str, length: int, data_seed: int) -> bytes:
    return bytes(length) if kind == 'zeroes' else random.Random(data_seed).randbytes(length)


def child_main(config: str, directory: str, seed: int, point: str, at_call: int) -> None:
    """Run ``workload(seed)`` on the mirror in ``directory``; print ``ack <n>`` once
    operation n is acknowledged; SIGKILL itself the ``at_call``-th time it reaches
    ``point`` inside a flush."""
    import vmcloud.conf
    from vmcloud.mirror import cache as cache_mod
    from vmcloud.mirror import disk as disk_mod
    from vmcloud.storage import durable

    conf = vmcloud.conf.CONF
    conf(['--config-file', config], project='vmcloud', default_config_files=[])
    store = warehouse.Warehouse(conf)
    cache = cache_mod.ChunkCache(os.path.join(os.path.dirname(directory), 'child-cache'),
                                 1 << 30, store.read_chunk)
    disk = disk_mod.MirrorDisk(directory, store.lookup('base'), cache)
    calls = collections.Counter()
    dirty_path = disk.dirty.path

    def reached(name: str) -> None:
        calls[name] += 1
        if name == point and calls[name] == at_call:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    real_persist, real_write_synced, real_replace = (
        disk.dirty.persist_after, durable.write_synced, os.replace)

    def persist_after(sync):
        def hooked_sync():
            reached('before-sync')
            sync()
            reached('after-sync')
        real_persist(hooked_sync)

    def write_synced(path, data):
        if os.path.dirname(path) == directory:  # the map's temp file
            with open(path, 'xb') as f:
                f.write(data[:len(data) // 2])
            reached('mid-temp')
            os.unlink(path)
        real_write_synced(path, data)
        if os.path.dirname(path) == directory:
            reached('temp-written')

    def replace(source, target):
        real_replace(source, target)
        if target == dirty_path:
            reached('renamed')

    disk.dirty.persist_after = persist_after
    durable.write_synced = write_synced
    os.replace = replace
    for number, (kind, offset, length, data_seed, fua) in enumerate(workload(seed)):
        if kind == 'zeroes':
            disk.write_zeroes(offset, length, fua=fua)
        else:
            disk.write(offset, op_data(kind, length, data_seed), fua=fua)
        if not fua:
            disk.flush()
        print(f'ack {number}', flush=True)
    print('done', flush=True)


class PersistKillTest(base.TestCase):
    """kill -9 at fixed points inside the block dirty map's persist loses no flushed
    write, and the map it leaves names exactly the blocks flushed (plus those of the
    write being flushed, once its map was renamed into place)."""

    def setUp(self):
        super().setUp()
        self.conf.set_override('chunk_size', CHUNK, 'storage')
        rng = random.Random(5)
        self.image = b''.join(rng.randbytes(CHUNK) if rng.random() < 0.6 else bytes(CHUNK)
                              for _ in range(IMAGE_CHUNKS))
        path = os.path.join(self.tmp, 'base.raw')
        with open(path, 'wb') as f:
            f.write(self.image)
        self.store = warehouse.Warehouse(self.conf)
        self.manifest = self.store.import_image(path, 'base').manifest
        self.config = self.write_config(storage={'chunk_size': CHUNK})
        self.directory = os.path.join(self.tmp, 'mirror')
        self.cache = cache_mod.ChunkCache(os.path.join(self.tmp, 'cache'), 1 << 30,
                                          self.store.read_chunk)
        self.addCleanup(self.cache.close)

    def run_child(self, seed: int, point: str, at_call: int) -> list[int]:
        """The operations the child acknowledged before it killed itself."""
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__)))))
        child = subprocess.run(
            [sys.executable, '-m', 'tests.functional.mirror.test_crash', self.config,
             self.directory, str(seed), point, str(at_call)],
            cwd=root, capture_output=True, text=True, timeout=120)
        lines = child.stdout.split()
        self.assertEqual(-signal.SIGKILL, child.returncode,
                         f'{point} #{at_call} not reached: {child.stderr[-2000:]}')
        self.assertNotIn('done', lines)
        return [int(n) for n in lines[1::2]]

    def blocks_of(self, offset: int, length: int) -> dict[int, int]:
        """{chunk: block mask} of the blocks a write of ``offset``+``length`` touches."""
        masks: dict[int, int] = {}
        for block in range(offset // BLOCK, -(-(offset + length) // BLOCK)):
            index = block * BLOCK // CHUNK
            masks[index] = masks.get(index, 0) | 1 << (block - index * CHUNK // BLOCK)
        return masks

    def test_kill_9_inside_persist_loses_no_flushed_write(self):
        model = bytearray(self.image)
        dirty: dict[int, int] = {}  # the blocks flushed so far
        kills = 0
        for round_number, (point, at_call) in enumerate(
                (p, n) for n in KILL_AT_CALL for p in KILL_POINTS):
            seed = 1000 + round_number
            ops = workload(seed)
            acked = self.run_child(seed, point, at_call)
            kills += 1
            self.assertEqual(list(range(len(acked))), acked)
            for kind, offset, length, data_seed, _fua in ops[:len(acked)]:
                model[offset:offset + length] = op_data(kind, length, data_seed)
                for index, mask in self.blocks_of(offset, length).items():
                    dirty[index] = dirty.get(index, 0) | mask
            # The operation whose flush was killed: its blocks are dirty on disk only if
            # the new map was renamed into place.
            kind, offset, length, data_seed, _fua = ops[len(acked)]
            expected_dirty = dict(dirty)
            if point == 'renamed':
                for index, mask in self.blocks_of(offset, length).items():
                    expected_dirty[index] = expected_dirty.get(index, 0) | mask
            disk = disk_mod.MirrorDisk(self.directory, self.manifest, self.cache)
            try:
                self.assertEqual(expected_dirty, disk.dirty.masks(),
                                 f'round {round_number}: {point} #{at_call}')
                actual = disk.read(0, len(model))
            finally:
                disk.close()
            new = op_data(kind, length, data_seed)
            cut = actual[offset:offset + length]
            if point == 'renamed':
                self.assertBytesEqual(new, cut)
            for position in range(length):
                if cut[position] not in (model[offset + position], new[position]):
                    self.fail(f'round {round_number}: byte {offset + position} of the write '
                              f'cut off at {point} is neither old nor new')
            model[offset:offset + length] = cut
            dirty = expected_dirty
            self.assertBytesEqual(bytes(model), actual)
        self.assertEqual(len(KILL_POINTS) * len(KILL_AT_CALL), kills)
        self.assertGreaterEqual(kills, 20)
        # Not vacuous: the workload reached sub-chunk blocks and left whole ones alone.
        self.assertTrue(any(mask != (1 << CHUNK // BLOCK) - 1 for mask in dirty.values()))


if __name__ == '__main__':
    child_main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
