"""What a compute manager asks of its node's mirrors, in-process or from the node's service.

``Mirrors`` is the one interface. ``LocalMirrors`` keeps the mirrors in the calling
process (the all-in-one mode, tests). ``RemoteMirrors`` asks the node's mirror service
(``vmcloud mirror-service``, ``vmcloud.mirror.service``) over its control socket, so
that the guests' disks stay served while the compute manager stops, restarts or is
upgraded.

The control protocol is one JSON object per line each way, one connection per call:
``{"method": M, "args": {...}}`` answered by ``{"result": R}`` or by ``{"error":
{"class", "message", "fields"}}``, a VmcloudError that the client raises again as the
same class with the same fields (as ``vmcloud.rpc`` carries them over the bus).
"""
import abc
import collections
import collections.abc
import contextlib
import dataclasses
import json
import logging
import socket
import threading
import time
from typing import Any

from oslo_config import cfg

from vmcloud import exception
from vmcloud import rpc
from vmcloud.mirror import disk as disk_mod
from vmcloud.mirror import manager as manager_mod
from vmcloud.mirror import persist as persist_mod
from vmcloud.storage import delta as delta_mod
from vmcloud.storage import warehouse as warehouse_mod

LOG = logging.getLogger(__name__)

# A request is a method name and a few names; bounded, so a stray client cannot make
# the service buffer without end.
MAX_REQUEST_BYTES = 1024 * 1024
# An answer lists at most every mirror of the node, with a short result each.
MAX_ANSWER_BYTES = 16 * 1024 * 1024
# Snapshot keys discarded, remembered (to refuse their late barriers) up to this many.
ENDED_KEPT = 256


@dataclasses.dataclass(frozen=True)
class MirrorInfo:
    name: str
    uri: str  # the NBD URI a hypervisor opens
    image: str  # the version it mirrors, 'IMAGE:VERSION'


class Mirrors(abc.ABC):
    """A node's mirrors: one copy-on-reference disk per instance, served over NBD.

    Snapshots go in three steps, keyed by the snapshot: ``barrier`` with the guests
    frozen (fast: only the dirty set is taken), then, once they run again, ``upload``
    (one write session for every guest of the key), or ``discard`` to abandon them.
    """

    @abc.abstractmethod
    def create(self, name: str, image: str) -> MirrorInfo:
        """A new mirror of ``image`` (``NAME`` or ``NAME:VERSION``), served at once and
        holding its version in the warehouse until removed.

        :raises: MirrorExists, ImageNotFound, InvalidName, StorageError.
        """

    @abc.abstractmethod
    def names(self) -> list[str]:
        """The mirrors served now."""

    @abc.abstractmethod
    def remove(self, name: str) -> None:
        """Stop serving mirror ``name``, delete its state and release its hold.

        :raises: MirrorNotFound.
        """

    @abc.abstractmethod
    def set_phase(self, name: str, phase: str) -> None:
        """The guest printed phase marker ``phase`` (``profile.MARKERS``).

        :raises: MirrorNotFound; MirrorError for an unknown marker.
        """

    @abc.abstractmethod
    def needed_bytes(self, name: str) -> int:
        """Bytes of image chunks mirror ``name`` has needed so far. :raises: MirrorNotFound."""

    @abc.abstractmethod
    def fetched_bytes(self) -> int:
        """Bytes the node's chunk cache has fetched from the warehouse since it opened
        (with peers: for itself and for the peers that asked it, not what peers sent)."""

    @abc.abstractmethod
    def cached_bytes(self) -> int:
        """Bytes the node's chunk cache holds now."""

    @abc.abstractmethod
    def sync(self, name: str) -> None:
        """Make every write acknowledged so far durable, as an NBD FLUSH would, while the
        guest runs: a freeze that follows has little left to flush.

        :raises: MirrorNotFound; OSError if the disk cannot be synced.
        """

    @abc.abstractmethod
    def barrier(self, key: str, names: list[str]) -> dict[str, dict]:
        """Take each mirror's snapshot barrier under ``key`` (call it with the guests
        frozen): ``{name: {'dirty_bytes': int} | {'error': str}}``; a mirror that fails
        fails alone. A ``key`` discarded already takes none (an error each).
        """

    @abc.abstractmethod
    def upload(self, key: str, targets: dict[str, str]) -> dict[str, dict]:
        """Store the barriers of ``key``, mirror ``name`` as a new version of image
        ``targets[name]``, in one warehouse write session; then exit every barrier of
        ``key``. Blocks until stored: ``{name: {'version': 'IMAGE:V', 'uploaded_bytes':
        int, 'replicated': True, 'persistent': bool} | {'error': str}}``. A name
        without a barrier under ``key`` is an error for it alone.

        With the peer exchange and ``[mirror] replicate_snapshots``, the new chunks go
        to their owners among the live nodes rather than the warehouse (a chunk an
        owner refuses goes to the warehouse); ``persistent`` is then false for an item
        with chunks on peers only, written to the warehouse in the background
        (``wait_persistent``). Without, every item is persistent.
        """

    @abc.abstractmethod
    def wait_persistent(self, key: str, timeout: float) -> dict[str, bool]:
        """Once the chunks the upload of ``key`` left on peers are in the warehouse (or
        after ``timeout`` seconds): ``{name: persistent}`` of its items that were not;
        {} if this node has nothing of ``key`` to persist (it restarted since, or every
        item was persistent)."""

    @abc.abstractmethod
    def discard(self, key: str) -> None:
        """Exit every barrier of ``key`` without storing it; idempotent."""

    @abc.abstractmethod
    def peer_url(self) -> str:
        """The URL the other compute nodes ask this node's chunks at, e.g.
        'http://10.0.0.2:9495'; '' when peers are off ([mirror] peer_address empty)."""

    @abc.abstractmethod
    def set_peers(self, me: str, peers: dict[str, str]) -> None:
        """The live node set ``{host: peer_url}``, this node (``me``, its host name)
        included when it is up: whom cache misses ask, and which chunks it owns. A
        no-op when peers are off.

        :raises: MirrorError naming what is wrong with the arguments.
        """

    @abc.abstractmethod
    def peer_stats(self) -> dict:
        """The node's peer document (as its /v1/stats): 'host', 'peers', 'replicas',
        what it served ('served_chunks', 'served_bytes', 'staged_chunks') and what it had
        from the warehouse and from peers ('repository_chunks', 'repository_bytes',
        'peer_chunks', 'peer_bytes', 'peer_failures', 'corrupt_from_peers'); {} when
        peers are off."""

    @abc.abstractmethod
    def close(self) -> None:
        """Give up this handle. For ``LocalMirrors`` the mirrors stop being served
        (keeping their state for a restart); ``RemoteMirrors`` leaves them served."""


class _BarrierChanges(collections.abc.Mapping):
    """A barrier's chunks as the warehouse's snapshot_many wants them, read on demand:
    the blocks the guest wrote, which the warehouse stores as a delta over the parent's
    chunk, or as a plain chunk when they are all of it or too many."""

    def __init__(self, barrier: disk_mod.Barrier):
        self._barrier = barrier

    def __getitem__(self, index: int) -> delta_mod.BlockChanges:
        if index not in self._barrier.indexes:
            raise KeyError(index)
        return delta_mod.BlockChanges(self._barrier.block_size, self._barrier.read_blocks(index))

    def __iter__(self):
        return iter(sorted(self._barrier.indexes))

    def __len__(self) -> int:
        return len(self._barrier.indexes)


@dataclasses.dataclass(frozen=True)
class _Taken:
    disk: disk_mod.MirrorDisk
    barrier: disk_mod.Barrier


class LocalMirrors(manager_mod.MirrorManager, Mirrors):
    """The node's mirrors in this process. Thread safe."""

    def __init__(self, conf: cfg.ConfigOpts, warehouse: warehouse_mod.Warehouse | None = None,
                 root: str | None = None):
        """:raises: as MirrorManager."""
        super().__init__(conf, warehouse, root)
        self._taken: dict[str, dict[str, _Taken]] = {}
        # Mirrors an upload is reading: their disks must stay open until it ends, or
        # a reused descriptor would hand the warehouse another file's bytes.
        self._uploading: collections.Counter[str] = collections.Counter()
        self._barriers_changed = threading.Condition()
        # Keys discarded: a barrier of one that comes after (its caller gave up waiting
        # and discarded it) would stay open, refusing every later barrier of its mirrors.
        self._ended: collections.OrderedDict[str, None] = collections.OrderedDict()

    def create(self, name: str, image: str) -> MirrorInfo:
        mirror = super().create(name, image)
        return MirrorInfo(mirror.name, mirror.uri, str(mirror.disk.manifest.ref))

    def needed_bytes(self, name: str) -> int:
        disk = self.get(name).disk
        return sum(disk.manifest.chunk_length(i) for i in disk.fetched_indexes())

    def fetched_bytes(self) -> int:
        return self.warehouse_bytes()

    def cached_bytes(self) -> int:
        return self.cache.held_bytes

    def sync(self, name: str) -> None:
        self.get(name).disk.flush()

    def barrier(self, key: str, names: list[str]) -> dict[str, dict]:
        results = {}
        for name in names:
            try:
                mirror = self.get(name)
                taken = _Taken(mirror.disk, mirror.disk.barrier())
            except (exception.VmcloudError, OSError) as exc:
                # For this guest alone: the others' barriers are taken all the same.
                results[name] = {'error': str(exc)}
                continue
            with self._barriers_changed:
                with self._lock:
                    # A remove() that began meanwhile has discarded its barriers already.
                    alive = self._mirrors.get(name) is mirror
                ended = key in self._ended
                if alive and not ended:
                    self._taken.setdefault(key, {})[name] = taken
            if alive and not ended:
                results[name] = {'dirty_bytes': taken.barrier.dirty_bytes}
                continue
            self._exit(name, taken)
            results[name] = {'error': f'snapshot {key} was discarded already'
                             if ended else str(exception.MirrorNotFound(name))}
        return results

    def upload(self, key: str, targets: dict[str, str]) -> dict[str, dict]:
        with self._barriers_changed:
            taken = self._taken.pop(key, {})
            self._uploading.update(list(taken))  # counts of names
        results: dict[str, dict] = {}
        items = []
        for name, target in targets.items():
            if name in taken:
                items.append((name, target, taken[name]))
            else:
                results[name] = {'error': f'mirror {name} has no barrier for snapshot {key}'}
        placer = self._placer()
        sink = {} if placer is None else {'chunk_sink': placer}
        try:
            with contextlib.ExitStack() as exits:
                for name in taken:
                    exits.callback(self._exit, name, taken[name])
                written = self.warehouse.snapshot_many(
                    [(t.disk.manifest.ref, _BarrierChanges(t.barrier)) for _, _, t in items],
                    targets=[target for _, target, _ in items],
                    # A chunk compacted needs its parent's bytes: the node's cache has them.
                    read_object=self.cache.read_chunk, **sink) if items else []
        except Exception as exc:  # the session failed, so every item did
            written = [exc] * len(items)
        finally:
            with self._barriers_changed:
                self._uploading.subtract(list(taken))
                for done in [n for n, count in self._uploading.items() if count <= 0]:
                    del self._uploading[done]
                self._barriers_changed.notify_all()
        pending = {name: set(result.pending) for (name, _, _), result in zip(items, written)
                   if isinstance(result, warehouse_mod.WriteResult) and result.pending}
        if placer is not None:
            # Chunks placed that no stored version waits for are released at once.
            holders = placer.settle(set().union(*pending.values()))
            if pending:
                self.persister.submit(key, pending, holders)
        for (name, _target, _taken), result in zip(items, written):
            if isinstance(result, warehouse_mod.WriteResult):
                results[name] = {'version': str(result.manifest.ref),
                                 'uploaded_bytes': result.new_bytes, 'replicated': True,
                                 'persistent': name not in pending}
                LOG.info('snapshot %s of %s stored as %s: %d bytes new%s', key, name,
                         results[name]['version'], result.new_bytes,
                         f', {len(result.pending)} chunks on peers until persisted'
                         if name in pending else '')
            else:
                results[name] = {'error': f'{type(result).__name__}: {result}'}
                LOG.error('snapshot %s of %s failed: %s', key, name, result)
        return results

    def _placer(self) -> persist_mod.ReplicaPlacer | None:
        """The chunk sink of an upload: the owners among the live nodes, with peers on
        and [mirror] replicate_snapshots; None: the warehouse alone."""
        if self.persister is None or not self.conf.mirror.replicate_snapshots:
            return None
        return persist_mod.ReplicaPlacer(self.cache, self.peers, self._peer_client)

    def wait_persistent(self, key: str, timeout: float) -> dict[str, bool]:
        return self.persister.wait(key, timeout) if self.persister is not None else {}

    @staticmethod
    def _exit(name: str, taken: _Taken) -> None:
        try:
            taken.barrier.close()
        except OSError as exc:
            # Its copies file is gone with a removed mirror; nothing is left to free.
            LOG.warning('barrier of mirror %s not closed cleanly: %s', name, exc)

    def discard(self, key: str) -> None:
        with self._barriers_changed:
            taken = self._taken.pop(key, {})
            self._ended[key] = None  # no barrier of it is taken from now on
            while len(self._ended) > ENDED_KEPT:
                self._ended.popitem(last=False)
        for name, one in taken.items():
            self._exit(name, one)

    def _discard_mirror(self, name: str | None) -> None:
        """Exit the barriers of mirror ``name`` (None: of every mirror), once no upload
        reads them; waits at most [DEFAULT] snapshot_upload_timeout.

        :raises: MirrorError if an upload still reads the mirror then.
        """
        with self._barriers_changed:
            busy = ((lambda: self._uploading[name] > 0) if name
                    else (lambda: bool(self._uploading)))
            if busy():
                LOG.info('waiting for the snapshot upload of %s to end', name or 'every mirror')
            if not self._barriers_changed.wait_for(lambda: not busy(),
                                                   self.conf.snapshot_upload_timeout):
                raise exception.MirrorError(
                    f'mirror {name or ", ".join(self._uploading)} is still being uploaded '
                    f'after {self.conf.snapshot_upload_timeout} s')
            dropped = []
            for key, taken in self._taken.items():
                for one in [n for n in taken if name is None or n == name]:
                    dropped.append((one, taken.pop(one)))
        for one, taken in dropped:
            self._exit(one, taken)

    def remove(self, name: str) -> None:
        """As Mirrors.remove; an upload reading the mirror is waited for first.

        :raises: MirrorNotFound; MirrorError if the upload does not end in
            [DEFAULT] snapshot_upload_timeout.
        """
        mirror = self._take(name)  # first: no new barrier is taken on it from now on
        try:
            self._discard_mirror(name)
        except exception.MirrorError:
            with self._lock:  # still served, and still the upload's
                self._mirrors[name] = mirror
            raise
        self._delete(mirror)

    def close(self) -> None:
        """Stop serving, after the uploads in progress; every mirror keeps its state.

        :raises: as MirrorManager.close; MirrorError if an upload does not end in time
            (the mirrors are closed all the same).
        """
        try:
            self._discard_mirror(None)
        finally:
            super().close()


# -- the client of the node's mirror service --------------------------------------

def encode(message: dict) -> bytes:
    """One protocol line."""
    return json.dumps(message, separators=(',', ':')).encode() + b'\n'


def _carried(error: dict) -> exception.VmcloudError:
    """The service's VmcloudError rebuilt here, as vmcloud.rpc rebuilds one from the bus."""
    return rpc.local_error(rpc.CarriedError.__name__, json.dumps(error))


def error_message(exc: exception.VmcloudError) -> dict:
    """``exc`` as the protocol carries it."""
    return {'error': {'class': type(exc).__name__, 'message': str(exc),
                      'fields': rpc.error_fields(exc)}}


class RemoteMirrors(Mirrors):
    """The node's mirrors in its mirror service, one connection per call. Thread safe."""

    def __init__(self, conf: cfg.ConfigOpts, timeout: float | None = None,
                 upload_timeout: float | None = None):
        """``timeout``: seconds each call may take (default [DEFAULT] rpc_call_timeout);
        ``upload_timeout``: the same for ``upload`` (default [DEFAULT]
        snapshot_upload_timeout). Connects to nothing yet."""
        self.path = conf.mirror.control_socket
        self.timeout = float(timeout or conf.rpc_call_timeout)
        self.upload_timeout = float(upload_timeout or conf.snapshot_upload_timeout)

    def wait(self, timeout: float) -> dict:
        """Wait up to ``timeout`` seconds for the service to answer, logging each retry.

        :returns: its ping answer, ``{'pid': int, 'mirrors': int}``.
        :raises: MirrorServiceUnavailable naming the socket and the last reason.
        """
        deadline = time.monotonic() + timeout
        pause = 0.2
        while True:
            left = deadline - time.monotonic()
            try:
                return self.call('ping', timeout=max(0.1, min(left, self.timeout)))
            except exception.MirrorServiceUnavailable as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                LOG.warning('%s; retrying for %.0f s more', exc, left)
                time.sleep(min(pause, left))
                pause = min(pause * 2, 5.0)

    def call(self, method: str, timeout: float | None = None, **args: Any) -> Any:
        """One request to the service.

        :raises: the VmcloudError the service raised (same class and fields);
            MirrorServiceUnavailable if it cannot be reached, closes the connection
            before answering, or does not answer within ``timeout`` (default
            ``self.timeout``) seconds.
        """
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
            try:
                sock.settimeout(timeout)
                sock.connect(self.path)
                sock.sendall(encode({'method': method, 'args': args}))
                answer = self._read_line(sock, deadline)
            except TimeoutError as exc:
                raise exception.MirrorServiceUnavailable(
                    self.path, f'no answer to {method} within {timeout:g} s') from exc
            except OSError as exc:
                raise exception.MirrorServiceUnavailable(
                    self.path, f'{method}: {exc.strerror or exc}') from exc
        if not answer.endswith(b'\n'):
            raise exception.MirrorServiceUnavailable(
                self.path, f'the connection ended before the answer to {method}')
        try:
            message = json.loads(answer)
            if 'error' in message:
                raise _carried(message['error'])
            return message['result']
        except (ValueError, TypeError, KeyError) as exc:
            raise exception.MirrorError(
                f'mirror service at {self.path} answered {method} with a malformed '
                f'message: {answer[:200]!r}') from exc

    @staticmethod
    def _read_line(sock: socket.socket, deadline: float) -> bytes:
        """Bytes up to and with the first newline, or what came before the connection ended.

        :raises: TimeoutError past ``deadline``; OSError.
        """
        data = bytearray()
        while not data.endswith(b'\n'):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError()
            sock.settimeout(left)
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
            if len(data) > MAX_ANSWER_BYTES:
                raise OSError(f'answer over {MAX_ANSWER_BYTES} bytes')
        return bytes(data)

    def create(self, name: str, image: str) -> MirrorInfo:
        return MirrorInfo(**self.call('create', name=name, image=image))

    def names(self) -> list[str]:
        return self.call('names')

    def remove(self, name: str) -> None:
        self.call('remove', name=name)

    def set_phase(self, name: str, phase: str) -> None:
        self.call('set_phase', name=name, phase=phase)

    def needed_bytes(self, name: str) -> int:
        return self.call('needed_bytes', name=name)

    def fetched_bytes(self) -> int:
        return self.call('fetched_bytes')

    def cached_bytes(self) -> int:
        return self.call('cached_bytes')

    def sync(self, name: str) -> None:
        self.call('sync', name=name)

    def barrier(self, key: str, names: list[str]) -> dict[str, dict]:
        return self.call('barrier', key=key, names=list(names))

    def upload(self, key: str, targets: dict[str, str]) -> dict[str, dict]:
        return self.call('upload', timeout=self.upload_timeout, key=key, targets=dict(targets))

    def discard(self, key: str) -> None:
        self.call('discard', key=key)

    def wait_persistent(self, key: str, timeout: float) -> dict[str, bool]:
        # The service's wait, and the call's own time on top.
        return self.call('wait_persistent', timeout=timeout + self.timeout, key=key,
                         seconds=timeout)

    def peer_url(self) -> str:
        return self.call('peer_url')

    def set_peers(self, me: str, peers: dict[str, str]) -> None:
        self.call('set_peers', me=me, peers=peers)

    def peer_stats(self) -> dict:
        return self.call('peer_stats')

    def close(self) -> None:
        """Nothing to give up: each call has its own connection, and the mirrors stay served."""
