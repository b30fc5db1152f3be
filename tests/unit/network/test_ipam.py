"""Which subnet, VNI, address and MAC a new network or port gets."""
import ipaddress

import testtools

from vmcloud import exception
from vmcloud.network import ipam


class SubnetTest(testtools.TestCase):
    def test_subnets_are_carved_in_order_and_reused_once_free(self):
        pool = '10.200.0.0/16'
        self.assertEqual('10.200.0.0/24', ipam.next_subnet(pool, 24, set()))
        self.assertEqual('10.200.2.0/24',
                         ipam.next_subnet(pool, 24, {'10.200.0.0/24', '10.200.1.0/24'}))
        # The first one released: the lowest free again.
        self.assertEqual('10.200.0.0/24', ipam.next_subnet(pool, 24, {'10.200.1.0/24'}))
        self.assertEqual('10.200.0.8/29', ipam.next_subnet(pool, 29, {'10.200.0.0/29'}))

    def test_an_exhausted_pool_is_named(self):
        pool = '10.9.0.0/23'
        error = self.assertRaises(exception.AddressPoolExhausted, ipam.next_subnet, pool, 24,
                                  {'10.9.0.0/24', '10.9.1.0/24'})
        self.assertIn('10.9.0.0/23', str(error))
        self.assertIsInstance(error, exception.NetworkError)

    def test_a_pool_or_prefix_that_cannot_work_is_a_config_error(self):
        for pool, prefix in (('10.0.0.0/7', 24), ('10.200.0.0/16', 12),
                             ('10.200.0.0/16', 30), ('nonsense', 24), ('10.200.0.1/16', 24)):
            self.assertRaises(exception.ConfigError, ipam.next_subnet, pool, prefix, set())


class VniTest(testtools.TestCase):
    def test_lowest_free_and_exhaustion(self):
        self.assertEqual(1000, ipam.next_vni(1000, 1002, set()))
        self.assertEqual(1001, ipam.next_vni(1000, 1002, {1000, 1002}))
        error = self.assertRaises(exception.AddressPoolExhausted, ipam.next_vni, 1000, 1002,
                                  {1000, 1001, 1002})
        self.assertIn('1000..1002', str(error))


class AddressTest(testtools.TestCase):
    def test_instances_from_the_second_address_up_lowest_free_first(self):
        cidr = '10.200.3.0/24'
        self.assertEqual('10.200.3.2', ipam.next_address(cidr, set()))
        self.assertEqual('10.200.3.4', ipam.next_address(
            cidr, {'10.200.3.2', '10.200.3.3', '10.200.3.254'}))
        # .2 released: given again before anything higher.
        self.assertEqual('10.200.3.2', ipam.next_address(cidr, {'10.200.3.3', '10.200.3.4'}))

    def test_dhcp_servers_from_the_top_down(self):
        cidr = '10.200.3.0/24'
        self.assertEqual('10.200.3.254', ipam.next_dhcp_address(cidr, set()))
        self.assertEqual('10.200.3.252', ipam.next_dhcp_address(
            cidr, {'10.200.3.254', '10.200.3.253', '10.200.3.2'}))

    def test_the_gateway_network_and_broadcast_addresses_are_never_given(self):
        cidr = '10.200.3.0/29'  # .0 network, .1 gateway, .2-.6, .7 broadcast
        used = set()
        for _ in range(3):
            used.add(ipam.next_address(cidr, used))
        for _ in range(2):
            used.add(ipam.next_dhcp_address(cidr, used))
        self.assertEqual({f'10.200.3.{n}' for n in range(2, 7)}, used)
        for pick in (ipam.next_address, ipam.next_dhcp_address):
            error = self.assertRaises(exception.AddressPoolExhausted, pick, cidr, used)
            self.assertIn('10.200.3.0/29', str(error))


class MacTest(testtools.TestCase):
    def test_equal_ports_equal_macs_of_qemus_prefix(self):
        mac = ipam.mac_for('10.200.3.10', 1000)
        self.assertEqual('52:54:00:c8:03:0a', mac)
        self.assertEqual(mac, ipam.mac_for('10.200.3.10', 1000))

    def test_no_two_addresses_of_a_pool_share_a_mac(self):
        # Every address of the largest pool next_subnet accepts (a /8 has 2**24).
        pool = ipaddress.IPv4Network('10.0.0.0/8')
        base = int(pool.network_address)
        macs = {ipam.mac_for(str(ipaddress.IPv4Address(base + n)), 1000)
                for n in range(0, pool.num_addresses, 4093)}  # a prime stride: all bytes vary
        self.assertEqual(len(range(0, pool.num_addresses, 4093)), len(macs))
        # And a whole /16, exhaustively.
        macs = {ipam.mac_for(f'10.200.{a}.{b}', 1000 + a) for a in range(256)
                for b in range(256)}
        self.assertEqual(65536, len(macs))
        for mac in macs:
            self.assertTrue(mac.startswith('52:54:00:'), mac)

    def test_a_vni_out_of_range_is_refused(self):
        for vni in (0, 1 << 24):
            self.assertRaises(exception.ConfigError, ipam.mac_for, '10.200.0.2', vni)


class GatewayAddressTest(testtools.TestCase):
    def test_the_gateway_has_the_first_host_address_which_no_port_gets(self):
        self.assertEqual('10.200.3.1', ipam.gateway_address('10.200.3.0/24'))
        self.assertEqual('10.200.0.9', ipam.gateway_address('10.200.0.8/29'))
        cidr = '10.200.0.8/29'
        used: set[str] = set()
        while True:
            try:
                used.add(ipam.next_address(cidr, used))
            except exception.AddressPoolExhausted:
                break
        self.assertNotIn(ipam.gateway_address(cidr), used)
        self.assertNotIn(ipam.gateway_address(cidr), {ipam.next_dhcp_address(cidr, set())})

    def test_a_subnet_without_room_or_no_subnet_is_a_config_error(self):
        for cidr in ('10.200.0.4/31', '10.200.0.4/32', 'nonsense', '10.200.0.1/24'):
            error = self.assertRaises(exception.ConfigError, ipam.gateway_address, cidr)
            self.assertIn(cidr, str(error))
