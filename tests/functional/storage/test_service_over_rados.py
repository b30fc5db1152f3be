"""Several ``vmcloud warehouse`` processes over one Ceph pool serve one warehouse.

Each test starts real service processes (the command, as an operator would), each
with its own config file, port and state directory, all over the same RADOS
namespace (a fresh one per test, emptied afterwards) and with the same token. The
clients are the http backend, ``[storage] backend = http``, each pointed at one
process: what one process stores, every other serves; version numbers, locks and
gc hold across processes because the service keeps no state of its own but its
clients' leases and write sessions.

A service is killed with SIGKILL (no clean-up at all, as a host that loses power),
or frozen with SIGSTOP (as a host that stops answering for a while and comes back).
Its rados locks then expire after ``[storage_rados] lock_duration`` of the killed
process and a few seconds more (measured with 2 s: 1.7 to 4.2 s after the kill);
every wait for that is bounded by ``lock_wait``.
"""
import dataclasses
import hashlib
import itertools
import os
import random
import select
import signal
import subprocess
import threading
import time

from testtools import content

from vmcloud import exception
from vmcloud.storage import protocol
from vmcloud.storage import warehouse as warehouse_mod
from vmcloud.storage.backends import http as http_backend
from tests.functional.storage import test_http_backend as http_tests
from tests.functional.storage import test_rados_backend as rados_tests

TOKEN = 'several-services-token-0123456789'
CHUNK_SIZE = 64 * 1024
# The rados lock duration of every service: short, so a killed service's locks go
# soon; every wait for them (lock_wait) allows several times what was measured.
LOCK_DURATION = 2
LOCK_WAIT = 10 * LOCK_DURATION
START_WAIT = 60.0


@dataclasses.dataclass(eq=False)
class Service:
    """One ``vmcloud warehouse`` process."""

    name: str
    child: subprocess.Popen
    log: str
    url: str = ''

    def alive(self) -> bool:
        return self.child.poll() is None

    def kill(self) -> None:
        """SIGKILL: the process releases nothing, its leases and locks just stop."""
        self.child.kill()
        self.child.wait(30)

    def freeze(self) -> None:
        self.child.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.child.send_signal(signal.SIGCONT)

    def stop(self) -> int | None:
        """SIGTERM (SIGKILL after 30 s); the exit status. Never raises."""
        if self.alive():
            self.thaw()  # a frozen process cannot act on SIGTERM
            self.child.terminate()
            try:
                self.child.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.child.stdout.close()
        return self.child.returncode


class ServicesTestCase(rados_tests.RadosTestCase):
    """Service processes over this test's RADOS namespace, and clients of each."""

    def setUp(self):
        super().setUp()
        self.conf.set_override('chunk_size', CHUNK_SIZE, 'storage')
        self.conf.set_override('gc_lock_timeout', LOCK_WAIT, 'storage')
        self.conf.register_group(http_backend.HttpBackend.OPTION_GROUP)
        self.conf.register_opts(http_backend.HttpBackend.OPTIONS,
                                group=http_backend.HttpBackend.OPTION_GROUP)
        for name, value in (('token', TOKEN), ('timeout', 10), ('connect_retries', 1),
                            ('lock_wait', LOCK_WAIT)):
            self.conf.set_override(name, value, 'storage_http')
        self.rng = random.Random(self.id())
        self._inspector = None

    def start_services(self, count: int) -> list[Service]:
        """Start ``count`` services at once and wait until each serves.

        Each has its own config, state directory, log and port; they share the
        token and the rados namespace, nothing else.
        """
        rados_opts = self.conf.storage_rados
        rados_section = {name: getattr(rados_opts, name) for name in (
            'conffile', 'keyring', 'client_name', 'pool', 'namespace', 'connect_timeout',
            'op_timeout')}
        rados_section.update(lock_duration=LOCK_DURATION, lock_wait=LOCK_WAIT)
        services = []
        for number in range(1, count + 1):
            name = f'service{number}'
            config = os.path.join(self.tmp, f'{name}.conf')
            # write_config writes one fixed file: each service keeps its own copy.
            os.rename(self.write_config(
                DEFAULT={'state_path': os.path.join(self.tmp, name), 'use_stderr': True},
                storage={'backend': 'rados'}, storage_rados=rados_section,
                warehouse_service={'port': 0, 'token': TOKEN}), config)
            log = os.path.join(self.tmp, f'{name}.log')
            with open(log, 'wb') as stderr:
                child = subprocess.Popen(
                    http_tests.CLI + ['--config-file', config, 'warehouse'],
                    stdout=subprocess.PIPE, stderr=stderr, cwd=rados_tests.REPO)
            service = Service(name, child, log)
            self.addCleanup(service.stop)
            # A failure shows what each service logged.
            self.addOnException(lambda _exc_info, log=log, name=name: self.addDetail(
                f'{name}.log', content.content_from_file(log, buffer_now=True)))
            services.append(service)
        deadline = time.monotonic() + START_WAIT
        for service in services:
            service.url = self._served_url(service, deadline)
        self.assertEqual(count, len({s.url for s in services}))
        return services

    def _served_url(self, service: Service, deadline: float) -> str:
        for _ in range(int(START_WAIT / 0.2) + 1):
            if not service.alive():
                break
            ready, _, _ = select.select([service.child.stdout], [], [],
                                        max(0.0, min(0.2, deadline - time.monotonic())))
            if ready:
                line = service.child.stdout.readline().decode()
                if line.startswith('serving the warehouse on http://127.0.0.1:'):
                    return line.split()[-1]
                break
            if time.monotonic() >= deadline:
                break
        with open(service.log, errors='replace') as f:
            self.fail(f'{service.name} did not start serving; its log:\n{f.read()[-4000:]}')

    def client(self, service: Service) -> http_backend.HttpBackend:
        """A client of ``service`` alone (the options of the moment are its own)."""
        self.conf.set_override('url', service.url, 'storage_http')
        return http_backend.HttpBackend(self.conf)

    def warehouse(self, service: Service) -> warehouse_mod.Warehouse:
        return warehouse_mod.Warehouse(self.conf, backend=self.client(service))

    def requests(self, service: Service) -> dict:
        """What crossed ``service``'s wire (its own counters, GET /v1/stats)."""
        return self.client(service).request_json('GET', '/stats')['requests']

    def raw_image(self, name: str, chunks: int, holes: int = 0) -> str:
        path = os.path.join(self.tmp, name)
        with open(path, 'wb') as f:
            f.write(self.rng.randbytes(chunks * CHUNK_SIZE))
            f.truncate((chunks + holes) * CHUNK_SIZE)
        return path

    def new_chunk(self) -> bytes:
        return self.rng.randbytes(CHUNK_SIZE)

    def objects(self) -> list[str]:
        """The name of every object in the namespace, as the cluster has them."""
        if self._inspector is None:
            self._inspector = self.make_backend()
        return [obj.key for obj in self._inspector.ioctx.list_objects()]

    def chunk_objects(self) -> set[str]:
        """The ids of every chunk object in the namespace, visible or not."""
        return {name[len('chunk.'):] for name in self.objects() if name.startswith('chunk.')}

    def assertBytesOf(self, store: warehouse_mod.Warehouse, ref: str, expected: bytes):
        with store.open(store.lookup(ref)) as disk:
            self.assertBytesEqual(expected, disk.read())

    def run_in_thread(self, fn, *args) -> tuple[threading.Thread, list]:
        """Start ``fn(*args)``; the list gets its result or the exception it raised."""
        outcome = []

        def run():
            try:
                outcome.append(fn(*args))
            except Exception as exc:  # noqa: B902 - handed to the test
                outcome.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread, outcome

    def join(self, thread: threading.Thread, timeout: float = 60) -> None:
        thread.join(timeout)
        self.assertFalse(thread.is_alive(), f'a writer still runs after {timeout:g} s')


def chunk_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ReadAnywhereTest(ServicesTestCase):
    def test_image_imported_through_one_process_is_served_by_another(self):
        first, second = self.start_services(2)
        path = self.raw_image('disk.raw', chunks=12, holes=4)
        with open(path, 'rb') as f:
            data = f.read()
        imported = self.warehouse(first).import_image(path, 'disk', 'raw').manifest

        other = self.warehouse(second)
        self.assertEqual(['disk'], other.images())
        [summary] = other.listing().versions
        self.assertEqual((imported.ref, imported.size), (summary.ref, summary.size))
        self.assertEqual(imported.chunks, other.lookup('disk:1').chunks)
        out = os.path.join(self.tmp, 'out.raw')
        other.export(other.lookup('disk:1'), out)
        with open(out, 'rb') as f:
            self.assertBytesEqual(data, f.read())
        self.assertTrue(other.verify().ok)
        # Each process did its own half: the import's chunks crossed the first, the
        # export's the second; neither asked the other for anything.
        self.assertEqual(12, self.requests(first)['chunk_puts'])
        self.assertNotIn('chunk_gets', self.requests(first))
        self.assertNotIn('chunk_puts', self.requests(second))
        self.assertGreaterEqual(self.requests(second)['chunk_gets'], 12)

        # Without the first process at all: a chunk read and a whole export through
        # the second, by the command with [storage] backend = http.
        self.assertEqual(0, first.stop())
        error = self.assertRaises(exception.StorageError, self.client(first).list_images)
        self.assertIn(f'cannot reach the warehouse at {first.url}', str(error))
        some = imported.chunks[3]
        self.assertEqual(data[3 * CHUNK_SIZE:4 * CHUNK_SIZE],
                         self.client(second).read_chunk(some))
        config = self.write_config(storage={'backend': 'http'}, storage_http={
            'url': second.url, 'token': TOKEN, 'connect_retries': 1})
        cli_out = os.path.join(self.tmp, 'cli.raw')
        result = http_tests.vmcloud_cli('--config-file', config, 'image', 'export',
                                        'disk:1', cli_out)
        self.assertEqual(0, result.returncode, result.stderr)
        with open(cli_out, 'rb') as f:
            self.assertBytesEqual(data, f.read())


class VersionsAcrossProcessesTest(ServicesTestCase):
    WRITERS = 6

    def test_concurrent_snapshots_through_three_processes_get_distinct_versions(self):
        services = self.start_services(3)
        path = self.raw_image('disk.raw', chunks=self.WRITERS + 2)
        with open(path, 'rb') as f:
            data = f.read()
        base = self.warehouse(services[0]).import_image(path, 'disk', 'raw').manifest
        shared = self.new_chunk()  # every writer stores it: one object, borrowed by all but one
        changes = {n: {n: self.new_chunk(), self.WRITERS + 1: shared}
                   for n in range(self.WRITERS)}
        # Two writers per process, each with its own client, all let go at once.
        stores = [self.warehouse(services[n % 3]) for n in range(self.WRITERS)]
        start = threading.Barrier(self.WRITERS)

        def snapshot(n: int) -> warehouse_mod.WriteResult:
            start.wait(30)
            return stores[n].snapshot_chunks(base.ref, changes[n])

        writers = [self.run_in_thread(snapshot, n) for n in range(self.WRITERS)]
        for thread, _ in writers:
            self.join(thread)
        results = [outcome[0] for _, outcome in writers]
        failed = [r for r in results if isinstance(r, Exception)]
        self.assertEqual([], failed)
        versions = [r.manifest.version for r in results]
        self.assertEqual(list(range(2, self.WRITERS + 2)), sorted(versions))

        # Every version is whole and is the one its writer wrote, read through a
        # process other than the one it was written through.
        for n, result in enumerate(results):
            expected = bytearray(data)
            for index, chunk in changes[n].items():
                expected[index * CHUNK_SIZE:(index + 1) * CHUNK_SIZE] = chunk
            reader = self.warehouse(services[(n + 1) % 3])
            self.assertEqual(base.ref, reader.lookup(f'disk:{versions[n]}').parent)
            self.assertBytesOf(reader, f'disk:{versions[n]}', bytes(expected))
        for service in services:
            report = self.warehouse(service).verify()
            self.assertEqual([], report.problems)
            self.assertEqual(self.WRITERS + 1, report.versions)
        # Nothing partial or orphaned: every chunk object is a visible, used chunk.
        used = set(base.data_chunk_ids()) | {chunk_id(shared)} | {
            chunk_id(c[n]) for n, c in changes.items()}
        self.assertEqual(used, {c for c, _ in self.client(services[2]).iter_chunks()})
        self.assertEqual(used, self.chunk_objects())

    def test_one_version_number_has_one_winner_across_processes(self):
        # The backend's exclusive create, through the services, without image locks.
        services = self.start_services(3)
        clients = [self.client(service) for service in services]
        for version in range(1, 5):
            start = threading.Barrier(len(clients))

            def create(index: int) -> str:
                start.wait(30)
                try:
                    clients[index].create_manifest('img', version, b'writer %d' % index)
                    return 'won'
                except exception.VersionExists:
                    return 'lost'

            racers = [self.run_in_thread(create, i) for i in range(len(clients))]
            for thread, _ in racers:
                self.join(thread)
            outcome = [result[0] for _, result in racers]
            self.assertEqual(1, outcome.count('won'), outcome)
            self.assertEqual(len(clients) - 1, outcome.count('lost'), outcome)
            winner = b'writer %d' % outcome.index('won')
            for client in clients:
                self.assertEqual(winner, client.read_manifest('img', version))
        self.assertEqual([1, 2, 3, 4], clients[1].list_versions('img'))
        manifests = [name for name in self.objects() if name.startswith('manifest.')]
        self.assertEqual(4, len(manifests), manifests)  # the losers removed theirs


class LocksAcrossProcessesTest(ServicesTestCase):
    def test_image_lock_held_through_one_process_and_released_when_it_is_killed(self):
        first, second = self.start_services(2)
        path = self.raw_image('disk.raw', chunks=4)
        with open(path, 'rb') as f:
            data = f.read()
        base = self.warehouse(first).import_image(path, 'disk', 'raw').manifest

        # A snapshot through the first process stops inside the image lock, its
        # chunks committed and its manifest not yet written.
        holder_client = self.client(first)
        holder = warehouse_mod.Warehouse(self.conf, backend=holder_client)
        in_lock, go_on = threading.Event(), threading.Event()
        self.addCleanup(go_on.set)
        create = holder_client.create_manifest

        def create_later(image: str, version: int, manifest: bytes) -> None:
            in_lock.set()
            go_on.wait(60)
            create(image, version, manifest)

        holder_client.create_manifest = create_later
        held_change = self.new_chunk()
        holder_thread, held = self.run_in_thread(holder.snapshot_chunks, base.ref,
                                                 {1: held_change})
        self.assertTrue(in_lock.wait(30))

        # A writer through the second process that will not wait is refused...
        self.conf.set_override('lock_wait', 0.5, 'storage_http')
        impatient = self.warehouse(second)
        error = self.assertRaises(exception.WarehouseBusy, impatient.snapshot_chunks,
                                  base.ref, {2: self.new_chunk()})
        self.assertIn(f'image lock on disk at {second.url}', str(error))
        self.assertEqual([1], impatient.backend.list_versions('disk'))
        # ...and one that waits does not get in while the holder's process lives.
        self.conf.set_override('lock_wait', LOCK_WAIT, 'storage_http')
        waiter_change = self.new_chunk()
        waiter_thread, waited = self.run_in_thread(
            self.warehouse(second).snapshot_chunks, base.ref, {3: waiter_change})
        waiter_thread.join(1.5)
        self.assertTrue(waiter_thread.is_alive(), waited)

        # Killed while holding the lock for its client: the lock expires with the
        # process's rados lock, within lock_wait, and the waiter gets it.
        first.kill()
        go_on.set()
        self.join(holder_thread)
        [holder_error] = held
        self.assertIsInstance(holder_error, exception.StorageError)
        self.assertIn(f'cannot reach the warehouse at {first.url}', str(holder_error))
        self.join(waiter_thread)
        [result] = waited
        self.assertIsInstance(result, warehouse_mod.WriteResult)
        self.assertEqual(2, result.manifest.version)

        survivor = self.warehouse(second)
        self.assertEqual([1, 2], survivor.backend.list_versions('disk'))
        expected = bytearray(data)
        expected[3 * CHUNK_SIZE:4 * CHUNK_SIZE] = waiter_change
        self.assertBytesOf(survivor, 'disk:2', bytes(expected))
        self.assertEqual([], survivor.verify().problems)
        # The holder's chunk was committed but no version names it, nor the refused
        # writer's: gc (whose exclusive lock the killed process's shared lock kept
        # out until it expired) frees exactly those two.
        report = survivor.gc()
        self.assertEqual((2, 2 * CHUNK_SIZE), (report.removed_chunks, report.freed_bytes))
        self.assertFalse(survivor.backend.has_chunk(chunk_id(held_change)))
        self.assertEqual(set(base.data_chunk_ids()) | {chunk_id(waiter_change)},
                         self.chunk_objects())

    def test_lock_of_a_frozen_process_that_expired_is_not_believed_held(self):
        # A process stops answering (SIGSTOP) past its rados lock's duration while a
        # client writes through it; gc through another process then runs and frees
        # the client's staged chunks. When the process comes back, the client's
        # commit must fail with LeaseLost (doc/warehouse-service.md, doc/ceph.md: a
        # lost lock is not believed held), not index chunks gc removed.
        first, second = self.start_services(2)
        writer = self.client(first)
        lock = writer.shared_lock()
        lock.__enter__()
        session = writer.begin_write()
        staged = self.new_chunk()
        session.put_chunk(chunk_id(staged), staged)
        for _ in range(200):  # bounded: the upload is one request, its write one op
            if chunk_id(staged) in self.chunk_objects():
                break
            time.sleep(0.05)
        else:
            self.fail('the staged chunk never reached the cluster')

        first.freeze()
        report = self.warehouse(second).gc()
        self.assertEqual(1, report.purged_files)
        self.assertEqual(set(), self.chunk_objects())
        first.thaw()

        try:
            session.commit()
            committed = None
        except exception.LeaseLost as exc:
            committed = exc
        finally:
            session.abort()
            try:
                lock.__exit__(None, None, None)
            except exception.LeaseLost:
                pass
        reader = self.client(second)
        visible = reader.has_chunk(chunk_id(staged))
        self.assertIsNotNone(
            committed,
            'BUG: the commit through the thawed process succeeded although its rados '
            'shared lock had expired and gc had run meanwhile; the chunk index now names '
            f'a chunk whose object gc removed (has_chunk: {visible}). The service keeps '
            'the lease "held" after the backend lost the lock it stands for.')
        self.assertFalse(visible)


class SessionDiesWithItsProcessTest(ServicesTestCase):
    def test_killed_mid_upload_commits_nothing_and_gc_purges_its_chunks(self):
        first, second = self.start_services(2)
        writer_client, survivor_client = self.client(first), self.client(second)
        # The session lives in the first process's memory: the second knows nothing of it.
        with writer_client.shared_lock():
            session = writer_client.begin_write()
            error = self.assertRaises(protocol.RequestRefused, survivor_client.request_json,
                                      'POST', f'/sessions/{session._id}/commit')
            self.assertIn('is unknown', str(error))
            session.abort()

        path = self.raw_image('disk.raw', chunks=12)
        with open(path, 'rb') as f:
            data = f.read()

        # The fourth upload and every later one wait until the process is gone:
        # three staged chunks reached the cluster, the rest are cut off in flight.
        uploads, cut = itertools.count(), threading.Event()
        self.addCleanup(cut.set)
        request = writer_client.request

        def upload_until_cut(method: str, path: str, *args, **kwargs):
            if method == 'PUT' and '/chunks/' in path and next(uploads) >= 3:
                cut.wait(60)
            return request(method, path, *args, **kwargs)

        writer_client.request = upload_until_cut
        writer = warehouse_mod.Warehouse(self.conf, writer_client)
        thread, outcome = self.run_in_thread(writer.import_image, path, 'disk', 'raw')
        for _ in range(200):  # bounded: three requests, three writes
            if len(self.chunk_objects()) >= 3:
                break
            time.sleep(0.05)
        # The writer's shared lock, held by the first process, keeps gc through the
        # second out.
        survivor = warehouse_mod.Warehouse(self.conf, survivor_client)
        error = self.assertRaises(exception.WarehouseBusy, survivor.gc, 0.5)
        self.assertIn('shared (writer) locks', str(error))
        first.kill()
        cut.set()
        self.join(thread)
        [error] = outcome
        self.assertIsInstance(error, exception.StorageError)
        self.assertIn(f'the warehouse at {first.url}', str(error))

        # Nothing of it is visible through the survivor; what reached the cluster
        # are objects no index names, which gc purges once the killed process's
        # shared lock has expired.
        self.assertEqual([], survivor.images())
        self.assertEqual([], list(survivor_client.iter_chunks()))
        self.assertEqual([], survivor.verify().problems)
        orphans = self.chunk_objects()
        self.assertGreaterEqual(len(orphans), 3)
        self.assertLessEqual(orphans, {chunk_id(data[i:i + CHUNK_SIZE])
                                       for i in range(0, len(data), CHUNK_SIZE)})
        report = survivor.gc()
        self.assertEqual((len(orphans), 0), (report.purged_files, report.removed_chunks))
        self.assertEqual(set(), self.chunk_objects())

        # The client starts again through the survivor, from the start: a new session.
        survivor.import_image(path, 'disk', 'raw')
        out = os.path.join(self.tmp, 'out.raw')
        survivor.export(survivor.lookup('disk:1'), out)
        with open(out, 'rb') as f:
            self.assertBytesEqual(data, f.read())
