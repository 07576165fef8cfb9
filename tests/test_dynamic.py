"""DynamicQuantizePass: MatMul/Gemm with constant weights -> dynamic INT8, fused or not."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

from quantcli.quantize.int8.dynamic import DynamicQuantizePass, DynamicWeights

RNG = np.random.default_rng(0)
F = TensorProto.FLOAT
UNFUSED = ["DynamicQuantizeLinear", "MatMulInteger", "Cast", "Mul", "Mul"]


def _w(name: str, shape: tuple[int, ...], scale: float = 0.1) -> TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def _model(nodes, x_shape, y_shape, inits, opset: int = 17) -> onnx.ModelProto:
    x = oh.make_tensor_value_info("x", F, x_shape)
    y = oh.make_tensor_value_info("y", F, y_shape)
    model = oh.make_model(
        oh.make_graph(nodes, "g", [x], [y], inits), opset_imports=[oh.make_opsetid("", opset)]
    )
    onnx.checker.check_model(model)
    return model


def mlp(opset: int = 17) -> onnx.ModelProto:
    """Transformer-style 3-D tokens: MatMul + Add + Relu, Gemm(transB=1, C) on 2-D, MatMul."""
    nodes = [
        oh.make_node("MatMul", ["x", "w1"], ["h"]),
        oh.make_node("Add", ["h", "b1"], ["hb"]),
        oh.make_node("Relu", ["hb"], ["r"]),
        oh.make_node("Reshape", ["r", "flat"], ["r2"]),
        oh.make_node("Gemm", ["r2", "w2", "b2"], ["g"], name="gemm", transB=1),
        oh.make_node("MatMul", ["g", "w3"], ["y"]),
    ]
    flat = numpy_helper.from_array(np.array([-1, 128], np.int64), "flat")
    inits = [_w("w1", (64, 128)), _w("b1", (128,)), _w("w2", (96, 128)), _w("b2", (96,))]
    inits += [_w("w3", (96, 32)), flat]
    return _model(nodes, [2, 16, 64], [32, 32], inits, opset)


def _run(model: onnx.ModelProto, x: np.ndarray, optimize: bool = True) -> np.ndarray:
    options = ort.SessionOptions()
    if not optimize:  # keep ORT from fusing MatMulInteger+Cast+Mul into its fused kernel
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _quantized(
    model: onnx.ModelProto, per_channel: bool = True, **kwargs: object
) -> onnx.ModelProto:
    ir_model = ir.from_proto(model)
    result = DynamicQuantizePass(DynamicWeights(per_channel), **kwargs)(ir_model)  # type: ignore[arg-type]
    proto = ir.to_proto(result.model)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(node.op_type for node in model.graph.node)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("fused", [True, False])
def test_mlp_matches_float(fused: bool, per_channel: bool) -> None:
    model = mlp()
    qmodel = _quantized(model, fused=fused, per_channel=per_channel)
    ops = _ops(qmodel)
    assert ops["MatMul"] == 0 and ops["Gemm"] == 0
    if fused:
        # Gemm's C and the MatMul's bias Add both become DynamicQuantizeMatMul's bias
        assert ops["DynamicQuantizeMatMul"] == 3 and ops["Add"] == 0
    else:
        assert ops["MatMulInteger"] == 3 and ops["DynamicQuantizeLinear"] == 3
        assert ops["Add"] == 2  # the model's own Add plus Gemm's C
    assert not {i.name for i in qmodel.graph.initializer} & {"w1", "w2", "w3"}
    for _ in range(3):
        x = RNG.standard_normal((2, 16, 64)).astype(np.float32)
        ref = _run(model, x)
        assert _cosine(_run(qmodel, x), ref) >= 0.999
        if not fused:
            assert _cosine(_run(qmodel, x, optimize=False), ref) >= 0.999


def _skewed_matmul() -> onnx.ModelProto:
    """Weight columns whose magnitudes span three decades: per-tensor loses small ones."""
    w = RNG.standard_normal((64, 48)) * np.logspace(-3, 0, 48)
    w_init = numpy_helper.from_array(w.astype(np.float32), "w")
    return _model([oh.make_node("MatMul", ["x", "w"], ["y"])], [8, 64], [8, 48], [w_init])


@pytest.mark.parametrize("fused", [True, False])
def test_per_channel_beats_per_tensor_on_skewed_columns(fused: bool) -> None:
    model = _skewed_matmul()
    x = RNG.standard_normal((8, 64)).astype(np.float32)
    ref = _run(model, x)
    errors = {}
    for per_channel in (True, False):
        y = _run(_quantized(model, fused=fused, per_channel=per_channel), x)
        errors[per_channel] = np.abs(y - ref).max(axis=0) / np.abs(ref).max(axis=0)
    assert errors[True].mean() <= errors[False].mean()
    assert errors[True].max() < 0.1  # every column stays accurate per channel


def test_nodes_limit_the_rewrite() -> None:
    only_gemm = _quantized(mlp(), nodes=frozenset({"gemm"}))
    assert _ops(only_gemm)["MatMul"] == 2 and _ops(only_gemm)["Gemm"] == 0


def test_unsupported_nodes_are_left_alone() -> None:
    nodes = [
        oh.make_node("Transpose", ["x"], ["xt"], perm=[1, 0]),
        oh.make_node("MatMul", ["x", "xt"], ["xx"]),  # no constant weight
        oh.make_node("Gemm", ["xx", "w"], ["y"], alpha=0.5),  # scaled product
    ]
    model = _model(nodes, [8, 8], [8, 8], [_w("w", (8, 8))])
    model_ir = ir.from_proto(model)
    assert not DynamicQuantizePass()(model_ir).modified


def test_shared_weight_quantized_once() -> None:
    nodes = [oh.make_node("MatMul", ["x", "w"], ["h"]), oh.make_node("MatMul", ["h", "w"], ["y"])]
    qmodel = _quantized(_model(nodes, [4, 16], [4, 16], [_w("w", (16, 16))]))
    assert len(qmodel.graph.initializer) == 3  # int8 weight, scale, zero point


def test_old_opset_unfused_is_skipped() -> None:
    nodes = [oh.make_node("MatMul", ["x", "w"], ["y"])]
    model = _model(nodes, [4, 16], [4, 16], [_w("w", (16, 16))], opset=10)
    assert not DynamicQuantizePass(fused=False)(ir.from_proto(model)).modified


@settings(max_examples=30, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=8),
        elements=st.floats(-100, 100, width=32),
    )
)
def test_full_8bit_weights_are_max_abs_over_127(w: np.ndarray) -> None:
    q, scale = DynamicWeights(pair_safe=False).quantize(w)
    assert q.dtype == np.int8 and scale.shape == (w.shape[1],)
    assert np.abs(q.astype(np.int32)).max() <= 127
    np.testing.assert_allclose(scale, np.maximum(np.abs(w).max(axis=0) / 127, 1e-12), rtol=1e-6)
    assert np.all(np.abs(q * scale - w) <= scale / 2 + 1e-6 * np.abs(w))


def test_standard_ops_writes_only_onnx_domain_ops_with_the_same_arithmetic(cli, tmp_path) -> None:
    """convert --standard-ops: MatMulInteger instead of ONNX Runtime's fused op, the same
    weights and results; the QOperator form (com.microsoft ops) is refused."""
    from conftest import sample

    s = sample("encoder")
    fused, plain = tmp_path / "fused.onnx", tmp_path / "plain.onnx"
    cli.ok("convert", s.model, "--data", s.calib, "-o", fused)
    cli.ok("convert", s.model, "--data", s.calib, "-o", plain, "--standard-ops")
    model = onnx.load(plain)
    onnx.checker.check_model(model, full_check=True)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["MatMulInteger"] > 0 and ops["DynamicQuantizeLinear"] > 0
    assert "DynamicQuantizeMatMul" in {n.op_type for n in onnx.load(fused).graph.node}
    feeds = {"input": s.eval_arrays(16)[0]}
    a = ort.InferenceSession(fused).run(None, feeds)
    b = ort.InferenceSession(plain).run(None, feeds)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4 * np.abs(x).max())
    line = cli.fails(
        "convert", s.model, "--data", s.calib, "-o", tmp_path / "q.onnx", "--standard-ops",
        "--format", "qoperator",
    )  # fmt: skip
    assert "--standard-ops cannot write the QOperator form" in line


def test_standard_ops_upgrades_an_opset_10_model_rather_than_skip_it(cli, tmp_path) -> None:
    """DynamicQuantizeLinear is opset 11: an opset-10 model is upgraded, never left float."""
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    nodes = [oh.make_node("MatMul", ["x", "w"], ["y"])]
    onnx.save(_model(nodes, ["batch", 16, 64], ["batch", 16, 32], [_w("w", (64, 32))], 10), src)
    cli.ok("convert", src, "--dynamic", "--per-tensor", "--standard-ops", "-o", out)
    model = onnx.load(out)
    assert "MatMulInteger" in {n.op_type for n in model.graph.node}
    assert "MatMul" not in {n.op_type for n in model.graph.node}
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}


@pytest.mark.parametrize("release", [True, False])
def test_input_gram_is_dropped_after_its_last_reader_only_when_owned(release: bool) -> None:
    from quantcli.calibrate.channel_stats import ChannelStats
    from quantcli.quantize.int8.pipeline import _Grams

    x = np.random.default_rng(0).normal(size=(64, 8))
    stats = ChannelStats(-1, track_gram=True)
    stats.update(x)
    want = x.T @ x
    grams = _Grams(stats, readers=2, release=release)
    s = np.full(8, 2.0)
    np.testing.assert_allclose(grams.get(None), want, rtol=1e-5, atol=1e-4)
    assert stats.gram is not None  # a second reader still needs it
    np.testing.assert_allclose(grams.get(s), want / 4.0, rtol=1e-5, atol=1e-4)
    assert (stats.gram is None) == release
