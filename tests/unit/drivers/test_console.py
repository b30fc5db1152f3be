"""Waiting for phase markers on a console file."""
import os
from unittest import mock

from vmcloud import exception
from vmcloud.drivers import console
from tests import base


class WaitForMarkerTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.path = os.path.join(self.tmp, 'console.log')

    def test_finds_a_marker_written_in_two_pieces(self):
        with open(self.path, 'w') as f:
            f.write(f'noise\n{console.MARKER} boo')
        writes = iter(['t-done\n'])

        def alive():
            with open(self.path, 'a') as f:
                f.write(next(writes, ''))
            return True

        console.wait_for_marker(self.path, 'vm1', 'boot-done', 5, alive)

    def test_a_console_removed_with_its_instance_is_a_timeout(self):
        # destroy() removes the instance's directory while a phase follower waits:
        # the file can vanish between any two calls, also after it was seen to exist.
        with mock.patch('os.path.exists', return_value=True):
            error = self.assertRaises(exception.GuestTimeout, console.wait_for_marker,
                                      self.path, 'vm1', 'shutdown-started', 5, lambda: False)
        self.assertIn('instance vm1 did not reach shutdown-started: the guest stopped first',
                      str(error))
