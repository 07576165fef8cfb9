"""Typed settings of a cluster job."""

from __future__ import annotations

from dataclasses import dataclass

from quantcli.errors import InputError

DEFAULT_RETRIES = 3


@dataclass(frozen=True)
class ClusterConfig:
    """Where and how to run: `address` is "auto" (the cluster started on this machine, or
    RAY_ADDRESS), "local" (a Ray instance started for this command), "HOST:PORT" (a
    cluster's GCS) or "ray://HOST:PORT" (Ray Client)."""

    address: str = "auto"
    shards: int | None = None  # parts of the data (None: two per CPU of the cluster)
    retries: int = DEFAULT_RETRIES  # reruns of a task whose worker or node died
    connect_timeout: float = 10.0  # seconds to reach the cluster's address

    def __post_init__(self) -> None:
        if not self.address.strip():
            raise InputError("--ray needs an address", hint="auto, local or HOST:PORT")
        if self.shards is not None and self.shards < 1:
            raise InputError(f"--ray-shards must be at least 1, not {self.shards}")
        if self.retries < 0:
            raise InputError(f"retries must be >= 0, not {self.retries}")
        if self.connect_timeout <= 0:
            raise InputError("the connection timeout must be positive")
