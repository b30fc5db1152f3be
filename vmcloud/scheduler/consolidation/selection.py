"""Which VM to move off an overloaded host: MMT, MC, MU, RS."""
import abc

import numpy as np

from vmcloud.scheduler.consolidation import compiled
from vmcloud.scheduler.consolidation import stats
from vmcloud.scheduler.consolidation import view


class VmSelector(abc.ABC):
    @abc.abstractmethod
    def select(self, cluster: view.ClusterView, host: int) -> int | None:
        """A VM of ``host`` that is not migrating already, or None if there is none."""


class MinimumMigrationTime(VmSelector):
    """The VM with the least RAM (the first such in the host's list)."""

    def select(self, cluster: view.ClusterView, host):
        return min(cluster.migratable(host), key=lambda v: cluster.vm_ram[v], default=None)


class MinimumUtilization(VmSelector):
    """The VM requesting the smallest fraction of its MIPS."""

    def select(self, cluster: view.ClusterView, host):
        return min(cluster.migratable(host), key=lambda v: cluster.vm_util[v], default=None)


class RandomSelection(VmSelector):
    """A VM drawn with the cluster's seeded random generator."""

    def select(self, cluster: view.ClusterView, host):
        vms = cluster.migratable(host)
        if not vms:
            return None
        return vms[cluster.rng.randrange(len(vms))]


class MaximumCorrelation(VmSelector):
    """The VM whose utilisation history the others' histories explain best (largest R^2).

    Falls back to MMT when the regression cannot be made (a single VM, or fewer
    history values than VMs).
    """

    def __init__(self, fallback: VmSelector | None = None):
        self.fallback = fallback or MinimumMigrationTime()

    def select(self, cluster: view.ClusterView, host):
        vms = cluster.migratable(host)
        if not vms:
            return None
        try:
            metrics = self.correlations(cluster, vms)
        except ValueError:
            return self.fallback.select(cluster, host)
        best, best_metric = 0, 5e-324  # Java's Double.MIN_VALUE: only positive R^2 wins
        for i, m in enumerate(metrics):
            if m > best_metric:
                best, best_metric = i, m
        return vms[best]

    @staticmethod
    def correlations(cluster: view.ClusterView, vms: list[int]) -> np.ndarray:
        m = int(min(cluster.vm_hist_len[v] for v in vms))
        rows = cluster.vm_hist[vms, :m]
        kernels = compiled.kernels
        if kernels is None:
            return stats.r_squared_each(rows)
        # contiguous floats: a buffer mismatch is a ValueError too, not a short history
        return kernels.r_squared_each(np.ascontiguousarray(rows, dtype=float))
