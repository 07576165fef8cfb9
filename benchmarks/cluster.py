"""Calibration memory against the number of samples, and the cost of running on Ray.

    python benchmarks/cluster.py            # writes benchmarks/results/cluster-<host kind>.json

1. Memory flat in the data: peak RSS of `quantcli calibrate` on EfficientNet-Lite0 from an
   .npz of 32 and of 512 samples (uncompressed, cut from the benchmark's calib.npz), and the
   same for the sample digit CNN. Target: 512 samples take at most 20 % more than 32.
2. Ray overhead: `quantcli calibrate --ray` on a local Ray cluster of this machine's CPUs
   (started here on 127.0.0.1, one node, like `ray start --head --num-cpus N`), against the
   one-process run, on 512 EfficientNet samples; the cluster is up before the timed run, as
   a user's is. Target: at most 1.3x the one-process wall time (the faster of numpy's
   default BLAS threads and one BLAS thread, which is what Ray gives each task). The tables
   must be byte-identical.

Needs the exported models (benchmarks/prepare.py -> ~/.cache/quantcli-bench) and Ray
(pip install -e ".[ray]"). Each command runs in its own process (benchmarks/proc.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from machine import machine_info
from models import DEFAULT_CACHE, REPO
from proc import run_tool

SIZES = (32, 512)
TIMEOUT_S = 1800
MAX_RSS_GB = 14


def _npz_subsets(source: Path, folder: Path, name: str) -> dict[int, Path]:
    """Uncompressed .npz files of the first N samples (cycled when the source has fewer)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    with np.load(source, mmap_mode="r") as data:
        x = data["input"]
        for n in SIZES:
            path = folder / f"{name}-{n}.npz"
            if not path.exists():
                rows = np.arange(n) % len(x)
                np.savez(path, input=np.ascontiguousarray(x[rows]))
            out[n] = path
    return out


def _calibrate(
    model: Path, data: Path, table: Path, *extra: str, env: dict[str, str] | None = None
) -> dict[str, Any]:
    cmd = ["quantcli", "calibrate", str(model), "--data", str(data), "-o", str(table), "--force"]
    full_env = None if env is None else {**os.environ, **env}
    return run_tool([*cmd, "--json", *extra], TIMEOUT_S, MAX_RSS_GB, env=full_env)


def memory(model: Path, subsets: dict[int, Path], work: Path) -> dict[str, Any]:
    runs = {n: _calibrate(model, path, work / f"mem-{n}.json") for n, path in subsets.items()}
    small, large = runs[SIZES[0]], runs[SIZES[-1]]
    growth = large["peak_rss_mb"] / small["peak_rss_mb"] - 1
    return {
        "runs": {str(n): r for n, r in runs.items()},
        "data_mb": {str(n): round(p.stat().st_size / 2**20, 1) for n, p in subsets.items()},
        "growth_pct": round(100 * growth, 1),
        "target_pct": 20,
        "met": bool(growth <= 0.20 and small["ok"] and large["ok"]),
    }


def _start_cluster(cpus: int) -> Any:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # join a 127.0.0.1 cluster as such
    from ray.cluster_utils import Cluster

    head = {"num_cpus": cpus, "node_ip_address": "127.0.0.1", "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    cluster.wait_for_nodes()
    return cluster


def _same(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


def ray_overhead(model: Path, data: Path, work: Path, cpus: int) -> dict[str, Any]:
    one = _calibrate(model, data, work / "one.json")
    # Ray runs each task's numpy on one BLAS thread (OMP_NUM_THREADS=1): time one process so
    # too, and compare with the faster of the two.
    one_blas1 = _calibrate(model, data, work / "one1.json", env={"OPENBLAS_NUM_THREADS": "1"})
    start = time.perf_counter()
    cluster = _start_cluster(cpus)
    started = time.perf_counter() - start
    try:
        warm = _calibrate(model, data, work / "warm.json", "--ray", cluster.address)
        ray = _calibrate(model, data, work / "ray.json", "--ray", cluster.address)
    finally:
        cluster.shutdown()
    pairs = [("one.json", "ray.json"), ("one.json", "one1.json")]
    if (work / "one.json.gram.npz").exists():
        pairs.append(("one.json.gram.npz", "ray.json.gram.npz"))
    missing = [b for a, b in pairs if not (work / a).exists() or not (work / b).exists()]
    same = None if missing else all(_same(work / a, work / b) for a, b in pairs)
    base = min(one["wall_s"], one_blas1["wall_s"])
    ratio = ray["wall_s"] / base
    return {
        "cpus": cpus,
        "cluster_start_s": round(started, 1),
        "one_process": one,
        "one_process_blas_1_thread": one_blas1,
        "ray_first": warm,  # workers start and import quantcli: a cold cluster's first job
        "ray": ray,
        "ratio": round(ratio, 2),
        "target_ratio": 1.3,
        "met": bool(ratio <= 1.3 and one["ok"] and one_blas1["ok"] and ray["ok"]),
        "load_average_after": os.getloadavg(),
        "tables_identical": same,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    effnet = args.cache / "efficientnet"
    if not (effnet / "model.onnx").exists():
        sys.exit(f"{effnet}/model.onnx is missing: run benchmarks/prepare.py first")
    info = machine_info()
    subsets = _npz_subsets(effnet / "calib.npz", args.cache / "cluster", "efficientnet")
    digits = _npz_subsets(
        REPO / "sample_models" / "digits_cnn.calib.npz", args.cache / "cluster", "digits"
    )
    work = Path(tempfile.mkdtemp(prefix="quantcli-cluster-bench-"))
    try:
        results = {
            "machine": info,
            "command": "python benchmarks/cluster.py",
            "memory": {
                "efficientnet": memory(effnet / "model.onnx", subsets, work),
                "digits_cnn": memory(REPO / "sample_models" / "digits_cnn.onnx", digits, work),
            },
            "ray_overhead": ray_overhead(effnet / "model.onnx", subsets[512], work, args.cpus),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = args.out or REPO / "benchmarks" / "results" / f"cluster-{info['host_kind']}.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=1))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
