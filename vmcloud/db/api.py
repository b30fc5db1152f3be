"""Engine, sessions, schema upgrades, and every query the dispatcher runs."""
import contextlib
import datetime
import os
import threading
from collections.abc import Sequence
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

MIGRATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'migrations')


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

    def upgrade(self) -> None:
        """Bring the schema to the newest migration. :raises: DatabaseError."""
        config = alembic.config.Config()
        config.set_main_option('script_location', MIGRATIONS)
        with self._errors('upgrade the schema'), self.engine.begin() as connection:
            config.attributes['connection'] = connection
            alembic.command.upgrade(config, 'head')

    @contextlib.contextmanager
    def session(self) -> Iterator[orm.Session]:
        """:raises: DatabaseError if the database cannot be reached or refuses the work."""
        with self._writer, self._errors('use the database'), \
                self._sessions.begin() as session:
            yield session

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.TimeoutError) as exc:
            raise exception.DatabaseError(
                f'cannot {doing} at {self.engine.url.render_as_string()}: '
                f'{getattr(exc, "orig", None) or exc}') from exc

    def dispose(self) -> None:
        self.engine.dispose()


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


def hosts(session: orm.Session) -> list[models.Host]:
    """Every host, by name."""
    return list(session.scalars(sqlalchemy.select(models.Host).order_by(models.Host.name)))


def hosts_silent_since(session: orm.Session, deadline: datetime.datetime) -> list[models.Host]:
    """Hosts still up whose last heartbeat is older than ``deadline``, locked: a heartbeat
    committed meanwhile takes its host out of them."""
    return list(session.scalars(sqlalchemy.select(models.Host).where(
        models.Host.state == 'up', models.Host.last_heartbeat < deadline).with_for_update()))


def usage_by_host(session: orm.Session,
                  states: Sequence[str]) -> list[tuple[str, int, int]]:
    """(host, vcpus, memory_mib) of every placed instance in one of ``states``."""
    return [tuple(row) for row in session.execute(
        sqlalchemy.select(models.Instance.host, models.Deployment.vcpus,
                          models.Deployment.memory_mib)
        .join(models.Deployment, models.Instance.deployment_id == models.Deployment.id)
        .where(models.Instance.state.in_(states), models.Instance.host.is_not(None)))]


def deployment_create(session: orm.Session, **fields) -> models.Deployment:
    deployment = models.Deployment(**fields)
    session.add(deployment)
    session.flush()  # its instances refer to it
    return deployment


def deployment_get(session: orm.Session, deployment_id: str,
                   lock: bool = False) -> models.Deployment | None:
    return session.get(models.Deployment, deployment_id, with_for_update=lock)


def deployments(session: orm.Session) -> list[models.Deployment]:
    """Every deployment, oldest first."""
    return list(session.scalars(sqlalchemy.select(models.Deployment)
                                .order_by(models.Deployment.created_at)))


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


def snapshot_create(session: orm.Session, **fields) -> models.Snapshot:
    snapshot = models.Snapshot(**fields)
    session.add(snapshot)
    session.flush()  # its items refer to it
    return snapshot


def snapshot_get(session: orm.Session, snapshot_id: str,
                 lock: bool = False) -> models.Snapshot | None:
    return session.get(models.Snapshot, snapshot_id, with_for_update=lock)


def snapshots(session: orm.Session, deployment_id: str | None = None) -> list[models.Snapshot]:
    """Every snapshot (of ``deployment_id`` if given), newest first."""
    query = sqlalchemy.select(models.Snapshot).order_by(models.Snapshot.created_at.desc(),
                                                        models.Snapshot.id)
    if deployment_id is not None:
        query = query.where(models.Snapshot.deployment_id == deployment_id)
    return list(session.scalars(query))


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


def _state_counts(session: orm.Session, model: type[models.Base], where) -> dict[str, int]:
    session.flush()  # count the changes of this unit of work too
    rows = session.execute(sqlalchemy.select(model.state, sqlalchemy.func.count())
                           .where(where).group_by(model.state))
    return {state: count for state, count in rows}
