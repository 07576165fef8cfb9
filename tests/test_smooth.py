"""Activation smoothing (quantize/int8/smooth.py), MatMul bias absorption and sibling fusion."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from conftest import run_ort
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import TensorProto, helper, numpy_helper

from quantcli.calibrate.channel_stats import ChannelStats
from quantcli.graph.io import load_model
from quantcli.quantize.int8.config import Int8Config
from quantcli.quantize.int8.dynamic import DynamicQuantizePass
from quantcli.quantize.int8.pipeline import quantize_int8
from quantcli.quantize.int8.smooth import SmoothInputsPass, smoothing_scales

RNG = np.random.default_rng(0)
F = TensorProto.FLOAT
K, N = 16, 24


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array.astype(np.float32), name)


def _model(nodes: list, outputs: dict[str, int], inits: list, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", F, ["b", "t", K])],
        [helper.make_tensor_value_info(o, F, ["b", "t", w]) for o, w in outputs.items()],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _ln_matmul(residual: bool) -> onnx.ModelProto:
    """x -> LayerNormalization -> MatMul (+ the LayerNorm output read by an Add too)."""
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "beta"], ["ln"], name="ln", axis=-1),
        helper.make_node("MatMul", ["ln", "w"], ["y"], name="mm"),
    ]
    outputs = {"y": N}
    if residual:
        nodes.append(helper.make_node("Add", ["ln", "x"], ["r"], name="res"))
        outputs["r"] = K
    gamma = RNG.uniform(0.5, 1.5, K)
    gamma[3] = 12.0  # one channel far above the rest, as in BERT's LayerNorms
    inits = [_init("g", gamma), _init("beta", RNG.normal(0, 0.1, K))]
    inits.append(_init("w", RNG.normal(0, 0.2, (K, N))))
    return _model(nodes, outputs, inits)


@settings(max_examples=50, deadline=None)
@given(arrays(np.float64, st.integers(2, 64), elements=st.floats(0.0, 1e3)))
def test_smoothing_scales_only_bring_outliers_down_to_the_level(absmax: np.ndarray) -> None:
    s = smoothing_scales(absmax)
    level = np.percentile(absmax, 95, method="lower")
    if s is None:
        assert level < 1e-30 or absmax.max() < 4 * level
        return
    assert (s >= 1).all() and (s <= 1e3).all()
    above = absmax > level
    capped = s == 1e3
    np.testing.assert_allclose((absmax / s)[above & ~capped], level)
    assert ((absmax / s)[capped] >= level).all()
    np.testing.assert_array_equal(s[~above], 1.0)


def test_smoothing_scales_leave_even_channels_alone() -> None:
    assert smoothing_scales(np.ones(32)) is None
    assert smoothing_scales(np.zeros(32)) is None
    assert smoothing_scales(np.r_[np.ones(31), 3.0]) is None  # 3x: below the 4x bar


def _smoothed(proto: onnx.ModelProto, absmax: np.ndarray) -> onnx.ModelProto:
    model = ir.from_proto(proto)
    s = smoothing_scales(absmax)
    assert s is not None
    SmoothInputsPass({"ln": s}, frozenset({"mm"}))(model)
    out = ir.to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    return out


def test_smoothing_folds_into_a_private_layernorm_and_is_exact() -> None:
    proto = _ln_matmul(residual=False)
    absmax = np.r_[np.ones(3), 20.0, np.ones(K - 4)]
    smoothed = _smoothed(proto, absmax)
    assert "Mul" not in Counter(n.op_type for n in smoothed.graph.node)
    feeds = {"x": RNG.standard_normal((2, 5, K)).astype(np.float32)}
    np.testing.assert_allclose(
        run_ort(smoothed, feeds)[0], run_ort(proto, feeds)[0], rtol=1e-5, atol=1e-5
    )


def test_smoothing_inserts_one_mul_when_others_read_the_tensor() -> None:
    proto = _ln_matmul(residual=True)
    smoothed = _smoothed(proto, np.r_[np.ones(3), 20.0, np.ones(K - 4)])
    ops = Counter(n.op_type for n in smoothed.graph.node)
    assert ops["Mul"] == 1
    feeds = {"x": RNG.standard_normal((2, 5, K)).astype(np.float32)}
    for got, want in zip(run_ort(smoothed, feeds), run_ort(proto, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_channel_stats_track_absmax_and_merge_by_max() -> None:
    a, b = ChannelStats(axis=-1), ChannelStats(axis=-1)
    a.update(np.array([[1.0, -5.0], [2.0, 0.5]]))
    b.update(np.array([[-3.0, 1.0]]))
    merged = ChannelStats.from_dict(a.merge(b).to_dict())
    np.testing.assert_array_equal(merged.absmax, [3.0, 5.0])
    assert merged.count == 3


def _outlier_data(path: Path, n: int = 24) -> Path:
    x = RNG.standard_normal((n, 6, K)).astype(np.float32)
    x[..., 3] *= 40.0  # a channel 40x the others ruins a per-tensor int8 scale
    np.savez(path, x=x)
    return path


def test_auto_smooths_outlier_inputs_and_gains_accuracy(tmp_path: Path) -> None:
    w = RNG.normal(0, 0.2, (K, N))
    proto = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], {"y": N}, [])
    proto.graph.initializer.append(_init("w", w))
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    data_path = _outlier_data(tmp_path / "d.npz")
    from quantcli.data import open_data
    from quantcli.graph.signature import input_specs

    errors = {}
    for smooth in (True, False):
        loaded = load_model(path)
        data = open_data(str(data_path), input_specs(loaded.model))
        result = quantize_int8(loaded, Int8Config(smooth=smooth), data=data)
        assert result.plan.smoothed == (["mm"] if smooth else [])
        label = "MatMul (dynamic, smoothed)" if smooth else "MatMul (dynamic)"
        assert result.quantized_by_type == {label: 1}
        quantized = ir.to_proto(result.model)
        x = _outlier_data(tmp_path / "eval.npz", 8)
        feeds = {"x": np.load(x)["x"]}
        want = run_ort(proto, feeds)[0]
        errors[smooth] = np.abs(run_ort(quantized, feeds)[0] - want).mean()
    assert errors[True] < 0.5 * errors[False]


def _siblings() -> onnx.ModelProto:
    """Three MatMuls (each with a bias Add) read x, like attention's Q, K and V."""
    nodes, inits = [], []
    for i in range(3):
        nodes += [
            helper.make_node("MatMul", ["x", f"w{i}"], [f"h{i}"], name=f"mm{i}"),
            helper.make_node("Add", [f"b{i}", f"h{i}"], [f"y{i}"], name=f"add{i}"),
        ]
        inits += [
            _init(f"w{i}", RNG.normal(0, 0.2, (K, N + i))),
            _init(f"b{i}", RNG.normal(size=N + i)),
        ]
    return _model(nodes, {f"y{i}": N + i for i in range(3)}, inits)


def test_sibling_matmuls_fuse_into_one_with_their_biases() -> None:
    proto = _siblings()
    fused = ir.from_proto(proto)
    DynamicQuantizePass()(fused)
    fused_proto = ir.to_proto(fused)
    onnx.checker.check_model(fused_proto, full_check=True)
    ops = Counter(n.op_type for n in fused_proto.graph.node)
    assert ops == {"DynamicQuantizeMatMul": 1, "Split": 1}
    apart = ir.from_proto(proto)
    DynamicQuantizePass(fused=False)(apart)  # no sibling fusion, bias Adds stay
    feeds = {"x": RNG.standard_normal((2, 5, K)).astype(np.float32)}
    float_out = run_ort(proto, feeds)
    for got, ref, want in zip(
        run_ort(fused_proto, feeds), run_ort(ir.to_proto(apart), feeds), float_out, strict=True
    ):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)  # the same arithmetic
        assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
