"""A node's state has one owner: a second process is refused by name and changes nothing."""
import errno
import os
import signal
import subprocess
import sys
import textwrap
from unittest import mock

from tests.unit.mirror.test_disk import CHUNK
from tests.unit.mirror.test_disk import MirrorTestCase
from tests.unit.mirror.test_disk import abandon
from tests.unit.nbd import MemoryDevice
from tests.unit.nbd.test_protocol import RawClient
from vmcloud import exception
from vmcloud.mirror import cache as cache_mod
from vmcloud.mirror import disk as disk_mod
from vmcloud.mirror import manager as manager_mod
from vmcloud.nbd import protocol as p
from vmcloud.nbd import server as server_mod
from vmcloud.nbd import statelock

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
REFUSED = 3


class OwnershipTest(MirrorTestCase):
    def other_process(self, body: str, *args: str) -> subprocess.CompletedProcess:
        """Run ``body`` in a second Python process; it exits REFUSED on StateLocked."""
        script = textwrap.dedent('''
            import sys
            from vmcloud import exception
            try:
            {body}
            except exception.StateLocked as exc:
                print(exc, file=sys.stderr)
                sys.exit({refused})
        ''').format(body=textwrap.indent(textwrap.dedent(body), '    '), refused=REFUSED)
        return subprocess.run([sys.executable, '-c', script, *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    def assertRefusedByUs(self, result: subprocess.CompletedProcess, what: str) -> None:
        self.assertEqual(REFUSED, result.returncode, result.stderr)
        self.assertIn(f'{what} at ', result.stderr)
        # Named: our pid and our command line.
        self.assertIn(f'in use by pid {os.getpid()} (', result.stderr)
        with open('/proc/self/cmdline', 'rb') as f:
            command = f.read().split(b'\0')
        self.assertIn(' '.join(a.decode() for a in command[:3]), result.stderr)

    def test_a_second_process_cannot_open_the_chunk_cache(self):
        disk = self.new_disk()
        self.assertBytesEqual(self.image[:CHUNK], disk.read(0, CHUNK))
        result = self.other_process('''
            from vmcloud.mirror import cache
            cache.ChunkCache(sys.argv[1], 1 << 30, lambda chunk_id: b'someone else')
            print('opened')
        ''', self.cache.path)
        self.assertRefusedByUs(result, 'chunk cache')
        # The owner goes on: its slots hold its chunks, and new chunks still come in.
        self.assertBytesEqual(self.image, disk.read(0, len(self.image)))
        disk.close()

    def test_a_second_process_cannot_open_a_mirror_and_a_fua_write_survives(self):
        disk = self.new_disk()
        disk.write(3 * CHUNK, b'F' * 100, fua=True)
        m = self.manifest
        result = self.other_process('''
            from vmcloud.mirror import disk
            from vmcloud.storage import manifest
            size, chunk_size, count = map(int, sys.argv[2:])
            # Were it let in, its first flush would replace our dirty map with its own.
            mirror = disk.MirrorDisk(sys.argv[1], manifest.Manifest(
                'img', 1, size, chunk_size, (None,) * count), cache=None)
            mirror.write(0, b'x', fua=True)
        ''', disk.directory, str(m.size), str(m.chunk_size), str(m.chunk_count))
        self.assertRefusedByUs(result, 'mirror')
        abandon(disk)  # no last flush: only what FUA made durable counts
        reopened = self.new_disk(self.new_cache(name='after'))
        self.assertEqual({3}, reopened.dirty.indexes())
        self.assertEqual(b'F' * 100, reopened.read(3 * CHUNK, 100))
        reopened.close()

    def test_a_second_process_cannot_take_over_the_nbd_socket(self):
        device = MemoryDevice(1 << 20, data=bytes(range(256)) * 4096)
        server = server_mod.NbdServer(max_workers=2)
        self.addCleanup(server.stop)
        server.add_export('disk', device)
        path = os.path.join(self.tmp, 'nbd.sock')
        server.listen_unix(path)
        server.start()
        inode = os.stat(path).st_ino
        result = self.other_process('''
            from vmcloud.nbd import server
            other = server.NbdServer()
            other.listen_unix(sys.argv[1])
            print('listening')
        ''', path)
        self.assertRefusedByUs(result, 'NBD socket')
        # Our socket was neither removed nor replaced, and our clients are ours.
        self.assertEqual(inode, os.stat(path).st_ino)
        client = RawClient(path)
        self.addCleanup(client.close)
        client.hello()
        self.assertEqual(p.REP_ACK, client.go('disk')[-1][0])
        client.request(p.CMD_READ, 4096 + 10, 6, cookie=1)
        self.assertEqual((0, 1, bytes(range(10, 16))), client.simple_reply(6))
        # Stopping removes the socket, then gives up the lock: the next owner listens.
        server.stop()
        self.assertFalse(os.path.exists(path))
        with server_mod.NbdServer() as successor:
            successor.listen_unix(path)

    def test_a_dead_owner_leaves_no_lock_behind(self):
        path = os.path.join(self.tmp, 'held')
        owner = subprocess.Popen(
            [sys.executable, '-c', textwrap.dedent('''
                import sys, time
                from vmcloud.mirror import cache
                cache.ChunkCache(sys.argv[1], 1 << 30, lambda chunk_id: b'')
                print('owner', flush=True)
                time.sleep(120)
            '''), path, 'marker-argument'], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        self.addCleanup(lambda: owner.poll() is None and owner.kill())
        self.assertEqual('owner\n', owner.stdout.readline())
        error = self.assertRaises(exception.StateLocked, cache_mod.ChunkCache, path, 1 << 30,
                                  self.fetch)
        self.assertEqual(f'{path}/lock', error.path)
        self.assertIn(f'pid {owner.pid} ', error.holder)
        self.assertIn('marker-argument', error.holder)
        self.assertNotIn('\n', error.holder)  # its -c script, on one line
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        owner.stdout.close()
        cache = cache_mod.ChunkCache(path, 1 << 30, self.fetch)  # no cleanup needed first
        cache.close()

    def test_one_owner_within_a_process_too(self):
        self.assertRaises(exception.StateLocked, cache_mod.ChunkCache, self.cache.path,
                          1 << 30, self.fetch)
        disk = self.new_disk()
        self.assertRaises(exception.StateLocked, self.new_disk)
        disk.close()
        self.new_disk().close()  # closing gave it up

    def test_removing_a_mirror_deletes_it_then_gives_up_its_lock(self):
        disk = self.new_disk()
        disk.write(0, b'w', fua=True)
        disk.remove()
        self.assertFalse(os.path.exists(disk.directory))
        fresh = disk_mod.MirrorDisk(disk.directory, self.manifest, self.cache)
        self.assertEqual(set(), fresh.dirty.indexes())
        fresh.close()

    def test_lock_file_names_its_holder(self):
        path = os.path.join(self.tmp, 'thing.lock')
        with statelock.StateLock('thing', path) as lock:
            self.assertTrue(lock.held)
            with open(path) as f:
                self.assertTrue(f.read().startswith(f'pid {os.getpid()} ('))
        self.assertFalse(lock.held)
        statelock.StateLock('thing', path).release()

    def test_a_refused_manager_gives_back_what_it_took(self):
        root = os.path.join(self.tmp, 'node')
        os.makedirs(root)
        holder = server_mod.NbdServer()
        self.addCleanup(holder.stop)
        holder.listen_unix(os.path.join(root, 'nbd.sock'))
        error = self.assertRaises(exception.StateLocked, manager_mod.MirrorManager, self.conf,
                                  self.warehouse, root=root)
        self.assertEqual('NBD socket', error.what)
        # The cache it had taken before the socket was refused is free again.
        cache_mod.ChunkCache(os.path.join(root, 'chunk-cache'), 1 << 30, self.fetch).close()
        holder.stop()
        with manager_mod.MirrorManager(self.conf, self.warehouse, root=root) as node:
            self.assertEqual(self.image[:10], node.create('vm1', 'img').disk.read(0, 10))

    def test_a_mirror_that_fails_to_close_does_not_keep_the_node_locked(self):
        root = os.path.join(self.tmp, 'node')
        node = manager_mod.MirrorManager(self.conf, self.warehouse, root=root)
        for name in ('vm1', 'vm2', 'vm3'):
            node.create(name, 'img').disk.write(0, name.encode(), fua=True)
        broken = node.get('vm2').disk
        flush = broken.flush
        broken.flush = mock.Mock(side_effect=OSError(errno.EIO, 'I/O error'))
        error = self.assertRaises(OSError, node.close)
        self.assertEqual(errno.EIO, error.errno)
        broken.flush = flush
        # The others were closed, the socket removed and everything given up.
        self.assertFalse(os.path.exists(os.path.join(root, 'nbd.sock')))
        with manager_mod.MirrorManager(self.conf, self.warehouse, root=root) as successor:
            for name in ('vm1', 'vm2', 'vm3'):
                disk = successor.open(name).disk
                self.assertEqual(name.encode(), disk.read(0, 3))

    def test_a_full_disk_does_not_leave_an_unreleasable_lock(self):
        path = os.path.join(self.tmp, 'thing.lock')
        with open(path, 'w') as f:
            f.write('pid 1 (a dead owner)\n')
        with mock.patch('os.pwrite', side_effect=OSError(errno.ENOSPC, 'No space left')):
            lock = statelock.StateLock('thing', path)
        self.assertTrue(lock.held)
        # Still exclusive, and no dead owner's name in the refusal.
        error = self.assertRaises(exception.StateLocked, statelock.StateLock, 'thing', path)
        self.assertEqual('another process', error.holder)
        lock.release()
        statelock.StateLock('thing', path).release()
