from __future__ import annotations

import numpy as np
import pytest

from quantcli.evaluate.latency import compare_times, measure_latency, summarize, time_interleaved

MS = 1_000_000


def test_summarize_hand_numbers():
    s = summarize([t * MS for t in range(10, 0, -1)], batch_size=4)
    assert s.runs == 10 and s.batch_size == 4
    assert s.median_ms == pytest.approx(5.5)
    assert s.p90_ms == pytest.approx(9.1)  # linear interpolation between 9 and 10
    assert s.p99_ms == pytest.approx(9.91)
    assert s.mean_ms == pytest.approx(5.5)
    assert (s.min_ms, s.max_ms) == (1.0, 10.0)
    assert s.throughput == pytest.approx(4 / 5.5e-3)
    assert s.samples_ms[0] == 10.0


def test_throughput_uses_median():
    s = summarize([MS, MS, 100 * MS], batch_size=2)  # one stall does not halve throughput
    assert s.throughput == pytest.approx(2000.0)
    assert s.mean_ms == pytest.approx(34.0)


def test_summarize_single_run():
    s = summarize([2 * MS])
    assert s.median_ms == s.p99_ms == s.mean_ms == 2.0
    assert s.throughput == pytest.approx(500.0)


def test_summarize_needs_runs():
    with pytest.raises(ValueError):
        summarize([])


def test_speedup_and_spread():
    c = compare_times([2 * MS, 4 * MS, 6 * MS, 8 * MS], [1 * MS, 2 * MS, 3 * MS, 4 * MS])
    assert c.speedup == pytest.approx(2.0)
    assert c.speedup_q1 == c.speedup_q3 == pytest.approx(2.0)


def test_speedup_iqr_of_pair_ratios():
    c = compare_times([MS] * 4, [MS, 2 * MS, 4 * MS, MS // 2])  # ratios 1, .5, .25, 2
    assert c.speedup == pytest.approx(1 / 1.5)
    assert c.speedup_q1 == pytest.approx(np.percentile([1, 0.5, 0.25, 2], 25))
    assert c.speedup_q3 == pytest.approx(np.percentile([1, 0.5, 0.25, 2], 75))
    d = c.to_dict()
    assert d["float"]["runs"] == 4 and len(d["quant"]["samples_ms"]) == 4
    assert set(d) >= {"speedup", "speedup_q1", "speedup_q3", "warmup", "threads"}


def test_runs_interleave_and_alternate_order():
    calls: list[str] = []
    ticks: list[int] = []
    f_ns, q_ns = time_interleaved(
        lambda: calls.append("f"), lambda: calls.append("q"), 3, 1, ticks.append
    )
    assert calls == ["f", "q", "f", "q", "q", "f", "f", "q"]
    assert len(f_ns) == len(q_ns) == 3 and all(t >= 0 for t in f_ns + q_ns)
    assert sum(ticks) == 4


def test_blocks_take_turns_and_rewarm_untimed() -> None:
    calls: list[str] = []
    f_ns, q_ns = time_interleaved(
        lambda: calls.append("f"), lambda: calls.append("q"), 4, 0, block=2
    )
    # each turn: one untimed call, then two timed ones; the order flips every turn
    assert calls == ["f"] * 3 + ["q"] * 3 + ["q"] * 3 + ["f"] * 3
    assert len(f_ns) == len(q_ns) == 4


class FakeSession:
    def __init__(self) -> None:
        self.feeds: list[dict] = []

    def run(self, names, feed):
        self.feeds.append(feed)
        return [np.zeros(1)]


def test_measure_latency_uses_fixed_feed():
    fs, qs = FakeSession(), FakeSession()
    feed = {"x": np.ones((2, 3), np.float32)}
    c = measure_latency(fs, qs, feed, batch_size=2, runs=5, warmup=2, threads=3)
    assert len(fs.feeds) == len(qs.feeds) == 2 + 1 + 5  # warm-up, cache re-warm, timed
    assert all(f["x"] is feed["x"] for f in fs.feeds + qs.feeds)
    assert c.float_stats.runs == 5 and c.float_stats.batch_size == 2
    assert c.warmup == 2 and c.threads == 3
