"""Structural matching on pairs whose names share nothing (issue 3)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import conv_feeds, conv_net, finish, quantize, strip_names
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantFormat

import qdiff
from qdiff import Graph, MatchMethod, match_models
from qdiff.cli import main

CONV_LAYERS = {"conv1", "relu1", "pool1", "flat", "fc"}


def name_only_pairs(float_path: Path, quant_path: Path) -> set[str]:
    """The name-suffix matching onnxruntime's qdq_loss_debug does: T <-> T_DequantizeLinear_Output or T."""
    f, q = onnx.load(str(float_path)), onnx.load(str(quant_path))
    qnames = {o for n in q.graph.node for o in n.output}
    return {
        o
        for n in f.graph.node
        for o in n.output
        if f"{o}_DequantizeLinear_Output" in qnames or (o in qnames and o not in {x.name for x in q.graph.output})
    }


def _match(f, q, user_map=None):
    return match_models(Graph(onnx.load(str(f))), Graph(onnx.load(str(q))), user_map)


def _covered(m) -> set[str]:
    return {n for p in m.pairs if not p.layer.startswith("input:") for n in p.layer.split("+")}


def _check_pairs(m, f_path, q_path):
    """Every pair has the same operator and shape on both sides (checked by running both models)."""
    import onnxruntime as ort

    from qdiff.engine.sessions import tap_model

    fm, qm = onnx.load(str(f_path)), onnx.load(str(q_path))
    ft = tap_model(fm, [p.float_tensor for p in m.pairs])
    qt = tap_model(qm, [p.quant_tensor for p in m.pairs])
    feed = conv_feeds(1)[0]
    fs, qs = ort.InferenceSession(ft.SerializeToString()), ort.InferenceSession(qt.SerializeToString())
    fv = dict(zip([o.name for o in fs.get_outputs()], fs.run(None, feed)))
    qv = dict(zip([o.name for o in qs.get_outputs()], qs.run(None, feed)))
    for p in m.pairs:
        assert fv[p.float_tensor].shape == qv[p.quant_tensor].shape, p
        a, b = fv[p.float_tensor].ravel().astype(np.float64), qv[p.quant_tensor].ravel().astype(np.float64)
        if p.dequant is not None:
            b = p.dequant.dequantize(qv[p.quant_tensor]).ravel()
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12) > 0.95, p  # the right tensor, not a neighbour


@pytest.fixture(scope="module")
def qdq_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("structural")
    f = d / "f.onnx"
    conv_net(f)
    q = quantize(f, d / "q.onnx", conv_feeds(), quant_format=QuantFormat.QDQ, per_channel=True)
    return d, f, q


def test_renamed_everything_structure_finds_all_names_find_none(qdq_pair):
    d, f, q = qdq_pair
    stripped = strip_names(q, d / "q_renamed.onnx")
    m = _match(f, stripped)
    assert _covered(m) == CONV_LAYERS
    assert [u for u in m.unmatched if u.side == "float"] == []
    assert all(p.method in (MatchMethod.STRUCTURE, MatchMethod.INPUT) for p in m.pairs)
    _check_pairs(m, f, stripped)
    # name matching misses the fused conv (c1 is gone) even on the original names, and finds
    # nothing once they are renamed
    assert name_only_pairs(f, q) == {"r1", "p1", "f"}
    assert name_only_pairs(f, stripped) == set()


def _bn_net(path: Path, fold: bool) -> onnx.ModelProto:
    """x -> conv1 -> bn1 -> relu1 -> pool1 -> flat -> fc -> y; ``fold`` merges bn1 into conv1's weights."""
    rng = np.random.default_rng(7)
    w = rng.normal(0, 0.5, (4, 1, 3, 3)).astype(np.float32)
    b = rng.normal(0, 0.1, 4).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 1.5, 4).astype(np.float32), rng.normal(0, 0.1, 4).astype(np.float32)
    mean, var = rng.normal(0, 0.1, 4).astype(np.float32), rng.uniform(0.5, 1.5, 4).astype(np.float32)
    w2 = rng.normal(0, 0.2, (10, 64)).astype(np.float32)
    b2 = np.zeros(10, np.float32)
    tail = [
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p1"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "W2", "B2"], ["y"], name="fc", transB=1),
    ]
    inits = {"W2": w2, "B2": b2}
    if fold:
        k = gamma / np.sqrt(var + 1e-5)
        inits.update(W=(w * k[:, None, None, None]).astype(np.float32), B=((b - mean) * k + beta).astype(np.float32))
        head = [
            helper.make_node("Conv", ["x", "W", "B"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        ]
    else:
        inits.update(W=w, B=b, gamma=gamma, beta=beta, mean=mean, var=var)
        head = [
            helper.make_node("Conv", ["x", "W", "B"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["bn"], name="bn1", epsilon=1e-5),
            helper.make_node("Relu", ["bn"], ["r1"], name="relu1"),
        ]
    graph = helper.make_graph(
        head + tail,
        "bn_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return finish(graph, path)


def test_batchnorm_folded_into_conv_and_relu_fused(tmp_path):
    f = tmp_path / "f.onnx"
    _bn_net(f, fold=False)
    folded = tmp_path / "folded.onnx"
    _bn_net(folded, fold=True)
    q = quantize(folded, tmp_path / "q.onnx", conv_feeds(), quant_format=QuantFormat.QDQ, per_channel=True)
    q = strip_names(q, tmp_path / "q_renamed.onnx")
    m = _match(f, q)
    pairs = {p.layer: p for p in m.pairs}
    assert pairs["conv1+bn1+relu1"].float_tensor == "r1"
    assert pairs["conv1+bn1+relu1"].op_type == "Conv+BatchNormalization+Relu"
    assert _covered(m) == {"conv1", "bn1", "relu1", "pool1", "flat", "fc"}
    _check_pairs(m, f, q)
    result = qdiff.compare(f, q, data={"x": np.concatenate([d["x"] for d in conv_feeds(8)])})
    assert (result.layers["cosine"] > 0.99).all()


def _insert_after(model: onnx.ModelProto, tensor: str, nodes: list[onnx.NodeProto], new_tensor: str) -> onnx.ModelProto:
    """Rewire every reader of ``tensor`` to ``new_tensor`` and insert ``nodes`` (which make it)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for n in out.graph.node:
        for i, x in enumerate(n.input):
            if x == tensor:
                n.input[i] = new_tensor
    idx = next(i for i, n in enumerate(out.graph.node) if tensor in n.output)
    for k, n in enumerate(nodes):
        out.graph.node.insert(idx + 1 + k, n)
    return out


def test_inserted_cast_and_transposes_are_matched_through(qdq_pair, tmp_path):
    _, f, q = qdq_pair
    qm = onnx.load(str(q))
    qm = _insert_after(
        qm, "r1_DequantizeLinear_Output",
        [helper.make_node("Cast", ["r1_DequantizeLinear_Output"], ["r1_cast"], to=TensorProto.FLOAT, name="inserted_cast")],
        "r1_cast",
    )  # fmt: skip
    qm = _insert_after(
        qm, "p1_DequantizeLinear_Output",
        [
            helper.make_node("Transpose", ["p1_DequantizeLinear_Output"], ["p1_nhwc"], perm=[0, 2, 3, 1], name="to_nhwc"),
            helper.make_node("Transpose", ["p1_nhwc"], ["p1_nchw"], perm=[0, 3, 1, 2], name="to_nchw"),
        ],
        "p1_nchw",
    )  # fmt: skip
    path = tmp_path / "q_inserted.onnx"
    onnx.save(qm, str(path))
    m = _match(f, path)
    assert _covered(m) == CONV_LAYERS
    assert {u.name for u in m.skipped} == {"to_nhwc", "to_nchw"}
    assert all("absent from the float model" in u.reason for u in m.skipped)
    _check_pairs(m, f, path)


def test_float_reshape_removed_by_the_quantized_model(tmp_path):
    f = tmp_path / "f.onnx"
    fm = conv_net(None)
    shape = numpy_helper.from_array(np.array([1, 4, 4, 4], np.int64), "shape4")
    fm.graph.initializer.append(shape)
    fm = _insert_after(fm, "p1", [helper.make_node("Reshape", ["p1", "shape4"], ["p1r"], name="noop_reshape")], "p1r")
    onnx.save(fm, str(f))
    plain = tmp_path / "plain.onnx"
    conv_net(plain)
    q = quantize(plain, tmp_path / "q.onnx", conv_feeds(), quant_format=QuantFormat.QDQ)
    m = _match(f, q)
    assert _covered(m) == CONV_LAYERS
    assert [(u.side, u.name) for u in m.skipped] == [("float", "noop_reshape")]


def test_control_flow_subgraph_nodes_are_listed(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    then_g = helper.make_graph(
        [helper.make_node("Relu", ["r"], ["t_out"], name="inner_relu")], "then", [],
        [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [1, 4])],
    )  # fmt: skip
    else_g = helper.make_graph(
        [helper.make_node("Neg", ["r"], ["e_out"], name="inner_neg")], "else", [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [1, 4])],
    )  # fmt: skip
    cond = numpy_helper.from_array(np.array(True), "cond")
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g),
    ]
    f = finish(helper.make_graph(nodes, "f", [x], [y], [cond]), tmp_path / "f.onnx")
    m = match_models(Graph(f), Graph(f))
    um = {u.name: u.reason for u in m.unmatched}
    assert "inside the 'then_branch' subgraph of If 'branch'" in um["branch/then_branch/inner_relu"]
    assert "branch/else_branch/inner_neg" in um
    result = qdiff.compare(f, f, samples=2)
    assert "branch/then_branch/inner_relu" in set(result.unmatched["name"])


def test_shapes_must_agree_for_a_pair(tmp_path):
    x = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])]

    def pool(k):
        y = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8 // k, 8 // k])]
        return finish(helper.make_graph([helper.make_node("MaxPool", ["x"], ["y"], name="pool", kernel_shape=[k, k], strides=[k, k])], "g", x, y))

    f, q = pool(2), pool(4)
    m = match_models(Graph(f), Graph(q))
    assert m.pairs == ()
    assert any("differs from float" in u.reason for u in m.unmatched)


def test_different_networks_are_called_out(tmp_path):
    f = tmp_path / "f.onnx"
    conv_net(f, seed=0)
    other = tmp_path / "other.onnx"
    conv_net(other, seed=5)
    q = quantize(other, tmp_path / "q.onnx", conv_feeds(), quant_format=QuantFormat.QDQ)
    result = qdiff.compare(f, q, samples=2)
    assert result.meta["warnings"] and "not look like the same network" in result.meta["warnings"][0]
    same = qdiff.compare(other, q, samples=2)
    assert same.meta["warnings"] == []


def test_user_map_overrides_and_round_trips(qdq_pair, tmp_path, capsys):
    _, f, q = qdq_pair
    m = _match(f, q, {"p1": "f_DequantizeLinear_Output"})
    pool = next(p for p in m.pairs if p.float_tensor == "p1")
    assert pool.method is MatchMethod.USER and pool.quant_tensor == "f_DequantizeLinear_Output"
    with pytest.raises(qdiff.UsageError, match="nope"):
        _match(f, q, {"nope": "y"})
    # qdiff match -o writes what --map reads back: the same pairs
    out = tmp_path / "align.json"
    assert main(["match", str(f), str(q), "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert {p["layer"] for p in doc["pairs"]} >= {"conv1+relu1", "pool1", "fc"}
    again = qdiff.match(f, q, tensor_map=str(out))
    assert set(again.pairs["quant_tensor"]) == {p["quant_tensor"] for p in doc["pairs"]}
    csv_out = tmp_path / "align.csv"
    assert main(["match", str(f), str(q), "-o", str(csv_out)]) == 0
    assert qdiff.load_tensor_map(csv_out) == qdiff.load_tensor_map(out)
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert main(["compare", str(f), str(q), "--map", str(bad)]) == 2
    assert "--map" in capsys.readouterr().err


def test_quant_only_compares_against_the_model_without_activation_qdq(qdq_pair, tmp_path, capsys):
    _, f, q = qdq_pair
    data = {"x": np.concatenate([d["x"] for d in conv_feeds(6)])}
    result = qdiff.compare_quant_only(q, data=data)
    # the QDQ model's Relu was folded into r1's quantization; the reference gets it back (issue 16 item 10)
    assert _covered_layers(result) == CONV_LAYERS - {"relu1"} | {"r1/refolded_relu"}
    assert "1 Relu put back" in result.meta["reference"]
    assert (result.weights["cosine"] == 1.0).all()  # both sides hold the same quantized weights
    assert (result.layers["mse"] > 0).all()  # activation rounding remains
    assert "activation Q/DQ" in result.meta["reference"]
    with pytest.raises(qdiff.ModelError, match="--quant-only needs a QDQ model"):
        qdiff.compare_quant_only(f)
    assert main(["compare", "--quant-only", str(q), "--samples", "2"]) == 0
    assert main(["compare", str(f), "--quant-only", str(q)]) == 2
    assert "--quant-only" in capsys.readouterr().err


def _covered_layers(result) -> set[str]:
    return {n for layer in result.layers["layer"] if not layer.startswith("input:") for n in layer.split("+")}


def test_nncf_quantized_model_matches(tmp_path):
    nncf = pytest.importorskip("nncf", reason="NNCF is an optional test dependency (pip install nncf)")
    f = tmp_path / "f.onnx"
    model = conv_net(f)
    dataset = nncf.Dataset([d for d in conv_feeds(16)])
    quantized = nncf.quantize(model, dataset, subset_size=16)
    quantized.ir_version = 10
    q = tmp_path / "q_nncf.onnx"
    onnx.save(quantized, str(q))
    m = _match(f, q)
    assert _covered(m) == CONV_LAYERS, m.unmatched
    _check_pairs(m, f, q)
