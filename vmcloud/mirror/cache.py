"""The node's chunk cache: every chunk its mirrors read is fetched once and kept here.

Chunks are content addressed, so N instances of one image on a node, and the
versions that share chunks, fetch and store each chunk once. Chunks live in
slot files (one per chunk size, slots reused after eviction); a journal maps
chunk ids to slots so the cache survives a restart.

The journal is written without fsync: after a crash a journal record may name a
slot whose data never reached the disk. So a chunk is hashed on its first read
after the cache is opened, and a mismatch means a re-fetch, never wrong data.

Unpersisted replicas. A chunk ``put`` as a replica is a snapshot's chunk the
repository does not hold yet (``vmcloud.mirror.persist``): the cluster's copies of it
are the replicas on its owners. So its data is fdatasync'd and its journal record
(flagged) fsync'd before ``put`` returns, it is never evicted, and at most
``replica_size`` bytes of them are held (``put`` refuses more with ReplicaBudgetFull).
``mark_persisted`` makes them ordinary entries once the repository has them. After a
restart they are hashed on first read like every entry; one found corrupt is logged
as an ERROR naming the chunk (the cluster may have lost a copy) before it is dropped.

The journal starts with a header naming its format (``JOURNAL_FORMAT``); a journal
without one is of format 1 (no flags), read as such and rewritten in the current
format when the cache opens.

One cache object owns the directory at a time (the ``lock`` file in it): two
owners would hand out the same slots for different chunks. Once closed, a cache
refuses reads and puts with CacheClosed (a late peer-server thread gets an answer, not
a closed file), and a fetch that ends after the close is returned without being kept;
close() waits for the disk I/O under way, so no write lands in a descriptor number
the process has reused meanwhile.

Eviction. Without ``owned`` the least recently used chunk that no read is using
goes first. With the peer exchange, ``owned(chunk_id)`` tells the chunks this node
owns (other nodes ask it for them) from the others, and the cache is split in two
shares: ``owned_share`` of ``capacity`` for owned chunks, the rest for the others.
While owned chunks hold no more than their share, the least recently used chunk
*not* owned is evicted; once they hold more, the least recently used owned one is.
Either kind falls back on the other when none of it can go. So under pressure each
kind keeps its share, and either may use the other's while the other does not need
it. Which chunks are owned changes with the live node set: ``reclassify()`` sorts
them again.
"""
import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import struct
import threading
import zlib
from typing import Callable

import tenacity

from vmcloud import exception
from vmcloud.nbd import statelock
from vmcloud.storage import durable
from vmcloud.storage import manifest as manifest_mod

LOG = logging.getLogger(__name__)

JOURNAL_FORMAT = 2
# magic, format, crc32 of the rest: the first bytes of a journal of format 2 or later
_HEADER = struct.Struct('<8sIL')
_MAGIC = b'vmcjrnl\0'
# chunk id (sha256), slot size, slot number, chunk length, crc32 of the rest
_RECORD_V1 = struct.Struct('<32sIIIL')
# chunk id (sha256), slot size, slot number, chunk length, flags, crc32 of the rest
_RECORD = struct.Struct('<32sIIIIL')
_REPLICA = 1  # flag: an unpersisted replica
CLOSE_WAIT = 30.0
"""Seconds close() waits for the disk I/O under way before it closes the files anyway."""


class CacheClosed(exception.MirrorError):
    """The chunk cache was closed (its node's mirror service is stopping)."""

    def __init__(self, path: str):
        self.path = path
        super().__init__(f'the chunk cache {path} is closed')


class FetchInFlight(exception.MirrorError):
    """A read that may not wait found the chunk being fetched already (``join``)."""

    def __init__(self, chunk_id: str):
        self.chunk_id = chunk_id
        super().__init__(f'chunk {chunk_id} is being fetched already, and this read '
                         'may not wait for that fetch')


@dataclasses.dataclass
class CacheStats:
    fetched_chunks: int = 0
    fetched_bytes: int = 0
    hits: int = 0  # reads served from the node
    misses: int = 0  # reads that waited for a fetch
    failed_fetches: int = 0


@dataclasses.dataclass
class _Entry:
    slot_size: int
    slot: int
    length: int
    verified: bool
    owned: bool = False
    pins: int = 0
    # An unpersisted replica (never evicted, in no eviction order), put by ``origin``.
    replica: bool = False
    origin: str = ''


class ChunkCache:
    """Thread safe; ``fetch(chunk_id) -> bytes`` reads a chunk from the warehouse (or
    wherever the node gets chunks from: the peer exchange)."""

    def __init__(self, path: str, capacity: int, fetch: Callable[[str], bytes],
                 attempts: int = 4, retry_wait: float = 0.5,
                 owned: Callable[[str], bool] | None = None, owned_share: float = 0.5,
                 replica_size: int | None = None):
        """``owned`` and ``owned_share``: see the module's docstring on eviction;
        ``replica_size``: bytes of unpersisted replicas held at most (within
        ``capacity``, its default).

        :raises: StateLocked naming the owner if another cache object has ``path``;
            MirrorError if ``owned_share`` is not within 0..1, or if the journal is of
            a format newer than this code reads.
        """
        if not 0 <= owned_share <= 1:
            raise exception.MirrorError(
                f'the share of the chunk cache for owned chunks must be within 0..1, '
                f'not {owned_share!r}')
        self.path = path
        self.capacity = capacity
        self.stats = CacheStats()
        self._fetch = fetch
        self._attempts = attempts
        self._retry_wait = retry_wait
        self._owned = owned
        self._owned_capacity = owned_share * capacity
        self._owned_bytes = 0
        self.replica_size = capacity if replica_size is None else min(replica_size, capacity)
        self._replica_bytes = 0
        self._lock = threading.Lock()
        # Every chunk held, least recently used first; and the same split by ownership.
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._by_ownership: dict[bool, collections.OrderedDict[str, None]] = {
            True: collections.OrderedDict(), False: collections.OrderedDict()}
        self._inflight: dict[str, concurrent.futures.Future] = {}
        self._free: dict[int, list[int]] = collections.defaultdict(list)
        self._next_slot: dict[int, int] = collections.defaultdict(int)
        self._slot_fds: dict[int, int] = {}
        self._used = 0
        self._closed = False
        # Threads using the slot files or the journal outside the lock; close() waits
        # for none to be left.
        self._disk_users = 0
        self._disk_idle = threading.Condition(self._lock)
        os.makedirs(path, exist_ok=True)
        self._owner = statelock.StateLock('chunk cache', os.path.join(path, 'lock'))
        try:
            self._load_journal()
        except BaseException:
            self._owner.release()
            raise

    # -- reading -------------------------------------------------------------------

    def read_into(self, chunk_id: str, offset: int, target: memoryview) -> None:
        """Fill ``target`` with the chunk's bytes from ``offset``, fetching it if need be.

        :raises: FetchFailed once the bounded retries are spent (at once if the chunk is
            not found: that is final); CacheClosed.
        """
        while True:
            entry = self._pin(chunk_id)
            if entry is None:
                data = self._fetch_once(chunk_id)
                if data is None:
                    continue  # kept by a fetch that ended since the miss: read it here
                target[:] = memoryview(data)[offset:offset + len(target)]
                return
            try:
                done = self._read_entry(chunk_id, entry, offset, target)
            finally:
                self._unpin(entry)
            if done:
                return

    def read_chunk(self, chunk_id: str, fetch: Callable[[str], bytes] | None = None,
                   join: Callable[[str], bool] | None = None) -> bytes:
        """The whole chunk, fetched if need be (concurrent misses share one fetch).

        ``fetch``, if given, is where this miss is fetched from instead of the cache's
        own fetch (the peer server fetches from the warehouse: a peer asking is the
        node's "every other node" for the chunk). A miss that joins a fetch already
        under way gets that fetch's bytes, wherever they come from. ``join``, if given,
        is asked (with the chunk id, outside the cache's lock) before a miss waits for
        a fetch under way: False, and the miss raises FetchInFlight instead of waiting
        (the peer server: a fetch that is asking peers may be waiting for the very peer
        whose request this is).

        :raises: FetchFailed once the bounded retries are spent (at once if the chunk is
            not found: that is final); FetchInFlight; CacheClosed.
        """
        while True:
            entry = self._pin(chunk_id)
            if entry is None:
                data = self._fetch_once(chunk_id, fetch, join)
                if data is None:
                    continue  # kept by a fetch that ended since the miss: read it here
                return data
            try:
                data = bytearray(entry.length)
                done = self._read_entry(chunk_id, entry, 0, memoryview(data))
            finally:
                self._unpin(entry)
            if done:
                return bytes(data)

    def _pin(self, chunk_id: str) -> _Entry | None:
        """The chunk's entry, pinned (eviction passes it by) until _unpin; None: a miss.

        :raises: CacheClosed.
        """
        with self._lock:
            if self._closed:
                raise CacheClosed(self.path)
            entry = self._entries.get(chunk_id)
            if entry is None:
                self.stats.misses += 1
                return None
            entry.pins += 1
            self._entries.move_to_end(chunk_id)
            if not entry.replica:
                self._by_ownership[entry.owned].move_to_end(chunk_id)
            self.stats.hits += 1
            return entry

    def _unpin(self, entry: _Entry) -> None:
        with self._lock:
            entry.pins -= 1

    def ensure(self, chunk_id: str) -> None:
        """Fetch a chunk unless the node has it (for prefetching).

        :raises: FetchFailed; CacheClosed.
        """
        self._fetch_once(chunk_id)  # which finds a chunk held under its lock

    @property
    def held_bytes(self) -> int:
        """Bytes of the slots that hold chunks now (what counts against capacity)."""
        with self._lock:
            return self._used

    def __contains__(self, chunk_id: str) -> bool:
        with self._lock:
            return chunk_id in self._entries

    def _read_entry(self, chunk_id: str, entry: _Entry, offset: int, target: memoryview) -> bool:
        """Whether ``target`` got the chunk's bytes (False: its slot did not hold them, the
        entry is gone). :raises: CacheClosed; OSError."""
        with self._disk():
            return self._read_slot(chunk_id, entry, offset, target)

    def _read_slot(self, chunk_id: str, entry: _Entry, offset: int, target: memoryview) -> bool:
        fd = self._slot_fd(entry.slot_size)
        base = entry.slot * entry.slot_size
        if entry.verified:
            if os.preadv(fd, [target], base + offset) != len(target):
                raise OSError(5, f'short read of cached chunk {chunk_id}')
            return True
        data = os.pread(fd, entry.length, base)
        if manifest_mod.chunk_id(data) != chunk_id:
            if entry.replica:
                LOG.error('unpersisted replica of chunk %s is corrupt on this node\'s disk '
                          '(%s); dropped: the repository does not hold it yet, its other '
                          'owners may', chunk_id, self.path)
            else:
                LOG.warning('cached chunk %s did not survive a restart; fetching it again',
                            chunk_id)
            with self._lock:
                if self._entries.get(chunk_id) is entry:
                    self._forget(chunk_id)
            return False
        entry.verified = True
        target[:] = memoryview(data)[offset:offset + len(target)]
        return True

    # -- fetching ------------------------------------------------------------------

    def _fetch_once(self, chunk_id: str, fetch: Callable[[str], bytes] | None = None,
                    join: Callable[[str], bool] | None = None) -> bytes | None:
        """Fetch and store a chunk (with ``fetch`` if given, else the cache's own);
        concurrent callers for one chunk share one fetch. None: the chunk is held (a
        fetch that ended since the caller's miss kept it), read it from the node.

        :raises: FetchFailed; FetchInFlight if ``join`` says not to wait; CacheClosed.
        """
        with self._lock:
            if self._closed:
                raise CacheClosed(self.path)
            future = self._inflight.get(chunk_id)
            owner = future is None
            if owner:
                if chunk_id in self._entries:
                    return None
                future = self._inflight[chunk_id] = concurrent.futures.Future()
        if not owner:
            if join is not None and not future.done() and not join(chunk_id):
                raise FetchInFlight(chunk_id)
            return future.result()
        try:
            data = self._fetch_with_retries(chunk_id, fetch or self._fetch)
            self._store(chunk_id, data)
        except BaseException as exc:
            future.set_exception(exc)
            raise
        else:
            future.set_result(data)
            return data
        finally:
            with self._lock:
                del self._inflight[chunk_id]

    def _fetch_with_retries(self, chunk_id: str, fetch: Callable[[str], bytes]) -> bytes:
        """:raises: FetchFailed: every attempt failed, or one found the chunk missing."""
        attempts = 0

        def attempt(chunk_id: str) -> bytes:
            nonlocal attempts
            attempts += 1
            return fetch(chunk_id)

        def log_retry(state: tenacity.RetryCallState) -> None:
            LOG.warning('fetching chunk %s failed (attempt %d): %s; retrying', chunk_id,
                        state.attempt_number, state.outcome.exception())

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self._attempts),
            wait=tenacity.wait_exponential(multiplier=self._retry_wait / 4,
                                           max=self._retry_wait),
            # A chunk not found is the answer, not a failure: asking again would wait
            # out the back-off to hear it again (the exchange asked every owner already).
            retry=(tenacity.retry_if_exception_type((OSError, exception.StorageError))
                   & tenacity.retry_if_not_exception_type(exception.ChunkNotFound)),
            before_sleep=log_retry, reraise=True)
        try:
            data = retrying(attempt, chunk_id)
        except (OSError, exception.StorageError) as exc:
            with self._lock:
                self.stats.failed_fetches += 1
            raise exception.FetchFailed(chunk_id, attempts, exc) from exc
        with self._lock:
            self.stats.fetched_chunks += 1
            self.stats.fetched_bytes += len(data)
        return data

    # -- storing -------------------------------------------------------------------

    def _store(self, chunk_id: str, data: bytes) -> None:
        """Keep a fetched chunk if there is room; a cache closed meanwhile keeps nothing."""
        owned = self._is_owned(chunk_id)
        try:
            with self._disk():
                self._store_in_slot(chunk_id, data, owned)
        except CacheClosed:
            pass  # the chunk is served all the same, from memory

    def _store_in_slot(self, chunk_id: str, data: bytes, owned: bool) -> None:
        slot_size = _slot_size(len(data))
        with self._lock:
            slot = self._allocate(slot_size)
        if slot is None:
            return  # everything cached is in use: serve the chunk without keeping it
        try:
            durable.write_all_at(self._slot_fd(slot_size), data, slot * slot_size)
        except OSError as exc:
            # A full disk must not fail a read whose chunk was fetched: serve it
            # without keeping it, and give the slot back.
            LOG.warning('cannot keep chunk %s in the node cache: %s', chunk_id, exc)
            with self._lock:
                self._free[slot_size].append(slot)
            return
        with self._lock:
            if chunk_id in self._entries:
                # A put of the same chunk kept it meanwhile: one entry per chunk.
                self._free[slot_size].append(slot)
                return
            entry = _Entry(slot_size, slot, len(data), verified=True, owned=owned)
            self._keep(chunk_id, entry)
            self._append_journal(chunk_id, entry)

    # -- unpersisted replicas --------------------------------------------------------

    def put(self, chunk_id: str, data: bytes, replica: bool = True, origin: str = '') -> None:
        """Keep ``data`` as chunk ``chunk_id``: with ``replica``, as an unpersisted
        replica put by node ``origin``, durable (data and journal record synced) when
        this returns; putting one held already is putting it once.

        :raises: CorruptChunk if ``data`` does not hash to ``chunk_id``;
            ReplicaBudgetFull if it would take the replicas past ``replica_size`` or the
            cache has nothing it may evict for it; OSError if it cannot be made durable
            (nothing is kept as a replica then); CacheClosed (nothing is kept).
        """
        actual = manifest_mod.chunk_id(data)
        if actual != chunk_id:
            raise exception.CorruptChunk(chunk_id, actual)
        slot_size = _slot_size(len(data))
        for _ in range(3):  # an entry evicted or found corrupt between the steps: again
            with self._lock:
                if self._closed:
                    raise CacheClosed(self.path)
                entry = self._entries.get(chunk_id)
                if entry is not None and entry.replica:
                    entry.origin = origin or entry.origin
                    return
                if replica and self._replica_bytes + slot_size > self.replica_size:
                    raise exception.ReplicaBudgetFull(chunk_id, self._replica_bytes,
                                                      self.replica_size)
                if entry is not None:
                    entry.pins += 1
            if entry is None:
                self._store(chunk_id, data)
                if not replica:
                    return
                continue
            try:
                if self._convert(chunk_id, entry, replica, origin):
                    return
            finally:
                self._unpin(entry)
        raise exception.ReplicaBudgetFull(chunk_id, self._replica_bytes, self.replica_size)

    def _convert(self, chunk_id: str, entry: _Entry, replica: bool, origin: str) -> bool:
        """Make the held (pinned) ``entry`` a durable replica; False if it went meanwhile
        or its data is not the chunk's (it is dropped then).

        :raises: ReplicaBudgetFull; OSError; CacheClosed.
        """
        if not replica:
            return True
        with self._disk():
            return self._make_replica(chunk_id, entry, origin)

    def _make_replica(self, chunk_id: str, entry: _Entry, origin: str) -> bool:
        fd = self._slot_fd(entry.slot_size)
        if not entry.verified:
            if manifest_mod.chunk_id(os.pread(fd, entry.length,
                                              entry.slot * entry.slot_size)) != chunk_id:
                with self._lock:
                    if self._entries.get(chunk_id) is entry and not entry.replica:
                        self._forget(chunk_id)
                return False
            entry.verified = True
        with self._lock:
            if self._entries.get(chunk_id) is not entry:
                return False
            if entry.replica:
                return True
            if self._replica_bytes + entry.slot_size > self.replica_size:
                raise exception.ReplicaBudgetFull(chunk_id, self._replica_bytes,
                                                  self.replica_size)
            # Out of the eviction order first: the chunk stays while it is synced.
            self._set_replica(chunk_id, entry, True)
            entry.origin = origin
        try:
            os.fdatasync(fd)
            with self._lock:
                self._append_journal(chunk_id, entry)
            os.fsync(self._journal.fileno())
        except OSError:
            with self._lock:
                if self._entries.get(chunk_id) is entry:
                    self._set_replica(chunk_id, entry, False)
            raise
        return True

    def _set_replica(self, chunk_id: str, entry: _Entry, replica: bool) -> None:
        """Make a held entry a replica (out of the eviction order) or an ordinary entry
        (the most recently used); with the lock."""
        if entry.replica == replica:
            return
        entry.replica = replica
        if replica:
            del self._by_ownership[entry.owned][chunk_id]
            self._replica_bytes += entry.slot_size
            if entry.owned:
                self._owned_bytes -= entry.slot_size
        else:
            entry.origin = ''
            self._by_ownership[entry.owned][chunk_id] = None
            self._replica_bytes -= entry.slot_size
            if entry.owned:
                self._owned_bytes += entry.slot_size

    def mark_persisted(self, chunk_ids) -> None:
        """These chunks are in the repository: their replicas (ids held otherwise, or
        not at all, are passed over) become ordinary entries, evicted as any; a closed
        cache passes them all over (the replica sweep finds them persisted after the
        restart)."""
        with self._lock:
            if self._closed:
                return
            for chunk_id in chunk_ids:
                entry = self._entries.get(chunk_id)
                if entry is not None and entry.replica:
                    self._set_replica(chunk_id, entry, False)
                    self._entries.move_to_end(chunk_id)
                    # Not synced: lost in a crash, the replica's sweep finds it persisted.
                    self._append_journal(chunk_id, entry)

    def unpersisted(self) -> dict[str, str]:
        """{chunk id: the node that put it ('' if not known: put before a restart)} of
        every unpersisted replica held."""
        with self._lock:
            return {chunk_id: entry.origin for chunk_id, entry in self._entries.items()
                    if entry.replica}

    @property
    def replica_bytes(self) -> int:
        """Bytes of the slots that hold unpersisted replicas."""
        with self._lock:
            return self._replica_bytes

    def _is_owned(self, chunk_id: str) -> bool:
        # Asked outside the cache's lock: the answer takes the exchange's.
        return self._owned is not None and self._owned(chunk_id)

    def _keep(self, chunk_id: str, entry: _Entry) -> None:
        """Hold ``entry`` as the most recently used chunk; with the lock."""
        self._entries[chunk_id] = entry
        self._used += entry.slot_size
        if entry.replica:
            self._replica_bytes += entry.slot_size
            return
        self._by_ownership[entry.owned][chunk_id] = None
        if entry.owned:
            self._owned_bytes += entry.slot_size

    def _forget(self, chunk_id: str) -> None:
        """Stop holding the chunk and free its slot; with the lock."""
        entry = self._entries.pop(chunk_id)
        if entry.replica:
            self._replica_bytes -= entry.slot_size
        else:
            del self._by_ownership[entry.owned][chunk_id]
            if entry.owned:
                self._owned_bytes -= entry.slot_size
        self._release_slot(entry)

    def _allocate(self, slot_size: int) -> int | None:
        """A free slot, evicting chunks (see the module's docstring) to stay within capacity."""
        while self._used + slot_size > self.capacity:
            victim = self._victim()
            if victim is None:
                return None
            self._forget(victim)
        if self._free[slot_size]:
            return self._free[slot_size].pop()
        slot = self._next_slot[slot_size]
        self._next_slot[slot_size] = slot + 1
        return slot

    def _victim(self) -> str | None:
        """The chunk to evict next, None if every chunk held is being read; with the lock."""
        first = self._owned_bytes > self._owned_capacity  # owned chunks over their share
        for owned in (first, not first):
            victim = next((chunk_id for chunk_id in self._by_ownership[owned]
                           if self._entries[chunk_id].pins == 0), None)
            if victim is not None:
                return victim
        return None

    def reclassify(self) -> None:
        """Which chunks the node owns has changed (the live node set did): sort every
        chunk held again, keeping how recently each was used."""
        if self._owned is None:
            return
        with self._lock:
            held = list(self._entries)
        owned = {chunk_id: self._owned(chunk_id) for chunk_id in held}
        with self._lock:
            self._owned_bytes = 0
            for ids in self._by_ownership.values():
                ids.clear()
            for chunk_id, entry in self._entries.items():
                # A chunk stored meanwhile was sorted by the new node set already.
                entry.owned = owned.get(chunk_id, entry.owned)
                if entry.replica:
                    continue  # in no eviction order until persisted
                self._by_ownership[entry.owned][chunk_id] = None
                if entry.owned:
                    self._owned_bytes += entry.slot_size

    @property
    def owned_bytes(self) -> int:
        """Bytes of the slots that hold chunks this node owns."""
        with self._lock:
            return self._owned_bytes

    def _release_slot(self, entry: _Entry) -> None:
        self._used -= entry.slot_size
        self._free[entry.slot_size].append(entry.slot)

    def _slot_fd(self, slot_size: int) -> int:
        fd = self._slot_fds.get(slot_size)
        if fd is None:
            with self._lock:
                fd = self._slot_fds.get(slot_size)
                if fd is None:
                    fd = os.open(os.path.join(self.path, f'slots-{slot_size}'),
                                 os.O_RDWR | os.O_CREAT, 0o600)
                    self._slot_fds[slot_size] = fd
        return fd

    # -- the journal ---------------------------------------------------------------

    def _journal_path(self) -> str:
        return os.path.join(self.path, 'journal')

    def _load_journal(self) -> None:
        try:
            with open(self._journal_path(), 'rb') as f:
                data = f.read()
        except FileNotFoundError:
            data = b''
        # A slot reused after eviction appears again: its last record wins.
        by_slot: dict[tuple[int, int], tuple[str, int, int]] = {}
        for raw_id, slot_size, slot, length, flags in self._records(data):
            by_slot[(slot_size, slot)] = raw_id.hex(), length, flags
        for (slot_size, slot), (chunk_id, length, flags) in by_slot.items():
            self._next_slot[slot_size] = max(self._next_slot[slot_size], slot + 1)
            if chunk_id in self._entries:
                self._forget(chunk_id)
            self._keep(chunk_id, _Entry(slot_size, slot, length, verified=False,
                                        owned=self._is_owned(chunk_id),
                                        replica=bool(flags & _REPLICA)))
        # Built afresh: a chunk recorded in two slots freed one of them above already,
        # and a slot listed twice would be handed to two chunks.
        for slot_size, count in self._next_slot.items():
            used = {e.slot for e in self._entries.values() if e.slot_size == slot_size}
            self._free[slot_size] = [s for s in range(count) if s not in used]
        self._rewrite_journal()
        self._journal = open(self._journal_path(), 'ab', buffering=0)

    def _records(self, data: bytes):
        """(raw id, slot size, slot, length, flags) of each whole record of a journal,
        of format 1 (no header) or JOURNAL_FORMAT; a torn record ends it.

        :raises: MirrorError for a journal of a format newer than JOURNAL_FORMAT.
        """
        if data[:len(_MAGIC)] != _MAGIC:
            for start in range(0, len(data) - _RECORD_V1.size + 1, _RECORD_V1.size):
                raw_id, slot_size, slot, length, crc = _RECORD_V1.unpack_from(data, start)
                if zlib.crc32(data[start:start + _RECORD_V1.size - 4]) != crc:
                    return
                yield raw_id, slot_size, slot, length, 0
            return
        if len(data) < _HEADER.size:
            return
        _magic, version, crc = _HEADER.unpack_from(data)
        if zlib.crc32(data[:_HEADER.size - 4]) != crc:
            return  # a torn header: nothing after it was written either
        if version != JOURNAL_FORMAT:
            raise exception.MirrorError(
                f'chunk cache journal {self._journal_path()} is of format {version}; this '
                f'vmcloud reads formats 1 to {JOURNAL_FORMAT}')
        for start in range(_HEADER.size, len(data) - _RECORD.size + 1, _RECORD.size):
            raw_id, slot_size, slot, length, flags, crc = _RECORD.unpack_from(data, start)
            if zlib.crc32(data[start:start + _RECORD.size - 4]) != crc:
                return
            yield raw_id, slot_size, slot, length, flags

    def _rewrite_journal(self) -> None:
        records = b''.join(_record(cid, e.slot_size, e.slot, e.length,
                                   _REPLICA if e.replica else 0)
                           for cid, e in self._entries.items())
        durable.replace(self._journal_path(), _header() + records)

    def _append_journal(self, chunk_id: str, entry: _Entry) -> None:
        self._journal.write(_record(chunk_id, entry.slot_size, entry.slot, entry.length,
                                    _REPLICA if entry.replica else 0))

    @contextlib.contextmanager
    def _disk(self):
        """Around a use of the slot files or the journal outside the lock: close() waits
        for it to end. :raises: CacheClosed."""
        with self._lock:
            if self._closed:
                raise CacheClosed(self.path)
            self._disk_users += 1
        try:
            yield
        finally:
            with self._lock:
                self._disk_users -= 1
                if not self._disk_users:
                    self._disk_idle.notify_all()

    def close(self) -> None:
        """Stop using the directory and give it up to the next owner, once the disk I/O
        under way has ended (CLOSE_WAIT s at most); idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self._disk_idle.wait_for(lambda: not self._disk_users, CLOSE_WAIT):
                LOG.warning('closing the chunk cache %s with %d disk operations still '
                            'under way after %g s', self.path, self._disk_users, CLOSE_WAIT)
            self._journal.close()
            for fd in self._slot_fds.values():
                os.close(fd)
            self._slot_fds.clear()
            self._owner.release()


def _header() -> bytes:
    body = struct.pack('<8sI', _MAGIC, JOURNAL_FORMAT)
    return body + struct.pack('<L', zlib.crc32(body))


def _record(chunk_id: str, slot_size: int, slot: int, length: int, flags: int = 0) -> bytes:
    body = struct.pack('<32sIIII', bytes.fromhex(chunk_id), slot_size, slot, length, flags)
    return body + struct.pack('<L', zlib.crc32(body))


def _slot_size(length: int) -> int:
    """Slots come in powers of two, so chunks of one image share a slot file."""
    return 1 << max(12, (length - 1).bit_length())
