"""Preparation passes, each on a tiny model built for it, then the whole pipeline."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from conftest import Tiny, run_ort
from onnx import helper, numpy_helper

from quantcli.graph.passes import (
    FoldBatchNormPass,
    FoldConstantTransformsPass,
    InferShapesPass,
    LiftConstantsPass,
    UpgradeOpsetPass,
    prepare_model,
)
from quantcli.graph.passes.opset import default_opset


def _same_outputs(before: onnx.ModelProto, after: ir.Model, tiny: Tiny, atol: float = 1e-5) -> None:
    feeds = tiny.feeds(before)
    for want, got in zip(run_ort(before, feeds), run_ort(ir.to_proto(after), feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def _consts(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {
        n.output[0]: numpy_helper.to_array(n.attribute[0].t)
        for n in proto.graph.node
        if n.op_type == "Constant"
    }


def test_lift_constants_makes_initializers(tiny: Tiny) -> None:
    proto = tiny.proto("conv_bn_relu")
    model = ir.from_proto(proto)
    assert LiftConstantsPass()(model).modified
    assert "Constant" not in _ops(model)
    for name, array in _consts(proto).items():
        np.testing.assert_array_equal(model.graph.initializers[name].const_value.numpy(), array)
    _same_outputs(proto, model, tiny)


def test_fold_batchnorm(tiny: Tiny) -> None:
    proto = tiny.proto("conv_bn_relu")
    model = ir.from_proto(proto)
    LiftConstantsPass()(model)
    assert FoldBatchNormPass()(model).modified
    assert _ops(model) == ["Conv", "Relu"]
    conv = model.graph.node(0)
    assert conv.outputs[0].name == "bn"  # the folded Conv writes what BN wrote
    assert conv.inputs[1].name != "w" and conv.inputs[2].name != "b"  # new folded weights
    _same_outputs(proto, model, tiny)


def test_fold_batchnorm_keeps_the_graph_output_name(tiny: Tiny) -> None:
    proto = tiny.proto("conv_bn_relu")
    del proto.graph.node[-1]  # drop Relu: BN writes the graph output
    proto.graph.output[0].name = "bn"
    model = ir.from_proto(proto)
    LiftConstantsPass()(model)
    FoldBatchNormPass()(model)
    assert _ops(model) == ["Conv"]
    assert [v.name for v in model.graph.outputs] == ["bn"]
    assert model.graph.outputs[0].producer() is model.graph.node(0)
    _same_outputs(proto, model, tiny)


def test_fold_batchnorm_leaves_a_shared_conv_output(tiny: Tiny) -> None:
    proto = tiny.proto("conv_bn_relu")
    proto.graph.node.append(helper.make_node("Relu", ["conv"], ["raw"], name="tap"))
    proto.graph.output.append(helper.make_tensor_value_info("raw", onnx.TensorProto.FLOAT, None))
    model = ir.from_proto(proto)
    LiftConstantsPass()(model)
    assert not FoldBatchNormPass()(model).modified
    assert "BatchNormalization" in _ops(model)


def test_fold_transpose_of_constant(tiny: Tiny) -> None:
    proto = tiny.proto("matmul_transpose")
    weight = _consts(proto)["w"]
    model = ir.from_proto(proto)
    LiftConstantsPass()(model)
    assert FoldConstantTransformsPass()(model).modified
    (matmul,) = model.graph
    assert matmul.op_type == "MatMul"
    np.testing.assert_array_equal(matmul.inputs[1].const_value.numpy(), weight.T)
    _same_outputs(proto, model, tiny)


def test_fold_keeps_a_constant_also_read_by_gather(tiny: Tiny) -> None:
    proto = tiny.proto("tied_embedding")
    table = numpy_helper.to_array(proto.graph.initializer[0])
    model = ir.from_proto(proto)
    FoldConstantTransformsPass()(model)
    gather, matmul = model.graph
    assert (gather.op_type, matmul.op_type) == ("Gather", "MatMul")
    assert gather.inputs[0].name == "E"
    np.testing.assert_array_equal(gather.inputs[0].const_value.numpy(), table)
    assert matmul.inputs[1].name != "E"
    np.testing.assert_array_equal(matmul.inputs[1].const_value.numpy(), table.T)
    _same_outputs(proto, model, tiny)


def test_upgrade_opset(tiny: Tiny) -> None:
    proto = tiny.proto("opset11")
    model = ir.from_proto(proto)
    result = UpgradeOpsetPass(13)(model)
    assert result.modified and default_opset(result.model) == 13
    unsqueeze = next(n for n in result.model.graph if n.op_type == "Unsqueeze")
    assert len(unsqueeze.inputs) == 2  # axes moved from attribute to input at opset 13
    _same_outputs(proto, result.model, tiny, atol=0)
    same = UpgradeOpsetPass(11)(ir.from_proto(proto))
    assert not same.modified and default_opset(same.model) == 11


def test_infer_shapes_replaces_stale_value_info(tiny: Tiny) -> None:
    proto = tiny.proto("gemm_mlp")
    proto.graph.value_info.extend(
        [
            helper.make_tensor_value_info("h", onnx.TensorProto.DOUBLE, ["N", 99]),
            helper.make_tensor_value_info("hr", onnx.TensorProto.FLOAT, [7, 7, 7]),
        ]
    )
    model = ir.from_proto(proto)
    InferShapesPass()(model)
    values = {v.name: v for node in model.graph for v in node.outputs}
    for name in ("h", "hr"):
        assert values[name].dtype == ir.DataType.FLOAT
        assert [str(d) for d in values[name].shape] == ["N", "32"]


def test_prepare_model_end_to_end(tiny: Tiny) -> None:
    proto = tiny.proto("conv_bn_relu")
    proto.graph.value_info.append(helper.make_tensor_value_info("bn", onnx.TensorProto.INT64, [1]))
    model = prepare_model(ir.from_proto(proto))
    assert _ops(model) == ["Conv", "Relu"]
    assert sorted(model.graph.initializers) == ["conv.bias_bnfold", "conv.weight_bnfold"]
    conv_out = model.graph.node(0).outputs[0]
    assert conv_out.dtype == ir.DataType.FLOAT and len(conv_out.shape) == 4
    _same_outputs(tiny.proto("conv_bn_relu"), model, tiny)  # ORT rejects the stale type
    again = prepare_model(ir.from_proto(proto))
    assert ir.to_proto(again).SerializeToString() == ir.to_proto(model).SerializeToString()


def test_prepare_model_upgrades_opset(tiny: Tiny) -> None:
    proto = tiny.proto("opset11")
    model = prepare_model(ir.from_proto(proto), min_opset=13)
    assert default_opset(model) == 13
    assert "Constant" not in _ops(model)  # the axes the converter made are lifted
    _same_outputs(proto, model, tiny, atol=0)
