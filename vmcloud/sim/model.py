"""What is simulated: host and VM types, and a scenario (hosts, VMs, their demand traces)."""
import dataclasses
import math

import numpy as np

from vmcloud.drivers import mips
from vmcloud.sim import power as power_models
from vmcloud.sim import traces


@dataclasses.dataclass(frozen=True)
class HostType(mips.MipsHost):
    """A MIPS host (name, PEs, MIPS per PE, RAM: what the sim driver runs on too) with
    its network bandwidth and power model."""

    bw_kbps: int
    power: power_models.SpecPowerModel


@dataclasses.dataclass(frozen=True)
class VmType:
    """A single-PE VM: it can never use more than one host PE's MIPS."""

    name: str
    mips: float
    ram_mb: int
    bw_kbps: int


# The setup of Beloglazov & Buyya (CCPE 2012), CloudSim 3.0.3 examples/power/Constants.
HOST_TYPES = (
    HostType('ml110-g4', 2, 1860, 4096, 1_000_000, power_models.HP_PROLIANT_ML110_G4),
    HostType('ml110-g5', 2, 2660, 4096, 1_000_000, power_models.HP_PROLIANT_ML110_G5),
)
VM_TYPES = (
    VmType('high-cpu-medium', 2500, 870, 100_000),
    VmType('extra-large', 2000, 1740, 100_000),
    VmType('small', 1000, 1740, 100_000),
    VmType('micro', 500, 613, 100_000),
)


@dataclasses.dataclass
class Scenario:
    """Hosts and VMs of one run.

    ``utilization`` has one row per VM: the fraction of its MIPS it asks for at
    each sample (every ``sample_interval`` seconds), with a final padding column.
    """

    hosts: list[HostType]
    vms: list[VmType]
    utilization: np.ndarray
    sample_interval: float = traces.SAMPLE_INTERVAL
    names: list[str] = dataclasses.field(default_factory=list)
    workload: str = ''
    # CloudSim's VMs reserve their RAM and bandwidth only while being created: their
    # PlanetLab cloudlets use none, so afterwards only MIPS limits consolidation.
    # True keeps the reservations for the whole run (a stricter, more real model).
    reserve_ram: bool = False

    def __post_init__(self):
        if len(self.vms) != len(self.utilization):
            raise ValueError(f'{len(self.vms)} VMs but {len(self.utilization)} traces')

    @property
    def duration(self) -> float:
        return (self.utilization.shape[1] - 1) * self.sample_interval


def assign_vm_types(count: int, types=VM_TYPES) -> list[VmType]:
    """Types in equal consecutive blocks, in trace order (CloudSim's Helper.createVmList)."""
    block = math.ceil(count / len(types))
    return [types[i // block] for i in range(count)]


def alternating_hosts(count: int, types=HOST_TYPES) -> list[HostType]:
    return [types[i % len(types)] for i in range(count)]


def planetlab(day: str, hosts: int = 800, path: str | None = None) -> Scenario:
    """The CloudSim PlanetLab setup on one day: hosts alternating G4/G5, VMs in four blocks.

    :raises: WorkloadNotFound.
    """
    names, utilization = traces.load_day(day, path)
    return Scenario(alternating_hosts(hosts), assign_vm_types(len(names)), utilization,
                    names=names, workload=day)
