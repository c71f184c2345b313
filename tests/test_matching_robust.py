"""Matching that must survive what re-exports and other quantizers do (issue 16, items 9 and 10):
identical nodes, shape subgraphs, DynamicQuantizeLSTM, Relus folded into the quantization."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import conv_feeds, finish, lstm_net, quantize, shape_feeds, shape_reshape_net, strip_names
from onnx import TensorProto, helper, numpy_helper
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
