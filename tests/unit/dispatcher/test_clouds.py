"""Clouds, applications, listener ports and what the gateway serves: the deployer and
the clouds' part of the dispatcher on SQLite with recording stand-ins for the compute
managers and the gateways; then the dispatcher's endpoints over fake:// with a gateway
RPC server standing in for ``vmcloud gateway``."""
import threading

import fixtures

from vmcloud import exception
from vmcloud import polling
from vmcloud import rpc
from vmcloud.db import api as db_api
from vmcloud.db import models
from vmcloud.dispatcher import clouds
from vmcloud.dispatcher import deploy
from vmcloud.dispatcher import hosts
from vmcloud.dispatcher import states
from vmcloud.dispatcher import views
from vmcloud.gateway import rpcapi as gateway_rpcapi
from vmcloud.scheduler import handler
from tests import base
from tests.unit.dispatcher import helpers
from tests.unit.dispatcher.test_host_states import Compute

CAPACITY = {'vcpus': 16, 'memory_mib': 16 * 512, 'disk_bytes_free': 1 << 40}
VTEPS = {'node1': '10.77.0.1', 'node2': '10.77.0.2', 'gw': '10.77.0.9'}


class Gateway:
    """Records refreshes, with what gateway_state said at each (read in a unit of work
    of its own: what the refreshed gateway would read); answers connections and stats
    as the gateways named in ``answering`` would (the others do not answer)."""

    def __init__(self, db: db_api.Database):
        self.db = db
        self.states: list[dict] = []
        self.answering: set[str] = set()
        self.asked: list[tuple[str, str, str | None, float]] = []

    def refresh(self) -> None:
        with self.db.session() as session:
            self.states.append(clouds.gateway_state(session))

    def connections(self, server: str, cloud: str | None = None,
                    timeout: float | None = None) -> list[dict]:
        return self._answer('connections', server, cloud, timeout, [{'client': server}])

    def stats(self, server: str, cloud: str | None = None,
              timeout: float | None = None) -> dict:
        return self._answer('stats', server, cloud, timeout, {'from': server})

    def _answer(self, question, server, cloud, timeout, answer):
        self.asked.append((question, server, cloud, timeout))
        if server not in self.answering:
            raise exception.MessagingError(f'the gateway {server} did not answer in time')
        return answer


class RecordingScheduler(handler.FilterScheduler):
    """The filter scheduler, keeping every request it was asked to place."""

    def __init__(self, conf):
        super().__init__(conf)
        self.requests = []

    def select_hosts(self, hosts, request, count, min_count=None):
        self.requests.append(request)
        return super().select_hosts(hosts, request, count, min_count)


class CloudsTestCase(base.TestCase):
    """The deployer, the host registry and the clouds on one database, the compute
    managers and the gateway recording stand-ins."""

    def setUp(self):
        super().setUp()
        self.configure_database()
        self.db = db_api.Database(self.conf)
        self.db.upgrade()
        self.addCleanup(self.db.dispose)
        self.compute = Compute()
        self.gateway = Gateway(self.db)
        self.scheduler = RecordingScheduler(self.conf)
        self.deployer = deploy.Deployer(self.conf, self.db, self.scheduler, self.compute,
                                        lambda *args: None, self.gateway)
        self.registry = hosts.HostRegistry(self.conf, self.db, self.deployer)
        self.clouds = clouds.Clouds(self.conf, self.db, self.gateway, self.compute)
        self.useFixture(fixtures.FakeLogger())

    def configure_database(self) -> None:
        """SQLite under the test's state_path (the default connection)."""

    # -- helpers -------------------------------------------------------------------

    def register(self, *names: str) -> None:
        for name in names:
            self.registry.register(name, f'id-{name}', f'inc-{name}', CAPACITY, VTEPS[name])

    def deploy(self, count: int = 2, **kwargs) -> dict:
        return self.deployer.deploy(['guest:1'] * count, count, 1, 512, {}, **kwargs)

    def expose(self, count: int = 2, protocol: str = 'http', **kwargs) -> dict:
        return self.deploy(count, port=8080, protocol=protocol, **kwargs)

    def built(self, deployment: dict) -> None:
        for instance in self.show(deployment['id'])['instances']:
            if instance['state'] == states.BUILDING:
                self.deployer.instance_built(instance['id'], instance['host'], 1.0, 0)

    def show(self, deployment_id: str) -> dict:
        with self.db.session() as session:
            return views.show_deployment(session, deployment_id)

    def state(self) -> dict:
        return self.clouds.gateway_state()

    def count(self, model: type[models.Base]) -> int:
        with self.db.session() as session:
            return session.query(model).count()


class CloudsTest(CloudsTestCase):
    # -- the unit of work ----------------------------------------------------------

    def test_work_after_commit_runs_once_committed_and_never_after_a_rollback(self):
        ran = []
        with self.db.session() as session:
            for _ in range(3):  # registered three times: runs once
                db_api.after_commit(session, 'note', lambda: ran.append(
                    self.clouds.list_clouds()[0]['connection_limit']))
            db_api.cloud_get(session, 'default').connection_limit = 5
            self.assertEqual([], ran)
        self.assertEqual([5], ran)  # it saw the commit
        with self.assertRaises(exception.InvalidRequest):
            with self.db.session() as session:
                db_api.after_commit(session, 'note', lambda: ran.append('rolled back'))
                raise exception.InvalidRequest('refused')
        self.assertEqual([5], ran)

    # -- clouds --------------------------------------------------------------------

    def test_the_default_cloud_is_there_with_the_configured_limit_and_cannot_go(self):
        self.assertEqual([{'name': 'default', 'connection_limit': 1000, 'hosts': [],
                           'deployments': []}],
                         [{k: c[k] for k in ('name', 'connection_limit', 'hosts',
                                             'deployments')}
                          for c in self.clouds.list_clouds()])
        error = self.assertRaises(exception.InvalidRequest, self.clouds.delete_cloud,
                                  'default')
        self.assertIn('default cannot be deleted', str(error))

    def test_a_cloud_is_made_changed_and_deleted_with_its_hosts_checked(self):
        self.register('node1', 'node2')
        cloud = self.clouds.create_cloud('blue-1', 50, ['node2'])
        self.assertEqual(('blue-1', 50, ['node2'], []),
                         (cloud['name'], cloud['connection_limit'], cloud['hosts'],
                          cloud['deployments']))
        error = self.assertRaises(exception.HostNotFound, self.clouds.create_cloud,
                                  'red', 5, ['node1', 'nosuch'])
        self.assertEqual('nosuch', error.host)
        self.assertRaises(exception.CloudNotFound, self.clouds.show_cloud, 'red')
        for name, limit in (('Blue', 1), ('a' * 33, 1), ('', 1), ('ok', 0), ('ok', '5')):
            self.assertRaises(exception.InvalidRequest, self.clouds.create_cloud, name, limit)
        error = self.assertRaises(exception.InvalidRequest, self.clouds.create_cloud,
                                  'blue-1', 5)
        self.assertIn('exists already', str(error))

        cloud = self.clouds.update_cloud('blue-1', add_hosts=['node1', 'node2'],
                                         remove_hosts=['node2'])
        self.assertEqual((50, ['node1']), (cloud['connection_limit'], cloud['hosts']))
        self.assertEqual([], self.gateway.states)  # nothing the gateway serves changed
        cloud = self.clouds.update_cloud('blue-1', connection_limit=70)
        self.assertEqual(70, cloud['connection_limit'])
        self.assertEqual([70], [s['clouds']['blue-1']['connection_limit']
                                for s in self.gateway.states])
        self.assertRaises(exception.HostNotFound, self.clouds.update_cloud, 'blue-1',
                          add_hosts=['nosuch'])
        self.assertRaises(exception.CloudNotFound, self.clouds.update_cloud, 'red', 5)
        self.assertRaises(exception.InvalidRequest, self.clouds.update_cloud, 'blue-1', 0)
        # Its last host removed, a cloud would place on every host: refused, kept.
        error = self.assertRaises(exception.InUse, self.clouds.update_cloud, 'blue-1',
                                  remove_hosts=['node1'])
        self.assertIn('no host', str(error))
        self.assertEqual(['node1'], self.clouds.show_cloud('blue-1')['hosts'])
        cloud = self.clouds.update_cloud('blue-1', add_hosts=['node2'], remove_hosts=['node1'])
        self.assertEqual(['node2'], cloud['hosts'])

        deployment = self.deploy(1, cloud='blue-1')
        error = self.assertRaises(exception.InvalidRequest, self.clouds.delete_cloud,
                                  'blue-1')
        self.assertIn(deployment['id'], str(error))
        self.deployer.delete(deployment['id'])
        self.assertEqual('blue-1', self.clouds.delete_cloud('blue-1')['name'])
        self.assertEqual(['default'], [c['name'] for c in self.clouds.list_clouds()])
        self.assertRaises(exception.CloudNotFound, self.clouds.delete_cloud, 'blue-1')

    def test_a_clouds_hosts_are_the_request_spec_of_its_placements_and_retries(self):
        self.register('node1', 'node2')
        self.clouds.create_cloud('blue', 10, ['node2'])
        deployment = self.deploy(2, cloud='blue')
        self.assertEqual(('node2',), self.scheduler.requests[-1].cloud_hosts)
        self.assertEqual('blue', deployment['cloud'])
        self.assertEqual(['node2', 'node2'], [i['host'] for i in deployment['instances']])
        self.assertEqual({'node1', 'node2'},  # the default cloud lists no host: any
                         {i['host'] for i in self.deploy(4)['instances']})
        self.assertIsNone(self.scheduler.requests[-1].cloud_hosts)
        # A retry is placed within the cloud too: none of its hosts is left.
        instance = deployment['instances'][0]
        self.deployer.build_failed(instance['id'], 'node2', 'refused on purpose')
        self.assertEqual(('node2',), self.scheduler.requests[-1].cloud_hosts)
        retried = self.show(deployment['id'])['instances'][0]
        self.assertEqual((states.ERROR, None), (retried['state'], retried['host']))

    def test_a_deploy_in_an_unknown_cloud_writes_nothing(self):
        self.register('node1')
        error = self.assertRaises(exception.CloudNotFound, self.expose, cloud='nosuch')
        self.assertEqual('nosuch', error.name)
        self.assertEqual((0, 0, []), (self.count(models.Deployment),
                                      self.count(models.Network), self.compute.builds))

    # -- listener ports ------------------------------------------------------------

    def test_exposed_deployments_get_a_listener_port_of_their_protocol_freed_at_delete(self):
        self.register('node1')
        first, second = self.expose(), self.expose()
        tcp = self.expose(protocol='tcp')
        plain = self.deploy(1)
        self.assertEqual([21000, 21001, 22000, None],
                         [d['listener_port'] for d in (first, second, tcp, plain)])
        self.assertEqual((8080, 'http', 'default', None),
                         (first['port'], first['protocol'], first['cloud'],
                          first['application']))
        self.assertEqual((None, None), (plain['port'], plain['protocol']))
        self.deployer.delete(first['id'])
        self.assertIsNone(self.show(first['id'])['listener_port'])
        self.assertEqual(21000, self.expose()['listener_port'])

    def test_an_exhausted_listener_range_fails_the_deploy_naming_it_and_writing_nothing(self):
        self.conf.set_override('listener_ports', '21000-21001', 'gateway')
        self.register('node1')
        self.expose(), self.expose()
        refreshes = len(self.gateway.states)
        error = self.assertRaises(exception.ListenerPortsExhausted, self.expose)
        self.assertEqual(('http', '21000-21001'), (error.protocol, error.port_range))
        self.assertIn('[gateway] listener_ports', str(error))
        self.assertEqual((2, 2), (self.count(models.Deployment), self.count(models.Network)))
        self.assertEqual(refreshes, len(self.gateway.states))  # a rollback tells nothing
        self.assertEqual(22000, self.expose(protocol='tcp')['listener_port'])

    def test_a_bad_service_or_listener_range_is_refused(self):
        self.register('node1')
        for port, protocol in ((8080, None), (None, 'http'), (0, 'http'), (65536, 'tcp'),
                               (80, 'udp'), ('80', 'http')):
            self.assertRaises(exception.InvalidRequest, self.deploy, 1, port=port,
                              protocol=protocol)
        self.assertEqual(0, self.count(models.Deployment))
        self.conf.set_override('tcp_listener_ports', '22000', 'gateway')
        error = self.assertRaises(exception.ConfigError, self.expose, protocol='tcp')
        self.assertIn('[gateway] tcp_listener_ports', str(error))

    def test_a_listener_port_taken_meanwhile_is_refused_by_the_database_and_retried(self):
        # Another dispatcher committed the port this one picked: the unique index
        # refuses this one's commit, and the deploy runs once more, taking the next.
        self.register('node1')
        taken = self.expose(1)
        seen = []
        real = db_api.listener_ports_in_use

        def stale_once(session):
            seen.append(real(session))
            return set() if len(seen) == 1 else seen[-1]
        self.useFixture(fixtures.MonkeyPatch('vmcloud.db.api.listener_ports_in_use',
                                             stale_once))
        self.assertEqual(21001, self.expose(1)['listener_port'])
        self.assertEqual([{21000}, {21000}], seen)
        self.assertEqual(21000, self.show(taken['id'])['listener_port'])

    # -- what the gateway serves ---------------------------------------------------

    def test_the_gateway_state_lists_active_instances_of_live_listeners(self):
        self.register('node1', 'node2')
        self.clouds.create_cloud('blue', 50)
        with self.db.session() as session:  # node2's manager reported its load
            row = db_api.host_get(session, 'node2')
            row.cpus, row.cpu_busy = 4, 0.25
        deployment = self.expose(cloud='blue')
        self.deploy(1)  # not exposed: no listener
        state = self.state()
        self.assertEqual({'default': {'connection_limit': 1000},
                          'blue': {'connection_limit': 50}}, state['clouds'])
        self.assertEqual({}, state['applications'])
        self.assertEqual({'cpus': 16, 'cpu_busy': 0.0, 'vcpus': 16, 'vcpus_used': 2,
                          'memory_mib': 16 * 512, 'memory_mib_used': 1024, 'up': True},
                         state['hosts']['node1'])  # no load reported: its vCPUs
        self.assertEqual((4, 0.25, 1), (state['hosts']['node2']['cpus'],
                                        state['hosts']['node2']['cpu_busy'],
                                        state['hosts']['node2']['vcpus_used']))
        listener, = state['listeners']
        self.assertEqual({'deployment': deployment['id'], 'cloud': 'blue',
                          'application': None, 'listener_port': 21000, 'protocol': 'http',
                          'port': 8080, 'network': deployment['network'],
                          'peers': ['10.77.0.1', '10.77.0.2'], 'instances': []},
                         listener)  # none active yet

        self.built(deployment)
        by_id = {i['id']: i for i in deployment['instances']}
        self.assertEqual(
            sorted((i['id'], i['name'], i['host'], i['address'], 'active')
                   for i in by_id.values()),
            sorted((i['id'], i['name'], i['host'], i['address'], i['state'])
                   for i in self.state()['listeners'][0]['instances']))
        # One's host goes silent: unknown, out of the pool.
        first = deployment['instances'][0]
        with self.db.session() as session:
            self.deployer.hosts_silent(session, [first['host']])
        self.assertEqual([i['id'] for i in deployment['instances'][1:]],
                         [i['id'] for i in self.state()['listeners'][0]['instances']])
        self.deployer.delete(deployment['id'])
        self.assertEqual([], self.state()['listeners'])

    def test_the_gateway_is_refreshed_after_each_commit_changing_what_it_serves(self):
        self.register('node1', 'node2')
        self.deploy(2)
        self.built(self.deploy(1))
        self.assertEqual([], self.gateway.states)  # nothing exposed changed
        deployment = self.expose()
        # Each refresh reads what was committed: the listener, then each instance active.
        self.assertEqual([[]], [s['listeners'][0]['instances'] for s in self.gateway.states])
        self.built(deployment)
        self.assertEqual([0, 1, 2], [len(s['listeners'][0]['instances'])
                                     for s in self.gateway.states])
        first = deployment['instances'][0]
        with self.db.session() as session:  # its host goes silent: unknown
            self.deployer.hosts_silent(session, [first['host']])
        self.assertEqual(1, len(self.gateway.states[-1]['listeners'][0]['instances']))
        self.deployer.delete(deployment['id'])
        self.assertEqual([], self.gateway.states[-1]['listeners'])
        refreshes = len(self.gateway.states)
        for instance in deployment['instances']:  # the hosts confirm: nothing served
            self.deployer.instance_destroyed(instance['host'], instance['name'])
        self.assertEqual(refreshes, len(self.gateway.states))

    def test_a_refresh_that_cannot_be_sent_fails_nothing(self):
        self.register('node1')

        def unreachable():
            raise exception.MessagingError('cannot reach the gateway for refresh')
        self.gateway.refresh = unreachable
        deployment = self.expose(1)
        self.built(deployment)
        self.assertEqual('active', self.show(deployment['id'])['state'])

    # -- gateways ------------------------------------------------------------------

    def test_a_registered_gateway_is_a_peer_of_exposed_networks_only(self):
        self.register('node1', 'node2')
        exposed, plain = self.expose(), self.deploy(2)
        state = self.clouds.register_gateway('gw', VTEPS['gw'])
        self.assertEqual(exposed['id'], state['listeners'][0]['deployment'])
        # The hosts of the exposed network learn it; the plain one's hosts do not.
        network = exposed['network']['id']
        self.assertEqual([('node1', network, ['10.77.0.2', '10.77.0.9']),
                          ('node2', network, ['10.77.0.1', '10.77.0.9'])],
                         sorted(self.compute.peers))
        # Builds and registrations from now on carry it.
        builds = len(self.compute.builds)
        second = self.expose(1)
        self.assertEqual([VTEPS['gw']], self.compute.builds[builds]['peers'])
        self.deploy(1)
        self.assertEqual([], self.compute.builds[-1]['peers'])
        adopted = {i['name']: i['peers'] for i in self.registry.register(
            'node1', 'id-node1', 'inc-node1b', CAPACITY, VTEPS['node1'])}
        plain_names = {i['name'] for i in plain['instances']}
        for name, peers in adopted.items():
            self.assertEqual(name not in plain_names, VTEPS['gw'] in peers, name)
        # Registering again at the same address tells nobody anything.
        self.compute.peers.clear()
        self.clouds.register_gateway('gw', VTEPS['gw'])
        self.assertEqual([], self.compute.peers)
        # A gateway on a compute host's machine is no peer of that host.
        self.clouds.register_gateway('gw', VTEPS['node1'])
        self.assertEqual(sorted([('node1', network, ['10.77.0.2']),
                                 ('node2', network, ['10.77.0.1']),
                                 (second['instances'][0]['host'], second['network']['id'],
                                  [])]),
                         sorted(self.compute.peers))

    def test_a_vtep_address_that_is_no_ip_address_is_refused(self):
        error = self.assertRaises(exception.InvalidRequest, self.clouds.register_gateway,
                                  'gw', '10.77.0.9/24')
        self.assertIn("gateway gw: [network] vtep_address '10.77.0.9/24'", str(error))
        self.clouds.register_gateway('gw', '')  # all on one machine

    def test_connections_and_stats_are_the_first_answer_of_the_registered_gateways(self):
        error = self.assertRaises(exception.GatewayUnavailable,
                                  self.clouds.gateway_connections)
        self.assertEqual([], error.gateways)
        self.clouds.register_gateway('gw-a', '')
        self.clouds.register_gateway('gw-b', '')
        error = self.assertRaises(exception.GatewayUnavailable, self.clouds.gateway_stats)
        self.assertEqual((['gw-a', 'gw-b'], 5.0), (error.gateways, error.timeout))
        self.gateway.answering = {'gw-b'}
        self.gateway.asked.clear()
        self.assertEqual([{'client': 'gw-b'}], self.clouds.gateway_connections('default'))
        self.assertEqual([('connections', 'gw-a', 'default', 5.0),
                          ('connections', 'gw-b', 'default', 5.0)], self.gateway.asked)
        self.assertEqual({'from': 'gw-b'}, self.clouds.gateway_stats())
        self.assertRaises(exception.CloudNotFound, self.clouds.gateway_stats, 'nosuch')

    # -- applications --------------------------------------------------------------

    def test_an_application_is_made_checked_and_deleted_once_not_deployed(self):
        app = self.clouds.create_application('web', 'guest:1', 8080, 'http', 1, 512, {},
                                             None, 20)
        self.assertEqual(('web', 'guest:1', 8080, 'http', 20, {'kind': 'marker'}, []),
                         (app['name'], app['image'], app['port'], app['protocol'],
                          app['connection_limit'], app['health'], app['deployments']))
        for args in (('Web', 'guest', 80, 'http', 1, 1), ('w2', 'guest', 80, 'udp', 1, 1),
                     ('w2', 'guest', 0, 'http', 1, 1), ('w2', 'guest', 80, 'http', 0, 1),
                     ('w2', 'guest', 80, 'tcp', 1, 1, {}, None, 0),
                     ('web', 'guest', 80, 'tcp', 1, 1)):
            self.assertRaises(exception.InvalidRequest, self.clouds.create_application, *args)
        self.assertEqual(['web'], [a['name'] for a in self.clouds.list_applications()])
        self.assertEqual({'web': {'connection_limit': 20}}, self.state()['applications'])

        self.register('node1')
        deployment = self.expose(1, application='web')
        self.assertEqual('web', deployment['application'])
        error = self.assertRaises(exception.InvalidRequest, self.clouds.delete_application,
                                  'web')
        self.assertIn(deployment['id'], str(error))
        self.deployer.delete(deployment['id'])
        self.assertEqual('web', self.clouds.delete_application('web')['name'])
        self.assertRaises(exception.ApplicationNotFound, self.clouds.show_application, 'web')
        self.assertEqual({}, self.state()['applications'])

    def test_an_application_is_changed_checked_as_made_and_a_new_limit_reaches_the_gateway(
            self):
        self.clouds.create_application('web', 'guest:1', 8080, 'http', 1, 512, {}, None, 20)
        self.register('node1')
        before = self.expose(1, application='web')
        refreshes = len(self.gateway.states)
        changed = self.clouds.update_application('web', {
            'image': 'guest:2', 'port': 9090, 'protocol': 'tcp', 'vcpus': 2,
            'memory_mib': 256, 'boot': {'cmdline': 'console=ttyS0'},
            'health': {'kind': 'tcp', 'port': 9090}})
        self.assertEqual(('guest:2', 9090, 'tcp', 2, 256, {'cmdline': 'console=ttyS0'},
                          {'kind': 'tcp', 'port': 9090}, 20, [before['id']]),
                         tuple(changed[k] for k in (
                             'image', 'port', 'protocol', 'vcpus', 'memory_mib', 'boot',
                             'health', 'connection_limit', 'deployments')))
        self.assertEqual(changed, self.clouds.show_application('web'))
        self.assertEqual((8080, 'http'), (self.show(before['id'])['port'],
                                          self.show(before['id'])['protocol']))
        # What the gateway serves of an application is its limit: that alone is told.
        self.assertEqual(refreshes, len(self.gateway.states))
        self.clouds.update_application('web', {'connection_limit': 5})
        self.assertEqual({'web': {'connection_limit': 5}},
                         self.gateway.states[-1]['applications'])
        self.assertIsNone(self.clouds.update_application(
            'web', {'connection_limit': None})['connection_limit'])  # its cloud's only
        self.assertEqual({'web': {'connection_limit': None}},
                         self.gateway.states[-1]['applications'])
        self.assertEqual(refreshes + 2, len(self.gateway.states))
        self.clouds.update_application('web', {'health': None, 'boot': None})
        self.assertEqual(({}, {'kind': 'marker'}),
                         (self.clouds.show_application('web')['boot'],
                          self.clouds.show_application('web')['health']))

        # Refused as create refuses them, judged with what it has: nothing changes.
        shown = self.clouds.show_application('web')
        for changes in ({'port': 0}, {'port': '80'}, {'protocol': 'udp'}, {'protocol': None},
                        {'vcpus': 0}, {'memory_mib': -1}, {'vcpus': True},
                        {'connection_limit': 0}, {'connection_limit': '5'}):
            self.assertRaises(exception.InvalidRequest, self.clouds.update_application,
                              'web', changes)
        error = self.assertRaises(exception.InvalidRequest, self.clouds.update_application,
                                  'web', {'name': 'other', 'port': 80})
        self.assertIn('cannot change name', str(error))
        self.assertEqual(shown, self.clouds.show_application('web'))
        self.assertRaises(exception.ApplicationNotFound, self.clouds.update_application,
                          'nosuch', {'port': 80})

    def test_names_in_use_and_what_cannot_be_deleted_are_errors_of_their_own(self):
        self.register('node1')
        self.clouds.create_cloud('blue', 5)
        self.clouds.create_application('web', 'guest:1', 8080, 'http', 1, 512)
        for kind, create in (('cloud', lambda: self.clouds.create_cloud('blue', 5)),
                             ('application', lambda: self.clouds.create_application(
                                 'web', 'guest:1', 80, 'http', 1, 1))):
            error = self.assertRaises(exception.NameInUse, create)
            self.assertEqual((kind, f'{kind} {error.name} exists already'),
                             (error.kind, str(error)))
        error = self.assertRaises(exception.InUse, self.clouds.delete_cloud, 'default')
        self.assertEqual(('cloud', 'default', 'cloud default cannot be deleted: plain '
                                              'deploys use it'),
                         (error.kind, error.name, str(error)))
        deployment = self.expose(1, application='web', cloud='blue')
        error = self.assertRaises(exception.InUse, self.clouds.delete_cloud, 'blue')
        self.assertEqual(f'has deployments: {deployment["id"]}; delete them first',
                         error.reason)
        error = self.assertRaises(exception.InUse, self.clouds.delete_application, 'web')
        self.assertEqual(f'application web is deployed: {deployment["id"]}; delete those '
                         f'deployments first', str(error))


class CloudsPostgresTest(CloudsTest):
    """The same on PostgreSQL (row locks, the unique index, real concurrency)."""

    def configure_database(self) -> None:
        helpers.use_postgres(self, 'vmcloud_clouds')


class GatewayServer:
    """Stands in for ``vmcloud gateway`` on the bus: counts refreshes, answers."""

    def __init__(self):
        self.refreshed = threading.Event()
        self.refreshes = 0

    @rpc.expose
    def refresh(self, ctxt: dict) -> None:
        self.refreshes += 1
        self.refreshed.set()

    @rpc.expose
    def connections(self, ctxt: dict, cloud: str | None = None) -> list[dict]:
        return [{'client': '10.0.0.1', 'cloud': cloud or 'default'}]

    @rpc.expose
    def stats(self, ctxt: dict, cloud: str | None = None) -> dict:
        return {'default': {'cloud': 'default', 'active_connections': 0}}


class DispatcherEndpointsTest(helpers.CloudTestCase):
    """The clouds' endpoints through DispatcherAPI over fake://."""

    def start_gateway(self, name: str = 'gw') -> GatewayServer:
        gateway = GatewayServer()
        server = rpc.server(self.conf, gateway_rpcapi.TOPIC, name, [gateway])
        server.start()
        self.addCleanup(server.wait)
        self.addCleanup(server.stop)
        return gateway

    def test_an_application_deployed_in_a_cloud_is_exposed_and_the_gateway_told(self):
        gateway = self.start_gateway()
        self.assertEqual([], self.api.register_gateway('gw', '')['listeners'])
        cloud = self.api.create_cloud('blue', 30, hosts=['node2'])
        self.assertEqual(['node2'], cloud['hosts'])
        app = self.api.create_application('web', 'guest', 8080, 'http', vcpus=1,
                                          memory_mib=256, health=None, connection_limit=10)
        self.assertEqual('guest', app['image'])
        self.assertRaises(exception.ImageNotFound, self.api.create_application, 'w2',
                          'nosuch', 80, 'http')
        self.assertRaises(exception.ApplicationNotFound, self.api.deploy_application,
                          'nosuch', 'blue', 1)
        self.assertRaises(exception.CloudNotFound, self.api.deploy_application, 'web',
                          'nosuch', 1)

        deployment = self.api.deploy_application('web', 'blue', 2)
        self.assertEqual(('blue', 'web', 8080, 'http', 21000),
                         (deployment['cloud'], deployment['application'], deployment['port'],
                          deployment['protocol'], deployment['listener_port']))
        self.assertTrue(deployment['image'].startswith('guest:'))
        deployment = self.api.wait_deployment(deployment['id'], helpers.TIMEOUT)
        self.assertEqual('active', deployment['state'])
        self.assertEqual({'node2'}, {i['host'] for i in deployment['instances']})
        self.assertTrue(gateway.refreshed.wait(helpers.TIMEOUT))
        listener, = self.api.gateway_state()['listeners']
        self.assertEqual(sorted(i['id'] for i in deployment['instances']),
                         sorted(i['id'] for i in listener['instances']))
        self.assertEqual({'web': {'connection_limit': 10}},
                         self.api.gateway_state()['applications'])

        # A plain deploy exposed by hand, in the default cloud.
        plain = self.api.deploy('guest', 1, port=80, protocol='tcp')
        self.assertEqual(('default', None, 22000),
                         (plain['cloud'], plain['application'], plain['listener_port']))
        self.assertRaises(exception.InvalidRequest, self.api.deploy, 'guest', 1, port=80)

        self.assertRaises(exception.InvalidRequest, self.api.delete_application, 'web')
        self.assertRaises(exception.InvalidRequest, self.api.delete_cloud, 'blue')
        self.api.delete_deployment(deployment['id'])
        self.assertEqual('web', self.api.delete_application('web')['name'])
        self.assertEqual('blue', self.api.delete_cloud('blue')['name'])
        self.assertEqual(['default'], [c['name'] for c in self.api.list_clouds()])
        self.assertEqual([], self.api.list_applications())

    def test_connections_and_stats_are_asked_of_the_gateway(self):
        error = self.assertRaises(exception.GatewayUnavailable, self.api.gateway_stats)
        self.assertIn('registered: none', str(error))
        self.start_gateway()
        self.api.register_gateway('gw', '')
        self.assertEqual([{'client': '10.0.0.1', 'cloud': 'default'}],
                         self.api.gateway_connections('default'))
        self.assertEqual(0, self.api.gateway_stats()['default']['active_connections'])
        self.assertRaises(exception.CloudNotFound, self.api.gateway_connections, 'nosuch')

    def test_a_limit_change_reaches_every_gateway(self):
        gateways = [self.start_gateway('gw-a'), self.start_gateway('gw-b')]
        self.api.update_cloud('default', connection_limit=7)
        for gateway in gateways:  # a fanout: each of them, not one of them
            polling.wait(lambda: gateway.refreshes, bool, helpers.TIMEOUT,
                         'a refresh of each gateway', interval=0.05)
        self.assertEqual(7, self.api.show_cloud('default')['connection_limit'])

    def test_an_application_changed_is_checked_as_made_and_what_deploys_from_now_on(self):
        gateway = self.start_gateway()
        self.api.register_gateway('gw', '')
        self.api.create_application('web', 'guest', 8080, 'http', connection_limit=10)
        shown = self.api.show_application('web')
        for changes, error in (({'image': 'nosuch'}, exception.ImageNotFound),
                               ({'boot': {'kernel': 'nosuch'}}, exception.ImageNotFound),
                               ({'boot': {'kernel': 'not a name'}}, exception.InvalidRequest),
                               ({'health': {'kind': 'bogus'}}, exception.InvalidRequest),
                               ({'health': {'kind': 'tcp', 'port': 80, 'timeout': 10 ** 6}},
                                exception.InvalidRequest),
                               ({'port': 70000}, exception.InvalidRequest),
                               ({'owner': 'x'}, exception.InvalidRequest)):
            self.assertRaises(error, self.api.update_application, 'web', changes)
        self.assertEqual(shown, self.api.show_application('web'))  # nothing written
        self.assertRaises(exception.ApplicationNotFound, self.api.update_application,
                          'nosuch', {'port': 80})

        refreshes = gateway.refreshes
        # (A check the fake guests pass: they serve no port.)
        changed = self.api.update_application('web', {
            'port': 9000, 'protocol': 'tcp', 'memory_mib': 128, 'connection_limit': 3,
            'health': {'kind': 'marker', 'timeout': 60}})
        self.assertEqual((9000, 'tcp', 128, 3, {'kind': 'marker', 'timeout': 60}),
                         (changed['port'], changed['protocol'], changed['memory_mib'],
                          changed['connection_limit'], changed['health']))
        polling.wait(lambda: gateway.refreshes > refreshes, bool, helpers.TIMEOUT,
                     'a refresh of the gateway', interval=0.05)
        self.assertEqual({'web': {'connection_limit': 3}},
                         self.api.gateway_state()['applications'])
        deployment = self.api.deploy_application('web', 'default', 1)
        self.assertEqual((9000, 'tcp', 128, {'kind': 'marker', 'timeout': 60}, 22000),
                         (deployment['port'], deployment['protocol'],
                          deployment['memory_mib'], deployment['health'],
                          deployment['listener_port']))

    def test_names_in_use_things_in_use_and_unknown_snapshots_cross_rpc_as_their_class(self):
        self.api.create_cloud('blue', 5)
        self.api.create_application('web', 'guest', 8080, 'http')
        error = self.assertRaises(exception.NameInUse, self.api.create_cloud, 'blue', 5)
        self.assertEqual(('cloud', 'blue', 'cloud blue exists already'),
                         (error.kind, error.name, str(error)))
        error = self.assertRaises(exception.NameInUse, self.api.create_application, 'web',
                                  'guest', 80, 'tcp')
        self.assertEqual(('application', 'web'), (error.kind, error.name))
        error = self.assertRaises(exception.InUse, self.api.delete_cloud, 'default')
        self.assertEqual(('cloud', 'default', 'cannot be deleted: plain deploys use it'),
                         (error.kind, error.name, error.reason))
        deployment = self.api.deploy_application('web', 'blue', 1)
        for delete, kind, name in ((self.api.delete_cloud, 'cloud', 'blue'),
                                   (self.api.delete_application, 'application', 'web')):
            error = self.assertRaises(exception.InUse, delete, name)
            self.assertEqual((kind, name), (error.kind, error.name))
            self.assertIn(deployment['id'], error.reason)
        for call in (self.api.show_snapshot, self.api.deploy_snapshot):
            error = self.assertRaises(exception.SnapshotNotFound, call, 'nosuch')
            self.assertEqual(('nosuch', 'snapshot nosuch not found'),
                             (error.snapshot_id, str(error)))
        error = self.assertRaises(exception.MarkerNotFound, self.api.list_clouds, 10,
                                  'nosuch')
        self.assertEqual('nosuch', error.marker)
