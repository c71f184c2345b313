"""``diagnose``: detect the quantization failures users meet again and again, and say what to do.

Each check is a function ``(DiagnoseContext) -> list[Finding]`` in :data:`CHECKS`. A finding names
the check, a severity (``error`` / ``warning`` / ``info``), the layer (the float node name where one
applies, as ``compare`` names layers), what is wrong and what to do::

    INT8.onnx [FLOAT.onnx] [--data]
        │
        ├─ static checks (graph only) ───── qparams      pass-through ops whose in/out scale or zero point differ,
        │                                                Q/DQ of one tensor that disagree
        │                                   coverage     nodes/weights quantized vs float, bytes, file sizes
        │                                   conversions  Int8→Float→Int8 round trips (DQ → float ops → Q)
        │                                   per_channel  per-tensor Conv/MatMul/Gemm weights among per-channel ones
        │
        └─ activation checks (run on --data, else seeded random inputs)
                                            fp16         FP16 model vs its float32 original: overflow, NaN/inf,
                                                         flushed subnormals, error jumps -> node_block_list
                                            saturation   per quantized tensor: fraction clipped at the integer
                                                         range, fraction of the range used

A check that cannot run (it needs FLOAT, or inputs that cannot be made) says so as an ``info``
finding; a check that does not apply to the model (saturation on an FP16 model) is recorded in
``meta["checks"]`` only. Layer names come from :func:`qdiff.match_models` when FLOAT is given,
else from the quantized node names with the quantizer's suffixes (``_quant``, ``_QuantizeLinear``,
...) removed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pandas as pd

from qdiff._io import write_atomic
from qdiff.ops import COMPUTE_OPS, INTEGER_OPS, LAYOUT, QDQ, RELU_HOSTS, RELU_LIKE, SHARES_QPARAMS, TRANSPARENT, weight_channel_axis
from qdiff.errors import UsageError
from qdiff.graph import Graph, LoadedModel, ModelLike, attr_value, load_model
from qdiff.inputs import DataLike, DataSource, check_same_inputs, input_specs, make_source, parse_input_shapes
from qdiff.matching import QOP_SPECS, _base_name, _Skeleton, match_models, no_weight_values
from qdiff.engine.sessions import Session, SessionFactory, SessionOptions, default_session_factory, feed_for, open_session, resolve_provider, tap_model
from qdiff.structs import Matching, PairKind, TensorPair

__all__ = [
    "Finding",
    "DiagnoseResult",
    "DiagnoseContext",
    "Check",
    "CHECKS",
    "SEVERITIES",
    "THRESHOLDS",
    "diagnose",
]

log = logging.getLogger(__name__)

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

FP16_MAX = 65504.0  #: largest finite float16
FP16_MIN_NORMAL = 6.103515625e-05  #: smallest normal float16 (2**-14)
FP16_EPS = 2.0**-11  #: float16 unit roundoff, the floor of "input error" for error jumps

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
_REDUCED_FLOAT = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
_INT_TYPES = {
    onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
    onnx.TensorProto.INT4, onnx.TensorProto.UINT4,
}  # fmt: skip
_QRANGE = {
    onnx.TensorProto.INT8: (-128, 127),
    onnx.TensorProto.UINT8: (0, 255),
    onnx.TensorProto.INT16: (-32768, 32767),
    onnx.TensorProto.UINT16: (0, 65535),
    onnx.TensorProto.INT4: (-8, 7),
    onnx.TensorProto.UINT4: (0, 15),
}
_TYPE_NAMES = {
    onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT16: "int16",
    onnx.TensorProto.UINT16: "uint16", onnx.TensorProto.INT4: "int4", onnx.TensorProto.UINT4: "uint4",
    onnx.TensorProto.INT32: "int32", onnx.TensorProto.INT64: "int64", onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.BOOL: "bool",
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


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
class DiagnoseResult:
    """What ``diagnose`` found.

    Attributes:
        findings: most severe first, then in check order.
        tables: per-check DataFrames (``qparams``, ``coverage``, ``weights``, ``conversions``,
            ``per_channel``, ``fp16``, ``saturation``), for the checks that ran.
        meta: versions, models, data, which checks ran (``meta["checks"]``), per-check figures
            (``meta["stats"]``) and the thresholds used.
    """

    findings: list[Finding]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def findings_frame(self) -> pd.DataFrame:
        """The findings as a DataFrame with columns check, severity, layer, message, suggestion."""
        return pd.DataFrame([f.to_dict() for f in self.findings], columns=FINDING_COLUMNS)

    def by_check(self, check: str) -> list[Finding]:
        """The findings of one check."""
        return [f for f in self.findings if f.check == check]

    def counts(self) -> dict[str, int]:
        """How many findings of each severity."""
        return {s: sum(1 for f in self.findings if f.severity == s) for s in SEVERITIES}

    def worst_severity(self) -> str | None:
        """The most severe severity among the findings (None when there are none)."""
        for s in SEVERITIES:
            if any(f.severity == s for f in self.findings):
                return s
        return None

    def to_dict(self) -> dict[str, Any]:
        """``{"findings": [...], "summary": {...}, "tables": {...}, "meta": {...}}``, JSON-safe."""
        from qdiff.result import _records

        return {
            "findings": [f.to_dict() for f in self.findings],
            "summary": self.counts(),
            "tables": {name: _records(df) for name, df in self.tables.items()},
            "meta": _json_safe(self.meta),
        }

    def to_json(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_dict` as strict JSON (no NaN), atomically."""
        from qdiff.result import _json_default

        write_atomic(path, json.dumps(self.to_dict(), indent=2, allow_nan=False, default=_json_default))

    def __rich__(self) -> Any:
        from qdiff.cli_diagnose import diagnose_renderable

        return diagnose_renderable(self)


@dataclass(frozen=True)
class Check:
    """A registered check.

    Attributes:
        name: the name findings carry and ``checks=`` selects.
        func: ``(DiagnoseContext) -> list[Finding]``.
        description: one line for ``--help`` and the docs.
        applies: which model kinds it looks at (``qdq``, ``qoperator``, ``dynamic``, ``fp16``).
        activations: whether it runs the model(s).
    """

    name: str
    func: Callable[[DiagnoseContext], list[Finding]]
    description: str
    applies: frozenset[str]
    activations: bool = False


class CannotRun(Exception):
    """Raised inside a check when it cannot run; the message becomes an ``info`` finding."""


# ---------------------------------------------------------------------------------------------
# Context
# ---------------------------------------------------------------------------------------------


@dataclass
class DiagnoseContext:
    """Everything a check may read; checks add their tables and figures to it.

    Attributes:
        quant: the model under diagnosis (int8 or FP16), as loaded.
        qg: its graph view.
        float: the float32 original, when given.
        fg: its graph view.
        matching: ``match_models(fg, qg)`` when FLOAT is given.
        kind: ``qdq``, ``qoperator``, ``dynamic``, ``fp16`` or ``float`` (nothing quantized).
        layers: names quantized nodes and tensors after float layers.
        skeleton: the quantized graph's matching skeleton (groups, integer ops, rescale chains).
        tables: per-check DataFrames (filled by the checks).
        stats: per-check figures (filled by the checks; ``meta["stats"]``).
        notes: remarks for ``meta["notes"]``.
    """

    quant: LoadedModel
    qg: Graph
    float: LoadedModel | None
    fg: Graph | None
    matching: Matching | None
    kind: str
    layers: _Layers
    skeleton: _Skeleton
    data: DataLike
    samples: int | None
    seed: int
    input_shapes: dict[str, tuple[int, ...]]
    session_factory: SessionFactory
    provider: str = "CPUExecutionProvider"
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    data_info: dict[str, Any] = field(default_factory=dict)

    @property
    def random_inputs(self) -> bool:
        return self.data is None

    def source(self) -> DataSource:
        """A fresh data source (the same samples every call).

        Raises:
            CannotRun: random inputs cannot be made (a dynamic dimension without ``input_shapes``).
        """
        specs = input_specs(self.fg) if self.fg is not None else input_specs(self.qg)
        try:
            return make_source(self.data, specs, samples=self.samples, seed=self.seed, input_shapes=self.input_shapes)
        except UsageError as exc:
            if self.data is not None:
                raise
            raise CannotRun(f"no inputs to run the model on: {exc}") from None

    def session(self, model: onnx.ModelProto, label: str) -> Session:
        sess, notes = open_session(self.session_factory, model, label)
        self.notes.extend(n for n in notes if n not in self.notes)
        return sess

    def record_source(self, source: DataSource) -> None:
        self.data_info = {
            "data": source.description,
            "data_sha256": source.fingerprint(),
            "samples": source.samples,
            "random_inputs": self.random_inputs,
        }


class _Layers:
    """Names the quantized graph's nodes and tensors after the float layers they implement.

    With a matching, a node writing a tensor pair's values takes the pair's layer name; Q/DQ,
    Identity, Cast and rescale nodes take the layer of the tensor they read (a weight's Q/DQ the
    layer of the node reading it). Without one, names lose the quantizer's suffixes
    (``conv1_quant`` -> ``conv1``).
    """

    def __init__(self, g: Graph, skeleton: _Skeleton, matching: Matching | None) -> None:
        self.g = g
        self._absorbed = skeleton.absorbed
        self._domain = skeleton.domain
        self._by_node: dict[str, str] = {}
        self._cache: dict[int, str] = {}
        if matching is not None:
            for p in matching.pairs:
                if p.quant_node and p.kind is PairKind.ACTIVATION:
                    self._by_node.setdefault(p.quant_node, p.layer)

    def node(self, idx: int) -> str:
        """The layer a quantized node belongs to."""
        if idx in self._cache:
            return self._cache[idx]
        g = self.g
        seen: set[int] = set()
        cur = idx
        name = ""
        while True:
            seen.add(cur)
            node = g.nodes[cur]
            label = g.node_label(cur)
            if label in self._by_node:
                name = self._by_node[label]
                break
            aux = bool(node.output) and all(self._domain.get(o) == "aux" for o in node.output if o)
            if node.op_type in TRANSPARENT or cur in self._absorbed or aux:
                src = None if aux else next((i for i in node.input if i and not g.is_constant(i)), None)
                if src is None:  # a weight's Q/DQ: the layer of the node reading it
                    nxt = next((c for o in node.output if o for c in g.consumers.get(o, [])), None)
                elif src in g.producer:
                    nxt = g.producer[src]
                else:
                    name = f"input:{src}"
                    break
                if nxt is not None and nxt not in seen:
                    cur = nxt
                    continue
            name = _base_name(label)
            break
        self._cache[idx] = name
        return name

    def tensor(self, name: str) -> str:
        """The layer that writes a tensor of the quantized graph."""
        if name in self.g.producer:
            return self.node(self.g.producer[name])
        if name in self.g.inputs:
            return f"input:{name}"
        return _base_name(name)


# ---------------------------------------------------------------------------------------------
# Small graph helpers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _QParams:
    """Scale, zero point and integer type of a Q/DQ or QLinear tensor."""

    scale: np.ndarray
    zero_point: np.ndarray
    elem_type: int
    axis: int = 1

    def same_as(self, other: _QParams) -> bool:
        s1, s2 = np.asarray(self.scale, np.float64).reshape(-1), np.asarray(other.scale, np.float64).reshape(-1)
        z1, z2 = np.asarray(self.zero_point, np.int64).reshape(-1), np.asarray(other.zero_point, np.int64).reshape(-1)
        if s1.shape != s2.shape or z1.shape != z2.shape:
            return False
        return bool(np.allclose(s1, s2, rtol=1e-6, atol=0.0) and np.array_equal(z1, z2) and self.elem_type == other.elem_type)

    @property
    def qrange(self) -> tuple[int, int] | None:
        return _QRANGE.get(self.elem_type)

    def text(self) -> str:
        s = np.asarray(self.scale).reshape(-1)
        z = np.asarray(self.zero_point).reshape(-1)
        tname = _TYPE_NAMES.get(self.elem_type, str(self.elem_type))
        # 9 significant digits: every float32 prints as itself, so scales that differ (same_as
        # compares at 1e-6) never print alike
        if s.size == 1:
            return f"scale {float(s[0]):.9g}, zero point {int(z[0]) if z.size else 0} ({tname})"
        return f"{s.size} per-channel scales [{float(s.min()):.9g} .. {float(s.max()):.9g}] ({tname})"

    def override(self) -> str:
        """This scale/zero point as one ``TensorQuantOverrides`` entry onnxruntime's quantizer accepts.

        ``quantize_static(extra_options={"TensorQuantOverrides": {name: [entry]}})`` takes scale and zero
        point as numpy arrays (it calls ``.squeeze()`` on them), the zero point in the integer type.
        """
        s = np.asarray(self.scale).reshape(-1)
        z = np.asarray(self.zero_point).reshape(-1)
        sdt = "float16" if s.dtype == np.float16 else "float32"
        zdt = _TYPE_NAMES.get(self.elem_type, "uint8")
        zdt = {"int4": "int8", "uint4": "uint8"}.get(zdt, zdt)  # numpy has no 4-bit type
        scale = f"{float(s[0]):.9g}" if s.size == 1 else "[" + ", ".join(f"{float(v):.9g}" for v in s) + "]"
        zp = str(int(z[0]) if z.size else 0) if s.size == 1 else str([int(v) for v in z])
        return f"{{'scale': np.array({scale}, dtype=np.{sdt}), 'zero_point': np.array({zp}, dtype=np.{zdt})}}"


def _bad_scale(scale: np.ndarray) -> str:
    """What is wrong with a scale that is not a finite positive number ('' when every value is fine)."""
    given = np.asarray(scale).reshape(-1)
    s = given.astype(np.float64)
    bad = ~(np.isfinite(s) & (s > 0))
    if not bad.any():
        return ""
    first = int(np.argmax(bad))
    if s.size == 1:
        return f"scale {given[0]}"
    return f"{int(bad.sum())} of {s.size} per-channel scales not finite positive numbers (channel {first}: {given[first]})"


def _qparams(
    g: Graph, node: onnx.NodeProto, s_pos: int, z_pos: int, axis: int = 1, *, corrupt_ok: bool = False
) -> _QParams | None:
    """The parameters at ``s_pos``/``z_pos`` of ``node``; None when not constant, or corrupt (a scale
    of 0, negative, NaN or inf: :func:`check_qparams` reports those, the other checks skip them)
    unless ``corrupt_ok``."""
    ins = list(node.input)
    if s_pos >= len(ins) or not ins[s_pos]:
        return None
    scale = g.const_value(ins[s_pos])
    if scale is None:
        return None
    zp_name = ins[z_pos] if z_pos < len(ins) else ""
    if zp_name:
        zp = g.const_value(zp_name)
        if zp is None:
            return None
        et = g.elem_type(zp_name) or onnx.helper.np_dtype_to_tensor_dtype(np.asarray(zp).dtype)
    else:
        zp = np.zeros(np.asarray(scale).shape, np.int64)
        et = attr_value(node, "output_dtype", 0) or onnx.TensorProto.UINT8
    if not corrupt_ok and _bad_scale(scale):
        return None
    return _QParams(np.asarray(scale), np.asarray(zp), int(et), int(axis))


def _q_node_params(g: Graph, node: onnx.NodeProto, *, corrupt_ok: bool = False) -> _QParams | None:
    """Parameters of a QuantizeLinear / DequantizeLinear node (None when corrupt, unless ``corrupt_ok``)."""
    return _qparams(g, node, 1, 2, attr_value(node, "axis", 1), corrupt_ok=corrupt_ok)


def _all_qparams(g: Graph, idx: int) -> list[tuple[str, str, _QParams]]:
    """(quantized tensor, scale tensor, parameters) of every scale a node declares, corrupt ones included."""
    node = g.nodes[idx]
    ins = list(node.input)
    found: list[tuple[str, int, int]] = []  # (tensor, scale position, zero-point position)
    if node.op_type == "QuantizeLinear" and ins:
        found.append((ins[0], 1, 2))
    elif node.op_type == "DequantizeLinear" and ins:
        writer = _producer(g, ins[0])
        found.append((writer.input[0] if writer is not None and writer.op_type == "QuantizeLinear" else ins[0], 1, 2))
    elif node.op_type == "QLinearConcat":
        found.append((node.output[0], 0, 1))
        found += [(ins[2 + 3 * k], 3 + 3 * k, 4 + 3 * k) for k in range((len(ins) - 2) // 3)]
    elif node.op_type in QOP_SPECS:
        spec = QOP_SPECS[node.op_type]
        found += [(ins[q] if q < len(ins) else "", s, z) for q, (s, z) in spec.in_params.items()]
        if spec.out_params is not None and node.output:
            found.append((node.output[0], *spec.out_params))
    out = []
    for tensor, s, z in found:
        axis = attr_value(node, "axis", 1) if node.op_type in QDQ else 1
        p = _qparams(g, node, s, z, axis, corrupt_ok=True)
        if p is not None:
            out.append((tensor, ins[s], p))
    return out


def _producer(g: Graph, name: str) -> onnx.NodeProto | None:
    idx = g.producer.get(name)
    return g.nodes[idx] if idx is not None else None


def _is_int_activation(g: Graph, name: str) -> bool:
    return bool(name) and not g.is_constant(name) and g.elem_type(name) in _INT_TYPES


def _fmt_bytes(n: float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%" if x >= 0.001 else f"{100 * x:.3f}%"


def model_kind(g: Graph) -> str:
    """``qoperator``, ``dynamic``, ``qdq``, ``fp16`` or ``float`` (nothing quantized)."""
    ops = {n.op_type for n in g.nodes}
    if ops & (INTEGER_OPS - {"ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "DynamicQuantizeLSTM"}):
        return "qoperator"
    if "DynamicQuantizeLinear" in ops or ops & {"ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}:
        return "dynamic"
    for n in g.nodes:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            return "qdq"
    for n in g.nodes:
        for o in n.output:
            if o and g.elem_type(o) in _REDUCED_FLOAT:
                return "fp16"
    if any(t.data_type in _REDUCED_FLOAT for t in g.initializers.values()):
        return "fp16"
    return "float"


def _node_status(ctx: DiagnoseContext, idx: int) -> str:
    """``quantized`` when the node runs (or will be fused into) an integer kernel, else ``float``."""
    g = ctx.qg
    node = g.nodes[idx]
    if node.op_type in INTEGER_OPS:
        return "quantized"
    ins = [i for i in node.input if i]
    if any(_is_int_activation(g, i) for i in ins):
        return "quantized"  # MaxPool / Reshape ... running on integer tensors (QOperator)
    float_ins = [i for i in ins if g.is_float(i) is not False]
    if not float_ins or not all((_producer(g, i) is not None and _producer(g, i).op_type == "DequantizeLinear") for i in float_ins):
        return "float"
    outs = [o for o in node.output if o and g.is_float(o) is not False and g.consumers.get(o)]
    if outs and all(any(g.nodes[c].op_type == "QuantizeLinear" for c in g.consumers[o]) for o in outs):
        return "quantized"
    return "float"


def _compute_nodes(ctx: DiagnoseContext) -> list[int]:
    """Indices of the quantized graph's compute nodes (no Q/DQ, Identity, Cast, rescale chains, constants)."""
    return sorted(sn.idx for sn in ctx.skeleton.nodes)


# ---------------------------------------------------------------------------------------------
# Check: quantization parameters that must agree
# ---------------------------------------------------------------------------------------------


def check_qparams(ctx: DiagnoseContext) -> list[Finding]:
    """Pass-through ops whose input and output scale/zero point differ; Q/DQ pairs that disagree.

    * QDQ: for Relu, Clip, MaxPool, Reshape, Transpose, Flatten, Squeeze, Unsqueeze, Concat (every
      input) and the other :data:`SHARES_QPARAMS`, the DequantizeLinear feeding the op and the
      QuantizeLinear after it must carry the same scale and zero point; an int8 kernel passes the
      integer values through, so a runtime seeing a mismatch falls back to int8→float→int8 or
      computes wrongly (warning).
    * A DequantizeLinear reading a QuantizeLinear's output with other parameters reads every value
      back wrong (error).
    * QOperator: a QLinear op's declared input scale must be the scale its producer wrote the
      tensor with (through integer MaxPool/Reshape/...; error); QLinearConcat inputs vs output
      (warning).
    """
    g = ctx.qg
    findings: list[Finding] = []
    rows: list[dict[str, Any]] = []
    corrupt: dict[tuple[str, str], list[str]] = {}  # (tensor, scale tensor) -> readers
    for idx, node in enumerate(g.nodes):
        for tensor, scale_name, p in _all_qparams(g, idx):
            problem = _bad_scale(p.scale)
            if problem:
                readers = corrupt.setdefault((tensor, scale_name), [])
                if not readers:
                    where = ctx.layers.tensor(tensor)
                    findings.append(
                        Finding(
                            "qparams",
                            "error",
                            where,
                            f"'{tensor}' is quantized with {problem} (scale tensor '{scale_name}', read by "
                            f"{node.op_type} '{g.node_label(idx)}'): a scale must be a finite number above 0; "
                            "the other checks skip this tensor",
                            "Re-quantize: a calibration that saw a constant or empty tensor gives scale 0, non-finite "
                            "calibration data gives NaN/inf; or exclude this node from quantization.",
                        )
                    )
                readers.append(g.node_label(idx))
    for idx, node in enumerate(g.nodes):
        layer = ctx.layers.node(idx) if node.op_type not in QDQ else ""
        if node.op_type in SHARES_QPARAMS:
            data_inputs = [i for i in node.input if i] if node.op_type == "Concat" else list(node.input[:1])
            ins = []
            for name in data_inputs:
                p = _producer(g, name)
                if p is not None and p.op_type == "DequantizeLinear" and p.input and not g.is_constant(p.input[0]):
                    params = _q_node_params(g, p)
                    if params is not None:
                        ins.append((name, params))
            outs = []
            for o in node.output:
                for c in g.consumers.get(o, []) if o else []:
                    if g.nodes[c].op_type == "QuantizeLinear":
                        params = _q_node_params(g, g.nodes[c])
                        if params is not None:
                            outs.append((o, params))
            if not ins or not outs:
                continue
            bad = [(i, ip, o, op) for i, ip in ins for o, op in outs if not ip.same_as(op)]
            for i, ip, o, op in [(i, ip, o, op) for i, ip in ins for o, op in outs]:
                rows.append(_qparam_row(layer, g.node_label(idx), node.op_type, i, ip, o, op))
            if bad:
                findings.append(_pass_through_finding(g, layer, g.node_label(idx), node.op_type, bad))
        elif node.op_type == "QLinearConcat":
            n_in = (len(node.input) - 2) // 3
            out_p = _qparams(g, node, 0, 1)
            bad = []
            for k in range(n_in):
                ip = _qparams(g, node, 3 + 3 * k, 4 + 3 * k)
                if ip is None or out_p is None:
                    continue
                rows.append(_qparam_row(layer, g.node_label(idx), node.op_type, node.input[2 + 3 * k], ip, node.output[0], out_p))
                if not ip.same_as(out_p):
                    bad.append((node.input[2 + 3 * k], ip, node.output[0], out_p))
            if bad:
                findings.append(_pass_through_finding(g, layer, g.node_label(idx), "Concat", bad))
        # a reader's parameters against the writer's
        reads = _declared_reads(g, node)
        for name, declared in reads:
            writer = _writer_params(g, name)
            if writer is None:
                continue
            wnode, wparams = writer
            if not declared.same_as(wparams):
                reader_layer = ctx.layers.tensor(name) if node.op_type == "DequantizeLinear" else layer
                findings.append(
                    Finding(
                        "qparams",
                        "error",
                        reader_layer,
                        f"{node.op_type} '{g.node_label(idx)}' reads '{name}' with {declared.text()}, but "
                        f"{wnode.op_type} '{wnode.name or wnode.output[0]}' wrote it with {wparams.text()}: every value "
                        "is read back wrong",
                        "Give the reader the writer's scale and zero point (the two nodes must share one "
                        "scale/zero-point pair); re-export or re-quantize rather than editing one side.",
                    )
                )
    ctx.tables["qparams"] = pd.DataFrame(rows, columns=QPARAM_COLUMNS)
    ctx.stats["qparams"] = {
        "pass_through_pairs_checked": len(rows),
        "mismatched": int(sum(1 for r in rows if not r["agree"])),
        "corrupt_scales": len(corrupt),
    }
    return findings


QPARAM_COLUMNS = ["layer", "node", "op_type", "input", "input_scale", "input_zero_point", "output", "output_scale", "output_zero_point", "agree"]


def _qparam_row(layer: str, node: str, op: str, i: str, ip: _QParams, o: str, op_: _QParams) -> dict[str, Any]:
    def one(a: np.ndarray) -> Any:
        a = np.asarray(a).reshape(-1)
        return a.item() if a.size == 1 else str(a.tolist())

    return {
        "layer": layer, "node": node, "op_type": op, "input": i, "input_scale": one(ip.scale),
        "input_zero_point": one(ip.zero_point), "output": o, "output_scale": one(op_.scale),
        "output_zero_point": one(op_.zero_point), "agree": ip.same_as(op_),
    }  # fmt: skip


def _float_name(g: Graph, name: str) -> str:
    """The float tensor an integer or dequantized tensor stands for (the name quantizer overrides take)."""
    p = _producer(g, name)
    if p is not None and p.op_type == "DequantizeLinear" and p.input:
        q = _producer(g, p.input[0])
        if q is not None and q.op_type == "QuantizeLinear" and q.input:
            return q.input[0]
    return _base_name(name)


def _pass_through_finding(
    g: Graph, layer: str, node: str, op: str, bad: list[tuple[str, _QParams, str, _QParams]]
) -> Finding:
    i, ip, o, op_ = bad[0]
    more = f" ({len(bad) - 1} more input/output pair(s) differ)" if len(bad) > 1 else ""
    if op == "Concat":
        names = list(dict.fromkeys(_float_name(g, b[0]) for b in bad))
        overrides = ", ".join(f"'{n}': [{op_.override()}]" for n in names)
        suggestion = (
            "Give every Concat input and its output one scale and zero point, so int8 kernels concatenate without "
            "requantizing: re-quantize with quantize_static(..., extra_options={'TensorQuantOverrides': "
            f"{{{overrides}}}}}) (numpy as np)."
        )
    else:
        suggestion = (
            f"Quantize '{_float_name(g, o)}' with the input's parameters: re-quantize with quantize_static(..., "
            f"extra_options={{'TensorQuantOverrides': {{'{_float_name(g, o)}': [{ip.override()}]}}}}) (numpy as np), "
            f"or remove the extra Q/DQ pair so the {op} runs on the int8 values it is given."
        )
    return Finding(
        "qparams",
        "warning",
        layer,
        f"{op} '{node}' passes int8 values through but its input '{i}' has {ip.text()} and its output '{o}' has "
        f"{op_.text()}{more}; runtimes fall back to int8→float→int8 here or compute wrongly",
        suggestion,
    )


def _declared_reads(g: Graph, node: onnx.NodeProto) -> list[tuple[str, _QParams]]:
    """Integer activation tensors a node reads, with the parameters it reads them with."""
    out = []
    if node.op_type == "DequantizeLinear" and node.input and not g.is_constant(node.input[0]):
        p = _q_node_params(g, node)
        if p is not None:
            out.append((node.input[0], p))
        return out
    spec = QOP_SPECS.get(node.op_type)
    positions: dict[int, tuple[int, int]] = dict(spec.in_params) if spec is not None else {}
    if node.op_type == "QLinearConcat":
        n_in = (len(node.input) - 2) // 3
        positions = {2 + 3 * k: (3 + 3 * k, 4 + 3 * k) for k in range(n_in)}
    for qpos, (s, z) in positions.items():
        if qpos < len(node.input) and node.input[qpos] and not g.is_constant(node.input[qpos]):
            p = _qparams(g, node, s, z)
            if p is not None:
                out.append((node.input[qpos], p))
    return out


def _writer_params(g: Graph, name: str) -> tuple[onnx.NodeProto, _QParams] | None:
    """The node that wrote an integer tensor (through integer pass-through ops) and its parameters."""
    for _ in range(16):
        node = _producer(g, name)
        if node is None:
            return None
        if node.op_type == "QuantizeLinear":
            p = _q_node_params(g, node)
            return (node, p) if p is not None else None
        spec = QOP_SPECS.get(node.op_type)
        if spec is not None and spec.out_params is not None and node.output[0] == name:
            if node.op_type == "QGemm" and (len(node.input) <= 7 or not node.input[7]):
                return None  # float output
            p = _qparams(g, node, *spec.out_params)
            return (node, p) if p is not None else None
        if node.op_type == "QLinearConcat":
            p = _qparams(g, node, 0, 1)
            return (node, p) if p is not None else None
        if node.op_type in SHARES_QPARAMS and node.input and _is_int_activation(g, node.input[0]):
            name = node.input[0]
            continue
        return None
    return None


# ---------------------------------------------------------------------------------------------
# Check: coverage
# ---------------------------------------------------------------------------------------------

COVERAGE_COLUMNS = ["layer", "node", "op_type", "status", "quantized_weight_bytes", "float_weight_bytes"]
WEIGHT_COLUMNS = ["tensor", "layer", "consumer", "storage", "role", "elements", "bytes"]


def check_coverage(ctx: DiagnoseContext) -> list[Finding]:
    """How much of the model is quantized: nodes, weights, bytes, file sizes.

    Compute nodes are ``quantized`` when they run an integer kernel (QLinear*, QGemm,
    ConvInteger, MatMulInteger, ...), read integer tensors (MaxPool on uint8), or in QDQ read
    only DequantizeLinear outputs and write only into QuantizeLinear (onnxruntime fuses such a
    group into an int8 kernel); everything else is ``float``. Weights are the constants compute
    nodes read: ``int8`` & co. behind a DequantizeLinear or read by an integer op, ``float`` when
    read as is (or quantized at run time). FP16 models: ``float16`` vs ``float32``.

    Findings: error when the quantized file is not smaller than FLOAT's (a quantizer run whose
    parameters were never applied looks exactly like this) or when nothing is quantized; warning
    when most weight bytes are still float; info with the figures.
    """
    g = ctx.qg
    t = THRESHOLDS
    weights = _weight_inventory(ctx)
    wdf = pd.DataFrame(weights, columns=WEIGHT_COLUMNS)
    fp16 = ctx.kind == "fp16"
    per_node: dict[tuple[str, str], int] = (
        {(str(c), str(r)): int(b) for (c, r), b in wdf.groupby(["consumer", "role"])["bytes"].sum().items()} if len(wdf) else {}
    )
    rows = []
    for idx in _compute_nodes(ctx):
        node = g.nodes[idx]
        if fp16:
            outs = [o for o in node.output if o]
            status = "float16" if outs and all(g.elem_type(o) in _REDUCED_FLOAT for o in outs) else "float32"
        else:
            status = _node_status(ctx, idx)
        label = g.node_label(idx)
        rows.append(
            {
                "layer": ctx.layers.node(idx),
                "node": label,
                "op_type": node.op_type,
                "status": status,
                "quantized_weight_bytes": per_node.get((label, "quantized"), 0),
                "float_weight_bytes": per_node.get((label, "float"), 0),
            }
        )
    cdf = pd.DataFrame(rows, columns=COVERAGE_COLUMNS)
    ctx.tables["coverage"] = cdf
    ctx.tables["weights"] = wdf

    low, high = ("float16", "float32") if fp16 else ("quantized", "float")
    n_low = int((cdf["status"] == low).sum()) if len(cdf) else 0
    n_nodes = len(cdf)
    qw = wdf[wdf["role"] == "quantized"] if len(wdf) else wdf
    fw = wdf[wdf["role"] == "float"] if len(wdf) else wdf
    q_bytes, f_bytes = int(qw["bytes"].sum()) if len(qw) else 0, int(fw["bytes"].sum()) if len(fw) else 0
    big_float = fw[fw["elements"] >= t["coverage_min_weight_elements"]].sort_values("bytes", ascending=False, kind="stable") if len(fw) else fw
    q_size = _model_size(ctx.quant)
    f_size = _model_size(ctx.float) if ctx.float is not None else None
    ctx.stats["coverage"] = {
        "compute_nodes": n_nodes,
        f"{low}_nodes": n_low,
        f"{high}_nodes": n_nodes - n_low,
        "quantized_weights": int(len(qw)),
        "float_weights": int(len(fw)),
        "quantized_weight_bytes": q_bytes,
        "float_weight_bytes": f_bytes,
        "quant_model_bytes": q_size,
        "float_model_bytes": f_size,
    }

    def largest(k: int = 5) -> str:
        items = [f"{r['tensor']} ({_fmt_bytes(r['bytes'])}, {r['layer']})" for _, r in big_float.head(k).iterrows()]
        return ", ".join(items)

    findings: list[Finding] = []
    what = "float16" if fp16 else "quantized"
    wbytes = f"weights: {_fmt_bytes(q_bytes)} {'float16' if fp16 else 'integer'}, {_fmt_bytes(f_bytes)} {'float32' if fp16 else 'float'}"
    summary = f"{n_low} of {n_nodes} compute nodes {what}; {wbytes}; file {_fmt_bytes(q_size)}"
    if f_size:
        summary += f" vs float {_fmt_bytes(f_size)} ({100 * q_size / f_size:.0f}%)"
    findings.append(Finding("coverage", "info", "", summary, ""))
    fix = (
        "The quantizer's settings were not applied: check nodes_to_exclude / op_types_to_quantize, that weights "
        "are initializers (Constant-node weights are skipped), that the output file is the one the quantizer "
        "wrote, and re-run it."
    )
    if fp16:
        fix = (
            "The float16 conversion did not take: check op_block_list / node_block_list and keep_io_types of "
            "convert_float_to_float16, and that the file is the converted one."
        )
    if f_size is not None and q_size >= f_size and q_bytes > f_bytes:
        findings.append(
            Finding(
                "coverage",
                "info",
                "",
                f"the {what} model ({_fmt_bytes(q_size)}) is not smaller than the float model ({_fmt_bytes(f_size)}) "
                f"although its weights are {what} ({_fmt_bytes(q_bytes)} vs {_fmt_bytes(f_bytes)} left in float): in a "
                "model this small the quantization nodes outweigh the saving",
                "",
            )
        )
    elif f_size is not None and q_size >= f_size:
        msg = f"the {what} model ({_fmt_bytes(q_size)}) is not smaller than the float model ({_fmt_bytes(f_size)})"
        if len(big_float):
            msg += f"; largest weights still in float: {largest()}"
        findings.append(Finding("coverage", "error", "", msg, fix))
    elif n_low == 0 and q_bytes == 0:
        msg = f"no compute node is {what} and no weight is stored {'as float16' if fp16 else 'as integers'}: this is a float model"
        findings.append(Finding("coverage", "error", "", msg, fix))
    elif f_bytes and f_bytes > t["coverage_float_share_warning"] * (f_bytes + q_bytes) and len(big_float):
        findings.append(
            Finding(
                "coverage",
                "warning",
                "",
                f"{_pct(f_bytes / (f_bytes + q_bytes))} of the weight bytes are still {'float32' if fp16 else 'float'}; "
                f"largest: {largest()}",
                "Quantize those layers too (nodes_to_exclude, op_types_to_quantize), or confirm they were left in "
                "float on purpose.",
            )
        )
    return findings


def _model_size(m: LoadedModel | None) -> int:
    if m is None:
        return 0
    if m.path is not None:
        try:
            size = m.path.stat().st_size
            for t in m.proto.graph.initializer:  # external data files count too
                for e in t.external_data:
                    if e.key == "location":
                        ext = m.path.parent / e.value
                        if ext.exists():
                            size += ext.stat().st_size
                        break
            return int(size)
        except OSError:
            pass
    return int(m.proto.ByteSize())


def _weight_inventory(ctx: DiagnoseContext) -> list[dict[str, Any]]:
    """Every constant a compute node reads, classified by how it is stored."""
    g = ctx.qg
    rows: dict[str, dict[str, Any]] = {}
    qparam_names: set[str] = set()
    for node in g.nodes:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"):
            qparam_names.update(i for i in node.input[1:] if i)
        spec = QOP_SPECS.get(node.op_type)
        if spec is not None:
            for s, z in list(spec.in_params.values()) + ([spec.out_params] if spec.out_params else []):
                for pos in (s, z):
                    if pos < len(node.input) and node.input[pos]:
                        qparam_names.add(node.input[pos])
        if node.op_type == "QLinearConcat":
            qparam_names.update(node.input[k] for k in range(len(node.input)) if k in (0, 1) or (k >= 2 and (k - 2) % 3 != 0))

    def add(name: str, consumer_idx: int, role: str) -> None:
        if name in rows or name in qparam_names:
            return
        value = g.const_value(name)
        if value is None:
            return
        et = g.elem_type(name) or onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        rows[name] = {
            "tensor": name,
            "layer": ctx.layers.node(consumer_idx),
            "consumer": g.node_label(consumer_idx),
            "storage": _TYPE_NAMES.get(et, str(value.dtype)),
            "role": role,
            "elements": int(value.size),
            "bytes": int(value.nbytes),
        }

    fp16 = ctx.kind == "fp16"
    compute = set(_compute_nodes(ctx))
    for idx, node in enumerate(g.nodes):
        if node.op_type in ("DequantizeLinear", "QuantizeLinear") and node.input and g.is_constant(node.input[0]):
            consumer = _first_compute_consumer(g, idx, compute)
            if consumer is None:
                continue
            src = node.input[0]
            if node.op_type == "QuantizeLinear":
                add(src, consumer, "float")  # a float weight quantized at every run
            else:
                qsrc = _producer(g, src)
                if qsrc is not None and qsrc.op_type == "QuantizeLinear" and qsrc.input and g.is_constant(qsrc.input[0]):
                    add(qsrc.input[0], consumer, "float")
                else:
                    add(src, consumer, "quantized")
            continue
        if idx not in compute:
            continue
        for name in node.input:
            if not name or not g.is_constant(name) or name in qparam_names:
                continue
            p = _producer(g, name)
            if p is not None and p.op_type in ("DequantizeLinear", "QuantizeLinear"):
                continue
            et = g.elem_type(name)
            if et is None:
                v = g.const_value(name)
                et = onnx.helper.np_dtype_to_tensor_dtype(v.dtype) if v is not None else None
            if et in _FLOAT_TYPES:
                role = "quantized" if fp16 and et in _REDUCED_FLOAT else "float"
                add(name, idx, role)
            elif node.op_type in INTEGER_OPS and et in (_INT_TYPES | {onnx.TensorProto.INT32}):
                add(name, idx, "quantized")
    return list(rows.values())


def _first_compute_consumer(g: Graph, idx: int, compute: set[int]) -> int | None:
    frontier = [idx]
    seen = {idx}
    for _ in range(4):
        nxt = []
        for i in frontier:
            for o in g.nodes[i].output:
                for c in g.consumers.get(o, []) if o else []:
                    if c in compute:
                        return c
                    if c not in seen:
                        seen.add(c)
                        nxt.append(c)
        frontier = nxt
    return None


# ---------------------------------------------------------------------------------------------
# Check: conversion overhead
# ---------------------------------------------------------------------------------------------

CONVERSION_COLUMNS = ["layer", "nodes", "op_types", "entries", "exits", "round_trip"]


def check_conversions(ctx: DiagnoseContext) -> list[Finding]:
    """Int8↔Float transitions along the graph: float regions between quantized ones.

    Float compute nodes connected by float tensors form *regions*. A region's entries are the
    int8→float transitions feeding it (a DequantizeLinear, or an integer op with a float output)
    and its exits the float→int8 transitions it feeds (QuantizeLinear, DynamicQuantizeLinear).
    A region with both is an Int8→Float→Int8 round trip: each costs a dequantize and a quantize
    pass over the tensor and keeps the ops in it off int8 kernels (warning; info for dynamic
    quantization, where every quantized op converts by design).
    """
    g = ctx.qg
    compute = _compute_nodes(ctx)
    status = {idx: _node_status(ctx, idx) for idx in compute}
    float_nodes = [i for i in compute if status[i] == "float"]
    fset = set(float_nodes)
    # union-find over float nodes joined by float tensors (through Identity / float Cast)
    parent = {i: i for i in float_nodes}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    entries: dict[int, set[str]] = defaultdict(set)
    exits: dict[int, set[str]] = defaultdict(set)
    for i in float_nodes:
        node = g.nodes[i]
        for name in node.input:
            if not name or g.is_constant(name):
                continue
            kind, src = _source_of(ctx, name, status)
            if kind == "float" and src in fset:
                a, b = find(i), find(src)
                if a != b:
                    parent[a] = b
            elif kind == "int8":
                entries[i].add(g.node_label(src))
        for o in node.output:
            for c in _consumers_through(g, o):
                if g.nodes[c].op_type in ("QuantizeLinear", "DynamicQuantizeLinear"):
                    exits[i].add(g.node_label(c))
    regions: dict[int, list[int]] = defaultdict(list)
    for i in float_nodes:
        regions[find(i)].append(i)
    rows = []
    findings: list[Finding] = []
    n_in = n_out = n_trips = 0
    dynamic = ctx.kind == "dynamic"
    for members in regions.values():
        members.sort()
        ent = sorted(set().union(*(entries[i] for i in members)))
        ext = sorted(set().union(*(exits[i] for i in members)))
        n_in += len(ent)
        n_out += len(ext)
        trip = bool(ent and ext)
        layer = ctx.layers.node(members[0])
        names = [g.node_label(i) for i in members]
        ops = [g.nodes[i].op_type for i in members]
        if ent or ext:
            rows.append({"layer": layer, "nodes": ", ".join(names), "op_types": ", ".join(ops), "entries": ", ".join(ent), "exits": ", ".join(ext), "round_trip": trip})
        if trip:
            n_trips += 1
            if not dynamic:
                chain = " → ".join(f"{n} ({o})" for n, o in zip(names[:6], ops[:6])) + (" → …" if len(names) > 6 else "")
                findings.append(
                    Finding(
                        "conversions",
                        "warning",
                        layer,
                        f"Int8→Float→Int8 round trip: {', '.join(ent[:3])} → {chain} → {', '.join(ext[:3])}; "
                        f"{len(members)} op(s) run in float between quantized layers",
                        f"Quantize {', '.join(sorted(set(ops)))} too (op_types_to_quantize, or an op the runtime has an "
                        "int8 kernel for, such as a fused Gelu), or keep the whole block around it in float so the "
                        "conversion happens once.",
                    )
                )
    # boundary transitions: graph-input Q and graph-output DQ of quantized regions
    for node in g.nodes:
        if node.op_type in ("QuantizeLinear", "DynamicQuantizeLinear") and node.input and node.input[0] in g.inputs:
            n_out += 1
        if node.op_type == "DequantizeLinear" and node.input and not g.is_constant(node.input[0]):
            if any(o in g.outputs for o in node.output) and not any(c in fset for o in node.output for c in g.consumers.get(o, [])):
                n_in += 1
    ctx.tables["conversions"] = pd.DataFrame(rows, columns=CONVERSION_COLUMNS)
    ctx.stats["conversions"] = {
        "int8_to_float": n_in,
        "float_to_int8": n_out,
        "transitions": n_in + n_out,
        "round_trips": n_trips,
        "float_nodes": len(float_nodes),
    }
    summary = (
        f"{n_in + n_out} Int8↔Float transitions ({n_in} int8→float, {n_out} float→int8, graph inputs/outputs "
        f"included); {n_trips} Int8→Float→Int8 round trip(s)"
    )
    if dynamic and n_trips:
        summary += "; dynamic quantization quantizes activations at run time before every quantized op by design"
    findings.insert(0, Finding("conversions", "info", "", summary, ""))
    return findings


def _source_of(ctx: DiagnoseContext, name: str, status: dict[int, str]) -> tuple[str, int | None]:
    """Where a float node's input comes from: ``("int8", node)``, ``("float", node)`` or ``("input", None)``."""
    g = ctx.qg
    for _ in range(16):
        idx = g.producer.get(name)
        if idx is None:
            return "input", None
        node = g.nodes[idx]
        if node.op_type == "DequantizeLinear":
            return "int8", idx
        if node.op_type in ("Identity", "Cast") or idx in ctx.skeleton.absorbed:
            src = next((i for i in node.input if i and not g.is_constant(i)), None)
            if src is None:
                return "input", None
            if node.op_type == "Cast" and g.elem_type(src) not in _FLOAT_TYPES and g.elem_type(src) is not None:
                return "int8", idx  # an integer accumulator cast to float (dynamic quantization)
            name = src
            continue
        if idx in status:
            return ("int8" if status[idx] == "quantized" else "float"), idx
        return "input", None
    return "input", None


def _consumers_through(g: Graph, name: str) -> list[int]:
    """Consumers of a tensor, looking through Identity and float-to-float Cast."""
    out: list[int] = []
    stack = [name]
    seen: set[str] = set()
    while stack:
        t = stack.pop()
        if not t or t in seen:
            continue
        seen.add(t)
        for c in g.consumers.get(t, []):
            node = g.nodes[c]
            if node.op_type == "Identity" or (node.op_type == "Cast" and attr_value(node, "to") in _FLOAT_TYPES):
                stack.extend(o for o in node.output if o)
            else:
                out.append(c)
    return out


# ---------------------------------------------------------------------------------------------
# Check: per-channel
# ---------------------------------------------------------------------------------------------

PER_CHANNEL_COLUMNS = ["layer", "node", "op_type", "weight", "shape", "granularity", "axis", "channels", "after_graph_output"]


def check_per_channel(ctx: DiagnoseContext) -> list[Finding]:
    """Which Conv/MatMul/Gemm weights are per-channel and which per-tensor.

    Flags each per-tensor weight (with more than one output channel) in a model whose other
    weights are per-channel, downstream of an intermediate graph output included (a multi-output
    model's later layers are where quantizers have been seen to fall back). A model quantized
    per-tensor throughout gets an info finding.
    """
    g = ctx.qg
    rows = []
    after_output = _downstream_of_intermediate_outputs(g)
    for idx, node in enumerate(g.nodes):
        w = _weight_granularity(g, node)
        if w is None:
            continue
        name, shape, gran, axis, channels = w
        rows.append(
            {
                "layer": ctx.layers.node(idx),
                "node": g.node_label(idx),
                "op_type": node.op_type,
                "weight": name,
                "shape": "x".join(str(d) for d in shape),
                "granularity": gran,
                "axis": axis,
                "channels": channels,
                "after_graph_output": after_output.get(idx, ""),
            }
        )
    df = pd.DataFrame(rows, columns=PER_CHANNEL_COLUMNS)
    ctx.tables["per_channel"] = df
    n_pc = int((df["granularity"] == "per-channel").sum()) if len(df) else 0
    per_tensor = df[(df["granularity"] == "per-tensor") & (df["channels"] > 1)] if len(df) else df
    ctx.stats["per_channel"] = {"per_channel": n_pc, "per_tensor": int((df["granularity"] == "per-tensor").sum()) if len(df) else 0, "weights": len(df)}
    findings: list[Finding] = []
    if not len(df):
        return findings
    if n_pc and len(per_tensor):
        for _, r in per_tensor.iterrows():
            where = f" (after the intermediate graph output '{r['after_graph_output']}')" if r["after_graph_output"] else ""
            findings.append(
                Finding(
                    "per_channel",
                    "warning",
                    r["layer"],
                    f"{r['op_type']} weight '{r['weight']}' [{r['shape']}] is per-tensor{where} while {n_pc} other "
                    f"Conv/MatMul/Gemm weight(s) are per-channel; one scale for all {r['channels']} output channels "
                    "loses the small channels",
                    "Re-quantize with per_channel=True and check this weight: it must be an initializer read by one "
                    "node only and not overridden to per-tensor (TensorQuantOverrides); some quantizers skip layers "
                    "after an intermediate graph output.",
                )
            )
    elif not n_pc and len(per_tensor):
        findings.append(
            Finding(
                "per_channel",
                "info",
                "",
                f"all {len(per_tensor)} Conv/MatMul/Gemm weights with several output channels are per-tensor",
                "Per-channel weights (quantize_static per_channel=True) usually cut weight error, most of all for Conv.",
            )
        )
    return findings


def _weight_granularity(g: Graph, node: onnx.NodeProto) -> tuple[str, list[int], str, int | None, int] | None:
    """(weight, shape, granularity, axis, output channels) of a weighted node's quantized weight."""
    op = node.op_type
    ins = list(node.input)
    if op in COMPUTE_OPS:
        positions = [1] if op != "MatMul" else [1, 0]
        for pos in positions:
            if pos >= len(ins) or not ins[pos]:
                continue
            dq = _producer(g, ins[pos])
            if dq is None or dq.op_type != "DequantizeLinear" or not dq.input:
                continue
            src = dq.input[0]
            value = g.const_value(src)
            qsrc = _producer(g, src)
            if value is None and qsrc is not None and qsrc.op_type == "QuantizeLinear" and g.is_constant(qsrc.input[0]):
                value = g.const_value(qsrc.input[0])
                src = qsrc.input[0]
            if value is None or value.ndim < 2:
                continue
            scale = g.const_value(dq.input[1]) if len(dq.input) > 1 else None
            if scale is None:
                continue
            axis = weight_channel_axis(op, pos, value.ndim, attr_value(node, "transB", 0))
            return _gran(src, value.shape, np.asarray(scale), attr_value(dq, "axis", 1), axis)
        return None
    pos_scale = {"QLinearConv": (3, 4, 0), "QGemm": (3, 4, None), "QLinearMatMul": (3, 4, -1)}
    if op in pos_scale:
        wpos, spos, axis = pos_scale[op]
        if wpos >= len(ins) or not g.is_constant(ins[wpos]):
            return None
        value = g.const_value(ins[wpos])
        scale = g.const_value(ins[spos]) if spos < len(ins) else None
        if value is None or scale is None or value.ndim < 2:
            return None
        if axis is None:
            axis = 0 if attr_value(node, "transB", 0) else 1
        axis = axis % value.ndim
        return _gran(ins[wpos], value.shape, np.asarray(scale), axis, axis)
    if op in ("ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"):
        if len(ins) < 2 or not g.is_constant(ins[1]):
            return None
        value = g.const_value(ins[1])
        if value is None or value.ndim < 2:
            return None
        axis = 0 if op == "ConvInteger" else value.ndim - 1
        scale = None
        if op == "DynamicQuantizeMatMul" and len(ins) > 2 and ins[2]:
            scale = g.const_value(ins[2])
        elif op == "MatMulIntegerToFloat" and len(ins) > 3 and ins[3]:
            scale = g.const_value(ins[3])
        if scale is None:
            scale = g.const_value(f"{_base_name(ins[1])}_scale")
        if scale is None:
            zp_pos = 3 if op in ("ConvInteger", "MatMulInteger") else None
            zp = g.const_value(ins[zp_pos]) if zp_pos is not None and zp_pos < len(ins) and ins[zp_pos] else None
            if zp is None:
                return None
            scale = np.ones(np.asarray(zp).shape)
        return _gran(ins[1], value.shape, np.asarray(scale), axis, axis)
    return None


def _gran(name: str, shape: Sequence[int], scale: np.ndarray, q_axis: int, out_axis: int) -> tuple[str, list[int], str, int | None, int]:
    channels = int(shape[out_axis % len(shape)])
    if scale.size > 1:
        return name, list(shape), "per-channel", int(q_axis), channels
    return name, list(shape), "per-tensor", None, channels


def _downstream_of_intermediate_outputs(g: Graph) -> dict[int, str]:
    """Node index -> the intermediate graph output (read by other nodes) it is downstream of."""
    out: dict[int, str] = {}
    for name in g.outputs:
        if not g.consumers.get(name):
            # a QDQ model's graph output may be a DequantizeLinear output read by nothing; look at its group
            continue
        stack = list(g.consumers[name])
        while stack:
            i = stack.pop()
            if i in out:
                continue
            out[i] = name
            for o in g.nodes[i].output:
                stack.extend(g.consumers.get(o, []) if o else [])
    return out


# ---------------------------------------------------------------------------------------------
# Activations: running models on the data
# ---------------------------------------------------------------------------------------------


def _run(ctx: DiagnoseContext, models: list[tuple[LoadedModel, list[str]]]) -> Iterator[tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]]:
    """Yield ``(batch, [taps of each model])`` over the data; graph inputs come from the batch."""
    source = ctx.source()
    sessions = []
    for loaded, taps in models:
        g_inputs = {i.name for i in loaded.proto.graph.input}
        tapped = [t for t in dict.fromkeys(taps) if t not in g_inputs]
        sessions.append((ctx.session(tap_model(loaded.proto, tapped), loaded.label), tapped, [t for t in taps if t in g_inputs]))
    n = 0
    for batch in source:
        outs = []
        for sess, tapped, from_feed in sessions:
            feed = feed_for(sess, batch)
            vals = dict(zip(tapped, sess.run(tapped, feed))) if tapped else {}
            for t in from_feed:
                vals[t] = feed[t]
            outs.append(vals)
        n += 1
        yield batch, outs
    ctx.record_source(source)
    if n == 0:
        raise CannotRun(f"{source.description} produced no samples")


# ---------------------------------------------------------------------------------------------
# Check: saturation and range
# ---------------------------------------------------------------------------------------------

SATURATION_COLUMNS = [
    "layer", "tensor", "node", "source", "dtype", "scale", "zero_point", "calib_min", "calib_max", "data_min",
    "data_max", "values", "clipped_low", "clipped_high", "clipped", "levels_used", "range_used",
]  # fmt: skip


@dataclass
class _SatAcc:
    """Streaming counts for one quantized tensor."""

    params: _QParams
    n: int = 0
    low: int = 0
    high: int = 0
    qlo: float = math.inf
    qhi: float = -math.inf
    xlo: float = math.inf
    xhi: float = -math.inf

    def update_float(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        finite = np.isfinite(x)
        if not finite.all():
            x = np.where(finite, x, 0.0)
        scale, zp = _broadcast(self.params, x)
        q = np.rint(x / scale) + zp
        lo, hi = self.params.qrange or (-math.inf, math.inf)
        self.n += int(x.size)
        self.low += int((q < lo).sum())
        self.high += int((q > hi).sum())
        qc = np.clip(q, lo, hi)
        if x.size:
            self.qlo, self.qhi = min(self.qlo, float(qc.min())), max(self.qhi, float(qc.max()))
            self.xlo, self.xhi = min(self.xlo, float(x.min())), max(self.xhi, float(x.max()))

    def update_int(self, q: np.ndarray) -> None:
        q = np.asarray(q, dtype=np.int64)
        lo, hi = self.params.qrange or (int(q.min()), int(q.max()))
        self.n += int(q.size)
        self.low += int((q <= lo).sum())
        self.high += int((q >= hi).sum())
        if q.size:
            self.qlo, self.qhi = min(self.qlo, float(q.min())), max(self.qhi, float(q.max()))
            scale, zp = _broadcast(self.params, q)
            x = (q - zp) * scale
            self.xlo, self.xhi = min(self.xlo, float(x.min())), max(self.xhi, float(x.max()))


def _fused_relu(ctx: DiagnoseContext, tensor: str, layer: str, source: str) -> bool:
    """Whether the layer writing ``tensor`` had a Relu/Clip fused into its output quantization.

    With FLOAT the matching says so (``conv1+relu1`` is a Conv with its Relu fused); without it,
    a tensor written by a node quantizers fuse Relu into is assumed to have one.
    """
    if ctx.matching is not None:
        ops = {p.layer: p.op_type for p in ctx.matching.pairs}
        op = ops.get(layer)
        if op is not None:
            return any(part in RELU_LIKE for part in op.split("+")[1:])
    g = ctx.qg
    idx = g.producer.get(tensor)
    if idx is None:
        return False
    return g.nodes[idx].op_type in RELU_HOSTS


def _broadcast(p: _QParams, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = np.asarray(p.scale, dtype=np.float64)
    zp = np.asarray(p.zero_point, dtype=np.float64)
    if scale.size > 1 and x.ndim > 0:
        shape = [1] * x.ndim
        shape[p.axis % x.ndim] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return scale, zp


def check_saturation(ctx: DiagnoseContext) -> list[Finding]:
    """Per quantized tensor: the share of values clipped at the integer range and of the range used.

    QDQ (and the QuantizeLinear nodes of any model): each activation QuantizeLinear's float input is
    tapped and quantized in numpy (``rint(x / scale) + zero_point``); values below ``qmin`` or
    above ``qmax`` are clipped. A side whose zero point sits at the end of the range (``zp == qmin``:
    a range starting at 0, where the quantizer emulates a fused Relu) clips by design and is not
    counted. QOperator integer outputs: values sitting at a rail (an upper bound of the clipped
    share). The range used is ``(max q - min q) / (qmax - qmin)`` of the values seen.
    """
    if ctx.kind == "dynamic":
        ctx.stats["saturation"] = {"tensors": 0}
        return [
            Finding(
                "saturation",
                "info",
                "",
                "dynamic quantization computes each activation's range at run time; nothing clips",
                "",
            )
        ]
    g = ctx.qg
    targets: list[tuple[str, str, str, _QParams, str]] = []  # (tensor tapped, layer, node, params, source)
    for idx, node in enumerate(g.nodes):
        if node.op_type == "QuantizeLinear" and node.input and not g.is_constant(node.input[0]):
            p = _q_node_params(g, node)
            if p is not None and p.qrange is not None:
                targets.append((node.input[0], ctx.layers.tensor(node.input[0]), g.node_label(idx), p, "pre-quantize"))
        spec = QOP_SPECS.get(node.op_type)
        if spec is not None and spec.out_params is not None and spec.output == "quant":
            if node.op_type == "QGemm" and (len(node.input) <= 7 or not node.input[7]):
                continue
            p = _qparams(g, node, *spec.out_params)
            if p is not None and p.qrange is not None:
                targets.append((node.output[0], ctx.layers.node(idx), g.node_label(idx), p, "integer output"))
        elif node.op_type == "QLinearConcat":
            p = _qparams(g, node, 0, 1)
            if p is not None and p.qrange is not None:
                targets.append((node.output[0], ctx.layers.node(idx), g.node_label(idx), p, "integer output"))
    if not targets:
        ctx.stats["saturation"] = {"tensors": 0}
        return [Finding("saturation", "info", "", "the model quantizes no activation with a static scale", "")]
    accs = [_SatAcc(t[3]) for t in targets]
    taps = [t[0] for t in targets]
    for _, (vals,) in _run(ctx, [(ctx.quant, taps)]):
        for (tensor, _l, _n, _p, source), acc in zip(targets, accs):
            arr = vals[tensor]
            if source == "integer output":
                acc.update_int(arr)
            else:
                acc.update_float(arr)
    rows = []
    t = THRESHOLDS
    findings: list[Finding] = []
    for (tensor, layer, qnode, p, source), acc in zip(targets, accs):
        lo, hi = p.qrange  # type: ignore[misc]
        zp = np.asarray(p.zero_point).reshape(-1)
        sc = np.asarray(p.scale, np.float64).reshape(-1)
        # a zero point at the bottom of the range of a layer with a fused Relu/Clip: the low side
        # clips by design (the quantizer emulates the activation there)
        count_low = not (np.all(zp == lo) and _fused_relu(ctx, tensor, layer, source))
        count_high = True
        clipped = ((acc.low if count_low else 0) + (acc.high if count_high else 0)) / acc.n if acc.n else 0.0
        used = max(0.0, (acc.qhi - acc.qlo) / (hi - lo)) if acc.n else 0.0
        calib_min = float(((lo - zp.astype(np.float64)) * sc).min())
        calib_max = float(((hi - zp.astype(np.float64)) * sc).max())
        row = {
            "layer": layer, "tensor": tensor, "node": qnode, "source": source,
            "dtype": _TYPE_NAMES.get(p.elem_type, str(p.elem_type)),
            "scale": float(sc[0]) if sc.size == 1 else float(sc.max()),
            "zero_point": int(zp[0]) if zp.size == 1 else None,
            "calib_min": calib_min, "calib_max": calib_max,
            "data_min": acc.xlo if acc.n else None, "data_max": acc.xhi if acc.n else None, "values": acc.n,
            "clipped_low": (acc.low / acc.n if acc.n else 0.0) if count_low else 0.0,
            "clipped_high": (acc.high / acc.n if acc.n else 0.0) if count_high else 0.0,
            "clipped": clipped, "levels_used": int(acc.qhi - acc.qlo + 1) if acc.n else 0, "range_used": used,
        }  # fmt: skip
        rows.append(row)
        rail = " (values at the rail: an upper bound)" if source == "integer output" else ""
        random_note = " — from random inputs, which may not reflect real ranges" if ctx.random_inputs else ""
        if clipped >= t["saturation_warning"]:
            severity = "error" if clipped >= t["saturation_error"] else "warning"
            findings.append(
                Finding(
                    "saturation",
                    severity,
                    layer,
                    f"{_pct(clipped)} of the values of '{tensor}' clip at the {row['dtype']} range{rail}: the "
                    f"quantization range is [{calib_min:.4g}, {calib_max:.4g}] but the data spans "
                    f"[{acc.xlo:.4g}, {acc.xhi:.4g}]{random_note}",
                    "Recalibrate on data that covers what the model sees in use (more, representative samples), widen "
                    "this tensor's range (TensorQuantOverrides rmin/rmax, a higher Percentile), or give it 16 bits or "
                    "keep the layer in float.",
                )
            )
        elif (
            acc.n
            and used < t["range_used_warning"]
            and (hi - lo) <= 255
            and acc.xhi > acc.xlo
        ):
            findings.append(
                Finding(
                    "saturation",
                    "warning",
                    layer,
                    f"'{tensor}' uses {row['levels_used']} of {hi - lo + 1} {row['dtype']} levels ({_pct(used)} of the "
                    f"range): the quantization range [{calib_min:.4g}, {calib_max:.4g}] is much wider than the data "
                    f"[{acc.xlo:.4g}, {acc.xhi:.4g}]{random_note}",
                    "The calibration saw outliers or other data: recalibrate on representative data, or use Percentile "
                    "or Entropy calibration so a few outliers do not set the scale.",
                )
            )
    df = pd.DataFrame(rows, columns=SATURATION_COLUMNS)
    ctx.tables["saturation"] = df
    ctx.stats["saturation"] = {
        "tensors": len(rows),
        "clipping": int((df["clipped"] >= t["saturation_warning"]).sum()) if len(df) else 0,
        "max_clipped": float(df["clipped"].max()) if len(df) else 0.0,
        "min_range_used": float(df["range_used"].min()) if len(df) else None,
    }
    if ctx.random_inputs:
        findings.append(
            Finding(
                "saturation",
                "info",
                "",
                f"activation ranges come from {ctx.data_info.get('samples', '?')} seeded random input(s) "
                f"(seed {ctx.seed}), which may not reflect real data",
                "Pass --data with representative inputs for clipping and range figures that mean something.",
            )
        )
    return findings


# ---------------------------------------------------------------------------------------------
# Check: FP16
# ---------------------------------------------------------------------------------------------

FP16_COLUMNS = [
    "layer", "op_type", "float_tensor", "fp16_tensor", "values", "overflow_fp32", "inf_fp16", "nan_fp16",
    "nonfinite_new", "underflow", "tiny_fp32", "max_abs_fp32", "rel_error", "input_rel_error", "jump", "block",
]  # fmt: skip


@dataclass
class _F16Acc:
    n: int = 0
    overflow: int = 0
    inf: int = 0
    nan: int = 0
    new_nonfinite: int = 0
    underflow: int = 0
    tiny: int = 0
    err2: float = 0.0
    ref2: float = 0.0
    max_abs: float = 0.0

    def update(self, f: np.ndarray | None, q: np.ndarray) -> None:
        """Add one sample: ``f`` the float32 model's tensor (None without FLOAT), ``q`` the FP16 model's.

        A ``q`` in float32 comes from a node the FP16 model computes in float32 (kept out of the
        conversion, e.g. by ``node_block_list``: Casts around it): it cannot overflow float16, so its
        float32 values beyond ±65504 are not counted as overflow.
        """
        q = np.asarray(q)
        reduced = q.dtype == np.float16 or q.dtype.name == "bfloat16"
        self.n += int(q.size)
        self.inf += int(np.isinf(q).sum())
        self.nan += int(np.isnan(q).sum())
        if f is None:
            return
        f = np.asarray(f, dtype=np.float64)
        q64 = q.astype(np.float64)
        if f.shape != q64.shape:
            if f.size != q64.size:
                return
            q64 = q64.reshape(f.shape)
        ff = np.isfinite(f)
        qf = np.isfinite(q64)
        af = np.abs(f)
        if ff.any():
            self.max_abs = max(self.max_abs, float(af[ff].max()))
        if reduced:
            self.overflow += int((ff & (af > FP16_MAX)).sum())
        self.new_nonfinite += int((ff & ~qf).sum())
        tiny = ff & (af > 0) & (af < FP16_MIN_NORMAL)
        self.tiny += int(tiny.sum())
        self.underflow += int((tiny & (q64 == 0)).sum())
        both = ff & qf
        d = np.where(both, q64 - f, 0.0)
        r = np.where(both, f, 0.0)
        self.err2 += float(np.sum(d * d))
        self.ref2 += float(np.sum(r * r))

    @property
    def rel_error(self) -> float:
        if self.ref2 > 0:
            return math.sqrt(self.err2 / self.ref2)
        return 0.0 if self.err2 == 0 else math.inf


def check_fp16(ctx: DiagnoseContext) -> list[Finding]:
    """An FP16 model against its float32 original: overflow, NaN/inf, flushed values, error jumps.

    Both models run on the same inputs, tapped at every matched tensor pair. Per layer: float32
    values beyond ±65504 (they overflow float16), inf and NaN in the FP16 model, float32 values
    with 0 < |x| < 6.1e-5 that are 0 in float16 (flushed), and the relative error
    ``‖fp16 - fp32‖ / ‖fp32‖`` against that of the layer's inputs: a layer whose error is at least
    ``fp16_jump_min_error`` and ``fp16_jump_factor`` times its inputs' jumps (Softmax, LayerNorm,
    residual Adds are the usual ones). The layers to keep in float32 (overflowing layers and the
    layers reading their values, jumps, heavy underflow) are suggested as the ``node_block_list``
    of ``onnxconverter_common.float16.convert_float_to_float16``. Without FLOAT only inf/NaN in
    the FP16 model's own activations are counted.
    """
    if ctx.fg is None or ctx.matching is None:
        return _fp16_alone(ctx)
    fg, m = ctx.fg, ctx.matching
    paired = {p.float_tensor for p in m.pairs}
    # graph outputs not already a layer's tensor, unless they are a layout copy of one (Identity ...)
    extra = [
        o for o in m.outputs
        if o.float_tensor not in paired
        and not (o.float_tensor in fg.producer and fg.nodes[fg.producer[o.float_tensor]].op_type in LAYOUT)
    ]  # fmt: skip
    pairs: list[TensorPair] = list(dict.fromkeys(list(m.pairs) + extra))
    if not pairs:
        raise CannotRun("no layer of the FP16 model could be paired with the float model")
    accs = [_F16Acc() for _ in pairs]
    for _, (fvals, qvals) in _run(ctx, [(ctx.float, [p.float_tensor for p in pairs]), (ctx.quant, [p.quant_tensor for p in pairs])]):  # type: ignore[list-item]
        for p, acc in zip(pairs, accs):
            acc.update(fvals[p.float_tensor], qvals[p.quant_tensor])
    by_tensor = {p.float_tensor: k for k, p in enumerate(pairs)}
    inputs_of = {k: _upstream_pairs(fg, p.float_tensor, by_tensor) for k, p in enumerate(pairs)}
    t = THRESHOLDS
    findings: list[Finding] = []
    block: dict[str, str] = {}  # float node -> why
    rows = []
    for k, (p, acc) in enumerate(zip(pairs, accs)):
        err = acc.rel_error
        in_err = max((accs[j].rel_error for j in inputs_of[k]), default=0.0)
        jump = err / max(in_err, FP16_EPS) if math.isfinite(err) else math.inf
        inputs_nonfinite = any(accs[j].inf + accs[j].nan > 0 for j in inputs_of[k])
        nodes = [] if p.kind is PairKind.INPUT else p.layer.split("+")
        reasons = []
        if acc.overflow:
            reasons.append("overflow")
            findings.append(
                Finding(
                    "fp16",
                    "error",
                    p.layer,
                    f"{acc.overflow} float32 value(s) of '{p.float_tensor}' exceed ±65504, the float16 range; the FP16 "
                    f"model has {acc.inf} inf and {acc.nan} NaN there",
                    "Keep this layer and the layers reading it in float32 (node_block_list below), or rescale the "
                    "computation so its values stay within ±65504.",
                )
            )
            for c in fg.consumers.get(p.float_tensor, []):
                for name in _layer_nodes_of(fg, c, ctx):
                    block.setdefault(name, f"reads values beyond ±65504 from {p.layer}")
        elif acc.new_nonfinite and not inputs_nonfinite:
            reasons.append("nonfinite")
            findings.append(
                Finding(
                    "fp16",
                    "error",
                    p.layer,
                    f"the FP16 model gives {acc.inf} inf and {acc.nan} NaN value(s) in '{p.quant_tensor}' where float32 "
                    "is finite (an intermediate overflows inside the operator)",
                    "Keep this layer in float32 (node_block_list below).",
                )
            )
        if acc.underflow and acc.n and acc.underflow / acc.n >= t["fp16_underflow_warning"]:
            reasons.append("underflow")
            findings.append(
                Finding(
                    "fp16",
                    "warning",
                    p.layer,
                    f"{acc.underflow} value(s) ({_pct(acc.underflow / acc.n)}) of '{p.float_tensor}' with "
                    f"0 < |x| < 6.1e-5 become 0 in float16 (flushed subnormals)",
                    "Keep this layer in float32, or scale its values up (e.g. fold a small multiplier into a later op).",
                )
            )
        is_jump = (
            not acc.overflow and not inputs_nonfinite and "underflow" not in reasons and math.isfinite(err)
            and err >= t["fp16_jump_min_error"] and jump >= t["fp16_jump_factor"]
        )  # fmt: skip
        if is_jump:
            reasons.append("jump")
            in_max = max((accs[j].max_abs for j in inputs_of[k]), default=0.0)
            where = f"; its inputs reach |x| = {in_max:.4g}, where float16 steps are {_fp16_step(in_max):.3g}" if in_max else ""
            findings.append(
                Finding(
                    "fp16",
                    "warning",
                    p.layer,
                    f"relative error jumps to {err:.3g} at this {p.op_type} from {in_err:.3g} at its inputs (×{jump:.0f}): "
                    f"it amplifies the float16 rounding of its inputs{where}",
                    "Keep this layer and the layers feeding it in float32 (node_block_list below); Softmax, LayerNorm and "
                    "residual Adds are the usual ones.",
                )
            )
            for j in inputs_of[k]:
                if pairs[j].kind is not PairKind.INPUT:
                    for name in pairs[j].layer.split("+"):
                        block.setdefault(name, f"feeds {p.layer}, whose error jumps")
        for name in nodes if reasons else []:
            block.setdefault(name, ", ".join(reasons))
        rows.append(
            {
                "layer": p.layer, "op_type": p.op_type, "float_tensor": p.float_tensor, "fp16_tensor": p.quant_tensor,
                "values": acc.n, "overflow_fp32": acc.overflow, "inf_fp16": acc.inf, "nan_fp16": acc.nan,
                "nonfinite_new": acc.new_nonfinite, "underflow": acc.underflow, "tiny_fp32": acc.tiny,
                "max_abs_fp32": acc.max_abs, "rel_error": err, "input_rel_error": in_err, "jump": jump, "block": False,
            }
        )  # fmt: skip
    order = {n.name: i for i, n in enumerate(fg.nodes)}
    block_list = sorted((b for b in block if b in order), key=lambda n: order[n])
    for r in rows:
        r["block"] = any(n in block_list for n in r["layer"].split("+"))
    ctx.tables["fp16"] = pd.DataFrame(rows, columns=FP16_COLUMNS)
    ctx.stats["fp16"] = {
        "layers": len(rows),
        "overflow_layers": sum(1 for a in accs if a.overflow),
        "nonfinite_layers": sum(1 for a in accs if a.inf + a.nan),
        "max_rel_error": max((a.rel_error for a in accs), default=0.0),
        "node_block_list": block_list,
    }
    if block_list:
        findings.append(
            Finding(
                "fp16",
                "info",
                "",
                f"keep {len(block_list)} node(s) in float32: {block_list}",
                "onnxconverter_common.float16.convert_float_to_float16(model, keep_io_types=True, "
                f"node_block_list={block_list})",
            )
        )
    else:
        findings.append(
            Finding(
                "fp16",
                "info",
                "",
                f"no overflow, NaN/inf, flushed values or error jump in {len(rows)} layer(s); largest relative error "
                f"{max((a.rel_error for a in accs), default=0.0):.3g}",
                "",
            )
        )
    if ctx.provider == "CPUExecutionProvider":
        findings.append(
            Finding(
                "fp16",
                "info",
                "",
                "on the CPU execution provider onnxruntime runs float16 models largely in float32 (it casts around "
                "operators without float16 kernels and merges the casts), so errors here come from float16 weights, "
                "inputs and outputs; float16 arithmetic on a GPU can show larger error jumps. Overflow (|x| > 65504 "
                "in float32) holds for any runtime",
                "Run with --provider cuda (or your deployment provider) to measure float16 arithmetic.",
            )
        )
    if ctx.random_inputs:
        findings.append(
            Finding(
                "fp16", "info", "", f"activations come from {ctx.data_info.get('samples', '?')} seeded random input(s) "
                f"(seed {ctx.seed}), which may not reflect real ranges", "Pass --data with representative inputs.",
            )
        )  # fmt: skip
    return findings


def _fp16_step(x: float) -> float:
    """Spacing of float16 values around ``x`` (normal range)."""
    if x <= FP16_MIN_NORMAL:
        return 2.0**-24
    return 2.0 ** (math.floor(math.log2(x)) - 10)


def _layer_nodes_of(fg: Graph, idx: int, ctx: DiagnoseContext) -> list[str]:
    """Float node names of the layer a float node belongs to (itself when unpaired)."""
    name = fg.node_label(idx)
    if ctx.matching is not None:
        for p in ctx.matching.pairs:
            if name in p.layer.split("+"):
                return p.layer.split("+")
    return [name]


def _upstream_pairs(fg: Graph, tensor: str, by_tensor: dict[str, int]) -> list[int]:
    """Pairs whose float tensors feed ``tensor``'s producer (looking through unpaired nodes)."""
    idx = fg.producer.get(tensor)
    if idx is None:
        return []
    found: list[int] = []
    stack = [(i, 0) for i in fg.nodes[idx].input if i and not fg.is_constant(i)]
    seen: set[str] = set()
    while stack:
        name, depth = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in by_tensor and name != tensor:
            found.append(by_tensor[name])
            continue
        p = fg.producer.get(name)
        if p is not None and depth < 4:
            stack.extend((i, depth + 1) for i in fg.nodes[p].input if i and not fg.is_constant(i))
    return found


def _fp16_alone(ctx: DiagnoseContext) -> list[Finding]:
    """Without FLOAT: inf/NaN in the FP16 model's own activations."""
    g = ctx.qg
    targets = []
    for idx in _compute_nodes(ctx):
        for o in g.nodes[idx].output:
            if o and g.elem_type(o) in _REDUCED_FLOAT:
                targets.append((o, idx))
    findings = [
        Finding(
            "fp16",
            "info",
            "",
            "without FLOAT only inf/NaN in the FP16 model's own activations are counted",
            "Pass the float32 original as FLOAT to also find overflow against float32, flushed subnormals and "
            "layers whose error jumps.",
        )
    ]
    if not targets:
        ctx.stats["fp16"] = {"layers": 0}
        return findings
    accs = {o: _F16Acc() for o, _ in targets}
    for _, (vals,) in _run(ctx, [(ctx.quant, [o for o, _ in targets])]):
        for o, _ in targets:
            accs[o].update(None, vals[o])
    bad = {o for o, a in accs.items() if a.inf + a.nan}
    rows = []
    block: list[str] = []
    for o, idx in targets:
        a = accs[o]
        ins_bad = any(i in bad for i in g.nodes[idx].input)
        rows.append({"layer": ctx.layers.node(idx), "op_type": g.nodes[idx].op_type, "float_tensor": None, "fp16_tensor": o,
                     "values": a.n, "inf_fp16": a.inf, "nan_fp16": a.nan, "block": o in bad and not ins_bad})  # fmt: skip
        if o in bad and not ins_bad:
            name = g.node_label(idx)
            block.append(name)
            block.extend(g.node_label(c) for c in g.consumers.get(o, []) if g.nodes[c].op_type not in TRANSPARENT)
            findings.append(
                Finding(
                    "fp16",
                    "error",
                    ctx.layers.node(idx),
                    f"the FP16 model gives {a.inf} inf and {a.nan} NaN value(s) in '{o}' from finite inputs",
                    "Keep this layer and its readers in float32 (node_block_list below).",
                )
            )
    block = list(dict.fromkeys(block))
    ctx.tables["fp16"] = pd.DataFrame(rows, columns=FP16_COLUMNS)
    ctx.stats["fp16"] = {"layers": len(rows), "nonfinite_layers": len(bad), "node_block_list": block}
    if block:
        findings.append(
            Finding(
                "fp16", "info", "", f"keep {len(block)} node(s) in float32: {block}",
                f"onnxconverter_common.float16.convert_float_to_float16(model, keep_io_types=True, node_block_list={block})",
            )
        )  # fmt: skip
    return findings


# ---------------------------------------------------------------------------------------------
# Registry and entry point
# ---------------------------------------------------------------------------------------------

_INT8 = frozenset({"qdq", "qoperator", "dynamic"})

#: the checks, in the order they run and report
CHECKS: dict[str, Check] = {
    c.name: c
    for c in (
        Check("qparams", check_qparams, "pass-through ops whose input/output scale or zero point differ; Q/DQ pairs that disagree", frozenset({"qdq", "qoperator"})),
        Check("coverage", check_coverage, "nodes and weights quantized vs left in float, weight bytes, file sizes", _INT8 | {"fp16", "float"}),
        Check("conversions", check_conversions, "Int8↔Float transitions and DQ → float ops → Q round trips", _INT8),
        Check("per_channel", check_per_channel, "per-channel vs per-tensor weights; per-tensor ones among per-channel", _INT8),
        Check("fp16", check_fp16, "FP16 vs float32: overflow, NaN/inf, flushed subnormals, error jumps, node_block_list", frozenset({"fp16"}), activations=True),
        Check("saturation", check_saturation, "share of values clipped at the integer range and of the range used", frozenset({"qdq", "qoperator", "dynamic"}), activations=True),
    )
}  # fmt: skip


def diagnose(
    quant_model: ModelLike,
    float_model: ModelLike | None = None,
    data: DataLike = None,
    *,
    samples: int | None = 8,
    seed: int = 0,
    input_shapes: Mapping[str, Any] | list[str] | None = None,
    provider: str = "CPUExecutionProvider",
    session_factory: SessionFactory | None = None,
    checks: Sequence[str] | None = None,
) -> DiagnoseResult:
    """Run the quantization checks on a quantized (or FP16) model.

    Args:
        quant_model: the int8 model (QDQ, QOperator, dynamic) or an FP16 model, path or ModelProto.
        float_model: the float32 model it was made from (optional: layer names from the matching,
            file-size comparison, and the FP16 check's reference).
        data: inputs for the checks that run the models (as for :func:`qdiff.compare`); None
            for seeded random inputs from the input spec.
        samples: at most this many samples (None: all the data).
        seed: seed of the random inputs.
        input_shapes: shapes of random inputs with dynamic dimensions.
        provider: onnxruntime execution provider.
        session_factory: builds sessions from ModelProtos (overrides ``provider``).
        checks: names of the checks to run (default: all of :data:`CHECKS`).

    Returns:
        A :class:`DiagnoseResult`; findings most severe first.

    Raises:
        UsageError: an unknown check name, bad sample count or input shape.
        QdiffError: models or data that cannot be read or do not fit (as for ``compare``).
    """
    started = time.perf_counter()
    names = list(CHECKS) if checks is None else list(dict.fromkeys(checks))
    unknown = [c for c in names if c not in CHECKS]
    if unknown:
        raise UsageError(f"unknown check(s) {unknown}; the checks are {list(CHECKS)}")
    if samples is not None and samples < 1:
        raise UsageError(f"--samples must be at least 1, got {samples}")
    q_loaded = load_model(quant_model, role="quantized model")
    f_loaded = load_model(float_model, role="float model") if float_model is not None else None
    qg = Graph(q_loaded.proto)
    fg = Graph(f_loaded.proto) if f_loaded is not None else None
    if fg is not None:
        check_same_inputs(input_specs(fg), input_specs(qg), f_loaded.label, q_loaded.label)  # type: ignore[union-attr]
    if session_factory is None:
        options = SessionOptions(provider=resolve_provider(provider))
        session_factory = default_session_factory(options)
        provider_name = options.provider
    else:
        provider_name = "custom session factory"
    matching = match_models(fg, qg, weigh=no_weight_values) if fg is not None else None
    skeleton = _Skeleton(qg)
    ctx = DiagnoseContext(
        quant=q_loaded, qg=qg, float=f_loaded, fg=fg, matching=matching, kind=model_kind(qg),
        layers=_Layers(qg, skeleton, matching), skeleton=skeleton, data=data, samples=samples, seed=seed,
        input_shapes=parse_input_shapes(input_shapes), session_factory=session_factory, provider=provider_name,
    )  # fmt: skip
    findings: list[Finding] = []
    status: dict[str, dict[str, str]] = {}
    for name in names:
        check = CHECKS[name]
        if ctx.kind not in check.applies:
            status[name] = {"status": "not applicable", "reason": f"{ctx.kind} model"}
            continue
        try:
            found = check.func(ctx)
        except CannotRun as exc:
            status[name] = {"status": "cannot run", "reason": str(exc)}
            findings.append(Finding(name, "info", "", f"{name} check cannot run: {exc}", ""))
            continue
        status[name] = {"status": "ran", "reason": ""}
        findings.extend(found)
    rank = {s: i for i, s in enumerate(SEVERITIES)}
    findings.sort(key=lambda f: rank[f.severity])
    meta = _meta(ctx, provider_name, status, time.perf_counter() - started)
    return DiagnoseResult(findings, dict(ctx.tables), meta)


def _meta(ctx: DiagnoseContext, provider: str, status: dict[str, dict[str, str]], seconds: float) -> dict[str, Any]:
    from qdiff import __version__

    def model(m: LoadedModel | None) -> dict[str, Any] | None:
        if m is None:
            return None
        return {"name": m.label, "path": str(m.path) if m.path else None, "sha256": m.sha256, "bytes": _model_size(m)}

    versions: dict[str, Any] = {"qdiff_version": __version__, "onnx_version": onnx.__version__}
    try:
        import onnxruntime as ort

        versions["onnxruntime_version"] = ort.__version__
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
        versions["onnxruntime_version"] = None
    return {
        **versions,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "quant_model": model(ctx.quant),
        "float_model": model(ctx.float),
        "model_kind": ctx.kind,
        "provider": provider,
        "seed": ctx.seed,
        **(ctx.data_info or {"data": None, "data_sha256": None, "samples": 0, "random_inputs": ctx.random_inputs}),
        "checks": status,
        "stats": ctx.stats,
        "thresholds": dict(THRESHOLDS),
        "notes": ctx.notes,
        "seconds": round(seconds, 3),
    }


def _json_safe(v: Any) -> Any:
    """Replace NaN/inf floats (not allowed in strict JSON) by None / strings, recursively."""
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (np.generic,)):
        v = v.item()
    if isinstance(v, float):
        if math.isnan(v):
            return None
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
    return v
