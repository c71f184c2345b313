"""What several checks read: the context of a run, layer names, quantization parameters, graph helpers.

:class:`DiagnoseContext` holds the models, their graphs, the matching and the data; :class:`_Layers`
names quantized nodes after float layers (``profile`` uses it too); :class:`_QParams` and the
``_qparams`` family read scales and zero points; :func:`_run` runs models on the data for the
activation checks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from qdiff._diagnose.findings import CannotRun
from qdiff.errors import UsageError
from qdiff.graph import Graph, LoadedModel, attr_value
from qdiff.inputs import DataLike, DataSource, input_specs, make_source
from qdiff.matching import QOP_SPECS, _base_name, _Skeleton
from qdiff.engine.sessions import Session, SessionFactory, feed_for, open_session, tap_model
from qdiff.ops import INTEGER_OPS, QDQ, TRANSPARENT
from qdiff.structs import Matching, PairKind

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


@dataclass
class DiagnoseContext:
    """Everything a check may read. Checks return their findings, tables and figures
    (:class:`CheckOutput`); the context keeps only what running the models leaves behind (session
    notes, the data read).

    Attributes:
        quant: the model under diagnosis (int8 or FP16), as loaded.
        qg: its graph view.
        float: the float32 original, when given.
        fg: its graph view.
        matching: ``match_models(fg, qg)`` when FLOAT is given.
        kind: ``qdq``, ``qoperator``, ``dynamic``, ``fp16`` or ``float`` (nothing quantized).
        layers: names quantized nodes and tensors after float layers.
        skeleton: the quantized graph's matching skeleton (groups, integer ops, rescale chains).
        notes: remarks for ``meta["notes"]`` (sessions opened).
        data_info: what :meth:`record_source` saw of the data (the activation checks' messages).
        source_used: the last data source an activation check read (the result's RunInfo).
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
    notes: list[str] = field(default_factory=list)
    data_info: dict[str, Any] = field(default_factory=dict)
    source_used: DataSource | None = None

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
        self.source_used = source
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
