"""The dispatcher and its scheduler plugins place instances on 100 simulated MIPS nodes over RPC."""
import collections

from vmcloud import allinone
from vmcloud import exception
from tests import base
from tests import guest

NODES = 100
TIMEOUT = 120


class SimulatedNodesTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.conf.set_override('heartbeat_interval', 2)
        self.conf.set_override('service_down_time', 60)
        # Simulated guests have no real NIC: their networks are modelled, not built.
        self.conf.set_override('agent', 'fake', 'network')
        # 250 instances and a DHCP port on each of the 100 nodes: more than a /24 holds.
        self.conf.set_override('prefix_length', 22, 'network')
        self.cloud = allinone.AllInOne(self.conf, hosts=NODES, driver='sim')
        self.cloud.warehouse.import_image(guest.path('disk.img'), 'guest')
        self.cloud.start(timeout=TIMEOUT)
        self.addCleanup(self.cloud.stop)
        self.api = self.cloud.api

    def deploy(self, count: int, mips: int, **kwargs) -> dict:
        deployment = self.api.deploy('guest', count, memory_mib=512,
                                     boot={'cmdline': f'mips={mips}'}, **kwargs)
        return self.api.wait_deployment(deployment['id'], TIMEOUT)

    def test_spread_over_100_nodes_then_full(self):
        deployment = self.deploy(250, 500)
        self.assertEqual('active', deployment['state'])
        per_host = collections.Counter(i['host'] for i in deployment['instances'])
        self.assertEqual(NODES, len(per_host))  # the RAM weigher spreads
        self.assertEqual({2, 3}, set(per_host.values()))
        for compute in self.cloud.computes:
            mips, ram = compute.driver.used()
            self.assertEqual(per_host[compute.host] * 500, mips)
            self.assertEqual(per_host[compute.host] * 512, ram)
        # 4 GiB per node holds 8 instances of 512 MiB: 550 more do not fit.
        error = self.assertRaises(exception.NoValidHost, self.deploy, 551, 500)
        self.assertIn("'ram'", str(error))

    def test_an_instance_no_node_can_run_fails_with_its_reason(self):
        # 3000 MIPS per vCPU is more than one PE of any node: every build is refused.
        deployment = self.deploy(1, 3000)
        instance, = deployment['instances']
        self.assertEqual('error', instance['state'])
        self.assertIn('3000', instance['reason'])
        self.assertIn('failed 3 times', instance['reason'])
        self.assertEqual('error', deployment['state'])
