"""`convert --bits 4`: block-quantized weights for MatMul/Gemm (and embedding tables),
activations stay float.

Two output forms: ONNX Runtime's `com.microsoft.MatMulNBits` (fast kernels), or the
standard opset-21 `DequantizeLinear(int4, block_size) -> MatMul`. Each unit of weights
(`plan.py`) gets one format (`formats.py`): 4-bit blocks by default, or a mix under
a size budget or a preset (`mixed.py`). With data the weights are quantized with GPTQ,
segment by segment on the outputs of the layers already quantized (`calib.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from quantcli.calibrate.segments import SegmentRunner
from quantcli.data import DataSource
from quantcli.errors import InputError
from quantcli.graph.build import MS_DOMAIN, Namer
from quantcli.graph.mapped import release_external
from quantcli.graph.passes import prepare_model
from quantcli.graph.passes.opset import default_opset
from quantcli.quantize.int4.calib import Accumulator, plan_segments
from quantcli.quantize.int4.config import Int4Config, Int4Result, UnitResult
from quantcli.quantize.int4.formats import (
    COMPACT_MIN_SCALES,
    Choice,
    output_error,
    quantize_int8_blocks,
)
from quantcli.quantize.int4.mixed import (
    MIXES,
    Sizes,
    allocate,
    mix_choices,
    unit_options,
    vocabulary_head,
)
from quantcli.quantize.int4.plan import Int4Unit, plan_units
from quantcli.quantize.int4.rewrite import (
    COLUMN_CHUNK,
    Context,
    quantize_unit,
    unit_weight,
)
from quantcli.quantize.math.int4 import (
    quantize_rtn,
)

Progress = Callable[[int, int], None]


def quantize_int4(
    model: ir.Model,
    config: Int4Config,
    data: DataSource | None = None,
    batch_size: int = 1,
    progress: Progress | None = None,
) -> Int4Result:
    """Quantize a loaded model in place (the prepared model is returned)."""
    from quantcli.quantize.int4.host import choose_accuracy_level

    algorithm = config.algorithm
    if algorithm == "auto":
        algorithm = "gptq" if data is not None else "rtn"
    if algorithm == "gptq" and data is None:
        raise InputError("--algorithm gptq needs calibration data", hint="pass --data SAMPLES")
    if config.format == "qdq" and default_opset(model) < 21:
        from quantcli.quantize.int4.opset import upgrade_opset_light

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
    ctx = Context(model, config, algorithm, level, Namer(model.graph))
    sizes = Sizes.of(model, config)
    result = Int4Result(model, [], skipped, algorithm=algorithm, accuracy_level=level)
    if config.format == "matmulnbits":
        result.notes.append(f"MatMulNBits accuracy_level {level}: {level_note}")
    widened = {  # weights whose scales --compact-scales may store as float16
        c.weight
        for u in units
        for c in u.members + u.tables
        if config.compact_scales and sizes.float32(c.weight)
    }
    fixed = _fixed_bytes(model, units, widened) if config.max_bytes is not None else 0
    choices = _choose(ctx, units, sizes, data, batch_size, progress, fixed, result)
    done: set[int] = set()
    if algorithm == "gptq":
        _gptq_sequential(ctx, units, choices, data, batch_size, progress, done)
    for i, unit in enumerate(units):
        if i not in done:
            quantize_unit(ctx, unit, choices[i], None)
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
    if config.compact_scales:
        result.notes.append(_compact_note(ctx.compacted))
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


def _compact_note(compacted: int) -> str:
    if not compacted:
        return (
            "--compact-scales changed nothing: no float32 scales tensor of at least "
            f"{COMPACT_MIN_SCALES} scales (a float16 model stores float16 scales anyway)"
        )
    return (
        f"{compacted} scales tensors stored as float16, widened to float32 by ONNX Runtime's "
        "graph optimizations at load: keep them on (the default) when running the file"
    )


def _widening_bytes(node: str) -> int:
    """An upper bound on what compact scales add to the file besides the float16 data: the
    Cast and Mul nodes, the factor, the tensors' headers and value infos, about eleven
    strings named after the node (measured 461 bytes at 18-character names, 715 at
    SmolLM2's)."""
    return 150 + 12 * (len(node.encode()) + 16)


def _fixed_bytes(model: ir.Model, units: list[Int4Unit], widened: set[str]) -> int:
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
    extra = sum(
        400 + (_widening_bytes(c.node) if c.weight in widened else 0)  # a MatMulNBits node
        for u in units  # and its tensor headers
        for c in u.members + u.tables
    )
    return size + mapped + extra


def _choose(
    ctx: Context,
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
    # vocabulary head, then 8-bit where the relative output error says (mixed.py).
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
    cheapest = _cheapest(units, options, sizes)
    if budget < cheapest:
        floor = 8 * cheapest / params
        hint = "raise --budget"
        if _compact_would_help(units, sizes, config):
            compact = 8 * _cheapest(units, options, replace(sizes, compact=True)) / params
            hint += f", or add --compact-scales: float16 scales, from {compact:.2f} bits per weight"
        raise InputError(
            f"the size budget ({wanted}) is below the smallest mix this model allows "
            f"({floor:.2f} bits per weight, {(cheapest + fixed_bytes) / 1e6:.2f} MB)",
            hint=hint,
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


def _compact_would_help(units: list[Int4Unit], sizes: Sizes, config: Int4Config) -> bool:
    if config.compact_scales or config.format != "matmulnbits":
        return False
    return any(sizes.float32(c.weight) for u in units for c in u.weights())


def _cheapest(units: list[Int4Unit], options: list[list[Choice]], sizes: Sizes) -> int:
    return sum(
        min(sizes.unit_bytes(u, c) for c in opts) for u, opts in zip(units, options, strict=True)
    )


def _scores(
    ctx: Context,
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


def _inputs(ctx: Context, unit: Int4Unit) -> list[str]:
    return sorted({ctx.node(c.node).inputs[0].name for c in unit.members})


def _table_counts(ctx: Context, unit: Int4Unit, acc: Accumulator | None) -> np.ndarray | None:
    if acc is None or not unit.tables:
        return None
    total = None
    for table in unit.tables:
        counts = acc.indices.get(ctx.node(table.node).inputs[1].name)
        if counts is not None:
            total = counts if total is None else total + counts
    return total


def _run_segments(
    ctx: Context,
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
    runner = SegmentRunner(model, data, batch_size)
    acc = Accumulator()
    finished: set[int] = set()
    pending = {i for i in range(len(units))}
    try:
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
    finally:
        runner.close()
    for i in sorted(pending):  # tables without a MatMul (untied embeddings)
        on_unit(i, acc)


def _gptq_sequential(
    ctx: Context,
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
        quantize_unit(ctx, unit, choices[i], hessian)
        done.add(i)

    _run_segments(
        ctx, units, data, batch_size, progress, quantize, sequential=ctx.config.sequential
    )


# ------------------------------------------------------------------ quantizing one unit


def _unit_errors(
    ctx: Context,
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
        _, w = unit_weight(ctx, cand)
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


def _plain_gemm(node: ir.Node) -> bool:
    return (
        node.attributes.get_float("alpha", 1.0) == 1.0
        and node.attributes.get_float("beta", 1.0) == 1.0
    )


# ------------------------------------------------------------------ graph rewriting


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
