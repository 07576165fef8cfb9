"""Mixed INT4/INT8/float: the allocation rule, the budget arithmetic, sibling sharing, the
k-quant preset, and options that belong to the other --bits."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import Cli, Tiny
from int4_models import tiny_lm
from onnx import TensorProto, helper, numpy_helper

from quantcli.convert import convert_int4_file
from quantcli.graph.mapped import file_size
from quantcli.quantize.int4.config import Int4Config
from quantcli.quantize.int4.formats import FLOAT, Choice, int8_block, weight_bytes
from quantcli.quantize.int4.mixed import _greedy, _more_bits, allocate

B4, B4C, B8 = Choice(4, 32), Choice(4, 128), Choice(8, 128)


def _save(tmp: Path, name: str, proto: onnx.ModelProto) -> Path:
    path = tmp / f"{name}.onnx"
    onnx.save(proto, path)
    return path


def _calib(tmp: Path, n: int = 16) -> Path:
    path = tmp / "calib.npz"
    np.savez(path, ids=np.random.default_rng(1).integers(0, 96, (n, 12)).astype(np.int64))
    return path


# ------------------------------------------------------------------ the allocation rule


def test_allocate_spends_bytes_where_they_remove_most_error() -> None:
    costs = [{B4C: 100, B4: 120, B8: 200, FLOAT: 400}] * 2
    errors = [
        {B4C: 10.0, B4: 6.0, B8: 0.5, FLOAT: 0.0},  # 4 removed for 20 bytes
        {B4C: 1.0, B4: 0.8, B8: 0.1, FLOAT: 0.0},
    ]
    assert allocate(costs, errors, 200) == [B4C, B4C]
    assert allocate(costs, errors, 220) == [B4, B4C]
    assert allocate(costs, errors, 300) == [B8, B4C]
    assert allocate(costs, errors, 320) == [B8, B4]
    assert allocate(costs, errors, 10_000) == [FLOAT, FLOAT]


def test_allocate_is_optimal_where_greedy_is_not() -> None:
    """Two units: the budget fits one 8-bit upgrade (the best) or two 4-bit block upgrades
    (what greedy upgrade-by-slope takes)."""
    costs = [{B4C: 2368, B4: 2624, B8: 4352, FLOAT: 16384}] * 2
    errors = [
        {B4C: 0.0077, B4: 0.0057, B8: 0.00004, FLOAT: 0.0},
        {B4C: 0.0147, B4: 0.0126, B8: 0.0022, FLOAT: 0.0},
    ]
    assert allocate(costs, errors, 6860) == [B4C, B8]
    assert _greedy(costs, errors, 6860) == [B4, B4]


def test_allocate_matches_brute_force() -> None:
    rng = np.random.default_rng(3)
    options = [B4C, B4, B8, FLOAT]
    for _ in range(30):
        costs, errors = [], []
        for _ in range(5):
            base = int(rng.integers(50, 300))
            costs.append(
                dict(zip(options, [base, int(base * 1.2), base * 2, base * 7], strict=True))
            )
            e = rng.random(3) * 10
            errors.append(dict(zip(options, [*sorted(e, reverse=True), 0.0], strict=True)))
        budget = int(sum(c[B4C] for c in costs) * rng.uniform(1.0, 2.5))
        best = min(
            (
                sum(e[o] for e, o in zip(errors, combo, strict=True))
                for combo in itertools.product(options, repeat=5)
                if sum(c[o] for c, o in zip(costs, combo, strict=True)) <= budget
            ),
        )
        got = allocate(costs, errors, budget, resolution=100_000)
        assert sum(c[o] for c, o in zip(costs, got, strict=True)) <= budget
        assert sum(e[o] for e, o in zip(errors, got, strict=True)) == pytest.approx(best)


def test_allocate_never_exceeds_the_budget() -> None:
    rng = np.random.default_rng(0)
    costs, errors = [], []
    for _ in range(40):
        base = int(rng.integers(50, 500))
        costs.append({B4C: base, B4: int(base * 1.2), B8: base * 2, FLOAT: base * 7})
        e = float(rng.random()) * 10
        errors.append({B4C: e, B4: e * 0.6, B8: e * 0.05, FLOAT: 0.0})
    floor = sum(c[B4C] for c in costs)
    total = 0.0
    for budget in (floor, int(floor * 1.2), int(floor * 2), floor * 7):
        chosen = allocate(costs, errors, budget)
        spent = sum(c[ch] for c, ch in zip(costs, chosen, strict=True))
        error = sum(e[ch] for e, ch in zip(errors, chosen, strict=True))
        assert spent <= budget
        assert total == 0.0 or error <= total  # more budget never costs accuracy
        total = error


def test_weight_bytes_are_the_stored_layouts() -> None:
    # K=576 (SmolLM2), N=1536: MatMulNBits pads K to whole blocks.
    args = {"scale_bytes": 4, "float_bytes": 4, "symmetric": False}
    assert weight_bytes(B4, 576, 1536, **args) == 1536 * (18 * 16 + 18 * 4 + 9)
    assert weight_bytes(Choice(4, 64), 576, 1536, **args) == 1536 * (9 * 32 + 9 * 4 + 5)
    assert weight_bytes(B8, 576, 1536, **args) == 1536 * (5 * 128 + 5 * 4)
    assert weight_bytes(FLOAT, 576, 1536, **args) == 576 * 1536 * 4
    assert (
        weight_bytes(B4, 576, 1536, **args, layout="qdq")
        == 576 * 1536 // 2 + 18 * 1536 * 4 + 18 * 1536 // 2
    )


def test_more_bits_follows_llama_cpp() -> None:
    # llama.cpp use_more_bits for 30 layers: 0..2, 27..29, and 3 + 2 + 3k between.
    assert [i for i in range(30) if _more_bits(i, 30)] == [
        0,
        1,
        2,
        5,
        8,
        11,
        14,
        17,
        20,
        23,
        26,
        27,
        28,
        29,
    ]


# ------------------------------------------------------------------ budgets end to end


def _stored_bits_per_weight(path: Path, params: int) -> float:
    """Bytes of every quantized tensor (and float 2-D weights) in the written file."""
    proto = onnx.load(path)
    total = 0
    for t in proto.graph.initializer:
        if t.data_type == TensorProto.FLOAT and len(t.dims) == 2 and min(t.dims) > 16:
            total += int(np.prod(t.dims)) * 4  # a weight kept float
        elif t.data_type != TensorProto.FLOAT or "scale" in t.name:
            if t.data_type == TensorProto.INT64:
                continue  # the shared table's Reshape shape
            total += len(t.raw_data) if t.raw_data else int(np.prod(t.dims)) * 4
    return 8 * total / params


@pytest.mark.parametrize("bpw", [5.5, 6.0, 8.0, 12.0])
def test_bits_per_weight_budget_holds_in_the_written_file(bpw: float, tmp_path: Path) -> None:
    path, out = _save(tmp_path, "lm", tiny_lm(layers=3)), tmp_path / "q.onnx"
    summary = convert_int4_file(
        path, out, Int4Config(budget_bpw=bpw), data_spec=str(_calib(tmp_path))
    )
    info = summary.details["int4"]
    assert info["bits_per_weight"] <= bpw
    assert info["bits_per_weight"] >= bpw - 1.5  # spent, not left on the table
    stored = _stored_bits_per_weight(out, info["parameters"])
    assert stored == pytest.approx(info["bits_per_weight"], abs=0.01)
    assert sum(info["parameters_by_format"].values()) == info["parameters"]


@pytest.mark.parametrize("bpw", [4.5, 5.0])
def test_compact_scales_budget_holds_in_the_written_file(bpw: float, tmp_path: Path) -> None:
    """float16 scales: block 32 costs 4.63 bits, so 4.5 mixes it with coarse blocks."""
    lm = tiny_lm(layers=2, d=128, ff=256, vocab=512)  # >= 256 scales in every tensor
    path, out = _save(tmp_path, "lm", lm), tmp_path / "q.onnx"
    config = Int4Config(budget_bpw=bpw, compact_scales=True)
    summary = convert_int4_file(path, out, config, data_spec=str(_calib(tmp_path)))
    info = summary.details["int4"]
    assert bpw - 0.3 <= info["bits_per_weight"] <= bpw
    stored = _stored_bits_per_weight(out, info["parameters"])
    assert stored == pytest.approx(info["bits_per_weight"], abs=0.01)
    formats = info["parameters_by_format"]
    if bpw == 4.5:
        assert "int4-b32" in formats and len(formats) > 1
    proto = onnx.load(out)
    assert any(t.data_type == TensorProto.FLOAT16 for t in proto.graph.initializer)


def test_max_size_budget_holds_with_compact_scales_and_long_names(tmp_path: Path) -> None:
    lm = tiny_lm(layers=3, d=128, ff=256, vocab=512)
    for node in lm.graph.node:  # exporter-style names: the widening's strings grow with them
        node.name = f"/model/layers.{node.name}/self_attn/{node.name}/MatMul_with_a_long_tail"
    path, npz = _save(tmp_path, "lm", lm), _calib(tmp_path)
    smallest = tmp_path / "small.onnx"
    convert_int4_file(path, smallest, Int4Config(budget_bpw=4.4, compact_scales=True))
    low = file_size(smallest)
    for limit in (int(low * 1.05), int(low * 1.5)):
        out = tmp_path / f"q{limit}.onnx"
        config = Int4Config(max_bytes=limit, compact_scales=True)
        summary = convert_int4_file(path, out, config, data_spec=str(npz))
        assert 0.85 * limit <= file_size(out) <= limit
        assert summary.warnings == []


def test_max_size_budget_holds_for_the_file(tmp_path: Path) -> None:
    path = _save(tmp_path, "lm", tiny_lm(layers=4))
    npz = _calib(tmp_path)
    smallest = tmp_path / "small.onnx"
    convert_int4_file(path, smallest, Int4Config(), data_spec=str(npz))
    low = file_size(smallest)
    for limit in (int(low * 1.3), int(low * 2)):
        out = tmp_path / f"q{limit}.onnx"
        summary = convert_int4_file(path, out, Int4Config(max_bytes=limit), data_spec=str(npz))
        assert file_size(out) <= limit
        assert file_size(out) >= 0.85 * limit
        assert summary.warnings == []


def test_budget_below_the_smallest_mix_is_refused(tmp_path: Path, cli: Cli) -> None:
    path = _save(tmp_path, "lm", tiny_lm(layers=1))
    line = cli.fails("convert", path, "-o", tmp_path / "q.onnx", "--bits", "4", "--budget", "3")
    assert "below the smallest mix" in line
    assert re.search(r"--compact-scales: float16 scales, from \d+\.\d\d bits per weight", line)
    args = ["--bits", "4", "--budget", "1KB", "--compact-scales"]
    line = cli.fails("convert", path, "-o", tmp_path / "q.onnx", *args)
    assert "below the smallest mix" in line and "--compact-scales" not in line
    assert not (tmp_path / "q.onnx").exists()


def test_siblings_share_a_choice(tmp_path: Path) -> None:
    path, out = _save(tmp_path, "lm", tiny_lm(layers=4)), tmp_path / "q.onnx"
    summary = convert_int4_file(
        path, out, Int4Config(budget_bpw=6.5), data_spec=str(_calib(tmp_path))
    )
    layers = summary.details["int4"]["layers"]
    assert len({layer["format"] for layer in layers}) > 1  # a real mix
    qkv = [layer for layer in layers if layer["role"] == "attention_qkv"]
    assert all(len(layer["nodes"]) == 3 for layer in qkv)
    proto = onnx.load(out)
    bits = {
        n.name: next(a.i for a in n.attribute if a.name == "bits")
        for n in proto.graph.node
        if n.op_type == "MatMulNBits"
    }
    blocks = {
        n.name: next(a.i for a in n.attribute if a.name == "block_size")
        for n in proto.graph.node
        if n.op_type == "MatMulNBits"
    }
    for i in range(4):
        for group in (("q", "k", "v"), ("gate", "up")):
            names = [f"l{i}_{g}_proj_MatMulNBits" for g in group]
            kinds = {(bits.get(n), blocks.get(n)) for n in names}
            assert len(kinds) == 1, (names, kinds)


def _two_branches() -> onnx.ModelProto:
    """x -> MatMul(W) and x * s -> MatMul(W): the same weight, whose rows 0..3 are tiny (their
    4-bit error is large next to them); s amplifies exactly those input channels 30x, so
    the second MatMul's relative output error is far larger. Weight error alone cannot tell
    the two apart."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    w[:4] *= 0.01
    scale = np.ones(64, np.float32)
    scale[:4] = 30.0
    nodes = [
        helper.make_node("MatMul", ["x", "A"], ["a"], name="quiet"),
        helper.make_node("Mul", ["x", "s"], ["xs"], name="amplify"),
        helper.make_node("MatMul", ["xs", "B"], ["b"], name="loud"),
        helper.make_node("Add", ["a", "b"], ["y"], name="sum"),
    ]
    inits = [
        numpy_helper.from_array(w, "A"),
        numpy_helper.from_array(w.copy(), "B"),
        numpy_helper.from_array(scale, "s"),
    ]
    graph = helper.make_graph(
        nodes,
        "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_budget_goes_to_the_layer_with_the_larger_output_error(tmp_path: Path) -> None:
    path, out = _save(tmp_path, "two", _two_branches()), tmp_path / "q.onnx"
    npz = tmp_path / "x.npz"
    np.savez(npz, x=np.random.default_rng(2).standard_normal((32, 64)).astype(np.float32))
    # Room for exactly one of the two weights in 8-bit, the other 4-bit block 32.
    sizes = {"scale_bytes": 4, "float_bytes": 4, "symmetric": False}
    one_eight = weight_bytes(Choice(4, 32), 64, 64, **sizes)
    one_eight += weight_bytes(Choice(8, int8_block(64)), 64, 64, **sizes)
    summary = convert_int4_file(
        path, out, Int4Config(budget_bpw=8 * one_eight / (2 * 64 * 64) + 0.01), data_spec=str(npz)
    )
    formats = {layer["nodes"][0]: layer["format"] for layer in summary.details["int4"]["layers"]}
    assert formats["loud"].startswith("int8") and formats["quiet"].startswith("int4")


def test_k_quant_mix_without_data(tmp_path: Path) -> None:
    path, out = _save(tmp_path, "lm", tiny_lm(layers=3)), tmp_path / "q.onnx"
    summary = convert_int4_file(path, out, Int4Config(mix="k-quant"))
    formats = {
        (layer["role"], layer["nodes"][0]): layer["format"]
        for layer in summary.details["int4"]["layers"]
    }
    eight = {key for key, f in formats.items() if f.startswith("int8")}
    # 3 layers: only the last is a more-bits layer (7 * 3 // 8 = 2).
    assert eight == {
        ("head", "lm_head"),
        ("attention_qkv", "l2_q_proj"),
        ("ffn_down", "l2_down_proj"),
    }
    assert summary.details["int4"]["budget"] == {"mix": "k-quant"}


# ------------------------------------------------------------------ options of the other --bits


INT8_FLAGS = [
    ["--reduce-range"],
    ["--target", "cpu"],
    ["--per-tensor"],
    ["--per-channel"],
    ["--no-smooth"],
    ["--no-bias-correction"],
    ["--no-depthwise"],
    ["--activation-type", "int8"],
    ["--weight-type", "uint8"],
    ["--symmetric-activations"],
    ["--method", "mse"],
    ["--percentile", "99.9"],
    ["--dynamic"],
    ["--include", "x"],
    ["--op-types", "MatMul"],
]


@pytest.mark.parametrize("flags", INT8_FLAGS, ids=lambda f: f[0])
def test_int8_options_are_refused_with_bits_4(flags: list[str], tiny: Tiny, cli: Cli) -> None:
    path = tiny.path("gemm_mlp")
    out = tiny.root / "q.onnx"
    line = cli.fails("convert", path, "-o", out, "--bits", "4", *flags)
    assert "INT8 option" in line and flags[0].split("/")[0] in line
    assert not out.exists()


@pytest.mark.parametrize(
    "flags",
    [
        ["--budget", "4.5"],
        ["--mix", "k-quant"],
        ["--algorithm", "gptq"],
        ["--asymmetric"],
        ["--accuracy-level", "0"],
        ["--no-embeddings"],
        ["--block-size", "32"],
        ["--compact-scales"],
    ],
    ids=lambda f: f[0],
)
def test_int4_options_are_refused_with_bits_8(flags: list[str], tiny: Tiny, cli: Cli) -> None:
    path = tiny.path("gemm_mlp")
    line = cli.fails("convert", path, "-o", tiny.root / "q.onnx", "--data", tiny.data(path), *flags)
    assert "INT4 option" in line


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--budget", "4.5", "--mix", "k-quant"], "exclusive"),
        (["--budget", "lots"], "neither bits per weight nor a size"),
        (["--mix", "q9"], "not a preset"),
        (["--budget", "40"], "out of range"),
        (["--format", "qoperator"], "not an INT4 format"),
        (["--format", "qdq", "--compact-scales"], "needs --format matmulnbits"),
    ],
)
def test_bad_budget_options(flags: list[str], message: str, tiny: Tiny, cli: Cli) -> None:
    path = tiny.path("gemm_mlp")
    line = cli.fails("convert", path, "-o", tiny.root / "q.onnx", "--bits", "4", *flags)
    assert re.search(message, line)


def test_int8_defaults_unchanged_by_the_optional_flags(tiny: Tiny, cli: Cli) -> None:
    """--target stays cpu and the INT8 options keep their defaults when not given."""
    path = tiny.path("gemm_mlp")
    doc = json.loads(
        cli.ok(
            "convert", path, "-o", tiny.root / "q8.onnx", "--data", tiny.data(path), "--json"
        ).stdout
    )
    assert doc["target"] == "cpu" and doc["bits"] == 8


def test_summary_shows_bits_per_layer(tmp_path: Path, cli: Cli) -> None:
    path = _save(tmp_path, "lm", tiny_lm(layers=2))
    args = ["convert", path, "-o", tmp_path / "q.onnx", "--bits", "4", "--mix", "k-quant"]
    text = cli.ok(*args).stdout
    assert "Bits per layer" in text and "int8-b32" in text and "attention_qkv" in text
    assert "tied to the output head" in text
