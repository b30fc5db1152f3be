"""The placement that consolidation policies see: hosts, the VMs on each, demands and histories.

It mirrors what CloudSim's policies read during ``optimizeAllocation``: the VM lists
(which the policies change freely while they plan, then put back), the MIPS each VM
requests now, the MIPS each host's scheduler still has free, and each host's
utilisation as measured at the last update (which planning does not change).
"""
import math
import random

import numpy as np

from vmcloud.sim import power as power_models

HISTORY_LENGTH = 30


def sum_by_host(hosts: np.ndarray, values: np.ndarray, n_hosts: int) -> np.ndarray:
    """values summed per host (floats even when there are none: bincount gives ints then)."""
    return np.bincount(hosts, values, minlength=n_hosts).astype(float, copy=False)


class Cluster:
    def __init__(self, hosts, vms, seed: int = 0, interval: float = 300.0):
        self.interval = interval
        self.n_hosts = len(hosts)
        self.n_vms = len(vms)
        self.host_types = sorted(set(hosts), key=hosts.index)
        self.host_type = np.array([self.host_types.index(h) for h in hosts], dtype=np.int64)
        self.host_mips = np.array([h.mips for h in hosts], dtype=float)
        self.host_pe_mips = np.array([h.pe_mips for h in hosts], dtype=float)
        self.host_ram = np.array([h.ram_mb for h in hosts], dtype=float)
        self.host_bw = np.array([h.bw_kbps for h in hosts], dtype=float)
        self.vm_mips = np.array([v.mips for v in vms], dtype=float)
        self.vm_ram = np.array([v.ram_mb for v in vms], dtype=float)
        self.vm_bw = np.array([v.bw_kbps for v in vms], dtype=float)
        # RAM and bandwidth a VM holds on its host (its size is vm_ram either way)
        self.vm_ram_req = self.vm_ram.copy()
        self.vm_bw_req = self.vm_bw.copy()
        # per host: a VM's migration takes RAM / (BW / 2) (half the link is left to the guests)
        self.host_migration_rate = self.host_bw / (2 * 8000)  # MB/s
        # ceil(migration time / interval) if it is the same for any VM to any host
        self.migration_steps = None
        if self.n_vms and self.n_hosts:
            longest = self.vm_ram.max() / self.host_migration_rate.min()
            shortest = self.vm_ram.min() / self.host_migration_rate.max()
            if math.ceil(longest / interval) == math.ceil(shortest / interval):
                self.migration_steps = math.ceil(longest / interval)
        self.vm_host = np.full(self.n_vms, -1, dtype=np.int64)
        self.host_vms: list[list[int]] = [[] for _ in range(self.n_hosts)]
        self.vm_util = np.zeros(self.n_vms)       # fraction of its MIPS requested now
        self.vm_req = np.zeros(self.n_vms)        # MIPS requested now
        self.vm_hist = np.zeros((self.n_vms, HISTORY_LENGTH))  # newest first
        self.vm_hist_len = np.zeros(self.n_vms, dtype=np.int64)
        self.in_migration = np.zeros(self.n_vms, dtype=bool)
        self.util_mips = np.zeros(self.n_hosts)   # measured at the last update
        self.req_sum = np.zeros(self.n_hosts)
        self.avail = self.host_mips.copy()
        self.ram_used = np.zeros(self.n_hosts)
        self.bw_used = np.zeros(self.n_hosts)
        self.ram_max = np.zeros(self.n_hosts)
        self.hist = np.zeros((self.n_hosts, HISTORY_LENGTH))
        self.track_history = True
        self._saved_lists: dict[int, list[int]] | None = None   # see snapshot()
        self.rng = random.Random(seed)
        self.power_table = power_models.PowerTable([self.host_types[t].power
                                                    for t in self.host_type])
        self._rows = np.arange(self.n_hosts)
        self.measured(self.util_mips)

    def measured(self, util_mips: np.ndarray) -> None:
        """Set the hosts' utilisation measured at an update (fixed while planning)."""
        self.util_mips = util_mips
        # MIPS the hosts' schedulers hand out to the VMs on their lists: what CloudSim's
        # policy reads as a host's utilisation while planning (getUtilizationOfCpuMips)
        self.alloc_mips = util_mips.copy()
        u = util_mips / self.host_mips
        self.util_now = np.where((u > 1) & (u < 1.01), 1.0, u)
        self.power_now = self.power(np.minimum(self.util_now, 1.0))
        self.on = np.flatnonzero(util_mips != 0)
        self._idle_by_type = [np.flatnonzero((util_mips == 0) & (self.host_type == t)).tolist()
                              for t in range(len(self.host_types))]
        self._touched_off: set[int] = set()
        self._candidates = None

    # -- what the policies read ---------------------------------------------------------

    def utilization(self) -> np.ndarray:
        """Host CPU utilisation at the last update (CloudSim's getUtilizationOfCpu)."""
        return self.util_now

    def power(self, utilization: np.ndarray, hosts: np.ndarray | None = None) -> np.ndarray:
        """Watts of ``hosts`` (default: all) at ``utilization`` (clipped to [0, 1])."""
        return self.power_table.at(self._rows if hosts is None else hosts,
                                   np.clip(utilization, 0.0, 1.0))

    def candidate_view(self) -> tuple[np.ndarray, ...]:
        """The hosts a placement must consider, in list order, with their PE MIPS,
        MIPS and power now.

        Hosts that were idle at the last update and have taken nothing since are
        interchangeable within a host type, so only the first of each type is kept.
        Cached until that changes: a placement reads them for every VM.
        """
        if self._candidates is None:
            touched = self._touched_off
            first_idle = [next((h for h in idle if h not in touched), None)
                          for idle in self._idle_by_type]
            hosts = np.sort(np.concatenate([
                self.on, np.fromiter(touched, dtype=np.int64, count=len(touched)),
                np.array([h for h in first_idle if h is not None], dtype=np.int64)]))
            self._candidates = (hosts, self.host_pe_mips[hosts], self.host_mips[hosts],
                                self.power_now[hosts])
        return self._candidates

    def suitable(self, vm: int) -> np.ndarray:
        """Hosts that can take ``vm`` now: a PE, free MIPS, RAM and bandwidth for its request."""
        r = self.vm_req[vm]
        return ((self.host_pe_mips >= r) & (self.avail >= r)
                & (self.host_ram - self.ram_used >= self.vm_ram_req[vm])
                & (self.host_bw - self.bw_used >= self.vm_bw_req[vm]))

    def migration_time(self, vm: int, host: int) -> float:
        return self.vm_ram[vm] / self.host_migration_rate[host]

    def migratable(self, host: int) -> list[int]:
        return [v for v in self.host_vms[host] if not self.in_migration[v]]

    # -- what planning changes ------------------------------------------------------------

    def attach(self, vm: int, host: int) -> None:
        """Create ``vm`` on ``host`` (CloudSim's Host.vmCreate)."""
        self._changing(host).append(vm)
        r = self.vm_req[vm]
        self.req_sum[host] += r
        pe = self.host_pe_mips[host]
        c = r if r < pe else pe
        free = self.avail[host]
        if free >= c:
            self.avail[host] = free - c
            self.alloc_mips[host] += c
        else:
            self.avail[host] = 0.0
            self._oversubscribed(host)
        self.ram_used[host] += self.vm_ram_req[vm]
        self.bw_used[host] += self.vm_bw_req[vm]
        if self.vm_ram[vm] > self.ram_max[host]:
            self.ram_max[host] = self.vm_ram[vm]
        if self.track_history:
            self.hist[host] += self.vm_hist[vm] * self.vm_mips[vm] / self.host_mips[host]
        if self.util_mips[host] == 0 and host not in self._touched_off:
            self._touched_off.add(host)
            self._candidates = None

    def detach(self, vm: int, host: int) -> None:
        """Destroy ``vm`` on ``host`` (CloudSim's Host.vmDestroy): the rest is allocated anew."""
        vms = self._changing(host)
        vms.remove(vm)
        req = self.vm_req
        pe = self.host_pe_mips[host]
        s = 0.0
        free = self.host_mips[host]
        ram = bw = ram_max = 0.0
        for v in vms:
            r = req[v]
            s += r
            c = r if r < pe else pe
            free = free - c if free >= c else 0.0
            ram += self.vm_ram_req[v]
            bw += self.vm_bw_req[v]
            if self.vm_ram[v] > ram_max:
                ram_max = self.vm_ram[v]
        self.req_sum[host] = s
        self.avail[host] = free
        self._oversubscribed(host)
        self.ram_used[host] = ram
        self.bw_used[host] = bw
        self.ram_max[host] = ram_max
        if self.track_history:
            if vms:
                self.hist[host] = (self.vm_hist[vms] * (self.vm_mips[vms] / self.host_mips[host])
                                   [:, None]).sum(axis=0)
            else:
                self.hist[host] = 0.0

    def _oversubscribed(self, host: int) -> None:
        """The scheduler's allocation after (de)allocating: requests, scaled down if too many."""
        vms = self.host_vms[host]
        cap = np.minimum(self.vm_req[vms], self.host_pe_mips[host])
        total = float(cap.sum())
        if total <= self.host_mips[host]:
            self.alloc_mips[host] = total
        else:
            self.alloc_mips[host] = float(np.floor(cap * (self.host_mips[host] / total)).sum())

    def recompute(self) -> None:
        """Recompute every host's sums from the VM lists at once."""
        placed = self.vm_host >= 0
        vms = np.flatnonzero(placed)
        hosts = self.vm_host[vms]
        n = self.n_hosts
        req = self.vm_req[vms]
        cap = np.minimum(req, self.host_pe_mips[hosts])
        self.req_sum = sum_by_host(hosts, req, n)
        cap_sum = sum_by_host(hosts, cap, n)
        self.avail = np.where(cap_sum <= self.host_mips, self.host_mips - cap_sum, 0.0)
        self.ram_used = sum_by_host(hosts, self.vm_ram_req[vms], n)
        self.bw_used = sum_by_host(hosts, self.vm_bw_req[vms], n)
        ram_max = np.zeros(n)
        np.maximum.at(ram_max, hosts, self.vm_ram[vms])
        self.ram_max = ram_max
        if self.track_history:
            w = self.vm_hist[vms] * (self.vm_mips[vms] / self.host_mips[hosts])[:, None]
            idx = (hosts[:, None] * HISTORY_LENGTH + np.arange(HISTORY_LENGTH)).ravel()
            self.hist = sum_by_host(idx, w.ravel(), n * HISTORY_LENGTH).reshape(
                n, HISTORY_LENGTH)
        self._candidates = None

    def _changing(self, host: int) -> list[int]:
        """The VM list of ``host``, about to change: kept first if a snapshot is open."""
        vms = self.host_vms[host]
        saved = self._saved_lists
        if saved is not None and host not in saved:
            saved[host] = list(vms)
        return vms

    def snapshot(self):
        """The state planning changes, for one :meth:`restore`; VM lists are kept as
        they change (few do). One snapshot at a time."""
        self._saved_lists = {}
        return (self._saved_lists, self.req_sum.copy(), self.avail.copy(),
                self.ram_used.copy(), self.bw_used.copy(), self.ram_max.copy(),
                self.hist.copy(), set(self._touched_off), self.alloc_mips.copy())

    def restore(self, saved) -> None:
        (lists, self.req_sum, self.avail, self.ram_used, self.bw_used, self.ram_max,
         self.hist, self._touched_off, self.alloc_mips) = saved
        for host, vms in lists.items():
            self.host_vms[host] = vms
        self._saved_lists = None
        self._candidates = None
