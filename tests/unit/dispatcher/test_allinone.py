"""The dispatcher and two fake-driver compute managers in one process, on fake://.

Moved from tests/functional/services: it needs no guest and no real service.
"""
import os

from vmcloud import exception
from vmcloud import polling
from tests.unit.dispatcher import helpers


class AllInOneFakeDriverTest(helpers.CloudTestCase):
    def test_deploy_spreads_snapshot_and_redeploy(self):
        deployment = self.deploy_and_wait(count=6)
        self.assertEqual('active', deployment['state'])
        hosts = [i['host'] for i in deployment['instances']]
        self.assertEqual({'node1': 3, 'node2': 3}, {h: hosts.count(h) for h in set(hosts)})
        snapshot = self.api.snapshot(deployment['id'])
        snapshot = self.api.wait_snapshot(snapshot['id'], helpers.TIMEOUT)
        self.assertEqual('available', snapshot['state'])
        versions = {item['version'] for item in snapshot['items']}
        self.assertEqual(6, len(versions))
        # The cloud is full (3 per host): the snapshot is what lets the deployment go
        # away and come back, on any host.
        self.assertRaises(exception.NoValidHost, self.api.deploy_snapshot, snapshot['id'])
        self.api.delete_deployment(deployment['id'])
        self.assertEqual('deleted', self.api.show_deployment(deployment['id'])['state'])
        # What they held is free once each host confirms its guest gone.
        polling.wait(lambda: self.api.show_deployment(deployment['id'])['instances'],
                     lambda now: {i['state'] for i in now} == {'deleted'}, helpers.TIMEOUT,
                     'instances deleted', interval=0.05)
        again = self.api.deploy_snapshot(snapshot['id'])
        again = self.api.wait_deployment(again['id'], helpers.TIMEOUT)
        self.assertEqual('active', again['state'])
        self.assertEqual(versions, {i['image'] for i in again['instances']})
        events = self.notifications()
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
        mirrors = os.path.join(self.state_path, 'nodes', 'node1', 'mirrors')
        self.assertEqual([], os.listdir(mirrors) if os.path.exists(mirrors) else [])

    def test_min_count_places_what_fits(self):
        deployment = self.deploy_and_wait(count=8, min_count=3)
        self.assertEqual(6, len(deployment['instances']))
        self.assertEqual('active', deployment['state'])
