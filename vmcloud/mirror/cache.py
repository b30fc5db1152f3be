"""The node's chunk cache: every chunk its mirrors read is fetched once and kept here.

Chunks are content addressed, so N instances of one image on a node, and the
versions that share chunks, fetch and store each chunk once. Chunks live in
slot files (one per chunk size, slots reused after eviction); a journal maps
chunk ids to slots so the cache survives a restart.

The journal is written without fsync: after a crash a journal record may name a
slot whose data never reached the disk. So a chunk is hashed on its first read
after the cache is opened, and a mismatch means a re-fetch, never wrong data.

One cache object owns the directory at a time (the ``lock`` file in it): two
owners would hand out the same slots for different chunks.
"""
import collections
import concurrent.futures
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

# chunk id (sha256), slot size, slot number, chunk length, crc32 of the rest
_RECORD = struct.Struct('<32sIIIL')


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
    pins: int = 0


class ChunkCache:
    """Thread safe; ``fetch(chunk_id) -> bytes`` reads a chunk from the warehouse."""

    def __init__(self, path: str, capacity: int, fetch: Callable[[str], bytes],
                 attempts: int = 4, retry_wait: float = 0.5):
        """:raises: StateLocked naming the owner if another cache object has ``path``."""
        self.path = path
        self.capacity = capacity
        self.stats = CacheStats()
        self._fetch = fetch
        self._attempts = attempts
        self._retry_wait = retry_wait
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._inflight: dict[str, concurrent.futures.Future] = {}
        self._free: dict[int, list[int]] = collections.defaultdict(list)
        self._next_slot: dict[int, int] = collections.defaultdict(int)
        self._slot_fds: dict[int, int] = {}
        self._used = 0
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

        :raises: FetchFailed once the bounded retries are spent.
        """
        while True:
            with self._lock:
                entry = self._entries.get(chunk_id)
                if entry is not None:
                    entry.pins += 1
                    self._entries.move_to_end(chunk_id)
                    self.stats.hits += 1
                else:
                    self.stats.misses += 1
            if entry is None:
                data = self._fetch_once(chunk_id)
                target[:] = memoryview(data)[offset:offset + len(target)]
                return
            try:
                done = self._read_entry(chunk_id, entry, offset, target)
            finally:
                with self._lock:
                    entry.pins -= 1
            if done:
                return

    def ensure(self, chunk_id: str) -> None:
        """Fetch a chunk unless the node has it (for prefetching). :raises: FetchFailed."""
        with self._lock:
            if chunk_id in self._entries:
                return
        self._fetch_once(chunk_id)

    @property
    def held_bytes(self) -> int:
        """Bytes of the slots that hold chunks now (what counts against capacity)."""
        with self._lock:
            return self._used

    def __contains__(self, chunk_id: str) -> bool:
        with self._lock:
            return chunk_id in self._entries

    def _read_entry(self, chunk_id: str, entry: _Entry, offset: int, target: memoryview) -> bool:
        fd = self._slot_fd(entry.slot_size)
        base = entry.slot * entry.slot_size
        if entry.verified:
            if os.preadv(fd, [target], base + offset) != len(target):
                raise OSError(5, f'short read of cached chunk {chunk_id}')
            return True
        data = os.pread(fd, entry.length, base)
        if manifest_mod.chunk_id(data) != chunk_id:
            LOG.warning('cached chunk %s did not survive a restart; fetching it again', chunk_id)
            with self._lock:
                if self._entries.get(chunk_id) is entry:
                    del self._entries[chunk_id]
                    self._release_slot(entry)
            return False
        entry.verified = True
        target[:] = memoryview(data)[offset:offset + len(target)]
        return True

    # -- fetching ------------------------------------------------------------------

    def _fetch_once(self, chunk_id: str) -> bytes:
        """Fetch and store a chunk; concurrent callers for one chunk share one fetch."""
        with self._lock:
            future = self._inflight.get(chunk_id)
            owner = future is None
            if owner:
                future = self._inflight[chunk_id] = concurrent.futures.Future()
        if not owner:
            return future.result()
        try:
            data = self._fetch_with_retries(chunk_id)
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

    def _fetch_with_retries(self, chunk_id: str) -> bytes:
        def log_retry(state: tenacity.RetryCallState) -> None:
            LOG.warning('fetching chunk %s failed (attempt %d): %s; retrying', chunk_id,
                        state.attempt_number, state.outcome.exception())

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self._attempts),
            wait=tenacity.wait_exponential(multiplier=self._retry_wait / 4,
                                           max=self._retry_wait),
            retry=tenacity.retry_if_exception_type((OSError, exception.StorageError)),
            before_sleep=log_retry, reraise=True)
        try:
            data = retrying(self._fetch, chunk_id)
        except (OSError, exception.StorageError) as exc:
            with self._lock:
                self.stats.failed_fetches += 1
            raise exception.FetchFailed(chunk_id, self._attempts, exc) from exc
        with self._lock:
            self.stats.fetched_chunks += 1
            self.stats.fetched_bytes += len(data)
        return data

    # -- storing -------------------------------------------------------------------

    def _store(self, chunk_id: str, data: bytes) -> None:
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
            entry = self._entries[chunk_id] = _Entry(slot_size, slot, len(data), verified=True)
            self._used += slot_size
            self._append_journal(chunk_id, entry)

    def _allocate(self, slot_size: int) -> int | None:
        """A free slot, evicting least recently used chunks to stay within capacity."""
        while self._used + slot_size > self.capacity:
            victim = next((cid for cid, e in self._entries.items() if e.pins == 0), None)
            if victim is None:
                return None
            self._release_slot(self._entries.pop(victim))
        if self._free[slot_size]:
            return self._free[slot_size].pop()
        slot = self._next_slot[slot_size]
        self._next_slot[slot_size] = slot + 1
        return slot

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
        by_slot: dict[tuple[int, int], tuple[str, int]] = {}
        for start in range(0, len(data) - _RECORD.size + 1, _RECORD.size):
            raw_id, slot_size, slot, length, crc = _RECORD.unpack_from(data, start)
            if zlib.crc32(data[start:start + _RECORD.size - 4]) != crc:
                break  # a torn record ends the journal
            by_slot[(slot_size, slot)] = raw_id.hex(), length
        for (slot_size, slot), (chunk_id, length) in by_slot.items():
            self._next_slot[slot_size] = max(self._next_slot[slot_size], slot + 1)
            old = self._entries.pop(chunk_id, None)
            if old is not None:
                self._release_slot(old)
            self._entries[chunk_id] = _Entry(slot_size, slot, length, verified=False)
            self._used += slot_size
        for slot_size, count in self._next_slot.items():
            used = {e.slot for e in self._entries.values() if e.slot_size == slot_size}
            self._free[slot_size].extend(s for s in range(count) if s not in used)
        self._rewrite_journal()
        self._journal = open(self._journal_path(), 'ab', buffering=0)

    def _rewrite_journal(self) -> None:
        records = b''.join(_record(cid, e.slot_size, e.slot, e.length)
                           for cid, e in self._entries.items())
        durable.replace(self._journal_path(), records)

    def _append_journal(self, chunk_id: str, entry: _Entry) -> None:
        self._journal.write(_record(chunk_id, entry.slot_size, entry.slot, entry.length))

    def close(self) -> None:
        """Stop using the directory and give it up to the next owner; idempotent."""
        with self._lock:
            self._journal.close()
            for fd in self._slot_fds.values():
                os.close(fd)
            self._slot_fds.clear()
            self._owner.release()


def _record(chunk_id: str, slot_size: int, slot: int, length: int) -> bytes:
    body = struct.pack('<32sIII', bytes.fromhex(chunk_id), slot_size, slot, length)
    return body + struct.pack('<L', zlib.crc32(body))


def _slot_size(length: int) -> int:
    """Slots come in powers of two, so chunks of one image share a slot file."""
    return 1 << max(12, (length - 1).bit_length())
