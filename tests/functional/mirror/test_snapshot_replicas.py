"""Snapshots that land on peer nodes first: three nodes' mirrors in one process, each with
its own cache, warehouse client and peer chunk server (real HTTP on loopback), sharing
one warehouse store. What reaches the store is counted at the store's write session,
not by the code under test."""
import os
import random
import threading

from vmcloud import exception
from vmcloud.mirror import api
from vmcloud.mirror import ownership
from vmcloud.storage import manifest as manifest_mod
from vmcloud.storage import warehouse as warehouse_mod
from vmcloud.storage.backends import file as file_backend
from tests import base

CHUNK = 64 * 1024
NODES = ['node-a', 'node-b', 'node-c']
CHUNKS = 24


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ReplicasTestCase(base.TestCase):
    def setUp(self):
        super().setUp()
        self.conf.set_override('chunk_size', CHUNK, 'storage')
        for name, value in {'peer_address': '127.0.0.1', 'peer_port': 0, 'peer_timeout': 10.0,
                            'prefetch_threads': 0, 'fetch_retry_wait': 0.01,
                            # Sweeps only when a test says so (with its own clock).
                            'persist_check_interval': 3600.0}.items():
            self.conf.set_override(name, value, 'mirror')
        self.rng = random.Random(6)
        self.image = self.rng.randbytes(CHUNKS * CHUNK)
        path = os.path.join(self.tmp, 'disk.raw')
        with open(path, 'wb') as f:
            f.write(self.image)
        warehouse_mod.Warehouse(self.conf).import_image(path, 'disk')
        self.stored: list[tuple[str, int]] = []  # every chunk a write session put
        self.stored_lock = threading.Lock()
        put_chunk = file_backend.PackWriteSession.put_chunk

        def counted(session, chunk_id, data):
            with self.stored_lock:
                self.stored.append((chunk_id, len(data)))
            return put_chunk(session, chunk_id, data)
        self.patch(file_backend.PackWriteSession, 'put_chunk', counted)
        self.nodes = {name: self.node(name) for name in NODES}
        self.live(NODES)

    def node(self, name: str) -> api.LocalMirrors:
        node = api.LocalMirrors(self.conf, warehouse_mod.Warehouse(self.conf),
                                root=os.path.join(self.tmp, name))
        self.addCleanup(node.close)
        return node

    def live(self, names: list[str]) -> None:
        urls = {name: self.nodes[name].peer_url() for name in names}
        for name in names:
            self.nodes[name].set_peers(name, urls)

    def snapshot(self, uploader: str = 'node-a') -> tuple[dict, dict[str, bytes], set[str]]:
        """vm1 and vm2 on ``uploader`` written (three chunks alike in both) and uploaded
        as one snapshot. :returns: the upload's results, each guest's expected bytes, and
        the new chunks."""
        node = self.nodes[uploader]
        expected, new = {}, set()
        shared = {i: self.rng.randbytes(CHUNK) for i in (0, 1, 2)}
        for name, own in (('vm1', (5, 6, 7, 8)), ('vm2', (10, 11))):
            changes = {**shared, **{i: self.rng.randbytes(CHUNK) for i in own}}
            node.create(name, 'disk')
            image = bytearray(self.image)
            for index, data in changes.items():
                node.get(name).disk.write(index * CHUNK, data)
                image[index * CHUNK:(index + 1) * CHUNK] = data
                new.add(manifest_mod.chunk_id(data))
            expected[name] = bytes(image)
        self.assertNotIn('error', str(node.barrier('snap', ['vm1', 'vm2'])))
        del self.stored[:]
        results = node.upload('snap', {'vm1': 'vm1', 'vm2': 'vm2'})
        return results, expected, new

    def holding(self, chunk_id: str) -> set[str]:
        """The nodes that hold the chunk as an unpersisted replica."""
        return {name for name, node in self.nodes.items()
                if chunk_id in node.cache.unpersisted()}

    def deploy(self, name: str, version: str) -> bytes:
        node = self.nodes[name]
        info = node.create(f'copy-{version.replace(":", "-")}', version)
        return node.get(info.name).disk.read(0, len(self.image))

    def hold_persisting(self, name: str) -> threading.Event:
        """Keep node ``name``'s persister from writing until the event is set."""
        gate = threading.Event()
        warehouse = self.nodes[name].warehouse
        store_chunks = warehouse.store_chunks

        def held(*args):
            gate.wait(60)
            return store_chunks(*args)
        self.patch(warehouse, 'store_chunks', held)
        self.addCleanup(gate.set)
        return gate


class LandOnPeersFirstTest(ReplicasTestCase):
    def test_replicated_on_the_owners_deployable_then_persisted_once(self):
        gate = self.hold_persisting('node-a')
        results, expected, new = self.snapshot()
        for name in ('vm1', 'vm2'):
            self.assertEqual((True, False), (results[name]['replicated'],
                                             results[name]['persistent']), results)
        # Nothing of it in the repository yet: every new chunk is on its owners (and on
        # its uploader).
        warehouse = self.nodes['node-b'].warehouse
        self.assertEqual(new, warehouse.missing(new))
        self.assertEqual([], self.stored)
        for chunk_id in new:
            self.assertEqual(set(ownership.owners(chunk_id, NODES, 2)) | {'node-a'},
                             self.holding(chunk_id))
        # Deployed on the other nodes as it is: the bytes come from the owners.
        for name in ('vm1', 'vm2'):
            version = results[name]['version']
            self.assertFalse(warehouse.is_whole(*manifest_mod.VersionRef.parse(version)))
            for where in ('node-b', 'node-c'):
                self.assertBytesEqual(expected[name], self.deploy(where, version))
        self.assertEqual({'vm1': False, 'vm2': False},
                         self.nodes['node-a'].wait_persistent('snap', 0))  # not yet
        gate.set()
        self.assertEqual({'vm1': True, 'vm2': True},
                         self.nodes['node-a'].wait_persistent('snap', 60))
        # In the repository now, each new chunk written once, and no replica is left.
        self.assertEqual(set(), warehouse.missing(new))
        self.assertEqual(sorted(new), sorted(chunk_id for chunk_id, _ in self.stored))
        self.assertEqual(len(new) * CHUNK, sum(length for _, length in self.stored))
        for name in ('vm1', 'vm2'):
            self.assertTrue(warehouse.is_whole(
                *manifest_mod.VersionRef.parse(results[name]['version'])))
        for chunk_id in new:
            self.assertEqual(set(), self.holding(chunk_id))

    def test_a_chunk_an_owner_refuses_goes_to_the_repository_in_the_upload(self):
        self.nodes['node-b'].cache.replica_size = 0  # its budget is full
        gate = self.hold_persisting('node-a')
        results, expected, new = self.snapshot()
        refused = {c for c in new if 'node-b' in ownership.owners(c, NODES, 2)}
        self.assertTrue(refused and refused != new)
        self.assertEqual(sorted(refused), sorted(chunk_id for chunk_id, _ in self.stored))
        for chunk_id in refused:
            self.assertEqual(set(), self.holding(chunk_id))  # released where it landed
        for chunk_id in new - refused:
            self.assertEqual(set(ownership.owners(chunk_id, NODES, 2)) | {'node-a'},
                             self.holding(chunk_id))
        gate.set()
        self.nodes['node-a'].wait_persistent('snap', 60)
        self.assertEqual(set(), self.nodes['node-a'].warehouse.missing(new))
        self.assertEqual(len(new), len(self.stored))  # still each chunk once

    def test_alone_or_with_replication_off_a_snapshot_is_persistent_at_once(self):
        self.conf.set_override('replicate_snapshots', False, 'mirror')
        results, _expected, new = self.snapshot()
        self.assertEqual({(True, True)}, {(r['replicated'], r['persistent'])
                                          for r in results.values()})
        self.assertEqual(sorted(new), sorted(chunk_id for chunk_id, _ in self.stored))
        self.assertEqual({}, self.nodes['node-a'].cache.unpersisted())


class UploaderDiesTest(ReplicasTestCase):
    def test_the_owners_sweep_persists_what_a_dead_uploader_left(self):
        # The uploader cannot reach the repository, then dies (is closed) with its
        # snapshot on the owners only.
        warehouse = self.nodes['node-a'].warehouse
        self.patch(warehouse, 'store_chunks', self.away)
        results, expected, new = self.snapshot()
        self.nodes['node-a'].close()
        self.live(['node-b', 'node-c'])
        clocks = {}
        for name in ('node-b', 'node-c'):
            clocks[name] = self.nodes[name].persister._clock = FakeClock()
        survivors = {c for c in new if set(ownership.owners(c, NODES, 2)) - {'node-a'}}
        self.assertEqual(new, survivors)  # R = 2 of 3: every chunk has a live owner

        def sweep() -> None:
            for name in ('node-b', 'node-c'):
                self.nodes[name].persister.sweep()
                clocks[name].now += 3600
        sweep()  # seen
        self.assertEqual([], self.stored)
        sweep()  # old enough, its uploader gone: their primaries write them
        sweep()  # and a chunk whose live primary lacks it, a holder
        self.assertEqual(set(), self.nodes['node-b'].warehouse.missing(new))
        self.assertEqual(len(new), len({chunk_id for chunk_id, _ in self.stored}))
        for chunk_id in new:
            self.assertEqual(set(), self.holding(chunk_id) - {'node-a'})
        for name in ('vm1', 'vm2'):
            version = results[name]['version']
            self.assertTrue(self.nodes['node-b'].warehouse.is_whole(
                *manifest_mod.VersionRef.parse(version)))
            self.assertBytesEqual(expected[name], self.deploy('node-c', version))

    @staticmethod
    def away(*args):
        raise exception.StorageError('warehouse unreachable from node-a')
