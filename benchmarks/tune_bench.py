"""`quantcli tune` on the real models: does the search meet each budget, how fast is the
winner, and what did the search cost? Results: benchmarks/results/tune-HOST-KIND.json.

    .venv/bin/python benchmarks/tune_bench.py [--models efficientnet,minilm,smollm2]

Each search runs as the CLI in its own process (wall time, peak RSS); the winner is then
measured by this harness exactly like run.py's contenders (task metrics on the evaluation
set, interleaved latency against float), so its figures sit beside ONNX Runtime's.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from machine import host_kind, machine_info, snapshot_code
from measure import BATCH, METRICS, latency, open_session, outputs, workloads
from models import DEFAULT_CACHE, REPO, SPECS, files
from proc import run_tool

# The budgets of the tune issue: what a user would state for each model.
BUDGETS = {
    "efficientnet": ["--min-top1", "0.97"],
    "minilm": [
        "--metric",
        "quantcli.evaluate.embedding_metrics:NeighbourAgreement",
        "--metric-gate",
        "nn_agreement>=0.98",
    ],
    "smollm2": [
        "--metric",
        "quantcli.evaluate.lm_metrics:Perplexity",
        "--metric-gate",
        "perplexity_ratio<=1.03",
    ],
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench(name: str, args: argparse.Namespace) -> dict[str, Any]:
    spec, f = SPECS[name], files(args.cache, name)
    out = args.cache / "out" / name / "tune" / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    for old in out.parent.iterdir():  # a killed search may have left its work folder
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    cmd = [sys.executable, "-m", "quantcli", "tune", str(f.model), "--data", str(f.calib)]
    cmd += ["--eval", str(f.eval), *BUDGETS[name], "-o", str(out), "--json"]
    cmd += ["--time-budget", str(args.time_budget), "--threads", "1", "--write-best"]
    # Scored in the harness's batches: dynamic int8 gives each run's activations one scale,
    # so a transformer's accuracy depends on the batching (SmolLM2: a model tune met at
    # perplexity 1.026x one window per run measured 1.045x in windows of 4).
    cmd += ["--batch-size", str(BATCH[spec.task])]
    log(f"{name}: {shlex.join(cmd[2:])}")
    stdout = out.parent / "tune.json"
    r = run_tool(cmd, args.time_budget + 1800, args.max_rss_gb, stdout=stdout)
    entry: dict[str, Any] = {"command": shlex.join(["quantcli", *cmd[3:]]), "run": r}
    if not stdout.exists() or not stdout.read_text().strip():
        return entry
    doc = json.loads(stdout.read_text())
    trials = doc["trials"]
    entry["search"] = {
        "found": doc["found"],
        "stopped": doc["stopped"],
        "held_back": doc["held_back"],
        "trials": len(trials),
        "full_set_evaluations": sum(1 for t in trials if not t["subset"] and t["seconds"] > 0),
        "subset_evaluations": sum(1 for t in trials if t["subset"] and t["seconds"] > 0),
        "groups": len(doc["groups"]),
        "best_formats": _count(doc["best"]["formats"]) if doc["best"] else None,
        "best_budget": doc["best"]["score"]["gates"] if doc["best"] else None,
        # every trial, compact: what the search spent its time on
        "log": [
            {
                "stage": t["stage"],
                "moved": sum(1 for rung in t["assignment"] if rung),
                "subset": t["subset"],
                "passed": t["passed"],
                "speedup": t["speedup"],
                "seconds": t["seconds"],
                "gates": {g["name"]: g["value"] for g in t["score"]["gates"]},
            }
            for t in trials
        ],
    }
    if out.exists():
        entry |= measured(out, f, spec, args)
    log(f"  {name}: {json.dumps(entry.get('search'))} {entry.get('metrics')}")
    if args.nncf_python and Path(args.nncf_python).exists():
        entry["nncf"] = nncf(name, f, spec, args)
    return entry


def nncf(name: str, f: Any, spec: Any, args: argparse.Namespace) -> dict[str, Any]:
    """NNCF's quantize_with_accuracy_control on the same model, data and budget."""
    out = args.cache / "out" / name / "nncf" / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    for old in out.parent.iterdir():
        old.unlink()
    tool = str(Path(__file__).with_name("nncf_tool.py"))
    cmd = [args.nncf_python, tool, str(f.model), str(f.calib), str(f.eval), str(out), spec.task]
    log(f"{name}: nncf")
    stdout = out.parent / "nncf.json"
    r = run_tool(cmd, args.time_budget + 1800, args.max_rss_gb, stdout=stdout)
    entry: dict[str, Any] = {"run": r}
    lines = stdout.read_text().strip().splitlines() if stdout.exists() else []
    if lines and lines[-1].startswith("{"):
        entry["search"] = json.loads(lines[-1])
    if r["ok"] and out.exists():
        entry |= measured(out, f, spec, args)
    log(f"  {name} nncf: {entry.get('search')} {entry.get('metrics')}")
    return entry


def measured(model: Path, f: Any, spec: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Task metrics on the evaluation set and latency interleaved with float, as run.py."""
    data = dict(np.load(f.eval))
    sessions = {"float": open_session(f.model, 1), "quant": open_session(model, 1)}
    ref = outputs(sessions["float"], data, spec.task)
    metrics = METRICS[spec.task](ref, outputs(sessions["quant"], data, spec.task), data)
    if spec.task == "lm":
        metrics["perplexity_float"] = METRICS["lm"](ref, ref, data)["perplexity"]
        metrics["perplexity_ratio"] = metrics["perplexity"] / metrics["perplexity_float"]
    names = [i.name for i in sessions["float"].get_inputs()]
    lat = latency(sessions, workloads(spec.task, data, names), args.rounds)
    lat.pop("_reps", None)
    size = model.stat().st_size / f.model.stat().st_size
    return {"metrics": metrics, "latency": lat, "size_ratio": size}


# ------------------------------------------------------------------ rendering

# task -> (what the budget reads, is it met)
MET = {
    "imagenet": ("top-1 agreement >= 0.97", lambda m: m["top1_agreement"] >= 0.97),
    "embedding": ("NN agreement >= 0.98", lambda m: m["nn_agreement"] >= 0.98),
    "lm": ("perplexity <= 1.03x float", lambda m: m["perplexity_ratio"] <= 1.03),
}


def _accuracy(task: str, m: dict[str, float]) -> str:
    if task == "imagenet":
        return f"top-1 agr. {m['top1_agreement']:.3f}"
    if task == "embedding":
        return f"cosine {m['mean_cosine']:.4f}, NN agr. {m['nn_agreement']:.3f}"
    return f"ppl {m['perplexity']:.2f} ({m['perplexity_ratio']:.3f}x)"


def _speed(lat: dict[str, Any]) -> str:
    return ", ".join(f"{1 / v['ratio_to_float']:.2f}x {k}" for k, v in lat.items() if k != "float")


def _row(model: str, task: str, tool: str, e: dict[str, Any], cost: str) -> str:
    if "metrics" not in e:
        why = e.get("run", {}).get("error") or "no model written"
        return f"| {model} | {tool} | no | {why} | | | {cost} |"
    met = "yes" if MET[task][1](e["metrics"]) else "**no**"
    lat = e["latency"].get("quant", e["latency"])  # ours: per model; run.py's: per workload
    speed = _speed(lat)
    return (
        f"| {model} | {tool} | {met} | {_accuracy(task, e['metrics'])} | {speed} "
        f"| {e['size_ratio']:.2f} | {cost} |"
    )


def _ort_best(ort: dict[str, Any], name: str, task: str) -> tuple[str, dict[str, Any]] | None:
    entry = ort.get("models", {}).get(name)
    if not entry:
        return None
    found = [
        (k, c) for k, c in entry["contenders"].items() if k.startswith("ort") and "metrics" in c
    ]
    key = {"imagenet": "top1_agreement", "embedding": "mean_cosine", "lm": "perplexity"}[task]
    pick = (min if task == "lm" else max)(found, key=lambda kc: kc[1]["metrics"][key], default=None)
    if pick is None:
        return None
    k, c = pick
    metrics = dict(c["metrics"])
    if task == "lm":
        metrics["perplexity_ratio"] = (
            metrics["perplexity"] / entry["contenders"]["float"]["metrics"]["perplexity"]
        )
    return k, {
        "metrics": metrics,
        "latency": c["latency"],
        "size_ratio": c["size_bytes"] / entry["contenders"]["float"]["size_bytes"],
    }


def render(res: dict[str, Any], ort: dict[str, Any] | None, ort_path: str) -> str:
    meta = res["meta"]
    code = meta.get("code", {})
    rerun = meta.get("nncf_rerun")
    nncf_note = (
        f" NNCF's rows come from a rerun at {str(rerun['code'].get('commit', '?'))[:10]}, "
        f"{rerun['date']}: `{rerun['command'].split('/')[-1]}`."
        if rerun
        else ""
    )
    lines = [
        f"Measured on `{meta.get('host_kind', '?')}` ({meta['machine']['cpu']}, "
        f"{meta['machine']['cores']} cores), quantcli at {str(code.get('commit', '?'))[:10]} "
        f"(each row names its own run's), {meta['date']}: "
        f"`{meta['command'][meta['command'].find('tune_bench.py') :]}`. "
        "Each search runs as the CLI in its own process (the commands are below the "
        "table); the winner, NNCF's model and ONNX Runtime's best are then measured "
        "alike: task metrics on the evaluation set, latency as the median of interleaved "
        "runs against float (speed = float time / model time). "
        + (
            f"ONNX Runtime's best is from `{ort_path}` (commit "
            f"{str(ort['meta'].get('code', {}).get('commit', '?'))[:10]})."
            if ort
            else ""
        )
        + nncf_note,
        "",
        "| model | tool | budget met | accuracy | speed vs float | size vs float | search cost |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in res["models"].items():
        spec = SPECS[name]
        s = e.get("search", {})
        run = e.get("run", {})
        cost = (
            f"{s.get('trials', '?')} trials ({s.get('full_set_evaluations', '?')} full, "
            f"{s.get('subset_evaluations', '?')} subset), {run.get('wall_s', 0) / 60:.1f} min, "
            f"{run.get('peak_rss_mb', 0):.0f} MB, quantcli at {str(e.get('code', '?'))[:7]}"
        )
        title = f"{spec.title} ({MET[spec.task][0]})"
        lines.append(_row(title, spec.task, "quantcli tune", e, cost))
        n = e.get("nncf")
        if n:
            ns = n.get("search", {})
            nrun = n.get("run", {})
            ncost = (
                f"{ns.get('validations', '?')} validations, {nrun.get('wall_s', 0) / 60:.1f} "
                f"min, {nrun.get('peak_rss_mb', 0):.0f} MB"
            )
            lines.append(
                _row(title, spec.task, f"NNCF {ns.get('nncf', '')} accuracy control", n, ncost)
            )
        best = _ort_best(ort, name, spec.task) if ort else None
        if best:
            lines.append(
                _row(
                    title,
                    spec.task,
                    f"ONNX Runtime best (`{best[0]}`)",
                    best[1],
                    "settings tried by hand",
                )
            )
    lines += [
        "",
        "The harness evaluates in batches (`measure.py` BATCH: 25 images, 50 paragraphs, 4 "
        "text windows) and `tune` is given the same `--batch-size`: dynamic int8 gives each "
        "run's activations one scale, so a transformer's accuracy depends on how its "
        "samples are batched (ranking trials still run one sample at a time).",
        "",
        "Commands (paths shortened):",
        "",
    ]
    for name, e in res["models"].items():
        command = e.get("command", "").replace(str(Path.home()), "~")
        lines.append(f"- {name}: `{command}`")
    return "\n".join(lines) + "\n"


def _count(formats: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for fmt in formats.values():
        counts[fmt] = counts.get(fmt, 0) + 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="efficientnet,minilm,smollm2")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--time-budget", type=float, default=900, help="seconds per search")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--max-rss-gb", type=float, default=14)
    ap.add_argument("--allow-dirty", action="store_true")
    ap.add_argument(
        "--nncf-python",
        default="/work/venv-nncf/bin/python",
        help="python of a venv with nncf (skipped if missing)",
    )
    ap.add_argument("--out", type=Path)
    ap.add_argument("--merge", action="store_true", help="keep the other models' entries")
    ap.add_argument(
        "--nncf-only",
        action="store_true",
        help="rerun only NNCF into an existing results file (its run is recorded apart)",
    )
    ap.add_argument("--render", type=Path, help="a tune results file: write docs/tune.md's table")
    ap.add_argument(
        "--ort", type=Path, help="run.py results of the same host (ONNX Runtime's best)"
    )
    args = ap.parse_args()
    if args.render:
        from readme import replace_block

        ort = json.loads(args.ort.read_text()) if args.ort else None
        table = render(json.loads(args.render.read_text()), ort, str(args.ort or ""))
        doc = REPO / "docs" / "tune.md"
        doc.write_text(replace_block(doc.read_text(), "tune-results", table))
        return
    args.cache = args.cache.expanduser()
    kind, _ = host_kind()
    args.out = args.out or REPO / "benchmarks" / "results" / f"tune-{kind}.json"
    code = snapshot_code(args.allow_dirty)
    if args.nncf_only:
        res = json.loads(args.out.read_text())
        res["meta"]["nncf_rerun"] = machine_info() | {
            "command": shlex.join([sys.executable, *sys.argv]),
            "code": code,
        }
        for name in args.models.split(","):
            spec, f = SPECS[name], files(args.cache, name)
            res["models"][name]["nncf"] = nncf(name, f, spec, args)
            args.out.write_text(json.dumps(res, indent=1) + "\n")
        return
    res: dict[str, Any] = {
        "meta": machine_info() | {"command": shlex.join([sys.executable, *sys.argv]), "code": code},
        "models": {},
    }
    if args.merge and args.out.exists():  # rerun some models, keep the others' entries
        res["models"] = json.loads(args.out.read_text())["models"]
        for entry in res["models"].values():
            entry.setdefault("code", json.loads(args.out.read_text())["meta"]["code"]["commit"])
    start = time.time()
    for name in args.models.split(","):
        res["models"][name] = bench(name, args) | {"code": code["commit"]}
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    res["meta"]["total_s"] = round(time.time() - start, 1)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
