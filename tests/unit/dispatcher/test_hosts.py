"""The host monitor outlives the errors of its passes."""
import threading

import fixtures
import sqlalchemy.exc

from vmcloud import exception
from vmcloud.db import api as db_api
from vmcloud.dispatcher import hosts
from tests import base


class Keeper:
    def hosts_silent(self, session, hosts):
        pass

    def expire_builds(self, now):
        return []


class HostMonitorTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.conf.set_override('heartbeat_interval', 1)
        self.db = db_api.Database(self.conf)
        self.db.upgrade()
        self.addCleanup(self.db.dispose)
        self.expired = []
        self.monitor = hosts.HostMonitor(self.conf, self.db, Keeper(), self.expired.append)
        self.addCleanup(self.monitor.stop)

    def test_a_pass_that_fails_with_any_error_is_logged_not_raised(self):
        for error in (RuntimeError('a bug'),
                      sqlalchemy.exc.OperationalError('SELECT', {}, Exception('gone')),
                      exception.DatabaseError('away')):
            def fail(error=error):
                raise error
            self.monitor.mark_silent_hosts = fail
            logged = self.useFixture(fixtures.FakeLogger())
            self.monitor.check()  # does not raise
            self.assertIn('compute hosts', logged.output)

    def test_a_failed_part_of_a_pass_does_not_stop_the_others(self):
        def fail():
            raise RuntimeError('a bug, on purpose')
        self.monitor.mark_silent_hosts = fail
        self.monitor.end_late_builds = fail
        logged = self.useFixture(fixtures.FakeLogger())
        self.monitor.check()
        self.assertEqual(1, len(self.expired))
        self.assertIn('cannot check compute hosts', logged.output)
        self.assertIn('cannot end builds past their deadline', logged.output)

    def test_the_thread_goes_on_after_a_failed_pass(self):
        calls = []
        second = threading.Event()

        def flaky():
            calls.append(len(calls))
            if len(calls) == 1:
                raise RuntimeError('a bug in the first pass')
            second.set()
            return []
        self.monitor.mark_silent_hosts = flaky
        self.monitor.start()
        self.assertTrue(second.wait(60), calls)
        self.assertTrue(self.monitor.is_alive())
