"""The block I/O recorder: it forwards every call and records it, one file per session;
a traced node. The format's reader: tests/unit/nbd/test_trace.py."""
import errno
import io
import os
import random

import fixtures

from vmcloud import exception
from vmcloud.mirror import manager as manager_mod
from vmcloud.mirror import trace as trace_mod
from vmcloud.nbd import client as client_mod
from vmcloud.nbd import device as device_mod
from vmcloud.nbd import server as server_mod
from vmcloud.nbd import trace as trace_format
from vmcloud.storage import manifest as manifest_mod
from vmcloud.storage import warehouse
from tests import base
from tests.unit.nbd import FastMemoryDevice
from tests.unit.nbd import MemoryDevice
from tests.unit.nbd.test_trace import shape

SIZE = 1024 * 1024
BLOCK = 64 * 1024


class RecorderTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.logs = self.useFixture(fixtures.FakeLogger(name='vmcloud.mirror.trace'))
        self.device = MemoryDevice(SIZE)
        self.path = os.path.join(self.tmp, 'traces', 'vm1.trace')

    def tracer(self, path=None, device=None) -> trace_mod.TracingDevice:
        tracer = trace_mod.TracingDevice(device or self.device, path or self.path, BLOCK)
        self.addCleanup(tracer.close)
        return tracer

    def test_every_call_is_forwarded_and_every_request_recorded(self):
        tracer = self.tracer()
        tracer.write(4096, b'x' * 512)
        self.assertEqual(b'x' * 512, tracer.read(4096, 512))
        buffer = bytearray(100)
        tracer.read_into(4096, memoryview(buffer))
        self.assertEqual(b'x' * 100, bytes(buffer))
        tracer.write(BLOCK, b'y' * 10, fua=True)
        tracer.write_zeroes(2 * BLOCK, 4096)
        tracer.trim(3 * BLOCK, BLOCK)
        tracer.flush()
        self.assertEqual(self.device.block_status(0, SIZE), tracer.block_status(0, SIZE))
        self.assertEqual((SIZE, False), (tracer.size, tracer.read_only))
        tracer.mark('boot-done')
        tracer.close()
        self.assertEqual([('write', 4096, 512, False), ('read', 4096, 512), ('read', 4096, 100),
                          ('write', BLOCK, 10, True), ('write_zeroes', 2 * BLOCK, 4096, False),
                          ('trim', 3 * BLOCK, BLOCK), ('write_zeroes', 3 * BLOCK, BLOCK, False),
                          ('flush',), ('block_status', 0, SIZE), ('block_status', 0, SIZE)],
                         self.device.calls)
        trace = trace_format.read(self.path)
        self.assertEqual((SIZE, BLOCK), (trace.size, trace.block))
        # a FUA write is recorded as the write and a flush; block status moves no data
        self.assertEqual([('W', 4096, 512), ('R', 4096, 512), ('R', 4096, 100),
                          ('W', BLOCK, 10), ('F', 0, 0), ('Z', 2 * BLOCK, 4096),
                          ('T', 3 * BLOCK, BLOCK), ('F', 0, 0), ('P', 'boot-done')],
                         shape(trace))
        times = [e.ms for e in trace.events]
        self.assertEqual(sorted(times), times)
        self.assertTrue(all(e.service_ms >= 0 for e in trace.events))

    def test_the_nbd_server_serves_it_as_the_device_it_wraps(self):
        # The server takes its read_into fast path for any tracer, so a traced disk is
        # served the same way as the mirror's own disk, which has one.
        self.assertIsNot(device_mod.BlockDevice.read_into, trace_mod.TracingDevice.read_into)
        device = FastMemoryDevice(SIZE, data=random.Random(1).randbytes(SIZE))
        tracer = self.tracer(device=device)
        with server_mod.NbdServer() as server:
            server.add_export('vm1', tracer)
            socket = os.path.join(self.tmp, 'nbd.sock')
            server.listen_unix(socket)
            server.start()
            with client_mod.NbdClient('vm1', socket_path=socket) as client:
                self.assertEqual(device.data[BLOCK:BLOCK + 4096], client.read(BLOCK, 4096))
                client.write(0, b'z' * 4096)
                client.flush()
            server.remove_export('vm1')
        self.assertIn(('read_into', BLOCK, 4096), device.calls)
        tracer.close()
        self.assertEqual([('R', BLOCK, 4096), ('W', 0, 4096), ('F', 0, 0)],
                         shape(trace_format.read(self.path)))

    def test_a_phase_mark_flushes_the_file(self):
        tracer = self.tracer()
        tracer.read(0, 512)
        self.assertEqual([], shape(trace_format.read(self.path)))   # still in memory
        tracer.mark('app-running')
        self.assertEqual([('R', 0, 512), ('P', 'app-running')], shape(trace_format.read(self.path)))

    def test_gzip_by_name(self):
        path = self.path + '.gz'
        tracer = self.tracer(path)
        tracer.read(0, 512)
        tracer.close()
        with open(path, 'rb') as f:
            self.assertEqual(b'\x1f\x8b', f.read(2))
        self.assertEqual([('R', 0, 512)], shape(trace_format.read(path)))

    def full_disk(self, room: int) -> None:
        """Trace files from now on take ``room`` characters, then fail as a full disk does."""
        class FullDisk(io.StringIO):
            def write(self, text):
                if len(self.getvalue()) + len(text) > room:
                    raise OSError(errno.ENOSPC, 'No space left on device')
                return super().write(text)

        self.useFixture(fixtures.MockPatchObject(trace_format, 'open_text',
                                                 lambda path, mode: FullDisk()))

    def test_a_trace_that_cannot_be_written_stops_with_one_warning_and_io_goes_on(self):
        self.full_disk(room=len(trace_format.header(SIZE, BLOCK)) + 1)
        tracer = self.tracer()
        self.assertTrue(tracer.tracing)
        for _ in range(3):
            tracer.write(0, b'a' * 512)
            tracer.mark('boot-done')
        self.assertFalse(tracer.tracing)
        self.assertEqual(b'a' * 512, tracer.read(0, 512))
        tracer.close()
        self.assertEqual(1, self.logs.output.count('stopped'), self.logs.output)
        self.assertIn(f'block I/O trace {self.path} stopped, the disk is served untraced: '
                      '[Errno 28] No space left on device', self.logs.output)
        self.assertEqual(4, len(self.device.calls))

    def test_a_file_that_takes_no_header_is_not_traced(self):
        self.full_disk(room=0)
        tracer = self.tracer()
        self.assertFalse(tracer.tracing)
        tracer.write(0, b'a' * 512)
        tracer.mark('boot-done')
        self.assertEqual(b'a' * 512, tracer.read(0, 512))
        self.assertEqual(1, self.logs.output.count('stopped'), self.logs.output)

    def test_a_trace_that_cannot_be_opened_leaves_the_disk_served(self):
        with open(os.path.join(self.tmp, 'a-file'), 'w'):
            pass
        tracer = self.tracer(os.path.join(self.tmp, 'a-file', 'vm1.trace'))
        self.assertFalse(tracer.tracing)
        tracer.write(0, b'b')
        self.assertEqual(b'b', tracer.read(0, 1))
        self.assertIn('a-file/vm1.trace stopped', self.logs.output)

    def test_each_session_records_into_a_file_of_its_own_and_keeps_the_others(self):
        for path in (self.path, self.path + '.gz'):
            with self.subTest(path=path):
                for number in (1, 2, 3):
                    tracer = self.tracer(path)
                    self.assertEqual(trace_mod.session_path(path, number), tracer.path)
                    tracer.read(number * BLOCK, 512)
                    tracer.close()
                for number in (1, 2, 3):
                    self.assertEqual([('R', number * BLOCK, 512)], shape(
                        trace_format.read(trace_mod.session_path(path, number))))
        self.assertIn(f'block I/O trace {self.path} has a session already: this one is '
                      f'recorded into {trace_mod.session_path(self.path, 2)}', self.logs.output)

    def test_a_later_session_is_named_by_its_number(self):
        self.assertEqual('/t/vm1.trace', trace_mod.session_path('/t/vm1.trace', 1))
        self.assertEqual('/t/vm1@2.trace', trace_mod.session_path('/t/vm1.trace', 2))
        self.assertEqual('/t/vm1.x@3.trace.gz', trace_mod.session_path('/t/vm1.x.trace.gz', 3))
        self.assertEqual('/t/vm1@2.gz', trace_mod.session_path('/t/vm1.gz', 2))
        self.assertEqual('vm1@2', trace_mod.session_path('vm1', 2))
        # no mirror name has the mark: a later session never takes another mirror's file
        self.assertRaises(exception.InvalidName, manifest_mod.validate_image_name,
                          f'vm1{trace_mod.SESSION_MARK}2', 'mirror')
        error = self.assertRaises(ValueError, trace_mod.session_path, '/t/vm1.trace', 0)
        self.assertEqual('trace sessions count from 1, not 0', str(error))

    def test_requests_in_memory_go_to_the_file_in_batches(self):
        tracer = self.tracer()
        for _ in range(trace_mod._BUFFERED_LINES):
            tracer.read(0, 1)
        tracer._file.flush()
        self.assertEqual(trace_mod._BUFFERED_LINES, len(trace_format.read(self.path).events))


class MirrorTraceTest(base.TestCase):
    """A node with [mirror] trace_path records each mirror's NBD I/O and its phases."""

    def setUp(self):
        super().setUp()
        self.conf.set_override('chunk_size', BLOCK, 'storage')
        self.warehouse = warehouse.Warehouse(self.conf)
        path = os.path.join(self.tmp, 'image.raw')
        with open(path, 'wb') as f:
            f.write(random.Random(3).randbytes(4 * BLOCK))
        self.warehouse.import_image(path, 'img')

    def node(self) -> manager_mod.MirrorManager:
        node = manager_mod.MirrorManager(self.conf, self.warehouse,
                                         root=os.path.join(self.tmp, 'node'))
        self.addCleanup(node.close)
        return node

    def connect(self, node, name) -> client_mod.NbdClient:
        return client_mod.NbdClient(name, socket_path=node.socket)

    def test_each_mirror_writes_its_trace_with_its_phases(self):
        traces = os.path.join(self.tmp, 'traces')
        self.conf.set_override('trace_path', traces, 'mirror')
        node = self.node()
        node.create('vm1', 'img')
        with self.connect(node, 'vm1') as client:
            client.read(BLOCK, 4096)
            node.set_phase('vm1', 'boot-done')
            client.write(0, b'w' * 100)
            client.flush()
            node.set_phase('vm1', 'shutdown-started')
            client.read(0, 512)     # after the last mark: in the file once the mirror goes
        node.remove('vm1')
        trace = trace_format.read(os.path.join(traces, 'vm1.trace'))
        self.assertEqual((4 * BLOCK, BLOCK), (trace.size, trace.block))
        self.assertEqual([('R', BLOCK, 4096), ('P', 'boot-done'), ('W', 0, 100), ('F', 0, 0),
                          ('P', 'shutdown-started'), ('R', 0, 512)], shape(trace))

    def test_a_mirror_served_again_keeps_the_trace_of_its_first_session(self):
        traces = os.path.join(self.tmp, 'traces')
        self.conf.set_override('trace_path', traces, 'mirror')
        node = self.node()
        node.create('vm1', 'img')
        with self.connect(node, 'vm1') as client:
            client.read(BLOCK, 4096)
        node.set_phase('vm1', 'boot-done')
        node.close()    # the node restarts: it serves vm1 again
        node = self.node()
        node.open('vm1')
        with self.connect(node, 'vm1') as client:
            client.read(2 * BLOCK, 512)
        node.remove('vm1')
        self.assertEqual([('R', BLOCK, 4096), ('P', 'boot-done')],
                         shape(trace_format.read(os.path.join(traces, 'vm1.trace'))))
        self.assertEqual([('R', 2 * BLOCK, 512)],
                         shape(trace_format.read(os.path.join(traces, 'vm1@2.trace'))))

    def test_without_trace_path_the_disk_is_served_itself(self):
        node = self.node()
        mirror = node.create('vm1', 'img')
        self.assertIsNone(mirror.trace)
        self.assertIs(mirror.disk, node.server._export('vm1').device)
        node.set_phase('vm1', 'boot-done')
        node.remove('vm1')
