"""The peer exchange: a node's cache misses are served by the chunk's owners first.

Every chunk has ``replicas`` owners among the live compute nodes (``ownership``);
the first is its primary. A node that misses a chunk asks each owner in turn (the
primary first, itself and peers being skipped aside), then the warehouse. An owner
asked for a chunk it lacks fetches it from the warehouse through its own cache,
where concurrent misses share one fetch: while the primary is alive, a chunk costs
the warehouse one read however many nodes miss it at once. The primary itself, and
a node that knows no peer, go to the warehouse directly (a primary the warehouse
answers ChunkNotFound asks the other owners then: see below).

Every byte a peer sends is checked against the chunk id. A peer that fails (refused,
silent for ``[mirror] peer_timeout``, an HTTP error, corrupt bytes) is skipped, by
every read, for ``skip_time`` seconds: one slow peer costs one read that long, not
every read. A peer's error that speaks for the warehouse (a StorageError: its own
read of the repository failed) is no fault of the peer: see ``fetch`` for where the
read goes then. ChunkNotFound sends it to the next owner: a snapshot's new chunk is on
its owners only until it is persisted (``vmcloud.mirror.persist``), and an owner that
joined since lacks it.

The live view (``update``) comes from the dispatcher: the hosts that are up and serve
peers, with their URLs. Nodes whose views differ for a moment (a heartbeat apart), or
owners that lack a chunk, may ask each other for one chunk at once. A peer server
never makes such a request wait for a fetch of its node that is asking peers itself
(``asking_peers``): it answers busy and the asker goes on, so two nodes never wait
for each other.
"""
import collections
import logging
import threading
import time
from typing import Callable, Protocol

from vmcloud import exception
from vmcloud.mirror import ownership
from vmcloud.storage import manifest as manifest_mod

LOG = logging.getLogger(__name__)

# The counters of stats(), all from zero when the exchange starts.
COUNTERS = ('repository_chunks', 'repository_bytes', 'peer_chunks', 'peer_bytes',
            'peer_failures', 'peer_busy', 'corrupt_from_peers')


class ChunkPeers(Protocol):
    """How chunks are asked of a peer (``vmcloud.mirror.peer_http.PeerClient``)."""

    def get(self, url: str, chunk_id: str) -> bytes:
        """The chunk as the peer at ``url`` sends it, not checked against its id.

        :raises: PeerError (the peer failed; busy: its cause is a WarehouseBusy); the
            StorageError of the peer's own repository read (ChunkNotFound: the
            repository lacks the chunk).
        """


class PeerExchange:
    """Where a node's chunk cache fetches its misses from. Thread safe."""

    def __init__(self, repository: Callable[[str], bytes], client: ChunkPeers,
                 replicas: int, skip_time: float,
                 clock: Callable[[], float] = time.monotonic):
        """``repository(chunk_id) -> bytes``: the warehouse's read_chunk, which checks
        what it reads. ``clock``: seconds, for the skips (tests set their own, also
        later through the attribute).

        :raises: MirrorError if ``replicas`` is below 1 or ``skip_time`` negative.
        """
        ownership.check_replicas(replicas)
        if skip_time < 0:
            raise exception.MirrorError(f'peer skip time must be >= 0 s, not {skip_time!r}')
        self._repository = repository
        self._client = client
        self._replicas = replicas
        self._skip_time = skip_time
        self.clock = clock
        self._lock = threading.Lock()
        self._me = ''
        self._peers: dict[str, str] = {}
        self._skipped_until: dict[str, float] = {}
        self._counts = dict.fromkeys(COUNTERS, 0)
        # chunk id -> fetches of this node asking peers for it now
        self._asking: collections.Counter[str] = collections.Counter()

    # -- the live view ---------------------------------------------------------------

    def update(self, me: str, peers: dict[str, str]) -> bool:
        """The live node set: ``peers`` maps every node up (this one too) to its peer
        URL; ``me`` is this node's host name.

        :returns: whether the node set changed (and so which chunks each node owns).
        :raises: MirrorError naming what is wrong with the arguments.
        """
        if not isinstance(me, str) or not me:
            raise exception.MirrorError(f'set_peers: this node\'s host name must be a '
                                        f'non-empty string, not {me!r}')
        if not isinstance(peers, dict):
            raise exception.MirrorError(f'set_peers: the peers must be a mapping of host '
                                        f'name to peer URL, not {type(peers).__name__}')
        for host, url in peers.items():
            if not isinstance(host, str) or not host or not isinstance(url, str) or not url:
                raise exception.MirrorError(f'set_peers: peer {host!r} must be a host name '
                                            f'with a peer URL, not {url!r}')
        with self._lock:
            changed = self._nodes() != set(peers) | {me}
            if changed:
                LOG.info('peer exchange of %s: live nodes now %s', me,
                         ', '.join(sorted(set(peers) | {me})))
            self._me, self._peers = me, dict(peers)
        return changed

    def _nodes(self) -> set[str]:
        """Every live node, this one included; with the lock."""
        return (set(self._peers) | {self._me}) if self._me else set()

    def peers(self) -> dict[str, str]:
        """The live nodes and their peer URLs, as last updated."""
        with self._lock:
            return dict(self._peers)

    @property
    def me(self) -> str:
        """This node's host name ('' until the first update)."""
        with self._lock:
            return self._me

    @property
    def replicas(self) -> int:
        return self._replicas

    def owners(self, chunk_id: str) -> list[str]:
        """The chunk's owners among the live nodes, the primary first."""
        with self._lock:
            nodes = self._nodes()
        return ownership.owners(chunk_id, nodes, self._replicas)

    def owns(self, chunk_id: str) -> bool:
        """Whether this node is one of the chunk's owners (a node alone, or that knows
        no view yet, owns every chunk)."""
        with self._lock:
            me, nodes = self._me, self._nodes()
        return len(nodes) <= 1 or me in ownership.owners(chunk_id, nodes, self._replicas)

    # -- fetching --------------------------------------------------------------------

    def asking_peers(self, chunk_id: str) -> bool:
        """Whether a fetch of this node is asking peers for the chunk now (a peer's
        request for it must not wait for that fetch: it may be waiting for that peer)."""
        with self._lock:
            return self._asking[chunk_id] > 0

    def fetch(self, chunk_id: str) -> bytes:
        """The chunk from its owners, else the warehouse; checked against its id.

        An owner that failed (see the module's docstring) is skipped for the skip time
        and the next one asked; a busy one is passed over this time only; one that lacks
        the chunk as the repository does (ChunkNotFound) too. An owner whose own read
        of the repository failed (any other StorageError, HTTP 502) is not skipped nor
        counted as failed, and the read goes to the repository at once, without asking
        the other owners: they lack the chunk too as a rule (the first owner asked is
        the one the others' misses went to), and each would make one more read of a
        repository that is failing. So the repository is read once more, by this node, and its
        error (if it fails again) is this read's: the cache retries it.

        :raises: what the warehouse raises (ChunkNotFound, CorruptChunk, OSError...)
            when every owner failed or was skipped and the warehouse fails too.
        """
        with self._lock:
            me, peers, nodes = self._me, dict(self._peers), self._nodes()
        order = ownership.owners(chunk_id, nodes, self._replicas)
        if len(nodes) > 1 and order[0] == me:
            try:
                return self.fetch_from_repository(chunk_id)
            except exception.ChunkNotFound:
                # A snapshot's chunk the repository lacks yet may be on its other
                # owners (an unpersisted replica, vmcloud.mirror.persist): ask them.
                LOG.info('the repository lacks chunk %s; asking its other owners', chunk_id)
        if len(nodes) > 1:
            data = self._from_owners(chunk_id, me, peers, order)
            if data is not None:
                return data
        return self.fetch_from_repository(chunk_id)

    def _from_owners(self, chunk_id: str, me: str, peers: dict[str, str],
                     order: list[str]) -> bytes | None:
        """The chunk from the first owner that serves it; None: go to the repository."""
        with self._lock:
            self._asking[chunk_id] += 1
        try:
            for node in order:
                if node == me or node not in peers or self._skipped(node):
                    continue
                try:
                    data = self._client.get(peers[node], chunk_id)
                except exception.ChunkNotFound:
                    # The repository lacks it; the next owner may hold it as a replica.
                    LOG.info('peer %s lacks chunk %s, as the repository does', node, chunk_id)
                    continue
                except exception.StorageError as exc:
                    # The peer's own repository read failed: read it ourselves, once
                    # (see fetch()); the peer did nothing wrong.
                    LOG.info('peer %s could not read chunk %s from the repository (%s: '
                             '%s); reading it from the repository', node, chunk_id,
                             type(exc).__name__, exc)
                    return None
                except (exception.VmcloudError, OSError) as exc:
                    if isinstance(exc.__cause__, exception.WarehouseBusy):
                        # Busy is not broken: the next owner this time, this one still
                        # asked by the next read.
                        self._count(peer_busy=1)
                        continue
                    self._failed(node, chunk_id, str(exc))
                    continue
                actual = manifest_mod.chunk_id(data)
                if actual != chunk_id:
                    self._count(corrupt_from_peers=1)
                    self._failed(node, chunk_id, str(exception.CorruptChunk(chunk_id, actual)))
                    continue
                self._count(peer_chunks=1, peer_bytes=len(data))
                return data
            return None
        finally:
            with self._lock:
                self._asking[chunk_id] -= 1
                if not self._asking[chunk_id]:
                    del self._asking[chunk_id]

    def fetch_from_repository(self, chunk_id: str) -> bytes:
        """The chunk from the warehouse (what a peer asking this node gets on a miss).

        :raises: what the warehouse's read raises.
        """
        data = self._repository(chunk_id)
        self._count(repository_chunks=1, repository_bytes=len(data))
        return data

    def _skipped(self, node: str) -> bool:
        with self._lock:
            until = self._skipped_until.get(node)
            if until is None:
                return False
            if self.clock() < until:
                return True
            del self._skipped_until[node]
            return False

    def _failed(self, node: str, chunk_id: str, reason: str) -> None:
        """Skip ``node`` for skip_time; a warning when it starts to be skipped."""
        with self._lock:
            self._counts['peer_failures'] += 1
            now = self.clock()
            already = self._skipped_until.get(node, now) > now
            self._skipped_until[node] = now + self._skip_time
        if not already:
            LOG.warning('peer %s skipped for %g s: chunk %s: %s', node, self._skip_time,
                        chunk_id, reason)

    def _count(self, **increments: int) -> None:
        with self._lock:
            for name, value in increments.items():
                self._counts[name] += value

    def stats(self) -> dict[str, int]:
        """Since the exchange started: chunks and bytes from the warehouse (for this node
        and for the peers that asked it), chunks and bytes from peers, failed peer
        attempts (corrupt ones included) and corrupt answers."""
        with self._lock:
            return dict(self._counts)
