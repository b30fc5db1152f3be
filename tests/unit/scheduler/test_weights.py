"""Raw weights, normalisation and multipliers."""
from vmcloud import plugins
from vmcloud.scheduler import handler
from vmcloud.scheduler import weights
from vmcloud.scheduler.host_state import InstanceRequest
from tests import base
from tests.unit import scheduler as fakes

REQUEST = InstanceRequest(vcpus=1, memory_mib=1024)


class NormalizeTest(base.TestCase):
    def test_min_max(self):
        self.assertEqual([0.0, 0.25, 1.0], weights.normalize([10, 20, 50]))
        self.assertEqual([1.0, 0.0], weights.normalize([-1.0, -3.0]))

    def test_all_equal_is_zero(self):
        self.assertEqual([0.0, 0.0, 0.0], weights.normalize([7, 7, 7]))
        self.assertEqual([0.0], weights.normalize([42]))

    def test_empty(self):
        self.assertEqual([], weights.normalize([]))


class WeigherTest(base.TestCase):
    def test_ram_weigher_is_free_ram(self):
        w = plugins.load(weights.NAMESPACE, 'ram', self.conf)
        self.assertEqual(1000, w.weigh(fakes.host(memory_mib_total=3000,
                                                  memory_mib_used=2000), REQUEST))
        self.assertEqual(1.0, w.multiplier(self.conf))
        self.conf.set_override('ram_weight_multiplier', -2.0, 'scheduler')
        self.assertEqual(-2.0, w.multiplier(self.conf))

    def test_cpu_weigher_is_free_vcpus(self):
        w = plugins.load(weights.NAMESPACE, 'cpu', self.conf)
        self.assertEqual(5, w.weigh(fakes.host(vcpus_total=8, vcpus_used=3), REQUEST))
        self.assertEqual(1.0, w.multiplier(self.conf))
        self.conf.set_override('cpu_weight_multiplier', 0.5, 'scheduler')
        self.assertEqual(0.5, w.multiplier(self.conf))


class WeighHostsTest(base.TestCase):
    def test_normalised_weights_times_multipliers(self):
        self.conf.set_override('cpu_weight_multiplier', 2.0, 'scheduler')
        hosts = [fakes.host('a', memory_mib_used=0, vcpus_used=8),
                 fakes.host('b', memory_mib_used=8192, vcpus_used=4),
                 fakes.host('c', memory_mib_used=16384, vcpus_used=0)]
        weighed = handler.FilterScheduler(self.conf).weigh_hosts(hosts, REQUEST)
        # ram: a=1, b=0.5, c=0; cpu (x2): a=0, b=1, c=2.
        self.assertEqual([('c', 2.0), ('b', 1.5), ('a', 1.0)],
                         [(h.name, w) for h, w in weighed])

    def test_equal_hosts_weigh_zero_and_sort_by_name(self):
        hosts = [fakes.host('b'), fakes.host('c'), fakes.host('a')]
        weighed = handler.FilterScheduler(self.conf).weigh_hosts(hosts, REQUEST)
        self.assertEqual([('a', 0.0), ('b', 0.0), ('c', 0.0)],
                         [(h.name, w) for h, w in weighed])

    def test_negative_multiplier_prefers_fuller_hosts(self):
        self.conf.set_override('ram_weight_multiplier', -1.0, 'scheduler')
        self.conf.set_override('weighers', ['ram'], 'scheduler')
        hosts = [fakes.host('empty'), fakes.host('full', memory_mib_used=8192)]
        weighed = handler.FilterScheduler(self.conf).weigh_hosts(hosts, REQUEST)
        self.assertEqual(['full', 'empty'], [h.name for h, _ in weighed])
