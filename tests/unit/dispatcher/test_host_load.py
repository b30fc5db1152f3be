"""The load each compute host reports (its CPUs and how busy they are) as the host
registry keeps it, for the gateway to weigh instances by, and its chunk cache's figures
for the monitoring: on SQLite."""
from vmcloud.db import api as db_api
from vmcloud.db import models
from vmcloud.dispatcher import deploy
from vmcloud.dispatcher import hosts
from vmcloud.scheduler import handler
from tests import base
from tests.unit.dispatcher import test_host_states

CAPACITY = test_host_states.CAPACITY


class HostLoadTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.db = db_api.Database(self.conf)
        self.db.upgrade()
        self.addCleanup(self.db.dispose)
        deployer = deploy.Deployer(self.conf, self.db, handler.FilterScheduler(self.conf),
                                   test_host_states.Compute(), lambda *args: None)
        self.registry = hosts.HostRegistry(self.conf, self.db, deployer)

    def host(self, name: str) -> models.Host:
        with self.db.session() as session:
            return db_api.host_get(session, name)

    def heartbeat(self, capacity: dict) -> None:
        self.registry.report_heartbeat('node1', capacity, 'inc-node1', [])

    def test_register_and_heartbeats_keep_the_cpus_and_their_load(self):
        self.registry.register('node1', 'id-node1', 'inc-node1',
                               dict(CAPACITY, cpus=8, cpu_busy=0.25))
        self.assertEqual((8, 0.25), (self.host('node1').cpus, self.host('node1').cpu_busy))
        self.heartbeat(dict(CAPACITY, cpus=8, cpu_busy=0.75))
        self.assertEqual((8, 0.75), (self.host('node1').cpus, self.host('node1').cpu_busy))

    def test_a_manager_of_before_reports_no_load(self):
        self.registry.register('node1', 'id-node1', 'inc-node1',
                               dict(CAPACITY, cpus=8, cpu_busy=0.5))
        # Not the figure of an earlier heartbeat: cpus 0 is read as the host's vcpus.
        self.heartbeat(CAPACITY)
        self.assertEqual((0, 0.0), (self.host('node1').cpus, self.host('node1').cpu_busy))

    def test_a_load_that_could_not_be_measured_counts_as_busy(self):
        # Neither the last figure nor idle: the gateway sends such a host the least.
        self.registry.register('node1', 'id-node1', 'inc-node1',
                               dict(CAPACITY, cpus=8, cpu_busy=0.5))
        self.heartbeat(dict(CAPACITY, cpus=8))
        self.assertEqual((8, 1.0), (self.host('node1').cpus, self.host('node1').cpu_busy))

    def test_the_chunk_cache_figures_are_kept_and_a_missing_one_keeps_the_last(self):
        def figures():
            host = self.host('node1')
            return host.cache_bytes, host.fetched_bytes, host.peer_bytes
        self.registry.register('node1', 'id-node1', 'inc-node1', CAPACITY)
        self.assertEqual((0, 0, 0), figures())  # a manager of before tells none
        self.registry.register('node1', 'id-node1', 'inc-node1',
                               dict(CAPACITY, cache_bytes=1 << 33, fetched_bytes=5 << 30))
        self.assertEqual((1 << 33, 5 << 30, 0), figures())
        self.heartbeat(dict(CAPACITY, cache_bytes=7, fetched_bytes=8, peer_bytes=9))
        self.assertEqual((7, 8, 9), figures())
        # The mirror service was away for this one: the last figures stay.
        self.heartbeat(dict(CAPACITY, cache_bytes=10))
        self.assertEqual((10, 8, 9), figures())
