"""Lock leases and write sessions: the only state the service keeps, all in memory.

A lease stands for one of the backend's own locks (shared_lock, exclusive_lock,
image_lock), taken by the service on a client's behalf and held until the
client releases it or stops renewing it for its TTL. The service enters the
backend's lock context in a thread of its own (the backend's lock may block:
flock(), a rados lock), so a client waits by polling its pending lease, and a
client that gives up or vanishes leaves a lease that is released as soon as it
is acquired or expires. That thread holds the lock for the lease's whole life:
it begins the lease's write sessions (a backend ties a session to the locks of
the thread that begins it, and stops it with LeaseLost once one of them is lost:
a rados lock that expired while the service was frozen, say) and exits the
lock's context when the lease ends. Because the service holds the backend's lock itself,
several services over one CROSS_HOST_LOCKING store exclude each other's clients.

A write session belongs to the lease it was begun under: it accepts chunks
and commits only while that lease is held, since after the lease is gone a gc
may run and remove what the session deduplicated against. A session whose
lease ended is abandoned like a crashed writer's: its staged chunks stay until
gc's purge_abandoned removes them, and the service then aborts it (or aborts it
after one more TTL if no gc comes).
"""
import concurrent.futures
import contextlib
import dataclasses
import logging
import queue
import secrets
import threading
import time
from typing import Callable, ContextManager

from vmcloud import exception
from vmcloud.storage import backend as backend_mod
from vmcloud.storage import protocol

LOG = logging.getLogger(__name__)

MIN_TTL = 0.2
# How long a call waits for the lease's thread to begin a session or exit the lock:
# the backend's own operations are bounded (rados op_timeout, lock renewals).
THREAD_WAIT = 120.0


@dataclasses.dataclass(eq=False)
class Lease:
    id: str
    kind: str
    image: str | None
    ttl: float
    deadline: float
    state: str = 'pending'
    """pending, held, failed (the backend refused: ``error``), released, expired."""
    error: exception.VmcloudError | None = None
    ended_at: float | None = None
    context: ContextManager[None] | None = None
    settled: threading.Event = dataclasses.field(default_factory=threading.Event)
    tasks: queue.SimpleQueue = dataclasses.field(default_factory=queue.SimpleQueue)
    """Work for the thread holding the lock, then None: exit the lock's context."""
    exited: threading.Event = dataclasses.field(default_factory=threading.Event)

    def describe(self) -> str:
        what = f'{self.kind} lock' + (f' on image {self.image}' if self.image else '')
        return f'lease {self.id[:8]} ({what})'


@dataclasses.dataclass(eq=False)
class Session:
    id: str
    lease: Lease
    write: backend_mod.WriteSession
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


class LeaseTable:
    """Every lease and write session of one service process; thread-safe."""

    def __init__(self, backend: backend_mod.Backend, max_ttl: float,
                 clock: Callable[[], float] = time.monotonic):
        self.backend = backend
        self.max_ttl = max_ttl
        self.clock = clock
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}
        self._sessions: dict[str, Session] = {}

    # -- leases ------------------------------------------------------------------

    def acquire(self, kind: str, image: str | None, ttl: float,
                timeout: float | None) -> Lease:
        """Start taking a lock for a client; the lease is pending until it is held.

        :raises: RequestRefused for an unknown kind or a missing image name;
            InvalidName (from the backend) for a bad image name.
        """
        if kind not in protocol.LEASE_KINDS:
            raise protocol.RequestRefused(f'unknown lock kind {kind!r}')
        if kind == 'image':
            if not image:
                raise protocol.RequestRefused('an image lock needs an image name')
            context = self.backend.image_lock(image)
        elif kind == 'exclusive':
            context = self.backend.exclusive_lock(0 if timeout is None else max(0.0, timeout))
        else:
            context = self.backend.shared_lock()
        ttl = min(max(MIN_TTL, ttl), self.max_ttl)
        lease = Lease(id=secrets.token_hex(16), kind=kind, image=image, ttl=ttl,
                      deadline=self.clock() + ttl)
        with self._lock:
            self._leases[lease.id] = lease
        threading.Thread(target=self._enter, args=(lease, context), daemon=True,
                         name=f'lease-{lease.id[:8]}').start()
        return lease

    def _enter(self, lease: Lease, context: ContextManager[None]) -> None:
        try:
            context.__enter__()
        except exception.VmcloudError as exc:
            self._settle(lease, 'failed', exc)
            return
        except Exception as exc:  # noqa: B902 - a backend bug must not hang the client
            LOG.exception('taking %s failed', lease.describe())
            self._settle(lease, 'failed', exception.StorageError(
                f'cannot take the {lease.kind} lock: {exc}'))
            return
        with self._lock:
            granted = lease.state == 'pending'
            if granted:
                lease.state = 'held'
                lease.context = context
                lease.settled.set()
        if granted:
            self._serve(lease)
        # Released or expired (while we waited, or now): nobody wants it any more.
        self._exit(lease, context)
        lease.exited.set()

    @staticmethod
    def _serve(lease: Lease) -> None:
        """Run the lease's tasks in the thread holding its lock, until None comes."""
        while (task := lease.tasks.get()) is not None:
            work, future = task
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(work())
                except BaseException as exc:  # noqa: B902 - the caller raises it
                    future.set_exception(exc)

    def _in_lock_thread(self, lease: Lease, work: Callable,
                        undo: Callable[[object], None] | None = None):
        """``work()`` run by the thread holding ``lease``'s lock.

        If the wait times out but ``work`` runs on, ``undo`` gets what it returns:
        nobody else will (a write session begun then would stay open, never aborted).

        :raises: LeaseLost if the lease ended; what ``work`` raised.
        """
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            # Under the lock _end takes to queue the None: a task queued while the
            # lease is held is run before the thread exits the lock.
            if lease.state != 'held':
                self._raise_ended(lease)
            lease.tasks.put((work, future))
        try:
            return future.result(THREAD_WAIT)
        except concurrent.futures.TimeoutError as exc:
            if not future.cancel() and undo is not None:
                future.add_done_callback(lambda done: self._undo(lease, done, undo))
            raise exception.StorageError(
                f'{lease.describe()}: its lock thread did not answer in {THREAD_WAIT:g} s'
            ) from exc

    @staticmethod
    def _undo(lease: Lease, done: concurrent.futures.Future,
              undo: Callable[[object], None]) -> None:
        if done.exception() is not None:
            return
        try:
            undo(done.result())
        except Exception:  # noqa: B902 - in the lock thread, which must go on serving
            LOG.exception('%s: undoing work that finished too late failed', lease.describe())

    def _settle(self, lease: Lease, state: str, error: exception.VmcloudError) -> None:
        with self._lock:
            if lease.state == 'pending':
                lease.state = state
                lease.error = error
                lease.ended_at = self.clock()
            lease.settled.set()

    @staticmethod
    def _exit(lease: Lease, context: ContextManager[None]) -> None:
        try:
            context.__exit__(None, None, None)
        except exception.VmcloudError as exc:
            # LeaseLost: the backend lost the lock while held; its sessions said so.
            LOG.warning('releasing %s: %s', lease.describe(), exc)
        except Exception:  # noqa: B902 - releasing must go on for the other leases
            LOG.exception('releasing %s failed', lease.describe())

    def get(self, lease_id: str) -> Lease:
        """:raises: LeaseLost if no such lease is known."""
        with self._lock:
            lease = self._leases.get(lease_id)
        if lease is None:
            raise exception.LeaseLost(f'lease {lease_id[:8]} is unknown to this service '
                                      '(expired long ago, or the service restarted)')
        return lease

    def renew(self, lease_id: str) -> Lease:
        """Push a live lease's deadline one TTL ahead.

        :raises: LeaseLost if it expired or was released; the backend's error
            (WarehouseBusy...) if taking it failed.
        """
        lease = self.get(lease_id)
        with self._lock:
            if lease.state in ('pending', 'held'):
                lease.deadline = self.clock() + lease.ttl
                return lease
        self._raise_ended(lease)

    def _raise_ended(self, lease: Lease):
        if lease.state == 'failed':
            raise lease.error
        raise exception.LeaseLost(f'{lease.describe()} was {lease.state}: the lock is not held')

    def wait(self, lease_id: str, seconds: float) -> Lease:
        """Renew a lease, then wait up to ``seconds`` for a pending one to settle.

        A client waiting in this call is alive: the lease lasts the wait and one
        TTL after it, so a vanished client loses it at most that long after.
        """
        seconds = max(0.0, seconds)
        lease = self.get(lease_id)
        with self._lock:
            if lease.state in ('pending', 'held'):
                lease.deadline = self.clock() + seconds + lease.ttl
            else:
                self._raise_ended(lease)
        lease.settled.wait(seconds)
        return self.renew(lease_id)

    def require(self, lease_id: str, kinds: tuple[str, ...]) -> Lease:
        """The lease, which must be held and of one of ``kinds``.

        :raises: LeaseLost, RequestRefused.
        """
        lease = self.get(lease_id)
        with self._lock:
            state = lease.state
        if state != 'held':
            if state == 'pending':
                raise protocol.RequestRefused(f'{lease.describe()} is not held yet')
            self._raise_ended(lease)
        if lease.kind not in kinds:
            raise protocol.RequestRefused(
                f"{lease.describe()} is not a {' or '.join(kinds)} lock")
        return lease

    def release(self, lease_id: str) -> None:
        """Release a lease; releasing one that ended already is not an error."""
        self._end(self.get(lease_id), 'released')

    def _end(self, lease: Lease, state: str) -> None:
        with self._lock:
            if lease.state not in ('pending', 'held'):
                return
            held, lease.context = lease.context is not None, None
            lease.state = state
            lease.ended_at = self.clock()
            lease.settled.set()
            if held:
                lease.tasks.put(None)  # the lock's thread exits it
        # Released when this returns, as the client expects: its next lock may need it.
        if held and not lease.exited.wait(THREAD_WAIT):
            LOG.error('%s: its lock thread did not release it in %g s', lease.describe(),
                      THREAD_WAIT)

    def expire_due(self) -> int:
        """End every lease whose client stopped renewing it; forget long-ended ones.

        :returns: how many leases expired now.
        """
        now = self.clock()
        with self._lock:
            due = [lease for lease in self._leases.values()
                   if lease.state in ('pending', 'held') and lease.deadline < now]
            # An ended lease is remembered for a while, so its client hears why.
            for lease in [lease for lease in self._leases.values()
                          if lease.ended_at is not None
                          and now - lease.ended_at > max(60.0, 2 * lease.ttl)]:
                del self._leases[lease.id]
        for lease in due:
            LOG.warning('%s expired: its client stopped renewing it', lease.describe())
            self._end(lease, 'expired')
        self._abort_orphans(idle_for=None)
        return len(due)

    # -- write sessions ----------------------------------------------------------

    def begin(self, lease_id: str) -> Session:
        """:raises: LeaseLost, RequestRefused, StorageError."""
        lease = self.require(lease_id, ('shared', 'exclusive'))
        session = Session(id=secrets.token_hex(16), lease=lease,
                          write=self._in_lock_thread(lease, self.backend.begin_write,
                                                     lambda write: write.abort()))
        with self._lock:
            self._sessions[session.id] = session
        return session

    def session(self, session_id: str) -> Session:
        """A session whose lease is still held. :raises: LeaseLost, RequestRefused."""
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise protocol.RequestRefused(f'write session {session_id[:8]} is unknown '
                                          '(committed, aborted, or the service restarted)')
        self.require(session.lease.id, ('shared', 'exclusive'))
        return session

    def put(self, session_id: str, chunk_id: str, data: bytes) -> None:
        """Stage a chunk the client found missing. :raises: LeaseLost, RequestRefused,
        StorageError."""
        session = self.session(session_id)
        # A WriteSession is one writer's: uploads in flight for it take turns.
        with session.lock:
            session.write.put_chunk(chunk_id, data)

    def commit(self, session_id: str) -> int:
        """:returns: the bytes the session stored."""
        session = self.session(session_id)
        with session.lock:
            session.write.commit()
        with self._lock:
            self._sessions.pop(session.id, None)
        return session.write.stored_bytes

    def abort(self, session_id: str) -> None:
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is not None:
            with session.lock:
                session.write.abort()

    def _abort_orphans(self, idle_for: float | None) -> int:
        """Abort the sessions whose lease ended (at least ``idle_for`` seconds ago,
        or one TTL ago if None)."""
        now = self.clock()
        with self._lock:
            orphans = [s for s in self._sessions.values()
                       if s.lease.ended_at is not None
                       and now - s.lease.ended_at >= (s.lease.ttl if idle_for is None
                                                      else idle_for)]
            for session in orphans:
                del self._sessions[session.id]
        for session in orphans:
            with session.lock:
                session.write.abort()
        return len(orphans)

    def purge_abandoned(self, lease_id: str) -> int:
        """The backend's purge, then the abort of every session left without a lease.

        :returns: the abandoned items removed: the backend's, and those sessions.
        """
        self.require(lease_id, ('exclusive',))
        return self.backend.purge_abandoned() + self._abort_orphans(idle_for=0)

    def close(self) -> None:
        """Abort every session and release every lease (the service is stopping)."""
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
            leases = list(self._leases.values())
        for session in sessions:
            with contextlib.suppress(Exception), session.lock:
                session.write.abort()
        for lease in leases:
            self._end(lease, 'released')
