"""Rewrite a QDQ graph into ONNX Runtime's QOperator form (QLinearConv, QLinearMatMul, ...).

A rule matches one float node whose inputs come from DequantizeLinear and whose only output
goes to one QuantizeLinear (maybe through a Relu/Clip that the output range already clamps)
and replaces DQ -> op -> Q by one integer op. Anything that does not match stays QDQ, so the
result is always a valid graph. All nodes are matched before any is rewritten.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import chain

import numpy as np
import onnx_ir as ir

from quantcli.graph.build import MS_DOMAIN, Namer, add_initializer
from quantcli.quantize.int8.qoperator_match import (
    _ONNX,
    _Q8,
    Match,
    Rule,
    _array,
    _dq,
    _dtype,
    _is,
    _only_user,
    _out_dtype,
    _out_params,
    _output_q,
    _qparams_ok,
    _take_over,
    _types_ok,
    _weight_ok,
)


class QLinearRule:
    """DQ on every input -> op -> (act) -> Q, all per tensor, becomes one QLinear op."""

    float_output = False  # also rewrite a node whose output stays float (no Q after it)

    def __init__(
        self, op_type: str, domain: str = MS_DOMAIN, keep_attributes: bool = False, **extra: int
    ) -> None:
        self.op_type, self.domain = op_type, domain
        self.keep_attributes = keep_attributes  # the QLinear op takes the float op's attributes
        self.extra = [ir.AttrInt64(k, v) for k, v in extra.items()]

    def match(self, node: ir.Node) -> Match | None:
        found = _output_q(node)
        if found is None and self.float_output and len(node.outputs) == 1:
            found = (None, None)
        dqs = self.input_dqs(node) if found else None
        if found is None or dqs is None:
            return None
        match = Match(node, dqs, *found)
        return match if self.check(match) else None

    def input_dqs(self, node: ir.Node) -> list[ir.Node] | None:
        dqs = [_dq(v) for v in node.inputs]
        return dqs if dqs and all(dqs) else None  # type: ignore[return-value]

    def check(self, match: Match) -> bool:
        out = _out_dtype(match, _dtype(match.dqs[0]))
        return out in _Q8 and all(_dtype(dq) == out for dq in match.dqs)

    def op(self, match: Match) -> tuple[str, str]:
        return self.domain, self.op_type

    def inputs(self, match: Match) -> list[ir.Value | None]:
        # Read DQ inputs now, not at match time: an earlier rewrite may have replaced them.
        return [*chain.from_iterable(dq.inputs[:3] for dq in match.dqs), *_out_params(match)]

    def attributes(self, node: ir.Node) -> list[ir.Attr]:
        return [*(node.attributes.values() if self.keep_attributes else ()), *self.extra]

    def rewrite(self, match: Match) -> None:
        graph, old = match.node.graph, (match.q or match.node).outputs[0]
        dtype = _out_dtype(match, old.dtype or ir.DataType.FLOAT)
        out = ir.Value(type=ir.TensorType(dtype), shape=old.shape)
        inputs = self.inputs(match)
        while inputs and inputs[-1] is None:  # trailing optional inputs left out
            inputs.pop()
        domain, op_type = self.op(match)
        new = ir.Node(domain, op_type, inputs, self.attributes(match.node), outputs=[out])
        graph.insert_before(match.node, new)
        _take_over(old, out)
        graph.remove([n for n in (match.q, match.act, match.node) if n is not None], safe=True)


def _x_and_weight(node: ir.Node, axis: int) -> list[ir.Node] | None:
    """DQ of a per-tensor activation and of a constant weight (per channel along axis)."""
    if len(node.inputs) < 2:
        return None
    x, w = _dq(node.inputs[0]), _dq(node.inputs[1], per_tensor=False)
    return [x, w] if x and w and _weight_ok(w, axis) else None


def _float_bias(value: ir.Value) -> np.ndarray | None:
    """A constant bias in float: a float initializer or DQ of a constant (int32) tensor."""
    array, dq = _array(value), value.producer()
    if array is not None:
        return array.astype(np.float64) if array.dtype.kind == "f" else None
    if not _is(dq, "DequantizeLinear"):
        return None
    q, scale = _array(dq.inputs[0]), _array(dq.inputs[1])
    zp = _array(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else 0
    if q is None or scale is None or zp is None or q.ndim != 1:
        return None
    return (q.astype(np.float64) - zp) * scale.astype(np.float64)


def _int32_bias(match: Match) -> ir.Value | None:
    """The bias as int32 at scale x_scale * w_scale, the scale the integer ops add it at."""
    if match.bias is None:
        return None
    x, w = match.dqs
    scale = _array(x.inputs[1]).astype(np.float64) * _array(w.inputs[1]).reshape(-1)
    bias = np.clip(np.rint(match.bias / scale), -(2**31), 2**31 - 1).astype(np.int32)
    graph = match.node.graph
    name = Namer(graph)(f"{match.node.name or match.node.op_type}_bias_int32")
    return add_initializer(graph, name, bias)


class ConvRule(QLinearRule):
    def __init__(self) -> None:
        super().__init__("QLinearConv", "", keep_attributes=True)

    def input_dqs(self, node: ir.Node) -> list[ir.Node] | None:
        return _x_and_weight(node, axis=0) if len(node.inputs) in (2, 3) else None

    def check(self, match: Match) -> bool:
        x, w = match.dqs
        if not _types_ok(_dtype(x), _dtype(w), _dtype(match.q)):
            return False
        if len(match.node.inputs) == 3 and match.node.inputs[2] is not None:
            match.bias = _float_bias(match.node.inputs[2])
            return match.bias is not None
        return True

    def inputs(self, match: Match) -> list[ir.Value | None]:
        return [*super().inputs(match), _int32_bias(match)]


class GemmRule(QLinearRule):
    """Gemm -> com.microsoft QGemm, with a quantized or (no Q after it) a float output."""

    float_output = True

    def __init__(self) -> None:
        super().__init__("QGemm")

    def input_dqs(self, node: ir.Node) -> list[ir.Node] | None:
        return _x_and_weight(node, axis=0 if node.attributes.get_int("transB", 0) else 1)

    def check(self, match: Match) -> bool:
        x, w = match.dqs
        attrs, node = match.node.attributes, match.node
        if not _types_ok(_dtype(x), _dtype(w), _out_dtype(match, _dtype(x))):
            return False
        if attrs.get_float("alpha", 1.0) != 1.0:  # QGemm would scale C by alpha too
            return False
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = _float_bias(node.inputs[2])
            match.bias = None if bias is None else bias * attrs.get_float("beta", 1.0)
            return match.bias is not None
        return True

    def inputs(self, match: Match) -> list[ir.Value | None]:
        x, w = (dq.inputs[:3] for dq in match.dqs)
        return [*x, *w, _int32_bias(match), *_out_params(match)]

    def attributes(self, node: ir.Node) -> list[ir.Attr]:
        return [a for a in node.attributes.values() if a.name in ("transA", "transB")]


class MatMulRule(QLinearRule):
    """MatMul -> QLinearMatMul, or com.microsoft MatMulIntegerToFloat when no Q follows."""

    float_output = True

    def __init__(self) -> None:
        super().__init__("QLinearMatMul", "")

    def input_dqs(self, node: ir.Node) -> list[ir.Node] | None:
        a, b = _dq(node.inputs[0]), _dq(node.inputs[1], per_tensor=False)
        if not (a and b):
            return None
        per_tensor = _array(b.inputs[1]).size == 1
        ok = per_tensor or (_weight_ok(b, axis=-1) and _array(b.inputs[0]).ndim == 2)
        return [a, b] if ok else None

    def check(self, match: Match) -> bool:
        a, b = match.dqs
        return _types_ok(_dtype(a), _dtype(b), _out_dtype(match, _dtype(a)))

    def op(self, match: Match) -> tuple[str, str]:
        return ("", "QLinearMatMul") if match.q else (MS_DOMAIN, "MatMulIntegerToFloat")

    def inputs(self, match: Match) -> list[ir.Value | None]:
        if match.q:
            return super().inputs(match)
        (a, sa, za), (b, sb, zb) = (dq.inputs[:3] for dq in match.dqs)
        return [a, b, sa, sb, za, zb]


class ConcatRule(QLinearRule):
    def __init__(self) -> None:
        super().__init__("QLinearConcat", keep_attributes=True)

    def inputs(self, match: Match) -> list[ir.Value | None]:
        tensors = chain.from_iterable(dq.inputs[:3] for dq in match.dqs)
        return [*_out_params(match), *tensors]  # output params come first here


class PassThroughRule:
    """A data-movement op reads the integer tensor directly when its DQ and Q params agree."""

    def __init__(self, min_opset: int = 1) -> None:
        self.min_opset = min_opset  # first opset where the op accepts (u)int8

    def match(self, node: ir.Node) -> Match | None:
        if len(node.outputs) != 1 or node.graph is None or not node.inputs:
            return None
        dq, q = _dq(node.inputs[0]), _only_user(node.outputs[0])
        if dq is None or not _is(q, "QuantizeLinear") or not _qparams_ok(q):
            return None
        if _dtype(dq) not in _Q8 or node.graph.opset_imports.get("", 0) < self.min_opset:
            return None
        pairs = zip(dq.inputs[1:3], q.inputs[1:3], strict=True)
        arrays = [(_array(a), _array(b)) for a, b in pairs]
        same = all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in arrays)
        return Match(node, [dq], q) if same else None

    def rewrite(self, match: Match) -> None:
        node, out = match.node, match.node.outputs[0]
        node.replace_input_with(0, match.dqs[0].inputs[0])
        out.dtype = _dtype(match.q)
        _take_over(match.q.outputs[0], out)
        node.graph.remove(match.q, safe=True)


def default_rules() -> dict[str, Rule]:
    rules: dict[str, Rule] = {
        "Conv": ConvRule(),
        "Gemm": GemmRule(),
        "MatMul": MatMulRule(),
        "Add": QLinearRule("QLinearAdd"),
        "Mul": QLinearRule("QLinearMul"),
        "GlobalAveragePool": QLinearRule("QLinearGlobalAveragePool", channels_last=0),
        "Concat": ConcatRule(),
        "MaxPool": PassThroughRule(min_opset=12),
    }
    for op_type in ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice"):
        rules[op_type] = PassThroughRule()
    return rules


def _remove_dangling(graph: ir.Graph) -> None:
    for node in reversed(list(graph)):
        dead = not any(o.uses() or o.is_graph_output() for o in node.outputs)
        if dead and node.op_type in ("QuantizeLinear", "DequantizeLinear", "Constant"):
            graph.remove(node, safe=True)
    for name, value in list(graph.initializers.items()):
        if not (value.uses() or value.is_graph_output() or value.is_graph_input()):
            del graph.initializers[name]


class QOperatorPass(ir.passes.InPlacePass):
    """QDQ -> QOperator for every node a rule matches; the rest stays QDQ."""

    def __init__(self, rules: Mapping[str, Rule] | None = None) -> None:
        super().__init__()
        self.rules = dict(default_rules() if rules is None else rules)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        found = []
        for node in model.graph:
            rule = self.rules.get(node.op_type) if node.domain in _ONNX else None
            match = rule.match(node) if rule else None
            if rule and match:
                found.append((rule, match))
        for rule, match in found:
            rule.rewrite(match)
        if any(node.domain == MS_DOMAIN for node in model.graph):
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        if found:
            _remove_dangling(model.graph)
        return ir.passes.PassResult(model, modified=bool(found))
