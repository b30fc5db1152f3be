"""Nodes that exchange chunks over real HTTP on loopback: four mirror managers in one
process, each with its own cache, warehouse client and peer chunk server, sharing one
warehouse store. The repository's reads are counted by a wrapper of each node's
warehouse client, not by the code under test."""
import collections
import logging
import os
import random
import socket
import threading
import time

import fixtures

from vmcloud import exception
from vmcloud.mirror import api
from vmcloud.mirror import cache as cache_mod
from vmcloud.mirror import manager as manager_mod
from vmcloud.mirror import ownership
from vmcloud.mirror import service as service_mod
from vmcloud.storage import warehouse as warehouse_mod
from tests import base

CHUNK = 64 * 1024
NODES = ['node-a', 'node-b', 'node-c', 'node-d']
# Long enough for a loaded machine; the tests of silence set their own.
TIMEOUT = 10.0


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class PeersTestCase(base.TestCase):
    def setUp(self):
        super().setUp()
        self.conf.set_override('chunk_size', CHUNK, 'storage')
        for name, value in {'peer_address': '127.0.0.1', 'peer_port': 0,
                            'peer_timeout': TIMEOUT, 'peer_skip_time': 3600,
                            'prefetch_threads': 0, 'fetch_retry_wait': 0.01}.items():
            self.conf.set_override(name, value, 'mirror')
        rng = random.Random(18)
        # 40 chunks: random ones, holes, one chunk three times, a short tail
        kinds = 'r' * 12 + 'h' + 'r' * 10 + 'AhA' + 'r' * 12 + 'As'
        parts = {'r': lambda: rng.randbytes(CHUNK), 'h': lambda: bytes(CHUNK),
                 'A': lambda: b'A' * CHUNK, 's': lambda: rng.randbytes(CHUNK // 3)}
        self.image = b''.join(parts[kind]() for kind in kinds)
        path = os.path.join(self.tmp, 'disk.raw')
        with open(path, 'wb') as f:
            f.write(self.image)
        self.manifest = warehouse_mod.Warehouse(self.conf).import_image(path, 'disk').manifest
        self.distinct = set(self.manifest.data_chunk_ids())
        self.reads: collections.Counter[tuple[str, str]] = collections.Counter()
        self.reads_lock = threading.Lock()
        self.hold: dict[str, threading.Event] = {}  # chunk -> set when its read may go on

    def node(self, name: str) -> manager_mod.MirrorManager:
        """A node: its own warehouse client (reads counted), cache, NBD and peer server."""
        warehouse = warehouse_mod.Warehouse(self.conf)
        read = warehouse.read_chunk

        def counted(chunk_id: str) -> bytes:
            gate = self.hold.get(chunk_id)
            if gate is not None:
                gate.wait(30)
            data = read(chunk_id)
            with self.reads_lock:
                self.reads[(name, chunk_id)] += 1
            return data

        warehouse.read_chunk = counted
        node = manager_mod.MirrorManager(self.conf, warehouse, root=os.path.join(self.tmp, name))
        self.addCleanup(node.close)
        return node

    def cluster(self, names=NODES, extra: dict[str, str] | None = None
                ) -> dict[str, manager_mod.MirrorManager]:
        """Nodes that know each other (and the ``extra`` peers {name: url})."""
        nodes = {name: self.node(name) for name in names}
        urls = {name: node.peer_url() for name, node in nodes.items()}
        urls.update(extra or {})
        for name, node in nodes.items():
            node.set_peers(name, urls)
        return nodes

    def read_image(self, node: manager_mod.MirrorManager, name: str) -> bytes:
        mirror = node.create(f'vm-{name}', 'disk')
        return mirror.disk.read(0, len(self.image))

    def read_chunks(self, node: manager_mod.MirrorManager, name: str, indexes) -> None:
        """Read the chunks at ``indexes`` through a mirror of the node, checking each."""
        try:
            mirror = node.get(f'vm-{name}')
        except exception.MirrorNotFound:
            mirror = node.create(f'vm-{name}', 'disk')
        for index in indexes:
            length = self.manifest.chunk_length(index)
            self.assertBytesEqual(self.image[index * CHUNK:index * CHUNK + length],
                                  mirror.disk.read(index * CHUNK, length))

    def indexes_where(self, test, nodes=NODES) -> list[int]:
        """Indexes of distinct data chunks (first occurrence) whose owners pass ``test``."""
        seen, found = set(), []
        for index, chunk in enumerate(self.manifest.chunks):
            if chunk is None or chunk in seen:
                continue
            seen.add(chunk)
            if test(ownership.owners(chunk, nodes, 2)):
                found.append(index)
        return found

    def image_chunk(self, chunk_id: str) -> bytes:
        index = self.manifest.chunks.index(chunk_id)
        return self.image[index * CHUNK:index * CHUNK + self.manifest.chunk_length(index)]

    def repository_reads(self) -> int:
        return sum(count for (_, chunk), count in self.reads.items() if chunk in self.distinct)

    def in_thread(self, work, *args):
        """Run ``work`` in a thread; join it (bounded) and raise what it raised."""
        result = {}

        def run():
            try:
                result['value'] = work(*args)
            except BaseException as exc:  # noqa: B902 - re-raised in the test's thread
                result['error'] = exc

        thread = threading.Thread(target=run)
        thread.start()
        return thread, result

    def joined(self, thread, result, bound: float = 60):
        thread.join(bound)
        self.assertFalse(thread.is_alive(), 'the read did not end')
        if 'error' in result:
            raise result['error']
        return result.get('value')


class ExchangeTest(PeersTestCase):
    def test_every_node_reads_the_image_and_the_repository_serves_each_chunk_once(self):
        nodes = self.cluster()
        work = [self.in_thread(self.read_image, node, name) for name, node in nodes.items()]
        for thread, result in work:
            self.assertBytesEqual(self.image, self.joined(thread, result))
        self.assertEqual(len(self.distinct), self.repository_reads())
        self.assertEqual(self.distinct, {chunk for _, chunk in self.reads})
        # Each by its primary owner, and each node says so itself.
        for (name, chunk), count in self.reads.items():
            self.assertEqual(ownership.owners(chunk, NODES, 2)[0], name, chunk)
        stats = {name: node.peer_stats() for name, node in nodes.items()}
        for name, doc in stats.items():
            mine = [c for (n, c) in self.reads if n == name]
            self.assertEqual(len(mine), doc['repository_chunks'], name)
            self.assertEqual(sum(len(self.image_chunk(c)) for c in mine),
                             nodes[name].warehouse_bytes())
            self.assertEqual(name, doc['host'])
            self.assertEqual(2, doc['replicas'])
            self.assertEqual({n: nodes[n].peer_url() for n in NODES}, doc['peers'])
            self.assertEqual(0, doc['peer_failures'])
        # Every chunk a node had from a peer, a peer served it (a server counts it once
        # its last byte has left, maybe just after the client has it all).
        had = (sum(d['peer_chunks'] for d in stats.values()),
               sum(d['peer_bytes'] for d in stats.values()))
        self.assertGreater(had[0], len(self.distinct))

        def served():
            docs = [node.peer_stats() for node in nodes.values()]
            return (sum(d['served_chunks'] for d in docs), sum(d['served_bytes'] for d in docs))

        deadline = time.monotonic() + 30
        while served() != had and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(had, served())

    def test_concurrent_misses_on_every_node_cost_one_repository_read(self):
        nodes = self.cluster()
        index = self.indexes_where(lambda owners: owners[0] == 'node-c')[0]
        chunk = self.manifest.chunks[index]
        primary = nodes['node-c']
        # The primary's read waits until every node's miss has reached it (its own and
        # three peers' requests): then the misses are concurrent.
        misses = primary.cache.stats.misses
        gate = self.hold[chunk] = threading.Event()
        work = [self.in_thread(self.read_chunks, node, name, [index])
                for name, node in nodes.items()]
        deadline = time.monotonic() + 30
        while primary.cache.stats.misses < misses + len(NODES) and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.set()
        for thread, result in work:
            self.joined(thread, result)
        self.assertEqual(len(NODES), primary.cache.stats.misses - misses)
        self.assertEqual({('node-c', chunk): 1}, dict(self.reads))
        self.assertEqual(len(NODES) - 1, sum(node.peer_stats()['peer_chunks']
                                             for node in nodes.values()))

    def owned_slot_bytes(self, name: str, nodes: list[str]) -> int:
        """Bytes of the slots of the image's chunks ``name`` owns among ``nodes``."""
        return sum(cache_mod._slot_size(len(self.image_chunk(chunk))) for chunk in self.distinct
                   if name in ownership.owners(chunk, nodes, 2))

    def test_a_node_joining_moves_only_its_share(self):
        old = NODES[:3]
        nodes = self.cluster(old)
        for name, node in nodes.items():
            self.read_chunks(node, name, range(self.manifest.chunk_count))
        for name in old:
            self.assertEqual(self.owned_slot_bytes(name, old), nodes[name].cache.owned_bytes)
        self.reads.clear()
        nodes['node-d'] = self.node('node-d')
        urls = {name: node.peer_url() for name, node in nodes.items()}
        for name, node in nodes.items():
            node.set_peers(name, urls)
        # The old nodes' caches count as owned only what they still own.
        for name in old:
            self.assertEqual(self.owned_slot_bytes(name, NODES), nodes[name].cache.owned_bytes)
        # node-d reads the image: the repository serves only the chunks node-d is the
        # primary owner of now, its share; the old nodes serve the rest.
        self.read_chunks(nodes['node-d'], 'node-d', range(self.manifest.chunk_count))
        primary_of_d = {c for c in self.distinct if ownership.owners(c, NODES, 2)[0] == 'node-d'}
        self.assertTrue(primary_of_d)
        self.assertEqual({('node-d', chunk): 1 for chunk in primary_of_d}, dict(self.reads))
        # The old nodes read everything again from their caches.
        for name in old:
            self.read_chunks(nodes[name], name, range(self.manifest.chunk_count))
        self.assertEqual(len(primary_of_d), self.repository_reads())


class FailingPeersTest(PeersTestCase):
    def test_a_dead_peer_is_skipped_for_the_skip_time(self):
        nodes = self.cluster()
        clock = nodes['node-a'].peers.clock = FakeClock()
        nodes['node-b'].peer_server.stop()  # node-b still listed: it died a moment ago
        logs = self.useFixture(fixtures.FakeLogger(level=logging.WARNING))
        theirs = self.indexes_where(lambda owners: owners[0] == 'node-b'
                                    and 'node-a' not in owners)
        self.assertGreater(len(theirs), 3)
        self.joined(*self.in_thread(self.read_chunks, nodes['node-a'], 'node-a', theirs[:-1]))
        stats = nodes['node-a'].peer_stats()
        self.assertEqual(1, stats['peer_failures'])  # asked once, skipped since
        self.assertEqual(len(theirs) - 1, stats['peer_chunks'])  # from the second owners
        self.assertEqual(1, logs.output.count('peer node-b skipped'), logs.output)
        # The skip time over, node-b is asked again (and skipped again).
        clock.now += 3600
        self.read_chunks(nodes['node-a'], 'node-a', theirs[-1:])
        self.assertEqual(2, nodes['node-a'].peer_stats()['peer_failures'])
        # Each read once, by its second owner: a dead primary costs no more.
        self.assertEqual(len(theirs), self.repository_reads())

    def test_a_silent_peer_is_given_up_after_the_timeout(self):
        self.conf.set_override('peer_timeout', 0.3, 'mirror')
        # Accepts (the kernel completes the handshake into the backlog) and says nothing.
        silent = socket.create_server(('127.0.0.1', 0), backlog=64)
        self.addCleanup(silent.close)
        silent_url = f'http://127.0.0.1:{silent.getsockname()[1]}'
        nodes = self.cluster(NODES[:3], extra={'node-silent': silent_url})
        everyone = NODES[:3] + ['node-silent']
        logs = self.useFixture(fixtures.FakeLogger(level=logging.WARNING))
        theirs = self.indexes_where(lambda owners: owners[0] == 'node-silent'
                                    and 'node-a' not in owners, everyone)
        self.assertGreater(len(theirs), 1)
        self.joined(*self.in_thread(self.read_chunks, nodes['node-a'], 'node-a', theirs))
        stats = nodes['node-a'].peer_stats()
        self.assertEqual((1, len(theirs)), (stats['peer_failures'], stats['peer_chunks']))
        self.assertIn('peer node-silent skipped', logs.output)
        # The chunk's answer wait: 4 times the peer timeout.
        self.assertIn('silent for 1.2 s', logs.output)

    def test_corrupt_bytes_from_a_peer_are_detected_and_the_next_owner_asked(self):
        nodes = self.cluster()
        self.read_chunks(nodes['node-b'], 'node-b', range(self.manifest.chunk_count))
        # node-b's disk rots under its cache: every slot it holds is garbage now.
        cache_dir = os.path.join(self.tmp, 'node-b', 'chunk-cache')
        for leaf in os.listdir(cache_dir):
            if leaf.startswith('slots-'):
                with open(os.path.join(cache_dir, leaf), 'r+b') as f:
                    f.write(random.Random(leaf).randbytes(os.path.getsize(f.name)))
        theirs = self.indexes_where(lambda owners: owners[0] == 'node-b'
                                    and 'node-a' not in owners)
        self.read_chunks(nodes['node-a'], 'node-a', theirs)  # checks every byte
        stats = nodes['node-a'].peer_stats()
        self.assertEqual((1, 1), (stats['corrupt_from_peers'], stats['peer_failures']))
        self.assertEqual(len(theirs), stats['peer_chunks'])  # from their second owners
        # Nothing corrupt was kept: read again from node-a's cache, still right.
        self.read_chunks(nodes['node-a'], 'node-a', theirs)


class WiringTest(PeersTestCase):
    def test_without_a_peer_address_the_warehouse_alone(self):
        self.conf.set_override('peer_address', '', 'mirror')
        node = self.node('node-a')
        self.assertIsNone(node.peers)
        self.assertEqual('', node.peer_url())
        self.assertEqual({}, node.peer_stats())
        node.set_peers('node-a', {'node-b': 'http://127.0.0.1:1'})  # nothing to do
        self.assertBytesEqual(self.image, self.read_image(node, 'node-a'))
        self.assertEqual(self.distinct, {chunk for _, chunk in self.reads})
        self.assertEqual(node.cache.stats.fetched_bytes, node.warehouse_bytes())

    def test_close_stops_the_peer_server(self):
        node = manager_mod.MirrorManager(self.conf, warehouse_mod.Warehouse(self.conf),
                                         root=os.path.join(self.tmp, 'node-a'))
        host, port = node.peer_url().removeprefix('http://').split(':')
        socket.create_connection((host, int(port)), timeout=5).close()
        node.close()
        self.assertRaises(ConnectionRefusedError, socket.create_connection,
                          (host, int(port)), 5)

    def test_the_mirror_service_answers_the_peer_calls(self):
        service = service_mod.MirrorService(self.conf, warehouse_mod.Warehouse(self.conf))
        service.start()
        self.addCleanup(service.stop)
        remote = api.RemoteMirrors(self.conf)
        url = remote.peer_url()
        self.assertTrue(url.startswith('http://127.0.0.1:'), url)
        remote.set_peers('node-a', {'node-a': url, 'node-b': 'http://127.0.0.1:1'})
        stats = remote.peer_stats()
        self.assertEqual(('node-a', {'node-a': url, 'node-b': 'http://127.0.0.1:1'}),
                         (stats['host'], stats['peers']))
        self.assertEqual(0, stats['repository_chunks'])
        error = self.assertRaises(exception.MirrorError, remote.set_peers, '', {})
        self.assertIn('host name', str(error))
