"""Boot profiles live in the warehouse: recorded on one node, prefetched on every node."""
import json
import os

import fixtures

from vmcloud import exception
from vmcloud.mirror import manager as manager_mod
from vmcloud.mirror import profile as profile_mod
from vmcloud.storage import warehouse as warehouse_mod
from tests.unit.mirror import test_disk

CHUNK = test_disk.CHUNK


class SharedProfileTest(test_disk.MirrorTestCase):
    def setUp(self):
        super().setUp()
        self.logs = self.useFixture(fixtures.FakeLogger(name='vmcloud.mirror'))

    def node(self, name: str, warehouse=None) -> manager_mod.MirrorManager:
        """A node with its own state directory; only the warehouse is shared."""
        node = manager_mod.MirrorManager(self.conf, warehouse or self.warehouse,
                                         root=os.path.join(self.tmp, name))
        self.addCleanup(node.close)
        return node

    def record_on_node_a(self) -> dict:
        node_a = self.node('node-a')
        mirror = node_a.create('vm1', 'img')
        self.assertTrue(mirror.records_profile)
        mirror.disk.read(4 * CHUNK, 10)
        node_a.set_phase('vm1', 'boot-done')
        mirror.disk.read(CHUNK, 10)
        node_a.remove('vm1')
        return {'boot': [4], 'application': [1], 'shutdown': []}

    def test_a_profile_recorded_on_one_node_prefetches_on_another(self):
        recorded = self.record_on_node_a()
        # Node B opens the warehouse afresh, as another host would.
        node_b = self.node('node-b', warehouse_mod.Warehouse(self.conf))
        mirror = node_b.create('vm2', 'img')
        self.assertFalse(mirror.records_profile)
        self.assertIsNotNone(mirror.prefetcher)
        mirror.prefetcher.wait()
        self.assertEqual({self.manifest.chunks[i] for i in (4, 1)},
                         {c for c in self.manifest.data_chunk_ids() if c in node_b.cache})
        self.assertEqual(recorded, profile_mod.ProfileStore(self.warehouse).load(self.manifest))
        # Neither node keeps a profile of its own.
        for root in ('node-a', 'node-b'):
            for folder, _, files in os.walk(os.path.join(self.tmp, root)):
                self.assertEqual([], [f for f in files if 'profile' in f], folder)

    def test_a_corrupt_or_foreign_profile_is_ignored_with_a_warning(self):
        other = self.warehouse.snapshot_chunks(self.manifest.ref, {3: b'S' * CHUNK},
                                               image='other').manifest
        profile_mod.ProfileStore(self.warehouse).save(other, {'boot': [0, 1]})
        foreign = self.warehouse.read_attachment('other', 'boot-profile')
        node = self.node('node-a')
        for content, why in ((b'{"format": 2, "phases', 'cannot read it'),
                             (foreign, 'recorded for other:1, another image')):
            self.warehouse.write_attachment('img', 'boot-profile', content)
            self.logs.reset_output()
            mirror = node.create('vm1', 'img')
            self.assertIsNone(mirror.prefetcher)
            self.assertTrue(mirror.records_profile)
            self.assertIn('ignoring the boot profile of img', self.logs.output)
            self.assertIn(why, self.logs.output)
            mirror.disk.read(2 * CHUNK, 10)
            node.remove('vm1')
        # The deployment since recorded the image's own in its place.
        saved = json.loads(self.warehouse.read_attachment('img', 'boot-profile'))
        self.assertEqual('img:1', saved['recorded_for'])

    def test_a_profile_the_warehouse_cannot_read_does_not_stop_a_mirror(self):
        self.record_on_node_a()

        def broken(image, name):
            raise exception.StorageError(f'attachment {name} of {image}: broken, on purpose')
        self.warehouse.read_attachment = broken
        mirror = self.node('node-b').create('vm2', 'img')
        self.assertIsNone(mirror.prefetcher)
        self.assertEqual(self.image[:100], mirror.disk.read(0, 100))
        self.assertIn('ignoring the boot profile of img: cannot read it from the warehouse',
                      self.logs.output)

    def test_a_warehouse_write_failure_while_saving_does_not_keep_the_mirror_open(self):
        def broken(image, name, data):
            raise exception.StorageError(f'attachment {name} of {image}: refused, on purpose')
        self.warehouse.write_attachment = broken
        node = self.node('node-a')
        mirror = node.create('vm1', 'img')
        mirror.disk.read(0, 10)
        node.close()
        self.assertIn('cannot save the boot profile of img in the warehouse', self.logs.output)
        self.assertIn('refused, on purpose', self.logs.output)
        # Its locks were given up: another manager of the node's state opens the mirror.
        again = self.node('node-a')
        self.assertEqual(self.image[:100], again.open('vm1').disk.read(0, 100))
