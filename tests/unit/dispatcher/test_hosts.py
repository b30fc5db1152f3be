"""The host monitor outlives the errors of its passes."""
import threading

import fixtures
import sqlalchemy.exc

from vmcloud import exception
from vmcloud.db import api as db_api
from vmcloud.dispatcher import hosts
from tests import base


class Lost:
    def host_lost(self, session, host):
        return []

    def build_failed(self, instance_id, host, reason):
        pass


class HostMonitorTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.conf.set_override('heartbeat_interval', 1)
        self.db = db_api.Database(self.conf)
        self.db.upgrade()
        self.addCleanup(self.db.dispose)
        self.monitor = hosts.HostMonitor(self.conf, self.db, Lost())
        self.addCleanup(self.monitor.stop)

    def test_a_pass_that_fails_with_any_error_is_logged_not_raised(self):
        for error in (RuntimeError('a bug'),
                      sqlalchemy.exc.OperationalError('SELECT', {}, Exception('gone')),
                      exception.DatabaseError('away')):
            def fail(error=error):
                raise error
            self.monitor.mark_dead_hosts = fail
            logged = self.useFixture(fixtures.FakeLogger())
            self.monitor.check()  # does not raise
            self.assertIn('compute hosts', logged.output)

    def test_the_thread_goes_on_after_a_failed_pass(self):
        calls = []
        second = threading.Event()

        def flaky():
            calls.append(len(calls))
            if len(calls) == 1:
                raise RuntimeError('a bug in the first pass')
            second.set()
            return []
        self.monitor.mark_dead_hosts = flaky
        self.monitor.start()
        self.assertTrue(second.wait(60), calls)
        self.assertTrue(self.monitor.is_alive())

    def test_a_failed_retry_does_not_stop_the_others(self):
        retried = self.lose_node1(['i1', 'i2'], {'i1': exception.DatabaseError('away')})
        self.assertEqual(['i1', 'i2'], retried)

    def test_a_retry_that_hits_a_bug_does_not_stop_the_others(self):
        logged = self.useFixture(fixtures.FakeLogger())
        retried = self.lose_node1(['i1', 'i2', 'i3'], {'i1': RuntimeError('a bug, on purpose'),
                                                       'i2': exception.DatabaseError('away')})
        self.assertEqual(['i1', 'i2', 'i3'], retried)
        self.assertIn('cannot retry instance i1 of lost host node1', logged.output)
        self.assertIn('a bug, on purpose', logged.output)

    def lose_node1(self, building: list[str], failures: dict) -> list[str]:
        """Mark node1 down with ``building`` instances whose retries fail as ``failures``
        says. :returns: the instances whose retry was tried."""
        retried = []

        class Failing(Lost):
            def host_lost(self, session, host):
                return building

            def build_failed(self, instance_id, host, reason):
                retried.append(instance_id)
                if instance_id in failures:
                    raise failures[instance_id]
        monitor = hosts.HostMonitor(self.conf, self.db, Failing())
        registry = hosts.HostRegistry(self.db)
        registry.report_heartbeat('node1', {'vcpus': 1, 'memory_mib': 1,
                                            'disk_bytes_free': 1})
        self.conf.set_override('service_down_time', 2)
        with self.db.session() as session:
            row = db_api.host_get(session, 'node1')
            row.last_heartbeat = row.last_heartbeat.replace(year=2000)
        self.assertEqual(['node1'], monitor.mark_dead_hosts())
        return retried
