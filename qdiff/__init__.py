"""qdiff: layer-wise quantization accuracy debugging for ONNX models.

The public surface, grouped (audited by tests/test_api.py)::

    comparing     compare, compare_quant_only, CompareResult
    aligning      match, Alignment, load_tensor_map
    sensitivity   sensitivity, SensitivityResult
    quantizing    quantize, init_config, calib_sweep, export_skip_list, QuantConfig, LayerConfig,
                  load_config, save_config
    fallback      fallback, FallbackResult
    diagnosing    diagnose, DiagnoseResult, Finding, profile, ProfileResult
    records       TensorPair, WeightPair, Unmatched, Matching, MatchMethod, DequantParams, RunInfo
    matching      match_models, Graph, load_model
    data          InputSpec, input_specs, make_source
    running       SessionOptions, default_session_factory, tap_model
    errors        QdiffError, ModelError, ModelMismatchError, DataError, ProviderError, UsageError

Names are imported on first use (PEP 562), so ``import qdiff.metrics`` loads numpy and nothing of
onnxruntime, pandas, matplotlib or rich. The modules behind a public function are private
(``qdiff._compare`` holds :func:`compare`): ``qdiff.compare`` is always the function.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_SOURCES: dict[str, str] = {
    # comparing
    "compare": "qdiff._compare",
    "compare_quant_only": "qdiff._compare",
    "CompareResult": "qdiff.result",
    # aligning
    "match": "qdiff._compare",
    "Alignment": "qdiff.result",
    "load_tensor_map": "qdiff.matching",
    # sensitivity
    "sensitivity": "qdiff._sensitivity",
    "SensitivityResult": "qdiff._sensitivity",
    # quantizing
    "quantize": "qdiff._quantize",
    "init_config": "qdiff._quantize",
    "calib_sweep": "qdiff._quantize",
    "export_skip_list": "qdiff._quantize",
    "QuantConfig": "qdiff.config",
    "LayerConfig": "qdiff.config",
    "load_config": "qdiff.config",
    "save_config": "qdiff.config",
    # fallback
    "fallback": "qdiff._fallback",
    "FallbackResult": "qdiff._fallback",
    # diagnosing
    "diagnose": "qdiff._diagnose",
    "DiagnoseResult": "qdiff._diagnose",
    "Finding": "qdiff._diagnose",
    "profile": "qdiff._profile",
    "ProfileResult": "qdiff._profile",
    # records
    "TensorPair": "qdiff.structs",
    "WeightPair": "qdiff.structs",
    "Unmatched": "qdiff.structs",
    "Matching": "qdiff.structs",
    "MatchMethod": "qdiff.structs",
    "DequantParams": "qdiff.structs",
    "RunInfo": "qdiff.result",
    # matching
    "match_models": "qdiff.matching",
    "Graph": "qdiff.graph",
    "load_model": "qdiff.graph",
    # data
    "InputSpec": "qdiff.inputs",
    "input_specs": "qdiff.inputs",
    "make_source": "qdiff.inputs",
    # running
    "SessionOptions": "qdiff.engine.sessions",
    "default_session_factory": "qdiff.engine.sessions",
    "tap_model": "qdiff.engine.sessions",
    # errors
    "QdiffError": "qdiff.errors",
    "ModelError": "qdiff.errors",
    "ModelMismatchError": "qdiff.errors",
    "DataError": "qdiff.errors",
    "ProviderError": "qdiff.errors",
    "UsageError": "qdiff.errors",
}

__all__ = ["__version__", *_SOURCES]


def __getattr__(name: str) -> Any:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module 'qdiff' has no attribute {name!r}")
    value = getattr(importlib.import_module(source), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SOURCES))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from qdiff._compare import compare, compare_quant_only, match
    from qdiff._diagnose import DiagnoseResult, Finding, diagnose
    from qdiff._fallback import FallbackResult, fallback
    from qdiff._profile import ProfileResult, profile
    from qdiff._quantize import calib_sweep, export_skip_list, init_config, quantize
    from qdiff._sensitivity import SensitivityResult, sensitivity
    from qdiff.config import LayerConfig, QuantConfig, load_config, save_config
    from qdiff.engine.sessions import SessionOptions, default_session_factory, tap_model
    from qdiff.errors import DataError, ModelError, ModelMismatchError, ProviderError, QdiffError, UsageError
    from qdiff.graph import Graph, load_model
    from qdiff.inputs import InputSpec, input_specs, make_source
    from qdiff.matching import load_tensor_map, match_models
    from qdiff.result import Alignment, CompareResult, RunInfo
    from qdiff.structs import DequantParams, Matching, MatchMethod, TensorPair, Unmatched, WeightPair
