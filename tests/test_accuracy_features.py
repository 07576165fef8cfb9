"""Pad folding, generic constant folding, bias correction, channel means, redundant
activation removal and INT4 embeddings: each checked numerically."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from conftest import run_ort
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from quantcli.calibrate.channel_stats import ChannelStats
from quantcli.graph.passes import FoldConstantTransformsPass, FoldPadIntoConvPass
from quantcli.quantize.int4.config import Int4Config
from quantcli.quantize.int4.convert import quantize_int4
from quantcli.quantize.int8.blockwise import ZERO_POINT, quantize_blocks_int8
from quantcli.quantize.math.affine import QParams, activation_qparams, clamps_within
from quantcli.quantize.math.int4 import quantize_rtn

RNG = np.random.default_rng(0)


def _pad_conv_model(pad_value: float = 0.0) -> onnx.ModelProto:
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    pads = np.array([0, 0, 1, 2, 0, 0, 1, 0], np.int64)
    nodes = [
        helper.make_node("Pad", ["x", "pads", "value"], ["p"], name="pad"),
        helper.make_node("Conv", ["p", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(pads, "pads"),
            numpy_helper.from_array(np.array(pad_value, np.float32), "value"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_zero_pad_folds_into_conv_exactly() -> None:
    proto = _pad_conv_model()
    x = RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)
    before = run_ort(proto, {"x": x})[0]
    model = ir.from_proto(proto)
    assert FoldPadIntoConvPass()(model).modified
    assert [n.op_type for n in model.graph] == ["Conv"]
    conv = next(iter(model.graph))
    assert list(conv.attributes.get_ints("pads")) == [2, 3, 2, 1]
    np.testing.assert_allclose(run_ort(ir.to_proto(model), {"x": x})[0], before, atol=1e-5)


def test_nonzero_pad_is_not_folded() -> None:
    model = ir.from_proto(_pad_conv_model(pad_value=1.0))
    assert not FoldPadIntoConvPass()(model).modified


def test_shape_arithmetic_on_constants_is_folded() -> None:
    nodes = [
        helper.make_node(
            "ConstantOfShape",
            ["shape"],
            ["zeros"],
            value=helper.make_tensor("v", TensorProto.INT64, [1], [0]),
        ),
        helper.make_node("Concat", ["head", "zeros"], ["pads"], axis=0),
        helper.make_node("Pad", ["x", "pads"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(np.array([2], np.int64), "shape"),
            numpy_helper.from_array(np.array([0, 1], np.int64), "head"),
        ],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    FoldConstantTransformsPass()(model)
    assert [n.op_type for n in model.graph] == ["Pad"]
    pads = next(iter(model.graph)).inputs[1].const_value.numpy()
    assert pads.tolist() == [0, 1, 0, 0]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=4), st.integers(0, 3))
def test_channel_means_merge_equals_one_pass(batch_sizes: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    batches = [rng.standard_normal((b, 3, 4)).astype(np.float32) for b in batch_sizes]
    parts = []
    for batch in batches:
        m = ChannelStats(axis=1)
        m.update(batch)
        parts.append(m)
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part)
    everything = np.concatenate(batches)
    expected = everything.astype(np.float64).mean(axis=(0, 2))
    np.testing.assert_allclose(merged.mean, expected, rtol=1e-9, atol=1e-12)
    again = ChannelStats.from_dict(merged.to_dict())
    np.testing.assert_array_equal(again.mean, merged.mean)


def test_clamps_within_matches_quantizer_saturation() -> None:
    relu_range = activation_qparams(0.0, 5.0, "uint8")
    assert clamps_within(relu_range, 0.0, None)  # zero point 0: Q already clamps at 0
    assert clamps_within(activation_qparams(0.0, 6.0, "uint8"), 0.0, 6.0)
    assert not clamps_within(activation_qparams(-1.0, 5.0, "uint8"), 0.0, None)
    assert not clamps_within(activation_qparams(0.0, 7.0, "uint8"), 0.0, 6.0)
    symmetric = QParams(np.array(0.05, np.float32), np.array(0, np.int8), "int8")
    assert not clamps_within(symmetric, 0.0, None)  # int8 symmetric keeps negatives


def test_bias_correction_removes_the_mean_shift(tiny, tmp_path) -> None:
    """With bias correction the quantized Conv's mean output error is much smaller."""
    from quantcli.convert import convert_int8_file
    from quantcli.quantize.int8.config import Int8Config

    w = RNG.standard_normal((8, 1, 3, 3)).astype(np.float32)  # depthwise: few taps
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["y"], name="dw", group=8, pads=[1, 1, 1, 1])
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 6, 6])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(8, np.float32), "b")],
    )
    path = tmp_path / "dw.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    # Inputs with a large positive mean: weight rounding then shifts each output's mean.
    x = (3.0 + 0.1 * RNG.standard_normal((64, 8, 6, 6))).astype(np.float32)
    data = tmp_path / "d.npz"
    np.savez(data, x=x)
    errors = {}
    for correct in (False, True):
        out = tmp_path / f"q{correct}.onnx"
        config = Int8Config(format="qdq", bias_correction=correct)
        convert_int8_file(path, out, config, data_spec=str(data))
        diff = run_ort(out, {"x": x})[0] - run_ort(path, {"x": x})[0]
        errors[correct] = np.abs(diff.mean(axis=(0, 2, 3))).max()
    assert errors[True] < 0.5 * errors[False]


def test_embeddings_int4_gather_block_quantized_is_exact_to_the_dequantized_table(tiny) -> None:
    table = RNG.standard_normal((50, 64)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["y"], name="embed")]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(table, "E")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    ids = np.array([0, 7, 49, 7], np.int64)
    expected = quantize_rtn(table.T.copy(), 32, False).dequantize().T[ids]
    for fmt, op in (("matmulnbits", "GatherBlockQuantized"), ("qdq", "DequantizeLinear")):
        result = quantize_int4(ir.from_proto(proto), Int4Config(format=fmt, embeddings=True))
        ops = [n.op_type for n in result.model.graph]
        assert op in ops
        got = run_ort(ir.to_proto(result.model), {"ids": ids})[0]
        np.testing.assert_allclose(got, expected, atol=1e-6)


def dequantize_blocks_int8(b: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    """Inverse of quantize_blocks_int8: B [N, blocks, block] uint8 (zero point 128) -> W [K, N]."""
    n, blocks, size = b.shape
    values = (b.astype(np.float32) - ZERO_POINT) * scales[:, :, None]
    return values.reshape(n, blocks * size)[:, :k].T


def test_blockwise_int8_packing_round_trips_and_matches_ort() -> None:
    w = RNG.standard_normal((40, 6)).astype(np.float32)  # K not a multiple of the block
    b, scales = quantize_blocks_int8(w, 32)
    assert b.shape == (6, 2, 32) and scales.shape == (6, 2)
    deq = dequantize_blocks_int8(b, scales, 40)
    assert np.abs(deq - w).max() <= scales.max() / 2 + 1e-6
    node = helper.make_node(
        "MatMulNBits",
        ["x", "B", "S"],
        ["y"],
        domain="com.microsoft",
        K=40,
        N=6,
        bits=8,
        block_size=32,
        accuracy_level=0,
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 40])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 6])],
        [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "S")],
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    x = RNG.standard_normal((3, 40)).astype(np.float32)
    np.testing.assert_allclose(run_ort(proto, {"x": x})[0], x @ deq, rtol=1e-4, atol=1e-4)


def test_auto_plans_gelu_fed_matmuls_smoothed_or_blockwise(tiny) -> None:
    from quantcli.quantize.int8.config import Int8Config
    from quantcli.quantize.int8.prepare import prepare_for_int8

    w1 = RNG.standard_normal((8, 16)).astype(np.float32)
    w2 = RNG.standard_normal((16, 8)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
        helper.make_node("Gelu", ["h"], ["g"], name="gelu"),
        helper.make_node("MatMul", ["g", "w2"], ["y"], name="down"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    _, plan = prepare_for_int8(ir.from_proto(proto), Int8Config())
    assert plan.dynamic == [("up", "MatMul"), ("down", "MatMul")]
    assert plan.smooth_inputs == ["x", "g"]
    assert plan.channel_axes() == {"x": -1, "g": -1}
    _, plan = prepare_for_int8(ir.from_proto(proto), Int8Config(smooth=False))
    assert plan.dynamic == [("up", "MatMul")]
    assert plan.blockwise == [("down", "MatMul")]
    assert plan.channel_axes() == {}
    _, qdq = prepare_for_int8(ir.from_proto(proto), Int8Config(format="qdq"))
    assert ("down", "MatMul") not in [(n.node, n.op_type) for n in qdq.nodes]
