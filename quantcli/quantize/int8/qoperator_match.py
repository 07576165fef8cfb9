"""Matching helpers of the QOperator rewrite: what a DQ -> op -> Q group looks like.

Pure questions about the graph (is this value dequantized with constant per-tensor
parameters, which Q reads this output, is this Relu/Clip absorbed by the output range),
kept apart from the rules in `qoperator.py` that build the integer ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx_ir as ir

_ONNX = ("", "ai.onnx")
_Q8 = (ir.DataType.UINT8, ir.DataType.INT8)


@dataclass
class Match:
    node: ir.Node
    dqs: list[ir.Node]  # the DequantizeLinear feeding each matched input
    q: ir.Node | None  # the QuantizeLinear of the output; None: the output stays float
    act: ir.Node | None = None  # Relu/Clip that the output Q's range makes redundant
    bias: np.ndarray | None = None  # float Conv bias, requantized at rewrite


class Rule(Protocol):
    def match(self, node: ir.Node) -> Match | None: ...

    def rewrite(self, match: Match) -> None: ...


def _array(value: ir.Value | None) -> np.ndarray | None:
    """The value as an array when it is an initializer or a Constant node output."""
    tensor = None if value is None else ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _is(node: ir.Node | None, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and node.domain in _ONNX


def _qparams_ok(node: ir.Node, per_tensor: bool = True) -> bool:
    """Constant scale and zero point; the zero point must be there as it fixes the dtype."""
    if len(node.inputs) < 3 or node.attributes.get_int("block_size", 0):
        return False
    scale, zp = _array(node.inputs[1]), _array(node.inputs[2])
    if scale is None or zp is None or scale.dtype != np.float32:  # QLinear ops take float32
        return False
    return scale.size == 1 or not per_tensor


def _dq(value: ir.Value | None, per_tensor: bool = True) -> ir.Node | None:
    node = value.producer() if value is not None else None
    if _is(node, "DequantizeLinear") and _qparams_ok(node, per_tensor):
        return node
    return None


def _dtype(qdq: ir.Node) -> ir.DataType:
    """Integer dtype of a Q output or DQ input: that of its zero point."""
    return ir.DataType.from_numpy(_array(qdq.inputs[2]).dtype)


def _only_user(value: ir.Value) -> ir.Node | None:
    """The single consumer of value, when it reads value as its first input."""
    uses = value.uses()
    if value.is_graph_output() or len(uses) != 1 or uses[0].idx != 0:
        return None
    return uses[0].node


def _scalar(value: ir.Value | None, default: float) -> float | None:
    if value is None:
        return default
    array = _array(value)
    return None if array is None or array.size != 1 else float(array.reshape(-1)[0])


def _absorbed(act: ir.Node, q: ir.Node) -> bool:
    """True when Q's saturation alone gives what act then Q gives (act range covers Q's)."""
    lo, hi = 0.0, float("inf")
    if act.op_type == "Clip":
        lo = act.attributes.get_float("min", float("-inf"))  # opset < 11 keeps bounds here
        hi = act.attributes.get_float("max", float("inf"))
        bounds = [*act.inputs[1:3], None, None]
        lo, hi = _scalar(bounds[0], lo), _scalar(bounds[1], hi)
        if lo is None or hi is None:
            return False
    scale, zp = _scalar(q.inputs[1], 0.0), _array(q.inputs[2])
    info = np.iinfo(zp.dtype)
    # Within half a step of Q's bound, the bound still rounds to qmin/qmax.
    zero, half = int(zp.reshape(-1)[0]), 0.5 * scale
    return lo < (info.min - zero) * scale + half and hi > (info.max - zero) * scale - half


def _output_q(node: ir.Node) -> tuple[ir.Node, ir.Node | None] | None:
    if len(node.outputs) != 1:
        return None
    user, act = _only_user(node.outputs[0]), None
    if user is not None and user.op_type in ("Relu", "Clip") and user.domain in _ONNX:
        act, user = user, _only_user(user.outputs[0])
    if user is None or not _is(user, "QuantizeLinear") or not _qparams_ok(user):
        return None
    if act is not None and not _absorbed(act, user):
        return None
    return user, act


def _weight_ok(dq: ir.Node, axis: int) -> bool:
    """Constant weight, quantized per tensor or per channel along axis, one zero point."""
    w, scale, zp = (_array(v) for v in dq.inputs[:3])
    if w is None or np.unique(zp).size != 1:
        return False
    if scale.size == 1:
        return True
    ax = dq.attributes.get_int("axis", 1) % w.ndim
    return ax == axis % w.ndim and scale.shape == (w.shape[ax],)


def _types_ok(x: ir.DataType, w: ir.DataType, y: ir.DataType) -> bool:
    """The (input, weight, output) combinations ORT's CPU kernels implement."""
    return x in _Q8 and y == x and w in (ir.DataType.INT8, x)


def _take_over(old: ir.Value, new: ir.Value) -> None:
    """Point every user (graph outputs too) of old at new, and keep old's name."""
    name = old.name
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    old.name = None
    new.name = name


def _out_params(match: Match) -> list[ir.Value | None]:
    return list(match.q.inputs[1:3]) if match.q else []


def _out_dtype(match: Match, default: ir.DataType) -> ir.DataType:
    return _dtype(match.q) if match.q else default
