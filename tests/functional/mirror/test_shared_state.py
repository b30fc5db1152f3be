"""Two nodes that share nothing but the warehouse, over a warehouse service and over Ceph:
a boot profile recorded on one prefetches on the other, a kernel imported by one boots
the other."""
import os
import random

from vmcloud.compute import artifacts
from vmcloud.mirror import manager as manager_mod
from vmcloud.storage import warehouse as warehouse_mod
from tests import base
from tests.functional.storage import test_http_backend
from tests.functional.storage import test_rados_backend

CHUNK = 64 * 1024


class NodesShareOnlyTheWarehouse:
    """Mixed into a test case whose ``make_backend()`` returns a new client of one
    shared store: each node gets its own."""

    def setUp(self):
        super().setUp()
        self.conf.set_override('chunk_size', CHUNK, 'storage')
        self.nodes = {name: warehouse_mod.Warehouse(self.conf, backend=self.make_backend())
                      for name in ('node-a', 'node-b')}

    def mirrors_of(self, name: str) -> manager_mod.MirrorManager:
        node = manager_mod.MirrorManager(self.conf, self.nodes[name],
                                         root=os.path.join(self.tmp, name))
        self.addCleanup(node.close)
        return node

    def write(self, leaf: str, size: int) -> str:
        path = os.path.join(self.tmp, leaf)
        with open(path, 'wb') as f:
            f.write(random.Random(leaf).randbytes(size))
        return path

    def test_a_profile_recorded_on_one_node_prefetches_on_the_other(self):
        manifest = self.nodes['node-a'].import_image(self.write('disk.raw', 8 * CHUNK),
                                                     'disk').manifest
        node_a = self.mirrors_of('node-a')
        mirror = node_a.create('vm1', 'disk')
        mirror.disk.read(3 * CHUNK, 10)
        mirror.disk.read(1 * CHUNK, 10)
        node_a.set_phase('vm1', 'boot-done')
        mirror.disk.read(5 * CHUNK, 10)
        node_a.remove('vm1')

        node_b = self.mirrors_of('node-b')
        mirror = node_b.create('vm2', 'disk')
        self.assertIsNotNone(mirror.prefetcher)
        self.assertFalse(mirror.records_profile)
        mirror.prefetcher.wait()
        self.assertEqual({manifest.chunks[i] for i in (3, 1, 5)},
                         {c for c in manifest.data_chunk_ids() if c in node_b.cache})

    def test_a_kernel_imported_on_one_node_is_fetched_by_the_other(self):
        source = self.write('vmlinuz', 5 * CHUNK + 333)
        self.nodes['node-a'].import_image(source, 'vmlinuz', fmt='raw')
        boot = artifacts.pinned({'kernel': 'vmlinuz'}, self.nodes['node-a'].lookup)
        cache = artifacts.BootArtifacts(os.path.join(self.tmp, 'node-b', 'boot-artifacts'),
                                        self.nodes['node-b'], lock_timeout=30)
        with open(source, 'rb') as f, open(cache.path_of(boot['kernel']), 'rb') as copy:
            self.assertBytesEqual(f.read(), copy.read())


class OverTheWarehouseServiceTest(NodesShareOnlyTheWarehouse,
                                  test_http_backend.ServiceFixtureMixin, base.TestCase):
    def make_backend(self):
        if not hasattr(self, 'service'):
            self.start_service()
        return self.client()


class OverRadosTest(NodesShareOnlyTheWarehouse, test_rados_backend.RadosTestCase):
    pass
