import hashlib
import json
import zlib

from vmcloud import exception
from vmcloud.storage import manifest as manifest_mod
from vmcloud.storage.manifest import Manifest
from vmcloud.storage.manifest import VersionRef
from tests import base


def _manifest(**kw):
    fields = dict(image='img', version=2, size=10, chunk_size=4,
                  chunks=('a' * 64, None, 'b' * 64), parent=VersionRef('img', 1),
                  created_at='t', source={'file': 'x'})
    fields.update(kw)
    return Manifest(**fields)


class ManifestTest(base.TestCase):
    def test_round_trip(self):
        manifest = _manifest()
        self.assertEqual(manifest, Manifest.decode(manifest.encode(), 'img:2'))

    def test_last_chunk_is_short(self):
        manifest = _manifest()
        self.assertEqual([4, 4, 2], [manifest.chunk_length(i) for i in range(3)])

    def test_flipped_bit_is_detected(self):
        data = bytearray(_manifest().encode())
        position = data.index(b'"size":10') + len('"size":')
        data[position] ^= 0x02  # '1' -> '3'
        error = self.assertRaises(exception.CorruptManifest, Manifest.decode, bytes(data), 'img:2')
        self.assertIn('img:2', str(error))
        self.assertIn('checksum', str(error))

    def test_truncated_manifest_is_corrupt(self):
        data = _manifest().encode()[:-10]
        self.assertRaises(exception.CorruptManifest, Manifest.decode, data, 'img:2')

    def test_chunk_count_must_match_size(self):
        data = _manifest(size=20).encode()
        error = self.assertRaises(exception.CorruptManifest, Manifest.decode, data, 'img:2')
        self.assertIn('3 chunks for 20 bytes', str(error))

    def test_parse_refs(self):
        self.assertEqual(('a.b-c', None), VersionRef.parse('a.b-c'))
        self.assertEqual(('img', 7), VersionRef.parse('img:7'))
        for bad in ('', 'img:0', 'img:x', '../etc', '.hidden', 'a/b', 'img:'):
            self.assertRaises(exception.StorageError, VersionRef.parse, bad)

    def test_only_ascii_digits_are_versions(self):
        # 'x'.isdigit() is true for all of these; int() refuses the first three.
        for bad in ('img:\u00b2', 'img:\u0663', 'img:1\u00b9', 'img:\uff11', 'img:' + '9' * 19,
                    'img:-1', 'img: 1', 'img:1\n'):
            error = self.assertRaises(exception.InvalidName, VersionRef.parse, bad)
            self.assertIn('invalid version', str(error))
        self.assertEqual(('img', 10 ** 17), VersionRef.parse('img:' + '1' + '0' * 17))

    def test_names_ending_in_a_newline_are_refused(self):
        for bad in ('img\n', 'img\n\n', 'a\nb', 'img\r', 'x' * 129, '\u0661mg'):
            self.assertRaises(exception.InvalidName, manifest_mod.validate_image_name, bad)
            self.assertRaises(exception.InvalidName, VersionRef.parse, bad + ':1')
        self.assertEqual('x' * 128, manifest_mod.validate_image_name('x' * 128))


class ManifestFormatTest(base.TestCase):
    def test_format_1_manifests_stay_readable(self):
        manifest = _manifest()
        old = manifest.encode_v1()
        self.assertNotIn(b'\n', old)
        self.assertEqual(manifest, Manifest.decode(old, 'img:2'))
        self.assertEqual(manifest.summary(), Manifest.decode_summary(old, 'img:2', True))
        self.assertIsNone(Manifest.decode_summary(old[:20], 'img:2', False))

    def test_runs_of_holes_make_an_all_hole_image_tiny(self):
        size = 1024 ** 4  # 1 TiB of holes in 256 KiB chunks: 21 MB in format 1
        chunks = (None,) * (size // (256 * 1024))
        manifest = _manifest(size=size, chunk_size=256 * 1024, chunks=chunks, parent=None)
        data = manifest.encode()
        self.assertLess(len(data), 1024)
        self.assertEqual(chunks, Manifest.decode(data, 'img:2').chunks)

    def test_header_holds_what_a_listing_shows(self):
        chunks = tuple(f'{i:064x}' for i in range(1000)) + (None,) * 3
        manifest = _manifest(size=1003 * 4, chunks=chunks)
        data = manifest.encode()
        summary = Manifest.decode_summary(data[:manifest_mod.HEADER_LIMIT], 'img:2', False)
        self.assertEqual(manifest.summary(), summary)
        self.assertEqual((1000, 1003), (summary.data_chunks, summary.chunk_count))
        self.assertGreater(len(data), 16 * manifest_mod.HEADER_LIMIT)

    def test_damaged_header_or_body_is_detected(self):
        data = bytearray(_manifest().encode())
        newline = data.index(b'\n')
        for position, what in ((10, 'checksum mismatch'), (newline + 3, 'body checksum')):
            damaged = bytearray(data)
            damaged[position] ^= 0x01
            error = self.assertRaises(exception.CorruptManifest, Manifest.decode,
                                      bytes(damaged), 'img:2')
            self.assertIn(what, str(error))
        damaged = bytearray(data)
        damaged[10] ^= 0x01
        self.assertRaises(exception.CorruptManifest, Manifest.decode_summary,
                          bytes(damaged), 'img:2', True)

    def test_fields_that_make_no_sense_are_corrupt_despite_checksums(self):
        for fields, problem in (
                (dict(chunk_size=0, chunks=()), 'chunk_size 0'),
                (dict(version=0), 'version 0'),
                (dict(size=-4, chunks=()), 'size -4'),
                (dict(image='../etc'), 'image name'),
                (dict(parent=VersionRef('a\nb', 1)), 'invalid parent'),
                (dict(chunks=('a' * 64, None, '../x')), 'invalid chunk id'),
                (dict(chunks=('a' * 64, None, 7.5)), 'invalid chunk')):
            for encode in (Manifest.encode, Manifest.encode_v1):
                data = encode(_manifest(**fields))
                error = self.assertRaises(exception.CorruptManifest, Manifest.decode, data,
                                          'img:2')
                self.assertIn(problem, str(error))

    def test_a_header_counting_more_data_chunks_than_fit_is_corrupt(self):
        # The listing reads only the header: its count must make sense alone
        # (else a listing shows a negative number of holes).
        data = _manifest(chunks=('a' * 64,) * 5).encode()
        error = self.assertRaises(exception.CorruptManifest, Manifest.decode_summary,
                                  data, 'img:2', True)
        self.assertIn('5 data chunks for 10 bytes', str(error))

    def test_a_run_longer_than_the_image_is_corrupt(self):
        data = _manifest(chunks=(None, None, None, None, None)).encode()
        error = self.assertRaises(exception.CorruptManifest, Manifest.decode, data, 'img:2')
        self.assertIn('more chunks than the 3 of its size', str(error))


class DeltaChainFormatTest(base.TestCase):
    """Format 3: chains in the body, written only when a version has one."""

    CHAIN = ('d' * 64, 'e' * 64, 'a' * 64)

    def test_a_manifest_with_a_chain_is_format_3_and_round_trips(self):
        manifest = _manifest(chunks=(self.CHAIN, None, ('f' * 64, None)))
        data = manifest.encode()
        self.assertEqual(3, json.loads(data.partition(b'\n')[0])['format'])
        back = Manifest.decode(data, 'img:2')
        self.assertEqual(manifest, back)
        self.assertEqual(self.CHAIN, back.chunks[0])
        self.assertEqual(manifest.summary(), Manifest.decode_summary(data, 'img:2', True))
        self.assertEqual(2, back.summary().data_chunks)

    def test_its_body_is_compressed_and_a_bad_one_is_corrupt(self):
        chain = tuple(hashlib.sha256(bytes([i])).hexdigest() for i in range(3))
        manifest = _manifest(chunks=(chain, None, None))
        data = manifest.encode()
        header_line, _, body = data.partition(b'\n')
        header = json.loads(header_line)
        plain = zlib.decompress(body)
        self.assertEqual(len(plain), header['body_bytes'])
        self.assertLess(len(body), len(plain))

        def rewritten(new_body: bytes, **fields) -> bytes:
            changed = dict(header, **fields, body=hashlib.sha256(new_body).hexdigest())
            del changed['checksum']
            changed['checksum'] = hashlib.sha256(
                json.dumps(changed, sort_keys=True, separators=(',', ':')).encode()).hexdigest()
            return json.dumps(changed, sort_keys=True, separators=(',', ':')).encode() + (
                b'\n' + new_body)
        bomb = zlib.compress(b' ' * (50 * 1024 * 1024))
        for data, problem in (
                (rewritten(plain), 'does not decompress'),
                (rewritten(body + b'x'), 'decompresses to other than'),
                (rewritten(body[:-3]), 'decompresses to other than'),
                (rewritten(body, body_bytes=header['body_bytes'] - 1), 'other than'),
                (rewritten(body, body_bytes='12'), "invalid body length '12'"),
                # A small body that would inflate without end: refused by its bound.
                (rewritten(bomb, body_bytes=50 * 1024 * 1024), 'invalid body length'),
                (rewritten(bomb, body_bytes=1000), 'other than its 1000 bytes')):
            error = self.assertRaises(exception.CorruptManifest, Manifest.decode, data, 'img:2')
            self.assertIn(problem, str(error))
        self.assertEqual(manifest, Manifest.decode(rewritten(body), 'img:2'))

    def test_a_manifest_without_chains_is_still_format_2(self):
        data = _manifest().encode()
        self.assertEqual(2, json.loads(data.partition(b'\n')[0])['format'])

    def test_format_2_written_by_the_previous_code_reads_unchanged(self):
        # The bytes the code before issue 19 wrote for _manifest(), and its identity().
        old = (b'{"body":"0a79f1a17b5f638168a6440b08559186a227e6501b94fdb04d609b467e6ab0e6",'
               b'"checksum":"f283bd50da87aecbf25ba97354031ab9968f1062f3336f57565ee5cdf21ae63e",'
               b'"chunk_size":4,"created_at":"t","data_chunks":2,"format":2,"hash":"sha256",'
               b'"image":"img","parent":{"image":"img","version":1},"size":10,'
               b'"source":{"file":"x"},"version":2}\n'
               b'["' + b'a' * 64 + b'",1,"' + b'b' * 64 + b'"]')
        self.assertEqual(old, _manifest().encode())
        self.assertEqual(_manifest(), Manifest.decode(old, 'img:2'))
        self.assertEqual('d55ce4f8ec35d2bb657381321325f1e41f42195ac55c8750cee9817bc8bcc9f0',
                         Manifest.decode(old, 'img:2').identity())

    def test_helpers(self):
        manifest = _manifest(chunks=(self.CHAIN, None, ('f' * 64, None)))
        self.assertEqual(self.CHAIN, manifest.object_ids(0))
        self.assertEqual((), manifest.object_ids(1))
        self.assertEqual(('f' * 64,), manifest.object_ids(2))
        self.assertEqual(('a' * 64,), _manifest().object_ids(0))
        self.assertEqual([True, False, True], [manifest.is_delta(i) for i in range(3)])
        self.assertEqual([False, False, False], [_manifest().is_delta(i) for i in range(3)])
        self.assertEqual({'a' * 64, 'd' * 64, 'e' * 64, 'f' * 64}, manifest.data_chunk_ids())
        self.assertNotEqual(manifest.identity(),
                            _manifest(chunks=(self.CHAIN[1:], None, ('f' * 64, None)))
                            .identity())

    def test_chains_that_make_no_sense_are_corrupt(self):
        for chunks, problem in (
                ((('d' * 64,), None, None), 'has 1 elements, not 2 to 65'),
                ((('d' * 64,) * 66, None, None), 'has 66 elements'),
                ((('d' * 64, None, 'a' * 64), None, None), 'invalid chunk id None'),
                ((('D' * 64, 'a' * 64), None, None), 'invalid chunk id'),
                (((7, 'a' * 64), None, None), 'invalid chunk id 7')):
            error = self.assertRaises(exception.CorruptManifest, Manifest.decode,
                                      _manifest(chunks=chunks).encode(), 'img:2')
            self.assertIn(problem, str(error))
            self.assertIn('img:2', str(error))
        # The hard cap, not the configured depth: a deep chain of an old config reads.
        deep = (('d' * 64,) * 64 + (None,), None, None)
        self.assertEqual(deep, Manifest.decode(_manifest(chunks=deep).encode(),
                                               'img:2').chunks)

    def test_a_chain_in_format_2_or_1_is_corrupt(self):
        manifest = _manifest(chunks=(self.CHAIN, None, None))
        header_line, _, body = manifest.encode().partition(b'\n')
        header = json.loads(header_line)
        del header['checksum'], header['body_bytes']
        body = zlib.decompress(body)  # as format 2 would hold it
        header['format'] = 2
        header['body'] = hashlib.sha256(body).hexdigest()
        header['checksum'] = hashlib.sha256(
            json.dumps(header, sort_keys=True, separators=(',', ':')).encode()).hexdigest()
        data = json.dumps(header, sort_keys=True, separators=(',', ':')).encode() + b'\n' + body
        error = self.assertRaises(exception.CorruptManifest, Manifest.decode, data, 'img:2')
        self.assertIn('invalid chunk list entry', str(error))
        error = self.assertRaises(exception.CorruptManifest, Manifest.decode,
                                  manifest.encode_v1(), 'img:2')
        self.assertIn('invalid chunk id', str(error))
