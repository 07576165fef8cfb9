"""`quantcli compare FLOAT QUANT --data DATA`: accuracy, latency, size, per-layer error."""

from __future__ import annotations

from quantcli.cli.common import ModelArg, handle_errors
from quantcli.errors import InputError


@handle_errors
def compare(float_model: ModelArg, quant_model: ModelArg) -> None:
    """Compare a quantized model with its float original (not implemented yet)."""
    raise InputError("compare is not implemented yet")
