"""User metrics for `compare --metric SPEC`, SPEC being `module:name` or `path/to/file.py:name`.

`name` may be either of two forms:

* a function, called once at the end with every sample's outputs concatenated
  (all outputs are kept in memory, unlike the built-in metrics)::

      def my_metric(float_outputs: dict[str, np.ndarray],
                    quant_outputs: dict[str, np.ndarray],
                    labels: np.ndarray | None) -> dict[str, float]: ...

* a class, instantiated with no arguments and fed batch by batch (fixed memory)::

      class MyMetric:
          def update(self, float_outputs, quant_outputs, labels) -> None: ...
          def result(self) -> dict[str, float]: ...

  An `update` with a fourth parameter also gets the batch's inputs (name -> array): a
  language model's perplexity needs the token ids it predicts.

`labels` holds the class index of each sample given, or None when the data has no labels.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import numbers
from collections import defaultdict
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from quantcli.errors import InputError

Outputs = dict[str, np.ndarray]


class MetricPlugin:
    """A loaded user metric, in the accumulator form whatever form the user wrote."""

    def __init__(self, spec: str, target: Any) -> None:
        self.spec = spec
        self.target = target
        try:
            params = inspect.signature(target.update).parameters
        except (TypeError, ValueError):
            params = {}
        self.wants_inputs = len(params) >= 4

    def update(
        self,
        float_out: Outputs,
        quant_out: Outputs,
        labels: np.ndarray | None,
        inputs: Outputs | None = None,
    ) -> None:
        extra = (inputs or {},) if self.wants_inputs else ()
        self._call(self.target.update, float_out, quant_out, labels, *extra)

    def result(self) -> dict[str, float]:
        values = self._call(self.target.result)
        if not isinstance(values, dict) or not all(
            isinstance(k, str) and isinstance(v, numbers.Real) for k, v in values.items()
        ):
            raise InputError(f"metric {self.spec} must return a dict of str to float")
        return {k: float(v) for k, v in values.items()}

    def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:
            raise InputError(f"metric {self.spec} failed: {type(exc).__name__}: {exc}") from None


class _Concatenating:
    """Adapts the function form: collects every batch, calls the function once."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.float: defaultdict[str, list[np.ndarray]] = defaultdict(list)
        self.quant: defaultdict[str, list[np.ndarray]] = defaultdict(list)
        self.labels: list[np.ndarray] = []

    def update(self, float_out: Outputs, quant_out: Outputs, labels: np.ndarray | None) -> None:
        for store, out in ((self.float, float_out), (self.quant, quant_out)):
            for name, value in out.items():
                store[name].append(np.atleast_1d(value))
        if labels is not None:
            self.labels.append(labels)

    def result(self) -> Any:
        def cat(store: dict[str, list[np.ndarray]]) -> Outputs:
            return {k: np.concatenate(v) for k, v in store.items()}

        labels = np.concatenate(self.labels) if self.labels else None
        return self.fn(cat(self.float), cat(self.quant), labels)


def load_metric(spec: str) -> MetricPlugin:
    module_part, sep, name = spec.rpartition(":")
    if not sep or not module_part or not name:
        raise InputError(
            f"bad metric '{spec}'", hint="use module:function or path/to/file.py:function"
        )
    module = _import(module_part)
    target = getattr(module, name, None)
    if target is None:
        raise InputError(f"metric '{name}' not found in {module_part}")
    if inspect.isclass(target):
        try:
            instance = target()
        except Exception as exc:
            raise InputError(f"metric {spec} cannot be created: {exc}") from None
        if not all(callable(getattr(instance, m, None)) for m in ("update", "result")):
            raise InputError(f"metric class {spec} needs update() and result() methods")
        return MetricPlugin(spec, instance)
    if callable(target):
        return MetricPlugin(spec, _Concatenating(target))
    raise InputError(f"metric {spec} is neither a function nor a class")


def _import(module_part: str) -> ModuleType:
    is_file = module_part.endswith(".py") or "/" in module_part or "\\" in module_part
    try:
        if not is_file:
            return importlib.import_module(module_part)
        path = Path(module_part)
        if not path.is_file():
            raise InputError(f"metric file not found: {module_part}")
        spec = importlib.util.spec_from_file_location(f"quantcli_metric_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise InputError(f"cannot import metric file {module_part}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except InputError:
        raise
    except Exception as exc:  # ImportError, or anything the module raises at import time
        raise InputError(f"cannot import metric module {module_part}: {exc}") from None
