from vmcloud import exception
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
