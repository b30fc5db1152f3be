"""Dynamic VM consolidation: find overloaded and underloaded hosts, and plan migrations.

A policy is three plugins: an overload detector (``vmcloud.consolidation.overload``:
thr, iqr, mad, lr, lrr), a VM selector (``vmcloud.consolidation.selection``: mmt,
mc, mu, rs) and a placement (``vmcloud.consolidation.placement``: pabfd,
first-fit). They plan on a :class:`view.ClusterView`, the narrow protocol of what
they read and the few methods that change a plan (the simulator's Cluster is one),
so the same objects plan for simulated hosts and for real ones described the same way.

The planning follows Beloglazov & Buyya (CCPE 2012) as CloudSim 3.0.3 implements
it (PowerVmAllocationPolicyMigrationAbstract.optimizeAllocation).
"""
import dataclasses

import numpy as np

from vmcloud import plugins
from vmcloud.scheduler.consolidation import view

OVERLOAD_NAMESPACE = 'vmcloud.consolidation.overload'
SELECTION_NAMESPACE = 'vmcloud.consolidation.selection'
PLACEMENT_NAMESPACE = 'vmcloud.consolidation.placement'


@dataclasses.dataclass
class Policy:
    detector: object
    selector: object
    placement: object
    name: str = ''

    def plan(self, cluster: view.ClusterView) -> list[tuple[int, int]]:
        """Migrations (vm, target host), in the order they should start.

        The cluster's VM lists are changed while planning and put back at the end.
        """
        saved = cluster.snapshot()
        try:
            return self._plan(cluster)
        finally:
            cluster.restore(saved)

    def _plan(self, cluster: view.ClusterView):
        n = cluster.n_hosts
        all_hosts = np.arange(n)
        over = self.detector.overloaded(cluster, all_hosts)
        check = self.detector.after_check(cluster)
        if check is not None:
            still_overloaded = check.now
        else:
            def still_overloaded(host):
                return self.detector.overloaded(cluster, np.array([host]))[0]
        to_move = []
        for h in np.flatnonzero(over).tolist():
            while True:
                vm = self.selector.select(cluster, h)
                if vm is None:
                    break
                to_move.append(vm)
                cluster.detach(vm, h)
                if not still_overloaded(h):
                    break
        # hosts that were overloaded take nothing; place the busiest VMs first
        to_move.sort(key=lambda v: -cluster.vm_req[v])
        migrations = self.placement.place(cluster, to_move, over)
        migrations += self._empty_underloaded(cluster, over)
        return migrations

    def _empty_underloaded(self, cluster: view.ClusterView, over):
        util = cluster.utilization()
        off = cluster.util_mips == 0
        skip = over | off              # never chosen as underloaded
        closed = over | off            # never a target
        moves = []
        # least utilised first (ties to the first host); a host that takes VMs is skipped
        open_ = np.flatnonzero((util > 0) & (util < 1) & ~skip)
        for host in open_[np.argsort(util[open_], kind='stable')].tolist():
            if skip[host]:
                continue
            skip[host] = closed[host] = True
            vms = cluster.migratable(host)
            if not vms:
                continue
            vms.sort(key=lambda v: -cluster.vm_req[v])
            placed = self.placement.place(cluster, vms, closed, all_or_nothing=True)
            for _, t in placed:
                skip[t] = True
            moves += placed
        return moves


def load(name: str, param: float | None = None) -> Policy:
    """A policy from its name, ``DETECTOR-SELECTOR[-PLACEMENT]`` (e.g. ``lr-mmt``).

    :raises: PluginNotFound for an unknown part; ValueError for a malformed name.
    """
    parts = name.lower().split('-', 2)
    if len(parts) not in (2, 3):
        raise ValueError(f'policy {name!r} is not DETECTOR-SELECTOR[-PLACEMENT]')
    detector = plugins.load(OVERLOAD_NAMESPACE, parts[0], param)
    selector = plugins.load(SELECTION_NAMESPACE, parts[1])
    placement = plugins.load(PLACEMENT_NAMESPACE, parts[2] if len(parts) == 3 else 'pabfd',
                             detector)
    return Policy(detector, selector, placement, name.lower())


def available() -> dict[str, list[str]]:
    return {'overload': plugins.available(OVERLOAD_NAMESPACE),
            'selection': plugins.available(SELECTION_NAMESPACE),
            'placement': plugins.available(PLACEMENT_NAMESPACE)}
