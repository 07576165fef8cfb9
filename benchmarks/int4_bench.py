"""INT4 on real models: quantcli's defaults, budgets and presets against ONNX Runtime's
MatMulNBitsQuantizer (RTN, k_quant, HQQ, GPTQ) on the same model, text and host.

    .venv/bin/python benchmarks/int4_bench.py [--models smollm2,minilm] [--only a,b] [--reuse]
    .venv/bin/python benchmarks/int4_bench.py --models magika \\
        --out benchmarks/results/int4-magika-<host>.json
    .venv/bin/python benchmarks/int4_bench.py --render benchmarks/results/int4-<host>.json \\
        --docs docs/int4.md          # the measured section of docs/int4.md and its chart
    .venv/bin/python benchmarks/int4_bench.py --render benchmarks/results/int4-magika-<host>.json \\
        --docs docs/int4.md --block int4-magika

Models and data come from `benchmarks/prepare.py` (~/.cache/quantcli-bench). Each
conversion runs in its own child process (wall time and peak RSS, `proc.py`); every session
of one model is then timed in this process, interleaved (`measure.py`): SmolLM2 on a
128-token prompt and a 1-token step, MiniLM on one 128-token batch. HQQ needs torch, so
ONNX Runtime's HQQ runs with the export venv's python (`--torch-python`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from machine import host_kind, machine_info, snapshot_code
from measure import METRICS, file_bytes, latency, open_session, outputs, workloads
from models import DEFAULT_CACHE, REPO, SPECS, files
from proc import run_tool

HERE = Path(__file__).resolve().parent
Q4 = ["--bits", "4"]
DATA = ["--data", "CALIB"]

# name -> (tool, recipe). tool: float | ort | ort-torch | quantcli | quantcli-convert-only
LM = {
    "float": ("float", {}),
    "ort-rtn": ("ort", {"algorithm": "default"}),
    "ort-rtn-acc4": ("ort", {"algorithm": "default", "accuracy_level": 4}),
    "ort-k_quant": ("ort", {"algorithm": "k_quant", "accuracy_level": 4}),
    # ONNX Runtime's HQQ config takes no accuracy_level, so its nodes run at level 0; with
    # its float zero points level 4 changes nothing (int4_target.py --float-zero-points)
    "ort-hqq": ("ort-torch", {"algorithm": "hqq", "accuracy_level": 4}),
    "ort-gptq": ("ort-torch", {"algorithm": "gptq", "accuracy_level": 4}),
    "quantcli-nodata": ("quantcli", Q4),
    "quantcli": ("quantcli", [*Q4, *DATA]),
    "quantcli-budget-4.6": ("quantcli", [*Q4, *DATA, "--budget", "4.6"]),
    "quantcli-compact": ("quantcli", [*Q4, *DATA, "--compact-scales"]),
    "quantcli-budget-4.5-compact": (
        "quantcli",
        [*Q4, *DATA, "--budget", "4.5", "--compact-scales"],
    ),
    "quantcli-budget-5.5": ("quantcli", [*Q4, *DATA, "--budget", "5.5"]),
    "quantcli-budget-6.3": ("quantcli", [*Q4, *DATA, "--budget", "6.3"]),
    "quantcli-k-quant": ("quantcli", [*Q4, "--mix", "k-quant"]),
    "quantcli-acc0": ("quantcli", [*Q4, *DATA, "--accuracy-level", "0"]),
    "quantcli-qdq": ("quantcli", [*Q4, *DATA, "--format", "qdq"]),
    "quantcli-int8": ("quantcli-convert-only", ["--bits", "8", *DATA]),
}
# ONNX Runtime's GPTQ holds every MatMul input of every sample: 64 samples on MiniLM
# took 9 minutes here, so it gets 64 (SmolLM2 has 64 in all).
ENCODER = {
    k: (LM[k][0], LM[k][1] | {"limit": 64}) if k == "ort-gptq" else LM[k]
    for k in (
        "float",
        "ort-rtn",
        "ort-rtn-acc4",
        "ort-k_quant",
        "ort-hqq",
        "ort-gptq",
        "quantcli-nodata",
        "quantcli",
        "quantcli-budget-5.5",
        "quantcli-qdq",
        "quantcli-int8",
    )
} | {"quantcli-no-embeddings": ("quantcli", [*Q4, *DATA, "--no-embeddings"])}
# Magika: INT4 reaches only its two dense MatMuls (the byte embedding and the classifier);
# its Conv, most of the weights, stays float. INT8 (which takes the Conv too) is measured.
MAGIKA = {
    k: LM[k]
    for k in (
        "float",
        "ort-rtn",
        "ort-rtn-acc4",
        "ort-k_quant",
        "quantcli-nodata",
        "quantcli",
        "quantcli-budget-5.5",
        "quantcli-budget-6.3",
    )
} | {
    "quantcli-block16": ("quantcli", [*Q4, *DATA, "--block-size", "16"]),
    "quantcli-int8": ("quantcli", ["--bits", "8", *DATA]),
}
CONTENDERS = {"smollm2": LM, "minilm": ENCODER, "magika": MAGIKA}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def command(
    tool: str, recipe: Any, model: Path, calib: Path, out: Path, torch_py: str
) -> list[str]:
    if tool.startswith("ort"):
        py = torch_py if tool == "ort-torch" else sys.executable
        return [py, str(HERE / "int4_ort.py"), str(model), str(calib), str(out), json.dumps(recipe)]
    args = [str(calib) if a == "CALIB" else a for a in recipe]
    return [
        sys.executable,
        "-m",
        "quantcli",
        "convert",
        str(model),
        *args,
        "-o",
        str(out),
        "--force",
    ]


def bench(name: str, args: argparse.Namespace) -> dict[str, Any]:
    spec, f = SPECS[name], files(args.cache, name)
    entry: dict[str, Any] = {"title": spec.title, "task": spec.task, "contenders": {}}
    float_size = file_bytes(f.model)
    data = dict(np.load(f.eval))
    sessions, paths = {}, {}
    chosen = CONTENDERS[name]
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only or k == "float"}
    for who, (tool, recipe) in chosen.items():
        rec: dict[str, Any] = {"tool": tool, "recipe": recipe}
        entry["contenders"][who] = rec
        path = f.model
        if tool != "float":
            path = args.cache / "out-int4" / name / who / "model.onnx"
            path.parent.mkdir(parents=True, exist_ok=True)
            if args.reuse and path.exists() and not tool.startswith("quantcli"):
                rec["reused"] = True  # ONNX Runtime's output: its code is not under test
            else:
                for old in path.parent.iterdir():
                    old.unlink()
                cmd = command(tool, recipe, f.model, f.calib, path, args.torch_python)
                rec["convert"] = run_tool(cmd, args.timeout, args.max_rss_gb)
                log(f"  {who}: {rec['convert']}")
                if not rec["convert"]["ok"]:
                    continue
        rec["size_bytes"] = file_bytes(path)
        rec["size_ratio"] = round(rec["size_bytes"] / float_size, 4)
        if tool == "quantcli-convert-only":
            continue
        sessions[who], paths[who] = open_session(path, args.threads), path
    ref = outputs(sessions["float"], data, spec.task)
    for who, sess in sessions.items():
        got = ref if who == "float" else outputs(sess, data, spec.task)
        entry["contenders"][who]["metrics"] = METRICS[spec.task](ref, got, data)
        log(f"  {who}: {entry['contenders'][who]['metrics']}")
    names = [i.name for i in sessions["float"].get_inputs()]
    timing = latency(sessions, workloads(spec.task, data, names), args.rounds)
    for who in sessions:
        entry["contenders"][who]["latency"] = timing[who]
    entry["latency_reps"] = timing.get("_reps")
    return entry


# ------------------------------------------------------------------ rendering


EXTRA_COLUMNS = {"lm": ["top1_agreement"], "magika": ["top1_agreement", "confident_agreement"]}


def _metric(task: str) -> tuple[str, bool]:
    """(metric key, lower is better)."""
    if task == "magika":
        return ("accuracy", False)
    return ("perplexity", True) if task == "lm" else ("mean_cosine", False)


def pareto(points: list[tuple[float, float, str]], lower_better: bool) -> list[str]:
    """Names on the front: no other point is both smaller and at least as good."""
    front = []
    for size, value, name in points:
        dominated = any(
            s <= size and (v <= value if lower_better else v >= value) and (s, v) != (size, value)
            for s, v, _ in points
        )
        if not dominated:
            front.append(name)
    return front


def svg_chart(entry: dict[str, Any], title: str) -> str:
    """Size ratio (x) against the metric (y); quantcli in blue, ONNX Runtime in orange."""
    key, lower = _metric(entry["task"])
    pts = []
    for who, rec in entry["contenders"].items():
        if "metrics" in rec and who != "float":
            pts.append((rec["size_ratio"], rec["metrics"][key], who))
    base = entry["contenders"]["float"]["metrics"][key]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts] + [base]
    x0, x1 = 0.0, max(xs) * 1.1
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.1 or 0.01
    y0, y1 = y0 - pad, y1 + pad
    w, h, m = 720, 420, 60

    def sx(x: float) -> float:
        return m + (x - x0) / (x1 - x0) * (w - 2 * m)

    def sy(y: float) -> float:
        return h - m - (y - y0) / (y1 - y0) * (h - 2 * m)

    front = set(pareto(pts, lower))
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        'font-family="sans-serif" font-size="11">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
        f'<line x1="{m}" y1="{h - m}" x2="{w - m}" y2="{h - m}" stroke="black"/>',
        f'<line x1="{m}" y1="{m}" x2="{m}" y2="{h - m}" stroke="black"/>',
        f'<text x="{w / 2}" y="{h - 20}" text-anchor="middle">file size / float size</text>',
        f'<text x="15" y="{h / 2}" transform="rotate(-90 15 {h / 2})" text-anchor="middle">{key}'
        f" ({'lower' if lower else 'higher'} is better)</text>",
        f'<line x1="{m}" y1="{sy(base):.1f}" x2="{w - m}" y2="{sy(base):.1f}" stroke="gray" '
        f'stroke-dasharray="4 3"/><text x="{w - m}" y="{sy(base) - 4:.1f}" text-anchor="end" '
        f'fill="gray">float {base:.4g}</text>',
    ]
    for i in range(6):
        xv = x0 + (x1 - x0) * i / 5
        yv = y0 + (y1 - y0) * i / 5
        out.append(f'<text x="{sx(xv):.1f}" y="{h - m + 15}" text-anchor="middle">{xv:.2f}</text>')
        out.append(f'<text x="{m - 5}" y="{sy(yv) + 4:.1f}" text-anchor="end">{yv:.4g}</text>')
    ours = sorted(
        (p for p in pts if p[2] in front and p[2].startswith("quantcli")), key=lambda p: p[0]
    )
    if len(ours) > 1:
        line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y, _ in ours)
        out.append(f'<polyline points="{line}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>')
    for x, y, who in pts:
        color = "#1f77b4" if who.startswith("quantcli") else "#ff7f0e"
        weight = ' stroke="black"' if who in front else ""
        out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5" fill="{color}"{weight}/>')
        out.append(f'<text x="{sx(x) + 7:.1f}" y="{sy(y) - 5:.1f}">{who}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def markdown(res: dict[str, Any], chart_names: dict[str, str]) -> str:
    meta = res["meta"]
    commit = str(meta.get("code", {}).get("commit", meta["versions"].get("quantcli_git", "?")))
    lines = [
        f"Measured on {meta['host_kind']} ({meta['machine']['cpu']}, {meta['machine']['cores']} "
        f"cores, onnxruntime {meta['versions']['onnxruntime']}), quantcli at {commit[:10]}, "
        f"{meta['date']}, {meta['threads']} thread(s); reproduce with `{meta['command']}`. "
        'Convert time and memory: "reused" marks ONNX Runtime files kept from an earlier '
        "run (`--reuse`; the same onnxruntime), so they were not converted in this one; "
        "convert times are single runs on a 2-core host (noisy); peak RSS is the larger of "
        "wait4's maximum and the process tree's RSS polled every 50 ms, in MiB.",
        "",
    ]
    for name, entry in res["models"].items():
        key, lower = _metric(entry["task"])
        base = entry["contenders"]["float"]["metrics"][key]
        pts = [
            (r["size_ratio"], r["metrics"][key], w)
            for w, r in entry["contenders"].items()
            if "metrics" in r
        ]
        front = set(pareto(pts, lower))
        lines += [f"### {entry['title']}", ""]
        if name in chart_names:
            lines += [f"![size against {key}]({chart_names[name]})", ""]
        calls = ["prompt128", "step1"] if entry["task"] == "lm" else ["batch1"]
        extra = EXTRA_COLUMNS.get(entry["task"], [])
        head = ["setting", "MB", "x float", key, f"x float {key}"]
        head += [k.replace("_", " ") for k in extra]
        head += [f"{c} speed" for c in calls] + ["convert s", "convert peak RSS MiB"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for who, rec in entry["contenders"].items():
            conv = rec.get("convert", {})
            if conv and not conv.get("ok", True):
                lines.append(f"| {who} | failed: {conv.get('error', '')[:80]} |")
                continue
            row = [
                f"**{who}**" if who in front else who,
                f"{rec.get('size_bytes', 0) / 1e6:.1f}",
                f"{rec.get('size_ratio', 1):.3f}",
            ]
            if "metrics" in rec:
                value = rec["metrics"][key]
                row += [f"{value:.4g}", f"{value / base:.3f}"]
                row += [f"{rec['metrics'][k]:.4f}" for k in extra]
                for c in calls:
                    ratio = rec["latency"][c]["ratio_to_float"]
                    row.append(f"{1 / ratio:.2f}x ({rec['latency'][c]['median_ms']:.1f} ms)")
            else:
                row += ["-"] * (2 + len(extra) + len(calls))
            reused = "reused" if rec.get("reused") else "-"
            row += [f"{conv.get('wall_s', reused)}", f"{conv.get('peak_rss_mb', reused)}"]
            lines.append("| " + " | ".join(str(c) for c in row) + " |")
        lines += [
            "",
            "Bold: on the size/accuracy Pareto front. Speed: float latency / latency.",
            "",
        ]
    return "\n".join(lines)


def render(path: Path, docs: Path | None, block: str = "int4-bench", chart: bool = True) -> None:
    res = json.loads(path.read_text())
    charts = {}
    for name, entry in res["models"].items() if chart else ():
        svg = REPO / "docs" / f"int4-{name}-{res['meta']['host_kind']}.svg"
        svg.write_text(svg_chart(entry, f"{entry['title']}: size vs {_metric(entry['task'])[0]}"))
        charts[name] = svg.name
    fill_block(markdown(res, charts), docs, block)


def fill_block(text: str, docs: Path | None, block: str) -> None:
    """Print `text`, or put it between the `block` markers of `docs`."""
    if docs is None:
        print(text)
        return
    doc = docs.read_text()
    start, end = f"<!-- {block}:start -->", f"<!-- {block}:end -->"
    if start not in doc or end not in doc:
        raise SystemExit(f"{docs} has no {start} ... {end} block")
    before, rest = doc.split(start, 1)
    after = rest.split(end, 1)[1]
    docs.write_text(f"{before}{start}\n{text}\n{end}{after}")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default="smollm2,minilm")
    p.add_argument("--only", default="", help="comma-separated contenders (float is always run)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--out", type=Path)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--max-rss-gb", type=float, default=14)
    p.add_argument("--reuse", action="store_true", help="reuse ONNX Runtime's earlier outputs")
    p.add_argument("--allow-dirty", action="store_true", help="run uncommitted benchmarks/")
    p.add_argument("--torch-python", default="/work/venv-bench/bin/python")
    p.add_argument("--render", type=Path)
    p.add_argument("--docs", type=Path)
    p.add_argument("--block", default="int4-bench", help="the docs' marker to fill")
    p.add_argument("--no-chart", action="store_true", help="render the tables only")
    args = p.parse_args()
    if args.render:
        render(args.render, args.docs, args.block, chart=not args.no_chart)
        return
    args.only = [x for x in args.only.split(",") if x]
    kind, _ = host_kind()
    code = snapshot_code(args.allow_dirty)
    out = args.out or REPO / "benchmarks" / "results" / f"int4-{kind}.json"
    res: dict[str, Any] = {
        "meta": machine_info()
        | {
            "threads": args.threads,
            "rounds": args.rounds,
            "command": " ".join(["python", *sys.argv]),
            "code": code,
        },
        "models": {},
    }
    if out.exists() and args.only:  # merge into an earlier run
        old = json.loads(out.read_text())
        res["models"] = old.get("models", {})
    for name in args.models.split(","):
        log(f"{name}:")
        entry = bench(name, args)
        if args.only and name in res["models"]:
            merged = res["models"][name]
            merged["contenders"].update(entry["contenders"])
            entry = merged
        res["models"][name] = entry
        out.write_text(json.dumps(res, indent=1) + "\n")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
