"""Why a conversion stopped. Each message says what was wrong and what to do; no bundle was written."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from device.errors import LeukoCamError


class ConvertError(LeukoCamError):
    """A trained model cannot be turned into a bundle as asked: a run folder convert cannot read, or no
    quantization mode fits the size limit."""


class GateFailedError(ConvertError):
    """The converted model fails the fidelity gate (and --force was not given)."""

    def __init__(self, message: str, verification: Mapping[str, Any], failures: Sequence[str]):
        super().__init__(message)
        self.verification = verification
        self.failures = list(failures)
