"""Latency of the float and quantized sessions, measured side by side.

Runs alternate between the two models so that drift of the machine (turbo, thermal
throttling, other load) hits both equally; each pair also swaps which model goes first.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from quantcli.evaluate.metrics import json_number

Tick = Callable[[int], None]


@dataclass(frozen=True)
class LatencyStats:
    """Per-run latency of one model over `runs` timed runs of a batch of `batch_size`."""

    runs: int
    batch_size: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    throughput: float  # samples per second at the median run time (robust to stalls)
    samples_ms: tuple[float, ...]

    def to_dict(self) -> dict:
        keys = ("median_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "max_ms", "throughput")
        out: dict[str, Any] = {"runs": self.runs, "batch_size": self.batch_size}
        out.update({k: json_number(getattr(self, k)) for k in keys})
        out["samples_ms"] = [round(t, 6) for t in self.samples_ms]
        return out


def summarize(times_ns: Sequence[int], batch_size: int = 1) -> LatencyStats:
    """Statistics of run times given in nanoseconds (linear-interpolated percentiles)."""
    if len(times_ns) == 0:
        raise ValueError("no timings to summarize")
    ms = np.asarray(times_ns, dtype=np.float64) / 1e6
    median, p90, p99 = np.percentile(ms, [50, 90, 99])
    mean = float(ms.mean())
    return LatencyStats(
        runs=len(ms),
        batch_size=batch_size,
        median_ms=float(median),
        p90_ms=float(p90),
        p99_ms=float(p99),
        mean_ms=mean,
        min_ms=float(ms.min()),
        max_ms=float(ms.max()),
        throughput=batch_size * 1000.0 / float(median) if median > 0 else float("inf"),
        samples_ms=tuple(float(t) for t in ms),
    )


@dataclass(frozen=True)
class LatencyComparison:
    float_stats: LatencyStats
    quant_stats: LatencyStats
    speedup: float  # median float / median quantized; > 1 means the quantized model is faster
    speedup_q1: float  # interquartile range of the per-pair ratios float_i / quant_i
    speedup_q3: float
    warmup: int
    threads: int | None

    def to_dict(self) -> dict:
        return {
            "batch_size": self.float_stats.batch_size,
            "runs": self.float_stats.runs,
            "warmup": self.warmup,
            "threads": self.threads,
            "float": self.float_stats.to_dict(),
            "quant": self.quant_stats.to_dict(),
            "speedup": json_number(self.speedup),
            "speedup_q1": json_number(self.speedup_q1),
            "speedup_q3": json_number(self.speedup_q3),
        }


def compare_times(
    float_ns: Sequence[int],
    quant_ns: Sequence[int],
    batch_size: int = 1,
    warmup: int = 0,
    threads: int | None = None,
) -> LatencyComparison:
    """Pure: stats of both models and the speedup from paired timings."""
    fs, qs = summarize(float_ns, batch_size), summarize(quant_ns, batch_size)
    ratios = np.asarray(float_ns, np.float64) / np.maximum(np.asarray(quant_ns, np.float64), 1)
    q1, q3 = np.percentile(ratios, [25, 75])
    return LatencyComparison(
        float_stats=fs,
        quant_stats=qs,
        speedup=fs.median_ms / qs.median_ms if qs.median_ms > 0 else float("inf"),
        speedup_q1=float(q1),
        speedup_q3=float(q3),
        warmup=warmup,
        threads=threads,
    )


def time_interleaved(
    run_float: Callable[[], object],
    run_quant: Callable[[], object],
    runs: int,
    warmup: int,
    tick: Tick | None = None,
    block: int = 1,
) -> tuple[list[int], list[int]]:
    """Wall times in ns of `runs` calls of each, after `warmup` untimed pairs.

    The models take turns of `block` timed calls, the order flipping every turn, so drift
    hits both. With block > 1 each turn starts with one untimed call: a model run right
    after the other finds its weights evicted from the caches (measured on EfficientNet-Lite0:
    the int8 model 2.67 ms right after the float one, 2.20 ms back to back), and timing that
    would charge one model for the other's memory traffic.
    """
    for _ in range(warmup):
        run_float()
        run_quant()
        if tick:
            tick(1)
    float_ns: list[int] = []
    quant_ns: list[int] = []
    turn = 0
    while len(float_ns) < runs:
        count = min(block, runs - len(float_ns))
        pair = [(run_float, float_ns), (run_quant, quant_ns)]
        for fn, out in pair if turn % 2 == 0 else pair[::-1]:
            if block > 1:
                fn()  # re-warm the caches after the other model's turn
            for _ in range(count):
                start = time.perf_counter_ns()
                fn()
                out.append(time.perf_counter_ns() - start)
        turn += 1
        if tick:
            tick(count)
    return float_ns, quant_ns


# Timed calls per model per turn in `compare` (plus one untimed cache-warming call).
LATENCY_BLOCK = 5


def measure_latency(
    float_session: Any,
    quant_session: Any,
    feed: Mapping[str, np.ndarray],
    batch_size: int = 1,
    runs: int = 50,
    warmup: int = 10,
    threads: int | None = None,
    tick: Tick | None = None,
) -> LatencyComparison:
    """Time two ORT sessions (created with identical options) on the same fixed feed."""
    feed = dict(feed)
    float_ns, quant_ns = time_interleaved(
        lambda: float_session.run(None, feed),
        lambda: quant_session.run(None, feed),
        runs,
        warmup,
        tick,
        block=LATENCY_BLOCK,
    )
    return compare_times(float_ns, quant_ns, batch_size, warmup, threads)
