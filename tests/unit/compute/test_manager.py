"""The compute manager with the fake driver and in-process mirrors, called directly; what it
tells the dispatcher recorded by a stand-in."""
import copy
import errno
import logging
import os
import random
import threading
import time

import fixtures

from vmcloud import exception
from vmcloud import polling
from vmcloud import rpc
from vmcloud.compute import load
from vmcloud.compute import manager
from vmcloud.compute import phases
from vmcloud.drivers import base as driver_base
from vmcloud.drivers import fake
from vmcloud.mirror import api as mirror_api
from vmcloud.mirror import profile
from vmcloud.storage import warehouse as warehouse_mod
from tests import base
from tests.unit.compute import test_artifacts
from tests.unit.compute import test_load
from tests.unit.dispatcher import helpers

WAIT = 30


class Reports:
    """Stands in for the dispatcher: what the compute manager tells it, and its answers
    to register_host (``instances``) and build_wanted (``wanted``)."""

    def __init__(self):
        self.sent: list[tuple] = []
        self.changed = threading.Condition()
        self.instances: list[dict] = []
        self.wanted = True
        self.register_errors: list[Exception] = []
        # chunk_peers' answers, one per call (the last one stays), or errors to raise.
        self.peers: list[dict | Exception] = [{}]

    def _record(self, method: str, *args) -> None:
        with self.changed:
            self.sent.append((method, *args))
            self.changed.notify_all()

    def __getattr__(self, method: str):
        return lambda *args: self._record(method, *args)

    def register_host(self, host: str, node_id: str, incarnation: str, capacity: dict,
                      vtep_address: str, peer_url: str = '') -> dict:
        self._record('register_host', host, node_id, incarnation)
        self.vtep_address, self.peer_url, self.capacity = vtep_address, peer_url, capacity
        if self.register_errors:
            raise self.register_errors.pop(0)
        return {'instances': self.instances}

    def build_wanted(self, instance_id: str, host: str, attempt: int) -> bool:
        self._record('build_wanted', instance_id, host, attempt)
        return self.wanted

    def chunk_peers(self, timeout: float | None = None) -> dict[str, str]:
        self._record('chunk_peers', timeout)
        answer = self.peers.pop(0) if len(self.peers) > 1 else self.peers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def of(self, method: str) -> list[tuple]:
        return [r[1:] for r in self.sent if r[0] == method]

    def wait_for(self, method: str, count: int = 1) -> list[tuple]:
        with self.changed:
            self.changed.wait_for(lambda: len(self.of(method)) >= count, WAIT)
        return self.of(method)


class FakeAgent:
    """Stands in for the network agent: its networks as records, as the real one keeps
    them, and every call in ``calls``; ``failures``: method -> the error it raises next."""

    def __init__(self):
        self.records: dict[str, dict] = {}
        self.calls: list[tuple] = []
        self.failures: dict[str, Exception] = {}
        # The compute host each call acted for (managers of one machine share an agent).
        self.owners: dict[str, str | None] = {}
        self.unplug_owners: list[str | None] = []
        self.reconcile_owners: list[str | None] = []

    def _call(self, method: str, *args) -> None:
        self.calls.append((method, *args))
        if method in self.failures:
            raise self.failures.pop(method)

    def of(self, method: str) -> list[tuple]:
        return [call[1:] for call in self.calls if call[0] == method]

    def plug(self, network, dhcp_port, peers, instance, port, owner=None) -> str:
        self._call('plug', network['id'], instance)
        self.owners[instance] = owner
        record = self.records.setdefault(network['id'], {
            'network': dict(network), 'dhcp_port': dict(dhcp_port), 'ports': {}})
        record['peers'] = list(peers)
        record['ports'][instance] = dict(port)
        return f'vmcb{network["vni"]}'

    def namespace(self, network_id: str) -> str:
        if network_id not in self.records:
            raise exception.NetworkNotFound(network_id)
        return f'vmcloud-{self.records[network_id]["network"]["vni"]}-test'

    def tcp_connect(self, network_id, address, port, timeout) -> None:
        self._call('tcp_connect', network_id, address, port, timeout)

    def http_get(self, network_id, address, port, path, timeout) -> tuple[int, bytes]:
        """Answers as the test guest does."""
        self._call('http_get', network_id, address, port, path, timeout)
        return 200, b'vm1 1\n'

    def unplug(self, network_id: str, instance: str, owner=None) -> None:
        self._call('unplug', network_id, instance)
        self.unplug_owners.append(owner)
        record = self.records.get(network_id)
        if record is not None:
            record['ports'].pop(instance, None)
            if not record['ports']:
                del self.records[network_id]

    def set_peers(self, network_id: str, peers: list[str]) -> None:
        self._call('set_peers', network_id, peers)
        if network_id in self.records:
            self.records[network_id]['peers'] = list(peers)

    def networks(self) -> dict[str, dict]:
        return copy.deepcopy(self.records)

    def reconcile(self, wanted: dict[str, set[str]], owner=None) -> None:
        self._call('reconcile', copy.deepcopy(wanted))
        self.reconcile_owners.append(owner)
        for network_id, record in list(self.records.items()):
            for name in set(record['ports']) - wanted.get(network_id, set()):
                self.unplug(network_id, name)

    def ports(self) -> dict[str, set[str]]:
        """network id -> the instances plugged into it."""
        return {network_id: set(record['ports']) for network_id, record in self.records.items()}


class ComputeManagerTest(base.TestCase):
    def setUp(self):
        super().setUp()
        rpc.register_opts(self.conf)
        self.conf.set_override('transport_url', 'fake://')
        self.addCleanup(rpc.cleanup)
        self.warehouse = warehouse_mod.Warehouse(self.conf)
        self.image = str(self.warehouse.import_image(helpers.write_image(self.tmp),
                                                     'guest').manifest.ref)
        self.driver = fake.FakeDriver(self.conf)
        self.mirrors = mirror_api.LocalMirrors(self.conf, self.warehouse)
        self.addCleanup(self.mirrors.close)
        self.reports = Reports()
        self.agent = FakeAgent()
        self.compute = self.new_manager()

    def new_manager(self, **kwargs) -> manager.ComputeManager:
        """A compute manager of node1 on the test's driver and mirrors, as a restart
        finds them: the node's mirror service outlives its managers."""
        kwargs.setdefault('driver', self.driver)
        kwargs.setdefault('network_agent', self.agent)
        mirrors = kwargs.pop('mirrors', self.mirrors)
        compute = manager.ComputeManager(self.conf, mirrors, 'node1',
                                         warehouse=self.warehouse, **kwargs)
        compute.dispatcher = self.reports
        return compute

    def build(self, name: str = 'vm1', attempt: int = 1, **boot: str) -> dict:
        instance = {'id': f'id-{name}', 'name': name, 'image': self.image, 'vcpus': 1,
                    'memory_mib': 256, 'attempt': attempt,
                    'boot': {'cmdline': 'vmcloud.id={name}', **boot}}
        self.compute.build_instance({}, instance)
        # As the dispatcher has it once built: what a restart keeps.
        self.reports.instances.append({'id': instance['id'], 'name': name, 'state': 'active',
                                       'attempts': attempt, 'image': self.image})
        return instance

    def test_a_build_reports_built(self):
        self.build()
        (instance_id, host, seconds, fetched), = self.reports.of('instance_built')
        self.assertEqual(('id-vm1', 'node1'), (instance_id, host))
        self.assertEqual([], self.reports.of('build_failed'))
        self.assertEqual(['vm1'], self.driver.list_instances())
        self.assertEqual('vmcloud.id=vm1', self.driver.instances['vm1'].spec.cmdline)
        self.assertEqual(['vm1'], self.compute.mirrors.names())
        # The guest printed boot-done: its mirror records first touches as the application's.
        recorder = self.compute.mirrors.get('vm1').disk.recorder
        polling.wait(lambda: recorder.phase, lambda phase: phase == profile.APPLICATION, 30,
                     'the application phase', interval=0.02)

    def test_boot_artifacts_named_as_images_boot_from_the_node_copies(self):
        kernel = test_artifacts.write_artifact(self.tmp, 'vmlinuz', seed=1)
        initrd = test_artifacts.write_artifact(self.tmp, 'initrd', seed=2, size=777)
        self.warehouse.import_image(kernel, 'vmlinuz', fmt='raw')
        self.warehouse.import_image(initrd, 'initrd', fmt='raw')
        self.build('vm1', kernel='vmlinuz:1', initrd='initrd:1')
        self.build('vm2', kernel='vmlinuz:1', initrd=initrd)
        self.assertEqual(2, len(self.reports.of('instance_built')), self.reports.sent)
        first, second = (self.driver.instances[n].spec for n in ('vm1', 'vm2'))
        artifacts_path = self.conf.compute.boot_artifacts_path
        self.assertTrue(first.kernel.startswith(artifacts_path + os.sep))
        self.assertBytesEqual(test_artifacts.read(kernel), test_artifacts.read(first.kernel))
        self.assertBytesEqual(test_artifacts.read(initrd), test_artifacts.read(first.initrd))
        self.assertEqual(first.kernel, second.kernel)  # one copy for the node
        self.assertEqual(initrd, second.initrd)  # a path stays a file of the node

    def test_a_boot_artifact_that_cannot_be_had_fails_the_build_naming_it(self):
        self.build('vm1', kernel='nosuch:3')
        (instance_id, host, reason), = self.reports.of('build_failed')
        self.assertEqual(('id-vm1', 'node1'), (instance_id, host))
        self.assertIn('BootArtifactError: boot artifact nosuch:3', reason)
        self.assertIn('image nosuch:3 not found', reason)
        self.assertEqual([], self.compute.mirrors.names())
        self.assertEqual([], self.driver.list_instances())

    def test_a_failed_build_cleans_up_and_reports_why(self):
        def refuse(spec):
            raise exception.SpawnFailed('no room, on purpose')
        self.driver.spawn = refuse
        self.build()
        (instance_id, host, reason), = self.reports.of('build_failed')
        self.assertEqual(('id-vm1', 'node1'), (instance_id, host))
        self.assertEqual('SpawnFailed: no room, on purpose', reason)
        self.assertEqual([], self.compute.mirrors.names())
        self.assertEqual([], self.reports.of('instance_built'))

    def test_a_failed_cleanup_does_not_lose_the_report(self):
        def refuse(spec):
            raise exception.SpawnFailed('no room, on purpose')

        def broken(name):
            raise RuntimeError('cleanup broke, on purpose')
        self.driver.spawn = refuse
        self.compute.mirrors.remove = broken
        self.build()
        (_, _, reason), = self.reports.of('build_failed')
        self.assertIn('SpawnFailed: no room, on purpose', reason)
        self.assertIn('cleanup failed: RuntimeError: cleanup broke, on purpose', reason)

    def test_a_build_that_fails_after_the_boot_is_reported_too(self):
        def broken(name):
            raise RuntimeError('no stats, on purpose')
        self.mirrors.needed_bytes = broken
        self.build()
        (_, _, reason), = self.reports.of('build_failed')
        self.assertEqual('RuntimeError: no stats, on purpose', reason)
        self.assertEqual([], self.reports.of('instance_built'))
        self.assertEqual([], self.driver.list_instances())
        self.assertEqual([], self.compute.mirrors.names())

    def test_the_heartbeat_outlives_any_error(self):
        # A heartbeat thread that died would have the node marked unknown.
        self.conf.set_override('heartbeat_interval', 1)
        measure = self.driver.host_capacity
        failures = [RuntimeError('a bug, on purpose'), OSError(28, 'No space left on device')]

        def flaky():
            if failures:
                raise failures.pop(0)
            return measure()
        self.driver.host_capacity = flaky
        self.compute._heartbeat.start()
        self.addCleanup(self.compute._heartbeat.join, 30)
        self.addCleanup(self.compute._stopping.set)
        self.assertTrue(self.reports.wait_for('report_heartbeat'))
        self.assertEqual([], failures)
        self.assertTrue(self.compute._heartbeat.is_alive())

    def test_the_heartbeat_names_the_incarnation_and_the_guests_that_run(self):
        self.build('vm1')
        self.build('vm2')
        self.driver.stop('vm2')  # shut down: not running, though listed
        self.compute.start()
        self.addCleanup(self.compute.stop)
        (host, capacity, incarnation, running), = self.reports.wait_for('report_heartbeat')[:1]
        self.assertEqual(('node1', self.compute.incarnation, ['vm1']),
                         (host, incarnation, running))
        self.assertEqual(self.mirrors.fetched_bytes(), capacity['fetched_bytes'])

    def test_capacity_reports_the_bytes_the_chunk_cache_holds(self):
        self.build('vm1')
        self.assertEqual(0, self.compute.capacity()['cache_bytes'])
        self.mirrors.get('vm1').disk.read(0, 10)  # the guest reads: its chunk is fetched
        capacity = self.compute.capacity()
        self.assertLess(0, capacity['cache_bytes'])
        self.assertEqual(self.mirrors.cached_bytes(), capacity['cache_bytes'])
        self.assertNotIn('peer_bytes', capacity)  # no peer exchange: nothing to tell

    def test_capacity_reports_the_cpus_and_their_load_since_the_last_report(self):
        cgroup = os.path.join(self.tmp, 'host-cgroup')
        os.mkdir(cgroup)
        usage = os.path.join(cgroup, 'cpu.stat')
        with open(usage, 'w') as f:
            f.write('usage_usec 0\n')
        self.conf.set_override('load_cgroup', cgroup, 'compute')
        self.conf.set_override('load_cpus', 3, 'compute')
        compute = self.new_manager()
        capacity = compute.capacity()
        # The cgroup's usage only: nothing ran in it.
        self.assertEqual((3, 0.0), (capacity['cpus'], capacity['cpu_busy']))
        clock = test_load.Clock()
        compute.cpu_sampler = load.CpuSampler(cgroup, cpus=3, clock=clock)
        with open(usage, 'w') as f:
            f.write('usage_usec 1500000\n')
        clock.now += 1
        self.assertEqual(0.5, compute.capacity()['cpu_busy'])
        clock.now += 1
        self.assertEqual(0.0, compute.capacity()['cpu_busy'])

    def test_the_heartbeat_goes_on_without_a_load_that_cannot_be_read(self):
        cgroup = os.path.join(self.tmp, 'host-cgroup')
        os.mkdir(cgroup)
        with open(os.path.join(cgroup, 'cpu.stat'), 'w') as f:
            f.write('usage_usec 0\n')
        self.conf.set_override('load_cgroup', cgroup, 'compute')
        compute = self.new_manager()
        os.remove(os.path.join(cgroup, 'cpu.stat'))
        capacity = compute.capacity()
        self.assertNotIn('cpu_busy', capacity)
        self.assertEqual(os.cpu_count(), capacity['cpus'])

    def test_a_load_cgroup_that_cannot_be_read_stops_the_manager_at_once(self):
        self.conf.set_override('load_cgroup', os.path.join(self.tmp, 'nowhere'), 'compute')
        error = self.assertRaises(exception.ConfigError, self.new_manager)
        self.assertIn(os.path.join(self.tmp, 'nowhere'), str(error))

    def test_a_guest_whose_state_cannot_be_read_counts_as_running(self):
        # Raised, it would stop every heartbeat: the whole node would become unknown.
        self.build('vm1')
        self.build('vm2')
        power_state = self.driver.power_state

        def unreadable(name):
            if name == 'vm2':
                raise exception.DriverError('no answer from the monitor, on purpose')
            return power_state(name)
        self.driver.power_state = unreadable
        self.compute.start()
        self.addCleanup(self.compute.stop)
        (_host, _capacity, _incarnation, running), = self.reports.wait_for(
            'report_heartbeat')[:1]
        self.assertEqual(['vm1', 'vm2'], running)

    def test_the_heartbeat_goes_on_while_the_mirror_service_is_away(self):
        self.conf.set_override('heartbeat_interval', 1)
        self.build('vm1')
        self.compute.start()
        self.addCleanup(self.compute.stop)
        self.reports.wait_for('report_heartbeat')  # the first beat, sent before the change

        def away():
            raise exception.MirrorServiceUnavailable('/run/m.sock', 'restarting, on purpose')
        self.mirrors.fetched_bytes = away
        self.mirrors.cached_bytes = away
        count = len(self.reports.of('report_heartbeat'))
        (_host, capacity, _incarnation, running), = self.reports.wait_for(
            'report_heartbeat', count + 1)[count:count + 1]
        self.assertEqual(['vm1'], running)
        self.assertNotIn('fetched_bytes', capacity)
        self.assertNotIn('cache_bytes', capacity)

    # -- the peer exchange ------------------------------------------------------------

    def peer_mirrors(self) -> mirror_api.LocalMirrors:
        """In-process mirrors of the peer exchange: their chunk server on loopback."""
        self.conf.set_override('peer_address', '127.0.0.1', 'mirror')
        self.conf.set_override('peer_port', 0, 'mirror')
        mirrors = mirror_api.LocalMirrors(self.conf, self.warehouse,
                                          root=os.path.join(self.tmp, 'peer-node'))
        self.addCleanup(mirrors.close)
        return mirrors

    def started(self, compute: manager.ComputeManager) -> manager.ComputeManager:
        compute.start()
        self.addCleanup(compute.stop)
        return compute

    def test_registration_carries_the_peer_url_and_each_heartbeat_the_peers(self):
        self.conf.set_override('heartbeat_interval', 1)
        mirrors = self.peer_mirrors()
        url = mirrors.peer_url()
        self.assertTrue(url.startswith('http://127.0.0.1:'), url)
        first = {'node1': url, 'node2': 'http://10.0.0.2:9495'}
        second = {'node1': url, 'node3': 'http://10.0.0.3:9495'}
        self.reports.peers = [first, second]
        compute = self.started(self.new_manager(mirrors=mirrors))
        self.assertEqual((url, url), (self.reports.peer_url, compute.peer_url))
        # The node set the dispatcher answers after each heartbeat reaches the mirrors.
        polling.wait(lambda: mirrors.peer_stats()['peers'], lambda peers: peers == second,
                     WAIT, 'the second peer set in the mirrors', interval=0.05)
        self.assertEqual('node1', mirrors.peer_stats()['host'])
        # Asked within a heartbeat interval, after a heartbeat each time.
        self.assertEqual({1}, set(t for t, in self.reports.wait_for('chunk_peers', 2)))
        methods = [r[0] for r in self.reports.sent if r[0] in ('report_heartbeat',
                                                               'chunk_peers')]
        self.assertEqual(['report_heartbeat', 'chunk_peers'] * 2, methods[:4])
        # The heartbeat carries the bytes had from peers (none yet).
        (_host, capacity, _incarnation, _running), = self.reports.of('report_heartbeat')[:1]
        self.assertEqual(0, capacity['peer_bytes'])

    def test_without_peers_no_url_no_peer_set_and_no_peer_bytes(self):
        self.conf.set_override('heartbeat_interval', 1)
        self.started(self.compute)
        self.reports.wait_for('report_heartbeat', 2)  # the first beat's refresh is over
        self.assertEqual('', self.reports.peer_url)
        self.assertEqual([], self.reports.of('chunk_peers'))
        self.assertNotIn('peer_bytes', self.reports.of('report_heartbeat')[0][1])
        self.assertIsNone(self.compute.refresh_peers())

    def test_a_mirror_service_of_before_leaves_the_node_out_of_the_exchange(self):
        self.conf.set_override('heartbeat_interval', 1)
        mirrors = self.peer_mirrors()

        def of_before(*args):
            raise exception.MirrorRequestInvalid("unknown method 'peer_url'; the mirror "
                                                 'service offers create, names')
        mirrors.peer_url = mirrors.set_peers = mirrors.peer_stats = of_before
        logged = self.useFixture(fixtures.FakeLogger(level=logging.WARNING))
        compute = self.started(self.new_manager(mirrors=mirrors))
        self.reports.wait_for('report_heartbeat', 2)
        self.assertEqual('', self.reports.peer_url)
        self.assertEqual([], self.reports.of('chunk_peers'))
        self.assertNotIn('peer_bytes', self.reports.of('report_heartbeat')[-1][1])
        self.assertIn('compute host node1 takes no part in the peer exchange: its mirrors '
                      "cannot tell their peer URL: unknown method 'peer_url'", logged.output)
        self.assertTrue(compute._heartbeat.is_alive())

    def test_a_mirror_service_that_fails_to_tell_its_peer_url_fails_the_start(self):
        mirrors = self.peer_mirrors()
        told = mirrors.peer_url
        for failure in (exception.MirrorServiceUnavailable('/run/m.sock', 'restarting, '
                                                           'on purpose'),
                        exception.MirrorError('a malformed answer, on purpose')):
            def failing(failure=failure):
                raise failure
            mirrors.peer_url = failing
            compute = self.new_manager(mirrors=mirrors)
            error = self.assertRaises(type(failure), compute.start)
            self.assertIs(failure, error)
            # Not registered as a node out of the exchange, and the node is free again.
            self.assertEqual([], self.reports.of('register_host'))
        mirrors.peer_url = told
        compute = self.started(self.new_manager(mirrors=mirrors))
        self.assertEqual(told(), self.reports.peer_url)

    def test_a_peer_set_not_had_or_not_taken_leaves_the_last_one(self):
        self.conf.set_override('heartbeat_interval', 60)  # one beat, at the start
        mirrors = self.peer_mirrors()
        first = {'node1': mirrors.peer_url(), 'node2': 'http://10.0.0.2:9495'}
        self.reports.peers = [first, exception.MessagingError('the dispatcher is away, on '
                                                              'purpose'),
                              {'node1': mirrors.peer_url()}]
        compute = self.started(self.new_manager(mirrors=mirrors))
        polling.wait(lambda: mirrors.peer_stats()['peers'], lambda peers: peers == first,
                     WAIT, 'the first peer set', interval=0.05)
        logged = self.useFixture(fixtures.FakeLogger(level=logging.WARNING))
        self.assertIsNone(compute.refresh_peers())
        self.assertIn('peers of node1 not refreshed, the last known set stays: cannot ask '
                      'the dispatcher: the dispatcher is away', logged.output)
        self.assertEqual(first, mirrors.peer_stats()['peers'])
        taken = mirrors.set_peers

        def refused(me, peers):
            raise exception.MirrorServiceUnavailable('/run/m.sock', 'restarting, on purpose')
        mirrors.set_peers = refused
        self.assertIsNone(compute.refresh_peers())
        self.assertIn('its mirrors refused the set: mirror service', logged.output)
        mirrors.set_peers = taken
        self.assertEqual({'node1': mirrors.peer_url()}, compute.refresh_peers())
        self.assertEqual({'node1': mirrors.peer_url()}, mirrors.peer_stats()['peers'])

    def test_the_heartbeat_outlives_a_bug_in_the_peer_refresh(self):
        self.conf.set_override('heartbeat_interval', 1)
        mirrors = self.peer_mirrors()
        self.reports.peers = [RuntimeError('a bug, on purpose')]
        logged = self.useFixture(fixtures.FakeLogger(level=logging.WARNING))
        compute = self.started(self.new_manager(mirrors=mirrors))
        self.reports.wait_for('report_heartbeat', 3)
        self.assertTrue(compute._heartbeat.is_alive())
        self.assertIn('peers of node1 not refreshed', logged.output)

    def test_capacity_carries_the_bytes_had_from_peers_when_they_can_be_read(self):
        mirrors = self.peer_mirrors()
        compute = self.started(self.new_manager(mirrors=mirrors))
        read = mirrors.peer_stats
        mirrors.peer_stats = lambda: dict(read(), peer_bytes=12345)
        self.assertEqual(12345, compute.capacity()['peer_bytes'])

        def away():
            raise exception.MirrorServiceUnavailable('/run/m.sock', 'restarting, on purpose')
        mirrors.peer_stats = away
        capacity = compute.capacity()
        self.assertNotIn('peer_bytes', capacity)
        self.assertIn('cache_bytes', capacity)

    # -- boot artifacts and the peers ---------------------------------------------

    def kernel(self, chunks: int = 8) -> list[str]:
        """A kernel image of ``chunks`` distinct chunks, imported as vmlinuz:1, and their
        ids."""
        source = os.path.join(self.tmp, 'vmlinuz')
        with open(source, 'wb') as f:
            # Seeded: the same chunk ids, so the same owners, every run.
            f.write(random.Random(18).randbytes(chunks * self.conf.storage.chunk_size - 99))
        self.kernel_bytes = test_artifacts.read(source)
        return list(self.warehouse.import_image(source, 'vmlinuz', fmt='raw').manifest.chunks)

    def repository_reads(self) -> list[str]:
        """Every chunk read from the warehouse's store from now on, by anyone."""
        backend = self.warehouse.backend
        reads, read_chunk = [], backend.read_chunk

        def counting(chunk_id):
            reads.append(chunk_id)
            return read_chunk(chunk_id)
        backend.read_chunk = counting
        return reads

    def peer_node(self, host: str, mirrors: mirror_api.LocalMirrors,
                  peers: dict[str, str]) -> manager.ComputeManager:
        """Compute manager ``host`` on ``mirrors``, started, with its own driver, state
        and boot artifacts directory, that knows ``peers``."""
        self.conf.set_override('heartbeat_interval', 600)  # one beat, at the start
        compute = manager.ComputeManager(self.conf, mirrors, host,
                                         driver=fake.FakeDriver(self.conf),
                                         warehouse=self.warehouse,
                                         node_root=os.path.join(self.tmp, f'{host}-state'),
                                         network_agent=self.agent)
        compute.dispatcher = self.reports
        compute.artifacts.path = os.path.join(self.tmp, f'{host}-artifacts')
        self.reports.peers = [peers]
        self.started(compute)
        self.assertEqual(peers, compute.refresh_peers())
        return compute

    def test_nodes_booting_one_kernel_read_each_of_its_chunks_from_the_warehouse_once(self):
        chunk_ids = self.kernel()
        node1 = self.peer_mirrors()
        node2 = mirror_api.LocalMirrors(self.conf, self.warehouse,
                                        root=os.path.join(self.tmp, 'peer-node2'))
        self.addCleanup(node2.close)
        peers = {'node1': node1.peer_url(), 'node2': node2.peer_url()}
        node1.set_peers('node1', peers)
        node2.set_peers('node2', peers)
        computes = [self.peer_node('node1', node1, peers), self.peer_node('node2', node2, peers)]
        reads = self.repository_reads()
        exported, export = [], self.warehouse.export

        def counting(manifest, dest, *args, **kwargs):
            exported.append(str(manifest.ref))
            return export(manifest, dest, *args, **kwargs)
        self.warehouse.export = counting
        for compute in computes:
            path = compute.artifacts.path_of('vmlinuz:1')
            self.assertTrue(path.startswith(compute.artifacts.path + os.sep), path)
            self.assertBytesEqual(self.kernel_bytes, test_artifacts.read(path))
        self.assertEqual([], exported)
        self.assertEqual(sorted(chunk_ids), sorted(reads))  # each once, for both nodes
        # Each node's cache read the chunks it is the primary of, for its own manager
        # and for the other node's: each chunk is in one cache, served twice.
        held = [{c for c in chunk_ids if c in mirrors.cache} for mirrors in (node1, node2)]
        self.assertEqual((set(chunk_ids), set()), (held[0] | held[1], held[0] & held[1]))
        self.assertNotIn(set(), held)  # both took part
        self.assertEqual([2 * len(chunks) for chunks in held],
                         [mirrors.peer_stats()['served_chunks'] for mirrors in (node1, node2)])

    def test_a_peer_that_is_away_leaves_the_kernel_to_the_node_own_cache(self):
        chunk_ids = self.kernel()
        node1 = self.peer_mirrors()
        compute = self.peer_node('node1', node1, {'node1': node1.peer_url(),
                                                  'node2': 'http://127.0.0.1:9'})
        reads = self.repository_reads()
        path = compute.artifacts.path_of('vmlinuz:1')
        self.assertBytesEqual(self.kernel_bytes, test_artifacts.read(path))
        self.assertEqual(sorted(chunk_ids), sorted(reads))
        # Through the node's cache, even the chunks node2 would have served.
        self.assertEqual(set(chunk_ids), {c for c in chunk_ids if c in node1.cache})

    def test_a_node_whose_own_peer_server_is_away_reads_the_kernel_from_the_warehouse(self):
        chunk_ids = self.kernel()
        node1 = self.peer_mirrors()
        compute = self.peer_node('node1', node1, {'node1': node1.peer_url()})
        node1.peer_server.stop()
        logged = self.useFixture(fixtures.FakeLogger(level=logging.INFO))
        reads = self.repository_reads()
        path = compute.artifacts.path_of('vmlinuz:1')
        self.assertBytesEqual(self.kernel_bytes, test_artifacts.read(path))
        self.assertEqual(sorted(chunk_ids), sorted(reads))
        self.assertEqual(set(), {c for c in chunk_ids if c in node1.cache})
        self.assertIn(f'boot artifact chunk {chunk_ids[0]} not had through the mirrors of '
                      'node1, reading the warehouse', logged.output)

    def test_without_peers_the_warehouse_exports_a_boot_artifact_whole(self):
        self.kernel(chunks=2)
        self.started(self.compute)
        exported, export = [], self.warehouse.export

        def counting(manifest, dest, *args, **kwargs):
            exported.append(str(manifest.ref))
            return export(manifest, dest, *args, **kwargs)
        self.warehouse.export = counting
        path = self.compute.artifacts.path_of('vmlinuz:1')
        self.assertBytesEqual(self.kernel_bytes, test_artifacts.read(path))
        self.assertEqual(['vmlinuz:1'], exported)

    def test_stopping_leaves_guests_and_mirrors_running(self):
        self.build('vm1')
        self.compute.start()
        self.compute.stop()
        self.assertEqual(['vm1'], self.driver.list_instances())
        self.assertEqual(driver_base.PowerState.RUNNING, self.driver.power_state('vm1'))
        self.assertEqual(['vm1'], self.mirrors.names())
        self.assertFalse(self.compute._heartbeat.is_alive())

    def test_stopping_may_destroy_every_guest_whatever_fails(self):
        self.build('vm1')
        self.build('vm2')
        destroy = self.driver.destroy

        def broken(name):
            if name == 'vm1':
                raise RuntimeError('destroy broke, on purpose')
            return destroy(name)
        self.driver.destroy = broken
        self.compute.start()
        self.compute.stop(destroy_instances=True)
        self.assertEqual(['vm1'], self.driver.list_instances())
        self.assertEqual(['vm1'], self.mirrors.names())  # its destroy stopped there

    def test_stopping_thaws_the_guests_of_an_unfinished_snapshot(self):
        self.build('vm1')
        self.compute.start()
        self.assertIn('frozen_at', self.freeze(['vm1'])['vm1'])
        self.compute.stop()
        self.assertEqual(driver_base.PowerState.RUNNING, self.driver.power_state('vm1'))

    def test_state_is_where_the_mirror_options_put_it(self):
        self.mirrors.close()
        paths = {option: os.path.join(self.tmp, 'elsewhere', option)
                 for option in ('mirrors_path', 'cache_path', 'nbd_socket')}
        for option, path in paths.items():
            self.conf.set_override(option, path, 'mirror')
        self.mirrors = mirror_api.LocalMirrors(self.conf, self.warehouse)
        self.addCleanup(self.mirrors.close)
        self.compute = self.new_manager()
        self.build()
        self.assertIn(paths['nbd_socket'], self.compute.mirrors.uri('vm1'))
        self.assertTrue(os.path.exists(paths['nbd_socket']))
        self.assertEqual(['vm1'], os.listdir(paths['mirrors_path']))
        self.assertIn('lock', os.listdir(paths['cache_path']))
        # Nothing of the node's mirrors is under state_path: the host's config placed them.
        self.assertFalse(os.path.exists(os.path.join(self.conf.state_path, 'nodes')))
        self.assertFalse(os.path.exists(os.path.join(self.conf.state_path, 'mirrors')))

    def test_destroy_is_confirmed_even_with_nothing_to_destroy(self):
        self.build()
        directory = os.path.join(self.conf.compute.instances_path, 'vm1')
        os.makedirs(directory)  # as a driver keeps one
        self.compute.destroy_instance({}, 'vm1')
        self.assertEqual([], self.driver.list_instances())
        self.assertEqual([], self.compute.mirrors.names())
        self.assertFalse(os.path.exists(directory))
        self.compute.destroy_instance({}, 'vm1')  # gone already: nothing to do
        self.assertEqual([('node1', 'vm1')] * 2, self.reports.of('instance_destroyed'))

    # -- stale builds ------------------------------------------------------------------

    def test_a_build_the_dispatcher_no_longer_wants_is_dropped(self):
        self.reports.wanted = False
        self.build('vm1', attempt=2)
        self.assertEqual([('id-vm1', 'node1', 2)], self.reports.of('build_wanted'))
        self.assertEqual([], self.driver.list_instances())
        self.assertEqual([], self.mirrors.names())
        self.assertEqual([], self.reports.of('instance_built') + self.reports.of('build_failed'))

    def test_an_attempt_older_than_one_started_here_is_dropped_unasked(self):
        self.build('vm1', attempt=3)
        self.destroy_all()
        self.build('vm1', attempt=2)
        self.build('vm1', attempt=3)  # the same request again (redelivered)
        self.assertEqual([('id-vm1', 'node1', 3)], self.reports.of('build_wanted'))
        self.assertEqual(1, len(self.reports.of('instance_built')))
        self.assertEqual([], self.driver.list_instances())
        self.build('vm1', attempt=4)
        self.assertEqual(2, len(self.reports.of('instance_built')))

    def test_a_build_the_dispatcher_cannot_confirm_is_dropped(self):
        def unreachable(*args):
            raise exception.MessagingError('the dispatcher did not answer, on purpose')
        self.reports.build_wanted = unreachable
        self.build('vm1')
        self.assertEqual([], self.driver.list_instances())
        self.assertEqual([], self.reports.of('build_failed'))

    def destroy_all(self) -> None:
        for name in self.driver.list_instances():
            self.compute.destroy_instance({}, name)

    # -- identity and registration -----------------------------------------------------

    def test_the_node_id_is_kept_and_each_start_is_a_new_incarnation(self):
        again = self.new_manager()
        self.assertRegex(self.compute.node_id, '^[0-9a-f]{32}$')
        self.assertEqual(self.compute.node_id, again.node_id)
        self.assertNotEqual(self.compute.incarnation, again.incarnation)
        with open(os.path.join(self.state_path, 'node-id')) as f:
            self.assertEqual(self.compute.node_id, f.read())
        elsewhere = self.new_manager(node_root=os.path.join(self.tmp, 'node2'))
        self.assertNotEqual(self.compute.node_id, elsewhere.node_id)
        again.start()
        self.addCleanup(again.stop)
        self.assertEqual([('node1', again.node_id, again.incarnation)],
                         self.reports.of('register_host'))

    def test_a_second_manager_of_the_host_on_this_node_is_refused_until_the_first_stops(self):
        first = self.new_manager()
        first.start()
        second = self.new_manager()
        error = self.assertRaises(exception.StateLocked, second.start)
        self.assertIn('compute manager node1', str(error))
        self.assertEqual(1, len(self.reports.of('register_host')))
        first.stop()
        second.start()
        self.addCleanup(second.stop)
        self.assertEqual(2, len(self.reports.of('register_host')))

    def test_a_damaged_node_id_is_named(self):
        with open(os.path.join(self.state_path, 'node-id'), 'w') as f:
            f.write('not an id')
        error = self.assertRaises(exception.ConfigError, self.new_manager)
        self.assertIn(os.path.join(self.state_path, 'node-id'), str(error))
        self.assertIn('not an id', str(error))

    def test_registering_waits_for_the_dispatcher(self):
        self.conf.set_override('rpc_startup_timeout', 60)
        self.reports.register_errors = [exception.MessagingError('no answer, on purpose')]
        self.compute.start()
        self.addCleanup(self.compute.stop)
        self.assertEqual(2, len(self.reports.of('register_host')))

    def test_registering_gives_up_after_the_startup_timeout(self):
        self.conf.set_override('rpc_startup_timeout', 0)
        self.reports.register_errors = [exception.MessagingError('no answer, on purpose')]
        error = self.assertRaises(exception.MessagingError, self.compute.start)
        self.assertIn('could not register', str(error))
        self.assertIn('no answer, on purpose', str(error))

    def test_a_host_name_in_use_is_refused_at_once(self):
        self.reports.register_errors = [exception.HostNameInUse('node1', 'abc123')]
        error = self.assertRaises(exception.HostNameInUse, self.compute.start)
        self.assertIn('abc123', str(error))
        self.assertEqual(1, len(self.reports.of('register_host')))
        self.assertFalse(self.compute._heartbeat.is_alive())

    # -- adoption ----------------------------------------------------------------------

    def restart(self, **states: str) -> manager.ComputeManager:
        """A new manager of node1 starts; the dispatcher has ``states`` (name -> state)
        on this host. :returns: it, started, logging into self.log."""
        self.reports.instances = [{'id': f'id-{name}', 'name': name, 'state': state,
                                   'attempts': 1, 'image': self.image}
                                  for name, state in states.items()]
        self.log = self.useFixture(fixtures.FakeLogger(level=logging.INFO,
                                                       name='vmcloud.compute'))
        self.compute = self.new_manager()
        self.compute.start()
        self.addCleanup(self.compute.stop)
        return self.compute

    def test_a_restart_keeps_what_the_dispatcher_wants_running(self):
        for name in ('vm1', 'vm2', 'vm3'):
            self.build(name)
        self.driver.pause('vm3')  # the last manager died mid-snapshot
        self.restart(vm1='active', vm2='unknown', vm3='error')
        self.assertEqual(['vm1', 'vm2', 'vm3'], self.driver.list_instances())
        self.assertEqual(['vm1', 'vm2', 'vm3'], sorted(self.mirrors.names()))
        for name in ('vm1', 'vm2', 'vm3'):
            self.assertEqual(driver_base.PowerState.RUNNING, self.driver.power_state(name))
            self.assertIn(f'adopting {name} (', self.log.output)
        self.assertIn('resuming vm3', self.log.output)
        self.assertEqual([], self.reports.of('build_failed'))

    def test_a_restart_fails_a_build_it_cut_short(self):
        self.build('vm1')
        self.restart(vm1='building')
        self.assertEqual([], self.driver.list_instances())
        self.assertEqual([], self.mirrors.names())
        self.assertEqual([('id-vm1', 'node1', manager.RESTARTED_DURING_BUILD)],
                         self.reports.of('build_failed'))

    def test_a_restart_fails_a_build_whose_request_died_with_the_last_manager(self):
        # Nothing of vm1 here: the killed manager had taken its request off the bus.
        self.restart(vm1='building')
        self.assertEqual([('id-vm1', 'node1', manager.RESTARTED_DURING_BUILD)],
                         self.reports.of('build_failed'))
        self.assertIn('adopting vm1: building here but nothing of it is', self.log.output)
        # Its request, were it still queued, is stale now: never built here.
        self.compute.build_instance({}, {'id': 'id-vm1', 'name': 'vm1', 'image': self.image,
                                         'vcpus': 1, 'memory_mib': 256, 'attempt': 1})
        self.assertEqual([], self.driver.list_instances())

    def test_a_build_a_restart_reported_failed_is_not_built_again_here(self):
        # Its request delivered before the dispatcher read the failure: still "wanted".
        self.build('vm1')
        self.restart(vm1='building')
        asked = len(self.reports.of('build_wanted'))
        self.compute.build_instance({}, {'id': 'id-vm1', 'name': 'vm1', 'image': self.image,
                                         'vcpus': 1, 'memory_mib': 256, 'attempt': 1})
        self.assertEqual(asked, len(self.reports.of('build_wanted')))
        self.assertEqual([], self.driver.list_instances())
        self.assertEqual([], self.reports.of('instance_built')[1:])

    def test_a_restart_destroys_what_is_not_wanted_here(self):
        self.build('vm1')
        self.build('vm2')
        self.mirrors.create('vm3', self.image)  # a mirror whose guest never started
        instances = self.conf.compute.instances_path
        for leaf in ('vm1', 'stray'):
            os.makedirs(os.path.join(instances, leaf))
        self.restart(vm2='deleting')
        self.assertEqual([], self.driver.list_instances())
        self.assertEqual([], self.mirrors.names())
        self.assertEqual([], os.listdir(instances))
        self.assertEqual([('node1', 'vm2')], self.reports.of('instance_destroyed'))
        self.assertIn('adopting vm1: not wanted on node1', self.log.output)
        self.assertIn('adopting vm3: not wanted on node1: destroying its mirror',
                      self.log.output)
        self.assertEqual([], self.reports.of('build_failed'))

    def test_a_shared_driver_counts_only_this_nodes_guests(self):
        self.build('vm1')
        # Another node's guest, seen through the same instances_path.
        self.driver.spawn(driver_base.InstanceSpec(name='other', disk=self.mirrors.uri('vm1')))
        self.reports.instances = []
        self.compute = self.new_manager(shared_driver=True)
        self.compute.start()
        self.addCleanup(self.compute.stop)
        self.assertEqual(['other'], self.driver.list_instances())  # vm1 was not wanted
        self.assertEqual(driver_base.PowerState.RUNNING, self.driver.power_state('other'))
        (_, _, _, running), = self.reports.wait_for('report_heartbeat')[:1]
        self.assertEqual([], running)
        self.assertRaises(exception.InstanceNotFound, self.compute.console_log, {}, 'other', 10)

    # -- networks ----------------------------------------------------------------------

    NETWORK = {'id': 'net1', 'vni': 1000, 'cidr': '10.200.0.0/24'}

    def on_network(self) -> list[tuple]:
        """The driver attaches NICs (to any bridge: this is no test of the fake's L2), and
        each step of a build is recorded, in order, in the list returned: ('plug', net,
        name), ('spawn', nics), ('ready', agent, health, network id, address, timeout, built
        so far) as the manager calls readiness.wait_ready."""
        self.driver.capabilities = (type(self.driver).capabilities
                                    | driver_base.Capability.BRIDGED_NIC)
        self.driver.bridge_exists = lambda bridge: True
        self.agent.calls = steps = []
        spawn, wait_ready = self.driver.spawn, manager.readiness.wait_ready

        def spawned(spec):
            steps.append(('spawn', spec.nics))
            return spawn(spec)

        def ready(driver, agent, name, health, network_id, address, timeout):
            steps.append(('ready', agent, health, network_id, address, timeout,
                          len(self.reports.of('instance_built'))))
            return wait_ready(driver, agent, name, health, network_id, address, timeout)
        self.driver.spawn = spawned
        self.patch(manager.readiness, 'wait_ready', ready)
        return steps

    def network_build(self, name: str = 'vm1', **extra) -> dict:
        address = f'10.200.0.{int(name[-1]) + 1}'
        instance = {'id': f'id-{name}', 'name': name, 'image': self.image, 'vcpus': 1,
                    'memory_mib': 256, 'attempt': 1, 'network': dict(self.NETWORK),
                    'dhcp_port': {'mac': '52:54:00:00:00:fe', 'address': '10.200.0.254'},
                    'peers': ['10.77.0.3'],
                    'port': {'mac': f'52:54:00:00:00:0{name[-1]}', 'address': address},
                    **extra}
        self.compute.build_instance({}, instance)
        self.reports.instances.append({'id': instance['id'], 'name': name, 'state': 'active',
                                       'attempts': 1, 'image': self.image,
                                       'network': self.NETWORK})
        return instance

    def test_a_build_on_a_network_plugs_boots_on_its_bridge_waits_then_reports(self):
        steps = self.on_network()
        self.network_build('vm1')
        self.assertEqual(1, len(self.reports.of('instance_built')), self.reports.sent)
        self.assertEqual([
            ('plug', 'net1', 'vm1'),
            ('spawn', (driver_base.Nic(mac='52:54:00:00:00:01', bridge='vmcb1000'),)),
            ('ready', self.agent, {'kind': 'marker'}, 'net1', '10.200.0.2',
             self.conf.compute.boot_timeout, 0)], steps)
        self.assertEqual(['10.77.0.3'], self.agent.records['net1']['peers'])
        self.assertEqual({'net1': {'vm1'}}, self.agent.ports())

    def test_the_health_check_and_its_timeout_come_with_the_request(self):
        steps = self.on_network()
        self.network_build('vm1', health={'kind': 'http', 'port': 8080, 'timeout': 7})
        self.assertEqual(1, len(self.reports.of('instance_built')), self.reports.sent)
        (_, _, health, _, _, timeout, _), = [step for step in steps if step[0] == 'ready']
        self.assertEqual(({'kind': 'http', 'port': 8080, 'path': '/', 'timeout': 7}, 7),
                         (health, timeout))
        (network_id, address, port, path, _), = self.agent.of('http_get')
        self.assertEqual(('net1', '10.200.0.2', 8080, '/'), (network_id, address, port, path))

    def test_a_request_without_a_network_plugs_nothing(self):
        steps = self.on_network()
        self.build('vm1')
        self.assertEqual(1, len(self.reports.of('instance_built')), self.reports.sent)
        self.assertEqual([('spawn', ()), ('ready', None, {'kind': 'marker'}, None, None,
                                          self.conf.compute.boot_timeout, 0)], steps)
        self.assertEqual({}, self.agent.records)

    def test_a_failure_at_any_step_undoes_the_build_and_says_why(self):
        steps = self.on_network()
        spawn = self.driver.spawn

        def refuse_spawn(spec):
            spawn(spec)
            self.driver.destroy(spec.name)  # a spawn that fails leaves nothing running
            raise exception.SpawnFailed('no room, on purpose')

        def failing(error):
            def fail(*args):
                raise error
            return fail
        breaks = {
            'plug': lambda: self.agent.failures.update(
                plug=exception.NetworkError('ip link add failed, on purpose')),
            'mirror': lambda: (self.mirrors, 'create', failing(
                exception.MirrorError('no mirror, on purpose'))),
            'spawn': lambda: (self.driver, 'spawn', refuse_spawn),
            'ready': lambda: (manager.readiness, 'wait_ready', failing(exception.GuestTimeout(
                'instance vm1 did not pass its tcp:80 check, on purpose'))),
            'after': lambda: (self.mirrors, 'needed_bytes', failing(
                exception.MirrorError('no stats, on purpose'))),
        }
        for attempt, (step, broken) in enumerate(breaks.items(), 1):
            with self.subTest(step):
                self.reports.sent.clear()
                steps.clear()
                patch = broken()
                if patch:
                    owner, attribute, replacement = patch
                    original = getattr(owner, attribute)
                    setattr(owner, attribute, replacement)
                try:
                    self.network_build('vm1', attempt=attempt)
                finally:
                    if patch:
                        setattr(owner, attribute, original)
                (instance_id, host, reason), = self.reports.of('build_failed')
                self.assertIn('on purpose', reason)
                self.assertEqual([], self.reports.of('instance_built'))
                self.assertEqual([], self.driver.list_instances())
                self.assertEqual([], self.mirrors.names())
                self.assertEqual({}, self.agent.ports())  # unplugged: its network gone
                if step != 'plug':  # a plug that fails leaves nothing (the agent's promise)
                    self.assertIn(('unplug', 'net1', 'vm1'), steps)

    def test_a_driver_without_nics_fails_a_build_on_a_network_before_anything(self):
        steps = self.on_network()
        self.without(driver_base.Capability.BRIDGED_NIC)
        self.network_build('vm1')
        (_, _, reason), = self.reports.of('build_failed')
        self.assertEqual('NotSupported: the fake driver cannot attach a guest to a network '
                         '(network net1 was asked for)', reason)
        self.assertEqual([], [step for step in steps if step[0] in ('plug', 'spawn')])
        self.assertEqual([], self.mirrors.names())

    def test_destroy_unplugs(self):
        self.on_network()
        self.network_build('vm1')
        self.network_build('vm2')
        self.compute.destroy_instance({}, 'vm1')
        self.assertEqual({'net1': {'vm2'}}, self.agent.ports())
        self.assertEqual(['vm2'], self.driver.list_instances())
        self.compute.destroy_instance({}, 'vm2')
        self.assertEqual({}, self.agent.ports())
        self.assertEqual([('node1', 'vm1'), ('node1', 'vm2')],
                         self.reports.of('instance_destroyed'))

    def test_a_port_that_cannot_be_unplugged_leaves_no_mirror_nor_directory(self):
        self.on_network()
        self.network_build('vm1')
        directory = os.path.join(self.conf.compute.instances_path, 'vm1')
        os.makedirs(directory, exist_ok=True)
        self.agent.failures['unplug'] = exception.NetworkError('dnsmasq outlived SIGKILL, '
                                                               'on purpose')
        self.assertRaises(exception.NetworkError, self.compute.destroy_instance, {}, 'vm1')
        self.assertEqual([], self.driver.list_instances())
        # The disk is none of the network's business: it goes all the same (the port
        # stays for the agent's reconcile, and the destroy is not confirmed).
        self.assertEqual([], self.mirrors.names())
        self.assertFalse(os.path.exists(directory))
        self.assertEqual([], self.reports.of('instance_destroyed'))

    def restart_on_network(self, **states: str) -> manager.ComputeManager:
        """restart(), each instance the dispatcher has placed here on net1 but vm5."""
        self.log = self.useFixture(fixtures.FakeLogger(level=logging.INFO,
                                                       name='vmcloud.compute'))
        self.reports.instances = [
            {'id': f'id-{name}', 'name': name, 'state': state, 'attempts': 1,
             'image': self.image,
             **({'network': self.NETWORK, 'peers': ['10.77.0.9']} if name != 'vm5' else {})}
            for name, state in states.items()]
        self.compute = self.new_manager()
        self.compute.start()
        self.addCleanup(self.compute.stop)
        return self.compute

    def test_a_restart_reconciles_the_networks_with_what_the_dispatcher_wants(self):
        self.on_network()
        for name in ('vm1', 'vm2', 'vm3', 'vm4'):
            self.network_build(name)
        self.build('vm5')  # on no network: nothing of it is the agent's
        self.agent.calls.clear()
        self.restart_on_network(vm1='active', vm2='error', vm3='deleting', vm4='building',
                                vm5='active')
        (wanted,), = self.agent.of('reconcile')
        self.assertEqual({'net1': {'vm1', 'vm2'}}, wanted)
        self.assertEqual({'net1': {'vm1', 'vm2'}}, self.agent.ports())
        # Those destroyed were unplugged as they went, before the reconcile.
        self.assertEqual({'vm3', 'vm4'}, {name for _, name in self.agent.of('unplug')})
        # The peers as the dispatcher has them now (a cast missed while away is lost).
        self.assertEqual([('net1', ['10.77.0.9'])], self.agent.of('set_peers'))
        # Each for this compute host only: managers of one machine share the agent.
        self.assertEqual({self.compute.host}, set(self.agent.reconcile_owners)
                         | set(self.agent.unplug_owners) | set(self.agent.owners.values()))
        self.assertEqual(['vm1', 'vm2', 'vm5'], self.driver.list_instances())

    def test_a_shared_agent_keeps_the_ports_of_the_other_nodes_guests(self):
        # The all-in-one: one agent for every node; vm9 is another node's guest, vm2 this
        # node's, no longer wanted.
        self.on_network()
        self.network_build('vm1')
        self.network_build('vm2')
        self.agent.plug(dict(self.NETWORK), {}, [], 'vm9', {'mac': '52:54:00:00:00:09'})
        self.reports.instances = [{'id': 'id-vm1', 'name': 'vm1', 'state': 'active',
                                   'attempts': 1, 'image': self.image, 'network': self.NETWORK}]
        self.compute = self.new_manager(shared_driver=True)
        self.compute.start()
        self.addCleanup(self.compute.stop)
        (wanted,), = self.agent.of('reconcile')
        self.assertEqual({'net1': {'vm1', 'vm9'}}, wanted)
        self.assertEqual({'net1': {'vm1', 'vm9'}}, self.agent.ports())

    def test_a_network_that_cannot_be_reconciled_does_not_stop_the_start(self):
        self.on_network()
        self.network_build('vm1')
        self.agent.failures['reconcile'] = exception.NetworkError('ip netns failed, on purpose')
        self.restart_on_network(vm1='active')
        self.assertIn('cannot put the guest networks of node1 right: ip netns failed, on '
                      'purpose', self.log.output)
        self.assertEqual(['vm1'], self.driver.list_instances())

    def test_the_vtep_address_is_registered(self):
        self.conf.set_override('vtep_address', '10.77.0.2', 'network')
        self.compute.start()
        self.addCleanup(self.compute.stop)
        self.assertEqual('10.77.0.2', self.reports.vtep_address)

    def test_network_peers_reach_the_agent_and_an_error_is_only_logged(self):
        self.compute.set_network_peers({}, 'net1', ['10.77.0.3', '10.77.0.4'])
        self.assertEqual([('net1', ['10.77.0.3', '10.77.0.4'])], self.agent.of('set_peers'))
        log = self.useFixture(fixtures.FakeLogger(name='vmcloud.compute'))
        self.agent.failures['set_peers'] = exception.NetworkError('bridge fdb failed, on '
                                                                  'purpose')
        self.compute.set_network_peers({}, 'net1', [])
        self.assertIn('cannot set the peers of network net1 on node1 to none: bridge fdb '
                      'failed, on purpose', log.output)

    # -- console -----------------------------------------------------------------------

    def test_the_console_is_its_tail(self):
        self.build('vm1')
        self.driver.instances['vm1'].console.append('\u00e9t\u00e9 ends here')
        whole = self.driver.console_log('vm1')
        self.assertEqual(whole, self.compute.console_log({}, 'vm1', 1 << 20))
        self.assertEqual('ends here\n', self.compute.console_log({}, 'vm1', 10))
        # A character cut by the limit is left out, not garbled.
        self.assertEqual('t\u00e9 ends here\n', self.compute.console_log({}, 'vm1', 15))
        error = self.assertRaises(exception.InstanceNotFound, self.compute.console_log, {},
                                  'nosuch', 10)
        self.assertIn('nosuch', str(error))
        self.assertRaises(exception.InvalidRequest, self.compute.console_log, {}, 'vm1', 0)

    # -- snapshots ---------------------------------------------------------------------

    def freeze(self, names: list[str], snapshot_id: str = 'snap1', pause_limit: float = 600,
               timeout: float = 60) -> dict:
        return self.compute.freeze({}, snapshot_id, names, pause_limit, timeout)

    @staticmethod
    def items(names: list[str]) -> list[dict]:
        return [{'instance_id': f'id-{name}', 'name': name, 'target': f'{name}-snap'}
                for name in names]

    def test_freeze_then_barrier_thaws_and_uploads(self):
        self.build('vm1')
        self.build('vm2')
        mirror = self.compute.mirrors.get('vm1')
        chunk = mirror.disk.manifest.chunk_size
        mirror.disk.write(0, b'x' * chunk)
        before = time.time()
        frozen = self.freeze(['vm1', 'vm2'])
        for name in ('vm1', 'vm2'):
            self.assertTrue(self.driver.instances[name].io_frozen)
            self.assertEqual(driver_base.PowerState.PAUSED, self.driver.power_state(name))
            self.assertLessEqual(before, frozen[name]['frozen_at'])
        results = self.compute.barrier_and_thaw({}, 'snap1', self.items(['vm1', 'vm2']))
        self.assertEqual(chunk, results['vm1']['dirty_bytes'])
        self.assertEqual(0, results['vm2']['dirty_bytes'])
        for name in ('vm1', 'vm2'):
            self.assertFalse(self.driver.instances[name].io_frozen)
            self.assertEqual(driver_base.PowerState.RUNNING, self.driver.power_state(name))
            self.assertLess(frozen[name]['frozen_at'], results[name]['thawed_at'])
            self.assertGreater(results[name]['pause_ms'], 0)
        done = self.reports.wait_for('snapshot_item_done', 2)
        by_id = {d[1]: d for d in done}
        _, _, version, uploaded, error, persistent = by_id['id-vm1']
        self.assertTrue(persistent)  # no peers: in the warehouse at once
        self.assertEqual('', error)
        self.assertEqual(chunk, uploaded)
        self.assertEqual('vm1-snap', version.split(':')[0])  # its own lineage
        self.assertBytesEqual(b'x' * chunk,
                              self.warehouse.read(self.warehouse.lookup(version), 0, chunk))

    def snapshot(self, names: list[str]) -> dict:
        """Freeze and barrier ``names`` as one snapshot; :returns: instance id -> the
        (version, uploaded bytes, error) each one's upload reported."""
        for result in self.freeze(names).values():
            self.assertIn('frozen_at', result)
        self.compute.barrier_and_thaw({}, 'snap1', self.items(names))
        done = self.reports.wait_for('snapshot_item_done', len(names))
        # (The last, persistent, is true without peers: tests/unit/mirror/test_api.py.)
        return {instance_id: rest[:3] for _snapshot, instance_id, *rest in done}

    def test_each_disk_is_synced_while_its_guest_runs_then_frozen(self):
        self.build('vm1')
        events = []
        sync, freeze_io = self.mirrors.sync, self.driver.freeze_io

        def synced(name):
            events.append(('sync', name, self.driver.power_state(name)))
            return sync(name)

        def frozen(name):
            events.append(('freeze', name))
            return freeze_io(name)
        self.mirrors.sync = synced
        self.driver.freeze_io = frozen
        self.freeze(['vm1'])
        self.assertEqual([('sync', 'vm1', driver_base.PowerState.RUNNING), ('freeze', 'vm1')],
                         events)
        self.compute.thaw({}, 'snap1')
        events.clear()
        self.conf.set_override('sync_before_freeze', False, 'compute')
        self.freeze(['vm1'], 'snap2')
        self.assertEqual([('freeze', 'vm1')], events)

    def test_the_pause_limit_thaws_by_itself_and_the_late_barrier_is_an_error(self):
        self.build('vm1')
        self.assertIn('frozen_at', self.freeze(['vm1'], pause_limit=0.1)['vm1'])
        polling.wait(lambda: self.driver.power_state('vm1'),
                     lambda state: state == driver_base.PowerState.RUNNING, WAIT,
                     'vm1 thawed by its pause limit', interval=0.02)
        self.assertFalse(self.driver.instances['vm1'].io_frozen)
        results = self.compute.barrier_and_thaw({}, 'snap1', self.items(['vm1']))
        self.assertIn('freeze expired', results['vm1']['error'])
        self.assertIn('freeze expired', self.freeze(['vm1'])['vm1']['error'])

    def test_thaw_aborts(self):
        self.build('vm1')
        self.build('vm2')
        self.freeze(['vm1', 'vm2'])
        self.assertEqual({'vm1': '', 'vm2': ''}, self.compute.thaw({}, 'snap1'))
        for name in ('vm1', 'vm2'):
            self.assertEqual(driver_base.PowerState.RUNNING, self.driver.power_state(name))
        results = self.compute.barrier_and_thaw({}, 'snap1', self.items(['vm1']))
        self.assertIn('not frozen for snapshot snap1', results['vm1']['error'])
        self.assertEqual({}, self.compute.thaw({}, 'snap1'))

    def test_a_freeze_past_its_timeout_is_an_error_and_thawed_when_it_ends(self):
        self.build('vm1')
        self.build('vm2')
        release = threading.Event()
        freeze_io = self.driver.freeze_io

        def stuck(name):
            freeze_io(name)
            if name == 'vm2':
                release.wait(WAIT)
        self.driver.freeze_io = stuck
        answers = self.freeze(['vm1', 'vm2'], timeout=0.5)
        self.assertIn('frozen_at', answers['vm1'])
        self.assertIn('freeze of vm2 did not end within', answers['vm2']['error'])
        release.set()
        polling.wait(lambda: self.driver.power_state('vm2'),
                     lambda state: state == driver_base.PowerState.RUNNING, WAIT,
                     'vm2 thawed after its late freeze', interval=0.02)
        results = self.compute.barrier_and_thaw({}, 'snap1', self.items(['vm1']))
        self.assertIn('dirty_bytes', results['vm1'])

    def test_one_barrier_is_one_upload_session_and_each_item_its_own_result(self):
        for name in ('vm1', 'vm2', 'vm3'):
            self.build(name)
        chunk = self.compute.mirrors.get('vm1').disk.manifest.chunk_size
        for name in ('vm1', 'vm2'):  # the same bytes: sent once for both
            self.compute.mirrors.get(name).disk.write(0, b's' * chunk)
        self.compute.mirrors.get('vm3').disk.write(chunk, b'3' * chunk)
        sessions = []
        snapshot_many = self.warehouse.snapshot_many

        def one_of_them_fails(items, targets=None, **options):
            sessions.append(len(items))
            results = snapshot_many(items, targets=targets, **options)
            results[2] = exception.InvalidRange('vm3 does not fit, on purpose')
            return results
        self.warehouse.snapshot_many = one_of_them_fails
        reports = self.snapshot(['vm1', 'vm2', 'vm3'])
        self.assertEqual([3], sessions)
        (version1, uploaded1, error1), (version2, uploaded2, error2) = (
            reports['id-vm1'], reports['id-vm2'])
        self.assertEqual(('', ''), (error1, error2))
        self.assertEqual((chunk, 0), (uploaded1, uploaded2))  # counted for the first
        for version in (version1, version2):
            self.assertBytesEqual(b's' * chunk, self.warehouse.read(
                self.warehouse.lookup(version), 0, chunk))
        self.assertEqual(('', 0, 'InvalidRange: vm3 does not fit, on purpose'),
                         tuple(reports['id-vm3']))

    def test_a_failed_upload_is_reported_for_every_item(self):
        for name in ('vm1', 'vm2'):
            self.build(name)

        def failing(key, targets):
            raise exception.MirrorServiceUnavailable('/run/m.sock', 'gone, on purpose')
        self.mirrors.upload = failing
        reports = self.snapshot(['vm1', 'vm2'])
        self.assertEqual({f'id-{name}': ['', 0, 'MirrorServiceUnavailable: mirror service at '
                                                '/run/m.sock is unavailable: gone, on purpose']
                          for name in ('vm1', 'vm2')}, reports)

    def test_a_barrier_the_disk_refuses_fails_its_guest_alone(self):
        for name in ('vm1', 'vm2'):
            self.build(name)
            disk = self.compute.mirrors.get(name).disk
            disk.write(0, b'x' * disk.manifest.chunk_size)

        def no_room():
            raise OSError(errno.ENOSPC, 'No space left on device, on purpose')
        self.compute.mirrors.get('vm2').disk.barrier = no_room
        self.freeze(['vm1', 'vm2'])
        results = self.compute.barrier_and_thaw({}, 'snap1', self.items(['vm1', 'vm2']))
        self.assertIn('No space left on device, on purpose', results['vm2']['error'])
        self.assertFalse(self.driver.instances['vm2'].io_frozen)
        (_snapshot, instance_id, _version, _uploaded, error, _persistent), = self.reports.wait_for(
            'snapshot_item_done')
        self.assertEqual(('id-vm1', ''), (instance_id, error))

    def test_mirrors_that_fail_the_barrier_still_thaw_every_guest(self):
        self.build('vm1')

        def gone(key, names):
            raise exception.MirrorServiceUnavailable('/run/m.sock', 'gone, on purpose')
        self.mirrors.barrier = gone
        self.freeze(['vm1'])
        results = self.compute.barrier_and_thaw({}, 'snap1', self.items(['vm1']))
        self.assertIn('gone, on purpose', results['vm1']['error'])
        self.assertEqual(driver_base.PowerState.RUNNING, self.driver.power_state('vm1'))

    def test_a_barrier_that_fails_by_a_bug_still_thaws_every_guest(self):
        self.build('vm1')
        discarded = []

        def bug(key, names):
            raise RuntimeError('a bug, on purpose')
        self.mirrors.barrier = bug
        self.mirrors.discard = discarded.append
        self.freeze(['vm1'])
        results = self.compute.barrier_and_thaw({}, 'snap1', self.items(['vm1']))
        self.assertEqual({'vm1': {'error': 'RuntimeError: a bug, on purpose'}}, results)
        self.assertEqual(driver_base.PowerState.RUNNING, self.driver.power_state('vm1'))
        self.assertEqual(['snap1'], discarded)

    def test_a_barrier_that_hangs_past_the_pause_limit_thaws_and_is_discarded(self):
        self.build('vm1')
        release, ended = threading.Event(), threading.Event()
        barrier = self.mirrors.barrier

        def hung(key, names):
            release.wait(WAIT)
            try:
                return barrier(key, names)
            finally:
                ended.set()
        self.mirrors.barrier = hung
        self.assertIn('frozen_at', self.freeze(['vm1'], pause_limit=3)['vm1'])
        results = self.compute.barrier_and_thaw({}, 'snap1', self.items(['vm1']))
        self.assertFalse(release.is_set())
        self.assertIn('no barrier within the pause limit', results['vm1']['error'])
        self.assertEqual(driver_base.PowerState.RUNNING, self.driver.power_state('vm1'))
        self.mirrors.barrier = barrier
        discard = self.mirrors.discard
        discarded = threading.Event()
        self.mirrors.discard = lambda key: (discard(key), discarded.set())
        release.set()
        self.assertTrue(ended.wait(WAIT))
        self.assertTrue(discarded.wait(WAIT))
        # Its late barrier was let go: the next snapshot takes one again.
        self.freeze(['vm1'], 'snap2')
        self.assertIn('dirty_bytes', self.compute.barrier_and_thaw(
            {}, 'snap2', self.items(['vm1']))['vm1'])

    def test_a_freeze_that_cannot_list_the_guests_holds_none_of_them(self):
        self.build('vm1')
        listed = self.driver.list_instances
        failures = [exception.DriverError('hypervisor away, on purpose')]

        def flaky():
            if failures:
                raise failures.pop(0)
            return listed()
        self.driver.list_instances = flaky
        self.assertRaises(exception.DriverError, self.freeze, ['vm1'])
        self.assertIn('frozen_at', self.freeze(['vm1'], 'snap2')['vm1'])

    def test_a_freeze_that_comes_after_its_thaw_or_barrier_is_refused(self):
        # Late on the bus: the dispatcher gave up on it and thawed already.
        self.build('vm1')
        self.assertEqual({}, self.compute.thaw({}, 'snap1'))
        self.assertIn('came too late', self.freeze(['vm1'])['vm1']['error'])
        self.assertEqual(driver_base.PowerState.RUNNING, self.driver.power_state('vm1'))
        self.compute.barrier_and_thaw({}, 'snap2', self.items(['vm1']))
        self.assertIn('came too late', self.freeze(['vm1'], 'snap2')['vm1']['error'])
        self.assertEqual(driver_base.PowerState.RUNNING, self.driver.power_state('vm1'))

    def test_a_thaw_during_the_freeze_thaws_it_and_the_freeze_says_so(self):
        self.build('vm1')
        freezing, release = threading.Event(), threading.Event()
        freeze_io = self.driver.freeze_io

        def slow(name):
            freeze_io(name)
            freezing.set()
            release.wait(WAIT)
        self.driver.freeze_io = slow
        answers = {}
        freezer = threading.Thread(target=lambda: answers.update(self.freeze(['vm1'])))
        freezer.start()
        self.assertTrue(freezing.wait(WAIT))
        self.assertEqual({}, self.compute.thaw({}, 'snap1'))  # vm1 is not frozen yet
        release.set()
        freezer.join(WAIT)
        self.assertIn('already thawed or barriered', answers['vm1']['error'])
        self.assertEqual(driver_base.PowerState.RUNNING, self.driver.power_state('vm1'))

    def test_a_guest_that_cannot_freeze_is_named_and_left_running(self):
        self.build()
        freeze = self.driver.freeze_io

        def refuse(name):
            if name == 'vm1':
                freeze(name)  # paused, then the flush failed
                raise exception.DriverError('stuck, on purpose')
            return freeze(name)
        self.driver.freeze_io = refuse
        self.assertEqual({'vm1': {'error': 'stuck, on purpose'},
                          'nosuch': {'error': 'instance nosuch not found'}},
                         self.freeze(['vm1', 'nosuch']))
        self.assertEqual(driver_base.PowerState.RUNNING, self.driver.power_state('vm1'))
        self.assertEqual({}, self.compute.thaw({}, 'snap1'))

    def test_a_freeze_that_fails_by_a_bug_half_way_leaves_the_guest_running(self):
        self.build()
        freeze = self.driver.freeze_io

        def bug(name):
            freeze(name)  # paused, then a bug
            raise KeyError('a bug, on purpose')
        self.driver.freeze_io = bug
        self.assertEqual({'vm1': {'error': "KeyError: 'a bug, on purpose'"}},
                         self.freeze(['vm1']))
        self.assertEqual(driver_base.PowerState.RUNNING, self.driver.power_state('vm1'))

    def test_a_guest_frozen_for_one_snapshot_is_refused_by_another(self):
        self.build()
        self.freeze(['vm1'])
        self.assertIn('already frozen for snapshot snap1',
                      self.freeze(['vm1'], 'snap2')['vm1']['error'])

    def without(self, capability: driver_base.Capability) -> None:
        self.driver.capabilities = type(self.driver).capabilities & ~capability

    def test_a_driver_without_a_barrier_is_refused_before_any_guest_is_touched(self):
        self.build()
        self.without(driver_base.Capability.SNAPSHOT_BARRIER)
        touched = []
        self.driver.freeze_io = touched.append
        self.driver.pause = touched.append
        refusals = self.freeze(['vm1'])
        self.assertEqual([], touched)
        self.assertIn('no snapshot barrier', refusals['vm1']['error'])
        self.assertEqual(driver_base.PowerState.RUNNING, self.driver.power_state('vm1'))

    def test_the_boot_ends_when_the_guest_is_ready_whatever_its_image_prints(self):
        # An image without vmcloud's markers, ready once its console says login.
        spawn = self.driver.spawn

        def no_markers(spec):
            spawn(spec)
            self.driver.instances[spec.name].console[:] = ['Welcome', 'vm1 login: ']
        self.driver.spawn = no_markers
        instance = {'id': 'id-vm1', 'name': 'vm1', 'image': self.image, 'vcpus': 1,
                    'memory_mib': 256, 'attempt': 1,
                    'health': {'kind': 'console', 'pattern': 'login: $'}}
        self.compute.build_instance({}, instance)
        self.assertEqual(1, len(self.reports.of('instance_built')), self.reports.sent)
        recorder = self.mirrors.get('vm1').disk.recorder
        self.assertEqual(profile.APPLICATION, recorder.phase)  # before the build was reported
        # It prints no shutdown marker either: the stop request is the boundary.
        destroy, seen = self.driver.destroy, []

        def destroyed(name):
            seen.append(recorder.phase)
            destroy(name)
        self.driver.destroy = destroyed
        self.compute.destroy_instance({}, 'vm1')
        self.assertEqual([profile.SHUTDOWN], seen)

    def test_a_guest_that_is_not_ready_in_time_is_undone_naming_its_check(self):
        spawn = self.driver.spawn

        def no_markers(spec):
            spawn(spec)
            self.driver.instances[spec.name].console.clear()
        self.driver.spawn = no_markers
        self.conf.set_override('health_interval', 0.01, 'network')
        self.compute.build_instance({}, {
            'id': 'id-vm1', 'name': 'vm1', 'image': self.image, 'vcpus': 1, 'memory_mib': 256,
            'attempt': 1, 'health': {'kind': 'console', 'pattern': 'ready', 'timeout': 0.2}})
        (_, _, reason), = self.reports.of('build_failed')
        self.assertIn('GuestTimeout: instance vm1 did not pass its console:ready check within '
                      '0.2 s', reason)
        self.assertEqual([], self.driver.list_instances())
        self.assertEqual([], self.mirrors.names())


class PhasesTest(base.TestCase):
    class Recorder:
        def __init__(self):
            self.phases = []

        def set_phase(self, name, phase):
            self.phases.append((name, phase))

    def test_each_marker_the_guest_prints_reaches_the_mirror(self):
        driver = fake.FakeDriver(self.conf)
        driver.spawn(driver_base.InstanceSpec(name='vm1', disk=helpers.write_image(self.tmp)))
        recorder = self.Recorder()
        phases.follow(driver, recorder, 'vm1', timeout=1).join(30)
        # Followed once ready; the fake guest never shuts down by itself.
        self.assertEqual([('vm1', driver_base.BOOT_DONE)], recorder.phases)
        driver.stop('vm1')
        recorder = self.Recorder()
        phases.follow(driver, recorder, 'vm1', timeout=1).join(30)
        self.assertEqual([('vm1', driver_base.BOOT_DONE), ('vm1', driver_base.SHUTDOWN_STARTED)],
                         recorder.phases)

    def test_a_guest_gone_stops_following(self):
        driver = fake.FakeDriver(self.conf)
        recorder = self.Recorder()
        thread = phases.follow(driver, recorder, 'nosuch', timeout=1)
        thread.join(30)
        self.assertFalse(thread.is_alive())
        # Ready once (it was followed as it was): gone before any shutdown marker.
        self.assertEqual([('nosuch', driver_base.BOOT_DONE)], recorder.phases)

    def test_a_mirror_gone_stops_following(self):
        class Gone:
            def set_phase(self, name, phase):
                raise exception.MirrorNotFound(name)
        driver = fake.FakeDriver(self.conf)
        driver.spawn(driver_base.InstanceSpec(name='vm1', disk=helpers.write_image(self.tmp)))
        driver.stop('vm1')  # its shutdown marker is there to be seen: not waited for
        thread = phases.follow(driver, Gone(), 'vm1', timeout=1)
        thread.join(30)
        self.assertFalse(thread.is_alive())

    def test_the_shutdown_marker_is_followed_only_where_the_driver_sees_markers(self):
        driver = fake.FakeDriver(self.conf)
        driver.capabilities = type(driver).capabilities & ~driver_base.Capability.PHASE_EVENTS
        driver.spawn(driver_base.InstanceSpec(name='vm1', disk=helpers.write_image(self.tmp)))
        driver.stop('vm1')
        recorder = self.Recorder()
        phases.follow(driver, recorder, 'vm1', timeout=1).join(30)
        self.assertEqual([('vm1', driver_base.BOOT_DONE)], recorder.phases)
        phases.stopping(recorder, 'vm1')
        self.assertEqual([('vm1', driver_base.BOOT_DONE), ('vm1', driver_base.SHUTDOWN_STARTED)],
                         recorder.phases)
