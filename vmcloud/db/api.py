"""Engine, sessions, schema upgrades, and every query the dispatcher runs."""
import contextlib
import datetime
import os
import logging
import threading
from collections.abc import Sequence
from typing import Callable
from typing import Iterator

import alembic.command
import alembic.config
import sqlalchemy
from oslo_config import cfg
from sqlalchemy import orm

from vmcloud import exception
from vmcloud.db import models

# The unit of work every query below takes; callers need not import SQLAlchemy.
Session = orm.Session

LOG = logging.getLogger(__name__)

MIGRATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'migrations')


class Conflict(exception.DatabaseError):
    """A unit of work was refused by a unique constraint (or another integrity rule):
    another unit of work took the same value first, so this one wrote nothing. Trying
    again reads what the other committed."""


class Database:
    """One engine per process; ``session()`` is a unit of work that commits or rolls back."""

    def __init__(self, conf: cfg.ConfigOpts):
        url = conf.database.connection
        if url.startswith('sqlite:///'):
            os.makedirs(os.path.dirname(os.path.abspath(url[len('sqlite:///'):])), exist_ok=True)
        sqlite = url.startswith('sqlite')
        # Every RPC handler thread (oslo.messaging runs up to 64) may want a connection.
        pool = {} if sqlite else {'pool_size': 10, 'max_overflow': 64}
        try:
            # pre_ping: a connection that died with a database restart is replaced.
            self.engine = sqlalchemy.create_engine(url, pool_pre_ping=True, **pool)
        except (sqlalchemy.exc.ArgumentError, ImportError) as exc:
            raise exception.ConfigError(f'bad [database] connection: {exc}') from exc
        # SQLite has one writer at a time: threads queue here rather than each holding a
        # pooled connection while it waits for the file lock.
        self._writer = threading.RLock() if sqlite else contextlib.nullcontext()
        if sqlite:
            sqlalchemy.event.listen(self.engine, 'connect', _sqlite_pragmas)
            sqlalchemy.event.listen(self.engine, 'begin', _sqlite_begin)
        self._sessions = orm.sessionmaker(self.engine, expire_on_commit=False)
        self._default_connection_limit = conf.gateway.default_connection_limit

    def upgrade(self) -> None:
        """Bring the schema to the newest migration. :raises: DatabaseError."""
        config = alembic.config.Config()
        config.set_main_option('script_location', MIGRATIONS)
        with self._errors('upgrade the schema'), self.engine.begin() as connection:
            config.attributes['connection'] = connection
            # The limit of the default cloud migration 0004 makes.
            config.attributes['default_connection_limit'] = self._default_connection_limit
            alembic.command.upgrade(config, 'head')

    @contextlib.contextmanager
    def session(self) -> Iterator[orm.Session]:
        """Once it committed, the work ``after_commit`` registered in it runs.

        :raises: DatabaseError if the database cannot be reached or refuses the work;
            Conflict (a DatabaseError) if a unique constraint refused it."""
        with self._writer, self._errors('use the database'), \
                self._sessions.begin() as session:
            yield session
        # Not reached if the work raised: it rolled back, and nothing of it is to tell.
        _run_after_commit(session)

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except sqlalchemy.exc.IntegrityError as exc:
            raise Conflict(f'cannot {doing}: refused by the database: '
                           f'{getattr(exc, "orig", None) or exc}') from exc
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.TimeoutError) as exc:
            raise exception.DatabaseError(
                f'cannot {doing} at {self.engine.url.render_as_string()}: '
                f'{getattr(exc, "orig", None) or exc}') from exc

    def dispose(self) -> None:
        self.engine.dispose()


def after_commit(session: orm.Session, key: str, work: Callable[[], None]) -> None:
    """Run ``work`` once ``session`` committed (not if it rolls back), with no lock
    held: what is told of the change (a cast) must never tell of work that did not
    happen. Registered several times under one ``key``, it runs once."""
    session.info.setdefault('after_commit', {})[key] = work


def _run_after_commit(session: orm.Session) -> None:
    for key, work in session.info.pop('after_commit', {}).items():
        try:
            work()
        except Exception:  # the work committed: what follows it must not fail it
            LOG.exception('after commit: %s failed', key)


def _sqlite_pragmas(connection, _record) -> None:
    # pysqlite's own transaction handling begins lazily and upgrades a reader to a
    # writer later, which fails at once (SQLITE_BUSY) when another writer got in
    # between; every unit of work takes the write lock up front instead.
    connection.isolation_level = None
    cursor = connection.cursor()
    cursor.execute('PRAGMA foreign_keys=ON')
    cursor.execute('PRAGMA journal_mode=WAL')  # readers do not block the writer
    cursor.execute('PRAGMA busy_timeout=30000')
    cursor.close()


def _sqlite_begin(connection) -> None:
    connection.exec_driver_sql('BEGIN IMMEDIATE')


# -- queries ---------------------------------------------------------------
# Every statement the dispatcher runs, by name; each takes the session of the
# caller's unit of work. "lock" takes the row with SELECT ... FOR UPDATE.

def host_get(session: orm.Session, name: str, lock: bool = False) -> models.Host | None:
    return session.get(models.Host, name, with_for_update=lock)


def host_create(session: orm.Session, name: str) -> models.Host:
    host = models.Host(name=name)
    session.add(host)
    return host


def hosts(session: orm.Session, limit: int | None = None,
          marker: str | None = None) -> list[models.Host]:
    """Every host (a page of them: see _by_name), by name. :raises: MarkerNotFound."""
    return _by_name(session, models.Host, limit, marker)


def hosts_silent_since(session: orm.Session, deadline: datetime.datetime) -> list[models.Host]:
    """Hosts still up whose last heartbeat is older than ``deadline``, locked: a heartbeat
    committed meanwhile takes its host out of them."""
    return list(session.scalars(sqlalchemy.select(models.Host).where(
        models.Host.state == 'up', models.Host.last_heartbeat < deadline).with_for_update()))


def peer_urls(session: orm.Session, state: str) -> dict[str, str]:
    """{host: its peer URL} of every host in ``state`` that has one."""
    return dict(session.execute(
        sqlalchemy.select(models.Host.name, models.Host.peer_url)
        .where(models.Host.state == state, models.Host.peer_url != '')
        .order_by(models.Host.name)).tuples().all())


def usage_by_host(session: orm.Session,
                  states: Sequence[str]) -> list[tuple[str, int, int]]:
    """(host, vcpus, memory_mib) of every placed instance in one of ``states``."""
    return [tuple(row) for row in session.execute(
        sqlalchemy.select(models.Instance.host, models.Deployment.vcpus,
                          models.Deployment.memory_mib)
        .join(models.Deployment, models.Instance.deployment_id == models.Deployment.id)
        .where(models.Instance.state.in_(states), models.Instance.host.is_not(None)))]


# vmcloud.dispatcher.states.DELETED (this layer is below the dispatcher's): a
# deployment in it is gone but for its row.
_DELETED = 'deleted'


def live_deployment_ids(session: orm.Session, cloud: str | None = None,
                        application: str | None = None) -> list[str]:
    """The ids of the deployments not deleted in ``cloud`` and/or of ``application``."""
    query = sqlalchemy.select(models.Deployment.id).where(models.Deployment.state != _DELETED)
    if cloud is not None:
        query = query.where(models.Deployment.cloud == cloud)
    if application is not None:
        query = query.where(models.Deployment.application == application)
    return list(session.scalars(query.order_by(models.Deployment.id)))


def listener_ports_in_use(session: orm.Session) -> set[int]:
    """The listener ports deployments hold (a deleted one holds none)."""
    return set(session.scalars(sqlalchemy.select(models.Deployment.listener_port).where(
        models.Deployment.listener_port.is_not(None))))


def listener_deployments(session: orm.Session) -> list[models.Deployment]:
    """The deployments holding a listener port, by port."""
    return list(session.scalars(sqlalchemy.select(models.Deployment).where(
        models.Deployment.listener_port.is_not(None)).order_by(
            models.Deployment.listener_port)))


def deployment_create(session: orm.Session, **fields) -> models.Deployment:
    deployment = models.Deployment(**fields)
    session.add(deployment)
    session.flush()  # its instances refer to it
    return deployment


def deployment_get(session: orm.Session, deployment_id: str,
                   lock: bool = False) -> models.Deployment | None:
    return session.get(models.Deployment, deployment_id, with_for_update=lock)


def deployments(session: orm.Session, limit: int | None = None, marker: str | None = None,
                cloud: str | None = None, owner: str | None = None) -> list[models.Deployment]:
    """Every deployment (in ``cloud``, of ``owner``, if given; a page of them: see
    _newest_first), newest first. :raises: MarkerNotFound."""
    query = sqlalchemy.select(models.Deployment)
    if cloud is not None:
        query = query.where(models.Deployment.cloud == cloud)
    if owner is not None:
        query = query.where(models.Deployment.owner == owner)
    return _newest_first(session, models.Deployment, query, limit, marker)


def instance_create(session: orm.Session, **fields) -> models.Instance:
    instance = models.Instance(**fields)
    session.add(instance)
    return instance


def instance_lock(session: orm.Session, instance_id: str) -> models.Instance | None:
    """The instance, locked, with its deployment locked first: the deployment's state
    is computed from all its instances, so their updates must not interleave."""
    instance = session.get(models.Instance, instance_id)
    if instance is not None:
        session.get(models.Deployment, instance.deployment_id, with_for_update=True)
        session.refresh(instance, with_for_update=True)
    return instance


def instances_of(session: orm.Session, deployment_id: str) -> list[models.Instance]:
    """A deployment's instances, by name."""
    return list(session.scalars(sqlalchemy.select(models.Instance).where(
        models.Instance.deployment_id == deployment_id).order_by(models.Instance.name)))


def instances_on(session: orm.Session, host: str,
                 states: Sequence[str]) -> list[models.Instance]:
    """The instances placed on ``host`` in one of ``states``."""
    return list(session.scalars(sqlalchemy.select(models.Instance).where(
        models.Instance.host == host, models.Instance.state.in_(states))))


def instances_building_past(session: orm.Session,
                            now: datetime.datetime) -> list[models.Instance]:
    """Building instances whose build deadline is before ``now``."""
    return list(session.scalars(sqlalchemy.select(models.Instance).where(
        models.Instance.state == 'building', models.Instance.deadline.is_not(None),
        models.Instance.deadline < now)))


def instance_get(session: orm.Session, instance_id: str) -> models.Instance | None:
    return session.get(models.Instance, instance_id)


def instance_by_name(session: orm.Session, name: str) -> models.Instance | None:
    return session.scalar(sqlalchemy.select(models.Instance).where(models.Instance.name == name))


def instance_state_counts(session: orm.Session, deployment_id: str) -> dict[str, int]:
    """{state: how many of the deployment's instances are in it}."""
    return _state_counts(session, models.Instance,
                         models.Instance.deployment_id == deployment_id)


def network_create(session: orm.Session, **fields) -> models.Network:
    network = models.Network(**fields)
    session.add(network)
    session.flush()  # its ports refer to it
    return network


def network_of(session: orm.Session, deployment_id: str) -> models.Network | None:
    """The deployment's network, if it has one (yet, or still)."""
    return session.scalar(sqlalchemy.select(models.Network).where(
        models.Network.deployment_id == deployment_id))


def network_get(session: orm.Session, network_id: str) -> models.Network | None:
    return session.get(models.Network, network_id)


def networks_in_use(session: orm.Session) -> tuple[set[str], set[int]]:
    """(the subnets, the VNIs) of every network."""
    rows = session.execute(sqlalchemy.select(models.Network.cidr, models.Network.vni)).all()
    return {cidr for cidr, _ in rows}, {vni for _, vni in rows}


def network_delete(session: orm.Session, network: models.Network) -> None:
    """The network and every port left of it."""
    session.execute(sqlalchemy.delete(models.Port).where(
        models.Port.network_id == network.id))
    session.delete(network)
    session.flush()  # its VNI and subnet are free for the next one of this unit of work


def port_create(session: orm.Session, **fields) -> models.Port:
    port = models.Port(**fields)
    session.add(port)
    session.flush()  # the next address picked in this unit of work sees it taken
    return port


def port_delete(session: orm.Session, port: models.Port) -> None:
    session.delete(port)
    session.flush()


def ports_of(session: orm.Session, network_id: str) -> list[models.Port]:
    """Every port of a network, by address."""
    return list(session.scalars(sqlalchemy.select(models.Port).where(
        models.Port.network_id == network_id).order_by(models.Port.address)))


def port_of_instance(session: orm.Session, instance_id: str) -> models.Port | None:
    return session.scalar(sqlalchemy.select(models.Port).where(
        models.Port.instance_id == instance_id))


def dhcp_port(session: orm.Session, network_id: str, host: str) -> models.Port | None:
    """The port of ``host``'s DHCP server in the network, if it has one."""
    return session.scalar(sqlalchemy.select(models.Port).where(
        models.Port.network_id == network_id, models.Port.kind == 'dhcp',
        models.Port.host == host))


def instance_port_count(session: orm.Session, network_id: str) -> int:
    """How many instance ports the network has left."""
    return session.scalar(sqlalchemy.select(sqlalchemy.func.count()).select_from(
        models.Port).where(models.Port.network_id == network_id,
                           models.Port.kind == 'instance'))


def vtep_addresses(session: orm.Session, hosts: Sequence[str]) -> dict[str, str]:
    """{host: its VTEP address ('' if none)} of those of ``hosts`` that are known."""
    return dict(session.execute(sqlalchemy.select(models.Host.name, models.Host.vtep_address)
                                .where(models.Host.name.in_(list(hosts)))).tuples().all())


def cloud_create(session: orm.Session, **fields) -> models.Cloud:
    cloud = models.Cloud(**fields)
    session.add(cloud)
    session.flush()  # its hosts refer to it
    return cloud


def cloud_get(session: orm.Session, name: str, lock: bool = False) -> models.Cloud | None:
    return session.get(models.Cloud, name, with_for_update=lock)


def clouds(session: orm.Session, limit: int | None = None,
           marker: str | None = None) -> list[models.Cloud]:
    """Every cloud (a page of them: see _by_name), by name. :raises: MarkerNotFound."""
    return _by_name(session, models.Cloud, limit, marker)


def cloud_delete(session: orm.Session, cloud: models.Cloud) -> None:
    """The cloud and its host list."""
    session.execute(sqlalchemy.delete(models.CloudHost).where(
        models.CloudHost.cloud == cloud.name))
    session.delete(cloud)


def cloud_hosts(session: orm.Session, cloud: str) -> list[str]:
    """The hosts listed for ``cloud``, by name."""
    return list(session.scalars(sqlalchemy.select(models.CloudHost.host).where(
        models.CloudHost.cloud == cloud).order_by(models.CloudHost.host)))


def cloud_host_add(session: orm.Session, cloud: str, host: str) -> None:
    """List ``host`` for ``cloud`` (a host listed already stays listed once)."""
    if session.get(models.CloudHost, (cloud, host)) is None:
        session.add(models.CloudHost(cloud=cloud, host=host))
        session.flush()


def cloud_host_remove(session: orm.Session, cloud: str, host: str) -> None:
    session.execute(sqlalchemy.delete(models.CloudHost).where(
        models.CloudHost.cloud == cloud, models.CloudHost.host == host))


def application_create(session: orm.Session, **fields) -> models.Application:
    application = models.Application(**fields)
    session.add(application)
    session.flush()  # a second one of the name is refused here (Conflict)
    return application


def application_get(session: orm.Session, name: str,
                    lock: bool = False) -> models.Application | None:
    return session.get(models.Application, name, with_for_update=lock)


def applications(session: orm.Session, limit: int | None = None,
                 marker: str | None = None) -> list[models.Application]:
    """Every application (a page of them: see _by_name), by name.

    :raises: MarkerNotFound.
    """
    return _by_name(session, models.Application, limit, marker)


def application_delete(session: orm.Session, application: models.Application) -> None:
    session.delete(application)


def gateway_get(session: orm.Session, name: str, lock: bool = False) -> models.Gateway | None:
    return session.get(models.Gateway, name, with_for_update=lock)


def gateway_create(session: orm.Session, name: str) -> models.Gateway:
    gateway = models.Gateway(name=name)
    session.add(gateway)
    return gateway


def gateways(session: orm.Session) -> list[models.Gateway]:
    """Every registered gateway, by name."""
    return list(session.scalars(sqlalchemy.select(models.Gateway)
                                .order_by(models.Gateway.name)))


def snapshot_create(session: orm.Session, **fields) -> models.Snapshot:
    snapshot = models.Snapshot(**fields)
    session.add(snapshot)
    session.flush()  # its items refer to it
    return snapshot


def snapshot_get(session: orm.Session, snapshot_id: str,
                 lock: bool = False) -> models.Snapshot | None:
    return session.get(models.Snapshot, snapshot_id, with_for_update=lock)


def snapshots(session: orm.Session, deployment_id: str | None = None,
              limit: int | None = None, marker: str | None = None) -> list[models.Snapshot]:
    """Every snapshot (of ``deployment_id`` if given; a page of them: see
    _newest_first), newest first. :raises: MarkerNotFound."""
    query = sqlalchemy.select(models.Snapshot)
    if deployment_id is not None:
        query = query.where(models.Snapshot.deployment_id == deployment_id)
    return _newest_first(session, models.Snapshot, query, limit, marker)


def snapshot_item_create(session: orm.Session, **fields) -> models.SnapshotItem:
    item = models.SnapshotItem(**fields)
    session.add(item)
    return item


def snapshot_item_get(session: orm.Session, snapshot_id: str, instance_id: str,
                      lock: bool = False) -> models.SnapshotItem | None:
    return session.get(models.SnapshotItem, (snapshot_id, instance_id), with_for_update=lock)


def snapshot_items(session: orm.Session, snapshot_id: str) -> list[models.SnapshotItem]:
    return list(session.scalars(sqlalchemy.select(models.SnapshotItem).where(
        models.SnapshotItem.snapshot_id == snapshot_id)))


def snapshot_items_of(session: orm.Session,
                      snapshot_ids: list[str]) -> list[models.SnapshotItem]:
    """The items of every snapshot of ``snapshot_ids`` (a page of a listing)."""
    if not snapshot_ids:
        return []
    return list(session.scalars(sqlalchemy.select(models.SnapshotItem).where(
        models.SnapshotItem.snapshot_id.in_(snapshot_ids))))


def snapshot_items_past_deadline(session: orm.Session,
                                 now: datetime.datetime) -> list[models.SnapshotItem]:
    """Items still freezing or uploading whose deadline is before ``now``."""
    return list(session.scalars(sqlalchemy.select(models.SnapshotItem).where(
        models.SnapshotItem.state.in_(('freezing', 'uploading')),
        models.SnapshotItem.deadline.is_not(None), models.SnapshotItem.deadline < now)))


def snapshot_item_state_counts(session: orm.Session, snapshot_id: str) -> dict[str, int]:
    """{state: how many of the snapshot's items are in it}."""
    return _state_counts(session, models.SnapshotItem,
                         models.SnapshotItem.snapshot_id == snapshot_id)


# -- what the monitoring shows -------------------------------------------------
# Counts, one GROUP BY each: they must stay cheap with 100,000 deployments.

def deployment_counts(session: orm.Session) -> dict[tuple[str, str], int]:
    """{(cloud, state): how many deployments of the cloud are in it}."""
    rows = session.execute(sqlalchemy.select(
        models.Deployment.cloud, models.Deployment.state, sqlalchemy.func.count())
        .group_by(models.Deployment.cloud, models.Deployment.state))
    return {(cloud, state): count for cloud, state, count in rows}


def instance_counts(session: orm.Session) -> dict[tuple[str, str], int]:
    """{(cloud, state): how many instances of the cloud's deployments are in it}."""
    rows = session.execute(sqlalchemy.select(
        models.Deployment.cloud, models.Instance.state, sqlalchemy.func.count())
        .join(models.Deployment, models.Instance.deployment_id == models.Deployment.id)
        .group_by(models.Deployment.cloud, models.Instance.state))
    return {(cloud, state): count for cloud, state, count in rows}


def deployed_applications(session: orm.Session,
                          instance_state: str | None = None) -> list[tuple[str, str]]:
    """The (cloud, application) pairs, sorted, of every deployment of an application
    that is not deleted; with ``instance_state``, only those with an instance in it."""
    query = sqlalchemy.select(models.Deployment.cloud, models.Deployment.application).where(
        models.Deployment.application.is_not(None), models.Deployment.state != _DELETED)
    if instance_state is not None:
        query = query.join(models.Instance,
                           models.Instance.deployment_id == models.Deployment.id).where(
            models.Instance.state == instance_state)
    return [tuple(row) for row in session.execute(
        query.distinct().order_by(models.Deployment.cloud, models.Deployment.application))]


def cloud_host_pairs(session: orm.Session) -> list[tuple[str, str]]:
    """Every (cloud, host) a cloud lists, sorted."""
    return [tuple(row) for row in session.execute(
        sqlalchemy.select(models.CloudHost.cloud, models.CloudHost.host)
        .order_by(models.CloudHost.cloud, models.CloudHost.host))]


def instance_counts_by_host(session: orm.Session, states: Sequence[str]) -> dict[str, int]:
    """{host: how many instances placed on it are in one of ``states``}."""
    rows = session.execute(sqlalchemy.select(models.Instance.host, sqlalchemy.func.count())
                           .where(models.Instance.state.in_(states),
                                  models.Instance.host.is_not(None))
                           .group_by(models.Instance.host))
    return {host: count for host, count in rows}


# -- the REST API's users and tokens ----------------------------------------------

def api_user_create(session: orm.Session, name: str, password_hash: str,
                    role: str) -> models.ApiUser:
    user = models.ApiUser(name=name, password_hash=password_hash, role=role)
    session.add(user)
    session.flush()  # a second one of the name is refused here (Conflict)
    return user


def api_user_get(session: orm.Session, name: str) -> models.ApiUser | None:
    return session.get(models.ApiUser, name)


def api_users(session: orm.Session, limit: int | None = None,
              marker: str | None = None) -> list[models.ApiUser]:
    """Every user (a page of them: see _by_name), by name. :raises: MarkerNotFound."""
    return _by_name(session, models.ApiUser, limit, marker)


def api_user_delete(session: orm.Session, user: models.ApiUser) -> None:
    """The user and every token of it."""
    api_tokens_delete_of(session, user)
    session.delete(user)


def api_token_create(session: orm.Session, token_id: str, user: str,
                     expires_at: datetime.datetime) -> models.ApiToken:
    """``token_id``: the token's sha256 (hex)."""
    token = models.ApiToken(id=token_id, user=user, expires_at=expires_at)
    session.add(token)
    session.flush()
    return token


def api_token_get(session: orm.Session, token_id: str) -> models.ApiToken | None:
    return session.get(models.ApiToken, token_id)


def api_token_delete(session: orm.Session, token: models.ApiToken) -> None:
    session.delete(token)


def api_tokens_delete_of(session: orm.Session, user: models.ApiUser) -> int:
    """Delete every token of ``user`` (expired or not). :returns: how many."""
    return session.execute(sqlalchemy.delete(models.ApiToken).where(
        models.ApiToken.user == user.name)).rowcount


def api_tokens_delete_expired(session: orm.Session, now: datetime.datetime) -> int:
    """Delete the tokens that expired before ``now``. :returns: how many."""
    return session.execute(sqlalchemy.delete(models.ApiToken).where(
        models.ApiToken.expires_at < now)).rowcount


# -- pages --------------------------------------------------------------------------
# A page is ``limit`` rows (None: all) after ``marker``, the key of the last row of
# the previous page (None: from the first). Keyset, not OFFSET: a page costs the same
# however far down, and rows added meanwhile shift no row into the next page twice.

def _by_name(session: orm.Session, model: type[models.Base], limit: int | None,
             marker: str | None) -> list:
    """A page of the rows of ``model`` (its primary key ``name``), by name.

    :raises: MarkerNotFound if ``marker`` names no row.
    """
    query = sqlalchemy.select(model).order_by(model.name)
    if marker is not None:
        if session.get(model, marker) is None:
            raise exception.MarkerNotFound(marker)
        query = query.where(model.name > marker)
    return list(session.scalars(query.limit(limit)))


def _newest_first(session: orm.Session, model: type[models.Base], query,
                  limit: int | None, marker: str | None) -> list:
    """A page of what ``query`` selects of ``model`` (a primary key ``id`` and a
    ``created_at``), newest first: (created_at, id) descending, so rows made in the
    same instant still have one order.

    :raises: MarkerNotFound if ``marker`` is the id of no row.
    """
    if marker is not None:
        last = session.get(model, marker)
        if last is None:
            raise exception.MarkerNotFound(marker)
        query = query.where(sqlalchemy.or_(
            model.created_at < last.created_at,
            sqlalchemy.and_(model.created_at == last.created_at, model.id < last.id)))
    query = query.order_by(model.created_at.desc(), model.id.desc())
    return list(session.scalars(query.limit(limit)))


def _state_counts(session: orm.Session, model: type[models.Base], where) -> dict[str, int]:
    session.flush()  # count the changes of this unit of work too
    rows = session.execute(sqlalchemy.select(model.state, sqlalchemy.func.count())
                           .where(where).group_by(model.state))
    return {state: count for state, count in rows}
