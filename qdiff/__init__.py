"""qdiff: layer-wise quantization accuracy debugging for ONNX models.

The public surface, grouped (audited by tests/test_api.py)::

    comparing     compare, compare_quant_only, CompareResult
    aligning      match, Alignment, load_tensor_map
    sensitivity   sensitivity, SensitivityResult
    diagnosing    diagnose, DiagnoseResult, Finding, profile, ProfileResult
    records       TensorPair, WeightPair, Unmatched, Matching, MatchMethod, DequantParams
    matching      match_models, Graph, load_model
    data          InputSpec, input_specs, make_source
    running       SessionOptions, default_session_factory, tap_model
    errors        QdiffError, ModelError, ModelMismatchError, DataError, ProviderError, UsageError
"""

from __future__ import annotations

__version__ = "0.1.0"

from qdiff.compare import compare, compare_quant_only, load_tensor_map, match
from qdiff.errors import DataError, ModelError, ModelMismatchError, ProviderError, QdiffError, UsageError
from qdiff.graph import Graph, load_model
from qdiff.inputs import InputSpec, input_specs, make_source
from qdiff.matching import match_models
from qdiff.result import Alignment, CompareResult
from qdiff.diagnose import DiagnoseResult, Finding, diagnose
from qdiff.profile import ProfileResult, profile
from qdiff.sensitivity import SensitivityResult, sensitivity
from qdiff.runner import SessionOptions, default_session_factory, tap_model
from qdiff.structs import DequantParams, Matching, MatchMethod, TensorPair, Unmatched, WeightPair

__all__ = [
    "__version__",
    # comparing
    "compare",
    "compare_quant_only",
    "CompareResult",
    # aligning
    "match",
    "Alignment",
    "load_tensor_map",
    # sensitivity
    "sensitivity",
    "SensitivityResult",
    # diagnosing
    "diagnose",
    "DiagnoseResult",
    "Finding",
    "profile",
    "ProfileResult",
    # records
    "TensorPair",
    "WeightPair",
    "Unmatched",
    "Matching",
    "MatchMethod",
    "DequantParams",
    # matching
    "match_models",
    "Graph",
    "load_model",
    # data
    "InputSpec",
    "input_specs",
    "make_source",
    # running
    "SessionOptions",
    "default_session_factory",
    "tap_model",
    # errors
    "QdiffError",
    "ModelError",
    "ModelMismatchError",
    "DataError",
    "ProviderError",
    "UsageError",
]
