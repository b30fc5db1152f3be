"""Consolidation plans on ClusterView alone, and the simulator's Cluster is one."""
import dataclasses

import numpy as np
import testtools

from vmcloud.scheduler import consolidation
from vmcloud.scheduler.consolidation import compiled
from vmcloud.scheduler.consolidation import view
from vmcloud.sim import cluster as cluster_module
from vmcloud.sim import engine
from tests.unit.consolidation import helpers
from tests.unit.consolidation import test_compiled

MEMBERS = view.members(view.ClusterView)


class OnlyTheView:
    """A cluster that lets through what ClusterView declares, and refuses assignments."""

    def __init__(self, cluster):
        object.__setattr__(self, '_cluster', cluster)

    def __getattr__(self, name):
        if name not in MEMBERS:
            raise AttributeError(f'consolidation read {name!r}, which ClusterView does not '
                                 'declare')
        return getattr(self._cluster, name)

    def __setattr__(self, name, value):
        raise AttributeError(f'consolidation set {name!r}: it may change a plan only by '
                             'attach and detach')


class _ThroughTheView:
    def __init__(self, placement):
        self._placement = placement

    def searcher(self, cluster, excluded):
        return self._placement.searcher(OnlyTheView(cluster), excluded)


@dataclasses.dataclass
class PolicyThroughTheView:
    """A policy that sees the simulator's cluster only through OnlyTheView."""

    policy: consolidation.Policy

    def __post_init__(self):
        self.detector = self.policy.detector
        self.placement = _ThroughTheView(self.policy.placement)
        self.name = self.policy.name

    def plan(self, cluster):
        return self.policy.plan(OnlyTheView(cluster))


class ClusterViewTest(testtools.TestCase):
    def test_the_simulators_cluster_is_a_view(self):
        c = helpers.make([helpers.HOST_1000] * 2, [helpers.vm()] * 2, [0, 1], [100, 200])
        self.assertIsInstance(c, view.ClusterView)
        self.assertIsInstance(c.power_table, view.PowerCurves)
        self.assertIsInstance(c, cluster_module.Cluster)
        self.assertIn('attach', MEMBERS)
        self.assertIn('vm_req', MEMBERS)
        self.assertNotIn('vm_host', MEMBERS)       # the placement itself is the simulator's

    def test_the_simulators_arrays_are_laid_out_as_the_view_says(self):
        # what a second implementation copies: the compiled kernels refuse anything else
        c = helpers.make([helpers.HOST_1000] * 2, [helpers.vm()] * 2, [0, 1], [100, 200])
        arrays = {n: getattr(c, n) for n in MEMBERS if isinstance(getattr(c, n), np.ndarray)}
        self.assertIn('vm_hist', arrays)
        hosts, *per_host = c.candidate_view()
        arrays |= {'candidate_view()[0]': hosts} | dict(enumerate(per_host))
        for name, array in arrays.items():
            with self.subTest(array=name):
                wanted = np.int64 if name in ('vm_hist_len', 'candidate_view()[0]') else np.float64
                self.assertEqual(wanted, array.dtype)
                self.assertTrue(array.flags.c_contiguous)

    def test_every_policy_plans_on_the_view_alone_with_the_same_result(self):
        names = [('thr-mmt', 0.8), ('iqr-mc', 1.5), ('mad-mu', 2.5), ('lr-rs', 1.2),
                 ('lrr-mmt', 1.2), ('thr-mmt-first-fit', 0.8)]
        for name, param in names:
            for numpy_only in (False, True):
                def run(through_view):
                    policy = consolidation.load(name, param)
                    if through_view:
                        policy = PolicyThroughTheView(policy)
                    return engine.Simulation(test_compiled.random_day(24), policy,
                                             seed=4).run()
                with self.subTest(policy=name, numpy_only=numpy_only):
                    if numpy_only:
                        with compiled.disabled():
                            direct, viewed = run(False), run(True)
                    else:
                        direct, viewed = run(False), run(True)
                    self.assertGreater(direct.migrations, 0)
                    self.assertEqual(direct.summary() | {'wall_seconds': 0},
                                     viewed.summary() | {'wall_seconds': 0})
                    self.assertEqual(direct.series, viewed.series)
