"""Int16 pair saturation on x86 without VNNI: the math, the emulation, every default output.

These tests pass on both host kinds: the default output cannot saturate, so its accuracy
is the same everywhere; the emulation shows on a VNNI host what an AVX2 host would get.
`.ci/run` also runs the suite under qemu's Haswell CPU (AVX2, no VNNI).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import SAMPLE_NAMES, Cli, run_ort, sample
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

from quantcli.calibrate.config import CalibrationConfig
from quantcli.convert import convert_int8_file
from quantcli.errors import InputError
from quantcli.evaluate.host import _isa, int16_pairs_saturate
from quantcli.graph.io import load_model
from quantcli.quantize.int8.config import Int8Config
from quantcli.quantize.int8.saturation_check import check_saturation
from quantcli.quantize.math.saturation import (
    PAIR_LIMIT,
    pair_bound,
    pair_safe_int8,
    saturating_matmul,
)

RNG = np.random.default_rng(0)
weights = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=9),
    elements=st.floats(-8, 8, width=32),
)


# ------------------------------------------------------------------ the math


@settings(max_examples=80, deadline=None)
@given(weights, st.booleans())
def test_pair_safe_weights_never_exceed_the_pair_limit(w: np.ndarray, per_channel: bool) -> None:
    q, scale = pair_safe_int8(w, 0, per_channel)
    assert q.dtype == np.int8 and q.shape == w.shape
    assert np.abs(q.astype(np.int32)).max(initial=0) <= 127
    assert pair_bound(q, 0).max(initial=0) <= PAIR_LIMIT
    # never finer than full 8-bit: the first thing the search tries is max|w| / 127
    absmax = np.abs(w).reshape(w.shape[0], -1).max(axis=1)
    full = absmax / 127 if per_channel else np.full(w.shape[0], absmax.max() / 127)
    assert np.all(np.broadcast_to(scale, full.shape) >= np.maximum(full, 1e-12) * (1 - 1e-6))


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.float32, (6, 5), elements=st.floats(-1, 1, width=32)))
def test_channels_already_safe_keep_full_8_bit(w: np.ndarray) -> None:
    w = w.copy()
    w[:, 0] = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]  # one value per sign: safe at full 8-bit
    q, scale = pair_safe_int8(w, 1)
    assert q[:, 0].tolist() == [127, 0, 0, 0, 0, -127]
    assert scale[0] == pytest.approx(1 / 127)


def test_lone_outlier_keeps_its_value_and_bulk_keeps_resolution() -> None:
    """One large weight and small ones: capping the small side beats a coarser scale."""
    w = np.array([[1.0], [0.3], [0.02], [-0.02], [0.01], [-0.3]], np.float32)
    q, scale = pair_safe_int8(w, 1)
    assert pair_bound(q, 1).max() <= PAIR_LIMIT
    assert np.abs(q[:, 0] * scale[0] - w[:, 0]).max() < 0.3 * 0.5  # not 7-bit rounding of all
    assert q[0, 0] * scale[0] == pytest.approx(1.0, rel=0.05)


def test_pair_safe_error_is_between_full_8_bit_and_7_bit() -> None:
    w = RNG.standard_normal((256, 64)).astype(np.float32)
    q, scale = pair_safe_int8(w, 1)
    safe = ((q * scale - w) ** 2).mean()
    full_scale = np.abs(w).max(0) / 127
    full = ((np.rint(w / full_scale) * full_scale - w) ** 2).mean()
    half_scale = np.abs(w).max(0) / 63
    seven = ((np.rint(w / half_scale) * half_scale - w) ** 2).mean()
    assert full < safe < seven


# ------------------------------------------------------------------ the emulation


def test_saturating_matmul_clamps_each_pair() -> None:
    a = np.full((2, 4), 255, np.uint8)
    b = np.array([[127], [127], [1], [-1]], np.int8)
    assert saturating_matmul(a, b).ravel().tolist() == [32767, 32767]  # 32767 + 0


@settings(max_examples=40, deadline=None)
@given(
    hnp.arrays(np.uint8, (3, 9)),
    hnp.arrays(np.float32, (9, 4), elements=st.floats(-2, 2, width=32)),
)
def test_pair_safe_weights_compute_exactly_on_a_saturating_kernel(a, w) -> None:
    q, _ = pair_safe_int8(w, 1)
    exact = a.astype(np.int64) @ q.astype(np.int64)
    np.testing.assert_array_equal(saturating_matmul(a, q), exact)


def _matmul_integer(b: np.ndarray) -> onnx.ModelProto:
    a = oh.make_tensor_value_info("a", TensorProto.UINT8, [None, b.shape[0]])
    y = oh.make_tensor_value_info("y", TensorProto.INT32, [None, b.shape[1]])
    node = oh.make_node("MatMulInteger", ["a", "b"], ["y"])
    graph = oh.make_graph([node], "g", [a], [y], [numpy_helper.from_array(b, "b")])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)])


def test_emulation_is_what_this_host_computes(tmp_path: Path) -> None:
    """On a saturating host (AVX2, or qemu's Haswell in CI) ORT equals the emulation;
    on a VNNI host it equals the exact product. Either way the inputs do saturate."""
    a = RNG.integers(128, 256, (8, 64)).astype(np.uint8)
    b = RNG.integers(60, 128, (64, 16)).astype(np.int8)
    b[1::4] *= -1
    path = tmp_path / "mmi.onnx"
    onnx.save(_matmul_integer(b), path)
    (got,) = run_ort(path, {"a": a})
    exact = a.astype(np.int64) @ b.astype(np.int64)
    emulated = saturating_matmul(a, b)
    assert not np.array_equal(emulated, exact)  # the data overflows int16 pairs
    if int16_pairs_saturate():
        np.testing.assert_array_equal(got, emulated)
    else:
        np.testing.assert_array_equal(got, exact)


# ------------------------------------------------------------------ the graph check


def _convert(name: str, out: Path, **config: object) -> onnx.ModelProto:
    s = sample(name)
    convert_int8_file(
        s.model,
        out,
        Int8Config(**config),  # type: ignore[arg-type]
        data_spec=str(s.calib),
        calibration=CalibrationConfig(limit=32),
    )
    return onnx.load(out)


FORMS = [
    {},
    {"format": "qdq"},
    {"format": "qoperator"},
    {"format": "qdq", "activation_type": "int8"},
    {"format": "qdq", "per_channel": False},
    {"smooth": False},
]


@pytest.mark.parametrize("name", SAMPLE_NAMES)
@pytest.mark.parametrize("form", FORMS, ids=lambda f: ",".join(map(str, f.values())) or "auto")
def test_every_default_output_is_saturation_free(name: str, form: dict, tmp_path: Path) -> None:
    proto = _convert(name, tmp_path / "q.onnx", **form)
    check = check_saturation(ir.from_proto(proto))
    assert check.checked > 0 and check.safe, check.to_dict()
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta == {"quantcli.target": "cpu", "quantcli.x86_int16_saturation_safe": "true"}


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_full_8_bit_target_is_flagged(name: str, tmp_path: Path) -> None:
    proto = _convert(name, tmp_path / "q.onnx", target="cpu-vnni")
    check = check_saturation(ir.from_proto(proto))
    assert not check.safe and check.risks[0].worst_pair > PAIR_LIMIT
    assert {p.key: p.value for p in proto.metadata_props}["quantcli.target"] == "cpu-vnni"


def test_dynamic_form_is_saturation_free_and_honours_reduce_range(tmp_path: Path) -> None:
    s = sample("encoder")
    for reduce_range in (False, True):
        out = tmp_path / f"d{reduce_range}.onnx"
        convert_int8_file(s.model, out, Int8Config(format="dynamic", reduce_range=reduce_range))
        proto = onnx.load(out)
        assert check_saturation(ir.from_proto(proto)).safe
        ints = [
            numpy_helper.to_array(t)
            for t in proto.graph.initializer
            if t.data_type == TensorProto.INT8 and len(t.dims) == 2
        ]
        top = max(int(np.abs(q.astype(np.int32)).max()) for q in ints)
        assert top <= 64 if reduce_range else top > 64  # 7-bit only when asked


def test_accuracy_a_non_vnni_host_gets_is_emulated_here(tmp_path: Path) -> None:
    """The digit CNN's first Conv as an AVX2 kernel computes it: full 8-bit saturates,
    the default is exact."""
    s = sample("digits_cnn")
    x = np.clip(np.rint(s.calib_input(16) * 40 + 128), 0, 255).astype(np.uint8)
    for target, saturates in (("cpu-vnni", True), ("cpu", False)):
        proto = _convert("digits_cnn", tmp_path / f"{target}.onnx", target=target)
        check = check_saturation(ir.from_proto(proto))
        conv = next(n for n in proto.graph.node if n.op_type == "Conv")
        w_dq = next(n for n in proto.graph.node if n.output[0] == conv.input[1])
        q = numpy_helper.to_array(
            next(t for t in proto.graph.initializer if t.name == w_dq.input[0])
        )
        cols = q.reshape(q.shape[0], -1).T  # [K, M] for im2col patches
        k = q.shape[2]
        patches = np.lib.stride_tricks.sliding_window_view(x[:, 0], (k, k), axis=(1, 2))
        a = patches.reshape(-1, k * k)[::7].copy()
        exact = a.astype(np.int64) @ cols.astype(np.int64)
        differs = not np.array_equal(saturating_matmul(a, cols), exact)
        assert differs == saturates and check.safe == (not saturates)


def test_models_written_by_onnx_runtime_are_checked(tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    w = RNG.standard_normal((64, 32)).astype(np.float32)
    x = oh.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])
    y = oh.make_tensor_value_info("y", TensorProto.FLOAT, [None, 32])
    node = oh.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    graph = oh.make_graph([node], "g", [x], [y], [numpy_helper.from_array(w, "w")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "f.onnx")
    quantize_dynamic(tmp_path / "f.onnx", tmp_path / "ort.onnx", weight_type=QuantType.QInt8)
    check = check_saturation(load_model(tmp_path / "ort.onnx").model)
    assert not check.safe and len(check.risks) == 1
    assert len(check.risks[0].unsafe_channels) == 32  # every column of a Gaussian weight
    quantize_dynamic(
        tmp_path / "f.onnx",
        tmp_path / "rr.onnx",
        weight_type=QuantType.QInt8,
        reduce_range=True,  # its extra_options={"ReduceRange": True} is silently ignored
    )
    assert check_saturation(load_model(tmp_path / "rr.onnx").model).safe


# ------------------------------------------------------------------ host and CLI


@pytest.mark.parametrize(
    ("machine", "flags", "isa"),
    [
        ("x86_64", {"avx2", "avx512_vnni"}, "AVX512-VNNI"),
        ("x86_64", {"avx2", "avx_vnni"}, "AVX-VNNI"),
        ("x86_64", {"avx2", "amx_int8", "avx512_vnni"}, "AMX + AVX512-VNNI"),
        ("x86_64", {"avx2", "fma"}, "AVX2 (no VNNI)"),
        ("aarch64", {"asimd", "asimddp", "i8mm"}, "ARM dot product + i8mm"),
        ("aarch64", {"asimd"}, "ARM (no dot product)"),
    ],
)
def test_int8_isa_from_cpu_flags(machine: str, flags: set[str], isa: str) -> None:
    assert _isa(machine, flags) == isa


def test_unknown_target_is_refused(cli: Cli, tmp_path: Path) -> None:
    s = sample("digits_cnn")
    line = cli.fails(
        "convert", s.model, "--data", s.calib, "--target", "avx2", "-o", tmp_path / "o.onnx"
    )
    assert "--target 'avx2'" in line and "cpu-vnni" in line
    assert not (tmp_path / "o.onnx").exists()
    with pytest.raises(InputError):
        Int8Config(target="x86")


def test_cli_summary_and_compare_say_target_and_host(cli: Cli, tmp_path: Path) -> None:
    s = sample("digits_cnn")
    out = tmp_path / "vnni.onnx"
    args = ("convert", s.model, "--data", s.calib, "--limit", "32", "-o", out)
    shown = cli.ok(*args, "--target", "cpu-vnni").stdout
    assert "Target cpu-vnni" in shown and "can saturate int16 pairs" in shown
    doc = json.loads(cli.ok(*args, "--force", "--json").stdout)
    assert doc["target"] == "cpu" and doc["x86_saturation"]["safe"] is True
    cli.ok(*args, "--force", "--target", "cpu-vnni")
    result = cli.ok(
        "compare", s.model, out, "--data", s.eval, "--runs", "2", "--limit", "8", "--json"
    )
    doc = json.loads(result.stdout)
    assert doc["host"]["int16_saturation"] == int16_pairs_saturate()
    assert doc["host"]["onnxruntime"] and doc["host"]["int8_isa"]
    assert doc["x86_saturation"]["safe"] is False and doc["warnings"]
    assert "int16 pairs" in result.stderr


@settings(max_examples=25)
@given(
    hnp.arrays(np.float32, (12, 5), elements=st.floats(-2, 2, width=32)),
    hnp.arrays(np.float32, (40, 12), elements=st.floats(-3, 3, width=32)),
)
def test_gptq_rounding_stays_pair_safe_and_never_moves_the_output_more(w, x) -> None:
    gram = x.astype(np.float64).T @ x
    plain, s0 = pair_safe_int8(w, 1, True, np.diag(gram))
    q, s1 = pair_safe_int8(w, 1, True, np.diag(gram), gram)
    assert pair_bound(q, 1).max(initial=0) <= PAIR_LIMIT
    np.testing.assert_array_equal(s0, s1)  # same scales: only the rounding changes

    def moved(q_: np.ndarray) -> np.ndarray:
        e = q_.astype(np.float64) * s1 - w.astype(np.float64)  # float64, as the choice is made
        return np.einsum("kc,kc->c", e, gram @ e)

    assert np.all(moved(q) <= moved(plain) * (1 + 1e-9) + 1e-12)


def test_gptq_rounding_halves_the_output_error_on_correlated_inputs() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2048, 96)) @ (rng.standard_normal((96, 96)) * 0.3 + np.eye(96))
    w = (rng.standard_normal((96, 48)) * 0.05).astype(np.float32)
    gram = x.T @ x
    plain, s0 = pair_safe_int8(w, 1, True, np.diag(gram))
    q, s1 = pair_safe_int8(w, 1, True, np.diag(gram), gram)
    err = [float(((x @ (qq * s - w)) ** 2).mean()) for qq, s in ((plain, s0), (q, s1))]
    assert err[1] < 0.7 * err[0]


def test_tables_keep_their_gram_sums_beside_them(tmp_path: Path) -> None:
    from quantcli.calibrate.table import gram_path, load_table, merge_tables, save_table
    from quantcli.calibration import calibrate_file

    s = sample("digits_cnn")
    halves = []
    for shard in ((0, 2), (1, 2)):
        table, _ = calibrate_file(s.model, str(s.calib), CalibrationConfig(limit=64, shard=shard))
        halves.append(table)
    assert halves[0].grams()  # the default target asks for them
    path = tmp_path / "t.json"
    save_table(halves[0], path)
    assert gram_path(path).exists() and "gram" in json.loads(path.read_text())
    loaded = load_table(path)
    for name, g in halves[0].grams().items():
        np.testing.assert_array_equal(loaded.channels[name].gram, g)
    merged = merge_tables(halves)
    name = next(iter(halves[0].grams()))
    np.testing.assert_allclose(
        merged.channels[name].gram, halves[0].grams()[name] + halves[1].grams()[name]
    )
    gram_path(path).unlink()
    with pytest.raises(InputError, match=r"gram\.npz"):
        load_table(path)


def test_reduce_range_reaches_the_blockwise_form_too(tmp_path: Path) -> None:
    s = sample("encoder")
    stored = {}
    for reduce_range in (False, True):
        out = tmp_path / f"b{reduce_range}.onnx"
        config = Int8Config(smooth=False, reduce_range=reduce_range)
        convert_int8_file(s.model, out, config, data_spec=str(s.calib))
        proto = onnx.load(out)
        nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
        assert nbits, "--no-smooth writes blockwise MatMulNBits for the encoder's FFN"
        inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
        stored[reduce_range] = np.abs(inits[nbits[0].input[1]].astype(np.int32) - 128).max()
    assert stored[False] > 63 >= stored[True]
