"""INT8 planning rules, checked on the plan and on the Q/DQ model each tiny model converts to."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import Tiny, conv_net, run_ort
from onnx import TensorProto, helper, numpy_helper

from quantcli.convert import convert_int8_file
from quantcli.quantize.int8.config import Int8Config
from quantcli.quantize.int8.plan import Plan
from quantcli.quantize.int8.prepare import prepare_for_int8


class Converted:
    """A converted tiny model with lookups by tensor name."""

    def __init__(self, proto: onnx.ModelProto, plan: Plan) -> None:
        self.proto, self.plan = proto, plan
        self.inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
        self.nodes = {n.name: n for n in proto.graph.node}

    def readers(self, tensor: str) -> list[onnx.NodeProto]:
        return [n for n in self.proto.graph.node if tensor in n.input]

    def producer(self, tensor: str) -> onnx.NodeProto | None:
        return next((n for n in self.proto.graph.node if tensor in n.output), None)

    def quantizer(self, tensor: str) -> tuple[np.ndarray, np.ndarray]:
        """Scale and zero point of the QuantizeLinear that reads `tensor`."""
        (q,) = [n for n in self.readers(tensor) if n.op_type == "QuantizeLinear"]
        return self.inits[q.input[1]], self.inits[q.input[2]]

    def weight_dq(self, node: str, index: int = 1) -> onnx.NodeProto:
        dq = self.producer(self.nodes[node].input[index])
        assert dq is not None and dq.op_type == "DequantizeLinear", f"{node} input {index} is float"
        return dq

    def axis(self, dq: onnx.NodeProto) -> int | None:
        return next((a.i for a in dq.attribute if a.name == "axis"), None)

    def planned(self) -> list[str]:
        return sorted(n.node for n in self.plan.nodes)


def convert(tiny: Tiny, name: str, **config: Any) -> Converted:
    path = tiny.path(name)
    out = tiny.root / f"{name}.int8.onnx"
    cfg = Int8Config(**{"format": "qdq", **config})  # QDQ for every op, MatMul included
    convert_int8_file(path, out, cfg, data_spec=str(tiny.data(path, n=16)), force=True)
    _, plan = prepare_for_int8(ir.load(path), cfg)
    return Converted(onnx.load(out), plan)


@pytest.mark.parametrize(("model", "act"), [("conv_net", "relu"), ("conv_net_clip", "clip")])
def test_activation_fused_into_conv(tiny: Tiny, model: str, act: str) -> None:
    c = convert(tiny, model)
    (conv_plan,) = [n for n in c.plan.nodes if n.node == "conv1"]
    assert conv_plan.fused == act and conv_plan.output == "a1"
    (reader,) = c.readers(c.nodes["conv1"].output[0])
    if reader.op_type != "QuantizeLinear":  # the activation may also be dropped as redundant
        assert reader.name == act
        assert [n.op_type for n in c.readers(reader.output[0])] == ["QuantizeLinear"]
    assert c.producer(c.nodes["conv1"].input[0]).op_type == "DequantizeLinear"


@pytest.mark.parametrize("depthwise", [False, True])
def test_depthwise_conv(tiny: Tiny, depthwise: bool) -> None:
    c = convert(tiny, "conv_net_depthwise", quantize_depthwise=depthwise)
    assert ("dwconv" in c.planned()) is depthwise
    dw_weight = c.producer(c.nodes["dwconv"].input[1])
    assert (dw_weight is not None and dw_weight.op_type == "DequantizeLinear") is depthwise
    if not depthwise:
        assert ("dwconv", "Conv") in [(n, o) for n, o, _ in c.plan.skipped]


def test_depthwise_convs_are_quantized_per_channel_by_default(tiny: Tiny) -> None:
    """The documented default (docs/int8.md, docs/cli.md `--depthwise` on): quantized, with
    one weight scale per output channel, since per-tensor ruins depthwise convs."""
    c = convert(tiny, "conv_net_depthwise")  # no quantize_depthwise given
    assert "dwconv" in c.planned()
    dq = c.weight_dq("dwconv")
    assert c.axis(dq) == 0 and c.inits[dq.input[1]].shape == (8,)


def test_activation_times_activation_matmul_is_skipped(tiny: Tiny) -> None:
    c = convert(tiny, "attention_like")
    assert "scores" not in c.planned()
    assert [(n, r) for n, _, r in c.plan.skipped if n == "scores"] == [
        ("scores", "activation x activation MatMul kept float for accuracy")
    ]
    assert c.nodes["scores"].input[0] == "q"  # the float output of mm_q
    forced = convert(tiny, "attention_like", include=("sco*",))
    assert "scores" in forced.planned()
    assert all(
        forced.producer(t).op_type == "DequantizeLinear" for t in forced.nodes["scores"].input
    )


def test_data_movement_shares_the_conv_scale(tiny: Tiny) -> None:
    c = convert(tiny, "conv_net")
    assert {"maxpool", "reshape"} <= set(c.planned())
    assert c.plan.root_of("flat") == c.plan.root_of("p") == "a1"
    scale, zero = c.quantizer("a1")
    for tensor in ("p", "flat"):
        other_scale, other_zero = c.quantizer(tensor)
        np.testing.assert_array_equal(other_scale, scale)
        np.testing.assert_array_equal(other_zero, zero)
    assert c.producer(c.nodes["fc"].input[0]).op_type == "DequantizeLinear"


def test_exclude_and_include_globs(tiny: Tiny) -> None:
    c = convert(tiny, "conv_net", exclude=("conv*",))
    assert "conv1" not in c.planned() and "fc" in c.planned()
    assert ("conv1", "Conv", "excluded by --exclude") in c.plan.skipped
    assert c.nodes["conv1"].input[1] == "w1"  # float weight
    c = convert(tiny, "conv_net_depthwise", quantize_depthwise=False, include=("dw*",))
    assert "dwconv" in c.planned()
    assert c.weight_dq("dwconv") is not None


def test_op_types(tiny: Tiny) -> None:
    c = convert(tiny, "conv_net", op_types=("MatMul",))
    assert c.planned() == ["fc"]
    assert c.nodes["conv1"].input[1] == "w1"
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "a1" for n in c.proto.graph.node)


def test_gemm_weight_axis_follows_transB(tiny: Tiny) -> None:
    # Full 8-bit: every weight is its nearest step (the default target may cap and
    # compensate values to stay pair-safe, tests/test_saturation.py).
    c = convert(tiny, "gemm_mlp", target="cpu-vnni")
    fc1, fc2 = c.weight_dq("fc1"), c.weight_dq("fc2")
    assert (c.axis(fc1), c.inits[fc1.input[1]].shape) == (0, (32,))  # W1 [N=32, K=16], transB
    assert (c.axis(fc2), c.inits[fc2.input[1]].shape) == (1, (8,))  # W2 [K=32, N=8]
    proto = Tiny(tiny.root).proto("gemm_mlp")
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for dq, name, axis in ((fc1, "w1", 0), (fc2, "w2", 1)):
        q, scale = c.inits[dq.input[0]].astype(np.float32), c.inits[dq.input[1]]
        shape = [1, 1]
        shape[axis] = -1
        error = np.abs(q * scale.reshape(shape) - weights[name])
        assert (error <= scale.reshape(shape) / 2 + 1e-7).all()


def test_shared_weight_is_quantized_once(tiny: Tiny) -> None:
    c = convert(tiny, "attention_like")
    assert "w" not in c.inits
    weight_dqs = {c.nodes[n].input[1] for n in ("mm_q", "mm_k")}
    assert len(weight_dqs) == 1
    (dq,) = [n for n in c.proto.graph.node if n.output[0] in weight_dqs]
    assert c.inits[dq.input[0]].dtype == np.int8
    assert sum(1 for t in c.inits.values() if t.dtype == np.int8 and t.shape == (16, 16)) == 1


@pytest.mark.parametrize(
    ("model", "node", "bias"), [("gemm_mlp", "fc1", "b1"), ("conv_net", "conv1", "b1")]
)
@pytest.mark.parametrize("correction", [False, True])
def test_bias_is_int32_with_product_scale(
    tiny: Tiny, model: str, node: str, bias: str, correction: bool
) -> None:
    c = convert(tiny, model, bias_correction=correction)
    bias_dq = c.weight_dq(node, 2)
    q, scale, zero = (c.inits[t] for t in bias_dq.input)
    assert q.dtype == np.int32 and zero.dtype == np.int32 and not zero.any()
    in_scale = c.inits[c.producer(c.nodes[node].input[0]).input[1]]
    w_scale = c.inits[c.weight_dq(node).input[1]]
    np.testing.assert_allclose(scale, in_scale * w_scale, rtol=1e-6)
    original = numpy_helper.to_array(
        next(t for t in Tiny(tiny.root).proto(model).graph.initializer if t.name == bias)
    )
    if not correction:
        assert (np.abs(q * scale - original) <= scale / 2 + 1e-9).all()


def test_per_tensor_weights(tiny: Tiny) -> None:
    c = convert(tiny, "gemm_mlp", per_channel=False)
    for node in ("fc1", "fc2"):
        dq = c.weight_dq(node)
        assert c.axis(dq) is None and c.inits[dq.input[1]].size == 1


def test_per_tensor_activation_params_are_scalars(tiny: Tiny) -> None:
    c = convert(tiny, "conv_net")
    quantizers = [n for n in c.proto.graph.node if n.op_type == "QuantizeLinear"]
    assert quantizers
    for q in quantizers:
        assert c.inits[q.input[1]].ndim == 0 and c.inits[q.input[2]].ndim == 0, q.input[0]


def test_include_forces_an_op_type_outside_the_selection_and_unmatched_patterns_are_listed(
    tiny,
) -> None:
    from quantcli.quantize.int8.config import Int8Config
    from quantcli.quantize.int8.prepare import prepare_for_int8

    proto = conv_net()
    names = [n.name for n in proto.graph.node]
    conv = next(n.name for n in proto.graph.node if n.op_type == "Conv")
    model = ir.from_proto(proto)
    config = Int8Config(format="qdq", op_types=("MaxPool",), include=(conv, "no-such-node"))
    _, plan = prepare_for_int8(model, config)
    assert conv in [n.node for n in plan.nodes]
    assert plan.unmatched == ["no-such-node"]
    assert "no-such-node" not in names


def _stem_net(size: int) -> ir.Model:
    """RGB image [1,3,size,size] -> stem Conv(3->16, stride 2) -> Relu -> Conv(16->64)."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="stem", pads=[1] * 4, strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "w2"], ["y"], name="body", pads=[1] * 4),
    ]
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((64, 16, 3, 3)).astype(np.float32), "w2"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_stem_conv_stays_float_in_deep_networks_only() -> None:
    _, deep = prepare_for_int8(_stem_net(224), Int8Config())  # 121M multiply-adds
    assert [n.node for n in deep.nodes] == ["body"]
    assert ("stem", "Conv", "first Conv on the image input kept float for accuracy") in (
        deep.skipped
    )
    _, forced = prepare_for_int8(_stem_net(224), Int8Config(include=("stem",)))
    assert [n.node for n in forced.nodes] == ["stem", "body"]
    _, small = prepare_for_int8(_stem_net(32), Int8Config())  # 2.4M: the stem is quantized
    assert [n.node for n in small.nodes] == ["stem", "body"]


def test_excluded_conv_reads_the_float_tensor(tiny: Tiny) -> None:
    """A float Conv behind a DequantizeLinear would be quantized per tensor by ONNX Runtime
    (WeightBiasQuantization); an excluded Conv must read the float tensor instead."""
    c = convert(tiny, "conv_net_depthwise", exclude=("dwconv",))
    dw = c.nodes["dwconv"]
    producer = c.producer(dw.input[0])
    assert producer is None or producer.op_type != "DequantizeLinear"
    # With ORT's optimizations on, nothing re-quantizes the float conv behind our back.
    feeds = tiny.feeds(tiny.path("conv_net_depthwise"))
    optimized = run_ort(c.proto, feeds)[0]
    plain = run_ort(c.proto, feeds, optimize=False)[0]
    np.testing.assert_allclose(optimized, plain, rtol=1e-3, atol=1e-3 * np.abs(plain).max())
