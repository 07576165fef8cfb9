"""TensorStats against brute force over all data, and exact merging across shards."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from quantcli.calibrate.observers import EXP_MIN, TensorStats, fit_exp

B = 64  # a small grid keeps brute force cheap and makes coarsening frequent

# Wide magnitudes (subnormals included) stress exact binning; 1e300 keeps B * w finite.
finite_floats = st.floats(min_value=-1e300, max_value=1e300, allow_nan=False)
any_floats = st.floats(width=64)  # NaN, +-Inf, +-0.0, subnormals, 1.7e308
finite_arrays = hnp.arrays(np.float64, st.integers(0, 120), elements=finite_floats)
any_arrays = hnp.arrays(np.float64, st.integers(0, 120), elements=any_floats)


def stats_of(*batches: np.ndarray, bins_per_side: int = B) -> TensorStats:
    s = TensorStats(bins_per_side)
    for batch in batches:
        s.update(batch)
    return s


def as_json(s: TensorStats) -> str:
    """Serialized form: unlike ==, tells -0.0 from 0.0."""
    return json.dumps(s.to_dict(), allow_nan=False)


def check_against_brute_force(s: TensorStats, x: np.ndarray) -> None:
    finite = x[np.isfinite(x)]
    assert s.nan_count == int(np.isnan(x).sum())
    assert s.inf_count == int(np.isinf(x).sum())
    assert s.count == finite.size
    assert int(s.counts.sum()) == finite.size
    if finite.size == 0:
        assert s.exp is None
        assert not s.counts.any()
        return
    assert s.min == finite.min()
    assert s.max == finite.max()
    assert s.zero_count == int((finite == 0).sum())
    amax = float(np.abs(finite).max())
    w = s.width
    assert amax < B * w  # the grid holds every value ...
    assert s.exp == EXP_MIN or amax >= B * w / 2  # ... and is the finest that does
    edges = np.arange(-B, B + 1) * w
    expected, _ = np.histogram(finite, bins=edges)  # bin i: [i*w, (i+1)*w)
    np.testing.assert_array_equal(s.counts, expected)


@given(finite_arrays)
def test_one_update_matches_brute_force(x: np.ndarray) -> None:
    check_against_brute_force(stats_of(x), x)


@given(st.lists(finite_arrays, min_size=1, max_size=6))
def test_many_updates_match_brute_force(batches: list[np.ndarray]) -> None:
    check_against_brute_force(stats_of(*batches), np.concatenate(batches))


non_finite = st.sampled_from([math.nan, math.inf, -math.inf])


@given(hnp.arrays(np.float64, st.integers(0, 60), elements=non_finite | finite_floats))
def test_non_finite_values_are_counted_not_binned(x: np.ndarray) -> None:
    check_against_brute_force(stats_of(x), x)


@settings(max_examples=200)
@given(any_arrays, st.data())
def test_merged_shards_equal_one_pass(x: np.ndarray, data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, x.size), max_size=8)))
    shards = np.split(x, cuts)
    order = data.draw(st.permutations(range(len(shards))))
    parts = [stats_of(shards[i]) for i in order]
    # Merge in a random tree shape, not only left to right.
    while len(parts) > 1:
        i = data.draw(st.integers(0, len(parts) - 2))
        parts[i : i + 2] = [parts[i].merge(parts[i + 1])]
    one_pass = stats_of(x)
    assert parts[0] == one_pass
    assert as_json(parts[0]) == as_json(one_pass)


@given(any_arrays, any_arrays)
def test_update_order_does_not_matter(a: np.ndarray, b: np.ndarray) -> None:
    assert as_json(stats_of(a, b)) == as_json(stats_of(b, a))


def test_merge_leaves_inputs_unchanged() -> None:
    a, b = stats_of(np.array([0.5, -0.25])), stats_of(np.array([1e6]))
    before_a, before_b = a.to_dict(), b.to_dict()
    merged = a.merge(b)
    assert a.to_dict() == before_a
    assert b.to_dict() == before_b
    assert merged.count == 3
    assert merged.exp == b.exp


def test_merge_with_empty_is_identity() -> None:
    a = stats_of(np.array([3.0, -1.0, np.nan]))
    assert a.merge(TensorStats(B)) == a
    assert TensorStats(B).merge(a) == a


def test_merge_rejects_other_grid_sizes() -> None:
    with pytest.raises(ValueError, match="bins per side"):
        TensorStats(64).merge(TensorStats(128))


@pytest.mark.parametrize("bins", [0, 1, 3, 100])
def test_bins_per_side_must_be_power_of_two(bins: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        TensorStats(bins)


@given(any_arrays)
def test_dict_round_trip_through_json(x: np.ndarray) -> None:
    s = stats_of(x)
    back = TensorStats.from_dict(json.loads(as_json(s)))
    assert back == s
    assert as_json(back) == as_json(s)


def test_dict_is_compact() -> None:
    s = TensorStats()  # default 2 * 2048 bins
    s.update(np.random.default_rng(0).standard_normal(200_000))
    assert len(json.dumps(s.to_dict())) < 8_000  # raw counts would be 32 KiB before base64


def test_from_dict_rejects_inconsistent_counts() -> None:
    doc = stats_of(np.array([1.0, 2.0, 3.0])).to_dict()
    with pytest.raises(ValueError, match="inconsistent"):
        TensorStats.from_dict({**doc, "count": 4})
    with pytest.raises(ValueError, match="outside"):
        TensorStats.from_dict({**doc, "first_bin": B})
    with pytest.raises(ValueError, match="format"):
        TensorStats.from_dict({**doc, "format": 99})


def test_all_zero_tensor_uses_finest_grid_then_coarsens() -> None:
    s = stats_of(np.zeros(10), np.array([-0.0]))
    assert (s.exp, s.count, s.zero_count, s.min, s.max) == (EXP_MIN, 11, 11, 0.0, 0.0)
    assert s.counts[B] == 11
    s.update(np.array([5.0]))
    check_against_brute_force(s, np.concatenate([np.zeros(11), [5.0]]))


def test_negative_zero_does_not_change_the_state() -> None:
    assert as_json(stats_of(np.array([-0.0, 1.0]))) == as_json(stats_of(np.array([0.0, 1.0])))


def test_tiny_negative_value_lands_below_zero_on_a_coarse_grid() -> None:
    # -1e-300 / w underflows to -0.0 when w is huge; it still belongs in bin -1.
    s = stats_of(np.array([1e300, -1e-300]))
    assert s.counts[B - 1] == 1
    assert s.counts.sum() == 2


def test_only_non_finite_values() -> None:
    s = stats_of(np.array([np.nan, np.inf, -np.inf]))
    assert (s.count, s.nan_count, s.inf_count, s.nonfinite_count, s.exp) == (0, 1, 2, 3, None)
    assert TensorStats.from_dict(s.to_dict()) == s


def test_abs_counts_match_brute_force() -> None:
    x = np.random.default_rng(1).standard_normal(10_000)
    s = stats_of(x)
    expected, _ = np.histogram(np.abs(x), bins=np.arange(B + 1) * s.width)
    np.testing.assert_array_equal(s.abs_counts(), expected)


def test_drop_zeros_removes_exact_zeros_only() -> None:
    s = stats_of(np.array([0.0, 0.0, 1e-30, -1e-30, 0.5]))
    assert s.abs_counts(drop_zeros=True)[0] == s.abs_counts()[0] - 2
    assert s.signed_counts(drop_zeros=True)[B] == s.counts[B] - 2


def test_accepts_any_shape_and_dtype() -> None:
    x = np.arange(-6, 6, dtype=np.float32).reshape(2, 3, 2) / 4
    check_against_brute_force(stats_of(x), x.astype(np.float64).ravel())
    assert stats_of(np.array([[1, -2]], dtype=np.int8)).count == 2


@given(st.floats(min_value=0, allow_infinity=False, allow_nan=False))
def test_fit_exp_is_the_smallest_fitting_exponent(amax: float) -> None:
    e = fit_exp(amax, B)
    top = Fraction(B) * Fraction(2) ** e  # exact, where B * 2**e would overflow a float
    assert Fraction(amax) < top
    assert e == EXP_MIN or Fraction(amax) >= top / 2
