"""quantcli vs ONNX Runtime's quantizer on real models: accuracy, latency, size, time, memory.

    .venv/bin/python benchmarks/run.py [--models a,b] [--quick] [--cache DIR] [--out FILE]

Models come from `benchmarks/prepare.py` (export venv). Every conversion and calibration runs
in its own child process; all sessions of one model are timed in this process, interleaved.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import avx2
import numpy as np
from contenders import Contender, calibration_commands, contenders
from machine import host_kind, machine_info, snapshot_code
from measure import METRICS, file_bytes, latency, open_session, outputs, workloads
from models import DEFAULT_CACHE, FULL, QUICK, REPO, SPECS, files, summarize
from proc import run_tool

CALIB_SIZES = (32, 128, 512)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fail(res: dict, model: str, who: str, stage: str, error: str) -> str:
    res["failures"].append({"model": model, "contender": who, "stage": stage, "error": error})
    log(f"  {who}: {stage} failed: {error}")
    return f"failed: {error}"


def convert(c: Contender, f: Any, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    if args.reuse and out.exists():
        return {"ok": True, "reused": True}
    out.parent.mkdir(parents=True, exist_ok=True)
    for old in out.parent.iterdir():
        old.unlink()
    r = run_tool(c.command(f.model, f.calib, out), args.timeout, args.max_rss_gb)
    if r["ok"] and not out.exists():
        r |= {"ok": False, "error": f"exit 0 but no {out.name} written"}
    return r


def bench_model(name: str, args: argparse.Namespace, res: dict[str, Any]) -> None:
    spec, f = SPECS[name], files(args.cache, name)
    entry: dict[str, Any] = {"title": spec.title, "task": spec.task, "contenders": {}}
    res["models"][name] = entry
    if not f.ready():
        entry["skipped"] = f"not prepared: {f.model} or its .npz missing (run prepare.py)"
        log(f"{name}: {entry['skipped']}")
        return
    info = json.loads(f.info.read_text()) if f.info.exists() else {"exporter": "as shipped"}
    entry["info"] = info | summarize(f.model)
    for key, path in (("calib_samples", f.calib), ("eval_samples", f.eval)):
        with np.load(path) as z:
            entry["info"][key] = len(z[z.files[0]])
    entry["files"] = {"model": str(f.model), "calib": str(f.calib), "eval": str(f.eval)}
    log(f"{name}: converting")
    sessions, paths = {}, {}
    for c in contenders(spec, args.tune):
        if args.only and c.name not in args.only:
            continue
        rec: dict[str, Any] = {"tool": c.tool, "recipe": c.recipe}
        entry["contenders"][c.name] = rec
        path = f.model
        if c.tool != "float":
            path = args.cache / "out" / name / c.name.replace(":", "_") / "model.onnx"
            rec["convert"] = convert(c, f, path, args)
            if not rec["convert"]["ok"]:
                rec["status"] = fail(res, name, c.name, "convert", rec["convert"]["error"])
                continue
            log(f"  {c.name}: converted in {rec['convert'].get('wall_s', 0)} s")
        rec["size_bytes"] = file_bytes(path)
        try:
            sessions[c.name] = open_session(path, args.threads)
            paths[c.name] = path
        except Exception as e:
            rec["status"] = fail(res, name, c.name, "load", f"{type(e).__name__}: {e}"[:400])
    data = dict(np.load(f.eval))
    ref = None
    for cname, sess in list(sessions.items()):
        rec = entry["contenders"][cname]
        try:
            got = outputs(sess, data, spec.task)
            ref = got if ref is None else ref
            rec["metrics"] = METRICS[spec.task](ref, got, data)
            rec["status"] = "ok"
            log(f"  {cname}: {rec['metrics']}")
        except Exception as e:
            rec["status"] = fail(res, name, cname, "run", f"{type(e).__name__}: {e}"[:400])
            del sessions[cname]
    if args.avx2 and spec.task in avx2.TASKS:
        entry["avx2"] = avx2_accuracy(name, spec.task, f, paths, entry, ref, data, args, res)
    names = [i.name for i in sessions["float"].get_inputs()]
    lat = latency(sessions, workloads(spec.task, data, names), args.rounds)
    entry["latency_reps"] = lat.pop("_reps")
    for cname, wl in lat.items():
        entry["contenders"][cname]["latency"] = wl
    log(f"  latency: { {k: v for k, v in lat.items()} }")
    if "quantcli" in paths and spec.task in ("mnist", "imagenet") and not args.tune:
        entry["compare_check"] = compare_check(f, paths["quantcli"], entry, args)
    if spec.calib_bench and not args.quick and not args.tune and not args.no_calib:
        entry["calibration"] = bench_calibration(name, f, args, res)


def avx2_accuracy(
    name: str, task: str, f: Any, paths: dict, entry: dict, ref: Any, data: dict, args, res
) -> dict[str, Any]:
    """Each INT8 model's metrics as ONNX Runtime's AVX2 kernels compute them (qemu Haswell)."""
    out = args.cache / "out" / name / "avx2.npy"
    for cname, path in paths.items():
        rec = entry["contenders"][cname]
        if cname not in avx2.CONTENDERS or rec.get("status") != "ok":
            continue
        try:
            avx2.emulated_outputs(path, f.eval, task, out, args.timeout)
            rec["metrics_avx2"] = METRICS[task](ref, np.load(out), data)
            log(f"  {cname} on AVX2 kernels: {rec['metrics_avx2']}")
        except Exception as e:  # a failed emulation is a recorded failure, not a crash
            fail(res, name, cname, "avx2 emulation", f"{type(e).__name__}: {e}"[:400])
    return {"how": "qemu-user -cpu Haswell (AVX2, no VNNI): ONNX Runtime's AVX2 int8 kernels"}


def compare_check(f: Any, quant: Path, entry: dict, args: argparse.Namespace) -> dict[str, Any]:
    """`quantcli compare` against this harness: the same accuracy, latency medians close."""
    cmd = [
        sys.executable,
        "-m",
        "quantcli",
        "compare",
        str(f.model),
        str(quant),
        "--data",
        str(f.eval),
        "--json",
        "--runs",
        "60",
        "--threads",
        str(args.threads),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:]}
    doc = json.loads(done.stdout)
    cls = doc["outputs"][0]["classifier"]
    plain = {
        k: plain_loop(p, f.eval, args.threads) for k, p in (("float", f.model), ("quantcli", quant))
    }
    ours = entry["contenders"]["quantcli"]["metrics"]
    harness_lat = {
        k: entry["contenders"][k]["latency"]["batch1"]["median_ms"] for k in ("float", "quantcli")
    }
    compare_lat = {
        "float": doc["latency"]["float"]["median_ms"],
        "quantcli": doc["latency"]["quant"]["median_ms"],
    }
    return {
        "command": " ".join(["quantcli", *cmd[3:]]),
        "compare": {
            "top1_agreement": cls["top1_agreement"],
            "accuracy": cls["accuracy_quant"],
            "latency_ms": compare_lat,
        },
        "harness": {
            "top1_agreement": ours.get("top1_agreement", ours.get("agreement")),
            "accuracy": ours.get("accuracy"),
            "latency_ms": harness_lat,
        },
        "plain_loop_ms": plain,
    }


def plain_loop(model: Path, eval_npz: Path, threads: int, calls: int = 60) -> float:
    """Median ms of back-to-back calls on the first sample: the simplest timing loop."""
    sess = open_session(model, threads)
    with np.load(eval_npz) as z:
        feed = {i.name: z[i.name][:1] for i in sess.get_inputs()}
    for _ in range(5):
        sess.run(None, feed)
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t) * 1e3)
    return round(float(np.median(times)), 4)


def bench_calibration(name: str, f: Any, args: argparse.Namespace, res: dict) -> list[dict]:
    rows = []
    for n in CALIB_SIZES:
        table = args.cache / "out" / name / "calib" / f"table-{n}.json"
        table.parent.mkdir(parents=True, exist_ok=True)
        for tool, cmd in calibration_commands(f.model, f.calib, table, n).items():
            table.unlink(missing_ok=True)
            r = run_tool(cmd, args.timeout, args.max_rss_gb)
            if r["ok"] and not table.exists():
                r |= {"ok": False, "error": "exit 0 but no table written"}
            if not r["ok"]:
                r["status"] = fail(res, name, tool, f"calibrate {n}", r["error"])
            rows.append({"tool": tool, "samples": n} | r)
            log(f"  calibrate {tool} n={n}: {r}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help=f"comma list of {', '.join(FULL)}")
    ap.add_argument("--quick", action="store_true", help="digit CNNs only, fewer rounds (<5 min)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--out", type=Path, help="default benchmarks/results/HOST-KIND[-quick].json")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of every session")
    ap.add_argument("--rounds", type=int, help="latency rounds (default 21, quick 15)")
    ap.add_argument("--tune", action="store_true", help="measure the ort-tuned candidates")
    ap.add_argument("--reuse", action="store_true", help="keep converted models that exist")
    ap.add_argument("--no-calib", action="store_true", help="skip the calibration scaling runs")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per child process")
    ap.add_argument("--max-rss-gb", type=float, default=14, help="kill a child above this")
    ap.add_argument(
        "--avx2",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also measure INT8 accuracy on AVX2 kernels under qemu (default: on a VNNI x86 "
        "host with qemu-x86_64)",
    )
    ap.add_argument("--allow-dirty", action="store_true", help="run uncommitted code (diff kept)")
    ap.add_argument("--only", help="comma list of contenders to run (default: all; float always)")
    args = ap.parse_args()
    args.only = {"float", *args.only.split(",")} if args.only else None
    kind, host = host_kind()
    if args.avx2 is None:
        args.avx2 = avx2.available() and host["int16_saturation"] is False
    suffix = "-quick" if args.quick else ""
    args.out = args.out or REPO / "benchmarks" / "results" / f"{kind}{suffix}.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    code = snapshot_code(args.allow_dirty)
    args.cache = args.cache.expanduser()
    args.rounds = args.rounds or (15 if args.quick else 21)
    models = args.models.split(",") if args.models else QUICK if args.quick else FULL
    res: dict[str, Any] = {
        "meta": machine_info()
        | {
            "command": shlex.join([sys.executable, *sys.argv]),
            "threads": args.threads,
            "latency_rounds": args.rounds,
            "quick": args.quick,
            "tune": args.tune,
            "code": code,
            "avx2_emulated": args.avx2,
            "only": sorted(args.only) if args.only else None,
        },
        "models": {},
        "failures": [],
    }
    start = time.time()
    for name in models:
        bench_model(name, args, res)
        args.out.write_text(json.dumps(res, indent=1) + "\n")  # a cut run keeps what it has
    res["meta"]["total_s"] = round(time.time() - start, 1)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    log(f"wrote {args.out} ({res['meta']['total_s']} s, {len(res['failures'])} failures)")


if __name__ == "__main__":
    main()
