"""Run a model one segment at a time: the pieces INT4's GPTQ and large-model calibration share.

A segment is a sub-model computing some tensors from others; its large weights reach ONNX
Runtime as external OrtValues over our (memory-mapped) arrays, so only one segment's
weights are resident at a time. The tensors that cross a cut are kept for every batch,
in memory up to `SPILL_ABOVE` bytes and in a temporary folder beyond, so memory stays
bounded however many samples there are.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from quantcli.data import DataSource

_INLINE_LIMIT = 1 << 20  # larger float initializers go to ORT as external OrtValues
_PLACEHOLDER = "quantcli-external-placeholder"
SPILL_ABOVE = 256 << 20  # bytes of cached batches held in memory before spilling to disk


def values_by_name(model: ir.Model) -> dict[str, ir.Value]:
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


def crossing_counts(model: ir.Model, nodes: list[ir.Node], pos: dict[str, int]) -> list[int]:
    """How many computed values cross a cut placed before node p, for every p."""
    diff = np.zeros(len(nodes) + 2, dtype=np.int64)
    for value in values_by_name(model).values():
        span = _span(value, pos)
        if span and span[0] <= span[1]:
            diff[span[0]] += 1
            diff[span[1] + 1] -= 1
    return list(np.cumsum(diff)[: len(nodes) + 1])


def frontier(model: ir.Model, nodes: list[ir.Node], pos: dict[str, int], cut: int) -> list[str]:
    out = []
    for name, value in values_by_name(model).items():
        span = _span(value, pos)
        if span and span[0] <= cut <= span[1]:
            out.append(name)
    return sorted(out)


def _closure(model: ir.Model, outputs: list[str], stop: set[str]) -> list[ir.Node]:
    """Nodes needed to compute ``outputs`` from the values named in ``stop``, in graph order."""
    values = values_by_name(model)
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


def sub_model(
    model: ir.Model, inputs: dict[str, np.ndarray], outputs: list[str]
) -> tuple[bytes, list[str], list[np.ndarray], list[str]]:
    """A model computing ``outputs`` from ``inputs`` (example arrays give the input types):
    serialized bytes, external initializers (names, arrays), and the inputs it reads."""
    nodes = _closure(model, outputs, set(inputs))
    values = values_by_name(model)
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


class BatchStore:
    """Cached batches (name -> array), in memory up to ``limit`` bytes, then as .npy files in
    a temporary folder (removed with the store)."""

    def __init__(self, limit: int = SPILL_ABOVE) -> None:
        self.limit, self.held = limit, 0
        self._slots: list[dict[str, np.ndarray] | Path] = []
        self._sizes: list[int] = []
        self._tmp: tempfile.TemporaryDirectory | None = None

    def __len__(self) -> int:
        return len(self._slots)

    def append(self, batch: dict[str, np.ndarray]) -> None:
        self._slots.append({})
        self._sizes.append(0)
        self[len(self._slots) - 1] = batch

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        slot = self._slots[i]
        if isinstance(slot, dict):
            return slot
        names = (slot / "names.txt").read_text(encoding="utf-8").split("\n")
        return {n: np.load(slot / f"{j}.npy") for j, n in enumerate(names)}

    def __setitem__(self, i: int, batch: dict[str, np.ndarray]) -> None:
        self.held -= self._sizes[i]
        size = sum(int(np.asarray(a).nbytes) for a in batch.values())
        if self.held + size <= self.limit:
            self._slots[i], self._sizes[i] = dict(batch), size
            self.held += size
            return
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="quantcli-batches-")
        folder = Path(self._tmp.name) / str(i)
        folder.mkdir(exist_ok=True)
        for j, array in enumerate(batch.values()):
            np.save(folder / f"{j}.npy", np.asarray(array), allow_pickle=False)
        (folder / "names.txt").write_text("\n".join(batch), encoding="utf-8")
        self._slots[i], self._sizes[i] = folder, 0

    @property
    def spilled(self) -> bool:
        return any(isinstance(s, Path) for s in self._slots)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


class SegmentRunner:
    """Runs segments of a prepared model over calibration data kept as crossing tensors."""

    def __init__(
        self, model: ir.Model, data: DataSource, batch_size: int, spill_above: int = SPILL_ABOVE
    ) -> None:
        self.model = model
        self.cache = BatchStore(spill_above)
        self.indices: list[range] = []  # the samples of each cached batch
        for batch in data.batches(batch_size):
            self.cache.append(dict(batch.feeds))
            self.indices.append(batch.indices)

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
            data, names, arrays, read = sub_model(self.model, self.cache[0], computed)
            opts = session_options()
            if names:
                opts.add_external_initializers(
                    names, [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
                )
            session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
            del data, arrays
        for i in range(len(self.cache)):
            batch = self.cache[i]
            values = {n: batch[n] for n in wanted if n in batch}
            if session is not None:
                got = session.run(computed, {n: batch[n] for n in read})
                values.update(zip(computed, got, strict=True))
            on_batch(values)
            if keep is not None:
                self.cache[i] = {n: values[n] if n in values else batch[n] for n in keep}
        del session

    def close(self) -> None:
        self.cache.close()


def has_subgraphs(model: ir.Model) -> bool:
    return any(
        attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
        for node in model.graph
        for attr in node.attributes.values()
    )


def weight_segments(model: ir.Model, budget: int) -> list[tuple[int, int]]:
    """Node ranges [start, end) in graph order, each reading about ``budget`` bytes of large
    weights at most (a node reading more is a segment alone); every cut is placed, within
    the second half of its segment, where fewest computed tensors cross it. One segment
    when the graph has control flow or nodes without unique names."""
    nodes = list(model.graph)
    pos = {n.name: i for i, n in enumerate(nodes)}
    if has_subgraphs(model) or len(pos) != len(nodes):
        return [(0, len(nodes))]
    crossing = crossing_counts(model, nodes, pos)
    ranges, start = [], 0
    while start < len(nodes):
        end, used, seen = start, 0, set()
        while end < len(nodes):
            fresh = [
                v
                for v in nodes[end].inputs
                if v is not None and v.const_value is not None and id(v) not in seen
            ]
            cost = sum(v.const_value.nbytes for v in fresh)
            if end > start and used + cost > budget:
                break
            used += cost
            seen.update(id(v) for v in fresh)
            end += 1
        if end < len(nodes):
            lo = start + max(1, (end - start) // 2)
            end = min(range(lo, end + 1), key=lambda p: (crossing[p], -p))
        ranges.append((start, end))
        start = end
    return ranges


def producer_positions(model: ir.Model) -> dict[str, int]:
    """Graph position of each computed tensor's producer; -1 for graph inputs."""
    out = {v.name: -1 for v in model.graph.inputs}
    for i, node in enumerate(model.graph):
        out.update((v.name, i) for v in node.outputs)
    return out
