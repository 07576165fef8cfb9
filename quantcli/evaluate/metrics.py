"""Streaming metrics between the float model's outputs and the quantized model's.

Accumulators take one batch at a time and keep only running sums, so memory stays fixed
however many samples are compared. Each sample's contribution is added exactly
(quantcli/exact.py), so accumulators of shards merge into the bits one pass gives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from quantcli.errors import DataError
from quantcli.exact import ExactSum

TOP_K = 5
# Rows of a [batch, classes] output summing to 1 within this are taken as probabilities.
_PROB_TOL = 1e-3
_EPS = 1e-12


def json_number(x: float | None) -> float | None:
    """A float JSON can hold: non-finite values become null (documented per field)."""
    return float(x) if x is not None and math.isfinite(x) else None


def sqnr_db(signal: float, noise: float) -> float:
    """10·log10(signal / noise); inf when the approximation is exact."""
    if noise == 0:
        return math.inf
    if math.isnan(noise) or signal == 0:
        return math.nan if math.isnan(noise) else -math.inf
    return 10.0 * math.log10(signal / noise)


def _cosine(dot: np.ndarray, rr: np.ndarray, qq: np.ndarray) -> np.ndarray:
    """Cosine per row; two zero vectors agree (1), one zero vector does not (0)."""
    den = np.sqrt(rr * qq)
    safe = np.where(den > 0, den, 1.0)
    both_zero = (rr == 0) & (qq == 0)
    cos = np.where(den > 0, np.clip(dot / safe, -1.0, 1.0), np.where(both_zero, 1.0, 0.0))
    return np.where(np.isnan(den), np.nan, cos)  # NaN in, NaN out: not "orthogonal"


@dataclass(frozen=True)
class TensorError:
    """How far an approximation is from a reference tensor, over all samples seen."""

    samples: int
    cosine_mean: float  # mean over samples of the per-sample (flattened) cosine
    cosine_global: float  # cosine of everything taken as one vector
    sqnr_db: float  # inf when identical
    max_abs_error: float
    mean_abs_error: float
    nonfinite: int  # NaN/Inf values in the approximation

    @property
    def identical(self) -> bool:
        return self.sqnr_db == math.inf

    def to_dict(self) -> dict:
        return {
            "samples": self.samples,
            "cosine_mean": json_number(self.cosine_mean),
            "cosine_global": json_number(self.cosine_global),
            "sqnr_db": json_number(self.sqnr_db),
            "identical": self.identical,
            "max_abs_error": json_number(self.max_abs_error),
            "mean_abs_error": json_number(self.mean_abs_error),
            "quant_nonfinite": self.nonfinite,
        }


class ErrorAccumulator:
    """Running sums for TensorError. Axis 0 is the sample axis when it matches `rows`."""

    _SUMS = ("cos_sum", "dot", "rr", "qq", "err2", "abs_sum")

    def __init__(self) -> None:
        self.samples = 0
        self.values = 0
        self.cos_sum, self.dot, self.rr, self.qq, self.err2, self.abs_sum = (
            ExactSum() for _ in self._SUMS
        )
        self.max_abs = 0.0
        self.nonfinite = 0

    def update(self, ref: np.ndarray, approx: np.ndarray, rows: int | None = None) -> None:
        r, q = _as_rows(ref, rows), _as_rows(approx, rows)
        if r.shape != q.shape:
            raise ValueError(f"shape {ref.shape} vs {approx.shape}")
        self.nonfinite += int(np.size(q) - np.count_nonzero(np.isfinite(q)))
        d = np.abs(r - q)
        dot, rr, qq = (r * q).sum(1), (r * r).sum(1), (q * q).sum(1)
        with np.errstate(invalid="ignore"):  # NaN/Inf from the quantized model is counted
            self.cos_sum.add_all(_cosine(dot, rr, qq))
        self.dot.add_all(dot)  # per sample: what a sample adds does not depend on its batch
        self.rr.add_all(rr)
        self.qq.add_all(qq)
        self.err2.add_all((d * d).sum(1))
        self.abs_sum.add_all(d.sum(1))
        if d.size:
            self.max_abs = float(np.max([self.max_abs, d.max()]))  # NaN propagates
        self.samples += r.shape[0]
        self.values += r.size

    def merge(self, other: ErrorAccumulator) -> ErrorAccumulator:
        out = ErrorAccumulator()
        for name in self._SUMS:
            setattr(out, name, getattr(self, name).merge(getattr(other, name)))
        out.samples, out.values = self.samples + other.samples, self.values + other.values
        out.max_abs = float(np.max([self.max_abs, other.max_abs]))  # NaN propagates
        out.nonfinite = self.nonfinite + other.nonfinite
        return out

    def result(self) -> TensorError:
        dot, rr, qq = self.dot.value, self.rr.value, self.qq.value
        glob = _cosine(np.array([dot]), np.array([rr]), np.array([qq]))[0]
        return TensorError(
            samples=self.samples,
            cosine_mean=self.cos_sum.value / self.samples if self.samples else math.nan,
            cosine_global=float(glob),
            sqnr_db=sqnr_db(rr, self.err2.value),
            max_abs_error=self.max_abs,
            mean_abs_error=self.abs_sum.value / self.values if self.values else math.nan,
            nonfinite=self.nonfinite,
        )


def _as_rows(x: np.ndarray, rows: int | None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim >= 1 and (rows is None or x.shape[0] == rows):
        return x.reshape(x.shape[0], -1)
    return x.reshape(1, -1)  # no batch axis: the whole tensor is one sample


@dataclass(frozen=True)
class ClassifierMetrics:
    """Agreement between two [batch, classes] outputs; accuracies need labels."""

    classes: int
    top1_agreement: float  # fraction of samples with the same argmax
    top1_in_top5: float  # fraction where the float top-1 is in the quantized top-5
    kl_divergence_mean: float  # mean KL(p_float || p_quant) in nats
    probabilities: bool  # outputs were used as probabilities, not passed through softmax
    accuracy_float: float | None = None
    accuracy_quant: float | None = None

    @property
    def accuracy_drop_points(self) -> float | None:
        if self.accuracy_float is None or self.accuracy_quant is None:
            return None
        return 100.0 * (self.accuracy_float - self.accuracy_quant)

    def to_dict(self) -> dict:
        return {
            "classes": self.classes,
            "top1_agreement": json_number(self.top1_agreement),
            "top1_in_top5": json_number(self.top1_in_top5),
            "kl_divergence_mean": json_number(self.kl_divergence_mean),
            "probabilities": self.probabilities,
            "accuracy_float": json_number(self.accuracy_float),
            "accuracy_quant": json_number(self.accuracy_quant),
            "accuracy_drop_points": json_number(self.accuracy_drop_points),
        }


def looks_like_probabilities(x: np.ndarray) -> bool:
    return bool(
        x.size and np.all((x >= 0) & (x <= 1)) and np.allclose(x.sum(axis=1), 1.0, atol=_PROB_TOL)
    )


def _log_probs(x: np.ndarray, probabilities: bool) -> np.ndarray:
    if probabilities:  # renormalize: quantized probabilities rarely sum to exactly 1
        p = np.clip(x, _EPS, None)
        return np.log(p / p.sum(axis=1, keepdims=True))
    z = x - x.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


class ClassifierAccumulator:
    """KL is summed both ways (probabilities and logits): which applies is decided by the
    first batch of the whole data, which a cluster task may not have seen."""

    def __init__(self, classes: int, probabilities: bool) -> None:
        self.classes, self.probabilities = classes, probabilities
        self.n = self.agree = self.in_top = self.labelled = self.right_f = self.right_q = 0
        self.kl = {True: ExactSum(), False: ExactSum()}  # probabilities? -> sum

    def update(self, ref: np.ndarray, q: np.ndarray, labels: np.ndarray | None) -> None:
        ref, q = np.asarray(ref, np.float64), np.asarray(q, np.float64)
        k = min(TOP_K, self.classes)
        top_f, top_q = ref.argmax(axis=1), q.argmax(axis=1)
        top_k = np.argpartition(-q, k - 1, axis=1)[:, :k]
        self.agree += int((top_f == top_q).sum())
        self.in_top += int((top_k == top_f[:, None]).any(axis=1).sum())
        for probabilities, total in self.kl.items():
            lp, lq = _log_probs(ref, probabilities), _log_probs(q, probabilities)
            total.add_all(np.where(lp > math.log(_EPS), np.exp(lp) * (lp - lq), 0.0).sum(1))
        self.n += ref.shape[0]
        if labels is not None:
            self.labelled += len(labels)
            self.right_f += int((top_f == labels).sum())
            self.right_q += int((top_q == labels).sum())

    def merge(self, other: ClassifierAccumulator) -> ClassifierAccumulator:
        """`self` holds the earlier samples: its reading of the outputs applies."""
        out = ClassifierAccumulator(self.classes, self.probabilities)
        for name in ("n", "agree", "in_top", "labelled", "right_f", "right_q"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        out.kl = {p: self.kl[p].merge(other.kl[p]) for p in self.kl}
        return out

    def result(self) -> ClassifierMetrics:
        n, lab = max(self.n, 1), self.labelled
        return ClassifierMetrics(
            classes=self.classes,
            top1_agreement=self.agree / n,
            top1_in_top5=self.in_top / n,
            kl_divergence_mean=self.kl[self.probabilities].value / n,
            probabilities=self.probabilities,
            accuracy_float=self.right_f / lab if lab else None,
            accuracy_quant=self.right_q / lab if lab else None,
        )


@dataclass(frozen=True)
class OutputMetrics:
    name: str
    error: TensorError
    classifier: ClassifierMetrics | None

    def to_dict(self) -> dict:
        cls = self.classifier.to_dict() if self.classifier else None
        return {"name": self.name, **self.error.to_dict(), "classifier": cls}


class OutputAccumulator:
    """All built-in metrics of one model output, fed batch by batch."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.error = ErrorAccumulator()
        self.classifier: ClassifierAccumulator | None = None
        self.first = True

    def update(
        self, ref: np.ndarray, q: np.ndarray, indices: np.ndarray, labels: np.ndarray | None
    ) -> None:
        _check_finite(self.name, ref, indices)
        try:
            self.error.update(ref, q, rows=len(indices))
        except ValueError as exc:
            raise DataError(
                f"output '{self.name}' differs in shape between the models: {exc}",
                hint="compare a quantized model made from this float model",
            ) from None
        is_cls = ref.ndim == 2 and ref.shape[1] >= 2 and ref.shape[0] == len(indices)
        if self.first and is_cls:  # decided once so every batch is scored the same way
            probs = looks_like_probabilities(np.asarray(ref, np.float64))
            self.classifier = ClassifierAccumulator(ref.shape[1], probs)
        self.first = False
        if self.classifier is not None and is_cls:
            self.classifier.update(ref, q, labels)

    def merge(self, other: OutputAccumulator) -> OutputAccumulator:
        """`self` covers the earlier samples: as in one pass, its first batch decided
        whether the output is a classifier's and how to read it."""
        out = OutputAccumulator(self.name)
        out.error, out.first = self.error.merge(other.error), self.first and other.first
        out.classifier = self.classifier or other.classifier if self.first else self.classifier
        if self.classifier is not None and other.classifier is not None:
            out.classifier = self.classifier.merge(other.classifier)
        return out

    def result(self) -> OutputMetrics:
        cls = self.classifier.result() if self.classifier else None
        return OutputMetrics(self.name, self.error.result(), cls)


def _check_finite(name: str, ref: np.ndarray, indices: np.ndarray) -> None:
    finite = np.isfinite(ref)
    if finite.all():
        return
    per_row = ref.ndim >= 1 and ref.shape[0] == len(indices)
    row = int(np.argwhere(~finite)[0][0]) if per_row else 0
    raise DataError(
        f"float model output '{name}' has NaN/Inf on sample {int(indices[row])}",
        hint="the float model itself fails there: check the data's preprocessing "
        "(value range, dtype, layout)",
    )
