"""Pair the tensors of a float model with those of its quantized (or FP16) twin.

Imports onnx only. Matching works on the graphs' structure, not on tensor names, because the
quantizers rename and fuse::

    float graph                         QDQ graph (onnxruntime)             QOperator graph
    -----------                         ----------------------              ---------------
    x                                   x -> Q -> DQ                        x -> Q
    |                                          |                                   |
    Conv(conv1, W, B) -> c1             Conv(conv1, DQ(W), DQ(B)) -> r1     QLinearConv(conv1_quant) -> c1_quantized
    |                                          |  (Relu fused away;                |  (Relu fused; name says c1,
    Relu(relu1) -> r1                          |   Conv writes r1)                 |   values are r1's)
    |                                   r1 -> Q -> DQ -> r1_DequantizeLinear_Output|
    MaxPool(pool1) -> p1                MaxPool(pool1) -> p1 -> Q -> DQ     MaxPool(pool1) -> p1_quantized (uint8)

Both graphs are first reduced to a *skeleton*: QuantizeLinear, DequantizeLinear,
DynamicQuantizeLinear, Identity and float-to-float Cast become pass-throughs (their outputs join
the *group* of the tensor they read), QLinear*/QGemm/ConvInteger/MatMulInteger are read as the
float operator they implement, and the Cast/Mul/Add rescale chain after an integer op is folded
into that op. Then, walking the quantized skeleton in topological order from the graph inputs
(paired by name), a quantized node is paired with the float node that has a compatible operator
type and reads the float counterparts of its inputs. Several candidates (say the Q, K and V
projections reading one LayerNorm output) are told apart by attributes and small integer
constants, node name, then weight values; if still tied the layer is reported as ambiguous,
never guessed. Nodes that compute the same values (two Shape nodes of one tensor) are
interchangeable, not ambiguous. Integer (shape) inputs never gate a float node: one whose shape
subgraph found no twin is matched by its float inputs; integer nodes are skipped, not compared.

A quantized node's output may stand for the end of a chain of float nodes it fused (Conv ->
BatchNormalization -> Relu). The end is the chain member whose float consumers have the same
operator types as the quantized output's consumers (so QLinearConv writing ``c1_quantized`` is
paired with ``r1`` because both feed a MaxPool), with names as a tie-breaker. The layer is then
named ``conv1+relu1``.

For each group the tensor tapped in the quantized model is the one after its DequantizeLinear
(the values consumers see), else an integer tensor whose scale and zero point are known (QOperator,
dequantized by the runner), else the float tensor itself.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import product

import numpy as np
import onnx

from qdiff.ops import COMMUTATIVE, EQUIVALENT, FUSABLE, KEEPS_QPARAMS, LAYOUT, weight_channel_axis
from qdiff.errors import UsageError
from qdiff.graph import FLOAT_TYPES, Graph, attr_value
from qdiff.structs import (
    DequantParams,
    Entry,
    Member,
    Region,
    Matching,
    MatchMethod,
    PairKind,
    TensorPair,
    Unmatched,
    WeightPair,
)

__all__ = ["match_models", "no_weight_values", "load_tensor_map", "QOP_SPECS"]

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Operator tables
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QOpSpec:
    """How a quantized operator maps onto the float operator it implements.

    Attributes:
        float_op: the float operator type.
        inputs: float input position -> quantized input position.
        in_params: quantized input position -> (scale position, zero point position).
        out_params: (scale position, zero point position) of the output, None if it is not
            statically quantized (integer accumulator or float output).
        bias: (quantized bias position, input-scale position, weight-scale position): an int32
            bias whose scale is input scale x weight scale.
        output: "quant" (int8 with out_params), "accum" (int32, rescaled by following nodes) or
            "float".
    """

    float_op: str
    inputs: dict[int, int]
    in_params: dict[int, tuple[int, int]] = field(default_factory=dict)
    out_params: tuple[int, int] | None = None
    bias: tuple[int, int, int] | None = None
    output: str = "quant"


def _unary(op: str) -> QOpSpec:
    return QOpSpec(op, {0: 0}, {0: (1, 2)}, (3, 4))


def _binary(op: str) -> QOpSpec:
    return QOpSpec(op, {0: 0, 1: 3}, {0: (1, 2), 3: (4, 5)}, (6, 7))


QOP_SPECS: dict[str, QOpSpec] = {
    "QLinearConv": QOpSpec("Conv", {0: 0, 1: 3, 2: 8}, {0: (1, 2), 3: (4, 5)}, (6, 7), bias=(8, 1, 4)),
    "QLinearMatMul": QOpSpec("MatMul", {0: 0, 1: 3}, {0: (1, 2), 3: (4, 5)}, (6, 7)),
    "QGemm": QOpSpec("Gemm", {0: 0, 1: 3, 2: 6}, {0: (1, 2), 3: (4, 5)}, (7, 8), bias=(6, 1, 4)),
    "QLinearAdd": _binary("Add"),
    "QLinearMul": _binary("Mul"),
    "QLinearSigmoid": _unary("Sigmoid"),
    "QLinearLeakyRelu": _unary("LeakyRelu"),
    "QLinearSoftmax": _unary("Softmax"),
    "QLinearAveragePool": _unary("AveragePool"),
    "QLinearGlobalAveragePool": _unary("GlobalAveragePool"),
    "QLinearReduceMean": _unary("ReduceMean"),
    "ConvInteger": QOpSpec("Conv", {0: 0, 1: 1}, output="accum"),
    "MatMulInteger": QOpSpec("MatMul", {0: 0, 1: 1}, output="accum"),
    "DynamicQuantizeMatMul": QOpSpec("MatMul", {0: 0, 1: 1}, {1: (2, 3)}, output="float"),
    "MatMulIntegerToFloat": QOpSpec("MatMul", {0: 0, 1: 1}, {1: (3, 5)}, output="float"),
    # quantize_dynamic's LSTM: int8 W and R stored transposed ([dirs, in, 4*hidden]), float Y, Y_h, Y_c
    "DynamicQuantizeLSTM": QOpSpec("LSTM", {k: k for k in range(8)}, {1: (8, 9), 2: (10, 11)}, output="float"),
}
# QLinearConcat: Y_scale, Y_zero_point, then (X, X_scale, X_zero_point) per input; built per node.


_QUANT_SUFFIXES = (
    "_QuantizeLinear_Input",
    "_QuantizeLinear_Output",
    "_DequantizeLinear_Output",
    "_DequantizeLinear",
    "_QuantizeLinear",
    "_quantized",
    "_quant",
    "_output_quantized",
)


def _base_name(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for suffix in _QUANT_SUFFIXES:
            if name.endswith(suffix) and len(name) > len(suffix):
                name = name[: -len(suffix)]
                changed = True
    return name


def _same_kind(a: str, b: str) -> bool:
    return EQUIVALENT.get(a, a) == EQUIVALENT.get(b, b)


# ---------------------------------------------------------------------------------------------
# Skeleton
# ---------------------------------------------------------------------------------------------

#: member grades: which tensor of a group is tapped (highest, then latest, wins)
_G_NONE, _G_FLOAT, _G_QUANT, _G_DEQUANT = 0, 1, 2, 3


@dataclass
class _SNode:
    idx: int  # index into Graph.nodes
    name: str
    op: str  # float-equivalent operator type
    act: list[tuple[int, str]]  # (float input position, root of the input's group)
    consts: dict[int, str]  # float input position -> tensor name (constants)
    outputs: list[str]  # roots written by this node
    spec: QOpSpec | None = None
    same_as: int | None = None  # idx of an earlier node computing exactly the same values


#: constants up to this many elements are compared by value (shape indices, axes, Reshape targets)
_SMALL_CONST = 64


class _Skeleton:
    """Pass-throughs collapsed into groups; real compute nodes kept as _SNodes."""

    def __init__(self, g: Graph) -> None:
        self.g = g
        self.root: dict[str, str] = {}
        self.members: dict[str, list[str]] = defaultdict(list)
        self.grade: dict[str, int] = {}
        self.params: dict[str, DequantParams] = {}
        self.domain: dict[str, str] = {}  # float | quant | accum | dynq | aux | other
        self.nodes: list[_SNode] = []
        self.nodes_by_idx: dict[int, _SNode] = {}
        self.by_root: dict[str, _SNode] = {}
        self.consumers: dict[str, list[_SNode]] = defaultdict(list)
        self.absorbed: set[int] = set()
        for name in g.inputs:
            is_float = g.is_float(name) is not False
            self._new_root(name, _G_FLOAT if is_float else _G_NONE, "float" if is_float else "other")
        for idx, node in enumerate(g.nodes):
            self._visit(idx, node)
        for sn in self.nodes:
            for _, r in sn.act:
                self.consumers[r].append(sn)
        self._declare_consumer_params()
        self.canon: dict[str, str] = {}  # root -> root of the earliest node computing the same values
        self._find_duplicates()

    # -- groups -----------------------------------------------------------------------------
    def _new_root(self, name: str, grade: int, domain: str) -> None:
        self.root[name] = name
        self.members[name].append(name)
        self.grade[name] = grade
        self.domain[name] = domain

    def _join(self, name: str, root: str, grade: int, domain: str) -> None:
        self.root[name] = root
        self.members[root].append(name)
        self.grade[name] = grade
        self.domain[name] = domain

    def root_of(self, name: str) -> str | None:
        return self.root.get(name)

    def best_member(self, root: str) -> str:
        members = self.members[root]
        best = max(range(len(members)), key=lambda i: (self.grade.get(members[i], 0), i))
        return members[best]

    def is_const(self, name: str) -> bool:
        return self.g.is_constant(name)

    def is_aux(self, name: str) -> bool:
        """Constants, and runtime scales/zero points of dynamic quantization."""
        if not name or self.g.is_constant(name):
            return True
        return self.domain.get(name) == "aux"

    # -- node classification ----------------------------------------------------------------
    def _visit(self, idx: int, node: onnx.NodeProto) -> None:
        g = self.g
        op = node.op_type
        ins = list(node.input)
        outs = [o for o in node.output]
        if all(g.is_constant(o) for o in outs if o) and outs:
            return  # constant subgraph: weights, shapes; not activations
        if ins and all(self.is_aux(i) for i in ins if i) and op not in ("Constant",):
            for o in outs:  # computed from constants and run-time scales only
                if o:
                    self.domain[o] = "aux"
            return
        first_act = next((i for i in ins if i and not self.is_aux(i)), None)

        if op == "QuantizeLinear" and ins and ins[0] in self.root:
            self._join(outs[0], self.root[ins[0]], _G_QUANT, "quant")
            p = self._params_from(node, 1, 2, attr_value(node, "axis", 1))
            if p is not None:
                self.params[outs[0]] = p
            return
        if op == "DequantizeLinear" and ins and ins[0] in self.root:
            self._join(outs[0], self.root[ins[0]], _G_DEQUANT, "float")
            if ins[0] not in self.params:
                p = self._params_from(node, 1, 2, attr_value(node, "axis", 1))
                if p is not None:
                    self.params[ins[0]] = p
                    if self.grade.get(ins[0]) == _G_NONE:
                        self.grade[ins[0]] = _G_QUANT
            return
        if op == "DynamicQuantizeLinear" and ins and ins[0] in self.root:
            self._join(outs[0], self.root[ins[0]], _G_NONE, "dynq")
            for o in outs[1:]:
                if o:
                    self.domain[o] = "aux"
            return
        if op == "Identity" and ins and ins[0] in self.root:
            src = ins[0]
            self._join(outs[0], self.root[src], self.grade.get(src, _G_FLOAT), self.domain.get(src, "float"))
            if src in self.params:
                self.params[outs[0]] = self.params[src]
            return
        if op == "Cast" and ins and ins[0] in self.root:
            to = attr_value(node, "to")
            src_domain = self.domain.get(ins[0])
            if src_domain == "accum":  # int32 accumulator -> float, still unscaled
                self._join(outs[0], self.root[ins[0]], _G_NONE, "accum")
                return
            if to in FLOAT_TYPES and src_domain == "float":
                self._join(outs[0], self.root[ins[0]], self.grade.get(ins[0], _G_FLOAT), "float")
                return
        # rescale chain after an integer op: (Cast) -> Mul(scale) -> Add(bias)
        if (
            op in ("Mul", "Add", "Reshape")
            and first_act is not None
            and self.domain.get(first_act) in ("accum", "rescaled")
            and all(self.is_aux(i) for i in ins if i and i != first_act)
        ):
            domain = "rescaled" if op != "Reshape" or self.domain[first_act] == "rescaled" else "accum"
            grade = _G_FLOAT if domain == "rescaled" else _G_NONE
            self._join(outs[0], self.root[first_act], grade, domain)
            self.absorbed.add(idx)
            return

        spec = QOP_SPECS.get(op)
        if op == "QLinearConcat":
            n_in = (len(ins) - 2) // 3
            spec = QOpSpec(
                "Concat",
                {k: 2 + 3 * k for k in range(n_in)},
                {2 + 3 * k: (3 + 3 * k, 4 + 3 * k) for k in range(n_in)},
                (0, 1),
            )
        if spec is not None:
            act: list[tuple[int, str]] = []
            consts: dict[int, str] = {}
            for fpos, qpos in spec.inputs.items():
                if qpos >= len(ins) or not ins[qpos]:
                    continue
                name = ins[qpos]
                if self.is_aux(name):
                    consts[fpos] = name
                elif name in self.root:
                    act.append((fpos, self.root[name]))
                else:
                    act.append((fpos, name))
            float_out = spec.output == "float" or (op == "QGemm" and (len(ins) <= 7 or not ins[7]))
            written = [o for o in outs if o] if spec.output == "float" else [outs[0]]
            sn = _SNode(idx, node.name or f"{op}({outs[0]})", spec.float_op, act, consts, written, spec)
            if spec.output == "accum":
                self._new_root(outs[0], _G_NONE, "accum")
            elif float_out:
                for o in written:
                    self._new_root(o, _G_FLOAT, "float")
            else:
                self._new_root(outs[0], _G_QUANT, "quant")
                if spec.out_params is not None:
                    p = self._params_from(node, *spec.out_params, axis=1)
                    if p is not None:
                        self.params[outs[0]] = p
                    else:
                        self.grade[outs[0]] = _G_NONE
            self._add(sn)
            return

        # a regular operator
        act = []
        consts = {}
        for pos, name in enumerate(ins):
            if not name:
                continue
            if self.is_aux(name):
                consts[pos] = name
            elif name in self.root:
                act.append((pos, self.root[name]))
            else:
                act.append((pos, name))  # produced by something we could not place
        in_domain = self.domain.get(ins[0]) if ins and ins[0] else None
        roots = []
        for k, o in enumerate(outs):
            if not o:
                continue
            if in_domain == "quant" and op in KEEPS_QPARAMS:
                self._new_root(o, _G_QUANT, "quant")
                if ins[0] in self.params:
                    self.params[o] = self.params[ins[0]]
                else:
                    self.grade[o] = _G_NONE
            else:
                is_float = self.g.is_float(o)
                if is_float is None:
                    is_float = in_domain in (None, "float", "rescaled")
                self._new_root(o, _G_FLOAT if is_float else _G_NONE, "float" if is_float else "other")
            roots.append(o)
        self._add(_SNode(idx, node.name or f"{op}({outs[0] if outs else idx})", op, act, consts, roots))

    def _add(self, sn: _SNode) -> None:
        self.nodes.append(sn)
        self.nodes_by_idx[sn.idx] = sn
        for r in sn.outputs:
            self.by_root[r] = sn

    def _params_from(self, node: onnx.NodeProto, scale_pos: int, zp_pos: int, axis: int) -> DequantParams | None:
        ins = list(node.input)
        if scale_pos >= len(ins) or not ins[scale_pos]:
            return None
        scale = self.g.const_value(ins[scale_pos])
        if scale is None:
            return None
        zp = self.g.const_value(ins[zp_pos]) if zp_pos < len(ins) and ins[zp_pos] else None
        if zp is None:
            zp = np.zeros_like(scale, dtype=np.int32)
        return DequantParams(np.asarray(scale), np.asarray(zp), int(axis))

    def _declare_consumer_params(self) -> None:
        """QLinear ops state the scale of the integer tensors they read: use that where unknown."""
        for sn in self.nodes:
            if sn.spec is None:
                continue
            node = self.g.nodes[sn.idx]
            ins = list(node.input)
            for qpos, (s, z) in sn.spec.in_params.items():
                if qpos < len(ins) and ins[qpos] and ins[qpos] not in self.params and not self.is_aux(ins[qpos]):
                    p = self._params_from(node, s, z, axis=1)
                    if p is not None:
                        self.params[ins[qpos]] = p
                        if self.domain.get(ins[qpos]) == "quant":
                            self.grade[ins[qpos]] = _G_QUANT

    # -- identical nodes ---------------------------------------------------------------------------
    def _find_duplicates(self) -> None:
        """Common subexpressions: a node with the same operator, attributes, constants and inputs
        (inputs compared through their own canonical roots) as an earlier one computes the same
        values (two Shape nodes of one tensor, two identical Cast/Unsqueeze chains). Its outputs'
        canonical root is the earlier node's; the matcher treats such nodes as interchangeable."""
        seen: dict[tuple, list[_SNode]] = defaultdict(list)
        for sn in self.nodes:
            node = self.g.nodes[sn.idx]
            if not sn.act:
                continue
            act = [(pos, self.canon.get(r, r)) for pos, r in sn.act]
            act_key = tuple(sorted(r for _, r in act)) if sn.op in COMMUTATIVE else tuple(sorted(act))
            key = (node.op_type, node.domain, self.attributes(sn), act_key, self.const_signature(sn), len(sn.outputs))
            group = seen[key]
            # larger constants (weights) are only keyed by type and shape: read them on a collision
            first = next((other for other in group if self._same_large_consts(sn, other)), None)
            if first is None:
                group.append(sn)
                continue
            sn.same_as = first.idx
            for mine, theirs in zip(sn.outputs, first.outputs):
                self.canon[mine] = self.canon.get(theirs, theirs)

    def _same_large_consts(self, a: _SNode, b: _SNode) -> bool:
        for pos, name in a.consts.items():
            other = b.consts.get(pos)
            if other == name or self.small_const(name) is not None:
                continue  # same tensor, or already compared by value in the key
            va, vb = self.g.const_value(name), self.g.const_value(other) if other else None
            if va is None or vb is None or va.dtype != vb.dtype or va.shape != vb.shape or not np.array_equal(va, vb):
                return False
        return True

    def attributes(self, sn: _SNode) -> tuple:
        return tuple(sorted((a.name, a.SerializeToString()) for a in self.g.nodes[sn.idx].attribute))

    def const_signature(self, sn: _SNode) -> tuple:
        out = []
        for pos, name in sorted(sn.consts.items()):
            v = self.small_const(name)
            if v is not None:
                out.append((pos, ("value", v.dtype.str, v.shape, v.tobytes())))
            elif self.g.is_constant(name):
                out.append((pos, ("tensor", self.g.elem_type(name), tuple(self.g.shape(name) or ()))))
            else:
                out.append((pos, ("name", name)))  # a run-time scale or zero point
        return tuple(out)

    def small_const(self, name: str) -> np.ndarray | None:
        """The value of a constant of at most _SMALL_CONST elements (never reads a big weight)."""
        g = self.g
        if not name or not g.is_constant(name):
            return None
        n = g.elements(name)
        if n is None:
            idx = g.producer.get(name)
            node = g.nodes[idx] if idx is not None else None
            if node is None or node.op_type != "Constant":
                return None
            value_attr = next((a for a in node.attribute if a.name == "value"), None)
            if value_attr is not None and int(np.prod(value_attr.t.dims)) > _SMALL_CONST:
                return None
        elif n > _SMALL_CONST:
            return None
        v = g.const_value(name)
        return v if v is not None and v.size <= _SMALL_CONST else None

    def is_integer(self, root: str) -> bool:
        """An integer/bool tensor that is not a quantized activation (shapes, indices, masks)."""
        return self.domain.get(root) == "other"

    def computes_integers(self, sn: _SNode) -> bool:
        return bool(sn.outputs) and all(self.is_integer(r) for r in sn.outputs)

    # -- consumers ------------------------------------------------------------------------------
    def consumer_signature(self, root: str) -> tuple[tuple[str, ...], bool]:
        ops = sorted(EQUIVALENT.get(sn.op, sn.op) for sn in self.consumers.get(root, []))
        is_output = any(m in self.g.outputs for m in self.members.get(root, [root]))
        return tuple(ops), is_output


# ---------------------------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------------------------


def no_weight_values(pair: WeightPair) -> dict:
    """``weigh`` for :func:`match_models` where the weights' values are not needed (every caller
    but compare): they are dropped as they are found instead of all held until the matching ends
    (the float weights and their dequantized twins: twice the model's weight bytes)."""
    return {}


def match_models(
    float_graph: Graph,
    quant_graph: Graph,
    user_map: Mapping[str, str] | None = None,
    weigh: Callable[[WeightPair], dict] | None = None,
) -> Matching:
    """Pair every comparable tensor of ``float_graph`` with its counterpart in ``quant_graph``.

    Args:
        float_graph: the reference (float32) model.
        quant_graph: the quantized (QDQ, QOperator, dynamic) or FP16 model.
        user_map: float tensor -> quantized tensor pairs that override or complete the
            structural matching (``--map``).
        weigh: called with each weight pair as it is found; its result is kept as the pair's
            ``row`` and the pair's values are dropped (compare's weight table: one weight in
            memory at a time instead of every float weight and its dequantized twin).

    Returns:
        The pairs in float topological order, output pairs, weight pairs and what stayed
        unmatched (both sides) with the reason.
    """
    fs = _Skeleton(float_graph)
    qs = _Skeleton(quant_graph)
    return _Matcher(fs, qs, dict(user_map or {}), weigh).run()


class _Matcher:
    def __init__(
        self, fs: _Skeleton, qs: _Skeleton, user_map: dict[str, str], weigh: Callable[[WeightPair], dict] | None = None
    ) -> None:
        self.weigh = weigh
        self.fs, self.qs = fs, qs
        self.user_map = user_map
        self.skipped: list[Unmatched] = []
        #: quantized tensors standing for a float tensor through a layout op only the quantized model has
        self.through_layout: set[str] = set()
        self.skipped_f: set[int] = set()
        self._pair_source: dict[tuple[str, str], tuple[_SNode, list[_SNode]]] = {}
        self.q2f: dict[str, str] = {}  # quant root -> float root
        self.matched_f: dict[int, tuple[_SNode, list[_SNode], MatchMethod]] = {}  # float idx -> (q, chain, how)
        self.fused: dict[int, int] = {}  # float idx of a fused-away node -> idx of the chain head
        self.unmatched: list[Unmatched] = []
        self.f_index: dict[tuple, list[_SNode]] = defaultdict(list)
        self.f_index_float: dict[tuple, list[_SNode]] = defaultdict(list)  # keyed by float inputs only
        self.f_order = {sn.idx: k for k, sn in enumerate(fs.nodes)}
        for sn in fs.nodes:
            act = [(pos, self._fcanon(r)) for pos, r in sn.act]
            self.f_index[self._key(sn.op, act)].append(sn)
            self.f_index_float[self._key(sn.op, [(p, r) for p, r in act if not fs.is_integer(r)])].append(sn)

    def _fcanon(self, root: str) -> str:
        return self.fs.canon.get(root, root)

    def _unpaired(self, key: tuple, index: dict[tuple, list[_SNode]] | None = None) -> list[_SNode]:
        return [c for c in (self.f_index if index is None else index).get(key, []) if c.idx not in self.matched_f]

    @staticmethod
    def _key(op: str, act: list[tuple[int, str]]) -> tuple:
        op = EQUIVALENT.get(op, op)
        if op in COMMUTATIVE or op == "Concat":
            names = tuple(sorted(r for _, r in act)) if op != "Concat" else tuple(r for _, r in sorted(act))
            return (op, names)
        return (op, tuple(sorted(act)))

    def run(self) -> Matching:
        fg, qg = self.fs.g, self.qs.g
        for name in fg.inputs:
            if name in qg.inputs:
                self.q2f[self.qs.root[name]] = self.fs.root[name]
        for q in self.qs.nodes:
            self._match_node(q)
        pairs = self._input_pairs() + self._layer_pairs()
        outputs = self._output_pairs()
        self._report_unmatched()
        self._report_subgraphs()
        weights = self._weight_pairs()
        if self.user_map:
            pairs = self._apply_user_map(pairs)
        pairs.sort(key=lambda p: (p.order, p.float_tensor))
        regions = self._regions(pairs)
        return Matching(
            tuple(pairs), tuple(outputs), tuple(weights), tuple(self.unmatched), tuple(self.skipped), tuple(regions)
        )

    # -- node pairing ---------------------------------------------------------------------------
    def _match_node(self, q: _SNode) -> None:
        qg = self.qs.g
        mapped: list[tuple[int, str]] = []
        loose: list[int] = []  # integer inputs (shapes, indices) whose producers found no float twin
        for pos, r in q.act:
            f = self.q2f.get(r)
            if f is None:
                if self.qs.is_integer(r):
                    loose.append(pos)
                    continue
                self._fail(q, f"its input '{r}' has no float counterpart")
                return
            mapped.append((pos, self._fcanon(f)))
        if not mapped and not loose:
            return  # reads constants only
        candidates = [] if loose else self._unpaired(self._key(q.op, mapped))
        if not candidates and not loose and q.op in ("MatMul", "Gemm"):
            alt = "Gemm" if q.op == "MatMul" else "MatMul"
            candidates = [
                c
                for c in self.fs.nodes
                if c.op == alt
                and c.idx not in self.matched_f
                and [self._fcanon(r) for p, r in c.act if p == 0] == [mapped[0][1]]
            ]
        if not candidates and (loose or any(self.fs.is_integer(f) for _, f in mapped)):
            candidates = self._by_float_inputs(q, mapped, loose)
        if not candidates and not loose:
            candidates, removed = self._through_float_layout(q, mapped)
            for idx in removed:
                if idx not in self.skipped_f:
                    self.skipped_f.add(idx)
                    self.skipped.append(
                        Unmatched(
                            self.fs.g.node_label(idx),
                            "float",
                            self.fs.g.nodes[idx].op_type,
                            "layout op absent from the quantized model; matched through, not compared",
                        )
                    )
        if not candidates:
            twin = self.qs.nodes_by_idx.get(q.same_as) if q.same_as is not None else None
            if twin is not None and all(r in self.q2f for r in twin.outputs):
                # a duplicate only the quantized model has (the float export shared one node)
                for mine, theirs in zip(q.outputs, twin.outputs):
                    self.q2f[mine] = self.q2f[theirs]
                self.skipped.append(
                    Unmatched(
                        q.name,
                        "quant",
                        qg.nodes[q.idx].op_type,
                        f"computes the same as '{twin.name}' (the float model has it once); matched through, not compared",
                    )
                )
                return
            if q.op in LAYOUT and len(mapped) == 1 and mapped[0][0] == 0 and len(q.outputs) == 1:
                # a transpose/reshape only the quantized model has: match its consumers through it.
                # Its shape may be computed (Shape -> Reshape, as onnx's version converter wraps an
                # opset-12 Softmax in Flatten/Softmax/Reshape when it raises the opset to 13): such
                # integer inputs have no float twin and do not stop the data input from mapping.
                self.q2f[q.outputs[0]] = mapped[0][1]
                self.through_layout.add(q.outputs[0])
                self.skipped.append(
                    Unmatched(
                        q.name,
                        "quant",
                        qg.nodes[q.idx].op_type,
                        "layout op absent from the float model; matched through, not compared",
                    )
                )
                return
            self._fail(q, f"no unpaired float {q.op} reads the float counterparts of its inputs")
            return
        method = MatchMethod.STRUCTURE
        if len(candidates) > 1 or self.qs.computes_integers(q):
            chosen, method = self._disambiguate(q, candidates)
            if chosen is None:
                names = ", ".join(self.fs.g.node_label(c.idx) for c in candidates)
                if len(candidates) == 1:
                    self._fail(q, f"float {names} reads the same inputs but with other attributes or constants")
                else:
                    self._fail(q, f"ambiguous: float nodes {names} all fit by structure, names and weights")
                return
            candidates = [chosen]
        f = candidates[0]
        chain = self._fusion_chain(q, f)
        conflict = self._shape_conflict(q, chain[-1])
        if conflict:
            self._fail(q, conflict)
            return
        self.matched_f[f.idx] = (q, chain, method)
        for c in chain[1:]:
            self.fused[c.idx] = f.idx
        end = chain[-1]
        for k, qr in enumerate(q.outputs):
            if k < len(end.outputs):
                self.q2f[qr] = end.outputs[k]

    def _fail(self, q: _SNode, reason: str) -> None:
        """q stays unpaired; an integer node (shape arithmetic) is listed as skipped, not as a failure."""
        record = Unmatched(q.name, "quant", self.qs.g.nodes[q.idx].op_type, reason)
        if self.qs.computes_integers(q):
            record = dataclasses.replace(record, reason=f"integer (shape) computation, not compared: {reason}")
            self.skipped.append(record)
        else:
            self.unmatched.append(record)

    def _by_float_inputs(self, q: _SNode, mapped: list[tuple[int, str]], loose: list[int]) -> list[_SNode]:
        """Candidates found by q's float inputs alone, its integer (shape) inputs left out of the key.

        A Reshape must not go unmatched because the Shape -> Gather -> Concat subgraph computing its
        target found no twin (another exporter writes it differently). Integer inputs must still
        sit at integer input positions of the float node (or be constants there); shapes decide
        among several candidates.
        """
        floats = [(p, f) for p, f in mapped if not self.fs.is_integer(f)]
        if not floats:
            return []
        integer_pos = set(loose) | {p for p, f in mapped if self.fs.is_integer(f)}
        found = [
            c
            for c in self._unpaired(self._key(q.op, floats), self.f_index_float)
            if {p for p, r in c.act if self.fs.is_integer(r)} <= integer_pos
        ]
        if len(found) > 1:
            found = [c for c in found if not self._shape_conflict(q, c)] or found
        return found

    def _through_float_layout(self, q: _SNode, mapped: list[tuple[int, str]]) -> tuple[list[_SNode], list[int]]:
        """Candidates reached by skipping float layout ops (Reshape, Transpose, ...) the quantized model lacks."""
        options: list[list[tuple[str, list[int]]]] = []
        for _, froot in mapped:
            reach = [(froot, [])]
            frontier = [(froot, [])]
            for _depth in range(3):
                nxt = []
                for root, path in frontier:
                    for c in self.fs.consumers.get(root, []):
                        if c.op in LAYOUT and len(c.act) == 1 and len(c.outputs) == 1 and c.idx not in self.matched_f:
                            nxt.append((c.outputs[0], path + [c.idx]))
                reach += nxt
                frontier = nxt
            options.append(reach)
        combos = 1
        for o in options:
            combos *= len(o)
        if combos <= 1 or combos > 64:
            return [], []
        for combo in product(*options):
            if all(not path for _, path in combo):
                continue
            remapped = [(pos, self._fcanon(root)) for (pos, _), (root, _) in zip(mapped, combo)]
            found = self._unpaired(self._key(q.op, remapped))
            if len(found) == 1:
                return found, [i for _, path in combo for i in path]
        return [], []

    def _shape_conflict(self, q: _SNode, f_end: _SNode) -> str:
        """A reason when the quantized output's shape and the float output's shape cannot be the same."""
        for k, qr in enumerate(q.outputs):
            if k >= len(f_end.outputs):
                break
            fshape = self.fs.g.shape(f_end.outputs[k])
            qshape = self.qs.g.shape(self.qs.best_member(qr)) or self.qs.g.shape(qr)
            if fshape is None or qshape is None:
                continue
            if any(r in self.through_layout for _, r in q.act) and _same_size(fshape, qshape):
                # reads a tensor reshaped by a layout op only the quantized model has (Flatten ->
                # Softmax -> Reshape): the same values in the same order, in another shape
                continue
            if len(fshape) != len(qshape) or any(
                isinstance(a, int) and isinstance(b, int) and a > 0 and b > 0 and a != b for a, b in zip(fshape, qshape)
            ):
                return (
                    f"shape {qshape} differs from float {self.fs.g.node_label(f_end.idx)}'s {fshape}; "
                    "not paired (same operator and inputs, different shape)"
                )
        return ""

    def _disambiguate(self, q: _SNode, candidates: list[_SNode]) -> tuple[_SNode | None, MatchMethod]:
        """One of several structural candidates, or None when they cannot be told apart.

        In order: the same attributes and small integer constants (Gather index 0 vs 1, Slice
        bounds; required for integer nodes, preferred for the others), then names, then nodes
        that compute the same values (interchangeable: the first in float order), then weights.
        """
        same = [c for c in candidates if self._same_signature(q, c)]
        if self.qs.computes_integers(q) or same:
            candidates = same
        if len(candidates) <= 1:
            return (candidates[0] if candidates else None), MatchMethod.STRUCTURE
        qnode = self.qs.g.nodes[q.idx]
        qnames = {qnode.name, _base_name(qnode.name)} - {""}
        qouts = {_base_name(m) for r in q.outputs for m in self.qs.members[r]}
        by_name = [
            c
            for c in candidates
            if (self.fs.g.nodes[c.idx].name and self.fs.g.nodes[c.idx].name in qnames)
            or any(o in qouts for o in c.outputs)
        ]
        if len(by_name) == 1:
            return by_name[0], MatchMethod.NAME
        pool = by_name or candidates
        if len({tuple(self._fcanon(r) for r in c.outputs) for c in pool}) == 1:
            return min(pool, key=lambda c: self.f_order[c.idx]), MatchMethod.STRUCTURE  # interchangeable
        scores = []
        for c in pool:
            s = self._weight_similarity(q, c)
            scores.append(s)
        if scores and max(scores) > -2:
            order = sorted(range(len(pool)), key=lambda i: -scores[i])
            best = order[0]
            if len(order) == 1 or scores[best] - scores[order[1]] > 0.05:
                return pool[best], MatchMethod.WEIGHTS
        return None, MatchMethod.STRUCTURE

    def _same_signature(self, q: _SNode, f: _SNode) -> bool:
        """Same attributes (plain operators) and equal small integer constants at each position."""
        if q.spec is None and self.qs.attributes(q) != self.fs.attributes(f):
            return False
        for pos, qname in q.consts.items():
            fname = f.consts.get(pos)
            qv = self.qs.small_const(qname)
            fv = self.fs.small_const(fname) if fname is not None else None
            if qv is None or fv is None or qv.dtype.kind not in "iub" or fv.dtype.kind not in "iub":
                continue
            if qv.shape != fv.shape or not np.array_equal(qv, fv):
                return False
        return True

    def _weight_similarity(self, q: _SNode, f: _SNode) -> float:
        sims = []
        for pos, fname in f.consts.items():
            fv = self.fs.g.const_value(fname)
            qname = q.consts.get(pos)
            if fv is None or qname is None:
                continue
            qv = _dequantized_const(self.qs, q, pos, qname)
            if qv is None:
                continue
            qv = _align_shape(fv, qv[0])
            if qv is None:
                sims.append(-1.0)
                continue
            a = fv.astype(np.float64).ravel()
            b = qv.astype(np.float64).ravel()
            na, nb = np.linalg.norm(a), np.linalg.norm(b)
            sims.append(float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0)
        return float(np.mean(sims)) if sims else -3.0

    def _fusion_chain(self, q: _SNode, f: _SNode) -> list[_SNode]:
        """f followed by the float nodes the quantized node fused, ending where q's output stands."""
        chain = [f]
        while True:
            last = chain[-1]
            if len(last.outputs) != 1:
                break
            users = self.fs.consumers.get(last.outputs[0], [])
            if len(users) != 1 or users[0].op not in FUSABLE or last.outputs[0] in self.fs.g.outputs:
                break
            nxt = users[0]
            if [r for _, r in nxt.act] != [last.outputs[0]] or nxt.idx in self.matched_f:
                break
            chain.append(nxt)
        if len(chain) == 1 or len(q.outputs) != 1:
            return chain
        qsig = self.qs.consumer_signature(q.outputs[0])
        fits = [k for k, c in enumerate(chain) if self.fs.consumer_signature(c.outputs[0]) == qsig]
        if len(fits) == 1:
            return chain[: fits[0] + 1]
        qnames = {_base_name(m) for m in self.qs.members[q.outputs[0]]}
        named = [k for k, c in enumerate(chain) if c.outputs[0] in qnames]
        pool = [k for k in fits if k in named] or named or fits
        return chain[: (pool[-1] if pool else 0) + 1]

    # -- pairs --------------------------------------------------------------------------------
    def _tap(self, qroot: str) -> tuple[str, DequantParams | None] | None:
        best = self.qs.best_member(qroot)
        grade = self.qs.grade.get(best, _G_NONE)
        if grade == _G_NONE:
            return None
        return best, (self.qs.params.get(best) if grade == _G_QUANT else None)

    def _input_pairs(self) -> list[TensorPair]:
        pairs = []
        for name in self.fs.g.inputs:
            if name not in self.qs.root:
                continue
            tap = self._tap(self.qs.root[name])
            if tap is None or tap[0] == name:
                continue  # fed to the quantized model as is: nothing to compare
            pairs.append(
                TensorPair(
                    layer=f"input:{name}",
                    op_type="Input",
                    float_tensor=name,
                    quant_tensor=tap[0],
                    kind=PairKind.INPUT,
                    method=MatchMethod.INPUT,
                    order=-1,
                    quant_node=self.qs.g.node_label(self.qs.g.producer[tap[0]]) if tap[0] in self.qs.g.producer else "",
                    dequant=tap[1],
                )
            )
        return pairs

    def _layer_pairs(self) -> list[TensorPair]:
        pairs = []
        fg, qg = self.fs.g, self.qs.g
        for fidx, (q, chain, method) in self.matched_f.items():
            end = chain[-1]
            layer = "+".join(fg.node_label(c.idx) for c in chain)
            op_type = "+".join(fg.nodes[c.idx].op_type for c in chain)
            for k, qr in enumerate(q.outputs):
                if k >= len(end.outputs):
                    break
                froot = end.outputs[k]
                if fg.is_float(froot) is False:
                    self.skipped.append(
                        Unmatched(
                            layer, "float", op_type, f"integer (shape) computation, not compared: output '{froot}' is not a float tensor"
                        )
                    )
                    continue
                tap = self._tap(qr)
                if tap is None:
                    self.unmatched.append(
                        Unmatched(
                            layer,
                            "float",
                            op_type,
                            f"quantized tensor '{qr}' has no static scale (integer accumulator or dynamic "
                            "quantization without a float rescale); not compared",
                        )
                    )
                    continue
                suffix = f":{k}" if len(q.outputs) > 1 else ""
                self._pair_source[(layer + suffix, froot)] = (q, chain)
                pairs.append(
                    TensorPair(
                        layer=layer + suffix,
                        op_type=op_type,
                        float_tensor=froot,
                        quant_tensor=tap[0],
                        method=method,
                        order=self.f_order[fidx],
                        quant_node=qg.node_label(q.idx),
                        dequant=tap[1],
                        is_output=froot in fg.outputs,
                    )
                )
        return pairs

    def _output_pairs(self) -> list[TensorPair]:
        fg, qg = self.fs.g, self.qs.g
        pairs = []
        same_names = set(fg.outputs) <= set(qg.outputs)
        for k, name in enumerate(fg.outputs):
            qname = name if same_names else (qg.outputs[k] if k < len(qg.outputs) else None)
            if qname is None:
                self.unmatched.append(Unmatched(name, "float", "Output", "the quantized model has fewer outputs"))
                continue
            pairs.append(
                TensorPair(
                    layer=f"output:{name}",
                    op_type="Output",
                    float_tensor=name,
                    quant_tensor=qname,
                    method=MatchMethod.OUTPUT,
                    order=len(fg.nodes),
                    dequant=self.qs.params.get(qname),
                    is_output=True,
                )
            )
        return pairs

    def _report_unmatched(self) -> None:
        fg = self.fs.g
        aligned = set(self.q2f.values())
        for sn in self.fs.nodes:
            if sn.idx in self.matched_f or sn.idx in self.fused or sn.idx in self.skipped_f:
                continue
            node = fg.nodes[sn.idx]
            if not sn.act:
                reason = "reads constants only (folded or shape arithmetic); not compared"
            elif any(r not in aligned for _, r in sn.act):
                missing = next(r for _, r in sn.act if r not in aligned)
                reason = f"its input '{missing}' has no counterpart in the quantized model"
            else:
                reason = f"no quantized node of type {sn.op} reads the counterparts of its inputs"
            if self.fs.computes_integers(sn):  # shape arithmetic: never compared, not a failed layer
                self.skipped.append(
                    Unmatched(fg.node_label(sn.idx), "float", node.op_type, f"integer (shape) computation, not compared: {reason}")
                )
                continue
            self.unmatched.append(Unmatched(fg.node_label(sn.idx), "float", node.op_type, reason))

    def _regions(self, pairs: list[TensorPair]) -> list[Region]:
        """For each single-output layer pair, the quantized and float nodes that compute it."""
        out = []
        fg, qg = self.fs.g, self.qs.g
        for i, pair in enumerate(pairs):
            src = self._pair_source.get((pair.layer, pair.float_tensor))
            if src is None or pair.method is MatchMethod.USER:
                continue
            q, chain = src
            if len(q.outputs) != 1:
                continue
            entries = []
            for _, qroot in q.act:
                froot = self.q2f.get(qroot)
                if froot is None:
                    break
                entries.append(self._entry(qroot, froot))
            else:
                stops_q = {e.quant_tensor for e in entries}
                quant_nodes = _backward(qg, pair.quant_tensor, stops_q)
                float_nodes = _backward(fg, pair.float_tensor, {e.float_tensor for e in entries})
                if quant_nodes is None or float_nodes is None:
                    continue
                members = tuple(
                    Member(
                        m,
                        "quant" if self.qs.domain.get(m) == "quant" else "float",
                        self.qs.params.get(m),
                        qg.elem_type(m),
                    )
                    for m in self.qs.members[q.outputs[0]]
                    if self.qs.domain.get(m) in ("quant", "float", "rescaled")
                )
                step = None
                for m in self.qs.members[q.outputs[0]]:
                    p = self.qs.params.get(m)
                    if p is not None and not p.per_channel:
                        step = float(np.asarray(p.scale).reshape(-1)[0])
                        break
                n_params = 0
                for c in chain:
                    for name in c.consts.values():
                        v = fg.const_value(name)
                        if v is not None and v.dtype.kind == "f":
                            n_params += int(v.size)
                out.append(
                    Region(
                        layer=pair.layer,
                        pair_index=i,
                        quant_nodes=tuple(qg.nodes[k] for k in quant_nodes),
                        float_nodes=tuple(fg.nodes[k] for k in float_nodes),
                        entries=tuple(entries),
                        quant_output=pair.quant_tensor,
                        float_output=pair.float_tensor,
                        output_dequant=pair.dequant,
                        members=members,
                        step=step,
                        params=n_params,
                    )
                )
        return out

    def _entry(self, qroot: str, froot: str) -> Entry:
        qs, qg, fg = self.qs, self.qs.g, self.fs.g
        # the region starts at the group's last float value before any quantization of it
        # (the pre-Q tensor in QDQ, the rescaled output of an integer op); else at the root
        pre = [m for m in qs.members.get(qroot, [qroot]) if qs.grade.get(m) == _G_FLOAT and qs.domain.get(m) in ("float", "rescaled")]
        if pre:
            qroot = pre[-1]
        q_et, f_et = qg.elem_type(qroot), fg.elem_type(froot)
        feed = None
        members = qs.members.get(qs.root.get(qroot, qroot), [qroot])
        float_members = [m for m in members if qs.domain.get(m) == "float" and qg.elem_type(m) in (None, f_et)]
        if float_members:
            feed = max(float_members, key=lambda m: (qs.grade.get(m, 0), members.index(m)))
        if qs.domain.get(qroot) == "quant" and qroot in qs.params:
            return Entry(qroot, froot, "quantize", qs.params[qroot], q_et, feed)
        if q_et is not None and f_et is not None and q_et != f_et:
            return Entry(qroot, froot, "cast", None, q_et, feed)
        return Entry(qroot, froot, "direct", None, q_et, feed or qroot)

    def _report_subgraphs(self) -> None:
        """Nodes inside If/Loop/Scan bodies are not tapped: list each with that reason."""
        fg = self.fs.g
        for idx, node in enumerate(fg.nodes):
            for a in node.attribute:
                graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
                for g in graphs:
                    for label, op in _subgraph_nodes(g, f"{fg.node_label(idx)}/{a.name}"):
                        self.unmatched.append(
                            Unmatched(
                                label,
                                "float",
                                op,
                                f"inside the '{a.name}' subgraph of {node.op_type} '{fg.node_label(idx)}': tensors in "
                                f"control-flow bodies are not tapped; the {node.op_type} node's outputs are compared",
                            )
                        )

    def _apply_user_map(self, pairs: list[TensorPair]) -> list[TensorPair]:
        fg, qg = self.fs.g, self.qs.g
        float_known = set(fg.producer) | set(fg.inputs)
        quant_known = set(qg.producer) | set(qg.inputs)
        bad_f = [f for f in self.user_map if f not in float_known]
        bad_q = [q for q in self.user_map.values() if q not in quant_known]
        if bad_f:
            raise UsageError(f"--map names float tensor(s) {bad_f[:5]} that the float model does not have")
        if bad_q:
            raise UsageError(f"--map names quantized tensor(s) {bad_q[:5]} that the quantized model does not have")
        out = [p for p in pairs if p.float_tensor not in self.user_map]
        for ftensor, qtensor in self.user_map.items():
            if ftensor in fg.producer:
                idx = fg.producer[ftensor]
                layer, op, order = fg.node_label(idx), fg.nodes[idx].op_type, self.f_order.get(idx, idx)
            else:
                layer, op, order = f"input:{ftensor}", "Input", -1
            qroot = self.qs.root.get(qtensor)
            qnode = qg.node_label(qg.producer[qtensor]) if qtensor in qg.producer else ""
            out.append(
                TensorPair(
                    layer=layer,
                    op_type=op,
                    float_tensor=ftensor,
                    quant_tensor=qtensor,
                    kind=PairKind.INPUT if order == -1 else PairKind.ACTIVATION,
                    method=MatchMethod.USER,
                    order=order,
                    quant_node=qnode,
                    dequant=self.qs.params.get(qtensor) if qroot is not None else None,
                    is_output=ftensor in fg.outputs,
                )
            )
            self.unmatched = [u for u in self.unmatched if not (u.side == "float" and u.name == layer)]
        return out

    def _weight_pairs(self) -> list[WeightPair]:
        out = []
        fg = self.fs.g
        for fidx, (q, chain, _) in sorted(self.matched_f.items(), key=lambda kv: self.f_order[kv[0]]):
            f = chain[0]
            layer = "+".join(fg.node_label(c.idx) for c in chain)
            op = fg.nodes[f.idx].op_type
            for pos, fname in sorted(f.consts.items()):
                fv = fg.const_value(fname)
                if fv is None or fv.dtype.kind != "f":
                    continue
                qname = q.consts.get(pos)
                if qname is None:
                    continue
                resolved = _dequantized_const(self.qs, q, pos, qname)
                if resolved is None:
                    self.unmatched.append(
                        Unmatched(f"{layer}/{fname}", "float", op, f"cannot read the quantized value of '{qname}'")
                    )
                    continue
                qv, granularity, qsource = resolved
                aligned = _align_shape(fv, qv)
                if aligned is None:
                    self.unmatched.append(
                        Unmatched(
                            f"{layer}/{fname}",
                            "float",
                            op,
                            f"weight shapes differ: {list(fv.shape)} vs {list(qv.shape)}",
                        )
                    )
                    continue
                role = {1: "weight", 2: "bias"}.get(pos, f"input{pos}") if op in ("Conv", "Gemm", "MatMul", "ConvTranspose") else f"input{pos}"
                pair = WeightPair(
                    layer=layer,
                    op_type=op,
                    role=role,
                    float_tensor=fname,
                    quant_tensor=qsource,
                    float_value=fv,
                    quant_value=aligned,
                    granularity=granularity,
                    channel_axis=_channel_axis(fg.nodes[f.idx], pos, fv.ndim),
                )
                if self.weigh is not None:
                    pair = dataclasses.replace(pair, float_value=None, quant_value=None, row=self.weigh(pair))
                out.append(pair)
                del fv, qv, aligned, resolved
        return out


def _backward(g: Graph, tensor: str, stops: set[str]) -> list[int] | None:
    """Indices (topological) of the nodes computing ``tensor`` from ``stops`` and constants.

    None when the walk reaches a graph input that is not among ``stops`` (the region would read
    more than its entries).
    """
    seen: set[int] = set()
    stack = [tensor]
    while stack:
        t = stack.pop()
        if not t or t in stops or t in g.initializers:
            continue
        idx = g.producer.get(t)
        if idx is None:
            return None
        if idx in seen:
            continue
        seen.add(idx)
        stack.extend(x for x in g.nodes[idx].input if x)
    return sorted(seen)


def _subgraph_nodes(g: onnx.GraphProto, prefix: str) -> list[tuple[str, str]]:
    out = []
    for k, n in enumerate(g.node):
        label = f"{prefix}/{n.name or n.op_type + str(k)}"
        out.append((label, n.op_type))
        for a in n.attribute:
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                out += _subgraph_nodes(sub, f"{label}/{a.name}")
    return out


def _same_size(a: list, b: list) -> bool:
    """Do two shapes (ints, symbolic names) certainly hold as many elements?"""
    if any(not isinstance(d, (int, str)) or (isinstance(d, int) and d < 0) for d in [*a, *b]):
        return False
    size = [int(np.prod([d for d in s if isinstance(d, int)])) for s in (a, b)]
    return size[0] == size[1] and sorted(d for d in a if isinstance(d, str)) == sorted(d for d in b if isinstance(d, str))


def _channel_axis(node: onnx.NodeProto, pos: int, ndim: int) -> int | None:
    """The axis the weights table takes a weight's channels along (its worst channel).

    A constant first input of MatMul is read along its last axis, as a weight is (not along the
    output axis :func:`qdiff.ops.weight_channel_axis` gives it), so the table's channels are the
    ones it always reported."""
    if node.op_type == "MatMul" and pos == 0 and ndim >= 2:
        return ndim - 1
    return weight_channel_axis(node.op_type, pos, ndim, attr_value(node, "transB", 0))


def _align_shape(fv: np.ndarray, qv: np.ndarray) -> np.ndarray | None:
    if fv.shape == qv.shape:
        return qv
    if fv.ndim == 2 and qv.ndim == 2 and fv.shape == qv.T.shape:
        return qv.T
    if fv.size == qv.size and fv.squeeze().shape == qv.squeeze().shape:
        return qv.reshape(fv.shape)
    return None


def _dequantized_const(qs: _Skeleton, q: _SNode, fpos: int, name: str) -> tuple[np.ndarray, str, str] | None:
    """Real value of a constant input of a quantized node, with its quantization granularity."""
    g = qs.g
    value = g.const_value(name)
    if value is not None and value.dtype.kind == "f":
        return value.astype(np.float32), "float", name
    producer = g.nodes[g.producer[name]] if name in g.producer else None
    if producer is not None and producer.op_type == "DequantizeLinear":
        src = g.const_value(producer.input[0])
        scale = g.const_value(producer.input[1]) if len(producer.input) > 1 else None
        zp = g.const_value(producer.input[2]) if len(producer.input) > 2 and producer.input[2] else None
        axis = attr_value(producer, "axis", 1)
        note = ""
        if src is None and producer.input[0] in g.producer:
            # a float constant quantized at run time by a QuantizeLinear (onnxruntime does this
            # for weights held by Constant nodes): evaluate that QuantizeLinear here
            qnode = g.nodes[g.producer[producer.input[0]]]
            if qnode.op_type == "QuantizeLinear":
                src = _quantize_const(g, qnode)
                note = " (quantized at run time)"
        if src is None or scale is None:
            return None
        p = DequantParams(np.asarray(scale), np.asarray(zp if zp is not None else 0), int(axis))
        return p.dequantize(src), _granularity(p, axis) + note, producer.input[0]
    if value is None:
        return None
    # an integer constant read directly by a QLinear / Integer op
    qnode = g.nodes[q.idx]
    ins = list(qnode.input)
    spec = q.spec
    if spec is not None:
        qpos = spec.inputs.get(fpos)
        if spec.bias is not None and qpos == spec.bias[0]:
            a_scale = g.const_value(ins[spec.bias[1]])
            w_scale = g.const_value(ins[spec.bias[2]])
            if a_scale is None or w_scale is None:
                return None
            p = DequantParams(np.asarray(a_scale * w_scale).reshape(-1), np.zeros(1, np.int32), 0)
            return p.dequantize(value), _granularity(p, 0), name
        if qpos is not None and qpos in spec.in_params:
            s, z = spec.in_params[qpos]
            scale = g.const_value(ins[s]) if s < len(ins) and ins[s] else None
            zp = g.const_value(ins[z]) if z < len(ins) and ins[z] else None
            if scale is not None and qnode.op_type == "DynamicQuantizeLSTM" and value.ndim == 3:
                # W/R are stored [dirs, in, 4*hidden] with a scale per direction or per
                # (direction, gate row): dequantize, then back to the float layout [dirs, 4*hidden, in]
                scale = np.asarray(scale, np.float32).reshape(value.shape[0], 1, -1)
                zp = np.asarray(zp if zp is not None else 0).astype(np.float32).reshape(-1)
                zp = zp.reshape(value.shape[0], 1, -1) if zp.size > 1 else zp
                real = ((value.astype(np.float32) - zp) * scale).transpose(0, 2, 1)
                return real, ("per-channel (axis 1)" if scale.shape[2] > 1 else "per-tensor"), name
            if scale is not None:
                axis = 0 if qnode.op_type in ("QLinearConv",) else value.ndim - 1
                p = DequantParams(np.asarray(scale).reshape(-1), np.asarray(zp if zp is not None else 0).reshape(-1), axis)
                return p.dequantize(value), _granularity(p, axis), name
    # onnxruntime's dynamic quantization names the scale after the weight: W_quantized -> W_scale
    base = _base_name(name)
    scale = g.const_value(f"{base}_scale")
    zp = g.const_value(f"{base}_zero_point")
    if scale is not None:
        axis = value.ndim - 1 if qnode.op_type == "MatMulInteger" else 0
        scale = np.asarray(scale).reshape(-1)
        p = DequantParams(scale, np.asarray(zp if zp is not None else 0).reshape(-1), axis)
        return p.dequantize(value), _granularity(p, axis), name
    return None


def _quantize_const(g: Graph, node: onnx.NodeProto) -> np.ndarray | None:
    """numpy QuantizeLinear of constant inputs: saturate(round_half_even(x / scale) + zero_point)."""
    x = g.const_value(node.input[0])
    scale = g.const_value(node.input[1]) if len(node.input) > 1 else None
    zp = g.const_value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if x is None or scale is None:
        return None
    zp = np.asarray(zp if zp is not None else np.uint8(0))
    scale = np.asarray(scale, dtype=np.float32)
    if scale.size > 1 and x.ndim > 0:
        axis = attr_value(node, "axis", 1)
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    info = np.iinfo(zp.dtype)
    q = np.rint(x.astype(np.float32) / scale) + zp.astype(np.int64)
    return np.clip(q, info.min, info.max).astype(zp.dtype)


def _granularity(p: DequantParams, axis: int) -> str:
    return f"per-channel (axis {axis})" if p.per_channel else "per-tensor"


def load_tensor_map(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read a float-tensor -> quantized-tensor map.

    Accepted: a JSON object ``{"float": "quant"}``; a JSON list of records, or ``{"pairs": [...]}``
    as ``qdiff match -o`` writes, with ``float_tensor`` and ``quant_tensor`` keys; a CSV with those
    two columns.

    Raises:
        UsageError: the file is missing or not in one of those forms.
    """
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise UsageError(f"--map file '{p}' does not exist")
    try:
        if p.lower().endswith(".csv"):
            with open(p, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
        else:
            with open(p, encoding="utf-8") as fh:
                doc = json.load(fh)
            if isinstance(doc, dict) and "pairs" in doc:
                rows = doc["pairs"]
            elif isinstance(doc, dict):
                return {str(k): str(v) for k, v in doc.items()}
            else:
                rows = doc
        mapping = {str(r["float_tensor"]): str(r["quant_tensor"]) for r in rows}
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(
            f"--map file '{p}' is not a tensor map ({type(exc).__name__}: {exc}); give JSON {{\"float\": \"quant\"}} "
            "or a CSV with columns float_tensor,quant_tensor"
        ) from None
    return mapping
