"""Matching that must survive what re-exports and other quantizers do (issue 16, items 9 and 10):
identical nodes, shape subgraphs, DynamicQuantizeLSTM, Relus folded into the quantization."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import lstm_net, quantize, shape_feeds, shape_reshape_net, strip_names
from onnx import helper, numpy_helper
from onnxruntime.quantization import QuantFormat, quantize_dynamic

import qdiff
from qdiff import Graph, match_models

COMPUTE = {"Conv", "MatMul", "Gemm", "LSTM"}


def _match(f, q):
    return match_models(Graph(onnx.load(str(f))), Graph(onnx.load(str(q))))


def _float_layers(m) -> set[str]:
    return {n for p in m.pairs if not p.layer.startswith("input:") for n in p.layer.split("+")}


@pytest.fixture(scope="module")
def shape_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    f = d / "f.onnx"
    shape_reshape_net(f)
    q = quantize(f, d / "q.onnx", shape_feeds(), quant_format=QuantFormat.QDQ, per_channel=True)
    return d, f, q


def test_identical_shape_nodes_are_interchangeable_not_ambiguous(shape_models):
    """Two Shape nodes of one tensor tie on structure; with the names gone (a re-export) the tie
    used to be 'ambiguous' and every layer after the Reshape it feeds went unmatched."""
    d, f, q = shape_models
    renamed = strip_names(q, d / "renamed.onnx")
    for quant in (q, renamed):
        m = _match(f, quant)
        assert not [u for u in m.unmatched if "ambiguous" in u.reason]
        assert m.unmatched == ()
        assert {"conv", "reshape", "swap", "head", "flat"} <= _float_layers(m)
        # the integer shape nodes are paired but not compared: skipped, not failures
        assert {u.name for u in m.skipped if u.side == "float"} == {
            "shape_a", "shape_b", "take_nc", "take_n", "new_shape", "out_shape"
        }  # fmt: skip
        assert all("integer" in u.reason for u in m.skipped)
        # ... and paired: every quantized shape node found its float twin (none skipped as unpaired)
        assert all("is not a float tensor" in u.reason for u in m.skipped), m.skipped


def test_identical_nodes_paired_crosswise_still_tell_their_consumers_apart(shape_models):
    """The quantized model lists the two Shape nodes in the other order: whichever float Shape
    each is paired with, the Slice and Gather after them find their own float twin (constants
    compared), and nothing is reported unmatched."""
    d, f, q = shape_models
    model = onnx.load(str(strip_names(q, d / "renamed2.onnx")))
    nodes = list(model.graph.node)
    shapes = [k for k, n in enumerate(nodes) if n.op_type == "Shape"]
    nodes[shapes[0]], nodes[shapes[1]] = nodes[shapes[1]], nodes[shapes[0]]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    m = match_models(Graph(onnx.load(str(f))), Graph(model))
    assert m.unmatched == ()
    assert {"conv", "reshape", "swap", "head", "flat"} <= _float_layers(m)
    assert all(u.side == "float" and "is not a float tensor" in u.reason for u in m.skipped), m.skipped


def test_float_layers_are_not_gated_by_an_unmatched_shape_subgraph(shape_models):
    """Another exporter computes the shape differently (Slice where the float model has Gather):
    that integer subgraph has no float twin, yet the Reshape it feeds is matched by its float
    input, and the unmatched integer nodes are listed as skipped, not as failed layers."""
    d, f, q = shape_models
    model = onnx.load(str(strip_names(q, d / "renamed3.onnx")))
    nodes = list(model.graph.node)
    k = next(k for k, n in enumerate(nodes) if n.op_type == "Gather")
    gather = nodes[k]
    one = numpy_helper.from_array(np.array([1], np.int64), "one_for_slice")
    model.graph.initializer.append(one)
    nodes[k] = helper.make_node("Slice", [gather.input[0], gather.input[1], "one_for_slice"], list(gather.output), name="other_exporter_slice")
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    m = match_models(Graph(onnx.load(str(f))), Graph(model))
    assert {"conv", "reshape", "swap", "head", "flat"} <= _float_layers(m)
    assert not [u for u in m.unmatched if u.op_type in COMPUTE | {"Reshape", "Transpose"}]
    assert m.unmatched == ()
    skipped = {(u.side, u.op_type) for u in m.skipped}
    assert ("float", "Gather") in skipped and ("quant", "Slice") in skipped
    assert ("quant", "Concat") in skipped  # the integer Concat fed by the unmatched Slice


def test_dynamic_quantize_lstm_matches_the_float_lstm(tmp_path):
    f, q = tmp_path / "f.onnx", tmp_path / "dyn.onnx"
    lstm_net(f)
    quantize_dynamic(str(f), str(q))
    qm = onnx.load(str(q))
    assert "DynamicQuantizeLSTM" in {n.op_type for n in qm.graph.node}
    qm.ir_version = 10
    onnx.save(qm, str(q))
    m = _match(f, q)
    assert not [u for u in m.unmatched if u.op_type in COMPUTE | {"DynamicQuantizeLSTM", "MatMulInteger"}]
    assert {p.layer: p.float_tensor for p in m.pairs if p.op_type == "LSTM"} == {"lstm:0": "Y", "lstm:1": "Y_h", "lstm:2": "Y_c"}
    assert {"squeeze", "head"} <= _float_layers(m)
    lstm_weights = {w.role: w for w in m.weights if w.layer == "lstm"}
    assert set(lstm_weights) >= {"input1", "input2"}  # W and R, dequantized and transposed back
    rng = np.random.default_rng(0)
    result = qdiff.compare(f, q, data={"x": rng.normal(0, 1, (4, 6, 2, 8)).astype(np.float32)})  # 4 samples
    assert result.unmatched.empty or not set(result.unmatched["op_type"]) & COMPUTE
    lstm = result.layers[result.layers["layer"].str.startswith("lstm")]
    assert len(lstm) == 3 and (lstm["cosine"] > 0.99).all()
    assert (result.weights[result.weights["layer"] == "lstm"]["cosine"] > 0.99).all()


@pytest.mark.parametrize("activation, scale, put_back", [("Relu", 1.0, "Relu"), ("Clip", 3.0, "Clip")])
def test_quant_only_puts_back_the_activation_the_quantizer_folded(tmp_path, activation, scale, put_back):
    """onnxruntime removes the Relu (or ReLU6 Clip) after conv1 and lets the quantization clamp
    (zero point at the start of the range). Stripping the Q/DQ for --quant-only used to strip
    that clamp too: conv1's reference kept its negatives (cosine ~0.6, no warning). The reference
    gets the activation back, and --quant-only then agrees with the float-vs-int8 comparison."""
    from qdiff.passes import strip_activation_qdq

    from builders import conv_act_conv

    f = tmp_path / "f.onnx"
    conv_act_conv(f, activation)
    rng = np.random.default_rng(0)
    feeds = [{"x": (scale * rng.normal(0, 1, (1, 3, 8, 8))).astype(np.float32)} for _ in range(16)]
    q = quantize(f, tmp_path / "q.onnx", feeds, quant_format=QuantFormat.QDQ)
    assert activation not in {n.op_type for n in onnx.load(str(q)).graph.node}  # folded by the quantizer
    stripped = strip_activation_qdq(onnx.load(str(q)))
    assert [n.op_type for n in stripped.model.graph.node].count(put_back) == 1
    assert stripped.notes and not stripped.warnings
    data = {"x": np.concatenate([d["x"] for d in feeds[:8]])}
    quant_only = qdiff.compare_quant_only(q, data=data)
    real = qdiff.compare(f, q, data=data)
    assert "put back" in quant_only.meta["reference"]
    conv1 = quant_only.layers[quant_only.layers["layer"].str.startswith("conv1")]
    assert len(conv1) == 1 and conv1["layer"].iloc[0].startswith("conv1+") and conv1["cosine"].iloc[0] > 0.99
    real_conv1 = real.layers[real.layers["layer"] == "conv1+act"]["cosine"].iloc[0]
    assert abs(conv1["cosine"].iloc[0] - real_conv1) < 0.01
    out_qo, out_real = quant_only.outputs["cosine"].iloc[0], real.outputs["cosine"].iloc[0]
    assert out_qo > 0.99 and abs(out_qo - out_real) < 0.01


def test_quant_only_warns_where_a_folded_relu_cannot_be_put_back(tmp_path):
    """A per-channel activation quantization that clamps at 0 on some channels only: no Relu can
    stand for it, and the pass says so (compare_quant_only adds it to meta warnings, which the
    summary prints). onnxruntime cannot run such a model (QLinearConv needs a scalar zero point),
    so the pass is checked on its own."""
    from qdiff.passes import strip_activation_qdq

    from builders import conv_act_conv

    f = tmp_path / "f.onnx"
    conv_act_conv(f)
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.normal(0, 1, (1, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    model = onnx.load(str(quantize(f, tmp_path / "q.onnx", feeds, quant_format=QuantFormat.QDQ)))
    inits = {t.name: t for t in model.graph.initializer}
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "a1")
    scale = numpy_helper.to_array(inits[q.input[1]])
    inits[q.input[1]].CopyFrom(numpy_helper.from_array(np.full(8, scale, np.float32), q.input[1]))
    inits[q.input[2]].CopyFrom(numpy_helper.from_array(np.array([0, 128] * 4, np.uint8), q.input[2]))
    q.attribute.append(helper.make_attribute("axis", 1))
    stripped = strip_activation_qdq(model)
    assert "Relu" not in {n.op_type for n in stripped.model.graph.node}
    assert len(stripped.warnings) == 1 and "4 of 8 channels" in stripped.warnings[0]
