"""The one view of a cluster that consolidation plans on, and all it may touch.

Detectors, selectors, placements and the compiled kernels read these attributes and
call these methods, nothing else, so anything that provides them can be planned for:
the simulator's ``vmcloud.sim.cluster.Cluster`` does, and a view of real hosts may.
Hosts and VMs are numbered 0..n_hosts-1 and 0..n_vms-1; every per-host or per-VM
attribute is a C-contiguous float64 numpy array indexed so (``vm_hist`` and ``hist``
have rows), but ``vm_hist_len`` and the host ids of candidate_view(), which are int64:
the compiled kernels take them as typed memoryviews and refuse any other layout.

Policies never assign to an attribute nor write into an array: they change the
placement only through attach() and detach(), and a plan ends with restore() of the
snapshot() taken before it. The compiled kernels keep views of the arrays while the
cluster changes by attach and detach only, so those two must update the arrays in
place; anything else (a new measurement, restore) may replace them.
"""
import random
import typing

import numpy as np


@typing.runtime_checkable
class PowerCurves(typing.Protocol):
    """Every host's power model as one table: ``width`` points a host, 0%, 10% .. 100%.

    ``watts`` and ``steps`` are flat, row ``h`` at ``h * width``: the watts at each
    point and (next - this) / 10, CloudSim's PowerModelSpecPower arithmetic.
    """

    watts: np.ndarray
    steps: np.ndarray
    width: int

    def at(self, rows: np.ndarray, utilization: np.ndarray) -> np.ndarray:
        """Watts of host ``rows[i]`` at ``utilization[i]`` (in [0, 1])."""


@typing.runtime_checkable
class ClusterView(typing.Protocol):
    # -- fixed for a run -------------------------------------------------------------
    n_hosts: int
    n_vms: int
    interval: float                 # seconds between updates
    migration_steps: int | None     # ceil(migration time / interval) if one for all, or None
    host_mips: np.ndarray
    host_ram: np.ndarray
    host_bw: np.ndarray
    host_migration_rate: np.ndarray  # MB/s a migration to the host moves
    power_table: PowerCurves
    vm_mips: np.ndarray
    vm_ram: np.ndarray
    rng: random.Random              # the run's only randomness, seeded

    # -- set at each update, read only while planning ------------------------------
    util_mips: np.ndarray           # host MIPS used, measured at the last update
    vm_req: np.ndarray              # MIPS each VM requests now
    vm_util: np.ndarray             # the fraction of its MIPS each VM requests now
    vm_ram_req: np.ndarray          # RAM and bandwidth a VM holds on its host
    vm_bw_req: np.ndarray
    vm_hist: np.ndarray             # utilisation history per VM, newest first
    vm_hist_len: np.ndarray

    # -- per host, changed by attach, detach and restore only ------------------------
    req_sum: np.ndarray             # MIPS requested by the host's VMs
    avail: np.ndarray               # MIPS its scheduler has left
    alloc_mips: np.ndarray          # MIPS it hands out now (CloudSim's planning utilisation)
    ram_used: np.ndarray
    bw_used: np.ndarray
    ram_max: np.ndarray             # RAM of its largest VM
    hist: np.ndarray                # its utilisation history from its VMs', newest first

    def utilization(self) -> np.ndarray:
        """Each host's CPU utilisation at the last update (fixed while planning)."""

    def candidate_view(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The hosts a placement must consider (ids, ascending) with their PE MIPS, MIPS
        and power now; the same tuple object until the candidates change."""

    def suitable(self, vm: int) -> np.ndarray:
        """A bool per host: it has a PE, MIPS, RAM and bandwidth for ``vm`` now."""

    def migratable(self, host: int) -> list[int]:
        """The host's VMs that are not migrating already, in list order (a new list)."""

    def attach(self, vm: int, host: int) -> None:
        """Put ``vm`` on ``host`` for the rest of the plan (arrays updated in place)."""

    def detach(self, vm: int, host: int) -> None:
        """Take ``vm`` off ``host`` for the rest of the plan (arrays updated in place)."""

    def snapshot(self) -> object:
        """What attach and detach change, for one restore(); one at a time."""

    def restore(self, saved: object) -> None:
        """Undo every attach and detach since ``saved`` was taken."""


def members(protocol: type) -> frozenset[str]:
    """The attribute and method names a protocol declares."""
    names = set()
    for klass in protocol.__mro__:
        if klass in (typing.Protocol, typing.Generic, object):
            continue
        names.update(getattr(klass, '__annotations__', {}))
        names.update(n for n, v in vars(klass).items()
                     if callable(v) and not n.startswith('_'))
    return frozenset(names)
