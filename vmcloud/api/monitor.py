"""The live figures of the cloud (``GET /v1/monitoring``, the dashboard), their history
(the dashboard's charts) and the recent events.

The figures combine the dispatcher's counts (``DispatcherAPI.monitoring``: deployments,
instances, applications, hosts per cloud) with the gateway's connections
(``gateway_connections``): users are the distinct client addresses holding a connection
now. Without a gateway answering, the connections, users and available connections are
None and 'gateway' says why; the rest still answers.

Many dashboards polling at once cost one question: an answer is reused for ``[api]
live_max_age`` seconds, and the callers that come while it is asked wait for it. A
gateway that did not answer is not asked again for GATEWAY_RETRY seconds (asking one that
is gone takes the dispatcher seconds, which every dashboard would wait out): the sampler
asks it then, outside the lock the dashboards wait on.

A thread samples the figures every ``[api] monitor_interval`` seconds into a ring of
``[api] history_length`` samples.
"""
import collections
import copy
import dataclasses
import datetime
import logging
import threading
import time
from typing import Callable

from oslo_config import cfg

from vmcloud import exception
from vmcloud import rpc
from vmcloud.dispatcher import states

LOG = logging.getLogger(__name__)
# How much longer than a sample took the sampler waits before the next one, at least.
SLOW_SAMPLE_FACTOR = 4

# Seconds before a gateway that did not answer is asked again.
GATEWAY_RETRY = 10.0
# Seconds stop() waits for the sampler to end. Between samples it ends at once; a
# question under way is abandoned (the thread is a daemon: it ends when the answer or
# the RPC timeout comes), or a dispatcher that does not answer would hold a stopping
# `vmcloud api` for its whole rpc_call_timeout.
STOP_TIMEOUT = 1.0


def _iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).isoformat()


@dataclasses.dataclass
class _Reading:
    """One answer of the dispatcher and the gateway, with when it was taken."""
    taken: float  # on the monotonic clock
    body: dict  # the /v1/monitoring body
    connections: list[dict] | None  # the gateway's, None if it did not answer
    gateway_error: exception.VmcloudError | None


class Monitor:
    """See the module's docstring. Thread safe."""

    def __init__(self, conf: cfg.ConfigOpts, dispatcher,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time):
        """``dispatcher``: a DispatcherAPI (or anything with its monitoring,
        gateway_connections and recent_events); ``clock`` says how old an answer is,
        ``wall_clock`` the times shown (tests give their own)."""
        self.conf = conf
        self.dispatcher = dispatcher
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()  # held while asking: the others wait for it
        self._reading: _Reading | None = None
        self._gateway_lock = threading.Lock()
        self._gateway_error: exception.VmcloudError | None = None
        self._gateway_retry_at = 0.0
        self._samples_lock = threading.Lock()  # never held while asking
        self._samples: collections.deque[dict] = collections.deque(
            maxlen=conf.api.history_length)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    # -- the figures ---------------------------------------------------------------

    def live(self) -> dict:
        """The /v1/monitoring body: {'sampled_at', 'clouds': [{'name',
        'connection_limit', 'deployments' (not deleted), 'applications_deployed',
        'applications_running', 'instances_running', 'instances' ({state: n}),
        'users', 'connections', 'available', 'hosts_up', 'hosts_total'}], 'instances':
        {state: n}, 'deployments': {state: n}, 'gateway': 'ok' | 'unavailable: ...'},
        at most ``[api] live_max_age`` seconds old.

        :raises: what DispatcherAPI.monitoring raises (MessagingError...).
        """
        return copy.deepcopy(self._current().body)

    def connections(self, cloud: str | None = None) -> list[dict]:
        """The gateway's connections now (of ``cloud`` if given), as old as live()'s,
        each {'client', 'client_port', 'cloud', 'application', 'deployment',
        'instance' (id), 'instance_name', 'listener_port', 'started_at' (ISO, None if
        unknown), 'duration_seconds'}.

        :raises: CloudNotFound; GatewayUnavailable (or the GatewayError or
            MessagingError that said so) if the gateway did not answer; as live().
        """
        reading = self._current()
        if cloud is not None and cloud not in {c['name'] for c in reading.body['clouds']}:
            raise exception.CloudNotFound(cloud)
        if reading.connections is None:
            raise _again(reading.gateway_error)
        now = self._wall_clock()
        return [_shown_connection(c, now) for c in reading.connections
                if cloud is None or c['cloud'] == cloud]

    def events(self, limit: int = 50) -> list[dict]:
        """The dispatcher's recent events, newest first: [{'at', 'event', 'payload'}].

        :raises: MessagingError.
        """
        return self.dispatcher.recent_events(limit=limit)

    def history(self) -> dict:
        """{'interval': seconds between samples, 'samples': [{'at', 'clouds': {name:
        {'connections', 'instances_running', 'users'}}}] oldest first}."""
        with self._samples_lock:
            samples = copy.deepcopy(list(self._samples))
        return {'interval': self.conf.api.monitor_interval, 'samples': samples}

    def _current(self) -> _Reading:
        with self._lock:
            reading = self._reading
            if reading is None or self._clock() - reading.taken >= self.conf.api.live_max_age:
                reading = self._reading = self._read()
            return reading

    def _read(self) -> _Reading:
        """:raises: as DispatcherAPI.monitoring."""
        figures = self.dispatcher.monitoring()
        # With the sampler running, only it asks a gateway that failed again.
        connections, gateway_error = self._gateway_connections(may_retry=self._thread is None)
        body = {'sampled_at': _iso(self._wall_clock()),
                'clouds': [_cloud(name, each, connections)
                           for name, each in sorted(figures['clouds'].items())],
                'instances': dict(figures.get('instances', {})),
                'deployments': dict(figures.get('deployments', {})),
                'gateway': 'ok' if gateway_error is None else f'unavailable: {gateway_error}'}
        return _Reading(self._clock(), body, connections, gateway_error)

    def _gateway_connections(self, may_retry: bool = True
                             ) -> tuple[list[dict] | None, exception.VmcloudError | None]:
        """The gateway's connections, or None and why not: after a failure, the failure
        without asking again, until GATEWAY_RETRY seconds after it; then the first
        caller that ``may_retry`` asks."""
        with self._gateway_lock:
            if self._gateway_error is not None:
                if not may_retry or self._clock() < self._gateway_retry_at:
                    return None, self._gateway_error
                self._gateway_retry_at = self._clock() + GATEWAY_RETRY
        try:
            connections = self.dispatcher.gateway_connections()
        except (exception.GatewayError, exception.MessagingError) as exc:
            # MessagingError: the dispatcher's answer did not come; it answered the
            # counts just before, so this is the gateway question's alone.
            with self._gateway_lock:
                if self._gateway_error is None:
                    _log_gateway_away(exc)
                self._gateway_error = exc
                self._gateway_retry_at = self._clock() + GATEWAY_RETRY
            return None, exc
        with self._gateway_lock:
            if self._gateway_error is not None:
                LOG.info('monitoring: the gateway answers again')
            self._gateway_error = None
        return connections, None

    # -- the history ---------------------------------------------------------------

    def sample(self) -> dict:
        """Take one sample of live() into the history (the sampler's pass).

        :returns: the sample. :raises: as live().
        """
        # Asked here, before the lock: the dashboards do not wait for a gateway that
        # failed. If it answers now, the reading below asks it once more (it is quick).
        with self._gateway_lock:
            failed = self._gateway_error is not None
        if failed and self._gateway_connections()[0] is not None:
            with self._lock:
                self._reading = None  # it says the gateway is away: read again
        reading = self._current()
        sample = {'at': reading.body['sampled_at'],
                  'clouds': {c['name']: {'connections': c['connections'],
                                         'instances_running': c['instances_running'],
                                         'users': c['users']}
                             for c in reading.body['clouds']}}
        with self._samples_lock:
            # A reading reused (an interval below live_max_age) is one sample, not two.
            if not self._samples or self._samples[-1]['at'] != sample['at']:
                self._samples.append(sample)
        return sample

    def start(self) -> None:
        """Start sampling every ``[api] monitor_interval`` seconds, until stop()."""
        if self._thread is not None:
            return
        # An event of this sampler's own: one that stop() abandoned in a question ends
        # when it comes back, even if the Monitor was started again meanwhile.
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped,
                                        args=(self._stopping,), name='api-monitor',
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling, within STOP_TIMEOUT seconds: a question to the dispatcher under
        way is not waited for (the sampler ends once it comes back, asking nothing
        more)."""
        self._stopping.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(STOP_TIMEOUT)
            if thread.is_alive():
                LOG.info('monitoring stopped; its question to the dispatcher under way is '
                         'abandoned')

    def _sample_until_stopped(self, stopping: threading.Event) -> None:
        # It outlives every error: a dispatcher away now and then, a bug in one pass.
        while not stopping.is_set():
            started = time.monotonic()
            try:
                with rpc.request_context():  # one id per pass, in both services' logs
                    self.sample()
            except Exception as exc:
                if stopping.is_set():
                    return  # abandoned: the transport may be closed under it
                if not self._failing:
                    LOG.warning('monitoring: no sample (the history has a gap until the '
                                'next one): %s', exc,
                                exc_info=not isinstance(exc, exception.VmcloudError))
                self._failing = True
            else:
                if self._failing:
                    LOG.info('monitoring: sampling again')
                self._failing = False
            stopping.wait(pause_after(time.monotonic() - started,
                                      self.conf.api.monitor_interval))


def pause_after(took: float, interval: float) -> float:
    """Seconds to wait after a sample that took ``took``: the interval, and longer when
    sampling is slow (a cloud of very many clouds and deployments), so that sampling
    keeps the dispatcher busy at most 1/(1 + SLOW_SAMPLE_FACTOR) of the time and the
    requests that share it are not starved."""
    return max(interval - took, SLOW_SAMPLE_FACTOR * took)


def _cloud(name: str, figures: dict, connections: list[dict] | None) -> dict:
    """One cloud's live figures, the dispatcher's with the gateway's ``connections``
    (None: unknown)."""
    limit = figures['connection_limit']
    instances = dict(figures.get('instances', {}))
    result = {'name': name, 'connection_limit': limit,
              'deployments': sum(figures.get('deployments', {}).values()),
              'applications_deployed': len(figures.get('applications_deployed', ())),
              'applications_running': len(figures.get('applications_running', ())),
              'instances_running': instances.get(states.ACTIVE, 0), 'instances': instances,
              'users': None, 'connections': None, 'available': None,
              'hosts_up': figures.get('hosts_up'), 'hosts_total': figures.get('hosts_total')}
    if connections is not None:
        mine = [c for c in connections if c['cloud'] == name]
        result.update(users=len({c['client'] for c in mine}), connections=len(mine),
                      available=max(0, limit - len(mine)))
    return result


def _log_gateway_away(error: exception.VmcloudError) -> None:
    """Say once that the gateway went: a warning, but for a cloud with no gateway
    registered at all (the all-in-one demo), a normal setup whose connections are
    simply unknown."""
    if isinstance(error, exception.GatewayUnavailable) and not error.gateways:
        LOG.info('monitoring: no gateway is registered, so the connections are unknown '
                 '(asked again every %g s)', GATEWAY_RETRY)
        return
    LOG.warning('monitoring: the gateway does not answer (asked again every %g s): %s',
                GATEWAY_RETRY, error)


def _shown_connection(connection: dict, now: float) -> dict:
    """A gateway's connection record (started_at in epoch seconds, 0 if unknown) as the
    API shows it."""
    started = connection.get('started_at') or 0
    shown = dict(connection, started_at=_iso(started) if started else None,
                 duration_seconds=round(max(0.0, now - started), 1) if started else None)
    return shown


def _again(error: exception.VmcloudError | None) -> exception.VmcloudError:
    """A new exception like ``error``, of the class that gives its status (one raised
    again for each caller would pile up their tracebacks)."""
    if isinstance(error, exception.GatewayUnavailable):
        return exception.GatewayUnavailable(error.gateways, error.timeout)
    if isinstance(error, exception.MessagingError):
        return exception.MessagingError(str(error))
    return exception.GatewayError(str(error) if error is not None else 'no answer')
