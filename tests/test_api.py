"""The public surface, import costs, and the README's examples."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import qdiff

ROOT = Path(__file__).resolve().parent.parent

EXPECTED = {
    "__version__", "compare", "compare_quant_only", "CompareResult", "match", "Alignment", "load_tensor_map", "sensitivity", "SensitivityResult", "diagnose", "DiagnoseResult", "Finding", "profile", "ProfileResult", "TensorPair", "WeightPair", "Unmatched", "Matching",
    "MatchMethod", "DequantParams", "match_models", "Graph", "load_model", "InputSpec", "input_specs",
    "make_source", "SessionOptions", "default_session_factory", "tap_model", "QdiffError", "ModelError",
    "ModelMismatchError", "DataError", "ProviderError", "UsageError", "quantize", "init_config", "calib_sweep",
    "export_skip_list", "QuantConfig", "LayerConfig", "load_config", "save_config", "fallback", "FallbackResult",
    "RunInfo",
}  # fmt: skip


def test_public_surface_is_the_reviewed_one():
    assert set(qdiff.__all__) == EXPECTED
    assert len(qdiff.__all__) == len(set(qdiff.__all__))
    for name in qdiff.__all__:
        assert hasattr(qdiff, name), name


def test_public_functions_are_not_shadowed_by_their_modules():
    # importing every implementation module first must not turn qdiff.compare etc. into modules
    import importlib
    import pkgutil

    for info in pkgutil.walk_packages(qdiff.__path__, "qdiff."):
        if info.name.startswith("qdiff.cli") or info.name == "qdiff._ckernels":
            continue
        importlib.import_module(info.name)
    for name in ("compare", "sensitivity", "diagnose", "profile", "quantize", "fallback", "match"):
        assert callable(getattr(qdiff, name)) and not isinstance(getattr(qdiff, name), type(qdiff)), name


def test_import_qdiff_metrics_is_light():
    code = (
        "import sys, time; t = time.perf_counter(); import qdiff.metrics; "
        "print(sorted(m for m in ('onnxruntime', 'onnx', 'pandas', 'matplotlib', 'rich') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_user_errors_share_one_base():
    for name in ("ModelError", "ModelMismatchError", "DataError", "ProviderError", "UsageError"):
        assert issubclass(getattr(qdiff, name), qdiff.QdiffError)


def test_import_qdiff_does_not_load_renderers():
    code = "import sys, qdiff; print(sorted(m for m in ('rich', 'matplotlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_readme_python_example_runs():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        for block in blocks:
            namespace: dict = {}
            exec(compile(block, "README.md", "exec"), namespace)
            assert namespace["result"].layers.shape[0] > 0
    finally:
        os.chdir(cwd)


def test_readme_quick_start_has_exactly_the_two_make_targets():
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in quick.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
