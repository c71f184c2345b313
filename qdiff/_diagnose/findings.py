"""What the checks and ``profile`` share: findings, the check record, severities and thresholds.

A check is a function ``(DiagnoseContext) -> CheckOutput``: its findings, its tables and its
figures, which :func:`qdiff._diagnose.diagnose` collects into the result. Nothing here runs a
model or reads a graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from qdiff._diagnose.context import DiagnoseContext

__all__ = ["Finding", "FINDING_COLUMNS", "Check", "CheckOutput", "CannotRun", "SEVERITIES", "THRESHOLDS"]

#: severities, most severe first
SEVERITIES = ("error", "warning", "info")

#: the numbers the checks compare against (recorded in ``meta["thresholds"]``)
THRESHOLDS: dict[str, float] = {
    # saturation: share of a tensor's values clipped at the integer range
    "saturation_warning": 0.01,
    "saturation_error": 0.10,
    # saturation: share of the integer range the values use (8-bit types only)
    "range_used_warning": 0.10,
    # coverage: weights this small (elements) are not listed as "large weights left in float"
    "coverage_min_weight_elements": 16,
    # coverage: share of weight bytes still float above which a warning is given
    "coverage_float_share_warning": 0.5,
    # fp16: a layer whose relative error is at least this and this many times its inputs' error
    "fp16_jump_min_error": 1e-2,
    "fp16_jump_factor": 10.0,
    # fp16: share of a layer's values flushed to zero above which a warning is given
    "fp16_underflow_warning": 0.01,
}


@dataclass(frozen=True)
class Finding:
    """One problem (or observation) a check found.

    Attributes:
        check: the check's name (a key of :data:`CHECKS`, or ``"profile"``).
        severity: ``"error"`` (results are wrong or the quantization did not happen),
            ``"warning"`` (accuracy or speed is likely lost) or ``"info"`` (a figure, or why a
            check could not run).
        layer: the float node name (``compare``'s layer name, ``conv1+relu1`` for fused layers,
            ``input:NAME`` for a graph input) where one applies, else ``""``.
        message: what is wrong, with the numbers.
        suggestion: what to do about it.
    """

    check: str
    severity: str
    layer: str
    message: str
    suggestion: str = ""

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, not {self.severity!r}")

    def to_dict(self) -> dict[str, str]:
        return {
            "check": self.check,
            "severity": self.severity,
            "layer": self.layer,
            "message": self.message,
            "suggestion": self.suggestion,
        }


FINDING_COLUMNS = ["check", "severity", "layer", "message", "suggestion"]


@dataclass
class CheckOutput:
    """What one check gives back.

    Attributes:
        findings: its findings, in the order it found them.
        tables: its DataFrames by name (most checks one, named after the check; coverage two).
        stats: its figures (``meta["stats"][check]``); None when it has none.
    """

    findings: list[Finding]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    stats: dict[str, Any] | None = None


@dataclass(frozen=True)
class Check:
    """A registered check.

    Attributes:
        name: the name findings carry and ``checks=`` selects.
        func: ``(DiagnoseContext) -> CheckOutput``.
        description: one line for ``--help`` and the docs.
        applies: which model kinds it looks at (``qdq``, ``qoperator``, ``dynamic``, ``fp16``).
        activations: whether it runs the model(s).
    """

    name: str
    func: Callable[[DiagnoseContext], CheckOutput]
    description: str
    applies: frozenset[str]
    activations: bool = False


class CannotRun(Exception):
    """Raised inside a check when it cannot run; the message becomes an ``info`` finding."""
