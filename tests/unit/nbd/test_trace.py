"""The block I/O trace format: the reader checks every line and names what it refuses."""
import gzip
import os

from vmcloud.drivers import base as driver_base
from vmcloud.mirror import profile as profile_mod
from vmcloud.nbd import trace as trace_mod
from tests import base


def shape(trace: trace_mod.Trace) -> list[tuple]:
    """What a trace says, without its times."""
    return [(e.op, e.marker) if e.op == trace_mod.PHASE else (e.op, e.offset, e.length)
            for e in trace.events]


class ReaderTest(base.TestCase):
    def test_its_markers_are_the_ones_the_drivers_print_and_the_mirror_takes(self):
        # Named in three layers, each its own copy: NBD sits below the other two.
        self.assertEqual(trace_mod.MARKERS, driver_base.PHASES)
        self.assertEqual(set(trace_mod.MARKERS), set(profile_mod.MARKERS))

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
