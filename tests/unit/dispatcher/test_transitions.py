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

    def test_on_a_lost_host(self):
        self.assertIsNone(transitions.on_lost_host(states.BUILDING, 'node2'))
        self.assertEqual(
            Outcome(states.ERROR, 'compute host node2 stopped sending heartbeats'),
            transitions.on_lost_host(states.ACTIVE, 'node2'))
        self.assertEqual(Outcome(states.DELETED),
                         transitions.on_lost_host(states.DELETED, 'node2'))
