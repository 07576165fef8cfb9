"""`quantcli calibrate`, `merge` and `convert --calibration`, through the CLI."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from conftest import SAMPLE_NAMES, Cli, Sample, Tiny, sample

from quantcli.calibrate.config import METHODS
from quantcli.quantize.int8.config import Int8Config
from quantcli.quantize.int8.prepare import prepare_for_int8


def _table(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize("method", METHODS)
def test_calibrate_each_method(sample_model: Sample, method: str, tmp_path: Path, cli: Cli) -> None:
    out = tmp_path / "t.json"
    args = ["calibrate", sample_model.model, "-d", sample_model.calib, "-o", out]
    summary = json.loads(cli.ok(*args, "--method", method, "--limit", "24", "--json").stdout)
    table = _table(out)
    assert table["schema"] == "quantcli.calibration/1" and table["method"] == method
    assert table["samples"] == summary["samples"] == 24
    _, plan = prepare_for_int8(ir.load(sample_model.model), Int8Config())
    assert sorted(table["tensors"]) == sorted(plan.activations)
    assert sorted(t["name"] for t in summary["tensors"]) == sorted(plan.activations)
    for name, entry in table["tensors"].items():
        lo, hi = entry["range"]
        assert min(entry["min"], 0) <= lo <= 0 <= hi <= max(entry["max"], 0), name
        if method == "minmax":
            assert (lo, hi) == (min(entry["min"], 0), max(entry["max"], 0))


def test_calibrate_human_output(tmp_path: Path, cli: Cli) -> None:
    s = sample("digits_cnn")
    text = cli.ok("calibrate", s.model, "-d", s.calib, "-o", tmp_path / "t.json", "--limit", "8")
    assert "Calibrated" in text.stdout and "on 8 samples" in text.stdout
    assert text.stderr == ""


@pytest.fixture
def subset(tmp_path: Path) -> Callable[[str], Path]:
    """The first 40 calibration samples of a sample model, as their own .npz."""

    def make(name: str) -> Path:
        path = tmp_path / f"{name}.subset.npz"
        np.savez(path, input=sample(name).calib_input(40))
        return path

    return make


@pytest.mark.parametrize(
    ("name", "method"), list(zip(SAMPLE_NAMES, ("percentile", "entropy", "mse"), strict=True))
)
def test_shards_merge_to_the_single_run(
    name: str, method: str, subset: Callable[[str], Path], tmp_path: Path, cli: Cli
) -> None:
    s, data = sample(name), subset(name)
    base = ["calibrate", s.model, "-d", data, "--method", method]
    cli.ok(*base, "-o", tmp_path / "all.json")
    cli.ok(*base, "-o", tmp_path / "s0.json", "--shard", "1/2")
    cli.ok(*base, "-o", tmp_path / "s1.json", "--shard", "2/2")
    cli.ok("merge", tmp_path / "s1.json", tmp_path / "s0.json", "-o", tmp_path / "merged.json")
    whole, merged = _table(tmp_path / "all.json"), _table(tmp_path / "merged.json")
    assert _table(tmp_path / "s0.json")["samples"] == 20
    assert merged["samples"] == whole["samples"] == 40
    assert merged["shard"] is None
    assert merged["tensors"] == whole["tensors"]  # stats and chosen ranges, exactly


@pytest.mark.parametrize(
    ("name", "fmt"), [*((n, "auto") for n in SAMPLE_NAMES), ("encoder", "qdq"), ("mlp", "qdq")]
)
def test_convert_with_table_equals_convert_with_data(
    name: str, fmt: str, tmp_path: Path, cli: Cli
) -> None:
    s, table = sample(name), tmp_path / "t.json"
    common = ["--method", "minmax", "--limit", "16", "--format", fmt]
    cli.ok("calibrate", s.model, "-d", s.calib, "-o", table, *common)
    cli.ok("convert", s.model, "-o", tmp_path / "a.onnx", "--calibration", table, "--format", fmt)
    cli.ok("convert", s.model, "-o", tmp_path / "b.onnx", "--data", s.calib, *common)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def _npz(tiny: Tiny, **arrays: np.ndarray) -> Path:
    path = tiny.root / "bad.npz"
    np.savez(path, **arrays)
    return path


def _nan(n: int = 6) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal((n, 16)).astype(np.float32)
    x[3, 5] = np.nan
    return x


BAD_DATA = {
    "empty": (lambda t: _npz(t, x=np.zeros((0, 16), np.float32)), "holds no samples"),
    "wrong_name": (lambda t: _npz(t, data=np.zeros((4, 16), np.float32)), "'x' is missing"),
    "wrong_dtype": (lambda t: _npz(t, x=np.zeros((4, 16), np.int32)), "float32"),
    "text_dtype": (lambda t: _npz(t, x=np.array([["a"] * 16] * 4)), "float32"),
    "wrong_shape": (lambda t: _npz(t, x=np.zeros((4, 15), np.float32)), "[N, 16]"),
    "nan": (lambda t: _npz(t, x=_nan()), "sample 3 holds NaN"),
    "inf_activation": (
        lambda t: _npz(t, x=np.full((4, 16), 3e38, np.float32)),
        "NaN or Inf on sample 0",
    ),
    "missing": (lambda t: t.root / "nowhere.npz", "does not exist"),
    "not_npz": (lambda t: t.path("conv_only"), "unsupported data"),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data(case: str, tiny: Tiny, cli: Cli) -> None:
    make, message = BAD_DATA[case]
    path, out = tiny.path("gemm_mlp"), tiny.root / "t.json"
    line = cli.fails("calibrate", path, "-d", make(tiny), "-o", out)
    assert message in line
    assert not out.exists() and not [p for p in tiny.root.iterdir() if p.suffix == ".tmp"]


def test_bad_tables(tiny: Tiny, cli: Cli) -> None:
    gemm, conv = tiny.path("gemm_mlp"), tiny.path("conv_net")
    out = tiny.root / "out.onnx"
    line = cli.fails("convert", gemm, "-o", out, "--calibration", tiny.root / "none.json")
    assert "none.json does not exist" in line
    cli.ok("calibrate", conv, "-d", tiny.data(conv), "-o", tiny.root / "conv.json")
    line = cli.fails("convert", gemm, "-o", out, "--calibration", tiny.root / "conv.json")
    assert "made for another model (conv_net.onnx)" in line
    (tiny.root / "junk.json").write_text("{not json")
    assert "not valid JSON" in cli.fails(
        "convert", gemm, "-o", out, "--calibration", tiny.root / "junk.json"
    )
    assert not out.exists()


def test_calibrate_never_overwrites_its_inputs(tiny: Tiny, cli: Cli) -> None:
    path = tiny.path("gemm_mlp")
    data = tiny.data(path)
    before = path.read_bytes(), data.read_bytes()
    for target in (path, data):
        assert "never overwrites" in cli.fails(
            "calibrate", path, "-d", data, "-o", target, "--force"
        )
    cli.ok("calibrate", path, "-d", data, "-o", tiny.root / "t.json", "--shard", "1/2")
    line = cli.fails("merge", tiny.root / "t.json", "-o", tiny.root / "t.json", "--force")
    assert "never overwrites" in line
    assert (path.read_bytes(), data.read_bytes()) == before


def test_convert_never_overwrites_its_data(tiny: Tiny, cli: Cli) -> None:
    path = tiny.path("gemm_mlp")
    data = tiny.data(path)
    before = data.read_bytes()
    assert "never overwrites" in cli.fails("convert", path, "-d", data, "-o", data, "--force")
    assert data.read_bytes() == before


def test_table_without_smoothing_statistics_is_refused(tiny: Tiny, cli: Cli) -> None:
    """A table calibrated --no-smooth lacks the channel maxima convert's smoothing needs."""
    path, out = tiny.path("conv_net"), tiny.root / "out.onnx"  # QDQ convs, dynamic MatMul
    table = tiny.root / "t.json"
    cli.ok("calibrate", path, "-d", tiny.data(path), "-o", table, "--no-smooth")
    line = cli.fails("convert", path, "-o", out, "--calibration", table)
    assert "has no statistics for" in line and "--smooth" in line
    assert not out.exists()
    cli.ok("convert", path, "-o", out, "--calibration", table, "--no-smooth")
    assert out.exists()
