"""vmcloud's NBD client against vmcloud's NBD server, over unix sockets and TCP."""
import errno
import os
import socket
import threading
import time

from tests import base
from tests.unit.nbd import MemoryDevice
from vmcloud import exception
from vmcloud.nbd import client as client_mod
from vmcloud.nbd import server as server_mod

SIZE = 1024 * 1024


class ClientTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.device = MemoryDevice(SIZE)
        self.server = server_mod.NbdServer()
        self.addCleanup(self.server.stop)
        self.server.add_export('disk', self.device)
        self.socket = os.path.join(self.tmp, 'nbd.sock')
        self.server.listen_unix(self.socket)
        self.port = self.server.listen_tcp()
        self.server.start()

    def connect(self, export: str = 'disk', **where) -> client_mod.NbdClient:
        client = client_mod.NbdClient(export, **(where or {'socket_path': self.socket}))
        self.addCleanup(client.close)
        return client

    def test_every_request_over_unix_and_tcp(self):
        for where in ({'socket_path': self.socket}, {'host': '127.0.0.1', 'port': self.port}):
            with self.subTest(where=where):
                self.device.calls.clear()
                client = self.connect(**where)
                self.assertEqual((SIZE, False), (client.size, client.read_only))
                client.write(4096, b'a' * 8192)
                self.assertEqual(b'a' * 8192, client.read(4096, 8192))
                client.write(0, b'b' * 512, fua=True)
                client.write_zeroes(4096, 4096)
                client.trim(8192, 4096)
                client.flush()
                self.assertEqual(b'b' * 512 + bytes(4096 - 512) + bytes(8192),
                                 client.read(0, 3 * 4096))
                self.assertEqual(b'', client.read(0, 0))
                client.close()
                self.assertEqual(
                    ['write', 'read', 'write', 'write_zeroes', 'trim', 'write_zeroes',
                     'flush', 'read'], [call[0] for call in self.device.calls])
                self.assertEqual(('write', 0, 512, True), self.device.calls[2])

    def test_a_read_only_export_says_so(self):
        self.server.add_export('ro', MemoryDevice(SIZE, read_only=True))
        client = self.connect('ro')
        self.assertTrue(client.read_only)
        error = self.assertRaises(client_mod.NbdRequestError, client.write, 0, b'x')
        self.assertEqual(errno.EPERM, error.error)

    def test_an_unknown_export_is_named(self):
        error = self.assertRaises(client_mod.NbdExportNotFound, self.connect, 'nope')
        self.assertIsInstance(error, exception.NbdError)
        self.assertEqual('nope', error.export)
        self.assertIn(f"NBD export 'nope': {self.socket} has no such export", str(error))

    def test_an_error_reply_names_the_request_and_the_error(self):
        client = self.connect()
        self.device.failures['read'] = OSError(errno.EIO, 'the disk is gone')
        error = self.assertRaises(client_mod.NbdRequestError, client.read, 65536, 4096)
        self.assertEqual((errno.EIO, 'read', 65536, 4096),
                         (error.error, error.command, error.offset, error.length))
        self.assertEqual("NBD export 'disk': read of 4096 bytes at 65536 failed: EIO "
                         "(Input/output error)", str(error))
        del self.device.failures['read']
        self.assertEqual(bytes(10), client.read(0, 10))    # the connection goes on
        self.device.failures['flush'] = OSError(errno.ENOSPC, 'full')
        error = self.assertRaises(client_mod.NbdRequestError, client.flush)
        self.assertIn("flush failed: ENOSPC", str(error))
        error = self.assertRaises(client_mod.NbdRequestError, client.read, SIZE, 1)
        self.assertEqual(errno.EINVAL, error.error)

    def test_what_cannot_be_reached_is_named(self):
        missing = os.path.join(self.tmp, 'none.sock')
        error = self.assertRaises(client_mod.NbdClientError, self.connect,
                                  socket_path=missing)
        self.assertIn(f"NBD export 'disk': cannot connect to {missing}", str(error))
        with socket.socket() as unused:
            unused.bind(('127.0.0.1', 0))
            port = unused.getsockname()[1]
        error = self.assertRaises(client_mod.NbdClientError, self.connect,
                                  host='127.0.0.1', port=port)
        self.assertIn(f'cannot connect to 127.0.0.1:{port}', str(error))

    def test_a_server_that_is_no_nbd_server(self):
        path = os.path.join(self.tmp, 'other.sock')
        listener = socket.socket(socket.AF_UNIX)
        self.addCleanup(listener.close)
        listener.bind(path)
        listener.listen()

        def greet():
            connection, _ = listener.accept()
            with connection:
                connection.sendall(b'SSH-2.0-OpenSSH_9.2 hello there\r\n')
        threading.Thread(target=greet, daemon=True).start()
        error = self.assertRaises(client_mod.NbdClientError, self.connect, socket_path=path)
        self.assertIn(f'{path} is not a newstyle NBD server', str(error))

    def test_a_server_that_goes_away(self):
        client = self.connect()
        self.server.remove_export('disk')
        error = self.assertRaises(client_mod.NbdClientError, client.read, 0, 512)
        self.assertIn(f'the connection to {self.socket} was lost', str(error))

    def test_abort_ends_a_request_waiting_for_its_reply(self):
        client = self.connect()
        gate = threading.Event()
        self.addCleanup(gate.set)
        self.device.gates[4096] = gate
        failed = []

        def read():
            try:
                client.read(4096, 512)
            except client_mod.NbdClientError as exc:
                failed.append(exc)
        reader = threading.Thread(target=read)
        reader.start()
        deadline = time.monotonic() + 10
        while not self.server.buffered_bytes and time.monotonic() < deadline:
            time.sleep(0.001)   # until the request is with the server
        client.abort()
        reader.join(5)
        self.assertFalse(reader.is_alive())
        self.assertIn('the connection was closed by this client', str(failed[0]))

    def test_either_a_socket_or_a_host(self):
        self.assertRaises(ValueError, client_mod.NbdClient, 'disk')
        self.assertRaises(ValueError, client_mod.NbdClient, 'disk', socket_path=self.socket,
                          host='localhost')
