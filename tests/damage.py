"""Damaging a warehouse on purpose, the way disks and operators do."""
import os

from vmcloud.storage.backends import file as file_backend


def flip_bit(path: str, offset: int) -> None:
    with open(path, 'r+b') as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


def corrupt_chunk(backend: file_backend.FileBackend, chunk_id: str) -> None:
    """Flip one bit in the middle of a stored chunk."""
    location = backend.locate(chunk_id)
    flip_bit(backend._pack_path(location.pack), location.offset + location.length // 2)


def lose_pack_of(backend: file_backend.FileBackend, chunk_id: str) -> None:
    """Delete the pack file holding ``chunk_id`` but keep its index, as a careless rm would."""
    os.unlink(backend._pack_path(backend.locate(chunk_id).pack))


def manifest_path(backend: file_backend.FileBackend, image: str, version: int) -> str:
    return os.path.join(backend.images_dir, image, f'{version}.json')


def corrupt_manifest(backend: file_backend.FileBackend, image: str, version: int) -> None:
    """Flip one bit near the start of a stored manifest (inside its header)."""
    flip_bit(manifest_path(backend, image, version), 40)


def corrupt_pack_index_of(backend: file_backend.FileBackend, chunk_id: str) -> None:
    """Flip one bit in the index of the pack holding ``chunk_id``."""
    flip_bit(backend._pack_path(backend.locate(chunk_id).pack, '.idx'), 20)
