"""Hosts and instances through silence, reports, fencing, deletes and deadlines: the
deployer and host registry on SQLite, with a recording stand-in for compute managers."""
import datetime

import fixtures

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

# Two instances of 1 vCPU and 512 MiB fit on a host.
CAPACITY = {'vcpus': 2, 'memory_mib': 1024, 'disk_bytes_free': 1 << 40}
LONG_AGO = datetime.datetime(2000, 1, 1)


class Compute:
    """Records the casts and calls the dispatcher sends compute managers."""

    def __init__(self):
        self.builds: list[dict] = []
        self.destroyed: list[tuple[str, str]] = []
        self.consoles: list[tuple[str, str, int]] = []
        self.peers: list[tuple[str, str, list[str]]] = []

    def build_instance(self, host: str, instance: dict) -> None:
        self.builds.append(dict(instance))

    def destroy_instance(self, host: str, name: str) -> None:
        self.destroyed.append((host, name))

    def set_network_peers(self, host: str, network_id: str, peers: list[str]) -> None:
        self.peers.append((host, network_id, list(peers)))

    def console_log(self, host: str, name: str, max_bytes: int) -> str:
        self.consoles.append((host, name, max_bytes))
        return f'console of {name}'


class HostStatesTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.conf.set_override('max_attempts', 3, 'scheduler')
        self.configure_database()
        self.db = db_api.Database(self.conf)
        self.db.upgrade()
        self.addCleanup(self.db.dispose)
        self.compute = Compute()
        self.deployer = deploy.Deployer(self.conf, self.db, handler.FilterScheduler(self.conf),
                                        self.compute, lambda *args: None)
        self.registry = hosts.HostRegistry(self.conf, self.db, self.deployer)
        self.expired = []
        self.monitor = hosts.HostMonitor(self.conf, self.db, self.deployer, self.expired.append)
        self.logged = self.useFixture(fixtures.FakeLogger())

    def configure_database(self) -> None:
        """SQLite under the test's state_path (the default connection)."""

    # -- helpers -------------------------------------------------------------------

    def register(self, host: str, node_id: str | None = None,
                 capacity: dict | None = None) -> list[dict]:
        return self.registry.register(host, node_id or f'id-{host}', f'inc-{host}',
                                      capacity or CAPACITY)

    def heartbeat(self, host: str, running: list[str]) -> None:
        self.registry.report_heartbeat(host, CAPACITY, f'inc-{host}', running)

    def deploy(self, count: int, built: bool = True) -> str:
        """A deployment of ``count`` instances; ``built``: each reported built where it
        was placed. :returns: its id."""
        casts = len(self.compute.builds)
        deployment = self.deployer.deploy(['guest:1'] * count, count, 1, 512, {})
        if built:
            for build in self.compute.builds[casts:]:
                self.deployer.instance_built(build['id'], build['host'], 1.0, 0)
        return deployment['id']

    def instances(self, deployment_id: str) -> list[models.Instance]:
        with self.db.session() as session:
            return db_api.instances_of(session, deployment_id)

    def instance(self, name: str) -> models.Instance:
        with self.db.session() as session:
            return db_api.instance_by_name(session, name)

    def deployment_state(self, deployment_id: str) -> str:
        with self.db.session() as session:
            return db_api.deployment_get(session, deployment_id).state

    def host(self, name: str) -> models.Host:
        with self.db.session() as session:
            return db_api.host_get(session, name)

    def usage(self) -> dict[str, int]:
        with self.db.session() as session:
            return {h.name: h.instance_count for h in hosts.host_states(session)}

    def age(self, *, host: str | None = None, instance: str | None = None) -> None:
        """Make a host's last heartbeat, or an instance's last change, long ago."""
        with self.db.session() as session:
            if host is not None:
                db_api.host_get(session, host).last_heartbeat = LONG_AGO
            if instance is not None:
                db_api.instance_by_name(session, instance).updated_at = LONG_AGO

    def set_state(self, name: str, state: str) -> None:
        with self.db.session() as session:
            row = db_api.instance_by_name(session, name)
            row.state, row.updated_at = state, LONG_AGO

    # -- silence and reports ---------------------------------------------------------

    def test_a_silent_host_is_unknown_and_so_are_its_guests_until_it_reports(self):
        self.register('node1')
        deployment_id = self.deploy(2)
        first, second = [i.name for i in self.instances(deployment_id)]
        self.age(host='node1')

        self.assertEqual(['node1'], self.monitor.mark_silent_hosts())

        host = self.host('node1')
        self.assertEqual((states.HOST_UNKNOWN, False), (host.state, host.up))
        self.assertEqual([states.UNKNOWN] * 2,
                         [i.state for i in self.instances(deployment_id)])
        self.assertIn('node1 stopped sending heartbeats', self.instance(first).reason)
        self.assertEqual(states.UNKNOWN, self.deployment_state(deployment_id))
        self.assertEqual([], self.monitor.mark_silent_hosts())  # once
        self.assertEqual({'node1': 2}, self.usage())  # still held: they may run

        self.heartbeat('node1', [first])

        host = self.host('node1')
        self.assertEqual((states.HOST_UP, True), (host.state, host.up))
        self.assertEqual((states.ACTIVE, ''), (self.instance(first).state,
                                               self.instance(first).reason))
        self.assertEqual(states.ERROR, self.instance(second).state)
        self.assertIn('not running on node1 when it reported again',
                      self.instance(second).reason)
        self.assertEqual({'node1': 2}, self.usage())  # the error one too, until deleted
        self.assertEqual([], self.compute.destroyed)

    def test_a_silent_host_s_builds_are_left_to_their_deadline(self):
        self.register('node1')
        deployment_id = self.deploy(1, built=False)
        self.age(host='node1')
        self.monitor.mark_silent_hosts()
        self.assertEqual([states.BUILDING], [i.state for i in self.instances(deployment_id)])

    def test_an_active_guest_missing_from_a_report_is_in_error(self):
        self.register('node1')
        name, = [i.name for i in self.instances(self.deploy(1))]
        self.heartbeat('node1', [])
        # Active for less than a heartbeat interval: the report may predate the build.
        self.assertEqual(states.ACTIVE, self.instance(name).state)
        self.age(instance=name)
        self.heartbeat('node1', [])
        self.assertEqual((states.ERROR, 'not running on node1'),
                         (self.instance(name).state, self.instance(name).reason))

    def test_a_heartbeat_of_another_incarnation_is_ignored(self):
        self.register('node1')
        name, = [i.name for i in self.instances(self.deploy(1))]
        self.age(host='node1', instance=name)
        self.registry.report_heartbeat('node1', CAPACITY, 'an-old-run', [])
        self.assertEqual(LONG_AGO, self.host('node1').last_heartbeat)
        self.assertEqual(states.ACTIVE, self.instance(name).state)
        self.assertIn('incarnation an-old-run is not the registered one', self.logged.output)
        self.registry.report_heartbeat('nosuch', CAPACITY, 'x', [])  # never registered
        self.assertIsNone(self.host('nosuch'))

    def test_guests_not_wanted_on_a_host_are_destroyed(self):
        self.register('node1')
        name, = [i.name for i in self.instances(self.deploy(1))]
        self.heartbeat('node1', [name, 'vm-stranger-0'])
        self.assertEqual([('node1', 'vm-stranger-0')], self.compute.destroyed)

    # -- deleting ----------------------------------------------------------------------

    def test_deleting_holds_capacity_until_the_host_confirms(self):
        self.register('node1')
        deployment_id = self.deploy(2)
        first, second = [i.name for i in self.instances(deployment_id)]
        self.deployer.delete(deployment_id)
        self.assertEqual([states.DELETING] * 2,
                         [i.state for i in self.instances(deployment_id)])
        self.assertEqual({('node1', first), ('node1', second)}, set(self.compute.destroyed))
        self.assertEqual({'node1': 2}, self.usage())
        self.assertEqual(states.DELETED, self.deployment_state(deployment_id))

        self.deployer.instance_destroyed('node1', first)
        self.deployer.instance_destroyed('node2', second)  # not its host: nothing
        self.assertEqual(states.DELETED, self.instance(first).state)
        self.assertEqual(states.DELETING, self.instance(second).state)
        self.assertEqual({'node1': 1}, self.usage())

        self.age(instance=second)
        self.compute.destroyed.clear()
        self.heartbeat('node1', [second])  # still running: the destroy is asked again
        self.assertEqual(states.DELETING, self.instance(second).state)
        self.assertEqual([('node1', second)], self.compute.destroyed)
        self.heartbeat('node1', [])
        self.assertEqual(states.DELETED, self.instance(second).state)
        self.assertEqual({'node1': 0}, self.usage())

    def test_delete_destroys_an_instance_in_error(self):
        self.register('node1')
        deployment_id = self.deploy(2)
        broken, fine = [i.name for i in self.instances(deployment_id)]
        self.set_state(broken, states.ERROR)
        self.assertEqual({'node1': 2}, self.usage())  # error holds what it uses
        self.assertRaises(exception.NoValidHost, self.deploy, 1)

        self.deployer.delete(deployment_id)

        self.assertIn(('node1', broken), self.compute.destroyed)
        self.assertEqual(states.DELETING, self.instance(broken).state)
        self.deployer.instance_destroyed('node1', broken)
        self.deployer.instance_destroyed('node1', fine)
        self.assertEqual({'node1': 0}, self.usage())
        self.deploy(2)  # room again

    def test_a_failed_build_reported_by_its_host_holds_nothing(self):
        self.conf.set_override('max_attempts', 1, 'scheduler')
        self.register('node1')
        deployment_id = self.deploy(1, built=False)
        instance, = self.instances(deployment_id)
        self.deployer.build_failed(instance.id, 'node1', 'spawn refused')
        self.assertEqual((states.ERROR, None), (self.instance(instance.name).state,
                                                self.instance(instance.name).host))
        self.deployer.delete(deployment_id)
        self.assertEqual([], self.compute.destroyed)
        self.assertEqual(states.DELETED, self.instance(instance.name).state)

    # -- stale builds ------------------------------------------------------------------

    def test_build_wanted_only_for_the_current_attempt_on_its_host(self):
        self.register('node1')
        self.register('node2')
        deployment_id = self.deploy(1, built=False)
        build, = self.compute.builds
        self.assertEqual(1, build['attempt'])
        self.assertTrue(self.deployer.build_wanted(build['id'], build['host'], 1))

        self.deployer.build_failed(build['id'], build['host'], 'refused')
        retry = self.compute.builds[-1]
        self.assertEqual((build['id'], 2), (retry['id'], retry['attempt']))
        self.assertNotEqual(build['host'], retry['host'])
        self.assertFalse(self.deployer.build_wanted(build['id'], build['host'], 1))  # moved
        self.assertFalse(self.deployer.build_wanted(build['id'], retry['host'], 1))  # older
        self.assertTrue(self.deployer.build_wanted(build['id'], retry['host'], 2))

        self.deployer.delete(deployment_id)
        self.assertFalse(self.deployer.build_wanted(build['id'], retry['host'], 2))
        self.assertFalse(self.deployer.build_wanted('nosuch', retry['host'], 1))

    def test_every_build_cast_has_a_deadline(self):
        self.register('node1')
        self.register('node2')
        before = models.utcnow()
        deployment_id = self.deploy(1, built=False)
        instance, = self.instances(deployment_id)
        timeout = datetime.timedelta(seconds=self.conf.build_timeout)
        self.assertGreaterEqual(instance.deadline, before + timeout)
        self.assertLessEqual(instance.deadline, models.utcnow() + timeout)
        with self.db.session() as session:
            db_api.instance_get(session, instance.id).deadline = LONG_AGO
        self.deployer.build_failed(instance.id, instance.host, 'refused')
        self.assertGreaterEqual(self.instance(instance.name).deadline, before + timeout)

    def test_a_build_past_its_deadline_is_retried_then_ends_with_the_reason(self):
        self.conf.set_override('max_attempts', 2, 'scheduler')
        self.register('node1')
        self.register('node2')
        deployment_id = self.deploy(1, built=False)
        instance, = self.instances(deployment_id)
        self.assertEqual([], self.monitor.end_late_builds())  # not late yet
        for hosts_tried in (['node1'], ['node1', 'node2']):
            with self.db.session() as session:
                db_api.instance_get(session, instance.id).deadline = LONG_AGO
            self.monitor.check()
            self.assertEqual(hosts_tried, self.instance(instance.name).failed_hosts.split(','))
        self.assertEqual([1, 2], [b['attempt'] for b in self.compute.builds])
        now = self.instance(instance.name)
        self.assertEqual(states.ERROR, now.state)
        self.assertIn(f'no build result within {self.conf.build_timeout} s', now.reason)
        self.assertIsNotNone(now.host)  # unanswered: the guest may be there
        self.assertEqual(states.ERROR, self.deployment_state(deployment_id))
        self.deployer.delete(deployment_id)
        self.assertEqual([(now.host, now.name)], self.compute.destroyed)

    def test_a_late_build_that_fails_to_end_does_not_stop_the_others(self):
        self.register('node1')
        deployment_id = self.deploy(2, built=False)
        ids = [i.id for i in self.instances(deployment_id)]
        with self.db.session() as session:
            for instance_id in ids:
                db_api.instance_get(session, instance_id).deadline = LONG_AGO
        tried = []

        def build_failed(instance_id, host, reason, cleaned):
            tried.append(instance_id)
            raise (RuntimeError if len(tried) == 1 else exception.DatabaseError)('on purpose')
        self.deployer.build_failed = build_failed
        self.assertEqual(sorted(ids), sorted(self.monitor.end_late_builds()))
        self.assertEqual(sorted(ids), sorted(tried))
        self.assertIn('cannot end the late build', self.logged.output)

    def test_the_monitor_expires_snapshot_items(self):
        before = models.utcnow()
        self.monitor.check()
        self.assertEqual(1, len(self.expired))
        self.assertGreaterEqual(self.expired[0], before)

    # -- host names ----------------------------------------------------------------------

    def test_a_live_host_s_name_is_refused_to_another_node(self):
        self.register('node1', 'machine-a')
        error = self.assertRaises(exception.HostNameInUse, self.register, 'node1', 'machine-b')
        self.assertEqual(('node1', 'machine-a'), (error.host, error.owner))
        self.assertIn('machine-a', str(error))
        self.assertEqual('machine-a', self.host('node1').node_id)
        # The same node restarting takes it back at once.
        self.register('node1', 'machine-a')
        # Silent for service_down_time: another node may have it.
        self.age(host='node1')
        self.register('node1', 'machine-b')
        self.assertEqual('machine-b', self.host('node1').node_id)

    def test_a_fenced_host_s_name_is_free(self):
        self.register('node1', 'machine-a')
        self.registry.fence('node1')
        self.register('node1', 'machine-b')
        self.assertEqual((states.HOST_UP, 'machine-b'), (self.host('node1').state,
                                                         self.host('node1').node_id))

    def test_register_answers_what_the_host_holds(self):
        self.register('node1')
        deployment_id = self.deploy(2)
        first, second = self.instances(deployment_id)
        self.set_state(second.name, states.ERROR)
        held = self.register('node1')
        with self.db.session() as session:
            network = views.show_deployment(session, deployment_id)['network']
        self.assertEqual([{'id': first.id, 'name': first.name, 'state': states.ACTIVE,
                           'attempts': 1, 'image': 'guest:1', 'network': network,
                           'port': {'address': '10.200.0.2', 'mac': '52:54:00:c8:00:02'},
                           'peers': []},
                          {'id': second.id, 'name': second.name, 'state': states.ERROR,
                           'attempts': 1, 'image': 'guest:1', 'network': network,
                           'port': {'address': '10.200.0.3', 'mac': '52:54:00:c8:00:03'},
                           'peers': []}],
                         sorted(held, key=lambda i: i['name']))

    # -- fencing -----------------------------------------------------------------------

    def test_fence_rebuilds_elsewhere(self):
        self.register('node1')
        self.register('node2')
        deployment_id = self.deploy(1)
        instance, = self.instances(deployment_id)
        dead = instance.host
        other = 'node2' if dead == 'node1' else 'node1'
        self.age(host=dead)
        self.monitor.mark_silent_hosts()
        self.assertEqual(states.UNKNOWN, self.instance(instance.name).state)

        fenced = self.registry.fence(dead)

        self.assertEqual({'host': dead, 'state': states.HOST_FENCED,
                          'rebuilt': [instance.name], 'failed': []}, fenced)
        self.assertEqual((states.HOST_FENCED, False), (self.host(dead).state,
                                                       self.host(dead).up))
        now = self.instance(instance.name)
        self.assertEqual((states.BUILDING, other, 2), (now.state, now.host, now.attempts))
        self.assertEqual({'id': instance.id, 'host': other, 'attempt': 2, 'image': 'guest:1'},
                         {k: self.compute.builds[-1][k] for k in ('id', 'host', 'attempt',
                                                                  'image')})
        self.assertEqual(states.BUILDING, self.deployment_state(deployment_id))
        self.assertEqual(0, self.usage()[dead])
        self.assertRaises(exception.HostNotFound, self.registry.fence, 'nosuch')

    def test_fence_with_nowhere_to_go_ends_in_error_and_frees_what_was_deleting(self):
        self.register('node1', capacity=dict(CAPACITY, memory_mib=2048))
        building = self.deploy(1, built=False)
        running = self.deploy(1)
        going = self.deploy(1)
        self.deployer.delete(going)
        fenced = self.registry.fence('node1')
        self.assertEqual([], fenced['rebuilt'])
        self.assertEqual(sorted(i.name for d in (building, running)
                                for i in self.instances(d)), sorted(fenced['failed']))
        for deployment_id in (building, running):
            instance, = self.instances(deployment_id)
            self.assertEqual((states.ERROR, None), (instance.state, instance.host))
            self.assertIn('node1 was fenced', instance.reason)
        self.assertEqual([states.DELETED], [i.state for i in self.instances(going)])

    def test_a_fenced_host_stays_fenced_its_stale_guests_destroyed_until_it_registers(self):
        self.register('node1')
        self.register('node2')
        deployment_id = self.deploy(1)
        instance, = self.instances(deployment_id)
        dead = instance.host
        self.registry.fence(dead)
        self.heartbeat(dead, [instance.name])  # it was alive after all
        self.assertEqual(states.HOST_FENCED, self.host(dead).state)
        self.assertEqual([(dead, instance.name)], self.compute.destroyed)
        self.register(dead)
        self.assertEqual(states.HOST_UP, self.host(dead).state)

    def test_list_hosts_shows_each_state_and_what_is_held(self):
        self.register('node1')
        self.register('node2')
        deployment_id = self.deploy(2)
        self.registry.fence('node2')
        shown = {h['name']: h for h in self.registry.list_hosts()}
        self.assertEqual(('up', True, 'fenced', False),
                         (shown['node1']['state'], shown['node1']['up'],
                          shown['node2']['state'], shown['node2']['up']))
        self.assertEqual('id-node1', shown['node1']['node_id'])
        # Both instances now on node1, one of them rebuilding.
        self.assertEqual((2, 2, 1024), (shown['node1']['instances'], shown['node1']['vcpus_used'],
                                        shown['node1']['memory_mib_used']))
        self.assertEqual({'node1'}, {i.host for i in self.instances(deployment_id)})

    def test_a_snapshot_shows_each_item_s_instance_name(self):
        self.register('node1')
        instance, = self.instances(self.deploy(1))
        with self.db.session() as session:
            db_api.snapshot_create(session, id='s1', deployment_id=instance.deployment_id,
                                   state=states.UPLOADING)
            db_api.snapshot_item_create(session, snapshot_id='s1', instance_id=instance.id,
                                        state=states.UPLOADING)
        with self.db.session() as session:
            shown = views.show_snapshot(session, 's1')
        self.assertEqual([(instance.id, instance.name)],
                         [(i['instance_id'], i['name']) for i in shown['items']])

    # -- console -----------------------------------------------------------------------

    def test_console_goes_through_the_instance_s_host(self):
        self.register('node1')
        instance, = self.instances(self.deploy(1))
        for ref in (instance.name, instance.id):
            self.assertEqual({'instance': instance.name, 'host': 'node1',
                              'console': f'console of {instance.name}'},
                             self.deployer.console(ref, 100))
        self.assertEqual(('node1', instance.name, 100), self.compute.consoles[-1])
        self.assertRaises(exception.InvalidRequest, self.deployer.console, 'nosuch', 100)
        self.deployer.delete(instance.deployment_id)
        self.deployer.instance_destroyed('node1', instance.name)
        error = self.assertRaises(exception.InvalidRequest, self.deployer.console,
                                  instance.name, 100)
        self.assertIn('deleted', str(error))

    def test_console_of_a_host_that_is_not_up_is_refused_at_once(self):
        self.register('node1')
        instance, = self.instances(self.deploy(1))
        self.age(host='node1')
        self.monitor.mark_silent_hosts()
        error = self.assertRaises(exception.InvalidRequest, self.deployer.console,
                                  instance.name, 100)
        self.assertIn(f'{instance.name} is on compute host node1, which is unknown',
                      str(error))
        self.assertEqual([], self.compute.consoles)


class HostStatesPostgresTest(HostStatesTest):
    """The same on PostgreSQL, where the row locks are real."""

    def configure_database(self) -> None:
        helpers.use_postgres(self, 'vmcloud_host_states')
