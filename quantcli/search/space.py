"""The search space: groups of nodes that move together, and each group's ladder of formats.

A group is the nodes that read one activation (attention's Q/K/V, a gated FFN's gate/up:
they share a quantized input, and sibling fusion wants them alike) or a single Conv/Gemm.
Each group climbs a ladder from the fastest format the planner picks by default towards
float: dynamic int8 -> weight-only int8 (MatMulNBits bits=8) -> float for transformer
MatMuls, static int8 -> float for convolutions. An assignment is one rung per group.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantcli.quantize.int8.plan import Plan

HEAVY = ("Conv", "ConvTranspose", "Gemm", "MatMul")
LADDERS = {
    "dynamic": ("dynamic", "weight-only", "float"),
    "weight-only": ("weight-only", "float"),
    "static": ("static", "float"),
}


@dataclass(frozen=True)
class Group:
    name: str  # the shared input tensor, or the node
    nodes: tuple[str, ...]
    ladder: tuple[str, ...]


Assignment = tuple[int, ...]  # rung per group, in Space.groups order


@dataclass(frozen=True)
class Space:
    groups: tuple[Group, ...]

    @property
    def start(self) -> Assignment:
        return (0,) * len(self.groups)

    def node_formats(self, assignment: Assignment) -> tuple[tuple[str, str], ...]:
        """The per-node overrides (Int8Config.node_formats) of an assignment."""
        chosen = []
        for group, rung in zip(self.groups, assignment, strict=True):
            if rung:
                chosen += [(node, group.ladder[rung]) for node in group.nodes]
        return tuple(sorted(chosen))

    def formats(self, assignment: Assignment) -> dict[str, str]:
        """Every searched node's format (for logs and the result)."""
        return {
            node: group.ladder[rung]
            for group, rung in zip(self.groups, assignment, strict=True)
            for node in group.nodes
        }

    def step(self, assignment: Assignment, index: int, by: int = 1) -> Assignment | None:
        """The assignment with group `index` moved `by` rungs (None: off the ladder)."""
        rung = assignment[index] + by
        if not 0 <= rung < len(self.groups[index].ladder):
            return None
        return (*assignment[:index], rung, *assignment[index + 1 :])


def build_space(plan: Plan, inputs: dict[str, str]) -> Space:
    """Groups from the default plan; `inputs` maps node name -> its activation input."""
    kinds: dict[str, str] = {}
    for node in plan.nodes:
        if node.op_type in HEAVY and node.weight:
            kinds[node.node] = "static"
    kinds.update((name, "dynamic") for name, _ in plan.dynamic)
    kinds.update((name, "weight-only") for name, _ in plan.blockwise)
    by_key: dict[tuple[str, str], list[str]] = {}
    for name, kind in kinds.items():
        shared = kind != "static" and inputs.get(name)
        key = (kind, inputs[name] if shared else name)
        by_key.setdefault(key, []).append(name)
    groups = [
        Group(key[1], tuple(sorted(nodes)), LADDERS[key[0]])
        for key, nodes in sorted(by_key.items(), key=lambda kv: kv[0][1])
    ]
    return Space(tuple(groups))
