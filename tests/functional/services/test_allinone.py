"""The dispatcher and two compute managers in one process, on the fake:// transport."""
import os

from oslo_messaging.notify import _impl_test as notifications_test_driver
from oslo_messaging.notify import notifier

from vmcloud import allinone
from vmcloud import exception
from tests import base
from tests import guest

TIMEOUT = 120


class AllInOneFakeDriverTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.conf.register_opts(notifier._notifier_opts, group='oslo_messaging_notifications')
        self.conf.set_override('driver', ['test'], 'oslo_messaging_notifications')
        notifications_test_driver.reset()
        self.conf.set_override('heartbeat_interval', 1)
        self.conf.set_override('max_instances_per_host', 3, 'scheduler')
        self.cloud = allinone.AllInOne(self.conf, hosts=2, driver='fake')
        self.cloud.warehouse.import_image(guest.path('disk.img'), 'guest')
        self.cloud.start()
        self.addCleanup(self.cloud.stop)
        self.api = self.cloud.api

    def deploy_and_wait(self, **kwargs) -> dict:
        deployment = self.api.deploy('guest', **kwargs)
        return self.api.wait_deployment(deployment['id'], TIMEOUT)

    def test_deploy_spreads_snapshot_and_redeploy(self):
        deployment = self.deploy_and_wait(count=6)
        self.assertEqual('active', deployment['state'])
        hosts = [i['host'] for i in deployment['instances']]
        self.assertEqual({'node1': 3, 'node2': 3}, {h: hosts.count(h) for h in set(hosts)})
        snapshot = self.api.snapshot(deployment['id'])
        snapshot = self.api.wait_snapshot(snapshot['id'], TIMEOUT)
        self.assertEqual('available', snapshot['state'])
        versions = {item['version'] for item in snapshot['items']}
        self.assertEqual(6, len(versions))
        # The cloud is full (3 per host): the snapshot is what lets the deployment go
        # away and come back, on any host.
        self.assertRaises(exception.NoValidHost, self.api.deploy_snapshot, snapshot['id'])
        self.api.delete_deployment(deployment['id'])
        self.assertEqual('deleted', self.api.show_deployment(deployment['id'])['state'])
        again = self.api.deploy_snapshot(snapshot['id'])
        again = self.api.wait_deployment(again['id'], TIMEOUT)
        self.assertEqual('active', again['state'])
        self.assertEqual(versions, {i['image'] for i in again['instances']})
        events = [n[1]['event_type'] for n in notifications_test_driver.NOTIFICATIONS]
        self.assertEqual(12, events.count('instance.create.end'))
        self.assertEqual(6, events.count('snapshot.upload.end'))
        self.assertIn('deployment.delete.end', events)

    def test_bad_requests_change_nothing(self):
        self.assertRaises(exception.ImageNotFound, self.api.deploy, 'nosuch', 1)
        error = self.assertRaises(exception.NoValidHost, self.api.deploy, 'guest', 1000)
        self.assertIn('1000', str(error))
        self.assertRaises(exception.InvalidRequest, self.api.deploy, 'guest', 2, min_count=3)
        self.assertRaises(exception.DeploymentNotFound, self.api.show_deployment, 'nope')
        self.assertEqual([], self.api.list_deployments())
        self.assertEqual([], os.listdir(os.path.join(self.state_path, 'nodes', 'node1',
                                                     'mirrors'))
                         if os.path.exists(os.path.join(self.state_path, 'nodes', 'node1',
                                                        'mirrors')) else [])

    def test_min_count_places_what_fits(self):
        deployment = self.deploy_and_wait(count=8, min_count=3)
        self.assertEqual(6, len(deployment['instances']))
        self.assertEqual('active', deployment['state'])


class AllInOneQemuTest(base.TestCase):
    """Eight real guests over two compute managers, snapshot all, redeploy from the snapshots."""

    def setUp(self):
        super().setUp()
        self.conf.set_override('heartbeat_interval', 1)
        self.cloud = allinone.AllInOne(self.conf, hosts=2, driver='qemu')
        self.cloud.warehouse.import_image(guest.path('disk.img'), 'guest')
        self.cloud.start()
        self.addCleanup(self.cloud.stop)
        self.api = self.cloud.api
        self.boot = {'kernel': guest.path('vmlinuz'), 'initrd': guest.path('initrd.img'),
                     'cmdline': guest.CMDLINE + ' vmcloud.id={name}'}

    def driver_of(self, instance: dict):
        return self.cloud.node(instance['host']).driver

    def wait_running(self, deployment: dict) -> dict:
        deployment = self.api.wait_deployment(deployment['id'], TIMEOUT)
        self.assertEqual('active', deployment['state'], deployment)
        for instance in deployment['instances']:
            self.driver_of(instance).wait_for_event(instance['name'], 'app-running', TIMEOUT)
        return deployment

    def test_deploy_snapshot_redeploy_keeps_what_each_guest_wrote(self):
        first = self.wait_running(self.api.deploy('guest', count=8, boot=self.boot))
        self.assertEqual({'node1', 'node2'}, {i['host'] for i in first['instances']})
        snapshot = self.api.snapshot(first['id'])
        snapshot = self.api.wait_snapshot(snapshot['id'], TIMEOUT)
        self.assertEqual('available', snapshot['state'], snapshot)
        for item in snapshot['items']:
            self.assertGreater(item['dirty_bytes'], 0)
            self.assertLess(item['uploaded_bytes'], item['dirty_bytes'] + 1)
        origin = {item['version']: item['instance_id'] for item in snapshot['items']}
        names = {i['id']: i['name'] for i in first['instances']}
        self.api.delete_deployment(first['id'])

        second = self.wait_running(self.api.deploy_snapshot(snapshot['id']))
        for instance in second['instances']:
            log = self.driver_of(instance).console_log(instance['name'])
            self.assertIn(f'VMCLOUD-PREVIOUS {names[origin[instance["image"]]]}', log)
