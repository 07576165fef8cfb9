"""Regenerate README.md's figures from runs, never by hand.

    .venv/bin/python benchmarks/readme.py [--quickstart] [--results benchmarks/results/KIND.json]

- `--quickstart` runs the README's first command in a temporary folder with the installed
  quantcli and puts what `compare` printed (with its host line) between the
  `<!-- quickstart-output -->` markers.
- The results table between `<!-- results-table -->` markers comes from one results file of
  `benchmarks/run.py` (the host kind and the commit are named under it).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from models import REPO

README = REPO / "README.md"


def replace_block(text: str, marker: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {marker} -->\n)(.*?)(<!-- /{marker} -->)", re.S)
    if not pattern.search(text):
        sys.exit(f"README.md has no <!-- {marker} --> ... <!-- /{marker} --> block")
    return pattern.sub(lambda m: m.group(1) + body + m.group(3), text)


def quickstart() -> str:
    """Run the quick start's calibrate, convert and compare; return compare's output."""
    samples = REPO / "sample_models"
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("digits_cnn.onnx", "digits_cnn.calib.npz", "digits_cnn.eval.npz"):
            shutil.copy(samples / name, Path(tmp) / name)
        q = [sys.executable, "-m", "quantcli"]
        calibrate = ["calibrate", "digits_cnn.onnx", "--data", "digits_cnn.calib.npz"]
        convert = ["convert", "digits_cnn.onnx", "--calibration", "digits.table.json"]
        compare = ["compare", "digits_cnn.onnx", "digits_int8.onnx"]
        steps = [
            [*q, *calibrate, "-o", "digits.table.json", "--force"],
            [*q, *convert, "-o", "digits_int8.onnx", "--force"],
            [*q, *compare, "--data", "digits_cnn.eval.npz", "--max-drop", "0.5"],
        ]
        for cmd in steps:
            done = subprocess.run(
                cmd, cwd=tmp, capture_output=True, text=True, env={"COLUMNS": "100", **_env()}
            )
            if done.returncode != 0:
                sys.exit(f"{' '.join(cmd[2:])} failed: {done.stderr.strip()}")
        return done.stdout


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "COLUMNS"}


def _contender(entry: dict, name: str) -> dict[str, Any]:
    return entry["contenders"].get(name, {})


def _speed(c: dict, call: str = "batch1") -> str:
    lat = c.get("latency", {}).get(call)
    return f"{1 / lat['ratio_to_float']:.1f}x" if lat else "-"


def _best_ort(entry: dict, key: str, higher: bool) -> dict:
    ort = [c for n, c in entry["contenders"].items() if n.startswith("ort-") and "metrics" in c]
    pick = max if higher else min
    return pick(ort, key=lambda c: c["metrics"].get(key, float("nan"))) if ort else {}


def results_table(res: dict[str, Any]) -> str:
    m, meta = res["models"], res["meta"]
    rows = []
    if "efficientnet" in m:
        e = m["efficientnet"]
        q, v, o = (_contender(e, "quantcli"), _contender(e, "quantcli-cpu-vnni"),
                   _best_ort(e, "top1_agreement", True))  # fmt: skip
        qa = q.get("metrics_avx2", q.get("metrics", {}))
        rows.append(
            f"| EfficientNet-Lite0, top-1 agreement | {q['metrics']['top1_agreement']:.3f} "
            f"({qa['top1_agreement']:.3f} on AVX2), {_speed(q)} | "
            f"{v['metrics']['top1_agreement']:.3f} "
            f"({v.get('metrics_avx2', {}).get('top1_agreement', float('nan')):.3f} on AVX2) | "
            f"{o['metrics']['top1_agreement']:.3f} "
            f"({o.get('metrics_avx2', {}).get('top1_agreement', float('nan')):.3f} on AVX2), "
            f"{_speed(o)} |"
        )
    if "minilm" in m:
        e = m["minilm"]
        q, v, o = (_contender(e, "quantcli"), _contender(e, "quantcli-cpu-vnni"),
                   _best_ort(e, "mean_cosine", True))  # fmt: skip
        rows.append(
            f"| all-MiniLM-L6-v2, cosine / NN agreement | {q['metrics']['mean_cosine']:.4f} / "
            f"{q['metrics']['nn_agreement']:.3f}, {_speed(q)} | "
            f"{v['metrics']['mean_cosine']:.4f} / {v['metrics']['nn_agreement']:.3f} | "
            f"{o['metrics']['mean_cosine']:.4f} / {o['metrics']['nn_agreement']:.3f}, "
            f"{_speed(o)} |"
        )
    if "smollm2" in m:
        e = m["smollm2"]
        f = _contender(e, "float")["metrics"]["perplexity"]
        q, v, o = (_contender(e, "quantcli"), _contender(e, "quantcli-cpu-vnni"),
                   _best_ort(e, "perplexity", False))  # fmt: skip
        rows.append(
            f"| SmolLM2-135M INT8, perplexity (float {f:.2f}) | {q['metrics']['perplexity']:.2f}, "
            f"{_speed(q, 'step1')} 1-token / {_speed(q, 'prompt128')} 128-token | "
            f"{v['metrics']['perplexity']:.2f} | {o['metrics']['perplexity']:.2f}, "
            f"{_speed(o, 'step1')} / {_speed(o, 'prompt128')} |"
        )
    for name, title in (("mnist", "MNIST CNN"), ("digits_sample", "README sample CNN")):
        if name not in m:
            continue
        e = m[name]
        fa = _contender(e, "float")["metrics"]["accuracy"]
        q, v, o = (_contender(e, "quantcli"), _contender(e, "quantcli-cpu-vnni"),
                   _best_ort(e, "accuracy", True))  # fmt: skip

        def acc(c: dict) -> str:
            avx2 = c.get("metrics_avx2", {}).get("accuracy")
            on_avx2 = f" ({100 * avx2:.2f} % on AVX2)" if avx2 is not None else ""
            return f"{100 * c['metrics']['accuracy']:.2f} %{on_avx2}"

        rows.append(
            f"| {title}, accuracy (float {100 * fa:.2f} %) | {acc(q)}, {_speed(q)} | {acc(v)} | "
            f"{acc(o)}, {_speed(o)} |"
        )
    head = (
        "| model | quantcli default (`--target cpu`) | quantcli `--target cpu-vnni` "
        "| ONNX Runtime (best of default / tuned) |\n|---|---|---|---|\n"
    )
    code = meta.get("code") or {}
    host = meta.get("host", {})
    note = (
        f"\nMeasured on host kind **{meta.get('host_kind', '?')}** ({meta['machine']['cpu']}, "
        f"{meta['machine']['cores']} cores, int8: {host.get('int8_isa', '?')}), commit "
        f"{str(code.get('commit', '?'))[:10]}, `{meta['command'].split('/')[-1]}`. Speed is "
        'float latency / quantized latency, batch 1, one thread. "on AVX2": the same file on '
        "ONNX Runtime's AVX2 int8 kernels (x86 without VNNI), run under qemu's Haswell model "
        "on this host (`benchmarks/avx2.py`); the default's figures are identical on every "
        "CPU by construction (docs/int8.md).\n"
    )
    return head + "\n".join(rows) + "\n" + note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quickstart", action="store_true")
    ap.add_argument("--results", type=Path)
    args = ap.parse_args()
    text = README.read_text()
    if args.quickstart:
        text = replace_block(text, "quickstart-output", "```\n" + quickstart() + "```\n")
    if args.results:
        text = replace_block(
            text, "results-table", results_table(json.loads(args.results.read_text()))
        )
    README.write_text(text)


if __name__ == "__main__":
    main()
