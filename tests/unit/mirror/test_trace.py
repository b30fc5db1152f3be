"""Block I/O traces: the recorder forwards every call and records it, the reader checks."""
import errno
import gzip
import io
import os
import random

import fixtures

from vmcloud.mirror import manager as manager_mod
from vmcloud.mirror import trace as trace_mod
from vmcloud.nbd import client as client_mod
from vmcloud.nbd import device as device_mod
from vmcloud.nbd import server as server_mod
from vmcloud.storage import warehouse
from tests import base
from tests.unit.nbd import FastMemoryDevice
from tests.unit.nbd import MemoryDevice

SIZE = 1024 * 1024
BLOCK = 64 * 1024


def shape(trace: trace_mod.Trace) -> list[tuple]:
    """What a trace says, without its times."""
    return [(e.op, e.marker) if e.op == trace_mod.PHASE else (e.op, e.offset, e.length)
            for e in trace.events]


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
        trace = trace_mod.read(self.path)
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
        self.assertIsNot(device_mod.BlockDevice.read_into,
                         type(self.tracer()).read_into)
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
                         shape(trace_mod.read(self.path)))

    def test_a_phase_mark_flushes_the_file(self):
        tracer = self.tracer()
        tracer.read(0, 512)
        self.assertEqual([], shape(trace_mod.read(self.path)))   # still in memory
        tracer.mark('app-running')
        self.assertEqual([('R', 0, 512), ('P', 'app-running')], shape(trace_mod.read(self.path)))

    def test_gzip_by_name(self):
        path = self.path + '.gz'
        tracer = self.tracer(path)
        tracer.read(0, 512)
        tracer.close()
        with open(path, 'rb') as f:
            self.assertEqual(b'\x1f\x8b', f.read(2))
        self.assertEqual([('R', 0, 512)], shape(trace_mod.read(path)))

    def test_a_trace_that_cannot_be_written_stops_with_one_warning_and_io_goes_on(self):
        class FullDisk(io.StringIO):
            """Takes the header, then fails as a full disk does."""
            def write(self, text):
                if self.getvalue():
                    raise OSError(errno.ENOSPC, 'No space left on device')
                return super().write(text)

        self.useFixture(fixtures.MockPatchObject(trace_mod, '_open_text',
                                                 lambda path, mode: FullDisk()))
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

    def test_a_device_that_takes_no_header_is_not_traced(self):
        # /dev/full takes the open and fails every write that reaches it.
        tracer = self.tracer('/dev/full')
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

    def test_requests_in_memory_go_to_the_file_in_batches(self):
        tracer = self.tracer()
        for _ in range(trace_mod._BUFFERED_LINES):
            tracer.read(0, 1)
        tracer._file.flush()
        self.assertEqual(trace_mod._BUFFERED_LINES, len(trace_mod.read(self.path).events))


class ReaderTest(base.TestCase):
    def write(self, text: str, leaf: str = 'bad.trace') -> str:
        path = os.path.join(self.tmp, leaf)
        with open(path, 'w') as f:
            f.write(text)
        return path

    def test_events_are_put_in_time_order(self):
        path = self.write('vmcloud-trace 1 size=1048576 block=65536\n'
                          '5.5 R 0 512 1.0\n'
                          '2 W 65536 131072\n'
                          '\n'
                          '7.000 P boot-done\n'
                          '6.25 F 0 0 0.5\n')
        trace = trace_mod.read(path)
        self.assertEqual([('W', 65536, 131072), ('R', 0, 512), ('F', 0, 0), ('P', 'boot-done')],
                         shape(trace))
        self.assertEqual([2.0, 5.5, 6.25, 7.0], [e.ms for e in trace.events])
        self.assertEqual(0.0, trace.events[0].service_ms)
        self.assertEqual({0, 1, 2}, trace.blocks())
        self.assertEqual({0}, trace.blocks([trace_mod.READ]))
        self.assertEqual(512, trace.bytes_of(trace_mod.READ))
        self.assertEqual(['boot-done'], trace.markers())
        self.assertEqual(7.0, trace.duration_ms)

    def test_write_then_read_gives_the_events_back(self):
        events = [trace_mod.Event(1.5, 'R', 0, 4096, 0.25),
                  trace_mod.Event(2.0, 'P', marker='boot-done'),
                  trace_mod.Event(3.0, 'T', 4096, 4096, 1.0)]
        path = os.path.join(self.tmp, 'x.trace.gz')
        trace_mod.write(path, 8192, 4096, events)
        self.assertEqual(tuple(events), trace_mod.read(path).events)

    def test_what_does_not_parse_is_refused_naming_file_and_line(self):
        header = 'vmcloud-trace 1 size=4096 block=512\n'
        cases = [
            ('', 1, 'not a vmcloud trace'),
            ('qemu trace\n', 1, "not a vmcloud trace: the first line is 'qemu trace'"),
            ('vmcloud-trace 2 size=4096 block=512\n', 1, 'format version 2'),
            ('vmcloud-trace 1 size=4096 block=0\n', 1, 'block size 0'),
            (header + '1 R 0 512\n2 X 0 512\n', 3, "unknown operation 'X'"),
            (header + 'soon R 0 512\n', 2, "time 'soon' is not a number"),
            (header + '1 R -5 512\n', 2, "offset '-5' is not a whole number"),
            (header + '1 R 0 1.5\n', 2, "length '1.5' is not a whole number"),
            (header + '1 R 0\n', 2, 'a request line is'),
            (header + '1 R 0 512 fast\n', 2, "service time 'fast'"),
            (header + '1 R 3584 1024\n', 2, 'range 3584+1024 ends beyond the disk (4096 bytes)'),
            (header + '1 F 0 512\n', 2, 'a flush has no range'),
            (header + '1 P booted\n', 2, "unknown phase marker 'booted'"),
            (header + '1 P\n', 2, 'a phase line is'),
        ]
        for text, line, words in cases:
            with self.subTest(text=text):
                path = self.write(text)
                error = self.assertRaises(trace_mod.TraceError, trace_mod.read, path)
                self.assertIn(f'trace {path} line {line}: {words}', str(error))
                self.assertEqual((path, line), (error.path, error.line))

    def test_a_missing_or_damaged_file_is_refused_naming_it(self):
        missing = os.path.join(self.tmp, 'none.trace')
        error = self.assertRaises(trace_mod.TraceError, trace_mod.read, missing)
        self.assertEqual(f'trace {missing}: no such file', str(error))
        for leaf, data in (('bad.trace.gz', b'not gzip at all'),
                           ('cut.trace.gz', gzip.compress(b'vmcloud-trace 1 size=1 block=1\n'
                                                          b'1 R 0 1\n' * 100)[:40]),
                           ('binary.trace', b'\xff\xfe\x00')):
            with self.subTest(leaf=leaf):
                path = os.path.join(self.tmp, leaf)
                with open(path, 'wb') as f:
                    f.write(data)
                error = self.assertRaises(trace_mod.TraceError, trace_mod.read, path)
                self.assertIn(f'trace {path}', str(error))


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
        trace = trace_mod.read(os.path.join(traces, 'vm1.trace'))
        self.assertEqual((4 * BLOCK, BLOCK), (trace.size, trace.block))
        self.assertEqual([('R', BLOCK, 4096), ('P', 'boot-done'), ('W', 0, 100), ('F', 0, 0),
                          ('P', 'shutdown-started'), ('R', 0, 512)], shape(trace))

    def test_without_trace_path_the_disk_is_served_itself(self):
        node = self.node()
        mirror = node.create('vm1', 'img')
        self.assertIsNone(mirror.trace)
        self.assertIs(mirror.disk, node.server._export('vm1').device)
        node.set_phase('vm1', 'boot-done')
        node.remove('vm1')
