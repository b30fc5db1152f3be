"""Clouds, applications and the gateway in the dispatcher: which hosts a cloud places on,
the listener ports of exposed deployments, what a gateway serves (gateway_state), the
gateways' registrations, and the questions forwarded to them.

The gateway reads everything it serves from gateway_state, and polls it; the dispatcher
also casts it a refresh after every commit that changes what it serves (see
``refresh_after_commit``), so that instances enter and leave its pools at once.
"""
import collections
import ipaddress
import json
import logging
import re
from typing import Protocol

from oslo_config import cfg

from vmcloud import exception
from vmcloud.compute import rpcapi as compute_rpcapi
from vmcloud.db import api as db_api
from vmcloud.db import models
from vmcloud.dispatcher import networks
from vmcloud.dispatcher import states
from vmcloud.dispatcher import views
from vmcloud.gateway import rpcapi as gateway_rpcapi

LOG = logging.getLogger(__name__)

DEFAULT = 'default'  # the cloud of plain deploys, made by migration 0004
PROTOCOLS = ('http', 'tcp')
CLOUD_NAME = re.compile(r'[a-z0-9-]{1,32}\Z')
APPLICATION_NAME = re.compile(r'[a-z0-9-]{1,64}\Z')
GATEWAY_TIMEOUT = gateway_rpcapi.ANSWER_TIMEOUT  # for each gateway asked


class Gateway(Protocol):
    """What the dispatcher asks of the gateways (vmcloud.gateway.rpcapi.GatewayAPI)."""

    def refresh(self) -> None:
        """Every gateway reads gateway_state now. :raises: MessagingError."""

    def connections(self, server: str, cloud: str | None = None,
                    timeout: float | None = None) -> list[dict]:
        """:raises: MessagingError if ``server`` does not answer in time."""

    def stats(self, server: str, cloud: str | None = None,
              timeout: float | None = None) -> dict:
        """:raises: MessagingError if ``server`` does not answer in time."""


# -- listener ports -------------------------------------------------------------

def port_range(conf: cfg.ConfigOpts, protocol: str) -> range:
    """The listener ports of ``protocol`` ([gateway] listener_ports for http,
    tcp_listener_ports for tcp).

    :raises: ConfigError naming the option if it is not LOW-HIGH within 1..65535.
    """
    option = 'listener_ports' if protocol == 'http' else 'tcp_listener_ports'
    text = conf.gateway[option]
    match = re.fullmatch(r'\s*(\d+)\s*-\s*(\d+)\s*', text)
    low, high = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    if not 1 <= low <= high <= 65535:
        raise exception.ConfigError(f'[gateway] {option} {text!r} is not a port range '
                                    f'LOW-HIGH within 1-65535')
    return range(low, high + 1)


def allocate_listener_port(conf: cfg.ConfigOpts, session: db_api.Session,
                           protocol: str) -> int:
    """The lowest port of ``protocol``'s range no deployment holds. Two dispatchers
    picking one at once: the second's commit is refused by the unique index
    (db_api.Conflict), as for networks.

    :raises: ListenerPortsExhausted naming the range; ConfigError.
    """
    ports = port_range(conf, protocol)
    used = db_api.listener_ports_in_use(session)
    for port in ports:
        if port not in used:
            return port
    raise exception.ListenerPortsExhausted(protocol, f'{ports.start}-{ports.stop - 1}')


def check_service(port: int | None, protocol: str | None) -> None:
    """A deployment's service: both or neither of ``port`` and ``protocol``.

    :raises: InvalidRequest naming what is wrong.
    """
    if (port is None) != (protocol is None):
        raise exception.InvalidRequest(
            'a service needs both a port and a protocol (got port '
            f'{port}, protocol {protocol})')
    if port is None:
        return
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise exception.InvalidRequest(f'service port {port!r} is not a port (1-65535)')
    if protocol not in PROTOCOLS:
        raise exception.InvalidRequest(
            f'protocol {protocol!r} is not one of {", ".join(PROTOCOLS)}')


# -- rows -----------------------------------------------------------------------

def cloud(session: db_api.Session, name: str, lock: bool = False) -> models.Cloud:
    """:raises: CloudNotFound."""
    found = db_api.cloud_get(session, name, lock)
    if found is None:
        raise exception.CloudNotFound(name)
    return found


def application(session: db_api.Session, name: str) -> models.Application:
    """:raises: ApplicationNotFound."""
    found = db_api.application_get(session, name)
    if found is None:
        raise exception.ApplicationNotFound(name)
    return found


def placement_hosts(session: db_api.Session, name: str) -> list[str] | None:
    """The hosts a deployment of cloud ``name`` may be placed on (the request spec's
    cloud_hosts): None, any host, if the cloud lists none.

    :raises: CloudNotFound.
    """
    cloud(session, name)
    return db_api.cloud_hosts(session, name) or None


def show_cloud(session: db_api.Session, name: str) -> dict:
    """{'name', 'connection_limit', 'created_at', 'hosts': [names] (none: every host),
    'deployments': [ids of its live deployments]}. :raises: CloudNotFound."""
    return dict(views.row(cloud(session, name)), hosts=db_api.cloud_hosts(session, name),
                deployments=db_api.live_deployment_ids(session, cloud=name))


def show_application(session: db_api.Session, name: str) -> dict:
    """Its columns (boot and health decoded) and 'deployments': [ids of its live
    deployments]. :raises: ApplicationNotFound."""
    result = views.row(application(session, name))
    result['boot'] = json.loads(result['boot'])
    result['health'] = json.loads(result['health']) or {'kind': 'marker'}
    result['deployments'] = db_api.live_deployment_ids(session, application=name)
    return result


def _check_name(kind: str, name: str, pattern: re.Pattern) -> None:
    if not isinstance(name, str) or not pattern.match(name):
        raise exception.InvalidRequest(
            f'{kind} name {name!r} must be {pattern.pattern[:-2]} (lower-case letters, '
            f'digits, -)')


def _check_limit(limit) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise exception.InvalidRequest(f'connection limit {limit!r} must be an integer '
                                       f'of at least 1')


def check_size(vcpus, memory_mib) -> None:
    """:raises: InvalidRequest unless both are integers of at least 1."""
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
               for v in (vcpus, memory_mib)):
        raise exception.InvalidRequest(f'vcpus and memory must be at least 1 (got '
                                       f'{vcpus}, {memory_mib})')


def check_application(port, protocol: str, vcpus, memory_mib,
                      connection_limit: int | None) -> None:
    """What an application must be, but for its name and artifacts (image, boot,
    health: see vmcloud.dispatcher.deploy.check_artifacts): a service, a size, a limit
    (None: its cloud's only).

    :raises: InvalidRequest naming what is wrong.
    """
    check_service(port, protocol)
    check_size(vcpus, memory_mib)
    if connection_limit is not None:
        _check_limit(connection_limit)


# What update_application may change of an application: all but its name.
APPLICATION_FIELDS = ('image', 'port', 'protocol', 'vcpus', 'memory_mib', 'boot', 'health',
                      'connection_limit')


def _known_hosts(session: db_api.Session, hosts: list[str]) -> None:
    """:raises: HostNotFound naming the first unknown one."""
    for host in hosts:
        if db_api.host_get(session, host) is None:
            raise exception.HostNotFound(host)


# -- what a gateway serves ------------------------------------------------------

def host_loads(session: db_api.Session) -> dict[str, dict]:
    """{host: {'cpus', 'cpu_busy', 'vcpus', 'vcpus_used', 'memory_mib',
    'memory_mib_used', 'up'}}: its load from its last heartbeat (a manager of before
    reports no CPUs: its vCPUs then), and what the instances that may have a guest
    there use (as the scheduler counts it)."""
    used = collections.defaultdict(lambda: [0, 0])
    for host, vcpus, memory_mib in db_api.usage_by_host(session, states.HOLDING_STATES):
        used[host][0] += vcpus
        used[host][1] += memory_mib
    return {h.name: {'cpus': h.cpus or h.vcpus, 'cpu_busy': h.cpu_busy, 'vcpus': h.vcpus,
                     'vcpus_used': used[h.name][0], 'memory_mib': h.memory_mib,
                     'memory_mib_used': used[h.name][1], 'up': h.state == states.HOST_UP}
            for h in db_api.hosts(session)}


def listener(session: db_api.Session, deployment: models.Deployment) -> dict:
    """What a gateway serves of one exposed deployment: its port, service, network and
    the VTEPs of its hosts, and its instances that are active now (one that is not
    takes no connection) and hold an address."""
    network = db_api.network_of(session, deployment.id)
    ports = networks.ports_by_instance(session, deployment.id)
    return {'deployment': deployment.id, 'cloud': deployment.cloud,
            'application': deployment.application,
            'listener_port': deployment.listener_port, 'protocol': deployment.protocol,
            'port': deployment.port,
            'network': networks.show(network) if network is not None else None,
            'peers': networks.gateway_peers(session, deployment.id),
            'instances': [{'id': i.id, 'name': i.name, 'host': i.host,
                           'address': ports[i.id].address, 'state': i.state}
                          for i in db_api.instances_of(session, deployment.id)
                          if i.state == states.ACTIVE and i.id in ports]}


def gateway_state(session: db_api.Session) -> dict:
    """Everything a gateway serves: {'clouds': {name: {'connection_limit'}},
    'applications': {name: {'connection_limit': int | None}}, 'hosts': host_loads,
    'listeners': [listener of every live deployment holding a listener port]}."""
    return {'clouds': {c.name: {'connection_limit': c.connection_limit}
                       for c in db_api.clouds(session)},
            'applications': {a.name: {'connection_limit': a.connection_limit}
                             for a in db_api.applications(session)},
            'hosts': host_loads(session),
            'listeners': [listener(session, d) for d in db_api.listener_deployments(session)
                          if d.state != states.DELETED]}


def refresh_after_commit(session: db_api.Session, gateway: Gateway | None) -> None:
    """Tell the gateways to read gateway_state once ``session`` committed (once, however
    many changes it holds). ``gateway`` None: there is none to tell."""
    if gateway is not None:
        db_api.after_commit(session, 'gateway refresh', lambda: _refresh(gateway))


def _refresh(gateway: Gateway) -> None:
    try:
        gateway.refresh()
    except exception.VmcloudError as exc:
        # The gateways poll gateway_state every [gateway] poll_interval: they catch up.
        LOG.warning('cannot tell the gateways to refresh: %s', exc)


class Clouds:
    """Clouds, applications, and the gateways' registrations and questions."""

    def __init__(self, conf: cfg.ConfigOpts, db: db_api.Database, gateway: Gateway | None,
                 compute: compute_rpcapi.ComputeAPI):
        self.conf = conf
        self.db = db
        self.gateway = gateway
        self.compute = compute

    # -- clouds ------------------------------------------------------------------

    def create_cloud(self, name: str, connection_limit: int,
                     hosts: list[str] | None = None) -> dict:
        """:raises: InvalidRequest (a bad name or limit), NameInUse (an InvalidRequest),
            HostNotFound, DatabaseError."""
        _check_name('cloud', name, CLOUD_NAME)
        _check_limit(connection_limit)
        hosts = sorted(set(hosts or []))
        try:
            with self.db.session() as session:
                if db_api.cloud_get(session, name) is not None:
                    raise exception.NameInUse('cloud', name)
                _known_hosts(session, hosts)
                db_api.cloud_create(session, name=name, connection_limit=connection_limit)
                for host in hosts:
                    db_api.cloud_host_add(session, name, host)
                LOG.info('cloud %s created: limit %d, hosts %s', name, connection_limit,
                         ', '.join(hosts) or 'all')
                return show_cloud(session, name)
        except db_api.Conflict as exc:  # another dispatcher made it meanwhile
            raise exception.NameInUse('cloud', name) from exc

    def update_cloud(self, name: str, connection_limit: int | None = None,
                     add_hosts: list[str] | None = None,
                     remove_hosts: list[str] | None = None) -> dict:
        """A new limit reaches the gateways at once; the hosts change only where new
        instances of the cloud go (those placed stay).

        :raises: CloudNotFound, InvalidRequest (a bad limit), HostNotFound, InUse (its
            last host removed), DatabaseError.
        """
        if connection_limit is not None:
            _check_limit(connection_limit)
        with self.db.session() as session:
            row = cloud(session, name, lock=True)
            _known_hosts(session, add_hosts or [])
            for host in sorted(set(add_hosts or [])):
                db_api.cloud_host_add(session, name, host)
            had_hosts = bool(db_api.cloud_hosts(session, name))
            for host in sorted(set(remove_hosts or [])):
                db_api.cloud_host_remove(session, name, host)
            if had_hosts and not db_api.cloud_hosts(session, name):
                # A cloud that lists no host places on every host: removing its last
                # one would widen it, not shrink it.
                raise exception.InUse('cloud', name, 'would be left with no host, which '
                                      'means every host: add another host first')
            if connection_limit is not None and connection_limit != row.connection_limit:
                LOG.info('cloud %s: connection limit %d -> %d', name, row.connection_limit,
                         connection_limit)
                row.connection_limit = connection_limit
                refresh_after_commit(session, self.gateway)
            session.flush()
            return show_cloud(session, name)

    def show_cloud(self, name: str) -> dict:
        """:raises: CloudNotFound, DatabaseError."""
        with self.db.session() as session:
            return show_cloud(session, name)

    def list_clouds(self, limit: int | None = None, marker: str | None = None) -> list[dict]:
        """By name; ``limit`` of them after the one named ``marker``.

        :raises: MarkerNotFound, DatabaseError."""
        with self.db.session() as session:
            return [show_cloud(session, c.name)
                    for c in db_api.clouds(session, limit, marker)]

    def delete_cloud(self, name: str) -> dict:
        """:returns: the cloud as it was.
        :raises: CloudNotFound; InUse (an InvalidRequest) for the default cloud, or
            while a deployment of it is not deleted (naming them); DatabaseError.
        """
        if name == DEFAULT:
            raise exception.InUse('cloud', DEFAULT, 'cannot be deleted: plain deploys use it')
        with self.db.session() as session:
            row = cloud(session, name, lock=True)
            shown = show_cloud(session, name)
            if shown['deployments']:
                raise exception.InUse(
                    'cloud', name, f'has deployments: {", ".join(shown["deployments"])}; '
                                   f'delete them first')
            db_api.cloud_delete(session, row)
            refresh_after_commit(session, self.gateway)
        LOG.info('cloud %s deleted', name)
        return shown

    # -- applications ------------------------------------------------------------

    def create_application(self, name: str, image: str, port: int, protocol: str,
                           vcpus: int, memory_mib: int, boot: dict | None = None,
                           health: dict | None = None,
                           connection_limit: int | None = None) -> dict:
        """``image``, ``boot`` and ``health`` as the caller checked them (see the
        dispatcher's endpoint); they are used as deploy's at each deploy.

        :raises: InvalidRequest (a bad name, service, size or limit), NameInUse (an
            InvalidRequest), DatabaseError.
        """
        _check_name('application', name, APPLICATION_NAME)
        check_application(port, protocol, vcpus, memory_mib, connection_limit)
        try:
            with self.db.session() as session:
                if db_api.application_get(session, name) is not None:
                    raise exception.NameInUse('application', name)
                db_api.application_create(
                    session, name=name, image=image, port=port, protocol=protocol,
                    vcpus=vcpus, memory_mib=memory_mib, boot=json.dumps(boot or {}),
                    health=json.dumps(health or {}), connection_limit=connection_limit)
                LOG.info('application %s created: %s, %s port %d', name, image, protocol,
                         port)
                return show_application(session, name)
        except db_api.Conflict as exc:
            raise exception.NameInUse('application', name) from exc

    def update_application(self, name: str, changes: dict) -> dict:
        """Change any of APPLICATION_FIELDS (a None ``connection_limit``: its cloud's
        only); ``image``, ``boot`` and ``health`` as the caller checked them (see the
        dispatcher's endpoint), the whole checked as create_application checks it.
        Deployments from now on use it; those made before keep what they were made
        with, but for a new limit, which holds at once on the gateways.

        :raises: ApplicationNotFound; InvalidRequest (a field it does not have, a bad
            service, size or limit), DatabaseError.
        """
        unknown = sorted(set(changes) - set(APPLICATION_FIELDS))
        if unknown:
            raise exception.InvalidRequest(
                f'application {name}: cannot change {", ".join(unknown)} (only '
                f'{", ".join(APPLICATION_FIELDS)})')
        with self.db.session() as session:
            row = db_api.application_get(session, name, lock=True)
            if row is None:
                raise exception.ApplicationNotFound(name)
            merged = {field: getattr(row, field) for field in APPLICATION_FIELDS}
            merged.update(changes)
            check_application(merged['port'], merged['protocol'], merged['vcpus'],
                              merged['memory_mib'], merged['connection_limit'])
            if merged['connection_limit'] != row.connection_limit:
                refresh_after_commit(session, self.gateway)
            for field, value in changes.items():
                if field in ('boot', 'health'):
                    value = json.dumps(value or {})
                setattr(row, field, value)
            session.flush()
            LOG.info('application %s changed: %s', name, ', '.join(sorted(changes)) or
                     'nothing')
            return show_application(session, name)

    def show_application(self, name: str) -> dict:
        """:raises: ApplicationNotFound, DatabaseError."""
        with self.db.session() as session:
            return show_application(session, name)

    def list_applications(self, limit: int | None = None,
                          marker: str | None = None) -> list[dict]:
        """By name; ``limit`` of them after the one named ``marker``.

        :raises: MarkerNotFound, DatabaseError."""
        with self.db.session() as session:
            return [show_application(session, a.name)
                    for a in db_api.applications(session, limit, marker)]

    def delete_application(self, name: str) -> dict:
        """:returns: the application as it was.
        :raises: ApplicationNotFound; InUse (an InvalidRequest) while a deployment of
            it is not deleted (naming them); DatabaseError.
        """
        with self.db.session() as session:
            shown = show_application(session, name)
            if shown['deployments']:
                raise exception.InUse(
                    'application', name,
                    f'is deployed: {", ".join(shown["deployments"])}; '
                    f'delete those deployments first')
            db_api.application_delete(session, application(session, name))
            refresh_after_commit(session, self.gateway)
        LOG.info('application %s deleted', name)
        return shown

    # -- gateways ----------------------------------------------------------------

    def register_gateway(self, name: str, vtep_address: str) -> dict:
        """Gateway ``name`` serves from now on, reached by the compute hosts at
        ``vtep_address`` ('' for none: all on one machine); a new or moved one is told to
        every host running an exposed deployment (set_network_peers).

        :returns: gateway_state. :raises: InvalidRequest if ``vtep_address`` is neither
            '' nor an IP address; DatabaseError.
        """
        if vtep_address:
            try:
                ipaddress.ip_address(vtep_address)
            except ValueError:
                raise exception.InvalidRequest(
                    f'gateway {name}: [network] vtep_address {vtep_address!r} is not an '
                    f'IP address') from None
        with self.db.session() as session:
            row = db_api.gateway_get(session, name, lock=True)
            if row is None:
                row = db_api.gateway_create(session, name)
                LOG.info('gateway %s joined (VTEP %s)', name, vtep_address or 'none')
            moved = row.vtep_address != vtep_address
            row.vtep_address = vtep_address
            row.last_seen = models.utcnow()
            session.flush()
            updates = networks.listener_peer_updates(session) if moved else []
            state = gateway_state(session)
        for host, network_id, peers in updates:
            try:
                self.compute.set_network_peers(host, network_id, peers)
            except exception.VmcloudError as exc:
                # The host learns them when it next registers or a build is cast there.
                LOG.error('cannot tell %s the peers of network %s: %s', host, network_id,
                          exc)
        return state

    def gateway_state(self) -> dict:
        """:raises: DatabaseError."""
        with self.db.session() as session:
            return gateway_state(session)

    def gateway_connections(self, cloud_name: str | None = None) -> list[dict]:
        """The connections the gateway holds (of ``cloud_name`` if given).

        :raises: CloudNotFound; GatewayUnavailable if no registered gateway answers
            within GATEWAY_TIMEOUT s; GatewayError.
        """
        return self._ask('connections', cloud_name)

    def gateway_stats(self, cloud_name: str | None = None) -> dict:
        """The gateway's counters of each cloud (of ``cloud_name`` if given).

        :raises: as gateway_connections.
        """
        return self._ask('stats', cloud_name)

    def _ask(self, question: str, cloud_name: str | None):
        """The first answer of the registered gateways, asked one at a time."""
        with self.db.session() as session:
            if cloud_name is not None:
                cloud(session, cloud_name)
            names = [g.name for g in db_api.gateways(session)]
        if self.gateway is not None:
            for name in names:
                try:
                    return getattr(self.gateway, question)(name, cloud=cloud_name,
                                                           timeout=GATEWAY_TIMEOUT)
                except exception.MessagingError as exc:  # gone, or not running: the next
                    LOG.warning('gateway %s did not answer %s: %s', name, question, exc)
        raise exception.GatewayUnavailable(names, GATEWAY_TIMEOUT)
