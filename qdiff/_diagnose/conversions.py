"""Check ``conversions``: Int8↔Float transitions and Int8→Float→Int8 round trips."""

from __future__ import annotations

from collections import defaultdict

import pandas as pd

from qdiff._diagnose.context import _FLOAT_TYPES, DiagnoseContext, _compute_nodes, _node_status
from qdiff._diagnose.findings import CheckOutput, Finding
from qdiff.graph import Graph, attr_value


CONVERSION_COLUMNS = ["layer", "nodes", "op_types", "entries", "exits", "round_trip"]


def check_conversions(ctx: DiagnoseContext) -> CheckOutput:
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
    stats = {
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
    return CheckOutput(findings, {"conversions": pd.DataFrame(rows, columns=CONVERSION_COLUMNS)}, stats)


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
