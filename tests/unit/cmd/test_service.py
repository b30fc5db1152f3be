"""``vmcloud dispatcher`` and ``vmcloud compute`` reach the bus before anything else."""
import argparse

import fixtures

from vmcloud import exception
from vmcloud.cmd import service
from tests import base


class StartTest(base.TestCase):
    def setUp(self):
        super().setUp()
        # oslo.log's setup changes the process's root logger: not for a unit test.
        self.useFixture(fixtures.MockPatchObject(service.log, 'setup'))
        self.dispatcher = self.useFixture(fixtures.MockPatchObject(
            service.dispatcher_manager, 'Dispatcher')).mock
        self.compute = self.useFixture(fixtures.MockPatchObject(
            service.compute_manager, 'ComputeManager')).mock

    def test_a_refused_bus_stops_a_service_before_it_builds_anything(self):
        refused = exception.MessageBusRefused('RabbitMQ at rabbit://u:***@h:5672/ refused '
                                              'the login (ACCESS_REFUSED)')
        wait = self.useFixture(fixtures.MockPatchObject(
            service.rpc, 'wait_for_bus', side_effect=refused)).mock
        for handler, built in ((service.do_dispatcher, self.dispatcher),
                               (service.do_compute, self.compute)):
            error = self.assertRaises(exception.MessageBusRefused, handler, self.conf,
                                      argparse.Namespace(host='node1'))
            self.assertIs(refused, error)
            # Neither the database (its migrations) nor the node's state was touched.
            built.assert_not_called()
        self.assertEqual(2, wait.call_count)
        wait.assert_called_with(self.conf)
