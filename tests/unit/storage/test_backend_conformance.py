"""The contract of vmcloud.storage.backend.Backend, run against every backend.

To test a new backend, subclass BackendContract together with tests.base.TestCase
and give it a factory::

    class RadosBackendTest(test_backend_conformance.BackendContract, base.TestCase):
        def make_backend(self):
            return rados.RadosBackend(self.conf)   # configured in setUp

        def damage_item_holding(self, backend, chunk_id):
            ...   # make the stored item that indexes chunk_id unreadable

``make_backend()`` must return a NEW instance on the SAME store each time it is
called within one test (a fresh, empty store per test): two instances stand for
two processes, so "gc in one, read in the other" is tested with them.
``damage_item_holding()`` is optional; without it the damage tests are skipped.
The file backend's own cases (its layout, injected OSErrors) follow the contract.
"""
import errno
import hashlib
import os
import random
import threading
from unittest import mock

from vmcloud import exception
from vmcloud.storage import backend as backend_mod
from vmcloud.storage import durable
from vmcloud.storage.backends import file as file_backend
from tests import base

CHUNK = 4096


class BackendContract:
    """Mixin: every test here must pass for every backend."""

    def make_backend(self) -> backend_mod.Backend:
        raise NotImplementedError

    def damage_item_holding(self, backend: backend_mod.Backend, chunk_id: str) -> None:
        """Corrupt what holds ``chunk_id`` in ``backend``'s store: every backend's suite
        provides it, so the damage tests run for every backend."""
        raise NotImplementedError

    def setUp(self):
        super().setUp()
        self.rng = random.Random(12)
        self.backend = self.make_backend()

    # -- helpers -------------------------------------------------------------

    def chunk(self) -> tuple[str, bytes]:
        data = self.rng.randbytes(CHUNK)
        return hashlib.sha256(data).hexdigest(), data

    def store(self, backend: backend_mod.Backend, *chunks: tuple[str, bytes]) -> None:
        """Write the chunks in one session, so that they are stored together."""
        with backend.shared_lock():
            session = backend.begin_write()
            for chunk_id, data in chunks:
                session.put_chunk(chunk_id, data)
            session.commit()

    def assertAbsent(self, backend: backend_mod.Backend, chunk_id: str) -> None:
        self.assertFalse(backend.has_chunk(chunk_id))
        error = self.assertRaises(exception.ChunkNotFound, backend.read_chunk, chunk_id)
        self.assertEqual(chunk_id, error.chunk_id)
        self.assertNotIn(chunk_id, dict(backend.iter_chunks()))

    # -- capabilities ----------------------------------------------------------

    def test_capabilities_are_declared_and_scratch_space_matches(self):
        capabilities = type(self.backend).CAPABILITIES
        self.assertIsInstance(capabilities, backend_mod.Capabilities)
        scratch = self.backend.scratch_dir()
        if backend_mod.Capabilities.SCRATCH_SPACE in capabilities:
            self.assertTrue(os.path.isdir(scratch))
            # What is left there counts as abandoned.
            with open(os.path.join(scratch, 'left-over'), 'wb') as f:
                f.write(b'x')
            with self.backend.exclusive_lock(5):
                self.assertGreaterEqual(self.backend.purge_abandoned(), 1)
            self.assertFalse(os.path.exists(os.path.join(scratch, 'left-over')))
        else:
            self.assertIsNone(scratch)

    # -- chunks --------------------------------------------------------------

    def test_committed_chunks_are_readable_by_every_instance(self):
        a, b = self.chunk(), self.chunk()
        other = self.make_backend()
        self.assertAbsent(other, a[0])  # loads other's view before the write
        self.store(self.backend, a, b)
        for backend in (self.backend, other, self.make_backend()):
            self.assertEqual(a[1], backend.read_chunk(a[0]))
            self.assertTrue(backend.has_chunk(a[0]))
            self.assertEqual(b[1], backend.read_chunk(b[0]))
            self.assertEqual({a[0]: CHUNK, b[0]: CHUNK}, dict(backend.iter_chunks()))
        self.assertGreaterEqual(self.backend.stored_chunk_bytes(), 2 * CHUNK)

    def test_missing_chunk(self):
        self.assertAbsent(self.backend, 'ab' * 32)

    def test_staged_chunks_are_invisible_until_commit(self):
        a = self.chunk()
        other = self.make_backend()
        with self.backend.shared_lock():
            session = self.backend.begin_write()
            session.put_chunk(*a)
            self.assertAbsent(other, a[0])
            session.commit()
        self.assertEqual(a[1], other.read_chunk(a[0]))

    def test_aborted_chunks_are_never_visible(self):
        a = self.chunk()
        with self.backend.shared_lock():
            session = self.backend.begin_write()
            session.put_chunk(*a)
            session.abort()
            session.abort()  # never raises, even twice
        self.assertAbsent(self.backend, a[0])
        self.assertAbsent(self.make_backend(), a[0])
        self.assertEqual(0, self.backend.stored_chunk_bytes())

    def test_dedup_within_a_session_and_against_the_store(self):
        a, b = self.chunk(), self.chunk()
        with self.backend.shared_lock():
            session = self.backend.begin_write()
            self.assertEqual({a[0]}, session.missing([a[0], a[0]]))
            session.put_chunk(*a)
            self.assertTrue(session.has_put(a[0]))
            self.assertEqual(set(), session.missing([a[0]]))  # this session has it
            session.put_chunk(*a)  # a repeat is dropped
            session.commit()
        self.assertEqual(CHUNK, session.stored_bytes)
        other = self.make_backend()
        with other.shared_lock():
            session = other.begin_write()
            self.assertEqual({b[0]}, session.missing([a[0], b[0]]))  # the store has a
            self.assertFalse(session.has_put(a[0]))
            session.put_chunk(*b)
            session.commit()
        self.assertEqual(CHUNK, session.stored_bytes)
        self.assertEqual({a[0], b[0]}, set(dict(self.backend.iter_chunks())))

    def test_missing_is_asked_in_batches_and_sees_only_committed_chunks(self):
        chunks = [self.chunk() for _ in range(130)]
        self.store(self.backend, *chunks[::2])
        other = self.make_backend()
        with other.shared_lock():
            staging = other.begin_write()
            staging.put_chunk(*chunks[1])  # another session's, not committed
            with self.backend.shared_lock():
                session = self.backend.begin_write()
                self.assertGreaterEqual(session.MISSING_BATCH, 1)
                self.assertEqual({c for c, _ in chunks[1::2]},
                                 session.missing(c for c, _ in chunks))
                self.assertEqual(set(), session.missing([]))
                session.abort()
            staging.abort()
        # The backend's own question, for callers that know many ids ahead.
        ids = [c for c, _ in chunks] * 2
        self.assertEqual({c for c, _ in chunks[1::2]}, self.make_backend().missing(ids))
        self.assertEqual(set(), self.backend.missing(iter([])))

    def test_a_chunk_another_session_stored_meanwhile_is_put_safely(self):
        # missing() answered before the other writer committed: the chunk is put
        # again, and both sessions commit a readable chunk.
        a = self.chunk()
        other = self.make_backend()
        with self.backend.shared_lock(), other.shared_lock():
            first, second = self.backend.begin_write(), other.begin_write()
            self.assertEqual({a[0]}, first.missing([a[0]]))
            self.assertEqual({a[0]}, second.missing([a[0]]))
            second.put_chunk(*a)
            second.commit()
            first.put_chunk(*a)
            first.commit()
        for backend in (self.backend, self.make_backend()):
            self.assertEqual(a[1], backend.read_chunk(a[0]))
        with self.backend.exclusive_lock(5):  # gc may drop a copy, never the chunk
            self.assertEqual(0, self.backend.retain({a[0]})[0])
        self.assertEqual(a[1], self.make_backend().read_chunk(a[0]))

    def test_retain_removes_exactly_the_unreferenced(self):
        a, b, c = self.chunk(), self.chunk(), self.chunk()
        self.store(self.backend, a, b, c)
        before = self.backend.stored_chunk_bytes()
        with self.backend.exclusive_lock(5):
            self.assertEqual((2, 2 * CHUNK), self.backend.retain({a[0]}))
        self.assertEqual(a[1], self.backend.read_chunk(a[0]))
        self.assertAbsent(self.backend, b[0])
        self.assertAbsent(self.backend, c[0])
        self.assertLess(self.backend.stored_chunk_bytes(), before)
        with self.backend.exclusive_lock(5):
            self.assertEqual((0, 0), self.backend.retain({a[0]}))

    def test_purge_abandoned_removes_a_crashed_session(self):
        a = self.chunk()
        with self.backend.shared_lock():
            session = self.backend.begin_write()
            session.put_chunk(*a)
            # Neither committed nor aborted, as after a crash.
        with self.backend.exclusive_lock(5):
            self.assertGreaterEqual(self.backend.purge_abandoned(), 1)
            self.assertEqual(0, self.backend.purge_abandoned())
        self.assertAbsent(self.backend, a[0])

    # -- gc in one instance, read in another ------------------------------------

    def test_reader_finds_chunks_gc_moved_in_another_instance(self):
        a, b, c = self.chunk(), self.chunk(), self.chunk()
        self.store(self.backend, a, b, c)
        reader = self.make_backend()
        for chunk_id, data in (a, b, c):  # the reader now knows where each one is
            self.assertEqual(data, reader.read_chunk(chunk_id))
        gc = self.make_backend()
        with gc.exclusive_lock(5):
            gc.retain({a[0], c[0]})  # must move a and c if they share storage with b
        self.assertEqual(a[1], reader.read_chunk(a[0]))
        self.assertEqual(c[1], reader.read_chunk(c[0]))
        self.assertTrue(reader.has_chunk(a[0]))
        self.assertAbsent(reader, b[0])

    def test_reader_survives_several_gcs(self):
        chunks = [self.chunk() for _ in range(4)]
        self.store(self.backend, *chunks)
        reader = self.make_backend()
        for chunk_id, data in chunks:
            reader.read_chunk(chunk_id)
        keep = {chunk_id for chunk_id, _ in chunks}
        for chunk_id, _ in chunks[:3]:
            keep.discard(chunk_id)
            gc = self.make_backend()
            with gc.exclusive_lock(5):
                gc.retain(keep)
        self.assertEqual(chunks[3][1], reader.read_chunk(chunks[3][0]))

    def test_read_chunks_reads_many_from_several_writes_at_once(self):
        first, second = [self.chunk() for _ in range(3)], [self.chunk() for _ in range(2)]
        self.store(self.backend, *first)
        self.store(self.backend, *second)
        reader = self.make_backend()
        wanted = [second[1], first[2], first[0], second[0], first[2]]  # one asked twice
        found = reader.read_chunks([chunk_id for chunk_id, _ in wanted])
        self.assertEqual({chunk_id: data for chunk_id, data in wanted},
                         {chunk_id: bytes(data) for chunk_id, data in found.items()})
        self.assertEqual({}, reader.read_chunks([]))
        missing = 'cd' * 32
        error = self.assertRaises(exception.ChunkNotFound, reader.read_chunks,
                                  [first[0][0], missing])
        self.assertEqual(missing, error.chunk_id)

    def test_read_chunks_finds_chunks_gc_moved_in_another_instance(self):
        a, b, c = self.chunk(), self.chunk(), self.chunk()
        self.store(self.backend, a, b, c)
        reader = self.make_backend()
        reader.read_chunks([a[0], b[0], c[0]])  # the reader now knows where each one is
        gc = self.make_backend()
        with gc.exclusive_lock(5):
            gc.retain({a[0], c[0]})
        self.assertEqual({a[0]: a[1], c[0]: c[1]}, {
            chunk_id: bytes(data) for chunk_id, data in reader.read_chunks(
                [a[0], c[0]]).items()})
        self.assertRaises(exception.ChunkNotFound, reader.read_chunks, [b[0]])

    def test_threads_keep_reading_while_gc_rewrites(self):
        live = [self.chunk() for _ in range(6)]
        dead = [self.chunk() for _ in range(5)]
        self.store(self.backend, *live, *dead)
        stop = threading.Event()
        errors, reads = [], [0]

        def read():
            try:
                while not stop.is_set():
                    for chunk_id, data in live:
                        if self.backend.read_chunk(chunk_id) != data:
                            errors.append(f'wrong bytes for {chunk_id}')
                        reads[0] += 1
            except Exception as exc:  # noqa: B902 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=read) for _ in range(3)]
        for thread in threads:
            thread.start()
        try:
            keep = {chunk_id for chunk_id, _ in live + dead}
            for chunk_id, _ in dead:
                keep.discard(chunk_id)
                gc = self.make_backend()
                with gc.exclusive_lock(5):
                    gc.retain(keep)
                target = reads[0] + 3 * len(live)
                while reads[0] < target and not errors:  # let the readers catch up
                    threading.Event().wait(0.001)
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        self.assertEqual([], errors)

    def test_has_chunk_is_not_stale_after_gc_elsewhere(self):
        a, b = self.chunk(), self.chunk()
        self.store(self.backend, a, b)
        writer = self.make_backend()
        self.assertTrue(writer.has_chunk(b[0]))
        with self.backend.exclusive_lock(5):
            self.backend.retain({a[0]})
        self.assertFalse(writer.has_chunk(b[0]))
        # What it matters for: a later write must store b again, not dedup
        # against the removed copy and leave a version naming a missing chunk.
        with writer.shared_lock():
            session = writer.begin_write()
            self.assertEqual({b[0]}, session.missing([b[0]]))
            session.put_chunk(*b)
            session.commit()
        self.assertEqual(b[1], self.make_backend().read_chunk(b[0]))

    # -- damage ----------------------------------------------------------------

    def test_nothing_is_damaged_in_a_healthy_store(self):
        self.store(self.backend, self.chunk())
        self.backend.create_manifest('img', 1, b'{}')
        self.assertEqual([], self.backend.damaged())

    def test_damage_stays_local_and_is_reported(self):
        a, b = self.chunk(), self.chunk()
        self.store(self.backend, a)
        self.store(self.backend, b)
        self.backend.create_manifest('img', 1, b'{"m": 1}')
        self.damage_item_holding(self.backend, a[0])
        for backend in (self.backend, self.make_backend()):
            problems = backend.damaged()
            self.assertEqual(1, len(problems), problems)
            self.assertAbsent(backend, a[0])
            self.assertEqual(b[1], backend.read_chunk(b[0]))
            self.assertEqual(['img'], backend.list_images())
            self.assertEqual(b'{"m": 1}', backend.read_manifest('img', 1))
        # gc cannot know what the damaged item holds, so it keeps it.
        with self.backend.exclusive_lock(5):
            self.backend.purge_abandoned()
            self.backend.retain(set())
        self.assertEqual(problems, self.make_backend().damaged())
        self.assertAbsent(self.backend, b[0])

    # -- manifests -----------------------------------------------------------

    def test_manifest_round_trip_and_listing(self):
        other = self.make_backend()
        self.assertEqual([], other.list_images())
        self.backend.create_manifest('b', 2, b'b2')
        self.backend.create_manifest('b', 10, b'b10')
        self.backend.create_manifest('a', 1, b'a1')
        self.assertEqual(['a', 'b'], other.list_images())  # never cached
        self.assertEqual([2, 10], other.list_versions('b'))
        self.assertEqual([], other.list_versions('c'))
        self.assertEqual(b'b10', other.read_manifest('b', 10))
        self.assertEqual(7, self.backend.manifests_stored_bytes())

    def test_existing_version_is_refused_and_kept(self):
        self.backend.create_manifest('img', 1, b'first')
        error = self.assertRaises(exception.VersionExists, self.make_backend().create_manifest,
                                  'img', 1, b'second')
        self.assertEqual(('img', 1), (error.image, error.version))
        self.assertEqual(b'first', self.backend.read_manifest('img', 1))

    def test_missing_manifest(self):
        self.backend.create_manifest('img', 1, b'x')
        for image, version in (('img', 2), ('other', 1)):
            error = self.assertRaises(exception.ImageNotFound, self.backend.read_manifest,
                                      image, version)
            self.assertEqual((image, version), (error.image, error.version))
            self.assertRaises(exception.ImageNotFound, self.backend.read_manifest_prefix,
                              image, version, 10)
            self.assertRaises(exception.ImageNotFound, self.backend.delete_manifest,
                              image, version)

    def test_delete_manifest(self):
        self.backend.create_manifest('img', 1, b'1')
        self.backend.create_manifest('img', 2, b'2')
        self.make_backend().delete_manifest('img', 1)
        self.assertEqual([2], self.backend.list_versions('img'))
        self.assertRaises(exception.ImageNotFound, self.backend.read_manifest, 'img', 1)
        self.backend.delete_manifest('img', 2)
        self.assertEqual([], self.backend.list_images())
        self.backend.create_manifest('img', 1, b'again')  # the name is free again
        self.assertEqual(b'again', self.backend.read_manifest('img', 1))

    def test_read_manifest_prefix(self):
        data = bytes(range(256)) * 64
        self.backend.create_manifest('img', 1, data)
        self.assertEqual(data[:100], self.backend.read_manifest_prefix('img', 1, 100))
        self.assertEqual(data, self.backend.read_manifest_prefix('img', 1, len(data) + 10))
        self.assertEqual(b'', self.backend.read_manifest_prefix('img', 1, 0))

    # -- attachments -------------------------------------------------------------

    def test_attachment_round_trip_replace_and_absent(self):
        self.backend.create_manifest('img', 1, b'm')
        other = self.make_backend()
        self.assertIsNone(other.read_attachment('img', 'profile'))
        self.assertIsNone(other.read_attachment('none', 'profile'))
        data = self.rng.randbytes(backend_mod.MAX_ATTACHMENT_BYTES)  # the largest kept
        self.backend.write_attachment('img', 'profile', data)
        self.assertEqual(data, other.read_attachment('img', 'profile'))
        other.write_attachment('img', 'profile', b'second')  # the last writer wins
        self.assertEqual(b'second', self.backend.read_attachment('img', 'profile'))
        self.backend.write_attachment('img', 'empty', b'')
        self.assertEqual(b'', other.read_attachment('img', 'empty'))
        self.assertIsNone(other.read_attachment('img', 'prof'))  # names are exact

    def test_attachments_are_neither_chunks_nor_manifests(self):
        a = self.chunk()
        self.store(self.backend, a)
        self.backend.create_manifest('img', 1, b'm')
        chunk_bytes = self.backend.stored_chunk_bytes()
        self.backend.write_attachment('img', 'profile', b'p' * 1000)
        self.assertEqual({a[0]: CHUNK}, dict(self.backend.iter_chunks()))
        self.assertEqual(['img'], self.backend.list_images())
        self.assertEqual([1], self.backend.list_versions('img'))
        self.assertEqual(1, self.backend.manifests_stored_bytes())
        self.assertEqual(chunk_bytes, self.backend.stored_chunk_bytes())
        self.assertEqual([], self.backend.damaged())
        with self.backend.exclusive_lock(5):  # gc keeps them
            self.backend.purge_abandoned()
            self.assertEqual((1, CHUNK), self.backend.retain(set()))
        self.assertEqual(b'p' * 1000, self.make_backend().read_attachment('img', 'profile'))

    def test_delete_attachments_removes_every_one_of_that_image_only(self):
        for image in ('img', 'keep'):
            self.backend.create_manifest(image, 1, b'm')
            self.backend.write_attachment(image, 'profile', b'p')
        self.backend.write_attachment('img', 'other.1', b'o')
        self.make_backend().delete_attachments('img')
        self.assertIsNone(self.backend.read_attachment('img', 'profile'))
        self.assertIsNone(self.backend.read_attachment('img', 'other.1'))
        self.assertEqual(b'p', self.backend.read_attachment('keep', 'profile'))
        self.backend.delete_attachments('img')  # none left: not an error
        self.backend.delete_attachments('never')
        self.backend.delete_manifest('img', 1)  # the image goes away whole
        self.assertEqual(['keep'], self.backend.list_images())
        self.backend.create_manifest('img', 1, b'again')
        self.assertIsNone(self.backend.read_attachment('img', 'profile'))
        self.backend.write_attachment('img', 'profile', b'new')
        self.assertEqual(b'new', self.backend.read_attachment('img', 'profile'))

    def test_list_and_delete_one_attachment(self):
        for image in ('img', 'keep'):
            self.backend.create_manifest(image, 1, b'm')
        self.assertEqual([], self.backend.list_attachments('img'))
        self.assertEqual([], self.backend.list_attachments('never'))
        for name in ('hold.1.b', 'hold.1.a', 'profile'):
            self.backend.write_attachment('img', name, b'')
        self.backend.write_attachment('keep', 'hold.1.a', b'x')
        other = self.make_backend()
        self.assertEqual(['hold.1.a', 'hold.1.b', 'profile'], other.list_attachments('img'))
        other.delete_attachment('img', 'hold.1.a')
        self.assertEqual(['hold.1.b', 'profile'], self.backend.list_attachments('img'))
        self.assertIsNone(self.backend.read_attachment('img', 'hold.1.a'))
        self.assertEqual(b'x', self.backend.read_attachment('keep', 'hold.1.a'))
        other.delete_attachment('img', 'hold.1.a')  # gone already: not an error
        other.delete_attachment('never', 'hold.1.a')
        self.backend.write_attachment('img', 'hold.1.a', b'')  # and back
        self.assertEqual(['hold.1.a', 'hold.1.b', 'profile'], other.list_attachments('img'))
        self.backend.delete_attachments('img')
        self.assertEqual([], other.list_attachments('img'))
        self.assertEqual(['hold.1.a'], other.list_attachments('keep'))

    def test_two_holders_deleting_their_own_attachments_at_once_keep_the_rest(self):
        self.backend.create_manifest('img', 1, b'm')
        names = [f'hold.1.h{n}' for n in range(8)]
        instances = [self.make_backend() for _ in names]
        errors = []

        def cycle(backend, name):
            try:
                for _ in range(5):
                    backend.write_attachment('img', name, b'')
                    backend.delete_attachment('img', name)
                backend.write_attachment('img', name, b'')
            except Exception as exc:  # noqa: B902 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=cycle, args=pair)
                   for pair in zip(instances, names)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        self.assertEqual([], errors)
        self.assertEqual(sorted(names), self.make_backend().list_attachments('img'))

    def test_a_reader_sees_old_or_new_attachment_never_a_mix(self):
        self.backend.create_manifest('img', 1, b'm')
        versions = [bytes([n]) * (256 * 1024) for n in range(1, 4)]
        self.backend.write_attachment('img', 'profile', versions[0])
        reader = self.make_backend()
        stop, seen, errors = threading.Event(), set(), []

        def read():
            try:
                for _ in range(2000):
                    if stop.is_set():
                        return
                    seen.add(reader.read_attachment('img', 'profile'))
            except Exception as exc:  # noqa: B902 - reported below
                errors.append(exc)

        thread = threading.Thread(target=read)
        thread.start()
        try:
            for data in versions[1:] * 5:
                self.backend.write_attachment('img', 'profile', data)
        finally:
            stop.set()
            thread.join(30)
        self.assertEqual([], errors)
        self.assertLessEqual(seen, set(versions))

    # -- locks -----------------------------------------------------------------

    def test_exclusive_lock_waits_for_shared_holders(self):
        other = self.make_backend()
        with self.backend.shared_lock(), other.shared_lock():  # writers coexist
            error = self.assertRaises(exception.WarehouseBusy,
                                      self.make_backend().exclusive_lock(0.1).__enter__)
            self.assertIsInstance(error, exception.StorageError)
        with other.exclusive_lock(5):
            pass

    def test_image_lock_excludes_other_holders(self):
        other = self.make_backend()
        entered = threading.Event()

        def take():
            with other.image_lock('img'):
                entered.set()

        with self.backend.image_lock('img'):
            thread = threading.Thread(target=take)
            thread.start()
            with self.make_backend().image_lock('other'):  # another image is free
                pass
            self.assertFalse(entered.wait(0.2))
        thread.join(10)
        self.assertTrue(entered.is_set())

    def test_image_locks_in_a_fixed_order(self):
        with backend_mod.image_locks(self.backend, 'b', 'a', 'b'):
            pass


class FileBackendTest(BackendContract, base.TestCase):
    def make_backend(self) -> file_backend.FileBackend:
        return file_backend.FileBackend(self.conf)

    def damage_item_holding(self, backend, chunk_id):
        self.flip_index_bit(backend.locate(chunk_id).pack)

    def flip_index_bit(self, pack_id: str) -> str:
        path = os.path.join(self.backend.packs_dir, pack_id + '.idx')
        with open(path, 'r+b') as f:
            f.seek(20)
            byte = f.read(1)[0]
            f.seek(20)
            f.write(bytes([byte ^ 0x01]))
        return path

    def packs(self) -> set[str]:
        return set(os.listdir(self.backend.packs_dir))

    def test_capabilities(self):
        self.assertEqual(backend_mod.Capabilities.SCRATCH_SPACE,
                         file_backend.FileBackend.CAPABILITIES)
        self.assertEqual(self.backend.staging_dir, self.backend.scratch_dir())

    def test_corrupt_index_is_named_and_its_pack_kept(self):
        a, b = self.chunk(), self.chunk()
        self.store(self.backend, a)
        self.store(self.backend, b)
        pack = self.backend.locate(a[0]).pack
        self.flip_index_bit(pack)
        # Neither a gc that loaded the index before the damage nor a new one
        # removes the pack.
        with self.backend.exclusive_lock(5):
            self.backend.retain({b[0]})
        gc = self.make_backend()
        with gc.exclusive_lock(5):
            gc.purge_abandoned()
            gc.retain({b[0]})
        self.assertLessEqual({pack + '.pack', pack + '.idx'}, self.packs())
        self.assertEqual([f'pack index packs/{pack}.idx is corrupt: checksum mismatch'],
                         self.make_backend().damaged())

    def test_gc_goes_on_past_a_lost_or_truncated_pack(self):
        lost, cut, other = self.chunk(), self.chunk(), self.chunk()
        dead = [self.chunk() for _ in range(3)]
        self.store(self.backend, lost, dead[0])
        self.store(self.backend, cut, dead[1])
        self.store(self.backend, other, dead[2])
        lost_pack, cut_pack = (self.backend.locate(c[0]).pack for c in (lost, cut))
        os.unlink(os.path.join(self.backend.packs_dir, lost_pack + '.pack'))
        os.truncate(os.path.join(self.backend.packs_dir, cut_pack + '.pack'), CHUNK + 10)
        gc = self.make_backend()
        with gc.exclusive_lock(5):
            gc.retain({lost[0], cut[0], other[0]})
        reader = self.make_backend()
        self.assertEqual(other[1], reader.read_chunk(other[0]))
        self.assertAbsent(reader, dead[2][0])  # the healthy pack was rewritten
        self.assertRaises(exception.ChunkNotFound, reader.read_chunk, lost[0])
        self.assertBytesEqual(cut[1], reader.read_chunk(cut[0]))  # before the cut
        self.assertRaises(exception.ChunkNotFound, reader.read_chunk, dead[1][0])
        # What is left of the damaged packs stays for repair.
        self.assertLessEqual({lost_pack + '.idx', cut_pack + '.idx', cut_pack + '.pack'},
                             self.packs())

    def test_restored_index_is_used_again(self):
        a = self.chunk()
        self.store(self.backend, a)
        reader = self.make_backend()
        self.flip_index_bit(self.backend.locate(a[0]).pack)
        self.assertAbsent(reader, a[0])
        self.flip_index_bit(self.backend.locate(a[0]).pack)  # flipped back
        self.assertEqual(a[1], reader.read_chunk(a[0]))
        self.assertEqual([], reader.damaged())

    def test_unreadable_index_is_named(self):
        a = self.chunk()
        self.store(self.backend, a)
        pack = self.backend.locate(a[0]).pack
        index = os.path.join(self.backend.packs_dir, pack + '.idx')
        os.unlink(index)
        os.mkdir(index)  # reading it fails with EISDIR, as a bad sector fails with EIO
        self.assertEqual([f'pack index packs/{pack}.idx is unreadable: Is a directory'],
                         self.make_backend().damaged())

    def test_reader_that_looked_while_gc_was_half_way(self):
        # gc publishes the new pack before removing the old index; a reader that
        # refreshes between the two knows both copies and must fall back to the
        # new one when the old pack goes.
        a, b = self.chunk(), self.chunk()
        self.store(self.backend, a, b)
        reader = self.make_backend()
        self.assertEqual(a[1], reader.read_chunk(a[0]))
        gc = self.make_backend()
        publish = gc.publish_pack

        def publish_then_reader_looks(*args):
            publish(*args)
            reader.refresh()

        with mock.patch.object(gc, 'publish_pack', publish_then_reader_looks):
            with gc.exclusive_lock(5):
                gc.retain({a[0]})
        self.assertEqual(a[1], reader.read_chunk(a[0]))
        self.assertTrue(reader.has_chunk(a[0]))

    def _copy_in_pack(self, pack_id: str, chunk: tuple[str, bytes]) -> None:
        """Store ``chunk`` again, in a pack of its own named ``pack_id``."""
        with mock.patch.object(file_backend.uuid, 'uuid4', return_value=mock.Mock(hex=pack_id)):
            copy = file_backend.PackWriteSession(self.backend)
            copy.put_chunk(*chunk)
            copy.commit()

    def test_gc_after_a_killed_gc_keeps_one_copy(self):
        # A gc killed after publishing its copy of a's pack, before removing the
        # old pack, leaves a in two packs; the next gc must leave it in one.
        a, b = self.chunk(), self.chunk()
        self.store(self.backend, a, b)
        self._copy_in_pack('f' * 32, a)
        gc = self.make_backend()
        with gc.exclusive_lock(5):
            gc.retain({a[0]})
        self.assertEqual(CHUNK, sum(
            os.path.getsize(os.path.join(self.backend.packs_dir, name))
            for name in self.packs() if name.endswith('.pack')))
        self.assertEqual(a[1], self.backend.read_chunk(a[0]))

    def test_another_thread_refreshed_first(self):
        # Two threads fail on the same moved chunk; the first to refresh learns
        # the new place, the second's refresh then changes nothing. The second
        # must still find the chunk.
        a, b = self.chunk(), self.chunk()
        self.store(self.backend, a, b)
        with self.make_backend().exclusive_lock(5):
            self.make_backend().retain({a[0]})
        read_at = self.backend._read_at

        def other_thread_refreshes(location):
            data = read_at(location)
            if data is None:
                self.backend.refresh()
            return data

        with mock.patch.object(self.backend, '_read_at', other_thread_refreshes):
            self.assertEqual(a[1], self.backend.read_chunk(a[0]))

    def test_gc_does_not_trade_a_copy_for_a_lost_one(self):
        a, b = self.chunk(), self.chunk()
        self.store(self.backend, a, b)
        self._copy_in_pack('f' * 32, a)
        os.unlink(os.path.join(self.backend.packs_dir, 'f' * 32 + '.pack'))
        gc = self.make_backend()
        with gc.exclusive_lock(5):
            gc.retain({a[0]})
        self.assertEqual(a[1], self.make_backend().read_chunk(a[0]))

    def test_lost_first_copy_falls_back_to_the_other(self):
        # A fresh instance makes the copy in the first pack by name the one it
        # reads first; when that pack file is lost, the other copy must serve.
        a, b = self.chunk(), self.chunk()
        self.store(self.backend, a, b)
        self._copy_in_pack('0' * 32, a)
        os.unlink(os.path.join(self.backend.packs_dir, '0' * 32 + '.pack'))
        reader = self.make_backend()
        self.assertEqual(a[1], reader.read_chunk(a[0]))

    def test_read_chunks_reads_neighbours_in_a_pack_in_one_call(self):
        chunks = [self.chunk() for _ in range(8)]
        self.store(self.backend, *chunks[:6])
        self.store(self.backend, *chunks[6:])
        reader = self.make_backend()
        reader.refresh()
        real_pread = os.pread
        with mock.patch('os.pread', side_effect=real_pread) as pread:
            # Every other chunk of the first pack: 4 KiB between them, still one run.
            found = reader.read_chunks([c[0] for c in chunks[:6:2] + chunks[6:]])
        self.assertEqual(2, pread.call_count)
        self.assertEqual(dict(chunks[:6:2] + chunks[6:]),
                         {chunk_id: bytes(data) for chunk_id, data in found.items()})

    def test_read_chunks_falls_back_to_another_copy_of_a_short_or_lost_pack(self):
        a, b, c = self.chunk(), self.chunk(), self.chunk()
        self.store(self.backend, a, b, c)
        self._copy_in_pack('0' * 32, a)
        self._copy_in_pack('0' * 31 + '1', b)
        reader = self.make_backend()
        os.unlink(os.path.join(self.backend.packs_dir, '0' * 32 + '.pack'))
        os.truncate(os.path.join(self.backend.packs_dir, '0' * 31 + '1.pack'), 10)
        self.assertEqual({a[0]: a[1], b[0]: b[1], c[0]: c[1]}, {
            chunk_id: bytes(data)
            for chunk_id, data in reader.read_chunks([a[0], b[0], c[0]]).items()})

    def test_unreadable_first_copy_falls_back_to_the_other(self):
        a, b = self.chunk(), self.chunk()
        self.store(self.backend, a, b)
        self._copy_in_pack('0' * 32, a)
        reader = self.make_backend()
        real_open = os.open

        def bad_sector(path, *args, **kwargs):
            if path.endswith('0' * 32 + '.pack'):
                raise OSError(errno.EIO, os.strerror(errno.EIO), path)
            return real_open(path, *args, **kwargs)

        with mock.patch('os.open', bad_sector):
            self.assertEqual(a[1], reader.read_chunk(a[0]))

    def test_gc_keeps_the_good_copy_when_the_first_is_lost(self):
        # gc drops a chunk from a pack when it is also elsewhere; not when the
        # place elsewhere is a lost pack, which would leave no copy at all.
        a, b = self.chunk(), self.chunk()
        self.store(self.backend, a, b)
        self._copy_in_pack('0' * 32, a)
        os.unlink(os.path.join(self.backend.packs_dir, '0' * 32 + '.pack'))
        gc = self.make_backend()
        with gc.exclusive_lock(5):
            gc.retain({a[0]})
        reader = self.make_backend()
        self.assertEqual(a[1], reader.read_chunk(a[0]))
        self.assertAbsent(reader, b[0])

    def test_gc_keeps_the_copy_whose_twin_lost_its_index_since_loaded(self):
        # A long-lived gc loaded both packs holding a; then the first one's index
        # is damaged. The other copy is the only one readable and must stay.
        a, b = self.chunk(), self.chunk()
        self.store(self.backend, a, b)
        self._copy_in_pack('f' * 32, a)
        gc = self.make_backend()
        gc.refresh()
        first = gc.locate(a[0]).pack
        self.assertNotEqual('f' * 32, first)
        self.flip_index_bit(first)
        with gc.exclusive_lock(5):
            gc.retain({a[0]})
        self.assertEqual(a[1], self.make_backend().read_chunk(a[0]))

    def test_gc_refuses_while_an_image_directory_is_unreadable(self):
        # Its versions are unknown, so are the chunks they need: freeing any
        # could lose a version that comes back when the directory is readable.
        a = self.chunk()
        self.store(self.backend, a)
        self.backend.create_manifest('img', 1, b'{}')
        hidden = os.path.join(self.backend.images_dir, 'img')
        real_listdir = os.listdir

        def unreadable(path='.'):
            if path == hidden:
                raise OSError(errno.EACCES, os.strerror(errno.EACCES), path)
            return real_listdir(path)

        gc = self.make_backend()
        with mock.patch('os.listdir', unreadable), gc.exclusive_lock(5):
            self.assertEqual([], gc.list_images())
            error = self.assertRaises(exception.StorageError, gc.retain, set())
        self.assertIn('images/img', str(error))
        self.assertIn(os.strerror(errno.EACCES), str(error))
        self.assertEqual(a[1], self.make_backend().read_chunk(a[0]))

    def test_pack_removed_between_lookup_and_open(self):
        a, b = self.chunk(), self.chunk()
        self.store(self.backend, a, b)
        old_pack = self.backend.locate(a[0]).pack
        gc = self.make_backend()
        real_open = os.open

        def gc_runs_first(path, *args, **kwargs):
            if path.endswith(old_pack + '.pack') and gc.locate(a[0]).pack == old_pack:
                with gc.exclusive_lock(5):
                    gc.retain({a[0]})
            return real_open(path, *args, **kwargs)

        with mock.patch('os.open', gc_runs_first):
            self.assertEqual(a[1], self.backend.read_chunk(a[0]))
        self.assertNotEqual(old_pack, self.backend.locate(a[0]).pack)

    def test_manifest_that_is_a_directory(self):
        self.backend.create_manifest('img', 1, b'1')
        os.mkdir(os.path.join(self.backend.images_dir, 'img', '3.json'))
        self.assertEqual([1, 3], self.backend.list_versions('img'))
        for read in (self.backend.read_manifest,
                     lambda image, version: self.backend.read_manifest_prefix(image, version, 9)):
            error = self.assertRaises(exception.CorruptManifest, read, 'img', 3)
            self.assertEqual('manifest img:3 is unreadable: images/img/3.json is a directory',
                             str(error))
            self.assertIsInstance(error.__cause__, IsADirectoryError)
        self.assertEqual(1, self.backend.manifests_stored_bytes())
        self.backend.delete_manifest('img', 3)  # a damaged version can be removed
        self.assertEqual([1], self.backend.list_versions('img'))

    def test_only_ascii_version_names_are_versions(self):
        self.backend.create_manifest('img', 1, b'1')
        image_dir = os.path.join(self.backend.images_dir, 'img')
        for name in ('\u00b2.json', '01.json', '0.json', 'x.json', '2.json.tmp'):
            with open(os.path.join(image_dir, name), 'wb') as f:
                f.write(b'{}')
        self.assertEqual([1], self.backend.list_versions('img'))
        self.assertEqual(['img'], self.backend.list_images())
        self.backend.delete_manifest('img', 1)  # the directory stays for the strays
        self.assertEqual([], self.backend.list_images())

    def test_stray_file_among_images_is_named_not_fatal(self):
        self.backend.create_manifest('img', 1, b'1')
        with open(os.path.join(self.backend.images_dir, 'stray'), 'wb') as f:
            f.write(b'x')
        self.assertEqual(['img'], self.backend.list_images())
        self.assertEqual([], self.backend.list_versions('stray'))
        self.assertEqual(['images/stray is not a directory of manifests'],
                         self.backend.damaged())
        with self.backend.exclusive_lock(5):
            self.assertEqual((0, 0), self.backend.retain(set()))  # it hides no versions

    def test_bad_image_names_stay_inside_the_store(self):
        for name in ('', '.', '..', '../x', 'a/b'):
            self.assertRaises(exception.InvalidName, self.backend.create_manifest,
                              name, 1, b'x')
            self.assertRaises(exception.InvalidName, self.backend.read_manifest, name, 1)

    def test_prefix_reads_only_what_is_asked(self):
        self.backend.create_manifest('img', 1, b'x' * 100000)
        asked = []
        real_open = open

        class Spy:
            def __init__(self, *args, **kwargs):
                self.file = real_open(*args, **kwargs)

            def __enter__(self):
                return self

            def __exit__(self, *exc_info):
                self.file.close()

            def read(self, size=-1):
                asked.append(size)
                return self.file.read(size)

        with mock.patch.object(file_backend, 'open', Spy, create=True):
            self.assertEqual(b'x' * 10, self.backend.read_manifest_prefix('img', 1, 10))
        self.assertEqual([10], asked)

    # -- OSErrors become StorageErrors that name the path --------------------

    def assertNamesOSError(self, error: exception.StorageError, path: str, code: int):
        self.assertIsInstance(error, exception.StorageError)
        self.assertIn(path, str(error))
        self.assertIn(os.strerror(code), str(error))
        self.assertIsInstance(error.__cause__, OSError)
        self.assertEqual(code, error.__cause__.errno)

    def test_enospc_writing_a_manifest_leaves_nothing(self):
        def full(fd, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        with mock.patch.object(durable.os, 'write', full):
            error = self.assertRaises(exception.StorageError, self.backend.create_manifest,
                                      'img', 1, b'{}')
        path = os.path.join(self.backend.images_dir, 'img', '1.json')
        self.assertNamesOSError(error, path, errno.ENOSPC)
        self.assertNotIsInstance(error, exception.VersionExists)
        self.assertEqual([], os.listdir(self.backend.images_dir))
        self.assertEqual([], os.listdir(self.backend.staging_dir))
        self.backend.create_manifest('img', 1, b'{}')  # and works once there is space

    def test_enospc_into_an_existing_image_keeps_its_directory(self):
        self.backend.create_manifest('img', 1, b'{}')
        with mock.patch.object(durable.os, 'fsync',
                               side_effect=OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))):
            self.assertRaises(exception.StorageError, self.backend.create_manifest,
                              'img', 2, b'{}')
        self.assertEqual([1], self.backend.list_versions('img'))
        self.assertEqual([], os.listdir(self.backend.staging_dir))

    def test_failed_directory_sync_unlinks_the_new_manifest(self):
        real_fsync_dir = durable.fsync_dir
        calls = []

        def fsync_dir(path):
            calls.append(path)
            if path.endswith('img'):
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            real_fsync_dir(path)

        with mock.patch.object(durable, 'fsync_dir', fsync_dir):
            error = self.assertRaises(exception.StorageError, self.backend.create_manifest,
                                      'img', 1, b'{}')
        self.assertNamesOSError(error, 'img', errno.EIO)
        self.assertEqual([], self.backend.list_images())
        self.assertEqual([], os.listdir(self.backend.staging_dir))

    def test_enospc_staging_a_chunk(self):
        with self.backend.shared_lock():
            session = self.backend.begin_write()
            with mock.patch.object(durable.os, 'write',
                                   side_effect=OSError(errno.ENOSPC, 'No space left on device')):
                error = self.assertRaises(exception.StorageError, session.put_chunk,
                                          *self.chunk())
            session.abort()
        self.assertNamesOSError(error, self.backend.staging_dir, errno.ENOSPC)
        self.assertEqual([], os.listdir(self.backend.staging_dir))

    def test_read_only_state_path(self):
        real_open = os.open

        def read_only(path, flags, *args):
            if flags & os.O_CREAT:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
            return real_open(path, flags, *args)

        a = self.chunk()
        self.store(self.backend, a)
        self.backend.create_manifest('img', 1, b'{}')
        with mock.patch('os.open', read_only):
            error = self.assertRaises(exception.StorageError,
                                      self.backend.shared_lock().__enter__)
            self.assertNamesOSError(error, self.backend.locks_dir, errno.EROFS)
            # Reading still works on a read-only store.
            reader = self.make_backend()
            self.assertEqual(a[1], reader.read_chunk(a[0]))
            self.assertEqual(b'{}', reader.read_manifest('img', 1))

    def test_eio_reading_a_chunk(self):
        a = self.chunk()
        self.store(self.backend, a)
        with mock.patch('os.pread', side_effect=OSError(errno.EIO, os.strerror(errno.EIO))):
            error = self.assertRaises(exception.StorageError, self.backend.read_chunk, a[0])
        pack = self.backend.locate(a[0]).pack
        self.assertNamesOSError(error, f'packs/{pack}.pack', errno.EIO)
        self.assertNotIsInstance(error, exception.ChunkNotFound)

    def test_unlistable_store(self):
        with mock.patch('os.listdir', side_effect=OSError(errno.EACCES, 'Permission denied')):
            for call in (self.backend.list_images, self.backend.iter_chunks().__next__,
                         self.backend.damaged):
                error = self.assertRaises(exception.StorageError, call)
                self.assertNamesOSError(error, self.backend.root, errno.EACCES)
