"""The filter scheduler: order of filters, spreading and stacking, partial placement."""
import copy
import logging

import fixtures

from vmcloud import exception
from vmcloud.scheduler import handler
from vmcloud.scheduler.host_state import InstanceRequest
from tests import base
from tests.unit import scheduler as fakes

SMALL = InstanceRequest(vcpus=1, memory_mib=1024)


class FilterSchedulerTestCase(base.TestCase):
    def setUp(self):
        super().setUp()
        self.log = self.useFixture(fixtures.FakeLogger(
            name=handler.__name__, level=logging.DEBUG, format='%(levelname)s %(message)s'))

    def scheduler(self) -> handler.FilterScheduler:
        return handler.FilterScheduler(self.conf)


class ConstructionTest(FilterSchedulerTestCase):
    def test_loads_configured_plugins_in_order(self):
        self.conf.set_override('enabled_filters', ['disk', 'compute_up'], 'scheduler')
        self.conf.set_override('weighers', ['cpu'], 'scheduler')
        s = self.scheduler()
        self.assertEqual(['disk', 'compute_up'], [name for name, _ in s.filters])
        self.assertEqual(['cpu'], [name for name, _, _ in s.weighers])

    def test_unknown_filter_fails_at_construction(self):
        self.conf.set_override('enabled_filters', ['ram', 'no_such_filter'], 'scheduler')
        error = self.assertRaises(exception.PluginNotFound, self.scheduler)
        self.assertEqual('no_such_filter', error.name)
        self.assertIn('ram', error.available)

    def test_unknown_weigher_fails_at_construction(self):
        self.conf.set_override('weighers', ['gpu'], 'scheduler')
        self.assertRaises(exception.PluginNotFound, self.scheduler)


class FilterHostsTest(FilterSchedulerTestCase):
    def test_logs_counts_before_and_after_each_filter_in_order(self):
        self.conf.set_override('enabled_filters', ['compute_up', 'ram', 'disk'], 'scheduler')
        hosts = [fakes.host('down', up=False), fakes.host('full', memory_mib_used=16000),
                 fakes.host('ok1'), fakes.host('ok2')]
        passed = self.scheduler().filter_hosts(hosts, SMALL)
        self.assertEqual(['ok1', 'ok2'], [h.name for h in passed])
        self.assertEqual(['DEBUG filter compute_up: 4 hosts before, 3 after',
                          'DEBUG filter ram: 3 hosts before, 2 after',
                          'DEBUG filter disk: 2 hosts before, 2 after'],
                         self.log.output.splitlines())

    def test_reversed_order_is_respected(self):
        self.conf.set_override('enabled_filters', ['ram', 'compute_up'], 'scheduler')
        hosts = [fakes.host('down', up=False), fakes.host('full', memory_mib_used=16000)]
        self.assertEqual([], self.scheduler().filter_hosts(hosts, SMALL))
        self.assertEqual(['DEBUG filter ram: 2 hosts before, 1 after',
                          'DEBUG filter compute_up: 1 hosts before, 0 after',
                          'INFO filter compute_up eliminated all 1 remaining hosts'],
                         self.log.output.splitlines())


class SelectHostsTest(FilterSchedulerTestCase):
    def four_hosts(self):
        return [fakes.host(f'h{i}') for i in (3, 1, 4, 2)]

    def test_positive_multiplier_spreads(self):
        self.assertEqual(['h1', 'h2', 'h3', 'h4'],
                         self.scheduler().select_hosts(self.four_hosts(), SMALL, 4))

    def test_negative_multiplier_stacks(self):
        self.conf.set_override('ram_weight_multiplier', -1.0, 'scheduler')
        self.conf.set_override('cpu_weight_multiplier', -1.0, 'scheduler')
        self.assertEqual(['h1'] * 4,
                         self.scheduler().select_hosts(self.four_hosts(), SMALL, 4))

    def test_stacking_moves_on_when_a_host_is_full(self):
        self.conf.set_override('ram_weight_multiplier', -1.0, 'scheduler')
        self.conf.set_override('weighers', ['ram'], 'scheduler')
        hosts = [fakes.host('a', memory_mib_total=2048), fakes.host('b')]
        self.assertEqual(['a', 'a', 'b', 'b'], self.scheduler().select_hosts(hosts, SMALL, 4))
        self.assertIn('DEBUG filter ram: host a is full after instance 2; 1 hosts left',
                      self.log.output)

    def test_spreading_prefers_the_emptiest_host(self):
        hosts = [fakes.host('busy', memory_mib_used=8192, vcpus_used=4), fakes.host('idle')]
        self.assertEqual(['idle'], self.scheduler().select_hosts(hosts, SMALL, 1))

    def test_zero_multipliers_fall_back_to_name_order(self):
        self.conf.set_override('ram_weight_multiplier', 0.0, 'scheduler')
        self.conf.set_override('cpu_weight_multiplier', 0.0, 'scheduler')
        hosts = [fakes.host('b'), fakes.host('a', memory_mib_used=8192)]
        self.assertEqual(['a', 'a'], self.scheduler().select_hosts(hosts, SMALL, 2))

    def test_callers_hosts_are_not_mutated(self):
        hosts = self.four_hosts()
        before = copy.deepcopy(hosts)
        self.scheduler().select_hosts(hosts, SMALL, 10)
        self.assertEqual(before, hosts)

    def test_all_or_nothing_by_default(self):
        self.conf.set_override('max_instances_per_host', 1, 'scheduler')
        error = self.assertRaises(exception.NoValidHost, self.scheduler().select_hosts,
                                  self.four_hosts(), SMALL, 5)
        self.assertEqual((5, 5, 4), (error.requested, error.required, error.placed))
        self.assertEqual('instance_count', error.filter_name)
        self.assertEqual("no valid host: asked for 5 instances, only 4 fit; filter "
                         "'instance_count' eliminated the most hosts: 4 of 4", str(error))
        self.assertIn('INFO filter instance_count eliminated the last host after 4 of 5 '
                      'instances', self.log.output)

    def test_min_count_returns_as_many_as_fit(self):
        self.conf.set_override('max_instances_per_host', 1, 'scheduler')
        chosen = self.scheduler().select_hosts(self.four_hosts(), SMALL, 6, min_count=3)
        self.assertEqual(['h1', 'h2', 'h3', 'h4'], chosen)

    def test_min_count_not_reached(self):
        self.conf.set_override('max_instances_per_host', 1, 'scheduler')
        error = self.assertRaises(exception.NoValidHost, self.scheduler().select_hosts,
                                  self.four_hosts(), SMALL, 6, min_count=5)
        self.assertIn('asked for 6 instances (at least 5), only 4 fit', str(error))

    def test_error_names_the_filter_that_eliminated_most(self):
        hosts = [fakes.host('down', up=False), fakes.host('tiny1', memory_mib_total=512),
                 fakes.host('tiny2', memory_mib_total=512),
                 fakes.host('nodisk', disk_bytes_free=0)]
        request = InstanceRequest(vcpus=1, memory_mib=1024, disk_bytes=1)
        error = self.assertRaises(exception.NoValidHost, self.scheduler().select_hosts,
                                  hosts, request, 1)
        self.assertEqual(('ram', 2, 0), (error.filter_name, error.eliminated, error.placed))
        self.assertIn("filter 'ram' eliminated the most hosts: 2 of 4", str(error))

    def test_no_hosts_at_all(self):
        error = self.assertRaises(exception.NoValidHost, self.scheduler().select_hosts,
                                  [], SMALL, 1)
        self.assertIsNone(error.filter_name)
        self.assertEqual('no valid host: asked for 1 instance, only 0 fit; 0 candidate hosts',
                         str(error))

    def test_zero_instances(self):
        self.assertEqual([], self.scheduler().select_hosts(self.four_hosts(), SMALL, 0))

    def test_bad_min_count(self):
        s = self.scheduler()
        self.assertRaises(ValueError, s.select_hosts, [], SMALL, 2, min_count=3)
        self.assertRaises(ValueError, s.select_hosts, [], SMALL, 2, min_count=-1)

    def test_mips_request_on_simulated_hosts(self):
        hosts = [fakes.host('sim1', mips_total=2500), fakes.host('sim2', mips_total=1000),
                 fakes.host('real')]
        request = InstanceRequest(vcpus=1, memory_mib=512, mips=1000)
        self.assertEqual(['sim1', 'sim2', 'sim1'],
                         self.scheduler().select_hosts(hosts, request, 3))

    def test_incremental_placement_matches_refiltering_every_pick(self):
        """Re-checking only the chosen host gives what a full pass per instance gives."""
        self.conf.set_override('cpu_weight_multiplier', -0.5, 'scheduler')
        hosts = [fakes.host(f'h{i:02}', memory_mib_total=1024 * (1 + i % 5),
                            vcpus_total=1 + i % 3, instance_count=i % 4,
                            up=i % 7 != 0) for i in range(30)]
        request = InstanceRequest(vcpus=2, memory_mib=768)
        s = self.scheduler()
        expected, state = [], copy.deepcopy(hosts)
        for _ in range(40):
            passed = s.filter_hosts(state, request)
            if not passed:
                break
            best, _ = s.weigh_hosts(passed, request)[0]
            best.consume(request)
            expected.append(best.name)
        self.assertEqual(expected, s.select_hosts(hosts, request, 40, min_count=0))

    def test_a_thousand_hosts_spread(self):
        self.useFixture(fixtures.FakeLogger(name=handler.__name__, level=logging.INFO))
        hosts = [fakes.host(f'h{i:04}', memory_mib_used=16 * (i % 97),
                            vcpus_used=i % 5) for i in range(1000)]
        chosen = self.scheduler().select_hosts(hosts, SMALL, 100)
        self.assertEqual(100, len(set(chosen)))  # positive multipliers: one per host
