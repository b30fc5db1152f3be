"""The gateway's weights: free CPU capacity shared by a host's instances, damped by
their connections."""
import testtools

from vmcloud.gateway import load


def host(cpus: int = 2, busy: float = 0.0, up: bool = True) -> dict:
    return {'cpus': cpus, 'cpu_busy': busy, 'up': up, 'vcpus': cpus, 'vcpus_used': 0,
            'memory_mib': 4096, 'memory_mib_used': 0}


def instances(**per_host: int) -> list[dict]:
    """host name -> how many instances there: [{'id': 'h-0', 'host': 'h'}, ...]."""
    return [{'id': f'{name}-{n}', 'host': name} for name, count in per_host.items()
            for n in range(count)]


class WeightsTest(testtools.TestCase):
    def test_the_worked_example_of_the_docs(self):
        # doc/gateway.md: 2 hosts of 2 CPUs, a 95 % busy, b idle, 2 instances each.
        weights = load.weights({'a': host(busy=0.95), 'b': host()},
                               instances(a=2, b=2), {})
        self.assertEqual({'a-0': 13, 'a-1': 13, 'b-0': 256, 'b-1': 256}, weights)
        shares = load.expected_shares(weights)
        self.assertAlmostEqual(256 / 538, shares['b-0'])
        self.assertAlmostEqual(13 / 538, shares['a-0'])
        self.assertAlmostEqual(1.0, sum(shares.values()))

    def test_idle_equal_hosts_share_equally(self):
        weights = load.weights({'a': host(), 'b': host()}, instances(a=1, b=1), {})
        self.assertEqual({'a-0': 256, 'b-0': 256}, weights)

    def test_a_host_of_more_cpus_takes_more(self):
        weights = load.weights({'a': host(cpus=4), 'b': host(cpus=1)}, instances(a=1, b=1), {})
        self.assertEqual({'a-0': 256, 'b-0': 64}, weights)

    def test_instances_of_one_host_share_its_capacity(self):
        weights = load.weights({'a': host(), 'b': host()}, instances(a=3, b=1), {})
        self.assertEqual(256, weights['b-0'])
        self.assertEqual({85}, {weights[f'a-{n}'] for n in range(3)})

    def test_busier_means_lower_weight(self):
        previous = None
        for busy in (0.0, 0.2, 0.5, 0.8, 0.9):
            weight = load.weights({'a': host(busy=busy), 'b': host()},
                                  instances(a=1, b=1), {})['a-0']
            if previous is not None:
                self.assertLess(weight, previous, f'cpu_busy {busy}')
            previous = weight

    def test_more_connections_mean_lower_weight(self):
        previous = None
        for active in (0, 10, 100, 1000):
            weight = load.weights({'a': host(), 'b': host()}, instances(a=1, b=1),
                                  {'a-0': active})['a-0']
            if previous is not None:
                self.assertLess(weight, previous, f'{active} connections')
            previous = weight
        # CONNECTION_SCALE connections halve the share.
        self.assertEqual(128, load.weights({'a': host(), 'b': host()}, instances(a=1, b=1),
                                           {'a-0': load.CONNECTION_SCALE})['a-0'])

    def test_a_host_down_counts_the_least_headroom(self):
        weights = load.weights({'a': host(up=False), 'b': host()}, instances(a=1, b=1), {})
        # 2 CPUs x MIN_HEADROOM against 2 free CPUs: round(256 x 0.05).
        self.assertEqual({'a-0': 13, 'b-0': 256}, weights)
        # Down whatever its last heartbeat said.
        self.assertEqual(weights, load.weights({'a': host(busy=0.0, up=False), 'b': host()},
                                               instances(a=1, b=1), {}))

    def test_an_unknown_host_counts_as_down(self):
        weights = load.weights({'b': host(cpus=1)}, instances(a=1, b=1), {})
        self.assertEqual({'a-0': 13, 'b-0': 256}, weights)

    def test_a_fully_busy_host_keeps_a_weight_of_at_least_one(self):
        weights = load.weights({'a': host(cpus=1, busy=1.0), 'b': host(cpus=64)},
                               instances(a=1, b=1), {'a-0': 10000})
        self.assertEqual(1, weights['a-0'])
        self.assertEqual(256, weights['b-0'])

    def test_busy_beyond_the_range_is_clamped(self):
        self.assertEqual(load.weights({'a': host(busy=1.0)}, instances(a=1), {}),
                         load.weights({'a': host(busy=7.0)}, instances(a=1), {}))
        self.assertEqual(load.headroom(host(busy=0.0)), load.headroom(host(busy=-1.0)))

    def test_ties_get_equal_weights_whatever_the_order(self):
        listed = instances(a=2, b=2)
        hosts = {'a': host(busy=0.5), 'b': host(busy=0.5)}
        weights = load.weights(hosts, listed, {})
        self.assertEqual({256}, set(weights.values()))
        self.assertEqual(weights, load.weights(hosts, list(reversed(listed)), {}))

    def test_all_hosts_equally_loaded_still_give_the_full_weight(self):
        # Weights are relative within a listener: all busy alike, all at the top.
        weights = load.weights({'a': host(busy=0.99), 'b': host(busy=0.99)},
                               instances(a=1, b=1), {})
        self.assertEqual({'a-0': 256, 'b-0': 256}, weights)

    def test_no_instance_no_weight(self):
        self.assertEqual({}, load.weights({'a': host()}, [], {}))
        self.assertEqual({}, load.expected_shares({}))
