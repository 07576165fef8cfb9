"""calibrate and compare on a real local Ray cluster (head + 2 one-CPU worker nodes, all on
127.0.0.1): the results equal one process's, also when a worker dies mid-run.

Skipped when Ray is not installed (`pip install -e ".[dev,ray]"` installs it).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import Cli, sample

# A cluster bound to 127.0.0.1 must be joined as 127.0.0.1 (quantcli does the same for
# its own connections, quantcli/cluster/engine.py); set before ray is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray_cluster_utils = pytest.importorskip("ray.cluster_utils")

pytestmark = pytest.mark.cluster
CALIBRATE_TASK = b"ray::calibrate_part"


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A head without CPUs for tasks and two worker nodes with one CPU each."""
    head = {"num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False}
    local = ray_cluster_utils.Cluster(initialize_head=True, head_node_args=head)
    try:
        for _ in range(2):
            local.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        local.wait_for_nodes()
        yield local.address
    finally:
        local.shutdown()


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1024 digit images: 32 calibration blocks, each a task of a fraction of a second."""
    path = tmp_path_factory.mktemp("data") / "calib.npz"
    np.savez(path, input=np.resize(sample("digits_cnn").calib_input(), (1024, 1, 28, 28)))
    return path


@pytest.fixture(scope="module")
def one_process(calib: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one") / "table.json"
    Cli().ok("calibrate", sample("digits_cnn").model, "-d", calib, "-o", out)
    return out


def _same_table(a: Path, b: Path) -> None:
    assert a.read_bytes() == b.read_bytes()  # byte-identical JSON
    sidecars = [p.with_name(p.name + ".gram.npz") for p in (a, b)]
    assert sidecars[0].read_bytes() == sidecars[1].read_bytes()


def test_calibrate_on_ray_writes_the_one_process_table(
    cluster: str, calib: Path, one_process: Path, tmp_path: Path
) -> None:
    out = tmp_path / "table.json"
    result = Cli().ok(
        "calibrate", sample("digits_cnn").model, "-d", calib, "-o", out, "--ray", cluster, "--json"
    )
    assert json.loads(result.stdout)["samples"] == 1024
    _same_table(one_process, out)


def _descendants(root: int) -> set[int]:
    """Processes under `root` (the Ray processes this test started, and theirs)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


class _KillOneWorker(threading.Thread):
    """Kills the first of our Ray worker processes seen running a calibration task."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.killed: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and self.killed is None:
            for pid in _descendants(os.getpid()):
                try:
                    title = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if title.startswith(CALIBRATE_TASK):
                    os.kill(pid, signal.SIGKILL)
                    self.killed = pid
                    return
            time.sleep(0.002)


def test_a_worker_killed_mid_run_is_retried_and_the_table_is_the_same(
    cluster: str, calib: Path, one_process: Path, tmp_path: Path
) -> None:
    out = tmp_path / "table.json"
    killer = _KillOneWorker()
    killer.start()
    try:
        Cli().ok("calibrate", sample("digits_cnn").model, "-d", calib, "-o", out, "--ray", cluster)
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed is not None, "no calibration task was seen running"
    _same_table(one_process, out)  # nothing counted twice, nothing lost


def test_compare_on_ray_gives_the_one_process_metrics(cluster: str, tmp_path: Path) -> None:
    s, cli = sample("digits_cnn"), Cli()
    quant = tmp_path / "q.onnx"
    cli.ok("convert", s.model, "--data", s.calib, "-o", quant)
    base = ["compare", s.model, quant, "-d", s.eval, "--json", "--runs", "5", "--batch-size", "8"]
    one = json.loads(cli.ok(*base).stdout)
    ray = json.loads(cli.ok(*base, "--ray", cluster, "--ray-shards", "3").stdout)
    for key in ("outputs", "data", "gates", "models"):
        assert ray[key] == one[key], key
    speedless = {k: v for k, v in one["summary"].items() if k != "speedup"}
    assert {k: v for k, v in ray["summary"].items() if k != "speedup"} == speedless
    assert ray["cluster"]["parts"] == 3 and ray["cluster"]["nodes"] == 2
    assert ray["cluster"]["latency_node"]  # timed on one named node, never averaged
    assert ray["latency"]["float"]["runs"] == 5


def test_tune_on_ray_ranks_with_the_one_process_scores(cluster: str, tmp_path: Path) -> None:
    """Ranking trials run as tasks on the workers; each score equals the one-process score,
    so the search takes the same path."""
    s, cli = sample("digits_cnn"), Cli()
    base = ["tune", s.model, "--data", s.calib, "--eval", s.eval, "--min-cosine", "0.99995"]
    base += ["--max-trials", "40", "--runs", "5", "--json"]
    one = json.loads(cli.ok(*base, "-o", tmp_path / "one.onnx").stdout)
    ray = json.loads(cli.ok(*base, "-o", tmp_path / "ray.onnx", "--ray", cluster).stdout)

    def ranking(doc: dict) -> list:
        return [(t["assignment"], t["score"]) for t in doc["trials"] if t["stage"] == "rank"]

    assert len(ranking(one)) > 2 and ranking(ray) == ranking(one)
    assert ray["cluster"]["nodes"] == 2 and ray["cluster"]["ranking_trials"] >= 2
    assert one["cluster"] is None
    steps = [(t["stage"], t["assignment"]) for t in one["trials"] if t["stage"] != "speed"]
    assert [(t["stage"], t["assignment"]) for t in ray["trials"] if t["stage"] != "speed"] == steps


def test_a_data_error_on_the_cluster_is_one_line(cluster: str, tmp_path: Path) -> None:
    s = sample("digits_cnn")
    bad = tmp_path / "bad.npz"
    x = s.calib_input(64).copy()
    x[40, 0, 3, 3] = np.nan
    np.savez(bad, input=x)
    out = tmp_path / "t.json"
    line = Cli().fails("calibrate", s.model, "-d", bad, "-o", out, "--ray", cluster)
    assert "sample 40" in line and "NaN" in line
    assert not out.exists()
