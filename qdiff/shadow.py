"""Models built from a float model, its quantized twin and the matcher's regions (onnx only).

Three edits, each a pass that returns a new model and leaves its inputs untouched:

* :func:`build_shadow` — the float model plus, for every layer, a copy of the quantized layer's
  region fed the float model's activations: one session measures every layer's *isolated* error::

        float:   x ──> conv1 ──> r1 ──> pool1 ──> p1 ──> ...
                               │                 │
        shadow:                └─Q/DQ─> pool1' ──┴── compared with p1 (isolated error of pool1)

* :func:`keep_float` — the quantized model with one layer's region replaced by the float layer
  (float weights, float compute, no output quantization): the gain of keeping it in float.
* :func:`quantize_only` — the float model with one layer replaced by its quantized region: the
  cost of quantizing that layer alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qdiff.graph import _topological, external_dir
from qdiff.structs import DequantParams, Entry, Region

__all__ = ["build_shadow", "keep_float", "prune_unread", "quantize_only"]


class _Builder:
    """Accumulates nodes and initializers to add to a base model."""

    def __init__(self, base: onnx.ModelProto, other: onnx.ModelProto):
        self.model = onnx.ModelProto()
        self.model.CopyFrom(base)
        self.other_inits = {t.name: t for t in other.graph.initializer}
        # weights ``other`` left on disk (graph.load_model) are read here where the built model
        # would look for them in another folder: the built model records only ``base``'s
        other_dir = external_dir(other)
        self._other_dir = other_dir if other_dir is not None and other_dir != external_dir(base) else None
        self.added_inits: set[str] = set()
        self.existing = {t.name for t in self.model.graph.initializer}
        self.nodes: list[onnx.NodeProto] = []
        self._merge_opsets(other)

    def _merge_opsets(self, other: onnx.ModelProto) -> None:
        have = {o.domain or "": o for o in self.model.opset_import}
        for o in other.opset_import:
            d = o.domain or ""
            if d not in have:
                self.model.opset_import.append(o)
            elif o.version > have[d].version and d not in ("", "ai.onnx"):
                have[d].version = o.version

    def init(self, name: str, value: np.ndarray) -> str:
        if name not in self.added_inits and name not in self.existing:
            self.model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
            self.added_inits.add(name)
        return name

    def other_init(self, name: str, prefix: str) -> str:
        new = prefix + name
        if new not in self.added_inits:
            src = self.other_inits[name]
            if self._other_dir is not None and src.data_location == onnx.TensorProto.EXTERNAL:
                t = numpy_helper.from_array(numpy_helper.to_array(src, base_dir=self._other_dir), new)
            else:
                t = onnx.TensorProto()
                t.CopyFrom(src)
                t.name = new
            self.model.graph.initializer.append(t)
            self.added_inits.add(new)
        return new

    def copy_nodes(self, nodes: Iterable[onnx.NodeProto], rename, tag: str) -> None:
        for n in nodes:
            c = onnx.NodeProto()
            c.CopyFrom(n)
            c.name = f"{tag}{n.name or n.op_type}"
            for i, x in enumerate(c.input):
                c.input[i] = rename(x) if x else x
            for i, x in enumerate(c.output):
                c.output[i] = rename(x) if x else x
            self.nodes.append(c)

    def quantize(self, src: str, params: DequantParams, out: str, tag: str) -> str:
        scale = self.init(f"{tag}scale", np.asarray(params.scale, dtype=np.float32))
        zp = self.init(f"{tag}zero_point", np.asarray(params.zero_point))
        self.nodes.append(helper.make_node("QuantizeLinear", [src, scale, zp], [out], name=f"{tag}quantize", axis=params.axis))
        return out

    def dequantize(self, src: str, params: DequantParams, out: str, tag: str) -> str:
        scale = self.init(f"{tag}scale", np.asarray(params.scale, dtype=np.float32))
        zp = self.init(f"{tag}zero_point", np.asarray(params.zero_point))
        self.nodes.append(helper.make_node("DequantizeLinear", [src, scale, zp], [out], name=f"{tag}dequantize", axis=params.axis))
        return out

    def cast(self, src: str, to: int, out: str, tag: str) -> str:
        self.nodes.append(helper.make_node("Cast", [src], [out], name=f"{tag}cast", to=to))
        return out

    def finish(self, extra_outputs: Sequence[str] = (), prune: bool = False) -> onnx.ModelProto:
        g = self.model.graph
        nodes = list(g.node) + self.nodes
        available = {i.name for i in g.input} | {t.name for t in g.initializer}
        del g.node[:]
        g.node.extend(_topological(nodes, available))
        present = {o.name for o in g.output}
        for name in extra_outputs:
            if name not in present:
                g.output.append(onnx.ValueInfoProto(name=name))
        if prune:
            prune_unread(self.model, set())
        del g.value_info[:]  # stale after edits; onnxruntime infers what it needs
        return self.model


def prune_unread(model: onnx.ModelProto, needed: set[str]) -> int:
    """Drop, in place, the nodes whose outputs nothing reads (graph outputs and ``needed`` are
    read), and the initializers only they read. onnxruntime runs such nodes all the same.
    Returns how many nodes were dropped."""
    g = model.graph
    kept = _prune(list(g.node), needed | {o.name for o in g.output})
    dropped = len(g.node) - len(kept)
    if dropped:
        del g.node[:]
        g.node.extend(kept)
    read = {x for n in kept for x in n.input} | {o.name for o in g.output} | needed
    used = [t for t in g.initializer if t.name in read]
    if len(used) < len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(used)
    return dropped


def _prune(nodes: list[onnx.NodeProto], needed: set[str]) -> list[onnx.NodeProto]:
    """Drop nodes none of whose outputs is read (repeated until nothing changes)."""
    keep = list(nodes)
    while True:
        read = set(needed)
        for n in keep:
            read.update(x for x in n.input if x)
        kept = [n for n in keep if any(o in read for o in n.output if o)]
        if len(kept) == len(keep):
            return kept
        keep = kept


def _region_copy(b: _Builder, region: Region, tag: str) -> str:
    """Copy the quantized region into ``b``'s (float) model, fed the float activations; returns its output."""
    entry_map: dict[str, str] = {}
    for k, e in enumerate(region.entries):
        entry_map[e.quant_tensor] = _feed_quantized(b, e, f"{tag}in{k}/")

    def rename(t: str) -> str:
        if t in entry_map:
            return entry_map[t]
        if t in b.other_inits:
            return b.other_init(t, "qdiff_q/")
        return tag + t

    b.copy_nodes(region.quant_nodes, rename, tag)
    return rename(region.quant_output)


def _feed_quantized(b: _Builder, e: Entry, tag: str) -> str:
    if e.convert == "quantize" and e.params is not None:
        return b.quantize(e.float_tensor, e.params, f"{tag}q", tag)
    if e.convert == "cast" and e.elem_type is not None:
        return b.cast(e.float_tensor, e.elem_type, f"{tag}cast", tag)
    return e.float_tensor


def _as_float(b: _Builder, tensor: str, region: Region, tag: str) -> str:
    """The region's output as float32 (dequantized or widened) for float consumers."""
    if region.output_dequant is not None:
        return b.dequantize(tensor, region.output_dequant, f"{tag}out_dq", f"{tag}out_")
    member = next((m for m in region.members if m.name == region.quant_output), None)
    if member is not None and member.elem_type not in (None, TensorProto.FLOAT):
        return b.cast(tensor, TensorProto.FLOAT, f"{tag}out_f32", f"{tag}out_")
    return tensor


def build_shadow(
    float_model: onnx.ModelProto, quant_model: onnx.ModelProto, regions: Sequence[Region]
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The float model plus every quantized region fed float activations.

    Returns:
        The model, whose outputs include every region's float output and shadow output, and
        layer -> the shadow output tensor (integer outputs are left as they are; dequantize
        them with the region's ``output_dequant``).
    """
    b = _Builder(float_model, quant_model)
    taps = {}
    for k, region in enumerate(regions):
        taps[region.layer] = _region_copy(b, region, f"qdiff_iso{k}/")
    floats = [r.float_output for r in regions]
    return b.finish(list(dict.fromkeys(floats + list(taps.values())))), taps


def _redirect(b: _Builder, old: str, new: str, exclude: set[int]) -> None:
    """Make every reader of ``old`` (outside ``exclude``, ids of nodes) read ``new``; keep graph outputs."""
    g = b.model.graph
    for n in list(g.node) + b.nodes:
        if id(n) in exclude:
            continue
        for i, x in enumerate(n.input):
            if x == old:
                n.input[i] = new
    if any(o.name == old for o in g.output):
        for n in list(g.node) + b.nodes:
            for i, x in enumerate(n.output):
                if x == old:
                    n.output[i] = old + "__qdiff_replaced"
        b.nodes.append(helper.make_node("Identity", [new], [old], name=f"qdiff_keep_name/{old}"))


def keep_float(quant_model: onnx.ModelProto, float_model: onnx.ModelProto, region: Region) -> onnx.ModelProto:
    """The quantized model with ``region`` computed by the float layer (float weights, float output)."""
    b = _Builder(quant_model, float_model)
    tag = "qdiff_float/"
    entry_map: dict[str, str] = {}
    for k, e in enumerate(region.entries):
        if e.feed_tensor is not None:
            entry_map[e.float_tensor] = e.feed_tensor
        elif e.convert == "quantize" and e.params is not None:
            entry_map[e.float_tensor] = b.dequantize(e.quant_tensor, e.params, f"{tag}in{k}", f"{tag}in{k}_")
        else:
            entry_map[e.float_tensor] = b.cast(e.quant_tensor, TensorProto.FLOAT, f"{tag}in{k}", f"{tag}in{k}_")

    def rename(t: str) -> str:
        if t in entry_map:
            return entry_map[t]
        if t in b.other_inits:
            return b.other_init(t, "qdiff_f/")
        return tag + t

    start = len(b.nodes)
    b.copy_nodes(region.float_nodes, rename, tag)
    own = {id(n) for n in b.nodes[start:]}
    out = rename(region.float_output)
    for k, m in enumerate(region.members):
        if m.domain == "quant" and m.params is not None:
            new = b.quantize(out, m.params, f"{tag}out{k}", f"{tag}out{k}_")
        elif m.elem_type not in (None, TensorProto.FLOAT):
            new = b.cast(out, m.elem_type, f"{tag}out{k}", f"{tag}out{k}_")
        else:
            new = out
        region_ids = own | {id(x) for x in b.nodes[-1:] if new != out}
        _redirect(b, m.name, new, region_ids | _ids_of(b.model.graph.node, region.quant_nodes))
    return b.finish(prune=True)


def _ids_of(nodes: Iterable[onnx.NodeProto], wanted: Sequence[onnx.NodeProto]) -> set[int]:
    keys = {(tuple(n.input), tuple(n.output), n.op_type) for n in wanted}
    return {id(n) for n in nodes if (tuple(n.input), tuple(n.output), n.op_type) in keys}


def quantize_only(float_model: onnx.ModelProto, quant_model: onnx.ModelProto, region: Region) -> onnx.ModelProto:
    """The float model with only ``region``'s layer quantized (its consumers read the quantized values)."""
    b = _Builder(float_model, quant_model)
    tag = "qdiff_solo/"
    out = _as_float(b, _region_copy(b, region, tag), region, tag)
    own = {id(n) for n in b.nodes}
    _redirect(b, region.float_output, out, own | _ids_of(b.model.graph.node, region.float_nodes))
    return b.finish(prune=True)
