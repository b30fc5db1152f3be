"""Where to put a VM: power-aware best fit (PABFD), and plain first fit."""
import abc

import numpy as np


class Placement(abc.ABC):
    def __init__(self, detector=None):
        self.detector = detector

    @abc.abstractmethod
    def find_host(self, cluster, vm: int, excluded: np.ndarray) -> int:
        """The host for ``vm`` among those not ``excluded`` (a bool per host), or -1."""


class PowerAwareBestFit(Placement):
    """The host whose power draw grows least, among those with room that the VM would not overload.

    As CloudSim 3.0.3: the increase is power(MIPS allocated to the host's VMs now + the
    VM's request) - power(utilisation measured at the last update). The allocation
    includes VMs placed earlier in the same planning round (``Cluster.alloc_mips``); a
    host with nothing allocated is not checked for overload. Ties go to the first host.
    """

    def find_host(self, cluster, vm, excluded):
        hosts = cluster.candidates()
        r = cluster.vm_req[vm]
        ok = ((cluster.host_pe_mips[hosts] >= r) & (cluster.avail[hosts] >= r)
              & ~excluded[hosts])
        if cluster.vm_ram_req[vm] or cluster.vm_bw_req[vm]:
            ok &= ((cluster.host_ram[hosts] - cluster.ram_used[hosts] >= cluster.vm_ram_req[vm])
                   & (cluster.host_bw[hosts] - cluster.bw_used[hosts] >= cluster.vm_bw_req[vm]))
        hosts = hosts[ok]
        if not len(hosts):
            return -1
        after = (cluster.alloc_mips[hosts] + r) / cluster.host_mips[hosts]
        fits = after <= 1.0 + 1e-9
        if not fits.all():
            hosts, after = hosts[fits], after[fits]
            if not len(hosts):
                return -1
        diff = cluster.power(after, hosts) - cluster.power_now[hosts]
        order = np.argsort(diff, kind='stable')
        hosts = hosts[order]
        if self.detector is None:
            return int(hosts[0])
        busy = cluster.alloc_mips[hosts] != 0
        if not busy[0]:
            return int(hosts[0])
        # check a few in order first: usually the best one is fine
        head = hosts[:4]
        bad = self.detector.overloaded_after(cluster, head, vm) & busy[:4]
        ok = np.flatnonzero(~bad)
        if len(ok):
            return int(head[ok[0]])
        rest = hosts[4:]
        if not len(rest):
            return -1
        bad = self.detector.overloaded_after(cluster, rest, vm) & busy[4:]
        ok = np.flatnonzero(~bad)
        return int(rest[ok[0]]) if len(ok) else -1


class FirstFit(Placement):
    """The first host with room for the VM (CloudSim's PowerVmAllocationPolicySimple)."""

    def find_host(self, cluster, vm, excluded):
        hosts = np.flatnonzero(cluster.suitable(vm) & ~excluded)
        return int(hosts[0]) if len(hosts) else -1
