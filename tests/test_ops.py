"""The operator table (qdiff.ops): its invariants, the sets the modules rely on, and the weight
channel axis checked against onnxruntime's real quantizer."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import finish, quantize
from qdiff import ops
from qdiff.ops import weight_channel_axis

KNOWN_FACTS = {
    "compute", "quantizable", "keeps_qparams", "integer_pass", "shares_qparams", "fusable", "layout",
    "moves_values", "commutative", "non_negative", "keeps_sign", "relu_like", "relu_host", "qdq", "integer",
    "runtime_layout",
}  # fmt: skip


def test_every_fact_is_documented_and_used():
    used = {f for facts in ops.FACTS.values() for f in facts}
    assert used == KNOWN_FACTS
    for fact in KNOWN_FACTS:
        assert f"``{fact}``" in ops.__doc__
        assert ops.ops_with(fact)


def test_unknown_fact_and_operator():
    with pytest.raises(KeyError):
        ops.ops_with("quantisable")
    assert ops.facts_of("NoSuchOp") == frozenset()
    assert "compute" in ops.facts_of("Conv")


def test_exported_names_exist():
    for name in ops.__all__:
        assert hasattr(ops, name), name


def test_compute_ops_are_quantizable_and_have_a_weight_input():
    assert ops.COMPUTE_OPS == {"Conv", "ConvTranspose", "Gemm", "MatMul"}
    assert ops.COMPUTE_OPS <= ops.QUANTIZABLE_OPS
    assert ops.COMPUTE_OPS <= ops.RELU_HOSTS
    assert ops.WEIGHT_INPUT == {op: 1 for op in ops.COMPUTE_OPS}


def test_derived_sets():
    assert ops.QDQ == {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
    assert ops.TRANSPARENT == ops.QDQ | {"Identity", "Cast"}
    assert ops.CONVERSION == ops.QDQ | {"Cast"}
    assert ops.RELU_LIKE == {"Relu", "Clip"}
    assert ops.EQUIVALENT == {"Gemm": "MatMul"}


def test_set_relations():
    # what integer kernels pass through keeps its quantization parameters
    assert ops.INTEGER_PASS <= ops.KEEPS_QPARAMS
    # the fallback units' value movers are quantized, and never compute
    assert ops.MOVES_VALUES <= ops.QUANTIZABLE_OPS | {"Identity"}
    assert not ops.MOVES_VALUES & ops.COMPUTE_OPS
    # quantizers fuse Relu/Clip by clipping: they are fusable, share qparams, and are non-negative
    assert ops.RELU_LIKE <= ops.FUSABLE & ops.SHARES_QPARAMS & ops.NON_NEGATIVE
    # the layout nodes onnxruntime inserts that a graph can also hold are layout nodes there
    assert ops.RUNTIME_LAYOUT & set(ops.FACTS) - {"ReorderInput", "ReorderOutput", "MemcpyToHost", "MemcpyFromHost"} <= ops.LAYOUT
    # QDQ, integer kernels and float operators are disjoint
    assert not ops.QDQ & ops.INTEGER_OPS
    assert not ops.QDQ & ops.QUANTIZABLE_OPS
    assert not ops.INTEGER_OPS & ops.QUANTIZABLE_OPS
    # every fused operator that keeps its output qparams computes on integers
    assert set(ops.QLINEAR_OUTPUT) <= ops.INTEGER_OPS
    # a fused Relu host of the integer kind is a QOperator
    assert ops.RELU_HOSTS - ops.COMPUTE_OPS == {"Add", "QLinearConv", "QGemm", "QLinearMatMul", "QLinearAdd"}


def test_sets_matching_relies_on():
    assert ops.LAYOUT == {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast"}
    assert ops.COMMUTATIVE == {"Add", "Mul", "Sum", "Max", "Min", "Mean"}
    assert ops.FUSABLE == {
        "Relu", "Clip", "LeakyRelu", "BatchNormalization", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
    }  # fmt: skip
    assert ops.KEEPS_QPARAMS == {
        "MaxPool", "GlobalMaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Gather",
        "Split", "Resize", "Pad", "DepthToSpace", "SpaceToDepth", "Expand", "Tile", "Identity", "ReduceMax", "ReduceMin",
    }  # fmt: skip


def test_sets_diagnose_relies_on():
    from qdiff.matching import QOP_SPECS

    assert ops.SHARES_QPARAMS == {
        "Relu", "Clip", "MaxPool", "GlobalMaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze",
        "Concat", "Slice", "Gather", "Split", "DepthToSpace", "SpaceToDepth", "Expand", "Tile",
    }  # fmt: skip
    assert ops.INTEGER_OPS == set(QOP_SPECS) | {
        "QLinearConcat", "QAttention", "QEmbedLayerNormalization", "QLinearWhere", "QLinearConvTranspose",
        "DynamicQuantizeLSTM", "QOrderedMatMul", "MatMulNBits", "QLinearGlobalAveragePool",
    }  # fmt: skip


def test_sets_units_and_quantize_rely_on():
    assert ops.MOVES_VALUES == {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Gather", "Split", "Identity", "Pad"}
    assert ops.QUANTIZABLE_OPS == {
        "AveragePool", "BatchNormalization", "Clip", "Concat", "Conv", "ConvTranspose", "CumSum", "Flatten", "Gather",
        "GatherElements", "Gemm", "GlobalAveragePool", "InstanceNormalization", "LayerNormalization", "LeakyRelu",
        "MatMul", "MaxPool", "Mul", "Add", "Pad", "Relu", "Reshape", "Resize", "Sigmoid", "Slice", "Softmax", "Split",
        "Squeeze", "TopK", "Transpose", "Unsqueeze", "Where", "ArgMax",
    }  # fmt: skip


def test_quantizable_ops_are_in_onnxruntimes_registries():
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    registered = set(QDQRegistry) | set(QLinearOpsRegistry)
    assert ops.QUANTIZABLE_OPS <= registered


@pytest.mark.parametrize(
    ("op", "pos", "ndim", "trans_b", "output", "ort"),
    [
        ("Conv", 1, 4, 0, 0, 0),
        ("ConvTranspose", 1, 4, 0, 1, 1),
        ("Gemm", 1, 2, 0, 1, 1),
        ("Gemm", 1, 2, 1, 0, 0),
        ("MatMul", 1, 2, 0, 1, 1),
        ("MatMul", 1, 3, 0, 2, 1),
        ("MatMul", 0, 2, 0, 0, 1),
        ("MatMul", 0, 3, 0, 1, 1),
        ("Conv", 0, 4, 0, None, None),  # not a weight position
        ("Conv", 2, 1, 0, None, None),  # a bias
        ("Relu", 1, 2, 0, None, None),  # not a compute layer
        ("MatMul", 1, 1, 0, None, None),  # one axis
    ],
)
def test_weight_channel_axis(op, pos, ndim, trans_b, output, ort):
    assert weight_channel_axis(op, pos, ndim, trans_b) == output
    assert weight_channel_axis(op, pos, ndim, trans_b, convention="output") == output
    assert weight_channel_axis(op, pos, ndim, trans_b, convention="onnxruntime") == ort


def _layer(op: str, ndim: int, trans_b: int, rng: np.random.Generator) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A one-layer model whose weight (input 1) has ``ndim`` axes of distinct sizes."""
    if op == "Conv":
        x, w, y = [1, 3, 6, 6], [5, 3, 3, 3], [1, 5, 4, 4]
        node = helper.make_node("Conv", ["x", "w"], ["y"], name="layer")
    elif op == "ConvTranspose":
        x, w, y = [1, 3, 4, 4], [3, 5, 3, 3], [1, 5, 6, 6]
        node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="layer")
    elif op == "Gemm":
        x, w, y = [2, 3], ([5, 3] if trans_b else [3, 5]), [2, 5]
        node = helper.make_node("Gemm", ["x", "w"], ["y"], name="layer", transB=trans_b)
    elif ndim == 2:
        x, w, y = [2, 3], [3, 5], [2, 5]
        node = helper.make_node("MatMul", ["x", "w"], ["y"], name="layer")
    else:
        x, w, y = [4, 2, 3], [4, 3, 5], [4, 2, 5]
        node = helper.make_node("MatMul", ["x", "w"], ["y"], name="layer")
    weight = numpy_helper.from_array(rng.normal(size=w).astype(np.float32), "w")
    graph = helper.make_graph(
        [node], "one_layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y)], [weight],
    )  # fmt: skip
    feeds = [{"x": rng.normal(size=x).astype(np.float32)} for _ in range(4)]
    return finish(graph), feeds


@pytest.mark.parametrize(
    ("op", "ndim", "trans_b"),
    [("Conv", 4, 0), ("ConvTranspose", 4, 0), ("Gemm", 2, 0), ("Gemm", 2, 1), ("MatMul", 2, 0), ("MatMul", 3, 0)],
)
def test_onnxruntime_convention_is_quantize_statics_axis(tmp_path, op, ndim, trans_b):
    """The axis of the weight's per-channel DequantizeLinear that quantize_static writes."""
    model, feeds = _layer(op, ndim, trans_b, np.random.default_rng(0))
    onnx.save(model, tmp_path / "float.onnx")
    quantize(tmp_path / "float.onnx", tmp_path / "int8.onnx", feeds, per_channel=True)
    qm = onnx.load(tmp_path / "int8.onnx")
    inits = {t.name: t for t in qm.graph.initializer}
    dq = next(
        n for n in qm.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and len(inits[n.input[0]].dims) == ndim
    )  # fmt: skip
    scale = numpy_helper.to_array(inits[dq.input[1]])
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    assert scale.size > 1, "quantized per channel"
    assert scale.size == inits[dq.input[0]].dims[axis]
    assert weight_channel_axis(op, 1, ndim, trans_b, convention="onnxruntime") == axis
