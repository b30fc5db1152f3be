"""Each filter's predicate, with the options that shape it."""
from vmcloud import plugins
from vmcloud.scheduler import filters
from vmcloud.scheduler.host_state import InstanceRequest
from tests import base
from tests.unit import scheduler as fakes

GIB = 1024 ** 3


class FilterTestCase(base.TestCase):
    def load(self, name: str) -> filters.BaseFilter:
        return plugins.load(filters.NAMESPACE, name, self.conf)


class ComputeUpFilterTest(FilterTestCase):
    def test_passes_only_up_hosts(self):
        f = self.load('compute_up')
        request = InstanceRequest(vcpus=1, memory_mib=512)
        self.assertTrue(f.host_passes(fakes.host(up=True), request))
        self.assertFalse(f.host_passes(fakes.host(up=False), request))


class RamFilterTest(FilterTestCase):
    def test_exact_fit_passes_one_more_mib_fails(self):
        f = self.load('ram')
        h = fakes.host(memory_mib_total=4096, memory_mib_used=3072)
        self.assertTrue(f.host_passes(h, InstanceRequest(vcpus=1, memory_mib=1024)))
        self.assertFalse(f.host_passes(h, InstanceRequest(vcpus=1, memory_mib=1025)))

    def test_allocation_ratio_scales_the_total(self):
        self.conf.set_override('ram_allocation_ratio', 1.5, 'scheduler')
        f = self.load('ram')
        # 4096 * 1.5 - 3072 = 3072 MiB may still be handed out.
        h = fakes.host(memory_mib_total=4096, memory_mib_used=3072)
        self.assertTrue(f.host_passes(h, InstanceRequest(vcpus=1, memory_mib=3072)))
        self.assertFalse(f.host_passes(h, InstanceRequest(vcpus=1, memory_mib=3073)))

    def test_ratio_below_one_reserves_ram(self):
        self.conf.set_override('ram_allocation_ratio', 0.5, 'scheduler')
        f = self.load('ram')
        h = fakes.host(memory_mib_total=4096, memory_mib_used=0)
        self.assertTrue(f.host_passes(h, InstanceRequest(vcpus=1, memory_mib=2048)))
        self.assertFalse(f.host_passes(h, InstanceRequest(vcpus=1, memory_mib=2049)))


class CpuFilterTest(FilterTestCase):
    def test_default_ratio_is_four(self):
        f = self.load('cpu')
        h = fakes.host(vcpus_total=2, vcpus_used=6)
        self.assertTrue(f.host_passes(h, InstanceRequest(vcpus=2, memory_mib=1)))
        self.assertFalse(f.host_passes(h, InstanceRequest(vcpus=3, memory_mib=1)))

    def test_ratio_one_means_no_overcommit(self):
        self.conf.set_override('cpu_allocation_ratio', 1.0, 'scheduler')
        f = self.load('cpu')
        h = fakes.host(vcpus_total=4, vcpus_used=3)
        self.assertTrue(f.host_passes(h, InstanceRequest(vcpus=1, memory_mib=1)))
        self.assertFalse(f.host_passes(h, InstanceRequest(vcpus=2, memory_mib=1)))

    def test_mips_checked_only_when_requested(self):
        f = self.load('cpu')
        h = fakes.host(mips_total=1000, mips_used=600)
        self.assertTrue(f.host_passes(h, InstanceRequest(vcpus=1, memory_mib=1, mips=400)))
        self.assertFalse(f.host_passes(h, InstanceRequest(vcpus=1, memory_mib=1, mips=401)))
        self.assertTrue(f.host_passes(fakes.host(), InstanceRequest(vcpus=1, memory_mib=1)))

    def test_host_without_mips_fails_mips_request(self):
        f = self.load('cpu')
        self.assertFalse(f.host_passes(fakes.host(),
                                       InstanceRequest(vcpus=1, memory_mib=1, mips=1)))

    def test_mips_are_not_overcommitted(self):
        self.conf.set_override('cpu_allocation_ratio', 16.0, 'scheduler')
        f = self.load('cpu')
        h = fakes.host(mips_total=1000, mips_used=1000)
        self.assertFalse(f.host_passes(h, InstanceRequest(vcpus=1, memory_mib=1, mips=1)))


class DiskFilterTest(FilterTestCase):
    def test_free_disk(self):
        f = self.load('disk')
        h = fakes.host(disk_bytes_free=10 * GIB)
        self.assertTrue(f.host_passes(h, InstanceRequest(1, 1, disk_bytes=10 * GIB)))
        self.assertFalse(f.host_passes(h, InstanceRequest(1, 1, disk_bytes=10 * GIB + 1)))
        self.assertTrue(f.host_passes(fakes.host(disk_bytes_free=0), InstanceRequest(1, 1)))


class InstanceCountFilterTest(FilterTestCase):
    def test_default_max_is_fifty(self):
        f = self.load('instance_count')
        request = InstanceRequest(vcpus=1, memory_mib=1)
        self.assertTrue(f.host_passes(fakes.host(instance_count=49), request))
        self.assertFalse(f.host_passes(fakes.host(instance_count=50), request))

    def test_configured_max(self):
        self.conf.set_override('max_instances_per_host', 2, 'scheduler')
        f = self.load('instance_count')
        request = InstanceRequest(vcpus=1, memory_mib=1)
        self.assertTrue(f.host_passes(fakes.host(instance_count=1), request))
        self.assertFalse(f.host_passes(fakes.host(instance_count=2), request))


class RegistryTest(FilterTestCase):
    def test_every_default_filter_is_installed(self):
        for name in self.conf.scheduler.enabled_filters:
            self.assertIsInstance(self.load(name), filters.BaseFilter)
