"""A simulated MIPS node: the fake driver's lifecycle on a host with CPUs, MIPS and RAM.

An instance asks for ``vcpus`` virtual CPUs of ``mips=N`` MIPS each (from its kernel
command line, default ``DEFAULT_VCPU_MIPS``) and ``memory_mib`` of RAM. It is refused
(SpawnFailed) unless each vCPU fits on one host PE and the host has that much MIPS
and RAM left; a stopped instance gives its share back, a paused one keeps it.
"""
import dataclasses
import re

from vmcloud import exception
from vmcloud.drivers import base
from vmcloud.drivers import fake
from vmcloud.sim import model

DEFAULT_HOST = model.HOST_TYPES[1]   # HP ProLiant ML110 G5: 2 x 2660 MIPS, 4 GiB
DEFAULT_VCPU_MIPS = 500.0


@dataclasses.dataclass(frozen=True)
class SimHostCapacity(base.HostCapacity):
    mips: float = 0.0
    pe_mips: float = 0.0
    free_mips: float = 0.0


def requested_mips(spec: base.InstanceSpec) -> float:
    """MIPS per vCPU the instance asks for: ``mips=N`` on its command line, or the default."""
    found = re.search(r'(?:^|\s)mips=([0-9.]+)(?:\s|$)', spec.cmdline or '')
    return float(found.group(1)) if found else DEFAULT_VCPU_MIPS


class SimDriver(fake.FakeDriver):
    def __init__(self, conf, host: model.HostType = DEFAULT_HOST,
                 free_disk_bytes: int = 100 * 1024 ** 3):
        self.host = host
        super().__init__(conf, base.HostCapacity(cpus=host.pes, memory_mib=host.ram_mb,
                                                 free_disk_bytes=free_disk_bytes))

    def _holding(self):
        return [i for i in self.instances.values() if i.state != base.PowerState.SHUTDOWN]

    def used(self) -> tuple[float, int]:
        """MIPS and MiB held by instances that are not shut down."""
        held = self._holding()
        return (sum(requested_mips(i.spec) * i.spec.vcpus for i in held),
                sum(i.spec.memory_mib for i in held))

    def _admit(self, spec: base.InstanceSpec) -> None:
        per_cpu = requested_mips(spec)
        want = per_cpu * spec.vcpus
        mips, ram = self.used()
        if per_cpu > self.host.pe_mips or spec.vcpus > self.host.pes:
            raise exception.SpawnFailed(
                f'instance {spec.name} asks for {spec.vcpus} x {per_cpu:g} MIPS; host '
                f'{self.host.name} has {self.host.pes} PEs of {self.host.pe_mips:g} MIPS')
        if mips + want > self.host.mips:
            raise exception.SpawnFailed(
                f'instance {spec.name} asks for {want:g} MIPS; host {self.host.name} has '
                f'{self.host.mips - mips:g} of {self.host.mips:g} MIPS free')
        if ram + spec.memory_mib > self.host.ram_mb:
            raise exception.SpawnFailed(
                f'instance {spec.name} asks for {spec.memory_mib} MiB; host '
                f'{self.host.name} has {self.host.ram_mb - ram} of {self.host.ram_mb} MiB free')

    def host_capacity(self) -> SimHostCapacity:
        mips, _ = self.used()
        return SimHostCapacity(cpus=self.host.pes, memory_mib=self.host.ram_mb,
                               free_disk_bytes=self.capacity.free_disk_bytes,
                               mips=self.host.mips, pe_mips=self.host.pe_mips,
                               free_mips=self.host.mips - mips)
