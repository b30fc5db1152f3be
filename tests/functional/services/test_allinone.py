"""The dispatcher and two compute managers in one process, on the fake:// transport,
booting real guests (the fake-driver tests are in tests/unit/dispatcher)."""
import os

from vmcloud import allinone
from vmcloud import polling
from vmcloud.compute import manager as compute_manager
from vmcloud.drivers import base as driver_base
from tests import base
from tests import guest

TIMEOUT = 120


class AllInOneQemuTest(base.TestCase):
    """Eight real guests over two compute managers, snapshot all, redeploy from the snapshots."""

    def setUp(self):
        super().setUp()
        self.conf.set_override('heartbeat_interval', 1)
        self.use_private_vni_range()
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
            # The blocks the guest wrote, as deltas: each adds a header (under 128
            # bytes) to at least one block of 4 KiB.
            self.assertLessEqual(item['uploaded_bytes'],
                                 item['dirty_bytes'] + 128 * (item['dirty_bytes'] // 4096))
        origin = {item['version']: item['instance_id'] for item in snapshot['items']}
        names = {i['id']: i['name'] for i in first['instances']}
        self.api.delete_deployment(first['id'])

        second = self.wait_running(self.api.deploy_snapshot(snapshot['id']))
        for instance in second['instances']:
            log = self.driver_of(instance).console_log(instance['name'])
            self.assertIn(f'VMCLOUD-PREVIOUS {names[origin[instance["image"]]]}', log)


class ComputeRestartQemuTest(base.TestCase):
    """A compute manager restarts under a running guest: the guest never stops."""

    def setUp(self):
        super().setUp()
        self.conf.set_override('heartbeat_interval', 1)
        self.use_private_vni_range()
        self.cloud = allinone.AllInOne(self.conf, hosts=1, driver='qemu')
        self.cloud.warehouse.import_image(guest.path('disk.img'), 'guest')
        self.cloud.start()
        self.addCleanup(self.cloud.stop)
        self.api = self.cloud.api

    @staticmethod
    def written(driver, name: str) -> int:
        """The last line the guest wrote and synced (its console says VMCLOUD-WROTE N)."""
        lines = [line for line in driver.console_log(name).splitlines()
                 if line.startswith('VMCLOUD-WROTE ')]
        return int(lines[-1].split()[1]) if lines else 0

    def test_a_restarted_manager_adopts_its_guest_which_keeps_writing(self):
        boot = {'kernel': guest.path('vmlinuz'), 'initrd': guest.path('initrd.img'),
                'cmdline': guest.CMDLINE + ' vmcloud.id={name} vmcloud.keep_writing=1'}
        deployment = self.api.wait_deployment(
            self.api.deploy('guest', count=1, boot=boot)['id'], TIMEOUT)
        self.assertEqual('active', deployment['state'], deployment)
        (instance,) = deployment['instances']
        name, old = instance['name'], self.cloud.computes[0]
        polling.wait(lambda: self.written(old.driver, name), lambda n: n >= 1, TIMEOUT,
                     f'{name} writing', interval=0.2)
        old.stop()
        before = self.written(old.driver, name)
        # A new manager, with a driver of its own: it finds the guest where the old one
        # left it, and the disk served all along.
        new = compute_manager.ComputeManager(
            self.conf, old.mirrors, old.host, warehouse=self.cloud.warehouse,
            node_root=os.path.join(self.state_path, 'nodes', old.host), shared_driver=True)
        self.cloud.computes[0] = new
        new.start()
        self.assertEqual([name], new.driver.list_instances())
        polling.wait(lambda: self.written(new.driver, name), lambda n: n >= before + 2,
                     TIMEOUT, f'{name} writing on after the restart', interval=0.2)
        # The new manager serves: a snapshot freezes and thaws the adopted guest.
        snapshot = self.api.wait_snapshot(self.api.snapshot(deployment['id'])['id'], TIMEOUT)
        self.assertEqual('available', snapshot['state'], snapshot)
        self.assertEqual(driver_base.PowerState.RUNNING, new.driver.power_state(name))
        self.assertEqual('active', self.api.show_deployment(deployment['id'])['instances'][0]
                         ['state'])
