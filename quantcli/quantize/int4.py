"""`convert --bits 4`: block-quantized weights for MatMul/Gemm (and embedding tables),
activations stay float.

Two output forms: ONNX Runtime's `com.microsoft.MatMulNBits` (fast kernels), or the
standard opset-21 `DequantizeLinear(int4, block_size) -> MatMul`. Each unit of weights
(`int4_plan.py`) gets one format (`int4_formats.py`): 4-bit blocks by default, or a mix under
a size budget or a preset (`int4_mixed.py`). With data the weights are quantized with GPTQ,
segment by segment on the outputs of the layers already quantized (`int4_calib.py`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from quantcli.data import DataSource
from quantcli.errors import InputError
from quantcli.graph.build import MS_DOMAIN, Namer, add_initializer, const_array
from quantcli.graph.passes import prepare_model
from quantcli.graph.passes.opset import default_opset
from quantcli.quantize.gptq import gptq_factor, gptq_quantize
from quantcli.quantize.int4_calib import (
    Accumulator,
    SegmentRunner,
    plan_segments,
    release_external,
)
from quantcli.quantize.int4_formats import (
    Choice,
    Int8Blocks,
    output_error,
    quantize_int8_blocks,
)
from quantcli.quantize.int4_math import (
    BlockQuantized,
    pack_matmulnbits,
    quantize_rtn,
    to_dequantize_linear_int4,
)
from quantcli.quantize.int4_mixed import (
    MIXES,
    Sizes,
    allocate,
    mix_choices,
    unit_options,
    vocabulary_head,
)
from quantcli.quantize.int4_plan import Int4Candidate, Int4Unit, plan_units

BLOCK_SIZES = (16, 32, 64, 128, 256)
ALGORITHMS = ("auto", "rtn", "gptq")
FORMATS = ("matmulnbits", "qdq")


@dataclass(frozen=True)
class Int4Config:
    block_size: int = 32
    # Asymmetric by default: measured better on SmolLM2 and MiniLM (docs/int4.md).
    symmetric: bool = False
    # auto: GPTQ when calibration data is given, RTN with clip search without.
    algorithm: str = "auto"
    format: str = "matmulnbits"
    # MatMulNBits accuracy_level; None: chosen for this host (int4_host.py).
    accuracy_level: int | None = None
    exclude: tuple[str, ...] = ()
    # Gather tables: None (auto): a table tied to the output head shares the head's
    # quantized data, other tables are quantized too; False: all float; True: all quantized.
    embeddings: bool | None = None
    budget_bpw: float | None = None  # mixed precision: average bits per weight
    max_bytes: int | None = None  # mixed precision: the written file at most this size
    mix: str | None = None  # a named preset (no data needed)
    # GPTQ on the outputs of the layers already quantized (True) or of the float model.
    # Measured on SmolLM2-135M: no better (25.98 against 25.95), one more run per segment.
    sequential: bool = False

    def __post_init__(self) -> None:
        if self.block_size not in BLOCK_SIZES:
            raise InputError(
                f"--block-size {self.block_size} is not supported",
                hint=f"use one of {', '.join(map(str, BLOCK_SIZES))}",
            )
        if self.algorithm not in ALGORITHMS:
            raise InputError(
                f"--algorithm '{self.algorithm}' is not supported",
                hint=f"use {', '.join(ALGORITHMS)}",
            )
        if self.format not in FORMATS:
            raise InputError(
                f"--format '{self.format}' is not an INT4 format",
                hint=f"use {' or '.join(FORMATS)}",
            )
        if self.accuracy_level is not None and not 0 <= self.accuracy_level <= 4:
            raise InputError("--accuracy-level must be 0..4")
        budgets = [b for b in (self.budget_bpw, self.max_bytes, self.mix) if b is not None]
        if len(budgets) > 1:
            raise InputError("--budget and --mix are exclusive", hint="give one of them")
        if self.budget_bpw is not None and not 2.0 < self.budget_bpw <= 32.0:
            raise InputError(
                f"--budget {self.budget_bpw:g} bits per weight is out of range",
                hint="give a value above 4 (all 4-bit) and at most 32 (float)",
            )
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise InputError("--budget must be a positive size")
        if self.mix is not None and self.mix not in MIXES:
            raise InputError(f"--mix '{self.mix}' is not a preset", hint=f"use {', '.join(MIXES)}")


@dataclass
class UnitResult:
    unit: Int4Unit
    choice: Choice
    bytes: int  # stored bytes of the unit's weights in this choice


@dataclass
class Int4Result:
    model: ir.Model
    quantized: list[Int4Candidate]
    float_nodes: list[tuple[str, str, str]] = field(default_factory=list)
    units: list[UnitResult] = field(default_factory=list)
    algorithm: str = "rtn"
    accuracy_level: int = 4
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    budget_bytes: int | None = None

    @property
    def params(self) -> int:
        return sum(u.unit.params for u in self.units)

    @property
    def bits_per_weight(self) -> float:
        params = self.params
        return 8 * sum(u.bytes for u in self.units) / params if params else 0.0


Progress = Callable[[int, int], None]


def quantize_int4(
    model: ir.Model,
    config: Int4Config,
    data: DataSource | None = None,
    batch_size: int = 1,
    progress: Progress | None = None,
) -> Int4Result:
    """Quantize a loaded model in place (the prepared model is returned)."""
    from quantcli.quantize.int4_host import choose_accuracy_level

    algorithm = config.algorithm
    if algorithm == "auto":
        algorithm = "gptq" if data is not None else "rtn"
    if algorithm == "gptq" and data is None:
        raise InputError("--algorithm gptq needs calibration data", hint="pass --data SAMPLES")
    if config.format == "qdq" and default_opset(model) < 21:
        from quantcli.quantize.int4_opset import upgrade_opset_light

        model = upgrade_opset_light(model, 21)
    _lazy_transposes(model)
    model = prepare_model(model)
    units = plan_units(
        model,
        config.exclude,
        embeddings=config.embeddings,
        share_tables=config.format == "matmulnbits",
    )
    if not units:
        raise InputError(
            "no MatMul/Gemm with a constant 2-D float weight to quantize to INT4",
            hint="run quantcli inspect to see the model's ops",
        )
    nodes = {n.name: n for n in model.graph}
    skipped = []
    for unit in units:
        for cand in list(unit.members):
            if cand.op_type == "Gemm" and not _plain_gemm(nodes[cand.node]):
                skipped.append((cand.node, "Gemm", "Gemm with alpha/beta != 1 kept float"))
                unit.members.remove(cand)
    units = [u for u in units if u.members or u.tables]
    for unit in units:  # GatherBlockQuantized reads whole blocks of the shared rows
        if unit.tied and unit.k % config.block_size:
            unit.tied = False
    if config.accuracy_level is not None:
        level, level_note = config.accuracy_level, "as asked"
    elif config.format == "matmulnbits":
        level, level_note = choose_accuracy_level()
    else:  # the standard form has no accuracy level (the runtime's session decides)
        level, level_note = 4, ""
    ctx = _Context(model, config, algorithm, level, Namer(model.graph))
    sizes = Sizes.of(model, config)
    result = Int4Result(model, [], skipped, algorithm=algorithm, accuracy_level=level)
    if config.format == "matmulnbits":
        result.notes.append(f"MatMulNBits accuracy_level {level}: {level_note}")
    fixed = _fixed_bytes(model, units) if config.max_bytes is not None else 0
    choices = _choose(ctx, units, sizes, data, batch_size, progress, fixed, result)
    done: set[int] = set()
    if algorithm == "gptq":
        _gptq_sequential(ctx, units, choices, data, batch_size, progress, done)
    for i, unit in enumerate(units):
        if i not in done:
            _quantize_unit(ctx, unit, choices[i], None)
    for unit, choice in zip(units, choices, strict=True):
        result.units.append(UnitResult(unit, choice, sizes.unit_bytes(unit, choice)))
        if not choice.is_float:
            result.quantized += unit.members + unit.tables
        else:
            result.float_nodes += [
                (c.node, c.op_type, "kept float by the size budget")
                for c in unit.members + unit.tables
            ]
    result.notes += _table_notes(result.units, config)
    RemoveUnusedNodesPass()(model)
    if config.format == "matmulnbits" and MS_DOMAIN not in model.opset_imports:
        model.opset_imports[MS_DOMAIN] = 1
    return result


def _lazy_transposes(model: ir.Model) -> None:
    """`MatMul(x, Transpose(W))` of a constant 2-D W reads a lazy transposed view of W.

    Preparation would fold the Transpose into a contiguous copy (a tied output head is the
    largest matrix of a small LM); MatMulNBits stores the weight as [N, K], W's own layout,
    so the copy is never needed.
    """
    graph = model.graph
    namer = Namer(graph)
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        source = node.inputs[0]
        tensor = source.const_value if source is not None else None
        if tensor is None or len(tensor.shape) != 2 or not tensor.dtype.is_floating_point():
            continue
        if list(node.attributes.get_ints("perm", [1, 0])) != [1, 0]:
            continue
        out = node.outputs[0]
        users = [user for user, _ in out.uses()]
        if out.is_graph_output() or not users or any(u.op_type != "MatMul" for u in users):
            continue

        def transposed(t: ir.TensorProtocol = tensor) -> ir.TensorProtocol:
            return ir.Tensor(np.transpose(t.numpy()), dtype=t.dtype)

        shape = ir.Shape([tensor.shape[1], tensor.shape[0]])
        name = namer(out.name or "transposed")
        lazy = ir.LazyTensor(transposed, tensor.dtype, shape, name=name)
        value = ir.Value(name=name, const_value=lazy, shape=shape, type=ir.TensorType(tensor.dtype))
        graph.register_initializer(value)
        out.replace_all_uses_with(value)
        graph.remove(node, safe=True)


def _fixed_bytes(model: ir.Model, units: list[Int4Unit]) -> int:
    """What the written file holds besides the units' weights: the graph as serialized with
    those weights left out, the other tensors, and the new nodes' headers."""
    weights = {c.weight for u in units for c in u.members + u.tables}
    kept: dict[str, ir.TensorProtocol] = {}
    mapped = 0
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None:
            continue
        if name in weights:
            kept[name] = tensor
            value.const_value = ir.ExternalTensor(
                "x", 0, tensor.nbytes, tensor.dtype, shape=tensor.shape, name=name
            )
        elif isinstance(tensor, ir.ExternalTensor):
            mapped += tensor.nbytes  # written inline, serialized here as a reference
    try:
        size = ir.to_proto(model).ByteSize()
    finally:
        for name, tensor in kept.items():
            model.graph.initializers[name].const_value = tensor
    members = sum(len(u.members) + len(u.tables) for u in units)
    return size + mapped + 400 * members  # a MatMulNBits node and its tensor headers


@dataclass
class _Context:
    model: ir.Model
    config: Int4Config
    algorithm: str
    accuracy_level: int
    namer: Namer

    @property
    def graph(self) -> ir.Graph:
        return self.model.graph

    def node(self, name: str) -> ir.Node:
        for node in self.model.graph:
            if node.name == name:
                return node
        raise KeyError(name)


def _choose(
    ctx: _Context,
    units: list[Int4Unit],
    sizes: Sizes,
    data: DataSource | None,
    batch_size: int,
    progress: Progress | None,
    fixed_bytes: int,
    result: Int4Result,
) -> list[Choice]:
    config = ctx.config
    default = [sizes.default_choice(u) for u in units]
    if config.mix is not None:
        result.notes.append(f"mix {config.mix}: {MIXES[config.mix]}")
        return mix_choices(config.mix, units, sizes)
    if config.budget_bpw is None and config.max_bytes is None:
        return default
    params = sum(u.params for u in units)
    if config.budget_bpw is not None:
        budget = int(config.budget_bpw * params / 8)
        wanted = f"{config.budget_bpw:g} bits per weight"
    else:
        budget = config.max_bytes - fixed_bytes
        wanted = f"at most {config.max_bytes / 1e6:.2f} MB"
    result.budget_bytes = budget
    options = [unit_options(u, sizes) for u in units]
    # What measured best, in order (SmolLM2-135M, GPTQ): every layer at --block-size before
    # anything else (coarse blocks only when the budget needs them), then an 8-bit
    # vocabulary head, then 8-bit where the relative output error says (int4_mixed.py).
    fine = [
        [c for c in opts if c.bits != 4 or c.block_size == config.block_size] for opts in options
    ]
    if _cheapest(units, fine, sizes) <= budget:
        options = fine
    heads = [
        [c for c in opts if c.bits != 4] if vocabulary_head(u) else opts
        for u, opts in zip(units, options, strict=True)
    ]
    if _cheapest(units, heads, sizes) <= budget:
        options = heads
    cheapest = sum(
        min(sizes.unit_bytes(u, c) for c in opts) for u, opts in zip(units, options, strict=True)
    )
    if budget < cheapest:
        floor = 8 * cheapest / params
        raise InputError(
            f"the size budget ({wanted}) is below the smallest mix this model allows "
            f"({floor:.2f} bits per weight, {(cheapest + fixed_bytes) / 1e6:.2f} MB)",
            hint="raise --budget",
        )
    errors = _scores(ctx, units, options, data, batch_size, progress)
    if data is None:
        result.warnings.append(
            "no calibration data: the budget is spent by weight error, not by each layer's "
            "output error (pass --data for a better mix)"
        )
    costs = [
        {c: sizes.unit_bytes(u, c) for c in opts} for u, opts in zip(units, options, strict=True)
    ]
    return allocate(costs, errors, budget)


def _cheapest(units: list[Int4Unit], options: list[list[Choice]], sizes: Sizes) -> int:
    return sum(
        min(sizes.unit_bytes(u, c) for c in opts) for u, opts in zip(units, options, strict=True)
    )


def _scores(
    ctx: _Context,
    units: list[Int4Unit],
    options: list[list[Choice]],
    data: DataSource | None,
    batch_size: int,
    progress: Progress | None,
) -> list[dict[Choice, float]]:
    """Each unit's output error in each of its options (activation-weighted with data)."""
    scores: list[dict[Choice, float] | None] = [None] * len(units)

    def score(i: int, acc: Accumulator | None) -> None:
        unit = units[i]
        hessian = acc.mean_hessian(_inputs(ctx, unit)) if acc and unit.members else None
        counts = _table_counts(ctx, unit, acc)
        scores[i] = _unit_errors(ctx, unit, options[i], hessian, counts)

    if data is None:
        for i in range(len(units)):
            score(i, None)
    else:
        _run_segments(ctx, units, data, batch_size, progress, score, sequential=False)
    release_external(ctx.model)
    return scores  # type: ignore[return-value]


def _inputs(ctx: _Context, unit: Int4Unit) -> list[str]:
    return sorted({ctx.node(c.node).inputs[0].name for c in unit.members})


def _table_counts(ctx: _Context, unit: Int4Unit, acc: Accumulator | None) -> np.ndarray | None:
    if acc is None or not unit.tables:
        return None
    total = None
    for table in unit.tables:
        counts = acc.indices.get(ctx.node(table.node).inputs[1].name)
        if counts is not None:
            total = counts if total is None else total + counts
    return total


def _run_segments(
    ctx: _Context,
    units: list[Int4Unit],
    data: DataSource,
    batch_size: int,
    progress: Progress | None,
    on_unit: Callable[[int, Accumulator], None],
    sequential: bool,
) -> None:
    """Stream calibration data segment by segment; call ``on_unit`` for each unit once its
    inputs' statistics are complete (and, when sequential, before the next segment runs)."""
    model = ctx.model
    per_input: dict[str, list[int]] = {}
    consumers: dict[str, list[str]] = {}
    k_of: dict[str, int] = {}
    for i, unit in enumerate(units):
        for cand in unit.members:
            name = ctx.node(cand.node).inputs[0].name
            per_input.setdefault(name, []).append(i)
            consumers.setdefault(name, []).append(cand.node)
            k_of[name] = cand.shape[0]
    index_of: dict[str, int] = {}
    for unit in units:
        for table in unit.tables:
            index_of[ctx.node(table.node).inputs[1].name] = table.shape[1]
    segments = plan_segments(model, [(h, k_of[h], consumers[h]) for h in per_input], list(index_of))
    needed = [{ctx.node(c.node).inputs[0].name for c in u.members} for u in units]
    runner = SegmentRunner(model, data, batch_size, None)
    acc = Accumulator()
    finished: set[int] = set()
    pending = {i for i in range(len(units))}
    for j, seg in enumerate(segments):

        def update(values: dict[str, np.ndarray], seg=seg) -> None:
            for name in seg.inputs:
                acc.add(name, values[name])
            for name in seg.indices:
                acc.add_indices(name, values[name], index_of[name])

        keep = None if sequential else seg.frontier
        runner.run([*seg.inputs, *seg.indices], update, keep=keep)
        complete = set(acc.hessians)
        for i in sorted(pending):
            needs = needed[i]
            if needs and needs <= complete:
                on_unit(i, acc)
                finished.add(i)
        pending -= finished
        still = set().union(*(needed[i] for i in pending)) if pending else set()
        acc.drop([h for h in list(acc.hessians) if h not in still])
        release_external(model)
        if sequential:
            runner.run([], lambda values: None, keep=seg.frontier)
        if progress:
            progress(j + 1, len(segments))
    for i in sorted(pending):  # tables without a MatMul (untied embeddings)
        on_unit(i, acc)


def _gptq_sequential(
    ctx: _Context,
    units: list[Int4Unit],
    choices: list[Choice],
    data: DataSource,
    batch_size: int,
    progress: Progress | None,
    done: set[int],
) -> None:
    def quantize(i: int, acc: Accumulator) -> None:
        unit = units[i]
        hessian = acc.mean_hessian(_inputs(ctx, unit)) if unit.members else None
        _quantize_unit(ctx, unit, choices[i], hessian)
        done.add(i)

    _run_segments(
        ctx, units, data, batch_size, progress, quantize, sequential=ctx.config.sequential
    )


# ------------------------------------------------------------------ quantizing one unit


def _weight(ctx: _Context, cand: Int4Candidate) -> tuple[ir.Value, np.ndarray]:
    """The stored weight value and its float32 [K, N] array."""
    node = ctx.node(cand.node)
    value = node.inputs[0] if cand.op_type == "Gather" else node.inputs[1]
    w = const_array(value).astype(np.float32, copy=False)
    return value, (w.T if cand.transposed else w)


def _unit_errors(
    ctx: _Context,
    unit: Int4Unit,
    choices: list[Choice],
    hessian: np.ndarray | None,
    counts: np.ndarray | None,
) -> dict[Choice, float]:
    """Relative output error of each choice: the error it adds to the unit's MatMul outputs
    over their energy (E|x dW|^2 / E|x W|^2), plus the same for its table lookups.

    Relative, not absolute: the residual stream grows along the depth of a network, so
    absolute errors of late layers dwarf early ones without mattering more. Measured on
    SmolLM2-135M, the sum of relative errors ranked five mixes exactly as their perplexity
    did; the sum of absolute errors did not.
    """
    out = {c: 0.0 for c in choices}
    parts = [(c, False) for c in unit.weights()]
    if unit.tied:
        parts += [(t, True) for t in unit.tables]  # the lookup reads the same data
    sums: dict[bool, tuple[float, dict[Choice, float]]] = {}
    for cand, lookup in parts:
        lookup = lookup or cand.op_type == "Gather"
        _, w = _weight(ctx, cand)
        energy, errors = sums.get(lookup, (0.0, {c: 0.0 for c in choices}))
        for lo in range(0, w.shape[1], COLUMN_CHUNK):
            part = np.ascontiguousarray(w[:, lo : lo + COLUMN_CHUNK])
            rows = None if counts is None else counts[lo : lo + part.shape[1]]
            zero = np.zeros_like(part)
            measure = (
                partial(_table_error, counts=rows)
                if lookup
                else partial(output_error, hessian=hessian)
            )
            energy += measure(part, zero)
            for c in choices:
                if not c.is_float:
                    errors[c] += measure(part, _dequantized(part, c, ctx.config.symmetric))
        sums[lookup] = (energy, errors)
    for energy, errors in sums.values():
        for c in choices:
            out[c] += errors[c] / energy if energy > 0 else 0.0
    return out


def _table_error(w: np.ndarray, deq: np.ndarray, counts: np.ndarray | None = None) -> float:
    """Mean squared error of looked-up rows, weighted by how often each token occurs."""
    per_row = np.square(w - deq).astype(np.float64).sum(axis=0)
    if counts is None or counts.sum() == 0:
        return float(per_row.mean()) if per_row.size else 0.0
    return float((per_row * counts).sum() / max(1, counts.sum()))


def _dequantized(w: np.ndarray, choice: Choice, symmetric: bool) -> np.ndarray:
    if choice.bits == 8:
        return quantize_int8_blocks(w, choice.block_size).dequantize()
    return quantize_rtn(w, choice.block_size, symmetric).dequantize()


def _quantize_unit(
    ctx: _Context, unit: Int4Unit, choice: Choice, hessian: np.ndarray | None
) -> None:
    if choice.is_float:
        _restore_tied_float(ctx, unit)
        return
    config = ctx.config
    tables = [ctx.node(t.node).inputs[0] for t in unit.tables] if unit.tied else []
    factors: dict[int, object] = {}
    for cand in unit.weights():
        value, w = _weight(ctx, cand)
        if cand.op_type == "Gather":
            q = _quantize_array(w, choice, config, None)
            _rewrite_gather(ctx, ctx.node(cand.node), q, config)
        else:
            h = hessian if ctx.algorithm == "gptq" else None
            q = _quantize_array(w, choice, config, h, factors)
            readers = [
                m
                for m in unit.members
                if (m.weight, m.transposed) == (cand.weight, cand.transposed)
            ]
            shared = _rewrite_matmuls(ctx, [ctx.node(m.node) for m in readers], q, value)
            if unit.tied:
                for table in unit.tables:
                    _rewrite_tied_gather(ctx, ctx.node(table.node), q, shared)
        del w
        _release(value)
    for table in tables:  # no longer read: the lookup reads the head's quantized data
        _release(table)


def _restore_tied_float(ctx: _Context, unit: Int4Unit) -> None:
    """A float head tied to a table: read Transpose(table) again rather than store both."""
    if not unit.tables:
        return
    table = ctx.node(unit.tables[0].node).inputs[0]
    for cand in unit.members:
        node = ctx.node(cand.node)
        if cand.op_type != "MatMul" or node.inputs[1] is table:
            continue
        t = ir.Node(
            "",
            "Transpose",
            [table],
            [ir.AttrInt64s("perm", [1, 0])],
            name=ctx.namer(f"{cand.node}_tied_transpose"),
        )
        t.outputs[0].name = ctx.namer(f"{table.name}_transposed")
        ctx.graph.insert_before(node, t)
        node.replace_input_with(1, t.outputs[0])


def _quantize_array(
    w: np.ndarray,
    choice: Choice,
    config: Int4Config,
    hessian: np.ndarray | None,
    factors: dict[int, object] | None = None,
) -> BlockQuantized | Int8Blocks:
    if choice.bits == 8:
        return _by_columns(w, partial(quantize_int8_blocks, block_size=choice.block_size))
    opts = {"block_size": choice.block_size, "symmetric": config.symmetric}
    if hessian is not None:
        factors = {} if factors is None else factors  # siblings share one factor
        if choice.block_size not in factors:
            factors[choice.block_size] = gptq_factor(hessian, choice.block_size, act_order=True)
        factor = factors[choice.block_size]
        return _by_columns(w, partial(gptq_quantize, hessian=None, factor=factor, **opts))
    return _by_columns(w, partial(quantize_rtn, **opts))


# Columns quantize independently (blocks run along K), so large weights go in slices of
# this many columns: the float64 temporaries of the range search stay small.
COLUMN_CHUNK = 2048


def _by_columns(w: np.ndarray, quantize: Callable[[np.ndarray], object]) -> object:
    if w.shape[1] <= COLUMN_CHUNK:
        return quantize(np.ascontiguousarray(w))
    parts = [
        quantize(np.ascontiguousarray(w[:, i : i + COLUMN_CHUNK]))
        for i in range(0, w.shape[1], COLUMN_CHUNK)
    ]
    first = parts[0]
    if isinstance(first, Int8Blocks):
        return Int8Blocks(
            q=np.concatenate([p.q for p in parts], axis=1),
            scales=np.concatenate([p.scales for p in parts], axis=1),
            block_size=first.block_size,
            k=first.k,
        )
    zeros = (
        None
        if first.zero_points is None
        else np.concatenate([p.zero_points for p in parts], axis=1)
    )
    return BlockQuantized(
        q=np.concatenate([p.q for p in parts], axis=1),
        scales=np.concatenate([p.scales for p in parts], axis=1),
        zero_points=zeros,
        block_size=first.block_size,
        k=first.k,
        symmetric=first.symmetric,
    )


def _release(value: ir.Value) -> None:
    """Unmap an external weight nobody reads any more, so its pages leave our RSS."""
    tensor = value.const_value
    if isinstance(tensor, ir.ExternalTensor):
        with contextlib.suppress(BufferError):  # a view of it is still alive: kept mapped
            tensor.release()


def _plain_gemm(node: ir.Node) -> bool:
    return (
        node.attributes.get_float("alpha", 1.0) == 1.0
        and node.attributes.get_float("beta", 1.0) == 1.0
    )


# ------------------------------------------------------------------ graph rewriting


def _float_dtype(value: ir.Value) -> np.dtype:
    """The float type the node computes in (scales must match it)."""
    return value.const_value.dtype.numpy()


def _nbits_inputs(
    ctx: _Context, base: str, q: BlockQuantized | Int8Blocks, dtype: np.dtype
) -> list[ir.Value | None]:
    graph, namer = ctx.graph, ctx.namer
    if isinstance(q, Int8Blocks):
        n = q.q.shape[1]
        b = (q.q.astype(np.int16) + 128).astype(np.uint8).T.reshape(n, -1, q.block_size)
        return [
            add_initializer(graph, namer(f"{base}.B_int8"), np.ascontiguousarray(b)),
            add_initializer(graph, namer(f"{base}.scales"), q.scales.T.astype(dtype)),
        ]
    b, scales, zeros = pack_matmulnbits(q)
    inputs = [
        add_initializer(graph, namer(f"{base}.B_int4"), b),
        add_initializer(graph, namer(f"{base}.scales"), scales.astype(dtype)),
    ]
    if zeros is not None:
        inputs.append(add_initializer(graph, namer(f"{base}.zero_points"), zeros))
    return inputs


def _dq_inputs(
    ctx: _Context, base: str, q: BlockQuantized | Int8Blocks, dtype: np.dtype
) -> list[ir.Value]:
    graph, namer = ctx.graph, ctx.namer
    if isinstance(q, Int8Blocks):
        return [
            add_initializer(graph, namer(f"{base}.weight_int8"), q.q[: q.k]),
            add_initializer(graph, namer(f"{base}.weight_scale"), q.scales.astype(dtype)),
        ]
    x, scale, zero = to_dequantize_linear_int4(q)
    inputs = [
        add_initializer(graph, namer(f"{base}.weight_int4"), x),
        add_initializer(graph, namer(f"{base}.weight_scale"), scale.astype(dtype)),
    ]
    if zero is not None:
        inputs.append(add_initializer(graph, namer(f"{base}.weight_zero_point"), zero))
    return inputs


def _rewrite_matmuls(
    ctx: _Context,
    nodes: list[ir.Node],
    q: BlockQuantized | Int8Blocks,
    weight: ir.Value,
) -> list[ir.Value]:
    """Replace every node reading one weight; the quantized tensors are stored once."""
    config = ctx.config
    dtype = _float_dtype(weight)
    base = nodes[0].name or "matmul"
    bits = 8 if isinstance(q, Int8Blocks) else 4
    k, n = q.k, q.q.shape[1]
    if config.format == "matmulnbits":
        shared = _nbits_inputs(ctx, base, q, dtype)
    else:
        shared = _dq_inputs(ctx, base, q, dtype)
        dq = ir.Node(
            "",
            "DequantizeLinear",
            shared,
            [ir.AttrInt64("axis", 0), ir.AttrInt64("block_size", q.block_size)],
            name=ctx.namer(f"{base}_DequantizeLinear"),
        )
        dq.outputs[0].name = ctx.namer(f"{base}.weight_dequantized")
        ctx.graph.insert_before(nodes[0], dq)
    for node in nodes:
        name = node.name or "matmul"
        bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
        x, out = node.inputs[0], node.outputs[0]
        if config.format == "matmulnbits":
            attrs = [
                ir.AttrInt64("K", k),
                ir.AttrInt64("N", n),
                ir.AttrInt64("bits", bits),
                ir.AttrInt64("block_size", q.block_size),
                ir.AttrInt64("accuracy_level", ctx.accuracy_level),
            ]
            new = [
                ir.Node(
                    MS_DOMAIN,
                    "MatMulNBits",
                    [x, *shared],
                    attrs,
                    name=ctx.namer(f"{name}_MatMulNBits"),
                )
            ]
        else:
            new = [ir.Node("", "MatMul", [x, dq.outputs[0]], name=ctx.namer(f"{name}_MatMul"))]
        if bias is not None:  # Gemm's C, added in float after the product
            new.append(
                ir.Node("", "Add", [new[-1].outputs[0], bias], name=ctx.namer(f"{name}_bias"))
            )
        result = new[-1].outputs[0]
        result.name, result.dtype, result.shape = out.name, out.dtype, out.shape
        ctx.graph.insert_before(node, new)
        out.replace_all_uses_with(result, replace_graph_outputs=True)
        ctx.graph.remove(node, safe=True)
    return shared


def _rewrite_tied_gather(
    ctx: _Context, node: ir.Node, q: BlockQuantized | Int8Blocks, shared: list[ir.Value]
) -> None:
    """Gather(table) -> GatherBlockQuantized(Reshape(B of the head's MatMulNBits), ...)."""
    bits = 8 if isinstance(q, Int8Blocks) else 4
    v, d = q.q.shape[1], q.k
    base = node.name or "gather"
    shape = add_initializer(
        ctx.graph, ctx.namer(f"{base}.table_shape"), np.array([v, d * bits // 8], np.int64)
    )
    reshape = ir.Node("", "Reshape", [shared[0], shape], name=ctx.namer(f"{base}_shared_table"))
    reshape.outputs[0].name = ctx.namer(f"{base}.shared_table")
    attrs = [
        ir.AttrInt64("gather_axis", 0),
        ir.AttrInt64("quantize_axis", 1),
        ir.AttrInt64("block_size", q.block_size),
        ir.AttrInt64("bits", bits),
    ]
    gbq = ir.Node(
        MS_DOMAIN,
        "GatherBlockQuantized",
        [reshape.outputs[0], node.inputs[1], *shared[1:]],
        attrs,
        name=ctx.namer(f"{base}_GatherBlockQuantized"),
    )
    _replace(ctx.graph, node, [reshape, gbq])


def _rewrite_gather(
    ctx: _Context, node: ir.Node, q: BlockQuantized | Int8Blocks, config: Int4Config
) -> None:
    """Gather(table) -> GatherBlockQuantized, or DequantizeLinear(axis=1) -> Gather."""
    graph, namer = ctx.graph, ctx.namer
    base = node.name or "gather"
    dtype = _float_dtype(node.inputs[0])
    bits = 8 if isinstance(q, Int8Blocks) else 4
    if isinstance(q, Int8Blocks):  # [D, V] layout: transpose to [V, D]
        table = q.q[: q.k].T
        if config.format == "matmulnbits":
            table = (table.astype(np.int16) + 128).astype(np.uint8)
        scale, zero = q.scales.T, None
    else:
        table, scale, zero = (a.T if a is not None else None for a in to_dequantize_linear_int4(q))
    inputs = [
        add_initializer(graph, namer(f"{base}.table_int{bits}"), np.ascontiguousarray(table)),
        node.inputs[1],
        add_initializer(
            graph, namer(f"{base}.table_scale"), np.ascontiguousarray(scale.astype(dtype))
        ),
    ]
    if zero is not None:
        inputs.append(
            add_initializer(graph, namer(f"{base}.table_zero_point"), np.ascontiguousarray(zero))
        )
    if config.format == "matmulnbits":
        attrs = [
            ir.AttrInt64("gather_axis", 0),
            ir.AttrInt64("quantize_axis", 1),
            ir.AttrInt64("block_size", q.block_size),
            ir.AttrInt64("bits", bits),
        ]
        new = [
            ir.Node(
                MS_DOMAIN,
                "GatherBlockQuantized",
                inputs,
                attrs,
                name=namer(f"{base}_GatherBlockQuantized"),
            )
        ]
    else:
        dq = ir.Node(
            "",
            "DequantizeLinear",
            [inputs[0], *inputs[2:]],
            [ir.AttrInt64("axis", 1), ir.AttrInt64("block_size", q.block_size)],
            name=namer(f"{base}_DequantizeLinear"),
        )
        dq.outputs[0].name = namer(f"{base}.table_dequantized")
        new = [dq, ir.Node("", "Gather", [dq.outputs[0], inputs[1]], name=namer(f"{base}_Gather"))]
    _replace(graph, node, new)


def _replace(graph: ir.Graph, node: ir.Node, new: list[ir.Node]) -> None:
    out = node.outputs[0]
    result = new[-1].outputs[0]
    result.name, result.dtype, result.shape = out.name, out.dtype, out.shape
    graph.insert_before(node, new)
    out.replace_all_uses_with(result, replace_graph_outputs=True)
    graph.remove(node, safe=True)


def _table_notes(units: list[UnitResult], config: Int4Config) -> list[str]:
    notes = []
    for r in units:
        if not r.unit.tables:
            continue
        names = ", ".join(t.node for t in r.unit.tables)
        if r.choice.is_float:
            notes.append(f"embedding {names}: float")
        elif r.unit.tied:
            notes.append(
                f"embedding {names}: tied to the output head {r.unit.name}; the lookup reads "
                f"the head's {r.choice.name} weights (stored once)"
            )
        else:
            notes.append(f"embedding {names}: {r.choice.name}")
    return notes
