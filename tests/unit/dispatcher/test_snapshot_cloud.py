"""Snapshots through the whole in-process cloud (fake driver, fake:// transport, SQLite):
what test_dispatcher.SnapshotTest leaves out, the cut across hosts, the lineage, partial."""
from vmcloud import exception
from vmcloud.dispatcher import states
from tests.unit.dispatcher import helpers


class SnapshotCloudTest(helpers.CloudTestCase):
    def assert_every_guest_runs(self) -> None:
        for compute in self.cloud.computes:
            for name in compute.driver.list_instances():
                self.assertEqual('running', compute.driver.power_state(name).value, name)

    def test_one_cut_across_hosts_each_instance_its_own_image(self):
        deployment = self.deploy_and_wait(count=2)
        self.assertEqual({'node1', 'node2'}, {i['host'] for i in deployment['instances']})
        base = self.cloud.warehouse.lookup('guest').ref
        snapshot = self.api.wait_snapshot(self.api.snapshot(deployment['id'])['id'],
                                          helpers.TIMEOUT)
        self.assertEqual(states.AVAILABLE, snapshot['state'], snapshot)
        items = snapshot['items']
        # As the compute hosts measured it: the last freeze came before the first thaw.
        self.assertLess(max(i['frozen_at'] for i in items), min(i['thawed_at'] for i in items))
        for item in items:
            version = self.cloud.warehouse.lookup(item['version'])
            self.assertEqual((item['name'], base), (version.image, version.parent))
        # Deploying the image still means the version the operator imported.
        self.assertEqual(base, self.cloud.warehouse.lookup('guest').ref)
        self.assertEqual([snapshot['id']],
                         [s['id'] for s in self.api.list_snapshots(deployment['id'])])
        self.assertEqual([snapshot['id']], [s['id'] for s in self.api.list_snapshots()])
        self.assertRaises(exception.DeploymentNotFound, self.api.list_snapshots, 'nope')

    def test_a_failed_barrier_makes_it_partial_and_deploying_it_needs_the_flag(self):
        deployment = self.deploy_and_wait(count=2)
        victim = deployment['instances'][0]
        mirrors = self.cloud.node(victim['host']).mirrors
        barrier = mirrors.barrier

        def refuse(key, names):
            taken = barrier(key, [n for n in names if n != victim['name']])
            taken[victim['name']] = {'error': 'no barrier, on purpose'}
            return taken
        mirrors.barrier = refuse
        snapshot = self.api.wait_snapshot(self.api.snapshot(deployment['id'])['id'],
                                          helpers.TIMEOUT)
        self.assertEqual(states.PARTIAL, snapshot['state'], snapshot)
        self.assertIn(f'{victim["name"]}: barrier_and_thaw on {victim["host"]}: '
                      f'no barrier, on purpose', snapshot['reason'])
        items = {i['name']: i for i in snapshot['items']}
        self.assertEqual('', items[victim['name']]['version'])
        other, = [i for i in items.values() if i['name'] != victim['name']]
        self.assertEqual(states.AVAILABLE, other['state'])
        self.assert_every_guest_runs()
        error = self.assertRaises(exception.InvalidRequest, self.api.deploy_snapshot,
                                  snapshot['id'])
        self.assertIn(f'{victim["name"]}: barrier_and_thaw', str(error))
        again = self.api.wait_deployment(
            self.api.deploy_snapshot(snapshot['id'], allow_partial=True)['id'],
            helpers.TIMEOUT)
        self.assertEqual([other['version']], [i['image'] for i in again['instances']])
