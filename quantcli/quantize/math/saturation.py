"""Int16 pair saturation of x86 u8 x s8 kernels without VNNI (pure numpy).

ONNX Runtime's U8S8 GEMM and convolution kernels on AVX2, and on AVX-512 without VNNI,
multiply with `vpmaddubsw`: each pair of adjacent products a[k]*b[k] + a[k+1]*b[k+1]
(a: stored uint8 activation, b: stored int8 weight) is added into a *saturating int16*
before the int32 sum. VNNI/AMX x86 and ARM64 dot-product kernels accumulate in int32.

A pair can never leave int16, for any activation and any packing order of K, when in every
output channel the two largest stored weights of one sign sum to at most 128 in magnitude:
255 x 128 = 32640 <= 32767. `pair_bound` measures that, `pair_safe_int8` quantizes a
weight so that it holds while losing as little as possible, and `saturating_matmul`
computes what such a kernel returns, so that any host can see what an AVX2 host gets.
"""

from __future__ import annotations

import numpy as np

PAIR_LIMIT = 128  # largest same-sign |b[k]| + |b[k+1]| that fits int16 against a = 255
_QMAX = 127  # symmetric int8 weights use [-127, 127]
_STEPS = 8  # scale candidates between full 8-bit and plain rounding that is already safe
_TINY = np.float32(1e-12)
_CHUNK = 256  # columns searched at once: bounds the [4, K, C] candidate arrays
_GPTQ_BLOCK = 128  # rows rounded between two whole-matrix error updates
_GPTQ_COLUMNS = 4096  # columns rounded at once
_TS = np.linspace(0.0, 1.0, _STEPS)  # scale steps: full 8-bit (0) .. plain-safe (1)


def as_columns(w: np.ndarray, out_axis: int | None) -> np.ndarray:
    """View a weight as [K, C]: one column per output channel (None: one column)."""
    if out_axis is None:
        return np.reshape(w, (-1, 1))
    moved = np.moveaxis(w, out_axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def _top2_sum(x: np.ndarray) -> np.ndarray:
    """Sum of the two largest entries of each column of a non-negative [K, C] array."""
    if x.shape[0] < 2:
        return x.sum(axis=0)
    return np.partition(x, x.shape[0] - 2, axis=0)[-2:].sum(axis=0)


def pair_bound(q: np.ndarray, out_axis: int | None) -> np.ndarray:
    """Per output channel: the largest |b[k] + b[k']| over two stored weights of one sign.

    A channel is safe on every x86 kernel when its bound is at most PAIR_LIMIT.
    """
    cols = as_columns(np.asarray(q), out_axis)
    bound = np.empty(cols.shape[1], np.int64)
    for i in range(0, cols.shape[1], _GPTQ_COLUMNS):  # slices: a 49k-column head is 28 MB
        part = cols[:, i : i + _GPTQ_COLUMNS].astype(np.int16)  # |b| + |b'| <= 256
        bound[i : i + _GPTQ_COLUMNS] = np.maximum(
            _top2_sum(np.maximum(part, 0)), _top2_sum(np.maximum(-part, 0))
        )
    return bound


def pair_safe_int8(
    w: np.ndarray,
    out_axis: int | None,
    per_channel: bool = True,
    importance: np.ndarray | None = None,
    gram: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 weight (zero point 0) that cannot saturate an int16 pair, and its scale.

    Channels that are already safe at full 8-bit (scale max|w| / 127) keep exactly that.
    The others search scales from full 8-bit up to the smallest one at which plain rounding
    is safe; at each, values over the pair limit are capped, and the scale and capping with
    the least squared weight error win. `out_axis` is the output-channel axis of `w`;
    `per_channel` False gives one scale for the whole tensor (the limit still holds per
    channel). `importance`, one non-negative weight per row of the [K, C] view (e.g. the
    input's mean square per channel), weights the error: capping a weight that only ever
    sees small inputs costs little. `gram` (the input's sum of x x^T, [K, K]) also lets
    each channel's rounding errors be compensated by the weights not yet rounded (GPTQ,
    Frantar et al. 2022) at the chosen scale; per channel, whichever result moves the
    output less is kept. Returns (q with w's shape, scale [C] or a scalar).
    """
    w = np.asarray(w, np.float32)
    cols = as_columns(w, out_axis)
    imp = np.ones((cols.shape[0], 1), np.float32)
    if importance is not None:
        imp = np.asarray(importance, np.float32).reshape(-1, 1)
        imp = imp / max(float(imp.mean()), 1e-30)  # only the relative sizes matter
    if per_channel:
        if gram is not None and gram.shape != (cols.shape[0],) * 2:
            gram = None
        upper = None if gram is None else _inverse_factor(gram)
        q = np.empty(cols.shape, np.int8)
        scale = np.empty(cols.shape[1], np.float32)
        # Columns are independent: slices bound the temporaries (a 49k-column LM head).
        for c in (slice(i, i + _GPTQ_COLUMNS) for i in range(0, cols.shape[1], _GPTQ_COLUMNS)):
            q[:, c], scale[c] = _per_channel(cols[:, c], imp, gram, upper)
    else:
        # One scale: the step with the least total error over all channels.
        absmax, worst = _absmax(cols).max(initial=0.0), _worst(cols).max(initial=0.0)
        full = np.maximum(absmax / _QMAX, _TINY)
        ratio = np.maximum(worst / _QMAX / full, 1.0)
        chunks = [slice(i, i + _CHUNK) for i in range(0, cols.shape[1], _CHUNK)]
        totals = sum(_errors(cols[:, c], full, ratio, _TS, imp) for c in chunks)
        t = _TS[int(np.argmin(totals))] if np.isfinite(totals).all() else 1.0
        q = np.concatenate([_capped(cols[:, c], full * ratio**t, imp)[0] for c in chunks], axis=1)
        scale = np.float32(full * ratio**t)
    q = q.astype(np.int8)
    if out_axis is None:
        return q.reshape(w.shape), scale
    moved = np.moveaxis(w, out_axis, -1).shape
    return np.ascontiguousarray(np.moveaxis(q.reshape(moved), -1, out_axis)), scale


def _absmax(cols: np.ndarray) -> np.ndarray:
    return np.abs(cols).max(axis=0, initial=0.0)


def _worst(cols: np.ndarray) -> np.ndarray:
    """Per column, the larger sum of the two largest weights of one sign."""
    return np.maximum(_top2_sum(np.maximum(cols, 0)), _top2_sum(np.maximum(-cols, 0)))


def _per_channel(
    cols: np.ndarray, imp: np.ndarray, gram: np.ndarray | None, upper: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """int8 columns and their scales, each column searched (and GPTQ-rounded) on its own."""
    full = np.maximum(_absmax(cols) / _QMAX, _TINY)
    # At scale worst / 127 the two largest round to at most 128 together: always safe.
    ratio = np.maximum(_worst(cols) / _QMAX / full, 1.0)
    chunks = [slice(i, i + _CHUNK) for i in range(0, cols.shape[1], _CHUNK)]
    parts = [_search(cols[:, c], full[c], ratio[c], _TS, imp) for c in chunks]
    q = np.concatenate([p[0] for p in parts], axis=1)
    scale = np.concatenate([p[1] for p in parts]).astype(np.float32)
    if gram is not None:
        q = _better_of(cols, q, _gptq(cols, scale, upper), scale, gram)
    return q.astype(np.int8), scale


def _capped(
    cols: np.ndarray, scale: np.ndarray | float, imp: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Pair-safe integers for one scale with the least (weighted) error per column.

    Rounding, then for each sign the values that break the rule are capped in one of two
    ways, whichever costs less in that column: all but the largest at 128 - largest (a lone
    outlier keeps its value), or all at 64. The two signs never share an entry, so each
    side is chosen on its own.
    """
    q = np.clip(np.rint(cols / scale), -_QMAX, _QMAX)
    err = _cost(q * scale, cols, imp, q == 0)
    at_cols = np.arange(q.shape[1])
    for sign in (1.0, -1.0):
        v = np.maximum(sign * q, 0.0)
        side = v > 0
        top, at = v.max(axis=0, initial=0.0), v.argmax(axis=0)
        keep = np.minimum(v, np.maximum(PAIR_LIMIT - top, 0.0))
        keep[at, at_cols] = top
        even = np.minimum(v, PAIR_LIMIT // 2)
        costs = [_cost(sign * c * scale, cols, imp, side) for c in (keep, even)]
        use_keep = costs[0] <= costs[1]
        q = np.where(side, sign * np.where(use_keep, keep, even), q)
        err += np.where(use_keep, costs[0], costs[1])
    return q, err


def _cost(values: np.ndarray, cols: np.ndarray, imp: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per column, the sum over `mask` of imp * (values - cols)^2 (float32 work: this is
    the hot loop of the search, and only comparisons between costs use it)."""
    d = np.asarray(values - cols, np.float32)
    d *= d
    d *= imp
    return np.einsum("kc,kc->c", d, mask.astype(np.float32)).astype(np.float64)


def _search(
    cols: np.ndarray, full: np.ndarray, ratio: np.ndarray, ts: np.ndarray, imp: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel search over scales full * ratio**t; safe channels keep full 8-bit."""
    best_q = np.clip(np.rint(cols / full), -_QMAX, _QMAX)
    best_scale = full.copy()
    best_err = np.where(pair_bound(best_q, 1) <= PAIR_LIMIT, -1.0, np.inf)
    for t in ts:
        scale = (full * ratio**t).astype(np.float32)  # as stored: q must match it
        q, err = _capped(cols, scale, imp)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_q[:, better] = q[:, better]
        best_scale = np.where(better, scale, best_scale)
    return best_q, best_scale


def _errors(
    cols: np.ndarray, full: float, ratio: float, ts: np.ndarray, imp: np.ndarray
) -> np.ndarray:
    """Total squared error of one chunk at each per-tensor scale step."""
    return np.array([_capped(cols, full * ratio**t, imp)[1].sum() for t in ts])


def _inverse_factor(gram: np.ndarray) -> np.ndarray | None:
    """Upper Cholesky factor of the dampened inverse Hessian (None: not invertible)."""
    k = gram.shape[0]
    h = gram.astype(np.float64).copy()
    dead = np.diag(h) <= 0
    h[dead, :], h[:, dead] = 0.0, 0.0
    h[dead, dead] = 1.0
    h[np.diag_indices(k)] += 0.01 * float(np.mean(np.diag(h)))
    try:
        return np.linalg.cholesky(np.linalg.inv(h)).T
    except np.linalg.LinAlgError:
        return None


def _gptq(cols: np.ndarray, scale: np.ndarray, upper: np.ndarray | None) -> np.ndarray:
    """Round rows one at a time, spreading each row's error over the rows not yet rounded
    through the inverse Hessian's Cholesky factor, and keep every column pair-safe: a value
    may reach 128 minus the largest value of its sign rounded so far (any two of one sign
    then sum to at most 128)."""
    k = cols.shape[0]
    if upper is None:
        return np.clip(np.rint(cols / scale), -_QMAX, _QMAX)  # not invertible: no feedback
    work = cols.astype(np.float64).copy()
    q = np.zeros_like(work)
    top_pos = np.zeros(cols.shape[1])
    top_neg = np.zeros(cols.shape[1])
    # Lazy batches (GPTQ's): rows are rounded one at a time inside a block of _GPTQ_BLOCK
    # rows, and the block's errors reach the rows after it in one matrix product.
    for start in range(0, k, _GPTQ_BLOCK):
        stop = min(start + _GPTQ_BLOCK, k)
        block = work[start:stop]
        errs = np.zeros_like(block)
        for j in range(stop - start):
            row = start + j
            cap_pos = np.where(top_pos > 0, PAIR_LIMIT - top_pos, _QMAX)
            cap_neg = np.where(top_neg > 0, PAIR_LIMIT - top_neg, _QMAX)
            value = np.clip(np.rint(block[j] / scale), -cap_neg, np.minimum(cap_pos, _QMAX))
            value = np.maximum(value, -_QMAX)
            q[row] = value
            top_pos, top_neg = np.maximum(top_pos, value), np.maximum(top_neg, -value)
            errs[j] = (block[j] - value * scale) / upper[row, row]
            block[j + 1 :] -= np.outer(upper[row, row + 1 : stop], errs[j])
        work[stop:] -= upper[start:stop, stop:].T @ errs
    return q


def _better_of(
    cols: np.ndarray, a: np.ndarray, b: np.ndarray, scale: np.ndarray, gram: np.ndarray
) -> np.ndarray:
    """Per column, the candidate whose error e moves the output less: e^T H e."""

    def cost(q: np.ndarray) -> np.ndarray:
        e = q * scale - cols.astype(np.float64)
        return np.einsum("kc,kc->c", e, gram @ e)

    return np.where(cost(b) < cost(a), b, a)


def saturating_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """What an AVX2 U8S8 kernel computes for uint8 a [M, K] @ int8 b [K, N] (int32 result).

    Products of neighbours k = 2i, 2i+1 are added into a saturating int16 (vpmaddubsw),
    then the pairs are summed in int32 (vpmaddwd + vpaddd).
    """
    a = np.asarray(a).astype(np.int64)
    b = np.asarray(b).astype(np.int64)
    if a.shape[1] % 2:
        a = np.pad(a, ((0, 0), (0, 1)))
        b = np.pad(b, ((0, 1), (0, 0)))
    pairs = a[:, 0::2, None] * b[None, 0::2, :] + a[:, 1::2, None] * b[None, 1::2, :]
    return np.clip(pairs, -32768, 32767).sum(axis=1).astype(np.int32)
