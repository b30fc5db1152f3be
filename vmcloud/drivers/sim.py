"""A simulated MIPS node: the fake driver's lifecycle on a host with CPUs, MIPS and RAM.

An instance asks for ``vcpus`` virtual CPUs of ``mips=N`` MIPS each (from its kernel
command line, default ``[sim] vcpu_mips``) and ``memory_mib`` of RAM. validate()
refuses (InvalidSpec) one that no such host could ever run: a vCPU faster than one
host PE, more vCPUs than PEs, more RAM than the host has. spawn() refuses
(SpawnFailed) one that does not fit in what is left now; a stopped instance gives
its share back, a paused one keeps it.

NICs are accepted on any bridge (a simulated host has whatever bridges it is told
of; nothing real is attached) and recorded in the instance's spec.
"""
import dataclasses
import re

from oslo_config import cfg

from vmcloud import exception
from vmcloud.drivers import base
from vmcloud.drivers import fake
from vmcloud.drivers import mips as mips_module

DEFAULT_HOST = mips_module.ML110_G5
DEFAULT_VCPU_MIPS = 500.0
_MIPS_FLAG = re.compile(r'(?:^|\s)mips=(\S*)')


@dataclasses.dataclass(frozen=True)
class SimHostCapacity(base.HostCapacity):
    mips: float = 0.0
    pe_mips: float = 0.0
    free_mips: float = 0.0


def requested_mips(spec: base.InstanceSpec, default: float = DEFAULT_VCPU_MIPS) -> float:
    """MIPS per vCPU the instance asks for: ``mips=N`` on its command line, or ``default``.

    :raises: InvalidSpec if N is not a positive number.
    """
    found = _MIPS_FLAG.search(spec.cmdline or '')
    if not found:
        return default
    try:
        value = float(found.group(1))
    except ValueError:
        value = float('nan')
    if not value > 0 or value == float('inf'):
        raise exception.InvalidSpec(spec.name, f'mips={found.group(1)} is not a positive number')
    return value


class SimDriver(fake.FakeDriver):
    OPTION_GROUP = cfg.OptGroup('sim', title='Simulated MIPS node (the sim driver)')
    OPTIONS = [
        cfg.StrOpt('host_name', default=DEFAULT_HOST.name, help='Name of the host type.'),
        cfg.IntOpt('host_pes', default=DEFAULT_HOST.pes, min=1,
                   help='Processing elements (CPUs) of the simulated host.'),
        cfg.FloatOpt('host_pe_mips', default=float(DEFAULT_HOST.pe_mips), min=1,
                     help='MIPS of each processing element.'),
        cfg.IntOpt('host_ram_mb', default=DEFAULT_HOST.ram_mb, min=1,
                   help='RAM of the simulated host, in MiB.'),
        cfg.FloatOpt('vcpu_mips', default=DEFAULT_VCPU_MIPS, min=1,
                     help='MIPS per vCPU of an instance whose command line has no mips=N.'),
    ]

    def __init__(self, conf, host: mips_module.MipsHost | None = None,
                 free_disk_bytes: int = 100 * 1024 ** 3):
        super().__init__(conf)
        group = conf.sim
        self.host = host or mips_module.MipsHost(group.host_name, group.host_pes,
                                                 group.host_pe_mips, group.host_ram_mb)
        self.vcpu_mips = group.vcpu_mips
        self.capacity = base.HostCapacity(cpus=self.host.pes, memory_mib=self.host.ram_mb,
                                          free_disk_bytes=free_disk_bytes)

    def bridge_exists(self, bridge: str) -> bool:
        return True

    def _holding(self):
        return [i for i in self.instances.values() if i.state != base.PowerState.SHUTDOWN]

    def used(self) -> tuple[float, int]:
        """MIPS and MiB held by instances that are not shut down."""
        with self._lock:
            held = self._holding()
        return (sum(requested_mips(i.spec, self.vcpu_mips) * i.spec.vcpus for i in held),
                sum(i.spec.memory_mib for i in held))

    def validate(self, spec: base.InstanceSpec) -> None:
        """:raises: InvalidSpec also for an instance larger than the host; DiskNotFound."""
        super().validate(spec)
        per_cpu = requested_mips(spec, self.vcpu_mips)
        if per_cpu > self.host.pe_mips or spec.vcpus > self.host.pes:
            raise exception.InvalidSpec(
                spec.name, f'asks for {spec.vcpus} x {per_cpu:g} MIPS; host '
                f'{self.host.name} has {self.host.pes} PEs of {self.host.pe_mips:g} MIPS')
        if spec.memory_mib > self.host.ram_mb:
            raise exception.InvalidSpec(
                spec.name, f'asks for {spec.memory_mib} MiB; host {self.host.name} has '
                f'{self.host.ram_mb} MiB')

    def _admit(self, spec: base.InstanceSpec) -> None:
        want = requested_mips(spec, self.vcpu_mips) * spec.vcpus
        mips, ram = self.used()
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
