"""The all-in-one cloud's compute managers: a node restarts without losing its guests, and
stale work for it is dropped (fake driver, fake:// transport, SQLite)."""
import threading

from vmcloud import allinone
from vmcloud import exception
from vmcloud import polling
from vmcloud.compute import manager
from vmcloud.mirror import peer_http
from tests import base
from tests.unit.dispatcher import helpers


class AllInOneComputeTest(helpers.CloudTestCase):
    def restart(self, index: int) -> manager.ComputeManager:
        """Stop node ``index``'s manager, guests left running, and start a new one on
        the same driver, mirrors and network agent, as a node's mirror service and its
        machine's networks outlive its managers."""
        old = self.cloud.computes[index]
        old.stop()
        new = manager.ComputeManager(self.conf, old.mirrors, old.host, driver=old.driver,
                                     warehouse=self.cloud.warehouse,
                                     node_root=f'{self.state_path}/nodes/{old.host}',
                                     shared_driver=True,
                                     network_agent=old.network_agent)
        self.cloud.computes[index] = new
        return new.start()

    def test_a_restarted_node_keeps_its_guests_and_the_cloud_sees_them_active(self):
        deployment = self.deploy_and_wait(count=4)
        node1 = self.cloud.computes[0]
        guests = node1.driver.list_instances()
        self.assertEqual(2, len(guests))
        restarted = self.restart(0)
        self.assertEqual(node1.node_id, restarted.node_id)
        self.assertNotEqual(node1.incarnation, restarted.incarnation)
        self.assertEqual(guests, restarted.driver.list_instances())
        self.assertEqual(sorted(guests), sorted(restarted.mirrors.names()))
        # Heartbeats of the new incarnation go on reconciling: the guests stay active.
        beats = restarted.dispatcher.report_heartbeat

        def counted(*args):
            counted.calls += 1
            return beats(*args)
        counted.calls = 0
        restarted.dispatcher.report_heartbeat = counted
        polling.wait(lambda: counted.calls, lambda calls: calls >= 2, helpers.TIMEOUT,
                     'two heartbeats of the new manager', interval=0.05)
        shown = self.api.show_deployment(deployment['id'])
        self.assertEqual({'active'}, {i['state'] for i in shown['instances']})
        # And it serves: the console of one of its guests comes through the dispatcher.
        console = self.api.console(guests[0], max_bytes=64)
        self.assertEqual(('node1', guests[0]), (console['host'], console['instance']))
        self.assertIn('VMCLOUD-PHASE', console['console'])
        self.assertLessEqual(len(console['console'].encode()), 64)

    def test_a_snapshot_freezes_every_guest_before_any_thaws(self):
        deployment = self.deploy_and_wait(count=4)
        events = []  # list.append is atomic: the hosts' threads record in order
        for compute in self.cloud.computes:
            driver = compute.driver
            for what in ('freeze_io', 'thaw_io'):
                def record(name, what=what, done=getattr(driver, what)):
                    events.append(what)
                    return done(name)
                setattr(driver, what, record)
        snapshot = self.api.snapshot(deployment['id'])
        snapshot = self.api.wait_snapshot(snapshot['id'], helpers.TIMEOUT)
        self.assertEqual('available', snapshot['state'], snapshot)
        self.assertEqual(['freeze_io'] * 4 + ['thaw_io'] * 4, events)
        for compute in self.cloud.computes:
            for name in compute.driver.list_instances():
                self.assertFalse(compute.driver.instances[name].io_frozen)
        # Each instance's snapshot is a version of its own image, not of the base.
        names = {i['name'] for i in self.api.show_deployment(deployment['id'])['instances']}
        self.assertEqual(names, {item['version'].split(':')[0] for item in snapshot['items']})

    def test_guests_get_their_addresses_and_pass_an_http_check_on_the_fake_network(self):
        # A check that cannot pass fails the builds well within the wait.
        deployment = self.deploy_and_wait(count=3, health={'kind': 'http', 'port': 80,
                                                           'timeout': 5})
        self.assertEqual('active', deployment['state'], deployment)
        agent = self.cloud.network_agent
        network = deployment['network']
        guests = {i['name']: i for i in deployment['instances']}
        self.assertEqual({network['id']: set(guests)},
                         {n: set(r['ports']) for n, r in agent.networks().items()})
        prefix = network['cidr'].split('/')[1]
        for compute in self.cloud.computes:
            for name in compute.driver.list_instances():
                self.assertIn(f'VMCLOUD-NET eth0 {guests[name]["address"]}/{prefix}',
                              compute.driver.console_log(name))
        # Each guest was probed from the network's side, on its own address.
        probed = {call[2] for call in agent.calls if call[0] == 'http_get'}
        self.assertEqual({i['address'] for i in guests.values()}, probed)
        self.api.delete_deployment(deployment['id'])
        polling.wait(agent.networks, lambda networks: not networks, helpers.TIMEOUT,
                     'the network torn down', interval=0.05)
        self.assertEqual([], agent.leftovers())
        for compute in self.cloud.computes:
            self.assertEqual({}, compute.driver.leases)
            self.assertFalse(compute.driver.bridge_exists(f'vmcb{network["vni"]}'))


class AllInOneStartTest(base.TestCase):
    def test_every_node_learns_the_whole_peer_set_as_the_cloud_starts(self):
        # Not at its next heartbeat: the first nodes' first ones came before the last
        # node registered.
        self.addCleanup(allinone.rpc.cleanup)
        self.conf.set_override('agent', 'fake', 'network')
        self.conf.set_override('heartbeat_interval', 600)
        cloud = allinone.AllInOne(self.conf, hosts=3, driver='fake')
        started = []
        for compute in cloud.computes:
            def refresh(compute=compute, refresh=compute.refresh_peers):
                peers = refresh()
                if threading.current_thread() is threading.main_thread():
                    started.append((compute.host, sorted(peers)))
                return peers
            compute.refresh_peers = refresh
        cloud.start()
        self.addCleanup(cloud.stop)
        self.assertEqual([(f'node{i}', ['node1', 'node2', 'node3']) for i in (1, 2, 3)],
                         started)
        for compute in cloud.computes:
            self.assertEqual(['node1', 'node2', 'node3'],
                             sorted(compute.mirrors.peer_stats()['peers']))

    def test_a_start_that_fails_stops_what_it_started(self):
        self.addCleanup(allinone.rpc.cleanup)
        self.conf.set_override('agent', 'fake', 'network')
        cloud = allinone.AllInOne(self.conf, hosts=2, driver='fake')

        def refused(*args, **kwargs):
            raise exception.HostNameInUse('node2', 'abc123')
        cloud.computes[1].dispatcher.register_host = refused
        self.assertRaises(exception.HostNameInUse, cloud.start)
        # Its nodes' state was given up: a new cloud on it starts, and node1 with it.
        again = allinone.AllInOne(self.conf, hosts=2, driver='fake').start()
        again.stop()


class FetchedTestCase(helpers.CloudTestCase):
    def read_everywhere(self) -> int:
        """Every chunk of the guest image read through every node's cache, one node after
        the other. :returns: the bytes of its distinct chunks."""
        warehouse = self.cloud.warehouse
        chunk_ids = warehouse.lookup('guest').data_chunk_ids()
        for compute in self.cloud.computes:
            for chunk_id in sorted(chunk_ids):
                compute.mirrors.cache.read_chunk(chunk_id)
        return sum(len(warehouse.read_chunk(chunk_id)) for chunk_id in chunk_ids)


class AllInOneFetchedTest(FetchedTestCase):
    """What the nodes fetched, as the demo prints it: from the repository and from peers
    apart."""

    def test_a_chunk_the_nodes_share_is_paid_once_by_the_repository(self):
        self.assertTrue(self.cloud.peers)
        before = self.cloud.fetched()
        image_bytes = self.read_everywhere()
        after = self.cloud.fetched()
        self.assertGreater(image_bytes, 0)
        # Each chunk read from the warehouse by its owner once, and had by the other
        # node from it: the caches' own total (twice the image) is neither.
        self.assertEqual((image_bytes, image_bytes),
                         (after.repository_bytes - before.repository_bytes,
                          after.peer_bytes - before.peer_bytes))
        self.assertEqual(2 * image_bytes, sum(c.mirrors.cache.stats.fetched_bytes
                                              for c in self.cloud.computes))

    def test_the_nodes_peer_servers_answer_only_the_cloud_s_own_token(self):
        token = self.conf.mirror.peer_token
        self.assertGreaterEqual(len(token), 32)
        chunk_id = sorted(self.cloud.warehouse.lookup('guest').data_chunk_ids())[0]
        url = self.cloud.computes[0].peer_url
        for stranger in ('', 'not-' + token):
            client = peer_http.PeerClient(stranger, 10.0)
            self.addCleanup(client.close)
            error = self.assertRaises(exception.PeerError, client.get, url, chunk_id)
            self.assertIn('HTTP 401', error.reason)
        client = peer_http.PeerClient(token, 10.0)
        self.addCleanup(client.close)
        self.assertEqual(self.cloud.warehouse.read_chunk(chunk_id), client.get(url, chunk_id))


class AllInOneAloneFetchedTest(FetchedTestCase):
    HOSTS = 1

    def test_a_node_alone_has_nothing_from_peers(self):
        self.assertFalse(self.cloud.peers)
        image_bytes = self.read_everywhere()
        self.assertEqual(allinone.Fetched(repository_bytes=image_bytes, peer_bytes=0),
                         self.cloud.fetched())
