"""``qdiff diagnose``: each check on a model that triggers it and one that does not.

Models are built in code and quantized with onnxruntime's real ``quantize_static``, or a
produced model is edited to create exactly one defect. Figures asserted on (clipped fractions,
overflow counts, weight bytes) are recomputed here with numpy from the same data and parameters.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import conv_feeds, conv_net, finish, quantize
from conftest import assert_one_line_error, run_cli, strict_json_load
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantFormat, QuantType

from qdiff._diagnose import CHECKS, DiagnoseResult, Finding, diagnose
from qdiff.errors import UsageError

QDQ_INT8 = dict(quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)


def _problems(result: DiagnoseResult, check: str) -> list[Finding]:
    return [f for f in result.findings if f.check == check and f.severity != "info"]


# -- models --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def conv(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """conv_net float, its int8 QDQ twin (calibrated on U(0,1)), and variants made by the quantizer."""
    d = tmp_path_factory.mktemp("diag_conv")
    conv_net(d / "float.onnx")
    feeds = conv_feeds(16)
    quantize(d / "float.onnx", d / "qdq.onnx", feeds, **QDQ_INT8)
    quantize(d / "float.onnx", d / "nopool.onnx", feeds, nodes_to_exclude=["pool1"], **QDQ_INT8)
    quantize(d / "float.onnx", d / "none.onnx", feeds, nodes_to_exclude=["conv1", "relu1", "pool1", "flat", "fc"], **QDQ_INT8)
    np.savez(d / "calib.npz", x=np.concatenate([f["x"] for f in feeds]))
    return {"dir": d, "float": d / "float.onnx", "qdq": d / "qdq.onnx", "nopool": d / "nopool.onnx", "none": d / "none.onnx", "calib": d / "calib.npz"}


def _set_qdq_scale(src: Path, dst: Path, tensors: tuple[str, ...], factor: float, *, dq_too: bool = True) -> float:
    """Give the Q (and DQ) of each of ``tensors`` a scale ``factor`` times the current one; returns the new scale."""
    m = onnx.load(str(src))
    inits = {t.name: t for t in m.graph.initializer}
    new = 0.0
    for tensor in tensors:
        q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor)
        new = float(numpy_helper.to_array(inits[q.input[1]]) * factor)
        name = f"{tensor}_edited_scale"
        m.graph.initializer.append(numpy_helper.from_array(np.array(new, np.float32), name))
        q.input[1] = name
        if dq_too:
            dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])
            dq.input[1] = name
    onnx.save(m, str(dst))
    return new


# -- qparams -------------------------------------------------------------------------------------


def test_qparams_flags_maxpool_whose_output_scale_differs(conv, tmp_path):
    edited = tmp_path / "edited.onnx"
    # MaxPool's output and the Flatten after it get twice the scale: only the MaxPool disagrees
    new_scale = _set_qdq_scale(conv["qdq"], edited, ("p1", "f"), 2.0)
    result = diagnose(edited, conv["float"], checks=["qparams"])
    problems = _problems(result, "qparams")
    assert [(f.severity, f.layer) for f in problems] == [("warning", "pool1")]
    assert "MaxPool 'pool1'" in problems[0].message and f"{new_scale:.6g}" in problems[0].message
    assert "TensorQuantOverrides" in problems[0].suggestion
    table = result.tables["qparams"]
    assert not table.set_index("node").loc["pool1", "agree"]
    # without FLOAT the layer is named after the quantized node
    assert [f.layer for f in _problems(diagnose(edited, checks=["qparams"]), "qparams")] == ["pool1"]
    # changing only the MaxPool's output leaves the Flatten reading it mismatched too
    only_pool = tmp_path / "only_pool.onnx"
    _set_qdq_scale(conv["qdq"], only_pool, ("p1",), 2.0)
    assert [f.layer for f in _problems(diagnose(only_pool, conv["float"], checks=["qparams"]), "qparams")] == ["pool1", "flat"]


def test_qparams_quiet_on_the_quantizers_own_output(conv, samples_dir):
    result = diagnose(conv["qdq"], conv["float"], checks=["qparams"])
    assert _problems(result, "qparams") == []
    assert result.tables["qparams"]["agree"].all() and len(result.tables["qparams"]) >= 2  # MaxPool and Flatten checked
    qop = diagnose(samples_dir / "digits_cnn.qoperator.onnx", checks=["qparams"])
    assert _problems(qop, "qparams") == []


def test_qparams_error_when_dq_reads_with_other_parameters_than_q_wrote(conv, tmp_path):
    edited = tmp_path / "q_only.onnx"
    _set_qdq_scale(conv["qdq"], edited, ("p1",), 2.0, dq_too=False)
    errors = [f for f in diagnose(edited, conv["float"], checks=["qparams"]).findings if f.severity == "error"]
    assert len(errors) == 1 and "read back wrong" in errors[0].message and errors[0].layer == "pool1"


@pytest.mark.parametrize("factor", [0.0, float("nan"), float("inf"), -1.0], ids=["zero", "nan", "inf", "negative"])
def test_qparams_reports_a_corrupt_scale_and_the_other_checks_skip_it(conv, tmp_path, capfd, factor):
    """A scale of 0, NaN, inf or below 0 is an error naming the tensor and the value; nothing crashes."""
    edited = tmp_path / "corrupt.onnx"
    bad = _set_qdq_scale(conv["qdq"], edited, ("p1",), factor)
    result = diagnose(edited, conv["float"])
    assert all(v["status"] in ("ran", "not applicable") for v in result.meta["checks"].values()), result.meta["checks"]
    errors = [f for f in result.findings if f.check == "qparams" and f.severity == "error"]
    assert len(errors) == 1, [f.message for f in errors]
    assert "'p1'" in errors[0].message and f"scale {np.float32(bad)}" in errors[0].message
    assert "p1_edited_scale" in errors[0].message
    # the saturation check measured the other tensors and skipped this one
    measured = set(result.tables["saturation"]["tensor"])
    assert "p1" not in measured and {"r1", "f"} <= measured
    # the pass-through check neither crashed nor called the corrupt scale a mismatch
    assert not [f for f in result.findings if f.check == "qparams" and f.severity == "warning"]
    rc, _, err = run_cli(["diagnose", str(edited), str(conv["float"])], capfd)
    assert "Traceback" not in err and rc != 2


def test_qparams_flags_concat_the_quantizer_left_with_mixed_scales(tmp_path):
    """onnxruntime's QDQ quantizer gives a Concat's inputs their own scales: a real trigger."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(0, 1, (4, 8)).astype(np.float32), rng.normal(0, 1, (4, 8)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["a"], name="mm1"),
        helper.make_node("MatMul", ["x", "W2"], ["b"], name="mm2"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Concat", ["r", "b"], ["y"], name="concat", axis=1),
    ]
    graph = helper.make_graph(
        nodes, "cat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")],
    )  # fmt: skip
    finish(graph, tmp_path / "cat.onnx")
    feeds = [{"x": rng.normal(0, 1, (1, 4)).astype(np.float32)} for _ in range(8)]
    quantize(tmp_path / "cat.onnx", tmp_path / "cat.qdq.onnx", feeds, **QDQ_INT8)
    problems = _problems(diagnose(tmp_path / "cat.qdq.onnx", tmp_path / "cat.onnx", checks=["qparams"]), "qparams")
    assert [f.layer for f in problems] == ["concat"]
    assert "Concat" in problems[0].message and "one scale and zero point" in problems[0].suggestion
    # the suggestion pastes into quantize_static as it is, and re-quantizing with it fixes the finding
    extra = _pasted_extra_options(problems[0].suggestion)
    assert set(extra["TensorQuantOverrides"]) == {"r"}  # the input whose scale differs
    quantize(tmp_path / "cat.onnx", tmp_path / "fixed.onnx", feeds, extra_options=extra, **QDQ_INT8)
    assert _problems(diagnose(tmp_path / "fixed.onnx", tmp_path / "cat.onnx", checks=["qparams"]), "qparams") == []


def _pasted_extra_options(suggestion: str) -> dict:
    """The ``extra_options={...}`` a suggestion spells out, evaluated as a user pasting it would."""
    start = suggestion.index("extra_options=") + len("extra_options=")
    depth = 0
    for end in range(start, len(suggestion)):
        depth += {"{": 1, "}": -1}.get(suggestion[end], 0)
        if depth == 0:
            break
    return eval(suggestion[start : end + 1], {"np": np})  # noqa: S307 - the test pastes what a user would


def test_qparams_mismatch_prints_scales_that_differ_differently(conv, tmp_path):
    """same_as compares at 1e-6: a scale 3e-6 off is a mismatch and must not print like the other one."""
    edited = tmp_path / "edited.onnx"
    _set_qdq_scale(conv["qdq"], edited, ("p1", "f"), 1 + 3e-6)
    problems = _problems(diagnose(edited, conv["float"], checks=["qparams"]), "qparams")
    assert [f.layer for f in problems] == ["pool1"]
    scales = re.findall(r"has scale ([0-9.e+-]+),", problems[0].message)
    assert len(scales) == 2 and scales[0] != scales[1], problems[0].message
    # the pasteable override carries the input's scale exactly (float32) and an int8 zero point
    extra = _pasted_extra_options(problems[0].suggestion)
    (entry,) = extra["TensorQuantOverrides"]["p1"]
    assert entry["scale"] == np.float32(scales[0]) and entry["scale"].dtype == np.float32
    assert entry["zero_point"].dtype == np.int8


# -- coverage ------------------------------------------------------------------------------------


def test_coverage_flags_a_quantizer_run_that_quantized_nothing(conv):
    result = diagnose(conv["none"], conv["float"], checks=["coverage"])
    errors = [f for f in result.findings if f.severity == "error"]
    assert len(errors) == 1 and "not smaller" in errors[0].message
    assert "W2" in errors[0].message  # the largest weight still in float is named
    stats = result.meta["stats"]["coverage"]
    assert stats["quant_model_bytes"] == conv["none"].stat().st_size >= stats["float_model_bytes"] == conv["float"].stat().st_size
    assert stats["quantized_nodes"] == 0 and stats["quantized_weight_bytes"] == 0
    # without FLOAT the model is still recognised as not quantized
    alone = diagnose(conv["none"], checks=["coverage"])
    assert any(f.severity == "error" and "float model" in f.message for f in alone.findings)


def test_coverage_quiet_on_a_quantized_model_and_counts_its_bytes(conv):
    result = diagnose(conv["qdq"], conv["float"], checks=["coverage"])
    assert _problems(result, "coverage") == []
    # this tiny model's Q/DQ nodes outweigh the int8 saving: said, but not an error
    assert conv["qdq"].stat().st_size >= conv["float"].stat().st_size
    assert any("quantization nodes outweigh" in f.message for f in result.findings)
    m = onnx.load(str(conv["qdq"]))
    qparams = {n.input[k] for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") for k in (1, 2) if len(n.input) > k}
    int_weights = [
        numpy_helper.to_array(t) for t in m.graph.initializer
        if t.name not in qparams and t.data_type in (TensorProto.INT8, TensorProto.INT32)
    ]  # fmt: skip
    stats = result.meta["stats"]["coverage"]
    assert stats["quantized_weight_bytes"] == sum(a.nbytes for a in int_weights)
    assert stats["float_weight_bytes"] == 0
    assert stats["quantized_nodes"] == stats["compute_nodes"] == 4  # Conv, MaxPool, Flatten, Gemm (Relu fused)


# -- conversions ---------------------------------------------------------------------------------


def test_conversions_count_the_round_trip_around_an_excluded_node(conv):
    result = diagnose(conv["nopool"], conv["float"], checks=["conversions"])
    problems = _problems(result, "conversions")
    assert len(problems) == 1 and problems[0].severity == "warning" and problems[0].layer == "pool1"
    assert "pool1 (MaxPool)" in problems[0].message and "flat (Flatten)" in problems[0].message
    stats = result.meta["stats"]["conversions"]
    assert stats["round_trips"] == 1 and stats["float_nodes"] == 2
    # graph input Q + the round trip's Q = 2 float->int8; the round trip's DQ + the output DQ = 2 int8->float
    assert (stats["float_to_int8"], stats["int8_to_float"]) == (2, 2)


def test_conversions_quiet_when_everything_is_quantized(conv, samples_dir):
    result = diagnose(conv["qdq"], conv["float"], checks=["conversions"])
    assert _problems(result, "conversions") == []
    assert result.meta["stats"]["conversions"]["round_trips"] == 0
    # the sample transformer's Gelu (Div, Erf) is left in float by the quantizer: one round trip
    t = diagnose(samples_dir / "transformer.qdq.onnx", checks=["conversions"])
    assert [f.layer for f in _problems(t, "conversions")] == ["gelu_div"]


# -- per-channel ---------------------------------------------------------------------------------


def _to_per_tensor(src: Path, dst: Path, weight: str, float_value: np.ndarray) -> None:
    """Re-quantize one per-channel weight of a QDQ model per-tensor (symmetric int8)."""
    m = onnx.load(str(src))
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == f"{weight}_quantized")
    scale = float(np.abs(float_value).max() / 127)
    q = np.clip(np.rint(float_value / scale), -127, 127).astype(np.int8)
    keep = [t for t in m.graph.initializer if t.name not in (dq.input[0], dq.input[1], dq.input[2])]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    m.graph.initializer.extend(
        [
            numpy_helper.from_array(q, dq.input[0]),
            numpy_helper.from_array(np.array(scale, np.float32), dq.input[1]),
            numpy_helper.from_array(np.array(0, np.int8), dq.input[2]),
        ]
    )
    for a in list(dq.attribute):
        if a.name == "axis":
            dq.attribute.remove(a)
    onnx.save(m, str(dst))


def test_per_channel_flags_a_per_tensor_weight_after_an_intermediate_output(samples_dir, tmp_path):
    float_path = samples_dir / "multi_output.float.onnx"
    fc1 = numpy_helper.to_array(next(t for t in onnx.load(str(float_path)).graph.initializer if t.name == "fc1.weight"))
    edited = tmp_path / "mixed.onnx"
    _to_per_tensor(samples_dir / "multi_output.qdq.onnx", edited, "fc1.weight", fc1)
    result = diagnose(edited, float_path, checks=["per_channel"])
    problems = _problems(result, "per_channel")
    assert [(f.severity, f.layer) for f in problems] == [("warning", "fc1+relu3")]
    assert "'fc1.weight" in problems[0].message and "'features'" in problems[0].message
    table = result.tables["per_channel"].set_index("layer")
    assert table.loc["fc1+relu3", "granularity"] == "per-tensor" and table.loc["fc1+relu3", "channels"] == 32
    assert (table.drop("fc1+relu3")["granularity"] == "per-channel").all()


def test_per_channel_quiet_when_all_weights_are_per_channel(samples_dir):
    result = diagnose(samples_dir / "multi_output.qdq.onnx", samples_dir / "multi_output.float.onnx", checks=["per_channel"])
    assert result.by_check("per_channel") == []
    assert result.meta["stats"]["per_channel"] == {"per_channel": 4, "per_tensor": 0, "weights": 4}
    # all per-tensor is a consistent choice: a hint, not a warning
    pt = diagnose(samples_dir / "digits_cnn.qdq_per_tensor.onnx", checks=["per_channel"])
    assert [f.severity for f in pt.by_check("per_channel")] == ["info"]


# -- FP16 ----------------------------------------------------------------------------------------


def _fp16_pair(w: np.ndarray, bias: np.ndarray | None = None) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """``x[1,16,32] -> MatMul(mm, W) [-> Add(bias, B)] -> Softmax(sm) -> y`` in float32, and its float16
    conversion done by hand the way converters do it (float16 initializers, Casts at input and output)."""

    def build(fp16: bool) -> onnx.ModelProto:
        dt = np.float16 if fp16 else np.float32
        inits = [numpy_helper.from_array(w.astype(dt), "W")]
        nodes, src = [], "x"
        if fp16:
            nodes.append(helper.make_node("Cast", ["x"], ["x16"], name="x_cast", to=TensorProto.FLOAT16))
            src = "x16"
        nodes.append(helper.make_node("MatMul", [src, "W"], ["m"], name="mm"))
        last = "m"
        if bias is not None:
            inits.append(numpy_helper.from_array(bias.astype(dt), "B"))
            nodes.append(helper.make_node("Add", ["m", "B"], ["a"], name="bias"))
            last = "a"
        nodes.append(helper.make_node("Softmax", [last], ["s" if fp16 else "y"], name="sm", axis=-1))
        if fp16:
            nodes.append(helper.make_node("Cast", ["s"], ["y"], name="y_cast", to=TensorProto.FLOAT))
        graph = helper.make_graph(
            nodes, "fp16_test", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 32])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 32])], inits,
        )  # fmt: skip
        return finish(graph)

    return build(False), build(True)


FP16_X = np.random.default_rng(7).standard_normal((4, 16, 32)).astype(np.float32)


def test_fp16_flags_overflow_and_suggests_the_block_list():
    w = np.clip(np.random.default_rng(1).normal(0, 1.5e4, (32, 32)), -6e4, 6e4).astype(np.float32)
    f32, f16 = _fp16_pair(w)
    result = diagnose(f16, f32, {"x": FP16_X}, checks=["fp16"])
    expected = int((np.abs(FP16_X.astype(np.float64) @ w.astype(np.float64)) > 65504).sum())
    assert expected > 100
    row = result.tables["fp16"].set_index("layer").loc["mm"]
    assert row["overflow_fp32"] == expected and row["inf_fp16"] >= expected
    errors = [f for f in result.findings if f.severity == "error"]
    assert [f.layer for f in errors] == ["mm"] and f"{expected} float32 value(s)" in errors[0].message
    assert result.meta["stats"]["fp16"]["node_block_list"] == ["mm", "sm"]
    assert any("node_block_list=['mm', 'sm']" in f.suggestion for f in result.findings)


def test_fp16_overflow_is_gone_once_the_suggested_nodes_are_blocked():
    """Nodes kept in float32 by node_block_list (Casts around them) cannot overflow float16."""
    float16 = pytest.importorskip("onnxconverter_common.float16", reason="onnxconverter-common not installed")
    w = np.clip(np.random.default_rng(1).normal(0, 1.5e4, (32, 32)), -6e4, 6e4).astype(np.float32)
    f32, f16 = _fp16_pair(w)
    block = diagnose(f16, f32, {"x": FP16_X}, checks=["fp16"]).meta["stats"]["fp16"]["node_block_list"]
    assert block == ["mm", "sm"]
    fixed = float16.convert_float_to_float16(f32, keep_io_types=True, node_block_list=block)
    fixed.ir_version = 10
    result = diagnose(fixed, f32, {"x": FP16_X}, checks=["fp16"])
    assert _problems(result, "fp16") == []
    assert result.tables["fp16"].set_index("layer").loc["mm", "overflow_fp32"] == 0
    # blocking the MatMul alone casts its values to float16 for the Softmax: that still overflows
    half = float16.convert_float_to_float16(f32, keep_io_types=True, node_block_list=["mm"])
    half.ir_version = 10
    assert [(f.severity, f.layer) for f in _problems(diagnose(half, f32, {"x": FP16_X}, checks=["fp16"]), "fp16")] == [("error", "mm")]


def test_fp16_flags_an_error_jump_and_the_block_list_fixes_it():
    rng = np.random.default_rng(2)
    w = rng.normal(0, 0.3, (32, 32)).astype(np.float32)
    bias = (1000 + rng.normal(0, 1, 32)).astype(np.float32)  # float16 steps are 0.5 there
    f32, f16 = _fp16_pair(w, bias)
    result = diagnose(f16, f32, {"x": FP16_X}, checks=["fp16"])
    jumps = _problems(result, "fp16")
    assert [(f.severity, f.layer) for f in jumps] == [("warning", "sm")]
    assert "jumps" in jumps[0].message and "steps are 0.5" in jumps[0].message
    block = result.meta["stats"]["fp16"]["node_block_list"]
    assert block == ["bias", "sm"]
    float16 = pytest.importorskip("onnxconverter_common.float16", reason="onnxconverter-common not installed")
    fixed = float16.convert_float_to_float16(f32, keep_io_types=True, node_block_list=block)
    fixed.ir_version = 10
    assert _problems(diagnose(fixed, f32, {"x": FP16_X}, checks=["fp16"]), "fp16") == []


def test_fp16_quiet_on_a_well_behaved_model(samples_dir):
    f32, f16 = _fp16_pair(np.random.default_rng(3).normal(0, 0.5, (32, 32)).astype(np.float32))
    result = diagnose(f16, f32, {"x": FP16_X}, checks=["fp16"])
    assert _problems(result, "fp16") == []
    assert result.meta["stats"]["fp16"]["node_block_list"] == []
    digits = diagnose(samples_dir / "digits_cnn.fp16.onnx", samples_dir / "digits_cnn.float.onnx", samples_dir / "digits_test.npz")
    assert digits.meta["model_kind"] == "fp16" and [f for f in digits.findings if f.severity != "info"] == []


def test_fp16_without_float_counts_nonfinite_and_says_what_float_would_add():
    w = np.clip(np.random.default_rng(1).normal(0, 1.5e4, (32, 32)), -6e4, 6e4).astype(np.float32)
    _, f16 = _fp16_pair(w)
    result = diagnose(f16, None, {"x": FP16_X}, checks=["fp16"])
    assert [f.layer for f in result.findings if f.severity == "error"] == ["mm"]
    assert any(f.severity == "info" and "without FLOAT" in f.message for f in result.findings)


# -- saturation ----------------------------------------------------------------------------------


def _input_clip_fraction(model_path: Path, x: np.ndarray) -> tuple[float, int]:
    """numpy: share of x clipped by the model's input QuantizeLinear, and the int8 levels used."""
    m = onnx.load(str(model_path))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    scale, zp = float(inits[q.input[1]]), int(inits[q.input[2]])
    levels = np.rint(x.astype(np.float64) / scale) + zp
    clipped = float(((levels < -128) | (levels > 127)).mean())
    used = np.clip(levels, -128, 127)
    return clipped, int(used.max() - used.min() + 1)


def test_saturation_flags_data_beyond_the_calibrated_range(conv, tmp_path):
    x = np.random.default_rng(5).uniform(0, 10, (8, 1, 8, 8)).astype(np.float32)  # calibrated on U(0, 1)
    data = tmp_path / "wide.npz"
    np.savez(data, x=x)
    result = diagnose(conv["qdq"], conv["float"], data, checks=["saturation"])
    expected, _ = _input_clip_fraction(conv["qdq"], x)
    assert expected > 0.8
    row = result.tables["saturation"].set_index("layer").loc["input:x"]
    assert row["clipped"] == pytest.approx(expected, abs=1e-12)
    found = {f.layer: f for f in _problems(result, "saturation")}
    assert found["input:x"].severity == "error" and "clip" in found["input:x"].message
    assert result.meta["samples"] == 8 and not result.meta["random_inputs"]


def test_saturation_quiet_on_the_calibration_data(conv):
    result = diagnose(conv["qdq"], conv["float"], conv["calib"], samples=16, checks=["saturation"])
    assert _problems(result, "saturation") == []
    table = result.tables["saturation"]
    assert (table["clipped"] == 0).all() and (table["range_used"] > 0.9).all()
    # the fused Relu's negative pre-activations clip by design and are not counted
    assert table.set_index("layer").loc["conv1+relu1", "data_min"] < 0


def test_saturation_flags_a_range_much_wider_than_the_data(conv, tmp_path):
    wide = tmp_path / "wide_calib.onnx"
    quantize(conv["float"], wide, [{"x": f["x"] * 10} for f in conv_feeds(16)], **QDQ_INT8)
    x = np.random.default_rng(6).uniform(0, 0.5, (8, 1, 8, 8)).astype(np.float32)
    result = diagnose(wide, conv["float"], {"x": x}, checks=["saturation"])
    _, levels = _input_clip_fraction(wide, x)
    row = result.tables["saturation"].set_index("layer").loc["input:x"]
    assert row["levels_used"] == levels < 26
    assert any(f.layer == "input:x" and f.severity == "warning" and "levels" in f.message for f in _problems(result, "saturation"))


def test_saturation_on_random_inputs_says_so_and_reads_qoperator_outputs(samples_dir):
    result = diagnose(samples_dir / "digits_cnn.qoperator.onnx", checks=["saturation"], samples=2)
    assert result.meta["random_inputs"] and result.meta["samples"] == 2
    assert any(f.severity == "info" and "random" in f.message for f in result.findings)
    assert "integer output" in set(result.tables["saturation"]["source"])
    real = diagnose(samples_dir / "digits_cnn.qoperator.onnx", None, samples_dir / "digits_test.npz", checks=["saturation"], samples=50)
    assert _problems(real, "saturation") == []


# -- the result, the API and the CLI -------------------------------------------------------------


def test_result_json_shape_and_strictness(conv, tmp_path):
    edited = tmp_path / "edited.onnx"
    _set_qdq_scale(conv["qdq"], edited, ("p1", "f"), 2.0)
    result = diagnose(edited, conv["float"])
    out = tmp_path / "out.json"
    result.to_json(out)
    doc = strict_json_load(out)
    assert {"findings", "meta"} <= set(doc)
    assert all(set(f) == {"check", "severity", "layer", "message", "suggestion"} for f in doc["findings"])
    assert doc["findings"][0]["severity"] == "error" or doc["findings"][0]["severity"] == "warning"
    assert set(doc["meta"]["checks"]) == set(CHECKS)
    assert doc["meta"]["checks"]["fp16"]["status"] == "not applicable"
    frame = result.findings_frame()
    assert list(frame.columns) == ["check", "severity", "layer", "message", "suggestion"] and len(frame) == len(result.findings)
    severities = [f.severity for f in result.findings]
    assert severities == sorted(severities, key=["error", "warning", "info"].index)


def test_unknown_check_is_a_usage_error(conv):
    with pytest.raises(UsageError, match="unknown check"):
        diagnose(conv["qdq"], checks=["nope"])
    with pytest.raises(ValueError):
        Finding("x", "fatal", "", "m")


def test_rich_rendering_is_deterministic(conv):
    from io import StringIO

    from rich.console import Console

    result = diagnose(conv["nopool"], conv["float"], checks=["conversions", "coverage"])
    buf = StringIO()
    Console(file=buf, width=140, color_system=None).print(result)
    text = buf.getvalue()
    assert "qdiff diagnose: nopool.onnx" in text and "round trip" in text and "1 warning(s)" in text


def test_cli_diagnose_exit_codes_and_json(conv, tmp_path, capfd):
    edited = tmp_path / "edited.onnx"
    _set_qdq_scale(conv["qdq"], edited, ("p1", "f"), 2.0)
    out = tmp_path / "d.json"
    rc, stdout, _ = run_cli(["diagnose", edited, conv["float"], "--json", out, "--check", "qparams", "--tables"], capfd)
    assert rc == 0 and "pool1" in stdout and "qparams" in stdout
    assert json.loads(out.read_text())["findings"][0]["layer"] == "pool1"
    rc, _, _ = run_cli(["diagnose", edited, "--check", "qparams", "--fail-on", "warning"], capfd)
    assert rc == 1
    rc, _, _ = run_cli(["diagnose", edited, "--check", "qparams", "--fail-on", "error"], capfd)
    assert rc == 0
    rc, _, err = run_cli(["diagnose", tmp_path / "missing.onnx"], capfd)
    assert_one_line_error(rc, err, "missing.onnx")
    rc, _, err = run_cli(["diagnose", edited, "--json", tmp_path / "no" / "such" / "x.json"], capfd)
    assert_one_line_error(rc, err, "--json")


def test_checks_return_their_findings_tables_and_figures(conv):
    """Each check returns a CheckOutput; diagnose collects the tables and figures from them."""
    import inspect

    from qdiff._diagnose.findings import CheckOutput
    from qdiff.result import Result

    result = diagnose(conv["nopool"], conv["float"], checks=["coverage", "conversions"])
    assert isinstance(result, Result) and list(result.table().columns) == ["check", "severity", "layer", "message", "suggestion"]
    assert list(result.tables) == ["coverage", "weights", "conversions"]
    assert set(result.meta["stats"]) == {"coverage", "conversions"}
    assert result.meta["quant_model"]["bytes"] > 0 and result.meta["samples"] == 0 and result.meta["random_inputs"]
    for check in CHECKS.values():
        assert inspect.signature(check.func).return_annotation in ("CheckOutput", CheckOutput), check.name


def test_library_modules_do_not_import_the_cli():
    import subprocess
    import sys

    code = (
        "import sys, qdiff._diagnose, qdiff._profile; "
        "bad = [m for m in sys.modules if m.startswith('qdiff.cli') or m == 'rich']; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
