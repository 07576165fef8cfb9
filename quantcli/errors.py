"""Exceptions the library raises on purpose, each mapped to one CLI exit code.

Library code raises these with a message that says what is wrong and a hint that says
what to do; the CLI prints them as one line. Anything else that escapes is a bug (exit 3).
"""

from __future__ import annotations


class QuantcliError(Exception):
    """Base of every expected failure. `exit_code` is what the CLI returns."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def __reduce__(self) -> tuple:
        # Keep the hint when the error crosses a process boundary (a cluster task's result).
        return (type(self), (self.message, self.hint))


class InputError(QuantcliError):
    """Bad input from the user: a file, an option, a dataset (exit 2)."""


class ModelError(InputError):
    """The model file cannot be read, is invalid, or is unsupported (exit 2)."""


class DataError(InputError):
    """The dataset does not fit the model or holds bad values (exit 2)."""


class OutputError(InputError):
    """The output path cannot be written as asked (exit 2)."""


class GateFailed(QuantcliError):
    """A quality gate of `compare` failed (exit 1)."""

    exit_code = 1


class ClusterError(QuantcliError):
    """The Ray cluster cannot be reached, is not installed, or lost a task (exit 2)."""
