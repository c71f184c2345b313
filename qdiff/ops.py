"""Facts about ONNX and onnxruntime operators, in one table.

Every operator set qdiff reasons with is derived from :data:`FACTS` (operator type -> the facts
that hold for it), so a new operator is described once and the sets cannot drift apart. The sets
differ on purpose where the facts differ; the table shows where:

==================  ===========================================================================
fact                meaning (who reads it)
==================  ===========================================================================
``compute``         a layer that multiplies by a weight or a second activation: Conv,
                    ConvTranspose, Gemm, MatMul (fallback units, MAC counts, weight checks)
``quantizable``     onnxruntime's static quantizer quantizes it (QDQ and QOperator registries)
``keeps_qparams``   an int8 kernel runs it on the quantized values, output scale and zero point
                    equal to the input's, so matching may look through it (matching)
``integer_pass``    onnxruntime runs it on the integers once its Q/DQ pair is dropped; a tap
                    behind it inherits its input's scale (the prefused engine's taps)
``shares_qparams``  an int8 implementation passes quantized values through, so input and output
                    must carry the same scale and zero point (Concat: every input); diagnose
                    checks they do. Relu/Clip are here: a quantizer fuses them by clipping
``fusable``         a float activation or normalisation a quantizer folds into the node before
                    it; the chain's end is the layer (matching)
``layout``          only moves values; one model may have it where the other does not (matching,
                    the diagnose checks that look through copies)
``moves_values``    quantized, but only moves or selects int8 values: never a fallback unit's
                    reason on its own (units)
``commutative``     inputs may be swapped (matching)
``non_negative``    the output is never negative (passes: a Relu after it changes nothing)
``keeps_sign``      the output is non-negative when the data input is (Concat: all inputs)
``relu_like``       Relu and Clip, what quantizers fuse into the layer before
``relu_host``       a producer quantizers fuse a following Relu/Clip into
``qdq``             quantize/dequantize nodes
``integer``         computes on integer tensors with its own kernel (QOperator and contrib ops)
``runtime_layout``  a layout node onnxruntime inserts while optimising (profile attribution)
==================  ===========================================================================
"""

from __future__ import annotations

__all__ = [
    "FACTS", "ops_with", "facts_of", "COMPUTE_OPS", "WEIGHT_INPUT", "QUANTIZABLE_OPS", "KEEPS_QPARAMS",
    "INTEGER_PASS", "SHARES_QPARAMS", "FUSABLE", "LAYOUT", "MOVES_VALUES", "COMMUTATIVE", "NON_NEGATIVE",
    "KEEPS_SIGN", "RELU_LIKE", "RELU_HOSTS", "QDQ", "CONVERSION", "TRANSPARENT", "INTEGER_OPS",
    "RUNTIME_LAYOUT", "EQUIVALENT", "QLINEAR_OUTPUT", "weight_channel_axis",
]  # fmt: skip

_ROWS: dict[str, str] = {
    "Abs": "non_negative",
    "Add": "quantizable commutative relu_host",
    "ArgMax": "quantizable",
    "AveragePool": "quantizable keeps_sign",
    "BatchNormalization": "quantizable fusable",
    "Cast": "layout",
    "Clip": "quantizable shares_qparams fusable non_negative relu_like",
    "Concat": "quantizable shares_qparams keeps_sign",
    "Conv": "compute quantizable relu_host",
    "ConvInteger": "integer",
    "ConvTranspose": "compute quantizable relu_host",
    "CumSum": "quantizable",
    "DepthToSpace": "keeps_qparams integer_pass shares_qparams keeps_sign",
    "DequantizeLinear": "qdq",
    "DynamicQuantizeLSTM": "integer",
    "DynamicQuantizeLinear": "qdq",
    "DynamicQuantizeMatMul": "integer",
    "Elu": "fusable",
    "Exp": "non_negative",
    "Expand": "keeps_qparams integer_pass shares_qparams keeps_sign",
    "Flatten": "quantizable keeps_qparams integer_pass shares_qparams layout moves_values keeps_sign runtime_layout",
    "Gather": "quantizable keeps_qparams integer_pass shares_qparams moves_values keeps_sign",
    "GatherElements": "quantizable",
    "Gemm": "compute quantizable relu_host",
    "GlobalAveragePool": "quantizable keeps_sign",
    "GlobalMaxPool": "keeps_qparams shares_qparams keeps_sign",
    "HardSigmoid": "fusable non_negative",
    "HardSwish": "fusable",
    "Identity": "keeps_qparams integer_pass layout moves_values keeps_sign",
    "InstanceNormalization": "quantizable",
    "LayerNormalization": "quantizable",
    "LeakyRelu": "quantizable fusable",
    "MatMul": "compute quantizable relu_host",
    "MatMulInteger": "integer",
    "MatMulIntegerToFloat": "integer",
    "MatMulNBits": "integer",
    "Max": "commutative",
    "MaxPool": "quantizable keeps_qparams integer_pass shares_qparams keeps_sign",
    "Mean": "commutative",
    "MemcpyFromHost": "runtime_layout",
    "MemcpyToHost": "runtime_layout",
    "Min": "commutative",
    "Mul": "quantizable commutative",
    "Pad": "quantizable keeps_qparams moves_values",
    "QAttention": "integer",
    "QEmbedLayerNormalization": "integer",
    "QGemm": "relu_host integer",
    "QLinearAdd": "relu_host integer",
    "QLinearAveragePool": "integer",
    "QLinearConcat": "integer",
    "QLinearConv": "relu_host integer",
    "QLinearConvTranspose": "integer",
    "QLinearGlobalAveragePool": "integer",
    "QLinearLeakyRelu": "integer",
    "QLinearMatMul": "relu_host integer",
    "QLinearMul": "integer",
    "QLinearReduceMean": "integer",
    "QLinearSigmoid": "integer",
    "QLinearSoftmax": "integer",
    "QLinearWhere": "integer",
    "QOrderedMatMul": "integer",
    "QuantizeLinear": "qdq",
    "ReduceMax": "keeps_qparams keeps_sign",
    "ReduceMean": "keeps_sign",
    "ReduceMin": "keeps_qparams keeps_sign",
    "Relu": "quantizable shares_qparams fusable non_negative relu_like",
    "ReorderInput": "runtime_layout",
    "ReorderOutput": "runtime_layout",
    "Reshape": "quantizable keeps_qparams integer_pass shares_qparams layout moves_values keeps_sign runtime_layout",
    "Resize": "quantizable keeps_qparams integer_pass keeps_sign",
    "Selu": "fusable",
    "Sigmoid": "quantizable fusable non_negative",
    "Slice": "quantizable keeps_qparams integer_pass shares_qparams moves_values keeps_sign",
    "Softmax": "quantizable non_negative",
    "Softplus": "non_negative",
    "SpaceToDepth": "keeps_qparams integer_pass shares_qparams keeps_sign",
    "Split": "quantizable keeps_qparams integer_pass shares_qparams moves_values keeps_sign",
    "Sqrt": "non_negative",
    "Squeeze": "quantizable keeps_qparams integer_pass shares_qparams layout moves_values keeps_sign runtime_layout",
    "Sum": "commutative",
    "Tanh": "fusable",
    "Tile": "keeps_qparams integer_pass shares_qparams keeps_sign",
    "TopK": "quantizable",
    "Transpose": "quantizable keeps_qparams integer_pass shares_qparams layout moves_values keeps_sign runtime_layout",
    "Unsqueeze": "quantizable keeps_qparams integer_pass shares_qparams layout moves_values keeps_sign runtime_layout",
    "Upsample": "keeps_sign",
    "Where": "quantizable",
}

#: operator type -> the facts that hold for it (see the module docstring)
FACTS: dict[str, frozenset[str]] = {op: frozenset(facts.split()) for op, facts in _ROWS.items()}


def ops_with(fact: str) -> frozenset[str]:
    """The operator types for which ``fact`` holds."""
    known = {f for facts in FACTS.values() for f in facts}
    if fact not in known:
        raise KeyError(f"unknown operator fact {fact!r}")
    return frozenset(op for op, facts in FACTS.items() if fact in facts)


def facts_of(op_type: str) -> frozenset[str]:
    """The facts recorded for ``op_type`` (empty for an operator the table does not list)."""
    return FACTS.get(op_type, frozenset())


COMPUTE_OPS = ops_with("compute")
#: the input index of a compute layer's weight
WEIGHT_INPUT = {op: 1 for op in COMPUTE_OPS}
QUANTIZABLE_OPS = ops_with("quantizable")
KEEPS_QPARAMS = ops_with("keeps_qparams")
INTEGER_PASS = ops_with("integer_pass")
SHARES_QPARAMS = ops_with("shares_qparams")
FUSABLE = ops_with("fusable")
LAYOUT = ops_with("layout")
MOVES_VALUES = ops_with("moves_values")
COMMUTATIVE = ops_with("commutative")
NON_NEGATIVE = ops_with("non_negative")
KEEPS_SIGN = ops_with("keeps_sign")
RELU_LIKE = ops_with("relu_like")
RELU_HOSTS = ops_with("relu_host")
QDQ = ops_with("qdq")
#: conversion kernels in a profile: Q/DQ and Cast
CONVERSION = QDQ | {"Cast"}
#: nodes the diagnose checks look through when following a tensor
TRANSPARENT = QDQ | {"Identity", "Cast"}
INTEGER_OPS = ops_with("integer")
RUNTIME_LAYOUT = ops_with("runtime_layout")

#: operators treated as the same layer type on both sides of a match
EQUIVALENT = {"Gemm": "MatMul"}

#: where a fused quantized operator keeps its output scale and zero point (input indices)
QLINEAR_OUTPUT = {
    "QLinearConv": (6, 7), "QLinearMatMul": (6, 7), "QLinearAdd": (6, 7), "QLinearMul": (6, 7),
    "QLinearGlobalAveragePool": (3, 4), "QLinearAveragePool": (3, 4), "QLinearLeakyRelu": (3, 4),
    "QLinearSigmoid": (3, 4), "QLinearConcat": (0, 1), "QGemm": (7, 8), "QLinearSoftmax": (3, 4),
}  # fmt: skip


def weight_channel_axis(op_type: str, pos: int, ndim: int, trans_b: int = 0, *, convention: str = "output") -> int | None:
    """The per-channel axis of input ``pos`` (of rank ``ndim``) of a compute layer.

    ``convention="output"``: the axis of the layer's output channels — Conv weight 0,
    ConvTranspose weight 1, Gemm B 0 with ``transB`` else 1, MatMul B the last axis and MatMul A
    the second to last. ``convention="onnxruntime"``: the axis onnxruntime's quantizer uses by
    default for a per-channel weight, which is the same except that MatMul is always axis 1 (the
    output axis of a 2-D weight; not of a batched N-D one). None where the input is not a weight
    position of a compute layer or has fewer than two axes.
    """
    if ndim < 2 or op_type not in COMPUTE_OPS:
        return None
    if op_type == "MatMul":
        if convention == "onnxruntime":
            return 1
        return ndim - 1 if pos == 1 else ndim - 2 if pos == 0 else None
    if pos != 1:
        return None
    if op_type == "Conv":
        return 0
    if op_type == "ConvTranspose":
        return 1
    return 0 if trans_b else 1  # Gemm
