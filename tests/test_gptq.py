from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantcli.quantize.math.gptq import gptq_quantize, hessian_update
from quantcli.quantize.math.int4 import (
    BlockQuantized,
    block_params,
    dequantize_values,
    pack_matmulnbits,
    quantize_rtn,
    quantize_values,
)


def _correlated_inputs(k: int, rows: int, seed: int) -> np.ndarray:
    """X = Z @ A (+ a little noise): strongly correlated features, like real activations."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((rows, k // 4))
    a = rng.standard_normal((k // 4, k))
    return (z @ a + 0.1 * rng.standard_normal((rows, k))).astype(np.float32)


def _output_error(x: np.ndarray, w: np.ndarray, bq: BlockQuantized) -> float:
    x64 = x.astype(np.float64)
    return float(np.sum(np.square(x64 @ w - x64 @ bq.dequantize())))


def _reference_gptq(
    w: np.ndarray, h: np.ndarray, block_size: int, symmetric: bool, damp: float
) -> np.ndarray:
    """Eager OBQ-style GPTQ (paper eqs. 2-3): explicit inverse Hessian, every row's error
    applied to all remaining rows at once, then that row eliminated from H^-1. No Cholesky,
    no lazy batches. Returns the int4 codes."""
    w = w.astype(np.float64).copy()
    k = len(w)
    hinv = np.linalg.inv(h + damp * np.mean(np.diag(h)) * np.eye(k))
    codes = []
    for i in range(k):
        if i % block_size == 0:
            scale, zp = block_params(w[i : i + block_size][None], symmetric)
            scale, zp = scale[0], None if zp is None else zp[0]
        codes.append(quantize_values(w[i], scale, zp, symmetric))
        err = w[i] - dequantize_values(codes[-1], scale, zp)
        w[i + 1 :] -= np.outer(hinv[i + 1 :, i] / hinv[i, i], err)
        rest = slice(i + 1, k)
        hinv[rest, rest] -= np.outer(hinv[rest, i], hinv[i, rest]) / hinv[i, i]
    return np.stack(codes)


@pytest.mark.parametrize(("k", "block_size", "symmetric"), [(320, 64, True), (512, 256, False)])
def test_gptq_matches_eager_reference(k: int, block_size: int, symmetric: bool) -> None:
    x = _correlated_inputs(k, 2 * k, seed=21)
    w = np.random.default_rng(22).standard_normal((k, 8)).astype(np.float32)
    h = hessian_update(None, x)
    gq = gptq_quantize(w, h, block_size, symmetric=symmetric)
    ref = _reference_gptq(w, h, block_size, symmetric, damp=0.01)
    # Same algorithm, different float paths: allow a rare rounding flip.
    match = np.mean(gq.q == ref)
    assert match > 0.995, match


def test_hessian_update_accumulates_float64() -> None:
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((2, 3, 8)).astype(np.float32) for _ in range(3)]
    h = None
    for b in batches:
        h = hessian_update(h, b)
    flat = np.concatenate([b.reshape(-1, 8) for b in batches]).astype(np.float64)
    assert h.dtype == np.float64 and h.shape == (8, 8)
    np.testing.assert_allclose(h, flat.T @ flat, rtol=1e-12)
    with pytest.raises(ValueError):
        hessian_update(h, np.ones((4, 5), np.float32))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_beats_rtn_on_correlated_inputs(symmetric: bool, act_order: bool) -> None:
    ratios = []
    for seed in range(3):
        k, n = 128, 32
        x = _correlated_inputs(k, 512, seed)
        w = np.random.default_rng(100 + seed).standard_normal((k, n)).astype(np.float32)
        h = hessian_update(None, x)
        rtn = quantize_rtn(w, 32, symmetric=symmetric)
        gq = gptq_quantize(w, h, 32, symmetric=symmetric, act_order=act_order)
        ratios.append(_output_error(x, w, gq) / _output_error(x, w, rtn))
    assert np.mean(ratios) < 0.9, ratios


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_spans_lazy_batches_and_partial_blocks(symmetric: bool) -> None:
    # K=300 crosses several 128-row lazy batches and ends in a partial block (300 % 64 != 0).
    k, n = 300, 16
    x = _correlated_inputs(k, 600, seed=7)
    w = np.random.default_rng(8).standard_normal((k, n)).astype(np.float32)
    gq = gptq_quantize(w, hessian_update(None, x), 64, symmetric=symmetric)
    rtn = quantize_rtn(w, 64, symmetric=symmetric)
    assert gq.q.shape == (320, n) and gq.scales.shape == (5, n) and gq.k == k
    zero_code = 0 if symmetric else gq.zero_points[-1]
    np.testing.assert_array_equal(gq.q[k:], np.broadcast_to(zero_code, (20, n)))
    assert _output_error(x, w, gq) < 0.9 * _output_error(x, w, rtn)


@pytest.mark.parametrize("block_size", [32, 256])
def test_gptq_block_larger_than_lazy_batch(block_size: int) -> None:
    k, n = 512, 8
    x = _correlated_inputs(k, 700, seed=3)
    w = np.random.default_rng(4).standard_normal((k, n)).astype(np.float32)
    gq = gptq_quantize(w, hessian_update(None, x), block_size)
    rtn = quantize_rtn(w, block_size)
    assert _output_error(x, w, gq) < 0.9 * _output_error(x, w, rtn)


@settings(max_examples=20, deadline=None)
@given(
    k=st.integers(1, 90),
    block_size=st.sampled_from([16, 32]),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_diagonal_hessian_reproduces_rtn(k: int, block_size: int, symmetric: bool, seed: int):
    # A diagonal Hessian decouples the rows: no error feedback, so GPTQ == RTN exactly.
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, 5)).astype(np.float32)
    h = np.diag(rng.uniform(0.5, 2.0, size=k))
    gq = gptq_quantize(w, h, block_size, symmetric=symmetric)
    rtn = quantize_rtn(w, block_size, symmetric=symmetric)
    np.testing.assert_array_equal(gq.q, rtn.q)
    np.testing.assert_array_equal(gq.scales, rtn.scales)
    if not symmetric:
        np.testing.assert_array_equal(gq.zero_points, rtn.zero_points)


def test_identity_like_hessian_nearly_rtn() -> None:
    rng = np.random.default_rng(5)
    k, n = 128, 16
    w = rng.standard_normal((k, n)).astype(np.float32)
    noise = 1e-3 * rng.standard_normal((k, k))
    gq = gptq_quantize(w, np.eye(k) + noise @ noise.T, 32)
    rtn = quantize_rtn(w, 32)
    assert np.mean(gq.q == rtn.q) > 0.98
    np.testing.assert_allclose(gq.dequantize(), rtn.dequantize(), atol=float(rtn.scales.max()))


def test_dead_columns_and_empty_hessian() -> None:
    k, n = 64, 8
    x = _correlated_inputs(k, 256, seed=9)
    x[:, [3, 17, 40]] = 0.0  # features never active in calibration
    w = np.random.default_rng(10).standard_normal((k, n)).astype(np.float32)
    gq = gptq_quantize(w, hessian_update(None, x), 16)
    assert np.all(np.isfinite(gq.dequantize()))
    # Dead rows are decoupled: they keep an RTN-like value instead of being zeroed.
    assert np.all(np.abs(gq.dequantize()[[3, 17, 40]] - w[[3, 17, 40]]) <= gq.scales.max())
    assert _output_error(x, w, gq) < _output_error(x, w, quantize_rtn(w, 16))
    empty = gptq_quantize(w, np.zeros((k, k)), 16)  # no calibration data at all
    np.testing.assert_array_equal(empty.q, quantize_rtn(w, 16).q)


def test_act_order_uses_static_groups_and_packs() -> None:
    k, n = 96, 12
    x = _correlated_inputs(k, 400, seed=11)
    x *= np.random.default_rng(12).uniform(0.1, 3.0, size=k).astype(np.float32)
    w = np.random.default_rng(13).standard_normal((k, n)).astype(np.float32)
    gq = gptq_quantize(w, hessian_update(None, x), 32, symmetric=False, act_order=True)
    rtn = quantize_rtn(w, 32, symmetric=False)
    # Groups stay contiguous along the original K with scales fixed from the original weights.
    np.testing.assert_array_equal(gq.scales, rtn.scales)
    np.testing.assert_array_equal(gq.zero_points, rtn.zero_points)
    b, scales, zps = pack_matmulnbits(gq)
    assert b.shape == (n, 3, 16) and scales.shape == (n, 3) and zps.shape == (n, 2)


def test_rejects_mismatched_hessian() -> None:
    with pytest.raises(ValueError):
        gptq_quantize(np.ones((32, 4), np.float32), np.eye(16), 16)
