"""Snapshot items replicated at once and persistent once the warehouse holds every chunk
of their versions: the Snapshotter over SQLite with a real (file) warehouse."""
import random

from vmcloud import exception
from vmcloud.dispatcher import states
from vmcloud.storage import warehouse as warehouse_mod
from tests.unit.dispatcher import test_snapshot
from tests.unit.storage import test_chunk_sink

CHUNK = 64 * 1024


class PersistenceTestCase(test_snapshot.SnapshotterTestCase):
    def setUp(self):
        super().setUp()
        self.rng = random.Random(7)
        self.base = self.warehouse.import_image(self.raw('base.raw', 4), 'guest').manifest
        self.sink = test_chunk_sink.KeepingSink()

    def raw(self, leaf: str, chunks: int) -> str:
        path = f'{self.tmp}/{leaf}'
        with open(path, 'wb') as f:
            f.write(self.rng.randbytes(chunks * CHUNK))
        return path

    def snapshotter(self):
        # (Called by the base class's setUp.)
        self.conf.set_override('chunk_size', CHUNK, 'storage')
        self.warehouse = warehouse_mod.Warehouse(self.conf)
        snapshots = super().snapshotter()
        snapshots.warehouse = self.warehouse
        return snapshots

    def replicate(self, names: list[str], parent=None) -> dict[str, warehouse_mod.WriteResult]:
        """A version of each instance ``names`` whose new chunk the sink took."""
        results = self.warehouse.snapshot_many(
            [(parent or self.base.ref, {0: self.rng.randbytes(CHUNK)}) for _ in names],
            targets=names, chunk_sink=self.sink)
        return dict(zip(names, results))

    def persist(self, result: warehouse_mod.WriteResult) -> None:
        self.warehouse.store_chunks(result.pending, self.sink.kept.__getitem__)

    def cut(self) -> dict:
        return self.snapshots.snapshot(self.deployment_id)

    def report(self, snapshot: dict, written: dict[str, warehouse_mod.WriteResult],
               persistent: bool = False) -> None:
        for name, item in self.items(snapshot).items():
            self.snapshots.item_done(snapshot['id'], item['instance_id'],
                                     str(written[name].manifest.ref), CHUNK, '', persistent)


class ReplicatedThenPersistentTest(PersistenceTestCase):
    def test_available_and_replicated_at_once_persistent_once_the_warehouse_has_it(self):
        snapshot = self.cut()
        self.assertEqual((False, False), (snapshot['replicated'], snapshot['persistent']))
        written = self.replicate(['vm-a', 'vm-b', 'vm-c'])
        self.report(snapshot, written)
        shown = self.snapshots.show(snapshot['id'])
        self.assertEqual(states.AVAILABLE, shown['state'])
        self.assertEqual((True, False), (shown['replicated'], shown['persistent']))
        self.assertEqual({(True, False)}, {(i['replicated'], i['persistent'])
                                           for i in shown['items']})
        # Deployable as it is.
        versions, _ = self.snapshots.stored_versions(snapshot['id'])
        self.assertEqual(['vm-a:1', 'vm-b:1', 'vm-c:1'], versions)

        self.persist(written['vm-a'])
        items = self.items(self.snapshots.show(snapshot['id']))
        self.assertEqual({'vm-a': True, 'vm-b': False, 'vm-c': False},
                         {name: item['persistent'] for name, item in items.items()})
        for name in ('vm-b', 'vm-c'):
            self.persist(written[name])
        [listed] = self.snapshots.list(self.deployment_id)
        self.assertEqual((True, True), (listed['replicated'], listed['persistent']))

        # The answer is kept: the warehouse is not asked again.
        self.patch(self.warehouse, 'is_whole', self.fail)
        shown = self.snapshots.show(snapshot['id'])
        self.assertEqual((True, True), (shown['replicated'], shown['persistent']))

    def fail(self, *args, **kwargs):
        raise AssertionError(f'warehouse asked: {args}')

    def test_the_hosts_report_makes_it_persistent_once_checked(self):
        snapshot = self.cut()
        written = self.replicate(['vm-a', 'vm-b', 'vm-c'])
        self.report(snapshot, written)
        ids = self.ids
        # Said before the chunks are there: the check keeps it from being believed.
        self.snapshots.items_persisted(snapshot['id'], [ids['vm-a']])
        self.assertFalse(self.items(self.show(snapshot['id']))['vm-a']['persistent'])
        self.persist(written['vm-a'])
        self.snapshots.items_persisted(snapshot['id'], [ids['vm-a'], 'no-such-instance'])
        items = self.items(self.show(snapshot['id']))  # the rows, no check of its own
        self.assertTrue(items['vm-a']['persistent'])
        self.assertFalse(items['vm-b']['persistent'])

    def test_an_upload_all_in_the_warehouse_is_persistent_at_once(self):
        snapshot = self.cut()
        written = dict(zip(['vm-a', 'vm-b', 'vm-c'], self.warehouse.snapshot_many(
            [(self.base.ref, {1: self.rng.randbytes(CHUNK)}) for _ in range(3)],
            targets=['vm-a', 'vm-b', 'vm-c'])))
        self.report(snapshot, written, persistent=True)
        shown = self.show(snapshot['id'])
        self.assertEqual((True, True), (shown['replicated'], shown['persistent']))

    def test_an_upload_of_its_own_chunks_is_not_persistent_while_its_parent_is_not(self):
        # A deployment from a snapshot not yet persistent, snapshotted again: its own
        # chunks went to the warehouse, its parent's are still on peers.
        parents = self.replicate(['old-a', 'old-b', 'old-c'])
        snapshot = self.cut()
        written = {}
        for name, parent in zip(['vm-a', 'vm-b', 'vm-c'], parents.values()):
            [written[name]] = self.warehouse.snapshot_many(
                [(parent.manifest.ref, {2: self.rng.randbytes(CHUNK)})], targets=[name])
        self.report(snapshot, written, persistent=True)
        self.assertFalse(self.show(snapshot['id'])['persistent'])
        for parent in parents.values():
            self.persist(parent)
        self.assertTrue(self.snapshots.show(snapshot['id'])['persistent'])

    def test_a_partial_snapshot_is_as_replicated_and_persistent_as_what_it_stored(self):
        snapshot = self.cut()
        written = self.replicate(['vm-a', 'vm-b'])
        items = self.items(snapshot)
        for name in ('vm-a', 'vm-b'):
            self.snapshots.item_done(snapshot['id'], items[name]['instance_id'],
                                     str(written[name].manifest.ref), CHUNK, '', False)
        self.snapshots.item_done(snapshot['id'], items['vm-c']['instance_id'], '', 0,
                                 'disk on fire')
        shown = self.snapshots.show(snapshot['id'])
        self.assertEqual((states.PARTIAL, True, False),
                         (shown['state'], shown['replicated'], shown['persistent']))
        for result in written.values():
            self.persist(result)
        shown = self.snapshots.show(snapshot['id'])
        self.assertEqual((True, True), (shown['replicated'], shown['persistent']))
        self.assertEqual((False, False), (self.items(shown)['vm-c']['replicated'],
                                          self.items(shown)['vm-c']['persistent']))

    def test_a_failed_snapshot_is_neither(self):
        snapshot = self.cut()
        self.upload_all(snapshot, failing={name: 'lost' for name in self.ids})
        shown = self.snapshots.show(snapshot['id'])
        self.assertEqual((states.ERROR, False, False),
                         (shown['state'], shown['replicated'], shown['persistent']))

    def test_a_warehouse_away_is_asked_once_and_the_snapshot_shown_all_the_same(self):
        snapshot = self.cut()
        self.report(snapshot, self.replicate(['vm-a', 'vm-b', 'vm-c']))
        asked = []

        def away(*args, **kwargs):
            asked.append(args)
            raise exception.StorageError('warehouse at http://wh:9494 unreachable')
        self.patch(self.warehouse, 'is_whole', away)
        with self.assertLogs('vmcloud.dispatcher.snapshot', 'WARNING') as logs:
            shown = self.snapshots.show(snapshot['id'])
        self.assertEqual((True, False), (shown['replicated'], shown['persistent']))
        self.assertEqual(1, len(asked))
        self.assertIn('unreachable', logs.output[0])

    def test_a_version_deleted_meanwhile_stays_not_persistent(self):
        snapshot = self.cut()
        written = self.replicate(['vm-a', 'vm-b', 'vm-c'])
        self.report(snapshot, written)
        self.warehouse.delete('vm-a', force=True)
        for name in ('vm-b', 'vm-c'):
            self.persist(written[name])
        items = self.items(self.snapshots.show(snapshot['id']))
        self.assertEqual({'vm-a': False, 'vm-b': True, 'vm-c': True},
                         {name: item['persistent'] for name, item in items.items()})


class WithoutAWarehouseTest(test_snapshot.SnapshotterTestCase):
    """A Snapshotter given no warehouse takes the hosts' word."""

    def test_the_reports_are_taken_as_they_come(self):
        snapshot = self.snapshots.snapshot(self.deployment_id)
        items = self.items(snapshot)
        self.snapshots.item_done(snapshot['id'], items['vm-a']['instance_id'], 'vm-a:1', 1, '',
                                 persistent=True)
        for name in ('vm-b', 'vm-c'):
            self.snapshots.item_done(snapshot['id'], items[name]['instance_id'], f'{name}:1',
                                     1, '', persistent=False)
        shown = self.snapshots.show(snapshot['id'])
        self.assertEqual((True, False), (shown['replicated'], shown['persistent']))
        self.snapshots.items_persisted(snapshot['id'], [items['vm-b']['instance_id'],
                                                        items['vm-c']['instance_id']])
        shown = self.snapshots.show(snapshot['id'])
        self.assertEqual((True, True), (shown['replicated'], shown['persistent']))
