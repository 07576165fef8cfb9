"""`convert --bits 4`: both output forms, symmetric or not, RTN and GPTQ, and refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import SAMPLE_NAMES, Cli, Tiny, run_ort, sample
from int4_models import tiny_lm

from quantcli.convert import convert_int4_file
from quantcli.graph.passes import prepare_model
from quantcli.quantize.int4.config import Int4Config
from quantcli.quantize.int4.formats import parse_choice, quantize_int8_blocks
from quantcli.quantize.int4.plan import int4_candidates
from quantcli.quantize.math.int4 import quantize_rtn

FORMATS = ("matmulnbits", "qdq")


def _cosine_mean(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).mean())


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(path).graph.node]


@pytest.mark.parametrize("name", SAMPLE_NAMES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_sample_models(name: str, fmt: str, symmetric: bool, tmp_path: Path, cli: Cli) -> None:
    s, out = sample(name), tmp_path / "q4.onnx"
    flag = "--symmetric" if symmetric else "--asymmetric"
    doc = cli.ok("convert", s.model, "-o", out, "--bits", "4", "--format", fmt, flag, "--json")
    summary = json.loads(doc.stdout)
    wanted = int4_candidates(prepare_model(ir.load(s.model)))
    assert summary["int4"]["weights"] == len(wanted) > 0
    assert summary["size_after"] < summary["size_before"]
    ops = _ops(out)
    if fmt == "matmulnbits":
        assert ops.count("MatMulNBits") == len(wanted)
    else:
        proto = onnx.load(out)
        assert proto.opset_import[0].version >= 21 and proto.ir_version >= 10
        int4 = onnx.TensorProto.INT4 if symmetric else onnx.TensorProto.UINT4
        types = {t.name: t.data_type for t in proto.graph.initializer}
        dqs = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
        assert [types[n.input[0]] for n in dqs] == [int4] * len(wanted)
        assert all(len(n.input) == (2 if symmetric else 3) for n in dqs)
    x, labels = s.eval_arrays(128)
    (want,), (got,) = run_ort(s.model, {"input": x}), run_ort(out, {"input": x})
    assert _cosine_mean(want, got) >= 0.99
    assert (got.argmax(1) == labels).mean() >= (want.argmax(1) == labels).mean() - 0.03


def _dequantized_reference(path: Path, symmetric: bool, formats: dict[str, str]) -> onnx.ModelProto:
    """The float model with every quantized weight (embedding tables included: by default
    they are quantized too) replaced by its dequantized value, in the format the conversion
    chose for it (4-bit blocks; a vocabulary head 8-bit)."""
    model = prepare_model(ir.load(path))
    nodes = {n.name: n for n in model.graph}
    for cand in int4_candidates(model, include_gather=True):
        node = nodes[cand.node]
        value = node.inputs[0] if cand.op_type == "Gather" else node.inputs[1]
        w = value.const_value.numpy()
        w = w.T if cand.transposed else w
        choice = parse_choice(formats[cand.node])
        if choice.bits == 8:
            deq = quantize_int8_blocks(w, choice.block_size).dequantize()
        else:
            deq = quantize_rtn(w, choice.block_size, symmetric).dequantize()
        value.const_value = ir.tensor(deq.T if cand.transposed else deq, name=value.name)
    return ir.to_proto(model)


@pytest.mark.parametrize("name", [*SAMPLE_NAMES, "tied_embedding", "gemm_mlp"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_int4_model_equals_float_model_with_dequantized_weights(
    name: str, fmt: str, symmetric: bool, tiny: Tiny
) -> None:
    path = sample(name).model if name in SAMPLE_NAMES else tiny.path(name)
    out, block = tiny.root / "q4.onnx", 16
    summary = convert_int4_file(
        path, out, Int4Config(block_size=block, symmetric=symmetric, format=fmt, accuracy_level=0)
    )
    formats = {
        node: layer["format"]
        for layer in summary.details["int4"]["layers"]
        for node in layer["nodes"]
    }
    feeds = tiny.feeds(path, n=8)
    (want,) = run_ort(_dequantized_reference(path, symmetric, formats), feeds, optimize=False)
    (got,) = run_ort(out, feeds, optimize=False)
    atol = 1e-5 if fmt == "qdq" else 1e-3  # MatMulNBits accumulates in its own order
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=atol * np.abs(want).max())


def _widened(path: Path) -> onnx.ModelProto:
    """The compact model with every Cast(float16) -> Mul(factor) replaced by the float32
    initializer it computes."""
    proto = onnx.load(path)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    casts = {n.output[0]: n for n in proto.graph.node if n.op_type == "Cast"}
    keep, widened = [], []
    for node in proto.graph.node:
        if node.op_type == "Mul" and node.input[0] in casts:
            half = inits[casts[node.input[0]].input[0]]
            value = half.astype(np.float32) * inits[node.input[1]]
            widened.append(onnx.numpy_helper.from_array(value, node.output[0]))
        elif node.op_type != "Cast":
            keep.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(keep)
    proto.graph.initializer.extend(widened)
    return proto


def test_compact_scales_are_float16_folded_by_onnx_runtime(tmp_path: Path, cli: Cli) -> None:
    """--compact-scales: float16 x a power of two, widened by Cast -> Mul that ONNX Runtime
    folds at load; the result equals float32 scales of the widened values."""
    path = tmp_path / "lm.onnx"
    onnx.save(tiny_lm(layers=1, d=128, ff=256, vocab=512), path)  # >= 512 scales a tensor
    compact, full = tmp_path / "compact.onnx", tmp_path / "full.onnx"
    small = convert_int4_file(path, compact, Int4Config(block_size=16, compact_scales=True))
    assert any("float16" in note for note in small.details["int4"]["notes"])
    cli.ok("convert", path, "-o", full, "--bits", "4", "--block-size", "16")
    assert compact.stat().st_size < full.stat().st_size
    # inspect reads the stored bytes through the widening: K=128 in 8 blocks of 16, N=128:
    # 4 bits, a float16 scale and half a zero-point byte per 16 weights, one float32 factor
    rows = {
        r["node"]: r for r in json.loads(cli.ok("inspect", compact, "--json").stdout)["weight_bits"]
    }
    assert rows["l0_o_proj_MatMulNBits"]["bits_per_weight"] == pytest.approx(
        4 + 1 + 0.25 + 32 / 128**2, abs=1e-3
    )
    full_rows = json.loads(cli.ok("inspect", full, "--json").stdout)["weight_bits"]
    assert {r["node"]: r for r in full_rows}["l0_o_proj_MatMulNBits"]["bits_per_weight"] == 6.25
    stored = small.details["int4"]["bits_per_weight"]
    layers = [r for r in rows.values() if r["parameters"]]
    weighted = sum(r["bits_per_weight"] * r["parameters"] for r in layers)
    assert stored == pytest.approx(weighted / sum(r["parameters"] for r in layers), abs=1e-2)
    proto = onnx.load(compact)
    producers = {o: n for n in proto.graph.node for o in n.output}
    types = {t.name: t.data_type for t in proto.graph.initializer}
    readers = [n for n in proto.graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")]
    assert len(readers) >= 2
    for node in readers:
        mul = producers[node.input[2]]
        cast = producers[mul.input[0]]
        assert (mul.op_type, cast.op_type) == ("Mul", "Cast")
        assert types[cast.input[0]] == onnx.TensorProto.FLOAT16
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(compact), opts, providers=["CPUExecutionProvider"])
    optimized = onnx.load(tmp_path / "optimized.onnx")
    assert "Cast" not in [n.op_type for n in optimized.graph.node]
    halves = [
        t.name for t in optimized.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16
    ]
    assert not halves  # every widening folded into a float32 initializer
    feeds = {"ids": np.random.default_rng(0).integers(0, 512, (4, 12)).astype(np.int64)}
    # Q, K, V, O, gate, up, down and the head; the tied table reads the head's
    assert small.details["int4"]["notes"][-1].startswith("8 scales tensors stored as float16")
    (want,) = run_ort(_widened(compact), feeds)
    (got,) = run_ort(compact, feeds)
    np.testing.assert_array_equal(got, want)
    # Widened at run time when nothing folds (at accuracy level 0: ONNX Runtime 1.32's level
    # 4 kernel reads scales that are not initializers as zeros, hence the flag is opt-in)
    level0 = tmp_path / "level0.onnx"
    convert_int4_file(path, level0, Int4Config(16, compact_scales=True, accuracy_level=0))
    (folded,) = run_ort(level0, feeds)
    (unfolded,) = run_ort(level0, feeds, optimize=False)
    np.testing.assert_allclose(unfolded, folded, rtol=1e-4, atol=1e-4 * np.abs(folded).max())


@pytest.mark.parametrize("name", ["encoder", "mlp"])
def test_gptq_with_data(name: str, tmp_path: Path, cli: Cli) -> None:
    s = sample(name)
    rtn, gptq = tmp_path / "rtn.onnx", tmp_path / "gptq.onnx"
    cli.ok("convert", s.model, "-o", rtn, "--bits", "4")
    args = ["--algorithm", "gptq", "--data", s.calib, "--limit", "16"]
    cli.ok("convert", s.model, "-o", gptq, "--bits", "4", *args)
    assert rtn.read_bytes() != gptq.read_bytes()
    x = s.eval_arrays(128)[0]
    (want,), (got,) = run_ort(s.model, {"input": x}), run_ort(gptq, {"input": x})
    assert _cosine_mean(want, got) >= 0.99


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_embeddings_keeps_the_float_table_for_gather(fmt: str, tiny: Tiny) -> None:
    path, out = tiny.path("tied_embedding"), tiny.root / "q4.onnx"
    summary = convert_int4_file(path, out, Int4Config(format=fmt, embeddings=False))
    assert summary.quantized_by_type == {"MatMul": 1}
    proto = onnx.load(out)
    gather = next(n for n in proto.graph.node if n.op_type == "Gather")
    table = next(t for t in proto.graph.initializer if t.name == gather.input[0])
    original = onnx.load(path).graph.initializer[0]
    assert table.data_type == onnx.TensorProto.FLOAT
    assert (
        onnx.numpy_helper.to_array(table).tobytes()
        == onnx.numpy_helper.to_array(original).tobytes()
    )
    quantized = "MatMulNBits" if fmt == "matmulnbits" else "DequantizeLinear"
    assert quantized in _ops(out)
    reader = next(n for n in proto.graph.node if n.op_type in ("MatMulNBits", "MatMul"))
    assert gather.input[0] not in reader.input


def _int8_model(tiny: Tiny) -> Path:
    path = tiny.path("gemm_mlp")
    out = tiny.root / "int8.onnx"
    Cli().ok("convert", path, "-o", out, "--data", tiny.data(path))
    return out


def _int4_model(tiny: Tiny) -> Path:
    path = tiny.path("gemm_mlp")
    out = tiny.root / "int4.onnx"
    Cli().ok("convert", path, "-o", out, "--bits", "4", "--block-size", "16")
    return out


BAD = {
    "block_size_48": (lambda t: t.path("gemm_mlp"), ["--block-size", "48"], "--block-size 48"),
    "gptq_without_data": (lambda t: t.path("gemm_mlp"), ["--algorithm", "gptq"], "needs calib"),
    "no_weight": (lambda t: t.path("conv_only"), [], "no MatMul/Gemm with a constant"),
    "already_int8": (_int8_model, [], "already quantized"),
    "already_int4": (_int4_model, [], "already quantized .*MatMulNBits"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_inputs(case: str, tiny: Tiny, cli: Cli) -> None:
    make, args, message = BAD[case]
    out = tiny.root / "out.onnx"
    line = cli.fails("convert", make(tiny), "-o", out, "--bits", "4", *args)
    assert re.search(message, line)
    assert not out.exists()
    assert not [p for p in tiny.root.iterdir() if p.name.startswith(".out.onnx")]
