import numpy as np
import testtools

from vmcloud import exception
from vmcloud.scheduler import consolidation
from vmcloud.scheduler.consolidation import overload
from vmcloud.scheduler.consolidation import placement
from vmcloud.scheduler.consolidation import selection
from vmcloud.sim import model
from tests.unit.consolidation import helpers

H = helpers.HOST_1000


class OverloadTest(testtools.TestCase):
    def test_thr(self):
        c = helpers.make([H, H], [helpers.vm()] * 3, [0, 0, 1], [500, 350, 750])
        thr = overload.StaticThreshold(0.8)
        # host 0: 850 / 1000 > 0.8; host 1: 750 / 1000 is not
        self.assertEqual([True, False], list(thr.overloaded(c, np.array([0, 1]))))
        # adding VM 0 (500 MIPS) to host 1 would make 1250
        self.assertEqual([True], list(thr.overloaded_after(c, np.array([1]), 0)))
        c.vm_req[0] = 40.0
        self.assertEqual([False], list(thr.overloaded_after(c, np.array([1]), 0)))

    def _history_cluster(self, values, req):
        # one VM of 1000 MIPS on a 1000 MIPS host: host history = VM history
        return helpers.make([H], [helpers.vm()], [0], [req], hist=[values])

    def test_iqr_threshold(self):
        # history 0.12 .. 0.01 (12 values): IQR = 0.10 - 0.03 = 0.07, threshold 1 - 1.5*0.07
        values = [i / 100 for i in range(12, 0, -1)]
        iqr = overload.InterQuartileRange(1.5)
        self.assertEqual([True], list(iqr.overloaded(self._history_cluster(values, 896),
                                                     np.array([0]))))
        self.assertEqual([False], list(iqr.overloaded(self._history_cluster(values, 894),
                                                      np.array([0]))))

    def test_mad_threshold_and_short_history_fallback(self):
        # history 0.1 0.2 0.3 0.4 1.0 0.1 0.2 0.3 0.4 1.0 0.1 0.2: median (0.2 + 0.3) / 2,
        # deviations 0.05 x5, 0.15 x5, 0.75 x2 -> MAD 0.15; threshold 1 - 2.5 * 0.15 = 0.625
        values = [0.1, 0.2, 0.3, 0.4, 1.0] * 2 + [0.1, 0.2]
        mad = overload.MedianAbsoluteDeviation(2.5)
        self.assertEqual([True], list(mad.overloaded(self._history_cluster(values, 630),
                                                     np.array([0]))))
        self.assertEqual([False], list(mad.overloaded(self._history_cluster(values, 620),
                                                      np.array([0]))))
        # with 11 values the history is too short: THR 0.7 decides
        short = values[:11]
        self.assertEqual([True], list(mad.overloaded(self._history_cluster(short, 710),
                                                     np.array([0]))))

    def test_lr_prediction(self):
        # newest first: 0.80 0.77 ... 0.53 -> a line rising 0.03 a step, next value 0.83;
        # migration of 100 MB at 1 Gbit/s / 2 takes 1.6 s: one interval ahead
        values = [0.80 - 0.03 * i for i in range(10)]
        lr = overload.LocalRegression(1.25)
        c = self._history_cluster(values, 800)
        self.assertEqual([True], list(lr.overloaded(c, np.array([0]))))   # 0.83 * 1.25 >= 1
        lr = overload.LocalRegression(1.1)
        self.assertEqual([False], list(lr.overloaded(c, np.array([0]))))  # 0.913 < 1
        self.assertAlmostEqual(0.83, lr.predict(np.array(values[::-1]), 1))

    def test_lr_after_allocation_splits_host_and_vm_parts(self):
        # the linear shortcut (host prediction + VM prediction) decides as the prediction
        # of the summed history, also where a short history falls back to THR 0.7
        rng = np.random.default_rng(11)
        vms = [helpers.vm(mips=m) for m in (500, 1000, 250, 500, 1000, 250, 750)]
        # newest first: rising or falling at different rates, with noise
        hist = [0.8 + rng.uniform(-0.02, 0.02) * np.arange(30) + rng.normal(0, 0.03, 30)
                for _ in vms]
        hist[2][8:] = 0.0           # host 2's only VM: a history of 8 values
        c = helpers.make([H] * 6, vms, [0, 1, 2, 3, 4, 5, 0],
                         rng.uniform(100, 400, len(vms)), hist=hist)
        seen = set()
        for param in (0.6, 1.0, 1.4):
            lr = overload.LocalRegression(param)
            for vm in range(len(vms)):
                everywhere = np.arange(6)
                expected = overload._HistoryDetector.overloaded_after(lr, c, everywhere, vm)
                self.assertEqual(list(expected), list(lr.overloaded_after(c, everywhere, vm)))
                seen.update(expected.tolist())
        self.assertEqual({True, False}, seen)

    def test_lrr_on_a_noisy_line(self):
        # the line of test_lr_prediction, +-0.01 in turn: both fits predict 0.8267
        values = [0.80 - 0.03 * i + (0.01 if i % 2 else -0.01) for i in range(10)]
        c = self._history_cluster(values, 800)
        lrr = overload.LocalRegressionRobust(1.25)
        self.assertAlmostEqual(0.82667, lrr.predict(np.array(values[::-1]), 1), places=4)
        # CloudSim never applies the robust weights: the plain fit, to the last bits
        self.assertAlmostEqual(overload.LocalRegression().predict(np.array(values[::-1]), 1),
                               lrr.predict(np.array(values[::-1]), 1), places=12)
        self.assertEqual([True], list(lrr.overloaded(c, np.array([0]))))
        self.assertEqual([False], list(overload.LocalRegressionRobust(1.2).overloaded(
            c, np.array([0]))))


class SelectionTest(testtools.TestCase):
    def test_mmt_picks_the_smallest_ram_first_on_ties(self):
        vms = [helpers.vm(ram=870), helpers.vm(ram=613), helpers.vm(ram=613)]
        c = helpers.make([H], vms, [0, 0, 0], [100, 100, 100])
        self.assertEqual(1, selection.MinimumMigrationTime().select(c, 0))
        c.in_migration[1] = True
        self.assertEqual(2, selection.MinimumMigrationTime().select(c, 0))

    def test_mu_picks_the_least_utilised(self):
        c = helpers.make([H], [helpers.vm()] * 3, [0, 0, 0], [300, 100, 200])
        self.assertEqual(1, selection.MinimumUtilization().select(c, 0))

    def test_mc_picks_the_vm_the_others_explain(self):
        a = [0.1, 0.5, 0.2, 0.9, 0.4, 0.3]
        b = [0.3, 0.1, 0.4, 0.2, 0.8, 0.5]
        c0 = [x + 0.5 * y for x, y in zip(a, b)]      # exactly a + b / 2
        vms = [helpers.vm(ram=1740)] * 3
        c = helpers.make([H], vms, [0, 0, 0], [100, 100, 100], hist=[a, b, c0])
        metrics = selection.MaximumCorrelation.correlations(c, [0, 1, 2])
        self.assertTrue(all(abs(m - 1) < 1e-9 for m in metrics))  # each is the others' sum
        # make VM 1 noise that the others cannot explain
        c.vm_hist[1, :6] = [0.9, 0.1, 0.8, 0.2, 0.7, 0.05]
        c.vm_hist[2, :6] = [x + 0.01 * i for i, x in enumerate(a)]
        metrics = selection.MaximumCorrelation.correlations(c, [0, 1, 2])
        self.assertEqual(int(np.argmax(metrics)), selection.MaximumCorrelation().select(c, 0))
        self.assertNotEqual(1, selection.MaximumCorrelation().select(c, 0))

    def test_mc_falls_back_to_mmt_without_enough_history(self):
        vms = [helpers.vm(ram=1740), helpers.vm(ram=613), helpers.vm(ram=870)]
        c = helpers.make([H], vms, [0, 0, 0], [100, 100, 100],
                         hist=[[0.1, 0.2], [0.3, 0.1], [0.2, 0.2]])
        self.assertEqual(1, selection.MaximumCorrelation().select(c, 0))

    def test_rs_is_seeded(self):
        def picks(seed):
            c = helpers.make([H], [helpers.vm()] * 5, [0] * 5, [100] * 5)
            c.rng.seed(seed)
            return [selection.RandomSelection().select(c, 0) for _ in range(20)]
        self.assertEqual(picks(3), picks(3))
        self.assertTrue(set(picks(3)) <= {0, 1, 2, 3, 4})
        self.assertGreater(len(set(picks(3))), 1)


class PlacementTest(testtools.TestCase):
    G5 = model.HOST_TYPES[1]

    def test_pabfd_picks_the_least_power_increase_that_stays_below_the_threshold(self):
        # G5 (5320 MIPS). Host 0 at 50%: +10% costs 116 -> 121 = 5 W.
        # Host 1 at 85%: 131 -> 134 = 3 W, cheaper, but THR 0.8 refuses it;
        # without a detector it wins.
        vms = [helpers.vm(2660), helpers.vm(2660), helpers.vm(2660), helpers.vm(2660),
               helpers.vm(532)]
        req = [2660 * 0.5, 2660 * 0.5, 2660 * 0.85, 2660 * 0.85, 532]
        c = helpers.make([self.G5, self.G5, self.G5], vms, [0, 0, 1, 1, 2], req)
        none = np.zeros(3, dtype=bool)
        none[2] = True
        self.assertEqual(1, placement.PowerAwareBestFit().find_host(c, 4, none))
        pabfd = placement.PowerAwareBestFit(overload.StaticThreshold(0.8))
        self.assertEqual(0, pabfd.find_host(c, 4, none))

    def test_pabfd_refuses_hosts_without_room_and_prefers_an_idle_cheap_one(self):
        g4 = model.HOST_TYPES[0]
        vms = [helpers.vm(2500), helpers.vm(2500)]
        c = helpers.make([g4, self.G5], vms, [1, 1], [2500, 2500], util_mips=[0, 0])
        c.vm_host[:] = -1
        c.host_vms = [[], []]
        c.recompute()
        c.vm_req[:] = 2500
        # a 2500 MIPS vCPU does not fit a 1860 MIPS PE of the G4
        self.assertEqual(1, placement.PowerAwareBestFit().find_host(
            c, 0, np.zeros(2, dtype=bool)))
        self.assertEqual(1, placement.FirstFit().find_host(c, 0, np.zeros(2, dtype=bool)))

    def test_pabfd_sees_vms_placed_earlier_in_the_same_round(self):
        # CloudSim's getUtilizationOfCpuMips: the MIPS allocated to the VMs on the host's
        # list, which planning changes. Host 0 idle, host 1 at 10%, host 2 excluded.
        vms = [helpers.vm(), helpers.vm(), helpers.vm()]
        c = helpers.make([H] * 3, vms, [1, 2, 2], [100, 500, 400])
        excluded = np.array([False, False, True])
        pabfd = placement.PowerAwareBestFit(overload.StaticThreshold(0.8))
        # linear power: +50 W either way, the tie goes to the idle host 0
        self.assertEqual(0, pabfd.find_host(c, 1, excluded))
        c.attach(1, 0)
        self.assertEqual(500, c.alloc_mips[0])
        self.assertEqual(0, c.util_mips[0])      # still idle as measured
        # host 0 now holds 500 MIPS: checked for overload, 900 > 800 refuses it
        self.assertEqual(1, pabfd.find_host(c, 2, excluded))
        c.detach(1, 0)
        self.assertEqual(0, c.alloc_mips[0])
        self.assertEqual(0, pabfd.find_host(c, 2, excluded))

    def test_pabfd_answers_host_ids_with_idle_hosts_among_the_candidates(self):
        # 12 hosts, G4 and G5 in turn; hosts 4-9 idle (one of each type is a candidate);
        # the VMs to place sit on host 11, which is excluded. place() puts them where
        # find_host says, one after the other, and some go to an idle host.
        rng = np.random.default_rng(5)
        hosts = [model.HOST_TYPES[i % 2] for i in range(12)]
        on = [0, 1, 2, 3, 10] * 4
        moving = list(range(len(on), len(on) + 10))
        vms = [helpers.vm(int(m)) for m in rng.choice([500, 1000, 2000, 2500], len(on) + 10)]
        req = [v.mips * rng.uniform(0.05, 0.5) for v in vms]
        hist = [np.clip(rng.normal(0.4, 0.15, 30), 0.01, 1) for _ in vms]
        excluded = np.zeros(12, dtype=bool)
        excluded[11] = True
        for detector in (None, overload.StaticThreshold(0.8), overload.LocalRegression(1.2),
                         overload.MedianAbsoluteDeviation(2.5)):
            def cluster():
                return helpers.make(hosts, vms, on + [11] * 10, req, hist=hist)
            pabfd = placement.PowerAwareBestFit(detector)
            one_by_one, c = [], cluster()
            for vm in moving:
                host = pabfd.find_host(c, vm, excluded)
                if host >= 0:
                    self.assertFalse(excluded[host])
                    self.assertIn(host, c.candidate_view()[0])
                    c.attach(vm, host)
                    one_by_one.append((vm, host))
            self.assertEqual(one_by_one, pabfd.place(cluster(), moving, excluded))
            self.assertTrue(any(4 <= h <= 9 for _, h in one_by_one))  # an idle host took one
            self.assertGreater(len(one_by_one), 5)

    def test_all_or_nothing_puts_back_what_it_placed(self):
        # three VMs asking 600 MIPS each, one open host of 1000 MIPS already giving 100:
        # the first fits, the second does not
        c = helpers.make([H, H, H], [helpers.vm()] * 4, [0, 2, 2, 2], [100, 600, 600, 600])
        excluded = np.array([False, True, True])
        pabfd = placement.PowerAwareBestFit(overload.StaticThreshold(1.0))
        self.assertEqual([], pabfd.place(c, [1, 2, 3], excluded, all_or_nothing=True))
        self.assertEqual([0], c.host_vms[0])
        self.assertEqual(100, c.alloc_mips[0])
        self.assertEqual([(1, 0)], pabfd.place(c, [1, 2, 3], excluded))

    def test_allocation_is_scaled_down_when_oversubscribed(self):
        vms = [helpers.vm(), helpers.vm(), helpers.vm()]
        c = helpers.make([H, H], vms, [0, 0, 1], [700, 300, 600], util_mips=[1000, 600])
        c.attach(2, 0)      # 1600 asked of 1000: each VM gets floor(r * 1000 / 1600)
        self.assertEqual(437 + 187 + 375, c.alloc_mips[0])
        c.detach(2, 0)
        self.assertEqual(1000, c.alloc_mips[0])


class PolicyTest(testtools.TestCase):
    def test_load_by_name(self):
        policy = consolidation.load('lr-mmt', 1.2)
        self.assertIsInstance(policy.detector, overload.LocalRegression)
        self.assertEqual(1.2, policy.detector.param)
        self.assertIsInstance(policy.selector, selection.MinimumMigrationTime)
        self.assertIsInstance(policy.placement, placement.PowerAwareBestFit)
        self.assertRaises(exception.PluginNotFound, consolidation.load, 'xx-mmt')
        self.assertRaises(ValueError, consolidation.load, 'thr')
        self.assertIn('pabfd', consolidation.available()['placement'])

    def test_plan_moves_off_the_overloaded_and_empties_the_underloaded(self):
        # host 0: 900 of 1000 (over THR 0.8); host 1: 100; host 2: 300; host 3 idle
        vms = [helpers.vm(ram=870), helpers.vm(ram=613), helpers.vm(), helpers.vm()]
        c = helpers.make([H] * 4, vms, [0, 0, 1, 2], [600, 300, 100, 300])
        plan = consolidation.load('thr-mmt', 0.8).plan(c)
        # MMT takes VM 1 (613 MB) off host 0 -> 600 left, fine. Best fit for 300 MIPS:
        # host 1 (10% -> 40%: +30 W) or host 2 (30% -> 60%: +30 W) or idle host 3
        # (+30 W): a tie, the first (host 1) wins. Then host 1 (still measured at 10%) is
        # the least loaded: its VMs, busiest first (1, then 2), go to host 2.
        self.assertEqual([(1, 1), (1, 2), (2, 2)], plan)
        # planning leaves the placement as it was
        self.assertEqual([[0, 1], [2], [3], []], c.host_vms)
