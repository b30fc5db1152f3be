"""The interface every warehouse backend implements.

A backend stores three things: chunks, named by their content hash;
manifests, one per image version; and attachments, small named blobs kept
beside an image (a boot profile), replaced whole and removed with the image.
It knows nothing about images beyond that; chunking, deduplication, snapshots
and garbage collection live in the Warehouse, above every backend. Attachments
are neither chunks nor manifests: iter_chunks, retain, the listings and the
byte counts never see them.

A backend declares its own options as ``OPTION_GROUP`` and ``OPTIONS`` and
registers them when it is constructed (as glance_store's drivers do), and what
it can do as ``CAPABILITIES``; callers test a capability, never probe for
attributes.

Sharing a store. Several processes (an import, a compute manager, a mirror,
a streaming export, a gc), on one host or on several if the backend is
SHARED_ACROSS_HOSTS, each hold their own Backend instance on the same store.
What an instance may cache:

- A chunk's bytes, forever: chunks are content-addressed and immutable, so a
  chunk that is readable under an id always has the same bytes.
- Where a chunk is (a pack, an offset, an object name) only as a hint: a
  concurrent gc may move a live chunk to a new place at any time and remove
  the old one. ``read_chunk`` and ``has_chunk`` must notice a place that is
  gone and look again, so a long-lived reader keeps working across another
  process's gc, without restarting.
- Nothing about manifests: versions are created and deleted at any time, and
  ``list_images``, ``list_versions`` and ``read_manifest`` read the store.

What a concurrent gc (``exclusive_lock`` then ``purge_abandoned`` and
``retain``) may do: move referenced chunks to new places; remove chunks not in
the referenced set, and what crashed writers left behind. What it may not do:
remove a chunk a writer holding ``shared_lock`` may reference (it waits for
every shared lock), or any chunk it cannot account for, such as those of a
damaged pack index.

Damage stays local: a stored item the backend cannot read (a corrupt pack
index, an unreadable directory) is skipped, so its chunks or versions are
simply absent, and ``damaged`` names it; the rest of the store keeps working.

Thread safety: one Backend instance may be used by many threads at once;
a WriteSession belongs to the one thread that began it.

Errors: every failure is a VmcloudError; an OSError the backend meets (EACCES,
ENOSPC, EIO...) becomes a StorageError naming the path and the errno text, and
keeps the OSError as its ``__cause__``.

A new backend subclasses Backend and WriteSession, registers an entry point
in the ``vmcloud.storage.backends`` namespace, and adds a subclass of
``tests.unit.storage.test_backend_conformance.BackendContract`` for itself.
"""
import abc
import contextlib
import enum
from typing import ContextManager, Iterable, Iterator

from oslo_config import cfg

from vmcloud import exception
from vmcloud import plugins
from vmcloud.storage import manifest as manifest_mod

NAMESPACE = 'vmcloud.storage.backends'
# An attachment is read whole into memory by every node that uses it.
MAX_ATTACHMENT_BYTES = 1024 ** 2


def check_attachment(name: str, size: int | None = None) -> None:
    """Refuse a bad attachment name, or a size above MAX_ATTACHMENT_BYTES.

    :raises: InvalidName; AttachmentTooLarge.
    """
    manifest_mod.validate_image_name(name, 'attachment')
    if size is not None and size > MAX_ATTACHMENT_BYTES:
        raise exception.AttachmentTooLarge(
            f'attachment {name} of {size} bytes is larger than the '
            f'{MAX_ATTACHMENT_BYTES} bytes an attachment may hold')


class Capabilities(enum.Flag):
    """What a backend can do beyond the interface every backend implements."""

    NONE = 0
    SHARED_ACROSS_HOSTS = enum.auto()
    """Instances on different hosts see one store (not only processes on one host)."""
    CROSS_HOST_LOCKING = enum.auto()
    """shared_lock, exclusive_lock and image_lock exclude holders on other hosts too.

    Without it, a store SHARED_ACROSS_HOSTS must have its writes and gc on one host.
    """
    SCRATCH_SPACE = enum.auto()
    """scratch_dir() gives a local directory on the store's own storage."""


class WriteSession(abc.ABC):
    """Chunks written for new versions (one, or several: snapshot_many); none is
    visible before commit().

    The writer asks before it sends: missing() says which chunks of a batch
    neither the store nor this session has, and the writer puts exactly those,
    once each. put_chunk never asks the store again, so a remote store costs one
    question per batch rather than one per chunk.
    """

    MISSING_BATCH = 1
    """How many chunk ids a writer should gather before asking missing().

    1 where asking costs no round trip (the writer then holds no chunk waiting for
    an answer, so it need not copy the caller's buffer); more where it does.
    """

    def __init__(self, store: 'Backend'):
        self.store = store

    @abc.abstractmethod
    def has_put(self, chunk_id: str) -> bool:
        """Whether this session already staged the chunk."""

    def missing(self, chunk_ids: Iterable[str]) -> set[str]:
        """The ids among ``chunk_ids`` that neither the store nor this session has.

        Like has_chunk's False, an id may be reported missing that another writer
        stores meanwhile; putting it then stores a copy, which costs space until gc,
        never correctness. An id is never reported present that is not (while the
        caller holds shared_lock()).

        :raises: StorageError if the store cannot be asked.
        """
        return self.store.missing([chunk_id for chunk_id in dict.fromkeys(chunk_ids)
                                   if not self.has_put(chunk_id)])

    @abc.abstractmethod
    def put_chunk(self, chunk_id: str, data: bytes) -> None:
        """Stage a chunk, unless this session already has it.

        The writer asked missing() first: the store is not asked again. The
        caller may reuse ``data`` once this returns.

        :raises: StorageError if the chunk cannot be written.
        """

    @abc.abstractmethod
    def commit(self) -> None:
        """Make every staged chunk durable and visible.

        :raises: StorageError if they cannot be made durable.
        """

    @abc.abstractmethod
    def abort(self) -> None:
        """Drop every staged chunk not yet visible. Never raises."""

    @property
    @abc.abstractmethod
    def stored_bytes(self) -> int:
        """Bytes of the chunks this session staged (each one once)."""


class Backend(abc.ABC):
    OPTION_GROUP: cfg.OptGroup | None = None
    OPTIONS: list[cfg.Opt] = []
    CAPABILITIES: Capabilities = Capabilities.NONE

    def __init__(self, conf: cfg.ConfigOpts):
        if self.OPTION_GROUP is not None:
            conf.register_group(self.OPTION_GROUP)
            conf.register_opts(self.OPTIONS, group=self.OPTION_GROUP)
        self.conf = conf

    # -- chunks --------------------------------------------------------------

    @abc.abstractmethod
    def has_chunk(self, chunk_id: str) -> bool:
        """Whether a durable chunk with this id is stored.

        True is never stale: a chunk a concurrent gc removed before the call
        is not reported. False may be (a chunk another instance stored since
        this one last looked), which costs a duplicate at worst. True stays true while the
        caller holds shared_lock().

        :raises: StorageError if the store cannot be read.
        """

    def missing(self, chunk_ids: Iterable[str]) -> set[str]:
        """The ids among ``chunk_ids`` of no durable chunk: has_chunk for many at once.

        A backend where has_chunk is a round trip answers many ids in fewer (one
        request, one index read per shard). Stale like has_chunk's False.

        :raises: StorageError if the store cannot be read.
        """
        return {chunk_id for chunk_id in chunk_ids if not self.has_chunk(chunk_id)}

    @abc.abstractmethod
    def read_chunk(self, chunk_id: str) -> bytes:
        """The stored bytes of a chunk, wherever a concurrent gc has moved it.

        The bytes are not checked against the id; the Warehouse does that.

        :raises: ChunkNotFound if the chunk is not stored (or only in a damaged
            item); StorageError if it is stored but cannot be read.
        """

    def read_chunks(self, chunk_ids: Iterable[str]) -> dict[str, bytes | memoryview]:
        """The stored bytes of many chunks: read_chunk for each, at once.

        A backend that can read neighbours in one call (chunks side by side in one
        file) answers a read of many chunks with fewer calls; the bytes may then be
        views of a larger buffer. Not checked against the ids, like read_chunk's.

        :raises: what read_chunk raises, for the first chunk that cannot be read.
        """
        return {chunk_id: self.read_chunk(chunk_id) for chunk_id in chunk_ids}

    @abc.abstractmethod
    def iter_chunks(self) -> Iterator[tuple[str, int]]:
        """Every stored chunk as (chunk id, stored size in bytes).

        :raises: StorageError if the store cannot be read.
        """

    @abc.abstractmethod
    def retain(self, referenced: set[str]) -> tuple[int, int]:
        """Remove every chunk not in ``referenced``; only gc calls this, holding exclusive_lock().

        Chunks in ``referenced`` stay readable throughout, by this and every
        other instance, though they may move. Chunks the backend cannot account
        for (those of a damaged item) are never removed, nor a copy whose other
        copies are lost.

        :returns: (chunks removed, bytes freed).
        :raises: StorageError; before removing anything if the store may hold
            versions that list_versions cannot list (an unreadable image
            directory), since ``referenced`` cannot include their chunks.
        """

    @abc.abstractmethod
    def stored_chunk_bytes(self) -> int:
        """Bytes the stored chunks occupy, with any space not yet reclaimed."""

    @abc.abstractmethod
    def begin_write(self) -> WriteSession:
        """Start staging the chunks of a new version; the caller holds shared_lock().

        :raises: StorageError.
        """

    def damaged(self) -> list[str]:
        """One line per stored item the backend skips because it cannot read it, naming it.

        For example ``pack index packs/ab12.idx is corrupt: ...``. Empty when
        nothing is skipped. Damaged manifests are not listed here: reading them
        raises CorruptManifest, naming the version.
        """
        return []

    # -- manifests -----------------------------------------------------------

    @abc.abstractmethod
    def create_manifest(self, image: str, version: int, data: bytes) -> None:
        """Durably store a manifest; on any failure nothing of it is left.

        :raises: VersionExists if that version already exists; StorageError.
        """

    @abc.abstractmethod
    def read_manifest(self, image: str, version: int) -> bytes:
        """:raises: ImageNotFound if that version does not exist; CorruptManifest if
        it exists but cannot be read.
        """

    def read_manifest_prefix(self, image: str, version: int, length: int) -> bytes:
        """The first ``length`` bytes of a manifest (all of it if shorter).

        A backend that can read part of an object overrides this, so that
        listing a store of huge images does not read whole manifests.

        :raises: as read_manifest.
        """
        return self.read_manifest(image, version)[:length]

    @abc.abstractmethod
    def delete_manifest(self, image: str, version: int) -> None:
        """Durably remove a manifest, readable or not. :raises: ImageNotFound; StorageError."""

    @abc.abstractmethod
    def list_images(self) -> list[str]:
        """Names of the images with at least one version, sorted.

        :raises: StorageError if the store cannot be listed at all.
        """

    @abc.abstractmethod
    def list_versions(self, image: str) -> list[int]:
        """Versions of ``image``, ascending; empty if there are none.

        :raises: StorageError if the image's versions cannot be listed.
        """

    def manifests_stored_bytes(self) -> int:
        """Bytes the manifests occupy; versions deleted meanwhile or unreadable count 0."""
        total = 0
        for image in self.list_images():
            for version in self.list_versions(image):
                with contextlib.suppress(exception.ImageNotFound, exception.CorruptManifest):
                    total += len(self.read_manifest(image, version))
        return total

    # -- attachments ---------------------------------------------------------

    @abc.abstractmethod
    def write_attachment(self, image: str, name: str, data: bytes) -> None:
        """Durably replace attachment ``name`` of ``image`` with ``data``, atomically.

        A reader on any instance sees the old bytes or the new ones, never a mix,
        and the last writer wins. The caller (the Warehouse) holds shared_lock() (gc
        may not purge what this stages) and image_lock(image),
        has checked that the image has a version, and has checked the name and size
        (check_attachment).

        :raises: ImageNotFound if the backend can tell the image has no version;
            StorageError.
        """

    @abc.abstractmethod
    def read_attachment(self, image: str, name: str) -> bytes | None:
        """The bytes of an attachment; None if there is none.

        :raises: StorageError if it exists but cannot be read.
        """

    @abc.abstractmethod
    def list_attachments(self, image: str) -> list[str]:
        """The names of the attachments of ``image``, sorted; empty if none.

        A name may be listed whose write a crash cut (it reads as None): a listing
        errs on the side of naming too much, so that a hold (an attachment) is never
        missed.

        :raises: StorageError if they cannot be listed.
        """

    @abc.abstractmethod
    def delete_attachment(self, image: str, name: str) -> None:
        """Durably remove one attachment of ``image``; an absent one is not an error.

        The others are untouched: two holders each removing their own attachment
        never race (no read-modify-write of a shared list).

        :raises: StorageError.
        """

    @abc.abstractmethod
    def delete_attachments(self, image: str) -> None:
        """Durably remove every attachment of ``image``; none is not an error.

        The caller holds image_lock(image); the Warehouse calls it before it
        deletes an image's last version, so none outlives the image.

        :raises: StorageError.
        """

    # -- concurrency ---------------------------------------------------------

    @abc.abstractmethod
    def shared_lock(self) -> ContextManager[None]:
        """Held by every writer for its whole session: gc cannot run meanwhile.

        :raises: StorageError if the lock cannot be taken.
        """

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

    # -- scratch space -------------------------------------------------------

    def scratch_dir(self) -> str | None:
        """A directory for a writer's temporary files, on the store's own storage.

        Only a backend with Capabilities.SCRATCH_SPACE returns one (others None:
        use the system's temporary directory). What is left in it counts as
        abandoned: use it only while holding shared_lock().
        """
        return None


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
