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
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from machine import host_kind, machine_info, snapshot_code
from measure import METRICS, latency, open_session, outputs, workloads
from models import DEFAULT_CACHE, REPO, SPECS, files
from proc import run_tool

# The budgets of the tune issue: what a user would state for each model.
BUDGETS = {
    "efficientnet": ["--min-top1", "0.97"],
    "minilm": ["--min-cosine", "0.999"],
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
    for old in out.parent.iterdir():
        old.unlink()
    cmd = [sys.executable, "-m", "quantcli", "tune", str(f.model), "--data", str(f.calib)]
    cmd += ["--eval", str(f.eval), *BUDGETS[name], "-o", str(out), "--json"]
    cmd += ["--time-budget", str(args.time_budget), "--threads", "1", "--write-best"]
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
    }
    if out.exists():
        data = dict(np.load(f.eval))
        sessions = {"float": open_session(f.model, 1), "tuned": open_session(out, 1)}
        ref = outputs(sessions["float"], data, spec.task)
        entry["metrics"] = METRICS[spec.task](
            ref, outputs(sessions["tuned"], data, spec.task), data
        )
        names = [i.name for i in sessions["float"].get_inputs()]
        lat = latency(sessions, workloads(spec.task, data, names), args.rounds)
        lat.pop("_reps", None)
        entry["latency"] = lat
        entry["size_ratio"] = out.stat().st_size / f.model.stat().st_size
    log(f"  {name}: {json.dumps(entry.get('search'))} {entry.get('metrics')}")
    return entry


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
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    args.cache = args.cache.expanduser()
    kind, _ = host_kind()
    args.out = args.out or REPO / "benchmarks" / "results" / f"tune-{kind}.json"
    code = snapshot_code(args.allow_dirty)
    res: dict[str, Any] = {
        "meta": machine_info() | {"command": shlex.join([sys.executable, *sys.argv]), "code": code},
        "models": {},
    }
    start = time.time()
    for name in args.models.split(","):
        res["models"][name] = bench(name, args)
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    res["meta"]["total_s"] = round(time.time() - start, 1)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
