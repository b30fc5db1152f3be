"""The test guest boots under qemu with its kernel and initrd taken from the warehouse."""
import filecmp
import os

from vmcloud import allinone
from vmcloud.storage import warehouse as warehouse_mod
from tests import base
from tests import guest

TIMEOUT = 120
ARTIFACTS = {'vmlinuz': 'vmlinuz', 'initrd.img': 'initrd'}


class BootArtifactsRoundTripTest(base.TestCase):
    def test_kernel_and_initrd_come_back_byte_identical(self):
        warehouse = warehouse_mod.Warehouse(self.conf)
        chunk_size = self.conf.storage.chunk_size
        odd = 0
        for leaf, image in ARTIFACTS.items():
            source = guest.path(leaf)
            manifest = warehouse.import_image(source, image, fmt='raw').manifest
            size = os.path.getsize(source)
            self.assertEqual(size, manifest.size)
            odd += size % 512 != 0 and size % chunk_size != 0
            copy = os.path.join(self.tmp, leaf)
            warehouse.export(manifest, copy)
            self.assertTrue(filecmp.cmp(source, copy, shallow=False), leaf)
        # The last chunk of a file whose size is no multiple of 512 came back whole.
        self.assertGreater(odd, 0)


class BootFromWarehouseArtifactsTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.conf.set_override('heartbeat_interval', 1)
        self.use_private_vni_range()
        self.cloud = allinone.AllInOne(self.conf, hosts=1, driver='qemu')
        self.cloud.warehouse.import_image(guest.path('disk.img'), 'guest')
        for leaf, image in ARTIFACTS.items():
            self.cloud.warehouse.import_image(guest.path(leaf), image, fmt='raw')
        self.cloud.start()
        self.addCleanup(self.cloud.stop)

    def test_guests_boot_with_artifacts_fetched_once_for_the_node(self):
        api = self.cloud.api
        boot = {'kernel': 'vmlinuz', 'initrd': 'initrd',
                'cmdline': guest.CMDLINE + ' vmcloud.id={name}'}
        deployment = api.wait_deployment(api.deploy('guest', count=2, boot=boot)['id'],
                                         TIMEOUT)
        self.assertEqual('active', deployment['state'], deployment)
        self.assertEqual({'kernel': 'vmlinuz:1', 'initrd': 'initrd:1'},
                         {k: deployment['boot'][k] for k in ('kernel', 'initrd')})
        driver = self.cloud.node('node1').driver
        for instance in deployment['instances']:
            driver.wait_for_event(instance['name'], 'app-running', TIMEOUT)
        # One copy of each artifact on the node, for both guests, and it is the file.
        path = self.conf.compute.boot_artifacts_path
        copies = sorted(leaf for leaf in os.listdir(path) if not leaf.startswith('.'))
        self.assertEqual(['initrd@1-', 'vmlinuz@1-'], [c[:c.index('-') + 1] for c in copies])
        for copy in copies:
            leaf = 'vmlinuz' if copy.startswith('vmlinuz') else 'initrd.img'
            self.assertTrue(filecmp.cmp(guest.path(leaf), os.path.join(path, copy),
                                        shallow=False), copy)
