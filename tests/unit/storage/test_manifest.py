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
