"""Fold an inference BatchNormalization into the Conv before it: one op, one weight to quantize."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from quantcli.graph.build import Namer, add_initializer
from quantcli.graph.build import const_array as _const


def _foldable(bn: ir.Node) -> ir.Node | None:
    conv = bn.inputs[0].producer() if bn.inputs[0] is not None else None
    if conv is None or conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx"):
        return None
    if len(bn.outputs) != 1 or len(conv.outputs[0].uses()) != 1:
        return None
    if conv.outputs[0].is_graph_output():
        return None
    params = [_const(v) for v in bn.inputs[1:5]]
    weight = _const(conv.inputs[1])
    if weight is None or any(p is None for p in params):
        return None
    if len(conv.inputs) > 2 and conv.inputs[2] is not None and _const(conv.inputs[2]) is None:
        return None
    return conv


class FoldBatchNormPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for bn in list(graph):
            if bn.op_type != "BatchNormalization" or (conv := _foldable(bn)) is None:
                continue
            self._fold(graph, conv, bn)
            modified = True
        return ir.passes.PassResult(model, modified)

    @staticmethod
    def _fold(graph: ir.Graph, conv: ir.Node, bn: ir.Node) -> None:
        scale, shift, mean, var = (_const(v).astype(np.float64) for v in bn.inputs[1:5])
        eps = bn.attributes.get_float("epsilon", 1e-5)
        weight = _const(conv.inputs[1])
        has_bias = len(conv.inputs) > 2 and conv.inputs[2] is not None
        bias = _const(conv.inputs[2]) if has_bias else np.zeros(weight.shape[0])
        factor = scale / np.sqrt(var + eps)
        new_w = (weight * factor.reshape(-1, *[1] * (weight.ndim - 1))).astype(weight.dtype)
        new_b = ((bias - mean) * factor + shift).astype(weight.dtype)
        namer = Namer(graph)
        base = conv.name or conv.outputs[0].name
        w_val = add_initializer(graph, namer(f"{base}.weight_bnfold"), new_w)
        b_val = add_initializer(graph, namer(f"{base}.bias_bnfold"), new_b)
        conv.replace_input_with(1, w_val)
        if not has_bias:
            conv.resize_inputs(3)
        conv.replace_input_with(2, b_val)
        # The Conv now writes what BN wrote, keeping its name (calibration tables use names).
        bn_out, conv_out = bn.outputs[0], conv.outputs[0]
        out_name = bn_out.name
        bn_out.replace_all_uses_with(conv_out, replace_graph_outputs=True)
        graph.remove(bn, safe=True)
        conv_out.name = out_name
