"""INT4 units: siblings, shared weights, a tied head and its table, float16 models, and the
segment-by-segment calibration behind GPTQ."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import Tiny, run_ort
from int4_models import fp16_lm, shared_weight, tiny_lm

from quantcli.calibrate.segments import SegmentRunner
from quantcli.convert import convert_int4_file
from quantcli.data import open_data
from quantcli.graph.passes import prepare_model
from quantcli.graph.signature import input_specs
from quantcli.quantize.int4 import calib as int4_calib
from quantcli.quantize.int4.calib import Accumulator, plan_segments
from quantcli.quantize.int4.config import Int4Config
from quantcli.quantize.int4.formats import quantize_int8_blocks
from quantcli.quantize.int4.plan import plan_units
from quantcli.quantize.math.int4 import quantize_rtn

FORMATS = ("matmulnbits", "qdq")


def _save(tmp: Path, name: str, proto: onnx.ModelProto) -> Path:
    path = tmp / f"{name}.onnx"
    onnx.save(proto, path)
    return path


def _ids(n: int = 16, t: int = 12, vocab: int = 96, seed: int = 0) -> dict[str, np.ndarray]:
    return {"ids": np.random.default_rng(seed).integers(0, vocab, (n, t)).astype(np.int64)}


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(path).graph.node]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).mean())


def test_units_group_siblings_and_find_roles() -> None:
    model = prepare_model(ir.from_proto(tiny_lm(layers=3)))
    units = plan_units(model)
    by_role: dict[str, list] = {}
    for unit in units:
        by_role.setdefault(unit.role, []).append(unit)
    assert [len(u.members) for u in by_role["attention_qkv"]] == [3, 3, 3]
    assert [u.members[0].node for u in by_role["ffn_down"]] == [f"l{i}_down_proj" for i in range(3)]
    (head,) = by_role["head"]
    assert [c.node for c in head.members] == ["lm_head"] and head.tied and head.table_match
    assert [t.node for t in head.tables] == ["embed"]
    siblings = [u for u in by_role["other"] if len(u.members) == 2]
    assert [{c.node for c in u.members} for u in siblings] == [
        {f"l{i}_gate_proj", f"l{i}_up_proj"} for i in range(3)
    ]
    assert [u.layer for u in by_role["attention_qkv"]] == [0, 1, 2]
    # A shared table counts its parameters once.
    assert head.params == 96 * 32


@pytest.mark.parametrize("fmt", FORMATS)
def test_tied_table_is_stored_once_and_read_by_the_lookup(fmt: str, tmp_path: Path) -> None:
    path, out = _save(tmp_path, "lm", tiny_lm()), tmp_path / "q4.onnx"
    summary = convert_int4_file(path, out, Int4Config(block_size=16, format=fmt))
    proto = onnx.load(out)
    names = {t.name for t in proto.graph.initializer}
    assert "E" not in names and "Et" not in names  # no float copy of the table is left
    if fmt == "matmulnbits":
        gbq = next(n for n in proto.graph.node if n.op_type == "GatherBlockQuantized")
        head = next(n for n in proto.graph.node if n.name.startswith("lm_head"))
        reshape = next(n for n in proto.graph.node if n.output[0] == gbq.input[0])
        assert reshape.op_type == "Reshape" and reshape.input[0] == head.input[1]
        assert gbq.input[2:] == head.input[2:]  # the same scales and zero points
        assert any("tied to the output head" in n for n in summary.details["int4"]["notes"])
    feeds = _ids()
    (want,), (got,) = run_ort(path, feeds), run_ort(out, feeds)
    assert _cosine(want, got) > 0.95


def test_tied_table_lookup_equals_the_dequantized_head_weight(tmp_path: Path) -> None:
    """The Gather output is exactly the dequantized rows of the head's INT4 weight."""
    proto = tiny_lm(layers=1)
    proto.graph.output.append(
        onnx.helper.make_tensor_value_info("h0", onnx.TensorProto.FLOAT, ["N", "T", 32])
    )
    path, out = _save(tmp_path, "lm", proto), tmp_path / "q4.onnx"
    summary = convert_int4_file(path, out, Int4Config(block_size=16, accuracy_level=0))
    (head,) = [r for r in summary.details["int4"]["layers"] if r["role"] == "head"]
    assert head["format"] == "int8-b32" and head["tied_table"]  # a vocabulary head: 8-bit
    table = onnx.numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "E"))
    deq = quantize_int8_blocks(table.T, 32).dequantize().T
    feeds = _ids()
    _, rows = run_ort(out, feeds)
    np.testing.assert_allclose(rows, deq[feeds["ids"]], rtol=0, atol=1e-6)


def test_float_head_reads_the_table_again(tmp_path: Path) -> None:
    """A budget that keeps everything float stores the tied table once, not E and E^T."""
    path, out = _save(tmp_path, "lm", tiny_lm(layers=1)), tmp_path / "q4.onnx"
    summary = convert_int4_file(path, out, Int4Config(block_size=16, budget_bpw=32.0))
    assert set(summary.details["int4"]["parameters_by_format"]) == {"float"}
    proto = onnx.load(out)
    floats = [t for t in proto.graph.initializer if len(t.dims) == 2]
    assert sum(int(np.prod(t.dims)) for t in floats) == 96 * 32 + 4 * 32 * 32 + 3 * 32 * 64
    assert "Transpose" in _ops(out)
    feeds = _ids()
    np.testing.assert_allclose(run_ort(out, feeds)[0], run_ort(path, feeds)[0], atol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_shared_weight_is_quantized_once(fmt: str, tmp_path: Path) -> None:
    path, out = _save(tmp_path, "shared", shared_weight()), tmp_path / "q4.onnx"
    summary = convert_int4_file(path, out, Int4Config(block_size=16, format=fmt, accuracy_level=0))
    proto = onnx.load(out)
    quantized = [t for t in proto.graph.initializer if t.data_type != onnx.TensorProto.FLOAT]
    assert len(quantized) == 2  # one packed weight and one zero-point tensor, not two of each
    readers = [n for n in proto.graph.node if n.op_type in ("MatMulNBits", "DequantizeLinear")]
    if fmt == "matmulnbits":
        assert len(readers) == 2 and readers[0].input[1:] == readers[1].input[1:]
    else:
        assert len(readers) == 1 and _ops(out).count("MatMul") == 2
    assert summary.details["int4"]["parameters"] == 32 * 32
    w = onnx.numpy_helper.to_array(shared_weight().graph.initializer[0])
    deq = quantize_rtn(w, 16, symmetric=False).dequantize()
    x = np.random.default_rng(0).standard_normal((8, 32)).astype(np.float32)
    (got,) = run_ort(out, {"x": x}, optimize=False)
    np.testing.assert_allclose(got, np.maximum(x @ deq, 0) @ deq, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["float16", "fp16_lm"])
def test_float16_models_convert(name: str, fmt: str, tiny: Tiny, tmp_path: Path) -> None:
    path = tiny.path("float16") if name == "float16" else _save(tmp_path, name, fp16_lm())
    out = tmp_path / "q4.onnx"
    compact = fmt == "matmulnbits"  # nothing to compact: said, not silently ignored
    summary = convert_int4_file(path, out, Int4Config(16, format=fmt, compact_scales=compact))
    assert not compact or "changed nothing" in summary.details["int4"]["notes"][-1]
    proto = onnx.load(out)
    scales = [t for t in proto.graph.initializer if "scale" in t.name]
    assert scales and all(t.data_type == onnx.TensorProto.FLOAT16 for t in scales)
    assert "Cast" not in [n.op_type for n in proto.graph.node if n.output[0] in scales]
    feeds = tiny.feeds(path, n=4) if name == "float16" else _ids()
    (want,), (got,) = run_ort(path, feeds), run_ort(out, feeds)
    assert got.dtype == np.float16
    assert _cosine(want, got) > 0.95


def _data(tmp_path: Path, path: Path, n: int = 16) -> Path:
    npz = tmp_path / "calib.npz"
    np.savez(npz, **_ids(n=n, seed=1))
    return npz


def test_segments_cut_between_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    model = prepare_model(ir.from_proto(tiny_lm(layers=3)))
    units = plan_units(model)
    nodes = {n.name: n for n in model.graph}
    inputs: dict[str, list[str]] = {}
    for unit in units:
        for c in unit.members:
            inputs.setdefault(nodes[c.node].inputs[0].name, []).append(c.node)
    hessians = [(h, 32 if "gu" not in h else 64, cons) for h, cons in inputs.items()]
    one_layer = (3 * 32 * 32 + 64 * 64) * 8
    segments = plan_segments(model, hessians, ["ids"], budget=one_layer)
    assert len(segments) == 4  # three layers and the head
    # Between layers only the residual stream crosses the cut.
    assert [s.frontier for s in segments[:-1]] == [["l0.out"], ["l1.out"], ["l2.out"]]
    assert segments[0].indices == ["ids"] and segments[-1].frontier == []


def test_segmented_statistics_equal_one_pass(tmp_path: Path) -> None:
    """Without quantizing between segments, x^T x per segment equals the whole model's."""
    proto = tiny_lm(layers=2)
    path = _save(tmp_path, "lm", proto)
    npz = _data(tmp_path, path)
    model = prepare_model(ir.from_proto(proto))
    nodes = {n.name: n for n in model.graph}
    consumers: dict[str, list[str]] = {}
    for unit in plan_units(model):
        for c in unit.members:
            consumers.setdefault(nodes[c.node].inputs[0].name, []).append(c.node)
    names = sorted(consumers)
    spec = [(h, 64 if "gu" in h else 32, consumers[h]) for h in names]
    data = open_data(str(npz), input_specs(model))
    split, whole = Accumulator(), Accumulator()
    runner = SegmentRunner(model, data, 4)
    segments = plan_segments(model, spec, [], budget=1)
    assert len(segments) > 3
    for seg in segments:

        def add(values: dict[str, np.ndarray], seg=seg) -> None:
            for n in seg.inputs:
                split.add(n, values[n])

        runner.run(seg.inputs, add, keep=seg.frontier)

    def add_all(values: dict[str, np.ndarray]) -> None:
        for n in names:
            whole.add(n, values[n])

    data = open_data(str(npz), input_specs(model))
    SegmentRunner(model, data, 4).run(names, add_all)
    assert set(split.hessians) == set(names)
    for name in names:
        np.testing.assert_allclose(split.hessians[name], whole.hessians[name], rtol=1e-6)
        assert split.tokens[name] == whole.tokens[name] == 16 * 12


def _output_error(path: Path, out: Path) -> float:
    feeds = _ids(n=32, seed=7)
    (want,), (got,) = run_ort(path, feeds), run_ort(out, feeds)
    return float(np.square(want - got).mean())


@pytest.mark.parametrize("sequential", [True, False])
def test_gptq_by_segments_beats_rtn(
    sequential: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(int4_calib, "HESSIAN_BUDGET", 1)  # one Hessian per segment
    path = _save(tmp_path, "lm", tiny_lm(layers=3))
    npz = _data(tmp_path, path, n=32)
    rtn, gptq = tmp_path / "rtn.onnx", tmp_path / "gptq.onnx"
    convert_int4_file(path, rtn, Int4Config(block_size=16))
    summary = convert_int4_file(
        path, gptq, Int4Config(block_size=16, sequential=sequential), data_spec=str(npz)
    )
    assert summary.details["int4"]["algorithm"] == "gptq"
    assert _output_error(path, gptq) < 0.8 * _output_error(path, rtn)


def test_algorithm_auto_is_rtn_without_data(tmp_path: Path) -> None:
    path = _save(tmp_path, "lm", tiny_lm(layers=1))
    summary = convert_int4_file(path, tmp_path / "q.onnx", Int4Config(block_size=16))
    assert summary.details["int4"]["algorithm"] == "rtn"
