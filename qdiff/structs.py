"""Typed records passed between qdiff's stages (no behaviour beyond small helpers).

Vocabulary, used the same way in code, CLI and docs:

* *layer*: a node of the float graph that owns an output tensor, or several float nodes the
  quantizer fused into one (named ``conv1+relu1``).
* *tensor pair*: a float tensor and the quantized model's tensor holding the same values.
* *accumulated error*: both models run on their own activations (what ``compare`` measures).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

__all__ = ["CONFIDENCE", "Entry", "Member", "Region", "MatchMethod", "PairKind", "DequantParams", "TensorPair", "WeightPair", "Unmatched", "Matching"]


class MatchMethod(str, enum.Enum):
    """How a tensor pair was found."""

    INPUT = "input"  #: a graph input, paired by name
    STRUCTURE = "structure"  #: same operator reading already-paired inputs, unique candidate
    NAME = "name"  #: several structural candidates, resolved by node/tensor name
    WEIGHTS = "weights"  #: several structural candidates, resolved by weight similarity
    OUTPUT = "output"  #: a graph output, paired by name (or position)
    USER = "user"  #: given by the user's tensor map (--map)


#: how sure the matcher is of each method's pairs (reported as ``confidence``)
CONFIDENCE = {
    MatchMethod.INPUT: 1.0,
    MatchMethod.STRUCTURE: 1.0,
    MatchMethod.NAME: 0.9,
    MatchMethod.WEIGHTS: 0.8,
    MatchMethod.OUTPUT: 1.0,
    MatchMethod.USER: 1.0,
}


class PairKind(str, enum.Enum):
    INPUT = "input"
    ACTIVATION = "activation"


@dataclass(frozen=True, eq=False)
class DequantParams:
    """Scale and zero point that turn a tapped integer tensor back into real values.

    ``real = (q - zero_point) * scale``, with ``scale``/``zero_point`` broadcast along ``axis``
    when they hold one value per channel.
    """

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int = 1

    @property
    def per_channel(self) -> bool:
        return self.scale.size > 1

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        scale = self.scale.astype(np.float32)
        zp = self.zero_point.astype(np.float32)
        if self.per_channel and q.ndim > 0:
            axis = self.axis if self.axis >= 0 else q.ndim + self.axis
            shape = [1] * q.ndim
            shape[axis] = -1
            scale = scale.reshape(shape)
            zp = zp.reshape(shape)
        return (q.astype(np.float32) - zp) * scale


@dataclass(frozen=True)
class TensorPair:
    """A float tensor and the quantized tensor that holds the same values.

    Attributes:
        layer: float node name, fused float nodes joined by ``+``, or ``input:NAME``.
        op_type: the float operator(s), joined by ``+`` for fused layers.
        float_tensor: tensor tapped in the float model.
        quant_tensor: tensor tapped in the quantized model (after its DequantizeLinear where
            there is one).
        kind: graph input or activation.
        method: how the pair was found.
        order: position of the layer in the float graph's topological order.
        quant_node: name of the quantized node that writes the values.
        dequant: scale/zero point when ``quant_tensor`` is an integer tensor (QOperator).
        is_output: True when ``float_tensor`` is a graph output of the float model.
    """

    layer: str
    op_type: str
    float_tensor: str
    quant_tensor: str
    kind: PairKind = PairKind.ACTIVATION
    method: MatchMethod = MatchMethod.STRUCTURE
    order: int = 0
    quant_node: str = ""
    dequant: DequantParams | None = field(default=None, compare=False)
    is_output: bool = False

    @property
    def confidence(self) -> float:
        return CONFIDENCE[self.method]


@dataclass(frozen=True, eq=False)
class WeightPair:
    """A float weight and its dequantized counterpart (values, not names, are compared)."""

    layer: str
    op_type: str
    role: str  #: "weight", "bias" or "input<k>"
    float_tensor: str
    quant_tensor: str
    float_value: np.ndarray | None  #: None once ``row`` holds what was computed from it
    quant_value: np.ndarray | None
    granularity: str  #: "per-channel (axis k)", "per-tensor" or "float" (left unquantized)
    channel_axis: int | None = None
    #: what ``match_models(weigh=...)`` computed from the values as the pair was found (the values
    #: are then dropped: a big model's weights are never all in memory at once)
    row: dict | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Unmatched:
    """Something of one model that has no counterpart in the other, and why."""

    name: str
    side: str  #: "float" or "quant"
    op_type: str
    reason: str


@dataclass(frozen=True, eq=False)
class Entry:
    """Where a quantized layer's region reads an activation, and how to feed it a float tensor.

    Attributes:
        quant_tensor: the tensor the region reads in the quantized model.
        float_tensor: the float model's tensor with the same values.
        convert: ``"direct"`` (same type), ``"cast"`` (to ``elem_type``, FP16 models) or
            ``"quantize"`` (QuantizeLinear with ``params``, integer tensors of QOperator models).
        params: scale/zero point for ``"quantize"``.
        elem_type: onnx element type of ``quant_tensor``.
        feed_tensor: the quantized model's float-domain tensor of that group (what a float layer
            put in place of the quantized one reads), or None if it must be dequantized.
    """

    quant_tensor: str
    float_tensor: str
    convert: str
    params: DequantParams | None = None
    elem_type: int | None = None
    feed_tensor: str | None = None


@dataclass(frozen=True, eq=False)
class Member:
    """A tensor of a quantized layer's output group and what it holds."""

    name: str
    domain: str  #: "float" or "quant"
    params: DequantParams | None = None
    elem_type: int | None = None


@dataclass(frozen=True, eq=False)
class Region:
    """The nodes that compute one quantized layer, for shadow and edited models.

    Attributes:
        layer: the layer name (as in the TensorPair).
        pair_index: index of the layer's TensorPair in ``Matching.pairs``.
        quant_nodes: quantized nodes from the entries to the tapped output (topological order),
            including input Q/DQ, weight DequantizeLinear and output Q/DQ.
        float_nodes: float nodes from the entries to the layer's output, with constant producers.
        entries: the activations the region reads.
        quant_output: the tapped quantized tensor; ``output_dequant`` its scale if integer.
        float_output: the float layer's output tensor.
        members: every tensor of the quantized output group (what downstream nodes read).
        step: the output quantization step (scale), None when the output is not quantized.
        params: number of weight parameters of the float layer.
    """

    layer: str
    pair_index: int
    quant_nodes: tuple
    float_nodes: tuple
    entries: tuple[Entry, ...]
    quant_output: str
    float_output: str
    output_dequant: DequantParams | None
    members: tuple[Member, ...]
    step: float | None
    params: int


@dataclass(frozen=True)
class Matching:
    """Everything the matcher found: pairs to tap, weights to compare, and what it could not pair."""

    pairs: tuple[TensorPair, ...]
    outputs: tuple[TensorPair, ...]
    weights: tuple[WeightPair, ...]
    unmatched: tuple[Unmatched, ...]
    skipped: tuple[Unmatched, ...] = ()  #: not compared: layout ops one side lacks (matched through), integer (shape) nodes
    regions: tuple[Region, ...] = ()  #: per layer pair, the nodes computing it (for sensitivity)
