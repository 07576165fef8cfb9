"""QOperatorPass: QDQ models made by ORT's quantize_static become QLinear* graphs that agree."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper
from onnx import helper as oh
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from quantcli.quantize.int8.qoperator import QOperatorPass

RNG = np.random.default_rng(0)
F = TensorProto.FLOAT


def _init(name: str, shape: tuple[int, ...], scale: float = 0.3) -> TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    graph = oh.make_graph(nodes, "g", inputs, outputs, inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def conv_net() -> onnx.ModelProto:
    """Conv+Relu -> MaxPool -> Conv -> Add(two convs) -> Concat -> GlobalAveragePool."""
    nodes = [
        oh.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        oh.make_node("Relu", ["c1"], ["r1"]),
        oh.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        oh.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        oh.make_node("Conv", ["p1", "w3"], ["c3"], kernel_shape=[1, 1]),
        oh.make_node("Add", ["c2", "c3"], ["s"]),
        oh.make_node("Mul", ["s", "c3"], ["m"]),
        oh.make_node("Concat", ["s", "m"], ["cat"], axis=1),
        oh.make_node("GlobalAveragePool", ["cat"], ["y"]),
    ]
    inits = [_init("w1", (8, 3, 3, 3)), _init("b1", (8,)), _init("w2", (8, 8, 3, 3), 0.1)]
    inits += [_init("b2", (8,)), _init("w3", (8, 8, 1, 1))]
    x = oh.make_tensor_value_info("x", F, [1, 3, 16, 16])
    return _model(nodes, [x], [oh.make_tensor_value_info("y", F, [1, 16, 1, 1])], inits)


def matmul_net() -> onnx.ModelProto:
    """Transformer-style 3-D activations times constant weights, with a Transpose/Reshape."""
    nodes = [
        oh.make_node("MatMul", ["x", "w1"], ["h"]),
        oh.make_node("Transpose", ["h"], ["t"], perm=[0, 2, 1]),
        oh.make_node("Reshape", ["t", "shape"], ["r"]),
        oh.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    shape = numpy_helper.from_array(np.array([2, 8, 32], np.int64), "shape")
    inits = [_init("w1", (32, 32)), _init("w2", (32, 12)), shape]
    x = oh.make_tensor_value_info("x", F, [2, 8, 32])
    return _model(nodes, [x], [oh.make_tensor_value_info("y", F, [2, 8, 12])], inits)


def gemm_net() -> onnx.ModelProto:
    nodes = [
        oh.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1),
        oh.make_node("Relu", ["h"], ["r"]),
        oh.make_node("Gemm", ["r", "w2", "b2"], ["y"]),
    ]
    inits = [_init("w1", (48, 32)), _init("b1", (48,)), _init("w2", (48, 10)), _init("b2", (10,))]
    x = oh.make_tensor_value_info("x", F, [4, 32])
    return _model(nodes, [x], [oh.make_tensor_value_info("y", F, [4, 10])], inits)


def _float_output(qdq: onnx.ModelProto) -> onnx.ModelProto:
    """Drop the Q/DQ pair before the graph output: the last op must then produce float."""
    out = qdq.graph.output[0].name
    dq = next(n for n in qdq.graph.node if out in n.output)
    q = next(n for n in qdq.graph.node if dq.input[0] in n.output)
    last = next(n for n in qdq.graph.node if q.input[0] in n.output)
    last.output[0] = out
    for node in (q, dq):
        qdq.graph.node.remove(node)
    return qdq


class _Reader(CalibrationDataReader):
    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def _random_feeds(model: onnx.ModelProto, n: int) -> list[dict[str, np.ndarray]]:
    inp = model.graph.input[0]
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    return [{inp.name: RNG.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def _qdq(model: onnx.ModelProto, tmp_path: Path, act: QuantType) -> onnx.ModelProto:
    src, dst = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    onnx.save(model, src)
    quantize_static(
        src,
        dst,
        _Reader(_random_feeds(model, 8)),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=act,
        weight_type=QuantType.QInt8,
        # 7-bit weights: neither form can saturate int16 pairs on x86 without VNNI, where the
        # QDQ form (int8 activations turned uint8 + 128) and QLinear ops on int8 would
        # saturate differently; the rewrite's equivalence is what is under test.
        reduce_range=True,
    )
    return onnx.load(dst)


def _to_qop(qdq: onnx.ModelProto) -> onnx.ModelProto:
    model = ir.from_proto(qdq)
    assert QOperatorPass()(model).modified
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)[0]


def _ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(node.op_type for node in model.graph.node)


def _output_scale(qdq: onnx.ModelProto) -> float:
    out = qdq.graph.output[0].name
    dq = next(n for n in qdq.graph.node if out in n.output)
    assert dq.op_type == "DequantizeLinear"
    init = {i.name: i for i in qdq.graph.initializer}
    return float(numpy_helper.to_array(init[dq.input[1]]))


def _assert_agrees(qdq: onnx.ModelProto, qop: onnx.ModelProto, feeds, step: float = 0) -> None:
    step = step or _output_scale(qdq)
    for feed in feeds:
        np.testing.assert_allclose(_run(qop, feed), _run(qdq, feed), rtol=0, atol=step * 1.01)


def _float_consumers_of_dq(model: onnx.ModelProto, op_type: str) -> int:
    produced_by_dq = {
        o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output
    }
    nodes = [n for n in model.graph.node if n.op_type == op_type]
    return sum(any(i in produced_by_dq for i in n.input) for n in nodes)


@pytest.mark.parametrize("act", [QuantType.QUInt8, QuantType.QInt8])
def test_conv_net(tmp_path: Path, act: QuantType) -> None:
    qdq = _qdq(conv_net(), tmp_path, act)
    qop = _to_qop(qdq)
    ops = _ops(qop)
    assert ops["QLinearConv"] == 3 and ops["Conv"] == 0
    assert ops["QLinearAdd"] == 1 and ops["QLinearMul"] == 1 and ops["QLinearConcat"] == 1
    assert ops["QLinearGlobalAveragePool"] == 1 and ops["MaxPool"] == 1
    assert _float_consumers_of_dq(qop, "MaxPool") == 0
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1  # graph edges only
    _assert_agrees(qdq, qop, _random_feeds(conv_net(), 5))


@pytest.mark.parametrize("act", [QuantType.QUInt8, QuantType.QInt8])
def test_matmul_net(tmp_path: Path, act: QuantType) -> None:
    qdq = _qdq(matmul_net(), tmp_path, act)
    qop = _to_qop(qdq)
    ops = _ops(qop)
    assert ops["QLinearMatMul"] == 2 and ops["MatMul"] == 0
    assert _float_consumers_of_dq(qop, "Transpose") == 0
    assert _float_consumers_of_dq(qop, "Reshape") == 0
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1
    _assert_agrees(qdq, qop, _random_feeds(matmul_net(), 5))


def _hand_conv(act: list[onnx.NodeProto], y_dtype: type, y_scale: float, float_bias: bool):
    """x -> Q/DQ -> Conv(int8 per-channel weights) -> act -> Q/DQ, built by hand."""
    w = RNG.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)
    w_scale = RNG.uniform(0.002, 0.01, 4).astype(np.float32)
    x_scale = np.float32(0.02)
    bias = RNG.integers(-500, 500, 4).astype(np.int32)
    inits = [
        numpy_helper.from_array(x_scale, "xs"),
        numpy_helper.from_array(np.uint8(128), "xz"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(w_scale, "ws"),
        numpy_helper.from_array(np.zeros(4, np.int8), "wz"),
        numpy_helper.from_array(np.float32(y_scale), "ys"),
        numpy_helper.from_array(np.array(0, y_dtype), "yz"),
    ]
    nodes = [
        oh.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        oh.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        oh.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
    ]
    if float_bias:
        inits.append(numpy_helper.from_array((bias * x_scale * w_scale).astype(np.float32), "bd"))
    else:
        inits += [
            numpy_helper.from_array(bias, "b"),
            numpy_helper.from_array(x_scale * w_scale, "bs"),
        ]
        nodes.append(oh.make_node("DequantizeLinear", ["b", "bs"], ["bd"], axis=0))
    nodes.append(oh.make_node("Conv", ["xd", "wd", "bd"], ["c"] if act else ["a"]))
    nodes += act
    nodes += [
        oh.make_node("QuantizeLinear", ["a", "ys", "yz"], ["yq"]),
        oh.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"]),
    ]
    x = oh.make_tensor_value_info("x", F, [1, 3, 8, 8])
    return _model(nodes, [x], [oh.make_tensor_value_info("y", F, [1, 4, 6, 6])], inits, opset=21)


def _clip(lo: float, hi: float) -> list[onnx.NodeProto]:
    return [
        oh.make_node("Constant", [], ["lo"], value=numpy_helper.from_array(np.float32(lo))),
        oh.make_node("Constant", [], ["hi"], value=numpy_helper.from_array(np.float32(hi))),
        oh.make_node("Clip", ["c", "lo", "hi"], ["a"]),
    ]


RELU = [oh.make_node("Relu", ["c"], ["a"])]


@pytest.mark.parametrize(
    ("act", "y_dtype", "y_scale", "fused"),
    [
        ([], np.uint8, 0.05, True),
        (RELU, np.uint8, 0.05, True),  # zero point 0 = qmin: Q clamps at 0 like Relu
        (RELU, np.int8, 0.05, False),  # symmetric int8 keeps negatives: Relu must stay
        (_clip(0.0, 6.0), np.uint8, 6.0 / 255, True),  # Q range [0, 6] inside Clip's
        (_clip(0.0, 6.0), np.uint8, 0.05, False),  # Q range [0, 12.75] wider than Clip
    ],
)
@pytest.mark.parametrize("float_bias", [False, True])
def test_fused_activation(act, y_dtype, y_scale: float, fused: bool, float_bias: bool) -> None:
    qdq = _hand_conv(act, y_dtype, y_scale, float_bias)
    model = ir.from_proto(qdq)
    assert QOperatorPass()(model).modified == fused
    qop = ir.to_proto(model)
    onnx.checker.check_model(qop, full_check=True)
    ops = _ops(qop)
    assert ops["QLinearConv"] == int(fused) and ops["Conv"] == int(not fused)
    assert ops["Relu"] + ops["Clip"] == int(bool(act) and not fused)
    feeds = [{"x": RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
    _assert_agrees(qdq, qop, feeds)


def test_second_run_changes_nothing(tmp_path: Path) -> None:
    model = ir.from_proto(_qdq(matmul_net(), tmp_path, QuantType.QUInt8))
    assert QOperatorPass()(model).modified
    assert not QOperatorPass()(model).modified


@pytest.mark.parametrize("act", [QuantType.QUInt8, QuantType.QInt8])
@pytest.mark.parametrize("float_output", [False, True])
def test_gemm_net(tmp_path: Path, float_output: bool, act: QuantType) -> None:
    qdq = _qdq(gemm_net(), tmp_path, act)
    step = _output_scale(qdq)
    qdq = _float_output(qdq) if float_output else qdq
    qop = _to_qop(qdq)
    ops = _ops(qop)
    assert ops["QGemm"] == 2 and ops["Gemm"] == 0 and ops["Relu"] == 0
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == int(not float_output)
    _assert_agrees(qdq, qop, _random_feeds(gemm_net(), 5), step)


@pytest.mark.parametrize("act", [QuantType.QUInt8, QuantType.QInt8])
def test_matmul_with_float_output(tmp_path: Path, act: QuantType) -> None:
    qdq = _qdq(matmul_net(), tmp_path, act)
    step = _output_scale(qdq)
    qdq = _float_output(qdq)
    qop = _to_qop(qdq)
    ops = _ops(qop)
    assert ops["QLinearMatMul"] == 1 and ops["MatMulIntegerToFloat"] == 1 and ops["MatMul"] == 0
    _assert_agrees(qdq, qop, _random_feeds(matmul_net(), 5), step)
