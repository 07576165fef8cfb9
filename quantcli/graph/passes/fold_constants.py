"""Fold nodes whose inputs are all constants into new constants.

Layout transforms of weights (Transpose, Reshape, Cast, ...) are folded with numpy at any
size: `MatMul(x, Transpose(W))` then has a constant weight the quantizer can see. Other
standard ops (the shape arithmetic exporters emit for padding, say) are folded with ONNX's
reference evaluator when their result is small. A constant still used elsewhere (a tied
embedding read by Gather) is kept for those uses.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator

from quantcli.graph.build import Namer, add_initializer, const_array


def _transpose(node: ir.Node, args: list[np.ndarray]) -> np.ndarray:
    perm = node.attributes.get_ints("perm", None)
    return np.transpose(args[0], perm)


def _reshape(node: ir.Node, args: list[np.ndarray]) -> np.ndarray:
    data, shape = args[0], [int(d) for d in args[1]]
    if not node.attributes.get_int("allowzero", 0):
        shape = [data.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return data.reshape(shape)


def _cast(node: ir.Node, args: list[np.ndarray]) -> np.ndarray:
    target = ir.DataType(node.attributes.get_int("to", 1))
    return args[0].astype(target.numpy())


def _axes(node: ir.Node, args: list[np.ndarray]) -> list[int] | None:
    if len(args) > 1:
        return [int(a) for a in args[1]]
    return node.attributes.get_ints("axes", None)


def _squeeze(node: ir.Node, args: list[np.ndarray]) -> np.ndarray:
    axes = _axes(node, args)
    return np.squeeze(args[0], axis=None if axes is None else tuple(axes))


def _unsqueeze(node: ir.Node, args: list[np.ndarray]) -> np.ndarray:
    out = args[0]
    axes = _axes(node, args) or []
    for axis in sorted(a % (out.ndim + len(axes)) for a in axes):
        out = np.expand_dims(out, axis)
    return out


FOLDERS: dict[str, Callable[[ir.Node, list[np.ndarray]], np.ndarray]] = {
    "Identity": lambda node, args: args[0],
    "Transpose": _transpose,
    "Reshape": _reshape,
    "Cast": _cast,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
}


# Largest result, in elements, folded by the reference evaluator (shape arithmetic, not data).
SMALL_RESULT = 1 << 16
NEVER_FOLD = {
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
    "QuantizeLinear",
    "DequantizeLinear",
}


def _reference(node: ir.Node, args: list[np.ndarray]) -> np.ndarray | None:
    """Evaluate one standard node on constant inputs with ONNX's reference evaluator."""
    graphs = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
    if node.op_type in NEVER_FOLD or any(a.type in graphs for a in node.attributes.values()):
        return None
    try:
        proto = ir.serde.serialize_node(node)
        names = [v.name for v in node.inputs if v is not None]
        feeds = dict(zip(names, args, strict=True))
        (result,) = ReferenceEvaluator(proto).run(None, feeds)
    except Exception:  # an op the reference evaluator lacks: leave it to the runtime
        return None
    result = np.asarray(result)
    return result if result.size <= SMALL_RESULT else None


class FoldConstantTransformsPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        namer = Namer(graph)
        modified = False
        for node in list(graph):  # topological order: chains fold front to back
            if node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
                continue
            args = [const_array(v) for v in node.inputs if v is not None]
            out = node.outputs[0]
            if not args or any(a is None for a in args) or out.is_graph_output():
                continue
            fold = FOLDERS.get(node.op_type)
            result = fold(node, args) if fold else _reference(node, args)
            if result is None:
                continue
            folded = add_initializer(graph, namer(out.name or "folded"), result)
            out.replace_all_uses_with(folded)
            graph.remove(node, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified)
