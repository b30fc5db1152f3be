"""The dispatcher's state transitions, without a database."""
import testtools

from vmcloud.dispatcher import states
from vmcloud.dispatcher import transitions
from vmcloud.dispatcher.transitions import Outcome


class DeploymentTest(testtools.TestCase):
    def test_building_while_any_instance_builds(self):
        self.assertEqual(Outcome(states.BUILDING), transitions.deployment(
            {states.BUILDING: 1, states.ACTIVE: 5, states.ERROR: 2}, 8, 1))

    def test_active_with_min_count_names_the_failures(self):
        self.assertEqual(Outcome(states.ACTIVE, '2 instances failed'),
                         transitions.deployment({states.ACTIVE: 6, states.ERROR: 2}, 8, 6))
        self.assertEqual(Outcome(states.ACTIVE, ''),
                         transitions.deployment({states.ACTIVE: 8}, 8, 8))

    def test_unknown_when_only_the_unknown_make_min_count(self):
        self.assertEqual(Outcome(states.ACTIVE, '1 instances failed, 2 instances unknown'),
                         transitions.deployment({states.ACTIVE: 5, states.ERROR: 1,
                                                 states.UNKNOWN: 2}, 8, 5))
        self.assertEqual(
            Outcome(states.UNKNOWN, '4 of 8 instances active, 6 needed; 4 instances unknown'),
            transitions.deployment({states.ACTIVE: 4, states.UNKNOWN: 4}, 8, 6))
        self.assertEqual(states.ERROR, transitions.deployment(
            {states.ACTIVE: 4, states.UNKNOWN: 1, states.ERROR: 3}, 8, 6).state)

    def test_error_below_min_count(self):
        self.assertEqual(
            Outcome(states.ERROR, 'only 5 of 8 instances became active, 6 needed'),
            transitions.deployment({states.ACTIVE: 5, states.ERROR: 3}, 8, 6))
        self.assertEqual(states.ERROR, transitions.deployment({}, 1, 1).state)


class SnapshotTest(testtools.TestCase):
    def test_uploading_while_any_item_freezes_or_uploads(self):
        for pending in (states.FREEZING, states.UPLOADING):
            self.assertEqual(Outcome(states.UPLOADING), transitions.snapshot(
                {pending: 1, states.AVAILABLE: 3, states.ERROR: 1}))

    def test_available_partial_error(self):
        self.assertEqual(Outcome(states.AVAILABLE),
                         transitions.snapshot({states.AVAILABLE: 4}))
        self.assertEqual(Outcome(states.PARTIAL, '1 instances could not be snapshotted'),
                         transitions.snapshot({states.AVAILABLE: 3, states.ERROR: 1}))
        self.assertEqual(Outcome(states.ERROR, '4 instances could not be snapshotted'),
                         transitions.snapshot({states.ERROR: 4}))


class BuildsTest(testtools.TestCase):
    def test_failed_hosts_accumulate(self):
        self.assertEqual(['node1'], transitions.failed_hosts('', 'node1'))
        self.assertEqual(['node1', 'node2'], transitions.failed_hosts('node1', 'node2'))

    def test_out_of_attempts(self):
        self.assertIsNone(transitions.out_of_attempts(2, 3, 'node1', 'boom'))
        self.assertEqual('failed 3 times; last on node1: boom',
                         transitions.out_of_attempts(3, 3, 'node1', 'boom'))

    def test_a_build_deadline_names_the_timeout(self):
        self.assertEqual('no build result within 900 s',
                         transitions.build_deadline_passed(900))


class HostsTest(testtools.TestCase):
    def test_on_a_silent_host_running_guests_are_unknown_the_rest_as_they_are(self):
        self.assertEqual(
            Outcome(states.UNKNOWN, 'compute host node2 stopped sending heartbeats'),
            transitions.on_silent_host(states.ACTIVE, 'node2'))
        for state in (states.BUILDING, states.ERROR, states.DELETING, states.DELETED):
            self.assertIsNone(transitions.on_silent_host(state, 'node2'), state)

    def test_a_report_settles_the_unknown(self):
        for settled in (True, False):
            self.assertEqual(Outcome(states.ACTIVE),
                             transitions.on_report(states.UNKNOWN, True, settled, 'node2'))
            self.assertEqual(
                Outcome(states.ERROR, 'not running on node2 when it reported again'),
                transitions.on_report(states.UNKNOWN, False, settled, 'node2'))

    def test_a_report_without_a_settled_guest(self):
        self.assertEqual(Outcome(states.ERROR, 'not running on node2'),
                         transitions.on_report(states.ACTIVE, False, True, 'node2'))
        self.assertEqual(Outcome(states.DELETED),
                         transitions.on_report(states.DELETING, False, True, 'node2'))
        # A report that may predate the build or the destroy judges nothing.
        for state in (states.ACTIVE, states.DELETING):
            self.assertIsNone(transitions.on_report(state, False, False, 'node2'))

    def test_a_report_leaves_the_rest_alone(self):
        for state in (states.ACTIVE, states.DELETING, states.BUILDING, states.ERROR):
            self.assertIsNone(transitions.on_report(state, True, True, 'node2'), state)
        for state in (states.BUILDING, states.ERROR):
            self.assertIsNone(transitions.on_report(state, False, True, 'node2'), state)
