"""Ranking trials without a model per trial: one model that moves any one group.

NNCF ranks by moving each group alone and scoring the result on the worst samples. Built one
candidate at a time, that is a model written and loaded per group: about 27 s each on
SmolLM2-135M, whose 121 groups then take the whole 15-minute budget. Here two candidates
are built once: A, the current one, and B, every group one rung towards float. They are
merged into A plus, per group g, an If on `quantcli_switch == g`: its then-branch is B's
computation of g's outputs from the tensors A computes for g's inputs, its else-branch A's
own outputs. A run with the switch at g is A with only g moved, which is what a one-group
candidate computes, up to the quantization of tensors between groups (A's here); If runs
only the branch taken, so each ranking trial is one pass over the ranking samples on one
ONNX Runtime session. A group whose outputs cannot be cut out of B this way is marked
unswitchable and gets a built candidate instead.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

import onnx
import onnx_ir as ir
from onnx import helper

SWITCH = "quantcli_switch"  # the int64 scalar input: which group is moved (-1: none)
_SUBGRAPH = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


class FloatFacts:
    """What merging needs to know of the prepared float model the candidates come from."""

    def __init__(self, model: ir.Model) -> None:
        graph = model.graph
        self.original = {v.name for n in graph for v in n.outputs if v.name}
        self.original |= {v.name for v in graph.inputs if v.name}
        self.op_types = {v.name: n.op_type for n in graph for v in n.outputs if v.name}
        self.elem_types = {
            v.name: int(v.dtype) for n in graph for v in n.outputs if v.name and v.dtype
        }
        ends = {v.name for v in graph.outputs}
        self.onward: dict[str, tuple[str, ...]] = {}
        self.outputs: dict[str, list[str]] = {}
        for node in graph:
            self.outputs[node.name or ""] = [v.name for v in node.outputs if v.name]
            for v in node.outputs:
                readers = {id(user): user for user, _ in v.uses()}
                if v.name and len(readers) == 1 and v.name not in ends:
                    (user,) = readers.values()
                    self.onward[v.name] = tuple(o.name for o in user.outputs if o.name)


def switch_points(
    outputs: list[str], onward: dict[str, tuple[str, ...]], produced: set[str]
) -> list[str] | None:
    """The tensors to switch for a group whose nodes write `outputs`: each output that
    both candidates compute (`produced`), else the outputs of its only reader (a MatMul's
    bias Add that a fused kernel absorbed), two steps at most. None: no such tensors."""
    points: list[str] = []
    for name in outputs:
        frontier = [name]
        for _ in range(2):
            if all(t in produced for t in frontier):
                break
            if any(t not in produced and t not in onward for t in frontier):
                return None
            frontier = [u for t in frontier for u in ((t,) if t in produced else onward[t])]
        if not frontier or not all(t in produced for t in frontier):
            return None
        points += [t for t in frontier if t not in points]
    return points


def switch_model(
    a: onnx.ModelProto, b: onnx.ModelProto, facts: FloatFacts, groups: dict[int, list[str]]
) -> tuple[onnx.ModelProto, set[int]]:
    """The merged model of candidates A and B for `groups` (index -> the node names of
    that group), and the groups it can switch."""
    both = _produced(a.graph) & _produced(b.graph)
    count = max(groups, default=-1) + 1
    points: list[list[str] | None] = [None] * count
    for index, nodes in groups.items():
        outputs = [o for node in nodes for o in facts.outputs.get(node, [])]
        points[index] = switch_points(outputs, facts.onward, both)
    # A tensor of A stands for the float model's tensor of that name only where A computes
    # it with the same op: a Relu that A dropped because its Q clamps anyway leaves the
    # Conv's unclamped output under the Relu's name.
    producers = {o: n.op_type for n in a.graph.node for o in n.output if o}
    same = {
        t
        for t in facts.original
        if producers.get(t, facts.op_types.get(t)) == facts.op_types.get(t)
    }
    merged, ok = merge(a, b, points, same, facts.elem_types)
    return merged, {i for i in groups if ok[i]}


def _produced(graph: onnx.GraphProto) -> set[str]:
    return {o for n in graph.node for o in n.output if o} | {i.name for i in graph.input}


def merge(
    a: onnx.ModelProto,
    b: onnx.ModelProto,
    points: list[list[str] | None],
    original: set[str],
    elem_types: dict[str, int],
) -> tuple[onnx.ModelProto, list[bool]]:
    """A with one If per switchable group (`points[g]`: the tensors group g hands on, None
    to skip it), B's slices in their then-branches. `original` holds the float model's
    activation names, the only tensors a slice may read from A. Returns the merged model
    and which groups it can switch."""
    merger = _Merger(a, b, elem_types)
    switchable = []
    for g, tensors in enumerate(points):
        cut = None
        if tensors and not any(t in merger.renamed_a for t in tensors):  # each tensor once
            cut = _slice(tensors, merger.producer_b, merger.inits_b, original, merger.produced_a)
        if tensors and cut is not None:
            merger.add(g, tensors, *cut)
        switchable.append(cut is not None)
    return merger.finish(b), switchable


class _Merger:
    """The merged model being built: A's graph, B's slices, the switches."""

    def __init__(self, a: onnx.ModelProto, b: onnx.ModelProto, elem_types: dict[str, int]):
        self.produced_a = _produced(a.graph)
        self.producer_b = {o: n for n in b.graph.node for o in n.output if o}
        self.inits_b = {t.name: t for t in b.graph.initializer}
        self.order_b = {id(n): i for i, n in enumerate(b.graph.node)}
        self.elem_types = elem_types
        self.model = onnx.ModelProto()
        self.model.CopyFrom(a)
        self.graph = self.model.graph
        self.graph.input.append(helper.make_tensor_value_info(SWITCH, onnx.TensorProto.INT64, []))
        self.producer_index = {o: i for i, n in enumerate(self.graph.node) for o in n.output if o}
        self.copied: set[str] = set()  # B initializers already in the graph
        self.renamed_a: dict[str, str] = {}  # A's outputs that a switch now takes over
        self.added: list[tuple[float, onnx.NodeProto]] = []  # (position key, node)

    def add(self, g: int, tensors: list[str], nodes: list, inits: set[str]) -> None:
        suffix = f"__sw{g}"
        mapping = {o: o + suffix for n in nodes for o in n.output if o}
        for name in inits:
            mapping[name] = name + "__swb"
            if name not in self.copied:
                self.copied.add(name)
                copy = onnx.TensorProto()
                copy.CopyFrom(self.inits_b[name])
                copy.name = name + "__swb"
                self.graph.initializer.append(copy)
        moved = []
        for node in sorted(nodes, key=lambda n: self.order_b[id(n)]):
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = (node.name or node.op_type) + suffix
            copy.input[:] = [mapping.get(i, i) for i in node.input]
            copy.output[:] = [mapping.get(o, o) for o in node.output]
            moved.append(copy)
        for t in tensors:
            self.renamed_a[t] = t + "__swa"
        kept = [
            helper.make_node("Identity", [t + "__swa"], [t + "__swe"], name=f"{t}__swe{g}")
            for t in tensors
        ]
        then_branch = helper.make_graph(moved, f"moved{g}", [], self._outs(tensors, mapping))
        else_branch = helper.make_graph(
            kept, f"kept{g}", [], self._outs(tensors, {t: t + "__swe" for t in tensors})
        )
        cond = f"{SWITCH}_is{g}"
        const = helper.make_tensor(f"{SWITCH}_{g}", onnx.TensorProto.INT64, [], [g])
        self.graph.initializer.append(const)
        equal = helper.make_node("Equal", [SWITCH, const.name], [cond], name=cond)
        switch = helper.make_node(
            "If", [cond], list(tensors), name=f"{SWITCH}{g}",
            then_branch=then_branch, else_branch=else_branch,
        )  # fmt: skip
        anchor = max(self.producer_index.get(t, -1) for t in tensors) + 0.5
        self.added += [(anchor, equal), (anchor, switch)]

    def _outs(self, tensors: list[str], names: dict[str, str]) -> list[onnx.ValueInfoProto]:
        return [_info(names[t], t, self.elem_types) for t in tensors]

    def finish(self, b: onnx.ModelProto) -> onnx.ModelProto:
        graph = self.graph
        for node in graph.node:
            node.output[:] = [self.renamed_a.get(o, o) for o in node.output]
        nodes = [(float(i), n) for i, n in enumerate(graph.node)] + self.added
        ordered = _topological(nodes, {i.name for i in graph.input} | _init_names(graph))
        del graph.node[:]
        graph.node.extend(ordered)
        _merge_opsets(self.model, b)
        return self.model


def _info(name: str, like: str, elem_types: dict[str, int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_types.get(like, onnx.TensorProto.FLOAT), None)


def _init_names(graph: onnx.GraphProto) -> set[str]:
    return {t.name for t in graph.initializer}


def _slice(
    tensors: list[str],
    producer_b: dict[str, onnx.NodeProto],
    inits_b: dict[str, onnx.TensorProto],
    original: set[str],
    produced_a: set[str],
) -> tuple[list[onnx.NodeProto], set[str]] | None:
    """B's nodes computing `tensors` back to tensors of the float model that A has (read
    from A by name), and the B initializers they use; None if it cannot be cut out."""
    nodes: dict[int, onnx.NodeProto] = {}
    inits: set[str] = set()
    seen: set[str] = set()
    stack = list(tensors)
    while stack:
        name = stack.pop()
        if not name or name in seen:
            continue
        seen.add(name)
        if name not in tensors and name in original and name in produced_a:
            continue
        if name in inits_b:
            inits.add(name)
            continue
        node = producer_b.get(name)
        if node is None:
            if name in produced_a:  # a graph input
                continue
            return None
        if any(attr.type in _SUBGRAPH for attr in node.attribute):
            return None
        nodes[id(node)] = node
        stack.extend(node.input)
    return list(nodes.values()), inits


def _topological(nodes: list[tuple[float, onnx.NodeProto]], given: set[str]) -> list:
    """Nodes in dependency order, each as early as the given keys allow (A's order, with
    the switches beside the nodes whose outputs they take over)."""
    writer = {o: i for i, (_, n) in enumerate(nodes) for o in n.output if o}
    needs: list[set[int]] = []
    for _, node in nodes:
        names = set(node.input) | _outer_reads(node)
        needs.append({writer[t] for t in names if t in writer and t not in given})
    readers: dict[int, list[int]] = {}
    for i, deps in enumerate(needs):
        for d in deps:
            readers.setdefault(d, []).append(i)
    waiting = [len(d) for d in needs]
    ready = [(nodes[i][0], i) for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    out = []
    while ready:
        _, i = heapq.heappop(ready)
        out.append(nodes[i][1])
        for r in readers.get(i, ()):
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, (nodes[r][0], r))
    if len(out) != len(nodes):
        raise ValueError("switch model: the merged graph has a cycle")
    return out


def _outer_reads(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read from the enclosing graph."""
    names: set[str] = set()
    for attr in node.attribute:
        for sub in _subgraphs(attr):
            inner = _produced(sub) | _init_names(sub)
            for n in sub.node:
                names |= {i for i in set(n.input) | _outer_reads(n) if i and i not in inner}
    return names


def _subgraphs(attr: onnx.AttributeProto) -> Iterable[onnx.GraphProto]:
    if attr.type == onnx.AttributeProto.GRAPH:
        yield attr.g
    elif attr.type == onnx.AttributeProto.GRAPHS:
        yield from attr.graphs


def _merge_opsets(merged: onnx.ModelProto, b: onnx.ModelProto) -> None:
    versions = {o.domain: o.version for o in merged.opset_import}
    for o in b.opset_import:
        versions[o.domain] = max(versions.get(o.domain, 0), o.version)
    del merged.opset_import[:]
    merged.opset_import.extend(helper.make_opsetid(d, v) for d, v in sorted(versions.items()))
