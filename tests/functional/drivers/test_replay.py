"""The replay driver over real mirrors and real NBD: the conformance suite's storage part,
a mirror that fails a read, and a real boot recorded with the qemu driver and replayed."""
import os
import random
import threading
import time

from vmcloud import allinone
from vmcloud import exception
from vmcloud.drivers import base as driver_base
from vmcloud.drivers import replay
from vmcloud.mirror import manager as manager_mod
from vmcloud.nbd import server as server_mod
from vmcloud.nbd import trace as trace_mod
from vmcloud.storage import warehouse as warehouse_mod
from tests import base
from tests import guest
from tests.functional.drivers import test_conformance
from tests.unit.drivers import conformance

CHUNK = 64 * 1024
CHUNKS = 32
SIZE = CHUNK * CHUNKS
BOOT_TIMEOUT = conformance.BOOT_TIMEOUT
E = trace_mod.Event


def wait_for_line(driver: driver_base.Driver, name: str, line: str) -> None:
    deadline = time.monotonic() + BOOT_TIMEOUT
    while line not in driver.console_log(name).splitlines():
        if time.monotonic() > deadline:
            raise AssertionError(f'{name} did not print {line!r}: {driver.console_log(name)}')
        time.sleep(0.05)


def boot_events() -> list[trace_mod.Event]:
    """A small boot: reads over the image (a hole among them), writes, flushes, markers,
    and a shutdown that writes and flushes."""
    events, ms = [], 0.0
    for index in (0, 1, 5, 9, 17, 30):
        events.append(E(ms, 'R', index * CHUNK + 512, 4096, 0.2))
        ms += 1
    events += [E(ms, 'W', 2 * CHUNK, 512, 0.1), E(ms + 1, 'F', service_ms=0.1),
               E(ms + 2, 'P', marker='boot-done'), E(ms + 3, 'R', 12 * CHUNK, CHUNK, 0.5),
               E(ms + 4, 'P', marker='app-running'),
               E(ms + 10, 'P', marker='shutdown-started'), E(ms + 11, 'W', 3 * CHUNK, 4096),
               E(ms + 12, 'F')]
    return events


class ReplayDriverTest(conformance.DriverConformance, base.TestCase):
    """Every instance boots from a mirror of its own on one node."""

    driver_name = 'replay'
    boots_real_guest = False    # no clock of its own to show a pause (its unit tests do)
    groups = conformance.GROUPS - {conformance.GUEST_NETWORK}   # it sends nothing

    def setUp(self):
        super().setUp()
        self.conf.set_override('chunk_size', CHUNK, 'storage')
        self.warehouse = warehouse_mod.Warehouse(self.conf)
        image = os.path.join(self.tmp, 'image.raw')
        rng = random.Random(5)
        with open(image, 'wb') as f:
            for index in range(CHUNKS):
                f.write(bytes(CHUNK) if index == 9 else rng.randbytes(CHUNK))
        self.warehouse.import_image(image, 'img')
        self.manager = manager_mod.MirrorManager(self.conf, self.warehouse,
                                                 root=os.path.join(self.tmp, 'node'))
        self.addCleanup(self.manager.close)
        self.addCleanup(self._destroy_all)      # before the mirrors go
        self.use_trace('boot.trace', boot_events())

    def use_trace(self, leaf: str, events: list[trace_mod.Event]) -> str:
        path = os.path.join(self.tmp, leaf)
        trace_mod.write(path, SIZE, CHUNK, events)
        self.conf.set_override('trace', path, 'replay')
        return path

    def instance_spec(self, name: str, nics=(), **flags) -> driver_base.InstanceSpec:
        mirror = self.manager.create(name, 'img')
        return driver_base.InstanceSpec(name=name, disk=mirror.uri, nics=nics,
                                        cmdline=' '.join(f'vmcloud.{k}={v}'
                                                         for k, v in flags.items()))

    def remove_disk(self, spec: driver_base.InstanceSpec) -> None:
        self.manager.remove(spec.name)

    # NICs are taps on real bridges, as the qemu driver's
    def _destroy_all(self):
        try:
            super()._destroy_all()
        finally:
            for name in self.names:     # what a failing driver left
                guest.remove_taps(name)

    make_bridge = test_conformance.RealGuestConformance.make_bridge
    assert_attached = test_conformance.RealGuestConformance.assert_attached
    assert_detached = test_conformance.RealGuestConformance.assert_detached

    # -- the snapshot barrier, on a disk that logs what reaches it ------------------------

    def writing_guest(self):
        raw = os.path.join(self.tmp, 'barrier.raw')
        with open(raw, 'wb') as f:
            f.truncate(SIZE)
        device = test_conformance.RecordingDevice(raw)
        self.addCleanup(device.close)
        server = server_mod.NbdServer()
        self.addCleanup(server.stop)
        socket = os.path.join(self.tmp, 'barrier.sock')
        server.add_export('disk', device)
        server.listen_unix(socket)
        server.start()
        # 20 s of 4 KiB writes 2 ms apart, a flush after every 64
        events = [E(0, 'P', marker='boot-done')]
        for i in range(10000):
            events.append(E(1 + 2 * i, 'W', 4096 * (i % 256), 4096, 0.1))
            if i % 64 == 63:
                events.append(E(2 + 2 * i, 'F', service_ms=0.5))
        self.use_trace('writing.trace', events)
        name = guest.unique_name(self.driver_name)
        self.names.append(name)
        spec = driver_base.InstanceSpec(name=name, disk=f'nbd+unix:///disk?socket={socket}')
        self.driver.spawn(spec)
        self.addCleanup(self._destroy_all)       # before the server stops
        self.driver.wait_for_event(name, driver_base.BOOT_DONE, BOOT_TIMEOUT)
        return spec, device.events

    guest_writes = test_conformance.RealGuestConformance.guest_writes
    while_frozen = test_conformance.RealGuestConformance.while_frozen

    # -- what only the replay does ----------------------------------------------------------

    def test_its_nics_are_taps_on_their_bridges_until_it_is_destroyed(self):
        bridge = self.make_bridge(mtu=1450)
        spec = self.make_spec(nics=(driver_base.Nic('52:54:00:99:03:01', bridge),
                                    driver_base.Nic('52:54:00:99:03:02', bridge)))
        self.driver.boot(spec, BOOT_TIMEOUT)
        self.assert_attached(spec)
        self.assertFalse(self.driver.stop(spec.name, timeout=BOOT_TIMEOUT))
        self.assert_attached(spec)      # off, still known: its NICs stay until destroyed
        self.driver.spawn(spec)         # its name reused: the taps are made anew
        self.assert_attached(spec)
        self.driver.destroy(spec.name)
        self.assert_detached(spec)

    def test_the_replay_reads_and_writes_through_the_mirror(self):
        spec = self.boot()
        self.driver.wait_for_event(spec.name, driver_base.APP_RUNNING, BOOT_TIMEOUT)
        disk = self.manager.get(spec.name).disk
        self.assertEqual({0, 1, 2, 5, 12, 17, 30}, disk.fetched_indexes())   # 9 is a hole
        self.assertFalse(self.driver.stop(spec.name, timeout=BOOT_TIMEOUT))
        self.assertEqual({2, 3}, disk.dirty.indexes())
        written = disk.read(2 * CHUNK, 512)
        self.assertEqual(replay.write_data(spec.name, 2 * CHUNK, 512), written)

    def test_a_read_the_mirror_fails_crashes_the_instance(self):
        class Vanished(warehouse_mod.Warehouse):
            def read_chunk(self, chunk_id):
                raise exception.ChunkNotFound(chunk_id)

        self.conf.set_override('fetch_attempts', 1, 'mirror')
        node = manager_mod.MirrorManager(self.conf, Vanished(self.conf),
                                         root=os.path.join(self.tmp, 'vanished'))
        self.addCleanup(node.close)
        self.addCleanup(self._destroy_all)
        name = guest.unique_name('crash')
        self.names.append(name)
        mirror = node.create(name, 'img')
        self.driver.spawn(driver_base.InstanceSpec(name=name, disk=mirror.uri))
        error = self.assertRaises(exception.GuestTimeout, self.driver.wait_for_event, name,
                                  driver_base.BOOT_DONE, BOOT_TIMEOUT)
        self.assertIn('the guest stopped first', str(error))
        self.assertEqual(driver_base.PowerState.SHUTDOWN, self.driver.power_state(name))
        self.assertIn(f"VMCLOUD-REPLAY I/O error: NBD export '{name}': read of 4096 bytes at "
                      "512 failed: EIO", self.driver.console_log(name))


class RecordAndReplayTest(base.TestCase):
    """A real boot of the test guest recorded by its mirror, replayed on a fresh node."""

    def test_the_replay_of_a_recorded_boot_touches_what_the_boot_touched(self):
        self.conf.set_override('prefetch_threads', 0, 'mirror')
        traces = os.path.join(self.tmp, 'traces')
        self.conf.set_override('trace_path', traces, 'mirror')
        store = warehouse_mod.Warehouse(self.conf)
        store.import_image(guest.path('disk.img'), 'guest')

        recording = manager_mod.MirrorManager(self.conf, store,
                                              root=os.path.join(self.tmp, 'recording'))
        self.addCleanup(recording.close)
        qemu = driver_base.load(self.conf, 'qemu')
        name = guest.unique_name('record')
        self.addCleanup(lambda: name in qemu.list_instances() and qemu.destroy(name))
        mirror = recording.create(name, 'guest')
        qemu.boot(guest.spec(name, mirror.uri, disk_format='raw'), BOOT_TIMEOUT)
        recording.set_phase(name, driver_base.BOOT_DONE)
        qemu.wait_for_event(name, driver_base.APP_RUNNING, BOOT_TIMEOUT)
        recording.set_phase(name, driver_base.APP_RUNNING)

        def follow_shutdown():
            qemu.wait_for_event(name, driver_base.SHUTDOWN_STARTED, BOOT_TIMEOUT)
            recording.set_phase(name, driver_base.SHUTDOWN_STARTED)
        follower = threading.Thread(target=follow_shutdown, daemon=True)
        follower.start()
        self.assertFalse(qemu.stop(name, timeout=BOOT_TIMEOUT))
        follower.join(BOOT_TIMEOUT)
        qemu.destroy(name)
        booted = mirror.disk.fetched_indexes()
        recording.remove(name)     # the trace is whole once its mirror is gone
        recorded = trace_mod.read(os.path.join(traces, f'{name}.trace'))
        self.assertEqual(list(driver_base.PHASES), recorded.markers())
        self.assertTrue(recorded.bytes_of(trace_mod.READ))
        self.assertTrue(recorded.bytes_of(trace_mod.WRITE))

        replaying = manager_mod.MirrorManager(self.conf, store,
                                              root=os.path.join(self.tmp, 'replaying'))
        self.addCleanup(replaying.close)
        self.conf.set_override('trace', recorded.path, 'replay')
        driver = driver_base.load(self.conf, 'replay')
        self.addCleanup(lambda: 'replayed' in driver.list_instances()
                        and driver.destroy('replayed'))
        mirror = replaying.create('replayed', 'guest')
        driver.boot(driver_base.InstanceSpec(name='replayed', disk=mirror.uri), BOOT_TIMEOUT)
        # all of it up to the shutdown, as the real guest did before its power button
        wait_for_line(driver, 'replayed', replay.IDLE)
        self.assertFalse(driver.stop('replayed', timeout=BOOT_TIMEOUT))
        self.assertEqual(list(driver_base.PHASES), [
            line.split()[1] for line in driver.console_log('replayed').splitlines()
            if line.startswith('VMCLOUD-PHASE ')])
        driver.destroy('replayed')
        self.assertEqual(booted, mirror.disk.fetched_indexes())
        replaying.remove('replayed')
        # one request at a time, in recorded order: the replay's own trace says the same
        replayed = trace_mod.read(os.path.join(traces, 'replayed.trace'))

        def requests(trace):
            return [(e.op, e.offset, e.length) for e in trace.requests()]
        self.assertEqual(requests(recorded), requests(replayed))


class ReplayCloudTest(base.TestCase):
    """The compute manager runs replays as it runs guests: deploy on networks, snapshot all
    of them at once (the barrier), redeploy from the snapshots."""

    def test_deploy_snapshot_and_redeploy(self):
        self.conf.set_override('heartbeat_interval', 1)
        self.use_private_vni_range()
        self.conf.set_override('chunk_size', CHUNK, 'storage')
        trace = os.path.join(self.tmp, 'boot.trace')
        trace_mod.write(trace, SIZE, CHUNK, boot_events())
        self.conf.set_override('trace', trace, 'replay')
        # no peers: the replays' storage path is the mirrors' either way
        cloud = allinone.AllInOne(self.conf, hosts=2, driver='replay', peers=False)
        image = os.path.join(self.tmp, 'image.raw')
        with open(image, 'wb') as f:
            f.write(random.Random(6).randbytes(SIZE))
        cloud.warehouse.import_image(image, 'img')
        cloud.start()
        self.addCleanup(cloud.stop)

        def active(deployment: dict) -> dict:
            deployment = cloud.api.wait_deployment(deployment['id'], BOOT_TIMEOUT)
            self.assertEqual('active', deployment['state'], deployment)
            for instance in deployment['instances']:
                driver = cloud.node(instance['host']).driver
                self.assertIn('VMCLOUD-PHASE boot-done', driver.console_log(instance['name']))
            return deployment

        first = active(cloud.api.deploy('img', count=6))
        self.assertEqual({'node1', 'node2'}, {i['host'] for i in first['instances']})
        snapshot = cloud.api.wait_snapshot(cloud.api.snapshot(first['id'])['id'],
                                           BOOT_TIMEOUT)
        self.assertEqual('available', snapshot['state'], snapshot)
        self.assertEqual(6, len(snapshot['items']))
        for item in snapshot['items']:
            self.assertGreater(item['dirty_bytes'], 0)   # what the replay wrote
        cloud.api.delete_deployment(first['id'])
        active(cloud.api.deploy_snapshot(snapshot['id']))
