"""The control plane of the peer exchange: each host's peer URL as it registered it,
checked, shown with the hosts, and the live set (chunk_peers) every compute manager
asks for after its heartbeats."""
import datetime
import os

from vmcloud import exception
from vmcloud import polling
from vmcloud import rpc
from vmcloud.db import api as db_api
from vmcloud.dispatcher import hosts
from vmcloud.dispatcher import rpcapi
from vmcloud.dispatcher import states
from tests import base
from tests.unit.dispatcher import helpers
from tests.unit.dispatcher import test_host_states

CAPACITY = test_host_states.CAPACITY


class ChunkPeersTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.configure_database()
        self.db = db_api.Database(self.conf)
        self.db.upgrade()
        self.addCleanup(self.db.dispose)
        self.registry = hosts.HostRegistry(self.conf, self.db, Keeper())
        self.monitor = hosts.HostMonitor(self.conf, self.db, Keeper(), lambda now: None)

    def configure_database(self) -> None:
        """SQLite under the test's state_path (the default connection)."""

    def register(self, host: str, peer_url: str = '', node_id: str | None = None) -> None:
        self.registry.register(host, node_id or f'id-{host}', f'inc-{host}', CAPACITY,
                               peer_url=peer_url)

    def peer_url_of(self, host: str) -> str:
        with self.db.session() as session:
            return db_api.host_get(session, host).peer_url

    def test_the_peer_url_a_host_registers_is_kept_and_shown(self):
        self.register('node1', 'http://10.0.0.1:9495')
        self.register('node2')
        self.assertEqual('http://10.0.0.1:9495', self.peer_url_of('node1'))
        self.assertEqual({'node1': 'http://10.0.0.1:9495', 'node2': ''},
                         {h['name']: h['peer_url'] for h in self.registry.list_hosts()})
        # A restart of node1 with peers turned off leaves the exchange.
        self.register('node1')
        self.assertEqual('', self.peer_url_of('node1'))

    def test_a_peer_url_other_nodes_could_not_use_is_refused_naming_it(self):
        for url, problem in (('https://10.0.0.1:9495', 'plain http'),
                             ('10.0.0.1:9495', 'plain http'),
                             ('http://:9495', 'names no host'),
                             ('http://10.0.0.1:9495/v1', 'more than http://HOST[:PORT]'),
                             ('http://10.0.0.1:9495?x=1', 'more than http://HOST[:PORT]'),
                             ('http://admin:secret@10.0.0.1:9495', 'credentials'),
                             ('http://10.0.0.1:70000', 'out of range'),
                             ('http://10.0.0.1:0', 'port 0'),
                             ('http://[::1:9495', 'IPv6'),
                             (f'http://{"a" * 250}.example:9495', 'longer than 255')):
            error = self.assertRaises(exception.InvalidRequest, self.register, 'node1', url)
            self.assertIn('compute host node1', str(error))
            self.assertIn(repr(url[:100]), str(error))
            self.assertIn(problem, str(error))
        # Refused before anything was written: no host registered.
        self.assertEqual([], self.registry.list_hosts())

    def test_urls_of_every_form_a_peer_server_has_are_taken(self):
        for url in ('http://10.0.0.1:9495', 'http://[fd00::1]:9495', 'http://node1.lan',
                    'http://node1.lan:80'):
            self.register('node1', url)
            self.assertEqual(url, self.peer_url_of('node1'))

    def test_the_peers_are_the_hosts_up_with_a_peer_url(self):
        for host in ('node1', 'node2', 'node3', 'node4'):
            self.register(host, f'http://{host}:9495')
        self.register('node5')  # no peer exchange there
        self.assertEqual({f'node{i}': f'http://node{i}:9495' for i in (1, 2, 3, 4)},
                         self.registry.chunk_peers())
        # node2 silent for service_down_time, node3 fenced: out until they come back.
        with self.db.session() as session:
            db_api.host_get(session, 'node2').last_heartbeat = datetime.datetime(2000, 1, 1)
        self.assertEqual(['node2'], self.monitor.mark_silent_hosts())
        self.registry.fence('node3')
        self.assertEqual({'node1': 'http://node1:9495', 'node4': 'http://node4:9495'},
                         self.registry.chunk_peers())
        # node2 reports again, node3's manager registers again: both are back.
        self.registry.report_heartbeat('node2', CAPACITY, 'inc-node2', [])
        self.register('node3', 'http://node3:9495')
        self.assertEqual({f'node{i}': f'http://node{i}:9495' for i in (1, 2, 3, 4)},
                         self.registry.chunk_peers())
        self.assertEqual([states.HOST_UP] * 5, [h['state'] for h in self.registry.list_hosts()])

    def test_no_host_no_peers(self):
        self.assertEqual({}, self.registry.chunk_peers())

    def test_a_heartbeat_carries_the_bytes_had_from_peers(self):
        self.register('node1', 'http://node1:9495')
        self.registry.report_heartbeat('node1', dict(CAPACITY, peer_bytes=4096), 'inc-node1',
                                       [])
        shown, = self.registry.list_hosts()
        self.assertEqual(4096, shown['peer_bytes'])


class ChunkPeersPostgresTest(ChunkPeersTest):
    def configure_database(self) -> None:
        helpers.use_postgres(self, 'vmcloud_chunk_peers')


class Keeper:
    """The deployer's part the registry needs, with no instance anywhere."""

    def hosts_silent(self, session, hosts):
        pass

    def reconcile(self, session, host, running):
        return []

    def destroy(self, host, names):
        pass

    def host_fenced(self, host):
        return {'rebuilt': [], 'failed': []}

    def expire_builds(self, now):
        return []


class ChunkPeersOverRpcTest(helpers.CloudTestCase):
    """chunk_peers from the dispatcher's client, as compute managers ask it."""

    def configure(self) -> None:
        self.conf.set_override('heartbeat_interval', 60)  # no heartbeat of its own meanwhile

    def test_every_node_of_the_all_in_one_is_a_peer_and_knows_the_others(self):
        peers = self.api.chunk_peers()
        self.assertEqual(['node1', 'node2'], sorted(peers))
        for compute in self.cloud.computes:
            self.assertEqual(compute.peer_url, peers[compute.host])
            self.assertTrue(compute.peer_url.startswith('http://127.0.0.1:'), compute.peer_url)
            # Every node's mirrors know the whole set (AllInOneStartTest: from the start).
            self.assertEqual(peers, compute.mirrors.peer_stats()['peers'])
        self.assertEqual(peers, {h['name']: h['peer_url'] for h in self.api.list_hosts()})


class AllInOneExchangeTest(helpers.CloudTestCase):
    """The all-in-one's nodes exchange chunks over loopback, with the peer set the
    dispatcher tells them; their heartbeats tell it the bytes they had from peers."""

    CHUNKS = 8

    def test_every_chunk_comes_from_the_warehouse_once_whichever_nodes_read_it(self):
        chunk_size = self.conf.storage.chunk_size
        path = os.path.join(self.tmp, 'varied.raw')
        with open(path, 'wb') as f:
            f.write(os.urandom(self.CHUNKS * chunk_size))
        self.cloud.warehouse.import_image(path, 'varied')
        for compute in self.cloud.computes:
            disk = compute.mirrors.create(f'reader-{compute.host}', 'varied')
            with open(path, 'rb') as f:
                self.assertBytesEqual(f.read(), compute.mirrors.get(disk.name).disk.read(
                    0, self.CHUNKS * chunk_size))
        stats = [compute.mirrors.peer_stats() for compute in self.cloud.computes]
        self.assertEqual(self.CHUNKS, sum(s['repository_chunks'] for s in stats))
        # Each node had from the other the chunks the other is primary for.
        self.assertEqual(self.CHUNKS, sum(s['peer_chunks'] for s in stats))
        for s in stats:
            self.assertLess(0, s['peer_bytes'], s)
        polling.wait(self.api.list_hosts, lambda hosts: all(
            h['peer_bytes'] == s['peer_bytes'] for h, s in zip(hosts, stats)),
            helpers.TIMEOUT, 'the peer bytes in the heartbeats', interval=0.05)


class AllInOneWithoutPeersTest(helpers.CloudTestCase):
    HOSTS = 1

    def test_one_node_runs_no_exchange(self):
        self.assertEqual({}, self.api.chunk_peers())
        self.assertEqual(('', {}), (self.cloud.computes[0].peer_url,
                                    self.cloud.computes[0].mirrors.peer_stats()))


class ClientTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.addCleanup(rpc.cleanup)
        rpc.register_opts(self.conf)
        self.conf.set_override('transport_url', 'fake://')
        self.api = rpcapi.DispatcherAPI(self.conf)
        self.calls = []
        self.api._client.call = lambda method, **kwargs: self.calls.append((method, kwargs))

    def test_a_registration_without_a_peer_url_is_the_call_of_before(self):
        # A dispatcher of before takes it: the node is simply in no peer set.
        self.api.register_host('node1', 'id', 'inc', CAPACITY)
        self.api.register_host('node1', 'id', 'inc', CAPACITY, peer_url='http://a:1')
        self.assertEqual([False, 'http://a:1'], [kwargs.get('peer_url', False)
                                                 for _, kwargs in self.calls])

    def test_chunk_peers_waits_as_long_as_it_is_told(self):
        self.api.chunk_peers(timeout=5)
        self.assertEqual([('chunk_peers', {'timeout': 5})], self.calls)
