"""Graph edits as passes: each takes a model and returns a new one plus what changed (onnx only).

Never mutates the model it is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from qdiff.graph import Graph

__all__ = ["PassResult", "strip_activation_qdq"]


@dataclass(frozen=True)
class PassResult:
    """The edited model and a count of what the pass changed."""

    model: onnx.ModelProto
    modified: int


def strip_activation_qdq(model: onnx.ModelProto) -> PassResult:
    """Remove the QuantizeLinear -> DequantizeLinear pairs on activations (weights keep theirs).

    What is left is the float model the quantized one simulates, with its weights already
    quantized: compared with the original QDQ model it shows the error of activation quantization
    alone. Each DequantizeLinear becomes an Identity of the QuantizeLinear's float input, so every
    tensor name (graph outputs included) is kept; QuantizeLinear nodes left without readers are
    dropped.

    ::

        x -> Q -> DQ -> Conv(W_dq)      becomes      x -> Identity -> Conv(W_dq)
    """
    g = Graph(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = list(out.graph.node)
    producer = {o: n for n in nodes for o in n.output if o}
    replaced = 0
    new_nodes = []
    for n in nodes:
        if n.op_type == "DequantizeLinear" and n.input and n.input[0] in producer:
            q = producer[n.input[0]]
            if q.op_type == "QuantizeLinear" and q.input and not g.is_constant(q.input[0]):
                new_nodes.append(onnx.helper.make_node("Identity", [q.input[0]], [n.output[0]], name=(n.name or "dq") + "_stripped"))
                replaced += 1
                continue
        new_nodes.append(n)
    read = {i for n in new_nodes for i in n.input} | {o.name for o in out.graph.output}
    kept = [n for n in new_nodes if not (n.op_type == "QuantizeLinear" and all(o not in read for o in n.output))]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    return PassResult(out, replaced)
