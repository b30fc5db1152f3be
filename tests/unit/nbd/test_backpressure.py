"""Memory bounds of the NBD server against clients that send and never read."""
import errno
import os
import socket
import threading
import time

import fixtures

from tests import base
from tests.unit.nbd import MemoryDevice
from tests.unit.nbd.test_protocol import RawClient
from vmcloud.nbd import device
from vmcloud.nbd import protocol as p
from vmcloud.nbd import server as server_mod

MIB = 1024 * 1024
SIZE = 256 * MIB
READS = 200


class PatternDevice(device.BlockDevice):
    """256 MiB whose every byte is its MiB number, without storing them."""

    def __init__(self):
        self.reads = 0
        self.statuses = 0
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return SIZE

    @property
    def read_only(self) -> bool:
        return True

    def read(self, offset: int, length: int) -> bytes:
        buffer = bytearray(length)
        self.read_into(offset, memoryview(buffer))
        return bytes(buffer)

    def read_into(self, offset: int, buffer: memoryview) -> None:
        with self._lock:
            self.reads += 1
        buffer[:] = bytes([(offset // MIB) & 0xff]) * len(buffer)

    def block_status(self, offset: int, length: int) -> list[device.Extent]:
        """Data and holes by turns every 512 bytes: 8 bytes of reply per 512 asked."""
        with self._lock:
            self.statuses += 1
        hole = device.STATE_HOLE | device.STATE_ZERO
        return [device.Extent(512, hole * (i % 2)) for i in range(length // 512)]

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        raise OSError(1, 'read-only')

    write_zeroes = write

    def flush(self) -> None:
        pass


class BackPressureTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.device = PatternDevice()
        self.server = server_mod.NbdServer(max_workers=4, max_connection_bytes=4 * MIB,
                                           max_buffered_bytes=6 * MIB)
        self.addCleanup(self.server.stop)
        self.server.add_export('disk', self.device)
        self.memory = MemoryDevice(4 * MIB)
        self.server.add_export('memory', self.memory)
        self.path = os.path.join(self.tmp, 'nbd.sock')
        self.server.listen_unix(self.path)
        self.server.start()

    def connect(self, name: str = 'disk', allocation: bool = False) -> RawClient:
        client = RawClient(self.path)
        self.addCleanup(client.close)
        # Small kernel buffers, so that what the server holds is what it buffers itself.
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        client.hello()
        if allocation:
            client.option(p.OPT_STRUCTURED_REPLY)
            self.assertEqual(p.REP_ACK, client.option_reply()[1])
            replies = client.meta_context(p.OPT_SET_META_CONTEXT, name, 'base:allocation')
            self.assertEqual(p.REP_ACK, replies[-1][0])
        self.assertEqual(p.REP_ACK, client.go(name)[-1][0])
        return client

    def flood(self, client: RawClient, reads: int = READS) -> None:
        """Many 1 MiB reads in one go; the replies are never read."""
        client.sock.sendall(b''.join(
            p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_READ, i, (i % 200) * MIB, MIB)
            for i in range(reads)))

    def peak_until_quiet(self, progress=None) -> int:
        """The largest ``buffered_bytes`` seen until the device stops being used."""
        progress = progress or (lambda: self.device.reads)
        peak, last, quiet = 0, -1, 0
        deadline = time.monotonic() + 30
        while quiet < 25 and time.monotonic() < deadline:
            peak = max(peak, self.server.buffered_bytes)
            reads = progress()
            quiet = quiet + 1 if reads == last else 0
            last = reads
            time.sleep(0.02)
        return max(peak, self.server.buffered_bytes)

    def wait_for(self, condition, what: str) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f'still waiting for {what}')
            time.sleep(0.01)

    def test_a_client_that_never_reads_holds_at_most_its_budget(self):
        hostile = self.connect()
        self.flood(hostile)
        peak = self.peak_until_quiet()
        self.assertGreater(peak, 0)
        self.assertLessEqual(peak, self.server.max_connection_bytes)
        # It stopped reading requests: most of the flood was never served.
        self.assertLess(self.device.reads, READS // 2)

        # Everyone else is still served, with the right bytes.
        other = self.connect()
        other.request(p.CMD_READ, 7 * MIB + 100, 4096, cookie=77)
        self.assertEqual((0, 77, bytes([7]) * 4096), other.simple_reply(4096))
        writer = self.connect('memory')
        writer.request(p.CMD_WRITE, 0, 5, cookie=78, payload=b'hello')
        self.assertEqual((0, 78, b''), writer.simple_reply())

        # Gone: every byte it held is released, and an idle server pools nothing.
        hostile.close()
        other.close()
        writer.close()
        self.wait_for(lambda: self.server.buffered_bytes == 0, 'the charges to end')
        self.wait_for(lambda: self.server.pooled_bytes == 0, 'the pool to empty')

    def test_the_server_holds_at_most_its_budget_across_connections(self):
        clients = [self.connect() for _ in range(4)]
        for client in clients:
            self.flood(client)
        peak = self.peak_until_quiet()
        self.assertGreater(peak, self.server.max_connection_bytes)  # more than one held some
        self.assertLessEqual(peak, self.server.max_buffered_bytes)
        for client in clients:
            client.close()
        self.wait_for(lambda: self.server.buffered_bytes == 0, 'the charges to end')
        client = self.connect()
        client.request(p.CMD_READ, 3 * MIB, 512, cookie=5)
        self.assertEqual((0, 5, bytes([3]) * 512), client.simple_reply(512))

    def test_write_payloads_count_while_the_device_is_slow(self):
        memory = MemoryDevice(64 * MIB)
        gate = threading.Event()
        self.addCleanup(gate.set)
        original = memory.write

        def slow_write(offset, data, fua=False):
            gate.wait(30)
            original(offset, data, fua)

        memory.write = slow_write
        self.server.add_export('slow', memory)
        client = self.connect('slow')
        payload = bytes(MIB)
        sender = threading.Thread(target=lambda: [
            client.request(p.CMD_WRITE, i * MIB, MIB, cookie=i, payload=payload)
            for i in range(40)], daemon=True)
        sender.start()
        self.wait_for(lambda: self.server.buffered_bytes >= 3 * MIB, 'payloads to arrive')
        time.sleep(0.3)  # let any payloads beyond the budget arrive, if the server read them
        self.assertLessEqual(self.server.buffered_bytes, self.server.max_connection_bytes)
        gate.set()
        replies = [client.simple_reply() for _ in range(40)]
        self.assertEqual([0] * 40, [error for error, _, _ in replies])
        sender.join(10)
        self.wait_for(lambda: self.server.buffered_bytes == 0, 'the charges to end')

    def test_block_status_replies_count_by_their_size(self):
        client = self.connect(allocation=True)
        # A reply stops at 8192 extents (64 KiB); the client asks again for the rest.
        client.request(p.CMD_BLOCK_STATUS, 0, 8 * MIB, cookie=1)
        flags, kind, cookie, payload = client.chunk()
        self.assertEqual((p.REPLY_TYPE_BLOCK_STATUS, 1), (kind, cookie))
        self.assertEqual(4 + 8 * 8192, len(payload))
        self.assertEqual((512, 3), p.BLOCK_DESCRIPTOR.unpack_from(payload, len(payload) - 8))
        client.request(p.CMD_READ, MIB, 4, cookie=2)
        self.assertEqual((p.REPLY_FLAG_DONE, p.REPLY_TYPE_OFFSET_DATA, 2),
                         client.chunk()[:3])  # still in step
        self.device.statuses = 0
        requests = 2000  # 64 KiB of reply each: 125 MiB if the server read them all
        client.sock.sendall(b''.join(
            p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_BLOCK_STATUS, i, 0, 8 * MIB)
            for i in range(requests)))
        self.wait_for(lambda: self.device.statuses > 0, 'block status to be served')
        peak = self.peak_until_quiet(lambda: self.device.statuses)
        self.assertLessEqual(peak, self.server.max_connection_bytes)
        self.assertLess(self.device.statuses, requests // 4)
        client.close()
        self.wait_for(lambda: self.server.buffered_bytes == 0, 'the charges to end')

    def test_error_replies_count_with_their_message(self):
        client = self.connect('memory', allocation=True)  # structured: errors carry text
        self.memory.failures['read'] = OSError(5, 'the disk is on fire ' * 100)
        requests = 30000  # about 1 KiB of reply each
        client.sock.sendall(b''.join(
            p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_READ, i, 0, 1) for i in range(requests)))
        peak = self.peak_until_quiet(lambda: len(self.memory.calls))
        self.assertLessEqual(peak, self.server.max_connection_bytes)
        self.assertLess(len(self.memory.calls), requests // 2)

    def test_a_client_gone_in_the_middle_of_a_payload_leaves_no_charge(self):
        client = self.connect('memory')
        client.sock.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_WRITE, 1, 0, MIB)
                            + bytes(MIB // 2))
        self.wait_for(lambda: self.server.buffered_bytes > MIB, 'the write to be charged')
        client.close()
        self.wait_for(lambda: self.server.buffered_bytes == 0, 'the charge to end')

    def test_a_read_is_charged_for_the_buffer_it_holds(self):
        # A read into a pooled buffer holds a power of two: 2 MiB for 1 MiB and a byte.
        entered, gate = threading.Event(), threading.Event()
        self.addCleanup(gate.set)
        original = self.device.read_into

        def slow_read_into(offset, buffer):
            entered.set()
            gate.wait(30)
            original(offset, buffer)

        self.device.read_into = slow_read_into
        client = self.connect()
        client.request(p.CMD_READ, 5 * MIB, MIB + 1, cookie=9)
        self.assertTrue(entered.wait(30))
        self.assertGreaterEqual(self.server.buffered_bytes, 2 * MIB)
        gate.set()
        self.assertEqual((0, 9, bytes([5]) * (MIB + 1)), client.simple_reply(MIB + 1))
        self.wait_for(lambda: self.server.buffered_bytes == 0, 'the charge to end')

    def test_a_connection_lost_to_a_timeout_gives_back_its_charges(self):
        # A TCP peer whose host died: the kernel ends the connection with ETIMEDOUT.
        logs = self.useFixture(fixtures.FakeLogger(name='vmcloud.nbd.server'))
        hostile = self.connect()
        self.flood(hostile)
        self.peak_until_quiet()
        self.assertGreater(self.server.buffered_bytes, 0)
        (connection,) = self.server._connections
        lost = TimeoutError(errno.ETIMEDOUT, 'Connection timed out')
        self.server._loop.call_soon_threadsafe(connection.writer.transport._force_close, lost)
        self.wait_for(lambda: self.server.buffered_bytes == 0, 'the charges to end')
        self.wait_for(lambda: not self.server._connections, 'the connection to end')
        # An idle client lost the same way: one line in the log, not a traceback.
        idle = self.connect()
        idle.request(p.CMD_READ, 0, 512, cookie=1)
        self.assertEqual((0, 1, bytes(512)), idle.simple_reply(512))
        (connection,) = self.server._connections
        self.server._loop.call_soon_threadsafe(connection.writer.transport._force_close, lost)
        self.wait_for(lambda: not self.server._connections, 'the idle connection to end')
        self.assertNotIn('Traceback', logs.output)
        self.assertIn('lost: [Errno 110] Connection timed out', logs.output)
