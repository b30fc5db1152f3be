"""``vmcloud compute``: it reaches the node's mirror service first, and stops leaving the
guests to it."""
import argparse
from unittest import mock

import fixtures

from vmcloud import exception
from vmcloud.cmd import service
from tests import base


class ComputeServiceTest(base.TestCase):
    def setUp(self):
        super().setUp()
        # oslo.log's setup changes the process's root logger: not for a unit test.
        self.useFixture(fixtures.MockPatchObject(service.log, 'setup'))
        self.useFixture(fixtures.MockPatchObject(service.rpc, 'wait_for_bus'))
        self.manager = self.useFixture(fixtures.MockPatchObject(
            service.compute_manager, 'ComputeManager')).mock
        self.mirrors = self.useFixture(fixtures.MockPatchObject(
            service.mirror_api, 'RemoteMirrors')).mock.return_value
        self.args = argparse.Namespace(host='node1')

    def test_an_absent_mirror_service_stops_it_before_it_registers(self):
        absent = exception.MirrorServiceUnavailable('/run/vmcloud/mirror-control.sock',
                                                    'connection refused')
        self.mirrors.wait.side_effect = absent
        self.conf.set_override('rpc_startup_timeout', 7)
        error = self.assertRaises(exception.MirrorServiceUnavailable, service.do_compute,
                                  self.conf, self.args)
        self.assertIs(absent, error)
        self.mirrors.wait.assert_called_once_with(7)
        self.manager.assert_not_called()

    def test_an_unknown_driver_fails_before_waiting_for_anything(self):
        self.conf.set_override('driver', 'nosuch', 'compute')
        error = self.assertRaises(exception.VmcloudError, service.do_compute, self.conf,
                                  self.args)
        self.assertIn('nosuch', str(error))
        self.mirrors.wait.assert_not_called()
        service.rpc.wait_for_bus.assert_not_called()

    def test_a_host_name_in_use_is_the_error_and_the_mirrors_client_closes(self):
        self.manager.return_value.start.side_effect = exception.HostNameInUse('node1', 'n2')
        error = self.assertRaises(exception.HostNameInUse, service.do_compute, self.conf,
                                  self.args)
        self.assertIn('in use by node n2', str(error))
        self.manager.assert_called_once_with(self.conf, self.mirrors, host='node1',
                                             driver=mock.ANY)
        self.mirrors.close.assert_called_once_with()

    def test_stopping_leaves_the_guests_running(self):
        run = self.useFixture(fixtures.MockPatchObject(service, 'run', return_value=0)).mock
        self.assertEqual(0, service.do_compute(self.conf, self.args))
        compute = self.manager.return_value
        run.assert_called_once_with(compute, mock.ANY)
        stop = run.call_args.args[1]
        stop()
        compute.stop.assert_called_once_with()  # destroy_instances stays False
        self.mirrors.close.assert_called_once_with()
