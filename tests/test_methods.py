"""Range selection: invariants, brute-force references, and known distributions."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import quantcli
from quantcli.calibrate.methods import (
    _KL_EPS,
    _MIN_WIDTH,
    METHODS,
    TINY_RANGE,
    _mse_asymmetric_bins,
    _mse_symmetric_bins,
    choose_range,
    is_degenerate,
    kl_divergences,
    quantile,
)
from quantcli.calibrate.observers import TensorStats

RNG_SEED = 1234
data_arrays = hnp.arrays(
    np.float64,
    st.integers(1, 300),
    elements=st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
)


def stats_of(x: np.ndarray, bins_per_side: int = 2048) -> TensorStats:
    s = TensorStats(bins_per_side)
    s.update(x)
    return s


# --- invariants ---------------------------------------------------------------------------


@settings(max_examples=60)
@given(data_arrays, st.sampled_from(METHODS), st.booleans(), st.sampled_from([4, 8]))
def test_range_contains_zero_and_stays_within_observed(
    x: np.ndarray, method: str, symmetric: bool, num_bits: int
) -> None:
    s = stats_of(x, 64)
    lo, hi = choose_range(s, method, symmetric=symmetric, num_bits=num_bits)
    assert lo <= 0 <= hi
    assert hi > lo
    if symmetric:
        assert lo == -hi
    if max(x.max(), 0) - min(x.min(), 0) < _MIN_WIDTH:  # (almost) all zero
        assert hi == TINY_RANGE
    elif symmetric:
        assert hi <= np.abs(x).max()
    else:
        assert min(x.min(), 0) <= lo and hi <= max(x.max(), 0)


def test_minmax_is_exact() -> None:
    s = stats_of(np.array([-0.75, 0.1, 2.5]))
    assert choose_range(s, "minmax", symmetric=False) == (-0.75, 2.5)
    assert choose_range(s, "minmax", symmetric=True) == (-2.5, 2.5)
    positive = stats_of(np.array([0.5, 3.0]))
    assert choose_range(positive, "minmax", symmetric=False) == (0.0, 3.0)  # widened to 0


# --- percentile -------------------------------------------------------------------------------


@given(data_arrays, st.floats(min_value=0.0, max_value=1.0))
def test_quantile_within_one_bin_of_sorted_data(x: np.ndarray, q: float) -> None:
    for absolute in (False, True):
        values = np.sort(np.abs(x) if absolute else x)
        s = stats_of(x, 64)
        got = quantile(s, q, absolute=absolute)
        rank = q * (x.size - 1)  # numpy's convention: np.quantile lies between these two
        below, above = values[math.floor(rank)], values[math.ceil(rank)]
        assert below - s.width <= got <= above + s.width
        assert values[0] - s.width <= got <= values[-1]


def test_percentile_matches_numpy_on_smooth_data() -> None:
    x = np.random.default_rng(RNG_SEED).standard_normal(100_000)
    s = stats_of(x)
    lo, hi = choose_range(s, "percentile", symmetric=False, percentile=99.9)
    assert abs(lo - np.percentile(x, 0.1)) <= s.width
    assert abs(hi - np.percentile(x, 99.9)) <= s.width
    _, a = choose_range(s, "percentile", symmetric=True, percentile=99.9)
    assert abs(a - np.percentile(np.abs(x), 99.9)) <= s.width


@given(data_arrays, st.floats(min_value=50.0, max_value=100.0))
def test_percentile_inside_minmax(x: np.ndarray, pct: float) -> None:
    s = stats_of(x, 64)
    for symmetric in (False, True):
        lo, hi = choose_range(s, "percentile", symmetric=symmetric, percentile=pct)
        mlo, mhi = choose_range(s, "minmax", symmetric=symmetric)
        assert mlo <= lo <= 0 <= hi <= mhi


def test_percentile_of_mostly_zeros_falls_back_to_minmax() -> None:
    x = np.zeros(100_000)
    x[:3] = [1.0, 2.0, 3.0]
    s = stats_of(x)
    assert choose_range(s, "percentile", symmetric=True, percentile=99.9) == (-3.0, 3.0)


# --- entropy ----------------------------------------------------------------------------------


def reference_kl(hist: np.ndarray, levels: int) -> np.ndarray:
    """TensorRT's loop, written plainly: one candidate at a time, bins built explicitly."""
    out = []
    for i in range(levels, hist.size + 1):
        sliced = hist[:i].astype(np.float64)
        p = sliced.copy()
        p[-1] += hist[i:].sum()
        q = np.zeros(i)
        merged = i // levels
        for g in range(levels):
            start, stop = g * merged, (i if g == levels - 1 else (g + 1) * merged)
            nonzero = p[start:stop] > 0
            if nonzero.any():
                q[start:stop][nonzero] = sliced[start:stop].sum() / nonzero.sum()
        if sliced.sum() == 0:
            out.append(np.inf)
            continue
        q[(p > 0) & (q == 0)] = _KL_EPS  # smoothing where P has mass Q lacks
        p_n, q_n = p / p.sum(), q / sliced.sum()
        mask = p > 0
        out.append(float(np.sum(p_n[mask] * np.log(p_n[mask] / q_n[mask]))))
    return np.array(out)


sparse_counts = st.one_of(st.just(0), st.integers(0, 5), st.integers(0, 10_000))


@settings(max_examples=150)
@given(
    hnp.arrays(np.int64, st.integers(8, 90), elements=sparse_counts),
    st.sampled_from([2, 4, 8]),
)
def test_vectorized_kl_matches_reference_loop(hist: np.ndarray, levels: int) -> None:
    if hist.sum() == 0 or hist.size < levels:
        return
    got, expected = kl_divergences(hist, levels), reference_kl(hist, levels)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-9, atol=1e-12)


def test_vectorized_kl_matches_reference_loop_on_a_real_sized_histogram() -> None:
    # Thousands of candidates at 128 levels: groups of many bins with a remainder, which the
    # small histograms of the property test above never reach.
    s = stats_of(np.random.default_rng(RNG_SEED).standard_normal(50_000))
    hist = s.abs_counts()[: int(np.flatnonzero(s.abs_counts())[-1]) + 1]
    assert hist.size > 1000
    np.testing.assert_allclose(kl_divergences(hist, 128), reference_kl(hist, 128), rtol=1e-9)


def python_lines(fn: Callable[[], object]) -> int:
    """Lines of quantcli's own Python executed by fn(): a count, not a time."""
    package = str(Path(quantcli.__file__).parent)
    count = 0

    def local(frame: FrameType, event: str, arg: object) -> Callable | None:
        nonlocal count
        count += event == "line"
        return local

    def on_call(frame: FrameType, event: str, arg: object) -> Callable | None:
        return local if frame.f_code.co_filename.startswith(package) else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        fn()
    finally:
        sys.settrace(previous)
    return count


def test_entropy_python_work_does_not_grow_with_the_histogram() -> None:
    """Vectorized means no Python loop over candidate thresholds: the same lines run for
    ~150 candidates as for ~3000 (a per-candidate loop anywhere in quantcli breaks this)."""
    x = np.random.default_rng(RNG_SEED).standard_normal(50_000)
    small, big = stats_of(x, bins_per_side=256), stats_of(x, bins_per_side=4096)
    assert np.flatnonzero(big.abs_counts())[-1] > 10 * np.flatnonzero(small.abs_counts())[-1]
    lines = [
        python_lines(lambda s=s: choose_range(s, "entropy", symmetric=True)) for s in (small, big)
    ]
    assert lines[0] > 0 and lines[0] == lines[1]


# --- mse --------------------------------------------------------------------------------------


def mse_error(counts: np.ndarray, first_bin: int, lo: int, hi: int, levels: int) -> float:
    """Expected squared error (in bins^2) of quantizing a histogram into [lo, hi], plainly."""
    step = (hi - lo) / levels
    total = 0.0
    for k, n in enumerate(counts.astype(np.float64)):
        left = first_bin + k
        if lo <= left and left + 1 <= hi:
            total += n * step * step / 12
        else:
            edge = hi if left >= hi else lo
            total += n * ((left + 0.5 - edge) ** 2 + 1 / 12)
    return total


histograms = hnp.arrays(np.int64, 32, elements=sparse_counts).filter(lambda h: h.any())


@settings(max_examples=60)
@given(histograms, st.sampled_from([3, 4, 8]))
def test_mse_symmetric_finds_the_brute_force_minimum(hist: np.ndarray, num_bits: int) -> None:
    levels = (1 << (num_bits - 1)) - 1
    end = int(np.flatnonzero(hist)[-1]) + 1
    errors = [mse_error(hist, 0, -a, a, 2 * levels) for a in range(1, end + 1)]
    got = _mse_symmetric_bins(hist, num_bits)
    assert mse_error(hist, 0, -got, got, 2 * levels) <= min(errors) * (1 + 1e-9) + 1e-9


@settings(max_examples=40)
@given(histograms, histograms, st.sampled_from([3, 8]))
def test_mse_asymmetric_finds_the_brute_force_minimum(
    neg: np.ndarray, pos: np.ndarray, num_bits: int
) -> None:
    counts = np.concatenate([neg, pos])  # bins -32 .. 31: exhaustive search
    levels = (1 << num_bits) - 1
    b = neg.size
    lo_min = min(int(np.flatnonzero(counts)[0]) - b, 0)
    hi_max = max(int(np.flatnonzero(counts)[-1]) - b + 1, 0)
    best = min(
        mse_error(counts, -b, lo, hi, levels)
        for lo in range(lo_min, 1)
        for hi in range(0, hi_max + 1)
        if hi > lo
    )
    lo, hi = _mse_asymmetric_bins(counts, num_bits)
    assert mse_error(counts, -b, lo, hi, levels) <= best * (1 + 1e-9) + 1e-9


def test_mse_asymmetric_coarse_then_fine_search_is_near_optimal() -> None:
    rng = np.random.default_rng(RNG_SEED)
    x = np.concatenate([rng.gamma(2.0, 1.0, 200_000), -rng.exponential(0.5, 50_000)])
    s = stats_of(x, 256)  # 257 candidates per side: the search takes the coarse grid first
    counts = s.counts.astype(np.float64)
    levels = 255
    centers = np.arange(-256, 256) + 0.5
    lo_c = np.arange(min(int(np.flatnonzero(counts)[0]) - 256, 0), 1)
    hi_c = np.arange(0, int(np.flatnonzero(counts)[-1]) - 256 + 2)
    best = np.inf
    for lo in lo_c:  # exhaustive, vectorized over hi
        hi = hi_c[hi_c > lo][:, None]
        inside = (centers >= lo) & (centers <= hi)
        clip = np.where(centers > hi, centers - hi, np.where(centers < lo, lo - centers, 0.0))
        err = np.where(inside, ((hi - lo) / levels) ** 2 / 12, clip**2 + 1 / 12) @ counts
        best = min(best, float(err.min()))
    lo, hi = _mse_asymmetric_bins(s.counts, 8)
    assert mse_error(s.counts, -256, lo, hi, levels) <= best * 1.001


# --- known distributions ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def gaussian_with_outliers() -> tuple[TensorStats, np.ndarray]:
    outliers = np.array([50.0, -45.0, 48.0])
    x = np.random.default_rng(RNG_SEED).standard_normal(1_000_000)
    return stats_of(np.concatenate([x, outliers])), outliers


def test_entropy_ignores_a_few_outliers(gaussian_with_outliers) -> None:
    s, _ = gaussian_with_outliers
    for symmetric in (True, False):
        lo, hi = choose_range(s, "entropy", symmetric=symmetric)
        assert 2.0 < hi < 6.0
        assert -6.0 < lo < -2.0


def test_mse_clips_a_few_outliers_at_the_squared_error_optimum(gaussian_with_outliers) -> None:
    # Squared error prices k outliers at X against N in-range values: with every Gaussian
    # value inside, err(a) ~ N (a/127)**2 / 12 + sum (|X| - a)**2, which is least at
    # a* = sum |X| / (N / (12 * 127**2) + k): far below the outliers, far above the bulk.
    s, outliers = gaussian_with_outliers
    expected = np.abs(outliers).sum() / ((s.count - 3) / (12 * 127**2) + 3)
    _, a = choose_range(s, "mse", symmetric=True)
    assert abs(a - expected) <= 2 * s.width
    assert 4.0 < a < 0.5 * np.abs(outliers).min()


def test_mse_on_a_gaussian_covers_most_of_the_mass() -> None:
    s = stats_of(np.random.default_rng(RNG_SEED).standard_normal(1_000_000))
    for symmetric in (True, False):
        lo, hi = choose_range(s, "mse", symmetric=symmetric)
        assert 3.0 < hi < 5.0
        assert -5.0 < lo < -3.0


@pytest.mark.parametrize("method", ["entropy", "mse"])
@pytest.mark.parametrize(("low", "high"), [(-2.0, 2.0), (-1.0, 3.0), (0.0, 5.0)])
def test_uniform_data_keeps_nearly_the_full_range(method: str, low: float, high: float) -> None:
    x = np.random.default_rng(RNG_SEED).uniform(low, high, 500_000)
    s = stats_of(x)
    lo, hi = choose_range(s, method, symmetric=False)
    assert abs(lo - x.min()) <= 0.05 * (high - low)
    assert abs(hi - x.max()) <= 0.05 * (high - low)
    _, a = choose_range(s, method, symmetric=True)
    assert a >= 0.95 * s.amax


@pytest.mark.parametrize("method", ["entropy", "mse"])
def test_exact_zeros_do_not_drag_the_range_down(method: str) -> None:
    relu = np.maximum(np.random.default_rng(RNG_SEED).standard_normal(1_000_000), 0)
    _, hi = choose_range(stats_of(relu), method, symmetric=False)
    assert 3.0 < hi < 6.0


# --- edge cases ---------------------------------------------------------------------------


def test_unknown_method_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown calibration method 'kl'"):
        choose_range(stats_of(np.ones(3)), "kl", symmetric=True)


def test_empty_stats_are_rejected() -> None:
    s = TensorStats()
    s.update(np.array([np.nan]))
    assert is_degenerate(s)
    with pytest.raises(ValueError, match="no finite value"):
        choose_range(s, "minmax", symmetric=True)


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"num_bits": 1}, "num_bits"), ({"percentile": 0}, "percentile")]
)
def test_bad_parameters_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        choose_range(stats_of(np.ones(3)), "percentile", symmetric=True, **kwargs)


@pytest.mark.parametrize("method", METHODS)
def test_all_zero_tensor_gets_a_tiny_range(method: str) -> None:
    s = stats_of(np.zeros(1000))
    assert is_degenerate(s)
    assert choose_range(s, method, symmetric=True) == (-TINY_RANGE, TINY_RANGE)
    assert choose_range(s, method, symmetric=False) == (0.0, TINY_RANGE)


@pytest.mark.parametrize("method", METHODS)
def test_constant_tensor_keeps_its_value_representable(method: str) -> None:
    s = stats_of(np.full(1000, -0.3))
    assert is_degenerate(s)
    assert choose_range(s, method, symmetric=False) == (-0.3, 0.0)
    assert choose_range(s, method, symmetric=True) == (-0.3, 0.3)
    assert not is_degenerate(stats_of(np.array([-0.3, 0.0])))
