"""The fake network agent: the Linux agent's records and interface, its networks modelled
on fake drivers (bridges, DHCP leases) and its probes answered by the fake guests of the
network only."""
from vmcloud import exception
from vmcloud import network
from vmcloud.drivers import base as driver_base
from vmcloud.drivers import fake as fake_driver
from vmcloud.drivers import sim
from vmcloud.network import agent as agent_mod
from vmcloud.network import fake
from tests import base
from tests.unit.dispatcher import helpers

NET1 = {'id': 'net1', 'vni': 1000, 'cidr': '10.200.0.0/24'}
NET2 = {'id': 'net2', 'vni': 1001, 'cidr': '10.200.1.0/24'}
DHCP1 = {'mac': '52:54:00:00:00:fe', 'address': '10.200.0.254'}
DHCP2 = {'mac': '52:54:00:00:01:fe', 'address': '10.200.1.254'}
TIMEOUT = 1.0


def port(network: dict, host: int) -> dict:
    third = network['cidr'].split('.')[2]
    return {'mac': f'52:54:00:00:0{third}:0{host}',
            'address': network['cidr'].rsplit('.', 1)[0] + f'.{host}'}


class FakeNetworkAgentTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.driver = fake_driver.FakeDriver(self.conf)
        self.agent = fake.FakeNetworkAgent(self.conf, [self.driver])
        self.disk = helpers.write_image(self.tmp)

    def boot(self, name: str, network: dict, host: int, dhcp: dict = DHCP1) -> str:
        """Plug ``name`` into ``network`` and spawn it there, as the compute manager does."""
        bridge = self.agent.plug(network, dhcp, [], name, port(network, host))
        self.driver.spawn(driver_base.InstanceSpec(
            name=name, disk=self.disk, cmdline=f'vmcloud.id={name}',
            nics=(driver_base.Nic(mac=port(network, host)['mac'], bridge=bridge),)))
        return bridge

    def test_plug_models_the_bridge_and_the_lease_unplug_takes_them_away(self):
        bridge = self.boot('vm1', NET1, 2)
        self.assertEqual('vmcb1000', bridge)
        self.assertTrue(self.driver.bridge_exists('vmcb1000'))
        self.assertEqual({'52:54:00:00:00:02': '10.200.0.2/24'}, self.driver.leases)
        # The fake guest took its address from the lease, as the test guest's DHCP does.
        self.assertIn('VMCLOUD-NET eth0 10.200.0.2/24', self.driver.console_log('vm1'))
        record = self.agent.networks()['net1']
        self.assertEqual((NET1, DHCP1, {'vm1': port(NET1, 2)}),
                         (record['network'], record['dhcp_port'], record['ports']))
        self.assertIn('netns ' + self.agent.namespace('net1'), self.agent.leftovers())
        self.agent.plug(NET1, DHCP1, [], 'vm2', port(NET1, 3))
        self.agent.unplug('net1', 'vm1')
        self.assertTrue(self.driver.bridge_exists('vmcb1000'))  # vm2 still has it
        self.assertEqual({'52:54:00:00:00:03': '10.200.0.3/24'}, self.driver.leases)
        self.agent.unplug('net1', 'vm2')
        self.assertFalse(self.driver.bridge_exists('vmcb1000'))
        self.assertEqual(({}, {}, []),
                         (self.driver.leases, self.agent.networks(), self.agent.leftovers()))
        self.agent.unplug('net1', 'vm2')  # unknown: no error
        self.assertRaises(exception.NetworkNotFound, self.agent.namespace, 'net1')
        self.assertEqual(['plug', 'plug', 'unplug', 'unplug', 'unplug'],
                         [call[0] for call in self.agent.calls if call[0] != 'namespace'])

    def test_probes_reach_running_guests_of_the_network_only(self):
        self.boot('vm1', NET1, 2)
        self.boot('other', NET2, 2, DHCP2)
        self.assertIsNone(self.agent.tcp_connect('net1', '10.200.0.2', 80, TIMEOUT))
        self.assertEqual((200, b'vm1 1\n'),
                         self.agent.http_get('net1', '10.200.0.2', 80, '/', TIMEOUT))
        self.assertEqual((200, b'vm1 2\n'),
                         self.agent.http_get('net1', '10.200.0.2', 80, '/x', TIMEOUT))
        for address, port_number, why in (
                ('10.200.0.2', 81, 'connection refused'),   # a port nothing serves
                ('10.200.0.9', 80, 'connection refused'),   # no such guest
                ('10.200.1.2', 80, 'network is unreachable')):  # the other network's guest
            error = self.assertRaises(exception.NetworkError, self.agent.tcp_connect, 'net1',
                                      address, port_number, TIMEOUT)
            self.assertIn(f'TCP connection to {address}:{port_number} from namespace '
                          f'{self.agent.namespace("net1")}: {why}', str(error))
        self.assertRaises(exception.NetworkNotFound, self.agent.http_get, 'nosuch',
                          '10.200.0.2', 80, '/', TIMEOUT)
        # A guest that stopped answers nothing, and nor does one unplugged and gone.
        self.driver.stop('vm1')
        self.assertRaises(exception.NetworkError, self.agent.tcp_connect, 'net1',
                          '10.200.0.2', 80, TIMEOUT)
        self.driver.destroy('other')
        self.agent.unplug('net2', 'other')
        self.assertRaises(exception.NetworkNotFound, self.agent.tcp_connect, 'net2',
                          '10.200.1.2', 80, TIMEOUT)

    def test_a_guest_on_another_bridge_is_not_reached_even_with_an_address_of_the_subnet(self):
        self.boot('vm1', NET1, 2)
        self.driver.add_bridge('elsewhere')
        self.driver.spawn(driver_base.InstanceSpec(
            name='stray', disk=self.disk, cmdline='vmcloud.ip=10.200.0.7/24',
            nics=(driver_base.Nic(mac='52:54:00:00:00:07', bridge='elsewhere'),)))
        self.assertRaises(exception.NetworkError, self.agent.tcp_connect, 'net1',
                          '10.200.0.7', 80, TIMEOUT)

    def test_reconcile_unplugs_what_is_not_wanted_and_set_peers_replaces(self):
        self.agent.plug(NET1, DHCP1, ['10.77.0.2'], 'vm1', port(NET1, 2))
        self.agent.plug(NET1, DHCP1, ['10.77.0.2'], 'vm2', port(NET1, 3))
        self.agent.plug(NET2, DHCP2, [], 'vm3', port(NET2, 2))
        self.agent.set_peers('net1', ['10.77.0.4', '', '10.77.0.3'])
        self.agent.set_peers('nosuch', ['10.77.0.9'])  # no error
        self.assertEqual(['10.77.0.3', '10.77.0.4'], self.agent.networks()['net1']['peers'])
        self.agent.reconcile({'net1': {'vm2'}})
        self.assertEqual({'net1': {'vm2'}},
                         {n: set(r['ports']) for n, r in self.agent.networks().items()})
        self.assertFalse(self.driver.bridge_exists('vmcb1001'))

    def test_a_driver_attached_later_gets_the_networks_and_so_does_the_sim(self):
        self.agent.plug(NET1, DHCP1, [], 'vm1', port(NET1, 2))
        simulated = sim.SimDriver(self.conf)
        self.agent.attach(simulated)
        self.assertIn('vmcb1000', simulated.bridges)
        self.assertEqual('10.200.0.2/24', simulated.leases['52:54:00:00:00:02'])
        simulated.spawn(driver_base.InstanceSpec(
            name='vm1', disk=self.disk,
            nics=(driver_base.Nic(mac='52:54:00:00:00:02', bridge='vmcb1000'),)))
        self.assertEqual((200, b'vm1 1\n'),
                         self.agent.http_get('net1', '10.200.0.2', 80, '/', TIMEOUT))


class LoadAgentTest(base.TestCase):
    def test_the_option_chooses_the_agent(self):
        driver = fake_driver.FakeDriver(self.conf)
        self.assertIsInstance(network.load_agent(self.conf, [driver]), agent_mod.NetworkAgent)
        self.conf.set_override('agent', 'fake', 'network')
        loaded = network.load_agent(self.conf, [driver])
        self.assertIsInstance(loaded, fake.FakeNetworkAgent)
        self.assertEqual([driver], loaded.drivers)

    def test_both_agents_have_one_interface(self):
        public = {name for name in dir(agent_mod.NetworkAgent) if not name.startswith('_')}
        self.assertLessEqual(public, set(dir(fake.FakeNetworkAgent)))
