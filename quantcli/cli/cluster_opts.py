"""The options and the progress bar of commands that run on a Ray cluster (`--ray`)."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from quantcli.cli.common import err

RayOpt = Annotated[
    str | None,
    typer.Option(
        "--ray",
        metavar="ADDRESS",
        help="Run on a Ray cluster: auto (the one started on this machine, or RAY_ADDRESS), "
        "local (start one here), HOST:PORT or ray://HOST:PORT. Needs quantcli\\[ray]; "
        "docs/cluster.md.",
    ),
]
RayShardsOpt = Annotated[
    int | None,
    typer.Option(
        "--ray-shards", min=1, help="With --ray: tasks the data is split into (default 2 per CPU)."
    ),
]


def cluster_config(address: str | None, shards: int | None = None) -> Any:
    """The ClusterConfig for --ray (None without it)."""
    if address is None:
        if shards is not None:
            from quantcli.errors import InputError

            raise InputError("--ray-shards needs --ray", hint="add --ray auto|ADDRESS")
        return None
    from quantcli.cluster import ClusterConfig

    return ClusterConfig(address=address, shards=shards)


class ClusterBar:
    """One rich bar for the whole cluster job: parts done / total and samples per second.

    Called as (parts done, parts, samples done, what is running where)."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.bar: Any = None
        self.start = 0.0

    def __call__(self, done: int, total: int, samples: int, where: str) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        if self.bar is None:
            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("parts  {task.fields[rate]}"),
                TimeElapsedColumn(),
                console=err,
                transient=True,
                disable=not err.is_terminal,
            )
            self.task = self.bar.add_task(self.description, total=total, rate="")
            self.bar.start()
            self.start = time.perf_counter()
        elapsed = time.perf_counter() - self.start
        rate = f"{samples / elapsed:.1f} samples/s" if samples and elapsed > 0 else ""
        text = f"{self.description} ({where})"
        self.bar.update(self.task, completed=done, total=total, rate=rate, description=text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
