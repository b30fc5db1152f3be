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
import functools
import hashlib
import struct
from typing import Callable, Mapping, NamedTuple

from vmcloud import exception
from vmcloud.storage import manifest as manifest_mod

MAGIC = b'VMCDELTA'
FORMAT = 1
MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 1 << 24
_HAS_BASE = 0x1
_BLOCK_SIZES = frozenset(1 << shift for shift in range(
    MIN_BLOCK_SIZE.bit_length() - 1, MAX_BLOCK_SIZE.bit_length()))
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
    return type(block_size) is int and block_size in _BLOCK_SIZES


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


class _Parsed(NamedTuple):
    block_size: int
    chunk_length: int
    base: str | None
    view: memoryview
    spans: list[tuple[int, int, int]]
    """(start in the chunk, offset in ``view``, length) of each changed block, in order."""


def decode(data: bytes, delta_id: str, verified: bool = False) -> Delta:
    """Parse and check a stored delta. ``verified``: its bytes were checked against
    ``delta_id`` already (its sha256), so its own checksum need not be.

    :raises: CorruptDelta (a CorruptChunk) naming ``delta_id``: bad magic, format,
        flags, block size, length or checksum, a block beyond the chunk, no block.
    """
    return _delta_of(_parse(data, delta_id, verified))


def _delta_of(parsed: _Parsed) -> Delta:
    return Delta(block_size=parsed.block_size, chunk_length=parsed.chunk_length,
                 base=parsed.base,
                 blocks={start // parsed.block_size: parsed.view[offset:offset + length]
                         for start, offset, length in parsed.spans})


def _parse(data: bytes, delta_id: str, verified: bool) -> _Parsed:
    """``decode`` without building the block map: what a read of a chain needs of each
    delta, as cheaply as every check allows (a read of a chunk parses each delta of
    its chain)."""
    view = memoryview(data)
    if len(view) < _HEADER.size + _CHECKSUM_BYTES:
        raise CorruptDelta(delta_id, f'{len(view)} bytes is shorter than a delta header')
    magic, fmt, flags, block_size, chunk_length, base = _HEADER.unpack_from(view)
    if (magic != MAGIC or fmt != FORMAT or flags & ~_HAS_BASE or chunk_length < 1
            or block_size not in _BLOCK_SIZES or not flags & _HAS_BASE and any(base)):
        raise CorruptDelta(delta_id, _header_problem(magic, fmt, flags, block_size,
                                                     chunk_length, base))
    body_length = len(view) - _CHECKSUM_BYTES
    if not verified and hashlib.sha256(view[:body_length]).digest() != view[body_length:]:
        raise CorruptDelta(delta_id, 'checksum mismatch')
    count = block_count(chunk_length, block_size)
    bitmap_end = _HEADER.size + -(-count // 8)
    if bitmap_end > body_length:
        raise CorruptDelta(delta_id, f'{len(view)} bytes cannot hold the bitmap of '
                                     f'{count} blocks')
    bits = int.from_bytes(view[_HEADER.size:bitmap_end], 'little')
    if not bits:
        raise CorruptDelta(delta_id, 'it changes no block')
    if bits.bit_length() > count:
        raise CorruptDelta(delta_id, f'block {bits.bit_length() - 1} is beyond the '
                                     f'chunk\'s {count}')
    spans = []
    offset = bitmap_end
    while bits:
        lowest = bits & -bits
        start = (lowest.bit_length() - 1) * block_size
        length = min(block_size, chunk_length - start)
        spans.append((start, offset, length))
        offset += length
        bits ^= lowest
    if offset != body_length:
        raise CorruptDelta(delta_id, f'{body_length - bitmap_end} bytes of data for '
                                     f'{len(spans)} blocks of {offset - bitmap_end} bytes')
    return _Parsed(block_size, chunk_length, base.hex() if flags & _HAS_BASE else None,
                   view, spans)


def _header_problem(magic: bytes, fmt: int, flags: int, block_size: int,
                    chunk_length: int, base: bytes) -> str:
    """What is wrong with a delta header that failed the check of ``_parse``."""
    if magic != MAGIC:
        return f'bad magic {magic!r}'
    if fmt != FORMAT:
        return f'unsupported format {fmt}'
    if flags & ~_HAS_BASE:
        return f'unknown flags {flags:#x}'
    if not valid_block_size(block_size):
        return f'invalid block size {block_size}'
    if chunk_length < 1:
        return 'a chunk length of 0'
    return 'a base id for a hole'


def apply(base: bytes, delta: Delta, delta_id: str = '?') -> bytes:
    """The chunk ``delta`` yields on top of ``base`` (the bytes its base resolves to).

    :raises: CorruptDelta naming ``delta_id`` if ``base`` is not as long as the chunk.
    """
    if len(base) != delta.chunk_length:
        raise CorruptDelta(delta_id, f'it changes a chunk of {delta.chunk_length} bytes, '
                                     f'its base holds {len(base)}')
    result = bytearray(base)
    for index, data in delta.blocks.items():
        start = index * delta.block_size
        result[start:start + len(data)] = data
    return bytes(result)


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
    return [(delta_id, _delta_of(parsed))
            for delta_id, parsed in _chain_parsed(chain, read_object, length)]


def _chain_parsed(chain: tuple[str | None, ...], read_object: ReadObject,
                  length: int | None) -> list[tuple[str, _Parsed]]:
    parsed = []
    for position, delta_id in enumerate(chain[:-1]):
        delta = _parse(read_object(delta_id), delta_id, verified=True)
        if delta.base != chain[position + 1]:
            raise CorruptDelta(delta_id, f'its base is {delta.base or "a hole"}, its chain '
                                         f'names {chain[position + 1] or "a hole"}')
        if length is not None and delta.chunk_length != length:
            raise CorruptDelta(delta_id, f'it yields {delta.chunk_length} bytes, its place '
                                         f'in the version holds {length}')
        parsed.append((delta_id, delta))
    return parsed


def resolve(entry: manifest_mod.Entry, read_object: ReadObject,
            length: int | None = None) -> bytes:
    """The bytes of a chunk a manifest entry names.

    A hole is ``length`` zeros; a plain chunk is ``read_object(id)``; a chain is its
    base (zeros for a hole base), then each delta applied, oldest first, each checked
    to name the next element of the chain as its base. ``length`` (the chunk's length
    in its version) is needed for a hole or a chain, and checked against each delta.

    :raises: CorruptDelta (a CorruptChunk) for a delta that does not decode or does not
        fit its chain or ``length``; what ``read_object`` raises (ChunkNotFound,
        CorruptChunk); InvalidRange for a hole or a chain without ``length``;
        StorageError for a chain whose base is not ``length`` bytes long.
    """
    if isinstance(entry, tuple) and len(entry) == 1:
        entry = entry[0]
    if isinstance(entry, str):
        return read_object(entry)
    if length is None:
        raise exception.InvalidRange('the length of a hole or a delta chain is needed to '
                                     'read it')
    chunk = bytearray(length)
    resolve_into(memoryview(chunk), entry, read_object)
    return bytes(chunk)


def resolve_into(chunk: memoryview, entry: manifest_mod.Entry,
                 read_object: ReadObject) -> None:
    """Write the bytes of the chunk ``entry`` names into ``chunk``, a writable buffer as
    long as the chunk's place in its version: what ``resolve`` returns, without a
    copy of the chunk (a read of many chunks resolves each into its place in the
    reader's buffer). On an error, ``chunk`` holds anything.

    :raises: what ``resolve`` raises; StorageError for a plain chunk (or a chain's
        base) not as long as ``chunk``.
    """
    if entry is None:
        chunk[:] = _zeros(len(chunk))
        return
    if isinstance(entry, str):
        _copy_object(chunk, entry, read_object(entry))
        return
    deltas = _chain_parsed(entry, read_object, len(chunk))
    if entry[-1] is None:
        chunk[:] = _zeros(len(chunk))
    else:
        _copy_object(chunk, entry[-1], read_object(entry[-1]))
    for _delta_id, delta in reversed(deltas):
        view = delta.view
        for start, offset, length in delta.spans:
            chunk[start:start + length] = view[offset:offset + length]


@functools.lru_cache(maxsize=4)
def _zeros(length: int) -> bytes:
    """``length`` zeros, made once for each of the few chunk lengths a store has."""
    return bytes(length)


def _copy_object(chunk: memoryview, object_id: str, data: bytes) -> None:
    if len(data) != len(chunk):
        raise exception.StorageError(f'chunk {object_id} holds {len(data)} bytes, its '
                                     f'place in the version holds {len(chunk)}')
    chunk[:] = data
