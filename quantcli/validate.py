"""Validate a written model before it replaces anything: checker, ORT session, finite outputs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx.shape_inference

from quantcli.errors import QuantcliError
from quantcli.runtime import create_session

Feeds = dict[str, np.ndarray]


class InvalidOutput(QuantcliError):
    """quantcli produced a model that does not validate: a bug, reported as such (exit 3)."""

    exit_code = 3


def output_validator(samples: list[Feeds], provider: str = "cpu") -> Callable[[Path], None]:
    """A callback for save_model: full ONNX check, an ORT session, finite outputs on samples."""

    def validate(path: Path) -> None:
        # full_check also runs strict shape inference: its failures (a type clash, say)
        # are InferenceError, not ValidationError.
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise InvalidOutput(f"the quantized model fails the ONNX checker: {exc}") from exc
        try:
            # No CPU arena: two runs gain nothing from it, and it would keep their largest
            # transients (a QDQ embedding table dequantized whole: 113 MB on SmolLM2) while
            # the converted model is still in memory.
            session = create_session(path, provider, arena=False)
        except QuantcliError:
            raise
        except Exception as exc:
            raise InvalidOutput(f"ONNX Runtime cannot load the quantized model: {exc}") from exc
        names = [o.name for o in session.get_outputs()]
        for i, feeds in enumerate(samples):
            try:
                outputs = session.run(None, feeds)
            except Exception as exc:
                raise InvalidOutput(
                    f"the quantized model fails to run on sample {i}: {exc}"
                ) from exc
            for name, array in zip(names, outputs, strict=True):
                if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
                    raise InvalidOutput(
                        f"the quantized model's output '{name}' is not finite on sample {i}"
                    )

    return validate
