"""Which stem Convs stay float: the Convs that read the model's image input directly.

A stem Conv sees 1-3 input channels, so its filters are small (27 weights for 3x3 RGB) and,
after BatchNorm folding, often large: EfficientNet-Lite0's reach |w| = 17, where the int8
rounding error of the weights alone is several steps of the output's int8 grid. Keeping
that one Conv float lifts top-1 agreement with float from 0.885 to 0.925 (docs/int8.md)
and costs little time in a deep network (2.8% of its multiply-adds). In a small network,
per-node overhead dominates and a float stem costs real time (the MNIST CNN: 1.4x slower
overall), so stems stay float only in networks of at least MIN_MODEL_MACS multiply-adds.
Unknown shapes: no estimate, the stem is quantized.
"""

from __future__ import annotations

import math

import onnx_ir as ir

STEM_MAX_CHANNELS = 3  # grayscale or RGB
STEM_MAX_SHARE = 0.05  # of the multiply-adds of all heavy candidates
MIN_MODEL_MACS = 50_000_000  # per sample: EfficientNet-Lite0 385M, the MNIST CNN 7.7M


def float_stems(heavy: list[ir.Node]) -> list[ir.Node]:
    """The stem Convs among `heavy` (the compute-heavy candidates) to keep float."""
    stems = [n for n in heavy if _is_stem_conv(n)]
    if not stems:
        return []
    costs = {id(n): _macs(n) for n in heavy}
    if any(c is None for c in costs.values()):
        return []
    total = sum(costs.values())  # type: ignore[arg-type]
    stem_cost = sum(costs[id(n)] for n in stems)  # type: ignore[misc]
    deep = total >= MIN_MODEL_MACS and stem_cost <= STEM_MAX_SHARE * total
    return stems if deep else []


def _is_stem_conv(node: ir.Node) -> bool:
    if node.op_type != "Conv" or len(node.inputs) < 2 or node.inputs[0] is None:
        return False
    weight = node.inputs[1]
    if not node.inputs[0].is_graph_input() or weight is None or weight.const_value is None:
        return False
    shape = weight.const_value.shape
    return len(shape) >= 3 and shape[1] <= STEM_MAX_CHANNELS


def _macs(node: ir.Node) -> int | None:
    """Multiply-adds per sample of a Conv/Gemm/MatMul with a constant weight, if known."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if weight is None or weight.const_value is None:
        return None
    w = [int(d) for d in weight.const_value.shape]
    if node.op_type in ("Gemm", "MatMul"):
        return math.prod(w[-2:]) if len(w) >= 2 else None
    out = node.outputs[0].shape
    if out is None or out.rank() != len(w):
        return None
    spatial = list(out.dims[2:])
    if not all(isinstance(d, int) for d in spatial):
        return None
    return math.prod(w) * math.prod(spatial)  # type: ignore[arg-type]
