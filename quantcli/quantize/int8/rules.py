"""Per-op quantization rules, found through a registry keyed by op type.

A rule only declares: which inputs are activations, which input is a constant weight and
along which axis it is quantized per channel, which is a bias, and what happens to the
output. The planner reads rules; nothing here touches a graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import onnx_ir as ir

from quantcli.graph.build import const_array


class Output(Enum):
    OWN = "own"  # the output gets its own calibrated range
    SHARED = "shared"  # data movement: the output reuses input 0's parameters
    FLOAT = "float"  # output stays float


@dataclass(frozen=True)
class OpRule:
    op_type: str
    activations: tuple[int, ...]  # inputs quantized when they are not constants
    weight: int | None = None  # a constant weight input, quantized int8 (per channel)
    weight_axis: Callable[[ir.Node, int], int | None] | None = None  # (node, rank) -> axis
    bias: int | None = None  # int32 bias input with scale = input scale x weight scale
    output: Output = Output.OWN
    output_required: bool = False  # ORT fuses only with a quantized output (Conv)
    fuses_activation: bool = False  # a following Relu/Clip is absorbed (no Q/DQ between)
    heavy: bool = False  # compute-bound: in the default set
    check: Callable[[ir.Node], str | None] | None = None  # reason it cannot be quantized


RULES: dict[str, OpRule] = {}


def register(rule: OpRule) -> OpRule:
    RULES[rule.op_type] = rule
    return rule


def rule_for(node: ir.Node) -> OpRule | None:
    if node.domain not in ("", "ai.onnx"):
        return None
    return RULES.get(node.op_type)


def _last_axis(node: ir.Node, rank: int) -> int | None:
    return rank - 1 if rank >= 2 else None


def _gemm_axis(node: ir.Node, rank: int) -> int | None:
    return 0 if node.attributes.get_int("transB", 0) else 1


def _conv_transpose_axis(node: ir.Node, rank: int) -> int | None:
    # Weight is [C_in, C_out / group, ...]: per-channel only makes sense with one group.
    return 1 if node.attributes.get_int("group", 1) == 1 else None


def _gemm_check(node: ir.Node) -> str | None:
    if node.attributes.get_int("transA", 0):
        return "Gemm with transA is kept float"
    return None


def is_depthwise(node: ir.Node) -> bool:
    """A Conv with one input channel per group (MobileNet/EfficientNet's depthwise convs)."""
    if node.op_type != "Conv":
        return False
    group = node.attributes.get_int("group", 1)
    weight = node.inputs[1]
    shape = weight.shape if weight is not None else None
    return group > 1 and shape is not None and len(shape) >= 2 and shape[1] == 1


def depthwise_kernel(node: ir.Node) -> bool:
    """Runs on ONNX Runtime's depthwise kernel: one input and one output channel per group.

    That kernel widens to 16/32 bits, so it cannot saturate an int16 pair (unlike the
    GEMM path that every other Conv, MatMul and Gemm takes).
    """
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    shape = weight.shape if weight is not None else None
    group = node.attributes.get_int("group", 1)
    return is_depthwise(node) and shape is not None and shape[0] == group


def clip_bounds_constant(node: ir.Node) -> bool:
    return all(v is None or const_array(v) is not None for v in node.inputs[1:3])


register(
    OpRule(
        "Conv",
        (0,),
        weight=1,
        weight_axis=lambda n, r: 0,
        bias=2,
        output_required=True,
        fuses_activation=True,
        heavy=True,
    )
)
register(
    OpRule(
        "ConvTranspose",
        (0,),
        weight=1,
        weight_axis=_conv_transpose_axis,
        bias=2,
        output_required=True,
        fuses_activation=True,
        heavy=True,
    )
)
register(
    OpRule("MatMul", (0, 1), weight=1, weight_axis=_last_axis, fuses_activation=True, heavy=True)
)
register(
    OpRule(
        "Gemm",
        (0,),
        weight=1,
        weight_axis=_gemm_axis,
        bias=2,
        fuses_activation=True,
        heavy=True,
        check=_gemm_check,
    )
)
for _op in ("Add", "Mul"):
    register(OpRule(_op, (0, 1), fuses_activation=True))
register(OpRule("Concat", tuple(range(64))))
register(OpRule("GlobalAveragePool", (0,)))
register(OpRule("AveragePool", (0,)))
for _op in (
    "MaxPool",
    "Resize",
    "Pad",
    "Slice",
    "Split",
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Flatten",
    "Gather",
):
    register(OpRule(_op, (0,), output=Output.SHARED))

# Ops a quantized node's output may flow through without its own Q/DQ pair.
FUSABLE_ACTIVATIONS = ("Relu", "Clip")
