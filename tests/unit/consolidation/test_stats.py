import numpy as np
import testtools

from vmcloud.scheduler.consolidation import stats


class StatsTest(testtools.TestCase):
    def test_count_nonzero_beginning_trims_the_zero_tail_but_keeps_one(self):
        self.assertEqual(3, stats.count_nonzero_beginning([1, 0, 2, 0, 0]))
        self.assertEqual(1, stats.count_nonzero_beginning([0, 0, 0]))
        self.assertEqual([0.0], list(stats.trim_zero_tail([0, 0])))

    def test_mad(self):
        # median 3; deviations 2 1 0 1 97 -> median 1
        self.assertEqual(1.0, stats.mad([1, 2, 3, 4, 100]))

    def test_iqr_uses_cloudsim_quartile_positions(self):
        # n = 12: q1 at round(3.25) - 1 = 2, q3 at round(9.75) - 1 = 9 -> 10 - 3
        data = list(range(12, 0, -1))
        self.assertEqual(7.0, stats.iqr(data))
        # n = 5: positions round(1.5) - 1 = 1 and round(4.5) - 1 = 4 (Java rounds half up)
        self.assertEqual(40.0, stats.iqr([10, 20, 30, 40, 60]))

    def test_batched_dispersion_matches_the_scalar_one(self):
        rng = np.random.default_rng(3)
        hist = rng.random((6, 30))
        lengths = np.array([30, 12, 30, 17, 12, 5])
        for rows_fn, fn in ((stats.mad_rows, stats.mad), (stats.iqr_rows, stats.iqr)):
            got = stats.dispersion_rows(hist, lengths, rows_fn)
            want = [fn(hist[i, :n]) for i, n in enumerate(lengths)]
            np.testing.assert_allclose(want, got)
        same = stats.dispersion_rows(hist[:2], np.array([30, 30]), stats.mad_rows)
        np.testing.assert_allclose([stats.mad(hist[0]), stats.mad(hist[1])], same)

    def test_loess_on_a_line_is_exact(self):
        y = 0.1 + 0.05 * np.arange(1, 11)
        a, b = stats.loess_estimates(y)
        self.assertAlmostEqual(0.1, a)
        self.assertAlmostEqual(0.05, b)
        # the closed form used by the vectorised detector agrees
        self.assertAlmostEqual(a + b * 11, stats.prediction_weights(10, 1) @ y)

    def test_robust_loess_ignores_an_outlier_less_than_plain(self):
        y = 0.05 * np.arange(1, 11)
        self.assertAlmostEqual(0.05, stats.robust_loess_estimates(y)[1])

    def test_r_squared(self):
        x = np.array([[1.0], [2.0], [3.0], [4.0]])
        self.assertAlmostEqual(1.0, stats.r_squared(2 * x[:, 0] + 1, x))
        self.assertRaises(ValueError, stats.r_squared, np.ones(1), np.ones((1, 1)))
        # dependent columns are fitted all the same, as CloudSim's QR does
        self.assertAlmostEqual(1.0, stats.r_squared(np.arange(4.0), np.hstack([x, 2 * x])))

    def test_r_squared_each_row_on_the_others(self):
        rng = np.random.default_rng(3)
        rows = rng.random((5, 12))
        rows[4] = 0.5 * rows[0] + 0.2 * rows[1] + 0.01 * rng.random(12)

        def one_by_one():
            return [stats.r_squared(rows[i], np.delete(rows, i, axis=0).T) for i in range(5)]
        np.testing.assert_allclose(one_by_one(), stats.r_squared_each(rows), rtol=1e-9)
        self.assertRaises(ValueError, stats.r_squared_each, rows[:, :4])    # 5 rows, 4 values
        rows[2] = rows[0] + rows[1]                 # a dependent row: fitted one by one
        np.testing.assert_allclose(one_by_one(), stats.r_squared_each(rows))
        self.assertAlmostEqual(1.0, stats.r_squared_each(rows)[2])
        rows[2] = 0.3                               # a constant row explains nothing
        self.assertTrue(np.isnan(stats.r_squared_each(rows)[2]))
