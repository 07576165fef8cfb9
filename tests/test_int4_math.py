from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper

from quantcli.quantize.math.int4 import (
    BlockQuantized,
    block_params,
    float16_scaled,
    pack_matmulnbits,
    quantize_rtn,
    to_dequantize_linear_int4,
)

# --- independent reference decoders (plain loops over bytes, per the specs) ---------------


def ref_unpack_b(b: np.ndarray) -> np.ndarray:
    """MatMulNBits B [N, n_blocks, bs/2] -> unsigned codes [n_blocks*bs, N]."""
    n, n_blocks, blob = b.shape
    out = np.zeros((n_blocks * blob * 2, n), dtype=np.int64)
    for col in range(n):
        for blk in range(n_blocks):
            for j in range(blob):
                byte = int(b[col, blk, j])
                row = blk * blob * 2 + 2 * j
                out[row, col] = byte & 0x0F
                out[row + 1, col] = byte >> 4
    return out


def ref_unpack_zero_points(zp: np.ndarray, n_blocks: int) -> np.ndarray:
    """Packed zero points [N, ceil(n_blocks/2)] -> [n_blocks, N]."""
    n = zp.shape[0]
    out = np.zeros((n_blocks, n), dtype=np.int64)
    for col in range(n):
        for blk in range(n_blocks):
            byte = int(zp[col, blk // 2])
            out[blk, col] = (byte >> 4) if blk % 2 else (byte & 0x0F)
    return out


def ref_pack_int4_row_major(values: np.ndarray) -> bytes:
    """ONNX 4-bit tensor packing: flat row-major, element 2i in the low nibble of byte i."""
    flat = [int(v) & 0x0F for v in values.reshape(-1)]
    if len(flat) % 2:
        flat.append(0)
    return bytes(flat[i] | (flat[i + 1] << 4) for i in range(0, len(flat), 2))


# --- strategies -------------------------------------------------------------------------

BLOCK_SIZES = st.sampled_from([16, 32, 64])


@st.composite
def weights(draw: st.DrawFn) -> np.ndarray:
    k = draw(st.integers(1, 100))
    n = draw(st.integers(1, 6))
    elems = st.floats(-100, 100, allow_nan=False, width=32)
    w = draw(hnp.arrays(np.float32, (k, n), elements=elems))
    return w * np.float32(draw(st.sampled_from([1e-3, 1.0, 10.0])))


# --- quantization invariants ------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(w=weights(), block_size=BLOCK_SIZES, symmetric=st.booleans(), clip=st.booleans())
def test_rtn_shapes_ranges_and_error_bound(
    w: np.ndarray, block_size: int, symmetric: bool, clip: bool
) -> None:
    bq = quantize_rtn(w, block_size, symmetric=symmetric, clip_search=clip)
    k, n = w.shape
    n_blocks = -(-k // block_size)
    assert bq.q.shape == (n_blocks * block_size, n)
    assert bq.scales.shape == (n_blocks, n) and bq.scales.dtype == np.float32
    assert np.all(np.isfinite(bq.scales)) and np.all(bq.scales > 0)
    if symmetric:
        assert bq.q.dtype == np.int8 and bq.zero_points is None
        assert bq.q.min() >= -8 and bq.q.max() <= 7
    else:
        assert bq.q.dtype == np.uint8 and bq.zero_points.shape == (n_blocks, n)
        assert bq.q.max() <= 15 and bq.zero_points.max() <= 15
    deq = bq.dequantize()
    assert deq.shape == (k, n) and deq.dtype == np.float32
    if not clip:  # nothing is clipped: every value lies within half a step of the grid
        step = np.repeat(bq.scales, block_size, axis=0)[:k]
        assert np.all(np.abs(w - deq) <= 0.5 * step * (1 + 1e-5) + 1e-30)


@settings(max_examples=60, deadline=None)
@given(w=weights(), block_size=BLOCK_SIZES, symmetric=st.booleans())
def test_clip_search_never_worse(w: np.ndarray, block_size: int, symmetric: bool) -> None:
    plain = quantize_rtn(w, block_size, symmetric=symmetric, clip_search=False)
    clipped = quantize_rtn(w, block_size, symmetric=symmetric, clip_search=True)
    err_plain = np.sum(np.square(w - plain.dequantize(), dtype=np.float64))
    err_clip = np.sum(np.square(w - clipped.dequantize(), dtype=np.float64))
    assert err_clip <= err_plain * (1 + 1e-9) + 1e-30


def test_clip_search_strictly_helps_on_heavy_tailed_weights() -> None:
    # Clipping is kept only where it cuts a block's error by CLIP_MIN_GAIN: large blocks of
    # heavy-tailed weights are where that happens.
    w = np.random.default_rng(0).standard_t(4, (256, 32)).astype(np.float32)
    errs = [
        np.sum(np.square(w - quantize_rtn(w, 256, True, c).dequantize())) for c in (False, True)
    ]
    assert errs[1] < 0.9 * errs[0]


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
def test_weights_on_grid_are_exact(symmetric: bool, clip: bool) -> None:
    rng = np.random.default_rng(1)
    bs, n_blocks, n = 32, 3, 5
    lo, hi = (-8, 7) if symmetric else (0, 15)
    codes = rng.integers(lo, hi + 1, size=(n_blocks, bs, n))
    codes[:, 0, :], codes[:, 1, :] = lo, hi  # every block spans the full grid
    scales = 2.0 ** rng.integers(-6, 3, size=(n_blocks, 1, n))
    zps = np.zeros_like(scales) if symmetric else rng.integers(0, 16, size=(n_blocks, 1, n))
    w = ((codes - zps) * scales).reshape(-1, n).astype(np.float32)
    bq = quantize_rtn(w, bs, symmetric=symmetric, clip_search=clip)
    np.testing.assert_array_equal(bq.dequantize(), w)
    np.testing.assert_array_equal(bq.scales, scales[:, 0, :].astype(np.float32))


def test_all_zero_blocks_get_nonzero_scale() -> None:
    w = np.zeros((48, 3), dtype=np.float32)
    w[:, 2] = np.linspace(-1, 1, 48)
    for symmetric in (True, False):
        bq = quantize_rtn(w, 16, symmetric=symmetric)
        assert np.all(bq.scales > 0)
        np.testing.assert_array_equal(bq.dequantize()[:, :2], 0.0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_padding_does_not_influence_scales(symmetric: bool) -> None:
    w = np.random.default_rng(2).standard_normal((40, 4)).astype(np.float32) + 3.0
    bq = quantize_rtn(w, 32, symmetric=symmetric)
    tail_scale, tail_zp = block_params(w[32:][None], symmetric)
    np.testing.assert_array_equal(bq.scales[1], tail_scale[0])
    if not symmetric:
        np.testing.assert_array_equal(bq.zero_points[1], tail_zp[0])
    zero_code = 0 if symmetric else bq.zero_points[1]
    np.testing.assert_array_equal(bq.q[40:], np.broadcast_to(zero_code, (24, 4)))


@pytest.mark.parametrize("bad", [8, 24, 512])
def test_rejects_bad_block_size(bad: int) -> None:
    with pytest.raises(ValueError):
        quantize_rtn(np.ones((32, 2), np.float32), bad)


# --- MatMulNBits packing ------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(w=weights(), block_size=BLOCK_SIZES, symmetric=st.booleans())
def test_pack_matmulnbits_matches_reference_unpack(
    w: np.ndarray, block_size: int, symmetric: bool
) -> None:
    bq = quantize_rtn(w, block_size, symmetric=symmetric)
    b, scales, zps = pack_matmulnbits(bq)
    n_blocks, n = bq.scales.shape
    assert b.dtype == np.uint8 and b.shape == (n, n_blocks, block_size // 2)
    assert scales.dtype == np.float32 and scales.shape == (n, n_blocks)
    np.testing.assert_array_equal(scales, bq.scales.T)
    codes = ref_unpack_b(b)
    if symmetric:
        assert zps is None
        np.testing.assert_array_equal(codes - 8, bq.q)  # implicit zero point 8
    else:
        assert zps.dtype == np.uint8 and zps.shape == (n, -(-n_blocks // 2))
        np.testing.assert_array_equal(codes, bq.q)
        np.testing.assert_array_equal(ref_unpack_zero_points(zps, n_blocks), bq.zero_points)
    # Reconstruct from the packed form alone and compare with the float result.
    zp_full = 8 if symmetric else np.repeat(ref_unpack_zero_points(zps, n_blocks), block_size, 0)
    deq = ((codes - zp_full) * np.repeat(scales.T, block_size, 0))[: w.shape[0]]
    np.testing.assert_allclose(deq, bq.dequantize(), rtol=1e-6, atol=0)


def test_pack_known_bytes() -> None:
    # Hand-computed: column 0 codes 0..15 then 15..0 (asymmetric, zero point 3 and 12).
    q = np.concatenate([np.arange(16), np.arange(15, -1, -1)]).astype(np.uint8)[:, None]
    bq = BlockQuantized(
        q=q,
        scales=np.ones((2, 1), np.float32),
        zero_points=np.array([[3], [12]], np.uint8),
        block_size=16,
        k=32,
        symmetric=False,
    )
    b, _, zps = pack_matmulnbits(bq)
    assert b[0, 0].tolist() == [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]
    assert b[0, 1].tolist() == [0xEF, 0xCD, 0xAB, 0x89, 0x67, 0x45, 0x23, 0x01]
    assert zps.tolist() == [[0xC3]]


# --- DequantizeLinear form ----------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(w=weights(), block_size=BLOCK_SIZES, symmetric=st.booleans())
def test_dequantize_linear_form_and_serialization(
    w: np.ndarray, block_size: int, symmetric: bool
) -> None:
    bq = quantize_rtn(w, block_size, symmetric=symmetric)
    x, scale, zp = to_dequantize_linear_int4(bq)
    k, n = w.shape
    assert x.shape == (k, n) and scale.shape == (-(-k // block_size), n)
    assert x.dtype == (ml_dtypes.int4 if symmetric else ml_dtypes.uint4)
    np.testing.assert_array_equal(x.astype(np.int64), bq.q[:k].astype(np.int64))
    proto = onnx_ir.serde.serialize_tensor(onnx_ir.tensor(x, name="x"))
    assert proto.data_type == (TensorProto.INT4 if symmetric else TensorProto.UINT4)
    assert proto.raw_data == ref_pack_int4_row_major(x.astype(np.int64))
    np.testing.assert_array_equal(numpy_helper.to_array(proto).astype(np.int64), x.astype(int))
    if symmetric:
        assert zp is None
    else:
        assert zp.dtype == ml_dtypes.uint4 and zp.shape == scale.shape
        zproto = onnx_ir.serde.serialize_tensor(onnx_ir.tensor(zp, name="zp"))
        assert zproto.raw_data == ref_pack_int4_row_major(bq.zero_points.astype(np.int64))


# --- end to end on onnxruntime ------------------------------------------------------------

CASES = [(40, 32), (100, 16), (64, 64), (300, 128)]


def _run(
    model: onnx.ModelProto, x: np.ndarray, opts: ort.SessionOptions | None = None
) -> np.ndarray:
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"X": x})[0]


def _int8_activation_bound(x: np.ndarray, deq: np.ndarray, block_size: int) -> np.ndarray:
    """Worst-case |Y - X @ deq| when X is quantized to int8 per block_size run along K
    (scale = absmax / 127, so each activation is off by at most absmax / 254)."""
    k = x.shape[1]
    n_blocks = -(-k // block_size)
    pad = n_blocks * block_size - k
    amax = np.abs(np.pad(x, ((0, 0), (0, pad)))).reshape(len(x), n_blocks, block_size).max(-1)
    w_abs = np.abs(np.pad(deq, ((0, pad), (0, 0)))).reshape(n_blocks, block_size, -1).sum(1)
    return (amax / 254.0) @ w_abs


def _model(nodes: list, inits: list, k: int, n: int, opsets: list) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def _matmulnbits_model(bq: BlockQuantized, accuracy_level: int) -> onnx.ModelProto:
    b, scales, zps = pack_matmulnbits(bq)
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "scales")]
    inputs = ["X", "B", "scales"]
    if zps is not None:
        inits.append(numpy_helper.from_array(zps, "zp"))
        inputs.append("zp")
    node = helper.make_node(
        "MatMulNBits",
        inputs,
        ["Y"],
        domain="com.microsoft",
        K=bq.k,
        N=bq.n,
        bits=4,
        block_size=bq.block_size,
        accuracy_level=accuracy_level,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return _model([node], inits, bq.k, bq.n, opsets)


def _dq_matmul_model(bq: BlockQuantized) -> onnx.ModelProto:
    x, scale, zp = to_dequantize_linear_int4(bq)
    arrays = {"Wq": x, "Ws": scale} | ({} if zp is None else {"Wz": zp})
    inits = [onnx_ir.serde.serialize_tensor(onnx_ir.tensor(a, name=k)) for k, a in arrays.items()]
    dq = helper.make_node("DequantizeLinear", list(arrays), ["W"], axis=0, block_size=bq.block_size)
    mm = helper.make_node("MatMul", ["X", "W"], ["Y"])
    return _model([dq, mm], inits, bq.k, bq.n, [helper.make_opsetid("", 21)])


def _case(k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A [K, 24] weight and a [5, K] activation batch."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, 24)).astype(np.float32)
    return w, rng.standard_normal((5, k)).astype(np.float32)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("k", "block_size"), CASES)
def test_matmulnbits_on_ort_matches_dequantize(k: int, block_size: int, symmetric: bool) -> None:
    w, x = _case(k)
    bq = quantize_rtn(w, block_size, symmetric=symmetric)
    y = _run(_matmulnbits_model(bq, accuracy_level=0), x)
    np.testing.assert_allclose(y, x @ bq.dequantize(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("k", "block_size"), CASES)
def test_matmulnbits_accuracy_level_4(k: int, block_size: int, symmetric: bool) -> None:
    # Level 4 lets the CPU kernel quantize A to int8 (per block_size run along K).
    w, x = _case(k)
    bq = quantize_rtn(w, block_size, symmetric=symmetric)
    deq = bq.dequantize()
    y = _run(_matmulnbits_model(bq, accuracy_level=4), x)
    bound = _int8_activation_bound(x, deq, block_size)
    assert np.all(np.abs(y - x @ deq) <= 1.5 * bound + 1e-4)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("k", "block_size"), CASES)
def test_dequantize_linear_int4_on_ort_matches(k: int, block_size: int, symmetric: bool) -> None:
    w, x = _case(k, seed=3)
    bq = quantize_rtn(w, block_size, symmetric=symmetric)
    deq = bq.dequantize()
    model = _dq_matmul_model(bq)
    # Unoptimized: the plain DequantizeLinear + MatMul kernels (spec semantics).
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    np.testing.assert_allclose(_run(model, x, plain), x @ deq, rtol=1e-4, atol=1e-4)
    # ORT fuses DQ(int4, axis=0, block_size) + MatMul into MatMulNBits whose accuracy level
    # comes from this session config (default "4", i.e. int8 activations).
    fused0 = ort.SessionOptions()
    fused0.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    np.testing.assert_allclose(_run(model, x, fused0), x @ deq, rtol=1e-4, atol=1e-4)
    y_default = _run(model, x)
    assert np.all(
        np.abs(y_default - x @ deq) <= 1.5 * _int8_activation_bound(x, deq, block_size) + 1e-4
    )


# --- compact (float16) scales --------------------------------------------------------------


@given(
    scales=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=2, max_side=16),
        elements=st.floats(0.0, float(np.float32(1e30)), width=32),
    )
)
def test_float16_scales_keep_eleven_bits_and_never_overflow(scales: np.ndarray) -> None:
    half, factor = float16_scaled(scales)
    assert half.dtype == np.float16 and half.shape == scales.shape
    assert factor > 0 and np.frexp(factor)[0] == 0.5  # a power of two: the Mul is exact
    top = scales.max()
    assert top == 0 or 2.0**14 <= top / factor < 2.0**15
    widened = half.astype(np.float32) * factor
    assert np.isfinite(widened).all() and (widened >= 0).all()
    normal = scales >= top * 2.0**-28  # float16 normals after the factor
    np.testing.assert_allclose(widened[normal], scales[normal], rtol=2.0**-11, atol=0)
    # below that, subnormal float16: never more than half of float16's last step off
    assert (np.abs(widened - scales) <= factor * 2.0**-25 + scales * 2.0**-11).all()
