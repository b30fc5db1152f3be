"""What the qemu and libvirt drivers decide before and around the hypervisor, without one."""
import os
import shutil
from unittest import mock

import libvirt

from vmcloud import exception
from vmcloud.drivers import base as driver_base
from tests import base


class _Driver(base.TestCase):
    driver_name: str

    def setUp(self):
        super().setUp()
        self.conf.set_override('accelerator', 'tcg', 'compute')
        self.driver = driver_base.load(self.conf, self.driver_name)
        self.disk = os.path.join(self.tmp, 'disk.raw')
        open(self.disk, 'wb').close()
        self.spec = driver_base.InstanceSpec(name='vm1', disk=self.disk)
        self.instance_dir = os.path.join(self.conf.compute.instances_path, 'vm1')

    def half_made(self) -> None:
        """An instance directory as a crash between its creation and spec.json leaves it."""
        os.makedirs(self.instance_dir)
        open(os.path.join(self.instance_dir, 'console.log'), 'w').close()


class QemuDriverTest(_Driver):
    driver_name = 'qemu'

    def test_spawn_over_a_half_made_instance_directory(self):
        # a "qemu" that exits at once: spawn gets as far as starting it
        self.conf.set_override('binary', shutil.which('true'), 'qemu')
        self.half_made()
        self.assertEqual([], self.driver.list_instances())
        error = self.assertRaises(exception.SpawnFailed, self.driver.spawn, self.spec)
        self.assertIn('qemu refused to start instance vm1', str(error))
        self.assertFalse(os.path.exists(self.instance_dir))


class LibvirtDriverTest(_Driver):
    driver_name = 'libvirt'

    def known(self) -> None:
        os.makedirs(self.instance_dir)
        open(os.path.join(self.instance_dir, 'spec.json'), 'w').close()

    def test_a_domain_that_vanishes_while_its_state_is_read_is_shut_down(self):
        # power_state may be called during a stop or destroy (base.Driver's rules)
        class Gone(libvirt.libvirtError):
            def get_error_code(self):
                return libvirt.VIR_ERR_NO_DOMAIN

        class VanishingDomain:
            def state(self):
                raise Gone('Domain not found')

        self.known()
        with mock.patch.object(self.driver, '_domain', return_value=VanishingDomain()):
            self.assertEqual(driver_base.PowerState.SHUTDOWN, self.driver.power_state('vm1'))

    def test_another_libvirt_error_on_state_is_a_driver_error(self):
        class Broken(libvirt.libvirtError):
            def get_error_code(self):
                return libvirt.VIR_ERR_INTERNAL_ERROR

            def get_error_message(self):
                return 'internal error'

        class BrokenDomain:
            def state(self):
                raise Broken('internal error')

        self.known()
        with mock.patch.object(self.driver, '_domain', return_value=BrokenDomain()):
            error = self.assertRaises(exception.DriverError, self.driver.power_state, 'vm1')
        self.assertIn('libvirt state of instance vm1 failed: internal error', str(error))

    def test_spawn_over_a_half_made_instance_directory(self):
        connection = mock.Mock()
        connection.createXML.side_effect = libvirt.libvirtError('refused')
        self.half_made()
        with mock.patch.object(self.driver, '_connect', return_value=connection):
            error = self.assertRaises(exception.SpawnFailed, self.driver.spawn, self.spec)
        self.assertIn('libvirt refused to start instance vm1', str(error))
        connection.createXML.assert_called_once()
        self.assertFalse(os.path.exists(self.instance_dir))
