"""The fused engine: both models and every metric reduction in one onnxruntime graph (onnx only).

Instead of copying every tapped tensor of both models out of onnxruntime and reducing it in
numpy, the two graphs are merged into one model (names prefixed ``f/`` and ``q/``, the inputs
shared, cast where the quantized model takes FP16) and, for each tensor pair, nodes computing
the per-sample sums the metrics need are appended::

    f/T ─Cast(double)─┐                                  ┌─> [size, size_cand, finite, nan/inf counts,
                      ├─ mask non-finite ─ reductions ───┤     Σr², Σc², Σrc, Σ(r-c)², Σ|r-c|, max|r-c|,
    q/T ─(DQ)─Cast────┘                                  └─>   lo, hi, histogram(r), histogram(c)]

One graph output per pair holds that vector; :func:`qdiff.metrics.sample_metrics_from_sums`
turns it into the same :class:`~qdiff.metrics.SampleMetrics` the numpy path computes. The
tensors never leave onnxruntime, the reductions run in its threads, and only a few hundred
numbers per pair and sample come back.

:func:`build_fused` raises :class:`FusedUnavailable` (with the reason) when a model cannot be
merged: different default-domain opsets that onnx's version converter cannot reconcile, or
control-flow subgraphs; the caller then uses the numpy path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qdiff.metrics import KL_BINS, SUMS_FIELDS, looks_like_class_scores
from qdiff.structs import TensorPair

__all__ = ["build_fused", "FusedModel", "FusedUnavailable", "SUMS_LENGTH"]

SUMS_LENGTH = len(SUMS_FIELDS) + 2 * KL_BINS
_MIN_OPSET = 16  # ScatterElements with reduction="add" (the histograms)


class FusedUnavailable(Exception):
    """The two models cannot be merged into one graph; the message says why."""


@dataclass(frozen=True)
class FusedModel:
    """The merged model and where each pair's sums come out.

    Attributes:
        model: the merged ModelProto.
        outputs: graph output name per pair (same order as the pairs given).
        top1: graph output name per output pair (``[rows, agree]``), or None where the output
            does not look like class scores.
    """

    model: onnx.ModelProto
    outputs: tuple[str, ...]
    top1: tuple[str | None, ...]


def _default_opset(m: onnx.ModelProto) -> int:
    for o in m.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 1


def _upgrade(m: onnx.ModelProto, version: int) -> onnx.ModelProto:
    if _default_opset(m) >= version:
        return m
    try:
        from onnx import version_converter

        return version_converter.convert_version(m, version)
    except Exception as exc:  # noqa: BLE001 - the converter raises many kinds
        raise FusedUnavailable(f"cannot convert the model to opset {version}: {str(exc).splitlines()[0][:200]}") from None


def build_fused(
    float_model: onnx.ModelProto,
    quant_model: onnx.ModelProto,
    pairs: Sequence[TensorPair],
    outputs: Sequence[TensorPair],
    *,
    float_shapes: dict[str, list] | None = None,
) -> FusedModel:
    """Merge the two models and append the metric reductions of ``pairs`` + ``outputs``."""
    for m in (float_model, quant_model):
        for n in m.graph.node:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
                raise FusedUnavailable(f"node '{n.name or n.op_type}' holds a subgraph")
    target = max(_default_opset(float_model), _default_opset(quant_model), _MIN_OPSET)
    fm, qm = _upgrade(float_model, target), _upgrade(quant_model, target)

    g = helper.make_graph([], "qdiff_fused", [], [])
    f_inputs = {i.name: i for i in fm.graph.input}
    f_init = {t.name for t in fm.graph.initializer}
    q_init = {t.name for t in qm.graph.initializer}
    shared = [i for i in fm.graph.input if i.name not in f_init]
    g.input.extend(shared)
    nodes: list[onnx.NodeProto] = []

    def prefixed(m: onnx.ModelProto, prefix: str, keep: set[str]) -> None:
        def rn(x: str) -> str:
            return x if (not x or x in keep) else prefix + x

        for t in m.graph.initializer:
            c = onnx.TensorProto()
            c.CopyFrom(t)
            c.name = rn(t.name)
            g.initializer.append(c)
        for k, n in enumerate(m.graph.node):
            c = onnx.NodeProto()
            c.CopyFrom(n)
            c.name = f"{prefix}{n.name or n.op_type + str(k)}"
            for i, x in enumerate(c.input):
                c.input[i] = rn(x)
            for i, x in enumerate(c.output):
                c.output[i] = rn(x)
            nodes.append(c)

    prefixed(fm, "f/", {i.name for i in shared})
    # the quantized model reads the shared inputs, cast where it takes another element type
    q_keep = set()
    for i in qm.graph.input:
        if i.name in q_init:
            continue
        f_in = f_inputs.get(i.name)
        if f_in is None:
            raise FusedUnavailable(f"input '{i.name}' of the quantized model is not an input of the float model")
        if f_in.type.tensor_type.elem_type == i.type.tensor_type.elem_type:
            q_keep.add(i.name)
        else:
            nodes.append(helper.make_node("Cast", [i.name], ["q/" + i.name], to=i.type.tensor_type.elem_type, name=f"q/cast_in/{i.name}"))
    prefixed(qm, "q/", q_keep)

    b = _Reductions(g, nodes)
    out_names = []
    for k, p in enumerate(list(pairs) + list(outputs)):
        fname = p.float_tensor if p.float_tensor in {i.name for i in shared} else "f/" + p.float_tensor
        qname = p.quant_tensor if p.quant_tensor in q_keep else "q/" + p.quant_tensor
        out_names.append(b.pair(f"qdiff/p{k}/", fname, qname, p))
    top1 = []
    for k, p in enumerate(outputs):
        shape = (float_shapes or {}).get(p.float_tensor)
        if shape is not None and looks_like_class_scores(tuple(shape)):
            fname = "f/" + p.float_tensor
            qname = "q/" + p.quant_tensor
            top1.append(b.top1(f"qdiff/t{k}/", fname, qname, p))
        else:
            top1.append(None)
    g.node.extend(nodes)
    for name in out_names + [t for t in top1 if t]:
        g.output.append(helper.make_tensor_value_info(name, TensorProto.DOUBLE, None))
    opsets = {o.domain or "": o.version for o in list(fm.opset_import) + list(qm.opset_import)}
    opsets[""] = target
    model = helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    model.ir_version = max(fm.ir_version, qm.ir_version, 8)
    return FusedModel(model, tuple(out_names[: len(pairs) + len(outputs)]), tuple(top1))


class _Reductions:
    """Builds the reduction nodes; constants shared across pairs."""

    def __init__(self, g: onnx.GraphProto, nodes: list[onnx.NodeProto]):
        self.g, self.nodes = g, nodes
        self._consts: dict[str, str] = {}

    def const(self, name: str, value: np.ndarray) -> str:
        key = "qdiff/c/" + name
        if key not in self._consts:
            self.g.initializer.append(numpy_helper.from_array(np.asarray(value), key))
            self._consts[key] = key
        return key

    def node(self, op: str, inputs: list[str], out: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def _real(self, p: str, name: str, pair: TensorPair) -> str:
        src = name
        if pair.dequant is not None:
            scale = self.const(f"{p}scale".replace("/", "_"), np.asarray(pair.dequant.scale, np.float32))
            zp = self.const(f"{p}zp".replace("/", "_"), np.asarray(pair.dequant.zero_point))
            # only integer taps are dequantized; the numpy path does the same check at run time
            src = self.node("DequantizeLinear", [name, scale, zp], p + "dq", axis=pair.dequant.axis)
        return src

    def pair(self, p: str, fname: str, qname: str, pair: TensorPair) -> str:
        N = self.node
        flat = self.const("flat", np.array([-1], np.int64))
        zero = self.const("zero", np.array(0.0))
        pinf = self.const("pinf", np.array([np.inf]))
        ninf = self.const("ninf", np.array([-np.inf]))
        zero1 = self.const("zero1", np.array([0.0]))
        r = N("Reshape", [N("Cast", [fname], p + "r64", to=TensorProto.DOUBLE), flat], p + "r")
        q_src = self._real(p, qname, pair) if pair.dequant is not None else qname
        c = N("Reshape", [N("Cast", [q_src], p + "c64", to=TensorProto.DOUBLE), flat], p + "c")
        nan_r, inf_r = N("IsNaN", [r], p + "nan_r"), N("IsInf", [r], p + "inf_r")
        nan_c, inf_c = N("IsNaN", [c], p + "nan_c"), N("IsInf", [c], p + "inf_c")
        bad = N("Or", [N("Or", [nan_r, inf_r], p + "bad_r"), N("Or", [nan_c, inf_c], p + "bad_c")], p + "bad")
        ok = N("Not", [bad], p + "ok")
        okd = N("Cast", [ok], p + "okd", to=TensorProto.DOUBLE)
        r0 = N("Where", [ok, r, zero], p + "r0")
        c0 = N("Where", [ok, c, zero], p + "c0")

        def count(mask: str, tag: str) -> str:
            return N("ReduceSum", [N("Cast", [mask], p + tag + "_d", to=TensorProto.DOUBLE)], p + tag + "_n", keepdims=1)

        size = N("Cast", [N("Reshape", [N("Size", [r], p + "size_i"), self.const("one_shape", np.array([1], np.int64))], p + "size_1")], p + "size", to=TensorProto.DOUBLE)
        size_c = N("Cast", [N("Reshape", [N("Size", [c], p + "sizec_i"), self.const("one_shape", np.array([1], np.int64))], p + "sizec_1")], p + "size_c", to=TensorProto.DOUBLE)
        finite = N("ReduceSum", [N("Concat", [okd, zero1], p + "okd0", axis=0)], p + "finite", keepdims=1)
        d = N("Sub", [r0, c0], p + "d")
        rr = N("ReduceSumSquare", [N("Concat", [r0, zero1], p + "r0z", axis=0)], p + "rr", keepdims=1)
        cc = N("ReduceSumSquare", [N("Concat", [c0, zero1], p + "c0z", axis=0)], p + "cc", keepdims=1)
        rc = N("ReduceSum", [N("Concat", [N("Mul", [r0, c0], p + "rcm"), zero1], p + "rcz", axis=0)], p + "rc", keepdims=1)
        dz = N("Concat", [d, zero1], p + "dz", axis=0)
        dd = N("ReduceSumSquare", [dz], p + "dd", keepdims=1)
        sad = N("ReduceL1", [dz], p + "sad", keepdims=1)
        mad = N("ReduceMax", [N("Abs", [dz], p + "adz")], p + "mad", keepdims=1)
        lo = N("Min", [
            N("ReduceMin", [N("Concat", [N("Where", [ok, r, pinf], p + "rlo"), pinf], p + "rloz", axis=0)], p + "rmin", keepdims=1),
            N("ReduceMin", [N("Concat", [N("Where", [ok, c, pinf], p + "clo"), pinf], p + "cloz", axis=0)], p + "cmin", keepdims=1),
        ], p + "lo")  # fmt: skip
        hi = N("Max", [
            N("ReduceMax", [N("Concat", [N("Where", [ok, r, ninf], p + "rhi"), ninf], p + "rhiz", axis=0)], p + "rmax", keepdims=1),
            N("ReduceMax", [N("Concat", [N("Where", [ok, c, ninf], p + "chi"), ninf], p + "chiz", axis=0)], p + "cmax", keepdims=1),
        ], p + "hi")  # fmt: skip
        # histograms over [lo, hi] (finite stand-ins when there is no finite value)
        lo_s = N("Where", [N("IsInf", [lo], p + "lo_inf"), zero, lo], p + "lo_s")
        hi_s = N("Where", [N("IsInf", [hi], p + "hi_inf"), zero, hi], p + "hi_s")
        width = N("Max", [N("Sub", [hi_s, lo_s], p + "w0"), self.const("tiny", np.array([1e-300]))], p + "w")
        factor = N("Div", [self.const("bins", np.array([float(KL_BINS)])), width], p + "factor")
        hists = []
        for tag, x in (("hr", r0), ("hc", c0)):
            t = N("Mul", [N("Sub", [x, lo_s], p + tag + "_s"), factor], p + tag + "_t")
            t = N("Clip", [N("Floor", [t], p + tag + "_f"), self.const("zero_s", np.array(0.0)), self.const("last", np.array(float(KL_BINS - 1)))], p + tag + "_c")
            idx = N("Cast", [t], p + tag + "_i", to=TensorProto.INT64)
            hists.append(
                N("ScatterElements", [self.const("hist0", np.zeros(KL_BINS)), idx, okd], p + tag, axis=0, reduction="add")
            )
        counts = [count(nan_r, "nr"), count(inf_r, "ir"), count(nan_c, "nc"), count(inf_c, "ic")]
        parts = [size, size_c, finite, *counts, rr, cc, rc, dd, sad, mad, lo, hi, *hists]
        return N("Concat", parts, p + "sums", axis=0)

    def top1(self, p: str, fname: str, qname: str, pair: TensorPair) -> str:
        N = self.node
        q_src = self._real(p, qname, pair) if pair.dequant is not None else qname
        af = N("ArgMax", [fname], p + "af", axis=-1, keepdims=0)
        aq = N("ArgMax", [q_src], p + "aq", axis=-1, keepdims=0)
        agree = N("ReduceSum", [N("Concat", [N("Reshape", [N("Cast", [N("Equal", [af, aq], p + "eq")], p + "eqd", to=TensorProto.DOUBLE), self.const("flat", np.array([-1], np.int64))], p + "eqf"), self.const("zero1", np.array([0.0]))], p + "eqz", axis=0)], p + "agree", keepdims=1)
        rows = N("Cast", [N("Reshape", [N("Size", [af], p + "rows_i"), self.const("one_shape", np.array([1], np.int64))], p + "rows_1")], p + "rows", to=TensorProto.DOUBLE)
        return N("Concat", [rows, agree], p + "top1", axis=0)
