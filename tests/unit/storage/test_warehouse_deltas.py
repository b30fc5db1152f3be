"""Snapshots of block changes: delta chains written, bounded, read, verified, kept by gc,
exported, and stored at about the bytes the guest changed (issue 19)."""
import json
import os
import random
import subprocess

from vmcloud import exception
from vmcloud.storage import delta
from vmcloud.storage import manifest as manifest_mod
from vmcloud.storage import warehouse
from vmcloud.storage.manifest import Manifest
from vmcloud.storage.manifest import VersionRef
from tests import base
from tests import damage

CHUNK = 64 * 1024
BLOCK = 4096
BLOCKS = CHUNK // BLOCK


class Model:
    """A version's bytes as a bytearray, and the changes a snapshot of it passes: the
    blocks writes touched, taken from the model (a 512-byte write changes its whole
    block, the rest of the block the parent's), whole chunks for fully written ones."""

    def __init__(self, data: bytes):
        self.data = bytearray(data)
        self.dirty: set[int] = set()  # absolute block numbers

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset:offset + len(data)] = data
        self.dirty.update(range(offset // BLOCK, (offset + len(data) - 1) // BLOCK + 1))

    def changes(self) -> dict[int, bytes | delta.BlockChanges]:
        by_chunk: dict[int, dict[int, bytes]] = {}
        for block in sorted(self.dirty):
            index, within = divmod(block, BLOCKS)
            start = block * BLOCK
            by_chunk.setdefault(index, {})[within] = bytes(self.data[start:start + BLOCK])
        self.dirty.clear()
        changes: dict[int, bytes | delta.BlockChanges] = {}
        for index, blocks in by_chunk.items():
            if len(blocks) == BLOCKS:
                changes[index] = bytes(self.data[index * CHUNK:(index + 1) * CHUNK])
            else:
                changes[index] = delta.BlockChanges(BLOCK, blocks)
        return changes


class DeltaTestCase(base.TestCase):
    def setUp(self):
        super().setUp()
        self.conf.set_override('chunk_size', CHUNK, 'storage')
        self.warehouse = warehouse.Warehouse(self.conf)
        self.backend = self.warehouse.backend
        self.rng = random.Random(19)

    def import_bytes(self, name: str, data: bytes, holes: tuple[int, ...] = ()) -> Manifest:
        """Import ``data`` with the chunks ``holes`` left as holes."""
        path = os.path.join(self.tmp, f'{name}.raw')
        with open(path, 'wb') as f:
            for index in range(-(-len(data) // CHUNK)):
                if index in holes:
                    f.seek(min(CHUNK, len(data) - index * CHUNK), os.SEEK_CUR)
                else:
                    f.write(data[index * CHUNK:(index + 1) * CHUNK])
            f.truncate()
        return self.warehouse.import_image(path, name).manifest

    def random_image(self, name: str, chunks: int, holes: tuple[int, ...] = ()):
        data = bytearray(self.rng.randbytes(chunks * CHUNK))
        for index in holes:
            data[index * CHUNK:(index + 1) * CHUNK] = bytes(CHUNK)
        return self.import_bytes(name, bytes(data), holes), Model(bytes(data))

    def read_all(self, manifest: Manifest) -> bytes:
        return self.warehouse.read(manifest, 0, manifest.size)

    def stored_format(self, ref: VersionRef) -> int:
        data = self.backend.read_manifest(ref.image, ref.version)
        return json.loads(data.partition(b'\n')[0])['format']


class RandomGenerationsTest(DeltaTestCase):
    def test_100_generations_of_random_writes_read_back_byte_exact(self):
        """THE issue's test: 1 MiB image, 64 KiB chunks, 4 KiB blocks, 100 snapshot
        generations of random writes of 512 B to 1 MiB at random offsets."""
        manifest, model = self.random_image('img', 16, holes=(3, 9, 15))
        size = len(model.data)
        max_depth = self.conf.storage.delta_max_depth
        versions = [(manifest, bytes(model.data))]
        seen_depths = set()
        plain_after_chain = 0
        for generation in range(100):
            for _ in range(self.rng.randint(1, 4)):
                # Log-uniform lengths: most writes small, a few up to the whole image.
                length = int(2 ** self.rng.uniform(9, 20))
                offset = self.rng.randrange(size - length + 1)
                data = (bytes(length) if self.rng.random() < 0.1
                        else self.rng.randbytes(length))
                model.write(offset, data)
            changes = model.changes()
            parent = versions[-1][0]
            if generation % 10 == 9:
                # Two guests of one parent, writing the same: their deltas are one.
                results = self.warehouse.snapshot_many(
                    [(parent.ref, changes), (parent.ref, changes)], targets=['img', 'twin'])
                twin = results[1]
                self.assertEqual(results[0].manifest.chunks, twin.manifest.chunks)
                self.assertEqual(0, twin.new_bytes)
                result = results[0]
            else:
                result = self.warehouse.snapshot_chunks(parent.ref, changes)
            manifest = result.manifest
            self.assertBytesEqual(bytes(model.data), self.read_all(manifest))
            for index, entry in enumerate(manifest.chunks):
                if isinstance(entry, tuple):
                    self.assertLessEqual(len(entry) - 1, max_depth)
                    seen_depths.add(len(entry) - 1)
                elif isinstance(parent.chunks[index], tuple) and index in changes:
                    plain_after_chain += 1
            versions.append((manifest, bytes(model.data)))
        # Every generation still reads as it was written, deltas and compactions alike:
        # whole, any range, and in reads that end inside chunks.
        for generation, (manifest, expected) in enumerate(versions):
            manifest = self.warehouse.lookup(str(manifest.ref))
            self.assertBytesEqual(expected, self.read_all(manifest))
            for _ in range(3):
                offset = self.rng.randrange(size)
                length = self.rng.randrange(size - offset + 1)
                self.assertBytesEqual(expected[offset:offset + length],
                                      self.warehouse.read(manifest, offset, length))
            if generation % 10 == 0:
                with self.warehouse.open(manifest) as reader:
                    reader.seek(generation * 1000)
                    self.assertBytesEqual(expected[generation * 1000:], b''.join(
                        iter(lambda: reader.read(10_000 + generation), b'')))
        # The test went through chains of every depth and through compactions.
        self.assertEqual(set(range(1, max_depth + 1)), seen_depths)
        self.assertGreater(plain_after_chain, 0)
        report = self.warehouse.verify()
        self.assertEqual([], report.problems)
        self.assertEqual(101, len([v for v in self.warehouse.listing().versions
                                   if v.image == 'img']))


class ChainShapeTest(DeltaTestCase):
    def setUp(self):
        super().setUp()
        self.base, self.model = self.random_image('img', 4, holes=(3,))

    def snapshot(self, parent: Manifest, changes) -> warehouse.WriteResult:
        return self.warehouse.snapshot_chunks(parent.ref, changes)

    def test_a_few_blocks_become_a_delta_on_the_parent_chunk(self):
        blocks = {2: self.rng.randbytes(BLOCK), 9: self.rng.randbytes(BLOCK)}
        result = self.snapshot(self.base, {1: delta.BlockChanges(BLOCK, blocks)})
        entry = result.manifest.chunks[1]
        self.assertIsInstance(entry, tuple)
        self.assertEqual(self.base.chunks[1], entry[1])
        self.assertEqual(2, len(entry))
        self.assertEqual(self.base.chunks[0], result.manifest.chunks[0])
        self.assertEqual(3, self.stored_format(result.manifest.ref))
        self.assertLess(result.new_bytes, 2 * BLOCK + 256)
        for block, data in blocks.items():
            self.model.data[CHUNK + block * BLOCK:CHUNK + (block + 1) * BLOCK] = data
        self.assertBytesEqual(bytes(self.model.data), self.read_all(result.manifest))
        self.assertEqual(bytes(self.model.data[CHUNK:2 * CHUNK]),
                         self.warehouse.chunk_data(result.manifest, 1))

    def test_a_delta_on_a_hole_and_zeros_on_a_hole(self):
        result = self.snapshot(self.base, {3: delta.BlockChanges(BLOCK, {0: b'x' * BLOCK})})
        self.assertEqual(None, result.manifest.chunks[3][-1])
        self.assertEqual(b'x' * BLOCK + bytes(CHUNK - BLOCK),
                         self.warehouse.chunk_data(result.manifest, 3))
        zeros = self.snapshot(self.base, {3: delta.BlockChanges(BLOCK, {0: bytes(BLOCK)})})
        self.assertIsNone(zeros.manifest.chunks[3])
        self.assertEqual(0, zeros.new_bytes)

    def test_every_block_changed_is_a_plain_chunk(self):
        # Whatever the ratio allows: a delta of every block saves nothing; and the
        # parent's chunk is not read for it.
        self.conf.set_override('delta_max_ratio', 1.0, 'storage')
        blocks = {i: bytes([i]) * BLOCK for i in range(BLOCKS)}

        def no_read(object_id):
            raise AssertionError(f'read {object_id}')

        result = self.warehouse.snapshot_chunks(
            self.base.ref, {0: delta.BlockChanges(BLOCK, blocks)}, read_object=no_read)
        content = b''.join(blocks[i] for i in range(BLOCKS))
        self.assertEqual(manifest_mod.chunk_id(content), result.manifest.chunks[0])
        zeros = self.snapshot(self.base, {0: delta.BlockChanges(
            BLOCK, {i: bytes(BLOCK) for i in range(BLOCKS)})})
        self.assertIsNone(zeros.manifest.chunks[0])

    def test_no_changed_block_keeps_the_parent_entry(self):
        result = self.snapshot(self.base, {0: delta.BlockChanges(BLOCK, {})})
        self.assertEqual(self.base.chunks, result.manifest.chunks)
        self.assertEqual(2, self.stored_format(result.manifest.ref))

    def test_more_than_the_ratio_is_compacted(self):
        half = {i: self.rng.randbytes(BLOCK) for i in range(BLOCKS // 2)}
        result = self.snapshot(self.base, {0: delta.BlockChanges(BLOCK, half)})
        self.assertTrue(result.manifest.is_delta(0))  # exactly the ratio: still a delta
        more = {**half, BLOCKS - 1: self.rng.randbytes(BLOCK)}
        compacted = self.snapshot(result.manifest, {0: delta.BlockChanges(BLOCK, more)})
        entry = compacted.manifest.chunks[0]
        self.assertIsInstance(entry, str)
        expected = bytearray(self.model.data[:CHUNK])
        for block, data in more.items():
            expected[block * BLOCK:(block + 1) * BLOCK] = data
        self.assertEqual(manifest_mod.chunk_id(bytes(expected)), entry)
        self.conf.set_override('delta_max_ratio', 0.0, 'storage')
        one = self.snapshot(self.base, {0: delta.BlockChanges(BLOCK, {0: b'q' * BLOCK})})
        self.assertFalse(one.manifest.is_delta(0))

    def test_a_chain_deeper_than_the_limit_is_squashed_then_compacted(self):
        self.conf.set_override('delta_max_depth', 3, 'storage')
        manifest = self.base
        base_id = self.base.chunks[0]
        lengths, stored = [], []
        for generation in range(10):
            block = generation % BLOCKS
            data = self.rng.randbytes(BLOCK)
            self.model.data[block * BLOCK:(block + 1) * BLOCK] = data
            before = self.warehouse.stats().chunk_bytes
            manifest = self.snapshot(manifest, {0: delta.BlockChanges(BLOCK, {block: data})}
                                     ).manifest
            stored.append(self.warehouse.stats().chunk_bytes - before)
            entry = manifest.chunks[0]
            lengths.append(len(entry) - 1 if isinstance(entry, tuple) else 0)
            if isinstance(entry, tuple):
                self.assertEqual(base_id, entry[-1])  # squashed over the same base
            self.assertBytesEqual(bytes(self.model.data), self.read_all(manifest))
        # Past 3 deltas, one delta of every block written since the base (4, then 7
        # blocks); past the ratio (10 of 16 blocks), the chunk whole.
        self.assertEqual([1, 2, 3, 1, 2, 3, 1, 2, 3, 0], lengths)
        self.assertEqual(4, len(delta.decode(self.warehouse.read_chunk(
            self.warehouse.manifest('img', 5).chunks[0][0]), 'd').blocks))
        self.assertLess(stored[3], 5 * BLOCK)
        self.assertLess(stored[6], 8 * BLOCK)
        self.assertGreaterEqual(stored[9], CHUNK)
        self.conf.set_override('delta_max_depth', 0, 'storage')
        plain = self.snapshot(self.base, {0: delta.BlockChanges(BLOCK, {0: b'z' * BLOCK})})
        self.assertFalse(plain.manifest.is_delta(0))

    def test_a_deeper_chain_of_an_old_config_reads_and_is_squashed_on_top(self):
        manifest = self.base
        for generation in range(4):
            manifest = self.snapshot(manifest, {0: delta.BlockChanges(
                BLOCK, {generation: bytes([generation + 1]) * BLOCK})}).manifest
        self.assertEqual(5, len(manifest.chunks[0]))
        self.conf.set_override('delta_max_depth', 2, 'storage')
        self.assertEqual(bytes([1]) * BLOCK, self.warehouse.read(manifest, 0, BLOCK))
        on_top = self.snapshot(manifest, {0: delta.BlockChanges(BLOCK, {5: b'5' * BLOCK})})
        self.assertEqual(2, len(on_top.manifest.chunks[0]))
        self.assertEqual(b'5' * BLOCK, self.warehouse.read(on_top.manifest, 5 * BLOCK, BLOCK))
        self.assertEqual(bytes([4]) * BLOCK,
                         self.warehouse.read(on_top.manifest, 3 * BLOCK, BLOCK))

    def test_a_short_last_chunk_takes_a_short_last_block(self):
        data = self.rng.randbytes(CHUNK + BLOCK + 1000)
        manifest = self.import_bytes('short', data)
        result = self.snapshot(manifest, {1: delta.BlockChanges(BLOCK, {1: b'e' * 1000})})
        self.assertTrue(result.manifest.is_delta(1))
        self.assertBytesEqual(data[:CHUNK + BLOCK] + b'e' * 1000,
                              self.read_all(result.manifest))
        error = self.assertRaises(exception.InvalidRange, self.snapshot, manifest,
                                  {1: delta.BlockChanges(BLOCK, {1: b'e' * BLOCK})})
        self.assertIn('holds 4096 bytes, not 1000', str(error))

    def test_blocks_that_do_not_fit_are_refused_and_nothing_is_written(self):
        before = set(self.backend.iter_chunks())
        for blocks, block_size, problem in (
                ({BLOCKS: b'x' * BLOCK}, BLOCK, f'block {BLOCKS} of chunk 0'),
                ({0: b'x'}, BLOCK, 'holds 1 bytes, not 4096'),
                ({0: b'x' * 3000}, 3000, 'not a power of two')):
            error = self.assertRaises(
                exception.InvalidRange, self.snapshot, self.base,
                {2: b'n' * CHUNK, 0: delta.BlockChanges(block_size, blocks)})
            self.assertIn(problem, str(error))
            self.assertIn('img:1', str(error))
        self.assertEqual([1], self.backend.list_versions('img'))
        self.assertEqual(before, set(self.backend.iter_chunks()))
        # In a snapshot_many, the bad item fails alone.
        results = self.warehouse.snapshot_many([
            (self.base.ref, {0: delta.BlockChanges(BLOCK, {BLOCKS: b'x' * BLOCK})}),
            (self.base.ref, {0: delta.BlockChanges(BLOCK, {1: b'y' * BLOCK})})])
        self.assertIsInstance(results[0], exception.InvalidRange)
        self.assertTrue(results[1].manifest.is_delta(0))

    def test_scattered_blocks_store_about_the_bytes_written(self):
        manifest, model = self.random_image('big', 64)
        chunks = self.rng.sample(range(64), 20)
        changes = {}
        for index in chunks:
            block = self.rng.randrange(BLOCKS)
            data = self.rng.randbytes(BLOCK)
            model.write(index * CHUNK + block * BLOCK, data)
            changes[index] = delta.BlockChanges(BLOCK, {block: data})
        before = self.warehouse.stats().chunk_bytes
        result = self.warehouse.snapshot_chunks(manifest.ref, changes)
        stored = self.warehouse.stats().chunk_bytes - before
        self.assertLess(stored, 1.3 * 20 * BLOCK)
        self.assertLess(result.new_bytes, 1.3 * 20 * BLOCK)
        self.assertBytesEqual(bytes(model.data), self.read_all(result.manifest))
        self.assertEqual(20, self.warehouse.stats().delta_objects)


class MaintenanceTest(DeltaTestCase):
    """gc, verify and export of versions with deltas."""

    def setUp(self):
        super().setUp()
        self.conf.set_override('delta_max_depth', 3, 'storage')
        manifest, self.model = self.random_image('img', 4, holes=(2,))
        self.versions = [(manifest, bytes(self.model.data))]
        for generation in range(5):
            for _ in range(3):
                self.model.write(self.rng.randrange(len(self.model.data) - 600),
                                 self.rng.randbytes(600))
            manifest = self.warehouse.snapshot_chunks(manifest.ref,
                                                      self.model.changes()).manifest
            self.versions.append((manifest, bytes(self.model.data)))

    def delta_ids(self, manifest: Manifest) -> set[str]:
        return {c for entry in manifest.chunks if isinstance(entry, tuple)
                for c in entry[:-1]}

    def test_gc_after_deleting_later_versions_keeps_what_the_chains_need(self):
        kept, expected = self.versions[3]
        self.assertTrue(self.delta_ids(kept))
        for manifest, _ in reversed(self.versions[4:]):
            self.warehouse.delete('img', manifest.version)
        report = self.warehouse.gc()
        self.assertGreater(report.removed_chunks, 0)
        stored = {chunk_id for chunk_id, _ in self.backend.iter_chunks()}
        self.assertLessEqual(kept.data_chunk_ids(), stored)
        self.assertBytesEqual(expected, self.read_all(kept))
        self.assertEqual([], self.warehouse.verify().problems)

    def test_gc_keeps_a_parent_chunk_only_a_chain_names(self):
        # The versions before a chain gone from the store (by hand, or restored from
        # a partial backup): only the chain of the last version names its bases.
        last, expected = self.versions[-1]
        bases = {entry[-1] for entry in last.chunks
                 if isinstance(entry, tuple) and entry[-1] is not None}
        self.assertTrue(bases)
        for manifest, _ in self.versions[:-1]:
            self.backend.delete_manifest('img', manifest.version)
        self.assertTrue(bases.isdisjoint(
            c for c in last.chunks if isinstance(c, str)))
        self.warehouse.gc()
        self.assertLessEqual(bases | self.delta_ids(last),
                             {chunk_id for chunk_id, _ in self.backend.iter_chunks()})
        self.assertBytesEqual(expected, self.read_all(last))

    def test_verify_finds_a_corrupt_delta_and_names_it_and_its_users(self):
        last, _ = self.versions[-1]
        victim = sorted(self.delta_ids(last))[0]
        users = sorted(str(m.ref) for m, _ in self.versions if victim in m.data_chunk_ids())
        damage.corrupt_chunk(self.backend, victim)
        report = self.warehouse.verify()
        self.assertFalse(report.ok)
        self.assertEqual(1, len(report.problems), report.problems)
        self.assertIn(f'chunk {victim} is corrupt', report.problems[0])
        self.assertIn('used by ' + ', '.join(users), report.problems[0])
        self.assertEqual(users, report.damaged_versions)
        index = next(i for i, e in enumerate(last.chunks)
                     if isinstance(e, tuple) and victim in e)
        self.assertRaises(exception.CorruptChunk, self.warehouse.chunk_data, last, index)

    def test_verify_finds_a_delta_that_does_not_fit_its_chain(self):
        last, _ = self.versions[-1]
        index = next(i for i, e in enumerate(last.chunks) if isinstance(e, tuple))
        entry = last.chunks[index]
        other = next(e for e in self.versions[0][0].chunks
                     if isinstance(e, str) and e != entry[-1])
        # Hash-valid objects in a chain they do not fit: a delta on another base, and
        # a plain chunk where a delta should be.
        for bad, culprit, problem in (
                ((entry[0], other), entry[0], f'a chain names {other}'),
                ((other, entry[-1]), other, 'bad magic')):
            chunks = list(last.chunks)
            chunks[index] = bad
            forged = Manifest(image='forged', version=1, size=last.size,
                              chunk_size=last.chunk_size, chunks=tuple(chunks),
                              parent=last.ref, created_at='t')
            self.backend.create_manifest('forged', 1, forged.encode())
            report = self.warehouse.verify()
            self.assertEqual(1, len(report.problems), report.problems)
            self.assertIn(f'delta {culprit} is corrupt', report.problems[0])
            self.assertIn(problem, report.problems[0])
            self.assertEqual(['forged:1'], report.damaged_versions)
            self.assertRaises(exception.CorruptChunk, self.read_all,
                              self.warehouse.lookup('forged:1'))
            self.backend.delete_manifest('forged', 1)

    def test_export_of_a_version_with_deltas_is_its_bytes(self):
        last, expected = self.versions[-1]
        self.assertTrue(self.delta_ids(last))
        raw = os.path.join(self.tmp, 'out.raw')
        self.warehouse.export(last, raw)
        with open(raw, 'rb') as f:
            self.assertBytesEqual(expected, f.read())
        qcow2 = os.path.join(self.tmp, 'out.qcow2')
        self.warehouse.export(last, qcow2, 'qcow2')
        back = os.path.join(self.tmp, 'back.raw')
        subprocess.run(['qemu-img', 'convert', '-f', 'qcow2', '-O', 'raw', qcow2, back],
                       check=True)
        with open(back, 'rb') as f:
            self.assertBytesEqual(expected, f.read())
        fifo = os.path.join(self.tmp, 'fifo')
        os.mkfifo(fifo)
        through = os.path.join(self.tmp, 'through.raw')
        with open(through, 'wb') as out, subprocess.Popen(['cat', fifo], stdout=out) as cat:
            self.warehouse.export(last, fifo)
            self.assertEqual(0, cat.wait(timeout=60))
        with open(through, 'rb') as f:
            self.assertBytesEqual(expected, f.read())

    def test_stats_count_deltas(self):
        deltas = set().union(*(self.delta_ids(m) for m, _ in self.versions))
        stats = self.warehouse.stats()
        self.assertEqual(len(deltas), stats.delta_objects)
        self.assertEqual(len(set().union(*(m.data_chunk_ids() for m, _ in self.versions))),
                         stats.chunks)


class SinkTest(DeltaTestCase):
    """Deltas a sink took are pending like chunks, and a compaction reads the parent's
    objects with the reader it is given."""

    class Sink:
        def __init__(self):
            self.held: dict[str, bytes] = {}

        def take(self, chunks):
            self.held.update({k: bytes(v) for k, v in chunks.items()})
            return set(chunks)

    def test_pending_deltas_and_a_compaction_over_them(self):
        manifest, model = self.random_image('img', 2)
        sink = self.Sink()
        data = b'p' * BLOCK
        first, = self.warehouse.snapshot_many(
            [(manifest.ref, {0: delta.BlockChanges(BLOCK, {1: data})})], chunk_sink=sink)
        delta_id = first.manifest.chunks[0][0]
        self.assertEqual(frozenset({delta_id}), first.pending)
        self.assertFalse(self.warehouse.is_whole('img', first.manifest.version))
        # Past the ratio: the compaction resolves the parent's chain, whose delta
        # only the sink has.
        many = delta.BlockChanges(BLOCK, {i: b'c' * BLOCK for i in range(2, BLOCKS)})
        failed, = self.warehouse.snapshot_many([(first.manifest.ref, {0: many})])
        self.assertIsInstance(failed, exception.ChunkNotFound)
        self.assertEqual(delta_id, failed.chunk_id)

        def read_object(object_id):
            return sink.held[object_id] if object_id in sink.held else \
                self.warehouse.read_chunk(object_id)

        done, = self.warehouse.snapshot_many([(first.manifest.ref, {0: many})],
                                             read_object=read_object)
        model.write(BLOCK, data)
        model.write(2 * BLOCK, b'c' * (CHUNK - 2 * BLOCK))
        self.assertIsInstance(done.manifest.chunks[0], str)
        self.warehouse.store_chunks(first.pending, sink.held.__getitem__)
        self.assertTrue(self.warehouse.is_whole('img', done.manifest.version))
        self.assertBytesEqual(bytes(model.data), self.read_all(done.manifest))


class OldWarehouseTest(DeltaTestCase):
    def test_versions_without_chains_stay_format_2_and_read_as_before(self):
        manifest, model = self.random_image('img', 3)
        whole = self.warehouse.snapshot_chunks(manifest.ref, {1: b'w' * CHUNK}).manifest
        for ref in (manifest.ref, whole.ref):
            self.assertEqual(2, self.stored_format(ref))
        with_delta = self.warehouse.snapshot_chunks(
            whole.ref, {2: delta.BlockChanges(BLOCK, {0: b'd' * BLOCK})}).manifest
        self.assertEqual(3, self.stored_format(with_delta.ref))
        model.write(CHUNK, b'w' * CHUNK)
        self.assertBytesEqual(bytes(model.data), self.read_all(self.warehouse.lookup('img:2')))
