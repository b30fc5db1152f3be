"""The models and the migrations describe the same schema."""
import os
import subprocess

import alembic.autogenerate
import alembic.command
import alembic.config
import alembic.migration
import sqlalchemy

from vmcloud.db import api as db_api
from vmcloud.db import models
from tests import base


class MigrationsTest(base.TestCase):
    def test_the_migrated_schema_is_the_models(self):
        self.conf.set_override('connection', f'sqlite:///{self.tmp}/fresh.sqlite', 'database')
        db = db_api.Database(self.conf)
        self.addCleanup(db.dispose)
        db.upgrade()
        with db.engine.connect() as connection:
            context = alembic.migration.MigrationContext.configure(
                connection, opts={'compare_type': True, 'compare_server_default': True})
            differences = alembic.autogenerate.compare_metadata(context, models.Base.metadata)
        self.assertEqual([], differences)

    def test_a_difference_is_seen(self):
        # The check itself: a column the migrations do not create is reported.
        self.conf.set_override('connection', f'sqlite:///{self.tmp}/fresh.sqlite', 'database')
        db = db_api.Database(self.conf)
        self.addCleanup(db.dispose)
        db.upgrade()
        metadata = sqlalchemy.MetaData()
        for table in models.Base.metadata.tables.values():
            table.to_metadata(metadata)
        metadata.tables['hosts'].append_column(sqlalchemy.Column('extra', sqlalchemy.Integer))
        with db.engine.connect() as connection:
            context = alembic.migration.MigrationContext.configure(connection)
            differences = alembic.autogenerate.compare_metadata(context, metadata)
        self.assertEqual([('add_column', None, 'hosts', 'extra')],
                         [(d[0], d[1], d[2], d[3].name) for d in differences])


class UpgradeWithRowsTest(base.TestCase):
    """0002 on a database of 0001 with hosts in it, on SQLite and on PostgreSQL."""

    def upgrade_0001_rows(self, url: str) -> list[tuple]:
        self.conf.set_override('connection', url, 'database')
        db = db_api.Database(self.conf)
        self.addCleanup(db.dispose)
        config = alembic.config.Config()
        config.set_main_option('script_location', db_api.MIGRATIONS)
        with db.engine.begin() as connection:
            config.attributes['connection'] = connection
            alembic.command.upgrade(config, '0001')
            connection.execute(sqlalchemy.text(
                "INSERT INTO hosts (name, up, vcpus, memory_mib, disk_bytes_free, "
                "last_heartbeat) VALUES ('node1', true, 1, 1, 1, '2026-01-01'), "
                "('node2', false, 1, 1, 1, '2026-01-01')"))
        db.upgrade()
        with db.engine.connect() as connection:
            context = alembic.migration.MigrationContext.configure(
                connection, opts={'compare_type': True, 'compare_server_default': True})
            self.assertEqual([], alembic.autogenerate.compare_metadata(
                context, models.Base.metadata))
        with db.session() as session:
            return [(h.name, h.up, h.state, h.node_id, h.incarnation)
                    for h in db_api.hosts(session)]

    def test_sqlite(self):
        self.assertEqual([('node1', True, 'up', '', ''), ('node2', False, 'unknown', '', '')],
                         self.upgrade_0001_rows(f'sqlite:///{self.tmp}/old.sqlite'))

    def test_postgresql(self):
        database = f'vmcloud_migrations_{os.getpid()}'
        admin('su', 'postgres', '-c', f'createdb -O vmcloud {database}')
        self.addCleanup(admin, 'su', 'postgres', '-c', f'dropdb --force {database}')
        self.assertEqual([('node1', True, 'up', '', ''), ('node2', False, 'unknown', '', '')],
                         self.upgrade_0001_rows(
                             f'postgresql+psycopg://vmcloud:vmcloud@127.0.0.1/{database}'))


def admin(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=60)
