"""Per-layer error: which intermediate tensors of the quantized model drift from the float one.

Each float activation is matched to the quantized tensor that approximates it, by walking
the quantized graph (quantizers rename tensors but keep the float name as a stem):

1. a DequantizeLinear output matches the float tensor its QuantizeLinear quantized, or the
   float tensor its own input/output name derives from (QDQ models, and the final DQ of
   QOperator models);
2. an integer tensor produced by a QLinear op (or by a layout op such as MaxPool/Reshape
   on one) matches by name stem; a DequantizeLinear using the op's output scale is added;
3. a float tensor with the same name in both graphs (an op left in float) matches as is.

Quantizers fold a Relu/Clip into the op before it, so a match whose float tensor only
feeds a Relu/Clip that has no match of its own is moved to that activation's output.
Both models then run with the matched tensors exposed as extra graph outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from quantcli.evaluate.metrics import ErrorAccumulator, TensorError, json_number
from quantcli.runtime import session_for_model

_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
_SUFFIXES = (
    "_quantized",
    "_QuantizeLinear_Output",
    "_DequantizeLinear_Output",
    "_QuantizeLinear_Input",
    "_output_quantized",
)
# Input positions of the output scale and zero point of ops with a quantized output.
_OUTPUT_QPARAMS = {
    "QuantizeLinear": (1, 2),
    "QLinearConv": (6, 7),
    "QLinearMatMul": (6, 7),
    "QLinearAdd": (6, 7),
    "QLinearMul": (6, 7),
    "QGemm": (7, 8),
    "QLinearConcat": (0, 1),
    "QLinearSigmoid": (3, 4),
    "QLinearLeakyRelu": (3, 4),
    "QLinearSoftmax": (3, 4),
    "QLinearAveragePool": (3, 4),
    "QLinearGlobalAveragePool": (3, 4),
    "QLinearReduceMean": (3, 4),
}
# Ops that move quantized values around without changing their scale.
_PASSTHROUGH = {
    "MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Gather",
    "Resize", "Split", "Identity", "Pad", "DepthToSpace", "SpaceToDepth", "Expand", "Tile",
}  # fmt: skip
_FUSED_ACTIVATIONS = {"Relu", "Clip"}


@dataclass(frozen=True)
class LayerMatch:
    float_name: str
    quant_name: str
    op_type: str  # producer in the float graph, "(input)" for a graph input
    qparams: tuple[str, str] | None = None  # scale, zero point: dequantize quant_name first


@dataclass(frozen=True)
class LayerError:
    name: str
    quant_name: str
    op_type: str
    error: TensorError

    def to_dict(self) -> dict:
        e = self.error
        return {
            "name": self.name,
            "quant_name": self.quant_name,
            "op_type": self.op_type,
            "sqnr_db": json_number(e.sqnr_db),
            "identical": e.identical,
            "cosine": json_number(e.cosine_mean),
            "max_abs_error": json_number(e.max_abs_error),
            "mean_abs_error": json_number(e.mean_abs_error),
        }


def _float_activations(graph: ir.Graph) -> dict[str, str]:
    """Float tensors of the main graph that are not weights: name -> producer op type."""
    acts = {v.name: "(input)" for v in graph.inputs if v.name and not v.is_initializer()}
    for node in graph:
        for v in node.outputs:
            if v.name and (v.dtype is None or v.dtype in _FLOAT_TYPES):
                acts[v.name] = node.op_type
    return acts


def _qparams(value: ir.Value) -> tuple[str, str] | None:
    """Scale and zero point names of an integer tensor derived from a quantizing op."""
    node = value.producer()
    while node is not None and node.op_type in _PASSTHROUGH and node.inputs[0] is not None:
        node = node.inputs[0].producer()
    if node is None or node.op_type not in _OUTPUT_QPARAMS:
        return None
    s, z = _OUTPUT_QPARAMS[node.op_type]
    ins = node.inputs
    if s >= len(ins) or ins[s] is None:
        return None
    zp = ins[z] if z < len(ins) else None
    return ins[s].name or "", zp.name if zp is not None and zp.name else ""


def match_layers(float_model: ir.Model, quant_model: ir.Model) -> list[LayerMatch]:
    """Quantized tensors that approximate float activations, one per float tensor."""
    acts = _float_activations(float_model.graph)

    def resolve(name: str | None) -> str | None:
        if not name:
            return None
        if name in acts:
            return name
        stems = (name[: -len(s)] for s in _SUFFIXES if name.endswith(s))
        return next((stem for stem in stems if stem in acts), None)

    found: dict[str, LayerMatch] = {}

    def add(fname: str | None, qname: str, qp: tuple[str, str] | None = None) -> None:
        if fname and fname not in found and qname:
            found[fname] = LayerMatch(fname, qname, acts[fname], qp)

    nodes = list(quant_model.graph)
    for node in nodes:  # rule 1
        if node.op_type != "DequantizeLinear" or node.inputs[0] is None:
            continue
        src = node.inputs[0].producer()
        q_in = src.inputs[0].name if src and src.op_type == "QuantizeLinear" else None
        out = node.outputs[0].name or ""
        add(resolve(q_in) or resolve(out) or resolve(node.inputs[0].name), out)
    for node in nodes:  # rule 2
        for v in node.outputs:
            qp = _qparams(v)
            if qp is not None:
                add(resolve(v.name), v.name or "", qp)
    for node in nodes:  # rule 3
        for v in node.outputs:
            if v.name in acts and (v.dtype is None or v.dtype in _FLOAT_TYPES):
                add(v.name, v.name)
    return _move_to_fused_activations(float_model.graph, found)


def _move_to_fused_activations(graph: ir.Graph, found: dict[str, LayerMatch]) -> list[LayerMatch]:
    producers = {v.name: v for node in graph for v in node.outputs}
    out = dict(found)
    for fname, m in found.items():
        value = producers.get(fname)
        users = value.consumers() if value is not None else ()
        if len(users) != 1 or users[0].op_type not in _FUSED_ACTIVATIONS:
            continue
        act = users[0].outputs[0].name
        if act and act in producers and act not in out:
            del out[fname]
            out[act] = LayerMatch(act, m.quant_name, users[0].op_type, m.qparams)
    return list(out.values())


def _infer_shapes(model: ir.Model) -> ir.Model:
    from onnx_ir.passes.common import ShapeInferencePass

    try:
        return ShapeInferencePass(strict_mode=False).call(model).model
    except Exception:  # types are a nicety here: ORT infers output types itself
        return model


def _expose(model: ir.Model, taps: Mapping[str, tuple[str, str] | None]) -> None:
    """Make each tensor a graph output, dequantizing it first when qparams are given."""
    graph = model.graph
    values = {v.name: v for node in graph for v in node.outputs}
    values.update({v.name: v for v in graph.inputs})
    values.update(graph.initializers)
    current = {v.name for v in graph.outputs}
    for name, qp in taps.items():
        value = values[name]
        if qp is not None:
            inputs = [value, values[qp[0]]] + ([values[qp[1]]] if qp[1] else [])
            dtype = inputs[1].dtype or ir.DataType.FLOAT  # DQ yields the scale's type
            shape = ir.Shape(value.shape) if value.shape is not None else None
            out = ir.Value(name=_dq_name(name), type=ir.TensorType(dtype), shape=shape)
            graph.append(ir.Node("", "DequantizeLinear", inputs, outputs=[out]))
            value = out
        if value.name not in current:
            graph.outputs.append(value)
            current.add(value.name or "")


def _dq_name(name: str) -> str:
    return f"{name}__quantcli_dq"


Batches = Iterable[tuple[np.ndarray, dict[str, np.ndarray]]]


def per_layer_errors(
    float_path: str,
    quant_path: str,
    batches: Batches,
    provider: str = "cpu",
    threads: int | None = None,
    tick: Callable[[int], None] | None = None,
) -> list[LayerError]:
    """SQNR and cosine per matched tensor, streamed over (indices, feeds) batches, worst first."""
    fm, qm = _infer_shapes(ir.load(float_path)), _infer_shapes(ir.load(quant_path))
    matches = match_layers(fm, qm)
    inputs = {v.name for v in fm.graph.inputs}
    float_taps = [m.float_name for m in matches if m.float_name not in inputs]
    _expose(fm, dict.fromkeys(float_taps))
    _expose(qm, {m.quant_name: m.qparams for m in matches})
    qnames = [_dq_name(m.quant_name) if m.qparams else m.quant_name for m in matches]
    accs = {m.float_name: ErrorAccumulator() for m in matches}
    skipped: set[str] = set()
    with (
        session_for_model(fm, provider, threads) as fs,
        session_for_model(qm, provider, threads) as qs,
    ):
        for indices, feeds in batches:
            fo = dict(zip(float_taps, fs.run(float_taps, feeds), strict=True)) if float_taps else {}
            fo.update({k: v for k, v in feeds.items() if k in inputs})
            qo = qs.run(qnames, feeds)
            for m, q in zip(matches, qo, strict=True):
                if m.float_name in skipped:
                    continue
                try:
                    accs[m.float_name].update(fo[m.float_name], q, rows=len(indices))
                except ValueError:  # layout differs (e.g. a transposed tensor): not comparable
                    skipped.add(m.float_name)
            if tick:
                tick(len(indices))
    layers = [
        LayerError(m.float_name, m.quant_name, m.op_type, accs[m.float_name].result())
        for m in matches
        if m.float_name not in skipped and accs[m.float_name].samples
    ]
    return sorted(layers, key=_worst_first)


def _worst_first(layer: LayerError) -> tuple[bool, float]:
    sqnr = layer.error.sqnr_db
    return (sqnr == sqnr, sqnr)  # NaN (broken) sorts before every number
