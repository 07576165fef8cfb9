"""Which weights INT4 conversion quantizes, and which of them must share one format.

A *candidate* is a MatMul/Gemm with a constant 2-D float weight (after preparation, so a
`Transpose` of a constant is already folded) or a Gather on a constant 2-D table.
A *unit* is the set of candidates that get one format together:

- siblings: MatMuls reading one activation (Q/K/V, gate/up) share a choice, as ModelOpt's
  auto_quantize does (and one Hessian, for GPTQ);
- a weight read by several MatMuls is quantized once, and read by all of them;
- a tied output head and its embedding table share the quantized tensor itself: the Gather
  reads the head's MatMulNBits weight (GatherBlockQuantized), so the table costs no bytes.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from quantcli.graph.build import const_array

# Ops that move or reshape data without mixing channels: a role walk looks through them.
_MOVES = {"Reshape", "Transpose", "Cast", "Squeeze", "Unsqueeze", "Identity", "Flatten"}
_ACTIVATIONS = {"Relu", "Gelu", "FastGelu", "Sigmoid", "Tanh", "Mul", "Erf", "HardSigmoid"}


@dataclass(frozen=True)
class Int4Candidate:
    node: str
    op_type: str
    weight: str  # initializer name
    shape: tuple[int, int]  # [K, N] as the MatMul reads it (Gather: [D, V])
    transposed: bool  # Gemm with transB=1 stores [N, K]; a Gather table is [V, D]

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]


def _excluded(name: str, exclude: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in exclude)


def int4_candidates(
    model: ir.Model, exclude: tuple[str, ...] = (), include_gather: bool = False
) -> list[Int4Candidate]:
    """Nodes of a prepared model (Transposes of constants already folded) INT4 can take."""
    found = []
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm"):
            continue
        name = node.name or ""
        if _excluded(name, exclude):
            continue
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        if weight is None or weight.const_value is None:
            continue
        tensor = weight.const_value
        if len(tensor.shape) != 2 or not tensor.dtype.is_floating_point():
            continue
        transposed = node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))
        if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
            continue
        rows, cols = (int(d) for d in tensor.shape)
        k, n = (cols, rows) if transposed else (rows, cols)
        found.append(Int4Candidate(name, node.op_type, weight.name or "", (k, n), transposed))
    if include_gather:
        found += gather_candidates(model, exclude)
    return found


def gather_candidates(model: ir.Model, exclude: tuple[str, ...] = ()) -> list[Int4Candidate]:
    """Embedding lookups: Gather on axis 0 of a constant 2-D float table [V, D]."""
    found = []
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type != "Gather":
            continue
        name = node.name or ""
        if _excluded(name, exclude):
            continue
        table = node.inputs[0].const_value
        if table is None or len(table.shape) != 2 or not table.dtype.is_floating_point():
            continue
        if node.attributes.get_int("axis", 0) != 0:
            continue
        # Blocks run along D (shape[1]): stored like a [D, V] weight.
        shape = (int(table.shape[1]), int(table.shape[0]))
        found.append(Int4Candidate(name, "Gather", node.inputs[0].name or "", shape, True))
    return found


@dataclass
class Int4Unit:
    """Candidates that get one format: see the module docstring."""

    members: list[Int4Candidate]  # MatMul/Gemm nodes (empty for a lone embedding table)
    tables: list[Int4Candidate] = field(default_factory=list)  # Gathers
    tied: bool = False  # tables read the members' quantized weight (same [V, D] data)
    table_match: bool = False  # the tables hold exactly the members' (transposed) weight
    role: str = "other"  # head | attention_qkv | ffn_down | embedding | other
    layer: int = -1  # index among units of the same role, in graph order

    @property
    def name(self) -> str:
        return (self.members or self.tables)[0].node

    def weights(self) -> list[Int4Candidate]:
        """One candidate per distinct stored weight (a shared weight counts once)."""
        seen: dict[tuple[str, bool], Int4Candidate] = {}
        for c in self.members:
            seen.setdefault((c.weight, c.transposed), c)
        if not self.tied:
            for c in self.tables:
                seen.setdefault((c.weight, True), c)
        return list(seen.values())

    @property
    def params(self) -> int:
        return sum(c.params for c in self.weights())

    @property
    def k(self) -> int:
        return (self.members or self.tables)[0].shape[0]


def _find(parent: dict[str, str], x: str) -> str:
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


def _tied(model: ir.Model, gather: ir.Node, matmuls: list[tuple[Int4Candidate, ir.Node]]) -> int:
    """Index of the MatMul whose weight is exactly the transposed table, or -1."""
    table = gather.inputs[0]
    shape = tuple(int(d) for d in table.const_value.shape)
    for i, (cand, node) in enumerate(matmuls):
        weight = node.inputs[1]
        if cand.op_type != "MatMul" or tuple(cand.shape) != (shape[1], shape[0]):
            continue
        if _is_transpose_of(weight, table):
            return i
    return -1


def _is_transpose_of(weight: ir.Value, table: ir.Value) -> bool:
    a, b = const_array(weight), const_array(table)
    if a is None or b is None or a.shape != b.shape[::-1] or a.dtype != b.dtype:
        return False
    # Cheap probes first (a few rows), then the whole table.
    for row in (0, b.shape[0] // 2, b.shape[0] - 1):
        if not np.array_equal(a[:, row], b[row]):
            return False
    return bool(np.array_equal(a, b.T))


def plan_units(
    model: ir.Model,
    exclude: tuple[str, ...] = (),
    embeddings: bool | None = None,
    share_tables: bool = True,
) -> list[Int4Unit]:
    """Units of a prepared model, in graph order.

    ``embeddings``: None quantizes a table tied to a quantized head (it then shares the head's
    data when ``share_tables``) and untied tables too; False keeps every table float; True
    quantizes every table.
    """
    matmuls = int4_candidates(model, exclude)
    nodes = {n.name: n for n in model.graph}
    pairs = [(c, nodes[c.node]) for c in matmuls]
    parent = {c.node: c.node for c in matmuls}
    by_input: dict[int, str] = {}
    by_weight: dict[tuple[int, bool], str] = {}
    for cand, node in pairs:
        for key, table in (
            (id(node.inputs[0]), by_input),
            ((id(node.inputs[1]), cand.transposed), by_weight),
        ):
            if key in table:
                parent[_find(parent, cand.node)] = _find(parent, table[key])
            else:
                table[key] = cand.node
    groups: dict[str, list[Int4Candidate]] = {}
    for cand in matmuls:
        groups.setdefault(_find(parent, cand.node), []).append(cand)
    units = {root: Int4Unit(members) for root, members in groups.items()}
    loose: list[Int4Unit] = []
    if embeddings is not False:
        for table in gather_candidates(model, exclude):
            i = _tied(model, nodes[table.node], pairs)
            if i >= 0:
                unit = units[_find(parent, pairs[i][0].node)]
                unit.tables.append(table)
                unit.table_match = len({(c.weight, c.transposed) for c in unit.members}) == 1
                unit.tied = share_tables and unit.table_match
            else:
                loose.append(Int4Unit([], [table], role="embedding"))
    order = {n.name: i for i, n in enumerate(model.graph)}
    out = sorted(
        [*units.values(), *loose],
        key=lambda u: min(order[c.node] for c in u.members + u.tables),
    )
    _assign_roles(model, out, nodes)
    return out


def _assign_roles(model: ir.Model, units: list[Int4Unit], nodes: dict[str, ir.Node]) -> None:
    """head (output feeds a graph output, or tied to a table), attention_qkv (three siblings
    whose outputs reach an attention product), ffn_down (K > N after an activation)."""
    outputs = {id(v) for v in model.graph.outputs}
    for unit in units:
        if not unit.members:
            continue
        first = nodes[unit.members[0].node]
        if unit.tables or _reaches(first.outputs[0], outputs):
            unit.role = "head"
        elif len(unit.members) >= 3 and all(m.shape[0] == unit.k for m in unit.members):
            unit.role = "attention_qkv"
        elif unit.members[0].shape[0] > unit.members[0].shape[1] and _after_activation(first):
            unit.role = "ffn_down"
    counts: dict[str, int] = {}
    for unit in units:
        unit.layer = counts.get(unit.role, 0)
        counts[unit.role] = unit.layer + 1


def _reaches(value: ir.Value, outputs: set[int]) -> bool:
    for _ in range(8):
        if id(value) in outputs:
            return True
        users = [u for u, _ in value.uses()]
        if len(users) != 1 or users[0].op_type not in _MOVES | {"Add"}:
            return False
        value = users[0].outputs[0]
    return False


def _after_activation(node: ir.Node) -> bool:
    producer = node.inputs[0].producer()
    while producer is not None and producer.op_type in _MOVES:
        producer = producer.inputs[0].producer()
    return producer is not None and producer.op_type in _ACTIVATIONS
