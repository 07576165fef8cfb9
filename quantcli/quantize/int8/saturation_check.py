"""Which int8 weights of any INT8 model can saturate x86 kernels without VNNI, and where.

Reads the model as ONNX Runtime will run it: integer ops (QLinearConv, QLinearMatMul,
QGemm, MatMulInteger, DynamicQuantizeMatMul, MatMulIntegerToFloat, QAttention,
DynamicQuantizeLSTM) and QDQ groups that ONNX Runtime fuses into them
(DequantizeLinear -> Conv/MatMul/Gemm with a DequantizeLinear'd activation). Depthwise
convolutions and uint8 weights are exact there; so is MatMulNBits. Works on models written
by any tool.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from quantcli.quantize.math.saturation import PAIR_LIMIT, pair_bound

_MS = "com.microsoft"
_ONNX = ("", "ai.onnx")
# (domain, op) -> index of the constant int8 weight; its output channels are the last axis
# unless said otherwise below.
_INTEGER_OPS = {
    ("", "QLinearConv"): 3,
    ("", "QLinearMatMul"): 3,
    ("", "MatMulInteger"): 1,
    (_MS, "QGemm"): 3,
    (_MS, "DynamicQuantizeMatMul"): 1,
    (_MS, "MatMulIntegerToFloat"): 1,
    (_MS, "QAttention"): 1,
    (_MS, "DynamicQuantizeLSTM"): 1,
}
_FLOAT_OPS = ("Conv", "MatMul", "Gemm")  # fused by ONNX Runtime when fed by DQ on both sides


@dataclass(frozen=True)
class PairRisk:
    """A node whose int8 weight has channels that can saturate an int16 pair."""

    node: str
    op_type: str
    weight: str
    channels: int
    unsafe_channels: tuple[int, ...]
    worst_pair: int  # largest same-sign |b + b'| (safe: <= 128)

    def to_dict(self) -> dict:
        return {
            "node": self.node,
            "op_type": self.op_type,
            "weight": self.weight,
            "channels": self.channels,
            "unsafe_channels": list(self.unsafe_channels),
            "worst_pair": self.worst_pair,
        }


@dataclass(frozen=True)
class SaturationCheck:
    checked: int  # int8 weights on an affected kernel
    risks: tuple[PairRisk, ...]
    unchecked: tuple[str, ...]  # nodes whose int8 weight is computed at run time

    @property
    def safe(self) -> bool:
        return not self.risks and not self.unchecked

    def to_dict(self) -> dict:
        return {
            "safe": self.safe,
            "pair_limit": PAIR_LIMIT,
            "checked_weights": self.checked,
            "nodes_at_risk": [r.to_dict() for r in self.risks],
            "unsafe_channels": sum(len(r.unsafe_channels) for r in self.risks),
            "unchecked_nodes": list(self.unchecked),
        }


def _const(value: ir.Value | None) -> np.ndarray | None:
    tensor = None if value is None else ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _dq_source(value: ir.Value | None) -> ir.Value | None:
    """The quantized input of the DequantizeLinear producing `value`, if one does."""
    node = None if value is None else value.producer()
    if node is None or node.op_type != "DequantizeLinear" or node.domain not in _ONNX:
        return None
    return node.inputs[0]


def _depthwise(node: ir.Node, weight_shape: tuple[int, ...]) -> bool:
    group = node.attributes.get_int("group", 1)
    return group > 1 and len(weight_shape) >= 2 and weight_shape[1] == 1 == weight_shape[0] // group


def _weight_of(node: ir.Node) -> tuple[ir.Value, int] | None:
    """(the stored weight value, its output-channel axis) for a node on an affected kernel."""
    key = (node.domain if node.domain != "ai.onnx" else "", node.op_type)
    if key in _INTEGER_OPS:
        index = _INTEGER_OPS[key]
        value = node.inputs[index] if len(node.inputs) > index else None
    elif node.domain in _ONNX and node.op_type in _FLOAT_OPS and len(node.inputs) > 1:
        if _dq_source(node.inputs[0]) is None:
            return None  # a float activation: ONNX Runtime runs it in float
        value = _dq_source(node.inputs[1])
    else:
        return None
    if value is None or value.dtype not in (ir.DataType.INT8, None):
        return None  # uint8 weights are widened exactly
    if node.op_type in ("QLinearConv", "Conv"):
        return value, 0
    if node.op_type in ("QGemm", "Gemm"):
        return value, 0 if node.attributes.get_int("transB", 0) else 1
    return value, -1


def check_saturation(model: ir.Model) -> SaturationCheck:
    """Every int8 weight on a kernel that x86 without VNNI runs with int16 pair sums."""
    risks, unchecked, checked = [], [], 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        found = _weight_of(node)
        if found is None:
            continue
        value, axis = found
        q = _const(value)
        if q is None:
            unchecked.append(node.name or node.op_type)
            continue
        if q.dtype != np.int8 or q.ndim < 2:
            continue
        if node.op_type in ("QLinearConv", "Conv") and _depthwise(node, q.shape):
            continue
        checked += 1
        bound = pair_bound(q, axis)
        unsafe = np.flatnonzero(bound > PAIR_LIMIT)
        if unsafe.size:
            risks.append(
                PairRisk(
                    node.name or node.op_type,
                    node.op_type,
                    value.name or "",
                    int(bound.size),
                    tuple(int(c) for c in unsafe),
                    int(bound.max()),
                )
            )
    return SaturationCheck(checked, tuple(risks), tuple(unchecked))
