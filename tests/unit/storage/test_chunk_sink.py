"""Snapshots whose new chunks a sink takes (peer replicas): the manifests at once, the
chunks later (store_chunks), and is_whole saying when the store holds all of a version."""
from vmcloud import exception
from vmcloud.storage import manifest as manifest_mod
from vmcloud.storage import warehouse
from vmcloud.storage.backends import file as file_backend
from vmcloud.storage.manifest import VersionRef
from tests.unit.storage import test_warehouse

CHUNK = test_warehouse.CHUNK


class KeepingSink:
    """Takes every chunk but those in ``refused``, keeping their bytes; records each offer."""

    def __init__(self, refused: set[bytes] = frozenset()):
        self.refused = refused
        self.kept: dict[str, bytes] = {}
        self.offers: list[list[str]] = []

    def take(self, chunks: dict[str, bytes]) -> set[str]:
        self.offers.append(list(chunks))
        taken = {chunk_id for chunk_id, data in chunks.items() if bytes(data) not in self.refused}
        self.kept.update((chunk_id, bytes(chunks[chunk_id])) for chunk_id in taken)
        return taken


class SinkTestCase(test_warehouse.WarehouseTestCase):
    def setUp(self):
        super().setUp()
        self.base = self.warehouse.import_image(self.make_raw('base.raw', 'rrrrhs'),
                                                'img').manifest
        self.sink = KeepingSink()

    def snapshot(self, changes: dict[int, bytes], parent: VersionRef | None = None,
                 target: str = 'vm1') -> warehouse.WriteResult:
        [result] = self.warehouse.snapshot_many([(parent or self.base.ref, changes)],
                                                targets=[target], chunk_sink=self.sink)
        self.assertIsInstance(result, warehouse.WriteResult)
        return result


class SnapshotWithASinkTest(SinkTestCase):
    def test_the_sink_takes_the_new_chunks_and_the_manifest_is_stored_at_once(self):
        new = [self.rng.randbytes(CHUNK) for _ in range(2)]
        stored = self.stored_chunk_files()
        result = self.snapshot({1: new[0], 2: new[1], 3: self.base_chunk(0)})
        ids = {manifest_mod.chunk_id(data) for data in new}
        self.assertEqual(ids, set(self.sink.kept))
        self.assertEqual(ids, result.pending)
        self.assertEqual(stored, self.stored_chunk_files())  # nothing new in the store
        self.assertEqual(2 * CHUNK, result.new_bytes)
        self.assertEqual({'changed_chunks': 3, warehouse.REPLICATED_CHUNKS: 2},
                         result.manifest.source)
        self.assertEqual(result.manifest, self.warehouse.manifest('vm1', 1))
        # Only what the store lacks is offered: chunk 0's bytes are the base's.
        self.assertEqual([sorted(ids)], [sorted(offer) for offer in self.sink.offers])

    def base_chunk(self, index: int) -> bytes:
        return self.warehouse.read(self.base, index * CHUNK, CHUNK)

    def test_what_the_sink_refuses_is_stored_in_the_same_session(self):
        kept, refused = self.rng.randbytes(CHUNK), self.rng.randbytes(CHUNK)
        self.sink.refused = {refused}
        sessions = []
        begin_write = self.backend.begin_write
        self.patch(self.backend, 'begin_write', lambda: sessions.append(1) or begin_write())
        result = self.snapshot({0: kept, 1: refused})
        self.assertEqual(1, len(sessions))
        self.assertEqual({manifest_mod.chunk_id(kept)}, result.pending)
        self.assertEqual(refused, self.warehouse.read(result.manifest, CHUNK, CHUNK))
        self.assertRaises(exception.ChunkNotFound, self.warehouse.read, result.manifest, 0,
                          CHUNK)

    def test_a_chunk_shared_by_items_is_offered_once(self):
        shared = self.rng.randbytes(CHUNK)
        base = self.warehouse.import_image(self.make_raw('big.raw', 'r' * 80), 'big').manifest
        # The first item fills a batch, which is offered before the second is read.
        first = {i: self.rng.randbytes(CHUNK) for i in range(1, warehouse.SINK_BATCH)}
        results = self.warehouse.snapshot_many(
            [(base.ref, {0: shared, **first}), (base.ref, {70: shared})],
            targets=['vm1', 'vm2'], chunk_sink=self.sink)
        self.assertEqual([warehouse.SINK_BATCH], [len(offer) for offer in self.sink.offers])
        self.assertEqual({manifest_mod.chunk_id(shared)}, results[1].pending)
        self.assertEqual(0, results[1].new_bytes)

    def test_chunks_are_offered_in_batches_whatever_the_stores_own_batch(self):
        # The file store asks one chunk at a time; a sink places a batch in parallel.
        self.patch(file_backend.PackWriteSession, 'MISSING_BATCH', 1)
        base = self.warehouse.import_image(self.make_raw('big.raw', 'r' * 80), 'big').manifest
        changes = {i: self.rng.randbytes(CHUNK) for i in range(70)}
        self.snapshot(changes, parent=base.ref)
        self.assertEqual([warehouse.SINK_BATCH, 70 - warehouse.SINK_BATCH],
                         [len(offer) for offer in self.sink.offers])

    def test_without_a_sink_nothing_changes(self):
        [result] = self.warehouse.snapshot_many([(self.base.ref, {0: b'a' * CHUNK})])
        self.assertEqual(frozenset(), result.pending)
        self.assertEqual({'changed_chunks': 1}, result.manifest.source)
        self.assertTrue(self.warehouse.verify().ok)


class StoreChunksTest(SinkTestCase):
    def test_the_chunks_a_sink_took_are_stored_later_and_the_version_is_whole(self):
        new = {i: self.rng.randbytes(CHUNK) for i in (0, 2)}
        result = self.snapshot(new)
        self.assertFalse(self.warehouse.is_whole('vm1', 1))
        self.assertFalse(self.warehouse.verify().ok)  # the store lacks them for now
        asked = []
        stored = self.warehouse.store_chunks(
            sorted(result.pending), lambda chunk_id: asked.append(chunk_id) or
            self.sink.kept[chunk_id])
        self.assertEqual(set(result.pending), stored.present)
        self.assertEqual(2 * CHUNK, stored.new_bytes)
        self.assertEqual({}, stored.unreadable)
        self.assertEqual(sorted(result.pending), sorted(asked))
        self.assertTrue(self.warehouse.is_whole('vm1', 1))
        self.assertTrue(self.warehouse.verify().ok)
        self.assertEqual(new[2], self.warehouse.read(result.manifest, 2 * CHUNK, CHUNK))

    def test_chunks_the_store_has_are_not_read(self):
        result = self.snapshot({0: self.rng.randbytes(CHUNK)})
        self.warehouse.store_chunks(result.pending, self.sink.kept.__getitem__)
        stored = self.warehouse.store_chunks(result.pending, self.fail)
        self.assertEqual(set(result.pending), stored.present)
        self.assertEqual(0, stored.new_bytes)

    def fail(self, chunk_id):
        raise AssertionError(f'{chunk_id} read')

    def test_a_chunk_that_cannot_be_read_or_is_wrong_is_left_out_by_name(self):
        good, lost, wrong = (self.rng.randbytes(CHUNK) for _ in range(3))
        result = self.snapshot({0: good, 1: lost, 2: wrong})
        ids = [manifest_mod.chunk_id(data) for data in (good, lost, wrong)]

        def read(chunk_id):
            if chunk_id == ids[1]:
                raise OSError(5, 'Input/output error')
            return b'x' * CHUNK if chunk_id == ids[2] else good
        stored = self.warehouse.store_chunks(ids, read)
        self.assertEqual({ids[0]}, stored.present)
        self.assertIn('Input/output error', stored.unreadable[ids[1]])
        self.assertIn(ids[2], stored.unreadable[ids[2]])
        self.assertNotIn(ids[2], self.stored_chunk_files())
        self.assertFalse(self.warehouse.is_whole(result.manifest.image, 1))

    def test_a_failed_session_stores_nothing(self):
        result = self.snapshot({0: self.rng.randbytes(CHUNK)})
        self.patch(file_backend.PackWriteSession, 'commit', self.broken_commit)
        self.assertRaises(exception.StorageError, self.warehouse.store_chunks, result.pending,
                          self.sink.kept.__getitem__)
        self.assertEqual(set(result.pending), self.warehouse.missing(result.pending))

    @staticmethod
    def broken_commit(session):
        raise exception.StorageError('disk on fire')


class MissingTest(SinkTestCase):
    def test_a_chunk_another_instance_stored_is_not_missing(self):
        # Another node's warehouse client on the same store, which has looked already.
        elsewhere = warehouse.Warehouse(self.conf)
        result = self.snapshot({0: self.rng.randbytes(CHUNK)})
        self.assertEqual(set(result.pending), elsewhere.missing(result.pending))
        self.warehouse.store_chunks(result.pending, self.sink.kept.__getitem__)
        self.assertEqual(set(), elsewhere.missing(result.pending))
        self.assertTrue(elsewhere.is_whole('vm1', 1))


class IsWholeTest(SinkTestCase):
    def test_an_imported_image_and_a_snapshot_of_it_without_a_sink_are_whole(self):
        self.assertTrue(self.warehouse.is_whole('img', 1))
        [plain] = self.warehouse.snapshot_many([(self.base.ref, {0: b'p' * CHUNK})])
        self.assertTrue(self.warehouse.is_whole(plain.manifest.image, plain.manifest.version))

    def test_a_snapshot_of_a_version_not_yet_whole_is_not_whole(self):
        first = self.snapshot({0: self.rng.randbytes(CHUNK)})
        # Written to the store on its own, but its chunk 0 is still the sink's.
        [second] = self.warehouse.snapshot_many([(first.manifest.ref, {1: b'q' * CHUNK})],
                                                targets=['vm2'])
        self.assertFalse(self.warehouse.is_whole('vm2', 1))
        self.warehouse.store_chunks(first.pending, self.sink.kept.__getitem__)
        known = set()
        self.assertTrue(self.warehouse.is_whole('vm2', 1, known))
        self.assertEqual({VersionRef('img', 1), VersionRef('vm1', 1), VersionRef('vm2', 1)},
                         known)

    def test_only_the_chunks_sinks_took_are_asked_and_known_versions_not_at_all(self):
        result = self.snapshot({0: self.rng.randbytes(CHUNK), 1: self.base_chunk_bytes(3)})
        asked = []
        missing = self.backend.missing
        self.patch(self.backend, 'missing', lambda ids: asked.append(set(ids)) or missing(ids))
        known = {self.base.ref}
        self.assertFalse(self.warehouse.is_whole('vm1', 1, known))
        # Chunk 1 is the base's chunk 3: in the store, never asked about.
        self.assertEqual({frozenset(result.pending)}, {frozenset(ids) for ids in asked})
        self.assertEqual({self.base.ref}, known)  # not whole: not added

    def base_chunk_bytes(self, index: int) -> bytes:
        return self.warehouse.read(self.base, index * CHUNK, CHUNK)

    def test_an_unknown_version_is_image_not_found(self):
        self.assertRaises(exception.ImageNotFound, self.warehouse.is_whole, 'vm9', 1)
