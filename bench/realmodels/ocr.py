"""Real exported OCR models (PaddlePaddle PP-OCRv4, from the rapidocr-onnxruntime wheel) and task data.

The models ship inside the ``rapidocr-onnxruntime`` wheel on PyPI (``pip install --no-deps
rapidocr-onnxruntime``); nothing is downloaded at run time. Text images are rendered with the
DejaVu fonts matplotlib ships, so every sample has its ground truth:

* recognizer (``ch_PP-OCRv4_rec_infer.onnx``: PPLCNetV3 CNN + SVTR transformer neck + CTC head,
  opset 12, 860 nodes, weights in Constant nodes): one word per 48x320 image; the metric is
  exact-match accuracy of the CTC-decoded string against the rendered text.
* detector (``ch_PP-OCRv4_det_infer.onnx``: DBNet, opset 12, 672 nodes, weights in Constant
  nodes): several words per 320x320 image; the metric is the detection F1 (hmean) at IoU 0.5 of
  the boxes of the thresholded probability map's connected components against the words' boxes.
"""

from __future__ import annotations

import importlib.util
import os
import random
import string
from pathlib import Path

import numpy as np

REC_SHAPE = (48, 320)
DET_SIZE = 320
# letters that look alike in the DejaVu fonts (I/l, O/0/o) are left out: the ground truth must be unambiguous
_UPPER = "".join(c for c in string.ascii_uppercase if c not in "IO")
_ALPHABET = "".join(c for c in string.ascii_letters if c not in "IlOo") + string.digits


def model_dir() -> Path:
    """The folder of the models inside the installed rapidocr_onnxruntime package."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps 'rapidocr-onnxruntime>=1.4' first (it ships the PP-OCRv4 ONNX models)")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def rec_model() -> Path:
    return model_dir() / "ch_PP-OCRv4_rec_infer.onnx"


def det_model() -> Path:
    return model_dir() / "ch_PP-OCRv4_det_infer.onnx"


def _fonts() -> list[str]:
    import matplotlib

    root = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    names = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Oblique.ttf"]
    return [str(root / n) for n in names if (root / n).is_file()]


def _word(rng: random.Random) -> str:
    kind = rng.random()
    n = rng.randint(3, 10)
    if kind < 0.3:
        return "".join(rng.choice(string.digits) for _ in range(n))
    if kind < 0.6:
        return "".join(rng.choice(_UPPER + string.digits) for _ in range(n))
    return "".join(rng.choice(_ALPHABET) for _ in range(n))


def rec_data(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``n`` word images ``[n, 3, 48, 320]`` normalised as PP-OCR does, and their texts."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    rng = random.Random(seed)
    fonts = _fonts()
    h, w = REC_SHAPE
    out = np.zeros((n, 3, h, w), np.float32)
    texts = []
    for i in range(n):
        text = _word(rng)
        font = ImageFont.truetype(rng.choice(fonts), rng.randint(26, 34))
        left, top, right, bottom = font.getbbox(text)
        bg = rng.randint(170, 255)
        fg = rng.randint(0, 90)
        img = Image.new("RGB", (right - left + 16, bottom - top + 14), (bg, bg, bg))
        ImageDraw.Draw(img).text((8 - left, 7 - top), text, font=font, fill=(fg, fg, fg))
        if rng.random() < 0.5:
            img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
        rw = min(w, int(np.ceil(h * img.width / img.height)))
        arr = np.asarray(img.resize((rw, h), Image.BILINEAR), np.float32)
        arr = arr + np.random.default_rng(seed * 100003 + i).normal(0, 4, arr.shape)
        arr = (np.clip(arr, 0, 255) / 255.0 - 0.5) / 0.5
        out[i, :, :, :rw] = arr.transpose(2, 0, 1)
        texts.append(text)
    return out, texts


def ctc_decode(probs: np.ndarray, chars: list[str]) -> list[str]:
    """Greedy CTC decoding of ``[n, T, C]`` (index 0 blank, 1..C-2 the dictionary, C-1 space)."""
    table = ["" ] + chars + [" "]
    out = []
    for seq in probs.argmax(-1):
        s, prev = [], 0
        for k in seq:
            if k != prev and k != 0:
                s.append(table[k])
            prev = k
        out.append("".join(s))
    return out


def characters(model_path: str | os.PathLike[str]) -> list[str]:
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    meta = {p.key: p.value for p in m.metadata_props}
    return meta["character"].split("\n")


def det_data(n: int, seed: int) -> tuple[np.ndarray, list[list[tuple[int, int, int, int]]]]:
    """``n`` images ``[n, 3, 320, 320]`` with 2-5 words each (PP-OCR det normalisation) and their boxes."""
    from PIL import Image, ImageDraw, ImageFont

    rng = random.Random(seed)
    fonts = _fonts()
    size = DET_SIZE
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    out = np.zeros((n, 3, size, size), np.float32)
    boxes_all = []
    for i in range(n):
        bg = tuple(rng.randint(150, 255) for _ in range(3))
        img = Image.new("RGB", (size, size), bg)
        draw = ImageDraw.Draw(img)
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(rng.randint(2, 5)):
            text = _word(rng)
            font = ImageFont.truetype(rng.choice(fonts), rng.randint(18, 34))
            left, top, right, bottom = font.getbbox(text)
            tw, th = right - left, bottom - top
            if tw >= size - 8:
                continue
            for _attempt in range(20):
                x = rng.randint(4, size - tw - 4)
                y = rng.randint(4, size - th - 4)
                box = (x, y, x + tw, y + th)
                if all(box[2] + 6 < b[0] or b[2] + 6 < box[0] or box[3] + 6 < b[1] or b[3] + 6 < box[1] for b in boxes):
                    fg = tuple(rng.randint(0, 80) for _ in range(3))
                    draw.text((x - left, y - top), text, font=font, fill=fg)
                    boxes.append(box)
                    break
        arr = np.asarray(img, np.float32) / 255.0
        out[i] = ((arr - mean) / std).transpose(2, 0, 1)
        boxes_all.append(boxes)
    return out, boxes_all


def det_boxes(prob: np.ndarray, thresh: float = 0.3, min_area: int = 12) -> list[tuple[int, int, int, int]]:
    """Boxes of the connected components of ``prob > thresh`` (one ``[H, W]`` map), grown as DBNet's unclip does."""
    from scipy import ndimage

    labels, _ = ndimage.label(prob > thresh)
    boxes = []
    for sl in ndimage.find_objects(labels):
        if sl is None:
            continue
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        if (y1 - y0) * (x1 - x0) < min_area:
            continue
        # DBNet shrinks text regions by D = A(1 - r^2) / L with r = 0.4; unclip grows them back by 1.5x that
        h, w = y1 - y0, x1 - x0
        d = 1.5 * (h * w) / (2 * (h + w))
        boxes.append((int(x0 - d), int(y0 - d), int(x1 + d), int(y1 + d)))
    return boxes


def _iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_f1(pred, truth, iou: float = 0.5, *, pred_box=lambda d: d, truth_box=lambda t: t, same=lambda d, t: True) -> float:
    """Detection F1 over images: each prediction, in the order given, takes the unused truth box
    (``same`` kind) of highest IoU; IoU >= ``iou`` is a true positive."""
    tp = fp = fn = 0
    for p, t in zip(pred, truth):
        used: set[int] = set()
        for d in p:
            best, j = 0.0, -1
            for k, g in enumerate(t):
                if k not in used and same(d, g):
                    v = _iou(pred_box(d), truth_box(g))
                    if v > best:
                        best, j = v, k
            if best >= iou:
                used.add(j)
                tp += 1
            else:
                fp += 1
        fn += len(t) - len(used)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def det_f1(pred: list[list[tuple]], truth: list[list[tuple]], iou: float = 0.5) -> float:
    """Detection hmean: greedy one-to-one matching at IoU >= ``iou`` over all images."""
    return match_f1(pred, truth, iou)


# ---- task metrics, as `qdiff fallback --eval bench/realmodels/ocr.py:rec_accuracy` calls them ----

_CACHE: dict = {}
EVAL_SAMPLES = int(os.environ.get("QDIFF_OCR_EVAL_SAMPLES", "200"))


def _session(model_path: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])


def rec_accuracy(model_path: str) -> float:
    """Exact-match accuracy of the recognizer on EVAL_SAMPLES rendered words (seed 1; calibration uses other seeds)."""
    if "rec" not in _CACHE:
        x, texts = rec_data(EVAL_SAMPLES, 1)
        _CACHE["rec"] = (x, texts, characters(rec_model()))
    x, texts, chars = _CACHE["rec"]
    sess = _session(model_path)
    name = sess.get_inputs()[0].name
    probs = np.concatenate([sess.run(None, {name: x[i : i + 16]})[0] for i in range(0, len(x), 16)])
    pred = ctc_decode(probs, chars)
    return float(np.mean([p.strip() == t for p, t in zip(pred, texts)]))


def det_hmean(model_path: str) -> float:
    """Detection F1 at IoU 0.5 of the detector on EVAL_SAMPLES // 2 rendered pages (seed 2)."""
    if "det" not in _CACHE:
        _CACHE["det"] = det_data(max(EVAL_SAMPLES // 2, 1), 2)
    x, truth = _CACHE["det"]
    sess = _session(model_path)
    name = sess.get_inputs()[0].name
    probs = np.concatenate([sess.run(None, {name: x[i : i + 8]})[0] for i in range(0, len(x), 8)])
    return det_f1([det_boxes(p[0]) for p in probs], truth)
