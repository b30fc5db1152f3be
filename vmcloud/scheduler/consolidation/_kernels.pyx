# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Consolidation's inner loops in compiled code: the power-aware best-fit search
(PowerAwareBestFit) with the detectors' overload checks, and MC's R^2.

The search runs once per VM to place, some 30,000 times a simulated day, over about
a hundred candidate hosts: as numpy calls its cost is their overhead. Here one call
scans the candidates once and asks the overload check only of a host that would be
the best so far. The arithmetic is the numpy path's, operation for operation (built
with -ffp-contract=off), except that dot products are summed in index order, which
may differ in the last bit from BLAS.

The objects hold views of the cluster's arrays. Attach and detach update those in
place; an update of the datacenter, or the end of a planning round, replaces them. So
an object is made for a run of placements or for one planning round, and not kept.
"""
from libc.math cimport fabs, floor, sqrt, INFINITY
from libc.stdint cimport int64_t

import numpy as np


cdef class AfterCheck:
    """Whether a host would be overloaded with the VM being placed (never, here).

    ``prepare`` takes the VM (``prepare_none``: none), then ``overloaded`` answers
    for a host. Hosts and VMs are not bounds-checked there: the Python-facing
    methods check them, and a Search checks its arrays' lengths once.
    """

    cdef Py_ssize_t n_hosts, n_vms

    cdef void prepare(self, Py_ssize_t vm) noexcept:
        pass

    cdef void prepare_none(self) noexcept:
        pass

    cdef bint overloaded(self, Py_ssize_t host) noexcept:
        return False

    def __call__(self, Py_ssize_t vm, Py_ssize_t host) -> bool:
        """The check of one VM on one host, from Python (tests compare it with numpy's)."""
        _in_range(vm, self.n_vms, 'VM')
        _in_range(host, self.n_hosts, 'host')
        self.prepare(vm)
        return self.overloaded(host)

    def now(self, Py_ssize_t host) -> bool:
        """The check of the host as it is, with no VM added."""
        _in_range(host, self.n_hosts, 'host')
        self.prepare_none()
        return self.overloaded(host)


cdef class NeverOverloaded(AfterCheck):
    """For a placement without an overload detector."""

    def __init__(self, Py_ssize_t n_hosts, Py_ssize_t n_vms):
        self.n_hosts, self.n_vms = n_hosts, n_vms


cdef inline void _in_range(Py_ssize_t i, Py_ssize_t n, str what) except *:
    if not 0 <= i < n:
        raise IndexError(f'{what} {i} is not in 0..{n - 1}')


cdef class Threshold(AfterCheck):
    """Requested MIPS, with the VM's, above a fraction of the host's."""

    cdef const double[::1] req_sum
    cdef const double[::1] host_mips
    cdef const double[::1] vm_req
    cdef double threshold, req

    def __init__(self, const double[::1] req_sum, const double[::1] host_mips,
                 const double[::1] vm_req, double threshold):
        if req_sum.shape[0] != host_mips.shape[0]:
            raise ValueError('one requested MIPS sum per host')
        self.req_sum, self.host_mips, self.vm_req = req_sum, host_mips, vm_req
        self.n_hosts, self.n_vms = host_mips.shape[0], vm_req.shape[0]
        self.threshold = threshold

    cdef void prepare(self, Py_ssize_t vm) noexcept:
        self.req = self.vm_req[vm]

    cdef void prepare_none(self) noexcept:
        self.req = 0.0

    cdef bint overloaded(self, Py_ssize_t host) noexcept:
        return (self.req_sum[host] + self.req) / self.host_mips[host] > self.threshold


cdef class _HistoryCheck(Threshold):
    """A decision on the host's history with the VM's added; THR on a short history."""

    cdef const double[:, ::1] hist
    cdef const double[:, ::1] vm_hist
    cdef const double[::1] vm_mips
    cdef Py_ssize_t min_history
    cdef double param

    def __init__(self, req_sum, host_mips, vm_req, double fallback_threshold,
                 const double[:, ::1] hist, const double[:, ::1] vm_hist,
                 const double[::1] vm_mips, Py_ssize_t min_history, double param):
        super().__init__(req_sum, host_mips, vm_req, fallback_threshold)
        if (hist.shape[0] != self.n_hosts or vm_hist.shape[0] != self.n_vms
                or vm_mips.shape[0] != self.n_vms):
            raise ValueError('one history per host and one history and MIPS per VM')
        if hist.shape[1] != vm_hist.shape[1] or not 0 < min_history <= hist.shape[1]:
            raise ValueError('host and VM histories differ in length or are too short')
        self.hist, self.vm_hist, self.vm_mips = hist, vm_hist, vm_mips
        self.min_history, self.param = min_history, param


cdef class Prediction(_HistoryCheck):
    """LR: ``param`` x the predicted utilisation reaches 1; ``coef`` weighs the newest
    values of a history, the host's and the VM's (x its MIPS / the host's) alike."""

    cdef const double[::1] coef
    cdef double vm_part
    cdef bint vm_has_history

    def __init__(self, req_sum, host_mips, vm_req, fallback_threshold, hist, vm_hist, vm_mips,
                 min_history, param, const double[::1] coef):
        super().__init__(req_sum, host_mips, vm_req, fallback_threshold, hist, vm_hist, vm_mips,
                         min_history, param)
        if coef.shape[0] > hist.shape[1]:
            raise ValueError('more weights than history values')
        self.coef = coef

    cdef void prepare(self, Py_ssize_t vm) noexcept:
        Threshold.prepare(self, vm)
        self.vm_part = _dot(self.vm_hist, vm, self.coef) * self.vm_mips[vm]
        self.vm_has_history = _has_history(self.vm_hist, vm, self.min_history)

    cdef void prepare_none(self) noexcept:
        Threshold.prepare_none(self)
        self.vm_part = 0.0
        self.vm_has_history = False

    cdef bint overloaded(self, Py_ssize_t host) noexcept:
        if not self.vm_has_history and not _has_history(self.hist, host, self.min_history):
            return Threshold.overloaded(self, host)
        return ((_dot(self.hist, host, self.coef) + self.vm_part / self.host_mips[host])
                * self.param >= 1)


cdef class Dispersion(_HistoryCheck):
    """IQR or MAD (``statistic``): utilisation above 1 - param x the dispersion of the
    history."""

    cdef bint iqr
    cdef double vm_row[64]
    cdef double row[64]

    def __init__(self, req_sum, host_mips, vm_req, fallback_threshold, hist, vm_hist, vm_mips,
                 min_history, param, str statistic):
        super().__init__(req_sum, host_mips, vm_req, fallback_threshold, hist, vm_hist, vm_mips,
                         min_history, param)
        if hist.shape[1] > 64:
            raise ValueError('histories of more than 64 values')
        if statistic not in ('iqr', 'mad'):
            raise ValueError(f'unknown dispersion {statistic!r}')
        self.iqr = statistic == 'iqr'

    cdef void prepare(self, Py_ssize_t vm) noexcept:
        cdef Py_ssize_t j
        cdef double mips = self.vm_mips[vm]
        Threshold.prepare(self, vm)
        for j in range(self.vm_hist.shape[1]):
            self.vm_row[j] = self.vm_hist[vm, j] * mips

    cdef void prepare_none(self) noexcept:
        cdef Py_ssize_t j
        Threshold.prepare_none(self)
        for j in range(self.vm_hist.shape[1]):
            self.vm_row[j] = 0.0

    cdef bint overloaded(self, Py_ssize_t host) noexcept:
        cdef Py_ssize_t j, length = 1
        cdef double mips = self.host_mips[host], spread
        for j in range(self.hist.shape[1]):
            self.row[j] = self.hist[host, j] + self.vm_row[j] / mips
            if self.row[j] != 0:
                length = j + 1
        if length < self.min_history:
            return Threshold.overloaded(self, host)
        _sort(self.row, length)
        if self.iqr:
            spread = (self.row[<Py_ssize_t>floor(0.75 * (length + 1) + 0.5) - 1]
                      - self.row[<Py_ssize_t>floor(0.25 * (length + 1) + 0.5) - 1])
        else:
            spread = _median_absolute_deviation(self.row, length)
        return (self.req_sum[host] + self.req) / mips > 1 - self.param * spread


cdef double _dot(const double[:, ::1] rows, Py_ssize_t i, const double[::1] coef) noexcept:
    cdef Py_ssize_t j
    cdef double s = 0.0
    for j in range(coef.shape[0]):
        s += rows[i, j] * coef[j]
    return s


cdef bint _has_history(const double[:, ::1] rows, Py_ssize_t i,
                       Py_ssize_t min_history) noexcept:
    """A non-zero value at position min_history - 1 or later."""
    cdef Py_ssize_t j
    for j in range(min_history - 1, rows.shape[1]):
        if rows[i, j] != 0:
            return True
    return False


cdef void _sort(double *a, Py_ssize_t n) noexcept:
    """Insertion sort: the rows are at most a few dozen values."""
    cdef Py_ssize_t i, j
    cdef double x
    for i in range(1, n):
        x = a[i]
        j = i - 1
        while j >= 0 and a[j] > x:
            a[j + 1] = a[j]
            j -= 1
        a[j + 1] = x


cdef double _median_sorted(const double *a, Py_ssize_t n) noexcept:
    # commons-math's legacy percentile: lower + 0.5 (upper - lower)
    cdef Py_ssize_t k = n // 2
    if n % 2:
        return a[k]
    return a[k - 1] + 0.5 * (a[k] - a[k - 1])


cdef double _median_absolute_deviation(double *a, Py_ssize_t n) noexcept:
    """Of the sorted ``a``, which it overwrites."""
    cdef double med = _median_sorted(a, n)
    cdef Py_ssize_t j
    for j in range(n):
        a[j] = fabs(a[j] - med)
    _sort(a, n)
    return _median_sorted(a, n)


cdef class Search:
    """The search over one candidate view (``hosts`` and the three arrays after it);
    the other arrays are indexed by host id."""

    cdef const int64_t[::1] hosts
    cdef const double[::1] pe_mips, mips, power_now
    cdef const double[::1] alloc_mips, avail, host_ram, ram_used, host_bw, bw_used
    cdef const unsigned char[::1] excluded
    cdef const double[::1] watts, steps
    cdef Py_ssize_t width
    cdef AfterCheck check

    def __init__(self, const int64_t[::1] hosts, const double[::1] pe_mips,
                 const double[::1] mips, const double[::1] power_now,
                 const double[::1] alloc_mips, const double[::1] avail,
                 const unsigned char[::1] excluded,
                 const double[::1] host_ram, const double[::1] ram_used,
                 const double[::1] host_bw, const double[::1] bw_used,
                 const double[::1] watts, const double[::1] steps, Py_ssize_t width,
                 AfterCheck check not None):
        cdef Py_ssize_t n = alloc_mips.shape[0], i
        if not (pe_mips.shape[0] == mips.shape[0] == power_now.shape[0] == hosts.shape[0]):
            raise ValueError('the candidate view arrays differ in length')
        if not (avail.shape[0] == excluded.shape[0] == host_ram.shape[0] == ram_used.shape[0]
                == host_bw.shape[0] == bw_used.shape[0] == check.n_hosts == n):
            raise ValueError('the per-host arrays differ in length')
        if not (watts.shape[0] == steps.shape[0] == n * width) or width < 11:
            raise ValueError('the power table needs n_hosts x width (>= 11) points')
        for i in range(hosts.shape[0]):
            _in_range(hosts[i], n, 'host')
        self.hosts, self.pe_mips, self.mips, self.power_now = hosts, pe_mips, mips, power_now
        self.alloc_mips, self.avail, self.excluded = alloc_mips, avail, excluded
        self.host_ram, self.ram_used = host_ram, ram_used
        self.host_bw, self.bw_used = host_bw, bw_used
        self.watts, self.steps, self.width = watts, steps, width
        self.check = check

    def best_host(self, Py_ssize_t vm, double req, double ram_req, double bw_req) -> int:
        """The host (an id) whose power grows least with ``vm``, or -1.

        A host that has MIPS allocated is taken only if the check says it stays
        below overload; ties go to the first host.
        """
        cdef Py_ssize_t i, h, low, k
        cdef Py_ssize_t best = -1
        cdef double best_diff = INFINITY, after, u10, step, diff, alloc
        _in_range(vm, self.check.n_vms, 'VM')
        self.check.prepare(vm)
        for i in range(self.hosts.shape[0]):
            h = self.hosts[i]
            alloc = self.alloc_mips[h]
            after = (alloc + req) / self.mips[i]
            if not (self.pe_mips[i] >= req and self.avail[h] >= req and after <= 1.0 + 1e-9):
                continue
            if self.excluded[h] or ((ram_req or bw_req) and (
                    self.host_ram[h] - self.ram_used[h] < ram_req
                    or self.host_bw[h] - self.bw_used[h] < bw_req)):
                continue
            u10 = after * 10
            low = <Py_ssize_t>u10
            k = h * self.width + low
            # CloudSim's power interpolation; on a 10% point its step is 0
            step = 0.0 if u10 == <double>low else self.steps[k]
            diff = (self.watts[k] + step * (after - low / 10.0) * 100) - self.power_now[i]
            if diff < best_diff and not (alloc != 0 and self.check.overloaded(h)):
                best, best_diff = h, diff
        return best


# a pivot of the Gram matrix's Cholesky factor below this x its largest diagonal value
# means (nearly) dependent rows, where the inverse is inaccurate: fit row by row instead
cdef double PIVOT_TOLERANCE = 1e-9


def r_squared_each(const double[:, ::1] rows):
    """R^2 of each row regressed on all the other rows (as columns) with an intercept.

    As stats.r_squared_each (to about 1e-12), by another route. A constant row gets
    NaN and, collinear with the intercept, explains nothing: the others are fitted
    without it. Two rows get one value, their squared correlation. For more, with S
    the Gram matrix of the centred rows, row i's residual sum of squares is
    1 / (S^-1)_ii, here from S's Cholesky factor; if a pivot is (nearly) zero, each
    row is instead projected on an orthonormal basis of the others, built by modified
    Gram-Schmidt, dropping those that add (nearly) no direction.

    :raises: ValueError for fewer than two rows or fewer columns than rows.
    """
    cdef Py_ssize_t n = rows.shape[0], m = rows.shape[1], i, j, k = 0
    if n < 2 or n > m:
        raise ValueError('not enough data for the regression')
    out_array = np.full(n, np.nan)
    centred_array = np.empty((n, m))
    kept_array = np.empty(n, dtype=np.intp)
    cdef double[::1] out = out_array
    cdef double[:, ::1] c = centred_array
    cdef Py_ssize_t[::1] kept = kept_array
    cdef double mean, low, high
    for i in range(n):
        mean = low = high = rows[i, 0]
        for j in range(1, m):
            mean += rows[i, j]
            low = min(low, rows[i, j])
            high = max(high, rows[i, j])
        if low == high:
            continue
        mean /= m
        for j in range(m):
            c[k, j] = rows[i, j] - mean
        kept[k] = i
        k += 1
    if k == 0:
        return out_array
    fitted_array = np.empty(k)
    cdef double[::1] fitted = fitted_array
    if k == 1:
        fitted[0] = 0.0
    elif k == 2:
        mean = _dot_rows(c, 0, c, 1)
        fitted[0] = fitted[1] = mean * mean / (_dot_rows(c, 0, c, 0) * _dot_rows(c, 1, c, 1))
    elif not _r_squared_by_cholesky(c[:k], fitted):
        _r_squared_by_projection(c[:k], fitted)
    for i in range(k):
        out[kept[i]] = fitted[i]
    return out_array


cdef bint _r_squared_by_cholesky(double[:, ::1] c, double[::1] out):
    """False, with ``out`` not set, if the rows are (nearly) dependent."""
    cdef Py_ssize_t n = c.shape[0], i, j, k
    chol_array = np.empty((n, n))
    diag_array = np.empty(n)
    cdef double[:, ::1] chol = chol_array
    cdef double[::1] diag = diag_array
    cdef double s, largest = 0.0
    for i in range(n):
        for k in range(i + 1):
            chol[i, k] = _dot_rows(c, i, c, k)
        diag[i] = chol[i, i]
        largest = max(largest, diag[i])
    # in place (lower triangle): S = L L^T
    for k in range(n):
        s = chol[k, k]
        for j in range(k):
            s -= chol[k, j] * chol[k, j]
        if not s > largest * PIVOT_TOLERANCE:
            return False
        chol[k, k] = sqrt(s)
        for i in range(k + 1, n):
            s = chol[i, k]
            for j in range(k):
                s -= chol[i, j] * chol[k, j]
            chol[i, k] = s / chol[k, k]
    # L^-1 in place of L (lower triangular); (S^-1)_ii = sum over k >= i of (L^-1)_ki^2
    for k in range(n):
        chol[k, k] = 1.0 / chol[k, k]
        for i in range(k + 1, n):
            s = 0.0
            for j in range(k, i):
                s -= chol[i, j] * chol[j, k]
            chol[i, k] = s / chol[i, i]
    for i in range(n):
        s = 0.0
        for k in range(i, n):
            s += chol[k, i] * chol[k, i]
        out[i] = 1 - 1 / (diag[i] * s)
    return True


cdef void _r_squared_by_projection(double[:, ::1] c, double[::1] out):
    """R^2 of each centred row projected on the span of the others, one row at a time."""
    cdef Py_ssize_t n = c.shape[0], m = c.shape[1], i, j, k, size
    basis_array = np.empty((n, m))
    cdef double[:, ::1] basis = basis_array
    cdef double total, before, norm, rss
    for i in range(n):
        total = _dot_rows(c, i, c, i)
        size = 0
        for k in range(n):
            if k == i:
                continue
            before = _dot_rows(c, k, c, k)
            basis[size, :] = c[k, :]
            _remove_projection(basis, size, size)
            _remove_projection(basis, size, size)     # twice: orthogonal to rounding
            norm = _dot_rows(basis, size, basis, size)
            if norm > before * 1e-20:       # it adds a direction: keep it, of unit length
                norm = sqrt(norm)
                for j in range(m):
                    basis[size, j] /= norm
                size += 1
        basis[size, :] = c[i, :]
        _remove_projection(basis, size, size)
        rss = _dot_rows(basis, size, basis, size)
        out[i] = 1 - rss / total


cdef double _dot_rows(double[:, ::1] a, Py_ssize_t i, double[:, ::1] b,
                      Py_ssize_t k) noexcept:
    cdef Py_ssize_t j
    cdef double s = 0.0
    for j in range(a.shape[1]):
        s += a[i, j] * b[k, j]
    return s


cdef void _remove_projection(double[:, ::1] basis, Py_ssize_t row,
                             Py_ssize_t size) noexcept:
    """Take from basis[row] its projection on the orthonormal basis[:size]."""
    cdef Py_ssize_t q, j
    cdef double s
    for q in range(size):
        s = _dot_rows(basis, q, basis, row)
        for j in range(basis.shape[1]):
            basis[row, j] -= s * basis[q, j]
