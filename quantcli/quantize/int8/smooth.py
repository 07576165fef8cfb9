"""Activation smoothing for dynamically quantized MatMuls (after SmoothQuant, Xiao et al. 2023).

Dynamic int8 gives the whole activation one scale per inference. In transformers a few
channels run 5-10x above the rest (LayerNorm outputs, Gelu outputs), so that one scale
leaves the other channels a handful of levels. x @ W == (x / s) @ (s * W) for any positive
per-channel s: dividing the outlier channels down to the level of the rest and multiplying
the matching weight rows up moves the range into the weights, which are quantized per
output column and barely notice a few larger rows.

The scale is s_j = max(1, a_j / T), with a_j the calibrated max |x_j| and T the 95th
percentile of the a_j: only channels above T change, each down to T. Unlike SmoothQuant's
s_j = a_j^alpha / w_j^(1-alpha), it never enlarges a small channel; on all-MiniLM-L6-v2 the
alpha form lost accuracy (Gelu outputs near zero were enlarged), this one gained
(docs/int8.md). The division is folded into the producer when it is a LayerNormalization
or a Mul by a constant read only by smoothed MatMuls; otherwise it is one Mul node.
"""

from __future__ import annotations

import contextlib

import numpy as np
import onnx_ir as ir

from quantcli.graph.build import Namer, add_initializer, const_array

PERCENTILE = 95.0  # the level outlier channels are brought down to
MIN_RATIO = 4.0  # smooth only when the largest channel is this far above it (12 dB)
MAX_SCALE = 1e3  # weight rows grow by at most this much


def smoothing_scales(
    absmax: np.ndarray, percentile: float = PERCENTILE, min_ratio: float = MIN_RATIO
) -> np.ndarray | None:
    """Per-channel divisors s >= 1 for an activation with per-channel max |x| `absmax`,
    or None when no channel stands out enough to be worth it."""
    absmax = np.asarray(absmax, np.float64)
    if absmax.ndim != 1 or absmax.size == 0:
        return None
    level = float(np.percentile(absmax, percentile, method="lower"))  # a real channel
    if level < np.finfo(np.float32).tiny or absmax.max() < min_ratio * level:
        return None
    return np.clip(absmax / level, 1.0, MAX_SCALE)


class SmoothInputsPass(ir.passes.InPlacePass):
    """For each tensor in `scales`, the MatMuls in `nodes` that read it get x / s and s * W.

    Runs on the float graph, before DynamicQuantizePass quantizes the scaled weights.
    """

    def __init__(self, scales: dict[str, np.ndarray], nodes: frozenset[str]) -> None:
        super().__init__()
        self.scales, self.nodes = scales, nodes
        self.smoothed: list[str] = []  # names of the MatMuls whose input was smoothed

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        values = {v.name: v for n in graph for v in n.outputs}
        values.update((v.name, v) for v in graph.inputs)
        namer = Namer(graph)
        modified = False
        for name, s in sorted(self.scales.items()):
            x = values.get(name)
            readers = [] if x is None else self._readers(x, s.size)
            if not readers:
                continue
            for node in readers:
                _scale_weight_rows(graph, node, s, namer)
            smoothed = _fold_into_producer(graph, x, readers, s) or _divide(graph, x, s, namer)
            for node in readers:
                node.replace_input_with(0, smoothed)
                self.smoothed.append(node.name or "")
            modified = True
        return ir.passes.PassResult(model, modified)

    def _readers(self, x: ir.Value, k: int) -> list[ir.Node]:
        found = []
        for node, index in x.uses():
            if node.name not in self.nodes or node.op_type != "MatMul" or index != 0:
                continue
            w = const_array(node.inputs[1])
            if w is not None and w.ndim == 2 and w.shape[0] == k and w.dtype == np.float32:
                found.append(node)
        return found


def _scale_weight_rows(graph: ir.Graph, node: ir.Node, s: np.ndarray, namer: Namer) -> None:
    """W -> diag(s) W, computed when the weight is read (the quantizer reads it once): made
    here for every smoothed MatMul, the scaled copies of SmolLM2 took 0.4 GB at once."""
    old = node.inputs[1]
    source = old.const_value or ir.convenience.get_const_tensor(old)
    name = namer(f"{old.name}_smoothed")

    def scaled() -> ir.Tensor:
        w = source.numpy()  # type: ignore[union-attr]
        out = np.empty(w.shape, np.float32)
        for i in range(0, w.shape[0], 256):  # row slices: float64 temporaries stay small
            out[i : i + 256] = w[i : i + 256].astype(np.float64) * s[i : i + 256, None]
        del w
        if isinstance(source, ir.ExternalTensor):
            with contextlib.suppress(BufferError):  # unmapped: its pages leave our RSS
                source.release()
        return ir.tensor(out, name=name)

    shape = ir.Shape(source.shape)  # type: ignore[union-attr]
    lazy = ir.LazyTensor(scaled, ir.DataType.FLOAT, shape, name=name)
    value = ir.Value(name=name, const_value=lazy, shape=shape, type=ir.TensorType(lazy.dtype))
    graph.register_initializer(value)
    node.replace_input_with(1, value)
    if not old.uses() and not old.is_graph_output() and old.name in graph.initializers:
        del graph.initializers[old.name]


def _fold_into_producer(
    graph: ir.Graph, x: ir.Value, readers: list[ir.Node], s: np.ndarray
) -> ir.Value | None:
    """Divide the producer's per-channel constants by s when only `readers` see its output."""
    producer = x.producer()
    if producer is None or x.is_graph_output() or len(x.uses()) != len(readers):
        return None
    if producer.op_type == "LayerNormalization" and producer.domain in ("", "ai.onnx"):
        axis = producer.attributes.get_int("axis", -1)
        rank = x.shape.rank() if x.shape is not None else None
        if axis != -1 and (rank is None or axis != rank - 1):
            return None
        constants = [v for v in producer.inputs[1:3] if v is not None]
    elif producer.op_type == "Mul" and producer.domain in ("", "ai.onnx"):
        constants = [v for v in producer.inputs if const_array(v) is not None][:1]
        if len(constants) != 1:
            return None
    else:
        return None
    arrays = [const_array(v) for v in constants]
    for value, array in zip(constants, arrays, strict=True):
        private = len(value.uses()) == 1 and not value.is_graph_input()
        if array is None or array.shape[-1:] != s.shape or not private:
            return None
        if value.name not in graph.initializers:
            return None
    for value, array in zip(constants, arrays, strict=True):
        divided = (array.astype(np.float64) / s).astype(array.dtype)  # type: ignore[union-attr]
        value.const_value = ir.tensor(divided, name=value.name)
    return x


def _divide(graph: ir.Graph, x: ir.Value, s: np.ndarray, namer: Namer) -> ir.Value:
    base = x.name or "x"
    inverse = add_initializer(graph, namer(f"{base}_smoothing"), (1.0 / s).astype(np.float32))
    node = ir.Node("", "Mul", [x, inverse], name=namer(f"{base}_smooth"))
    out = node.outputs[0]
    out.name, out.shape = namer(f"{base}_smoothed"), x.shape
    if x.dtype is not None:
        out.dtype = x.dtype
    producer = x.producer()
    if producer is None:
        graph.insert_before(next(iter(graph)), node)
    else:
        graph.insert_after(producer, node)
    return out
