"""The trace-driven datacenter simulation: a step every interval, migrations in between.

Time advances as in CloudSim 3.0.3's PowerDatacenter. VMs are placed at time 0 and
start at ``submit_delay``; every ``interval`` seconds after that each host's VMs
get their share of the host's MIPS, energy and SLA counters advance, and the
consolidation policy (if any) plans migrations. A migration takes RAM / (BW / 2)
seconds; meanwhile the VM gets 90% of its demand at its source and costs the target
10% of it. When it ends, all hosts are brought up to date again.

Deterministic: the only randomness is the cluster's generator, seeded.
"""
import dataclasses
import heapq
import math
import time as time_module

import numpy as np

from vmcloud.scheduler.consolidation import placement as placement_module
from vmcloud.sim import cluster as cluster_module
from vmcloud.sim import errors

MIGRATING_OUT_SHARE = 0.9
MIGRATING_IN_SHARE = 0.1


@dataclasses.dataclass
class Result:
    workload: str
    policy: str
    param: float | None
    hosts: int
    vms: int
    vms_placed: int
    energy_kwh: float
    migrations: int
    slatah: float
    pdm: float
    sla_overall: float
    host_shutdowns: int
    simulated_seconds: float
    steps: int
    wall_seconds: float = 0.0
    series: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def slav(self) -> float:
        return self.slatah * self.pdm

    @property
    def esv(self) -> float:
        return self.energy_kwh * self.slav

    def summary(self) -> dict:
        """The metrics as one flat record."""
        return {
            'workload': self.workload, 'policy': self.policy, 'param': self.param,
            'hosts': self.hosts, 'vms': self.vms, 'energy_kwh': round(self.energy_kwh, 2),
            'migrations': self.migrations, 'slatah': float(self.slatah), 'pdm': float(self.pdm),
            'slav': float(self.slav), 'esv': float(self.esv),
            'sla_overall': float(self.sla_overall), 'host_shutdowns': self.host_shutdowns,
            'simulated_seconds': float(self.simulated_seconds),
            'wall_seconds': round(self.wall_seconds, 3),
        }


class Simulation:
    """One run of ``scenario`` under ``policy`` (a consolidation Policy, or None: no migration).

    Without a policy VMs are placed first-fit and never move (CloudSim's "dvfs"
    baseline: hosts draw power by utilisation, idle ones nothing). With one, the
    initial placement uses the policy's own placement, as CloudSim does.
    """

    def __init__(self, scenario, policy=None, seed: int = 0, param: float | None = None,
                 submit_delay: float = 0.1, limit: float | None = None):
        self.scenario = scenario
        self.policy = policy
        self.param = param
        self.interval = scenario.sample_interval
        self.submit_delay = submit_delay
        self.limit = scenario.duration if limit is None else limit
        c = self.cluster = cluster_module.Cluster(scenario.hosts, scenario.vms, seed,
                                                  self.interval)
        c.track_history = bool(policy is not None and policy.detector.uses_history)
        self.util_t = np.ascontiguousarray(scenario.utilization.T)
        # (VM, target) in start order; a VM can be planned twice in a round (moved onto a host
        # that is then emptied), and is then here twice
        self.migrating_in: list[tuple[int, int]] = []
        self.events: list = []
        self._seq = 0
        n = c.n_hosts
        self.energy_ws = 0.0
        self.migrations = 0
        self.active_time = 0.0
        self.violation_time = 0.0
        self.requested_mips_s = 0.0
        self.allocated_mips_s = 0.0
        self.migration_shortfall = 0.0
        self.shutdowns = 0
        self.retired = 0
        self.last_time = None
        self.prev_frac = np.zeros(n)
        self.prev_power = np.zeros(n)
        self.h_alloc = np.zeros(n)
        self.h_req = np.zeros(n)
        self.h_active = np.zeros(n, dtype=bool)
        self.h_was_active = np.ones(n, dtype=bool)
        self.v_alloc = self.v_req = self.v_mig = None
        self.series = {'time': [], 'active_hosts': [], 'sla_violation': [], 'migrations': [],
                       'power_w': []}

    # -- placement at time 0 ----------------------------------------------------------------

    def place_initial(self) -> None:
        c = self.cluster
        place = (self.policy.placement if self.policy is not None
                 else placement_module.FirstFit())
        c.vm_req = c.vm_mips.copy()      # a VM being created asks for all of its MIPS
        c.vm_util = np.ones(c.n_vms)
        c.measured(np.zeros(c.n_hosts))
        find = place.searcher(c, np.zeros(c.n_hosts, dtype=bool))
        for vm in range(c.n_vms):
            host = find(vm)
            if host >= 0:
                c.attach(vm, host)
                c.vm_host[vm] = host
                # Created, it keeps its MIPS allocated but asks for nothing until its
                # workload starts: overload checks of later placements do not count it.
                c.req_sum[host] -= c.vm_req[vm]
        self.placed = np.flatnonzero(c.vm_host >= 0)
        self.all_placed = len(self.placed) == c.n_vms
        if not self.scenario.reserve_ram:
            c.vm_ram_req[:] = 0.0
            c.vm_bw_req[:] = 0.0

    # -- the state of every host at one instant ---------------------------------------------

    def utilization_at(self, t: float) -> np.ndarray:
        si = self.interval
        last = self.util_t.shape[0] - 1
        if math.fmod(t, si) == 0:
            return self.util_t[min(int(t) // int(si), last)]
        k1 = math.floor(t / si)
        k2 = math.ceil(t / si)
        u1 = self.util_t[min(k1, last)]
        u2 = self.util_t[min(k2, last)]
        return u1 + (u2 - u1) / ((k2 - k1) * si) * (t - k1 * si)

    def _evaluate(self, t: float):
        c = self.cluster
        n = c.n_hosts
        u_all = self.utilization_at(t)
        if self.all_placed:
            u = u_all
            h = c.vm_host
            mig = c.in_migration
            mips = c.vm_mips
        else:
            p = self.placed
            u = u_all[p]
            h = c.vm_host[p]
            mig = c.in_migration[p]
            mips = c.vm_mips[p]
        req = u * mips
        cap = np.minimum(req, c.host_pe_mips[h])
        eff = cluster_module.sum_by_host(h, cap, n)
        if self.migrating_in:
            mv, mh = np.array(self.migrating_in, dtype=np.int64).T
            req_in = u_all[mv] * c.vm_mips[mv]
            cap_in = np.minimum(req_in, c.host_pe_mips[mh])
            eff = eff + cluster_module.sum_by_host(mh, cap_in * MIGRATING_IN_SHARE, n)
        over = eff > c.host_mips
        share = np.ones(len(h))
        share[mig] = MIGRATING_OUT_SHARE
        if over.any():
            factor = np.where(over, c.host_mips / np.where(over, eff, 1.0), 1.0)
            alloc = cap * factor[h] * share
            oh = over[h]
            alloc[oh] = np.floor(alloc[oh])
        else:
            factor = None
            alloc = cap * share
        contrib = np.where(mig, alloc / MIGRATING_OUT_SHARE, alloc)
        util_mips = cluster_module.sum_by_host(h, contrib, n)
        host_req = cluster_module.sum_by_host(h, req, n)
        if self.migrating_in:
            alloc_in = cap_in * MIGRATING_IN_SHARE
            if factor is not None:
                alloc_in = alloc_in * factor[mh]
                alloc_in = np.where(over[mh], np.floor(alloc_in), alloc_in)
            util_mips += cluster_module.sum_by_host(mh, alloc_in, n)
            host_req += cluster_module.sum_by_host(mh, req_in, n)
        return u_all, req, alloc, mig.copy(), util_mips, host_req

    def _tick(self, t: float, step: bool = False, datacenter: bool = True) -> None:
        """Bring every host up to time ``t``: energy and SLA since the last tick, new state.

        A datacenter-wide update (not the one hosts do when a migration starts) also
        retires the VMs that request nothing now: their PlanetLab cloudlet is over, as
        CloudSim decides (PowerDatacenter: "remove completed VMs").
        """
        c = self.cluster
        u_all, req, alloc, mig, util_mips, host_req = self._evaluate(t)
        frac = util_mips / c.host_mips
        frac = np.where((frac > 1) & (frac < 1.01), 1.0, frac)
        power = c.power(frac)
        if self.last_time is not None and t > self.last_time:
            dt = t - self.last_time
            self.energy_ws += float(
                np.where(self.prev_frac != 0, (self.prev_power + power) / 2 * dt, 0.0).sum())
            act = self.h_active
            self.active_time += dt * int(act.sum())
            self.violation_time += dt * int((act & (self.h_alloc < self.h_req)).sum())
            self.requested_mips_s += float(self.v_req.sum()) * dt
            self.allocated_mips_s += float(self.v_alloc.sum()) * dt
            short = (self.v_alloc < self.v_req) & self.v_mig
            if short.any():
                shortfall = self.v_req[short] - self.v_alloc[short]
                self.migration_shortfall += float(shortfall.sum()) * dt
            self._count_shutdowns()
        self.last_time = t
        self.prev_frac = frac
        self.prev_power = power
        self.h_alloc = util_mips
        self.h_req = host_req
        self.h_active = util_mips > 0
        self.v_alloc, self.v_req, self.v_mig = alloc, req, mig
        if datacenter:
            self._retire_idle(req, mig)
        if step:
            self._new_history_value(t, u_all)
            c.vm_util = u_all
            c.vm_req = u_all * c.vm_mips
            c.recompute()
            c.measured(util_mips)

    def _retire_idle(self, req: np.ndarray, mig: np.ndarray) -> None:
        done = (req == 0) & ~mig
        if not done.any():
            return
        c = self.cluster
        vms = self.placed[done] if not self.all_placed else np.flatnonzero(done)
        for vm in vms:
            c.host_vms[int(c.vm_host[vm])].remove(int(vm))
            c.vm_host[vm] = -1
        keep = ~done
        self.placed = np.flatnonzero(c.vm_host >= 0)
        self.all_placed = False
        self.retired += len(vms)
        self.v_alloc = self.v_alloc[keep]
        self.v_req = self.v_req[keep]
        self.v_mig = self.v_mig[keep]

    def _count_shutdowns(self) -> None:
        self.shutdowns += int((self.h_was_active & ~self.h_active).sum())
        self.h_was_active = self.h_active

    def _new_history_value(self, t: float, u_all: np.ndarray) -> None:
        # CloudSim's PowerVm keeps a value when (clock - 0.1) is a multiple of the interval
        if math.fmod(t - self.submit_delay, self.interval) != 0:
            return
        c = self.cluster
        hist = c.vm_hist
        hist[:, 1:] = hist[:, :-1].copy()
        hist[:, 0] = u_all
        if not self.all_placed:
            unplaced = c.vm_host < 0
            hist[unplaced, 0] = 0.0
        np.minimum(c.vm_hist_len + 1, cluster_module.HISTORY_LENGTH, out=c.vm_hist_len)

    # -- migrations ---------------------------------------------------------------------------

    def _start(self, t: float, migrations) -> None:
        c = self.cluster
        for vm, target in migrations:
            c.in_migration[vm] = True
            self.migrating_in.append((vm, target))
            self._seq += 1
            heapq.heappush(self.events, (t + c.migration_time(vm, target), self._seq, vm, target))
        self.migrations += len(migrations)

    def _finish(self, vm: int, target: int) -> None:
        c = self.cluster
        source = int(c.vm_host[vm])
        c.host_vms[source].remove(vm)
        c.host_vms[target].append(vm)
        c.vm_host[vm] = target
        c.in_migration[vm] = False
        self.migrating_in.remove((vm, target))

    def _finish_due(self, until: float) -> None:
        """Complete the migrations that end before ``until``, in time order."""
        while self.events and self.events[0][0] < until and self.events[0][0] <= self.limit:
            t = self.events[0][0]
            self._tick(t)
            while self.events and self.events[0][0] == t:
                _, _, vm, target = heapq.heappop(self.events)
                self._finish(vm, target)
            self._tick(t)

    # -- the run --------------------------------------------------------------------------------

    def run(self, progress=None) -> Result:
        started = time_module.perf_counter()
        self.place_initial()
        c = self.cluster
        t = self.submit_delay + self.interval
        total = int((self.limit - self.submit_delay) // self.interval)
        steps = 0
        last_active = last_violation = 0.0
        while t <= self.limit:
            self._finish_due(t)
            self._tick(t, step=True)
            steps += 1
            moves = self.policy.plan(c) if self.policy is not None else []
            if moves:
                self._start(t, moves)
                self._tick(t, datacenter=False)
            act = self.active_time - last_active
            viol = self.violation_time - last_violation
            last_active, last_violation = self.active_time, self.violation_time
            s = self.series
            s['time'].append(t)
            s['active_hosts'].append(int(self.h_active.sum()))
            s['sla_violation'].append(viol / act if act else 0.0)
            s['migrations'].append(len(moves))
            s['power_w'].append(float(np.where(self.h_active, self.prev_power, 0.0).sum()))
            if progress is not None:
                progress(steps, total)
            t = t + self.interval
        self._finish_due(math.inf)
        self._count_shutdowns()   # the last state counts for shutdowns, not for time
        return self._result(steps, time_module.perf_counter() - started)

    def _result(self, steps: int, wall: float) -> Result:
        c = self.cluster
        slatah = self.violation_time / self.active_time if self.active_time else 0.0
        pdm = (self.migration_shortfall / self.requested_mips_s
               if self.requested_mips_s else 0.0)
        overall = ((self.requested_mips_s - self.allocated_mips_s) / self.requested_mips_s
                   if self.requested_mips_s else 0.0)
        return Result(
            workload=self.scenario.workload, policy=self.policy.name if self.policy else 'none',
            param=self.param, hosts=c.n_hosts, vms=c.n_vms, vms_placed=len(self.placed),
            energy_kwh=self.energy_ws / 3.6e6, migrations=self.migrations, slatah=slatah,
            pdm=pdm, sla_overall=overall, host_shutdowns=self.shutdowns,
            simulated_seconds=self.last_time or 0.0, steps=steps, wall_seconds=wall,
            series=self.series)


def simulate(workload: str, policy: str = 'lr-mmt', param: float | None = None,
             hosts: int = 800, seed: int = 0, path: str | None = None, progress=None) -> Result:
    """Run one policy (``none`` for no migration) on one PlanetLab day.

    :raises: WorkloadNotFound, UnknownPolicy.
    """
    from vmcloud import exception
    from vmcloud.scheduler import consolidation
    from vmcloud.sim import model
    if hosts < 1:
        raise errors.SimulationError('need at least one host')
    pol = None
    if policy.lower() != 'none':
        try:
            pol = consolidation.load(policy, param)
        except (exception.PluginNotFound, ValueError) as exc:
            raise errors.UnknownPolicy(f'unknown policy {policy!r}: {exc}') from exc
    scenario = model.planetlab(workload, hosts, path)
    return Simulation(scenario, pol, seed=seed, param=param).run(progress)
