"""Where and with what a benchmark ran: CPU, instruction sets, library versions, date."""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from models import REPO

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def _cpu() -> dict[str, Any]:
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "flags": {f: f in flags for f in FLAGS}}


def _git() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "quantcli"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def host_kind() -> tuple[str, dict[str, Any]]:
    """A short name for the kind of int8 kernels this host has (results live per kind)."""
    from quantcli.evaluate.host import describe_host

    host = describe_host().to_dict()
    isa = host["int8_isa"]
    if host["machine"] in ("aarch64", "arm64"):
        kind = "arm64-dotprod" if "dot product" in isa and "no dot" not in isa else "arm64"
    elif host["int16_saturation"]:
        kind = "x86-avx2"  # AVX2 or AVX-512 without VNNI: int16 pair saturation
    elif "AMX" in isa:
        kind = "x86-amx"
    elif "VNNI" in isa:
        kind = "x86-" + isa.split(" + ")[0].lower()
    else:
        kind = "other"
    return kind, host


def machine_info() -> dict[str, Any]:
    versions = {"python": platform.python_version()}
    for pkg in ("numpy", "onnx", "onnxruntime", "onnx-ir", "quantcli"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    versions["quantcli_git"] = _git()
    kind, host = host_kind()
    return {
        "host_kind": kind,
        "host": host,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _cpu()
        | {
            "os": platform.platform(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        },
        "versions": versions,
    }


def snapshot_code(allow_dirty: bool) -> dict[str, Any]:
    """Pin the code under test for the whole run: quantcli/ as committed at HEAD.

    Children import quantcli from an extracted copy of HEAD (PYTHONPATH), so neither edits
    during a 20-minute run nor uncommitted work in the tree reach the figures. The harness
    itself (benchmarks/) runs from the tree: uncommitted changes there are refused unless
    allowed, and then kept with the results.
    """

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True).stdout

    dirty = git("status", "--porcelain", "-uno", "--", "benchmarks").strip()
    if dirty and not allow_dirty:
        sys.exit("uncommitted changes in benchmarks/: commit them or pass --allow-dirty")
    copy = Path(tempfile.mkdtemp(prefix="quantcli-bench-code-"))
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "HEAD", "quantcli"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(copy)], input=archive, check=True)
    paths = [str(copy), os.environ.get("PYTHONPATH", "")]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    diff = git("diff", "HEAD", "--", "benchmarks") if dirty else ""
    return {
        "commit": git("rev-parse", "HEAD").strip(),
        "dirty": bool(dirty),
        "diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if dirty else None,
        "diff": diff or None,
    }
