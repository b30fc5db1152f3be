"""``GET /metrics``: the cloud in Prometheus' text format, read at each scrape from its
sources (a token is needed, as everywhere in the API):

- the dispatcher (``monitoring``): deployments, instances and hosts by state, each
  cloud's connection limit, each host's chunk cache;
- the gateway (``gateway_connections``, ``gateway_stats``, through the dispatcher): the
  connections open now, the users, the cumulative admitted and refused connections and
  bytes of each cloud;
- the warehouse (``Warehouse.stats``): images, versions and bytes. Reading them walks
  every manifest and chunk, so its figures are reused for WAREHOUSE_MAX_AGE seconds.

A source that fails leaves its families out and ``vmcloud_scrape_source_up{source}`` 0
(without a gateway the rest is still scraped). Each app has its own CollectorRegistry
(never the process-wide one) holding one collector.
"""
import collections
import logging
import threading
import time
from typing import Callable, Iterator

import fastapi
from prometheus_client import core
from prometheus_client import exposition
from prometheus_client import registry as registry_mod

from vmcloud import exception
from vmcloud.api import auth
from vmcloud.api import context
from vmcloud.dispatcher import states

LOG = logging.getLogger(__name__)

router = fastapi.APIRouter(tags=['metrics'])
SOURCES = ('dispatcher', 'gateway', 'warehouse')
# Seconds the warehouse's figures are reused: a scrape every 15 s must not walk a large
# store every 15 s.
WAREHOUSE_MAX_AGE = 60.0
# States shown even when nothing is in them (a series that comes and goes is hard to
# alert on).
DEPLOYMENT_STATES = (states.BUILDING, states.ACTIVE, states.UNKNOWN, states.ERROR,
                     states.DELETED)
INSTANCE_STATES = (states.BUILDING, states.ACTIVE, states.UNKNOWN, states.ERROR,
                   states.DELETING, states.DELETED)
HOST_STATES = (states.HOST_UP, states.HOST_UNKNOWN, states.HOST_FENCED)
# Warehouse.stats() fields -> (metric, help).
WAREHOUSE_FIGURES = (
    ('images', 'vmcloud_warehouse_images', 'Images in the warehouse'),
    ('versions', 'vmcloud_warehouse_versions', 'Readable image versions'),
    ('damaged_versions', 'vmcloud_warehouse_damaged_versions',
     'Versions whose manifest cannot be read'),
    ('logical_bytes', 'vmcloud_warehouse_logical_bytes',
     'Sum of the virtual sizes of every version'),
    ('referenced_bytes', 'vmcloud_warehouse_referenced_bytes',
     'Sum of every version\'s data, as if nothing were shared'),
    ('stored_bytes', 'vmcloud_warehouse_stored_bytes',
     'Bytes the store holds (chunks and manifests, after deduplication)'),
    ('chunks', 'vmcloud_warehouse_chunks', 'Chunks stored'),
)

Family = core.Metric


def _gauge(name: str, documentation: str, labels: tuple[str, ...],
           values: dict[tuple[str, ...], float]) -> core.GaugeMetricFamily:
    family = core.GaugeMetricFamily(name, documentation, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(key, value)
    return family


def _counter(name: str, documentation: str, labels: tuple[str, ...],
             values: dict[tuple[str, ...], float]) -> core.CounterMetricFamily:
    """``name`` without its _total, which the exposition adds."""
    family = core.CounterMetricFamily(name, documentation, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(key, value)
    return family


def _by_state(counts: dict[str, int], known: tuple[str, ...]) -> dict[tuple[str], int]:
    values = {(state,): 0 for state in known}
    values.update({(state,): n for state, n in counts.items()})
    return values


def dispatcher_families(figures: dict) -> list[Family]:
    """The families of DispatcherAPI.monitoring's answer."""
    hosts = figures.get('hosts', {})
    host_states = collections.Counter(host['state'] for host in hosts.values())
    clouds = figures.get('clouds', {})
    return [
        _gauge('vmcloud_deployments', 'Deployments by state', ('state',),
               _by_state(figures.get('deployments', {}), DEPLOYMENT_STATES)),
        _gauge('vmcloud_instances', 'Instances by state', ('state',),
               _by_state(figures.get('instances', {}), INSTANCE_STATES)),
        _gauge('vmcloud_hosts', 'Compute hosts by state', ('state',),
               _by_state(dict(host_states), HOST_STATES)),
        _gauge('vmcloud_cloud_connection_limit',
               'Connections a cloud\'s listeners hold at most at once', ('cloud',),
               {(name,): cloud['connection_limit'] for name, cloud in clouds.items()}),
        _gauge('vmcloud_host_up', 'Whether a compute host is up (1) or not (0)', ('host',),
               {(name,): 1 if host.get('up') else 0 for name, host in hosts.items()}),
        _gauge('vmcloud_host_instances', 'Instances that may have a guest on a host',
               ('host',), {(name,): host.get('instances', 0) for name, host in hosts.items()}),
        _gauge('vmcloud_host_cache_bytes', 'Bytes a host\'s chunk cache holds', ('host',),
               {(name,): host.get('cache_bytes', 0) for name, host in hosts.items()}),
        _counter('vmcloud_host_fetched_bytes',
                 'Bytes a host\'s chunk cache fetched from the warehouse (since its mirror '
                 'service started)', ('host',),
                 {(name,): host.get('fetched_bytes', 0) for name, host in hosts.items()}),
        _counter('vmcloud_host_peer_bytes',
                 'Bytes a host\'s chunk cache had from peer hosts (since its mirror service '
                 'started)', ('host',),
                 {(name,): host.get('peer_bytes', 0) for name, host in hosts.items()}),
    ]


def gateway_families(connections: list[dict], stats: dict[str, dict],
                     figures: dict | None) -> list[Family]:
    """The families of the gateway's connections and stats (``figures``: the
    dispatcher's monitoring, if it answered, for the applications with none)."""
    active: dict[tuple[str, str], int] = {}
    for name, cloud in (figures or {}).get('clouds', {}).items():
        for application in cloud.get('applications_deployed', ()):
            active[(name, application)] = 0
    for connection in connections:
        key = (connection['cloud'], connection.get('application') or '')
        active[key] = active.get(key, 0) + 1

    def per_cloud(field: str) -> dict[tuple[str], int]:
        return {(name,): cloud.get(field, 0) for name, cloud in stats.items()}
    return [
        # Not vmcloud_gateway_connections: the counter below exposes that family name.
        _gauge('vmcloud_gateway_active_connections',
               'Connections the gateway holds now, by cloud and application',
               ('cloud', 'application'), active),
        _gauge('vmcloud_gateway_users',
               'Distinct client addresses holding a connection now', ('cloud',),
               per_cloud('users_connected')),
        _counter('vmcloud_gateway_connections', 'Connections the gateway admitted',
                 ('cloud',), per_cloud('total_connections')),
        _counter('vmcloud_gateway_rejected_connections',
                 'Connections the gateway refused (a connection limit reached)', ('cloud',),
                 per_cloud('rejected_connections')),
        _counter('vmcloud_gateway_received_bytes', 'Bytes the gateway received from clients',
                 ('cloud',), per_cloud('bytes_in')),
        _counter('vmcloud_gateway_sent_bytes', 'Bytes the gateway sent to clients',
                 ('cloud',), per_cloud('bytes_out')),
    ]


def warehouse_families(stats) -> list[Family]:
    """The families of a Warehouse.stats() answer."""
    return [_gauge(metric, documentation, (), {(): getattr(stats, field)})
            for field, metric, documentation in WAREHOUSE_FIGURES]


class CloudCollector:
    """Reads every source at each collect() (a scrape), the warehouse's figures at most
    every WAREHOUSE_MAX_AGE seconds."""

    def __init__(self, services: context.Services,
                 clock: Callable[[], float] = time.monotonic):
        self.services = services
        self._clock = clock
        self._warehouse_lock = threading.Lock()
        self._warehouse_stats = None
        self._warehouse_read_at = 0.0

    def describe(self) -> list[Family]:
        # Registering must not scrape (the registry would call collect() instead).
        return []

    def collect(self) -> Iterator[Family]:
        up: dict[str, bool] = {}
        dispatcher = self.services.dispatcher
        figures = self._read('dispatcher', dispatcher.monitoring, up)
        if figures is not None:
            yield from dispatcher_families(figures)
        gateway = self._read('gateway', lambda: (dispatcher.gateway_connections(),
                                                 dispatcher.gateway_stats()), up)
        if gateway is not None:
            yield from gateway_families(*gateway, figures)
        stats = self._read('warehouse', self._warehouse, up)
        if stats is not None:
            yield from warehouse_families(stats)
        yield _gauge('vmcloud_scrape_source_up',
                     'Whether a source of these metrics answered this scrape (1) or not (0)',
                     ('source',), {(source,): 1 if up[source] else 0 for source in SOURCES})

    @staticmethod
    def _read(source: str, read: Callable[[], object], up: dict[str, bool]):
        """``read()``, or None if it failed (``up[source]`` says which)."""
        try:
            result = read()
        except exception.VmcloudError as exc:
            LOG.warning('metrics: the %s did not answer: %s', source, exc)
            up[source] = False
            return None
        up[source] = True
        return result

    def _warehouse(self):
        """:raises: StorageError."""
        with self._warehouse_lock:  # two scrapes at once walk the store once
            if (self._warehouse_stats is None
                    or self._clock() - self._warehouse_read_at >= WAREHOUSE_MAX_AGE):
                self._warehouse_stats = self.services.warehouse().stats()
                self._warehouse_read_at = self._clock()
            return self._warehouse_stats


_registries_lock = threading.Lock()


def registry_of(app: fastapi.FastAPI, services: context.Services
                ) -> registry_mod.CollectorRegistry:
    """The app's own registry (made at its first scrape) holding a CloudCollector."""
    with _registries_lock:
        registry = getattr(app.state, 'metrics_registry', None)
        if registry is None:
            registry = registry_mod.CollectorRegistry(auto_describe=False)
            registry.register(CloudCollector(services))
            app.state.metrics_registry = registry
        return registry


@router.get('/metrics', response_class=fastapi.Response,
            dependencies=[fastapi.Depends(auth.current_user)],
            responses={200: {'content': {exposition.CONTENT_TYPE_LATEST: {}},
                             'description': 'Prometheus\' text format'}})
def metrics(request: fastapi.Request,
            services: context.Services = fastapi.Depends(context.services)):
    """The cloud's metrics in Prometheus' text format (a token is needed: configure the
    scrape's authorization with a member's token)."""
    body = exposition.generate_latest(registry_of(request.app, services))
    return fastapi.Response(body, media_type=exposition.CONTENT_TYPE_LATEST)
