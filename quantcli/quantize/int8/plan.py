"""Decide what to quantize, from the rules, before anything in the graph changes.

The plan is the one source of truth for which activations need calibration ranges:
`quantcli calibrate` and `quantcli convert` both ask it.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import onnx_ir as ir

from quantcli.errors import InputError
from quantcli.quantize.int8.config import Int8Config
from quantcli.quantize.int8.rules import (
    FUSABLE_ACTIVATIONS,
    RULES,
    OpRule,
    Output,
    clip_bounds_constant,
    is_depthwise,
    rule_for,
)
from quantcli.quantize.int8.stem import float_stems

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)
# Measured on real models (docs/int8.md): the compute-heavy ops, and data movement between
# them, keep accuracy and gain speed; quantizing every elementwise op costs accuracy.
DEFAULT_OP_TYPES = tuple(
    op
    for op, rule in RULES.items()
    if rule.heavy or (rule.output is Output.SHARED and op != "Gather")
)


@dataclass(frozen=True)
class WeightPlan:
    name: str  # the initializer
    axis: int | None  # per-channel axis, or None for per-tensor
    role: str  # "weight" (int8 symmetric) | "constant" (an activation-typed constant input)


@dataclass(frozen=True)
class NodePlan:
    node: str
    op_type: str
    inputs: tuple[str, ...]  # activation tensors this node reads quantized
    weight: str | None
    bias: str | None
    output: str | None  # the quantized output tensor (after a fused Relu/Clip)
    fused: str | None  # name of the fused Relu/Clip node


@dataclass
class Plan:
    nodes: list[NodePlan] = field(default_factory=list)
    activations: list[str] = field(default_factory=list)  # need a calibrated range
    shared: dict[str, str] = field(default_factory=dict)  # tensor -> tensor it copies params of
    weights: dict[str, WeightPlan] = field(default_factory=dict)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # node, op, reason
    dynamic: list[tuple[str, str]] = field(default_factory=list)  # (node, op): dynamic int8
    blockwise: list[tuple[str, str]] = field(default_factory=list)  # MatMulNBits 8-bit
    smooth_inputs: list[str] = field(default_factory=list)  # inputs of dynamic MatMuls
    smoothed: list[str] = field(default_factory=list)  # dynamic MatMuls given smoothed input
    unmatched: list[str] = field(default_factory=list)  # --include/--exclude matching no node

    @property
    def empty(self) -> bool:
        """Nothing to quantize."""
        return not self.nodes and not self.dynamic and not self.blockwise

    def quantized_tensors(self) -> list[str]:
        return self.activations + [t for t in self.shared if t not in self.activations]

    def channel_axes(self) -> dict[str, int]:
        """Tensors whose per-channel statistics calibration collects: inputs of quantized
        Conv/Gemm (means, for bias correction) and of dynamic MatMuls (max |x|, smoothing)."""
        axes = {
            n.inputs[0]: 1
            for n in self.nodes
            if n.op_type in ("Conv", "Gemm") and n.weight and n.inputs
        }
        axes.update((name, -1) for name in self.smooth_inputs)
        return axes

    def root_of(self, tensor: str) -> str:
        while tensor in self.shared:
            tensor = self.shared[tensor]
        return tensor


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in FLOAT_TYPES


def _is_const(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None


class _Planner:
    def __init__(self, model: ir.Model, config: Int8Config) -> None:
        self.graph = model.graph
        self.config = config
        self.types = set(config.op_types or DEFAULT_OP_TYPES)
        self.plan = Plan()
        self.quantized: set[str] = set()  # tensors that carry Q/DQ
        self.weight_axes: dict[str, set[int | None]] = {}

    def run(self) -> Plan:
        self._check_node_formats()
        candidates = self._without_stem([n for n in self.graph if self._candidate(n)])
        readers = self._quantized_readers(candidates)
        for node in candidates:
            self._plan_node(node, readers)
        names = [n.name or "" for n in self.graph]
        self.plan.unmatched = [
            p
            for p in (*self.config.include, *self.config.exclude)
            if not any(fnmatch.fnmatchcase(n, p) for n in names)
        ]
        for name, axes in sorted(self.weight_axes.items()):
            axis = next(iter(axes)) if len(axes) == 1 else None
            role = self.plan.weights[name].role
            self.plan.weights[name] = WeightPlan(
                name, axis if self.config.per_channel else None, role
            )
        return self.plan

    def _check_node_formats(self) -> None:
        nodes = {n.name: n for n in self.graph}
        for name, fmt in self.config.node_formats:
            node = nodes.get(name)
            if node is None:
                raise InputError(
                    f"the recipe names node '{name}', which this model does not have",
                    hint="use the recipe with the model it was made for",
                )
            if fmt in ("dynamic", "weight-only") and not self._weight_matmul_in_auto(node):
                raise InputError(
                    f"node '{name}' ({node.op_type}) cannot be {fmt}: only a MatMul with a "
                    "constant 2-D weight can",
                    hint="use static or float for it",
                )

    def _without_stem(self, candidates: list[ir.Node]) -> list[ir.Node]:
        """Keep stem Convs float, unless the user forced them or there is nothing else."""
        heavy = [n for n in candidates if RULES[n.op_type].heavy]
        stems = [n for n in float_stems(heavy) if not _matches(n.name or "", self.config.include)]
        for node in stems:
            self._skip(node, "first Conv on the image input kept float for accuracy")
        return [n for n in candidates if n not in stems]

    def _skip(self, node: ir.Node, reason: str) -> bool:
        self.plan.skipped.append((node.name or "", node.op_type, reason))
        return False

    def _candidate(self, node: ir.Node) -> bool:
        rule = rule_for(node)
        name, forced = node.name or "", _matches(node.name or "", self.config.include)
        chosen = self.config.node_format(name)
        forced = forced or chosen not in (None, "float")
        if rule is None or (node.op_type not in self.types and not forced):
            return False
        if chosen == "float":
            return self._skip(node, "float by the recipe")
        if _matches(name, self.config.exclude):
            return self._skip(node, "excluded by --exclude")
        if not _is_float(node.inputs[0] if node.inputs else None):
            # Data movement on integer tensors (shape arithmetic) is not worth a line.
            return rule.output is not Output.SHARED and self._skip(node, "input is not float")
        if rule.check and (reason := rule.check(node)):
            return self._skip(node, reason)
        needs_const = rule.weight is not None and node.op_type != "MatMul"
        if needs_const and not _is_const(_input(node, rule.weight)):
            return self._skip(node, "weight is not a constant")
        if forced:
            return True
        if is_depthwise(node) and not self.config.quantize_depthwise:
            return self._skip(node, "depthwise Conv kept float (--no-depthwise)")
        if node.op_type == "MatMul" and not _is_const(node.inputs[1]):
            return self._skip(node, "activation x activation MatMul kept float for accuracy")
        auto_matmul = self._goes_dynamic(node) or self._goes_blockwise(node)
        if _after_outlier_activation(node) and not auto_matmul:
            return self._skip(node, "input after Gelu/gated SiLU (outliers): kept float")
        return True

    def _quantized_readers(self, candidates: list[ir.Node]) -> set[str]:
        """Tensors some candidate reads as a quantized activation (output look-ahead)."""
        names: set[str] = set()
        for node in candidates:
            if self._goes_dynamic(node) or self._goes_blockwise(node):
                continue
            rule = RULES[node.op_type]
            for i in rule.activations:
                value = _input(node, i)
                if value is not None and i != rule.weight and not _is_const(value):
                    names.add(value.name or "")
        return names

    def _weight_matmul_in_auto(self, node: ir.Node) -> bool:
        if self.config.format != "auto" or node.op_type != "MatMul":
            return False
        weight = node.inputs[1]
        return _is_const(weight) and len(weight.const_value.shape) == 2

    def _goes_dynamic(self, node: ir.Node) -> bool:
        """In auto format, MatMuls with a constant 2-D weight are quantized dynamically,
        their inputs smoothed from calibration statistics..."""
        chosen = self.config.node_format(node.name or "")
        if chosen is not None or not self._weight_matmul_in_auto(node):
            return chosen == "dynamic" and self._weight_matmul_in_auto(node)
        if self.config.smooth or self.config.standard_ops:  # MatMulNBits is not standard
            return True
        return not _after_outlier_activation(node)

    def _goes_blockwise(self, node: ir.Node) -> bool:
        """...or, without smoothing, those after outlier activations are blockwise int8."""
        chosen = self.config.node_format(node.name or "")
        if chosen is not None:
            return chosen == "weight-only" and self._weight_matmul_in_auto(node)
        return self._weight_matmul_in_auto(node) and not self._goes_dynamic(node)

    def _plan_node(self, node: ir.Node, readers: set[str]) -> None:
        if self._goes_dynamic(node):
            self.plan.dynamic.append((node.name or "", node.op_type))
            source = node.inputs[0].name or ""
            if self.config.smooth and source not in self.plan.smooth_inputs:
                self.plan.smooth_inputs.append(source)
            return
        if self._goes_blockwise(node):
            self.plan.blockwise.append((node.name or "", node.op_type))
            return
        rule = RULES[node.op_type]
        if rule.output is Output.SHARED and (node.inputs[0].name not in self.quantized):
            return  # data movement only stays int8 when its input already is
        weight = self._plan_weight(node, rule)
        inputs = self._plan_inputs(node, rule)
        fused = self._fused_activation(node, rule)
        out_value = fused.outputs[0] if fused else node.outputs[0]
        output = self._plan_output(node, rule, out_value, readers)
        bias = _input(node, rule.bias) if rule.bias is not None else None
        bias_name = bias.name if _is_const(bias) and weight and inputs else None
        self.plan.nodes.append(
            NodePlan(
                node.name or "",
                node.op_type,
                inputs,
                weight,
                bias_name,
                output,
                fused.name if fused else None,
            )
        )

    def _plan_weight(self, node: ir.Node, rule: OpRule) -> str | None:
        value = _input(node, rule.weight) if rule.weight is not None else None
        if not _is_const(value) or not _is_float(value):
            return None
        rank = len(value.const_value.shape)
        axis = rule.weight_axis(node, rank) if rule.weight_axis else None
        self._add_weight(value.name or "", axis, "weight")
        return value.name

    def _add_weight(self, name: str, axis: int | None, role: str) -> None:
        self.weight_axes.setdefault(name, set()).add(axis)
        self.plan.weights.setdefault(name, WeightPlan(name, axis, role))

    def _plan_inputs(self, node: ir.Node, rule: OpRule) -> tuple[str, ...]:
        names = []
        for i in rule.activations:
            value = _input(node, i)
            if value is None or i == rule.weight or not _is_float(value):
                continue
            if _is_const(value):
                self._add_weight(value.name or "", None, "constant")
                continue
            self._quantize(value.name or "", own=True)
            names.append(value.name or "")
        return tuple(names)

    def _fused_activation(self, node: ir.Node, rule: OpRule) -> ir.Node | None:
        out = node.outputs[0]
        uses = out.uses()
        if not rule.fuses_activation or len(uses) != 1 or out.is_graph_output():
            return None
        consumer = uses[0].node
        if consumer.op_type not in FUSABLE_ACTIVATIONS or consumer.domain not in ("", "ai.onnx"):
            return None
        if _matches(consumer.name or "", self.config.exclude):
            return None
        if consumer.op_type == "Clip" and not clip_bounds_constant(consumer):
            return None
        return consumer

    def _plan_output(
        self, node: ir.Node, rule: OpRule, value: ir.Value, readers: set[str]
    ) -> str | None:
        name = value.name or ""
        if rule.output is Output.FLOAT or not _is_float(value):
            return None
        if rule.output is Output.SHARED:
            self.plan.shared[name] = node.inputs[0].name or ""
            self.quantized.add(name)
            return name
        if rule.output_required or (name in readers and not value.is_graph_output()):
            self._quantize(name, own=True)
            return name
        return None

    def _quantize(self, name: str, own: bool) -> None:
        if name in self.quantized:
            return
        self.quantized.add(name)
        if own:
            self.plan.activations.append(name)


# Transformer FFN down-projections read Gelu (or gated SiLU: x * sigmoid(x) * up) outputs
# whose few huge channels wreck a per-tensor int8 activation scale (measured on
# all-MiniLM-L6-v2 and SmolLM2-135M: docs/int8.md).
OUTLIER_ACTIVATIONS = ("Gelu", "FastGelu", "BiasGelu", "Sigmoid", "HardSigmoid", "Silu")


def _after_outlier_activation(node: ir.Node) -> bool:
    if node.op_type not in ("MatMul", "Gemm") or not node.inputs or node.inputs[0] is None:
        return False
    return _from_activation(node.inputs[0], depth=3)


def _from_activation(value: ir.Value, depth: int) -> bool:
    """Produced by an outlier activation, directly or through the Muls of a gate."""
    producer = value.producer()
    if producer is None or depth == 0:
        return False
    if producer.op_type in OUTLIER_ACTIVATIONS:
        return True
    if producer.op_type != "Mul":
        return False
    return any(v is not None and _from_activation(v, depth - 1) for v in producer.inputs)


def _input(node: ir.Node, index: int | None) -> ir.Value | None:
    if index is None or index >= len(node.inputs):
        return None
    return node.inputs[index]


def build_plan(model: ir.Model, config: Int8Config | None = None) -> Plan:
    """What an INT8 conversion of this prepared model would quantize."""
    return _Planner(model, config or Int8Config()).run()
