"""The CLI contract: help, version, exit codes, one-line errors, one JSON document."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import Cli, Tiny, sample

import quantcli.inspect
from quantcli import __version__

COMMANDS = ("inspect", "calibrate", "merge", "convert", "compare")


def _script() -> str:
    """The installed console script of the running environment."""
    local = Path(sys.executable).with_name("quantcli")
    found = str(local) if local.exists() else shutil.which("quantcli")
    assert found, "the quantcli console script is not installed"
    return found


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help(command: str, cli: Cli) -> None:
    args = [command, "--help"] if command else ["--help"]
    text = cli.ok(*args).stdout
    assert f"Usage: quantcli {command}".strip() in " ".join(text.split())
    if not command:
        assert all(c in text for c in COMMANDS)
    assert cli.ok(*args[:-1], "-h").stdout == text


def test_version(cli: Cli) -> None:
    assert cli.ok("--version").stdout == f"quantcli {__version__}\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["convert", "m.onnx"], "Missing option '--output'"),
        (["convert", "m.onnx", "-o", "x.onnx", "--bits", "abc"], "Invalid value for '--bits'"),
        (["calibrate", "m.onnx", "-o", "t.json", "-d", "x.npz", "--limit", "0"], "'--limit'"),
        (["convert", "m.onnx", "-o", "x.onnx", "--nope"], "No such option"),
        (["convrt", "m.onnx"], "No such command 'convrt'"),
    ],
)
def test_usage_errors_are_one_line(args: list[str], message: str, cli: Cli) -> None:
    assert message in cli.fails(*args)


def _setup_existing(t: Tiny) -> list:
    (t.root / "out.onnx").write_bytes(b"x")
    return ["convert", t.path("gemm_mlp"), "-o", t.root / "out.onnx", "--dynamic"]


def _other_model_tables(t: Tiny) -> list:
    gemm, mm = t.path("gemm_mlp"), t.path("conv_net")
    Cli().ok("calibrate", gemm, "-d", t.data(gemm), "-o", t.root / "a.json")
    Cli().ok("calibrate", mm, "-d", t.data(mm), "-o", t.root / "b.json")
    return ["merge", t.root / "a.json", t.root / "b.json", "-o", t.root / "m.json"]


def _same_shard_twice(t: Tiny) -> list:
    gemm = t.path("gemm_mlp")
    Cli().ok("calibrate", gemm, "-d", t.data(gemm), "-o", t.root / "a.json", "--shard", "1/2")
    shutil.copy(t.root / "a.json", t.root / "b.json")
    shutil.copy(t.root / "a.json.gram.npz", t.root / "b.json.gram.npz")  # its x x^T sums
    return ["merge", t.root / "a.json", t.root / "b.json", "-o", t.root / "m.json"]


def _convert(*extra: object) -> Callable[[Tiny], list]:
    return lambda t: ["convert", t.path("gemm_mlp"), "-o", t.root / "out.onnx", *extra]


def _calibrate(*extra: object) -> Callable[[Tiny], list]:
    def args(t: Tiny) -> list:
        path = t.path("gemm_mlp")
        return ["calibrate", path, "-d", t.data(path), "-o", t.root / "t.json", *extra]

    return args


ERRORS: dict[str, tuple[Callable[[Tiny], list], str]] = {
    "output_exists": (_setup_existing, "already exists"),
    "output_is_input": (
        lambda t: _convert("--dynamic", "--force", "-o", t.root / "gemm_mlp.onnx")(t),
        "never overwrites",
    ),
    "output_folder_missing": (_convert("--dynamic", "-o", "/no/such/dir/x.onnx"), "does not exist"),
    "bits_3": (_convert("--bits", "3"), "--bits 3 is not supported"),
    "int8_without_ranges": (_convert(), "INT8 needs activation ranges"),
    "dynamic_with_data": (_convert("--dynamic", "--data", "random"), "--dynamic"),
    "bad_format": (_convert("--data", "random", "--format", "fp8"), "--format 'fp8'"),
    "tensorrt_qoperator": (
        _convert("--data", "random", "--target", "tensorrt", "--format", "qoperator"),
        "tensorrt",
    ),
    "int4_option_on_int8": (_convert("--data", "random", "--block-size", "64"), "INT4 options"),
    "bad_method": (_calibrate("--method", "magic"), "method 'magic'"),
    "bad_percentile": (_calibrate("--method", "percentile", "--percentile", "30"), "--percentile"),
    "bad_shard": (_calibrate("--shard", "3/2"), "shard"),
    "bad_preprocess": (_calibrate("--preprocess", "zoom=2"), "unknown key 'zoom'"),
    "merge_other_models": (_other_model_tables, "different models"),
    "merge_same_shard": (_same_shard_twice, "same shard appears twice"),
    "calibrate_over_model": (
        lambda t: _calibrate("--force", "-o", t.root / "gemm_mlp.onnx")(t),
        "never overwrites",
    ),
}


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root (folders too: a temp folder left behind counts), with contents."""
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in root.rglob("*")
    }


@pytest.mark.parametrize("case", ERRORS)
def test_error_paths_exit_2_with_one_line(case: str, tiny: Tiny, cli: Cli) -> None:
    make, message = ERRORS[case]
    args = make(tiny)  # writes the case's inputs
    before = _snapshot(tiny.root)
    assert message in cli.fails(*args)
    assert _snapshot(tiny.root) == before, "a failed command changed, removed or wrote files"


def test_shape_in_messages_is_not_eaten_as_markup(tiny: Tiny, cli: Cli) -> None:
    np.savez(tiny.root / "bad.npz", input=np.zeros((4, 63), np.float32))
    mlp = sample("mlp").model  # input [batch, 64]: rich would read "[batch, 64]" as a tag
    line = cli.fails("calibrate", mlp, "-d", tiny.root / "bad.npz", "-o", tiny.root / "t.json")
    assert "[batch, 64]" in line


def test_json_is_one_document(tiny: Tiny, cli: Cli) -> None:
    path = tiny.path("gemm_mlp")
    data = tiny.data(path)
    runs = {
        "inspect": ["inspect", path],
        "calibrate": ["calibrate", path, "-d", data, "-o", tiny.root / "t.json", "--shard", "1/2"],
        "calibrate2": ["calibrate", path, "-d", data, "-o", tiny.root / "u.json", "--shard", "2/2"],
        "merge": ["merge", tiny.root / "t.json", tiny.root / "u.json", "-o", tiny.root / "m.json"],
        "int8": [
            "convert",
            path,
            "-o",
            tiny.root / "q8.onnx",
            "--calibration",
            tiny.root / "m.json",
        ],
        "int4": ["convert", path, "-o", tiny.root / "q4.onnx", "--bits", "4", "--block-size", "16"],
    }
    docs = {}
    for name, args in runs.items():
        stdout = cli.ok(*args, "--json").stdout
        assert stdout.startswith("{") and stdout.endswith("}\n")
        docs[name] = json.loads(stdout)  # fails on any text around the document
    assert docs["inspect"]["schema"] == "quantcli.inspect/1"
    assert docs["merge"]["samples"] == docs["calibrate"]["samples"] + docs["calibrate2"]["samples"]
    for name in ("int8", "int4"):
        assert docs[name]["schema"] == "quantcli.convert/1"
        assert Path(docs[name]["output"]).is_file() and docs[name]["quantized_total"] == 2


def test_unexpected_exception_is_exit_3(
    tiny: Tiny, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: object) -> None:
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(quantcli.inspect, "inspect_model", boom)
    result = cli("inspect", tiny.path("gemm_mlp"))
    assert result.exit_code == 3 and result.stdout == ""
    assert "internal error (ZeroDivisionError)" in result.stderr
    assert "Traceback" not in result.stderr
    crash = Path(result.stderr.split("saved to ")[1].split()[0])
    assert "ZeroDivisionError: boom" in crash.read_text()
    crash.unlink()
    debug = cli("--debug", "inspect", tiny.path("gemm_mlp"))
    assert debug.exit_code == 3 and "Traceback" in debug.stderr


def test_installed_script_inspect_json() -> None:
    mlp = sample("mlp").model
    done = subprocess.run(
        [_script(), "inspect", str(mlp), "--json"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["path"] == str(mlp) and doc["op_types"] == {"Gemm": 3, "Relu": 2}


def test_installed_script_failing_convert(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    done = subprocess.run(
        [_script(), "convert", str(tmp_path / "missing.onnx"), "-o", str(out), "--dynamic"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    assert "missing.onnx does not exist" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


def test_compare_says_slower_when_the_quantized_model_is_slower() -> None:
    from quantcli.cli.compare_cmd import render

    doc = {
        "outputs": [],
        "models": {"float": {"size_bytes": 100}, "quant": {"size_bytes": 50}, "size_ratio": 0.5},
        "latency": {
            "speedup": 0.5,
            "speedup_q1": 0.4,
            "speedup_q3": 0.6,
            "float": {"median_ms": 1.0, "p90_ms": 1.1, "runs": 3},
            "quant": {"median_ms": 2.0, "p90_ms": 2.2, "runs": 3},
        },
        "gates": [],
    }
    from quantcli.cli import common

    with common.out.capture() as captured:
        render(doc)
    text = captured.get()
    assert "2.00x slower" in text and "faster" not in text


def test_a_terminated_tune_leaves_no_work_folder_behind(tmp_path: Path) -> None:
    """SIGTERM (a CI timeout, a killed job) unwinds like an error: the search's temporary
    folder and half-written files go, and the exit code says it was terminated."""
    import signal
    import time

    s = sample("digits_cnn")
    out = tmp_path / "t.onnx"
    args = [_script(), "tune", str(s.model), "--data", str(s.calib), "--eval", str(s.eval)]
    args += ["--min-cosine", "0.999999", "--runs", "5", "-o", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".quantcli-tune-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".quantcli-tune-*")), "the search never started"
    time.sleep(1.0)  # inside the search
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    assert not list(tmp_path.glob(".quantcli-tune-*"))
    assert not out.exists()
