"""The deployer on SQLite, with a stand-in for the compute managers."""
import threading

from vmcloud.db import api as db_api
from vmcloud.dispatcher import deploy
from vmcloud.dispatcher import hosts
from vmcloud.dispatcher import states
from tests import base

CAPACITY = {'vcpus': 1, 'memory_mib': 1, 'disk_bytes_free': 1}


class LateBuildTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.db = db_api.Database(self.conf)
        self.db.upgrade()
        self.addCleanup(self.db.dispose)

    def test_a_build_no_longer_wanted_is_undone_with_nothing_locked(self):
        with self.db.session() as session:
            db_api.deployment_create(session, id='d1', image='guest:1', count=1, min_count=1,
                                     vcpus=1, memory_mib=1, state=states.DELETED)
            db_api.instance_create(session, id='i1', name='vm-d1-0', deployment_id='d1',
                                   image='guest:1', host='node1', state=states.DELETED)
        registry = hosts.HostRegistry(self.conf, self.db, None)
        undone = []

        class Compute:
            def destroy_instance(self, host, name):
                # The message may wait for the bus: the database must not wait with it.
                writer = threading.Thread(target=registry.register,
                                          args=('node2', 'id-node2', 'inc-node2', CAPACITY))
                writer.start()
                writer.join(5)
                undone.append((host, name, 'database free' if not writer.is_alive()
                               else 'database held'))
        deployer = deploy.Deployer(self.conf, self.db, None, Compute(), lambda *args: None)
        deployer.instance_built('i1', 'node1', 1.0, 0)
        self.assertEqual([('node1', 'vm-d1-0', 'database free')], undone)
        with self.db.session() as session:
            self.assertEqual(states.DELETED, db_api.instance_lock(session, 'i1').state)
            self.assertIsNotNone(db_api.host_get(session, 'node2'))
