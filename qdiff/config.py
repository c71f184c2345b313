"""The quantization config: per-layer ``quant_enable`` and parameters, as JSON (imports stdlib only).

Layout (modelled on the vendor toolkits' configs)::

    {
      "batch_num": 10,                          # calibration samples (batches) to use
      "quant_format": "QDQ",                    # or "QOperator"
      "activation_quant_params": {              # defaults for every layer
        "calibration_method": "MinMax",         # MinMax | Entropy | Percentile | Distribution
        "type": "QUInt8",                       # QInt8 | QUInt8 | QInt16 | QUInt16
        "symmetric": false,
        "moving_average": false, "averaging_constant": 0.01,   # MinMax only
        "percentile": 99.999                    # Percentile only
      },
      "weight_quant_params": {"type": "QInt8", "per_channel": true, "symmetric": true},
      "layers": {                               # one entry per quantizable layer (float node name)
        "conv1": {"quant_enable": true},
        "fc1":   {"quant_enable": false},
        "fc2":   {"quant_enable": true, "activation_quant_params": {"calibration_method": "Entropy"},
                  "weight_quant_params": {"symmetric": false}}
      }
    }

Unknown keys are errors naming the key and the valid ones. :func:`save_config` and
:func:`load_config` round-trip exactly.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Any

from qdiff.errors import UsageError

__all__ = [
    "QuantConfig",
    "LayerConfig",
    "load_config",
    "save_config",
    "ACTIVATION_DEFAULTS",
    "WEIGHT_DEFAULTS",
    "CALIBRATION_METHODS",
]

CALIBRATION_METHODS = ("MinMax", "Entropy", "Percentile", "Distribution")
ACTIVATION_TYPES = ("QInt8", "QUInt8", "QInt16", "QUInt16")
WEIGHT_TYPES = ("QInt8", "QUInt8", "QInt16", "QUInt16", "QInt4", "QUInt4")
FORMATS = ("QDQ", "QOperator")

ACTIVATION_DEFAULTS: dict[str, Any] = {
    "calibration_method": "MinMax",
    "type": "QUInt8",
    "symmetric": False,
    "moving_average": False,
    "averaging_constant": 0.01,
    "percentile": 99.999,
}
WEIGHT_DEFAULTS: dict[str, Any] = {"type": "QInt8", "per_channel": True, "symmetric": True}
TOP_KEYS = ("batch_num", "quant_format", "activation_quant_params", "weight_quant_params", "layers")
LAYER_KEYS = ("quant_enable", "activation_quant_params", "weight_quant_params")
#: per-layer activation overrides onnxruntime can apply to one tensor
LAYER_ACTIVATION_KEYS = ("calibration_method", "type", "symmetric", "percentile")
LAYER_WEIGHT_KEYS = ("type", "symmetric", "per_channel")


@dataclass
class LayerConfig:
    """One quantizable layer: whether it is quantized, and parameters overriding the defaults."""

    quant_enable: bool = True
    activation_quant_params: dict[str, Any] = field(default_factory=dict)
    weight_quant_params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"quant_enable": self.quant_enable}
        if self.activation_quant_params:
            out["activation_quant_params"] = dict(self.activation_quant_params)
        if self.weight_quant_params:
            out["weight_quant_params"] = dict(self.weight_quant_params)
        return out


@dataclass
class QuantConfig:
    """A whole quantization config (see the module docstring for the JSON layout)."""

    batch_num: int = 10
    quant_format: str = "QDQ"
    activation_quant_params: dict[str, Any] = field(default_factory=lambda: dict(ACTIVATION_DEFAULTS))
    weight_quant_params: dict[str, Any] = field(default_factory=lambda: dict(WEIGHT_DEFAULTS))
    layers: dict[str, LayerConfig] = field(default_factory=dict)

    @property
    def disabled(self) -> list[str]:
        """Float node names with ``quant_enable`` false, in config order."""
        return [name for name, layer in self.layers.items() if not layer.quant_enable]

    def with_disabled(self, names: list[str] | set[str]) -> QuantConfig:
        """A copy in which exactly ``names`` (plus nothing else) have quant_enable false."""
        out = copy.deepcopy(self)
        for name in names:
            out.layers.setdefault(name, LayerConfig())
        for name, layer in out.layers.items():
            layer.quant_enable = name not in names
        return out

    def activation(self, layer: str) -> dict[str, Any]:
        merged = dict(self.activation_quant_params)
        if layer in self.layers:
            merged.update(self.layers[layer].activation_quant_params)
        return merged

    def weight(self, layer: str) -> dict[str, Any]:
        merged = dict(self.weight_quant_params)
        if layer in self.layers:
            merged.update(self.layers[layer].weight_quant_params)
        return merged

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_num": self.batch_num,
            "quant_format": self.quant_format,
            "activation_quant_params": dict(self.activation_quant_params),
            "weight_quant_params": dict(self.weight_quant_params),
            "layers": {name: layer.to_dict() for name, layer in self.layers.items()},
        }

    @classmethod
    def from_dict(cls, doc: Any, where: str = "config") -> QuantConfig:
        """Validate and build; raises UsageError naming the bad key or value and the valid ones."""
        if not isinstance(doc, dict):
            raise UsageError(f"{where}: the top level must be a JSON object with keys {', '.join(TOP_KEYS)}")
        _check_keys(doc, TOP_KEYS, where)
        batch_num = doc.get("batch_num", 10)
        if not isinstance(batch_num, int) or isinstance(batch_num, bool) or not 1 <= batch_num <= MAX_BATCH_NUM:
            raise UsageError(f"{where}: batch_num must be a positive integer (at most {MAX_BATCH_NUM:,}), got {_short(batch_num)}")
        fmt = doc.get("quant_format", "QDQ")
        if fmt not in FORMATS:
            raise UsageError(f"{where}: quant_format {_short(fmt)} is not one of {', '.join(FORMATS)}")
        act = dict(ACTIVATION_DEFAULTS)
        act.update(_params(doc.get("activation_quant_params", {}), tuple(ACTIVATION_DEFAULTS), f"{where}: activation_quant_params"))
        wgt = dict(WEIGHT_DEFAULTS)
        wgt.update(_params(doc.get("weight_quant_params", {}), tuple(WEIGHT_DEFAULTS), f"{where}: weight_quant_params"))
        layers_doc = doc.get("layers", {})
        if not isinstance(layers_doc, dict):
            raise UsageError(f"{where}: layers must be an object keyed by float node name")
        layers = {}
        for name, entry in layers_doc.items():
            lw = f"{where}: layers.{name}"
            if not isinstance(entry, dict):
                raise UsageError(f"{lw} must be an object with keys {', '.join(LAYER_KEYS)}")
            _check_keys(entry, LAYER_KEYS, lw)
            enable = entry.get("quant_enable", True)
            if not isinstance(enable, bool):
                raise UsageError(f"{lw}.quant_enable must be true or false, got {_short(enable)}")
            layers[name] = LayerConfig(
                enable,
                _params(entry.get("activation_quant_params", {}), LAYER_ACTIVATION_KEYS, f"{lw}.activation_quant_params"),
                _params(entry.get("weight_quant_params", {}), LAYER_WEIGHT_KEYS, f"{lw}.weight_quant_params"),
            )
        return cls(batch_num, fmt, act, wgt, layers)


#: a config larger than this is not one (far above the init config of the largest model; size in bench/RESULTS.md)
MAX_CONFIG_BYTES = 64 << 20
#: calibration samples a config may ask for
MAX_BATCH_NUM = 1_000_000


def _short(value: Any) -> str:
    """``repr`` of a config value, cut to 60 characters (a huge number or a deep list stays one short line)."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # ints over 4300 digits; absurd nesting
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def _check_keys(doc: dict[str, Any], valid: tuple[str, ...], where: str) -> None:
    for key in doc:
        if key not in valid:
            raise UsageError(f"{where}: unknown key {_short(key)}; valid keys are {', '.join(valid)}")


def _params(doc: Any, valid: tuple[str, ...], where: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise UsageError(f"{where} must be an object with keys from {', '.join(valid)}")
    _check_keys(doc, valid, where)
    checks = {
        "calibration_method": CALIBRATION_METHODS,
        "type": ACTIVATION_TYPES if "activation" in where else WEIGHT_TYPES,
    }
    for key, value in doc.items():
        if key in checks and value not in checks[key]:
            raise UsageError(f"{where}.{key} {_short(value)} is not one of {', '.join(checks[key])}")
        if key in ("symmetric", "moving_average", "per_channel") and not isinstance(value, bool):
            raise UsageError(f"{where}.{key} must be true or false, got {_short(value)}")
        if key in ("averaging_constant", "percentile") and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UsageError(f"{where}.{key} must be a number, got {_short(value)}")
        if key == "percentile" and not 0 < value <= 100:  # exact for huge ints too; false for NaN
            raise UsageError(f"{where}.percentile must be in (0, 100], got {_short(value)}")
        if key == "averaging_constant" and not 0 < value <= 1:
            raise UsageError(f"{where}.averaging_constant must be in (0, 1], got {_short(value)}")
    return dict(doc)


def load_config(path: str | os.PathLike[str]) -> QuantConfig:
    """Read and validate a config file."""
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise UsageError(f"config '{p}' does not exist; create one with 'qdiff config init FLOAT -o {p}'")
    size = os.path.getsize(p)
    if size > MAX_CONFIG_BYTES:
        raise UsageError(
            f"config '{p}' is {size:,} bytes, more than a config can be ({MAX_CONFIG_BYTES:,}); "
            f"check the path, or make a new one with 'qdiff config init FLOAT -o {p}'"
        )
    try:
        with open(p, encoding="utf-8") as fh:
            doc = json.load(fh)
    except json.JSONDecodeError as exc:
        raise UsageError(f"config '{p}' is not valid JSON: {exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"config '{p}' is not UTF-8 text (a binary file?); pass the JSON config") from None
    except RecursionError:
        raise UsageError(f"config '{p}' nests JSON too deeply to be a qdiff config; pass the JSON config") from None
    except ValueError as exc:  # Python refuses integers of more than 4300 digits
        if "digits" in str(exc):
            raise UsageError(f"config '{p}' holds a number of more than 4300 digits; no config value is that large") from None
        raise UsageError(f"config '{p}' is not a valid config ({str(exc).splitlines()[0][:120]})") from None
    return QuantConfig.from_dict(doc, where=f"config '{p}'")


def save_config(config: QuantConfig, path: str | os.PathLike[str]) -> None:
    """Write a config as JSON, atomically."""
    from qdiff._io import write_atomic

    write_atomic(path, json.dumps(config.to_dict(), indent=2) + "\n")
