"""Fallback units: what a quantization config can really switch, one candidate per compute layer.

A config can exclude any node, but most nodes are not worth a decision of their own: a Reshape or
Transpose on int8 values follows its input, and an Add/Mul/Sigmoid/Concat has no weights to keep in
float. A *unit* is one compute node (Conv, ConvTranspose, Gemm, MatMul: with a weight, or two
activations as in attention) plus the weight-less nodes that belong to it: each quantizable node
without weights joins the unit of the nearest compute node upstream of it, walking back through its
first activation input (so ``Conv -> HardSigmoid -> Mul`` and ``MatMul(q, k) -> Mul -> Softmax`` are
one unit each)::

    x ─> Conv ─> Clip ─> Div ─> Mul ─> Conv ─> ...        unit "conv_a": Conv, Clip, Mul (quantizable)
          │                     ^      │                   unit "conv_b": Conv, ...
          └─────────────────────┘      └─ the next unit

Nodes upstream of every compute node (an input normalisation) join the first unit that reads them.
Keeping a unit in float passes all its node names to ``nodes_to_exclude``: its weights and its own
activations stay float; the tensors it reads are still quantized where their other readers are.

Units are what fallback ranks, bisects and counts (``n_float``); layout operators and weight-less
nodes are never candidates on their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from qdiff.graph import Graph
from qdiff.ops import COMPUTE_OPS, MOVES_VALUES, QUANTIZABLE_OPS

__all__ = ["Unit", "fallback_units"]


@dataclass(frozen=True)
class Unit:
    """One fallback candidate.

    Attributes:
        name: the compute node's name (what reports and ``--max-float-layers`` count).
        op_type: the compute node's operator type.
        nodes: every node name the unit excludes, the compute node first.
        params: float weight parameters of the unit's nodes.
        order: position of the compute node in topological order.
    """

    name: str
    op_type: str
    nodes: tuple[str, ...]
    params: int
    order: int


def fallback_units(model: onnx.ModelProto, quantizable: frozenset[str] | None = None) -> list[Unit]:
    """The units of a prepared float model (every node named, weights as initializers), graph order.

    Args:
        model: the float model as :func:`qdiff._quantize.prepare_model` returns it.
        quantizable: operator types the quantizer quantizes (default
            :data:`qdiff.ops.QUANTIZABLE_OPS`); other nodes are in no unit.
    """
    if quantizable is None:
        quantizable = QUANTIZABLE_OPS
    g = Graph(model)
    owner: dict[int, int] = {}  # node index -> index of the compute node owning it
    compute: list[int] = []
    for idx, node in enumerate(g.nodes):
        acts = [i for i in node.input if i and not g.is_constant(i)]
        if not acts:
            continue
        if node.op_type in COMPUTE_OPS:
            owner[idx] = idx
            compute.append(idx)
            continue
        up = g.producer.get(acts[0])
        if up is not None and up in owner:
            owner[idx] = owner[up]
    if not compute:
        return []
    # nodes before any compute node (or fed only by constants and such nodes): the first unit
    # downstream of them
    for idx in range(len(g.nodes)):
        if idx in owner:
            continue
        found, seen, stack = [], {idx}, [idx]
        while stack:
            for out in g.nodes[stack.pop()].output:
                for c in g.consumers.get(out, []):
                    if c in owner:
                        found.append(owner[c])
                    elif c not in seen:
                        seen.add(c)
                        stack.append(c)
        if found:
            owner[idx] = min(found)
    members: dict[int, list[int]] = {c: [] for c in compute}
    for idx, c in owner.items():
        node = g.nodes[idx]
        if idx == c or (node.op_type in quantizable and node.op_type not in MOVES_VALUES):
            members[c].append(idx)
    units = []
    for c in compute:
        idxs = [c] + sorted(i for i in members[c] if i != c)
        params = 0
        for i in idxs:
            for name in g.nodes[i].input:
                if name and name in g.initializers:
                    t = g.initializers[name]
                    if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE) and len(t.dims) >= 1:
                        n = 1
                        for d in t.dims:
                            n *= d
                        params += n
        node = g.nodes[c]
        units.append(Unit(node.name or g.node_label(c), node.op_type, tuple(g.nodes[i].name or g.node_label(i) for i in idxs), params, c))
    return units
