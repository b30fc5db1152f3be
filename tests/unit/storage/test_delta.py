"""Delta objects: encoding, every corruption decode() refuses, apply and resolve."""
import hashlib
import random
import struct

from vmcloud import exception
from vmcloud.storage import delta
from vmcloud.storage import manifest as manifest_mod
from tests import base

BLOCK = 4096


def _store(*objects: bytes) -> dict[str, bytes]:
    return {manifest_mod.chunk_id(data): data for data in objects}


def _reseal(data: bytes) -> bytes:
    """``data`` with its trailing checksum made right again: damage that only the
    field checks, not the checksum, can find."""
    body = data[:-32]
    return body + hashlib.sha256(body).digest()


class EncodingTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.rng = random.Random(7)
        self.base = self.rng.randbytes(4 * BLOCK + 100)  # a short chunk: last block short
        self.base_id = manifest_mod.chunk_id(self.base)
        self.blocks = {1: self.rng.randbytes(BLOCK), 4: self.rng.randbytes(100)}

    def test_round_trip_and_apply(self):
        data = delta.encode_blocks(self.base_id, len(self.base), BLOCK, self.blocks)
        decoded = delta.decode(data, 'd')
        self.assertEqual((BLOCK, len(self.base), self.base_id),
                         (decoded.block_size, decoded.chunk_length, decoded.base))
        self.assertEqual(self.blocks, dict(decoded.blocks))
        expected = bytearray(self.base)
        expected[BLOCK:2 * BLOCK] = self.blocks[1]
        expected[4 * BLOCK:] = self.blocks[4]
        self.assertBytesEqual(bytes(expected), delta.apply(self.base, decoded))
        # Small: the changed bytes and a header, not the chunk.
        self.assertLess(len(data), BLOCK + 100 + 128)

    def test_a_delta_on_a_hole_names_no_base(self):
        data = delta.encode_blocks(None, 8 * BLOCK, BLOCK, {7: b'x' * BLOCK})
        decoded = delta.decode(data, 'd')
        self.assertIsNone(decoded.base)
        result = delta.resolve((manifest_mod.chunk_id(data), None), _store(data).__getitem__,
                               8 * BLOCK)
        self.assertBytesEqual(bytes(7 * BLOCK) + b'x' * BLOCK, result)

    def test_equal_changes_encode_equally(self):
        one = delta.encode_blocks(self.base_id, len(self.base), BLOCK, self.blocks)
        other = delta.encode_blocks(self.base_id, len(self.base), BLOCK,
                                    dict(reversed(list(self.blocks.items()))))
        self.assertEqual(one, other)

    def test_bad_input_is_refused_naming_the_problem(self):
        length = len(self.base)
        for args, problem in (
                ((self.base_id, length, BLOCK, {}), 'changes no block'),
                ((self.base_id, length, BLOCK, {5: b'x'}), 'block 5 of'),
                ((self.base_id, length, BLOCK, {-1: b'x' * BLOCK}), 'block -1 of'),
                ((self.base_id, length, BLOCK, {0: b'x'}), 'holds 1 bytes, not 4096'),
                ((self.base_id, length, BLOCK, {4: b'x' * BLOCK}), 'holds 4096 bytes, not 100'),
                ((self.base_id, length, 3000, {0: b'x' * 3000}), 'not a power of two'),
                ((self.base_id, length, 256, {0: b'x' * 256}), 'not a power of two'),
                (('../x', length, BLOCK, {0: b'x' * BLOCK}), 'invalid base id'),
                ((self.base_id, 0, BLOCK, {0: b''}), 'not positive')):
            error = self.assertRaises(exception.InvalidRange, delta.encode_blocks, *args)
            self.assertIn(problem, str(error))

    def test_checked_block_size(self):
        self.assertEqual(4096, delta.checked_block_size(4096, 64 * 1024))
        for block_size, chunk_size in ((3000, 64 * 1024), (8192, 12 * 1024), (256, 4096),
                                       (1 << 25, 1 << 26)):
            error = self.assertRaises(exception.ConfigError, delta.checked_block_size,
                                      block_size, chunk_size)
            self.assertIn(f'[storage] delta_block_size = {block_size}', str(error))
            self.assertIn(str(chunk_size), str(error))


class DecodeCorruptionTest(base.TestCase):
    """decode() refuses every inconsistency with a CorruptDelta (a CorruptChunk) naming
    the delta, checksum or no checksum."""

    def setUp(self):
        super().setUp()
        self.base_id = 'ab' * 32
        self.length = 4 * BLOCK + 100
        self.data = delta.encode_blocks(self.base_id, self.length, BLOCK,
                                        {1: b'y' * BLOCK, 4: b'z' * 100})

    def assertCorrupt(self, data: bytes, problem: str):
        error = self.assertRaises(delta.CorruptDelta, delta.decode, data, 'the-delta')
        self.assertIsInstance(error, exception.CorruptChunk)
        self.assertEqual('the-delta', error.chunk_id)
        self.assertIn('delta the-delta is corrupt', str(error))
        self.assertIn(problem, str(error))

    def patched(self, offset: int, value: bytes) -> bytes:
        data = bytearray(self.data)
        data[offset:offset + len(value)] = value
        return _reseal(bytes(data))

    def test_every_flipped_byte_is_found(self):
        for offset in range(len(self.data)):
            data = bytearray(self.data)
            data[offset] ^= 0x01
            self.assertRaises(delta.CorruptDelta, delta.decode, bytes(data), 'd')

    def test_checksum_mismatch(self):
        data = bytearray(self.data)
        data[-40] ^= 0x01  # inside the last block's bytes
        self.assertCorrupt(bytes(data), 'checksum mismatch')

    def test_fields_that_make_no_sense(self):
        header = struct.Struct('>8sHHIQ')
        for fields, problem in (
                ((b'VMCDELTX', 1, 1, BLOCK, self.length), 'bad magic'),
                ((b'VMCDELTA', 2, 1, BLOCK, self.length), 'unsupported format 2'),
                ((b'VMCDELTA', 1, 3, BLOCK, self.length), 'unknown flags'),
                ((b'VMCDELTA', 1, 1, 3000, self.length), 'invalid block size 3000'),
                ((b'VMCDELTA', 1, 1, BLOCK, 0), 'chunk length of 0'),
                ((b'VMCDELTA', 1, 0, BLOCK, self.length), 'a base id for a hole'),
                ((b'VMCDELTA', 1, 1, BLOCK, self.length + 1), 'bytes of data for'),
                ((b'VMCDELTA', 1, 1, BLOCK, 10 ** 15), 'cannot hold the bitmap'),
                ((b'VMCDELTA', 1, 1, 512, self.length), 'is beyond the chunk')):
            self.assertCorrupt(self.patched(0, header.pack(*fields)), problem)

    def test_a_block_beyond_the_chunk(self):
        bitmap = delta._HEADER.size
        # Five blocks: bit 5 of the one bitmap byte is past the chunk.
        self.assertCorrupt(self.patched(bitmap, bytes([0b100010 | 0b10000])),
                           'block 5 is beyond')

    def test_no_changed_block(self):
        bitmap = delta._HEADER.size
        data = self.data[:bitmap] + b'\0' + self.data[-32:]
        self.assertCorrupt(_reseal(data), 'changes no block')

    def test_wrong_data_lengths(self):
        self.assertCorrupt(_reseal(self.data[:-33] + self.data[-32:]), 'bytes of data for')
        self.assertCorrupt(_reseal(self.data[:-32] + b'x' + self.data[-32:]),
                           'bytes of data for')
        self.assertCorrupt(self.data[:40], 'shorter than a delta header')

    def test_apply_to_a_base_of_the_wrong_length(self):
        decoded = delta.decode(self.data, 'the-delta')
        error = self.assertRaises(delta.CorruptDelta, delta.apply, bytes(10), decoded,
                                  'the-delta')
        self.assertIn(f'changes a chunk of {self.length} bytes, its base holds 10', str(error))


class ResolveTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.rng = random.Random(11)
        self.length = 8 * BLOCK
        self.base = self.rng.randbytes(self.length)
        self.base_id = manifest_mod.chunk_id(self.base)

    def chain(self, depth: int, base_id: str | None = 'base'):
        """A chain of ``depth`` deltas, its objects and the bytes it resolves to."""
        base_id = self.base_id if base_id == 'base' else base_id
        content = bytearray(self.base if base_id else bytes(self.length))
        objects = _store(self.base)
        chain: tuple = (base_id,)
        for _ in range(depth):
            index = self.rng.randrange(8)
            block = self.rng.randbytes(BLOCK)
            data = delta.encode_blocks(chain[0], self.length, BLOCK, {index: block})
            objects.update(_store(data))
            chain = (manifest_mod.chunk_id(data),) + chain
            content[index * BLOCK:(index + 1) * BLOCK] = block
        return chain, objects, bytes(content)

    def test_every_kind_of_entry(self):
        objects = _store(self.base)
        self.assertEqual(bytes(5), delta.resolve(None, objects.__getitem__, 5))
        self.assertEqual(self.base, delta.resolve(self.base_id, objects.__getitem__))
        for depth in (1, 2, 5):
            for base_id in ('base', None):
                chain, objects, content = self.chain(depth, base_id)
                self.assertBytesEqual(content, delta.resolve(chain, objects.__getitem__,
                                                             self.length))

    def test_a_hole_needs_its_length(self):
        self.assertRaises(exception.InvalidRange, delta.resolve, None, {}.__getitem__)

    def test_a_delta_whose_base_is_not_the_next_element_is_corrupt(self):
        chain, objects, _ = self.chain(2)
        other = self.rng.randbytes(self.length)
        objects.update(_store(other))
        spliced = (chain[0], chain[1], manifest_mod.chunk_id(other))
        error = self.assertRaises(delta.CorruptDelta, delta.resolve, spliced,
                                  objects.__getitem__, self.length)
        self.assertEqual(chain[1], error.chunk_id)
        self.assertIn(f'its base is {self.base_id}, its chain names '
                      f'{manifest_mod.chunk_id(other)}', str(error))
        # Two deltas swapped: the newest no longer sits on the one it names.
        swapped = (chain[1], chain[0], chain[2])
        self.assertRaises(delta.CorruptDelta, delta.resolve, swapped, objects.__getitem__,
                          self.length)

    def test_a_chain_element_that_is_no_delta_is_corrupt(self):
        error = self.assertRaises(delta.CorruptDelta, delta.resolve,
                                  (self.base_id, self.base_id), _store(self.base).__getitem__,
                                  self.length)
        self.assertIn('bad magic', str(error))

    def test_a_delta_of_another_length_than_its_place_is_corrupt(self):
        chain, objects, _ = self.chain(1)
        error = self.assertRaises(delta.CorruptDelta, delta.resolve, chain,
                                  objects.__getitem__, self.length - 1)
        self.assertIn(f'it yields {self.length} bytes, its place in the version holds '
                      f'{self.length - 1}', str(error))

    def test_what_read_object_raises_goes_through(self):
        chain, objects, _ = self.chain(1)
        del objects[self.base_id]

        def read(object_id):
            if object_id not in objects:
                raise exception.ChunkNotFound(object_id)
            return objects[object_id]

        error = self.assertRaises(exception.ChunkNotFound, delta.resolve, chain, read,
                                  self.length)
        self.assertEqual(self.base_id, error.chunk_id)
