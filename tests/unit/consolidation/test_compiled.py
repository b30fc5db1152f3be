"""The compiled search, checks and R^2 decide as their numpy references do."""
import itertools

import numpy as np
import testtools

from vmcloud.scheduler import consolidation
from vmcloud.scheduler.consolidation import compiled
from vmcloud.scheduler.consolidation import placement
from vmcloud.scheduler.consolidation import stats
from vmcloud.sim import engine
from vmcloud.sim import model

POLICIES = [('thr-mmt', 0.8), ('lr-mmt', 1.2), ('iqr-mmt', 1.5), ('mad-mmt', 2.5)]


def random_day(steps, seed=3):
    """240 VMs of every type on 80 hosts, in whole percent as PlanetLab's traces: a
    tenth of them end halfway, a fifth are steady (constant histories, for MC)."""
    rng = np.random.default_rng(seed)
    n_vms = 240
    util = np.clip(rng.normal(0.3, 0.2, (n_vms, steps + 2)), 0, 1).round(2)
    util[::5] = util[::5, :1]
    util[:n_vms // 10, steps // 2:] = 0.0
    return model.Scenario(model.alternating_hosts(80), model.assign_vm_types(n_vms), util)


def busy_cluster(policy, steps=40):
    """A cluster after ``steps`` updates: a few dozen hosts in use, long or short
    histories, some VMs retired."""
    scenario = random_day(steps)
    sim = engine.Simulation(scenario, policy, limit=steps * scenario.sample_interval)
    sim.run()
    return sim.cluster


class CompiledSearchTest(testtools.TestCase):
    def test_the_extension_is_built(self):
        # without it the placement still works, twice as slowly: CI must notice
        self.assertIsNotNone(compiled.kernels)

    def test_a_whole_run_is_the_same_without_it(self):
        for name, param in POLICIES + [('lr-mc', 1.2)]:
            def run():
                scenario = random_day(60)
                policy = consolidation.load(name, param)
                return engine.Simulation(scenario, policy).run()
            fast = run()
            with compiled.disabled():
                reference = run()
            self.assertIsNotNone(compiled.kernels)
            self.assertGreater(fast.migrations, 50, name)
            self.assertEqual(reference.migrations, fast.migrations, name)
            self.assertEqual(reference.energy_kwh, fast.energy_kwh, name)
            self.assertEqual(reference.series, fast.series, name)

    def test_the_after_checks_agree_with_overloaded_after(self):
        # after 6 updates histories are short (the THR fallback), after 40 full
        for (name, param), steps in itertools.product(POLICIES, (6, 40)):
            policy = consolidation.load(name, param)
            c = busy_cluster(policy, steps)
            hosts = np.arange(c.n_hosts)
            check = policy.detector.after_check(c)
            seen = set()
            for vm in range(0, c.n_vms, 3):
                expected = policy.detector.overloaded_after(c, hosts, vm)
                got = [check(vm, h) for h in hosts]
                self.assertEqual(expected.tolist(), got, f'{name}, {steps} steps, VM {vm}')
                seen.update(got)
            self.assertEqual({True, False}, seen, f'{name}, {steps} steps')
            # and with no VM added, the hosts as they are, some of them overloaded
            c.vm_req *= 1.6
            c.vm_hist *= 1.6
            c.recompute()
            check = policy.detector.after_check(c)
            now = [check.now(h) for h in hosts]
            self.assertEqual(policy.detector.overloaded(c, hosts).tolist(), now)
            self.assertIn(True, now, f'{name}, {steps} steps')

    def test_placements_in_a_row_agree_with_the_numpy_search(self):
        rng = np.random.default_rng(7)
        for name, param in POLICIES + [('none', None)]:
            policy = consolidation.load('thr-mmt' if name == 'none' else name, param)
            pabfd = placement.PowerAwareBestFit(None if name == 'none' else policy.detector)
            c = busy_cluster(policy)
            excluded = rng.random(c.n_hosts) < 0.2
            find = pabfd.searcher(c, excluded)
            found = set()
            for vm in rng.permutation(c.n_vms)[:120].tolist():
                host = find(vm)
                self.assertEqual(pabfd.find_host_numpy(c, vm, excluded), host, f'{name}, VM {vm}')
                found.add(host)
                if host >= 0:
                    # the next search sees the VM there, as in a planning round
                    c.attach(vm, host)
            self.assertGreater(len(found), 3, name)

    def test_ram_and_bandwidth_limit_the_search(self):
        policy = consolidation.load('thr-mmt', 0.8)
        pabfd = policy.placement
        c = busy_cluster(policy)
        excluded = np.zeros(c.n_hosts, dtype=bool)
        c.vm_ram_req[:] = c.vm_ram
        c.ram_used[:] = c.host_ram - 1000         # room for a 613 or 870 MB VM only
        for vm in (0, c.n_vms - 1, c.n_vms // 2):
            expected = pabfd.find_host_numpy(c, vm, excluded)
            self.assertEqual(expected, pabfd.find_host(c, vm, excluded))
            self.assertEqual(c.vm_ram[vm] > 1000, expected == -1)
        c.ram_used[:] = 0.0
        c.vm_bw_req[:] = c.vm_bw
        c.bw_used[:] = c.host_bw - c.vm_bw[0] / 2     # no room for any VM's bandwidth
        c.bw_used[::3] = 0.0                          # but on every third host
        for vm in (0, c.n_vms - 1, c.n_vms // 2):
            host = pabfd.find_host(c, vm, excluded)
            self.assertEqual(pabfd.find_host_numpy(c, vm, excluded), host)
            self.assertEqual(0, host % 3)

    def test_hosts_vms_and_arrays_out_of_shape_are_refused(self):
        # the compiled loops do not check bounds: their entry points do
        policy = consolidation.load('lr-mmt', 1.2)
        c = busy_cluster(policy, 6)
        check = policy.detector.after_check(c)
        self.assertRaises(IndexError, check, c.n_vms, 0)
        self.assertRaises(IndexError, check.now, -1)
        table = c.power_table
        arrays = [c.alloc_mips, c.avail, np.zeros(c.n_hosts, dtype=np.uint8), c.host_ram,
                  c.ram_used, c.host_bw, c.bw_used, table.watts, table.steps]
        search = compiled.kernels.Search(*c.candidate_view(), *arrays, table.width, check)
        self.assertRaises(IndexError, search.best_host, -1, 100.0, 0.0, 0.0)
        arrays[1] = c.avail[:-1]
        self.assertRaises(ValueError, compiled.kernels.Search, *c.candidate_view(), *arrays,
                          table.width, check)


class CompiledRSquaredTest(testtools.TestCase):
    def test_r_squared_each_agrees_with_numpy(self):
        rng = np.random.default_rng(5)
        cases = []
        for n, m in ((2, 2), (3, 30), (12, 30), (25, 30), (24, 24)):   # 24 x 24: exact fits
            rows = rng.random((n, m))
            cases += [rows, rows.copy(), rows.copy()]
            cases[-2][1] = cases[-2][0] * 3 + 0.5      # two dependent rows
            cases[-1][-1] = 0.25                       # a constant row: NaN
        # constant rows whose mean is not exact in binary; two of them, of two values
        steady = rng.random((6, 30))
        steady[2], steady[4] = 0.03, 0.07
        cases += [steady, np.vstack([rng.random(30), np.full(30, 0.07)])]
        for rows in cases:
            expected = stats.r_squared_each(rows)
            got = compiled.kernels.r_squared_each(rows)
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
        r2 = compiled.kernels.r_squared_each
        self.assertEqual([False, False, True, False, True, False], np.isnan(r2(steady)).tolist())
        self.assertEqual([0.0], r2(cases[-1])[:1].tolist())
        two = rng.random((2, 30))
        self.assertEqual(*r2(two))                  # equal: rounding picks neither
        self.assertEqual(*stats.r_squared_each(two))
        dependent = rng.random((10, 30))
        dependent[1] = dependent[0] * 3 + 0.5
        # the dependent rows explain each other exactly
        self.assertAlmostEqual(1.0, compiled.kernels.r_squared_each(dependent)[0], places=12)

    def test_r_squared_each_refuses_what_cloudsim_refuses(self):
        for shape in ((1, 5), (6, 5)):
            self.assertRaises(ValueError, compiled.kernels.r_squared_each, np.ones(shape))
