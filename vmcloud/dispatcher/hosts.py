"""Compute hosts: who holds each name, their heartbeats reconciled with what the
dispatcher wants there, fencing, their free capacity, and the monitor that marks
silent ones unknown and ends what passed its deadline."""
import collections
import datetime
import ipaddress
import logging
import threading
import urllib.parse
from typing import Callable
from typing import Protocol

from oslo_config import cfg

from vmcloud import exception
from vmcloud import rpc
from vmcloud.db import api as db_api
from vmcloud.db import models
from vmcloud.dispatcher import networks
from vmcloud.dispatcher import states
from vmcloud.dispatcher import views
from vmcloud.scheduler.host_state import HostState

LOG = logging.getLogger(__name__)


def host_states(session: db_api.Session) -> list[HostState]:
    """Every host with its capacity from the last heartbeat and its usage from every
    instance that may have a guest there (what the scheduler sees): an instance in
    error or being deleted holds what it uses until its host confirms it gone."""
    used = collections.defaultdict(lambda: [0, 0, 0])
    for host, vcpus, memory_mib in db_api.usage_by_host(session, states.HOLDING_STATES):
        totals = used[host]
        totals[0] += vcpus
        totals[1] += memory_mib
        totals[2] += 1
    return [HostState(name=h.name, up=h.state == states.HOST_UP, vcpus_total=h.vcpus,
                      vcpus_used=used[h.name][0], memory_mib_total=h.memory_mib,
                      memory_mib_used=used[h.name][1], disk_bytes_free=h.disk_bytes_free,
                      instance_count=used[h.name][2])
            for h in db_api.hosts(session)]


class InstanceKeeper(Protocol):
    """What becomes of a host's instances when the host goes silent, reports, or is
    fenced (the deployer)."""

    def hosts_silent(self, session: db_api.Session, hosts: list[str]) -> None:
        """Their running guests are unknown, in ``session``."""

    def reconcile(self, session: db_api.Session, host: str, running: set[str]) -> list[str]:
        """Settle the host's instances against the guests it runs, in ``session``.

        :returns: the names of guests it runs that are wanted nowhere there, to destroy
            once ``session`` committed.
        """

    def destroy(self, host: str, names: list[str]) -> None:
        """Tell ``host`` to destroy guests (never raises: a lost cast is retried by the
        next reconciliation)."""

    def host_fenced(self, host: str) -> dict:
        """Rebuild elsewhere (or give up) every instance of a fenced host.

        :returns: {'rebuilt': [names], 'failed': [names]}.
        """

    def expire_builds(self, now: datetime.datetime) -> list[str]:
        """End every build past its deadline. :returns: their instance ids."""


# What a heartbeat's capacity may tell of the node's chunk cache: the bytes it holds,
# and those it fetched from the warehouse and had from peers since it opened.
CACHE_FIGURES = ('cache_bytes', 'fetched_bytes', 'peer_bytes')


def _set_capacity(row: models.Host, capacity: dict) -> None:
    row.vcpus = capacity['vcpus']
    row.memory_mib = capacity['memory_mib']
    row.disk_bytes_free = capacity['disk_bytes_free']
    # Each heartbeat sets both: the figure of an earlier one must not stay. A manager of
    # before reports no load (cpus 0 is read as its vcpus; counted idle, as all its
    # peers of before are). One that could not measure it this time counts as busy:
    # the gateway must not send a host it knows nothing of the most connections.
    row.cpus = capacity.get('cpus', 0)
    row.cpu_busy = capacity.get('cpu_busy', 1.0 if 'cpus' in capacity else 0.0)
    # The chunk cache's figures are only shown, never decided on: one the node could not
    # read this time (its mirror service restarting) leaves the last one told.
    for figure in CACHE_FIGURES:
        if figure in capacity:
            setattr(row, figure, capacity[figure])


# The hosts table's peer_url column holds this many characters.
_PEER_URL_LENGTH = models.Host.peer_url.type.length


def check_peer_url(host: str, url: str) -> None:
    """Refuse a peer URL of ``host`` that is neither '' nor a peer chunk server's URL,
    http://HOST[:PORT] and nothing more: the other nodes append the protocol's paths.

    :raises: InvalidRequest naming the host and what is wrong with the URL.
    """
    if not url:
        return
    problem = None
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # a port out of range raises ValueError only as it is read
    except ValueError as exc:
        problem = str(exc)
    else:
        if parts.scheme != 'http':
            problem = 'the peer exchange speaks plain http'
        elif not parts.hostname:
            problem = 'it names no host'
        elif parts.username is not None or parts.password is not None:
            problem = 'it carries credentials ([mirror] peer_token is the secret)'
        elif parts.path or parts.query or parts.fragment:
            problem = 'it has more than http://HOST[:PORT]'
        elif parts.port == 0:
            problem = 'port 0 is what a server binds to, not where it is reached'
    if problem is None and len(url) > _PEER_URL_LENGTH:
        problem = f'it is longer than {_PEER_URL_LENGTH} characters'
    if problem is not None:
        raise exception.InvalidRequest(
            f'compute host {host}: its mirrors\' peer URL {url[:100]!r} is not '
            f'http://HOST[:PORT]: {problem}')


def _set_state(row: models.Host, state: str) -> None:
    row.state = state
    row.up = state == states.HOST_UP  # kept for the scheduler, which reads ``up``


class HostRegistry:
    """What the dispatcher knows of each compute host: which node holds the name, which
    run of its manager reports, and what it runs."""

    def __init__(self, conf: cfg.ConfigOpts, db: db_api.Database, keeper: InstanceKeeper):
        self.conf = conf
        self.db = db
        self.keeper = keeper

    def register(self, host: str, node_id: str, incarnation: str, capacity: dict,
                 vtep_address: str = '', peer_url: str = '') -> list[dict]:
        """A manager starting on ``node_id`` claims ``host``; its reports from now on
        carry ``incarnation``; other hosts send its guests' frames to ``vtep_address``
        (builds cast from now on name it; '' for none), and their mirrors ask its
        mirrors for chunks at ``peer_url`` ('' for none: it takes no part in the peer
        exchange).

        :returns: the host's instances that may have a guest there, for the manager to
            adopt or clean up: [{'id', 'name', 'state', 'attempts', 'image', 'network':
            {'id', 'vni', 'cidr'} | None, 'port': {'mac', 'address'} | None, 'peers':
            [VTEP addresses]}].
        :raises: HostNameInUse if another node holds the name, is not fenced and sent a
            heartbeat within service_down_time; InvalidRequest if ``vtep_address`` is
            neither '' nor an IP address (every other host would take it for a peer),
            or ``peer_url`` neither '' nor http://HOST[:PORT] (see check_peer_url);
            DatabaseError.
        """
        check_peer_url(host, peer_url)
        if vtep_address:
            try:
                ipaddress.ip_address(vtep_address)
            except ValueError:
                raise exception.InvalidRequest(
                    f'compute host {host}: [network] vtep_address {vtep_address!r} is not '
                    f'an IP address') from None
        now = models.utcnow()
        alive_since = now - datetime.timedelta(seconds=self.conf.service_down_time)
        with self.db.session() as session:
            row = db_api.host_get(session, host, lock=True)
            if row is None:
                row = db_api.host_create(session, host)
                LOG.info('compute host %s joined (node %s)', host, node_id)
            elif (row.node_id and row.node_id != node_id and row.state != states.HOST_FENCED
                    and row.last_heartbeat >= alive_since):
                LOG.warning('compute host name %s refused to node %s: node %s holds it',
                            host, node_id, row.node_id)
                raise exception.HostNameInUse(host, row.node_id)
            else:
                LOG.info('compute host %s registered (node %s, was %s of node %s)', host,
                         node_id, row.state, row.node_id or 'none')
            row.node_id, row.incarnation = node_id, incarnation
            row.vtep_address = vtep_address
            row.peer_url = peer_url
            _set_state(row, states.HOST_UP)
            _set_capacity(row, capacity)
            row.last_heartbeat = now
            return [{'id': i.id, 'name': i.name, 'state': i.state, 'attempts': i.attempts,
                     'image': i.image, **networks.adoption_keys(session, i)}
                    for i in db_api.instances_on(session, host, states.HOLDING_STATES)]

    def report_heartbeat(self, host: str, capacity: dict, incarnation: str,
                         running: list[str]) -> None:
        """Record a heartbeat and reconcile the host's instances with ``running``; a
        heartbeat of a manager run that is not the registered one is ignored.

        A fenced host stays fenced (the operator's word holds until its manager
        registers again), but its guests are still reconciled: its instances were
        rebuilt elsewhere, so what it still runs is destroyed.

        :raises: DatabaseError.
        """
        with self.db.session() as session:
            row = db_api.host_get(session, host, lock=True)
            if row is None or row.incarnation != incarnation:
                LOG.warning('heartbeat of compute host %s ignored: incarnation %s is not '
                            'the registered one (%s)', host, incarnation,
                            row.incarnation if row else 'never registered')
                return
            if row.state == states.HOST_UNKNOWN:
                LOG.info('compute host %s is back', host)
                _set_state(row, states.HOST_UP)
            _set_capacity(row, capacity)
            row.last_heartbeat = models.utcnow()
            unwanted = self.keeper.reconcile(session, host, set(running))
        if unwanted:
            LOG.warning('compute host %s runs guests wanted nowhere there: %s', host,
                        ', '.join(sorted(unwanted)))
            self.keeper.destroy(host, unwanted)

    def fence(self, host: str) -> dict:
        """The operator says ``host`` is dead: it takes no instance, and its instances are
        rebuilt elsewhere or end in error.

        :returns: {'host', 'state', 'rebuilt': [names], 'failed': [names]}.
        :raises: HostNotFound, DatabaseError.
        """
        with self.db.session() as session:
            row = db_api.host_get(session, host, lock=True)
            if row is None:
                raise exception.HostNotFound(host)
            LOG.warning('compute host %s fenced (was %s)', host, row.state)
            _set_state(row, states.HOST_FENCED)
        # Committed first: the rebuilds must not be placed on the fenced host.
        return dict(host=host, state=states.HOST_FENCED, **self.keeper.host_fenced(host))

    def chunk_peers(self) -> dict[str, str]:
        """The nodes of the peer exchange now: {host: peer URL} of every host that is
        up and has one. A host silent for service_down_time (unknown) or fenced is out
        of it until it reports again or registers; the mirrors skip a peer that fails
        meanwhile by themselves.

        :raises: DatabaseError.
        """
        with self.db.session() as session:
            return db_api.peer_urls(session, states.HOST_UP)

    def list_hosts(self, limit: int | None = None, marker: str | None = None) -> list[dict]:
        """By name; ``limit`` of them after the one named ``marker``.

        :raises: MarkerNotFound, DatabaseError."""
        with self.db.session() as session:
            page = db_api.hosts(session, limit, marker)
            usage = {s.name: s for s in host_states(session)}
            return [dict(views.row(h), instances=usage[h.name].instance_count,
                         vcpus_used=usage[h.name].vcpus_used,
                         memory_mib_used=usage[h.name].memory_mib_used)
                    for h in page]


class HostMonitor:
    """A thread that, every heartbeat_interval, marks unknown the hosts silent for
    service_down_time seconds, ends the builds past their deadline, and expires the
    snapshot items past theirs.

    It outlives every error of a pass (a database away, a bug): a monitor that
    died would leave silent hosts up, and the cloud scheduling onto them, for good.
    """

    def __init__(self, conf: cfg.ConfigOpts, db: db_api.Database, keeper: InstanceKeeper,
                 expire_snapshots: Callable[[datetime.datetime], object]):
        self.conf = conf
        self.db = db
        self.keeper = keeper
        self.expire_snapshots = expire_snapshots
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name='host-monitor')

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _watch(self) -> None:
        while not self._stopping.wait(self.conf.heartbeat_interval):
            self.check()

    def check(self) -> None:
        """One pass, under its own request id. Never raises: every error is logged, and
        one part failing does not keep the others from running."""
        with rpc.request_context():
            for doing, work in (('check compute hosts', self.mark_silent_hosts),
                                ('end builds past their deadline', self.end_late_builds),
                                ('expire snapshot items', self.end_late_uploads)):
                try:
                    work()
                except exception.VmcloudError as exc:
                    LOG.error('cannot %s: %s', doing, exc)
                except Exception:  # a bug or an unexpected fault: the next pass may do better
                    LOG.exception('cannot %s', doing)

    def mark_silent_hosts(self) -> list[str]:
        """Mark unknown the hosts silent for service_down_time, and their running guests.

        :returns: the hosts marked unknown. :raises: DatabaseError.
        """
        deadline = models.utcnow() - datetime.timedelta(seconds=self.conf.service_down_time)
        with self.db.session() as session:
            silent = db_api.hosts_silent_since(session, deadline)
            for host in silent:
                LOG.warning('compute host %s sent no heartbeat since %s: unknown',
                            host.name, host.last_heartbeat)
                _set_state(host, states.HOST_UNKNOWN)
            names = [host.name for host in silent]
            self.keeper.hosts_silent(session, names)
            return names

    def end_late_builds(self) -> list[str]:
        """:returns: the ids of the builds ended. :raises: DatabaseError."""
        return self.keeper.expire_builds(models.utcnow())

    def end_late_uploads(self) -> None:
        """:raises: DatabaseError."""
        self.expire_snapshots(models.utcnow())
