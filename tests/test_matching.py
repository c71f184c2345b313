"""Matching on what onnxruntime's quantizer really produces: each case asserts the pairs found."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import conv_feeds, conv_net, finish, quantize, strip_names, two_heads
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic

from qdiff import Graph, MatchMethod, match_models

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def _match(float_path, quant_path):
    return match_models(Graph(onnx.load(str(float_path))), Graph(onnx.load(str(quant_path))))


def _pairs(m):
    return {p.layer: (p.op_type, p.float_tensor, p.quant_tensor) for p in m.pairs}


@pytest.fixture(scope="module")
def conv_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("conv")
    f = d / "f.onnx"
    conv_net(f)
    feeds = conv_feeds()
    out = {"float": f}
    out["qdq"] = quantize(f, d / "qdq.onnx", feeds, quant_format=QuantFormat.QDQ, per_channel=True)
    out["qop"] = quantize(
        f, d / "qop.onnx", feeds, quant_format=QuantFormat.QOperator, activation_type=QuantType.QUInt8
    )
    quantize_dynamic(str(f), str(d / "dyn.onnx"))
    m = onnx.load(str(d / "dyn.onnx"))
    m.ir_version = 10
    onnx.save(m, str(d / "dyn.onnx"))
    out["dyn"] = d / "dyn.onnx"
    return out


def test_qdq_fused_relu_is_one_layer_on_the_relu_tensor(conv_models):
    m = _match(conv_models["float"], conv_models["qdq"])
    assert _pairs(m) == {
        "input:x": ("Input", "x", "x_DequantizeLinear_Output"),
        "conv1+relu1": ("Conv+Relu", "r1", "r1_DequantizeLinear_Output"),
        "pool1": ("MaxPool", "p1", "p1_DequantizeLinear_Output"),
        "flat": ("Flatten", "f", "f_DequantizeLinear_Output"),
        # the graph output was renamed y_QuantizeLinear_Input upstream of its Q/DQ; its DQ writes 'y'
        "fc": ("Gemm", "y", "y"),
    }
    assert m.unmatched == ()
    assert [p.layer for p in m.pairs] == ["input:x", "conv1+relu1", "pool1", "flat", "fc"]  # topological
    assert all(p.dequant is None for p in m.pairs)  # float-domain taps after DequantizeLinear
    assert [o.float_tensor for o in m.outputs] == ["y"]


def test_qoperator_conv_output_named_after_conv_is_paired_with_relu(conv_models):
    """QLinearConv writes 'c1_quantized' but holds relu(c1): it must be paired with r1, not c1."""
    m = _match(conv_models["float"], conv_models["qop"])
    pairs = _pairs(m)
    assert pairs["conv1+relu1"] == ("Conv+Relu", "r1", "c1_quantized")
    assert pairs["pool1"] == ("MaxPool", "p1", "p1_quantized")
    assert pairs["flat"] == ("Flatten", "f", "f_quantized")
    assert pairs["fc"][1:] == ("y", "y")
    assert "c1" not in {p.float_tensor for p in m.pairs}
    conv = next(p for p in m.pairs if p.layer == "conv1+relu1")
    qm = onnx.load(str(conv_models["qop"]))
    inits = {t.name: numpy_helper.to_array(t) for t in qm.graph.initializer}
    # the integer tap is dequantized with the QLinearConv's own output scale and zero point
    assert conv.dequant is not None
    assert conv.dequant.scale == pytest.approx(inits["c1_scale"])
    assert conv.dequant.zero_point == inits["c1_zero_point"]
    # MaxPool runs on uint8 and keeps its input's scale
    pool = next(p for p in m.pairs if p.layer == "pool1")
    assert pool.dequant.scale == pytest.approx(inits["c1_scale"])
    assert m.unmatched == ()


def test_dynamic_quantization_rescale_chain_is_folded(conv_models):
    m = _match(conv_models["float"], conv_models["dyn"])
    pairs = _pairs(m)
    # ConvInteger -> Cast -> Mul(scale) -> Add(bias) writes c1: the float layer conv1 is that chain
    assert pairs["conv1"] == ("Conv", "c1", "c1")
    assert pairs["relu1"] == ("Relu", "r1", "r1")
    # Gemm became MatMulInteger + Cast + Mul + Add
    assert pairs["fc"] == ("Gemm", "y", "y")
    # the int32 accumulators are never tapped
    assert not any(p.quant_tensor.endswith("_quantized") for p in m.pairs)
    roles = {(w.layer, w.role) for w in m.weights}
    assert ("conv1", "weight") in roles and ("fc", "weight") in roles


def test_weights_are_dequantized_per_channel(conv_models):
    m = _match(conv_models["float"], conv_models["qdq"])
    w = next(w for w in m.weights if w.layer == "conv1+relu1" and w.role == "weight")
    assert w.granularity == "per-channel (axis 0)"
    qm = onnx.load(str(conv_models["qdq"]))
    inits = {t.name: numpy_helper.to_array(t) for t in qm.graph.initializer}
    scale = inits["W1_scale"]
    assert scale.shape == (4,)
    # independent dequantization: (q - zp) * scale per output channel
    expect = (inits["W1_quantized"].astype(np.float32) - inits["W1_zero_point"].reshape(4, 1, 1, 1)) * scale.reshape(
        4, 1, 1, 1
    )
    np.testing.assert_allclose(w.quant_value, expect, rtol=0, atol=0)
    fm = onnx.load(str(conv_models["float"]))
    w1 = numpy_helper.to_array(next(t for t in fm.graph.initializer if t.name == "W1"))
    # rounding error of a per-channel int8 weight is at most half a step of its channel
    assert np.all(np.abs(w.quant_value - w1) <= scale.reshape(4, 1, 1, 1) / 2 + 1e-7)
    fc = next(w for w in m.weights if w.layer == "fc" and w.role == "weight")
    assert fc.quant_value.shape == fc.float_value.shape == (10, 64)


def test_weights_stored_as_constant_nodes(tmp_path):
    f = tmp_path / "f.onnx"
    conv_net(f, constant_weights=True)
    q = quantize(f, tmp_path / "q.onnx", conv_feeds(), quant_format=QuantFormat.QDQ, per_channel=True)
    m = _match(f, q)
    layers = _pairs(m)
    assert "conv1+relu1" in layers and "fc" in layers, layers
    assert {w.float_tensor for w in m.weights} >= {"W1", "W2"}
    for w in m.weights:
        assert np.abs(w.float_value - w.quant_value).max() < 0.05


def test_hand_made_qdq_with_constant_node_weights(tmp_path):
    """Quantized weights held by Constant nodes (not initializers) read through DequantizeLinear."""
    rng = np.random.default_rng(3)
    w = rng.normal(0, 1, (4, 3)).astype(np.float32)
    scale = np.float32(np.abs(w).max() / 127)
    wq = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    f = tmp_path / "f.onnx"
    finish(
        helper.make_graph(
            [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
            [numpy_helper.from_array(w, "W")],
        ),
        f,
    )
    const = lambda name, v: helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(v), name))  # noqa: E731
    q = tmp_path / "q.onnx"
    finish(
        helper.make_graph(
            [
                const("wq", wq),
                const("ws", scale),
                const("wz", np.int8(0)),
                helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w_dq"]),
                const("xs", np.float32(0.02)),
                const("xz", np.int8(0)),
                helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["x_q"]),
                helper.make_node("DequantizeLinear", ["x_q", "xs", "xz"], ["x_dq"]),
                helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"], name="matmul_q"),
            ],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        ),
        q,
    )
    m = _match(f, q)
    assert _pairs(m) == {"input:x": ("Input", "x", "x_dq"), "mm": ("MatMul", "y", "y")}
    (wp,) = m.weights
    np.testing.assert_array_equal(wp.quant_value, wq.astype(np.float32) * scale)
    assert wp.granularity == "per-tensor"


def test_sample_cnn_every_layer_matched_in_every_variant():
    float_names = ["conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "flatten", "fc1", "relu3", "fc2"]
    f = SAMPLES / "digits_cnn.float.onnx"
    for variant in ("qdq_per_channel", "qdq_per_tensor", "qoperator", "dynamic", "fp16"):
        m = _match(f, SAMPLES / f"digits_cnn.{variant}.onnx")
        covered = [n for p in m.pairs if not p.layer.startswith("input:") for n in p.layer.split("+")]
        assert sorted(covered) == sorted(float_names), variant
        assert [u for u in m.unmatched if u.side == "float"] == [], variant


def test_fp16_casts_are_pass_through():
    m = _match(SAMPLES / "transformer.float.onnx", SAMPLES / "transformer.fp16.onnx")
    assert m.unmatched == ()
    by_layer = _pairs(m)
    assert by_layer["attn_softmax"] == ("Softmax", "attn_probs", "attn_probs")
    assert by_layer["ln1"][0] == "LayerNormalization"


def test_multi_output_intermediate_output(tmp_path):
    m = _match(SAMPLES / "multi_output.float.onnx", SAMPLES / "multi_output.qdq.onnx")
    pairs = {p.layer: p for p in m.pairs}
    # relu2 was fused into conv2 and its tensor 'features' is both a graph output and pool2's input
    assert pairs["conv2+relu2"].float_tensor == "features"
    assert pairs["conv2+relu2"].quant_tensor == "features"
    assert pairs["conv2+relu2"].is_output
    assert pairs["pool2"].float_tensor == "pool2_out"
    assert [o.float_tensor for o in m.outputs] == ["features", "logits"]


def test_same_structure_resolved_by_weights_when_names_are_gone(tmp_path):
    f = tmp_path / "f.onnx"
    two_heads(f)
    q = quantize(f, tmp_path / "q.onnx", [{"x": np.random.default_rng(i).normal(size=(1, 8)).astype(np.float32)} for i in range(8)])
    stripped = strip_names(q, tmp_path / "q_stripped.onnx")
    m = _match(f, stripped)
    pairs = {p.layer: p for p in m.pairs}
    assert set(pairs) >= {"head_a", "head_b", "combine"}
    assert {pairs["head_a"].method, pairs["head_b"].method} <= {MatchMethod.WEIGHTS, MatchMethod.STRUCTURE}
    assert MatchMethod.WEIGHTS in {pairs["head_a"].method, pairs["head_b"].method}
    # the pairing is right: each head's quantized weight is closest to its own float weight
    for w in m.weights:
        assert np.abs(w.float_value - w.quant_value).max() < 0.05, w.layer


def test_identical_candidates_are_interchangeable(tmp_path):
    """Two heads with equal weights read one tensor: they compute the same values, so with the
    names gone either pairing is right (issue 16 item 9: not 'ambiguous')."""
    f = tmp_path / "f.onnx"
    two_heads(f, same_weights=True)
    q = quantize(f, tmp_path / "q.onnx", [{"x": np.random.default_rng(i).normal(size=(1, 8)).astype(np.float32)} for i in range(8)])
    stripped = strip_names(q, tmp_path / "q_stripped.onnx")
    m = _match(f, stripped)
    assert {"head_a", "head_b", "combine"} <= {p.layer for p in m.pairs}
    assert m.unmatched == ()


def test_indistinguishable_candidates_are_reported_not_guessed(tmp_path):
    """The float heads differ (u + v, u - v with v orthogonal to u), the quantized model's weights
    (u) fit both equally: structure, names and weights cannot tell, and nothing is guessed."""
    rng = np.random.default_rng(3)
    u, v = rng.normal(size=64), rng.normal(size=64)
    v -= (v @ u) / (u @ u) * u
    f, middle = tmp_path / "f.onnx", tmp_path / "middle.onnx"
    for path, (wa, wb) in ((f, (u + v, u - v)), (middle, (u, u))):
        model = two_heads(path)
        for init in model.graph.initializer:
            init.CopyFrom(numpy_helper.from_array({"Wa": wa, "Wb": wb}[init.name].reshape(8, 8).astype(np.float32), init.name))
        onnx.save(model, str(path))
    q = quantize(middle, tmp_path / "q.onnx", [{"x": np.random.default_rng(i).normal(size=(1, 8)).astype(np.float32)} for i in range(8)])
    stripped = strip_names(q, tmp_path / "q_stripped.onnx")
    m = _match(f, stripped)
    assert not any(p.layer in ("head_a", "head_b") for p in m.pairs)
    reasons = [u.reason for u in m.unmatched]
    assert any(r.startswith("ambiguous") for r in reasons), reasons
    float_unmatched = {u.name for u in m.unmatched if u.side == "float"}
    assert {"head_a", "head_b"} <= float_unmatched


def test_unmatched_nodes_listed_with_reasons(tmp_path):
    """A float node the other model lacks, and a node only the other model has."""
    f = tmp_path / "f.onnx"
    q = tmp_path / "q.onnx"
    io = (
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    shape = numpy_helper.from_array(np.array([1, 4], dtype=np.int64), "shape")
    finish(
        helper.make_graph(
            [
                helper.make_node("Relu", ["x"], ["r"], name="relu"),
                helper.make_node("Concat", ["shape", "shape"], ["s2"], name="shape_math", axis=0),
                helper.make_node("Sigmoid", ["r"], ["y"], name="sig"),
            ],
            "g", *io, [shape],
        ),
        f,
    )  # fmt: skip
    finish(
        helper.make_graph(
            [
                helper.make_node("Relu", ["x"], ["r"], name="relu"),
                helper.make_node("Tanh", ["r"], ["t"], name="extra_tanh"),
                helper.make_node("Sigmoid", ["t"], ["y"], name="sig"),
            ],
            "g", *io,
        ),
        q,
    )  # fmt: skip
    m = _match(f, q)
    assert _pairs(m) == {"relu": ("Relu", "r", "r")}
    um = {(u.side, u.name): u.reason for u in m.unmatched}
    assert "no unpaired float Tanh" in um[("quant", "extra_tanh")]
    assert "has no float counterpart" in um[("quant", "sig")]
    assert "no quantized node of type Sigmoid" in um[("float", "sig")]
    # the final output is still compared, by name
    assert [o.float_tensor for o in m.outputs] == ["y"]


def test_deep_graph_matches_without_recursion_limits(tmp_path):
    """3,000 layers deep: matching is iterative and roughly linear."""
    import time

    n = 3000
    nodes = [helper.make_node("Relu" if k % 2 else "Neg", [f"t{k}"], [f"t{k + 1}"], name=f"n{k}") for k in range(n)]
    io = (
        [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info(f"t{n}", TensorProto.FLOAT, [1, 4])],
    )
    f = helper.make_model(helper.make_graph(nodes, "deep", *io), opset_imports=[helper.make_opsetid("", 17)])
    start = time.perf_counter()
    m = match_models(Graph(f), Graph(f))
    assert time.perf_counter() - start < 30
    assert len(m.pairs) == n and m.unmatched == ()


def test_weigh_reduces_each_weight_as_found_and_drops_its_values():
    """match_models(weigh=...) hands every weight pair over with its values and keeps only what it
    returned: compare's weight table is the same as from the values held to the end."""
    from qdiff._compare import _weight_row, _weights_frame

    fg = Graph(onnx.load(SAMPLES / "digits_cnn.float.onnx"))
    qg = Graph(onnx.load(SAMPLES / "digits_cnn.qdq_per_channel.onnx"))
    held = match_models(fg, qg)
    seen = []
    weighed = match_models(fg, qg, weigh=lambda w: (seen.append(w.float_value is not None), _weight_row(w))[1])
    assert len(held.weights) == len(weighed.weights) == len(seen) >= 4 and all(seen)
    assert all(w.float_value is None and w.quant_value is None and w.row for w in weighed.weights)
    assert all(w.float_value is not None and w.row is None for w in held.weights)
    assert _weights_frame(held.weights).equals(_weights_frame(weighed.weights))
    assert [p.float_tensor for p in held.pairs] == [p.float_tensor for p in weighed.pairs]


@pytest.mark.parametrize("name", ["digits_cnn.qdq_per_channel", "transformer.qdq", "digits_cnn.qoperator"])
def test_shape_inference_without_weight_data_gives_the_full_models_shapes(name, monkeypatch):
    """Graph infers shapes on a copy whose large initializers have no data: the same types and
    shapes as inference on the whole model, and constants still read from the model."""
    from qdiff import graph as graph_module

    model = onnx.load(SAMPLES / f"{name}.onnx")
    full = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    monkeypatch.setattr(graph_module, "_SKELETON_BYTES", 64)  # every weight of these small models left out
    g = Graph(model)
    want = {vi.name: vi.type for vi in full.graph.value_info}
    got = {vi.name: vi.type for vi in g.model.graph.value_info}
    assert want and got == want
    big = next(t for t in model.graph.initializer if len(t.raw_data) > 64)
    np.testing.assert_array_equal(g.const_value(big.name), numpy_helper.to_array(big))


def test_weight_channel_axis_of_the_weights_table():
    from onnx import helper

    from qdiff.matching import _channel_axis

    mm = helper.make_node("MatMul", ["a", "b"], ["y"])
    gemm = helper.make_node("Gemm", ["a", "b"], ["y"], transB=1)
    # a constant first input of MatMul is read along its last axis, like its weight
    assert [_channel_axis(mm, pos, 2) for pos in (0, 1)] == [1, 1]
    assert [_channel_axis(mm, pos, 3) for pos in (0, 1)] == [2, 2]
    assert _channel_axis(mm, 0, 1) is None
    assert _channel_axis(gemm, 1, 2) == 0 and _channel_axis(gemm, 2, 1) is None
    assert _channel_axis(helper.make_node("ConvTranspose", ["x", "w"], ["y"]), 1, 4) == 1
