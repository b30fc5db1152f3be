"""The compute manager with the fake driver, called directly; its reports recorded."""
import errno
import os
import threading

from vmcloud import exception
from vmcloud import polling
from vmcloud import rpc
from vmcloud.compute import manager
from vmcloud.compute import phases
from vmcloud.drivers import base as driver_base
from vmcloud.drivers import fake
from vmcloud.mirror import disk as disk_mod
from vmcloud.mirror import manager as mirror_manager
from vmcloud.mirror import profile
from vmcloud.storage import warehouse as warehouse_mod
from tests import base
from tests.unit.compute import test_artifacts
from tests.unit.dispatcher import helpers


class Reports:
    """Stands in for the dispatcher: what the compute manager tells it."""

    def __init__(self):
        self.sent: list[tuple] = []
        self.changed = threading.Condition()

    def __getattr__(self, method: str):
        def report(*args) -> None:
            with self.changed:
                self.sent.append((method, *args))
                self.changed.notify_all()
        return report

    def of(self, method: str) -> list[tuple]:
        return [r[1:] for r in self.sent if r[0] == method]


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
        self.compute = manager.ComputeManager(self.conf, 'node1', driver=self.driver,
                                              warehouse=self.warehouse)
        self.addCleanup(self.compute.mirrors.close)
        self.reports = Reports()
        self.compute.dispatcher = self.reports

    def build(self, name: str = 'vm1', **boot: str) -> dict:
        instance = {'id': f'id-{name}', 'name': name, 'image': self.image, 'vcpus': 1,
                    'memory_mib': 256, 'boot': {'cmdline': 'vmcloud.id={name}', **boot}}
        self.compute.build_instance({}, instance)
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
        fetched_indexes = disk_mod.MirrorDisk.fetched_indexes
        broke = []

        def broken_once(disk):
            if not broke:
                broke.append(disk)
                raise RuntimeError('no stats, on purpose')
            return fetched_indexes(disk)
        self.patch(disk_mod.MirrorDisk, 'fetched_indexes', broken_once)
        self.build()
        (_, _, reason), = self.reports.of('build_failed')
        self.assertEqual('RuntimeError: no stats, on purpose', reason)
        self.assertEqual([], self.reports.of('instance_built'))
        self.assertEqual([], self.driver.list_instances())
        self.assertEqual([], self.compute.mirrors.names())

    def test_the_heartbeat_outlives_any_error(self):
        # A heartbeat thread that died would have the node marked down, its guests in error.
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
        with self.reports.changed:
            self.assertTrue(self.reports.changed.wait_for(
                lambda: self.reports.of('report_heartbeat'), 30))
        self.assertEqual([], failures)
        self.assertTrue(self.compute._heartbeat.is_alive())

    def test_stopping_destroys_every_guest_and_closes_whatever_fails(self):
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
        # The mirrors were closed: another manager may own this node's state now.
        self.assertEqual([], self.compute.mirrors.names())
        again = mirror_manager.MirrorManager(self.conf, self.warehouse)
        again.close()

    def test_state_is_where_the_mirror_options_put_it(self):
        self.compute.mirrors.close()
        paths = {option: os.path.join(self.tmp, 'elsewhere', option)
                 for option in ('mirrors_path', 'cache_path', 'nbd_socket')}
        for option, path in paths.items():
            self.conf.set_override(option, path, 'mirror')
        self.compute = manager.ComputeManager(self.conf, 'node1', driver=self.driver,
                                              warehouse=self.warehouse)
        self.addCleanup(self.compute.mirrors.close)
        self.compute.dispatcher = self.reports
        self.build()
        self.assertIn(paths['nbd_socket'], self.compute.mirrors.uri('vm1'))
        self.assertTrue(os.path.exists(paths['nbd_socket']))
        self.assertEqual(['vm1'], os.listdir(paths['mirrors_path']))
        self.assertIn('lock', os.listdir(paths['cache_path']))
        # Nothing of the node's is under state_path: the host's config placed all of it.
        self.assertFalse(os.path.exists(os.path.join(self.conf.state_path, 'nodes')))
        self.assertFalse(os.path.exists(os.path.join(self.conf.state_path, 'mirrors')))

    def test_destroy(self):
        self.build()
        self.compute.destroy_instance({}, 'vm1')
        self.assertEqual([], self.driver.list_instances())
        self.assertEqual([], self.compute.mirrors.names())
        self.compute.destroy_instance({}, 'vm1')  # gone already: nothing to do

    def test_freeze_then_barrier_thaws_and_uploads(self):
        self.build('vm1')
        self.build('vm2')
        mirror = self.compute.mirrors.get('vm1')
        chunk = mirror.disk.manifest.chunk_size
        mirror.disk.write(0, b'x' * chunk)
        self.assertEqual({'vm1': '', 'vm2': ''}, self.compute.freeze({}, ['vm1', 'vm2']))
        for name in ('vm1', 'vm2'):
            self.assertTrue(self.driver.instances[name].io_frozen)
            self.assertEqual(driver_base.PowerState.PAUSED, self.driver.power_state(name))
        items = [{'instance_id': 'id-vm1', 'name': 'vm1'},
                 {'instance_id': 'id-vm2', 'name': 'vm2'}]
        results = self.compute.barrier_and_thaw({}, 'snap1', items)
        self.assertEqual(chunk, results['vm1']['dirty_bytes'])
        self.assertEqual(0, results['vm2']['dirty_bytes'])
        for name in ('vm1', 'vm2'):
            self.assertFalse(self.driver.instances[name].io_frozen)
            self.assertEqual(driver_base.PowerState.RUNNING, self.driver.power_state(name))
        done = polling.wait(lambda: self.reports.of('snapshot_item_done'),
                            lambda d: len(d) == 2, 60, 'both uploads', interval=0.02)
        by_id = {d[1]: d for d in done}
        _, _, version, uploaded, error = by_id['id-vm1']
        self.assertEqual('', error)
        self.assertEqual(chunk, uploaded)
        self.assertBytesEqual(b'x' * chunk,
                              self.warehouse.read(self.warehouse.lookup(version), 0, chunk))

    def snapshot(self, names: list[str]) -> dict:
        """Freeze and barrier ``names`` as one snapshot; :returns: instance id -> the
        (version, uploaded bytes, error) each one's upload reported."""
        self.assertEqual(dict.fromkeys(names, ''), self.compute.freeze({}, names))
        items = [{'instance_id': f'id-{name}', 'name': name} for name in names]
        self.compute.barrier_and_thaw({}, 'snap1', items)
        done = polling.wait(lambda: self.reports.of('snapshot_item_done'),
                            lambda d: len(d) == len(names), 60, 'every upload',
                            interval=0.02)
        return {instance_id: rest for _snapshot, instance_id, *rest in done}

    def test_one_barrier_is_one_upload_session_and_each_item_its_own_result(self):
        for name in ('vm1', 'vm2', 'vm3'):
            self.build(name)
        chunk = self.compute.mirrors.get('vm1').disk.manifest.chunk_size
        for name in ('vm1', 'vm2'):  # the same bytes: sent once for both
            self.compute.mirrors.get(name).disk.write(0, b's' * chunk)
        self.compute.mirrors.get('vm3').disk.write(chunk, b'3' * chunk)
        sessions = []
        snapshot_many = self.warehouse.snapshot_many

        def one_of_them_fails(items):
            sessions.append(len(items))
            results = snapshot_many(items)
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

    def test_a_failed_upload_session_is_reported_for_every_item_and_ends_the_barriers(self):
        for name in ('vm1', 'vm2'):
            self.build(name)
            disk = self.compute.mirrors.get(name).disk
            disk.write(0, b'x' * disk.manifest.chunk_size)

        def failing(items):
            raise exception.StorageError('the store is down, on purpose')
        self.warehouse.snapshot_many = failing
        reports = self.snapshot(['vm1', 'vm2'])
        self.assertEqual({f'id-{name}': ['', 0, 'StorageError: the store is down, on purpose']
                          for name in ('vm1', 'vm2')}, reports)
        # The barriers ended with the failed session: the next snapshot can take its own.
        del self.warehouse.snapshot_many
        self.reports.sent.clear()
        for _version, _uploaded, error in self.snapshot(['vm1', 'vm2']).values():
            self.assertEqual('', error)

    def test_a_barrier_the_disk_refuses_fails_its_guest_alone(self):
        for name in ('vm1', 'vm2'):
            self.build(name)
            disk = self.compute.mirrors.get(name).disk
            disk.write(0, b'x' * disk.manifest.chunk_size)

        def no_room():
            raise OSError(errno.ENOSPC, 'No space left on device, on purpose')
        self.compute.mirrors.get('vm2').disk.barrier = no_room
        self.assertEqual({'vm1': '', 'vm2': ''}, self.compute.freeze({}, ['vm1', 'vm2']))
        results = self.compute.barrier_and_thaw({}, 'snap1', [
            {'instance_id': 'id-vm1', 'name': 'vm1'}, {'instance_id': 'id-vm2', 'name': 'vm2'}])
        self.assertIn('No space left on device, on purpose', results['vm2']['error'])
        self.assertFalse(self.driver.instances['vm2'].io_frozen)
        (_snapshot, instance_id, _version, _uploaded, error), = polling.wait(
            lambda: self.reports.of('snapshot_item_done'), lambda d: len(d) == 1, 60,
            'the upload of vm1', interval=0.02)
        self.assertEqual(('id-vm1', ''), (instance_id, error))

    def test_a_guest_that_cannot_freeze_is_named(self):
        self.build()

        freeze = self.driver.freeze_io

        def refuse(name):
            if name == 'vm1':
                raise exception.DriverError('stuck, on purpose')
            return freeze(name)
        self.driver.freeze_io = refuse
        self.assertEqual({'vm1': 'stuck, on purpose', 'nosuch': 'instance nosuch not found'},
                         self.compute.freeze({}, ['vm1', 'nosuch']))

    def without(self, capability: driver_base.Capability) -> None:
        self.driver.capabilities = type(self.driver).capabilities & ~capability

    def test_a_driver_without_a_barrier_is_refused_before_any_guest_is_touched(self):
        self.build()
        self.without(driver_base.Capability.SNAPSHOT_BARRIER)
        touched = []
        self.driver.freeze_io = touched.append
        self.driver.pause = touched.append
        refusals = self.compute.freeze({}, ['vm1'])
        self.assertEqual([], touched)
        self.assertIn('no snapshot barrier', refusals['vm1'])
        self.assertEqual(driver_base.PowerState.RUNNING, self.driver.power_state('vm1'))

    def test_phases_are_followed_only_where_the_driver_sees_them(self):
        followed = []
        self.patch(phases, 'follow', lambda driver, mirrors, name: followed.append(name))
        self.build('vm1')
        self.without(driver_base.Capability.PHASE_EVENTS)
        self.build('vm2')
        self.assertEqual(['vm1'], followed)
        self.assertEqual(2, len(self.reports.of('instance_built')))


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
        # The fake guest printed boot-done; it never shuts down by itself.
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
        self.assertEqual([], recorder.phases)
