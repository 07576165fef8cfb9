"""GPTQ (Frantar et al., 2022) INT4 block quantization of a ``[K, N]`` MatMul weight.

Rows of ``W`` (the K axis) are quantized one at a time, vectorized over the N output columns;
each row's rounding error is spread over the not-yet-quantized rows through the upper Cholesky
factor of the inverse Hessian ``H = sum x^T x``. Updates are applied lazily in batches of
``LAZY_BATCH`` rows. The result is a :class:`BlockQuantized`, packed exactly like RTN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quantcli.quantize.math.int4 import (
    BlockQuantized,
    block_params,
    check_block_size,
    dequantize_values,
    pad_k,
    quantize_values,
)

LAZY_BATCH = 128
MAX_DAMP_RETRIES = 6


def hessian_update(h: np.ndarray | None, x: np.ndarray) -> np.ndarray:
    """Accumulate ``x^T x`` (float64) of activations ``x[..., K]`` into ``h`` (``[K, K]``)."""
    x2 = np.asarray(x, dtype=np.float64).reshape(-1, np.shape(x)[-1])
    update = x2.T @ x2
    if h is None:
        return update
    if h.shape != update.shape:
        raise ValueError(f"hessian shape {h.shape} does not match activations K={x2.shape[1]}")
    h += update
    return h


def _prepare_hessian(hessian: np.ndarray, k_padded: int, damp: float) -> np.ndarray:
    """Pad to ``k_padded``, make dead (zero-diagonal) rows identity, add dampening."""
    k = hessian.shape[0]
    h = np.zeros((k_padded, k_padded), dtype=np.float64)
    h[:k, :k] = hessian
    dead = np.diag(h) <= 0
    # Dead inputs are decoupled: their weights are plainly rounded and spread no error.
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    h[np.diag_indices(k_padded)] += damp * np.mean(np.diag(h))
    return h


def _inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor of ``h^-1``, raising dampening until ``h`` is positive definite."""
    extra = 0.0
    base = np.mean(np.diag(h))
    for _ in range(MAX_DAMP_RETRIES):
        try:
            hd = h + extra * np.eye(h.shape[0])
            lower = np.linalg.cholesky(hd)
            lower_inv = np.linalg.inv(lower)
            return np.linalg.cholesky(lower_inv.T @ lower_inv).T
        except np.linalg.LinAlgError:
            extra = base * 0.1 if extra == 0.0 else extra * 10.0
    raise np.linalg.LinAlgError("hessian is not positive definite even after dampening")


class _GroupParams:
    """Per-block scales/zero points, either fixed up front or chosen when a block starts."""

    def __init__(self, n_blocks: int, n: int, symmetric: bool) -> None:
        self.scales = np.ones((n_blocks, n), dtype=np.float32)
        self.zps = None if symmetric else np.zeros((n_blocks, n), dtype=np.uint8)

    def set(self, idx: int | slice, scale: np.ndarray, zp: np.ndarray | None) -> None:
        self.scales[idx] = scale
        if self.zps is not None:
            self.zps[idx] = zp

    def row(self, block: int) -> tuple[np.ndarray, np.ndarray | None]:
        return self.scales[block], None if self.zps is None else self.zps[block]


@dataclass(frozen=True)
class GptqFactor:
    """What GPTQ derives from a Hessian alone: the row order and the upper Cholesky factor of
    the dampened inverse. Weights that share an input (Q/K/V, column slices of one weight)
    share it, so it is computed once."""

    perm: np.ndarray
    hinv: np.ndarray
    block_size: int
    act_order: bool


def gptq_factor(
    hessian: np.ndarray, block_size: int, damp: float = 0.01, act_order: bool = False
) -> GptqFactor:
    k = hessian.shape[0]
    kp = -(-k // block_size) * block_size
    h = _prepare_hessian(np.asarray(hessian, dtype=np.float64), kp, damp)
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(kp)
    if act_order:
        h = h[perm][:, perm]
    return GptqFactor(perm, _inverse_cholesky_upper(h), block_size, act_order)


def gptq_quantize(
    w: np.ndarray,
    hessian: np.ndarray | None,
    block_size: int,
    symmetric: bool = True,
    damp: float = 0.01,
    act_order: bool = False,
    clip_search: bool = True,
    factor: GptqFactor | None = None,
) -> BlockQuantized:
    """GPTQ-quantize ``w`` ``[K, N]`` given ``hessian = sum x^T x`` ``[K, K]`` (or its
    precomputed ``factor``).

    Without ``act_order`` a block's scales are chosen when its first row is reached, from
    the error-updated weights (same selection as RTN, incl. clip search). With ``act_order``
    rows are processed by decreasing Hessian diagonal; since blocks must stay contiguous
    along the original K for MatMulNBits, scales are then fixed up front from the original
    weights ("static groups").
    """
    check_block_size(block_size)
    w = np.asarray(w, dtype=np.float32)
    k, n = w.shape
    if factor is None:
        if hessian is None or hessian.shape != (k, k):
            shape = None if hessian is None else hessian.shape
            raise ValueError(f"hessian shape {shape} does not match K={k}")
        factor = gptq_factor(hessian, block_size, damp, act_order)
    if factor.block_size != block_size or len(factor.perm) != -(-k // block_size) * block_size:
        raise ValueError("the GPTQ factor was made for another block size or K")
    act_order = factor.act_order
    wp = pad_k(w, block_size).astype(np.float64)
    kp = wp.shape[0]
    params = _GroupParams(kp // block_size, n, symmetric)
    perm = factor.perm
    if act_order:
        blocks = wp.reshape(-1, block_size, n)
        params.set(slice(None), *block_params(blocks, symmetric, clip_search))
        wp = wp[perm]
    q = _gptq_rows(wp, factor.hinv, perm, params, block_size, symmetric, clip_search, act_order)
    q_orig = np.empty_like(q)
    q_orig[perm] = q
    return BlockQuantized(q_orig, params.scales, params.zps, block_size, k, symmetric)


def _gptq_rows(
    w: np.ndarray,
    hinv: np.ndarray,
    perm: np.ndarray,
    params: _GroupParams,
    block_size: int,
    symmetric: bool,
    clip_search: bool,
    static_groups: bool,
) -> np.ndarray:
    """Quantize rows of ``w`` (in processing order) with lazy batch error feedback."""
    kp, n = w.shape
    q = np.empty((kp, n), dtype=np.int8 if symmetric else np.uint8)
    # A multiple of block_size, so a block never straddles two lazy batches and is fully
    # updated when its scales are chosen.
    batch = max(LAZY_BATCH, block_size)
    for i1 in range(0, kp, batch):
        i2 = min(i1 + batch, kp)
        w1 = w[i1:i2].copy()
        err1 = np.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            row = i1 + i
            if not static_groups and row % block_size == 0:
                chosen = block_params(w1[i : i + block_size][None], symmetric, clip_search)
                params.set(row // block_size, chosen[0][0], _first(chosen[1]))
            scale, zp = params.row(perm[row] // block_size)
            q[row] = quantize_values(w1[i], scale, zp, symmetric)
            deq = dequantize_values(q[row], scale, zp).astype(np.float64)
            err = (w1[i] - deq) / h1[i, i]
            w1[i:] -= np.outer(h1[i, i:], err)
            err1[i] = err
        w[i2:] -= hinv[i1:i2, i2:].T @ err1
    return q


def _first(zp: np.ndarray | None) -> np.ndarray | None:
    return None if zp is None else zp[0]
