"""Delta objects: a chunk stored as the blocks it changed on top of another one.

A delta is stored exactly like a chunk (same backends, same put and read, its id the
sha256 of its encoded bytes, so equal deltas are stored once); the chunk cache and the
peer exchange carry it as an opaque chunk. A manifest entry names what a chunk
resolves to (see ``resolve``): None (a hole), a plain chunk id, or a chain, a tuple of
ids newest delta first whose last element is the plain base chunk id (or None for a
base that is a hole). Each delta of a chain applies to what the rest of the chain
resolves to, and names that element as its base, so a chain cannot be spliced.

Encoding (format 1, integers big-endian)::

    magic         8   b'VMCDELTA'
    format        u16 1
    flags         u16 bit 0: it has a base id (else its base is a hole)
    block_size    u32 a power of two, MIN_BLOCK_SIZE..MAX_BLOCK_SIZE
    chunk_length  u64 bytes of the chunk it yields, at least 1
    base          32  the base's id as raw sha256 bytes; zeros for a hole
    bitmap        ceil(blocks / 8) bytes, bit i (LSB first) set if block i changed
    data          the changed blocks in index order; the last block of a chunk whose
                  length is not a multiple of block_size is short
    checksum      32  sha256 of everything before it

The checksum lets a delta be checked where its id is not known (a copy on a peer);
``decode`` checks every field before any byte of data is used.
"""
import dataclasses
import hashlib
import struct
from typing import Callable, Mapping

from vmcloud import exception
from vmcloud.storage import manifest as manifest_mod

MAGIC = b'VMCDELTA'
FORMAT = 1
MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 1 << 24
_HAS_BASE = 0x1
_HEADER = struct.Struct('>8sHHIQ32s')
_CHECKSUM_BYTES = 32

ReadObject = Callable[[str], bytes]
"""read_object(id) -> the verified bytes of a stored object (chunk or delta)."""


class CorruptDelta(exception.CorruptChunk):
    """A stored delta that cannot be decoded, or that does not fit its chain."""

    def __init__(self, delta_id: str, problem: str):
        self.chunk_id = delta_id
        self.problem = problem
        exception.StorageError.__init__(self, f'delta {delta_id} is corrupt: {problem}')


@dataclasses.dataclass(frozen=True)
class BlockChanges:
    """Changed blocks of one chunk: what a snapshot passes for a partly written chunk.

    ``blocks[i]`` replaces bytes ``[i * block_size, (i + 1) * block_size)`` of the
    chunk (the last block of a short chunk is short); every other byte is the
    parent's.
    """

    block_size: int
    blocks: Mapping[int, bytes]


@dataclasses.dataclass(frozen=True)
class Delta:
    """A decoded delta: ``blocks`` maps each changed block index to its bytes (views of
    the stored delta's)."""

    block_size: int
    chunk_length: int
    base: str | None
    blocks: Mapping[int, bytes | memoryview]

    @property
    def changed_bytes(self) -> int:
        return sum(len(data) for data in self.blocks.values())


def block_count(chunk_length: int, block_size: int) -> int:
    return -(-chunk_length // block_size)


def block_length(index: int, chunk_length: int, block_size: int) -> int:
    """Bytes of block ``index`` of a chunk: block_size, less for the last of a short one."""
    return min(block_size, chunk_length - index * block_size)


def valid_block_size(block_size: int) -> bool:
    return (type(block_size) is int and MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE
            and block_size & (block_size - 1) == 0)


def checked_block_size(block_size: int, chunk_size: int,
                       option: str = '[storage] delta_block_size') -> int:
    """``block_size`` if it can be the block of a chunk of ``chunk_size`` bytes.

    :raises: ConfigError naming ``option`` unless it is a power of two from
        MIN_BLOCK_SIZE that divides ``chunk_size``.
    """
    if not valid_block_size(block_size) or chunk_size % block_size:
        raise exception.ConfigError(
            f'{option} = {block_size!r} is not a power of two from {MIN_BLOCK_SIZE} to '
            f'{MAX_BLOCK_SIZE} that divides the chunk size {chunk_size}')
    return block_size


def check_blocks(chunk_length: int, block_size: int, blocks: Mapping[int, bytes],
                 what: str) -> None:
    """That ``blocks`` are whole blocks of a chunk of ``chunk_length`` bytes.

    :raises: InvalidRange naming ``what`` (the chunk) and the first block that does
        not fit, or a block size that is not a power of two in range.
    """
    if not valid_block_size(block_size):
        raise exception.InvalidRange(
            f'block size {block_size!r} of {what} is not a power of two from '
            f'{MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}')
    count = block_count(chunk_length, block_size)
    for index, data in blocks.items():
        if type(index) is not int or not 0 <= index < count:
            raise exception.InvalidRange(
                f'block {index!r} of {what} is outside its {count} blocks of {block_size} bytes')
        expected = block_length(index, chunk_length, block_size)
        if len(data) != expected:
            raise exception.InvalidRange(
                f'block {index} of {what} holds {len(data)} bytes, not {expected}')


def encode_blocks(base_id: str | None, chunk_length: int, block_size: int,
                  blocks: Mapping[int, bytes]) -> bytes:
    """The delta object that changes ``blocks`` of the chunk ``base_id`` resolves to.

    :raises: InvalidRange if a block does not fit the chunk, none is given, the block
        size is invalid or ``base_id`` is not a chunk id.
    """
    what = f'a delta on {base_id or "a hole"}'
    if type(chunk_length) is not int or chunk_length < 1:
        raise exception.InvalidRange(f'chunk length {chunk_length!r} of {what} is not positive')
    if not blocks:
        raise exception.InvalidRange(f'{what} changes no block')
    if base_id is not None and not (isinstance(base_id, str)
                                    and manifest_mod.CHUNK_ID.fullmatch(base_id)):
        raise exception.InvalidRange(f'invalid base id {base_id!r} for a delta')
    check_blocks(chunk_length, block_size, blocks, what)
    bitmap = bytearray(-(-block_count(chunk_length, block_size) // 8))
    for index in blocks:
        bitmap[index // 8] |= 1 << (index % 8)
    parts = [_HEADER.pack(MAGIC, FORMAT, _HAS_BASE if base_id else 0, block_size,
                          chunk_length, bytes.fromhex(base_id) if base_id else bytes(32)),
             bytes(bitmap)]
    parts.extend(bytes(blocks[index]) for index in sorted(blocks))
    body = b''.join(parts)
    return body + hashlib.sha256(body).digest()


def decode(data: bytes, delta_id: str, verified: bool = False) -> Delta:
    """Parse and check a stored delta. ``verified``: its bytes were checked against
    ``delta_id`` already (its sha256), so its own checksum need not be.

    :raises: CorruptDelta (a CorruptChunk) naming ``delta_id``: bad magic, format,
        flags, block size, length or checksum, a block beyond the chunk, no block.
    """
    view = memoryview(data)
    if len(view) < _HEADER.size + _CHECKSUM_BYTES:
        raise CorruptDelta(delta_id, f'{len(view)} bytes is shorter than a delta header')
    magic, fmt, flags, block_size, chunk_length, base = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise CorruptDelta(delta_id, f'bad magic {magic!r}')
    if fmt != FORMAT:
        raise CorruptDelta(delta_id, f'unsupported format {fmt}')
    if flags & ~_HAS_BASE:
        raise CorruptDelta(delta_id, f'unknown flags {flags:#x}')
    if not valid_block_size(block_size):
        raise CorruptDelta(delta_id, f'invalid block size {block_size}')
    if chunk_length < 1:
        raise CorruptDelta(delta_id, 'a chunk length of 0')
    if not flags & _HAS_BASE and any(base):
        raise CorruptDelta(delta_id, 'a base id for a hole')
    body_length = len(view) - _CHECKSUM_BYTES
    if not verified and hashlib.sha256(view[:body_length]).digest() != view[body_length:]:
        raise CorruptDelta(delta_id, 'checksum mismatch')
    count = block_count(chunk_length, block_size)
    bitmap_end = _HEADER.size + -(-count // 8)
    if bitmap_end > body_length:
        raise CorruptDelta(delta_id, f'{len(view)} bytes cannot hold the bitmap of '
                                     f'{count} blocks')
    bits = int.from_bytes(view[_HEADER.size:bitmap_end], 'little')
    changed = []
    while bits:
        lowest = bits & -bits
        changed.append(lowest.bit_length() - 1)
        bits ^= lowest
    if changed and changed[-1] >= count:
        raise CorruptDelta(delta_id, f'block {changed[-1]} is beyond the chunk\'s {count}')
    if not changed:
        raise CorruptDelta(delta_id, 'it changes no block')
    expected = sum(block_length(i, chunk_length, block_size) for i in changed)
    if bitmap_end + expected != body_length:
        raise CorruptDelta(delta_id, f'{body_length - bitmap_end} bytes of data for '
                                     f'{len(changed)} blocks of {expected} bytes')
    blocks = {}
    offset = bitmap_end
    for index in changed:
        length = block_length(index, chunk_length, block_size)
        blocks[index] = view[offset:offset + length]  # no copy: apply copies it once
        offset += length
    return Delta(block_size=block_size, chunk_length=chunk_length,
                 base=base.hex() if flags & _HAS_BASE else None, blocks=blocks)


def apply(base: bytes, delta: Delta, delta_id: str = '?') -> bytes:
    """The chunk ``delta`` yields on top of ``base`` (the bytes its base resolves to).

    :raises: CorruptDelta naming ``delta_id`` if ``base`` is not as long as the chunk.
    """
    result = bytearray(base)
    _apply_in_place(result, delta, delta_id)
    return bytes(result)


def _apply_in_place(chunk: bytearray, delta: Delta, delta_id: str) -> None:
    if len(chunk) != delta.chunk_length:
        raise CorruptDelta(delta_id, f'it changes a chunk of {delta.chunk_length} bytes, '
                                     f'its base holds {len(chunk)}')
    for index, data in delta.blocks.items():
        start = index * delta.block_size
        chunk[start:start + len(data)] = data


def chain_of(entry: manifest_mod.Entry) -> tuple[str | None, ...]:
    """``entry`` as a chain: (None,) for a hole, (id,) for a plain chunk."""
    if isinstance(entry, tuple):
        return entry
    return (entry,)


def chain_deltas(chain: tuple[str | None, ...], read_object: ReadObject,
                 length: int | None = None) -> list[tuple[str, Delta]]:
    """(id, decoded) of each delta of ``chain``, newest first, each checked to name the
    next element of the chain as its base and (given ``length``) to yield ``length``
    bytes.

    :raises: CorruptDelta for one that does not decode or fit; what ``read_object``
        raises.
    """
    deltas = [(delta_id, decode(read_object(delta_id), delta_id, verified=True))
              for delta_id in chain[:-1]]
    for position, (delta_id, delta) in enumerate(deltas):
        if delta.base != chain[position + 1]:
            raise CorruptDelta(delta_id, f'its base is {delta.base or "a hole"}, its chain '
                                         f'names {chain[position + 1] or "a hole"}')
        if length is not None and delta.chunk_length != length:
            raise CorruptDelta(delta_id, f'it yields {delta.chunk_length} bytes, its place '
                                         f'in the version holds {length}')
    return deltas


def resolve(entry: manifest_mod.Entry, read_object: ReadObject,
            length: int | None = None) -> bytes:
    """The bytes of a chunk a manifest entry names.

    A hole is ``length`` zeros; a plain chunk is ``read_object(id)``; a chain is its
    base (zeros for a hole base), then each delta applied, oldest first, each checked
    to name the next element of the chain as its base. ``length`` (the chunk's length
    in its version) is needed for a hole and checked against each delta.

    :raises: CorruptDelta (a CorruptChunk) for a delta that does not decode or does not
        fit its chain or ``length``; what ``read_object`` raises (ChunkNotFound,
        CorruptChunk); InvalidRange for a hole without ``length``.
    """
    if entry is None:
        if length is None:
            raise exception.InvalidRange('the length of a hole is needed to read it')
        return bytes(length)
    if isinstance(entry, str):
        return read_object(entry)
    if len(entry) == 1:
        return resolve(entry[0], read_object, length)
    deltas = chain_deltas(entry, read_object, length)
    base_id = entry[-1]
    chunk = bytearray(deltas[-1][1].chunk_length if base_id is None else read_object(base_id))
    for delta_id, delta in reversed(deltas):
        _apply_in_place(chunk, delta, delta_id)
    return bytes(chunk)
