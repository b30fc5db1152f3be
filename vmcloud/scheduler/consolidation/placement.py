"""Where to put a VM: power-aware best fit (PABFD), and plain first fit."""
import abc

import numpy as np

from vmcloud.scheduler.consolidation import compiled
from vmcloud.scheduler.consolidation import view


class Placement(abc.ABC):
    def __init__(self, detector=None):
        self.detector = detector

    @abc.abstractmethod
    def find_host(self, cluster: view.ClusterView, vm: int, excluded: np.ndarray) -> int:
        """The host for ``vm`` among those not ``excluded`` (a bool per host), or -1."""

    def place(self, cluster: view.ClusterView, vms, excluded: np.ndarray,
              all_or_nothing: bool = False) -> list[tuple[int, int]]:
        """Place ``vms`` in this order, each where :meth:`find_host` says, attaching as it goes.

        :returns: (vm, host) of those placed; with ``all_or_nothing``, [] as soon as
            one has no host (the ones placed before it are detached again).
        """
        placed = []
        find = self.searcher(cluster, excluded)
        for vm in vms:
            host = find(vm)
            if host < 0:
                if all_or_nothing:
                    for vm_placed, its_host in placed:
                        cluster.detach(vm_placed, its_host)
                    return []
                continue
            cluster.attach(vm, host)
            placed.append((vm, host))
        return placed

    def searcher(self, cluster: view.ClusterView, excluded: np.ndarray):
        """:meth:`find_host` as a function of the VM, for placements in a row (between
        which the cluster changes only by attach and detach)."""
        return lambda vm: self.find_host(cluster, vm, excluded)


class PowerAwareBestFit(Placement):
    """The host whose power draw grows least, among those with room that the VM would not overload.

    As CloudSim 3.0.3: the increase is power(MIPS allocated to the host's VMs now + the
    VM's request) - power(utilisation measured at the last update). The allocation
    includes VMs placed earlier in the same planning round (``Cluster.alloc_mips``); a
    host with nothing allocated is not checked for overload. Ties go to the first host.
    """

    # detectors whose overloaded_after is costly check hosts in order, this many at a time
    CHUNKS = ((0, 8), (8, 40), (40, None))

    def find_host(self, cluster: view.ClusterView, vm, excluded):
        return self.searcher(cluster, excluded)(vm)

    def searcher(self, cluster: view.ClusterView, excluded):
        if self._compiled_check(cluster) is None:
            return lambda vm: self.find_host_numpy(cluster, vm, excluded)
        excluded = np.asarray(excluded, dtype=bool).view(np.uint8)
        table = cluster.power_table
        view = search = None

        def find(vm):
            nonlocal view, search
            if cluster.candidate_view() is not view:
                view = cluster.candidate_view()
                # a search and its check read the same arrays: made together
                search = compiled.kernels.Search(
                    *view, cluster.alloc_mips, cluster.avail, excluded, cluster.host_ram,
                    cluster.ram_used, cluster.host_bw, cluster.bw_used, table.watts,
                    table.steps, table.width, self._compiled_check(cluster))
            return search.best_host(vm, cluster.vm_req[vm], cluster.vm_ram_req[vm],
                                    cluster.vm_bw_req[vm])
        return find

    def _compiled_check(self, cluster: view.ClusterView):
        kernels = compiled.kernels
        if kernels is None:
            return None
        if self.detector is None:
            return kernels.NeverOverloaded(cluster.n_hosts, cluster.n_vms)
        return self.detector.after_check(cluster)

    def find_host_numpy(self, cluster: view.ClusterView, vm, excluded):
        """The search as numpy calls: where the compiled one is missing, and its reference."""
        hosts, pe_mips, mips, power_now = cluster.candidate_view()
        r = cluster.vm_req[vm]
        alloc = cluster.alloc_mips[hosts]
        after = (alloc + r) / mips
        ok = (pe_mips >= r) & (cluster.avail[hosts] >= r) & (after <= 1.0 + 1e-9)
        ok &= ~excluded[hosts]
        if cluster.vm_ram_req[vm] or cluster.vm_bw_req[vm]:
            ok &= ((cluster.host_ram[hosts] - cluster.ram_used[hosts] >= cluster.vm_ram_req[vm])
                   & (cluster.host_bw[hosts] - cluster.bw_used[hosts] >= cluster.vm_bw_req[vm]))
        idx = ok.nonzero()[0]
        if not idx.size:
            return -1
        diff = cluster.power_table.at(hosts[idx], after[idx]) - power_now[idx]
        if self.detector is None:
            return int(hosts[idx[diff.argmin()]])
        busy = alloc[idx] != 0
        if not busy.any():
            return int(hosts[idx[diff.argmin()]])
        if self.detector.cheap_after:
            bad = busy
            bad[busy] = self.detector.overloaded_after(cluster, hosts[idx[busy]], vm)
            if bad.all():
                return -1
            diff[bad] = np.inf
            return int(hosts[idx[diff.argmin()]])
        order = diff.argsort(kind='stable')
        idx, busy = idx[order], busy[order]
        # In order of increase, a few at a time: the VM often overloads the first hosts.
        for first, last in self.CHUNKS:
            part = idx[first:last]
            if not part.size:
                break
            bad = busy[first:last].copy()
            if bad.any():
                bad[bad] = self.detector.overloaded_after(cluster, hosts[part[bad]], vm)
            if not bad.all():
                return int(hosts[part[bad.argmin()]])
        return -1


class FirstFit(Placement):
    """The first host with room for the VM (CloudSim's PowerVmAllocationPolicySimple)."""

    def find_host(self, cluster: view.ClusterView, vm, excluded):
        hosts = np.flatnonzero(cluster.suitable(vm) & ~excluded)
        return int(hosts[0]) if len(hosts) else -1
