"""``sensitivity``: which layers *cause* the quantization error, not only where it shows up.

Three measures per layer, and a yardstick:

* **accumulated** error — both models on their own activations (what ``compare`` shows); it grows
  along the graph, so deep layers always look worst.
* **isolated** error — the quantized layer (its input Q/DQ, quantized weights and output
  quantization) fed the *float* model's activations, against the float layer. All layers are
  measured in one streaming pass through one *shadow* model (the float model plus a copy of every
  quantized layer wired to float inputs, :mod:`qdiff.shadow`).
* **fallback gain** — the final-output metric when only this layer is kept in float (all others
  quantized) minus the metric of the quantized model; and ``solo_drop``, the loss when only this
  layer is quantized. Both come from editing the models (never re-running the quantizer).
* **noise ratio** — the isolated MSE over the error uniform rounding alone gives at the layer's
  output scale (step²/12). Near 1: the layer is merely coarse. Far above: clipping, a bad range or
  a kernel problem.

The final-output metric is the mean cosine of the final outputs against the float model's, or a
task metric: ``eval(model_path) -> float`` (higher is better) owning its own data.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pandas as pd

from qdiff import metrics
from qdiff.engine import kernels as _kernels, pipeline
from qdiff.engine.batching import Batcher
from qdiff.engine.folding import RowFolder
from qdiff.engine.loop import load_pair, measure
from qdiff.engine.options import EngineOptions
from qdiff.engine.prefuse import fused_taps_differ, optimized_model, prefuse_pays, prefused_taps
from qdiff.engine.sessions import SessionFactory, SessionOptions, default_session_factory, feed_for, open_session, tap_model
from qdiff.engine.taps import integer_source, integer_tap
from qdiff.errors import EvalError, UsageError
from qdiff.graph import Graph, ModelLike, layer_macs
from qdiff.inputs import DataLike, make_source, parse_input_shapes
from qdiff.matching import match_models, no_weight_values
from qdiff.result import COSINE_THRESHOLD, Result, RunInfo, _records, measured_meta
from qdiff.shadow import build_shadow, keep_float, prune_unread, quantize_only
from qdiff.structs import DequantParams, Region, TensorPair

__all__ = ["sensitivity", "SensitivityResult", "load_eval", "call_eval", "SENSITIVITY_COLUMNS", "RANK_BY"]

log = logging.getLogger(__name__)

SENSITIVITY_COLUMNS = [
    "rank", "layer", "op_type", "order", "params", "accumulated_cosine", "accumulated_sqnr_db",
    "isolated_cosine", "isolated_sqnr_db", "isolated_mse", "noise_floor", "noise_ratio", "gain",
    "keep_float_metric", "solo_drop", "flags", "note",
]  # fmt: skip

#: how each ``by`` ranks: column and whether ascending puts the most sensitive first
RANK_BY = {
    "isolated": ("isolated_cosine", True),
    "gain": ("gain", False),
    "accumulated": ("accumulated_cosine", True),
    "noise": ("noise_ratio", False),
}

#: layers with fewer weight parameters than this are flagged "small"
SMALL_LAYER_PARAMS = 1024

#: edited models run together in one pass over the data
_GROUP = 8

#: layers whose gain is measured by default (the worst by isolated error)
GAIN_TOP = 4

EvalFn = Callable[[str], float]
Progress = Callable[[str, int, "int | None"], None]


@dataclass
class SensitivityResult(Result):
    """Per-layer sensitivity.

    Attributes:
        layers: one row per layer (SENSITIVITY_COLUMNS), sorted by ``rank``.
        meta: what reproduces the run, plus ``by``, ``metric``, ``base_metric``, ``float_metric``.
    """

    layers: pd.DataFrame
    meta: dict[str, Any]

    _renderer = "sensitivity_renderable"

    def top(self, k: int = 5) -> pd.DataFrame:
        return self.layers.head(k)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": _records(self.layers), "meta": self.meta}


def load_eval(spec: str | EvalFn | None) -> EvalFn | None:
    """Resolve ``module:function`` or ``path/to/file.py:function`` to the callable.

    Raises:
        UsageError: the module, file or function cannot be found.
        EvalError: importing the user's module raised (its frames are in ``detail``).
    """
    if spec is None or callable(spec):
        return spec
    target, sep, name = str(spec).rpartition(":")
    if not sep or not target or not name:
        raise UsageError(f"--eval '{spec}' is not MODULE:FUNCTION or FILE.py:FUNCTION")
    try:
        if target.endswith(".py") or os.sep in target:
            path = Path(target)
            if not path.is_file():
                raise UsageError(f"--eval file '{target}' does not exist")
            module_name = f"qdiff_eval_{abs(hash(str(path.resolve())))}"
            loader_spec = importlib.util.spec_from_file_location(module_name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise UsageError(f"--eval file '{target}' cannot be imported as Python")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[module_name] = module
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except UsageError:
        raise
    except ModuleNotFoundError as exc:
        raise UsageError(f"--eval cannot import '{target}': {exc}") from None
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the user's module failed at import
        raise EvalError(
            f"--eval '{spec}': importing '{target}' raised {_exc_text(exc)}; fix the module", _user_frames(exc)
        ) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UsageError(f"--eval: '{target}' has no function '{name}'")
    return fn


def call_eval(fn: EvalFn, path: str, what: str) -> float:
    """``fn(path)`` as a finite float; anything else is an :class:`EvalError` naming ``fn`` and ``what``."""
    label = getattr(fn, "__name__", repr(fn))
    try:
        value = fn(path)
    except KeyboardInterrupt:
        raise
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the user's function failed
        raise EvalError(f"--eval function '{label}' raised {_exc_text(exc)} on {what}", _user_frames(exc)) from None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) and not (
        isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "iuf"
    ):
        raise EvalError(
            f"--eval function '{label}' returned {type(value).__name__} {str(value)[:40]!r} on {what}; "
            "it must return a number, higher is better"
        )
    value = float(value)
    if not math.isfinite(value):
        raise EvalError(f"--eval function '{label}' returned {value} on {what}; it must return a finite number")
    return value


def _exc_text(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"SystemExit({exc.code!r}) (sys.exit)"
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _user_frames(exc: BaseException) -> str:
    """The traceback of ``exc`` without qdiff's and importlib's frames: what the user wrote."""
    import traceback

    here = os.path.dirname(os.path.abspath(__file__))
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__)
        if not os.path.abspath(f.filename).startswith(here) and "importlib" not in f.filename
    ]  # fmt: skip
    if not frames:
        return ""
    return "".join(traceback.format_list(frames))


def sensitivity(
    float_model: ModelLike,
    quant_model: ModelLike,
    data: DataLike = None,
    *,
    by: str = "isolated",
    gain: bool = True,
    eval: str | EvalFn | None = None,  # noqa: A002 - the documented name of the option
    samples: int | None = None,
    batch_size: int = 1,
    seed: int = 0,
    input_shapes: Mapping[str, Any] | list[str] | None = None,
    provider: str = "CPUExecutionProvider",
    session_factory: SessionFactory | None = None,
    tensor_map: Mapping[str, str] | str | None = None,
    gain_top: int | None = GAIN_TOP,
    progress: Progress | None = None,
    engine_options: EngineOptions | None = None,
) -> SensitivityResult:
    """Rank the layers of a quantized model by how much error they cause.

    Args:
        float_model: the reference model (path or ModelProto).
        quant_model: the quantized model.
        data: as for :func:`qdiff.compare`.
        by: ``isolated``, ``gain``, ``accumulated`` or ``noise`` — the ranking column.
        gain: measure fallback gain and solo drop (one edited model pair per layer).
        eval: a task metric, ``function(model_path) -> float`` (higher is better), or its
            ``module:function`` / ``file.py:function`` name; replaces the final-output cosine
            for gain and solo drop.
        gain_top: measure gain and solo drop for this many Conv/ConvTranspose/Gemm/MatMul layers,
            those with the largest isolated error relative to their rounding noise first (None or 0:
            all of them). Each costs two edited models run over the data, so on models of
            hundreds of layers the gain of every layer costs tens of times a compare.
        samples, batch_size, seed, input_shapes, provider, session_factory, tensor_map: as for
            :func:`qdiff.compare`.
        progress: called as ``progress(phase, done, total)``.
        engine_options: the measuring engine's tunables (internal), as for :func:`qdiff.compare`.

    Returns:
        A :class:`SensitivityResult`.
    """
    if by not in RANK_BY:
        raise UsageError(f"--by must be one of {', '.join(RANK_BY)}, got '{by}'")
    if gain_top is not None and gain_top < 0:
        raise UsageError(f"--gain-top must be >= 0 (0: every layer), got {gain_top}")
    if by == "gain" and not gain:
        raise UsageError("ranking by gain needs the gain measurement; drop --no-gain")
    eval_fn = load_eval(eval)
    started = time.perf_counter()
    engine_options = engine_options or EngineOptions()
    f_loaded, q_loaded, fg, qg, f_specs, session_factory, options = load_pair(
        float_model, quant_model, provider, session_factory, engine_options
    )
    shapes = parse_input_shapes(input_shapes)
    f_loaded, fg = _same_opset(f_loaded, fg, q_loaded)

    def source():
        return make_source(data, f_specs, samples=samples, batch_size=batch_size, seed=seed, input_shapes=shapes)

    first_source = source()
    # onnxruntime's fused graph of the quantized model, made while the graphs are matched and the
    # shadow is built (see below)
    q_optimized = None
    if prefuse_pays(first_source.count, layer_macs(fg), engine_options):
        q_optimized = pipeline.in_background(optimized_model, q_loaded.proto, session_factory, engine_options)
    if isinstance(tensor_map, (str, os.PathLike)):
        from qdiff.matching import load_tensor_map

        tensor_map = load_tensor_map(tensor_map)
    matching = match_models(fg, qg, tensor_map, weigh=no_weight_values)  # weight values: not needed here
    pairs = [p for p in matching.pairs if p.kind.value != "input"]
    regions = list(matching.regions)
    outputs = list(matching.outputs)

    shadow, iso_taps = build_shadow(f_loaded.proto, q_loaded.proto, regions)
    # integer taps where a DequantizeLinear only dequantizes a QuantizeLinear output: a quarter of
    # the bytes, and the kernels bin 8-bit codes cheaply
    tapped = {p.layer: integer_tap(p, qg) for p in pairs}
    sg = Graph(shadow)
    iso_int = {r.layer: integer_source(sg, iso_taps[r.layer]) for r in regions if r.output_dequant is None}
    iso_read = {r.layer: (iso_int[r.layer][0] if iso_int.get(r.layer) else iso_taps[r.layer]) for r in regions}
    f_names = list(
        dict.fromkeys([p.float_tensor for p in pairs] + [o.float_tensor for o in outputs] + [r.float_output for r in regions])
    )
    # build_shadow made every isolated output a graph output; those read as integers (above) are
    # dropped again with their DequantizeLinear, which onnxruntime would run all the same (a
    # noticeable share of the fused shadow's kernel time, see bench/RESULTS.md)
    read_as_int = {iso_taps[r.layer] for r in regions if iso_int.get(r.layer)}
    read_as_int -= {o.name for o in f_loaded.proto.graph.output}
    kept_outputs = [o for o in shadow.graph.output if o.name not in read_as_int]
    del shadow.graph.output[:]
    shadow.graph.output.extend(kept_outputs)
    # what each model is read for, keyed 0..n (the form prefused_taps takes): the shadow's
    # float tensors and isolated outputs, the quantized model's layers
    s_keys = [("float", t) for t in f_names] + [("isolated", r.layer) for r in regions]
    s_plain: dict[int, TensorPair] = {}
    region_of = {r.layer: r for r in regions}
    for i, (kind, name) in enumerate(s_keys):
        if kind == "float":
            s_plain[i] = TensorPair(layer=name, op_type="", float_tensor=name, quant_tensor=name)
        else:
            r = region_of[name]
            dq = r.output_dequant or (iso_int[name][1] if iso_int.get(name) else None)
            s_plain[i] = TensorPair(layer=name, op_type="", float_tensor=r.float_output, quant_tensor=iso_read[name], dequant=dq)
    s_index = {key: i for i, key in enumerate(s_keys)}
    q_plain = {i: tapped[p.layer] for i, p in enumerate(pairs)}
    q_outputs = [o.quant_tensor for o in outputs]
    # runs batched where that changes nothing (see qdiff.engine.batching); samples buffered per layer
    # (up to EngineOptions.isolated_rows_buffer_bytes each) and reduced many at a time
    per_run = _per_run_bytes(fg, pairs, outputs, regions, tapped, iso_int)
    # both models tapped in onnxruntime's fused graphs where that gives the same values (see
    # qdiff.engine.prefuse: tapping a QuantizeLinear output stops the fusion of the quantized layers
    # around it, which would then run in float); checked on the first run, else tapped as given
    fused: list = [None, None]
    if q_optimized is not None:  # the shadow's fused graph first: the quantized model's is being made meanwhile
        fused[0] = prefused_taps(shadow, s_plain, sg, None, session_factory, engine_options)
        q_opt = q_optimized.result()
        fused[1] = prefused_taps(q_loaded.proto, q_plain, qg, q_opt) if q_opt is not None else None
    # the DequantizeLinear nodes nothing reads any more go (in the fused shadow only after
    # onnxruntime fused it: a QuantizeLinear nothing reads would not be fused)
    if fused[0] is not None:
        prune_unread(fused[0][0], set(f_names) | {t.quant_tensor for t in fused[0][1].values()})
    prune_unread(shadow, set(f_names) | set(iso_read.values()))
    plain = [(shadow, s_plain), (q_loaded.proto, q_plain)]
    taps: list[dict[int, TensorPair]] = [s_plain, q_plain]
    names: list[list[str]] = [[], []]

    def open_batcher() -> Batcher:
        for m in (0, 1):
            taps[m] = fused[m][1] if fused[m] is not None else plain[m][1]
            names[m] = list(dict.fromkeys([t.quant_tensor for t in taps[m].values()] + (q_outputs if m else [])))
        models = [fused[m][0] if fused[m] is not None else plain[m][0] for m in (0, 1)]
        return Batcher(
            session_factory,
            [(models[0], names[0], f"shadow of {f_loaded.label}"), (models[1], names[1], q_loaded.label)],
            per_run,
            total=first_source.count,
            options=engine_options,
        )

    batcher = open_batcher()
    compiled = _kernels.available()

    class Folds:
        """One worker's accumulators (merged exactly at the end, see qdiff.engine.loop)."""

        def __init__(self, kernel_threads: int | None = None):
            # the table reports no KL: the kernels skip the histograms (most of their time)
            self.acc = {p.layer: metrics.TensorAccumulator(kl=False) for p in pairs}
            self.iso = {r.layer: metrics.TensorAccumulator(kl=False) for r in regions}
            self.folder = RowFolder(
                compiled, max_bytes=engine_options.isolated_rows_buffer_bytes, immediate_elements=None,
                threads=kernel_threads, kl=False, options=engine_options,
            )  # fmt: skip

        def fold(self, s_vals: dict, q_vals: dict, runs: int) -> None:
            s_taps, q_taps = taps
            for i, p in enumerate(pairs):
                t = q_taps[i]
                ref = s_vals[s_taps[s_index["float", p.float_tensor]].quant_tensor]
                got = rows(ref, q_vals[t.quant_tensor], t.dequant, runs)
                if got is not None:
                    self.folder.add(("accumulated", p.layer), self.acc[p.layer], *got)
            for r in regions:
                t = s_taps[s_index["isolated", r.layer]]
                ref = s_vals[s_taps[s_index["float", r.float_output]].quant_tensor]
                got = rows(ref, s_vals[t.quant_tensor], t.dequant, runs)
                if got is not None:
                    self.folder.add(("isolated", r.layer), self.iso[r.layer], *got)
            self.folder.run()

        def flush(self) -> None:
            self.folder.flush()

        def merge(self, other: Folds) -> Folds:
            self.acc = {k: a.merge(other.acc[k]) for k, a in self.acc.items()}
            self.iso = {k: a.merge(other.iso[k]) for k, a in self.iso.items()}
            return self

    def rows(ref, raw, dq: DequantParams | None, runs: int):
        ref, raw = np.asarray(ref), np.asarray(raw)
        if ref.size != raw.size:
            return None
        if dq is not None and raw.dtype.kind in "iu" and (dq.per_channel or not compiled):
            raw, dq = dq.dequantize(raw), None  # per-channel: in the tensor's own layout
        return ref.reshape(runs, -1), raw.reshape(runs, -1), dq if raw.dtype.kind in "iu" else None

    def run_group(group: list, first: bool, folds: Folds) -> None:
        for (s_vals, q_vals), runs, _ in batcher.parts(group, first, names):
            folds.fold(s_vals, q_vals, runs)

    done = 0

    def report(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress("isolated", done, first_source.count)

    fused_notes: list[str] = []

    def run_first(group: list, folds: Folds) -> None:
        """The fused graphs are checked on the first run (else the models are tapped as given),
        then the first group settles batching."""
        nonlocal batcher
        if any(f is not None for f in fused):
            refused = False
            run0 = group[0]
            for m, what in ((0, "shadow model"), (1, "quantized model")):
                if fused[m] is None:
                    continue

                def fetch(wanted: list[str], m: int = m) -> dict:
                    return batcher.fetch(run0, [wanted, []] if m == 0 else [[], wanted])[m]

                why = fused_taps_differ(session_factory, plain[m][0], plain[m][1], fused[m][1], run0, fetch)
                if why is None:
                    moved = sum(1 for k, t in fused[m][1].items() if t is not plain[m][1][k])
                    fused_notes.append(
                        f"{what} tapped in onnxruntime's fused graph ({moved} tensor(s) read from fused QLinear* "
                        "nodes, checked against the unfused taps on the first run)"
                    )
                else:
                    fused_notes.append(f"{what}: onnxruntime's fused graph not tapped: {why}")
                    fused[m], refused = None, True
            if refused:
                batcher.close()
                batcher = open_batcher()
        run_group(group, True, folds)

    # the first group settles batching and the fused graphs alone; the others go to the
    # pipeline's workers, each running both models on a group and reducing it into its own
    # accumulators (qdiff.engine.loop)
    merged, _ = measure(
        first_source, lambda: batcher.runs_per_group, run_first, lambda group, folds: run_group(group, False, folds),
        lambda threads: Folds(kernel_threads=threads),
        lambda: pipeline.workers(weight_bytes=pipeline.weight_bytes(f_loaded, q_loaded), options=engine_options),
        report,
    )  # fmt: skip
    acc, iso = merged.acc, merged.iso
    notes = list(batcher.notes) + fused_notes
    batcher = None  # the sessions go before the edited models load
    if first_source.batches == 0:
        from qdiff.errors import DataError

        raise DataError(f"{first_source.description} produced no samples; nothing was measured")

    gains: dict[str, tuple[float | None, float | None]] = {}
    metric_meta: dict[str, Any] = {}
    # gain is measured for the layers a config can usefully switch: those computing with a Conv,
    # ConvTranspose, Gemm or MatMul (a Reshape or a weight-less Add is never a fallback candidate
    # on its own, see qdiff.units); one edited model pair per layer is the expensive part
    gain_regions = [r for r in regions if _computes(r)]
    gain_skipped: set[str] = set()
    if gain_top and len(gain_regions) > gain_top:
        # the layers whose isolated error stands out most: isolated error over rounding noise
        # (noise ratio) where the output is quantized, else the isolated SQNR
        def worst(r: Region) -> tuple:
            res = iso[r.layer].result() if r.layer in iso else None
            if res is None or res.mse is None:
                return (1, 0.0)
            floor = r.step**2 / 12 if r.step else None
            sqnr = res.sqnr_db if res.sqnr_db is not None else 200.0
            return (0, -(res.mse / floor) if floor else 0.0, sqnr)

        ranked = sorted(gain_regions, key=worst)
        gain_skipped = {r.layer for r in ranked[gain_top:]}
        gain_regions = [r for r in gain_regions if r.layer not in gain_skipped]
    if gain and gain_regions:
        if eval_fn is not None:
            gains, metric_meta = _gains_eval(f_loaded.proto, q_loaded.proto, gain_regions, eval_fn, progress)
        else:
            gains, metric_meta = _gains_cosine(
                f_loaded.proto, q_loaded.proto, gain_regions, outputs, session_factory, source, progress, engine_options
            )

    layers = _table(pairs, regions, acc, iso, gains, by, metric_meta.get("keep_float_metric", {}), gain_skipped)
    meta = _meta(f_loaded, q_loaded, options, first_source, seed, batch_size, notes, time.perf_counter() - started, matching)
    meta.update({"by": by, "cosine_threshold": COSINE_THRESHOLD, "small_layer_params": SMALL_LAYER_PARAMS})
    meta.update(metric_meta)
    meta["unmeasured"] = [p.layer for p in pairs if p.layer not in iso]
    meta["gain_top"] = gain_top
    meta["gain_layers"] = len(gains)
    return SensitivityResult(layers, meta)


def _meta(f_loaded, q_loaded, options: SessionOptions, source, seed: int, batch_size: int, notes, seconds: float, matching):
    """:func:`~qdiff.result.measured_meta` of the isolated pass (no deployed-model check, no inference time)."""
    run = RunInfo.collect(f_loaded, q_loaded, source, seed)
    return measured_meta(run, options.to_dict(), source.batches, batch_size, notes, len(matching.pairs), seconds)


def _computes(region: Region) -> bool:
    """Does the layer compute with a Conv, ConvTranspose, Gemm or MatMul (a fallback candidate)?"""
    from qdiff.ops import COMPUTE_OPS

    return any(n.op_type in COMPUTE_OPS for n in region.float_nodes)


def _same_opset(f_loaded, fg: Graph, q_loaded):
    """The float model at the quantized model's opset where that is higher.

    The shadow and the edited models mix float and quantized nodes in one graph, which then has
    one opset: qdiff's quantizer raises opset 11/12 models to 13 (per-channel DequantizeLinear
    needs it), and an opset-12 node (Squeeze with an ``axes`` attribute) is invalid at 13.
    """
    from dataclasses import replace

    from qdiff.graph import default_opset, with_opset

    want = default_opset(q_loaded.proto)
    have = default_opset(f_loaded.proto)
    if want is None or have is None or have >= want:
        return f_loaded, fg
    converted = with_opset(f_loaded.proto, want)
    if converted is None:
        log.info("float model kept at opset %s (conversion to %s failed)", have, want)
        return f_loaded, fg
    return replace(f_loaded, proto=converted), Graph(converted)


class _Edited:
    """An edited model run as the part downstream of the edit, fed the base model's activations.

    The nodes an edit added (names starting with ``marker``) and everything that reads their
    results, transitively, form the *suffix*; whatever else the suffix reads is identical to the
    base model and is taken from the base model's run of the same sample. Outputs the edit cannot
    reach are the base model's. When the suffix cannot be cut out (a tensor of unknown type, a
    control-flow node), the whole edited model runs.
    """

    def __init__(
        self, model: onnx.ModelProto, marker: str, outputs: list[str], factory: SessionFactory, label: str,
        types: Callable[[str], int | None] | None = None,
    ):  # fmt: skip
        self.outputs = outputs
        cut = _suffix(model, marker, outputs, types)
        if cut is None:
            self.sub, self.inputs, self.produced = model, [], set(outputs)
            self.whole = True
        else:
            self.sub, self.inputs, self.produced = cut
            self.whole = False
        self.sess, _ = open_session(factory, self.sub, label)
        self.run_outputs = [o for o in outputs if o in self.produced]

    def run(self, batch: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        if self.whole:
            return self.sess.run(self.outputs, feed_for(self.sess, batch))
        feed = {name: (batch[name] if name in batch else base[name]) for name in self.inputs}
        vals = dict(zip(self.run_outputs, self.sess.run(self.run_outputs, feed_for(self.sess, feed)) if self.run_outputs else []))
        return [vals[o] if o in vals else base[o] for o in self.outputs]


def _suffix(model: onnx.ModelProto, marker: str, outputs: list[str], types: Callable[[str], int | None] | None = None):
    """(sub-model, its inputs, tensors it produces) for the part of ``model`` downstream of ``marker`` nodes."""
    from onnx import helper

    g = model.graph
    produced: set[str] = set()
    nodes = []
    for n in g.node:
        if n.name.startswith(marker) or any(i in produced for i in n.input if i):
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
                return None
            nodes.append(n)
            produced.update(o for o in n.output if o)
    if not nodes:
        return None
    inits = {t.name: t for t in g.initializer}
    needed = list(dict.fromkeys(i for n in nodes for i in n.input if i and i not in produced and i not in inits))
    # the suffix reads tensors of the base model: their types come from its view (``types``,
    # built once for all edits) before a view of the edited model is built (shape inference
    # over the whole model, a large part of the gain phase's set-up on big models)
    view = None
    inputs = []
    for name in needed:
        et = types(name) if types is not None else None
        if et is None:
            view = view or Graph(model)
            et = view.elem_type(name)
        if et is None:
            return None
        inputs.append(helper.make_tensor_value_info(name, et, None))
    outs = [o for o in outputs if o in produced]
    sub = helper.make_graph(
        nodes, "qdiff_suffix", inputs, [onnx.ValueInfoProto(name=o) for o in outs],
        [inits[i] for i in dict.fromkeys(i for n in nodes for i in n.input if i in inits)],
    )  # fmt: skip
    m = helper.make_model(sub, opset_imports=list(model.opset_import))
    m.ir_version = model.ir_version
    return m, needed, produced


def _gains_cosine(
    fp: onnx.ModelProto,
    qp: onnx.ModelProto,
    regions: list[Region],
    outputs: list,
    factory: SessionFactory,
    source: Callable[[], Any],
    progress: Progress | None,
    options: EngineOptions | None = None,
) -> tuple[dict[str, tuple[float | None, float | None]], dict[str, Any]]:
    """Mean final-output cosine of each edited model, in groups run together over the data.

    Each edited model runs only downstream of its edit (:class:`_Edited`), fed from one tapped
    run of the base quantized / float model per sample.
    """
    names_f = [o.float_tensor for o in outputs]
    names_q = [o.quant_tensor for o in outputs]
    base = [metrics.TensorAccumulator() for _ in outputs]
    keep: dict[str, list[metrics.TensorAccumulator]] = {}
    solo: dict[str, list[metrics.TensorAccumulator]] = {}
    failed: dict[str, str] = {}
    n_threads = pipeline.workers(options=options)
    pool = ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="qdiff-gain") if n_threads > 1 else None
    try:
        return _gains_cosine_groups(fp, qp, regions, outputs, factory, source, progress, pool, names_f, names_q, base, keep, solo, failed)
    finally:
        if pool is not None:
            pool.shutdown()


def _gains_cosine_groups(fp, qp, regions, outputs, factory, source, progress, pool, names_f, names_q, base, keep, solo, failed):
    q_types, f_types = Graph(qp).elem_type, Graph(fp).elem_type
    whole = 0
    total = len(regions)
    done = 0
    for start in range(0, total, _GROUP):
        group = regions[start : start + _GROUP]
        edited = []
        for r in group:
            try:
                ks = _Edited(keep_float(qp, fp, r), "qdiff_", names_q, factory, f"{r.layer} kept in float", q_types)
                ss = _Edited(quantize_only(fp, qp, r), "qdiff_", names_f, factory, f"{r.layer} quantized alone", f_types)
            except Exception as exc:  # an edit onnxruntime rejects: report it for that layer
                failed[r.layer] = f"edited model did not load: {str(exc).splitlines()[0][:200]}"
                continue
            whole += ks.whole + ss.whole
            edited.append((r, ks, ss))
            keep[r.layer] = [metrics.TensorAccumulator() for _ in outputs]
            solo[r.layer] = [metrics.TensorAccumulator() for _ in outputs]
        q_taps = list(dict.fromkeys(names_q + [i for _, ks, _ in edited for i in ks.inputs]))
        f_taps = list(dict.fromkeys(names_f + [i for _, _, ss in edited for i in ss.inputs]))
        q_sess, _ = open_session(factory, tap_model(qp, q_taps), "quantized model")
        f_sess, _ = open_session(factory, tap_model(fp, f_taps), "float model")
        jobs = [(r.layer, ks, keep, True) for r, ks, _ in edited] + [(r.layer, ss, solo, False) for r, _, ss in edited]
        for batch in source():
            _gain_step(batch, f_sess, q_sess, f_taps, q_taps, names_f, names_q, start, base, jobs, pool)
        done += len(group)
        if progress is not None:
            progress("gain", done, total)
    base_metric = _mean_cosine(base)
    out: dict[str, tuple[float | None, float | None]] = {}
    for r in regions:
        if r.layer in failed:
            out[r.layer] = (None, None)
            continue
        k, s = _mean_cosine(keep[r.layer]), _mean_cosine(solo[r.layer])
        out[r.layer] = (
            None if k is None or base_metric is None else k - base_metric,
            None if s is None else 1.0 - s,
        )
    keep_metric = {r.layer: _mean_cosine(keep[r.layer]) for r in regions if r.layer in keep}
    return out, {
        "metric": "final-output cosine",
        "base_metric": base_metric,
        "float_metric": 1.0,
        "keep_float_metric": keep_metric,
        "gain_failures": failed,
        "gain_whole_model_runs": whole,
    }


def _gain_step(batch, f_sess, q_sess, f_taps, q_taps, names_f, names_q, start, base, jobs, pool) -> None:
    """One run of the base models and of every edited model on one sample, folded."""
    f_base = dict(zip(f_taps, f_sess.run(f_taps, feed_for(f_sess, batch))))
    q_base = dict(zip(q_taps, q_sess.run(q_taps, feed_for(q_sess, batch))))
    ref = [f_base[name] for name in names_f]
    if start == 0:
        for k, name in enumerate(names_q):
            base[k].update(ref[k], q_base[name])

    def run(job) -> None:
        layer, model, accs, on_quant = job  # each job's accumulators are its own: no lock
        for k, v in enumerate(model.run(batch, q_base if on_quant else f_base)):
            accs[layer][k].update(ref[k], v)

    # the edited models are independent: one worker thread per core (onnxruntime releases the
    # GIL), as compare's workers run whole samples through single-threaded sessions
    if pool is None:
        for job in jobs:
            run(job)
    else:
        list(pool.map(run, jobs))


def _per_run_bytes(fg, pairs, outputs, regions, tapped, iso_int) -> int | None:
    """Static estimate of the bytes one run's taps take (shadow + quantized model), None if unknown."""
    total = 0
    items = [(p.float_tensor, tapped[p.layer].dequant is not None) for p in pairs]
    items += [(o.float_tensor, False) for o in outputs]
    items += [(r.float_output, bool(iso_int.get(r.layer)) or r.output_dequant is not None) for r in regions]
    for name, integer in items:
        elements = fg.elements(name)
        if elements is None:
            return None
        # the float side, and the other side as int8 where it is read as integers
        total += (4 + (1 if integer else 4)) * elements
    return total


def _mean_cosine(accs: list[metrics.TensorAccumulator]) -> float | None:
    vals = [a.result().cosine for a in accs]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def _gains_eval(
    fp: onnx.ModelProto, qp: onnx.ModelProto, regions: list[Region], eval_fn: EvalFn, progress: Progress | None
) -> tuple[dict[str, tuple[float | None, float | None]], dict[str, Any]]:
    """Task metric of each edited model: the user's function is called with a model path.

    Every edited model is loaded by onnxruntime before the user's function sees it: one that does
    not load is a failure of that layer's gain (``gain_failures``), not of the user's function.
    """
    out: dict[str, tuple[float | None, float | None]] = {}
    keep_metric: dict[str, float] = {}
    failed: dict[str, str] = {}
    # does onnxruntime load it (on the CPU, unoptimised: a load check, not a run)
    loads = default_session_factory(SessionOptions(graph_optimization="ORT_DISABLE_ALL"))
    with tempfile.TemporaryDirectory(prefix="qdiff-eval-") as tmp:

        def score(model: onnx.ModelProto, name: str) -> float:
            path = os.path.join(tmp, f"{name}.onnx")
            onnx.save(model, path)
            return call_eval(eval_fn, path, f"the {name.replace('_', ' ')} model")

        float_metric = score(fp, "float")
        base_metric = score(qp, "quantized")
        for k, r in enumerate(regions):
            try:
                edited = [keep_float(qp, fp, r), quantize_only(fp, qp, r)]
                for m in edited:
                    loads(m)
            except Exception as exc:  # noqa: BLE001 - an edit onnxruntime rejects: that layer has no gain
                failed[r.layer] = f"edited model did not load: {str(exc).strip().splitlines()[0][:200]}"
                out[r.layer] = (None, None)
                continue
            kept = score(edited[0], f"keep_float_{k}")
            alone = score(edited[1], f"quantize_only_{k}")
            keep_metric[r.layer] = kept
            out[r.layer] = (kept - base_metric, float_metric - alone)
            if progress is not None:
                progress("gain", k + 1, len(regions))
    return out, {
        "metric": getattr(eval_fn, "__name__", "eval"),
        "base_metric": base_metric,
        "float_metric": float_metric,
        "keep_float_metric": keep_metric,
        "gain_failures": failed,
    }


def _table(pairs, regions, acc, iso, gains, by, keep_metric, gain_skipped=frozenset()) -> pd.DataFrame:
    by_layer = {r.layer: r for r in regions}
    compute = [p for p in pairs if p.layer in by_layer and by_layer[p.layer].params > 0]
    first = compute[0].layer if compute else None
    last = compute[-1].layer if compute else None
    rows = []
    for p in pairs:
        a = acc[p.layer].result()
        r = by_layer.get(p.layer)
        i = iso[p.layer].result() if p.layer in iso else None
        floor = r.step**2 / 12 if r is not None and r.step else None
        iso_mse = i.mse if i is not None else None
        g = gains.get(p.layer, (None, None))
        flags = []
        worst_cos = min(x for x in (a.cosine, i.cosine if i else None, 1.0) if x is not None)
        if worst_cos < COSINE_THRESHOLD:
            flags.append(f"cos<{COSINE_THRESHOLD}")
        if p.layer == first:
            flags.append("first")
        if p.layer == last:
            flags.append("last")
        if r is not None and 0 < r.params < SMALL_LAYER_PARAMS:
            flags.append("small")
        note = ""
        if r is None:
            note = "no isolated measurement (layer region not separable)"
        elif p.layer in gain_skipped:
            note = "no gain measured: isolated error below the worst --gain-top layers"
        elif gains and p.layer not in gains:
            note = "no gain measured: not a Conv/Gemm/MatMul layer (never a fallback candidate on its own)"
        rows.append(
            {
                "rank": 0,
                "layer": p.layer,
                "op_type": p.op_type,
                "order": p.order,
                "params": r.params if r is not None else None,
                "accumulated_cosine": a.cosine,
                "accumulated_sqnr_db": a.sqnr_db,
                "isolated_cosine": i.cosine if i else None,
                "isolated_sqnr_db": i.sqnr_db if i else None,
                "isolated_mse": iso_mse,
                "noise_floor": floor,
                "noise_ratio": (iso_mse / floor) if floor and iso_mse is not None else None,
                "gain": g[0],
                "keep_float_metric": keep_metric.get(p.layer),
                "solo_drop": g[1],
                "flags": ",".join(flags),
                "note": note,
            }
        )
    df = pd.DataFrame(rows, columns=SENSITIVITY_COLUMNS)
    for col in SENSITIVITY_COLUMNS:
        if col not in ("layer", "op_type", "flags", "note", "rank", "order", "params"):
            df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    col, ascending = RANK_BY[by]
    df = df.sort_values([col, "order"], ascending=[ascending, True], na_position="last", kind="stable")
    df["rank"] = range(1, len(df) + 1)
    return df.reset_index(drop=True)
