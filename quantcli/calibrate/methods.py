"""Range selection from a TensorStats histogram: minmax, percentile, entropy (KL) and MSE.

Every method returns (lo, hi) with lo <= 0 <= hi, because quantization needs zero to be
exactly representable, and never wider than the observed values (except for tensors within
2**-100 of zero: they get +-TINY_RANGE, which keeps scales clear of underflow). Methods that
pick a threshold work in units of histogram bins and only convert to values at the end.
Entropy and MSE leave exact zeros out: they quantize without error whatever the range, and
after ReLU their spike in the first bin would otherwise drag the entropy threshold down.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from quantcli.calibrate.observers import TensorStats

METHODS = ("minmax", "percentile", "entropy", "mse")

TINY_RANGE = 2.0**-24  # half-width returned when every observed value is (almost) zero
_MIN_WIDTH = 2.0**-100  # narrower ranges would give float32 scales near underflow
_KL_EPS = 1e-4  # TensorRT/MXNet smoothing mass (in counts) for an empty candidate bin
_MSE_GRID = 256  # most lo (and hi) candidates per pass of the asymmetric MSE search
# Entropy may clip a tail, never more than this fraction of the nonzero values (docs/
# calibration.md: measured on the sample digit CNN, the MNIST CNN and EfficientNet-Lite0).
ENTROPY_MAX_CLIPPED = 1e-3


def is_degenerate(stats: TensorStats) -> bool:
    """True when the tensor showed no finite value or a single constant value.

    Such a tensor has no distribution to trade clipping against rounding on: choose_range
    returns its minmax range, or a tiny one (+-TINY_RANGE) when the constant is zero.
    """
    return stats.count == 0 or stats.min == stats.max


def choose_range(
    stats: TensorStats,
    method: str,
    *,
    symmetric: bool,
    num_bits: int = 8,
    percentile: float = 99.99,
) -> tuple[float, float]:
    """Quantization range (lo, hi), lo <= 0 <= hi, for the data summarised by `stats`."""
    chooser = _CHOOSERS.get(method)
    if chooser is None:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {METHODS}")
    if stats.count == 0:
        raise ValueError("no finite value was observed; cannot choose a range")
    if not 2 <= num_bits <= 16:
        raise ValueError(f"num_bits must be in [2, 16], got {num_bits}")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if is_degenerate(stats):
        chooser = _minmax
    lo, hi = chooser(stats, symmetric, num_bits, percentile)
    return _finalize(stats, lo, hi, symmetric)


def _finalize(stats: TensorStats, lo: float, hi: float, symmetric: bool) -> tuple[float, float]:
    """Clamp to the observed range widened to zero; make symmetric; avoid zero width."""
    lo = min(max(lo, stats.min), 0.0)
    hi = max(min(hi, stats.max), 0.0)
    if hi - lo < _MIN_WIDTH:  # e.g. a percentile of mostly-zero data: keep what was seen
        lo, hi = min(stats.min, 0.0), max(stats.max, 0.0)
    if hi - lo < _MIN_WIDTH:
        return (-TINY_RANGE, TINY_RANGE) if symmetric else (0.0, TINY_RANGE)
    if symmetric:
        a = max(-lo, hi)
        return -a, a
    return lo, hi


def _minmax(stats: TensorStats, symmetric: bool, num_bits: int, pct: float) -> tuple[float, float]:
    return stats.min, stats.max


def _percentile(
    stats: TensorStats, symmetric: bool, num_bits: int, pct: float
) -> tuple[float, float]:
    if symmetric:
        a = quantile(stats, pct / 100, absolute=True)
        return -a, a
    return quantile(stats, 1 - pct / 100), quantile(stats, pct / 100)


def _entropy(stats: TensorStats, symmetric: bool, num_bits: int, pct: float) -> tuple[float, float]:
    # An asymmetric range over a one-signed tensor (after ReLU) spends all 2**bits levels on
    # one side; searching with half of them would clip far too much.
    one_sided = not symmetric and (stats.min >= 0 or stats.max <= 0)
    a = entropy_threshold(stats, num_bits + 1 if one_sided else num_bits)
    return -a, a  # asymmetric: _finalize cuts each side at the observed min / max


def _mse(stats: TensorStats, symmetric: bool, num_bits: int, pct: float) -> tuple[float, float]:
    if symmetric:
        a = _mse_symmetric_bins(stats.abs_counts(drop_zeros=True), num_bits) * stats.width
        return -a, a
    lo, hi = _mse_asymmetric_bins(stats.signed_counts(drop_zeros=True), num_bits)
    return lo * stats.width, hi * stats.width


_CHOOSERS: dict[str, Callable[[TensorStats, bool, int, float], tuple[float, float]]] = {
    "minmax": _minmax,
    "percentile": _percentile,
    "entropy": _entropy,
    "mse": _mse,
}


def quantile(stats: TensorStats, q: float, *, absolute: bool = False) -> float:
    """Value below which a fraction q of the observed values (or of |x|) lie.

    Uses numpy's rank convention, q * (count - 1). Exact zeros sit at 0 (they come first in
    the zero bin); other values are spread evenly inside their bin. The result lies in the
    bin that holds the sorted value at that rank: within one bin width of np.quantile
    whenever neighbouring values are that close.
    """
    if stats.count == 0:
        raise ValueError("no finite value was observed")
    low, high = (0.0, stats.amax) if absolute else (stats.min, stats.max)
    if q >= 1:
        return high
    counts = stats.abs_counts() if absolute else stats.counts
    zero_bin = 0 if absolute else stats.bins_per_side
    cum = np.cumsum(counts)
    rank = max(q, 0.0) * (stats.count - 1)
    j = int(np.searchsorted(cum, rank, side="right"))  # first bin whose cumulative > rank
    offset, n = rank - (int(cum[j - 1]) if j else 0), int(counts[j])
    if j == zero_bin:
        if offset < stats.zero_count:
            return min(max(0.0, low), high)
        offset, n = offset - stats.zero_count, n - stats.zero_count
    frac = min(max((offset + 0.5) / n, 0.0), 1.0)
    return min(max((j - zero_bin + frac) * stats.width, low), high)


def entropy_threshold(stats: TensorStats, num_bits: int = 8) -> float:
    """TensorRT's KL-divergence threshold on the |x| histogram (capped at max |x|), among
    the thresholds that clip at most ENTROPY_MAX_CLIPPED of the nonzero values.

    KL prices the clipped values as one lump in the last kept bin, however far beyond the
    threshold they lie: a fair model of a thin tail, not of a second mode. On a bimodal
    tensor (a normalized image: a spike at the background value, strokes up to 2.8) the
    unconstrained minimum cut the upper mode off and took the sample digit CNN from 98% to
    62% accuracy. Exact zeros are left out of the histogram; needs one nonzero value.
    """
    counts = stats.abs_counts(drop_zeros=True)
    end = int(np.flatnonzero(counts)[-1]) + 1
    levels = 1 << (num_bits - 1)
    if end <= levels:  # the histogram is no finer than the quantization grid: clip nothing
        return stats.amax
    hist = counts[:end]
    kl = kl_divergences(hist, levels)
    clipped = hist.sum() - np.cumsum(hist)[levels - 1 :]  # values beyond each candidate
    kl[clipped > ENTROPY_MAX_CLIPPED * hist.sum()] = np.inf  # the last candidate clips none
    return min((levels + int(np.argmin(kl))) * stats.width, stats.amax)


def kl_divergences(hist: np.ndarray, levels: int) -> np.ndarray:
    """KL(P||Q) for every candidate threshold of `levels` .. len(hist) bins, vectorized.

    For candidate i (TensorRT): P = hist[:i] with the mass beyond i added to its last bin;
    Q = hist[:i] merged into `levels` groups of i // levels bins (the last group takes the
    remainder), each group's mass spread evenly over its bins where P is nonzero. With
    sums S_g, nonzero counts n_g and outlier mass O, both normalized:
        KL = (sum P log P - sum_g S_g log(S_g / n_g) - O log Q_last) / N - log N + log C_i
    where N = sum(hist) and C_i = sum(hist[:i]) = sum(Q). This needs only prefix sums and
    O(levels) work per candidate, so all candidates are evaluated at once. The one bin where
    P > 0 but Q == 0 (outliers on an empty last group) gets TensorRT's smoothing mass,
    left out of sum(Q) (an O(1e-4 / C_i) change that keeps the formula closed).
    """
    hist = np.asarray(hist, dtype=np.int64)
    cand = np.arange(levels, hist.size + 1)
    cum = np.concatenate(([0], np.cumsum(hist)))
    cum_nonzero = np.concatenate(([0], np.cumsum(hist > 0)))
    cum_xlogx = np.concatenate(([0.0], np.cumsum(_xlogx(hist.astype(np.float64)))))
    total = float(cum[-1])
    kept = cum[cand].astype(np.float64)
    outliers = total - kept
    last = hist[cand - 1]

    bounds = (cand // levels)[:, None] * np.arange(levels + 1)
    bounds[:, -1] = cand
    group_sum = np.diff(cum[bounds], axis=1).astype(np.float64)
    group_nonzero = np.diff(cum_nonzero[bounds], axis=1)
    group_nonzero[:, -1] += (last == 0) & (outliers > 0)  # outliers make P's last bin nonzero
    with np.errstate(divide="ignore", invalid="ignore"):
        s_log_q = np.where(group_sum > 0, group_sum * np.log(group_sum / group_nonzero), 0.0)
        q_last = np.where(group_sum[:, -1] > 0, group_sum[:, -1] / group_nonzero[:, -1], _KL_EPS)
        p_log_p = cum_xlogx[cand - 1] + _xlogx(last + outliers)
        kl = (p_log_p - s_log_q.sum(axis=1) - outliers * np.log(q_last)) / total
        kl += np.log(kept) - np.log(total)
    kl[kept == 0] = np.inf  # Q is empty: not a distribution
    return kl


def _xlogx(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > 0, x * np.log(x), 0.0)


def _mse_symmetric_bins(abs_counts: np.ndarray, num_bits: int) -> int:
    """Threshold (in bins) minimizing the expected squared error on [-a, a].

    Values inside cost step**2 / 12 (uniform rounding error); values in a clipped bin cost
    their distance to a, squared, plus the bin's own spread (w**2 / 12).
    """
    end = int(np.flatnonzero(abs_counts)[-1]) + 1
    counts = abs_counts[:end].astype(np.float64)
    m0, m1, m2 = _prefix_moments(counts, first_bin=0)
    edge = np.arange(1, end + 1)  # candidate thresholds, also prefix indices
    a = edge.astype(np.float64)
    above0, above1, above2 = m0[-1] - m0[edge], m1[-1] - m1[edge], m2[-1] - m2[edge]
    clip = above2 - 2 * a * above1 + a * a * above0 + above0 / 12
    step = a / ((1 << (num_bits - 1)) - 1)
    err = (m0[-1] - above0) * step**2 / 12 + clip
    return int(edge[np.argmin(err)])


def _mse_asymmetric_bins(counts: np.ndarray, num_bits: int) -> tuple[int, int]:
    """Edges (lo, hi) in bins minimizing the expected squared error on [lo, hi].

    Searches a grid of at most _MSE_GRID candidates per side, then the full resolution
    around the best pair (exhaustive when the histogram is small).
    """
    b = counts.size // 2
    nonzero = np.flatnonzero(counts)
    lo_min, hi_max = min(int(nonzero[0]) - b, 0), max(int(nonzero[-1]) - b + 1, 0)
    moments = _prefix_moments(counts.astype(np.float64), first_bin=-b)
    levels = (1 << num_bits) - 1
    lo_c, hi_c = _grid(lo_min, 0), _grid(0, hi_max)
    lo, hi = _best_pair(lo_c, hi_c, moments, b, levels)
    lo_step = int(np.max(np.diff(lo_c), initial=1))
    hi_step = int(np.max(np.diff(hi_c), initial=1))
    if lo_step > 1 or hi_step > 1:
        lo_c = np.arange(max(lo - lo_step, lo_min), min(lo + lo_step, 0) + 1)
        hi_c = np.arange(max(hi - hi_step, 0), min(hi + hi_step, hi_max) + 1)
        lo, hi = _best_pair(lo_c, hi_c, moments, b, levels)
    return lo, hi


def _grid(start: int, stop: int) -> np.ndarray:
    """At most _MSE_GRID integers from start to stop, both included."""
    n = min(stop - start + 1, _MSE_GRID)
    return np.unique(np.linspace(start, stop, n).round().astype(np.int64))


def _best_pair(
    lo_c: np.ndarray,
    hi_c: np.ndarray,
    moments: tuple[np.ndarray, np.ndarray, np.ndarray],
    b: int,
    levels: int,
) -> tuple[int, int]:
    m0, m1, m2 = moments
    lo, ilo = lo_c.astype(np.float64)[:, None], lo_c[:, None] + b  # edge -> prefix index
    hi, ihi = hi_c.astype(np.float64)[None, :], hi_c[None, :] + b
    below = lo * lo * m0[ilo] - 2 * lo * m1[ilo] + m2[ilo] + m0[ilo] / 12
    a0, a1, a2 = m0[-1] - m0[ihi], m1[-1] - m1[ihi], m2[-1] - m2[ihi]
    above = a2 - 2 * hi * a1 + hi * hi * a0 + a0 / 12
    step = (hi - lo) / levels
    err = (m0[ihi] - m0[ilo]) * step**2 / 12 + below + above
    err[(hi - lo) == 0] = np.inf
    i, j = np.unravel_index(int(np.argmin(err)), err.shape)
    return int(lo_c[i]), int(hi_c[j])


def _prefix_moments(
    counts: np.ndarray, first_bin: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prefix sums of n, n*c and n*c**2 (c: bin centers in bins); index k sums bins < k."""
    centers = np.arange(counts.size) + first_bin + 0.5
    zero = np.zeros(1)
    return (
        np.concatenate((zero, np.cumsum(counts))),
        np.concatenate((zero, np.cumsum(counts * centers))),
        np.concatenate((zero, np.cumsum(counts * centers * centers))),
    )
