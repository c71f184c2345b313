"""Tiny models built in code, and their int8 twins made with onnxruntime's real quantizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10
OPSET = 17


def finish(graph: onnx.GraphProto, path: Path | None = None) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    if path is not None:
        onnx.save(model, str(path))
    return model


class Reader:
    """CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = list(feeds)
        self.it = iter(self.feeds)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.feeds)


def quantize(float_path: Path, out_path: Path, feeds: list[dict[str, np.ndarray]], **kwargs) -> Path:
    """quantize_static with a reader over ``feeds``; the result gets an IR version onnxruntime loads."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class _R(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(float_path), str(out_path), _R(), **kwargs)
    m = onnx.load(str(out_path))
    m.ir_version = IR_VERSION
    onnx.save(m, str(out_path))
    return out_path


def conv_net(path: Path, seed: int = 0, constant_weights: bool = False) -> onnx.ModelProto:
    """x[1,1,8,8] -> conv1 -> relu1 -> pool1 -> flat -> fc (Gemm) -> y[1,10].

    ::

        x -> Conv(conv1) -> c1 -> Relu(relu1) -> r1 -> MaxPool(pool1) -> p1 -> Flatten(flat) -> f -> Gemm(fc) -> y
    """
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.5, (4, 1, 3, 3)).astype(np.float32)
    b1 = rng.normal(0, 0.1, 4).astype(np.float32)
    w2 = rng.normal(0, 0.2, (10, 64)).astype(np.float32)
    b2 = rng.normal(0, 0.1, 10).astype(np.float32)
    tensors = {"W1": w1, "B1": b1, "W2": w2, "B2": b2}
    nodes = []
    inits = []
    if constant_weights:
        for name, value in tensors.items():
            nodes.append(helper.make_node("Constant", [], [name], name=f"const_{name}", value=numpy_helper.from_array(value, name)))
    else:
        inits = [numpy_helper.from_array(v, k) for k, v in tensors.items()]
    nodes += [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p1"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "W2", "B2"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        inits,
    )
    return finish(graph, path)


def conv_feeds(n: int = 16, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.random((1, 1, 8, 8), dtype=np.float32)} for _ in range(n)]


def matmul_relu(path: Path, seed: int = 0, with_bias: bool = False) -> onnx.ModelProto:
    """x[1,4] -> MatMul(mm, W[4,3]) -> (Add bias) -> Relu(relu) -> y[1,3]."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 1, (4, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"), helper.make_node("Relu", ["m"], ["y"], name="relu")]
    return finish(
        helper.make_graph(
            nodes,
            "matmul_relu",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
            [numpy_helper.from_array(w, "W")],
        ),
        path,
    )


def two_heads(path: Path, same_weights: bool = False, seed: int = 0) -> onnx.ModelProto:
    """x[1,8] -> MatMul(qa, Wa) -> a ; x -> MatMul(qb, Wb) -> b ; Add(a, b) -> y (two candidates per MatMul)."""
    rng = np.random.default_rng(seed)
    wa = rng.normal(0, 1, (8, 8)).astype(np.float32)
    wb = wa.copy() if same_weights else rng.normal(0, 1, (8, 8)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "Wa"], ["a"], name="head_a"),
        helper.make_node("MatMul", ["x", "Wb"], ["b"], name="head_b"),
        helper.make_node("Sub", ["a", "b"], ["y"], name="combine"),
    ]
    return finish(
        helper.make_graph(
            nodes,
            "two_heads",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
            [numpy_helper.from_array(wa, "Wa"), numpy_helper.from_array(wb, "Wb")],
        ),
        path,
    )


def strip_names(src: Path, dst: Path) -> Path:
    """Copy a model with every node name and every non-interface tensor renamed to nothing alike."""
    m = onnx.load(str(src))
    keep = {i.name for i in m.graph.input} | {o.name for o in m.graph.output}
    inits = {t.name for t in m.graph.initializer}
    mapping: dict[str, str] = {}

    def rename(name: str) -> str:
        if not name or name in keep or name in inits:
            return name
        return mapping.setdefault(name, f"t{len(mapping)}")

    for k, node in enumerate(m.graph.node):
        node.name = f"n{k}"
        for i, x in enumerate(node.input):
            node.input[i] = rename(x)
        for i, x in enumerate(node.output):
            node.output[i] = rename(x)
    del m.graph.value_info[:]
    onnx.save(m, str(dst))
    return dst


def shape_reshape_net(path: Path, seed: int = 0) -> onnx.ModelProto:
    """A Conv, then a Reshape whose target shape is computed from the Conv's output the way
    exporters write it (two identical Shape nodes of one tensor), then a MatMul head.

    ::

        x[1,3,8,8] -> Conv(conv) -> c[1,4,8,8] ----------------------------> Reshape(reshape) -> r[1,4,64]
                                     |                                            ^
                                     +-> Shape(shape_a) -> Slice(take_nc, 0:2) -> Concat(new_shape, [-1])
                                     +-> Shape(shape_b) -> Gather(take_n, [0]) -> Concat(out_shape, [-1]) --+
                                                                                                            v
        r -> Transpose(swap, 0 2 1) -> t[1,64,4] -> MatMul(head, W2[4,8]) -> m[1,64,8] -> Reshape(flat) -> y[1,512]
    """
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "B1"),
        numpy_helper.from_array(rng.normal(0, 0.5, (4, 8)).astype(np.float32), "W2"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([2], np.int64), "two"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Shape", ["c"], ["sa"], name="shape_a"),
        helper.make_node("Slice", ["sa", "zero", "two"], ["nc"], name="take_nc"),
        helper.make_node("Concat", ["nc", "minus_one"], ["shp"], name="new_shape", axis=0),
        helper.make_node("Reshape", ["c", "shp"], ["r"], name="reshape"),
        helper.make_node("Transpose", ["r"], ["t"], name="swap", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["t", "W2"], ["m"], name="head"),
        helper.make_node("Shape", ["c"], ["sb"], name="shape_b"),
        helper.make_node("Gather", ["sb", "zero"], ["n"], name="take_n", axis=0),
        helper.make_node("Concat", ["n", "minus_one"], ["oshp"], name="out_shape", axis=0),
        helper.make_node("Reshape", ["m", "oshp"], ["y"], name="flat"),
    ]
    graph = helper.make_graph(
        nodes,
        "shape_reshape_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 512])],
        inits,
    )
    return finish(graph, path)


def shape_feeds(n: int = 4, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.random((1, 3, 8, 8), dtype=np.float32)} for _ in range(n)]


def lstm_net(path: Path, seed: int = 0, seq: int = 6, batch: int = 2, feat: int = 8, hidden: int = 16) -> onnx.ModelProto:
    """An LSTM and a MatMul head; Y_h is a second graph output.

    ::

        x[seq,batch,feat] -> LSTM(lstm, W, R, B) -> Y[seq,1,batch,hidden] -> Squeeze(squeeze, [1]) -> ys
                                                 -> Y_h (output), Y_c
        ys -> MatMul(head, W2[hidden,10]) -> logits[seq,batch,10]
    """
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (1, 4 * hidden, feat)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.normal(0, 0.3, (1, 4 * hidden, hidden)).astype(np.float32), "R"),
        numpy_helper.from_array(rng.normal(0, 0.1, (1, 8 * hidden)).astype(np.float32), "B"),
        numpy_helper.from_array(rng.normal(0, 0.3, (hidden, 10)).astype(np.float32), "W2"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
    ]
    nodes = [
        helper.make_node("LSTM", ["x", "W", "R", "B"], ["Y", "Y_h", "Y_c"], name="lstm", hidden_size=hidden),
        helper.make_node("Squeeze", ["Y", "axis1"], ["ys"], name="squeeze"),
        helper.make_node("MatMul", ["ys", "W2"], ["logits"], name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "lstm_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [seq, batch, feat])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [seq, batch, 10]),
            helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, [1, batch, hidden]),
        ],
        inits,
    )
    return finish(graph, path)


def conv_act_conv(path: Path, activation: str = "Relu", seed: int = 0) -> onnx.ModelProto:
    """x[1,3,8,8] -> Conv(conv1) -> c1 -> Relu(act) or Clip(act, 0, 6) -> a1 -> Conv(conv2) -> y[1,4,8,8].

    The first Conv's bias is negative enough that the activation clamps about half of its output.
    """
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 1.0, (8, 3, 3, 3)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.normal(-0.5, 0.5, 8).astype(np.float32), "B1"),
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 8, 3, 3)).astype(np.float32), "W2"),
        numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "B2"),
    ]
    act = [helper.make_node("Relu", ["c1"], ["a1"], name="act")]
    if activation == "Clip":
        inits += [numpy_helper.from_array(np.array(0, np.float32), "lo"), numpy_helper.from_array(np.array(6, np.float32), "hi")]
        act = [helper.make_node("Clip", ["c1", "lo", "hi"], ["a1"], name="act")]
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        *act,
        helper.make_node("Conv", ["a1", "W2", "B2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_act_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        inits,
    )
    return finish(graph, path)
