"""Engine, sessions and schema upgrades."""
import contextlib
import os
import threading
from typing import Iterator

import alembic.command
import alembic.config
import sqlalchemy
from oslo_config import cfg
from sqlalchemy import orm

from vmcloud import exception

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
