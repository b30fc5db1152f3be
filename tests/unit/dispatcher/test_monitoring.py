"""What the monitoring counts of the cloud (vmcloud.dispatcher.monitoring) and the
events the dispatcher keeps: on SQLite, then PostgreSQL, with recording stand-ins for
the compute managers and the gateway."""
import fixtures
import sqlalchemy

from vmcloud.db import api as db_api
from vmcloud.dispatcher import monitoring
from vmcloud.dispatcher import states
from tests import base
from tests.unit.dispatcher import helpers
from tests.unit.dispatcher import test_clouds


class MonitoringTest(test_clouds.CloudsTestCase):
    """Over the clouds' test bed: a deployer, clouds and hosts on one database."""

    def monitoring(self) -> dict:
        with self.db.session() as session:
            return monitoring.monitoring(session)

    def test_counts_per_cloud_and_in_all(self):
        self.register('node1', 'node2')
        with self.db.session() as session:  # what node2's last heartbeat told
            row = db_api.host_get(session, 'node2')
            row.cpus, row.cpu_busy = 4, 0.5
            row.cache_bytes, row.fetched_bytes, row.peer_bytes = 3 << 20, 5 << 20, 7
        self.clouds.create_cloud('blue', 40, ['node2'])
        self.clouds.create_cloud('empty', 10)
        for name in ('api', 'web', 'db'):
            self.clouds.create_application(name, 'guest:1', 8080, 'http', 1, 512)
        web = self.expose(2, application='web', cloud='blue')
        self.built(web)
        self.expose(1, application='api', cloud='blue')  # still building: not running
        gone = self.expose(1, application='db', cloud='blue')
        self.built(gone)
        self.deployer.delete(gone['id'])  # deleting: neither deployed nor running
        plain = self.deploy(1)
        self.built(plain)
        failed = self.deploy(1)
        self.deployer.build_failed(failed['instances'][0]['id'],
                                   failed['instances'][0]['host'], 'on purpose')
        with self.db.session() as session:
            db_api.host_get(session, 'node1').state = states.HOST_UNKNOWN

        shown = self.monitoring()
        self.assertEqual({'connection_limit': 40, 'hosts': ['node2'], 'hosts_up': 1,
                          'hosts_total': 1,
                          'deployments': {'active': 1, 'building': 1},
                          'instances': {'active': 2, 'building': 1, 'deleting': 1},
                          'applications_deployed': ['api', 'web'],
                          'applications_running': ['web']}, shown['clouds']['blue'])
        # The default cloud lists no host: every host is its, node1 not up.
        self.assertEqual({'connection_limit': 1000, 'hosts': [], 'hosts_up': 1,
                          'hosts_total': 2,
                          'deployments': {'active': 1, 'building': 1},
                          # The failed build is retried on the other host: building.
                          'instances': {'active': 1, 'building': 1},
                          'applications_deployed': [], 'applications_running': []},
                         shown['clouds']['default'])
        self.assertEqual({'connection_limit': 10, 'hosts': [], 'hosts_up': 1,
                          'hosts_total': 2, 'deployments': {}, 'instances': {},
                          'applications_deployed': [], 'applications_running': []},
                         shown['clouds']['empty'])
        self.assertEqual({'active': 2, 'building': 2, 'deleted': 1}, shown['deployments'])
        self.assertEqual({'active': 3, 'building': 2, 'deleting': 1}, shown['instances'])
        node2 = shown['hosts']['node2']
        self.assertEqual({'state': 'up', 'up': True, 'cpus': 4, 'cpu_busy': 0.5,
                          'cache_bytes': 3 << 20, 'fetched_bytes': 5 << 20, 'peer_bytes': 7},
                         {k: v for k, v in node2.items() if k != 'instances'})
        # Every instance that may have a guest, on its host: blue's four on node2.
        self.assertEqual(6, node2['instances'] + shown['hosts']['node1']['instances'])
        self.assertLessEqual(4, node2['instances'])
        self.assertEqual(('unknown', False, 16, 0),  # no load told: its vCPUs
                         tuple(shown['hosts']['node1'][k]
                               for k in ('state', 'up', 'cpus', 'cache_bytes')))

    def test_the_counts_take_as_many_statements_however_many_deployments(self):
        self.register('node1', 'node2')
        self.clouds.create_cloud('blue', 40)
        self.clouds.create_application('web', 'guest:1', 8080, 'http', 1, 512)

        def statements() -> int:
            seen = []

            def count(conn, cursor, statement, *args):
                seen.append(statement)
            sqlalchemy.event.listen(self.db.engine, 'before_cursor_execute', count)
            try:
                self.monitoring()
            finally:
                sqlalchemy.event.remove(self.db.engine, 'before_cursor_execute', count)
            return len(seen)
        self.built(self.expose(1, application='web', cloud='blue'))
        few = statements()
        for _ in range(6):
            self.built(self.expose(2, application='web', cloud='blue'))
            self.deploy(1)
        self.assertEqual(few, statements())
        self.assertGreater(10, few)


class MonitoringPostgresTest(MonitoringTest):
    def configure_database(self) -> None:
        helpers.use_postgres(self, 'vmcloud_monitoring')


class EventHistoryTest(base.TestCase):
    def test_the_newest_first_and_only_as_many_as_it_keeps(self):
        history = monitoring.EventHistory(3)
        self.assertEqual([], history.recent())
        history.record('deployment.create.start', {'id': 'd0'})
        for number in range(1, 5):
            history.record('instance.create.end', {'id': f'i{number}'})
        recent = history.recent()
        self.assertEqual([{'id': 'i4'}, {'id': 'i3'}, {'id': 'i2'}],
                         [e['payload'] for e in recent])
        self.assertEqual({'at', 'event', 'payload'}, set(recent[0]))
        self.assertLessEqual(recent[1]['at'], recent[0]['at'])
        self.assertEqual([{'id': 'i4'}], [e['payload'] for e in history.recent(1)])
        self.assertEqual([], history.recent(0))

    def test_an_event_is_kept_as_it_was_sent(self):
        history = monitoring.EventHistory(3)
        payload = {'id': 'd0', 'count': 2}
        history.record('deployment.create.start', payload)
        payload['count'] = 'changed by its sender later'
        self.assertEqual([('deployment.create.start', {'id': 'd0', 'count': 2})],
                         [(e['event'], e['payload']) for e in history.recent()])


class MonitoringEndpointsTest(helpers.CloudTestCase):
    """monitoring and recent_events through DispatcherAPI over fake://."""

    def configure(self) -> None:
        self.conf.set_override('event_history', 4)

    def test_the_counts_and_the_events_of_late_cross_rpc(self):
        self.useFixture(fixtures.FakeLogger())
        first = self.deploy_and_wait(count=2)
        shown = self.api.monitoring()
        self.assertEqual({'active': 1}, shown['clouds']['default']['deployments'])
        self.assertEqual({'active': 2}, shown['instances'])
        self.assertEqual({'node1', 'node2'}, set(shown['hosts']))
        events = self.api.recent_events()
        self.assertEqual(['instance.create.end', 'instance.create.end',
                          'deployment.create.start'], [e['event'] for e in events])
        self.assertEqual({'id': first['id'], 'count': 2}, events[-1]['payload'])
        self.api.delete_deployment(first['id'])
        second = self.deploy_and_wait(count=1)
        events = self.api.recent_events(10)
        # [DEFAULT] event_history: the four newest, newest first.
        self.assertEqual(['instance.create.end', 'deployment.create.start',
                          'deployment.delete.end', 'instance.create.end'],
                         [e['event'] for e in events])
        self.assertEqual({'id': second['id'], 'count': 1}, events[1]['payload'])
        self.assertEqual(['instance.create.end'],
                         [e['event'] for e in self.api.recent_events(1)])
