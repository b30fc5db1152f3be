"""Snapshots land on peer nodes first and reach the repository in the background.

With the peer exchange on, a compute node's snapshot upload (``LocalMirrors.upload``)
gives the warehouse a ``ReplicaPlacer`` as its chunk sink: every new chunk (one the
repository lacks) is put on each of its owners among the live nodes, as an
*unpersisted replica* (durable on the owner's disk before it answers, never evicted),
and in the uploader's own cache too. The manifests are stored at once: the snapshot is
deployable (``replicated``), its chunks served by their owners. A chunk some owner
refuses (its replica budget is full, it is down) goes to the repository in the same
upload instead.

The uploader's ``Persister`` then writes the chunks to the repository in one write
session, from its own copies, tells the owners (``persisted``: their replicas become
ordinary cache entries) and answers ``wait`` for the snapshot: its items are
``persistent``.

If the uploader dies first, the others do it: every node's persister sweeps its
unpersisted replicas every ``[mirror] persist_check_interval`` seconds. A replica it has
seen for that long is asked about: one the repository holds becomes an ordinary entry;
a missing one is left to its uploader while the uploader is alive (it retries until it
has written it), and is otherwise written by its primary owner, or by any holder once a
sweep before found it missing too (the primary may lack it, being new since the upload).
Two writers of one chunk cost a duplicate until gc, never correctness.
"""
import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Callable, Iterable, Protocol

from vmcloud import exception
from vmcloud.storage import warehouse as warehouse_mod

LOG = logging.getLogger(__name__)

PLACE_THREADS = 8
"""Puts to peers under way at once during one upload."""
ENDED_KEPT = 256
"""Uploads whose persistence ended, remembered for ``wait`` up to this many."""


class ReplicaCache(Protocol):
    """What the persister needs of the node's chunk cache (``cache.ChunkCache``)."""

    def put(self, chunk_id: str, data: bytes, replica: bool = True,
            origin: str = '') -> None:
        """Keep the chunk, durably, as an unpersisted replica (never evicted).

        :raises: ReplicaBudgetFull; OSError.
        """

    def mark_persisted(self, chunk_ids: Iterable[str]) -> None:
        """These replicas are in the repository: ordinary entries from now on."""

    def unpersisted(self) -> dict[str, str]:
        """{chunk id: the node that put it ('' if unknown)} of every unpersisted replica."""

    def read_chunk(self, chunk_id: str) -> bytes:
        """:raises: FetchFailed."""


class ReplicaPeers(Protocol):
    """How replicas are put on peers (``peer_http.PeerClient``)."""

    def put(self, url: str, chunk_id: str, data: bytes, origin: str = '') -> None:
        """:raises: PeerError (refused: its budget is full; or it failed)."""

    def persisted(self, url: str, chunk_ids: list[str]) -> None:
        """:raises: PeerError."""


class LiveNodes(Protocol):
    """The live node view (``peers.PeerExchange``)."""

    me: str

    def peers(self) -> dict[str, str]:
        """{host: peer URL} of the live nodes."""

    def owners(self, chunk_id: str) -> list[str]:
        """The chunk's owners among the live nodes, the primary first."""


def _live(nodes: LiveNodes) -> tuple[str, dict[str, str]]:
    """(me, {host: url} of the live nodes other than me)."""
    me = nodes.me
    return me, {host: url for host, url in nodes.peers().items() if host != me}


def release(nodes: LiveNodes, client: ReplicaPeers, cache: ReplicaCache,
            holders: dict[str, set[str]]) -> None:
    """Tell each holder (``{host: chunk ids}``, this node included) that its replicas of
    those chunks are in the repository. A peer that cannot be told is a warning: its
    sweep finds them in the repository."""
    me, urls = _live(nodes)
    for host, chunk_ids in sorted(holders.items()):
        if not chunk_ids:
            continue
        if host == me:
            cache.mark_persisted(chunk_ids)
        elif host in urls:
            try:
                client.persisted(urls[host], sorted(chunk_ids))
            except exception.VmcloudError as exc:
                LOG.warning('cannot tell peer %s that %d chunks are persistent: %s', host,
                            len(chunk_ids), exc)


class ReplicaPlacer:
    """The chunk sink of one upload (warehouse.ChunkSink): puts each chunk on every owner
    and keeps the uploader's own copy. Not thread safe: one upload's thread uses it."""

    def __init__(self, cache: ReplicaCache, nodes: LiveNodes, client: ReplicaPeers,
                 threads: int = PLACE_THREADS):
        self.cache = cache
        self.nodes = nodes
        self.client = client
        self.threads = threads
        self.me, self.urls = _live(nodes)
        self.holders: dict[str, set[str]] = collections.defaultdict(set)
        """{chunk id: the hosts that keep it as an unpersisted replica}, me included."""
        # A node that failed once gets no more chunks of this upload: each would wait
        # for its timeout (or its full budget) again.
        self._failed: set[str] = set()

    def take(self, chunks: dict[str, bytes]) -> set[str]:
        """Every chunk that each of its owners and this node now keep; see ChunkSink."""
        if not self.me or not self.urls or not chunks:
            return set()  # no peer: a copy on this node alone is no replica
        wanted = {chunk_id: [node for node in self.nodes.owners(chunk_id)
                             if node != self.me] for chunk_id in chunks}
        jobs = [(chunk_id, node) for chunk_id, owners in wanted.items()
                for node in [self.me, *owners]]
        with concurrent.futures.ThreadPoolExecutor(
                max_workers=min(self.threads, len(jobs)),
                thread_name_prefix='place-replica') as pool:
            placed = dict(zip(jobs, pool.map(lambda job: self._put(job, chunks[job[0]]),
                                             jobs)))
        taken = set()
        for chunk_id, owners in wanted.items():
            for node in [self.me, *owners]:
                if placed[chunk_id, node]:
                    self.holders[chunk_id].add(node)
            if all(placed[chunk_id, node] for node in [self.me, *owners]):
                taken.add(chunk_id)
        return taken

    def _put(self, job: tuple[str, str], data: bytes) -> bool:
        chunk_id, node = job
        if node in self._failed or (node != self.me and node not in self.urls):
            return False
        try:
            if node == self.me:
                self.cache.put(chunk_id, data, replica=True, origin=self.me)
            else:
                self.client.put(self.urls[node], chunk_id, data, origin=self.me)
            return True
        except (exception.VmcloudError, OSError) as exc:
            # set.add is atomic: the placing threads share the set without a lock.
            if node not in self._failed:
                self._failed.add(node)
                LOG.warning('snapshot replicas: %s takes no more chunks of this upload '
                            '(chunk %s: %s); they go to the repository', node, chunk_id, exc)
            return False

    def settle(self, pending: set[str]) -> dict[str, set[str]]:
        """The upload ended, its manifests naming ``pending`` (the chunks that are not
        in the repository yet): every other chunk placed is released at once (it went
        to the repository, or no version names it). :returns: {chunk id: holders} of
        ``pending``."""
        released: dict[str, set[str]] = collections.defaultdict(set)
        for chunk_id, hosts in self.holders.items():
            if chunk_id not in pending:
                for host in hosts:
                    released[host].add(chunk_id)
        release(self.nodes, self.client, self.cache, released)
        return {chunk_id: set(self.holders[chunk_id]) for chunk_id in pending}


@dataclasses.dataclass
class _Job:
    key: str
    items: dict[str, set[str]]  # name: the chunks of its version not yet persistent
    holders: dict[str, set[str]]  # chunk id: the hosts holding it
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    persisted: set[str] = dataclasses.field(default_factory=set)  # names


class Persister:
    """Writes snapshots' replicated chunks to the repository; sweeps the node's replicas.
    Thread safe."""

    def __init__(self, warehouse: warehouse_mod.Warehouse, cache: ReplicaCache,
                 nodes: LiveNodes, client: ReplicaPeers, check_interval: float,
                 clock: Callable[[], float] = time.monotonic):
        """``check_interval``: seconds between sweeps, and how long a replica is left
        to its uploader; ``clock``: seconds, for the sweeps' ages (tests give their own).
        """
        self.warehouse = warehouse
        self.cache = cache
        self.nodes = nodes
        self.client = client
        self.check_interval = check_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._jobs: collections.OrderedDict[str, _Job] = collections.OrderedDict()
        self._threads: set[threading.Thread] = set()
        # chunk id: [when a sweep first saw it unpersisted, sweeps that found it missing]
        self._seen: dict[str, list] = {}
        self._sweeper: threading.Thread | None = None

    # -- the uploader's side ---------------------------------------------------------

    def submit(self, key: str, items: dict[str, set[str]],
               holders: dict[str, set[str]]) -> None:
        """Persist in the background what the upload ``key`` left on peers: ``items``
        maps each mirror name to the chunks of its version not in the repository,
        ``holders`` each of those chunks to the hosts that keep it."""
        job = _Job(key, {name: set(ids) for name, ids in items.items()},
                   {chunk_id: set(hosts) for chunk_id, hosts in holders.items()})
        thread = threading.Thread(target=self._run, args=(job,), daemon=True,
                                  name=f'persist-{key[:8]}')
        with self._lock:
            self._jobs[key] = job
            self._jobs.move_to_end(key)
            while len(self._jobs) > ENDED_KEPT and next(iter(self._jobs.values())).done.is_set():
                self._jobs.popitem(last=False)
            self._threads.add(thread)
        thread.start()

    def wait(self, key: str, timeout: float) -> dict[str, bool]:
        """{name: persistent} of upload ``key`` once its persistence ended, or as it is
        after ``timeout`` seconds; {} for a key this node persists nothing of (it
        uploaded everything to the repository, or it restarted since)."""
        with self._lock:
            job = self._jobs.get(key)
        if job is None:
            return {}
        job.done.wait(timeout)
        with self._lock:
            return {name: name in job.persisted for name in job.items}

    def _run(self, job: _Job) -> None:
        try:
            chunk_ids = sorted(set().union(*job.items.values()))
            while not self._stopping.is_set():
                try:
                    stored = self.warehouse.store_chunks(chunk_ids, self.cache.read_chunk)
                    break
                except exception.VmcloudError as exc:
                    LOG.warning('snapshot %s: cannot write %d chunks to the repository yet: '
                                '%s; trying again in %g s', job.key, len(chunk_ids), exc,
                                self.check_interval)
                    self._stopping.wait(self.check_interval)
            else:
                return  # stopping: the sweeps of this node (restarted) and the owners do it
            for chunk_id, reason in sorted(stored.unreadable.items()):
                LOG.error('snapshot %s: chunk %s not written to the repository: %s; its '
                          'owners keep it and their sweeps write it', job.key, chunk_id,
                          reason)
            by_host: dict[str, set[str]] = collections.defaultdict(set)
            for chunk_id in stored.present:
                for host in job.holders.get(chunk_id, ()):
                    by_host[host].add(chunk_id)
            release(self.nodes, self.client, self.cache, by_host)
            with self._lock:
                job.persisted = {name for name, ids in job.items.items()
                                 if ids <= stored.present}
            LOG.info('snapshot %s: %d chunks (%d bytes new) written to the repository; '
                     'persistent: %s', job.key, len(stored.present), stored.new_bytes,
                     ', '.join(sorted(job.persisted)) or 'none')
        except Exception:  # noqa: B902 - a bug must still end the job for wait()
            LOG.exception('snapshot %s: persisting failed', job.key)
        finally:
            job.done.set()
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _persisting(self) -> set[str]:
        """The chunks this node's own jobs are writing now; with the lock."""
        return {chunk_id for job in self._jobs.values() if not job.done.is_set()
                for ids in job.items.values() for chunk_id in ids}

    # -- every node's sweep ----------------------------------------------------------

    def sweep(self) -> None:
        """One look at the node's unpersisted replicas (see the module's docstring).

        A repository that cannot be asked or written to is a warning: the next sweep
        tries again.
        """
        now = self._clock()
        held = self.cache.unpersisted()
        with self._lock:
            busy = self._persisting()
            held = {c: origin for c, origin in held.items() if c not in busy}
            for chunk_id in [c for c in self._seen if c not in held]:
                del self._seen[chunk_id]
            for chunk_id in held:
                self._seen.setdefault(chunk_id, [now, 0])
            old = sorted(c for c in held if now - self._seen[c][0] >= self.check_interval)
        if not old:
            return
        try:
            missing = self.warehouse.missing(old)
        except exception.VmcloudError as exc:
            LOG.warning('replica sweep: cannot ask the repository about %d chunks: %s',
                        len(old), exc)
            return
        present = [c for c in old if c not in missing]
        if present:
            self.cache.mark_persisted(present)
        me, urls = _live(self.nodes)
        live = set(urls) | {me}
        mine = []
        with self._lock:
            for chunk_id in sorted(missing):
                seen = self._seen[chunk_id]
                origin = held[chunk_id]
                if origin and origin != me and origin in live:
                    continue  # its uploader is alive: it writes the chunk
                if self.nodes.owners(chunk_id)[:1] == [me] or seen[1] >= 1:
                    mine.append(chunk_id)
                seen[1] += 1
        if not mine:
            return
        LOG.info('replica sweep: writing %d chunks to the repository that no uploader '
                 'wrote', len(mine))
        try:
            stored = self.warehouse.store_chunks(mine, self.cache.read_chunk)
        except exception.VmcloudError as exc:
            LOG.warning('replica sweep: cannot write %d chunks to the repository: %s',
                        len(mine), exc)
            return
        for chunk_id, reason in sorted(stored.unreadable.items()):
            LOG.error('replica sweep: chunk %s not written to the repository: %s', chunk_id,
                      reason)
        by_host: dict[str, set[str]] = collections.defaultdict(set)
        for chunk_id in stored.present:
            for host in set(self.nodes.owners(chunk_id)) | {me}:
                by_host[host].add(chunk_id)
        release(self.nodes, self.client, self.cache, by_host)

    def start(self) -> 'Persister':
        """Sweep every check_interval seconds until stop()."""
        self._sweeper = threading.Thread(target=self._sweep_loop, daemon=True,
                                         name='replica-sweep')
        self._sweeper.start()
        return self

    def _sweep_loop(self) -> None:
        while not self._stopping.wait(self.check_interval):
            try:
                self.sweep()
            except Exception:  # noqa: B902 - the next sweep must still come
                LOG.exception('replica sweep failed')

    def stop(self, timeout: float = 5.0) -> None:
        """Stop sweeping and give up the jobs that wait to try again; wait up to
        ``timeout`` s for those writing now. Idempotent."""
        self._stopping.set()
        with self._lock:
            threads = list(self._threads)
        deadline = time.monotonic() + timeout
        for thread in [t for t in [self._sweeper, *threads] if t is not None]:
            thread.join(max(0.0, deadline - time.monotonic()))
