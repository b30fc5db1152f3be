"""The models and the migrations describe the same schema."""
import datetime

import alembic.autogenerate
import alembic.command
import alembic.config
import alembic.migration
import sqlalchemy

from vmcloud.db import api as db_api
from vmcloud.db import models
from vmcloud.dispatcher import clouds
from vmcloud.dispatcher import views
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
        url = base.postgres_database(self.addCleanup, 'vmcloud_migrations')
        self.assertEqual([('node1', True, 'up', '', ''), ('node2', False, 'unknown', '', '')],
                         self.upgrade_0001_rows(
                             url))


class Upgrade0002WithRowsTest(base.TestCase):
    """0003 (guest networks) on a database of 0002 with a host, a deployment and its
    instance in it, on SQLite and on PostgreSQL: the rows stay, with no VTEP, the marker
    health check and no network; new deployments get one."""

    def upgrade_0002_rows(self, url: str) -> None:
        self.conf.set_override('connection', url, 'database')
        db = db_api.Database(self.conf)
        self.addCleanup(db.dispose)
        config = alembic.config.Config()
        config.set_main_option('script_location', db_api.MIGRATIONS)
        with db.engine.begin() as connection:
            config.attributes['connection'] = connection
            alembic.command.upgrade(config, '0002')
            for statement in (
                    "INSERT INTO hosts (name, up, state, node_id, incarnation, vcpus, "
                    "memory_mib, disk_bytes_free, last_heartbeat) VALUES ('node1', true, "
                    "'up', 'id-node1', 'inc', 4, 4096, 1, '2026-01-01')",
                    "INSERT INTO deployments (id, image, count, min_count, vcpus, memory_mib, "
                    "boot, state, reason, created_at) VALUES ('d1', 'guest:1', 1, 1, 1, 512, "
                    "'{}', 'active', '', '2026-01-01')",
                    "INSERT INTO instances (id, name, deployment_id, image, host, state, "
                    "reason, attempts, failed_hosts, fetched_bytes, created_at, updated_at) "
                    "VALUES ('i1', 'vm-d1-0', 'd1', 'guest:1', 'node1', 'active', '', 1, '', "
                    "0, '2026-01-01', '2026-01-01')"):
                connection.execute(sqlalchemy.text(statement))
        db.upgrade()
        with db.engine.connect() as connection:
            context = alembic.migration.MigrationContext.configure(
                connection, opts={'compare_type': True, 'compare_server_default': True})
            self.assertEqual([], alembic.autogenerate.compare_metadata(
                context, models.Base.metadata))
        with db.session() as session:
            host, = db_api.hosts(session)
            self.assertEqual(('node1', 'id-node1', ''), (host.name, host.node_id,
                                                         host.vtep_address))
            old = views.show_deployment(session, 'd1')
        self.assertEqual(({'kind': 'marker'}, None), (old['health'], old['network']))
        self.assertEqual([('vm-d1-0', 'active', None, None)],
                         [(i['name'], i['state'], i['address'], i['mac'])
                          for i in old['instances']])
        # The new tables take rows, and refuse a second network of one subnet.
        with db.session() as session:
            db_api.network_create(session, id='n1', deployment_id='d1', vni=1000,
                                  cidr='10.200.0.0/24', state='active')
            db_api.port_create(session, id='p1', network_id='n1', address='10.200.0.2',
                               mac='52:54:00:c8:00:02', kind='instance', instance_id='i1')
        self.assertRaises(db_api.Conflict, self._second_network, db)
        with db.session() as session:
            self.assertEqual('10.200.0.2', views.show_deployment(
                session, 'd1')['instances'][0]['address'])

    @staticmethod
    def _second_network(db: db_api.Database) -> None:
        with db.session() as session:
            db_api.deployment_create(session, id='d2', image='guest:1', count=1,
                                     min_count=1, vcpus=1, memory_mib=512, state='active')
            db_api.network_create(session, id='n2', deployment_id='d2', vni=1001,
                                  cidr='10.200.0.0/24', state='active')

    def test_sqlite(self):
        self.upgrade_0002_rows(f'sqlite:///{self.tmp}/old.sqlite')

    def test_postgresql(self):
        url = base.postgres_database(self.addCleanup, 'vmcloud_migrations_0003')
        self.upgrade_0002_rows(url)


class Upgrade0003WithRowsTest(base.TestCase):
    """0004 (the gateway) on a database of 0003 with a host, a deployment and its
    instance in it, on SQLite and on PostgreSQL: the default cloud is made with
    [gateway] default_connection_limit, the deployment is in it and not exposed, the
    host's load is unknown (its vCPUs stand for its CPUs); listener ports are unique."""

    def upgrade_0003_rows(self, url: str) -> None:
        self.conf.set_override('connection', url, 'database')
        self.conf.set_override('default_connection_limit', 77, 'gateway')
        db = db_api.Database(self.conf)
        self.addCleanup(db.dispose)
        config = alembic.config.Config()
        config.set_main_option('script_location', db_api.MIGRATIONS)
        with db.engine.begin() as connection:
            config.attributes['connection'] = connection
            alembic.command.upgrade(config, '0003')
            for statement in (
                    "INSERT INTO hosts (name, up, state, node_id, incarnation, vcpus, "
                    "memory_mib, disk_bytes_free, last_heartbeat, vtep_address) VALUES "
                    "('node1', true, 'up', 'id-node1', 'inc', 4, 4096, 1, '2026-01-01', '')",
                    "INSERT INTO deployments (id, image, count, min_count, vcpus, memory_mib, "
                    "boot, health, state, reason, created_at) VALUES ('d1', 'guest:1', 1, 1, "
                    "1, 512, '{}', '{}', 'active', '', '2026-01-01')",
                    "INSERT INTO instances (id, name, deployment_id, image, host, state, "
                    "reason, attempts, failed_hosts, fetched_bytes, created_at, updated_at) "
                    "VALUES ('i1', 'vm-d1-0', 'd1', 'guest:1', 'node1', 'active', '', 1, '', "
                    "0, '2026-01-01', '2026-01-01')"):
                connection.execute(sqlalchemy.text(statement))
        db.upgrade()
        with db.engine.connect() as connection:
            context = alembic.migration.MigrationContext.configure(
                connection, opts={'compare_type': True, 'compare_server_default': True})
            self.assertEqual([], alembic.autogenerate.compare_metadata(
                context, models.Base.metadata))
        with db.session() as session:
            self.assertEqual([('default', 77)], [(c.name, c.connection_limit)
                                                 for c in db_api.clouds(session)])
            old = views.show_deployment(session, 'd1')
            state = clouds.gateway_state(session)
        self.assertEqual(('default', None, None, None, None),
                         (old['cloud'], old['application'], old['port'], old['protocol'],
                          old['listener_port']))
        self.assertEqual({'cpus': 4, 'cpu_busy': 0.0, 'vcpus': 4, 'vcpus_used': 1,
                          'memory_mib': 4096, 'memory_mib_used': 512, 'up': True},
                         state['hosts']['node1'])
        self.assertEqual([], state['listeners'])
        with db.session() as session:
            db_api.deployment_get(session, 'd1').listener_port = 21000
        self.assertRaises(db_api.Conflict, self._second_listener, db)

    @staticmethod
    def _second_listener(db: db_api.Database) -> None:
        with db.session() as session:
            db_api.deployment_create(session, id='d2', image='guest:1', count=1,
                                     min_count=1, vcpus=1, memory_mib=512, state='active',
                                     listener_port=21000)

    def test_sqlite(self):
        self.upgrade_0003_rows(f'sqlite:///{self.tmp}/old.sqlite')

    def test_postgresql(self):
        url = base.postgres_database(self.addCleanup, 'vmcloud_migrations_0004')
        self.upgrade_0003_rows(url)


class Upgrade0004WithRowsTest(base.TestCase):
    """0005 (the REST API) on a database of 0004 with a host, a deployment, its instance
    and a snapshot in it, on SQLite and on PostgreSQL: the rows stay, the host with no
    cache figures yet, the deployment of no owner, still listed; users and their tokens
    take rows, a token only of a known user."""

    def upgrade_0004_rows(self, url: str) -> None:
        self.conf.set_override('connection', url, 'database')
        db = db_api.Database(self.conf)
        self.addCleanup(db.dispose)
        config = alembic.config.Config()
        config.set_main_option('script_location', db_api.MIGRATIONS)
        with db.engine.begin() as connection:
            config.attributes['connection'] = connection
            alembic.command.upgrade(config, '0004')
            for statement in (
                    "INSERT INTO hosts (name, up, state, node_id, incarnation, vcpus, "
                    "memory_mib, disk_bytes_free, last_heartbeat, vtep_address, cpus, "
                    "cpu_busy) VALUES ('node1', true, 'up', 'id-node1', 'inc', 4, 4096, 1, "
                    "'2026-01-01', '', 4, 0.5)",
                    "INSERT INTO deployments (id, image, count, min_count, vcpus, memory_mib, "
                    "boot, health, state, reason, created_at, cloud) VALUES ('d1', 'guest:1', "
                    "1, 1, 1, 512, '{}', '{}', 'active', '', '2026-01-01', 'default')",
                    "INSERT INTO instances (id, name, deployment_id, image, host, state, "
                    "reason, attempts, failed_hosts, fetched_bytes, created_at, updated_at) "
                    "VALUES ('i1', 'vm-d1-0', 'd1', 'guest:1', 'node1', 'active', '', 1, '', "
                    "0, '2026-01-01', '2026-01-01')",
                    "INSERT INTO snapshots (id, deployment_id, state, reason, created_at) "
                    "VALUES ('s1', 'd1', 'available', '', '2026-01-02')"):
                connection.execute(sqlalchemy.text(statement))
        db.upgrade()
        with db.engine.connect() as connection:
            context = alembic.migration.MigrationContext.configure(
                connection, opts={'compare_type': True, 'compare_server_default': True})
            self.assertEqual([], alembic.autogenerate.compare_metadata(
                context, models.Base.metadata))
        with db.session() as session:
            host, = db_api.hosts(session)
            self.assertEqual(('node1', 4, 0, 0, 0), (host.name, host.cpus, host.cache_bytes,
                                                     host.fetched_bytes, host.peer_bytes))
            self.assertEqual([('d1', None)],
                             [(d['id'], d['owner']) for d in views.list_deployments(session)])
            self.assertEqual(['s1'], [s.id for s in db_api.snapshots(session, limit=10)])
        with db.session() as session:
            db_api.api_user_create(session, 'alice', 'hash', 'admin')
            db_api.api_token_create(session, 'a' * 64, 'alice', datetime.datetime(2030, 1, 1))
        with db.session() as session:
            self.assertEqual('alice', db_api.api_token_get(session, 'a' * 64).user)
        self.assertRaises(db_api.Conflict, self._token_of_nobody, db)

    @staticmethod
    def _token_of_nobody(db: db_api.Database) -> None:
        with db.session() as session:
            db_api.api_token_create(session, 'b' * 64, 'nobody', datetime.datetime(2030, 1, 1))

    def test_sqlite(self):
        self.upgrade_0004_rows(f'sqlite:///{self.tmp}/old.sqlite')

    def test_postgresql(self):
        url = base.postgres_database(self.addCleanup, 'vmcloud_migrations_0005')
        self.upgrade_0004_rows(url)


class Upgrade0005WithRowsTest(base.TestCase):
    """0006 (the peer exchange) on a database of 0005 with a host in it, on SQLite and
    on PostgreSQL: the host has no peer URL, so it is in no peer set until its manager
    registers again with one."""

    def upgrade_0005_rows(self, url: str) -> None:
        self.conf.set_override('connection', url, 'database')
        db = db_api.Database(self.conf)
        self.addCleanup(db.dispose)
        config = alembic.config.Config()
        config.set_main_option('script_location', db_api.MIGRATIONS)
        with db.engine.begin() as connection:
            config.attributes['connection'] = connection
            alembic.command.upgrade(config, '0005')
            connection.execute(sqlalchemy.text(
                "INSERT INTO hosts (name, up, state, node_id, incarnation, vcpus, "
                "memory_mib, disk_bytes_free, last_heartbeat, vtep_address, cpus, "
                "cpu_busy, cache_bytes, fetched_bytes, peer_bytes) VALUES ('node1', true, "
                "'up', 'id-node1', 'inc', 4, 4096, 1, '2026-01-01', '', 4, 0.5, 10, 20, 0)"))
        db.upgrade()
        with db.engine.connect() as connection:
            context = alembic.migration.MigrationContext.configure(
                connection, opts={'compare_type': True, 'compare_server_default': True})
            self.assertEqual([], alembic.autogenerate.compare_metadata(
                context, models.Base.metadata))
        with db.session() as session:
            host, = db_api.hosts(session)
            self.assertEqual(('node1', 10, ''), (host.name, host.cache_bytes, host.peer_url))
            self.assertEqual({}, db_api.peer_urls(session, 'up'))
            host.peer_url = 'http://10.0.0.1:9495'
        with db.session() as session:
            self.assertEqual({'node1': 'http://10.0.0.1:9495'},
                             db_api.peer_urls(session, 'up'))

    def test_sqlite(self):
        self.upgrade_0005_rows(f'sqlite:///{self.tmp}/old.sqlite')

    def test_postgresql(self):
        url = base.postgres_database(self.addCleanup, 'vmcloud_migrations_0006')
        self.upgrade_0005_rows(url)
