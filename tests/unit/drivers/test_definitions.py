"""How specs become hypervisor configuration (no hypervisor needed)."""
import xml.etree.ElementTree as ET

import fixtures

from vmcloud import exception
from vmcloud.drivers import base as driver_base
from vmcloud.drivers import nbd_uri
from vmcloud.drivers.libvirt import domain_xml
from vmcloud.drivers.qemu import cmdline
from tests import base

UNIX = 'nbd+unix:///disk0?socket=/run/vmcloud/m.sock'
NICS = (driver_base.Nic('52:54:00:00:00:01', 'vmcb1000'),
        driver_base.Nic('52:54:00:00:00:02', 'br-x'))


def _spec(disk: str, **kw) -> driver_base.InstanceSpec:
    return driver_base.InstanceSpec(name='vm1', disk=disk, kernel='/k', initrd='/i',
                                    cmdline='console=ttyS0', **kw)


class NbdUriTest(base.TestCase):
    def test_parse(self):
        self.assertEqual(nbd_uri.NbdUri(export='disk0', socket='/run/vmcloud/m.sock'),
                         nbd_uri.parse(UNIX))
        self.assertEqual(nbd_uri.NbdUri(export='e', host='10.0.0.1', port=10810),
                         nbd_uri.parse('nbd://10.0.0.1:10810/e'))
        self.assertEqual(10809, nbd_uri.parse('nbd://h/e').port)

    def test_malformed(self):
        for bad in ('nbd+unix:///disk0', 'nbd:///e'):
            self.assertRaises(exception.DiskNotFound, nbd_uri.parse, bad)


class QemuCommandLineTest(base.TestCase):
    def test_nbd_disk_and_direct_kernel_boot(self):
        command = cmdline.build('/usr/bin/qemu-system-x86_64', _spec(UNIX), 'tcg', '/q', '/c')
        self.assertIn(f'file={UNIX},format=raw,if=virtio,cache=none,aio=threads', command)
        self.assertIn('pc,accel=tcg', command)
        self.assertEqual(['-kernel', '/k', '-append', 'console=ttyS0', '-initrd', '/i'],
                         command[-6:])
        self.assertNotIn('-cpu', command)

    def test_nics_on_the_taps_the_driver_made(self):
        command = cmdline.build('/q', _spec(UNIX, nics=NICS), 'tcg', '/q', '/c', [1450, 1500])
        tap0, tap1 = (driver_base.tap_name('vm1', i) for i in (0, 1))
        self.assertEqual(['-netdev', f'tap,id=net0,ifname={tap0},script=no,downscript=no',
                          '-device', 'virtio-net-pci,netdev=net0,mac=52:54:00:00:00:01,'
                                     'host_mtu=1450',
                          '-netdev', f'tap,id=net1,ifname={tap1},script=no,downscript=no',
                          '-device', 'virtio-net-pci,netdev=net1,mac=52:54:00:00:00:02,'
                                     'host_mtu=1500'],
                         command[command.index('-netdev'):command.index('-kernel')])
        # -nodefaults: no NIC but those asked for
        self.assertNotIn('-netdev', cmdline.build('/q', _spec(UNIX), 'tcg', '/q', '/c'))
        self.assertRaises(ValueError, cmdline.build, '/q', _spec(UNIX, nics=NICS), 'tcg',
                          '/q', '/c', [1450])

    def test_tap_names(self):
        name = driver_base.tap_name('vm1', 0)
        self.assertRegex(name, r'^vmct[0-9a-f]{10}$')
        self.assertEqual(name, driver_base.tap_name('vm1', 0))
        self.assertEqual(8, len({driver_base.tap_name('vm1', i) for i in range(8)}))
        self.assertNotEqual(name, driver_base.tap_name('vm2', 0))

    def test_commas_in_file_names_are_escaped(self):
        self.assertIn('file=/a,,b.qcow2,format=qcow2',
                      cmdline.drive(_spec('/a,b.qcow2', disk_format='qcow2')))


class DomainXmlTest(base.TestCase):
    def test_acpi_nbd_and_console(self):
        root = ET.fromstring(domain_xml.build(_spec(UNIX), 'qemu', '/c.log', '+0:+0'))
        self.assertEqual('qemu', root.get('type'))
        self.assertIsNotNone(root.find('features/acpi'))
        source = root.find('devices/disk/source')
        self.assertEqual(('nbd', 'disk0'), (source.get('protocol'), source.get('name')))
        self.assertEqual('/run/vmcloud/m.sock', source.find('host').get('socket'))
        self.assertEqual('/c.log', root.find('devices/serial/source').get('path'))
        self.assertEqual('+0:+0', root.find('seclabel/label').text)

    def test_file_disk_without_dac_label(self):
        root = ET.fromstring(domain_xml.build(_spec('/d.qcow2', disk_format='qcow2'), 'kvm',
                                              '/c.log', ''))
        self.assertEqual('qcow2', root.find('devices/disk/driver').get('type'))
        self.assertEqual('/d.qcow2', root.find('devices/disk/source').get('file'))
        self.assertIsNone(root.find('seclabel'))
        self.assertEqual('host-passthrough', root.find('cpu').get('mode'))

    def test_bridged_interfaces(self):
        root = ET.fromstring(domain_xml.build(_spec(UNIX, nics=NICS), 'qemu', '/c.log', '',
                                              [1450, 1500]))
        interfaces = root.findall('devices/interface')
        self.assertEqual(['bridge', 'bridge'], [i.get('type') for i in interfaces])
        first = interfaces[0]
        self.assertEqual('52:54:00:00:00:01', first.find('mac').get('address'))
        self.assertEqual('vmcb1000', first.find('source').get('bridge'))
        self.assertEqual(driver_base.tap_name('vm1', 0), first.find('target').get('dev'))
        self.assertEqual('virtio', first.find('model').get('type'))
        self.assertEqual('1450', first.find('mtu').get('size'))
        self.assertEqual('br-x', interfaces[1].find('source').get('bridge'))
        self.assertEqual([], ET.fromstring(domain_xml.build(_spec(UNIX), 'qemu', '/c.log',
                                                            '')).findall('devices/interface'))


class DriverLoadingTest(base.TestCase):
    def test_unknown_driver_fails_loudly(self):
        error = self.assertRaises(exception.PluginNotFound, driver_base.load, self.conf, 'xen')
        self.assertIn("'xen'", str(error))
        self.assertIn('fake, libvirt, qemu', str(error))


class PowerButtonTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.useFixture(
            fixtures.MonkeyPatch('vmcloud.drivers.base.POWER_BUTTON_INTERVAL', 0.1))
        self.presses = 0

    def press(self):
        self.presses += 1

    def test_a_missed_press_is_repeated(self):
        # The guest only hears the third press.
        went_off = driver_base.press_power_button_until_off(
            self.press, lambda: self.presses >= 3, timeout=30)
        self.assertTrue(went_off)
        self.assertEqual(3, self.presses)

    def test_a_guest_that_never_listens(self):
        went_off = driver_base.press_power_button_until_off(
            self.press, lambda: False, timeout=0.35)
        self.assertFalse(went_off)
        self.assertGreaterEqual(self.presses, 3)
