"""Calibration for INT4: x^T x of quantized MatMuls' inputs, one segment of the graph at a time.

The graph is cut (in topological order) into segments that each hold a bounded amount of
Hessian memory, usually one transformer layer. The tensors that cross a cut (the residual
stream, the attention mask...) are kept for every calibration batch; each segment then runs
on ONNX Runtime alone:

1. the float segment, returning the inputs of its quantized MatMuls: x^T x is accumulated;
2. the caller quantizes the segment's weights (the graph is rewritten in place);
3. the quantized segment runs again to produce what crosses the next cut, so later layers
   are calibrated on the outputs of the layers already quantized, as GPTQ does
   (``sequential``; off, step 3 is skipped and step 1 also returns the next cut's tensors).

Only one segment's weights, Hessians and ONNX Runtime session exist at a time; the kept
tensors are a few activations per sample (`calibrate/segments.py` runs the segments). A
model with control flow (If/Loop bodies read outer values) runs as a single segment.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from quantcli.calibrate.segments import (
    crossing_counts,
    frontier,
    has_subgraphs,
    producer_positions,
)

HESSIAN_BUDGET = 48 << 20  # bytes of float64 x^T x accumulated per segment


@dataclass
class Accumulator:
    """Sums of x^T x (float64) and token counts per Hessian input; index counts for tables."""

    hessians: dict[str, np.ndarray] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    indices: dict[str, np.ndarray] = field(default_factory=dict)  # Gather index -> counts

    def add(self, name: str, x: np.ndarray) -> None:
        # One batch's product in float32 (twice as fast; a batch sums few tokens), summed
        # over batches in float64.
        x2 = np.asarray(x, dtype=np.float32).reshape(-1, np.shape(x)[-1])
        update = (x2.T @ x2).astype(np.float64)
        if name in self.hessians:
            self.hessians[name] += update
        else:
            self.hessians[name] = update
        self.tokens[name] = self.tokens.get(name, 0) + x2.shape[0]

    def add_indices(self, name: str, ids: np.ndarray, size: int) -> None:
        flat = np.asarray(ids).reshape(-1).astype(np.int64)
        flat = np.where(flat < 0, flat + size, flat)
        counts = np.bincount(flat[(flat >= 0) & (flat < size)], minlength=size)
        self.indices[name] = self.indices.get(name, 0) + counts

    def mean_hessian(self, names: list[str]) -> np.ndarray:
        """E[x x^T] over all tokens of the given inputs (one weight read by several MatMuls
        sums its inputs)."""
        total = sum(self.hessians[n] for n in names)
        return total / max(1, sum(self.tokens[n] for n in names))

    def drop(self, names: list[str]) -> None:
        for n in names:
            self.hessians.pop(n, None)
            self.tokens.pop(n, None)


@dataclass
class Segment:
    inputs: list[str]  # Hessian inputs accumulated in this segment
    indices: list[str]  # Gather index tensors counted in this segment
    frontier: list[str]  # tensors crossing the cut after this segment (carried to the next)


def plan_segments(
    model: ir.Model,
    hessian_inputs: list[tuple[str, int, list[str]]],
    indices: list[str],
    budget: int = HESSIAN_BUDGET,
) -> list[Segment]:
    """Cut the graph into segments. ``hessian_inputs``: (input name, K, consumer node names)."""
    nodes = list(model.graph)
    pos = {n.name: i for i, n in enumerate(nodes)}
    if has_subgraphs(model) or not hessian_inputs:
        return [Segment([h for h, _, _ in hessian_inputs], list(indices), [])]
    first = {h: min(pos[c] for c in cons) for h, _, cons in hessian_inputs}
    last = {h: max(pos[c] for c in cons) for h, _, cons in hessian_inputs}
    order = sorted(hessian_inputs, key=lambda t: (first[t[0]], t[0]))
    groups: list[list[str]] = [[]]
    used = 0
    for name, k, _ in order:
        need = k * k * 8
        if groups[-1] and used + need > budget:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += need
    # Merge groups that cannot be cut apart (a consumer after the next group's first).
    merged: list[list[str]] = []
    for group in groups:
        if merged and max(last[h] for h in merged[-1]) >= min(first[h] for h in group):
            merged[-1] += group
        else:
            merged.append(group)
    crossing = crossing_counts(model, nodes, pos)
    cuts = []
    for a, b in itertools.pairwise(merged):
        lo, hi = max(last[h] for h in a) + 1, min(first[h] for h in b)
        best = min(range(lo, hi + 1), key=lambda p: (crossing[p], -p))
        cuts.append(best)
    where = producer_positions(model)
    index_pos = {name: where[name] for name in indices}
    segments = []
    bounds = [0, *cuts, len(nodes)]
    for i, group in enumerate(merged):
        start, end = bounds[i], bounds[i + 1]
        seg_indices = [
            t for t in indices if start <= index_pos[t] < end or (i == 0 and index_pos[t] < 0)
        ]
        crossing_next = frontier(model, nodes, pos, end) if i + 1 < len(merged) else []
        segments.append(Segment(group, seg_indices, crossing_next))
    return segments
