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
