"""The outcome of `compare` and its versioned JSON form (docs/compare-json.md)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import quantcli
from quantcli.errors import InputError
from quantcli.evaluate.gates import GateResult, GateSpec
from quantcli.evaluate.host import HostInfo
from quantcli.evaluate.latency import LatencyComparison
from quantcli.evaluate.metrics import OutputMetrics, json_number
from quantcli.evaluate.model_file import ModelInfo
from quantcli.evaluate.per_layer import LayerError

SCHEMA = "quantcli.compare/1"


@dataclass(frozen=True)
class CompareConfig:
    provider: str = "cpu"
    threads: int | None = None
    batch_size: int = 1
    runs: int = 50  # timed runs per model; 0 skips latency
    warmup: int = 10
    per_layer: bool = False
    metric: str | None = None  # "module:function" or "path/to/file.py:function"
    max_samples: int | None = None
    gates: GateSpec = field(default_factory=GateSpec)

    def check(self) -> None:
        for name in ("batch_size", "runs", "warmup", "threads", "max_samples"):
            value, least = getattr(self, name), 0 if name in ("runs", "warmup") else 1
            if value is not None and value < least:
                raise InputError(f"{name.replace('_', '-')} must be >= {least}, not {value}")

    def to_dict(self) -> dict:
        settings = asdict(self)
        del settings["gates"]  # reported with their results under "gates"
        return settings


@dataclass(frozen=True)
class DataInfo:
    description: str
    num_samples: int  # samples compared (after max_samples)
    available_samples: int
    synthetic: bool
    labels: bool


@dataclass(frozen=True)
class CompareResult:
    float_model: ModelInfo
    quant_model: ModelInfo
    data: DataInfo
    config: CompareConfig
    outputs: list[OutputMetrics]
    latency: LatencyComparison | None = None
    layers: list[LayerError] | None = None  # worst SQNR first; None unless per_layer
    custom_metrics: dict[str, float] = field(default_factory=dict)
    gates: list[GateResult] = field(default_factory=list)
    host: HostInfo | None = None
    x86_saturation: dict | None = None  # SaturationCheck.to_dict() of the quantized model
    warnings: list[str] = field(default_factory=list)
    cluster: dict | None = None  # compare --ray: where the data was scored and timed

    @property
    def size_ratio(self) -> float:
        return self.quant_model.size_bytes / max(self.float_model.size_bytes, 1)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def summary(self) -> dict[str, float | None]:
        """Headline numbers (raw floats, NaN/inf kept); gates read these."""
        classifiers = [o.classifier for o in self.outputs if o.classifier]
        cls = classifiers[0] if classifiers else None
        acc = next((c for c in classifiers if c.accuracy_float is not None), None)
        return {
            "cosine_min": _worst(o.error.cosine_mean for o in self.outputs),
            "sqnr_db_min": _worst(o.error.sqnr_db for o in self.outputs),
            "top1_agreement": cls.top1_agreement if cls else None,
            "accuracy_float": acc.accuracy_float if acc else None,
            "accuracy_quant": acc.accuracy_quant if acc else None,
            "accuracy_drop_points": acc.accuracy_drop_points if acc else None,
            "speedup": self.latency.speedup if self.latency else None,
            "size_ratio": self.size_ratio,
        }

    def to_dict(self) -> dict:
        """JSON-ready, following docs/compare-json.md (non-finite numbers become null)."""
        import onnxruntime

        return {
            "schema": SCHEMA,
            "quantcli_version": quantcli.__version__,
            "onnxruntime_version": onnxruntime.__version__,
            "passed": self.passed,
            "models": {
                "float": self.float_model.to_dict(),
                "quant": self.quant_model.to_dict(),
                "size_ratio": json_number(self.size_ratio),
            },
            "data": asdict(self.data),
            "settings": self.config.to_dict(),
            "summary": {k: json_number(v) for k, v in self.summary().items()},
            "outputs": [o.to_dict() for o in self.outputs],
            "latency": self.latency.to_dict() if self.latency else None,
            "layers": None if self.layers is None else [x.to_dict() for x in self.layers],
            "custom_metrics": {k: json_number(v) for k, v in self.custom_metrics.items()},
            "gates": [g.to_dict() for g in self.gates],
            "host": self.host.to_dict() if self.host else None,
            "x86_saturation": self.x86_saturation,
            "warnings": self.warnings,
            **({} if self.cluster is None else {"cluster": self.cluster}),
        }


def _worst(values: Iterable[float]) -> float | None:
    vals = list(values)
    if not vals:
        return None
    return math.nan if any(math.isnan(v) for v in vals) else min(vals)
