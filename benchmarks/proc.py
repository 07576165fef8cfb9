"""Run one tool in its own child process: wall time, peak RSS, and a memory/time watchdog."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _rss_bytes(pid: int) -> int:
    """Resident set of a process and its descendants (the CLI may spawn workers)."""
    total = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            total += sum(_rss_bytes(int(c)) for c in f.read().split())
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return total


# A tiny fresh parent for the tool: wait4's ru_maxrss counts what a child had when it exec'd,
# so a child forked straight from this (large) process would report this process's RSS.
LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:400] if lines else ""


def run_tool(
    cmd: list[str],
    timeout_s: float,
    max_rss_gb: float,
    env: dict[str, str] | None = None,
    stdout: Path | None = None,
) -> dict[str, Any]:
    """Run `cmd`; ok, wall_s, peak_rss_mb (the larger of wait4's ru_maxrss of the tool, taken by
    a fresh launcher, and the RSS of its process tree polled every 50 ms), error. The tool's
    standard output is kept in `stdout` when given."""
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.NamedTemporaryFile("r") as rss_file,
    ):
        start = time.perf_counter()
        launch = [sys.executable, "-S", "-c", LAUNCHER, rss_file.name, *cmd]
        proc = subprocess.Popen(launch, stdout=out, stderr=err, env=env, start_new_session=True)
        killed = ""
        polled_peak = 0
        while True:
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
            if pid:
                break
            rss = _rss_bytes(proc.pid)
            polled_peak = max(polled_peak, rss)
            elapsed = time.perf_counter() - start
            if not killed and rss > max_rss_gb * 2**30:
                killed = f"killed by the benchmark: RSS above {max_rss_gb:g} GB"
            elif not killed and elapsed > timeout_s:
                killed = f"killed by the benchmark: over {timeout_s:g} s"
            if killed:
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.05)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
        out.seek(0)
        printed = out.read().decode(errors="replace")
        if stdout is not None:
            stdout.write_text(printed)
        maxrss_kb = int(rss_file.read().strip() or 0)
    peak_mb = max(maxrss_kb / 1024, polled_peak / 2**20)
    result: dict[str, Any] = {
        "ok": proc.returncode == 0 and not killed,
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(peak_mb, 1),
    }
    if not result["ok"]:
        result["error"] = killed or f"exit {proc.returncode}: {last_line(stderr or printed)}"
    return result
