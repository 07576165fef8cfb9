"""The Ray adapter: join a cluster, run independent tasks with retries, results in order.

Nothing else in quantcli imports ray. A worker process that dies mid-task (killed, out of
memory, its node lost) is rerun by Ray up to `retries` times; a task that fails on its
input is not rerun, and its error (a QuantcliError) reaches the user as it would from one
process.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantcli.cluster.config import ClusterConfig
from quantcli.errors import ClusterError, QuantcliError

INSTALL_HINT = 'pip install "quantcli[ray]"'
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ClusterError(
            "running on a Ray cluster needs Ray, which is not installed", hint=INSTALL_HINT
        ) from exc
    return ray


@dataclass(frozen=True)
class Node:
    node_id: str
    address: str  # the node's IP as Ray knows it
    cpus: int


@dataclass(frozen=True)
class Cluster:
    address: str  # as given, or found for "auto"
    nodes: tuple[Node, ...]  # alive nodes that offer CPUs
    working_dir: bool  # tasks run in the job's working_dir (ray job submit --working-dir)

    @property
    def cpus(self) -> int:
        return sum(n.cpus for n in self.nodes)

    def describe(self) -> str:
        nodes = len(self.nodes)
        return f"{nodes} node{'s' * (nodes != 1)}, {self.cpus} CPU{'s' * (self.cpus != 1)}"


def _auto_address() -> str:
    """What `--ray auto` means: RAY_ADDRESS, else the cluster `ray start` last started here."""
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env and env != "auto":
        return env
    root = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray"
    current = root / "ray_current_cluster"  # written by `ray start --head`
    if current.is_file() and current.read_text().strip():
        return current.read_text().strip()
    raise ClusterError(
        "--ray auto found no Ray cluster on this machine",
        hint="start one (ray start --head) or give its address: --ray HOST:PORT",
    )


def _host_port(address: str) -> tuple[str, int]:
    text = address.removeprefix("ray://")
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise ClusterError(
            f"invalid Ray address '{address}'", hint="use auto, local, HOST:PORT or ray://HOST:PORT"
        )
    return host, int(port)


def _check_reachable(address: str, timeout: float) -> None:
    """Fail fast: ray.init waits minutes, uninterruptibly, on an address nobody answers."""
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ClusterError(
            f"cannot reach the Ray cluster at {address} ({reason})",
            hint="check that it runs (ray status) and the address; "
            "--ray auto finds a cluster started on this machine",
        ) from None


def _loopback_driver(ray_loaded: bool) -> None:
    """A cluster on 127.0.0.1 binds only there, but Ray resolves 127.0.0.1 to this machine's
    network address before it connects: tell it this driver's node is the loopback one."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read when ray is imported
    if ray_loaded:
        try:
            from ray._private import ray_constants

            ray_constants.ENABLE_RAY_CLUSTER = False
        except (ImportError, AttributeError):  # another Ray version: nothing to adjust
            pass


@contextmanager
def connect(config: ClusterConfig) -> Iterator[Cluster]:
    """Join the cluster (or start a local one) for the duration of the block."""
    address = None if config.address == "local" else config.address
    if address == "auto":
        address = _auto_address()
    if address is not None:
        _check_reachable(address, config.connect_timeout)
    if address is None or _host_port(address)[0] in _LOOPBACK:
        _loopback_driver("ray" in sys.modules)
    ray = import_ray()
    owned = not ray.is_initialized()
    if owned:
        try:
            ray.init(
                address=address or "local",
                logging_level=logging.ERROR,
                log_to_driver=False,
                include_dashboard=False if address is None else None,
            )
        except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError ...
            where = address or "a local Ray instance"
            raise ClusterError(
                f"cannot join {where}: {_first_line(exc)}",
                hint="the driver needs the same Ray and Python versions as the cluster",
            ) from None
    try:
        nodes = tuple(
            Node(n["NodeID"], n.get("NodeManagerAddress", "?"), int(n["Resources"]["CPU"]))
            for n in ray.nodes()
            if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= 1
        )
        if not nodes:
            raise ClusterError(
                f"the Ray cluster at {address or 'local'} has no CPUs for tasks",
                hint="start worker nodes with --num-cpus >= 1",
            )
        env = ray.get_runtime_context().runtime_env or {}
        yield Cluster(address or "local", nodes, bool(env.get("working_dir")))
    finally:
        if owned:
            ray.shutdown()


def shared_path(path: str | os.PathLike, cluster: Cluster) -> str:
    """The path as the tasks must see it: absolute (workers do not share the driver's working
    directory), unless the job ships a working_dir, where relative paths mean the same file
    on every node."""
    text = os.fspath(path)
    return text if cluster.working_dir else os.path.abspath(text)


def map_ordered(
    fn: Callable[..., Any],
    calls: Sequence[tuple[Any, ...]],
    *,
    retries: int,
    num_cpus: float = 1,
    max_pending: int | None = None,
    on_done: Callable[[int, Any], None] | None = None,
    what: Callable[[int], str] = lambda i: f"task {i + 1}",
) -> Iterator[Any]:
    """fn(*calls[i]) for every i as Ray tasks, yielded in the order of `calls`.

    At most `max_pending` tasks run or wait ahead of the next result to yield, so results
    that come back early are held in bounded memory. `on_done(i, result)` is called as each
    task finishes (in any order). A task whose worker process or node dies is rerun by Ray
    up to `retries` times; one that raises is not rerun: a QuantcliError it raised is raised
    here as is. Tasks still running when the consumer stops are cancelled.
    """
    ray = import_ray()
    remote = ray.remote(fn).options(num_cpus=num_cpus, max_retries=retries)
    ahead = max(1, max_pending or len(calls))
    pending: dict[Any, int] = {}
    finished: dict[int, Any] = {}
    submitted = yielded = 0
    try:
        while yielded < len(calls):
            while submitted < len(calls) and submitted - yielded < ahead:
                pending[remote.remote(*calls[submitted])] = submitted
                submitted += 1
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                i = pending.pop(ref)
                finished[i] = _get(ray, ref, what(i), retries)
                if on_done is not None:
                    on_done(i, finished[i])
            while yielded in finished:
                yield finished.pop(yielded)
                yielded += 1
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


def run_on_node(
    fn: Callable[..., Any], args: tuple[Any, ...], node: Node, *, retries: int, what: str
) -> Any:
    """fn(*args) on `node` alone, holding all of its CPUs (nothing else of ours runs there)."""
    ray = import_ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(fn).options(
        num_cpus=node.cpus,
        max_retries=retries,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
    )
    return _get(ray, remote.remote(*args), what, retries)


def _get(ray: Any, ref: Any, what: str, retries: int) -> Any:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, QuantcliError):
            raise cause from None
        raise  # a bug in the task: its traceback says where
    except ray.exceptions.RayError as exc:  # worker or node lost, retries spent
        raise ClusterError(
            f"{what} failed on the cluster after {retries} retries: {_first_line(exc)}",
            hint="check the cluster's nodes (ray status) and rerun",
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def node_name() -> str:
    """This machine as a user would recognise it: host name and the IP Ray uses."""
    try:
        import ray

        ip = ray.util.get_node_ip_address()
    except Exception:  # outside a Ray worker
        ip = "?"
    return f"{socket.gethostname()} ({ip})"


def on_node(exc: QuantcliError) -> QuantcliError:
    """An input error met on a worker, naming the node: the driver read the same paths
    fine, so this node sees other files (docs/cluster.md: data locality)."""
    return type(exc)(
        f"{exc.message} (on node {node_name()})",
        exc.hint or "every node must see the model and data at the same path",
    )
