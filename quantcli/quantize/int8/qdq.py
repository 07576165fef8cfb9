"""Apply a complete plan: insert QuantizeLinear/DequantizeLinear, quantize weights and biases.

This is the one pass that mutates the graph for INT8; QOperator and other forms are
rewrites of its output.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from quantcli.calibrate.channel_stats import ChannelStats
from quantcli.graph.build import Namer, add_initializer, const_array
from quantcli.quantize.int8.config import Int8Config
from quantcli.quantize.int8.plan import Plan
from quantcli.quantize.int8.rules import depthwise_kernel
from quantcli.quantize.math.affine import (
    QParams,
    activation_qparams,
    bias_qparams,
    clamps_within,
    dequantize,
    quantize,
    quantize_weight,
    weight_qparams,
)

Ranges = dict[str, tuple[float, float]]


class QDQPass(ir.passes.InPlacePass):
    def __init__(
        self,
        plan: Plan,
        ranges: Ranges,
        config: Int8Config,
        channels: dict[str, ChannelStats] | None = None,
    ) -> None:
        super().__init__()
        self.plan, self.ranges, self.config = plan, ranges, config
        # Per-channel input statistics: means for bias correction, mean squares to weigh
        # weight errors when int8 weights are made pair-safe.
        self.channels = channels or {}
        self.stored: dict[str, np.ndarray] = {}  # weight name -> its stored integers

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.namer = Namer(graph)
        self.planned = {n.node for n in self.plan.nodes}
        nodes = {n.name: n for n in graph}
        act_params = self._activation_params()
        weight_params = self._quantize_weights(graph, nodes)
        self._quantize_biases(graph, nodes, act_params, weight_params)
        self._drop_redundant_activations(graph, nodes, act_params)
        for tensor in self.plan.quantized_tensors():
            self._insert_qdq(graph, tensor, act_params[self.plan.root_of(tensor)])
        graph.sort()
        return ir.passes.PassResult(model, modified=True)

    def _activation_params(self) -> dict[str, QParams]:
        cfg = self.config
        return {
            name: activation_qparams(
                *self.ranges[name], cfg.activation_type, cfg.symmetric_activations
            )
            for name in self.plan.activations
        }

    def _values(self, graph: ir.Graph) -> dict[str, ir.Value]:
        values = {v.name: v for v in graph.inputs}
        values.update(graph.initializers)
        for node in graph:
            values.update((v.name, v) for v in node.outputs)
        return values

    def _dq_node(
        self, graph: ir.Graph, base: str, q: np.ndarray, qp: QParams, dtype: ir.DataType
    ) -> ir.Value:
        """Initializers for q, scale and zero point, and the DequantizeLinear reading them."""
        q_val = add_initializer(graph, self.namer(f"{base}_quantized"), q)
        scale = add_initializer(graph, self.namer(f"{base}_scale"), qp.scale.astype(dtype.numpy()))
        zero = add_initializer(graph, self.namer(f"{base}_zero_point"), qp.zero_point)
        attrs = [ir.AttrInt64("axis", qp.axis)] if qp.axis is not None else []
        node = ir.Node(
            "",
            "DequantizeLinear",
            [q_val, scale, zero],
            attrs,
            name=self.namer(f"{base}_DequantizeLinear"),
        )
        out = node.outputs[0]
        out.name = self.namer(f"{base}_dequantized")
        out.dtype, out.shape = dtype, q_val.shape
        graph.insert_before(graph.node(0), node) if len(graph) else graph.append(node)
        return out

    def _quantize_weights(self, graph: ir.Graph, nodes: dict[str, ir.Node]) -> dict[str, QParams]:
        readers: dict[str, list[ir.Node]] = {}
        for node_plan in self.plan.nodes:
            node = nodes[node_plan.node]
            for value in node.inputs:
                if value is not None and value.name in self.plan.weights:
                    readers.setdefault(value.name, []).append(node)
        params: dict[str, QParams] = {}
        cfg = self.config
        for name, wplan in self.plan.weights.items():
            value = graph.initializers[name]
            w = const_array(value)
            if wplan.role == "weight":
                # Depthwise kernels widen to 16/32 bits: only the others need pair safety.
                users = readers.get(name, [])
                pair_safe = cfg.pair_safe and not (users and all(map(depthwise_kernel, users)))
                importance, gram = (
                    self._input_stats(users, w, wplan.axis) if pair_safe else (None, None)
                )
                q, qp = quantize_weight(
                    w, wplan.axis, cfg.weight_type, cfg.reduce_range, pair_safe, importance, gram
                )
            else:
                qp = weight_qparams(w, None, cfg.activation_type, cfg.symmetric_activations)
                q = quantize(w, qp)
            self.stored[name] = q
            dq = self._dq_node(graph, name, q, qp, value.dtype)
            for node in readers.get(name, []):
                for i, inp in enumerate(node.inputs):
                    if inp is value:
                        node.replace_input_with(i, dq)
            params[name] = qp
        return params

    def _input_stats(
        self, users: list[ir.Node], w: np.ndarray, axis: int | None
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """E[x^2] of the input each weight row multiplies, in the [K, C] order of
        saturation.as_columns, and the input's x x^T sums when each row is one input
        channel (Gemm, 1x1 Conv); None when unknown or ambiguous (shared, grouped,
        per tensor)."""
        if axis is None or len(users) != 1 or not users[0].inputs:
            return None, None
        node = users[0]
        stats = self.channels.get(node.inputs[0].name or "") if node.inputs[0] else None
        msq = None if stats is None else stats.mean_square
        if msq is None:
            return None, None
        if node.op_type == "Conv" and node.attributes.get_int("group", 1) == 1:
            per_row = int(np.prod(w.shape[2:]))  # rows: (input channel, kernel position)
            if msq.size * per_row != w[0].size:
                return None, None
            return np.repeat(msq, per_row), stats.gram if per_row == 1 else None
        if node.op_type == "Gemm" and w.ndim == 2:
            k = w.shape[1] if node.attributes.get_int("transB", 0) else w.shape[0]
            return (msq, stats.gram) if msq.size == k else (None, None)
        return None, None

    def _quantize_biases(
        self,
        graph: ir.Graph,
        nodes: dict[str, ir.Node],
        acts: dict[str, QParams],
        weights: dict[str, QParams],
    ) -> None:
        """int32 biases (scale = input scale x weight scale), bias-corrected when possible."""
        for node_plan in self.plan.nodes:
            if node_plan.weight not in weights or node_plan.op_type not in ("Conv", "Gemm"):
                continue
            node = nodes[node_plan.node]
            w = const_array(graph.initializers[node_plan.weight])
            w_qp = weights[node_plan.weight]
            bias_index = 2
            has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
            channels = _out_channels(node, w)
            b = const_array(node.inputs[2]) if has_bias else np.zeros(channels)
            if b is None or b.shape != (channels,) or not node_plan.inputs:
                continue  # a broadcast Gemm bias ([1, N], scalar) stays float
            q = self.stored[node_plan.weight]
            shift = self._mean_shift(node, node_plan.inputs[0], w, q, w_qp)
            if shift is None and not has_bias:
                continue
            corrected = b.astype(np.float64) - (shift if shift is not None else 0.0)
            in_qp = acts[self.plan.root_of(node_plan.inputs[0])]
            qp = bias_qparams(in_qp.scale, w_qp.scale)
            q = np.clip(np.rint(corrected / qp.scale), -(2**31), 2**31 - 1).astype(np.int32)
            base = node_plan.bias or f"{node.name}.bias"
            dtype = graph.initializers[node_plan.weight].dtype  # biases share the weight's type
            dq = self._dq_node(graph, f"{base}_{node.name}", q, qp, dtype)
            if not has_bias:
                node.resize_inputs(3)
            node.replace_input_with(bias_index, dq)

    def _mean_shift(
        self, node: ir.Node, tensor: str, w: np.ndarray, q: np.ndarray, w_qp: QParams
    ) -> np.ndarray | None:
        """(Wq - W) . E[x]: how much weight quantization moves each output channel's mean."""
        stats = self.channels.get(tensor)
        if stats is None or not self.config.bias_correction:
            return None
        mean = stats.mean
        error = dequantize(q, w_qp).astype(np.float64) - w
        if node.op_type == "Gemm":
            trans = node.attributes.get_int("transB", 0)  # weight [N, K] if set, else [K, N]
            if mean.size != error.shape[1 if trans else 0]:
                return None
            return error @ mean if trans else mean @ error
        groups = node.attributes.get_int("group", 1)
        per_input = error.reshape(error.shape[0], error.shape[1], -1).sum(axis=2)  # [M, C/g]
        if mean.size != per_input.shape[1] * groups:
            return None
        grouped = mean.reshape(groups, -1)  # [g, C/g]
        group_of = np.arange(error.shape[0]) // (error.shape[0] // groups)
        return np.einsum("mc,mc->m", per_input, grouped[group_of])

    def _drop_redundant_activations(
        self, graph: ir.Graph, nodes: dict[str, ir.Node], acts: dict[str, QParams]
    ) -> None:
        """Remove a fused Relu/Clip whose output quantizer already clamps the same way.

        Exact (Q saturates where the activation clamps), and ONNX Runtime then fuses
        DQ -> Conv -> Q into one integer kernel on every opset.
        """
        for node_plan in self.plan.nodes:
            if not node_plan.fused or node_plan.output is None:
                continue
            act = nodes[node_plan.fused]
            qp = acts.get(self.plan.root_of(node_plan.output))
            if qp is None or not clamps_within(qp, *_activation_bounds(act)):
                continue
            pre, post = act.inputs[0], act.outputs[0]
            if post.is_graph_output() or any(self._reads_float(u.node) for u in post.uses()):
                continue  # a reader of the float tensor still needs the clamp
            post.replace_all_uses_with(pre)
            graph.remove(act, safe=True)
            pre.name = post.name

    def _reads_float(self, node: ir.Node) -> bool:
        """A float Conv/Gemm reads the float tensor, never a DequantizeLinear (below)."""
        return node.op_type in _WEIGHTED and node.name not in self.planned

    def _insert_qdq(self, graph: ir.Graph, tensor: str, qp: QParams) -> None:
        value = self._values(graph)[tensor]
        uses = [(u.node, u.idx) for u in value.uses()]  # before the Q node becomes one
        dtype = value.dtype or ir.DataType.FLOAT
        scale = add_initializer(
            graph, self.namer(f"{tensor}_scale"), qp.scale.astype(dtype.numpy())
        )
        zero = add_initializer(graph, self.namer(f"{tensor}_zero_point"), qp.zero_point)
        q = ir.Node(
            "", "QuantizeLinear", [value, scale, zero], name=self.namer(f"{tensor}_QuantizeLinear")
        )
        q.outputs[0].name = self.namer(f"{tensor}_quantized")
        q.outputs[0].dtype = ir.DataType.UINT8 if qp.dtype == "uint8" else ir.DataType.INT8
        q.outputs[0].shape = value.shape
        dq = ir.Node(
            "",
            "DequantizeLinear",
            [q.outputs[0], scale, zero],
            name=self.namer(f"{tensor}_DequantizeLinear"),
        )
        dq_out = dq.outputs[0]
        dq_out.dtype, dq_out.shape = dtype, value.shape
        dq_out.name = self.namer(f"{tensor}_dequantized")
        for node, idx in uses:
            if self._reads_float(node):
                # A float Conv/Gemm fed by a DequantizeLinear gets its weights quantized by
                # ONNX Runtime's WeightBiasQuantization, per tensor: ruinous for depthwise
                # convs (EfficientNet-Lite0 top-1 0.48 with one excluded). It reads the float.
                continue
            node.replace_input_with(idx, dq_out)
        if value.is_graph_output():
            # Keep the output's name for users: the float tensor gets a new name.
            outputs = graph.outputs
            outputs[outputs.index(value)] = dq_out
            value.name, dq_out.name = self.namer(f"{tensor}_float"), tensor
        producer = value.producer()
        if producer is None:
            graph.insert_before(graph.node(0), [q, dq])
        else:
            graph.insert_after(producer, [q, dq])


_WEIGHTED = ("Conv", "ConvTranspose", "Gemm")


def _activation_bounds(node: ir.Node) -> tuple[float | None, float | None]:
    if node.op_type == "Relu":
        return 0.0, None
    if len(node.inputs) > 1:  # Clip opset >= 11: bounds are (constant) inputs
        lo, hi = (const_array(v) if v is not None else None for v in (*node.inputs, None)[1:3])
        return (None if lo is None else float(lo), None if hi is None else float(hi))
    return node.attributes.get_float("min", None), node.attributes.get_float("max", None)


def _out_channels(node: ir.Node, w: np.ndarray) -> int:
    if node.op_type == "Gemm":
        return w.shape[0] if node.attributes.get_int("transB", 0) else w.shape[1]
    return w.shape[0]
