"""Errors qdiff raises for problems with what the user gave it.

Hierarchy::

    QdiffError                      a user-facing problem: the CLI prints one line, exits 2
    ├── ModelError                  a model file is missing, not ONNX, or onnxruntime cannot load it
    ├── ModelMismatchError          the two models cannot be compared (inputs differ, ...)
    ├── DataError                   input data does not fit the model (names, dtypes, shapes, NaN)
    ├── ProviderError               an execution provider that onnxruntime does not offer here
    ├── UsageError                  an option value that makes no sense (bad --input-shape, ...)
    └── EvalError                   the user's --eval function failed, or returned no number

Anything else that escapes qdiff is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "QdiffError",
    "ModelError",
    "ModelMismatchError",
    "DataError",
    "ProviderError",
    "UsageError",
    "EvalError",
]


class QdiffError(Exception):
    """A problem with the user's input; the message says what failed and what to do."""


class ModelError(QdiffError):
    """A model file is missing, is not ONNX, or cannot be loaded by onnxruntime."""


class ModelMismatchError(QdiffError):
    """The float and quantized models cannot be compared with each other."""


class DataError(QdiffError):
    """Input data does not fit the model's inputs."""


class ProviderError(QdiffError):
    """The requested onnxruntime execution provider is not available."""


class UsageError(QdiffError):
    """An option value is malformed or contradicts another."""


class EvalError(QdiffError):
    """The user's ``--eval`` function raised, exited, or returned something that is not a finite number.

    Attributes:
        detail: the traceback frames of the user's own code (qdiff's frames left out), printed by the
            CLI after the one-line message; empty when there is nothing of theirs to show.
    """

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail
