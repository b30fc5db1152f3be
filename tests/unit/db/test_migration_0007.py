"""0007 (snapshots on peers first) on a database of 0006 with snapshot items in it, on
SQLite and on PostgreSQL: an item stored before is replicated and persistent, the others
neither."""

import alembic.autogenerate
import alembic.command
import alembic.config
import alembic.migration
import sqlalchemy

from vmcloud.db import api as db_api
from vmcloud.db import models
from tests import base


class Upgrade0006WithRowsTest(base.TestCase):
    def upgrade_0006_rows(self, url: str) -> None:
        self.conf.set_override('connection', url, 'database')
        db = db_api.Database(self.conf)
        self.addCleanup(db.dispose)
        config = alembic.config.Config()
        config.set_main_option('script_location', db_api.MIGRATIONS)
        with db.engine.begin() as connection:
            config.attributes['connection'] = connection
            alembic.command.upgrade(config, '0006')
            statements = [
                "INSERT INTO deployments (id, image, count, min_count, vcpus, memory_mib, "
                "boot, health, state, reason, created_at, cloud) VALUES ('d1', 'guest:1', "
                "2, 2, 1, 512, '{}', '{}', 'active', '', '2026-01-01', 'default')",
                "INSERT INTO snapshots (id, deployment_id, state, reason, created_at) "
                "VALUES ('s1', 'd1', 'partial', 'vm-1: lost', '2026-01-02')"]
            for number, state in enumerate(('available', 'error')):
                statements += [
                    "INSERT INTO instances (id, name, deployment_id, image, host, state, "
                    "reason, attempts, failed_hosts, fetched_bytes, created_at, updated_at) "
                    f"VALUES ('i{number}', 'vm-{number}', 'd1', 'guest:1', 'node1', "
                    "'active', '', 1, '', 0, '2026-01-01', '2026-01-01')",
                    "INSERT INTO snapshot_items (snapshot_id, instance_id, state, version, "
                    "reason, dirty_bytes, uploaded_bytes) VALUES ('s1', "
                    f"'i{number}', '{state}', 'vm-{number}:1', '', 0, 0)"]
            for statement in statements:
                connection.execute(sqlalchemy.text(statement))
        db.upgrade()
        with db.engine.connect() as connection:
            context = alembic.migration.MigrationContext.configure(
                connection, opts={'compare_type': True, 'compare_server_default': True})
            self.assertEqual([], alembic.autogenerate.compare_metadata(
                context, models.Base.metadata))
        with db.session() as session:
            self.assertEqual([('i0', True, True), ('i1', False, False)],
                             sorted((i.instance_id, i.replicated, i.persistent)
                                    for i in db_api.snapshot_items(session, 's1')))

    def test_sqlite(self):
        self.upgrade_0006_rows(f'sqlite:///{self.tmp}/old.sqlite')

    def test_postgresql(self):
        url = base.postgres_database(self.addCleanup, 'vmcloud_migrations_0007')
        self.upgrade_0006_rows(url)
