"""Drive onnxruntime's ``quantize_static`` from a :class:`~qdiff.config.QuantConfig`.

Mapping of config fields to the quantizer:

=====================================  ==========================================================
config                                 onnxruntime
=====================================  ==========================================================
``batch_num``                          number of calibration samples fed to the reader
``quant_format``                       ``quant_format`` (QDQ / QOperator)
activation ``calibration_method``      ``calibrate_method``
activation ``type`` / weight ``type``  ``activation_type`` / ``weight_type``
activation ``symmetric``               ``extra_options["ActivationSymmetric"]``
``moving_average``, ``averaging_...``  ``CalibMovingAverage``, ``CalibMovingAverageConstant``
``percentile``                         ``CalibPercentile``
weight ``per_channel`` / ``symmetric`` ``per_channel`` / ``WeightSymmetric``
layer ``quant_enable: false``          ``nodes_to_exclude``
layer activation ``type``/``symmetric``  ``TensorQuantOverrides`` on the layer's output tensors
layer ``calibration_method``/...       ranges from a calibration with that method, as
                                       ``TensorQuantOverrides`` ``rmin``/``rmax``
layer weight ``type`` / ``symmetric``  ``TensorQuantOverrides`` on the layer's weight
=====================================  ==========================================================

Models the quantizer trips on are prepared first (:func:`prepare_model`): weights held by
Constant nodes become initializers (QOperator crashes on them and per-channel silently does
nothing), unnamed nodes get names (``nodes_to_exclude`` needs them), the IR version is set to one
the quantizer and onnxruntime accept, and shapes are inferred. After quantizing, the produced
model is checked and what did not happen as configured is reported (``QuantizeReport.warnings``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from qdiff._io import write_bytes_atomic
from qdiff.config import LayerConfig, QuantConfig
from qdiff.engine.sessions import SessionFactory, SessionOptions, default_session_factory
from qdiff.errors import QdiffError, UsageError
from qdiff.graph import (
    Graph, ModelLike, attr_value, default_opset, initializer_bytes, load_model, node_label, save_with_data, with_opset,
)  # fmt: skip
from qdiff.inputs import DataLike, input_specs, make_source
from qdiff.ops import QUANTIZABLE_OPS, WEIGHT_INPUT, weight_channel_axis
from qdiff.passes import PassResult

__all__ = ["quantize", "calib_sweep", "export_skip_list", "calibrate_ranges", "QuantizeReport", "prepare_model", "init_config", "quantizable_layers", "QUANTIZABLE_OPS"]

log = logging.getLogger(__name__)

_WEIGHTED = WEIGHT_INPUT
_IR_FOR_QUANTIZER = 10


@dataclass
class QuantizeReport:
    """What :func:`quantize` produced and anything that did not go as configured."""

    path: Path
    excluded: list[str]
    calibration_samples: int
    size_bytes: int
    float_size_bytes: int
    quantized_nodes: int
    warnings: list[str] = field(default_factory=list)
    prepared: list[str] = field(default_factory=list)


#: the opset the prepared model is brought to: per-channel DequantizeLinear (``axis``) needs 13
MIN_QUANT_OPSET = 13


def prepare_model(model: onnx.ModelProto) -> PassResult:
    """Make a float model safe for onnxruntime's quantizer (a pass; the input is not modified).

    A default-domain opset below :data:`MIN_QUANT_OPSET` is raised to it by onnx's version
    converter (per-channel DequantizeLinear needs opset 13; the quantizer would otherwise write an
    ``axis`` attribute the model's opset does not have, and the model would not load); where the
    converter fails the opset is kept and :func:`quantize` falls back to per-tensor weights.
    Constant nodes feeding weights become initializers, unnamed nodes are named
    ``op_type(first output)`` (:func:`qdiff.graph.node_label`, as every other command names
    them), the IR version is capped to one the quantizer handles, shapes are inferred. ``modified`` counts the edits.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    modified = 0
    converted = with_opset(out, MIN_QUANT_OPSET)
    if converted is not None and converted is not out:
        out = converted  # else: kept, and quantize() falls back to per-tensor weights
        modified += 1
    g = out.graph
    kept = []
    for node in g.node:
        if node.op_type == "Constant" and len(node.output) == 1 and node.attribute and node.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(node.attribute[0].t)
            t.name = node.output[0]
            g.initializer.append(t)
            modified += 1
            continue
        kept.append(node)
    del g.node[:]
    g.node.extend(kept)
    used = {n.name for n in g.node if n.name}
    for k, node in enumerate(g.node):
        if not node.name:
            name = node_label(node, k)  # the name compare/diagnose/configs give the unnamed node
            while name in used:
                name += "_"
            node.name = name
            used.add(name)
            modified += 1
    if out.ir_version > _IR_FOR_QUANTIZER:
        out.ir_version = _IR_FOR_QUANTIZER
        modified += 1
    try:
        out = onnx.shape_inference.infer_shapes(out)
    except Exception as exc:  # noqa: BLE001 - inference is a help, not a requirement
        log.debug("shape inference failed: %s", exc)
    return PassResult(out, modified)


def quantizable_layers(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """``(node name, op type)`` of the nodes onnxruntime's quantizer would quantize, graph order."""
    g = Graph(model)
    out = []
    for idx, node in enumerate(g.nodes):
        if node.op_type in QUANTIZABLE_OPS and any(not g.is_constant(i) for i in node.input if i):
            out.append((g.node_label(idx), node.op_type))
    return out


def init_config(float_model: ModelLike, **defaults: Any) -> QuantConfig:
    """A config listing every quantizable layer of ``float_model`` with ``quant_enable: true``."""
    loaded = load_model(float_model, role="float model")
    prepared = prepare_model(loaded.proto).model
    config = QuantConfig(**defaults)
    for name, _ in quantizable_layers(prepared):
        config.layers[name] = LayerConfig()
    return config


def _qtype(name: str):
    from onnxruntime.quantization import QuantType

    return getattr(QuantType, name)


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return getattr(CalibrationMethod, name)


class _Reader:
    """CalibrationDataReader over a list of feeds (re-iterable for several calibrations)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = feeds
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.feeds)

    def __iter__(self):
        return iter(self.feeds)


def calibration_feeds(model: onnx.ModelProto, data: DataLike, batch_num: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """The first ``batch_num`` validated samples of ``data`` as quantizer feeds."""
    specs = input_specs(Graph(model))
    feeds = list(make_source(data, specs, samples=batch_num, seed=seed))
    if not feeds:
        raise UsageError("calibration data holds no samples")
    return feeds


def quantize(
    float_model: ModelLike,
    config: QuantConfig,
    calib: DataLike,
    output: str | os.PathLike[str],
    *,
    seed: int = 0,
    feeds: list[dict[str, np.ndarray]] | None = None,
    calibration_cache: str | os.PathLike[str] | None = None,
    provider: str = "CPUExecutionProvider",
) -> QuantizeReport:
    """Quantize ``float_model`` as ``config`` says, with onnxruntime's ``quantize_static``.

    Args:
        float_model: path or ModelProto.
        config: the quantization config.
        calib: calibration data (as ``compare``'s ``data``); the first ``config.batch_num``
            samples are used.
        output: where the quantized model is written (atomically).
        seed: seed for random calibration data (when ``calib`` is None).
        feeds: already prepared calibration feeds (skips reading ``calib``).
        calibration_cache: a file where onnxruntime keeps the activation ranges it calibrated
            (``quantize_static(calibration_cache_path=...)``, onnxruntime >= 1.32; ignored by older
            versions). The ranges depend only on the float model, the data and the calibration
            method, not on which layers are excluded, so the fallback loop calibrates once. The
            caller owns the file: a cache from other data or another model gives wrong ranges.
        provider: the onnxruntime execution provider that must load the quantized model (the
            check before it is written).

    Raises:
        UsageError: the config names layers the model does not have.
        QdiffError: onnxruntime's quantizer failed; the message has its reason.
        ProviderError: ``provider`` is not available.
    """
    from onnxruntime.quantization import QuantFormat, quantize_static

    check = _load_check_factory(provider)

    loaded = load_model(float_model, role="float model")
    prep = prepare_model(loaded.proto)
    model = prep.model
    prepared = [f"{prep.modified} edit(s) before quantizing (Constant weights to initializers, node names, IR version)"] if prep.modified else []
    g = Graph(model)
    names = {n.name for n in model.graph.node}
    unknown = [n for n in config.layers if n not in names]
    if unknown:
        raise UsageError(
            f"config layers {unknown[:5]} are not nodes of {loaded.label}; run 'qdiff config init' on this model"
        )
    if feeds is None:
        feeds = calibration_feeds(model, calib, config.batch_num, seed)
    feeds = feeds[: config.batch_num]
    act, wgt = config.activation_quant_params, config.weight_quant_params
    opset_notes = []
    per_channel = bool(wgt["per_channel"])
    opset = default_opset(model)
    if per_channel and opset is not None and opset < MIN_QUANT_OPSET:
        per_channel = False
        opset_notes.append(
            f"per_channel needs opset >= {MIN_QUANT_OPSET} but {loaded.label} is opset {opset} and onnx's version "
            "converter could not raise it: weights quantized per-tensor"
        )
    extra: dict[str, Any] = {
        "ActivationSymmetric": bool(act["symmetric"]),
        "WeightSymmetric": bool(wgt["symmetric"]),
    }
    if act["calibration_method"] == "MinMax" and act.get("moving_average"):
        extra["CalibMovingAverage"] = True
        extra["CalibMovingAverageConstant"] = float(act.get("averaging_constant", 0.01))
    if act["calibration_method"] == "Percentile":
        extra["CalibPercentile"] = float(act.get("percentile", 99.999))
    overrides = _overrides(model, g, config, feeds)
    if overrides:
        extra["TensorQuantOverrides"] = overrides

    out_path = Path(output)
    with tempfile.TemporaryDirectory(prefix="qdiff-quant-") as tmp:
        src = os.path.join(tmp, "float.onnx")
        dst = os.path.join(tmp, "quant.onnx")
        save_with_data(model, src)
        try:
            with contextlib.redirect_stdout(io.StringIO()), _quiet_root_logger():
                quantize_static(
                    src,
                    dst,
                    _Reader(feeds),
                    quant_format=QuantFormat.QDQ if config.quant_format == "QDQ" else QuantFormat.QOperator,
                    per_channel=per_channel,
                    activation_type=_qtype(act["type"]),
                    weight_type=_qtype(wgt["type"]),
                    nodes_to_exclude=config.disabled,
                    calibrate_method=_method(act["calibration_method"]),
                    extra_options=extra,
                    **_cache_kwargs(calibration_cache, act),
                )
        except QdiffError:
            raise
        except Exception as exc:  # the quantizer's own failures, reported as such
            raise QdiffError(
                f"onnxruntime's quantizer failed on {loaded.label}: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
            ) from None
        qm = onnx.load(dst)
        if qm.ir_version > _IR_FOR_QUANTIZER:
            qm.ir_version = _IR_FOR_QUANTIZER
        data = qm.SerializeToString()
        _check_loads(check, qm, loaded.label)
        write_bytes_atomic(out_path, data)
    report = QuantizeReport(
        path=out_path,
        excluded=config.disabled,
        calibration_samples=len(feeds),
        size_bytes=len(data),
        float_size_bytes=model.ByteSize(),
        quantized_nodes=sum(1 for n in qm.graph.node if n.op_type in ("QuantizeLinear", "QLinearConv", "QGemm", "QLinearMatMul")),
        prepared=prepared,
    )
    report.warnings = opset_notes + _check(model, qm, config)
    return report


def _cache_kwargs(path: str | os.PathLike[str] | None, act: dict[str, Any]) -> dict[str, Any]:
    """``calibration_cache_path`` where onnxruntime takes it, one file per calibration setting."""
    if path is None:
        return {}
    import inspect

    from onnxruntime.quantization import quantize_static

    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        return {}
    key = "_".join(str(act.get(k)) for k in ("calibration_method", "moving_average", "averaging_constant", "percentile"))
    p = Path(path)
    return {"calibration_cache_path": p.with_name(f"{p.stem}.{key}{p.suffix}")}


def _load_check_factory(provider: str) -> SessionFactory:
    """Sessions that only check a model loads: no graph optimisation (loading is the question)."""
    return default_session_factory(SessionOptions(provider=provider, graph_optimization="ORT_DISABLE_ALL"))


def _check_loads(factory: SessionFactory, model: onnx.ModelProto, label: str) -> None:
    """onnxruntime must load what the quantizer wrote before anyone is handed it."""
    try:
        factory(model)
    except Exception as exc:  # noqa: BLE001 - whatever onnxruntime says is the reason
        raise QdiffError(
            f"onnxruntime's quantizer wrote a model of {label} that onnxruntime cannot load: "
            f"{str(exc).strip().splitlines()[0][:300]}; try --per-tensor or another quant_format"
        ) from None


@contextlib.contextmanager
def _quiet_root_logger():
    """onnxruntime's quantizer warns through the root logger on every call ("consider
    pre-processing"); qdiff prepares the model itself, so those are held back while it runs."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _weight_axis(g: Graph, layer: str) -> int:
    """The axis onnxruntime's quantizer uses by default for a layer's per-channel weight."""
    node = next(n for n in g.nodes if n.name == layer)
    return weight_channel_axis(node.op_type, 1, 2, attr_value(node, "transB", 0), convention="onnxruntime")


def _output_tensors(g: Graph, layer: str) -> list[str]:
    node = next((n for n in g.nodes if n.name == layer), None)
    return [o for o in node.output if o] if node is not None else []


def _weight_tensor(g: Graph, layer: str) -> str | None:
    node = next((n for n in g.nodes if n.name == layer), None)
    if node is None or node.op_type not in _WEIGHTED or len(node.input) <= _WEIGHTED[node.op_type]:
        return None
    w = node.input[_WEIGHTED[node.op_type]]
    return w if w in g.initializers else None


def _overrides(model: onnx.ModelProto, g: Graph, config: QuantConfig, feeds: list[dict[str, np.ndarray]]) -> dict[str, list[dict[str, Any]]]:
    """TensorQuantOverrides for the per-layer parameters of ``config``."""
    out: dict[str, list[dict[str, Any]]] = {}
    default_method = config.activation_quant_params["calibration_method"]
    by_method: dict[tuple, list[str]] = {}
    for name, layer in config.layers.items():
        if not layer.quant_enable:
            continue
        a = layer.activation_quant_params
        if a:
            entry = {}
            if "type" in a:
                entry["quant_type"] = _qtype(a["type"])
            if "symmetric" in a:
                entry["symmetric"] = bool(a["symmetric"])
            method = a.get("calibration_method", default_method)
            pct = a.get("percentile", config.activation_quant_params.get("percentile", 99.999))
            if method != default_method or ("percentile" in a and method == "Percentile"):
                by_method.setdefault((method, float(pct)), []).append(name)
            for t in _output_tensors(g, name):
                if entry:
                    out.setdefault(t, [{}])[0].update(entry)
        w = layer.weight_quant_params
        if w:
            wt = _weight_tensor(g, name)
            if wt is not None:
                entry = {}
                if "type" in w:
                    entry["quant_type"] = _qtype(w["type"])
                if "symmetric" in w:
                    entry["symmetric"] = bool(w["symmetric"])
                if entry:
                    if config.weight_quant_params["per_channel"]:
                        entry["axis"] = _weight_axis(g, name)
                    out.setdefault(wt, [{}])[0].update(entry)

    if config.weight_quant_params["per_channel"] and not config.weight_quant_params["symmetric"]:
        # onnxruntime ignores WeightSymmetric=False for per-channel weights; say it per tensor
        disabled = set(config.disabled)
        for node in g.nodes:
            layer = config.layers.get(node.name)
            if node.name in disabled or (layer is not None and "symmetric" in layer.weight_quant_params):
                continue
            wt = _weight_tensor(g, node.name) if node.name else None
            if wt is not None:
                out.setdefault(wt, [{}])[0].update({"symmetric": False, "axis": _weight_axis(g, node.name)})
    for (method, pct), layers in by_method.items():
        tensors = [t for name in layers for t in _output_tensors(g, name)]
        ranges = calibrate_ranges(model, feeds, method, percentile=pct, tensors=tensors)
        for t in tensors:
            if t in ranges:
                lo, hi = ranges[t]
                out.setdefault(t, [{}])[0].update({"rmin": np.float32(lo), "rmax": np.float32(hi)})
    return out


def calibrate_ranges(
    model: onnx.ModelProto,
    feeds: list[dict[str, np.ndarray]],
    method: str,
    *,
    percentile: float = 99.999,
    tensors: Iterable[str] | None = None,
) -> dict[str, tuple[float, float]]:
    """Activation ranges onnxruntime's calibrator computes with ``method`` (tensor -> (rmin, rmax))."""
    from onnxruntime.quantization.calibrate import create_calibrator

    wanted = set(tensors) if tensors is not None else None
    with tempfile.TemporaryDirectory(prefix="qdiff-calib-") as tmp:
        src = os.path.join(tmp, "model.onnx")
        save_with_data(model, src)
        extra = {"percentile": percentile} if method == "Percentile" else {}
        try:
            calibrator = create_calibrator(
                Path(src),
                augmented_model_path=os.path.join(tmp, "augmented.onnx"),
                calibrate_method=_method(method),
                extra_options=extra,
            )
            with contextlib.redirect_stdout(io.StringIO()), _quiet_root_logger():  # calibrators print progress
                calibrator.collect_data(_Reader(feeds))
                data = calibrator.compute_data()
        except Exception as exc:
            raise QdiffError(f"onnxruntime's {method} calibration failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
    out = {}
    for name, value in data.data.items():
        if wanted is not None and name not in wanted:
            continue
        rng = getattr(value, "range_value", value)
        lo, hi = (np.asarray(rng[0]).reshape(-1)[0], np.asarray(rng[1]).reshape(-1)[0])
        out[name] = (float(lo), float(hi))
    return out


def _check(float_model: onnx.ModelProto, qm: onnx.ModelProto, config: QuantConfig) -> list[str]:
    """What the produced model shows did not happen as configured."""
    warnings = []
    qg = Graph(qm)
    qnames = {n.name: n for n in qm.graph.node}
    for name in config.disabled:
        node = qnames.get(name)
        if node is not None and any(
            qg.producer.get(i) is not None and qg.nodes[qg.producer[i]].op_type == "DequantizeLinear"
            and _is_weight_dq(qg, qg.nodes[qg.producer[i]])
            for i in node.input
        ):
            warnings.append(f"layer '{name}' has quant_enable false but its weights were quantized anyway")
    if config.weight_quant_params["per_channel"]:
        per_tensor = []
        for node in qm.graph.node:
            if node.op_type == "DequantizeLinear" and _is_weight_dq(qg, node) and len(node.input) > 1:
                scale = qg.const_value(node.input[1])
                value = qg.const_value(node.input[0])
                readers = [qg.nodes[i].op_type for i in qg.consumers.get(node.output[0], [])]
                # the output-channel axis of the reader: ConvTranspose weights are [in, out/group, ...]
                axis = 1 if "ConvTranspose" in readers else (-1 if readers and readers[0] == "MatMul" else 0)
                if (
                    scale is not None and value is not None and value.ndim >= 2
                    and np.asarray(scale).size == 1 and value.shape[axis] > 1
                    and min(value.shape[0], value.shape[-1]) > 1
                ):
                    per_tensor.append(node.input[0])
        if per_tensor:
            warnings.append(
                f"per_channel is on but {len(per_tensor)} weight(s) were quantized per-tensor: {', '.join(per_tensor[:5])}"
            )
    float_bytes = _float_weight_bytes(float_model)
    left = _float_weight_bytes(qm)
    if float_bytes and left >= 0.9 * float_bytes:
        warnings.append(
            f"the weights were not quantized: {left} of the float model's {float_bytes} weight bytes are still float "
            f"(file {qm.ByteSize()} vs {float_model.ByteSize()} bytes)"
        )
    return warnings


def _float_weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of float initializers with two or more dimensions (the weights)."""
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
    return initializer_bytes(model, lambda t: t.data_type in floats and len(t.dims) >= 2)


def _is_weight_dq(g: Graph, node: onnx.NodeProto) -> bool:
    src = node.input[0] if node.input else ""
    value = g.const_value(src)
    return value is not None and value.ndim >= 2


def calib_sweep(
    float_model: ModelLike,
    calib: DataLike,
    *,
    config: QuantConfig | None = None,
    methods: tuple[str, ...] = ("MinMax", "Entropy", "Percentile", "Distribution"),
    eval_data: DataLike = None,
    samples: int | None = 32,
    provider: str = "CPUExecutionProvider",
    session_factory: SessionFactory | None = None,
) -> tuple[QuantConfig, "Any", list[str]]:
    """Quantize with each calibration method, compare per layer, keep the best method per layer.

    ``provider`` and ``session_factory`` say where the comparisons run, as in
    :func:`qdiff.sensitivity` (the quantizer's load check uses ``provider``).

    Returns:
        The config (default method = the best overall; per-layer overrides where another method
        gives a better isolated cosine), a DataFrame of isolated cosine per layer and method, and
        notes: methods that failed, and methods that gave exactly the same ranges as another.
    """
    import pandas as pd

    from qdiff._sensitivity import sensitivity

    loaded = load_model(float_model, role="float model")
    fp = prepare_model(loaded.proto).model
    base = config or init_config(fp)
    feeds = calibration_feeds(fp, calib, base.batch_num)
    notes: list[str] = []
    scores: dict[str, dict[str, float]] = {}
    scales: dict[str, dict[str, bytes]] = {}
    with tempfile.TemporaryDirectory(prefix="qdiff-sweep-") as tmp:
        for method in methods:
            cfg = QuantConfig.from_dict(base.to_dict())
            cfg.activation_quant_params["calibration_method"] = method
            path = os.path.join(tmp, f"{method}.onnx")
            try:
                quantize(fp, cfg, None, path, feeds=feeds, provider=provider)
                result = sensitivity(
                    fp, path, data=eval_data if eval_data is not None else calib, samples=samples, gain=False,
                    provider=provider, session_factory=session_factory,
                )  # fmt: skip
            except QdiffError as exc:
                notes.append(f"{method}: failed ({exc})")
                continue
            scores[method] = dict(zip(result.layers["layer"], result.layers["isolated_cosine"]))
            qm = onnx.load(path)
            scales[method] = {
                t.name: t.SerializeToString() for t in qm.graph.initializer if t.name.endswith(("_scale", "_zero_point"))
            }
    done = list(scores)
    for i, a in enumerate(done):
        for b in done[:i]:
            if scales[a] == scales[b]:
                notes.append(f"{a} calibration gave exactly the same ranges as {b} (no per-layer difference possible)")
                break
    if not scores:
        raise QdiffError("every calibration method failed: " + "; ".join(notes))
    table = pd.DataFrame(scores)
    table.index.name = "layer"
    overall = max(done, key=lambda m: (table[m].mean(), -done.index(m)))
    out = QuantConfig.from_dict(base.to_dict())
    out.activation_quant_params["calibration_method"] = overall
    best = table.idxmax(axis=1)
    for layer, method in best.items():
        if method == overall or table.loc[layer, method] <= table.loc[layer, overall] + 1e-7:
            continue
        end = str(layer).split("+")[-1].split(":")[0]  # the node writing the layer's output
        entry = out.layers.setdefault(end, LayerConfig())
        entry.activation_quant_params["calibration_method"] = method
    table["best"] = [m if table.loc[l, m] > table.loc[l, overall] + 1e-7 else overall for l, m in best.items()]
    return out, table.reset_index(), notes


def export_skip_list(config: QuantConfig, to: str, model: ModelLike | None = None) -> str:
    """The layers with ``quant_enable: false`` in another tool's format.

    ``ort``: the JSON list for ``quantize_static(nodes_to_exclude=...)`` (ONNX node names).
    ``mnn``: MNN's quantization JSON ``{"skip_quant_op_names": [...]}``; MNN's converter names each
    op after the ONNX node's first output tensor (a Gemm, converted to a 1x1 convolution, after
    ``<output>__matmul_converted``), so ``model`` (the float ONNX model) is needed to map the names.
    ``nncf``: ``nncf.IgnoredScope(names=[...])`` for NNCF's ONNX backend (``nncf.quantize`` on the
    ``onnx.ModelProto``), whose names are the ONNX node names; the OpenVINO backend (a model
    converted with ``openvino.convert_model``) names operations differently. ``tflite``: refused:
    TFLite's ``denylisted_nodes`` takes TensorFlow tensor names, which no ONNX name maps to.
    """
    import json

    names = config.disabled
    if to == "ort":
        return json.dumps(names, indent=2) + "\n"
    if to == "mnn":
        return json.dumps({"skip_quant_op_names": _mnn_names(names, model)}, indent=2) + "\n"
    if to == "nncf":
        return (
            "# names for NNCF's ONNX backend: nncf.quantize(onnx_model, ..., ignored_scope=ignored_scope) on the\n"
            "# ONNX model; NNCF's OpenVINO backend (openvino.convert_model) names operations differently\n"
            f"import nncf\n\nignored_scope = nncf.IgnoredScope(names={json.dumps(names)})\n"
        )
    if to == "tflite":
        raise UsageError(
            "--to tflite: TFLite's denylisted_nodes takes TensorFlow tensor names, which no ONNX node name maps to "
            "(they depend on the ONNX->TF converter); export --to ort/mnn/nncf, or list the TF names by hand"
        )
    raise UsageError(f"--to must be one of ort, mnn, nncf, tflite, not '{to}'")


def _mnn_names(names: list[str], model: ModelLike | None) -> list[str]:
    """MNN op names of the config's ONNX node names: the node's first output tensor."""
    if model is None:
        raise UsageError(
            "--to mnn needs the float model (--model FLOAT.onnx): MNN names each op after its first output tensor, "
            "not the ONNX node name"
        )
    g = Graph(load_model(model, role="float model").proto)
    by_label = {g.node_label(i): node for i, node in enumerate(g.nodes)}
    out = []
    missing = [n for n in names if n not in by_label]
    if missing:
        raise UsageError(
            f"--to mnn: {len(missing)} layer(s) of the config are not nodes of the model: {missing[:5]}; pass the "
            "float model the config was made for"
        )
    for n in names:
        node = by_label[n]
        first = node.output[0] if node.output else n
        out.append(f"{first}__matmul_converted" if node.op_type == "Gemm" else first)
    return out
