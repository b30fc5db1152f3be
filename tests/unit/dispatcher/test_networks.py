"""Deployments' networks: allocated with the placement, carried by the build requests,
moved with rebuilds, released once guests are confirmed gone; on SQLite and PostgreSQL,
with a recording stand-in for the compute managers."""
import json

import fixtures
import sqlalchemy

from vmcloud import exception
from vmcloud.db import api as db_api
from vmcloud.db import models
from vmcloud.dispatcher import deploy
from vmcloud.dispatcher import hosts
from vmcloud.dispatcher import states
from vmcloud.dispatcher import views
from vmcloud.scheduler import handler
from tests import base
from tests.unit.dispatcher import helpers
from tests.unit.dispatcher.test_host_states import Compute

# Room for 16 instances of 1 vCPU and 512 MiB on each host; placement spreads them.
CAPACITY = {'vcpus': 16, 'memory_mib': 16 * 512, 'disk_bytes_free': 1 << 40}
VTEPS = {'node1': '10.77.0.1', 'node2': '10.77.0.2', 'node3': '10.77.0.3'}


class NetworksTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.configure_database()
        self.db = db_api.Database(self.conf)
        self.db.upgrade()
        self.addCleanup(self.db.dispose)
        self.compute = Compute()
        self.deployer = deploy.Deployer(self.conf, self.db, handler.FilterScheduler(self.conf),
                                        self.compute, lambda *args: None)
        self.registry = hosts.HostRegistry(self.conf, self.db, self.deployer)
        self.monitor = hosts.HostMonitor(self.conf, self.db, self.deployer, lambda now: None)
        self.useFixture(fixtures.FakeLogger())

    def configure_database(self) -> None:
        """SQLite under the test's state_path (the default connection)."""

    # -- helpers -------------------------------------------------------------------

    def register(self, *names: str) -> None:
        for name in names:
            self.registry.register(name, f'id-{name}', f'inc-{name}', CAPACITY, VTEPS[name])

    def deploy(self, count: int, **kwargs) -> dict:
        """:returns: the deployment's view; its builds are the last ``count`` casts."""
        return self.deployer.deploy(['guest:1'] * count, count, 1, 512, {}, **kwargs)

    def builds_of(self, deployment: dict) -> list[dict]:
        ids = {i['id'] for i in deployment['instances']}
        return sorted((b for b in self.compute.builds if b['id'] in ids),
                      key=lambda b: b['name'])

    def show(self, deployment_id: str) -> dict:
        with self.db.session() as session:
            return views.show_deployment(session, deployment_id)

    def rows(self, model: type[models.Base]) -> list:
        with self.db.session() as session:
            return list(session.scalars(sqlalchemy.select(model)))

    def ports(self) -> list[tuple[str, str, str | None]]:
        """(kind, address, host or instance name) of every port, sorted."""
        with self.db.session() as session:
            names = {i.id: i.name for i in session.scalars(sqlalchemy.select(models.Instance))}
            return sorted((p.kind, p.address, p.host or names[p.instance_id])
                          for p in session.scalars(sqlalchemy.select(models.Port)))

    def destroyed(self, deployment: dict) -> None:
        for instance in self.show(deployment['id'])['instances']:
            self.deployer.instance_destroyed(instance['host'], instance['name'])

    # -- deploying -----------------------------------------------------------------

    def test_a_deploy_gives_each_instance_an_address_and_each_host_a_dhcp_port(self):
        self.register('node1', 'node2')
        deployment = self.deploy(4)
        network = deployment['network']
        self.assertEqual(('10.200.0.0/24', 1000), (network['cidr'], network['vni']))
        instances = deployment['instances']
        self.assertEqual(['10.200.0.2', '10.200.0.3', '10.200.0.4', '10.200.0.5'],
                         sorted(i['address'] for i in instances))
        self.assertEqual(4, len({i['mac'] for i in instances}))
        by_host = {}
        for instance in instances:
            by_host.setdefault(instance['host'], []).append(instance['name'])
        self.assertEqual(['node1', 'node2'], sorted(by_host))  # two on each: spread

        builds = self.builds_of(deployment)
        self.assertEqual(4, len(builds))
        dhcp = {}
        for build, instance in zip(builds, instances):
            self.assertEqual(network, build['network'])
            self.assertEqual({'mac': instance['mac'], 'address': instance['address']},
                             build['port'])
            self.assertEqual({'kind': 'marker'}, build['health'])
            other = 'node2' if build['host'] == 'node1' else 'node1'
            self.assertEqual([VTEPS[other]], build['peers'])
            dhcp.setdefault(build['host'], set()).add(json.dumps(build['dhcp_port']))
        # One DHCP port per host, the same in every build there, from the top down.
        self.assertEqual({'node1': 1, 'node2': 1}, {h: len(p) for h, p in dhcp.items()})
        self.assertEqual({'10.200.0.254', '10.200.0.253'},
                         {json.loads(p.pop())['address'] for p in dhcp.values()})
        self.assertEqual([('dhcp', '10.200.0.253', 'node2'), ('dhcp', '10.200.0.254', 'node1')],
                         [p for p in self.ports() if p[0] == 'dhcp'])

        # The next deployment: a network of its own.
        second = self.deploy(1)
        self.assertEqual(('10.200.1.0/24', 1001), (second['network']['cidr'],
                                                   second['network']['vni']))
        self.assertEqual('10.200.1.2', second['instances'][0]['address'])
        self.assertEqual([], self.builds_of(second)[0]['peers'])  # alone on its host
        macs = [p.mac for p in self.rows(models.Port)]
        self.assertEqual(len(macs), len(set(macs)))

    def test_a_registering_host_learns_each_instances_network_port_and_peers(self):
        # What a restarted host needs to put its networks right, peers included: a
        # set_network_peers cast sent while it was away is lost.
        self.register('node1', 'node2')
        deployment = self.deploy(4)
        adopted = self.registry.register('node1', 'id-node1', 'inc-node1b', CAPACITY,
                                         VTEPS['node1'])
        by_name = {i['name']: i for i in deployment['instances']}
        self.assertEqual(2, len(adopted))
        for instance in adopted:
            self.assertEqual(deployment['network'], instance['network'])
            self.assertEqual({'mac': by_name[instance['name']]['mac'],
                              'address': by_name[instance['name']]['address']},
                             instance['port'])
            self.assertEqual([VTEPS['node2']], instance['peers'])

    def test_hosts_without_a_vtep_are_no_peers(self):
        self.registry.register('node1', 'id-node1', 'inc-node1', CAPACITY)  # all-in-one
        self.register('node2')
        deployment = self.deploy(2)
        peers = {b['host']: b['peers'] for b in self.builds_of(deployment)}
        self.assertEqual({'node1': [VTEPS['node2']], 'node2': []}, peers)
        self.assertEqual('', self.registry.list_hosts()[0]['vtep_address'])

    def test_a_vtep_address_that_is_no_ip_address_is_refused_at_registration(self):
        # Sent to every other host as a peer, it would fail their plugs (bridge fdb
        # append ... dst 10.77.0.9/24), not the misconfigured host's start.
        self.register('node1')
        for bad in ('10.77.0.9/24', 'node2.example', ' 10.77.0.9'):
            error = self.assertRaises(exception.InvalidRequest, self.registry.register,
                                      'node2', 'id-node2', 'inc-node2', CAPACITY, bad)
            self.assertIn(f'node2: [network] vtep_address {bad!r} is not an IP address',
                          str(error))
        self.assertEqual(['node1'], [h['name'] for h in self.registry.list_hosts()])
        self.registry.register('node2', 'id-node2', 'inc-node2', CAPACITY, 'fd00::2')
        self.assertEqual('fd00::2', self.registry.list_hosts()[1]['vtep_address'])

    def assert_nothing_written(self) -> None:
        for model in (models.Deployment, models.Instance, models.Network, models.Port):
            self.assertEqual([], self.rows(model), model.__tablename__)
        self.assertEqual([], self.compute.builds)

    def test_a_subnet_without_room_for_every_port_fails_the_deploy_writing_nothing(self):
        # A /29: .2 to .6, five ports; four instances on two hosts need six.
        self.conf.set_override('prefix_length', 29, 'network')
        self.register('node1', 'node2')
        error = self.assertRaises(exception.AddressPoolExhausted, self.deploy, 4)
        self.assertIn('10.200.0.0/29', str(error))
        self.assert_nothing_written()
        self.assertEqual(3, len(self.deploy(3)['instances']))  # 3 + 2 fit

    def test_an_exhausted_cidr_pool_or_vni_range_fails_the_deploy_writing_nothing(self):
        self.register('node1')
        for option, value, named in (('cidr_pool', '10.9.0.0/24', '10.9.0.0/24'),
                                     ('vni_max', 1000, '1000..1000')):
            self.conf.set_override(option, value, 'network')
            first = self.deploy(1)
            casts = list(self.compute.builds)
            error = self.assertRaises(exception.AddressPoolExhausted, self.deploy, 1)
            self.assertIn(named, str(error))
            self.assertEqual([first['id']], [d.id for d in self.rows(models.Deployment)])
            self.assertEqual(casts, self.compute.builds)
            self.deployer.delete(first['id'])
            self.destroyed(first)
            self.compute.builds.clear()
            with self.db.session() as session:  # as if it never was
                for model in (models.Instance, models.Deployment):
                    session.execute(sqlalchemy.delete(model))
            self.conf.clear_override(option, 'network')

    # -- deleting ------------------------------------------------------------------

    def test_addresses_are_released_only_once_their_guests_are_confirmed_destroyed(self):
        self.register('node1', 'node2')
        deployment = self.deploy(2)
        first, second = deployment['instances']
        for build in self.builds_of(deployment):
            self.deployer.instance_built(build['id'], build['host'], 1.0, 0)
        # The first one's host goes silent: unknown, its guest may still be there.
        with self.db.session() as session:
            db_api.host_get(session, first['host']).last_heartbeat = models.utcnow().replace(
                year=2000)
        self.monitor.mark_silent_hosts()
        self.assertEqual(states.UNKNOWN, self.show(deployment['id'])['instances'][0]['state'])
        self.assertEqual(4, len(self.ports()))

        self.deployer.delete(deployment['id'])
        shown = self.show(deployment['id'])
        self.assertEqual([states.DELETING] * 2, [i['state'] for i in shown['instances']])
        self.assertEqual([first['address'], second['address']],
                         [i['address'] for i in shown['instances']])
        self.assertEqual(states.DELETING, self.rows(models.Network)[0].state)
        # Still held: the next deployment gets other ones.
        other = self.deploy(1)
        self.assertEqual('10.200.1.0/24', other['network']['cidr'])

        self.deployer.instance_destroyed(second['host'], second['name'])
        self.assertEqual([('dhcp', '10.200.0.253', 'node2'),
                          ('dhcp', '10.200.0.254', 'node1'),
                          ('instance', first['address'], first['name'])],
                         [p for p in self.ports() if p[1].startswith('10.200.0.')])
        self.deployer.instance_destroyed(first['host'], first['name'])
        # The last one gone: the network and its DHCP ports too.
        self.assertEqual([other['network']['id']], [n.id for n in self.rows(models.Network)])
        self.assertEqual([], [p for p in self.ports() if p[1].startswith('10.200.0.')])
        shown = self.show(deployment['id'])
        self.assertIsNone(shown['network'])
        self.assertEqual([(states.DELETED, None, None)] * 2,
                         [(i['state'], i['address'], i['mac']) for i in shown['instances']])
        # Free again: the lowest subnet, VNI and addresses are given anew.
        again = self.deploy(1)
        self.assertEqual(('10.200.0.0/24', 1000, '10.200.0.2'),
                         (again['network']['cidr'], again['network']['vni'],
                          again['instances'][0]['address']))

    def test_instances_that_hold_no_guest_release_their_port_at_the_delete(self):
        self.register('node1')
        deployment = self.deploy(1)
        build, = self.builds_of(deployment)
        self.deployer.build_failed(build['id'], 'node1', 'broken')  # nowhere else: error
        self.assertEqual(states.ERROR, self.show(deployment['id'])['instances'][0]['state'])
        self.assertEqual(2, len(self.ports()))  # kept while the deployment lives
        self.deployer.delete(deployment['id'])
        self.assertEqual([], self.ports())
        self.assertEqual([], self.rows(models.Network))

    # -- rebuilding ----------------------------------------------------------------

    def rebuilt_elsewhere(self, move) -> None:
        """Two instances on node1 and node2, node3 joining after; ``move(instance)`` sends
        the first one elsewhere."""
        self.register('node1', 'node2')
        deployment = self.deploy(2)
        for build in self.builds_of(deployment):
            self.deployer.instance_built(build['id'], build['host'], 1.0, 0)
        self.register('node3')
        moved, stays = sorted(deployment['instances'], key=lambda i: i['host'])
        self.assertEqual(('node1', 'node2'), (moved['host'], stays['host']))
        self.compute.builds.clear()

        move(moved)

        build, = self.compute.builds
        self.assertEqual(('node3', moved['id']), (build['host'], build['id']))
        # Same address and MAC, node3's own DHCP server, the peers as they are now.
        self.assertEqual({'mac': moved['mac'], 'address': moved['address']}, build['port'])
        self.assertEqual(deployment['network'], build['network'])
        self.assertEqual('10.200.0.252', build['dhcp_port']['address'])
        self.assertEqual([VTEPS['node2']], build['peers'])
        self.assertEqual([('node2', deployment['network']['id'], [VTEPS['node3']])],
                         self.compute.peers)
        shown = self.show(deployment['id'])['instances']
        self.assertEqual([moved['address'], stays['address']], [i['address'] for i in shown])

    def test_a_fenced_hosts_instance_keeps_its_address_and_the_others_learn_its_new_host(self):
        def fence(instance):
            self.assertEqual([instance['name']], self.registry.fence('node1')['rebuilt'])
        self.rebuilt_elsewhere(fence)

    def test_a_retried_build_keeps_its_address_and_the_others_learn_its_new_host(self):
        def fail(instance):
            with self.db.session() as session:
                db_api.instance_get(session, instance['id']).state = states.BUILDING
            self.deployer.build_failed(instance['id'], 'node1', 'broken')
        self.rebuilt_elsewhere(fail)

    def test_a_rebuild_without_a_dhcp_address_left_for_its_new_host_is_an_error(self):
        self.conf.set_override('prefix_length', 29, 'network')
        self.register('node1', 'node2')
        deployment = self.deploy(3)  # .2 .3 .4 and .6 .5 for the DHCP servers: full
        self.register('node3')
        victim = next(i for i in deployment['instances'] if i['host'] == 'node2')
        for build in self.builds_of(deployment):
            self.deployer.instance_built(build['id'], build['host'], 1.0, 0)
        self.compute.builds.clear()
        self.assertEqual({'rebuilt': [], 'failed': [victim['name']], 'host': 'node2',
                          'state': states.HOST_FENCED}, self.registry.fence('node2'))
        shown = {i['id']: i for i in self.show(deployment['id'])['instances']}[victim['id']]
        self.assertEqual((states.ERROR, None, victim['address']),
                         (shown['state'], shown['host'], shown['address']))
        self.assertIn('10.200.0.0/29', shown['reason'])
        self.assertEqual([], self.compute.builds)

    # -- health checks -------------------------------------------------------------

    def test_health_checks_are_checked_stored_and_sent(self):
        self.register('node1')
        for health, stored in (({'kind': 'tcp', 'port': 22}, {'kind': 'tcp', 'port': 22}),
                               ({'kind': 'http', 'port': 80},
                                {'kind': 'http', 'port': 80, 'path': '/'}),
                               ({'kind': 'http', 'port': 8080, 'path': '/ready', 'timeout': 30},
                                {'kind': 'http', 'port': 8080, 'path': '/ready',
                                 'timeout': 30}),
                               ({'kind': 'console', 'pattern': r'^login: '},
                                {'kind': 'console', 'pattern': r'^login: '}),
                               (None, {'kind': 'marker'}), ({}, {'kind': 'marker'})):
            deployment = self.deploy(1, health=health)
            self.assertEqual(stored, deployment['health'])
            self.assertEqual(stored, self.builds_of(deployment)[0]['health'])
        for health, named in (({'kind': 'ping'}, "'ping'"), ({'port': 80}, 'None'),
                              ({'kind': 'tcp'}, 'needs a port'),
                              ({'kind': 'tcp', 'port': 0}, '0'),
                              ({'kind': 'tcp', 'port': 65536}, '65536'),
                              ({'kind': 'tcp', 'port': '80'}, "'80'"),
                              ({'kind': 'tcp', 'port': True}, 'True'),
                              ({'kind': 'http', 'port': 80, 'path': 'ready'}, "'ready'"),
                              ({'kind': 'console', 'pattern': '(unclosed'}, '(unclosed'),
                              ({'kind': 'marker', 'timeout': 0}, 'not 0'),
                              ({'kind': 'marker', 'timeout': 'soon'}, 'soon'),
                              ({'kind': 'marker', 'port': 80}, 'has no port'),
                              # What every compute host would refuse, refused here: not
                              # a deployment whose every build fails.
                              ({'kind': 'console', 'pattern': ''}, 'needs a pattern'),
                              ({'kind': 'http', 'port': 80, 'path': '/a b'}, "'/a b'"),
                              ('tcp:80', "'tcp:80'"), ([('kind', 'marker')], 'a dict'),
                              # The dispatcher would give up on the build first.
                              ({'kind': 'marker', 'timeout': 901}, 'build_timeout (900 s)'),
                              ({'kind': 'tcp', 'port': 80, 'timeout': float('inf')},
                               'build_timeout')):
            before = len(self.rows(models.Deployment))
            error = self.assertRaises(exception.InvalidRequest, self.deploy, 1, health=health)
            self.assertIn(named, str(error))
            self.assertEqual(before, len(self.rows(models.Deployment)))

    # -- two dispatchers -----------------------------------------------------------

    def test_a_subnet_taken_meanwhile_is_refused_by_the_database_and_the_deploy_retried(self):
        self.register('node1')
        taken = self.deploy(1)['network']
        seen = []
        real = db_api.networks_in_use

        def stale_once(session):
            # The first look misses the network another dispatcher committed meanwhile.
            seen.append(real(session))
            return (set(), set()) if len(seen) == 1 else seen[-1]
        self.useFixture(fixtures.MonkeyPatch('vmcloud.db.api.networks_in_use', stale_once))
        deployment = self.deploy(1)
        self.assertEqual(2, len(seen))
        self.assertEqual(('10.200.1.0/24', 1001), (deployment['network']['cidr'],
                                                   deployment['network']['vni']))
        self.assertNotEqual(taken['id'], deployment['network']['id'])

    def test_a_subnet_refused_twice_fails_the_deploy_writing_nothing_more(self):
        self.register('node1')
        self.deploy(1)
        casts = list(self.compute.builds)
        self.useFixture(fixtures.MonkeyPatch('vmcloud.db.api.networks_in_use',
                                             lambda session: (set(), set())))
        error = self.assertRaises(db_api.Conflict, self.deploy, 1)
        self.assertIsInstance(error, exception.DatabaseError)
        self.assertEqual(1, len(self.rows(models.Deployment)))
        self.assertEqual(1, len(self.rows(models.Network)))
        self.assertEqual(casts, self.compute.builds)


class NetworksPostgresTest(NetworksTest):
    """The same on PostgreSQL: its unique constraints and row locks."""

    def configure_database(self) -> None:
        helpers.use_postgres(self, 'vmcloud_networks')
