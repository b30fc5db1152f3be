"""The interface every warehouse backend implements.

A backend stores two things: chunks, named by their content hash, and
manifests, one per image version. It knows nothing about images beyond that;
chunking, deduplication, snapshots and garbage collection live in the
Warehouse, above every backend.

A backend declares its own options as ``OPTION_GROUP`` and ``OPTIONS`` and
registers them when it is constructed (as glance_store's drivers do).
"""
import abc
import contextlib
from typing import ContextManager, Iterator

from oslo_config import cfg

from vmcloud import plugins

NAMESPACE = 'vmcloud.storage.backends'


class WriteSession(abc.ABC):
    """Chunks written for one new version; none is visible before commit()."""

    @abc.abstractmethod
    def put_chunk(self, chunk_id: str, data: bytes) -> bool:
        """Stage a chunk unless the store or this session already has it.

        :returns: True if the bytes were stored, False if deduplicated.
        :raises: StorageError if the chunk cannot be written.
        """

    @abc.abstractmethod
    def commit(self) -> None:
        """Make every staged chunk durable and visible.

        :raises: StorageError if they cannot be made durable.
        """

    @abc.abstractmethod
    def abort(self) -> None:
        """Drop every staged chunk. Never raises."""

    @property
    @abc.abstractmethod
    def stored_bytes(self) -> int:
        """Bytes of new chunk data this session stored (after deduplication)."""


class Backend(abc.ABC):
    OPTION_GROUP: cfg.OptGroup | None = None
    OPTIONS: list[cfg.Opt] = []

    def __init__(self, conf: cfg.ConfigOpts):
        if self.OPTION_GROUP is not None:
            conf.register_group(self.OPTION_GROUP)
            conf.register_opts(self.OPTIONS, group=self.OPTION_GROUP)
        self.conf = conf

    # -- chunks --------------------------------------------------------------

    @abc.abstractmethod
    def has_chunk(self, chunk_id: str) -> bool:
        """Whether a durable chunk with this id is stored."""

    @abc.abstractmethod
    def read_chunk(self, chunk_id: str) -> bytes:
        """:raises: ChunkNotFound if the chunk is not stored."""

    @abc.abstractmethod
    def iter_chunks(self) -> Iterator[tuple[str, int]]:
        """Every stored chunk as (chunk id, stored size in bytes)."""

    @abc.abstractmethod
    def retain(self, referenced: set[str]) -> tuple[int, int]:
        """Remove every chunk not in ``referenced``; only gc calls this, holding exclusive_lock().

        :returns: (chunks removed, bytes freed).
        """

    @abc.abstractmethod
    def stored_chunk_bytes(self) -> int:
        """Bytes the stored chunks occupy, with any space not yet reclaimed."""

    @abc.abstractmethod
    def begin_write(self) -> WriteSession:
        """Start staging the chunks of a new version."""

    # -- manifests -----------------------------------------------------------

    @abc.abstractmethod
    def create_manifest(self, image: str, version: int, data: bytes) -> None:
        """Durably store a manifest.

        :raises: FileExistsError if that version already exists.
        """

    @abc.abstractmethod
    def read_manifest(self, image: str, version: int) -> bytes:
        """:raises: ImageNotFound if that version does not exist."""

    @abc.abstractmethod
    def delete_manifest(self, image: str, version: int) -> None:
        """Durably remove a manifest. :raises: ImageNotFound."""

    @abc.abstractmethod
    def list_images(self) -> list[str]:
        """Names of the images with at least one version, sorted."""

    @abc.abstractmethod
    def list_versions(self, image: str) -> list[int]:
        """Versions of ``image``, ascending; empty if there are none."""

    # -- concurrency ---------------------------------------------------------

    @abc.abstractmethod
    def shared_lock(self) -> ContextManager[None]:
        """Held by every writer for its whole session: gc cannot run meanwhile."""

    @abc.abstractmethod
    def exclusive_lock(self, timeout: float) -> ContextManager[None]:
        """Held by gc.

        :raises: WarehouseBusy if writers still hold shared locks after ``timeout``.
        """

    @abc.abstractmethod
    def image_lock(self, image: str) -> ContextManager[None]:
        """Serialises version numbering and deletion for one image."""

    @abc.abstractmethod
    def purge_abandoned(self) -> int:
        """Remove what crashed writers left behind; called under exclusive_lock().

        :returns: the number of abandoned files removed.
        """

    def manifests_stored_bytes(self) -> int:
        return sum(len(self.read_manifest(image, version))
                   for image in self.list_images() for version in self.list_versions(image))


def load(conf: cfg.ConfigOpts) -> Backend:
    """Instantiate the backend named by ``[storage] backend``.

    :raises: PluginNotFound if no backend of that name is installed.
    """
    return plugins.load(NAMESPACE, conf.storage.backend, conf)


@contextlib.contextmanager
def image_locks(backend: Backend, *images: str) -> Iterator[None]:
    """Take several image locks in a fixed order, so two callers never deadlock."""
    with contextlib.ExitStack() as stack:
        for image in sorted(set(images)):
            stack.enter_context(backend.image_lock(image))
        yield
