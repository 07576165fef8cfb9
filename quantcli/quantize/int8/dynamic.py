"""Dynamic INT8 quantization of MatMul/Gemm whose weight is a constant 2-D tensor.

Weights become int8 offline (symmetric, per output column or per tensor); ORT quantizes the
activation to uint8 at run time, so no calibration data is needed. Two forms: portable ONNX
ops (DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul) or ORT's fused
com.microsoft.DynamicQuantizeMatMul.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from quantcli.graph.build import MS_DOMAIN, Namer, add_initializer
from quantcli.graph.mapped import release
from quantcli.memory import trim_heap
from quantcli.quantize.int8.siblings import FuseSiblingMatMulsPass
from quantcli.quantize.math.affine import quantize_weight

_ONNX = ("", "ai.onnx")
# A node's input x x^T sums, made when its weight is quantized (they are large unpacked).
GramSource = Callable[[], np.ndarray | None]
Importance = dict[str, tuple[np.ndarray, GramSource]]


@dataclass(frozen=True)
class DynamicWeights:
    """How the int8 weights are made: granularity, 7-bit, or pair-safe for x86 without VNNI."""

    per_channel: bool = True
    reduce_range: bool = False
    pair_safe: bool = True  # the default target runs on every CPU

    def quantize(
        self,
        w: np.ndarray,
        importance: np.ndarray | None = None,
        gram: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """int8 weight [K, N] and its float32 scale (per output column or per tensor);
        `importance` ([K], the input's E[x^2]) weighs pair-safe weight errors and `gram`
        ([K, K], x x^T sums) lets rounding errors be compensated (saturation.py)."""
        axis = 1 if self.per_channel else None
        if axis is None:
            importance = gram = None
        q, qp = quantize_weight(
            w, axis, "int8", self.reduce_range, self.pair_safe, importance, gram
        )
        return q, qp.scale


@dataclass(frozen=True)
class _Target:
    node: ir.Node
    weight: np.ndarray  # [K, N] float32, already transposed for Gemm transB=1
    bias: ir.Value | None  # Gemm's C, added after the product
    add: ir.Node | None = None  # a MatMul's bias Add, absorbed into DynamicQuantizeMatMul


def _array(value: ir.Value | None) -> np.ndarray | None:
    tensor = None if value is None else ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _target(node: ir.Node) -> _Target | None:
    """The node as y = A @ W (+ C) with constant float32 W [K, N], or None."""
    if node.domain not in _ONNX or node.op_type not in ("MatMul", "Gemm"):
        return None
    w = _array(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or w.ndim != 2 or w.dtype != np.float32:
        return None
    if node.op_type == "MatMul":
        add = _bias_add(node, w.shape[1])
        bias = None if add is None else next(v for v in add.inputs if v is not node.outputs[0])
        return _Target(node, w, bias, add)
    attrs = node.attributes
    plain = attrs.get_float("alpha", 1.0) == 1.0 and attrs.get_float("beta", 1.0) == 1.0
    if not plain or attrs.get_int("transA", 0):
        return None
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    return _Target(node, w.T if attrs.get_int("transB", 0) else w, bias)


def _bias_add(node: ir.Node, n: int) -> ir.Node | None:
    """The Add of a constant [N] vector that alone reads the MatMul's output."""
    out = node.outputs[0]
    uses = out.uses()
    if len(uses) != 1 or out.is_graph_output():
        return None
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in _ONNX or len(add.inputs) != 2:
        return None
    c = _array(add.inputs[1 - uses[0].idx])
    return add if c is not None and c.shape == (n,) and c.dtype == np.float32 else None


def _fusable_bias(target: _Target) -> bool:
    """DynamicQuantizeMatMul's bias input takes a constant vector of length N only."""
    c = _array(target.bias)
    return c is not None and c.shape == (target.weight.shape[1],) and c.dtype == np.float32


class _Rewriter:
    """Replaces one target with its dynamic form; shares the weight tensors of reused W."""

    def __init__(
        self,
        graph: ir.Graph,
        weights: DynamicWeights,
        fused: bool,
        importance: Importance,
    ) -> None:
        self.graph, self.format, self.fused = graph, weights, fused
        self.importance = importance
        self.namer = Namer(graph)
        self.weights: dict[int, tuple[ir.Value, ir.Value, ir.Value]] = {}

    def _weight(self, target: _Target) -> tuple[ir.Value, ir.Value, ir.Value]:
        key = id(target.node.inputs[1])
        if key not in self.weights:
            base = target.node.inputs[1].name or "weight"
            imp, source = self.importance.get(target.node.name or "", (None, None))
            k = target.weight.shape[0]
            gram = None if imp is None or imp.shape != (k,) or source is None else source()
            if imp is not None and imp.shape != (k,):
                imp = None
            if gram is not None and gram.shape != (k, k):
                gram = None
            q, scale = self.format.quantize(target.weight, imp, gram)
            values = (q, scale, np.zeros(scale.shape, np.int8))
            names = ("quantized", "scale", "zero_point")
            self.weights[key] = tuple(  # type: ignore[assignment]
                add_initializer(self.graph, self.namer(f"{base}_{n}"), v)
                for n, v in zip(names, values, strict=True)
            )
        return self.weights[key]

    def rewrite(self, target: _Target) -> None:
        node, tape = target.node, ir.tape.Tape()
        w_q, w_scale, w_zp = self._weight(target)
        # A MatMul's bias Add is absorbed by the fused op; the portable form leaves it be.
        absorbed = target.add if self.fused else None
        bias = target.bias if target.add is None or absorbed else None
        if self.fused:
            fused_bias = bias if _fusable_bias(target) else None
            inputs = [node.inputs[0], w_q, w_scale, w_zp, fused_bias]
            y = tape.op("DynamicQuantizeMatMul", inputs, domain=MS_DOMAIN)
            bias = None if fused_bias is not None else bias
        else:
            a_q, a_scale, a_zp = tape.op_multi_out(
                "DynamicQuantizeLinear", [node.inputs[0]], num_outputs=3
            )
            y_int = tape.op("MatMulInteger", [a_q, w_q, a_zp, w_zp])
            y_float = tape.op("Cast", [y_int], {"to": ir.DataType.FLOAT})
            y = tape.op("Mul", [y_float, tape.op("Mul", [a_scale, w_scale])])
        if bias is not None:
            y = tape.op("Add", [y, bias])
        self.graph.insert_before(node, tape.nodes)
        old = (absorbed or node).outputs[0]
        y.name, old.name = old.name, None
        y.shape, y.type = old.shape, old.type
        ir.convenience.replace_all_uses_with(old, y, replace_graph_outputs=True)
        if absorbed is not None:
            self.graph.remove(absorbed, safe=True)
        self.graph.remove(node, safe=True)


class DynamicQuantizePass(ir.passes.InPlacePass):
    """MatMul/Gemm with a constant 2-D float weight -> dynamic INT8 (uint8 A, int8 W).

    `nodes`, when given, limits the rewrite to those node names; `importance` gives per
    node the E[x^2] of its input channels and their x x^T sums (pair-safe rounding). `fused`
    picks ORT's DynamicQuantizeMatMul (a com.microsoft op; siblings fused into one) over the
    standard ONNX DynamicQuantizeLinear -> MatMulInteger form (`convert --standard-ops`),
    which ORT's optimizer fuses into the same kernel.
    """

    def __init__(
        self,
        weights: DynamicWeights | None = None,
        fused: bool = True,
        nodes: frozenset[str] | None = None,
        importance: Importance | None = None,
    ) -> None:
        super().__init__()
        self.weights, self.fused, self.nodes = weights or DynamicWeights(), fused, nodes
        # node name -> (E[x^2] per input channel, its x x^T sums when asked)
        self.importance = importance or {}

    def _chosen(self, node: ir.Node) -> bool:
        return self.nodes is None or node.name in self.nodes

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # MatMulInteger is opset 10, DynamicQuantizeLinear opset 11.
        if not self.fused and model.opset_imports.get("", 1) < 11:
            return ir.passes.PassResult(model, modified=False)
        rewriter = _Rewriter(model.graph, self.weights, self.fused, self.importance)
        float_weights = []
        # One node at a time: a memory-mapped weight is unmapped as soon as it is replaced.
        for node in [n for n in model.graph if self._chosen(n)]:
            target = _target(node)
            if target is None:
                continue
            weight = node.inputs[1]
            float_weights.append(weight)
            rewriter.rewrite(target)
            del target
            if not weight.uses():
                release(weight)
            trim_heap()
        if float_weights and self.fused:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            FuseSiblingMatMulsPass()(model)
        _drop_unused(model.graph, float_weights)
        return ir.passes.PassResult(model, modified=bool(float_weights))


def _drop_unused(graph: ir.Graph, values: list[ir.Value]) -> None:
    """Remove the float weights no node reads any more (initializers or Constant nodes)."""
    for value in {id(v): v for v in values}.values():
        if value.uses() or value.is_graph_output() or value.is_graph_input():
            continue
        producer = value.producer()
        if producer is not None:
            graph.remove(producer, safe=True)
        elif value.name in graph.initializers:
            del graph.initializers[value.name]
