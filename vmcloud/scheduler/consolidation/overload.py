"""Host overload detection: static threshold (THR), IQR, MAD, local regression (LR, LRR).

Each detector answers for the hosts' current VM lists (``overloaded``) and for the
lists with one more VM (``overloaded_after``), which power-aware placement uses to
refuse a target that the VM would overload.
"""
import abc

import numpy as np

from vmcloud.scheduler.consolidation import compiled
from vmcloud.scheduler.consolidation import stats
from vmcloud.scheduler.consolidation import view


class OverloadDetector(abc.ABC):
    """``param`` is the policy's one parameter (a threshold or a safety factor)."""

    default_param: float = 0.0
    uses_history = False
    # overloaded_after costs little per host: a placement may ask about every host at once
    cheap_after = True

    def __init__(self, param: float | None = None):
        self.param = self.default_param if param is None else float(param)
        if self.param < 0:
            raise ValueError(f'{type(self).__name__} parameter must not be negative')

    @abc.abstractmethod
    def overloaded(self, cluster: view.ClusterView, hosts: np.ndarray) -> np.ndarray:
        """A bool per host of ``hosts``."""

    @abc.abstractmethod
    def overloaded_after(self, cluster: view.ClusterView, hosts: np.ndarray, vm: int) -> np.ndarray:
        """A bool per host of ``hosts``, as if ``vm`` were added to it."""

    def after_check(self, cluster: view.ClusterView):
        """:meth:`overloaded_after` as a compiled check of one VM on one host (a
        ``_kernels.AfterCheck``; its ``now`` is :meth:`overloaded`), or None where there
        is none: placement then asks :meth:`overloaded_after`. Valid while the cluster
        changes only by attach and detach.
        """
        return None


class StaticThreshold(OverloadDetector):
    """Overloaded when the requested MIPS exceed ``param`` of the host's capacity."""

    default_param = 0.9

    def overloaded(self, cluster: view.ClusterView, hosts):
        hosts = np.asarray(hosts)
        return cluster.req_sum[hosts] / cluster.host_mips[hosts] > self.param

    def overloaded_after(self, cluster: view.ClusterView, hosts, vm):
        return ((cluster.req_sum[hosts] + cluster.vm_req[vm]) / cluster.host_mips[hosts]
                > self.param)

    def after_check(self, cluster: view.ClusterView):
        kernels = compiled.kernels
        if kernels is None:
            return None
        return kernels.Threshold(cluster.req_sum, cluster.host_mips, cluster.vm_req, self.param)


class _HistoryDetector(OverloadDetector):
    """A detector on the host's utilisation history, falling back to THR 0.7 on a short one."""

    uses_history = True
    min_history = 12
    fallback_threshold = 0.7

    def __init__(self, param=None):
        super().__init__(param)
        self.fallback = StaticThreshold(self.fallback_threshold)

    def overloaded(self, cluster: view.ClusterView, hosts):
        hosts = np.asarray(hosts)
        return self._decide(cluster, hosts, cluster.hist[hosts], cluster.req_sum[hosts],
                            cluster.ram_max[hosts])

    def overloaded_after(self, cluster: view.ClusterView, hosts, vm):
        hist = cluster.hist[hosts] + (cluster.vm_hist[vm] * cluster.vm_mips[vm]
                                      / cluster.host_mips[hosts][:, None])
        return self._decide(cluster, hosts, hist, cluster.req_sum[hosts] + cluster.vm_req[vm],
                            np.maximum(cluster.ram_max[hosts], cluster.vm_ram[vm]))

    def _decide(self, cluster: view.ClusterView, hosts, hist, req, ram_max):
        # enough history: a non-zero value at position min_history - 1 or later
        enough = (hist[:, self.min_history - 1:] != 0).any(axis=1)
        if enough.all():
            return self._history_decision(cluster, hosts, hist, None, req, ram_max)
        lengths = stats.count_nonzero_beginning(hist)
        result = req / cluster.host_mips[hosts] > self.fallback.param
        if enough.any():
            idx = np.flatnonzero(enough)
            result[idx] = self._history_decision(cluster, hosts[idx], hist[idx], lengths[idx],
                                                 req[idx], ram_max[idx])
        return result

    def _check_args(self, cluster: view.ClusterView) -> tuple:
        """What every compiled history check reads (_kernels._HistoryCheck)."""
        return (cluster.req_sum, cluster.host_mips, cluster.vm_req, self.fallback.param,
                cluster.hist, cluster.vm_hist, cluster.vm_mips, self.min_history, self.param)

    @abc.abstractmethod
    def _history_decision(self, cluster: view.ClusterView, hosts, hist, lengths, req, ram_max):
        """Decide for hosts with enough history (rows of ``hist``, newest first).

        ``lengths`` (the rows without their zero tails) may be None: computed on demand.
        """


class _DispersionDetector(_HistoryDetector):
    """Overloaded when utilisation exceeds 1 - param * dispersion(history)."""

    cheap_after = False         # two sorts of a 30-value history per host
    statistic = ''              # the compiled check's name for dispersion_rows: iqr or mad

    def _history_decision(self, cluster: view.ClusterView, hosts, hist, lengths, req, ram_max):
        if lengths is None and hist[:, -1].all():
            spread = self.dispersion_rows(hist)      # full histories, the usual case
        else:
            if lengths is None:
                lengths = stats.count_nonzero_beginning(hist)
            spread = stats.dispersion_rows(hist, lengths, self.dispersion_rows)
        return req / cluster.host_mips[hosts] > 1 - self.param * spread

    def after_check(self, cluster: view.ClusterView):
        kernels = compiled.kernels
        if kernels is None or not self.statistic:
            return None
        return kernels.Dispersion(*self._check_args(cluster), self.statistic)

    @staticmethod
    @abc.abstractmethod
    def dispersion_rows(rows: np.ndarray) -> np.ndarray:
        """The dispersion of each row of a 2-D array (rows of one length)."""


class InterQuartileRange(_DispersionDetector):
    default_param = 1.5
    statistic = 'iqr'
    dispersion_rows = staticmethod(stats.iqr_rows)


class MedianAbsoluteDeviation(_DispersionDetector):
    default_param = 2.5
    statistic = 'mad'
    dispersion_rows = staticmethod(stats.mad_rows)


class LocalRegression(_HistoryDetector):
    """Overloaded when param x the utilisation predicted one migration ahead reaches 1.

    The prediction is a least-squares line over the last 10 history values,
    evaluated ceil(longest migration of the host's VMs / interval) steps ahead.
    """

    default_param = 1.2
    min_history = 10
    window = 10

    def __init__(self, param=None):
        super().__init__(param)
        self._weights = {}
        self._weights_newest_first = {}

    def overloaded_after(self, cluster: view.ClusterView, hosts, vm):
        # The prediction is linear in the history: the host's part plus the VM's part.
        ahead = cluster.migration_steps
        if ahead is None:
            return super().overloaded_after(cluster, hosts, vm)
        host_hist = cluster.hist[hosts]
        vm_hist = cluster.vm_hist[vm]
        host_mips = cluster.host_mips[hosts]
        c = self._newest_first(ahead)
        vm_part = (vm_hist[:self.window] @ c) * cluster.vm_mips[vm] / host_mips
        over = (host_hist[:, :self.window] @ c + vm_part) * self.param >= 1
        if vm_hist[self.min_history - 1:].any():
            return over
        enough = host_hist[:, self.min_history - 1:].any(axis=1)
        if enough.all():
            return over
        short = (cluster.req_sum[hosts] + cluster.vm_req[vm]) / host_mips > self.fallback.param
        return np.where(enough, over, short)

    def after_check(self, cluster: view.ClusterView):
        ahead = cluster.migration_steps
        kernels = compiled.kernels
        if kernels is None or ahead is None:
            return None
        return kernels.Prediction(*self._check_args(cluster), self._newest_first(ahead))

    def _ahead(self, cluster: view.ClusterView, hosts, ram_max):
        seconds = ram_max / cluster.host_migration_rate[hosts]
        return np.ceil(seconds / cluster.interval).astype(np.int64)

    def predict(self, series_oldest_first: np.ndarray, ahead: int) -> float:
        a, b = stats.loess_estimates(series_oldest_first)
        return a + b * (len(series_oldest_first) + ahead)

    def _history_decision(self, cluster: view.ClusterView, hosts, hist, lengths, req, ram_max):
        ahead = self._ahead(cluster, hosts, ram_max)
        window = hist[:, :self.window][:, ::-1]
        k0 = int(ahead[0])
        if (ahead == k0).all():
            return (window @ self._coefficients(k0)) * self.param >= 1
        out = np.empty(len(hosts), dtype=bool)
        for k in np.unique(ahead):
            sel = ahead == k
            out[sel] = (window[sel] @ self._coefficients(int(k))) * self.param >= 1
        return out

    def _coefficients(self, ahead: int) -> np.ndarray:
        w = self._weights.get(ahead)
        if w is None:
            w = self._weights[ahead] = stats.prediction_weights(self.window, ahead)
        return w

    def _newest_first(self, ahead: int) -> np.ndarray:
        """The weights of a history stored newest first (contiguous, for the compiled check)."""
        w = self._weights_newest_first.get(ahead)
        if w is None:
            w = self._weights_newest_first[ahead] = np.ascontiguousarray(
                self._coefficients(ahead)[::-1])
        return w


class LocalRegressionRobust(LocalRegression):
    """LR with CloudSim's robust (bisquare re-weighted) fit.

    In CloudSim 3.0.3 it decides exactly as LR: both of its fits go through
    MathUtil.createWeigthedLinearRegression, which applies the weights only when
    at least 40% of them are <= 0, and tricube and bisquare weights never are (its
    LRR-MMT 1.2 on 20110303 gives LR-MMT's 163.48 kWh and 27,859 migrations). So
    the decisions use LR's vectorised prediction; :meth:`predict` is the fit itself.
    """

    def predict(self, series_oldest_first, ahead):
        a, b = stats.robust_loess_estimates(series_oldest_first)
        return a + b * (len(series_oldest_first) + ahead)
