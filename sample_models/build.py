#!/usr/bin/env python
"""Build the qdiff sample models (float models + their quantized twins).

Run from anywhere (typically the repo root)::

    python sample_models/build.py

Every file is (re)generated into the directory containing this script.  The
build is deterministic: running it twice on the same machine with the same
library versions gives byte-identical ``.onnx`` / ``.npz`` / ``.npy`` files
(BLAS is pinned to one thread, all RNGs are seeded, and ``.npz`` archives are
written with a fixed zip timestamp).

Regeneration needs numpy, onnx, onnxruntime, scikit-learn (for the bundled
``load_digits`` data set - no download) and onnxconverter-common (for the
FP16 conversion).  None of these extra packages are needed to *use* the
generated files.

All models: opset 17 (default domain), ``ir_version`` 10 (onnx 1.23 would
write IR 14, which onnxruntime <= 1.31 refuses), graph input named ``input``.

Model 1 - digits CNN (``digits_cnn.*.onnx``), trained with plain numpy on
sklearn's 8x8 digits::

    input  float32 [1,1,8,8]   (pixels / 16, i.e. in [0, 1])
      |
    conv1   Conv 1->8, 3x3, pad 1      -> conv1_out [1,8,8,8]
    relu1   Relu                       -> relu1_out
    pool1   MaxPool 2x2, stride 2      -> pool1_out [1,8,4,4]
    conv2   Conv 8->16, 3x3, pad 1     -> conv2_out [1,16,4,4]
    relu2   Relu                       -> relu2_out
    pool2   MaxPool 2x2, stride 2      -> pool2_out [1,16,2,2]
    flatten Flatten(axis=1)            -> flatten_out [1,64]
    fc1     Gemm 64->32 (transB=1)     -> fc1_out [1,32]
    relu3   Relu                       -> relu3_out
    fc2     Gemm 32->10 (transB=1)     -> logits [1,10]
      |
    logits float32 [1,10]

Model 2 - multi-output CNN (``multi_output.*.onnx``): the digits CNN above
(same trained weights) with a second graph output.  ``features`` is the
output of relu2, which *also* feeds pool2 -> ... -> fc2::

    input -> conv1 -> relu1 -> pool1 -> conv2 -> relu2 --+--> pool2 -> flatten -> fc1 -> relu3 -> fc2 -> logits
                                                         |
                                                         +--> (graph output) features [1,16,4,4]

    graph outputs, in order: features, logits

Model 3 - pre-LN transformer block (``transformer.*.onnx``), seeded random
weights, single attention head, seq 16, hidden 32, FFN 128::

    input [1,16,32] ---------------------------------------+
      |                                                    |
    ln1 LayerNormalization                                 |
      +-----------------+-----------------+                |
    q_proj_matmul    k_proj_matmul     v_proj_matmul       |
    q_proj_add       k_proj_add        v_proj_add          |
      |              k_transpose (perm 0,2,1)  |           |
      +--> attn_qk MatMul <--+                 |           |
           attn_scale Mul (1/sqrt(32))         |           |
           attn_softmax Softmax(axis=-1)       |           |
           attn_v MatMul <---------------------+           |
    out_proj_matmul, out_proj_add                          |
    residual1 Add <----------------------------------------+
      +----------------------------------------------------+
    ln2 LayerNormalization                                 |
    fc1_matmul, fc1_add            (32 -> 128)             |
    gelu_div (x / sqrt 2), gelu_erf Erf, gelu_add (+1),    |
    gelu_mul (* x), gelu_mul_half (* 0.5)                  |
    fc2_matmul, fc2_add            (128 -> 32)             |
    residual2 Add <----------------------------------------+
      |
    output [1,16,32]
"""

from __future__ import annotations

import os

# Pin BLAS / OpenMP to one thread *before* numpy is imported so the numpy
# training is bit-reproducible run to run.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import io  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnxruntime.quantization import (  # noqa: E402
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

OUT_DIR = Path(__file__).resolve().parent
OPSET = 17
IR_VERSION = 10
PRODUCER = "qdiff-sample-models"

SUMMARY: list[tuple[str, str]] = []  # (name, text) lines collected for the final summary


# ---------------------------------------------------------------------------
# generic helpers
# ---------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, flush=True)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Like ``np.savez`` but byte-deterministic (fixed zip member timestamps)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def finalize_and_save(model: onnx.ModelProto, path: Path) -> None:
    """Force IR version 10, check, and save."""
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def fix_ir_version(path: Path) -> None:
    """Reload a file written by a third-party tool and rewrite it with IR 10."""
    model = onnx.load(str(path))
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def make_model(graph: onnx.GraphProto, extra_opsets: dict[str, int] | None = None) -> onnx.ModelProto:
    opsets = [helper.make_opsetid("", OPSET)]
    for domain, version in (extra_opsets or {}).items():
        opsets.append(helper.make_opsetid(domain, version))
    model = helper.make_model(graph, opset_imports=opsets, producer_name=PRODUCER, producer_version="1")
    model.ir_version = IR_VERSION
    return model


def ort_session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_run_all(path: Path, inputs: np.ndarray, output_names: list[str] | None = None) -> list[np.ndarray]:
    """Run the model one sample at a time (batch dim is fixed to 1); stack the outputs."""
    sess = ort_session(path)
    names = output_names or [o.name for o in sess.get_outputs()]
    per_output: list[list[np.ndarray]] = [[] for _ in names]
    for i in range(inputs.shape[0]):
        outs = sess.run(names, {"input": inputs[i : i + 1]})
        for acc, o in zip(per_output, outs):
            acc.append(o)
    return [np.concatenate(acc, axis=0) for acc in per_output]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


class NpzDataReader(CalibrationDataReader):
    """Feeds ``{"input": arr[i:i+1]}`` for every sample of an array."""

    def __init__(self, array: np.ndarray, input_name: str = "input"):
        self.array = array
        self.input_name = input_name
        self.index = 0

    def get_next(self):
        if self.index >= self.array.shape[0]:
            return None
        item = {self.input_name: self.array[self.index : self.index + 1]}
        self.index += 1
        return item

    def rewind(self):
        self.index = 0


def run_quantize_static(float_path: Path, out_path: Path, calib: np.ndarray, **kwargs) -> None:
    quantize_static(str(float_path), str(out_path), NpzDataReader(calib), **kwargs)
    fix_ir_version(out_path)


def run_fp16(float_path: Path, out_path: Path) -> None:
    from onnxconverter_common import float16

    model = onnx.load(str(float_path))
    model16 = float16.convert_float_to_float16(model, keep_io_types=True)
    model16.ir_version = IR_VERSION
    onnx.checker.check_model(model16)
    onnx.save(model16, str(out_path))


# ---------------------------------------------------------------------------
# 1. digits CNN: data, numpy training, ONNX export
# ---------------------------------------------------------------------------


def load_digits_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return (
        np.ascontiguousarray(x_tr, dtype=np.float32),
        np.ascontiguousarray(x_te, dtype=np.float32),
        np.ascontiguousarray(y_tr, dtype=np.int64),
        np.ascontiguousarray(y_te, dtype=np.int64),
    )


def conv3x3_forward(x, w, b):
    """3x3 / stride 1 / pad 1 cross-correlation via im2col. x: [N,C,H,W], w: [O,C,3,3]."""
    n, c, h, wd = x.shape
    o = w.shape[0]
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    cols = np.stack([xp[:, :, i : i + h, j : j + wd] for i in range(3) for j in range(3)], axis=2)
    cols = cols.reshape(n, c * 9, h * wd)  # index c*9 + (3*i + j) matches w.reshape(O, C*9)
    out = (w.reshape(o, c * 9) @ cols).reshape(n, o, h, wd) + b[None, :, None, None]
    return out, cols


def conv3x3_backward(dout, cols, w, x_shape):
    n, c, h, wd = x_shape
    o = w.shape[0]
    d = dout.reshape(n, o, h * wd)
    dw = np.tensordot(d, cols, axes=([0, 2], [0, 2])).reshape(w.shape)
    db = d.sum(axis=(0, 2))
    dcols = (w.reshape(o, c * 9).T @ d).reshape(n, c, 9, h, wd)
    dxp = np.zeros((n, c, h + 2, wd + 2), dtype=dout.dtype)
    for k in range(9):
        i, j = divmod(k, 3)
        dxp[:, :, i : i + h, j : j + wd] += dcols[:, :, k]
    return dxp[:, :, 1:-1, 1:-1], dw, db


def maxpool2_forward(x):
    n, c, h, w = x.shape
    xr = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
    idx = xr.argmax(axis=-1)
    out = np.take_along_axis(xr, idx[..., None], axis=-1)[..., 0]
    return out, idx


def maxpool2_backward(dout, idx, x_shape):
    n, c, h, w = x_shape
    d = np.zeros((n, c, h // 2, w // 2, 4), dtype=dout.dtype)
    np.put_along_axis(d, idx[..., None], dout[..., None], axis=-1)
    return d.reshape(n, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h, w)


def digits_forward(params, x, keep_cache=False):
    """Numpy forward pass mirroring the ONNX graph exactly."""
    cache = {}
    a1, cols1 = conv3x3_forward(x, params["conv1.weight"], params["conv1.bias"])
    r1 = np.maximum(a1, 0)
    p1, idx1 = maxpool2_forward(r1)
    a2, cols2 = conv3x3_forward(p1, params["conv2.weight"], params["conv2.bias"])
    r2 = np.maximum(a2, 0)
    p2, idx2 = maxpool2_forward(r2)
    f = p2.reshape(p2.shape[0], -1)
    h1 = f @ params["fc1.weight"].T + params["fc1.bias"]
    r3 = np.maximum(h1, 0)
    logits = r3 @ params["fc2.weight"].T + params["fc2.bias"]
    if keep_cache:
        cache = dict(x=x, a1=a1, cols1=cols1, r1=r1, idx1=idx1, p1=p1, a2=a2, cols2=cols2, r2=r2,
                     idx2=idx2, p2=p2, f=f, h1=h1, r3=r3)
    return logits, r2, cache


def digits_backward(params, cache, dlogits):
    g = {}
    g["fc2.weight"] = dlogits.T @ cache["r3"]
    g["fc2.bias"] = dlogits.sum(0)
    dr3 = dlogits @ params["fc2.weight"]
    dh1 = dr3 * (cache["h1"] > 0)
    g["fc1.weight"] = dh1.T @ cache["f"]
    g["fc1.bias"] = dh1.sum(0)
    df = dh1 @ params["fc1.weight"]
    dp2 = df.reshape(cache["p2"].shape)
    dr2 = maxpool2_backward(dp2, cache["idx2"], cache["r2"].shape)
    da2 = dr2 * (cache["a2"] > 0)
    dp1, g["conv2.weight"], g["conv2.bias"] = conv3x3_backward(da2, cache["cols2"], params["conv2.weight"], cache["p1"].shape)
    dr1 = maxpool2_backward(dp1, cache["idx1"], cache["r1"].shape)
    da1 = dr1 * (cache["a1"] > 0)
    _, g["conv1.weight"], g["conv1.bias"] = conv3x3_backward(da1, cache["cols1"], params["conv1.weight"], cache["x"].shape)
    return g


def train_digits_cnn(x_tr, y_tr, epochs=40, batch=32, lr=3e-3, seed=0):
    """Adam + softmax cross-entropy, float64 training, float32 result."""
    rng = np.random.default_rng(seed)

    def he(shape, fan_in):
        return rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape)

    params = {
        "conv1.weight": he((8, 1, 3, 3), 9),
        "conv1.bias": np.zeros(8),
        "conv2.weight": he((16, 8, 3, 3), 72),
        "conv2.bias": np.zeros(16),
        "fc1.weight": he((32, 64), 64),
        "fc1.bias": np.zeros(32),
        "fc2.weight": he((10, 32), 32) * 0.5,
        "fc2.bias": np.zeros(10),
    }
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(v) for k, v in params.items()}
    b1, b2, eps = 0.9, 0.999, 1e-8
    x64 = x_tr.astype(np.float64)
    n = x64.shape[0]
    step = 0
    for epoch in range(epochs):
        order = rng.permutation(n)
        total_loss = 0.0
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            xb, yb = x64[idx], y_tr[idx]
            logits, _, cache = digits_forward(params, xb, keep_cache=True)
            z = logits - logits.max(axis=1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(axis=1, keepdims=True)
            total_loss += -np.log(p[np.arange(len(yb)), yb] + 1e-12).sum()
            dlogits = p
            dlogits[np.arange(len(yb)), yb] -= 1.0
            dlogits /= len(yb)
            grads = digits_backward(params, cache, dlogits)
            step += 1
            lr_t = lr * (0.5 * (1 + np.cos(np.pi * epoch / epochs)))  # cosine decay per epoch
            for k in params:
                m[k] = b1 * m[k] + (1 - b1) * grads[k]
                v[k] = b2 * v[k] + (1 - b2) * grads[k] ** 2
                mhat = m[k] / (1 - b1**step)
                vhat = v[k] / (1 - b2**step)
                params[k] -= lr_t * mhat / (np.sqrt(vhat) + eps)
        if epoch % 10 == 9 or epoch == epochs - 1:
            log(f"    epoch {epoch + 1:3d}/{epochs}  train loss {total_loss / n:.4f}")
    return {k: val.astype(np.float32) for k, val in params.items()}


def build_digits_graph(params, with_features_output=False, name="digits_cnn") -> onnx.GraphProto:
    f32 = TensorProto.FLOAT
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["conv1_out"], name="conv1",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("Relu", ["conv1_out"], ["relu1_out"], name="relu1"),
        helper.make_node("MaxPool", ["relu1_out"], ["pool1_out"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["pool1_out", "conv2.weight", "conv2.bias"], ["conv2_out"], name="conv2",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("Relu", ["conv2_out"], ["relu2_out"], name="relu2"),
        helper.make_node("MaxPool", ["relu2_out"], ["pool2_out"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["pool2_out"], ["flatten_out"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flatten_out", "fc1.weight", "fc1.bias"], ["fc1_out"], name="fc1", transB=1),
        helper.make_node("Relu", ["fc1_out"], ["relu3_out"], name="relu3"),
        helper.make_node("Gemm", ["relu3_out", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1),
    ]
    inits = [numpy_helper.from_array(params[k], name=k) for k in
             ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
              "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]]
    inputs = [helper.make_tensor_value_info("input", f32, [1, 1, 8, 8])]
    outputs = [helper.make_tensor_value_info("logits", f32, [1, 10])]
    if with_features_output:
        outputs = [helper.make_tensor_value_info("features", f32, [1, 16, 4, 4])] + outputs
        # relu2 writes "features" directly; pool2 consumes it.
        nodes[4].output[0] = "features"
        nodes[5].input[0] = "features"
    return helper.make_graph(nodes, name, inputs, outputs, inits)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


def build_digits(results: dict) -> dict:
    log("[1/3] digits CNN")
    x_tr, x_te, y_tr, y_te = load_digits_split()
    log(f"    train {x_tr.shape}, test {x_te.shape}")

    calib = x_tr[:100].copy()
    save_npz(OUT_DIR / "digits_calib.npz", input=calib)
    save_npz(OUT_DIR / "digits_test.npz", input=x_te)
    np.save(OUT_DIR / "digits_test_labels.npy", y_te)

    t0 = time.time()
    params = train_digits_cnn(x_tr, y_tr)
    log(f"    trained in {time.time() - t0:.1f}s")
    np_logits, _, _ = digits_forward(params, x_te)
    np_acc = accuracy(np_logits, y_te)
    log(f"    numpy float32 test accuracy: {np_acc:.4f}")

    float_path = OUT_DIR / "digits_cnn.float.onnx"
    finalize_and_save(make_model(build_digits_graph(params)), float_path)

    # verify ONNX == numpy
    (ort_logits,) = ort_run_all(float_path, x_te)
    max_diff = float(np.abs(ort_logits - np_logits).max())
    same_argmax = bool((ort_logits.argmax(1) == np_logits.argmax(1)).all())
    log(f"    onnxruntime vs numpy: max |diff| {max_diff:.2e}, identical argmax: {same_argmax}")
    assert same_argmax and max_diff < 1e-3, "ONNX export does not match the numpy forward pass"

    # quantized variants
    q = {
        "digits_cnn.qdq_per_channel.onnx": dict(quant_format=QuantFormat.QDQ, per_channel=True,
                                                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8),
        "digits_cnn.qdq_per_tensor.onnx": dict(quant_format=QuantFormat.QDQ, per_channel=False,
                                               activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8),
        "digits_cnn.qoperator.onnx": dict(quant_format=QuantFormat.QOperator, per_channel=False,
                                          activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8),
    }
    for fname, kwargs in q.items():
        run_quantize_static(float_path, OUT_DIR / fname, calib, **kwargs)

    # Dynamic quantization with the default op types (Conv, MatMul, ...).
    # quantize_dynamic rewrites each Gemm as MatMul + Add first, so fc1/fc2
    # are quantized too (MatMulInteger); Conv becomes ConvInteger.  With
    # onnxruntime 1.31 the CPU ConvInteger kernel accepts int8 weights, so
    # the (default) QInt8 weight type runs; activations are uint8
    # (DynamicQuantizeLinear).
    dyn_path = OUT_DIR / "digits_cnn.dynamic.onnx"
    quantize_dynamic(str(float_path), str(dyn_path), weight_type=QuantType.QInt8, per_channel=False)
    fix_ir_version(dyn_path)

    run_fp16(float_path, OUT_DIR / "digits_cnn.fp16.onnx")

    variants = ["float", "qdq_per_channel", "qdq_per_tensor", "qoperator", "dynamic", "fp16"]
    for v in variants:
        path = OUT_DIR / f"digits_cnn.{v}.onnx"
        (logits,) = ort_run_all(path, x_te)
        acc = accuracy(logits, y_te)
        cos = cosine(logits, ort_logits)
        agree = float((logits.argmax(1) == ort_logits.argmax(1)).mean())
        results[path.name] = dict(accuracy=acc, cosine=cos, argmax_agreement=agree)
        log(f"    {path.name:34s} test acc {acc:.4f}  cos(logits vs float) {cos:.8f}  argmax agree {agree:.4f}")
    return params


# ---------------------------------------------------------------------------
# 2. multi-output CNN
# ---------------------------------------------------------------------------


def build_multi_output(params, results: dict) -> None:
    log("[2/3] multi-output CNN")
    float_path = OUT_DIR / "multi_output.float.onnx"
    finalize_and_save(make_model(build_digits_graph(params, with_features_output=True, name="multi_output")), float_path)
    calib = np.load(OUT_DIR / "digits_calib.npz")["input"]
    x_te = np.load(OUT_DIR / "digits_test.npz")["input"]
    y_te = np.load(OUT_DIR / "digits_test_labels.npy")

    # verify against numpy
    np_logits, np_feat, _ = digits_forward(params, x_te)
    feats, logits = ort_run_all(float_path, x_te, ["features", "logits"])
    assert np.abs(feats - np_feat).max() < 1e-3 and np.abs(logits - np_logits).max() < 1e-3

    q_path = OUT_DIR / "multi_output.qdq.onnx"
    run_quantize_static(float_path, q_path, calib, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    for path in (float_path, q_path):
        qf, ql = ort_run_all(path, x_te, ["features", "logits"])
        res = dict(accuracy=accuracy(ql, y_te), cosine=cosine(ql, logits), cosine_features=cosine(qf, feats))
        results[path.name] = res
        log(f"    {path.name:34s} test acc {res['accuracy']:.4f}  cos(logits) {res['cosine']:.8f}  "
            f"cos(features) {res['cosine_features']:.8f}")


# ---------------------------------------------------------------------------
# 3. pre-LN transformer block
# ---------------------------------------------------------------------------

SEQ, HID, FFN = 16, 32, 128


def transformer_params(seed=1234):
    rng = np.random.default_rng(seed)

    def lin(fan_in, fan_out):
        w = rng.normal(0.0, 1.0 / np.sqrt(fan_in), size=(fan_in, fan_out)).astype(np.float32)
        b = rng.normal(0.0, 0.02, size=(fan_out,)).astype(np.float32)
        return w, b

    p = {}
    for ln in ("ln1", "ln2"):
        p[f"{ln}.weight"] = (1.0 + rng.normal(0.0, 0.1, size=(HID,))).astype(np.float32)
        p[f"{ln}.bias"] = rng.normal(0.0, 0.05, size=(HID,)).astype(np.float32)
    for name, fi, fo in (("q_proj", HID, HID), ("k_proj", HID, HID), ("v_proj", HID, HID),
                         ("out_proj", HID, HID), ("fc1", HID, FFN), ("fc2", FFN, HID)):
        p[f"{name}.weight"], p[f"{name}.bias"] = lin(fi, fo)
    p["attn.scale"] = np.array(1.0 / np.sqrt(HID), dtype=np.float32)
    p["gelu.sqrt2"] = np.array(np.sqrt(2.0), dtype=np.float32)
    p["gelu.one"] = np.array(1.0, dtype=np.float32)
    p["gelu.half"] = np.array(0.5, dtype=np.float32)
    return p


def transformer_numpy(p, x):
    import math

    erf = np.vectorize(math.erf)

    def ln(t, g, b, eps=1e-5):
        mu = t.mean(-1, keepdims=True)
        var = ((t - mu) ** 2).mean(-1, keepdims=True)
        return (t - mu) / np.sqrt(var + eps) * g + b

    x = x.astype(np.float64)
    h = ln(x, p["ln1.weight"], p["ln1.bias"])
    q = h @ p["q_proj.weight"] + p["q_proj.bias"]
    k = h @ p["k_proj.weight"] + p["k_proj.bias"]
    v = h @ p["v_proj.weight"] + p["v_proj.bias"]
    s = (q @ k.transpose(0, 2, 1)) * p["attn.scale"]
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    a = (s @ v) @ p["out_proj.weight"] + p["out_proj.bias"]
    r1 = x + a
    h2 = ln(r1, p["ln2.weight"], p["ln2.bias"])
    f = h2 @ p["fc1.weight"] + p["fc1.bias"]
    f = f * 0.5 * (1.0 + erf(f / np.sqrt(2.0)))
    return r1 + f @ p["fc2.weight"] + p["fc2.bias"]


def build_transformer_graph(p) -> onnx.GraphProto:
    f32 = TensorProto.FLOAT
    n = helper.make_node
    nodes = [
        n("LayerNormalization", ["input", "ln1.weight", "ln1.bias"], ["ln1_out"], name="ln1", axis=-1, epsilon=1e-5),
    ]
    for proj in ("q_proj", "k_proj", "v_proj"):
        nodes += [
            n("MatMul", ["ln1_out", f"{proj}.weight"], [f"{proj}_matmul_out"], name=f"{proj}_matmul"),
            n("Add", [f"{proj}_matmul_out", f"{proj}.bias"], [f"{proj}_out"], name=f"{proj}_add"),
        ]
    nodes += [
        n("Transpose", ["k_proj_out"], ["k_transposed"], name="k_transpose", perm=[0, 2, 1]),
        n("MatMul", ["q_proj_out", "k_transposed"], ["attn_scores"], name="attn_qk"),
        n("Mul", ["attn_scores", "attn.scale"], ["attn_scores_scaled"], name="attn_scale"),
        n("Softmax", ["attn_scores_scaled"], ["attn_probs"], name="attn_softmax", axis=-1),
        n("MatMul", ["attn_probs", "v_proj_out"], ["attn_context"], name="attn_v"),
        n("MatMul", ["attn_context", "out_proj.weight"], ["out_proj_matmul_out"], name="out_proj_matmul"),
        n("Add", ["out_proj_matmul_out", "out_proj.bias"], ["out_proj_out"], name="out_proj_add"),
        n("Add", ["input", "out_proj_out"], ["residual1_out"], name="residual1"),
        n("LayerNormalization", ["residual1_out", "ln2.weight", "ln2.bias"], ["ln2_out"], name="ln2", axis=-1,
          epsilon=1e-5),
        n("MatMul", ["ln2_out", "fc1.weight"], ["fc1_matmul_out"], name="fc1_matmul"),
        n("Add", ["fc1_matmul_out", "fc1.bias"], ["fc1_out"], name="fc1_add"),
        n("Div", ["fc1_out", "gelu.sqrt2"], ["gelu_div_out"], name="gelu_div"),
        n("Erf", ["gelu_div_out"], ["gelu_erf_out"], name="gelu_erf"),
        n("Add", ["gelu_erf_out", "gelu.one"], ["gelu_add_out"], name="gelu_add"),
        n("Mul", ["fc1_out", "gelu_add_out"], ["gelu_mul_out"], name="gelu_mul"),
        n("Mul", ["gelu_mul_out", "gelu.half"], ["gelu_out"], name="gelu_mul_half"),
        n("MatMul", ["gelu_out", "fc2.weight"], ["fc2_matmul_out"], name="fc2_matmul"),
        n("Add", ["fc2_matmul_out", "fc2.bias"], ["fc2_out"], name="fc2_add"),
        n("Add", ["residual1_out", "fc2_out"], ["output"], name="residual2"),
    ]
    used = []
    for node in nodes:
        for i in node.input:
            if i in p and i not in used:
                used.append(i)
    inits = [numpy_helper.from_array(p[k], name=k) for k in used]
    return helper.make_graph(
        nodes, "transformer_block",
        [helper.make_tensor_value_info("input", f32, [1, SEQ, HID])],
        [helper.make_tensor_value_info("output", f32, [1, SEQ, HID])],
        inits,
    )


def build_transformer(results: dict) -> None:
    log("[3/3] transformer block")
    rng = np.random.default_rng(4321)
    calib = rng.standard_normal((32, SEQ, HID)).astype(np.float32)
    data = rng.standard_normal((16, SEQ, HID)).astype(np.float32)
    save_npz(OUT_DIR / "transformer_calib.npz", input=calib)
    save_npz(OUT_DIR / "transformer_data.npz", input=data)

    p = transformer_params()
    float_path = OUT_DIR / "transformer.float.onnx"
    finalize_and_save(make_model(build_transformer_graph(p)), float_path)
    (ref,) = ort_run_all(float_path, data)
    np_ref = transformer_numpy(p, data)
    max_diff = float(np.abs(ref - np_ref).max())
    log(f"    onnxruntime vs numpy reference: max |diff| {max_diff:.2e}")
    assert max_diff < 1e-3, "transformer ONNX graph does not match the numpy reference"

    q_path = OUT_DIR / "transformer.qdq.onnx"
    run_quantize_static(float_path, q_path, calib, quant_format=QuantFormat.QDQ, per_channel=False,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    fp16_path = OUT_DIR / "transformer.fp16.onnx"
    run_fp16(float_path, fp16_path)
    for path in (float_path, q_path, fp16_path):
        (out,) = ort_run_all(path, data)
        cos = cosine(out, ref)
        err = float(np.abs(out - ref).max())
        results[path.name] = dict(cosine=cos, max_abs_err=err)
        log(f"    {path.name:34s} cos(output vs float) {cos:.8f}  max |err| {err:.4f}")


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def main() -> int:
    t0 = time.time()
    log(f"numpy {np.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}")
    results: dict[str, dict] = {}
    params = build_digits(results)
    build_multi_output(params, results)
    build_transformer(results)

    log("\nSummary")
    log(f"{'file':38s} {'size':>9s}  metrics")
    for path in sorted(OUT_DIR.iterdir()):
        if path.suffix not in (".onnx", ".npz", ".npy"):
            continue
        size = path.stat().st_size
        assert size < 300 * 1024, f"{path.name} is too large ({size} bytes)"
        metrics = ", ".join(
            f"{k}={v:.8f}" if k.startswith("cosine") else f"{k}={v:.4f}"
            for k, v in results.get(path.name, {}).items()
        )
        log(f"{path.name:38s} {size:9d}  {metrics}")
    log(f"done in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
