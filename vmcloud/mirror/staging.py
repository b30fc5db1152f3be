"""Pre-staging: an image's chunks pushed to their owner nodes before a large deployment.

The chunks a deployment will read first are its image's boot profile (recorded by an
earlier deployment, ``vmcloud.mirror.profile``), in phase order; without a usable
profile, every stored chunk of the version. Each chunk goes to each of its owners in
the peer set (``vmcloud.mirror.ownership``), the primary first: staged on the primary,
it reaches the secondaries from the primary (their exchange asks it first), so the
warehouse serves each chunk once. Staging asks each owner's peer chunk server
(``POST /v1/chunks/{id}/stage``) to hold the chunk, fetched its normal way; the bytes
never pass through the caller.

The owners are computed as the nodes compute them, with the number of owners a chunk
has (``[mirror] peer_replicas``) the nodes use, which each tells in its /v1/stats
(``replicas``; peer_replicas() asks them), not the caller's own configuration, which may
well differ (a CLI on an operator's machine, with the default).
"""
import dataclasses
import logging
import threading
import time
from typing import Callable, Mapping, Protocol, Sequence

from vmcloud import exception
from vmcloud.mirror import ownership
from vmcloud.mirror import profile as profile_mod
from vmcloud.storage import manifest as manifest_mod
from vmcloud.storage import warehouse as warehouse_mod

LOG = logging.getLogger(__name__)

BOOT_PROFILE = 'boot profile'
STORED_CHUNKS = 'stored chunks'
# Attempts of one owner for one chunk: a second one outlasts a peer's brief refusal
# (busy, a connection it had just closed); a dead peer costs only two timeouts.
ATTEMPTS = 2

# progress(chunks done, chunks in all, bytes of the chunks done)
Progress = Callable[[int, int, int], None]


class Stager(Protocol):
    """What staging asks of the peers (vmcloud.mirror.peer_http.PeerClient)."""

    def stage(self, url: str, chunk_id: str) -> None:
        """Have the peer chunk server at ``url`` hold ``chunk_id``.

        :raises: VmcloudError (PeerError, or the peer's StorageError).
        """

    def stats(self, url: str) -> dict:
        """The /v1/stats document of the peer chunk server at ``url``; its ``replicas``
        is the node's ``[mirror] peer_replicas``.

        :raises: VmcloudError (PeerError).
        """


class NoPeers(exception.MirrorError):
    """No compute node takes part in the peer exchange now: nothing to stage to."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f'no peer to stage to: {reason}')


class StagingFailed(exception.MirrorError):
    """No owner of a chunk took it, each tried ``ATTEMPTS`` times. ``failures``: {host:
    (its peer URL, why its last attempt failed)}."""

    def __init__(self, chunk_id: str, failures: dict[str, tuple[str, str]]):
        self.chunk_id = chunk_id
        self.failures = failures
        tried = '; '.join(f'{host} at {url}: {why}' for host, (url, why) in failures.items())
        super().__init__(f'chunk {chunk_id} could not be staged on any of its owners '
                         f'({ATTEMPTS} attempts each): {tried}')


class ReplicasUnknown(exception.MirrorError):
    """The peers tell no one number of owners a chunk has: none told one, or two told
    different ones. ``told``: {host: the replicas it told}; ``failures``: {host: why it
    told none}."""

    def __init__(self, told: dict[str, int], failures: dict[str, str]):
        self.told = told
        self.failures = failures
        if told:
            problem = ('the peers disagree on the owners of a chunk ([mirror] peer_replicas): '
                       + ', '.join(f'{host} has {count}' for host, count in sorted(told.items()))
                       + '; give the nodes one value')
        else:
            problem = 'no peer told its [mirror] peer_replicas'
        if failures:
            problem += ' (' + '; '.join(f'{host}: {why}'
                                        for host, why in sorted(failures.items())) + ')'
        super().__init__(f'cannot stage: {problem}')


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to stage of a version: the ids of its stored objects (plain chunks, and the
    deltas and bases of chains) in the order to stage them, the bytes of each (of a
    delta, the length of the chunk it yields: an upper bound, its stored size is not in
    the manifest), and where the list came from (BOOT_PROFILE or STORED_CHUNKS)."""
    ref: str
    chunk_ids: list[str]
    sizes: dict[str, int]
    source: str

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes[chunk_id] for chunk_id in self.chunk_ids)


@dataclasses.dataclass(frozen=True)
class StageResult:
    chunks: int  # chunks staged, each on at least one owner
    bytes: int  # their bytes (once each, however many owners took it)
    peers: int  # nodes in the peer set
    copies: int  # (chunk, owner) pairs that took
    # chunk id -> the owners that did not take it while another did: a copy short.
    short: dict[str, list[str]]
    # host -> why it was given up (it failed every attempt at a chunk).
    failed_peers: dict[str, str]
    seconds: float


def plan(warehouse: warehouse_mod.Warehouse, ref: str | manifest_mod.VersionRef) -> Plan:
    """The objects of version ``ref`` (IMAGE[:VERSION]) to stage: those of the chunks of
    its image's boot profile in phase order if it has one that fits the version and
    names a stored chunk, else those of every stored (non-hole) chunk in disk order;
    each object once, a chain's newest delta first.

    :raises: ImageNotFound, StorageError.
    """
    manifest = warehouse.lookup(str(ref))
    sizes: dict[str, int] = {}
    for index in range(manifest.chunk_count):
        for object_id in manifest.object_ids(index):
            # The last chunk may be short; an equal chunk elsewhere is a whole one.
            sizes[object_id] = max(sizes.get(object_id, 0), manifest.chunk_length(index))
    recorded = profile_mod.ProfileStore(warehouse).load(manifest)
    if recorded:
        indexes = [i for phase in profile_mod.PHASES for i in recorded.get(phase, [])]
        object_ids = _objects_of(manifest, indexes)
        if object_ids:
            return Plan(str(manifest.ref), object_ids, sizes, BOOT_PROFILE)
        LOG.info('the boot profile of %s names only holes: staging every stored chunk',
                 manifest.ref)
    return Plan(str(manifest.ref), _objects_of(manifest, range(manifest.chunk_count)), sizes,
                STORED_CHUNKS)


def chunks_to_stage(warehouse: warehouse_mod.Warehouse,
                    ref: str | manifest_mod.VersionRef) -> list[str]:
    """``plan(warehouse, ref).chunk_ids``. :raises: as plan."""
    return plan(warehouse, ref).chunk_ids


def _objects_of(manifest: manifest_mod.Manifest, indexes) -> list[str]:
    """The stored objects chunks ``indexes`` of ``manifest`` need, in first-seen order,
    each once."""
    return list(dict.fromkeys(object_id for index in indexes
                              for object_id in manifest.object_ids(index)))


def peer_replicas(peers: Mapping[str, str], client: Stager) -> int:
    """The number of owners a chunk has that the nodes of ``peers`` ({host: peer URL})
    use, as each tells in its /v1/stats: staging must compute the owners they compute.
    A peer that tells none (down, or not answering) is left out: the others decide, and
    staging then gives that peer up as it gives up any peer that fails.

    :raises: NoPeers if ``peers`` is empty; ReplicasUnknown if no peer told a number, or
        two told different ones.
    """
    if not peers:
        raise NoPeers('no compute host is up with a peer URL')
    told: dict[str, int] = {}
    failures: dict[str, str] = {}
    for host in sorted(peers):
        try:
            replicas = client.stats(peers[host]).get('replicas')
        except exception.VmcloudError as exc:
            failures[host] = str(exc)
            continue
        try:
            ownership.check_replicas(replicas)
        except exception.MirrorError:
            failures[host] = f'its stats at {peers[host]} have no replicas count: {replicas!r}'
            continue
        told[host] = replicas
    if len(set(told.values())) != 1:
        raise ReplicasUnknown(told, failures)
    for host, why in failures.items():
        LOG.info('staging: %s told no replicas count, the other peers decide: %s', host, why)
    return next(iter(told.values()))


def stage(chunk_ids: Sequence[str], peers: Mapping[str, str], replicas: int,
          client: Stager, progress: Progress | None = None, threads: int = 8,
          sizes: Mapping[str, int] | None = None) -> StageResult:
    """Stage each chunk on each of its ``replicas`` owners among ``peers`` ({host: peer
    URL}), the primary first, ``threads`` chunks at a time, in the order given (the
    first ones start first). ``replicas`` must be the nodes' own (peer_replicas tells
    it), or the chunks go to nodes that do not own them.

    An owner that fails is tried once more; one that fails that too is given up for
    the rest of the run (a dead peer would cost two timeouts per chunk it owns), and
    every chunk it owns is one copy short. A chunk some owner took is staged.

    ``progress(done, total, bytes)`` is called after each chunk, one call at a time;
    ``sizes`` gives the bytes of each chunk (missing: 0).

    :raises: NoPeers if ``peers`` is empty; StagingFailed for the first chunk that no
        owner took (the chunks already started end first; no new one starts);
        MirrorError if ``replicas`` or ``threads`` is below 1; what ``client`` or
        ``progress`` raised other than a VmcloudError (a bug), once the others ended.
    """
    if not peers:
        raise NoPeers('no compute host is up with a peer URL')
    ownership.check_replicas(replicas)
    if threads < 1:
        raise exception.MirrorError(f'staging needs at least one thread, not {threads}')
    run = _Run(list(chunk_ids), dict(peers), replicas, client, progress, sizes or {})
    workers = [threading.Thread(target=run.work, daemon=True, name=f'vmcloud-stage-{i}')
               for i in range(min(threads, len(run.chunk_ids)))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if run.failure is not None:
        raise run.failure
    return StageResult(chunks=run.done, bytes=run.bytes, peers=len(run.peers),
                       copies=run.copies, short=dict(run.short),
                       failed_peers=dict(run.given_up),
                       seconds=time.monotonic() - run.started)


class _Run:
    """One stage() call: the chunks its threads take in turn, and what they did."""

    def __init__(self, chunk_ids: list[str], peers: dict[str, str], replicas: int,
                 client: Stager, progress: Progress | None, sizes: Mapping[str, int]):
        self.chunk_ids = chunk_ids
        self.peers = peers
        self.nodes = sorted(peers)
        self.replicas = replicas
        self.client = client
        self.progress = progress
        self.sizes = sizes
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._next = 0
        self.done = self.bytes = self.copies = 0
        self.short: dict[str, list[str]] = {}
        self.given_up: dict[str, str] = {}
        self.failure: BaseException | None = None

    def _take(self) -> str | None:
        with self._lock:
            if self.failure is not None or self._next >= len(self.chunk_ids):
                return None
            chunk_id = self.chunk_ids[self._next]
            self._next += 1
            return chunk_id

    def work(self) -> None:
        while (chunk_id := self._take()) is not None:
            try:
                self._stage(chunk_id)
            except BaseException as exc:  # raised by stage() in its caller's thread
                with self._lock:
                    if self.failure is None:
                        self.failure = exc

    def _stage(self, chunk_id: str) -> None:
        took, failures = [], {}
        # In order: a secondary owner's stage asks the primary, which holds it by then.
        for host in ownership.owners(chunk_id, self.nodes, self.replicas):
            why = self._stage_on(host, chunk_id)
            if why is None:
                took.append(host)
            else:
                failures[host] = (self.peers[host], why)
        # The progress callback under the lock too: it is called one call at a time.
        with self._lock:
            if not took:
                raise StagingFailed(chunk_id, failures)
            if failures:
                self.short[chunk_id] = list(failures)
            self.done += 1
            self.bytes += self.sizes.get(chunk_id, 0)
            self.copies += len(took)
            if self.progress is not None:
                self.progress(self.done, len(self.chunk_ids), self.bytes)

    def _stage_on(self, host: str, chunk_id: str) -> str | None:
        """:returns: None once ``host`` took the chunk, else why it did not."""
        with self._lock:
            if host in self.given_up:
                return f'given up: {self.given_up[host]}'
        why = ''
        for attempt in range(1, ATTEMPTS + 1):
            try:
                self.client.stage(self.peers[host], chunk_id)
                return None
            except exception.VmcloudError as exc:
                why = str(exc)
                # Debug only: the run's result names every peer given up, once.
                LOG.debug('staging chunk %s on %s (attempt %d of %d) failed: %s',
                          chunk_id, host, attempt, ATTEMPTS, exc)
        with self._lock:
            self.given_up.setdefault(host, why)
        LOG.info('staging: giving %s at %s up for the rest of the run: %s', host,
                 self.peers[host], why)
        return why
