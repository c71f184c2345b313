"""Tapping onnxruntime's fused graph of a quantized model instead of the model as given.

Tapping a QuantizeLinear output stops onnxruntime fusing the DQ -> Conv -> Q group that reads it
(the tapped model would run its convolutions in float). Where it pays (:func:`prefuse_pays`), the
quantized model is optimised once by onnxruntime (:func:`optimized_model`), the taps are found in
the fused graph (:func:`prefused_taps`), and checked on the first run against the unfused taps
(:func:`fused_taps_differ`).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from concurrent.futures import Future

import numpy as np
import onnx
from onnx import numpy_helper

from qdiff.engine import pipeline
from qdiff.engine.batching import with_batch_axis
from qdiff.engine.options import EngineOptions
from qdiff.engine.sessions import SessionFactory, feed_for, open_session, optimized_model_file, tap_model
from qdiff.engine.taps import real_values
from qdiff.graph import Graph, external_dir, initializer_bytes
from qdiff.ops import INTEGER_PASS, QLINEAR_OUTPUT
from qdiff.structs import DequantParams

__all__ = ["fused_taps_differ", "optimized_model", "prefuse_pays", "prefused_taps", "unfused_session"]


def prefuse_pays(runs: int | None, macs_per_run: int | None = None, options: EngineOptions | None = None) -> bool:
    """Is tapping onnxruntime's fused graph worth its fixed cost for ``runs`` runs of a model doing
    ``macs_per_run`` multiply-accumulates in its Conv/MatMul/Gemm layers (None: unknown)?

    The optimisation and the check on the first run cost about two session builds per model
    (fixed) and save what the fused integer kernels save, which scales with the layers' work:
    worth it from ``options.prefuse_min_macs`` multiply-accumulates over all runs (figures in
    bench/RESULTS.md)."""
    if runs is None or macs_per_run is None:
        return True
    return runs * macs_per_run >= (options or EngineOptions()).prefuse_min_macs

def optimized_model(
    q_proto: onnx.ModelProto, factory: SessionFactory | None = None, options: EngineOptions | None = None
) -> onnx.ModelProto | None:
    """onnxruntime's fused version of ``q_proto`` (batch axis symbolic, ``ORT_ENABLE_EXTENDED``,
    saved and reloaded, built as ``factory`` builds sessions: :func:`optimized_model_file`); None
    for a model that keeps its weights on disk or is above ``options.prefuse_max_bytes``, or when
    onnxruntime fails."""
    # big models: optimising, saving, reloading and checking a second copy costs more than the
    # fused taps save
    options = options or EngineOptions()
    if external_dir(q_proto) is not None or initializer_bytes(q_proto) > options.prefuse_max_bytes:
        return None
    try:
        with tempfile.TemporaryDirectory(prefix="qdiff-fused-") as tmp:
            path = os.path.join(tmp, "fused.onnx")
            optimized_model_file(factory, with_batch_axis(q_proto), path, "ORT_ENABLE_EXTENDED")
            return onnx.load(path)
    except Exception:  # noqa: BLE001 - optimisation is an optimisation: tap the model as given
        return None


def prefused_taps(
    q_proto: onnx.ModelProto, taps: dict, qg: Graph, optimized: onnx.ModelProto | None = None,
    factory: SessionFactory | None = None, options: EngineOptions | None = None,
) -> tuple[onnx.ModelProto, dict] | None:
    """onnxruntime's own fused version of the quantized model, and each tap's tensor in it.

    Tapping a QuantizeLinear output stops onnxruntime fusing the DQ -> Conv -> Q group that reads
    it, so the tapped model would run its convolutions in float. Instead the model (batch axis
    symbolic) is optimized once by onnxruntime (``ORT_ENABLE_EXTENDED``, saved), and the taps are
    found in that graph: a tensor kept under its name, a QuantizeLinear kept under its node name,
    or the fused ``QLinear*`` node named after the original target (through a Relu/Clip), read
    with that node's output scale and zero point (onnxruntime turns int8 into uint8 with the
    zero point shifted by 128). None where any tap cannot be found, none is read from a fused
    node, or :func:`optimized_model` gives none; the caller then taps the model as given.
    ``optimized``: :func:`optimized_model`'s result where the caller has it already (else made
    here with ``factory`` and ``options``).
    """
    opt = optimized if optimized is not None else optimized_model(q_proto, factory, options)
    if opt is None:
        return None
    produced = {o for n in opt.graph.node for o in n.output} | {i.name for i in opt.graph.input}
    producer = {o: n for n in opt.graph.node for o in n.output}
    by_name = {n.name: n for n in opt.graph.node if n.name}
    consts = {t.name: t for t in opt.graph.initializer}

    def value(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(consts[name]) if name in consts else None

    def params(node: onnx.NodeProto, depth: int = 0) -> tuple[str, str] | None:
        """Names of the scale and zero point of ``node``'s (integer) output."""
        if node.op_type == "QuantizeLinear" and len(node.input) >= 3:
            return node.input[1], node.input[2]
        if node.op_type in QLINEAR_OUTPUT:
            i, j = QLINEAR_OUTPUT[node.op_type]
            return node.input[i], node.input[j]
        # ops onnxruntime runs on the integers as they are (their Q/DQ dropped): input's params
        if node.op_type in INTEGER_PASS and node.input and node.input[0] in producer and depth < 64:
            return params(producer[node.input[0]], depth + 1)
        return None

    out = {}
    for key, tap in taps.items():
        t = tap.quant_tensor
        if t in produced:
            out[key] = tap
            continue
        if key < 0 or tap.dequant is None or t not in qg.producer:
            return None
        qnode = qg.nodes[qg.producer[t]]
        fused = by_name.get(qnode.name)
        if fused is None or fused.op_type != "QuantizeLinear":
            src = qg.nodes[qg.producer[qnode.input[0]]] if qnode.input[0] in qg.producer else None
            while src is not None and src.op_type in ("Relu", "Clip") and src.input[0] in qg.producer:
                src = qg.nodes[qg.producer[src.input[0]]]
            fused = by_name.get(src.name) if src is not None and src.name else None
        names = params(fused) if fused is not None else None
        if names is None:
            return None
        scale, zp = value(names[0]), value(names[1])
        if scale is None or zp is None or scale.size != 1 or zp.size != 1 or scale.dtype != np.float32:
            return None
        out[key] = dataclasses.replace(tap, quant_tensor=fused.output[0], dequant=DequantParams(scale, zp, 1))
    if all(out[key] is tap for key, tap in taps.items()):
        return None  # nothing is read from a fused node: the model as given fuses the same
    opt.ir_version = min(opt.ir_version, q_proto.ir_version) or q_proto.ir_version
    return opt, out

def unfused_session(factory, model: onnx.ModelProto, taps: dict) -> Future:
    """The session :func:`fused_taps_differ` checks against (``model`` with ``taps`` tapped),
    opened on a background thread while the caller opens its own."""
    names = list(dict.fromkeys(t.quant_tensor for t in taps.values()))
    return pipeline.in_background(open_session, factory, tap_model(model, names), "unfused check")

def fused_taps_differ(
    factory, model: onnx.ModelProto, taps: dict, fused_taps: dict, run, fetch_fused, session: Future | None = None
) -> str | None:
    """Why the taps of onnxruntime's fused graph (:func:`prefused_taps`) cannot stand for ``taps`` of
    ``model``, found by running both on one run; None when every tap agrees (1e-2 relative L2,
    the fused kernels round differently). ``fetch_fused(names)`` returns the fused graph's tensors;
    ``session``: :func:`unfused_session`'s future where the caller started it."""
    names = list(dict.fromkeys(t.quant_tensor for t in taps.values()))
    try:
        if session is None:
            session = unfused_session(factory, model, taps)
        sess, _ = session.result()
        want = dict(zip(names, sess.run(names, feed_for(sess, run))))
        got_names = list(dict.fromkeys(fused_taps[k].quant_tensor for k in taps))
        got = fetch_fused(got_names)
    except Exception as exc:  # noqa: BLE001 - any failure: tap the model as given
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    for key, tap in taps.items():
        a = real_values(want[tap.quant_tensor], tap).astype(np.float64).ravel()
        b = real_values(got[fused_taps[key].quant_tensor], fused_taps[key]).astype(np.float64).ravel()
        if a.shape != b.shape:
            return f"tensor for '{fused_taps[key].layer}' has another shape"
        ok = np.isfinite(a) & np.isfinite(b)
        if np.linalg.norm(a[ok] - b[ok]) > 1e-2 * np.linalg.norm(a[ok]) + 1e-9:
            return f"values of '{fused_taps[key].layer}' differ from the unfused model's"
    return None
