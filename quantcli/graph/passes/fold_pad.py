"""Fold a zero constant Pad of spatial dims into the Conv that reads it.

Exporters of TensorFlow-style 'same' padding emit Pad -> Conv; as Conv `pads` the padding
costs nothing, and the Pad no longer sits between quantized ops.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from quantcli.graph.build import const_array


def _pad_amounts(pad: ir.Node) -> np.ndarray | None:
    """Pads as [begin..., end...] for all axes, when the Pad is a zero constant pad."""
    if pad.attributes.get_string("mode", "constant") != "constant":
        return None
    if len(pad.inputs) > 1:  # opset >= 11: pads (and value, axes) are inputs
        pads = const_array(pad.inputs[1])
        value = const_array(pad.inputs[2]) if len(pad.inputs) > 2 and pad.inputs[2] else None
        if len(pad.inputs) > 3 and pad.inputs[3] is not None:
            return None  # explicit axes: rare, not worth the bookkeeping
    else:
        pads = np.array(pad.attributes.get_ints("pads", []) or [])
        value = np.array(pad.attributes.get_float("value", 0.0))
    if pads is None or (value is not None and np.any(value != 0)):
        return None
    return np.asarray(pads, dtype=np.int64)


class FoldPadIntoConvPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for conv in list(graph):
            if conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx"):
                continue
            pad = conv.inputs[0].producer() if conv.inputs[0] is not None else None
            if pad is None or pad.op_type != "Pad" or len(pad.outputs[0].uses()) != 1:
                continue
            if pad.outputs[0].is_graph_output():
                continue
            if conv.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
                continue
            amounts = _pad_amounts(pad)
            if amounts is None or amounts.size % 2 or np.any(amounts < 0):
                continue
            rank = amounts.size // 2
            begin, end = amounts[:rank], amounts[rank:]
            if np.any(begin[:2]) or np.any(end[:2]):
                continue  # padding of batch or channel dims is not a Conv padding
            spatial = rank - 2
            old = conv.attributes.get_ints("pads", None) or [0] * (2 * spatial)
            added = [*begin[2:], *end[2:]]
            if len(old) != len(added):
                continue
            merged = [int(a) + int(o) for a, o in zip(added, old, strict=True)]
            conv.attributes["pads"] = ir.AttrInt64s("pads", merged)
            conv.replace_input_with(0, pad.inputs[0])
            graph.remove(pad, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified)
