"""Mixed INT4/INT8/float under a size budget, and named presets.

Budget (`--budget 4.5` bits per weight, or `--budget 120MB`): every unit (`plan.py`)
has a few options (4-bit with the chosen block, 4-bit with coarse blocks, 8-bit, float),
each with its exact stored bytes and its relative output error (from calibration: the error
each option adds to the layer's output over that output's energy, E|x dW|^2 / E|x W|^2;
without data the relative weight error). The choice is a multiple-choice knapsack (least
total error within the bytes), solved by dynamic programming. Siblings are one unit, so
Q/K/V and gate/up share a choice.

Coarser 4-bit blocks are offered only when the budget cannot hold every unit at
`--block-size`: on SmolLM2, trading block-32 layers for block-64 ones to pay for 8-bit
elsewhere lost more than it won (perplexity 25.81 against 25.36 for uniform block 32 at the
same 5.83 bits per weight; 26.72 at 5.5 against 25.95 for uniform block 32 at 5.13), which
the relative error did not foresee.

An LM's vocabulary head is 8-bit whenever the budget affords it on top of that, as
llama.cpp keeps it in every k-quant mix: its error reaches the output directly (on
SmolLM2-135M 8-bit instead of 4-bit took perplexity from 25.95 to 25.36 for 0.7 bits per
weight, a gain the relative output error undervalues about fortyfold).

Presets (`--mix`), for users without data, in the spirit of llama.cpp's k-quant mixes.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from quantcli.quantize.int4.formats import (
    FLOAT,
    Choice,
    coarse_block,
    compact_scales,
    int8_block,
    weight_bytes,
)
from quantcli.quantize.int4.plan import Int4Unit
from quantcli.quantize.math.int4 import n_blocks_for

MIXES = {
    "k-quant": "like llama.cpp's Q4_K_M: the output head (and a tied embedding), and the "
    "attention Q/K/V and FFN down projections of the first and last eighth of the layers "
    "and of every third layer between, in 8-bit; the rest 4-bit",
}


@dataclass
class Sizes:
    """Stored bytes of a unit in each choice, for the output form being written."""

    format: str
    block_size: int
    symmetric: bool
    itemsize: dict[str, int]  # weight name -> bytes of one float element
    compact: bool = False  # float32 scales stored as float16 and a 4-byte factor

    @classmethod
    def of(cls, model: ir.Model, config: object) -> Sizes:
        itemsize = {
            name: int(value.const_value.dtype.itemsize)
            for name, value in model.graph.initializers.items()
            if value.const_value is not None and value.const_value.dtype.is_floating_point()
        }
        return cls(
            config.format, config.block_size, config.symmetric, itemsize, config.compact_scales
        )

    def float32(self, weight: str) -> bool:
        """Whether a weight is float32 (the type whose scales compact scales shrink)."""
        return self.itemsize.get(weight, 4) == 4

    def scale_bytes(self, unit: Int4Unit) -> int:
        """Bytes of one stored scale of the unit's weights."""
        weight = (unit.members or unit.tables)[0].weight
        return 2 if self.compact and self.float32(weight) else self.itemsize.get(weight, 4)

    def int8(self, unit: Int4Unit) -> Choice:
        return Choice(8, int8_block(unit.k, unit.tied, self.scale_bytes(unit)))

    def coarse(self, unit: Int4Unit) -> Choice:
        return Choice(4, coarse_block(unit.k, unit.tied, self.scale_bytes(unit)))

    def default_choice(self, unit: Int4Unit) -> Choice:
        """4-bit blocks; the output head (and a table tied to it) 8-bit, as llama.cpp and
        Olive keep it: measured on SmolLM2-135M (GPTQ) perplexity 25.36 at 0.19x the float
        size against 25.98 at 0.17x with a 4-bit head (float 24.70)."""
        if vocabulary_head(unit):
            return self.int8(unit)
        return Choice(4, self.block_size)

    def unit_bytes(self, unit: Int4Unit, choice: Choice) -> int:
        total = 0
        for cand in unit.weights():
            if choice.is_float and unit.tables and cand.op_type != "Gather" and unit.table_match:
                continue  # a float head tied to its table reads the table itself
            k, n = cand.shape
            size = self.itemsize.get(cand.weight, 4)
            layout = "gather" if cand.op_type == "Gather" else self.format
            if layout == "gather" and choice.bits == 8 and self.format == "matmulnbits":
                layout = "qdq"  # GatherBlockQuantized 8-bit: [V, D] uint8, no padding
            compact = (
                self.compact
                and self.float32(cand.weight)
                and not choice.is_float
                and compact_scales(n_blocks_for(k, choice.block_size) * n)
            )
            total += weight_bytes(
                choice,
                k,
                n,
                scale_bytes=2 if compact else size,
                float_bytes=size,
                symmetric=self.symmetric,
                layout=layout,
            ) + (4 if compact else 0)
        if choice.is_float and unit.tables and unit.table_match:
            total += sum(t.params * self.itemsize.get(t.weight, 4) for t in unit.tables[:1])
        return total


def vocabulary_head(unit: Int4Unit) -> bool:
    """An LM's output head: tied to an embedding table, or N at least 4x K."""
    return unit.role == "head" and bool(unit.tables or unit.members[0].shape[1] >= 4 * unit.k)


def unit_options(unit: Int4Unit, sizes: Sizes) -> list[Choice]:
    options = [sizes.coarse(unit), Choice(4, sizes.block_size), sizes.int8(unit), FLOAT]
    return list(dict.fromkeys(options))


def allocate(
    costs: list[dict[Choice, int]],
    errors: list[dict[Choice, float]],
    budget: int,
    resolution: int = 20000,
) -> list[Choice]:
    """Least total error within ``budget`` bytes: one option per unit (multiple-choice
    knapsack), solved by dynamic programming over the budget cut into ``resolution`` steps.
    Costs are rounded up to whole steps, so the result never exceeds the budget (at most
    one step per unit is lost to rounding); if rounding leaves no solution, the greedy
    convex-hull allocation decides."""
    best_each = [
        min(e, key=lambda c: (e[c], cost[c])) for cost, e in zip(costs, errors, strict=True)
    ]
    if sum(cost[c] for cost, c in zip(costs, best_each, strict=True)) <= budget:
        return best_each  # everything at its least error fits
    step = max(1.0, budget / resolution)
    bins = int(budget // step)
    inf = float("inf")
    best = np.full(bins + 1, inf)
    best[0] = 0.0
    picks = []
    options = [list(c) for c in costs]
    for cost, error, opts in zip(costs, errors, options, strict=True):
        new = np.full(bins + 1, inf)
        pick = np.zeros(bins + 1, dtype=np.int16)
        for i, choice in enumerate(opts):
            w = int(np.ceil(cost[choice] / step))
            if w > bins:
                continue
            cand = np.full(bins + 1, inf)
            cand[w:] = best[: bins + 1 - w] + error[choice]
            better = cand < new
            new[better] = cand[better]
            pick[better] = i
        best = new
        picks.append(pick)
    if not np.isfinite(best).any():
        return _greedy(costs, errors, budget)
    j = int(np.argmin(best))
    chosen = []
    for cost, opts, pick in zip(reversed(costs), reversed(options), reversed(picks), strict=True):
        choice = opts[int(pick[j])]
        chosen.append(choice)
        j -= int(np.ceil(cost[choice] / step))
    return chosen[::-1]


def _greedy(
    costs: list[dict[Choice, int]], errors: list[dict[Choice, float]], budget: int
) -> list[Choice]:
    """Upgrades along each unit's lower convex hull, best error removed per byte first."""
    hulls = [_hull(c, e) for c, e in zip(costs, errors, strict=True)]
    state = [0] * len(hulls)
    spent = sum(h[0][1] for h in hulls)
    heap: list[tuple[float, int]] = []

    def push(i: int) -> None:
        if state[i] + 1 < len(hulls[i]):
            (_, b0, e0), (_, b1, e1) = hulls[i][state[i]], hulls[i][state[i] + 1]
            heapq.heappush(heap, (-(e0 - e1) / max(b1 - b0, 1), i))

    for i in range(len(hulls)):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        step = hulls[i][state[i] + 1][1] - hulls[i][state[i]][1]
        if spent + step > budget:
            continue  # too big now; smaller upgrades of other units may still fit
        spent += step
        state[i] += 1
        push(i)
    return [h[s][0] for h, s in zip(hulls, state, strict=True)]


def _hull(cost: dict[Choice, int], error: dict[Choice, float]) -> list[tuple[Choice, int, float]]:
    """Options on the lower convex hull of (bytes, error), cheapest first."""
    points = sorted(((cost[c], error[c], c) for c in cost), key=lambda p: (p[0], p[1]))
    frontier: list[tuple[int, float, Choice]] = []
    for b, e, c in points:  # drop options that cost more without removing error
        if frontier and e >= frontier[-1][1]:
            continue
        frontier.append((b, e, c))
    hull: list[tuple[int, float, Choice]] = []
    for p in frontier:
        while len(hull) >= 2:
            (b0, e0, _), (b1, e1, _) = hull[-2], hull[-1]
            # the middle point is above the chord: not worth stopping at
            if (e1 - e0) * (p[0] - b0) >= (p[1] - e0) * (b1 - b0):
                hull.pop()
            else:
                break
        hull.append(p)
    return [(c, b, e) for b, e, c in hull]


def _more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's use_more_bits: first and last eighth, and every third layer between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def mix_choices(name: str, units: list[Int4Unit], sizes: Sizes) -> list[Choice]:
    if name != "k-quant":
        raise ValueError(name)
    counts: dict[str, int] = {}
    for unit in units:
        counts[unit.role] = counts.get(unit.role, 0) + 1
    out = []
    for unit in units:
        eight = sizes.int8(unit)
        more = unit.role in ("attention_qkv", "ffn_down") and _more_bits(
            unit.layer, counts[unit.role]
        )
        out.append(eight if unit.role == "head" or more else sizes.default_choice(unit))
    return out
