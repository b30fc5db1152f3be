"""GET /metrics over a stub dispatcher and a real file warehouse: the families and their
values, parsed as Prometheus parses them; a source that fails leaves its families out
and says so; the warehouse's figures reused; a token needed."""
from prometheus_client import exposition
from prometheus_client import parser

from tests.unit.api import test_monitor
from tests.unit.api import test_resources
from vmcloud import exception
from vmcloud.api import metrics as metrics_mod


def families(text: str) -> dict:
    """{family name: {(sample name, labels as sorted tuple): value}}."""
    found = {}
    for family in parser.text_string_to_metric_families(text):
        if family.name in found:
            raise AssertionError(f'family {family.name} twice')
        found[family.name] = {(s.name, tuple(sorted(s.labels.items()))): s.value
                              for s in family.samples}
    return found


def one(family: dict, **labels) -> float:
    """The value of the one sample of ``family`` with ``labels``."""
    values = [v for (_name, sample_labels), v in family.items()
              if sample_labels == tuple(sorted(labels.items()))]
    if len(values) != 1:
        raise AssertionError(f'{len(values)} samples with {labels} in {family}')
    return values[0]


class CountingWarehouse:
    def __init__(self, warehouse):
        self.warehouse = warehouse
        self.stats_calls = 0

    def stats(self):
        self.stats_calls += 1
        return self.warehouse.stats()


class MetricsTest(test_resources.ApiTestCase):

    def make_dispatcher(self):
        return test_monitor.StubDispatcher()

    def setUp(self):
        super().setUp()
        self.conf.set_override('chunk_size', 64 * 1024, 'storage')
        path = f'{self.tmp}/disk.raw'
        with open(path, 'wb') as f:
            f.write(bytes(range(256)) * 1024)
        self.warehouse.import_image(path, 'cirros')

    def scrape(self) -> dict:
        response = self.member.get('/metrics')
        self.assertEqual(200, response.status_code, response.text)
        self.assertEqual(exposition.CONTENT_TYPE_LATEST, response.headers['Content-Type'])
        return families(response.text)

    def test_a_token_is_needed(self):
        self.assert_error(401, self.client.get('/metrics'))
        self.assertEqual({}, self.dispatcher.calls)

    def test_the_dispatchers_figures(self):
        found = self.scrape()
        deployments = found['vmcloud_deployments']
        self.assertEqual((2, 1, 4, 0), tuple(one(deployments, state=s) for s in
                                             ('active', 'error', 'deleted', 'building')))
        self.assertEqual(8, one(found['vmcloud_instances'], state='deleted'))
        self.assertEqual((1, 0), (one(found['vmcloud_hosts'], state='up'),
                                  one(found['vmcloud_hosts'], state='fenced')))
        self.assertEqual({'default': 100, 'edge': 2},
                         {dict(labels)['cloud']: value for (_n, labels), value
                          in found['vmcloud_cloud_connection_limit'].items()})
        self.assertEqual(1000, one(found['vmcloud_host_cache_bytes'], host='h1'))
        self.assertEqual({('vmcloud_host_fetched_bytes_total', (('host', 'h1'),)): 5000},
                         found['vmcloud_host_fetched_bytes'])
        self.assertEqual(0, one(found['vmcloud_host_peer_bytes'], host='h1'))
        self.assertEqual(1, one(found['vmcloud_host_up'], host='h1'))

    def test_the_gateways_figures(self):
        found = self.scrape()
        active = found['vmcloud_gateway_active_connections']
        self.assertEqual(2, one(active, cloud='default', application='web'))
        self.assertEqual(1, one(active, cloud='default', application=''))
        # Deployed, no connection: there, at 0.
        self.assertEqual(0, one(active, cloud='default', application='db'))
        self.assertEqual(3, one(active, cloud='edge', application='web'))
        self.assertEqual(3, one(found['vmcloud_gateway_users'], cloud='edge'))
        self.assertEqual({('vmcloud_gateway_connections_total', (('cloud', 'default'),)): 120,
                          ('vmcloud_gateway_connections_total', (('cloud', 'edge'),)): 7},
                         found['vmcloud_gateway_connections'])
        self.assertEqual(3, one(found['vmcloud_gateway_rejected_connections'],
                                cloud='default'))
        self.assertEqual(1000, one(found['vmcloud_gateway_received_bytes'], cloud='default'))
        self.assertEqual(90, one(found['vmcloud_gateway_sent_bytes'], cloud='edge'))

    def test_the_warehouses_figures(self):
        found = self.scrape()
        stats = self.warehouse.stats()
        self.assertEqual({'vmcloud_warehouse_images': 1, 'vmcloud_warehouse_versions': 1,
                          'vmcloud_warehouse_damaged_versions': 0,
                          'vmcloud_warehouse_logical_bytes': 256 * 1024,
                          'vmcloud_warehouse_referenced_bytes': 256 * 1024,
                          'vmcloud_warehouse_stored_bytes': stats.stored_bytes,
                          'vmcloud_warehouse_chunks': stats.chunks},
                         {name: one(found[name]) for name in
                          (metric for _f, metric, _h in metrics_mod.WAREHOUSE_FIGURES)})
        self.assertGreater(stats.stored_bytes, 0)

    def test_every_source_up(self):
        found = self.scrape()
        self.assertEqual({source: 1 for source in metrics_mod.SOURCES},
                         {dict(labels)['source']: value for (_n, labels), value
                          in found['vmcloud_scrape_source_up'].items()})

    def test_without_the_gateway_its_families_are_left_out(self):
        self.dispatcher.gateway_error = test_monitor.gateway_down()
        found = self.scrape()
        self.assertEqual([], [name for name in found if name.startswith('vmcloud_gateway_')])
        self.assertEqual(0, one(found['vmcloud_scrape_source_up'], source='gateway'))
        self.assertEqual(1, one(found['vmcloud_scrape_source_up'], source='dispatcher'))
        self.assertIn('vmcloud_deployments', found)
        self.assertIn('vmcloud_warehouse_images', found)
        self.assertIn('the gateway did not answer', self.log.output)
        # Not asked for its stats once its connections failed.
        self.assertNotIn('gateway_stats', self.dispatcher.calls)

    def test_without_the_dispatcher(self):
        self.dispatcher.monitoring_error = exception.MessagingError('no dispatcher')
        self.dispatcher.gateway_error = exception.MessagingError('no dispatcher')
        found = self.scrape()
        self.assertEqual({'dispatcher': 0, 'gateway': 0, 'warehouse': 1},
                         {dict(labels)['source']: value for (_n, labels), value
                          in found['vmcloud_scrape_source_up'].items()})
        self.assertNotIn('vmcloud_deployments', found)
        self.assertNotIn('vmcloud_host_cache_bytes', found)
        self.assertIn('vmcloud_warehouse_stored_bytes', found)

    def test_each_scrape_reads_the_dispatcher_again(self):
        self.scrape()
        self.scrape()
        self.assertEqual(2, self.dispatcher.calls['monitoring'])
        self.assertEqual(2, self.dispatcher.calls['gateway_stats'])

    def test_the_warehouses_figures_are_reused_for_a_while(self):
        counting = CountingWarehouse(self.warehouse)
        self.services.warehouse = lambda: counting
        clock = test_monitor.Clock()
        collector = metrics_mod.CloudCollector(self.services, clock=clock.monotonic)
        list(collector.collect())
        clock.advance(metrics_mod.WAREHOUSE_MAX_AGE - 1)
        list(collector.collect())
        self.assertEqual(1, counting.stats_calls)
        clock.advance(1)
        list(collector.collect())
        self.assertEqual(2, counting.stats_calls)
