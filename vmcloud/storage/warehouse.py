"""The warehouse: versioned images made of content-addressed chunks.

An image is a sequence of versions; a version is a Manifest. A snapshot is a
version that names its parent and shares every chunk it did not change. A
version becomes visible only when its manifest is stored, and its manifest is
stored only after all its chunks are durable: in the store, or, for a snapshot
written with a ``ChunkSink`` (the compute nodes' peer replicas), on the disks the
sink names, until they are written to the store in the background
(``store_chunks``). Such a version says so in its source (``REPLICATED_CHUNKS``)
and ``is_whole`` tells whether the store holds all of it yet.

A snapshot may give, for a partly changed chunk, only its changed blocks
(``delta.BlockChanges``): the chunk is then stored as a delta over its parent's entry,
unless that delta would change more than ``[storage] delta_max_ratio`` of the chunk
or stack more than ``[storage] delta_max_depth`` deltas, when the chunk is compacted
(resolved, changed and stored whole). Every read resolves delta chains.
"""
import collections
import concurrent.futures
import contextlib
import dataclasses
import itertools
import os
import shutil
import stat
import tempfile
from typing import Callable, Iterable, Iterator, Mapping, Protocol, Sequence, Union

from oslo_config import cfg

from vmcloud import exception
from vmcloud.storage import backend as backend_mod
from vmcloud.storage import chunker
from vmcloud.storage import delta as delta_mod
from vmcloud.storage import durable
from vmcloud.storage import inspect as inspect_mod
from vmcloud.storage import manifest as manifest_mod
from vmcloud.storage import qemu_img
from vmcloud.storage import reader as reader_mod
from vmcloud.storage.manifest import Manifest
from vmcloud.storage.manifest import ManifestSummary
from vmcloud.storage.manifest import VersionRef

Progress = Callable[[int, int], None]
Change = Union[bytes, memoryview, delta_mod.BlockChanges]
"""What a snapshot gives for a changed chunk: its whole new bytes, or changed blocks."""
Piece = tuple[manifest_mod.Entry, 'bytes | memoryview | None', 'str | None']
"""One chunk of a version being written: (its manifest entry, the bytes of the object
it adds, that object's id); the last two are None when it adds no object."""
EXPORT_FORMATS = ('raw', 'qcow2')
# Writers on other hosts that may take the version number a writer chose, one after another.
MAX_VERSION_RACES = 64
# The most chunk data a writer holds while it waits to hear which chunks the store lacks.
MISSING_BATCH_BYTES = 16 * 1024 ** 2
# A hold is the attachment ``hold.VERSION.HOLDER`` of its image: one per holder, so two
# holders never rewrite a shared list, and deleting the image deletes its holds.
HOLD_PREFIX = 'hold.'
# So that hold.VERSION.HOLDER fits an attachment name (128) with an 18-digit version.
MAX_HOLDER_LENGTH = 96
# Chunks a writer with a sink offers it at a time, whatever the store's own batch: a
# sink places them on peers in parallel, and a batch of one would be one round trip each.
SINK_BATCH = 64
# The manifest source field of a version some of whose chunks a sink took: how many.
REPLICATED_CHUNKS = 'replicated_chunks'


class ChunkSink(Protocol):
    """Where a snapshot's new chunks may go instead of the store, for now.

    ``take`` gets chunks the store lacks and answers the ids it has made durable
    elsewhere (on peer nodes); the writer stores every other one itself, in the same
    session. Whoever provides the sink writes what it took to the store later
    (``Warehouse.store_chunks``).
    """

    def take(self, chunks: dict[str, bytes]) -> set[str]:
        """The ids among ``chunks`` kept durably elsewhere from now on. Never raises
        for a place that refuses or fails: its chunks are simply not taken."""


@dataclasses.dataclass
class WriteResult:
    manifest: Manifest
    new_bytes: int
    """Chunk bytes this write added to the store, after deduplication (with those a
    sink took: the store gets them later)."""
    pending: frozenset[str] = frozenset()
    """Chunks of the version that a sink took: not in the store yet."""


@dataclasses.dataclass
class StoredChunks:
    """What ``store_chunks`` did."""
    present: set[str] = dataclasses.field(default_factory=set)
    """The ids given that the store holds now (stored by this call or before)."""
    new_bytes: int = 0
    """Bytes this call stored."""
    unreadable: dict[str, str] = dataclasses.field(default_factory=dict)
    """Ids whose bytes could not be had (or did not match the id), with the reason."""


@dataclasses.dataclass
class VerifyReport:
    versions: int = 0
    chunks: int = 0
    bytes: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)
    damaged_versions: list[str] = dataclasses.field(default_factory=list)
    """Versions that cannot be read whole: an unreadable manifest, or a missing or
    corrupt chunk."""

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclasses.dataclass
class Listing:
    versions: list[ManifestSummary] = dataclasses.field(default_factory=list)
    damaged: dict[VersionRef, str] = dataclasses.field(default_factory=dict)
    """Versions whose manifest cannot be read, with the reason."""


@dataclasses.dataclass
class GcReport:
    removed_chunks: int = 0
    freed_bytes: int = 0
    kept_chunks: int = 0
    purged_files: int = 0


@dataclasses.dataclass
class Stats:
    images: int = 0
    versions: int = 0
    logical_bytes: int = 0
    """Sum of the virtual sizes of all versions."""
    referenced_bytes: int = 0
    """Sum over all versions of their non-hole chunk bytes, as if nothing were shared."""
    chunks: int = 0
    chunk_bytes: int = 0
    manifest_bytes: int = 0
    delta_objects: int = 0
    """Distinct delta objects the versions name (counted in ``chunks`` too)."""
    damaged_versions: int = 0
    """Versions whose manifest cannot be read, left out of the sums above."""

    @property
    def stored_bytes(self) -> int:
        return self.chunk_bytes + self.manifest_bytes


class _Uploader:
    """Feeds one write session: asks missing() a batch at a time, puts only the lacking
    (offering them to ``sink`` first, if given: it keeps some elsewhere).

    ``new_bytes[owner]``: bytes of the chunks put (or taken by the sink) for each owner
    (an item of a snapshot_many), a chunk counting for the first owner that fed it.
    ``taken``: the ids the sink took.
    """

    def __init__(self, session: backend_mod.WriteSession, sink: ChunkSink | None = None):
        self.session = session
        self.sink = sink
        self.new_bytes: collections.Counter[int] = collections.Counter()
        self.taken: set[str] = set()
        self.failed = False
        """Whether a call to the session raised: the session is broken, not an item."""
        self._batch: dict[str, tuple[bytes, int]] = {}
        self._batch_bytes = 0
        self._batch_size = (session.MISSING_BATCH if sink is None
                            else max(session.MISSING_BATCH, SINK_BATCH))
        # A chunk waiting for the answer must outlive the caller's buffer.
        self._copy = self._batch_size > 1

    def feed(self, pieces: Iterable[Piece], owner: int) -> list[manifest_mod.Entry]:
        """Send what the store lacks of the objects of ``pieces``.

        :returns: every piece's entry, in order.
        """
        entries = []
        for entry, data, chunk_id in pieces:
            entries.append(entry)
            # A chunk the sink took is not in the session: the session would call it
            # missing again, and it would be placed twice.
            if data is not None and chunk_id not in self._batch and chunk_id not in self.taken:
                self._batch[chunk_id] = (bytes(data) if self._copy else data, owner)
                self._batch_bytes += len(data)
                if (len(self._batch) >= self._batch_size
                        or self._batch_bytes >= MISSING_BATCH_BYTES):
                    self.flush()
        return entries

    def flush(self) -> None:
        """Ask about the batch, put what is missing (and the sink did not take).

        :raises: StorageError; what the sink raised.
        """
        batch, self._batch, self._batch_bytes = self._batch, {}, 0
        if not batch:
            return
        try:
            lacking = self.session.missing(batch)
            taken = set()
            if self.sink is not None and lacking:
                taken = self.sink.take({chunk_id: data for chunk_id, (data, _owner)
                                        in batch.items() if chunk_id in lacking})
            for chunk_id, (data, owner) in batch.items():
                if chunk_id in lacking:
                    if chunk_id in taken:
                        self.taken.add(chunk_id)
                    else:
                        self.session.put_chunk(chunk_id, data)
                    self.new_bytes[owner] += len(data)
        except BaseException:
            self.failed = True
            raise


def _plain_piece(data: bytes | memoryview) -> Piece:
    """The piece of a chunk stored whole: a hole if all zeros."""
    if chunker.is_zero(data):
        return None, None, None
    chunk_id = manifest_mod.chunk_id(data)
    return chunk_id, data, chunk_id


def _plain_pieces(chunks: Iterable[chunker.Chunk]) -> Iterator[Piece]:
    """The chunker's chunks as pieces: each its own entry and object."""
    for _index, data, chunk_id in chunks:
        yield chunk_id, data, chunk_id


class _DeltaPolicy:
    """Turns one chunk's BlockChanges into a piece: a delta on top of the parent's
    entry; past ``delta_max_depth`` deltas, the chain squashed into one delta over its
    base of every block its deltas and the change wrote; or the chunk compacted into a
    plain one (the resolved parent chunk with the blocks applied) when the delta (or
    the squashed one) would change more than ``delta_max_ratio`` of the chunk or be no
    smaller than it.
    """

    def __init__(self, conf: cfg.ConfigOpts, read_object: delta_mod.ReadObject):
        self.max_depth = conf.storage.delta_max_depth
        self.max_ratio = conf.storage.delta_max_ratio
        self.read_object = read_object

    def piece(self, base: Manifest, index: int, change: delta_mod.BlockChanges) -> Piece:
        """:raises: InvalidRange for blocks that do not fit chunk ``index``; what
        reading the parent's chunk raises, for a compaction."""
        length = base.chunk_length(index)
        blocks = change.blocks
        delta_mod.check_blocks(length, change.block_size, blocks,
                               f'chunk {index} of a snapshot of {base.ref}')
        parent = base.chunks[index]
        if not blocks:
            return parent, None, None
        if len(blocks) == delta_mod.block_count(length, change.block_size):
            return _plain_piece(b''.join(blocks[i] for i in sorted(blocks)))
        if parent is None and all(chunker.is_zero(data) for data in blocks.values()):
            return None, None, None
        chain = delta_mod.chain_of(parent)
        if len(chain) <= self.max_depth:
            stacked = self._delta(chain, length, change.block_size, blocks)
            if stacked is not None:
                return stacked
        elif self.max_depth:
            squashed = self._squashed(chain, length, change)
            if squashed is not None:
                return squashed
        resolved = bytearray(delta_mod.resolve(parent, self.read_object, length))
        if len(resolved) != length:
            raise exception.StorageError(
                f'chunk {index} of {base.ref} reads as {len(resolved)} bytes, not the '
                f'{length} of its place')
        for block, data in blocks.items():
            start = block * change.block_size
            resolved[start:start + len(data)] = data
        return _plain_piece(bytes(resolved))

    def _delta(self, chain: tuple[str | None, ...], length: int, block_size: int,
               blocks: Mapping[int, bytes]) -> Piece | None:
        """``blocks`` as a delta on top of ``chain``, unless it changes more than the
        ratio or is no smaller than the chunk."""
        if sum(len(data) for data in blocks.values()) > self.max_ratio * length:
            return None
        encoded = delta_mod.encode_blocks(chain[0], length, block_size, blocks)
        # A delta as large as its chunk saves nothing and costs every read.
        if len(encoded) >= length:
            return None
        delta_id = manifest_mod.chunk_id(encoded)
        return (delta_id,) + chain, encoded, delta_id

    def _squashed(self, chain: tuple[str | None, ...], length: int,
                  change: delta_mod.BlockChanges) -> Piece | None:
        """One delta over the chain's base of every block its deltas and ``change``
        wrote, the newest of each: what a chain too deep costs instead of a whole chunk
        (only the blocks written since the base are stored again). None if a delta of
        the chain has another block size, or the union is too large.

        :raises: CorruptDelta for a delta that does not fit the chain; what reading
            one raises.
        """
        blocks: dict[int, bytes] = {}
        for _delta_id, decoded in reversed(delta_mod.chain_deltas(chain, self.read_object,
                                                                  length)):
            if decoded.block_size != change.block_size:
                return None
            blocks.update(decoded.blocks)
        blocks.update(change.blocks)
        return self._delta(chain[-1:], length, change.block_size, blocks)


_Fits = dict[str, dict[tuple[str | None, int], list[VersionRef]]]
"""delta id -> (base, chunk length) a chain expects of it -> the versions whose chains do."""


def _expected_fits(manifest: Manifest, fits: _Fits) -> None:
    """Add to ``fits`` what each chain of ``manifest`` expects of its deltas."""
    for index, entry in enumerate(manifest.chunks):
        if isinstance(entry, tuple):
            for position, delta_id in enumerate(entry[:-1]):
                refs = fits.setdefault(delta_id, {}).setdefault(
                    (entry[position + 1], manifest.chunk_length(index)), [])
                if manifest.ref not in refs:
                    refs.append(manifest.ref)


def _verified(object_id: str, data: bytes | memoryview) -> bytes | memoryview:
    """``data``, if it hashes to ``object_id``. :raises: CorruptChunk."""
    actual = manifest_mod.chunk_id(data)
    if actual != object_id:
        raise exception.CorruptChunk(object_id, actual)
    return data


def _check_fit(delta_id: str, data: bytes, base: str | None, length: int) -> None:
    """:raises: CorruptDelta unless ``data`` decodes as a delta on ``base`` that yields
    ``length`` bytes."""
    decoded = delta_mod.decode(data, delta_id)
    if decoded.base != base:
        raise delta_mod.CorruptDelta(
            delta_id, f'its base is {decoded.base or "a hole"}, a chain names '
                      f'{base or "a hole"}')
    if decoded.chunk_length != length:
        raise delta_mod.CorruptDelta(
            delta_id, f'it yields {decoded.chunk_length} bytes, a chain places it in a '
                      f'chunk of {length}')


class Warehouse:
    def __init__(self, conf: cfg.ConfigOpts, backend: backend_mod.Backend | None = None):
        self.conf = conf
        self.backend = backend if backend is not None else backend_mod.load(conf)

    # -- reading manifests ---------------------------------------------------

    def manifest(self, image: str, version: int | None = None) -> Manifest:
        """The manifest of ``image:version``, or of its latest version.

        :raises: InvalidName, ImageNotFound, CorruptManifest.
        """
        manifest_mod.validate_image_name(image)
        if version is None:
            versions = self.backend.list_versions(image)
            if not versions:
                raise exception.ImageNotFound(image)
            version = versions[-1]
        data = self.backend.read_manifest(image, version)
        return self._named(Manifest.decode(data, f'{image}:{version}'), image, version)

    @staticmethod
    def _named(manifest: Manifest | ManifestSummary, image: str, version: int):
        if manifest.ref != VersionRef(image, version):
            raise exception.CorruptManifest(
                f'manifest {image}:{version} is corrupt: it describes {manifest.ref}')
        return manifest

    def summary(self, image: str, version: int) -> ManifestSummary:
        """The fixed fields of ``image:version``, from the first bytes of its manifest.

        Reads at most ``manifest.HEADER_LIMIT`` bytes of a format 2 manifest, however
        many chunks it lists; the chunk list itself is not checked.

        :raises: ImageNotFound, CorruptManifest.
        """
        limit = manifest_mod.HEADER_LIMIT
        where = f'{image}:{version}'
        prefix = self.backend.read_manifest_prefix(image, version, limit)
        summary = Manifest.decode_summary(prefix, where, complete=len(prefix) < limit)
        if summary is None:
            return self._named(self.manifest(image, version).summary(), image, version)
        return self._named(summary, image, version)

    def lookup(self, spec: str) -> Manifest:
        """The manifest named by ``image[:version]``.

        :raises: InvalidName, ImageNotFound, CorruptManifest.
        """
        return self.manifest(*VersionRef.parse(spec))

    def images(self) -> list[str]:
        return self.backend.list_images()

    def versions(self, image: str) -> list[Manifest]:
        return [self.manifest(image, v) for v in self.backend.list_versions(image)]

    def listing(self) -> Listing:
        """The summary of every readable version, and the reason each other one is not.

        One damaged manifest does not hide the others.
        """
        listing = Listing()
        for ref, summary, problem in self._each_version(self.summary):
            if summary is not None:
                listing.versions.append(summary)
            else:
                listing.damaged[ref] = problem
        return listing

    def _each_version(self, read: Callable[[str, int], object]) -> Iterator[tuple]:
        """(ref, read(image, version), None) for each version, or (ref, None, problem).

        A version deleted meanwhile is skipped; any other storage error is the
        damage of that one version, not of the walk.
        """
        for image in self.backend.list_images():
            for version in self.backend.list_versions(image):
                ref = VersionRef(image, version)
                try:
                    yield ref, read(image, version), None
                except exception.ImageNotFound:
                    continue
                except exception.StorageError as exc:
                    yield ref, None, str(exc)

    # -- writing -------------------------------------------------------------

    def import_image(self, path: str, image: str, fmt: str | None = None,
                     progress: Progress | None = None) -> WriteResult:
        """Inspect, then import an untrusted raw or qcow2 file as version 1 of ``image``.

        :raises: InvalidName, ImageExists, ImageFileNotFound, UnsafeImage,
            ScratchSpaceExhausted, StorageError.
        """
        manifest_mod.validate_image_name(image)
        if self.backend.list_versions(image):
            raise exception.ImageExists(image)
        chunk_size = self.conf.storage.chunk_size
        with self._chunks_of(path, fmt, chunk_size, progress) as (inspected, chunks):
            return self._write_version(
                image, parent=None, size=inspected.virtual_size,
                chunk_size=chunk_size, chunks=_plain_pieces(chunks),
                source={'file': os.path.basename(path), 'format': inspected.format},
                must_be_new=True)

    def snapshot_file(self, parent: VersionRef, path: str, fmt: str | None = None,
                      image: str | None = None,
                      progress: Progress | None = None) -> WriteResult:
        """Store the disk file ``path`` as a snapshot of ``parent``.

        Every chunk equal to one already stored, the parent's included, is shared.
        """
        base = self.manifest(parent.image, parent.version)
        with self._chunks_of(path, fmt, base.chunk_size, progress) as (inspected, chunks):
            return self._write_version(
                image or parent.image, parent=base.ref, size=inspected.virtual_size,
                chunk_size=base.chunk_size, chunks=_plain_pieces(chunks),
                source={'file': os.path.basename(path), 'format': inspected.format})

    def snapshot_chunks(self, parent: VersionRef, changes: Mapping[int, Change],
                        image: str | None = None,
                        read_object: delta_mod.ReadObject | None = None) -> WriteResult:
        """Store a snapshot of ``parent`` where chunk ``i`` is replaced by ``changes[i]``.

        This is what a mirror's dirty set turns into: only changed chunks are
        passed, and everything else is the parent's. A change is the chunk's whole
        new bytes, or a ``delta.BlockChanges`` of the blocks that changed (stored as a
        delta over the parent's chunk, or compacted: see the module docstring).
        ``read_object(id)`` reads what a compaction needs of the parent's chunk (the
        store by default: a node that holds the parent's chunks a sink took passes
        its own reader).

        :raises: InvalidRange if a change lies outside the image or has the wrong
            length (a block outside its chunk or of the wrong length); what reading
            a parent's chunk for a compaction raises (ChunkNotFound, CorruptChunk).
        """
        base = self.manifest(parent.image, parent.version)
        return self._write_version(
            image or parent.image, parent=base.ref, size=base.size,
            chunk_size=base.chunk_size,
            chunks=self._changed_chunks(base, changes, read_object=read_object),
            source={'changed_chunks': len(changes)})

    def snapshot_many(self, items: Sequence[tuple[VersionRef, Mapping[int, Change]]],
                      targets: Sequence[str] | None = None,
                      chunk_sink: ChunkSink | None = None,
                      read_object: delta_mod.ReadObject | None = None
                      ) -> list[WriteResult | exception.StorageError]:
        """snapshot_chunks for several parents at once, in one write session.

        A chunk several items change to the same bytes (guests of one image
        writing the same files) is sent and stored once, and the store is asked
        about the chunks of all items in the same batches. Item ``i`` becomes a new
        version of image ``targets[i]`` (created if it has none; by default its
        parent's image), numbered as snapshot_chunks numbers it (the items of one
        image in their order), its manifest naming its parent. Snapshots of
        instances go to their own images: a new version of the parent's image would
        change what deploying that image means. Chunks are deduplicated against
        the whole store, the parents' included, whatever the target.

        Each result is its WriteResult, or the StorageError that failed it alone: a
        bad target name (InvalidName), a change that does not fit (InvalidRange),
        its parent missing or deleted meanwhile (ImageNotFound), its manifest not
        stored. Such an item's changed chunks may be stored anyway, unreferenced,
        until gc. ``new_bytes`` of a chunk shared by items counts for the first of
        them.

        With ``chunk_sink``, the chunks the store lacks are offered to it first, a
        batch at a time; those it takes are not written to the store, and each
        manifest is stored as soon as the session commits all the same: the sink
        holds them durably. A result's ``pending`` names the chunks of its version
        the sink took, and its manifest's source counts them (``REPLICATED_CHUNKS``).

        A change may be a ``delta.BlockChanges``, as in snapshot_chunks (with the same
        ``read_object``); a parent's chunk a compaction cannot read fails its item alone.

        :raises: StorageError if ``targets`` does not name one image per item
            (before anything is written), or if the write session fails (no
            item's manifest is written then); what the sink raised.
        """
        if targets is not None and len(targets) != len(items):
            raise exception.StorageError(
                f'snapshot_many needs one target image per item: {len(targets)} targets '
                f'for {len(items)} items')
        results: list[WriteResult | exception.StorageError | None] = [None] * len(items)
        planned = []
        with self.backend.shared_lock():
            session = self.backend.begin_write()
            uploader = _Uploader(session, chunk_sink)
            try:
                bases: dict[VersionRef, Manifest] = {}
                for number, (parent, changes) in enumerate(items):
                    try:
                        target = parent.image if targets is None else targets[number]
                        manifest_mod.validate_image_name(target)
                        # Read once however many items share it (8 guests of one image).
                        if parent not in bases:
                            bases[parent] = self.manifest(parent.image, parent.version)
                        base = bases[parent]
                        problems: list[exception.StorageError] = []
                        chunk_ids = uploader.feed(
                            self._changed_chunks(base, changes, problems, read_object),
                            number)
                    except exception.StorageError as exc:
                        if uploader.failed:
                            raise
                        results[number] = exc
                        continue
                    if problems:
                        results[number] = problems[0]
                    else:
                        planned.append((number, target, base, chunk_ids, len(changes)))
                uploader.flush()
                session.commit()
            except BaseException:
                session.abort()
                raise
            for number, target, base, chunk_ids, count in planned:
                pending = frozenset(c for entry in chunk_ids for c in delta_mod.chain_of(entry)
                                    if c in uploader.taken)
                source = {'changed_chunks': count}
                if pending:
                    source[REPLICATED_CHUNKS] = len(pending)
                try:
                    manifest = self._store_manifest(
                        target, base.ref, False,
                        base.size, base.chunk_size, chunk_ids, source)
                except exception.StorageError as exc:
                    results[number] = exc
                else:
                    results[number] = WriteResult(manifest=manifest,
                                                  new_bytes=uploader.new_bytes[number],
                                                  pending=pending)
        return results

    def store_chunks(self, chunk_ids: Iterable[str],
                     read: Callable[[str], bytes]) -> StoredChunks:
        """Write the chunks ``chunk_ids`` the store lacks, in one write session, their
        bytes from ``read(chunk_id)`` (asked only for those the store lacks): what a
        sink took for a snapshot, made persistent. Bytes that do not hash to their id
        are never stored.

        A chunk ``read`` cannot give (it raises VmcloudError or OSError) or gives
        wrong is left out and named in ``unreadable``; the others are stored.

        :raises: StorageError if the store cannot be asked or the session fails
            (nothing of it is stored then).
        """
        result = StoredChunks()
        wanted = list(dict.fromkeys(chunk_ids))
        with self.backend.shared_lock():
            session = self.backend.begin_write()
            try:
                for start in range(0, len(wanted), SINK_BATCH):
                    batch = wanted[start:start + SINK_BATCH]
                    lacking = session.missing(batch)
                    for chunk_id in batch:
                        if chunk_id not in lacking:
                            result.present.add(chunk_id)
                            continue
                        try:
                            data = read(chunk_id)
                        except (exception.VmcloudError, OSError) as exc:
                            result.unreadable[chunk_id] = f'{type(exc).__name__}: {exc}'
                            continue
                        actual = manifest_mod.chunk_id(data)
                        if actual != chunk_id:
                            result.unreadable[chunk_id] = str(
                                exception.CorruptChunk(chunk_id, actual))
                            continue
                        session.put_chunk(chunk_id, data)
                        result.present.add(chunk_id)
                        result.new_bytes += len(data)
                session.commit()
            except BaseException:
                session.abort()
                raise
        return result

    def missing(self, chunk_ids: Iterable[str]) -> set[str]:
        """The ids among ``chunk_ids`` the store does not hold now: one another writer
        (another node, another process) stored before the call is never among them.

        A backend may answer its own missing() from what it last looked at (the file
        backend's pack index), so the ids it calls missing are asked again of a write
        session, which looks afresh; it is aborted, nothing written.

        :raises: StorageError if the store cannot be asked.
        """
        lacking = self.backend.missing(list(dict.fromkeys(chunk_ids)))
        if not lacking:
            return lacking
        with self.backend.shared_lock():
            session = self.backend.begin_write()
            try:
                return session.missing(sorted(lacking))
            finally:
                session.abort()

    def is_whole(self, image: str, version: int,
                 known: set[VersionRef] | None = None) -> bool:
        """Whether the store holds every chunk of ``image:version``.

        A version written without a sink is whole once its parent is (its own chunks
        were committed before its manifest); one a sink took chunks of
        (``REPLICATED_CHUNKS`` in its source) is whole once the store has the chunks
        it has and its parent has not, and its parent is whole. So the store is asked
        only about chunks sinks took, whatever the size of the image. ``known``: the
        versions known whole already (a whole version stays whole); the ones found
        whole are added to it.

        :raises: ImageNotFound, CorruptManifest; StorageError.
        """
        known = set() if known is None else known
        read: dict[VersionRef, Manifest] = {}

        def manifest_of(ref: VersionRef) -> Manifest:
            if ref not in read:
                read[ref] = self.manifest(ref.image, ref.version)
            return read[ref]

        chain: list[Manifest] = []
        ref: VersionRef | None = VersionRef(image, int(version))
        while ref is not None and ref not in known:
            chain.append(manifest_of(ref))
            ref = chain[-1].parent
        # The chunks each version has and its parent has not, for those a sink took
        # chunks of: the only ones the store may lack.
        asked: dict[VersionRef, set[str]] = {}
        for manifest in chain:
            if manifest.source.get(REPLICATED_CHUNKS):
                own = manifest.data_chunk_ids()
                if manifest.parent is not None:
                    own -= manifest_of(manifest.parent).data_chunk_ids()
                asked[manifest.ref] = own
        lacking = self.missing(set().union(*asked.values())) if asked else set()
        whole = True
        # Oldest first: a version is whole only if every one before it is.
        for manifest in reversed(chain):
            whole = whole and not asked.get(manifest.ref, set()) & lacking
            if whole:
                known.add(manifest.ref)
        return whole

    def _changed_chunks(self, base: Manifest, changes: Mapping[int, Change],
                        problems: list[exception.StorageError] | None = None,
                        read_object: delta_mod.ReadObject | None = None
                        ) -> Iterator[Piece]:
        """The pieces of ``base`` with ``changes`` applied.

        A change that does not fit raises InvalidRange, or, given ``problems``, is
        appended there and ends the pieces early. Each change is read once, here
        (a mirror's barrier reads it from disk).

        :raises: InvalidRange for an index outside ``base`` before any piece; while
            iterating, what ``read_object`` raises for a compaction.
        """
        def misfit(index: int, length: int | None) -> exception.InvalidRange:
            size = '' if length is None else f' ({length} bytes)'
            return exception.InvalidRange(
                f'change to chunk {index}{size} does not fit {base.ref} '
                f'({base.chunk_count} chunks of {base.chunk_size} bytes)')

        for index in changes:
            if not 0 <= index < base.chunk_count:
                raise misfit(index, None)
        policy = _DeltaPolicy(self.conf, self.read_chunk if read_object is None
                              else read_object)

        def pieces() -> Iterator[Piece]:
            for index, entry in enumerate(base.chunks):
                data = changes.get(index)
                try:
                    if data is None:
                        yield entry, None, None
                    elif isinstance(data, delta_mod.BlockChanges):
                        yield policy.piece(base, index, data)
                    elif len(data) != base.chunk_length(index):
                        # A wrong length aborts the write, so nothing of it becomes visible.
                        raise misfit(index, len(data))
                    else:
                        yield _plain_piece(data)
                except exception.InvalidRange as exc:
                    if problems is None:
                        raise
                    problems.append(exc)
                    return

        return pieces()

    @contextlib.contextmanager
    def _chunks_of(self, path: str, fmt: str | None, chunk_size: int,
                   progress: Progress | None):
        """Inspect ``path`` and yield it with an iterator over its chunks.

        Holds the shared lock throughout: gc must not purge the scratch space.
        """
        with self.backend.shared_lock():
            inspected = inspect_mod.inspect(self.conf, path, fmt)
            if inspected.format == 'raw':
                if os.path.getsize(path) != inspected.virtual_size:
                    raise exception.UnsafeImage(f'refusing image {path}: its size changed')
                yield inspected, chunker.read_chunks(path, chunk_size, progress)
                return
            window = self._scratch_window(chunk_size, inspected.virtual_size)
            with tempfile.TemporaryDirectory(dir=self._scratch_dir()) as scratch:
                yield inspected, self._converted_chunks(inspected, chunk_size, window,
                                                        scratch, progress)

    def _scratch_window(self, chunk_size: int, virtual_size: int) -> int:
        """Bytes of an image converted at a time: whole chunks, at most the option.

        :raises: ScratchSpaceExhausted if not even one window fits where scratch goes.
        """
        window = max(chunk_size, self.conf.storage.scratch_window // chunk_size * chunk_size)
        window = min(window, -(-virtual_size // chunk_size) * chunk_size)
        where = self._scratch_dir() or tempfile.gettempdir()
        free = shutil.disk_usage(where).free
        if free < window:
            raise exception.ScratchSpaceExhausted(
                f'converting needs {window} bytes of scratch space in {where}, '
                f'only {free} are free')
        return window

    def _converted_chunks(self, inspected: inspect_mod.InspectedImage, chunk_size: int,
                          window: int, scratch: str,
                          progress: Progress | None) -> Iterator[chunker.Chunk]:
        """The chunks of a non-raw image, converted to raw one window at a time.

        A window where qemu-img maps no data is all holes and is not converted at
        all, so a sparse image costs one process per window of data, and scratch
        use never exceeds one window, however large the image expands.
        """
        size = inspected.virtual_size
        data_windows = set()
        for start, length in qemu_img.data_extents(self.conf, inspected.path,
                                                   inspected.format):
            data_windows.update(range(start // window, (start + length - 1) // window + 1))
        raw_path = os.path.join(scratch, 'window.raw')
        for number in range(-(-size // window)):
            offset = number * window
            length = min(window, size - offset)
            first = offset // chunk_size
            if number not in data_windows:
                for index in range(first, first + -(-length // chunk_size)):
                    yield index, None, None
                if progress is not None:
                    progress(offset + length, size)
                continue
            qemu_img.convert_range(self.conf, inspected.path, inspected.format,
                                   offset, length, raw_path)
            if os.path.getsize(raw_path) != length:
                raise exception.UnsafeImage(
                    f'refusing image {inspected.path}: qemu-img converted '
                    f'{os.path.getsize(raw_path)} bytes of a {length}-byte window')
            window_progress = None if progress is None else (
                lambda done, _total, offset=offset: progress(offset + done, size))
            for index, data, chunk_id in chunker.read_chunks(raw_path, chunk_size,
                                                             window_progress):
                yield first + index, data, chunk_id
            os.unlink(raw_path)

    def _scratch_dir(self) -> str | None:
        # Convert next to the store when it can, so scratch space is on the disk
        # sized for images rather than in /tmp.
        return self.backend.scratch_dir()

    def _write_version(self, image: str, parent: VersionRef | None, size: int,
                       chunk_size: int, chunks: Iterable[chunker.Chunk], source: dict,
                       must_be_new: bool = False) -> WriteResult:
        manifest_mod.validate_image_name(image)
        with self.backend.shared_lock():
            session = self.backend.begin_write()
            uploader = _Uploader(session)
            try:
                chunk_ids = uploader.feed(chunks, 0)
                uploader.flush()
                session.commit()
            except BaseException:
                session.abort()
                raise
            manifest = self._store_manifest(image, parent, must_be_new, size, chunk_size,
                                            chunk_ids, source)
        return WriteResult(manifest=manifest, new_bytes=uploader.new_bytes[0])

    def _store_manifest(self, image: str, parent: VersionRef | None, must_be_new: bool,
                        size: int, chunk_size: int, chunk_ids: list[str | None],
                        source: dict) -> Manifest:
        """Store the next version of ``image``, once its chunks are committed.

        :raises: ImageNotFound if ``parent`` is gone; ImageExists if ``must_be_new``
            and the image has a version; StorageError.
        """
        locked = [image] if parent is None else [image, parent.image]
        with backend_mod.image_locks(self.backend, *locked):
            # The parent may have been deleted while we were writing; a listing says
            # so without reading its whole manifest again.
            if parent is not None and parent.version not in self.backend.list_versions(
                    parent.image):
                raise exception.ImageNotFound(parent.image, parent.version)
            versions = self.backend.list_versions(image)
            if must_be_new and versions:
                raise exception.ImageExists(image)
            return self._create_next_version(
                image, (versions[-1] + 1) if versions else 1, must_be_new,
                lambda version: Manifest(
                    image=image, version=version, size=size, chunk_size=chunk_size,
                    chunks=tuple(chunk_ids), parent=parent, created_at=manifest_mod.now(),
                    source=source))

    def _create_next_version(self, image: str, version: int, must_be_new: bool,
                             make: Callable[[int], Manifest]) -> Manifest:
        """Store ``make(version)``, or the next free version after it.

        The image lock keeps writers apart on one host, but a writer on another host
        (a backend without CROSS_HOST_LOCKING) may take the same number: the backend's
        exclusive create decides, and the loser takes the next number.

        :raises: ImageExists if ``must_be_new`` and another writer created the image.
        """
        for _ in range(MAX_VERSION_RACES):
            manifest = make(version)
            try:
                self.backend.create_manifest(image, version, manifest.encode())
                return manifest
            except exception.VersionExists as exc:
                if must_be_new:
                    raise exception.ImageExists(image) from exc
                version = max([version] + self.backend.list_versions(image)) + 1
        raise exception.StorageError(
            f'cannot allocate a version of {image}: {MAX_VERSION_RACES} other writers '
            'took each number first')

    # -- attachments ---------------------------------------------------------

    def write_attachment(self, image: str, name: str, data: bytes) -> None:
        """Replace attachment ``name`` of ``image`` (a boot profile, say) with ``data``.

        Atomic (a reader sees the old bytes or the new, never a mix; the last
        writer wins) and durable like a manifest. It lives as long as the image:
        deleting the image's last version deletes it.

        :raises: InvalidName for a bad image or attachment name; AttachmentTooLarge
            above backend.MAX_ATTACHMENT_BYTES; ImageNotFound if the image has no
            version; StorageError.
        """
        manifest_mod.validate_image_name(image)
        backend_mod.check_attachment(name, len(data))
        if name.startswith(HOLD_PREFIX):
            raise exception.InvalidName(
                f'invalid attachment name {name!r}: names starting with {HOLD_PREFIX!r} '
                'are holds (Warehouse.hold)')
        # Under the shared lock like any writer: gc's purge_abandoned would remove the
        # temp file a backend stages the bytes in (file: staging/). Under the image
        # lock, so a delete of the image cannot run in between and leave the
        # attachment behind.
        with self.backend.shared_lock(), backend_mod.image_locks(self.backend, image):
            if not self.backend.list_versions(image):
                raise exception.ImageNotFound(image)
            self.backend.write_attachment(image, name, bytes(data))

    def read_attachment(self, image: str, name: str) -> bytes | None:
        """The bytes of attachment ``name`` of ``image``; None if there is none.

        :raises: InvalidName; StorageError.
        """
        manifest_mod.validate_image_name(image)
        backend_mod.check_attachment(name)
        return self.backend.read_attachment(image, name)

    # -- holds ---------------------------------------------------------------

    @staticmethod
    def _hold_name(ref: str, holder: str) -> tuple[str, int, str]:
        """(image, version, attachment name) of a hold. :raises: InvalidName."""
        image, version = VersionRef.parse(ref)
        if version is None:
            raise exception.InvalidName(f'a hold names one version, IMAGE:VERSION, not {ref!r}')
        manifest_mod.validate_image_name(holder, 'holder')
        if len(holder) > MAX_HOLDER_LENGTH:
            raise exception.InvalidName(
                f'invalid holder name {holder[:40]!r}...: longer than {MAX_HOLDER_LENGTH}')
        return image, version, f'{HOLD_PREFIX}{version}.{holder}'

    def hold(self, ref: str, holder: str) -> None:
        """Record that ``holder`` uses version ``ref`` ('IMAGE:VERSION'), so delete()
        refuses to remove it (unless forced) until released. Holding twice is holding once.

        ``holder`` is a short name of letters, digits, '.', '_' and '-' that says who
        uses it (``mirror.NODE.INSTANCE``), at most MAX_HOLDER_LENGTH characters.

        :raises: InvalidName; ImageNotFound if the version does not exist; StorageError.
        """
        image, version, name = self._hold_name(ref, holder)
        # Under the image lock, as delete() is: a version is never deleted between
        # the check that it exists and the hold that would have kept it.
        with self.backend.shared_lock(), backend_mod.image_locks(self.backend, image):
            if version not in self.backend.list_versions(image):
                raise exception.ImageNotFound(image, version)
            self.backend.write_attachment(image, name, b'')

    def release(self, ref: str, holder: str) -> None:
        """Drop ``holder``'s hold on ``ref``; releasing what is not held (or a version
        deleted meanwhile) is not an error.

        :raises: InvalidName; StorageError.
        """
        image, _version, name = self._hold_name(ref, holder)
        with backend_mod.image_locks(self.backend, image):
            self.backend.delete_attachment(image, name)

    def holders(self, image: str, version: int) -> list[str]:
        """The holders of ``image:version``, sorted.

        :raises: InvalidName; StorageError.
        """
        manifest_mod.validate_image_name(image)
        return self._holds(image).get(int(version), [])

    def _holds(self, image: str) -> dict[int, list[str]]:
        """Every version of ``image`` that is held, with its holders (sorted)."""
        holds: dict[int, list[str]] = {}
        for name in self.backend.list_attachments(image):
            if name.startswith(HOLD_PREFIX):
                version, _, holder = name[len(HOLD_PREFIX):].partition('.')
                if version.isascii() and version.isdigit() and holder:
                    holds.setdefault(int(version), []).append(holder)
        return {version: sorted(names) for version, names in holds.items()}

    # -- reading data --------------------------------------------------------

    def read_chunk(self, chunk_id: str) -> bytes:
        """A stored chunk, checked against its id: corrupt data is never served.

        :raises: ChunkNotFound, CorruptChunk.
        """
        return _verified(chunk_id, self.backend.read_chunk(chunk_id))

    def read_objects(self, object_ids: Iterable[str]) -> dict[str, bytes | memoryview]:
        """Many stored objects (chunks or deltas) at once, each checked against its id
        like read_chunk's.

        :raises: ChunkNotFound, CorruptChunk, for the first that is missing or corrupt.
        """
        found = self.backend.read_chunks(object_ids)
        for object_id, data in found.items():
            _verified(object_id, data)
        return found

    def chunk_data(self, manifest: Manifest, index: int) -> bytes:
        """The bytes of chunk ``index`` of a version, its delta chain resolved; zeros
        for a hole.

        :raises: ChunkNotFound, CorruptChunk (a CorruptDelta for a delta that does not
            decode or fit its chain).
        """
        return delta_mod.resolve(manifest.chunks[index], self.read_chunk,
                                 manifest.chunk_length(index))

    def open(self, manifest: Manifest) -> reader_mod.VersionReader:
        """A seekable, read-only file object over the bytes of one version."""
        return reader_mod.VersionReader(self.read_objects, manifest)

    def read(self, manifest: Manifest, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset + length)`` of a version.

        :raises: InvalidRange if the range is not inside the version.
        """
        if offset < 0 or length < 0 or offset + length > manifest.size:
            raise exception.InvalidRange(
                f'range {offset}+{length} is outside {manifest.ref} ({manifest.size} bytes)')
        with self.open(manifest) as reader:
            reader.seek(offset)
            return reader.read(length)

    def export(self, manifest: Manifest, dest: str, fmt: str = 'raw',
               progress: Progress | None = None) -> None:
        """Write a version to ``dest`` as a raw or qcow2 file.

        A new or regular ``dest`` appears whole or not at all (temp file and
        rename). A block or character device or a FIFO is written through, raw
        only, every byte in order (holes as zeros: a device keeps old data); it is
        never replaced. A symbolic link is refused rather than followed or
        replaced: name its target, deliberately, instead.

        :raises: StorageError if ``fmt`` is unknown or ``dest`` cannot be written,
            is a symbolic link, a directory, a socket, or a device too small.
        """
        if fmt not in EXPORT_FORMATS:
            raise exception.StorageError(
                f'cannot export to {fmt!r}; formats: {", ".join(EXPORT_FORMATS)}')
        dest = os.path.abspath(dest)
        directory = os.path.dirname(dest)
        if not os.path.isdir(directory):
            raise exception.StorageError(f'cannot export to {dest}: {directory} does not exist')
        try:
            mode = os.lstat(dest).st_mode
        except FileNotFoundError:
            mode = None
        except OSError as exc:
            raise exception.StorageError(f'cannot export to {dest}: {exc}') from exc
        if mode is not None and stat.S_ISLNK(mode):
            raise exception.StorageError(
                f'refusing to export to {dest}: it is a symbolic link (to '
                f'{os.readlink(dest)}); name the file it points to instead')
        if mode is not None and (stat.S_ISBLK(mode) or stat.S_ISCHR(mode)
                                 or stat.S_ISFIFO(mode)):
            if fmt != 'raw':
                raise exception.StorageError(
                    f'cannot export {fmt} to {dest}: only raw can be written to a device or FIFO')
            self._write_through(manifest, dest, progress)
            return
        if mode is not None and not stat.S_ISREG(mode):
            raise exception.StorageError(
                f'refusing to export to {dest}: it is neither a regular file, a device nor a FIFO')
        raw_tmp = durable.temp_name(directory, '.vmcloud-export-')
        final_tmp = raw_tmp + '.qcow2' if fmt == 'qcow2' else raw_tmp
        try:
            self._write_raw(manifest, raw_tmp, progress)
            if fmt == 'qcow2':
                qemu_img.convert(self.conf, raw_tmp, 'raw', final_tmp, 'qcow2', untrusted=False)
                with open(final_tmp, 'rb+') as f:
                    os.fsync(f.fileno())
            os.rename(final_tmp, dest)
            durable.fsync_dir(directory)
        except OSError as exc:
            raise exception.StorageError(f'cannot export {manifest.ref} to {dest}: {exc}') from exc
        finally:
            for tmp in {raw_tmp, final_tmp}:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def _write_raw(self, manifest: Manifest, path: str, progress: Progress | None) -> None:
        """Every run of chunks that are not holes, read a batch at a time; the holes
        left unwritten (sparse)."""
        buffer = memoryview(bytearray(reader_mod.BATCH_BYTES))
        with open(path, 'wb') as out, self.open(manifest) as reader:
            for is_hole, run in itertools.groupby(range(manifest.chunk_count),
                                                  lambda i: manifest.chunks[i] is None):
                indexes = list(run)
                offset = indexes[0] * manifest.chunk_size
                end = min(manifest.size, (indexes[-1] + 1) * manifest.chunk_size)
                if not is_hole:
                    reader.seek(offset)
                    out.seek(offset)
                    while offset < end:
                        length = reader.readinto(buffer[:min(len(buffer), end - offset)])
                        out.write(buffer[:length])
                        offset += length
                        if progress is not None:
                            progress(offset, manifest.size)
                elif progress is not None:
                    progress(end, manifest.size)
            out.truncate(manifest.size)
            out.flush()
            os.fsync(out.fileno())

    def _write_through(self, manifest: Manifest, dest: str, progress: Progress | None) -> None:
        try:
            # O_NOFOLLOW: a symlink swapped in since lstat() is refused, not followed.
            fd = os.open(dest, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise exception.StorageError(f'cannot export {manifest.ref} to {dest}: {exc}') from exc
        try:
            st = os.fstat(fd)
            if stat.S_ISBLK(st.st_mode):
                capacity = os.lseek(fd, 0, os.SEEK_END)
                os.lseek(fd, 0, os.SEEK_SET)
                if capacity < manifest.size:
                    raise exception.StorageError(
                        f'cannot export {manifest.ref} ({manifest.size} bytes) to {dest}: '
                        f'the device holds only {capacity} bytes')
            with self.open(manifest) as reader:
                while block := reader.read(4 * 1024 * 1024):
                    durable.write_all(fd, block)
                    if progress is not None:
                        progress(reader.tell(), manifest.size)
            if stat.S_ISBLK(st.st_mode):
                os.fsync(fd)
        except OSError as exc:
            raise exception.StorageError(f'cannot export {manifest.ref} to {dest}: {exc}') from exc
        finally:
            os.close(fd)

    # -- maintenance ---------------------------------------------------------

    def delete(self, image: str, version: int | None = None,
               force: bool = False) -> list[VersionRef]:
        """Delete one version, or every version of ``image``. Chunks are freed by gc().

        A held version (hold()) is refused, naming its holders, before anything is
        deleted; ``force`` deletes it anyway, with its holds (a later version may
        take its number: it must not inherit them). Deleting the last version deletes
        the image's attachments too, holds included, first: a crash part-way leaves
        versions without attachments (a boot profile is recorded again), never
        attachments a new image of that name would inherit.

        A version whose manifest is unreadable can be deleted like any other; an
        unreadable manifest elsewhere cannot name a parent, so it blocks nothing.

        :raises: ImageNotFound; ImageInUse if another version names one of them as
            parent (even with ``force``); ImageHeld (an ImageInUse) if one of them is
            held and not ``force``.
        """
        with backend_mod.image_locks(self.backend, image):
            every = versions = self.backend.list_versions(image)
            if version is not None:
                if version not in versions:
                    raise exception.ImageNotFound(image, version)
                versions = [version]
            if not versions:
                raise exception.ImageNotFound(image)
            doomed = {VersionRef(image, v) for v in versions}
            dependents = sorted(str(s.ref) for s in self.listing().versions
                                if s.parent in doomed and s.ref not in doomed)
            if dependents:
                what = f'{image}:{version}' if version is not None else f'image {image}'
                raise exception.ImageInUse(what, dependents)
            held = {v: names for v, names in self._holds(image).items()
                    if VersionRef(image, v) in doomed}
            if held and not force:
                if version is not None:
                    raise exception.ImageHeld(image, version, held[version])
                raise exception.ImageHeld(image, None, [
                    f'{holder} ({image}:{v})' for v in sorted(held) for holder in held[v]])
            if len(doomed) == len(every):
                self.backend.delete_attachments(image)
            else:
                for v, names in held.items():
                    for holder in names:
                        self.backend.delete_attachment(image, f'{HOLD_PREFIX}{v}.{holder}')
            # Children before parents: a crash part-way never leaves an orphan.
            for ref in sorted(doomed, reverse=True):
                self.backend.delete_manifest(ref.image, ref.version)
        return sorted(doomed)

    def verify(self, progress: Progress | None = None) -> VerifyReport:
        """Re-read and re-hash every chunk of every version.

        Every damaged item is reported and the check goes on: unreadable
        manifests, what the backend itself skipped as unreadable, and each
        missing or corrupt chunk with the versions that use it. A delta is checked
        to decode and to fit each chain that names it (its base the next element,
        its length the chunk's): one that does not is reported like a corrupt chunk,
        with the versions whose chains it does not fit.
        """
        report = VerifyReport()
        users: dict[str, list[VersionRef]] = {}
        fits: _Fits = {}
        damaged = set()
        for ref, manifest, problem in self._each_version(self.manifest):
            if manifest is None:
                report.problems.append(problem)
                damaged.add(ref)
                continue
            report.versions += 1
            for chunk_id in manifest.data_chunk_ids():
                users.setdefault(chunk_id, []).append(manifest.ref)
            _expected_fits(manifest, fits)
        report.problems.extend(self.backend.damaged())

        def check(chunk_id: str) -> tuple[str, int, list[tuple[str, list[VersionRef]]]]:
            """(id, bytes read, [(problem, the versions it damages)])."""
            try:
                data = self.read_chunk(chunk_id)
            except exception.StorageError as exc:
                return chunk_id, 0, [(str(exc), users[chunk_id])]
            misfits = []
            for (base, length), refs in sorted(fits.get(chunk_id, {}).items(), key=str):
                try:
                    _check_fit(chunk_id, data, base, length)
                except exception.StorageError as exc:
                    misfits.append((str(exc), refs))
            return chunk_id, len(data), misfits

        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            for chunk_id, size, problems in pool.map(check, users):
                report.chunks += 1
                report.bytes += size
                for problem, refs in problems:
                    used_by = ', '.join(str(ref) for ref in refs)
                    report.problems.append(f'{problem}; used by {used_by}')
                    damaged.update(refs)
                if progress is not None:
                    progress(report.chunks, len(users))
        report.damaged_versions = [str(ref) for ref in sorted(damaged)]
        return report

    def gc(self, timeout: float | None = None) -> GcReport:
        """Remove chunks no version references, and what crashed writers left behind.

        Waits for writes in progress (they may be about to reference a chunk that
        looks unused now) and refuses to run if any manifest is unreadable, since
        the chunks it names cannot be known: freeing them could lose that version.

        :raises: WarehouseBusy; CorruptManifest naming every unreadable manifest.
        """
        report = GcReport()
        if timeout is None:
            timeout = self.conf.storage.gc_lock_timeout
        with self.backend.exclusive_lock(timeout):
            referenced = set()
            damaged = []
            for ref, manifest, problem in self._each_version(self.manifest):
                if manifest is None:
                    damaged.append(str(ref))
                else:
                    referenced |= manifest.data_chunk_ids()
            if damaged:
                raise exception.CorruptManifest(
                    f"gc refused: cannot read the manifest of {', '.join(damaged)}, so the "
                    'chunks it needs are unknown and nothing was freed; remove each such '
                    "version with 'vmcloud image rm IMAGE:VERSION' (or restore its "
                    'manifest), then run gc again')
            report.purged_files = self.backend.purge_abandoned()
            report.removed_chunks, report.freed_bytes = self.backend.retain(referenced)
            report.kept_chunks = len(referenced)
        return report

    def stats(self) -> Stats:
        stats = Stats()
        deltas: set[str] = set()
        for _ref, manifest, _problem in self._each_version(self.manifest):
            if manifest is None:
                stats.damaged_versions += 1
                continue
            for entry in manifest.chunks:
                if isinstance(entry, tuple):
                    deltas.update(entry[:-1])
            stats.versions += 1
            stats.logical_bytes += manifest.size
            stats.referenced_bytes += sum(manifest.chunk_length(i)
                                          for i, c in enumerate(manifest.chunks) if c)
        stats.delta_objects = len(deltas)
        stats.images = len(self.backend.list_images())
        stats.chunks = sum(1 for _ in self.backend.iter_chunks())
        stats.chunk_bytes = self.backend.stored_chunk_bytes()
        stats.manifest_bytes = self.backend.manifests_stored_bytes()
        return stats
