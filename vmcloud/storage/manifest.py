"""Image versions: a manifest lists the content hashes of an image's chunks.

A manifest is stored as canonical JSON with a checksum over its body, so a
flipped bit in a manifest is detected as surely as one in a chunk.
"""
import dataclasses
import datetime
import hashlib
import json
import re
from typing import Any

from vmcloud import exception

FORMAT_VERSION = 1
HASH_NAME = 'sha256'

_IMAGE_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$')


def validate_image_name(name: str, what: str = 'image') -> str:
    if not isinstance(name, str) or not _IMAGE_NAME.match(name):
        raise exception.StorageError(
            f"invalid {what} name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit")
    return name


def chunk_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclasses.dataclass(frozen=True, order=True)
class VersionRef:
    """Names one version of one image, written ``image:version``."""

    image: str
    version: int

    def __str__(self) -> str:
        return f'{self.image}:{self.version}'

    @classmethod
    def parse(cls, text: str) -> tuple[str, int | None]:
        """Split ``image[:version]``; the version is None when omitted."""
        image, sep, version = text.partition(':')
        validate_image_name(image)
        if not sep:
            return image, None
        if not version.isdigit() or int(version) < 1:
            raise exception.StorageError(f'invalid version {version!r} in {text!r}')
        return image, int(version)


@dataclasses.dataclass(frozen=True)
class Manifest:
    image: str
    version: int
    size: int
    chunk_size: int
    # One entry per chunk: its content hash, or None for an all-zero chunk (a hole).
    chunks: tuple[str | None, ...]
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

    def data_chunk_ids(self) -> set[str]:
        return {c for c in self.chunks if c is not None}

    def encode(self) -> bytes:
        body = {
            'format': FORMAT_VERSION,
            'hash': HASH_NAME,
            'image': self.image,
            'version': self.version,
            'parent': None if self.parent is None else {
                'image': self.parent.image, 'version': self.parent.version},
            'size': self.size,
            'chunk_size': self.chunk_size,
            'created_at': self.created_at,
            'source': self.source,
            'chunks': list(self.chunks),
        }
        canonical = json.dumps(body, sort_keys=True, separators=(',', ':'))
        body['checksum'] = hashlib.sha256(canonical.encode()).hexdigest()
        return json.dumps(body, sort_keys=True, separators=(',', ':')).encode()

    @classmethod
    def decode(cls, data: bytes, where: str) -> 'Manifest':
        """Parse a stored manifest.

        :raises: CorruptManifest naming ``where`` if it is unreadable or fails its checksum.
        """
        try:
            body = json.loads(data)
            checksum = body.pop('checksum')
            canonical = json.dumps(body, sort_keys=True, separators=(',', ':'))
            if hashlib.sha256(canonical.encode()).hexdigest() != checksum:
                raise ValueError('checksum mismatch')
            if body['format'] != FORMAT_VERSION or body['hash'] != HASH_NAME:
                raise ValueError(f"unsupported format {body['format']}/{body['hash']}")
            parent = body['parent']
            manifest = cls(
                image=body['image'], version=body['version'], size=body['size'],
                chunk_size=body['chunk_size'], chunks=tuple(body['chunks']),
                parent=None if parent is None else VersionRef(parent['image'], parent['version']),
                created_at=body['created_at'], source=body['source'])
        except (ValueError, KeyError, TypeError) as exc:
            raise exception.CorruptManifest(f'manifest {where} is corrupt: {exc}') from exc
        expected = -(-manifest.size // manifest.chunk_size) if manifest.size else 0
        if len(manifest.chunks) != expected:
            raise exception.CorruptManifest(
                f'manifest {where} is corrupt: {len(manifest.chunks)} chunks for '
                f'{manifest.size} bytes')
        return manifest


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
