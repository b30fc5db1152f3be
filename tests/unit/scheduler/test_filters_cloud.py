"""The cloud filter: a deployment of a cloud that lists its hosts is placed only there;
with the default filters, as the dispatcher schedules."""
from vmcloud import exception
from vmcloud import plugins
from vmcloud.scheduler import filters
from vmcloud.scheduler import handler
from vmcloud.scheduler.host_state import InstanceRequest
from tests import base
from tests.unit import scheduler as fakes


def request(cloud_hosts) -> InstanceRequest:
    """The request spec the dispatcher builds for an instance of a cloud."""
    return InstanceRequest(vcpus=1, memory_mib=1024, cloud_hosts=cloud_hosts)


class CloudHostsFilterTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.filter = plugins.load(filters.NAMESPACE, 'cloud', self.conf)

    def test_passes_only_the_cloud_s_hosts(self):
        spec = request(('a', 'c'))
        self.assertTrue(self.filter.host_passes(fakes.host('a'), spec))
        self.assertTrue(self.filter.host_passes(fakes.host('c'), spec))
        self.assertFalse(self.filter.host_passes(fakes.host('b'), spec))

    def test_a_cloud_that_lists_no_hosts_spans_every_host(self):
        for spec in (request(None), request(())):
            self.assertTrue(self.filter.host_passes(fakes.host('b'), spec))

    def test_a_request_of_no_cloud_spans_every_host(self):
        # The simulation's and the consolidation's requests name no cloud.
        self.assertTrue(self.filter.host_passes(fakes.host('b'),
                                                InstanceRequest(vcpus=1, memory_mib=1)))


class DefaultFiltersTest(base.TestCase):
    def test_the_cloud_filter_runs_first(self):
        # Cheapest, and on a cloud of a few hosts it leaves the others nothing to do.
        self.assertEqual('cloud', self.conf.scheduler.enabled_filters[0])

    def test_instances_of_a_cloud_go_only_to_its_hosts(self):
        hosts = [fakes.host(name) for name in ('a', 'b', 'c', 'd')]
        chosen = handler.FilterScheduler(self.conf).select_hosts(hosts, request(('b', 'd')), 6)
        self.assertEqual({'b', 'd'}, set(chosen))
        self.assertEqual(6, len(chosen))

    def test_a_cloud_whose_hosts_are_full_gets_nothing_elsewhere(self):
        hosts = [fakes.host('a'), fakes.host('b', memory_mib_used=16384)]
        error = self.assertRaises(exception.NoValidHost,
                                  handler.FilterScheduler(self.conf).select_hosts,
                                  hosts, request(('b',)), 1)
        self.assertEqual(0, error.placed)
