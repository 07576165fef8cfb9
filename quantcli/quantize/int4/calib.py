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
tensors are a few activations per sample. A model with control flow (If/Loop bodies read
outer values) runs as a single segment.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from quantcli.data import DataSource

HESSIAN_BUDGET = 48 << 20  # bytes of float64 x^T x accumulated per segment
_INLINE_LIMIT = 1 << 20  # larger float initializers go to ORT as external OrtValues
_PLACEHOLDER = "quantcli-external-placeholder"

Progress = Callable[[int, int], None]


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
    has_subgraphs = any(
        attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
        for node in nodes
        for attr in node.attributes.values()
    )
    if has_subgraphs or not hessian_inputs:
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
    crossing = _crossing_counts(model, nodes, pos)
    cuts = []
    for a, b in itertools.pairwise(merged):
        lo, hi = max(last[h] for h in a) + 1, min(first[h] for h in b)
        best = min(range(lo, hi + 1), key=lambda p: (crossing[p], -p))
        cuts.append(best)
    index_pos = _index_positions(model, indices, pos)
    segments = []
    bounds = [0, *cuts, len(nodes)]
    for i, group in enumerate(merged):
        start, end = bounds[i], bounds[i + 1]
        seg_indices = [
            t for t in indices if start <= index_pos[t] < end or (i == 0 and index_pos[t] < 0)
        ]
        frontier = _frontier(model, nodes, pos, end) if i + 1 < len(merged) else []
        segments.append(Segment(group, seg_indices, frontier))
    return segments


def _index_positions(model: ir.Model, indices: list[str], pos: dict[str, int]) -> dict[str, int]:
    values = _values(model)
    out = {}
    for name in indices:
        producer = values[name].producer()
        out[name] = -1 if producer is None else pos[producer.name]
    return out


def _values(model: ir.Model) -> dict[str, ir.Value]:
    values = {v.name: v for v in model.graph.inputs}
    for node in model.graph:
        values.update((v.name, v) for v in node.outputs)
    return values


def _span(value: ir.Value, pos: dict[str, int]) -> tuple[int, int] | None:
    """(position after the producer, last consumer) of a computed value, or None."""
    if value.const_value is not None or value.is_initializer():
        return None
    producer = value.producer()
    start = 0 if producer is None else pos[producer.name] + 1
    users = [pos[u.name] for u, _ in value.uses() if u.name in pos]
    if not users:
        return None
    return start, max(users)


def _crossing_counts(model: ir.Model, nodes: list[ir.Node], pos: dict[str, int]) -> list[int]:
    """How many computed values cross a cut placed before node p, for every p."""
    diff = np.zeros(len(nodes) + 2, dtype=np.int64)
    for value in _values(model).values():
        span = _span(value, pos)
        if span and span[0] <= span[1]:
            diff[span[0]] += 1
            diff[span[1] + 1] -= 1
    return list(np.cumsum(diff)[: len(nodes) + 1])


def _frontier(model: ir.Model, nodes: list[ir.Node], pos: dict[str, int], cut: int) -> list[str]:
    out = []
    for name, value in _values(model).items():
        span = _span(value, pos)
        if span and span[0] <= cut <= span[1]:
            out.append(name)
    return sorted(out)


def _closure(model: ir.Model, outputs: list[str], stop: set[str]) -> list[ir.Node]:
    """Nodes needed to compute ``outputs`` from the values named in ``stop``, in graph order."""
    values = _values(model)
    needed: set[int] = set()
    stack = [values[n] for n in outputs if n not in stop]
    while stack:
        value = stack.pop()
        node = value.producer()
        if node is None or id(node) in needed:
            continue
        needed.add(id(node))
        for inp in node.inputs:
            if inp is not None and inp.name not in stop and inp.producer() is not None:
                stack.append(inp)
        for attr in node.attributes.values():  # control flow: outer values the bodies read
            if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                for inner in _outer_reads(attr):
                    if inner.name not in stop and inner.producer() is not None:
                        stack.append(inner)
    return [n for n in model.graph if id(n) in needed]


def _outer_reads(attr: ir.Attr) -> list[ir.Value]:
    graphs = attr.value if attr.type == ir.AttributeType.GRAPHS else [attr.value]
    found = []
    for graph in graphs:
        inside = {id(v) for v in graph.inputs} | {id(v) for v in graph.initializers.values()}
        for node in ir.traversal.RecursiveGraphIterator(graph):
            inside.update(id(v) for v in node.outputs)
        for node in ir.traversal.RecursiveGraphIterator(graph):
            found += [v for v in node.inputs if v is not None and id(v) not in inside]
    return found


def _elem_type(value: ir.Value) -> int:
    return value.dtype.value if value.dtype is not None else onnx.TensorProto.FLOAT


def _sub_model(
    model: ir.Model, inputs: dict[str, np.ndarray], outputs: list[str]
) -> tuple[bytes, list[str], list[np.ndarray], list[str]]:
    """A model computing ``outputs`` from ``inputs`` (example arrays give the input types):
    serialized bytes, external initializers (names, arrays), and the inputs it reads."""
    nodes = _closure(model, outputs, set(inputs))
    values = _values(model)
    read: list[str] = []
    inits, ext_names, ext_arrays = [], [], []
    seen: set[str] = set()
    for node in nodes:
        for value in node.inputs:
            if value is None or value.name in seen:
                continue
            seen.add(value.name)
            if value.name in inputs:
                read.append(value.name)
            elif value.const_value is not None and value.producer() is None:
                inits.append(_initializer(value, ext_names, ext_arrays))
    for name in outputs:  # an output that is itself an input comes straight from the cache
        if name in inputs and name not in read:
            read.append(name)
    graph = onnx.helper.make_graph(
        [ir.serde.serialize_node(n) for n in nodes],
        "segment",
        [
            onnx.helper.make_tensor_value_info(
                name,
                ir.DataType.from_numpy(inputs[name].dtype).value,
                [f"d{i}" for i in range(inputs[name].ndim)],
            )
            for name in read
        ],
        [
            onnx.helper.make_tensor_value_info(name, _elem_type(values[name]), None)
            for name in outputs
            if name not in inputs
        ],
        inits,
    )
    proto = onnx.helper.make_model(
        graph,
        opset_imports=[
            onnx.helper.make_opsetid(domain, version)
            for domain, version in model.opset_imports.items()
        ],
        ir_version=model.ir_version,
    )
    return proto.SerializeToString(), ext_names, ext_arrays, read


def _initializer(
    value: ir.Value, ext_names: list[str], ext_arrays: list[np.ndarray]
) -> onnx.TensorProto:
    tensor = value.const_value
    plain = tensor.dtype.is_floating_point() and tensor.dtype.bitwidth >= 16
    if plain and tensor.nbytes > _INLINE_LIMIT:
        proto = onnx.TensorProto(name=value.name, data_type=tensor.dtype.value)
        proto.dims.extend(int(d) for d in tensor.shape)
        proto.data_location = onnx.TensorProto.EXTERNAL
        entry = proto.external_data.add()
        entry.key, entry.value = "location", _PLACEHOLDER
        ext_names.append(value.name)
        ext_arrays.append(np.ascontiguousarray(tensor.numpy()))
        return proto
    if isinstance(tensor, ir.ExternalTensor):  # inline the bytes, not the file reference
        tensor = ir.Tensor(tensor.numpy(), dtype=tensor.dtype)
    proto = ir.serde.serialize_tensor(tensor)
    proto.name = value.name
    return proto


class SegmentRunner:
    """Runs segments of a prepared model over calibration data kept as crossing tensors."""

    def __init__(
        self, model: ir.Model, data: DataSource, batch_size: int, progress: Progress | None
    ) -> None:
        self.model, self.progress = model, progress
        self.cache = [dict(batch.feeds) for batch in data.batches(batch_size)]
        self.samples = data.num_samples
        self.done = 0

    def run(
        self,
        outputs: list[str],
        on_batch: Callable[[dict[str, np.ndarray]], None],
        keep: list[str] | None = None,
    ) -> None:
        """Run the segment computing ``outputs`` (+ ``keep``) on every cached batch; values of
        ``keep`` replace the cache (tensors crossing the next cut)."""
        import onnxruntime as ort

        from quantcli.runtime import session_options

        wanted = list(dict.fromkeys([*outputs, *(keep or [])]))
        if not wanted:
            return
        computed = [n for n in wanted if n not in self.cache[0]]
        session, read = None, []
        if computed:
            data, names, arrays, read = _sub_model(self.model, self.cache[0], computed)
            opts = session_options()
            if names:
                opts.add_external_initializers(
                    names, [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
                )
            session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
            del data, arrays
        for i, batch in enumerate(self.cache):
            values = {n: batch[n] for n in wanted if n in batch}
            if session is not None:
                got = session.run(computed, {n: batch[n] for n in read})
                values.update(zip(computed, got, strict=True))
            on_batch(values)
            if keep is not None:
                self.cache[i] = {n: values[n] if n in values else batch[n] for n in keep}
        del session


def release_external(model: ir.Model) -> None:
    """Unmap every memory-mapped initializer (mapped again on next use): pages a segment
    touched leave our resident memory."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            with contextlib.suppress(BufferError):  # a view of it is still alive
                tensor.release()
