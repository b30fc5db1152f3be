"""Image versions: a manifest lists the content hashes of an image's chunks.

A manifest is stored as canonical JSON with checksums, so a flipped bit in a
manifest is detected as surely as one in a chunk. Format 2 (written since the
hardening of issue 12) is two lines: a header of the fixed fields, with its own
checksum and the sha256 of the body, then the body, the chunk list, where a run
of holes is one integer. Listing reads only the header, and an all-hole 4 TiB
image stores a few hundred bytes instead of 84 MB. Format 3 (issue 19) is format 2
whose body may also hold delta chains, each a list of ids (see
vmcloud.storage.delta), and is stored zlib-compressed (its header names the length
of the body uncompressed, ``body_bytes``): a snapshot of small writes changes little,
and a chain of hex ids would otherwise cost the warehouse as much as a tenth of what
it stores for them. It is written only for a version with at least one chain, so
readers of format 2 keep reading every other version. Formats 1 and 2 stay
readable.
"""
import dataclasses
import datetime
import hashlib
import json
import re
import zlib
from typing import Any

from vmcloud import exception

FORMAT_VERSION = 2
"""The format of a manifest without delta chains."""
DELTA_FORMAT_VERSION = 3
"""The format of a manifest with at least one delta chain."""
READABLE_FORMATS = (1, 2, 3)
_ID_BYTES = 67
"""The JSON of a chunk id in a body, quotes and comma: what bounds a body's length."""
_BODY_LEVEL = 6
MAX_CHAIN_DELTAS = 64
"""The most deltas a chain read back may hold: [storage] delta_max_depth bounds what is
written, but a version written under a deeper limit must still read."""
HASH_NAME = 'sha256'
HEADER_LIMIT = 4096
"""Bytes ``list`` reads of each manifest: enough for the header of any manifest we write."""

# fullmatch: '$' would also accept a name ending in a newline.
_IMAGE_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9._-]{0,127}')
# ASCII digits only: str.isdigit() accepts '²', which int() then refuses. 18 digits
# keep int() far from its length limit and a version far from overflow anywhere.
_VERSION = re.compile(r'[0-9]{1,18}')
# What a chunk id looks like: a sha256 in lowercase hex.
CHUNK_ID = re.compile(r'[0-9a-f]{64}')


Entry = str | tuple[str | None, ...] | None
"""A chunk's entry in a manifest: None (a hole), a plain chunk id, or a delta chain (a
tuple of ids, newest delta first, its last element the base chunk id or None)."""


def validate_image_name(name: str, what: str = 'image') -> str:
    """:raises: InvalidName unless ``name`` is 1-128 ASCII letters, digits, '.', '_', '-'."""
    if not isinstance(name, str) or not _IMAGE_NAME.fullmatch(name):
        raise exception.InvalidName(
            f"invalid {what} name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit")
    return name


def chunk_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(',', ':')).encode()


@dataclasses.dataclass(frozen=True, order=True)
class VersionRef:
    """Names one version of one image, written ``image:version``."""

    image: str
    version: int

    def __str__(self) -> str:
        return f'{self.image}:{self.version}'

    @classmethod
    def parse(cls, text: str) -> tuple[str, int | None]:
        """Split ``image[:version]``; the version is None when omitted.

        :raises: InvalidName for a bad image name or a version that is not 1 or more
            ASCII digits.
        """
        image, sep, version = text.partition(':')
        validate_image_name(image)
        if not sep:
            return image, None
        if not _VERSION.fullmatch(version) or int(version) < 1:
            raise exception.InvalidName(
                f'invalid version {version!r} in {text!r}: use a number from 1')
        return image, int(version)


@dataclasses.dataclass(frozen=True)
class ManifestSummary:
    """The fixed fields of a manifest: what a listing shows, without the chunk list."""

    image: str
    version: int
    size: int
    chunk_size: int
    data_chunks: int
    parent: VersionRef | None = None
    created_at: str = ''
    source: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ref(self) -> VersionRef:
        return VersionRef(self.image, self.version)

    @property
    def chunk_count(self) -> int:
        return -(-self.size // self.chunk_size)


@dataclasses.dataclass(frozen=True)
class Manifest:
    image: str
    version: int
    size: int
    chunk_size: int
    # One entry per chunk: its content hash, None for an all-zero chunk (a hole), or a
    # delta chain (Entry).
    chunks: tuple[Entry, ...]
    parent: VersionRef | None = None
    created_at: str = ''
    source: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ref(self) -> VersionRef:
        return VersionRef(self.image, self.version)

    @property
    def chunk_count(self) -> int:
        return len(self.chunks)

    def chunk_length(self, index: int) -> int:
        """Bytes covered by chunk ``index``; the last chunk may be short."""
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def identity(self) -> str:
        """What tells this version from a deleted one that had the same name and number
        (a boot profile recorded for it, a node's copy of it as a boot artifact)."""
        digest = hashlib.sha256(repr((self.size, self.chunk_size, self.created_at)).encode())
        for chunk in self.chunks:
            # A chain as its ids joined: a manifest without chains keeps its identity.
            text = ','.join(c or '-' for c in chunk) if isinstance(chunk, tuple) else chunk
            digest.update((text or '-').encode())
        return digest.hexdigest()

    def object_ids(self, index: int) -> tuple[str, ...]:
        """Every stored object chunk ``index`` needs to be read: none for a hole, its id
        for a plain chunk, each delta and the base (unless a hole) of a chain."""
        entry = self.chunks[index]
        if entry is None:
            return ()
        if isinstance(entry, str):
            return (entry,)
        return tuple(c for c in entry if c is not None)

    def is_delta(self, index: int) -> bool:
        """Whether chunk ``index`` is a delta chain (not a hole or a plain chunk)."""
        return isinstance(self.chunks[index], tuple)

    @property
    def has_deltas(self) -> bool:
        return any(isinstance(c, tuple) for c in self.chunks)

    def data_chunk_ids(self) -> set[str]:
        """Every stored object a read of this version needs: plain chunks, deltas and
        the bases of chains (what gc keeps, staging fetches and verify checks)."""
        ids: set[str] = set()
        for entry in self.chunks:
            if isinstance(entry, str):
                ids.add(entry)
            elif entry is not None:
                ids.update(c for c in entry if c is not None)
        return ids

    def summary(self) -> ManifestSummary:
        return ManifestSummary(
            image=self.image, version=self.version, size=self.size,
            chunk_size=self.chunk_size, data_chunks=sum(1 for c in self.chunks if c),
            parent=self.parent, created_at=self.created_at, source=self.source)

    def _fields(self) -> dict[str, Any]:
        return {
            'hash': HASH_NAME,
            'image': self.image,
            'version': self.version,
            'parent': None if self.parent is None else {
                'image': self.parent.image, 'version': self.parent.version},
            'size': self.size,
            'chunk_size': self.chunk_size,
            'created_at': self.created_at,
            'source': self.source,
        }

    def encode(self) -> bytes:
        """A checksummed header line, then the chunk list with runs of holes: format 3
        if a chunk is a delta chain (a list of ids in the body), else format 2."""
        runs: list[str | int | list[str | None]] = []
        for entry in self.chunks:
            if isinstance(entry, tuple):
                runs.append(list(entry))
            elif entry is not None:
                runs.append(entry)
            elif runs and isinstance(runs[-1], int):
                runs[-1] += 1
            else:
                runs.append(1)
        body = _canonical(runs)
        extra: dict[str, Any] = {'format': FORMAT_VERSION}
        if self.has_deltas:
            extra = {'format': DELTA_FORMAT_VERSION, 'body_bytes': len(body)}
            body = zlib.compress(body, _BODY_LEVEL)
        header = dict(self._fields(), **extra,
                      data_chunks=sum(1 for c in self.chunks if c),
                      body=hashlib.sha256(body).hexdigest())
        header['checksum'] = hashlib.sha256(_canonical(header)).hexdigest()
        return _canonical(header) + b'\n' + body

    def encode_v1(self) -> bytes:
        """The format before issue 12, kept to test that old warehouses stay readable."""
        body = dict(self._fields(), format=1, chunks=list(self.chunks))
        body['checksum'] = hashlib.sha256(_canonical(body)).hexdigest()
        return _canonical(body)

    @classmethod
    def decode(cls, data: bytes, where: str) -> 'Manifest':
        """Parse a stored manifest of any readable format (READABLE_FORMATS).

        :raises: CorruptManifest naming ``where`` if it is unreadable, fails a
            checksum or holds fields of the wrong type or range.
        """
        try:
            header_line, newline, body_line = data.partition(b'\n')
            if newline:
                header = _checked(header_line, 2, 3)
                if hashlib.sha256(body_line).hexdigest() != header['body']:
                    raise ValueError('body checksum mismatch')
                expected = _expected_chunks(header)
                chains = header['format'] == DELTA_FORMAT_VERSION
                if chains:
                    body_line = _inflated(body_line, header['body_bytes'], expected)
                chunks = _expand(json.loads(body_line), expected, chains=chains)
            else:
                header = _checked(data, 1)
                chunks = header['chunks']
                if not isinstance(chunks, list):
                    raise ValueError('chunks is not a list')
                chunks = tuple(chunks)
            fields = _fields_of(header)
            for entry in chunks:
                # A chain (a tuple: format 3 only) was checked as it was read.
                if entry is not None and not isinstance(entry, tuple) and not (
                        isinstance(entry, str) and CHUNK_ID.fullmatch(entry)):
                    raise ValueError(f'invalid chunk id {entry!r}')
            manifest = cls(chunks=chunks, **fields)
            if newline and header['data_chunks'] != sum(1 for c in chunks if c):
                raise ValueError('data chunk count differs from the header')
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise exception.CorruptManifest(f'manifest {where} is corrupt: {exc}') from exc
        expected = -(-manifest.size // manifest.chunk_size)
        if len(manifest.chunks) != expected:
            raise exception.CorruptManifest(
                f'manifest {where} is corrupt: {len(manifest.chunks)} chunks for '
                f'{manifest.size} bytes')
        return manifest

    @staticmethod
    def decode_summary(prefix: bytes, where: str, complete: bool) -> ManifestSummary | None:
        """The fixed fields from the first bytes of a stored manifest.

        ``complete`` says ``prefix`` is the whole manifest. Only the header's own
        checksum is checked: the chunk list is not read.

        :returns: None if ``prefix`` does not hold the whole header (a format 1
            manifest, which has none, unless ``complete``): read it all then.
        :raises: CorruptManifest naming ``where``.
        """
        header_line, newline, _ = prefix.partition(b'\n')
        if not newline:
            return Manifest.decode(prefix, where).summary() if complete else None
        try:
            header = _checked(header_line, 2, 3)
            data_chunks = header['data_chunks']
            if not _is_count(data_chunks):
                raise ValueError(f'invalid data chunk count {data_chunks!r}')
            summary = ManifestSummary(data_chunks=data_chunks, **_fields_of(header))
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise exception.CorruptManifest(f'manifest {where} is corrupt: {exc}') from exc
        if data_chunks > summary.chunk_count:
            raise exception.CorruptManifest(
                f'manifest {where} is corrupt: {data_chunks} data chunks for '
                f'{summary.size} bytes')
        return summary


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and _IMAGE_NAME.fullmatch(value) is not None


def _is_count(value: Any, least: int = 0) -> bool:
    return type(value) is int and value >= least


def _checked(line: bytes, *formats: int) -> dict[str, Any]:
    """A JSON object whose 'checksum' matches the rest of it, of one of ``formats``."""
    body = json.loads(line)
    if not isinstance(body, dict):
        raise ValueError('not a JSON object')
    checksum = body.pop('checksum')
    if hashlib.sha256(_canonical(body)).hexdigest() != checksum:
        raise ValueError('checksum mismatch')
    if body['format'] not in formats or body['hash'] != HASH_NAME:
        raise ValueError(f"unsupported format {body['format']}/{body['hash']}")
    return body


def _fields_of(body: dict[str, Any]) -> dict[str, Any]:
    """The fields both formats share, checked: a checksum proves integrity, not sense."""
    parent = body['parent']
    if parent is not None:
        if not _is_name(parent['image']) or not _is_count(parent['version'], 1):
            raise ValueError(f'invalid parent {parent!r}')
        parent = VersionRef(parent['image'], parent['version'])
    if not _is_name(body['image']):
        raise ValueError(f"invalid image name {body['image']!r}")
    for name, least in (('version', 1), ('size', 0), ('chunk_size', 1)):
        if not _is_count(body[name], least):
            raise ValueError(f'invalid {name} {body[name]!r}')
    if not isinstance(body['created_at'], str) or not isinstance(body['source'], dict):
        raise ValueError('invalid created_at or source')
    return dict(image=body['image'], version=body['version'], size=body['size'],
                chunk_size=body['chunk_size'], parent=parent,
                created_at=body['created_at'], source=body['source'])


def _expected_chunks(header: dict[str, Any]) -> int:
    for name, least in (('size', 0), ('chunk_size', 1)):
        if not _is_count(header[name], least):
            raise ValueError(f'invalid {name} {header[name]!r}')
    return -(-header['size'] // header['chunk_size'])


def _inflated(body: bytes, length: Any, expected: int) -> bytes:
    """A format 3 body uncompressed: ``length`` bytes (its header's body_bytes), no
    more than the longest list of ``expected`` chunks can take, whatever it claims."""
    most = expected * (MAX_CHAIN_DELTAS + 1) * _ID_BYTES + 2
    if not _is_count(length, 2) or length > most:
        raise ValueError(f'invalid body length {length!r} for {expected} chunks')
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(body, length + 1)
    except zlib.error as exc:
        raise ValueError(f'body does not decompress: {exc}') from exc
    if len(data) != length or not inflater.eof or inflater.unused_data:
        raise ValueError(f'body decompresses to other than its {length} bytes')
    return data


def _expand(runs: Any, expected: int, chains: bool = False) -> tuple[Entry, ...]:
    """The chunk list with its runs of holes expanded (and, if ``chains``, its delta
    chains as tuples); never longer than ``expected``."""
    if not isinstance(runs, list):
        raise ValueError('chunk list is not a list')
    chunks: list[Entry] = []
    for entry in runs:
        if _is_count(entry, 1):
            if len(chunks) + entry > expected:
                raise ValueError(f'more chunks than the {expected} of its size')
            chunks.extend([None] * entry)
        elif isinstance(entry, str):
            chunks.append(entry)
        elif chains and isinstance(entry, list):
            chunks.append(_chain(entry, len(chunks)))
        else:
            raise ValueError(f'invalid chunk list entry {entry!r:.200}')
    return tuple(chunks)


def _chain(entry: list, index: int) -> tuple[str | None, ...]:
    """A delta chain of the body, checked: deltas, then a base id or None.

    Its length is checked against MAX_CHAIN_DELTAS only, not the configured depth: a
    version written under a deeper limit must still read.
    """
    if not 2 <= len(entry) <= MAX_CHAIN_DELTAS + 1:
        raise ValueError(f'delta chain of chunk {index} has {len(entry)} elements, not '
                         f'2 to {MAX_CHAIN_DELTAS + 1}')
    *deltas, base = entry
    for element in deltas + ([] if base is None else [base]):
        if not (isinstance(element, str) and CHUNK_ID.fullmatch(element)):
            raise ValueError(f'invalid chunk id {element!r:.80} in the delta chain of '
                             f'chunk {index}')
    return tuple(entry)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
