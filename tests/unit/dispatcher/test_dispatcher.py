"""The dispatcher over fake:// and SQLite, with fake-driver compute managers."""
import datetime

from vmcloud import exception
from vmcloud import polling
from vmcloud import rpc
from vmcloud.db import api as db_api
from vmcloud.db import models
from vmcloud.dispatcher import states
from tests.unit.dispatcher import helpers


def fail_once(driver_a, driver_b) -> list[str]:
    """Make the first spawn on either driver fail; :returns: the names it failed."""
    failed = []
    for driver in (driver_a, driver_b):
        spawn = driver.spawn

        def failing(spec, spawn=spawn):
            if not failed:
                failed.append(spec.name)
                raise exception.SpawnFailed(f'{spec.name}: refused on purpose')
            return spawn(spec)
        driver.spawn = failing
    return failed


class DeployTest(helpers.CloudTestCase):
    def test_a_request_that_does_not_fit_writes_nothing(self):
        error = self.assertRaises(exception.NoValidHost, self.api.deploy, 'guest', 7)
        self.assertEqual((7, 7, 6, 2), (error.requested, error.required, error.placed,
                                        error.hosts))
        self.assertEqual('instance_count', error.filter_name)
        self.assertEqual([], self.api.list_deployments())
        with self.cloud.dispatcher.db.session() as session:
            self.assertEqual([], db_api.usage_by_host(session, states.RUNNING_STATES))
        self.assertEqual([], self.cloud.node('node1').driver.list_instances())

    def test_min_count_places_what_fits(self):
        deployment = self.deploy_and_wait(count=8, min_count=5)
        self.assertEqual('active', deployment['state'])
        self.assertEqual(6, len(deployment['instances']))
        self.assertEqual(5, deployment['min_count'])

    def test_bad_counts_are_refused(self):
        self.assertRaises(exception.InvalidRequest, self.api.deploy, 'guest', 0)
        self.assertRaises(exception.InvalidRequest, self.api.deploy, 'guest', 2, min_count=3)
        self.assertRaises(exception.ImageNotFound, self.api.deploy, 'nosuch', 1)
        self.assertEqual([], self.api.list_deployments())

    def test_a_failed_build_is_retried_on_another_host(self):
        drivers = {c.host: c.driver for c in self.cloud.computes}
        failed = fail_once(drivers['node1'], drivers['node2'])
        deployment = self.deploy_and_wait(count=1)
        self.assertEqual('active', deployment['state'], deployment)
        instance, = deployment['instances']
        self.assertEqual(failed, [instance['name']])
        self.assertEqual(2, instance['attempts'])
        first = instance['failed_hosts']
        self.assertIn(first, drivers)
        self.assertNotEqual(first, instance['host'])
        self.assertIn(instance['name'], drivers[instance['host']].list_instances())
        self.assertNotIn(instance['name'], drivers[first].list_instances())

    def test_a_build_no_host_can_do_ends_in_error_with_every_reason(self):
        for compute in self.cloud.computes:
            def refuse(spec):
                raise exception.SpawnFailed(f'{spec.name}: refused on purpose')
            compute.driver.spawn = refuse
        deployment = self.deploy_and_wait(count=1)
        self.assertEqual('error', deployment['state'])
        self.assertIn('only 0 of 1', deployment['reason'])
        instance, = deployment['instances']
        self.assertEqual('error', instance['state'])
        self.assertIsNone(instance['host'])
        self.assertIn('refused on purpose', instance['reason'])
        self.assertIn('no other host can take it', instance['reason'])
        self.assertEqual({'node1', 'node2'}, set(instance['failed_hosts'].split(',')))
        self.assertIn('instance.create.error', self.notifications())

    def test_delete_destroys_the_guests(self):
        deployment = self.deploy_and_wait(count=2)
        self.assertEqual('deleted', self.api.delete_deployment(deployment['id'])['state'])
        for compute in self.cloud.computes:  # destroy_instance is a cast
            polling.wait(lambda: compute.driver.list_instances() + compute.mirrors.names(),
                         lambda left: left == [], helpers.TIMEOUT, f'{compute.host} empty',
                         interval=0.05)
        # Each host confirms (instance_destroyed, a cast): deleting until then.
        polling.wait(lambda: [i['state'] for i in self.api.show_deployment(deployment['id'])
                              ['instances']],
                     lambda now: now == ['deleted', 'deleted'], helpers.TIMEOUT,
                     'instances deleted', interval=0.05)
        self.assertRaises(exception.DeploymentNotFound, self.api.delete_deployment, 'nope')

    def test_a_request_id_is_in_the_log_lines_of_both_services(self):
        records = self.record_request_ids()
        with rpc.request_context('req-unit-test-1'):
            deployment = self.api.deploy('guest', 2)
        self.api.wait_deployment(deployment['id'], helpers.TIMEOUT)
        mine = [(name, message) for name, request_id, message in records.records
                if request_id == 'req-unit-test-1']
        dispatcher = [m for n, m in mine if n.startswith('vmcloud.dispatcher.')]
        compute = [m for n, m in mine if n.startswith('vmcloud.compute.')]
        # The dispatcher placing them, each compute manager building, the dispatcher
        # hearing back: one request, the same id on both sides and both ways.
        self.assertTrue([m for m in dispatcher if m.startswith(f'deployment {deployment["id"]}')],
                        mine)
        for instance in deployment['instances']:
            name = instance['name']
            self.assertTrue([m for m in compute if m.startswith(f'{name} built on')], mine)
            self.assertTrue([m for m in dispatcher if m.startswith(f'instance {name} active')],
                            mine)


class EndpointsTest(helpers.CloudTestCase):
    def test_ping_names_the_dispatcher(self):
        self.assertEqual({'host': self.conf.host}, self.api.ping(timeout=5))

    def test_a_live_host_s_name_is_refused_to_another_node_across_rpc(self):
        owner = self.api.list_hosts()[0]
        self.assertTrue(owner['node_id'])
        error = self.assertRaises(exception.HostNameInUse, self.api.register_host,
                                  owner['name'], 'another-machine', 'run-2',
                                  {'vcpus': 1, 'memory_mib': 1, 'disk_bytes_free': 1})
        self.assertEqual((owner['name'], owner['node_id']), (error.host, error.owner))
        now, = [h for h in self.api.list_hosts() if h['name'] == owner['name']]
        self.assertEqual((owner['node_id'], owner['incarnation']),
                         (now['node_id'], now['incarnation']))

    def test_a_snapshot_call_waits_out_the_cut(self):
        # The cut alone may take longer than rpc_call_timeout: the caller must not give
        # up on a snapshot that goes on, and lose its id.
        self.conf.set_override('snapshot_pause_limit', 600)
        calls = []
        self.api._client.call = lambda method, **kwargs: calls.append((method, kwargs))
        self.api.snapshot('d1')
        self.assertEqual([('snapshot', {'deployment_id': 'd1', 'timeout': 2 * 30 + 600 + 120})],
                         calls)

    def test_a_console_call_outwaits_the_dispatcher_s_call_to_the_host(self):
        calls = []
        self.api._client.call = lambda method, **kwargs: calls.append((method, kwargs))
        self.api.console('vm-1', 100)
        self.assertEqual([('console', {'instance': 'vm-1', 'max_bytes': 100,
                                       'timeout': 2 * 120})], calls)

    def test_build_wanted_across_rpc(self):
        instance, = self.deploy_and_wait(count=1)['instances']  # built: wanted no more
        self.assertIs(False, self.api.build_wanted(instance['id'], instance['host'], 1))

    def test_console_through_the_compute_host(self):
        instance, = self.deploy_and_wait(count=1)['instances']
        for ref in (instance['name'], instance['id']):
            shown = self.api.console(ref)
            self.assertEqual((instance['name'], instance['host']),
                             (shown['instance'], shown['host']))
            self.assertIn('VMCLOUD-PHASE', shown['console'])
        self.assertEqual(10, len(self.api.console(instance['name'], max_bytes=10)['console']))
        self.assertRaises(exception.InvalidRequest, self.api.console, 'vm-nosuch-0')


class HostDownTest(helpers.CloudTestCase):
    def configure(self):
        self.conf.set_override('max_instances_per_host', 4, 'scheduler')

    def age_heartbeat(self, host: str) -> None:
        with self.cloud.dispatcher.db.session() as session:
            db_api.host_get(session, host).last_heartbeat = (
                models.utcnow() - datetime.timedelta(hours=1))

    def test_a_silent_host_that_reports_again_is_reconciled(self):
        self.cloud.dispatcher.monitor.stop()  # this test runs the passes itself
        deployment = self.deploy_and_wait(count=2)
        node2 = self.cloud.node('node2').driver
        on_node2 = [i['name'] for i in deployment['instances'] if i['host'] == 'node2']
        self.assertEqual(on_node2, node2.list_instances())
        # node2 beats on: one of its heartbeats may land between the aging and the pass.
        for _ in range(10):
            self.age_heartbeat('node2')
            if self.cloud.dispatcher.monitor.mark_silent_hosts() == ['node2']:
                break
        else:
            self.fail('node2 never found silent')
        # Its next heartbeat (every second) says what it runs: the same guest, untouched.
        back = self.wait_deployment_state(deployment['id'], 'active')
        self.assertEqual(['active', 'active'], [i['state'] for i in back['instances']])
        self.assertEqual({'node1': 'up', 'node2': 'up'},
                         {h['name']: h['state'] for h in self.api.list_hosts()})
        self.assertEqual(on_node2, node2.list_instances())

    def test_a_silent_host_is_unknown_and_a_fenced_one_s_instances_are_rebuilt(self):
        self.cloud.dispatcher.monitor.stop()  # this test runs the passes itself
        running = self.deploy_and_wait(count=2)
        on_node2 = [i['name'] for i in running['instances'] if i['host'] == 'node2']
        self.assertEqual(1, len(on_node2))
        node2 = self.cloud.node('node2')
        node2.stop()  # its builds now wait in its queue, unanswered
        self.cloud.computes.remove(node2)
        building = self.api.deploy('guest', 2)
        stuck = [i for i in building['instances'] if i['host'] == 'node2']
        self.assertEqual(1, len(stuck))
        self.age_heartbeat('node2')

        self.assertEqual(['node2'], self.cloud.dispatcher.monitor.mark_silent_hosts())

        # Silent is not dead: nothing is rebuilt, the running guest is unknown.
        lost = self.api.show_deployment(running['id'])
        for instance in lost['instances']:
            if instance['name'] in on_node2:
                self.assertEqual('unknown', instance['state'])
                self.assertIn('node2 stopped sending heartbeats', instance['reason'])
            else:
                self.assertEqual('active', instance['state'])
        self.assertEqual('unknown', lost['state'])  # min_count was 2
        self.assertEqual({'node1': 'up', 'node2': 'unknown'},
                         {h['name']: h['state'] for h in self.api.list_hosts()})
        self.assertEqual('building', self.api.show_deployment(building['id'])['state'])
        self.assertEqual([], self.cloud.dispatcher.monitor.mark_silent_hosts())

        fenced = self.api.fence_host('node2')

        self.assertEqual(sorted([stuck[0]['name']] + on_node2), sorted(fenced['rebuilt']))
        node1 = self.cloud.node('node1').driver
        for deployment_id in (building['id'], running['id']):
            rebuilt = self.api.wait_deployment(deployment_id, helpers.TIMEOUT)
            self.assertEqual('active', rebuilt['state'], rebuilt)
            for instance in rebuilt['instances']:
                self.assertEqual(('active', 'node1'), (instance['state'], instance['host']))
                self.assertIn(instance['name'], node1.list_instances())
        moved, = [i for i in self.api.show_deployment(building['id'])['instances']
                  if i['id'] == stuck[0]['id']]
        self.assertEqual(('node2', 2), (moved['failed_hosts'], moved['attempts']))
        self.assertEqual({'node1': True, 'node2': False},
                         {h['name']: h['up'] for h in self.api.list_hosts()})
        self.assertRaises(exception.HostNotFound, self.api.fence_host, 'node9')


class SnapshotTest(helpers.CloudTestCase):
    def test_snapshot_then_deploy_from_it(self):
        deployment = self.deploy_and_wait(count=2)
        snapshot = self.api.snapshot(deployment['id'])
        self.assertIn(snapshot['state'], ('uploading', 'available'))
        snapshot = self.api.wait_snapshot(snapshot['id'], helpers.TIMEOUT)
        self.assertEqual('available', snapshot['state'])
        versions = {item['version'] for item in snapshot['items']}
        self.assertEqual(2, len(versions))
        # Each instance's own lineage: deploying 'guest' still means the imported image.
        self.assertEqual({i['name'] for i in deployment['instances']},
                         {v.split(':')[0] for v in versions})
        for item in snapshot['items']:
            self.assertEqual('available', item['state'])
            self.assertIsNotNone(item['pause_ms'])
        again = self.api.wait_deployment(
            self.api.deploy_snapshot(snapshot['id'])['id'], helpers.TIMEOUT)
        self.assertEqual('active', again['state'])
        self.assertEqual(versions, {i['image'] for i in again['instances']})
        for compute in self.cloud.computes:  # every guest runs again after the barrier
            for name in compute.driver.list_instances():
                self.assertEqual('running', compute.driver.power_state(name).value)

    def test_deploying_a_snapshot_whose_version_was_removed_writes_nothing(self):
        deployment = self.deploy_and_wait(count=2)
        snapshot = self.api.wait_snapshot(self.api.snapshot(deployment['id'])['id'],
                                          helpers.TIMEOUT)
        self.assertEqual('available', snapshot['state'], snapshot)
        removed = snapshot['items'][0]['version']
        image, version = removed.split(':')
        self.cloud.warehouse.delete(image, int(version), force=True)
        error = self.assertRaises(exception.ImageNotFound, self.api.deploy_snapshot,
                                  snapshot['id'])
        self.assertIn(image, str(error))
        self.assertEqual([deployment['id']], [d['id'] for d in self.api.list_deployments()])

    def test_an_instance_that_cannot_freeze_aborts_the_snapshot(self):
        deployment = self.deploy_and_wait(count=2)
        victim = deployment['instances'][0]
        driver = self.cloud.node(victim['host']).driver
        freeze = driver.freeze_io

        def refuse(name):
            if name == victim['name']:
                raise exception.DriverError(f'{name} cannot freeze, on purpose')
            return freeze(name)
        driver.freeze_io = refuse
        snapshot = self.api.wait_snapshot(self.api.snapshot(deployment['id'])['id'],
                                          helpers.TIMEOUT)
        # One cut or none: the others thawed, nothing stored.
        self.assertEqual('error', snapshot['state'])
        self.assertIn('on purpose', snapshot['reason'])
        self.assertEqual({'error'}, {i['state'] for i in snapshot['items']})
        self.assertEqual({''}, {i['version'] for i in snapshot['items']})
        for compute in self.cloud.computes:
            for name in compute.driver.list_instances():
                self.assertEqual('running', compute.driver.power_state(name).value)
        self.assertRaises(exception.InvalidRequest, self.api.deploy_snapshot, snapshot['id'])

    def test_the_barrier_and_upload_threads_keep_the_request_id(self):
        deployment = self.deploy_and_wait(count=2)
        records = self.record_request_ids()
        with rpc.request_context('req-unit-snapshot'):
            snapshot = self.api.snapshot(deployment['id'])
        self.api.wait_snapshot(snapshot['id'], helpers.TIMEOUT)
        for instance in deployment['instances']:
            name = instance['name']
            for start in (f'{name} frozen in', f'snapshot of {name} stored as'):
                ids = {i for n, i, m in records.records
                       if n == 'vmcloud.compute.manager' and m.startswith(start)}
                self.assertEqual({'req-unit-snapshot'}, ids, start)

    def test_nothing_to_snapshot(self):
        self.assertRaises(exception.DeploymentNotFound, self.api.snapshot, 'nope')
        self.assertRaises(exception.InvalidRequest, self.api.show_snapshot, 'nope')
        self.assertRaises(exception.InvalidRequest, self.api.deploy_snapshot, 'nope')
