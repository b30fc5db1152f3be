"""The statistics the consolidation policies use, computed as CloudSim 3.0.3's MathUtil does."""
import math

import numpy as np

MAX_DOUBLE = 1.7976931348623157e308


def count_nonzero_beginning(data):
    """Length of ``data`` without its trailing zeros, at least 1 (countNonZeroBeginning).

    An int for a 1-D ``data``; for a 2-D one, an array of the length of each row.
    """
    rows = np.atleast_2d(np.asarray(data))
    nz = rows != 0
    lengths = np.where(nz.any(axis=1), rows.shape[1] - np.argmax(nz[:, ::-1], axis=1), 1)
    return int(lengths[0]) if np.ndim(data) == 1 else lengths


def trim_zero_tail(data) -> np.ndarray:
    data = np.asarray(data, dtype=float)
    n = count_nonzero_beginning(data)
    if len(data) < n:
        return np.zeros(n)
    return data[:n]


def median(data) -> float:
    return float(median_rows(np.asarray(data, dtype=float)[None, :])[0])


def median_rows(rows: np.ndarray) -> np.ndarray:
    """The median of each row, as commons-math's legacy percentile computes it.

    For an even length that is lower + 0.5 (upper - lower), which can differ in the
    last bit from (lower + upper) / 2; a threshold compare can turn on that bit.
    """
    n = rows.shape[1]
    k = n // 2
    ordered = np.sort(rows, axis=1)     # faster than a partition for rows this short
    if n % 2:
        return ordered[:, k]
    lower = ordered[:, k - 1]
    return lower + 0.5 * (ordered[:, k] - lower)


def mad(data) -> float:
    """Median absolute deviation from the median."""
    data = np.asarray(data, dtype=float)
    if not len(data):
        return 0.0
    return median(np.abs(median(data) - data))


def java_round(x: float) -> int:
    return math.floor(x + 0.5)


def iqr(data) -> float:
    """Interquartile range with CloudSim's quartile positions round(p (n + 1)) - 1."""
    s = np.sort(np.asarray(data, dtype=float))
    n = len(s)
    q1 = java_round(0.25 * (n + 1)) - 1
    q3 = java_round(0.75 * (n + 1)) - 1
    return float(s[q3] - s[q1])


def mad_rows(rows: np.ndarray) -> np.ndarray:
    """:func:`mad` of each row of a 2-D array (rows of one length)."""
    med = median_rows(rows)
    return median_rows(np.abs(rows - med[:, None]))


def iqr_rows(rows: np.ndarray) -> np.ndarray:
    """:func:`iqr` of each row of a 2-D array (rows of one length)."""
    s = np.sort(rows, axis=1)
    n = rows.shape[1]
    q1 = java_round(0.25 * (n + 1)) - 1
    q3 = java_round(0.75 * (n + 1)) - 1
    return s[:, q3] - s[:, q1]


def dispersion_rows(hist: np.ndarray, lengths: np.ndarray, rows_fn) -> np.ndarray:
    """``rows_fn`` of hist[i, :lengths[i]] for every row, batched by length."""
    out = np.empty(len(hist))
    first = int(lengths[0]) if len(lengths) else 0
    if (lengths == first).all():
        if len(hist):
            out[:] = rows_fn(hist[:, :first])
        return out
    for n in np.unique(lengths):
        sel = lengths == n
        out[sel] = rows_fn(hist[sel, :int(n)])
    return out


def tricube_weights(n: int) -> np.ndarray:
    """MathUtil.getTricubeWeigts: the inverse tricube kernel, first three equal."""
    w = np.zeros(n)
    top = spread = n - 1
    for i in range(2, n):
        k = (1 - ((top - i) / spread) ** 3) ** 3
        w[i] = 1 / k if k > 0 else MAX_DOUBLE
    w[0] = w[1] = w[2]
    return w


def tricube_bisquare_weights(residuals: np.ndarray) -> np.ndarray:
    n = len(residuals)
    w = tricube_weights(n)
    w2 = np.zeros(n)
    s6 = median(np.abs(residuals)) * 6
    with np.errstate(divide='ignore', invalid='ignore', over='ignore'):
        for i in range(2, n):
            if s6:
                r = residuals[i] / s6
            else:
                r = math.copysign(math.inf, residuals[i]) if residuals[i] else math.nan
            k = (1 - r * r) ** 2
            w2[i] = (1 / k) * w[i] if k > 0 else MAX_DOUBLE
    w2[0] = w2[1] = w2[2]
    return w2


def simple_regression(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Ordinary least squares ``y = a + b x``: returns (a, b)."""
    xm, ym = x.mean(), y.mean()
    dx = x - xm
    sxx = float(dx @ dx)
    if sxx == 0:
        return float('nan'), float('nan')
    b = float(dx @ (y - ym)) / sxx
    return float(ym - b * xm), b


def weighted_regression(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """MathUtil.createWeigthedLinearRegression: weights apply only if >= 40% of them are zero."""
    if np.count_nonzero(w <= 0) >= 0.4 * len(w):
        with np.errstate(over='ignore', invalid='ignore'):
            sw = np.sqrt(w)
            return simple_regression(sw * x, sw * y)
    return simple_regression(x, y)


def loess_estimates(y) -> tuple[float, float]:
    """Intercept and slope of the local regression over y[0] (oldest) .. y[-1] (newest)."""
    y = np.asarray(y, dtype=float)
    x = np.arange(1, len(y) + 1, dtype=float)
    return weighted_regression(x, y, tricube_weights(len(y)))


def robust_loess_estimates(y) -> tuple[float, float]:
    """The robust variant: a second fit reweighted by the bisquare of the first fit's residuals."""
    y = np.asarray(y, dtype=float)
    n = len(y)
    x = np.arange(1, n + 1, dtype=float)
    a, b = weighted_regression(x, y, tricube_weights(n))
    residuals = y - (a + b * x)
    return weighted_regression(x, y, tricube_bisquare_weights(residuals))


def prediction_weights(n: int, ahead: int) -> np.ndarray:
    """c such that c @ y is the least-squares line over x = 1..n evaluated at x = n + ahead."""
    x = np.arange(1, n + 1, dtype=float)
    xm = x.mean()
    dx = x - xm
    return 1 / n + dx * (n + ahead - xm) / (dx @ dx)


def r_squared(y: np.ndarray, x: np.ndarray) -> float:
    """Coefficient of determination of y regressed on the columns of x, with an intercept.

    Linearly dependent columns are fitted all the same (least squares projects y on
    the space they span), as CloudSim's QR-based OLS does: it refuses only a pivot
    that is exactly zero, which rounding all but rules out. A constant y gives NaN.

    :raises: ValueError where CloudSim's OLS refuses: no predictors or too few rows.
    """
    m, p = x.shape
    if p == 0 or m == 0 or p + 1 > m:
        raise ValueError('not enough data for the regression')
    if y.min() == y.max():
        return float('nan')     # CloudSim: 1 - SSR / 0, never the largest
    design = np.hstack([np.ones((m, 1)), x])
    beta = np.linalg.lstsq(design, y, rcond=None)[0]
    residual = y - design @ beta
    sst = float(((y - y.mean()) ** 2).sum())
    return 1 - float(residual @ residual) / sst


# smallest / largest eigenvalue of the Gram matrix above which its inverse is accurate
# to about 1e-7 relative (its condition number is the square of the data's)
WELL_CONDITIONED = 1e-9


def r_squared_each(rows: np.ndarray) -> np.ndarray:
    """:func:`r_squared` of each row on all the other rows (as columns) at once.

    A constant row gets NaN and, collinear with the intercept, explains nothing: the
    others are fitted without it. Two rows explain each other equally: both get their
    squared correlation, computed once so that rounding does not pick one. For more,
    with S the Gram matrix of the centred rows, the residual sum of squares of row i
    on the others is 1 / (S^-1)_ii and its total sum of squares S_ii: one
    eigendecomposition instead of a fit per row. Rows that are (nearly) linearly
    dependent make S ill-conditioned; they are fitted one by one instead.

    :raises: ValueError for fewer than two rows or fewer columns than rows.
    """
    n, m = rows.shape
    if n < 2 or n > m:
        raise ValueError('not enough data for the regression')
    varying = rows.min(axis=1) != rows.max(axis=1)
    out = np.full(n, np.nan)
    if varying.any():
        out[varying] = _r_squared_of_varying(rows[varying])
    return out


def _r_squared_of_varying(rows: np.ndarray) -> np.ndarray:
    n = len(rows)
    centred = rows - rows.mean(axis=1, keepdims=True)
    if n == 1:
        return np.zeros(1)
    if n == 2:
        c = float(centred[0] @ centred[1])
        return np.full(2, c * c / (float(centred[0] @ centred[0])
                                   * float(centred[1] @ centred[1])))
    gram = centred @ centred.T
    eigenvalues, vectors = np.linalg.eigh(gram)
    if eigenvalues[0] > eigenvalues[-1] * WELL_CONDITIONED:
        return 1 - 1 / (np.diag(gram) * ((vectors ** 2) @ (1 / eigenvalues)))
    return np.array([r_squared(rows[i], np.delete(rows, i, axis=0).T) for i in range(n)])
