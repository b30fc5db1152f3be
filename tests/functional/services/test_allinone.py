"""The dispatcher and two compute managers in one process, on the fake:// transport,
booting real guests (the fake-driver tests are in tests/unit/dispatcher)."""
from vmcloud import allinone
from tests import base
from tests import guest

TIMEOUT = 120


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
