"""What the qemu and libvirt drivers decide before and around the hypervisor, without one."""
import os
import shutil
from unittest import mock

import fixtures
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


class _Taps(fixtures.Fixture):
    """vmcloud.drivers.tap without a kernel: the taps a driver makes and removes."""

    def _setUp(self):
        self.made: list[tuple[str, str]] = []
        self.alive: set[str] = set()
        self.removed: list[str] = []
        self.useFixture(fixtures.MockPatch('vmcloud.drivers.tap.create', self.create))
        self.useFixture(fixtures.MockPatch('vmcloud.drivers.tap.delete', self.delete))
        self.useFixture(fixtures.MockPatch('vmcloud.drivers.tap.mtu', return_value=1450))
        self.useFixture(fixtures.MockPatchObject(driver_base.Driver, 'bridge_exists',
                                                 return_value=True))

    def create(self, device, bridge):
        self.made.append((device, bridge))
        self.alive.add(device)

    def delete(self, device):
        if device in self.alive:
            self.alive.discard(device)
            self.removed.append(device)


class QemuDriverTest(_Driver):
    driver_name = 'qemu'

    def nic_spec(self):
        return driver_base.InstanceSpec(
            name='vm1', disk=self.disk, nics=(driver_base.Nic('52:54:00:00:00:01', 'br0'),
                                              driver_base.Nic('52:54:00:00:00:02', 'br1')))

    def test_taps_are_made_before_qemu_and_removed_when_it_fails(self):
        taps = self.useFixture(_Taps())
        tap0, tap1 = (driver_base.tap_name('vm1', i) for i in (0, 1))
        started = []

        def popen(command, **kw):
            started.append((list(taps.alive), command))
            raise OSError('no qemu here')

        self.conf.set_override('binary', shutil.which('true'), 'qemu')
        with mock.patch('subprocess.Popen', side_effect=popen):
            self.assertRaises(OSError, self.driver.spawn, self.nic_spec())
        (alive, command), = started
        self.assertEqual([(tap0, 'br0'), (tap1, 'br1')], taps.made)
        self.assertEqual({tap0, tap1}, set(alive))
        self.assertIn(f'tap,id=net1,ifname={tap1},script=no,downscript=no', command)
        self.assertEqual(set(), taps.alive)
        self.assertFalse(os.path.exists(self.instance_dir))

    def test_a_tap_that_cannot_be_made_fails_the_spawn(self):
        taps = self.useFixture(_Taps())
        made = taps.create

        def create(device, bridge):
            if bridge == 'br1':
                raise exception.DriverError('ip tuntap add dev X mode tap failed: busy')
            made(device, bridge)

        with mock.patch('vmcloud.drivers.tap.create', side_effect=create):
            error = self.assertRaises(exception.SpawnFailed, self.driver.spawn, self.nic_spec())
        self.assertIn('cannot attach NIC 1 of instance vm1 to bridge br1: ip tuntap', str(error))
        self.assertEqual(set(), taps.alive)
        self.assertFalse(os.path.exists(self.instance_dir))

    def test_destroy_after_qemu_died_removes_the_taps(self):
        # what a driver restarted since the spawn finds: spec.json, no qemu
        taps = self.useFixture(_Taps())
        os.makedirs(self.instance_dir)
        with open(os.path.join(self.instance_dir, 'spec.json'), 'w') as f:
            f.write('{}')
        taps.alive.update({driver_base.tap_name('vm1', 0), driver_base.tap_name('vm1', 7)})
        self.driver.destroy('vm1')
        self.assertEqual(set(), taps.alive)
        self.assertEqual([], self.driver.list_instances())

    def test_a_tap_that_stays_keeps_the_instance_known(self):
        self.useFixture(_Taps())
        os.makedirs(self.instance_dir)
        open(os.path.join(self.instance_dir, 'spec.json'), 'w').close()
        with mock.patch('vmcloud.drivers.tap.delete',
                        side_effect=exception.DriverError('ip link delete failed')):
            self.assertRaises(exception.DriverError, self.driver.destroy, 'vm1')
        self.assertEqual(['vm1'], self.driver.list_instances())

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

    def test_nics_get_their_bridges_mtu_and_a_stale_tap_is_removed(self):
        taps = self.useFixture(_Taps())
        stale = driver_base.tap_name('vm1', 0)
        taps.alive.add(stale)
        connection = mock.Mock()
        spec = driver_base.InstanceSpec(
            name='vm1', disk=self.disk, nics=(driver_base.Nic('52:54:00:00:00:01', 'br0'),))
        with mock.patch.object(self.driver, '_connect', return_value=connection):
            self.driver.spawn(spec)
        self.assertEqual([stale], taps.removed)
        xml = connection.createXML.call_args[0][0]
        self.assertIn("<mtu size=\"1450\" />", xml)
        self.assertIn(f"<target dev=\"{stale}\" />", xml)

    def test_spawn_over_a_half_made_instance_directory(self):
        connection = mock.Mock()
        connection.createXML.side_effect = libvirt.libvirtError('refused')
        self.half_made()
        with mock.patch.object(self.driver, '_connect', return_value=connection):
            error = self.assertRaises(exception.SpawnFailed, self.driver.spawn, self.spec)
        self.assertIn('libvirt refused to start instance vm1', str(error))
        connection.createXML.assert_called_once()
        self.assertFalse(os.path.exists(self.instance_dir))
