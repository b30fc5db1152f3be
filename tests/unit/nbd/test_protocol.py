"""The NBD server driven byte by byte by a tiny raw-socket client."""
import errno
import os
import socket
import struct
import threading
import time

import fixtures

from tests import base
from tests.unit.nbd import BLOCK
from tests.unit.nbd import FastMemoryDevice
from tests.unit.nbd import MemoryDevice
from vmcloud import exception
from vmcloud.nbd import protocol as p
from vmcloud.nbd import server as server_mod

SIZE = 1024 * 1024


class RawClient:
    """Speaks just enough NBD to poke at the server; every read has a timeout."""

    def __init__(self, address: str | tuple[str, int]):
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(address)

    def close(self) -> None:
        self.sock.close()

    def recv(self, n: int) -> bytes:
        data = b''
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError(f'server closed after {len(data)} of {n} bytes')
            data += chunk
        return data

    def closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1) == b''
        except ConnectionResetError:
            return True

    def hello(self, flags: int = p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES) -> int:
        magic, opt_magic, server_flags = p.HELLO.unpack(self.recv(p.HELLO.size))
        assert (magic, opt_magic) == (p.NBDMAGIC, p.IHAVEOPT)
        self.sock.sendall(struct.pack('>I', flags))
        return server_flags

    def option(self, option: int, payload: bytes = b'', length: int | None = None) -> None:
        self.sock.sendall(p.OPTION_HEADER.pack(
            p.IHAVEOPT, option, len(payload) if length is None else length) + payload)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, option, reply, length = p.OPTION_REPLY.unpack(self.recv(p.OPTION_REPLY.size))
        assert magic == p.OPTION_REPLY_MAGIC
        return option, reply, self.recv(length)

    def replies(self) -> list[tuple[int, bytes]]:
        """Replies to one option up to its ACK or error."""
        replies = []
        while True:
            _, reply, payload = self.option_reply()
            replies.append((reply, payload))
            if reply == p.REP_ACK or reply & (1 << 31):
                return replies

    def go(self, name: str, option: int = p.OPT_GO, infos: tuple = ()) -> list:
        encoded = name.encode()
        self.option(option, struct.pack('>I', len(encoded)) + encoded
                    + struct.pack(f'>H{len(infos)}H', len(infos), *infos))
        return self.replies()

    def meta_context(self, option: int, name: str, *queries: str) -> list:
        payload = struct.pack('>I', len(name)) + name.encode() + struct.pack('>I', len(queries))
        for query in queries:
            payload += struct.pack('>I', len(query)) + query.encode()
        self.option(option, payload)
        return self.replies()

    def request(self, command: int, offset: int = 0, length: int = 0, flags: int = 0,
                cookie: int = 1, payload: bytes = b'') -> None:
        self.sock.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, flags, command, cookie, offset,
                                         length) + payload)

    def simple_reply(self, data_length: int = 0) -> tuple[int, int, bytes]:
        magic, error, cookie = p.SIMPLE_REPLY.unpack(self.recv(p.SIMPLE_REPLY.size))
        assert magic == p.SIMPLE_REPLY_MAGIC, hex(magic)
        return error, cookie, self.recv(data_length) if not error and data_length else b''

    def chunk(self) -> tuple[int, int, int, bytes]:
        """One reply chunk of either kind: (flags, type, cookie, payload); simple = type -1."""
        (magic,) = struct.unpack('>I', self.recv(4))
        if magic == p.SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack('>IQ', self.recv(12))
            return 0, -1, cookie, struct.pack('>I', error)
        assert magic == p.STRUCTURED_REPLY_MAGIC, hex(magic)
        flags, kind, cookie, length = struct.unpack('>HHQI', self.recv(16))
        return flags, kind, cookie, self.recv(length)


class ServerTestCase(base.TestCase):
    device_class = MemoryDevice

    def setUp(self):
        super().setUp()
        self.logs = self.useFixture(fixtures.FakeLogger(name='vmcloud.nbd.server'))
        self.device = self.device_class(SIZE)
        self.server = server_mod.NbdServer(max_workers=8)
        self.addCleanup(self.server.stop)
        self.server.add_export('disk', self.device, 'a test disk')
        self.path = os.path.join(self.tmp, 'nbd.sock')
        self.server.listen_unix(self.path)
        self.server.start()

    def client(self) -> RawClient:
        client = RawClient(self.path)
        self.addCleanup(client.close)
        return client

    def connect(self, name: str = 'disk', structured: bool = False,
                allocation: bool = False) -> RawClient:
        client = self.client()
        client.hello()
        if structured:
            client.option(p.OPT_STRUCTURED_REPLY)
            self.assertEqual(p.REP_ACK, client.option_reply()[1])
        if allocation:
            replies = client.meta_context(p.OPT_SET_META_CONTEXT, name, 'base:allocation')
            self.assertEqual(p.REP_ACK, replies[-1][0])
        replies = client.go(name)
        self.assertEqual(p.REP_ACK, replies[-1][0], replies)
        return client

    def error_of(self, client: RawClient) -> int:
        """The error of the next reply, simple or structured."""
        flags, kind, _, payload = client.chunk()
        if kind == -1:
            return struct.unpack('>I', payload)[0]
        self.assertEqual(p.REPLY_TYPE_ERROR, kind)
        self.assertTrue(flags & p.REPLY_FLAG_DONE)
        return struct.unpack_from('>I', payload)[0]


class HandshakeTest(ServerTestCase):
    def test_hello_offers_fixed_newstyle_and_no_zeroes(self):
        flags = self.client().hello()
        self.assertEqual(p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES, flags)

    def test_unknown_export_reply_names_it_and_connection_goes_on(self):
        client = self.client()
        client.hello()
        replies = client.go('no-such-disk')
        self.assertEqual(1, len(replies))
        reply, message = replies[0]
        self.assertEqual(p.REP_ERR_UNKNOWN, reply)
        self.assertIn(b'no-such-disk', message)
        self.assertEqual(p.REP_ACK, client.go('disk')[-1][0])

    def test_info_reports_size_flags_and_block_sizes(self):
        client = self.client()
        client.hello()
        replies = client.go('disk', p.OPT_INFO,
                            (p.INFO_BLOCK_SIZE, p.INFO_NAME, p.INFO_DESCRIPTION))
        infos = {struct.unpack_from('>H', payload)[0]: payload for reply, payload in replies
                 if reply == p.REP_INFO}
        _, size, flags = p.INFO_EXPORT_REPLY.unpack(infos[p.INFO_EXPORT])
        self.assertEqual(SIZE, size)
        for flag in (p.TFLAG_HAS_FLAGS, p.TFLAG_SEND_FLUSH, p.TFLAG_SEND_FUA, p.TFLAG_SEND_TRIM,
                     p.TFLAG_SEND_WRITE_ZEROES, p.TFLAG_CAN_MULTI_CONN):
            self.assertTrue(flags & flag, flag)
        self.assertFalse(flags & (p.TFLAG_READ_ONLY | p.TFLAG_SEND_DF))
        self.assertEqual((p.INFO_BLOCK_SIZE, 1, 4096, 32 * 1024 * 1024),
                         p.INFO_BLOCK_SIZE_REPLY.unpack(infos[p.INFO_BLOCK_SIZE]))
        self.assertEqual(b'disk', infos[p.INFO_NAME][2:])
        self.assertEqual(b'a test disk', infos[p.INFO_DESCRIPTION][2:])
        self.assertEqual(p.REP_ACK, replies[-1][0])
        # INFO leaves the client in negotiation: it can still GO.
        self.assertEqual(p.REP_ACK, client.go('disk')[-1][0])

    def test_unknown_option_is_unsupported(self):
        client = self.client()
        client.hello()
        for option in (99, p.OPT_STARTTLS, p.OPT_PEEK_EXPORT):
            client.option(option, b'xyz')
            self.assertEqual((option, p.REP_ERR_UNSUP), client.option_reply()[:2])
        self.assertEqual(p.REP_ACK, client.go('disk')[-1][0])

    def test_malformed_payloads_get_invalid(self):
        client = self.client()
        client.hello()
        bad = [
            (p.OPT_GO, struct.pack('>I', 100) + b'disk'),      # name runs past the end
            (p.OPT_GO, struct.pack('>I', 4) + b'disk' + struct.pack('>H', 3)),  # missing infos
            (p.OPT_INFO, b'\x00'),
            (p.OPT_LIST, b'junk'),
            (p.OPT_STRUCTURED_REPLY, b'junk'),
            (p.OPT_LIST_META_CONTEXT, struct.pack('>I', 4) + b'disk' + struct.pack('>I', 2)),
            (p.OPT_GO, struct.pack('>I', 2) + b'\xff\xfe' + struct.pack('>H', 0)),  # not UTF-8
        ]
        for option, payload in bad:
            client.option(option, payload)
            self.assertEqual((option, p.REP_ERR_INVALID), client.option_reply()[:2], payload)
        self.assertEqual(p.REP_ACK, client.go('disk')[-1][0])

    def test_oversized_option_is_refused_and_skipped(self):
        client = self.client()
        client.hello()
        client.option(p.OPT_GO, b'x' * (p.MAX_OPTION_PAYLOAD + 1))
        self.assertEqual((p.OPT_GO, p.REP_ERR_TOO_BIG), client.option_reply()[:2])
        self.assertEqual(p.REP_ACK, client.go('disk')[-1][0])

    def test_list_names_every_export(self):
        self.server.add_export('other', MemoryDevice(4096))
        client = self.client()
        client.hello()
        client.option(p.OPT_LIST)
        replies = client.replies()
        self.assertEqual(p.REP_ACK, replies[-1][0])
        names = []
        for reply, payload in replies[:-1]:
            self.assertEqual(p.REP_SERVER, reply)
            (length,) = struct.unpack_from('>I', payload)
            names.append(payload[4:4 + length].decode())
        self.assertEqual(['disk', 'other'], names)

    def test_export_name_for_unknown_export_hangs_up(self):
        client = self.client()
        client.hello()
        client.option(p.OPT_EXPORT_NAME, b'no-such-disk')
        self.assertTrue(client.closed_by_server())

    def test_export_name_sends_size_and_flags(self):
        for flags, padding in ((p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES, 0),
                               (p.FLAG_FIXED_NEWSTYLE, 124)):
            client = self.client()
            client.hello(flags)
            client.option(p.OPT_EXPORT_NAME, b'disk')
            size, transmission = p.EXPORT_NAME_REPLY.unpack(client.recv(10))
            self.assertEqual(SIZE, size)
            self.assertTrue(transmission & p.TFLAG_HAS_FLAGS)
            self.assertEqual(bytes(padding), client.recv(padding))
            client.request(p.CMD_READ, 0, 16, cookie=9)
            self.assertEqual((0, 9, bytes(16)), client.simple_reply(16))

    def test_abort_is_acknowledged_then_closed(self):
        client = self.client()
        client.hello()
        client.option(p.OPT_ABORT)
        self.assertEqual((p.OPT_ABORT, p.REP_ACK), client.option_reply()[:2])
        self.assertTrue(client.closed_by_server())

    def test_unknown_client_flags_hang_up(self):
        client = self.client()
        client.hello(0x80)
        self.assertTrue(client.closed_by_server())

    def test_meta_contexts(self):
        client = self.client()
        client.hello()
        for queries in ((), ('base:',), ('base:allocation',)):
            replies = client.meta_context(p.OPT_LIST_META_CONTEXT, 'disk', *queries)
            self.assertEqual([(p.REP_META_CONTEXT, struct.pack('>I', 1) + b'base:allocation'),
                              (p.REP_ACK, b'')], replies, queries)
        replies = client.meta_context(p.OPT_LIST_META_CONTEXT, 'disk', 'qemu:dirty-bitmap:x')
        self.assertEqual([(p.REP_ACK, b'')], replies)
        replies = client.meta_context(p.OPT_LIST_META_CONTEXT, 'nope', 'base:allocation')
        self.assertEqual(p.REP_ERR_UNKNOWN, replies[0][0])
        self.assertIn(b'nope', replies[0][1])
        # Selecting needs structured replies first.
        replies = client.meta_context(p.OPT_SET_META_CONTEXT, 'disk', 'base:allocation')
        self.assertEqual(p.REP_ERR_INVALID, replies[0][0])

    def test_silent_client_is_dropped_after_the_handshake_timeout(self):
        self.server.handshake_timeout = 0.2
        client = self.client()
        client.hello()
        self.assertTrue(client.closed_by_server())


class TransmissionTest(ServerTestCase):
    def test_write_then_read(self):
        client = self.connect()
        client.request(p.CMD_WRITE, 4096, 5, cookie=7, payload=b'hello')
        self.assertEqual((0, 7, b''), client.simple_reply())
        client.request(p.CMD_READ, 4094, 9, cookie=8)
        self.assertEqual((0, 8, b'\0\0hello\0\0'), client.simple_reply(9))

    def test_fua_flush_trim_and_zeroes_reach_the_device(self):
        client = self.connect()
        client.request(p.CMD_WRITE, 0, 3, flags=p.CMD_FLAG_FUA, payload=b'abc')
        client.request(p.CMD_FLUSH, cookie=2)
        client.request(p.CMD_WRITE_ZEROES, BLOCK, BLOCK, flags=p.CMD_FLAG_FUA, cookie=3)
        client.request(p.CMD_TRIM, 2 * BLOCK, BLOCK, cookie=4)
        self.assertEqual([0, 0, 0, 0], sorted(client.simple_reply()[0] for _ in range(4)))
        calls = set(self.device.calls)
        self.assertLessEqual({('write', 0, 3, True), ('flush',),
                              ('write_zeroes', BLOCK, BLOCK, True),
                              ('trim', 2 * BLOCK, BLOCK)}, calls)
        self.assertEqual(b'abc', bytes(self.device.data[:3]))

    def test_out_of_range_requests(self):
        client = self.connect()
        cases = [(p.CMD_READ, SIZE - 10, 11, p.EINVAL),
                 (p.CMD_READ, 2 ** 63, 1, p.EINVAL),
                 (p.CMD_TRIM, SIZE, 1, p.EINVAL),
                 (p.CMD_WRITE_ZEROES, SIZE - 1, 2, p.ENOSPC),
                 (p.CMD_READ, 0, 32 * 1024 * 1024 + 1, p.EINVAL),
                 (42, 0, 0, p.EINVAL)]
        for command, offset, length, error in cases:
            client.request(command, offset, length)
            self.assertEqual(error, client.simple_reply()[0], (command, offset, length))
        # Oversized and out-of-range writes still have their payload consumed, so
        # the stream stays in step.
        big = p.BLOCK_SIZE_MAX + 1
        client.request(p.CMD_WRITE, 0, big, cookie=4, payload=bytes(big))
        self.assertEqual((p.EINVAL, 4, b''), client.simple_reply())
        client.request(p.CMD_WRITE, SIZE - 2, 4, cookie=5, payload=b'abcd')
        self.assertEqual((p.ENOSPC, 5, b''), client.simple_reply())
        client.request(p.CMD_READ, 0, 4, cookie=6)
        self.assertEqual((0, 6, bytes(4)), client.simple_reply(4))
        self.assertNotIn('write', [call[0] for call in self.device.calls])

    def test_read_only_export_refuses_writes(self):
        self.server.add_export('ro', MemoryDevice(SIZE, read_only=True))
        client = self.client()
        client.hello()
        replies = client.go('ro', p.OPT_INFO)
        _, _, flags = p.INFO_EXPORT_REPLY.unpack(replies[0][1])
        self.assertTrue(flags & p.TFLAG_READ_ONLY)
        self.assertEqual(p.REP_ACK, client.go('ro')[-1][0])
        client.request(p.CMD_WRITE, 0, 2, payload=b'no')
        client.request(p.CMD_WRITE_ZEROES, 0, 2)
        client.request(p.CMD_TRIM, 0, 2)
        self.assertEqual([p.EPERM] * 3, [client.simple_reply()[0] for _ in range(3)])

    def test_device_errors_become_nbd_errors_and_the_connection_survives(self):
        client = self.connect()
        cases = [(OSError(errno.EIO, 'disk on fire'), p.EIO),
                 (OSError(errno.ENOSPC, 'full'), p.ENOSPC),
                 (OSError(errno.EPERM, 'no'), p.EPERM),
                 (OSError(errno.EBADF, 'odd'), p.EIO),
                 (exception.ChunkNotFound('abc'), p.EIO),
                 (RuntimeError('bug'), p.EIO)]
        for failure, error in cases:
            self.device.failures['read'] = failure
            client.request(p.CMD_READ, 0, 512, cookie=3)
            self.assertEqual((error, 3, b''), client.simple_reply(512), failure)
        # Failures the device did not describe with an errno are logged.
        self.assertIn('chunk abc is missing', self.logs.output)
        self.assertIn('RuntimeError: bug', self.logs.output)
        self.device.failures['flush'] = OSError(errno.EIO, 'flush failed')
        client.request(p.CMD_FLUSH, cookie=4)
        self.assertEqual(p.EIO, client.simple_reply()[0])
        self.device.failures.clear()
        client.request(p.CMD_READ, 0, 512, cookie=5)
        self.assertEqual((0, 5, bytes(512)), client.simple_reply(512))

    def test_short_read_from_device_is_eio_not_a_broken_stream(self):
        client = self.connect()
        self.device.short_reads = True
        client.request(p.CMD_READ, 0, 512, cookie=3)
        self.assertEqual((p.EIO, 3, b''), client.simple_reply())
        self.device.short_reads = False
        client.request(p.CMD_READ, 0, 512, cookie=4)
        self.assertEqual((0, 4, bytes(512)), client.simple_reply(512))

    def test_requests_are_served_concurrently(self):
        client = self.connect()
        gate = self.device.gates[0] = threading.Event()
        self.device.write(4096, b'x' * 16)
        client.request(p.CMD_READ, 0, 16, cookie=1)
        client.request(p.CMD_READ, 4096, 16, cookie=2)
        # The second read overtakes the first, which the gate holds in the device.
        self.assertEqual((0, 2, b'x' * 16), client.simple_reply(16))
        gate.set()
        self.assertEqual((0, 1, bytes(16)), client.simple_reply(16))

    def test_disconnect_waits_for_replies_in_flight(self):
        client = self.connect()
        gate = self.device.gates[0] = threading.Event()
        client.request(p.CMD_READ, 0, 16, cookie=1)
        client.request(p.CMD_DISC)
        threading.Timer(0.2, gate.set).start()
        self.assertEqual((0, 1, bytes(16)), client.simple_reply(16))
        self.assertTrue(client.closed_by_server())

    def test_bad_request_magic_hangs_up(self):
        client = self.connect()
        client.sock.sendall(b'\0' * p.REQUEST.size)
        self.assertTrue(client.closed_by_server())


class FastReadTransmissionTest(TransmissionTest):
    """The same, through the read_into fast path that file-backed devices take."""
    device_class = FastMemoryDevice

    def test_reads_take_the_fast_path(self):
        client = self.connect()
        client.request(p.CMD_READ, 8, 16)
        self.assertEqual((0, 1, bytes(16)), client.simple_reply(16))
        self.assertIn(('read_into', 8, 16), self.device.calls)


class StructuredTest(ServerTestCase):
    def test_read_is_one_offset_data_chunk(self):
        client = self.connect(structured=True)
        self.device.write(100, b'data')
        client.request(p.CMD_READ, 98, 8, cookie=11)
        flags, kind, cookie, payload = client.chunk()
        self.assertEqual((p.REPLY_FLAG_DONE, p.REPLY_TYPE_OFFSET_DATA, 11), (flags, kind, cookie))
        self.assertEqual(struct.pack('>Q', 98) + b'\0\0data\0\0', payload)

    def test_error_chunk_carries_a_message(self):
        client = self.connect(structured=True)
        self.device.failures['read'] = OSError(errno.ENOSPC, 'the store is full')
        client.request(p.CMD_READ, 0, 8, cookie=12)
        flags, kind, cookie, payload = client.chunk()
        self.assertEqual((p.REPLY_FLAG_DONE, p.REPLY_TYPE_ERROR, 12), (flags, kind, cookie))
        error, length = p.ERROR_PAYLOAD.unpack_from(payload)
        self.assertEqual(p.ENOSPC, error)
        self.assertIn(b'the store is full', payload[6:6 + length])

    def test_df_is_advertised_with_structured_replies(self):
        client = self.client()
        client.hello()
        client.option(p.OPT_STRUCTURED_REPLY)
        client.option_reply()
        _, _, flags = p.INFO_EXPORT_REPLY.unpack(client.go('disk')[0][1])
        self.assertTrue(flags & p.TFLAG_SEND_DF)

    def block_status(self, client: RawClient, offset: int, length: int,
                     flags: int = 0) -> list[tuple[int, int]]:
        client.request(p.CMD_BLOCK_STATUS, offset, length, flags=flags, cookie=13)
        reply_flags, kind, cookie, payload = client.chunk()
        self.assertEqual((p.REPLY_FLAG_DONE, p.REPLY_TYPE_BLOCK_STATUS, 13),
                         (reply_flags, kind, cookie))
        self.assertEqual(1, struct.unpack_from('>I', payload)[0])
        body = payload[4:]
        return [p.BLOCK_DESCRIPTOR.unpack_from(body, i) for i in range(0, len(body), 8)]

    def test_block_status_reports_holes(self):
        client = self.connect(structured=True, allocation=True)
        self.device.write(BLOCK, b'x')
        hole = device_hole = 3
        self.assertEqual([(BLOCK, hole), (BLOCK, 0), (2 * BLOCK, device_hole)],
                         self.block_status(client, 0, 4 * BLOCK))
        self.assertEqual([(BLOCK - 10, hole)],
                         self.block_status(client, 10, 4 * BLOCK, p.CMD_FLAG_REQ_ONE))
        # Never longer than asked, even when the extent goes on.
        self.assertEqual([(100, 0)], self.block_status(client, BLOCK, 100))

    def test_block_status_needs_the_context(self):
        client = self.connect(structured=True)
        client.request(p.CMD_BLOCK_STATUS, 0, 4096)
        self.assertEqual(p.EINVAL, self.error_of(client))

    def test_context_set_for_another_export_does_not_count(self):
        self.server.add_export('other', MemoryDevice(4096))
        client = self.client()
        client.hello()
        client.option(p.OPT_STRUCTURED_REPLY)
        client.option_reply()
        client.meta_context(p.OPT_SET_META_CONTEXT, 'other', 'base:allocation')
        self.assertEqual(p.REP_ACK, client.go('disk')[-1][0])
        client.request(p.CMD_BLOCK_STATUS, 0, 4096)
        self.assertEqual(p.EINVAL, self.error_of(client))

    def test_failing_block_status_is_eio(self):
        client = self.connect(structured=True, allocation=True)
        self.device.failures['block_status'] = exception.VmcloudError('store unreachable')
        client.request(p.CMD_BLOCK_STATUS, 0, 4096)
        self.assertEqual(p.EIO, self.error_of(client))
        del self.device.failures['block_status']
        self.assertEqual([(4096, 3)], self.block_status(client, 0, 4096))


class FastReadStructuredTest(StructuredTest):
    device_class = FastMemoryDevice


class LifecycleTest(ServerTestCase):
    def test_remove_export_closes_its_connections_only(self):
        self.server.add_export('other', MemoryDevice(4096))
        doomed = self.connect('disk')
        kept = self.connect('other')
        self.server.remove_export('disk')
        self.assertTrue(doomed.closed_by_server())
        kept.request(p.CMD_READ, 0, 4, cookie=2)
        self.assertEqual((0, 2, bytes(4)), kept.simple_reply(4))
        client = self.client()
        client.hello()
        self.assertEqual(p.REP_ERR_UNKNOWN, client.go('disk')[0][0])
        self.assertRaises(exception.NbdError, self.server.remove_export, 'disk')

    def test_duplicate_export_is_refused(self):
        self.assertRaises(exception.NbdError, self.server.add_export, 'disk', MemoryDevice(1))

    def test_tcp_and_context_manager(self):
        with server_mod.NbdServer() as server:
            server.add_export('disk', self.device)
            port = server.listen_tcp()
            self.assertGreater(port, 0)
            client = RawClient(('127.0.0.1', port))
            self.addCleanup(client.close)
            client.hello()
            self.assertEqual(p.REP_ACK, client.go('disk')[-1][0])
        self.assertTrue(client.closed_by_server())
        server.stop()  # idempotent

    def test_stop_closes_connections_and_the_socket(self):
        client = self.connect()
        started = time.monotonic()
        self.server.stop()
        self.assertLess(time.monotonic() - started, 5)
        self.assertTrue(client.closed_by_server())
        self.assertFalse(os.path.exists(self.path))
        self.assertRaises(exception.NbdError, self.server.listen_unix, self.path)
        self.assertRaises(exception.NbdError, self.server.start)

    def test_listen_on_a_bad_path_is_an_nbd_error(self):
        self.assertRaises(exception.NbdError, self.server.listen_unix,
                          os.path.join(self.tmp, 'missing', 'nbd.sock'))


class ProtocolHelpersTest(base.TestCase):
    def test_errno_mapping(self):
        for value in (errno.EPERM, errno.EIO, errno.ENOMEM, errno.EINVAL, errno.ENOSPC,
                      errno.EOVERFLOW, errno.ENOTSUP, errno.ESHUTDOWN):
            self.assertEqual(value, p.nbd_error(value))
        self.assertEqual(p.EIO, p.nbd_error(errno.ENOENT))
        self.assertEqual(p.EIO, p.nbd_error(None))
