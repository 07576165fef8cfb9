"""Comparing a quantized model with its float original: metrics, latency, gates."""

from __future__ import annotations

from quantcli.evaluate.compare import (
    SCHEMA,
    CompareConfig,
    CompareResult,
    DataInfo,
    DataSourceLike,
    compare,
)
from quantcli.evaluate.gates import GateResult, GateSpec, check_gates_possible, evaluate_gates
from quantcli.evaluate.latency import LatencyComparison, LatencyStats, summarize
from quantcli.evaluate.metrics import ClassifierMetrics, OutputMetrics, TensorError
from quantcli.evaluate.model_file import ModelInfo, inspect_model
from quantcli.evaluate.per_layer import LayerError
from quantcli.evaluate.plugin import load_metric

__all__ = [
    "SCHEMA",
    "ClassifierMetrics",
    "CompareConfig",
    "CompareResult",
    "DataInfo",
    "DataSourceLike",
    "GateResult",
    "GateSpec",
    "LatencyComparison",
    "LatencyStats",
    "LayerError",
    "ModelInfo",
    "OutputMetrics",
    "TensorError",
    "check_gates_possible",
    "compare",
    "evaluate_gates",
    "inspect_model",
    "load_metric",
    "summarize",
]
