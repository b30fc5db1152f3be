"""The conformance suite for the drivers that need no guest: fake and sim."""
import os
import uuid

from vmcloud.drivers import base as driver_base
from tests import base
from tests.unit.drivers import conformance


class InMemoryConformance(conformance.DriverConformance):
    boots_real_guest = False

    def instance_spec(self, name: str, nics=(), **flags) -> driver_base.InstanceSpec:
        files = {}
        for leaf, size in (('disk.raw', 1024 * 1024), ('vmlinuz', 0), ('initrd.img', 0)):
            files[leaf] = os.path.join(self.tmp, f'{name}-{leaf}')
            with open(files[leaf], 'wb') as f:
                f.truncate(size)
        cmdline = ' '.join(['console=ttyS0', f'vmcloud.id={name}']
                           + [f'vmcloud.{k}={v}' for k, v in flags.items()])
        return driver_base.InstanceSpec(name=name, disk=files['disk.raw'],
                                        kernel=files['vmlinuz'], initrd=files['initrd.img'],
                                        cmdline=cmdline, nics=nics)

    def make_bridge(self, mtu: int = 1500) -> str:
        # a segment of the fake's own: nothing is made on the host
        bridge = f'fake{uuid.uuid4().hex[:8]}'
        self.driver.add_bridge(bridge)
        self.addCleanup(self.driver.remove_bridge, bridge)
        return bridge

    def writing_guest(self):
        spec = self.boot()
        return spec, self.driver.instances[spec.name].disk.events

    def guest_writes(self, spec, events):
        self.driver.guest_write(spec.name, 0, 4096)
        self.driver.guest_write(spec.name, 65536, 512)

    def while_frozen(self, spec):
        self.driver.guest_write(spec.name, 4096, 4096)


class FakeDriverTest(InMemoryConformance, base.TestCase):
    driver_name = 'fake'


class SimDriverTest(InMemoryConformance, base.TestCase):
    driver_name = 'sim'

    def invalid_nics(self, bridge):
        # a simulated host has whatever bridge it is told of
        return [(nics, words) for nics, words in super().invalid_nics(bridge)
                if 'no bridge' not in words]

    def test_nics_on_any_bridge_are_accepted_and_recorded(self):
        nics = (driver_base.Nic('52:54:00:00:00:01', 'vmcb1000'),)
        spec = self.make_spec(nics=nics)
        self.driver.spawn(spec)
        self.assertEqual(nics, self.driver.instances[spec.name].spec.nics)
