"""Tiny models for the INT4 tests: a decoder-like LM with a tied head, shared weights, fp16."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _w(rng: np.random.Generator, *shape: int, scale: float = 0.3) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def tiny_lm(
    layers: int = 3, d: int = 32, ff: int = 64, vocab: int = 96, seed: int = 0
) -> onnx.ModelProto:
    """ids[N, T] -> Gather(E) -> layers of (norm, Q/K/V, attention, O, gate/up, SiLU gate,
    down, residuals) -> MatMul(x, Transpose(E)) -> logits [N, T, vocab]. E is tied."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], [numpy_helper.from_array(_w(rng, vocab, d, scale=1.0), "E")]
    nodes.append(helper.make_node("Gather", ["E", "ids"], ["h0"], name="embed"))
    h = "h0"
    for i in range(layers):
        p = f"l{i}"
        for name, shape in (
            ("q", (d, d)),
            ("k", (d, d)),
            ("v", (d, d)),
            ("o", (d, d)),
            ("gate", (d, ff)),
            ("up", (d, ff)),
            ("down", (ff, d)),
        ):
            inits.append(
                numpy_helper.from_array(_w(rng, *shape, scale=shape[0] ** -0.5), f"{p}.{name}")
            )
        inits.append(numpy_helper.from_array(np.float32(d**-0.5), f"{p}.scale"))
        nodes += [
            helper.make_node("Mul", [h, h], [f"{p}.sq"], name=f"{p}_sq"),
            helper.make_node("ReduceMean", [f"{p}.sq"], [f"{p}.ms"], name=f"{p}_ms", axes=[-1]),
            helper.make_node("Sqrt", [f"{p}.ms"], [f"{p}.rms"], name=f"{p}_rms"),
            helper.make_node("Div", [h, f"{p}.rms"], [f"{p}.x"], name=f"{p}_norm"),
            helper.make_node("MatMul", [f"{p}.x", f"{p}.q"], [f"{p}.qo"], name=f"{p}_q_proj"),
            helper.make_node("MatMul", [f"{p}.x", f"{p}.k"], [f"{p}.ko"], name=f"{p}_k_proj"),
            helper.make_node("MatMul", [f"{p}.x", f"{p}.v"], [f"{p}.vo"], name=f"{p}_v_proj"),
            helper.make_node("Transpose", [f"{p}.ko"], [f"{p}.kt"], name=f"{p}_kt", perm=[0, 2, 1]),
            helper.make_node("MatMul", [f"{p}.qo", f"{p}.kt"], [f"{p}.s"], name=f"{p}_scores"),
            helper.make_node("Mul", [f"{p}.s", f"{p}.scale"], [f"{p}.ss"], name=f"{p}_scale"),
            helper.make_node("Softmax", [f"{p}.ss"], [f"{p}.a"], name=f"{p}_softmax", axis=-1),
            helper.make_node("MatMul", [f"{p}.a", f"{p}.vo"], [f"{p}.att"], name=f"{p}_attend"),
            helper.make_node("MatMul", [f"{p}.att", f"{p}.o"], [f"{p}.oo"], name=f"{p}_o_proj"),
            helper.make_node("Add", [h, f"{p}.oo"], [f"{p}.r1"], name=f"{p}_res1"),
            helper.make_node("MatMul", [f"{p}.r1", f"{p}.gate"], [f"{p}.g"], name=f"{p}_gate_proj"),
            helper.make_node("MatMul", [f"{p}.r1", f"{p}.up"], [f"{p}.u"], name=f"{p}_up_proj"),
            helper.make_node("Sigmoid", [f"{p}.g"], [f"{p}.sg"], name=f"{p}_sigmoid"),
            helper.make_node("Mul", [f"{p}.g", f"{p}.sg"], [f"{p}.silu"], name=f"{p}_silu"),
            helper.make_node("Mul", [f"{p}.silu", f"{p}.u"], [f"{p}.gu"], name=f"{p}_gated"),
            helper.make_node(
                "MatMul", [f"{p}.gu", f"{p}.down"], [f"{p}.dn"], name=f"{p}_down_proj"
            ),
            helper.make_node("Add", [f"{p}.r1", f"{p}.dn"], [f"{p}.out"], name=f"{p}_res2"),
        ]
        h = f"{p}.out"
    nodes += [
        helper.make_node("Transpose", ["E"], ["Et"], name="tie", perm=[1, 0]),
        helper.make_node("MatMul", [h, "Et"], ["logits"], name="lm_head"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_lm",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "T"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", "T", vocab])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


def shared_weight() -> onnx.ModelProto:
    """x -> MatMul(W) -> Relu -> MatMul(W) -> y: one weight read by two MatMuls."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="first"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W"], ["y"], name="second"),
    ]
    graph = helper.make_graph(
        nodes,
        "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
        [numpy_helper.from_array(_w(rng, 32, 32), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def fp16_lm() -> onnx.ModelProto:
    """tiny_lm with float16 weights and logits (a Cast from the ids' embeddings onwards)."""
    from onnx import version_converter  # noqa: F401  (keeps the import light elsewhere)

    model = tiny_lm(layers=2)
    for tensor in model.graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            array = numpy_helper.to_array(tensor).astype(np.float16)
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(model, full_check=True)
    return model
