"""Per-layer values as Model Explorer *node data*: the error drawn as colour on the graph itself.

Google's Model Explorer (github.com/google-ai-edge/model-explorer) overlays a JSON "node data"
file on a model graph (``model-explorer model.onnx --node_data_paths=qdiff.json``, or "Add per-node
data" in the UI). The format, as documented in its sources:

* ``src/ui/src/components/visualizer/common/types.ts`` — ``NodeDataProviderGraphData``:
  ``{"name"?: str, "results": {NODE_KEY: {"value": number, "bgColor"?: css, "textColor"?: css}},
  "thresholds"?: [{"value": number, "bgColor": css, "textColor"?: css}],
  "gradient"?: [{"stop": 0..1, "bgColor"?: hex|name, "textColor"?: hex|name}], ...}``; a
  model-level file (``NodeDataProviderData``) is an object of those indexed by graph id.
* ``src/server/package/src/model_explorer/node_data_builder.py`` — the same as Python dataclasses
  (``ModelNodeData``, ``GraphNodeData``, ``NodeDataResult``, ``ThresholdItem``, ``GradientItem``).
  A threshold colours values ``<= value`` (the first matching item, in list order; values above the
  last one stay uncoloured); a gradient maps the min..max of the values onto stops 0..1 and takes
  precedence over thresholds.
* ``src/ui/src/components/visualizer/node_data_provider_extension_service.ts``
  (``getNodeDataProviderData``): a file whose top-level ``results`` is present (and is not itself
  keyed ``results``) is applied to the graph being shown; otherwise its keys are graph ids.
  Result keys are node ids, or output tensor names where the adapter records a ``tensor_name`` in
  the node's ``outputsMetadata``.

Node keys for ONNX: the ONNX adapter (github.com/justinchuby/model-explorer-onnx,
``src/model_explorer_onnx/main.py``, ``create_node``) makes one graph node per ONNX node with
``id=onnx_node.name`` and graph id ``graph.name``; it records output tensor names only as
``__tensor_tag`` (not ``tensor_name``), so results must be keyed by **node name**. Its own
``torch_utils.save_node_data_from_verification_info`` writes node names too. Graph inputs and
outputs are extra nodes (``[io]NAME``) whose naming has changed between adapter versions, so
``input:NAME`` rows are left out; unnamed ONNX nodes (which the adapter skips) cannot be keyed.

qdiff's layers map onto float-graph nodes: a fused layer ``conv1+relu1`` gives one entry per float
node (``conv1`` and ``relu1``, same value); ``split:1`` (an output of a multi-output node) keys the
node ``split``, keeping the worst of its outputs. Overlay the file on the **float** model.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from qdiff._io import write_atomic
from qdiff.errors import UsageError

__all__ = ["node_data", "write_node_data", "node_keys", "HIGHER_IS_BETTER", "THRESHOLDS", "GRADIENT"]

_RED, _ORANGE, _LIGHT_GREEN, _GREEN = "#d32f2f", "#ffa000", "#c8e6c9", "#388e3c"

#: fixed colour bands (value <= bound -> colour) for metrics with a meaningful absolute scale
THRESHOLDS: dict[str, list[dict[str, Any]]] = {
    "cosine": [
        {"value": 0.99, "bgColor": _RED},
        {"value": 0.999, "bgColor": _ORANGE},
        {"value": 0.9999, "bgColor": _LIGHT_GREEN},
        {"value": 2.0, "bgColor": _GREEN},
    ],
    "sqnr": [
        {"value": 20.0, "bgColor": _RED},
        {"value": 30.0, "bgColor": _ORANGE},
        {"value": 40.0, "bgColor": _LIGHT_GREEN},
        {"value": 1e300, "bgColor": _GREEN},
    ],
    "noise_ratio": [
        {"value": 2.0, "bgColor": _GREEN},
        {"value": 10.0, "bgColor": _LIGHT_GREEN},
        {"value": 100.0, "bgColor": _ORANGE},
        {"value": 1e300, "bgColor": _RED},
    ],
}

#: other metrics: a gradient from the smallest value (green) to the largest (red)
GRADIENT: list[dict[str, Any]] = [
    {"stop": 0.0, "bgColor": _GREEN},
    {"stop": 0.5, "bgColor": _ORANGE},
    {"stop": 1.0, "bgColor": _RED},
]

#: metrics where a larger value is better: the worst of several values of one node is the smallest
HIGHER_IS_BETTER = {"cosine", "cosine_worst", "sqnr_db", "sqnr_db_worst", "accumulated_cosine", "isolated_cosine",
                    "accumulated_sqnr_db", "isolated_sqnr_db", "keep_float_metric", "top1_agreement"}  # fmt: skip

_ALIASES = {"sqnr": "sqnr_db", "cos": "cosine"}


def node_keys(layer: str) -> list[str]:
    """The float-graph node names a qdiff layer name stands for (``conv1+relu1`` -> conv1, relu1).

    ``input:NAME`` (a graph input, not a node) gives none; ``split:1`` gives ``split``.
    """
    if layer.startswith("input:"):
        return []
    keys = []
    for part in layer.split("+"):
        name = part.rsplit(":", 1)[0] if ":" in part and part.rsplit(":", 1)[1].isdigit() else part
        if name and name not in keys:
            keys.append(name)
    return keys


def _default_metric(result: Any) -> str:
    cols = result.layers.columns
    return "cosine" if "cosine" in cols else "isolated_cosine"


def _colouring(metric: str) -> dict[str, Any]:
    if metric.endswith("cosine") or metric == "keep_float_metric":
        return {"thresholds": THRESHOLDS["cosine"]}
    if "sqnr" in metric:
        return {"thresholds": THRESHOLDS["sqnr"]}
    if metric == "noise_ratio":
        return {"thresholds": THRESHOLDS["noise_ratio"]}
    return {"gradient": GRADIENT}


def node_data(result: Any, metric: str | None = None, *, graph_id: str | None = None) -> dict[str, Any]:
    """Model Explorer node data of one per-layer metric.

    Args:
        result: a :class:`~qdiff.result.CompareResult` or a
            :class:`~qdiff.SensitivityResult`.
        metric: a numeric column of ``result.layers`` (default ``cosine`` for compare,
            ``isolated_cosine`` for sensitivity); ``sqnr`` is accepted for ``sqnr_db``.
        graph_id: when given, the model-level form ``{graph_id: {...}}`` (the ONNX adapter's graph
            id is the ONNX ``graph.name``); by default the single-graph form, which Model Explorer
            applies to the graph being shown.

    Returns:
        A JSON-ready dict: ``{"name", "results": {node: {"value"}}, "thresholds" | "gradient"}``
        (cosine and SQNR in fixed colour bands, red below cosine 0.99 / 20 dB; noise ratio red
        above 100; other metrics a green-to-red gradient over their range). Layers without a value
        are left out.

    Raises:
        UsageError: ``metric`` is not a numeric column of ``result.layers``.
    """
    layers = result.layers
    col = _ALIASES.get(metric, metric) if metric else _default_metric(result)
    if col not in layers.columns or layers[col].dtype.kind not in "fiu" or col in ("order", "rank", "samples"):
        numeric = [c for c in layers.columns if layers[c].dtype.kind in "fiu" and c not in ("order", "rank", "samples")]
        raise UsageError(f"--node-data metric '{metric}' is not a per-layer metric; use one of {', '.join(numeric)}")
    higher_better = col in HIGHER_IS_BETTER
    results: dict[str, dict[str, float]] = {}
    for layer, value in zip(layers["layer"], layers[col]):
        try:
            v = float(value)
        except (TypeError, ValueError):
            continue
        if not math.isfinite(v):
            continue
        for key in node_keys(str(layer)):
            old = results.get(key)
            if old is None or (v < old["value"] if higher_better else v > old["value"]):
                results[key] = {"value": v}
    kind = "sensitivity" if "isolated_cosine" in layers.columns else "compare"
    graph: dict[str, Any] = {"name": f"qdiff {kind}: {col}", "results": results, **_colouring(col)}
    if graph_id is not None:
        return {str(graph_id): graph}
    if "results" in results:
        # a node named "results" would make Model Explorer read the file as keyed by graph id
        name = _float_graph_name(result)
        if name is None:
            raise UsageError(
                "the model has a node named 'results', which Model Explorer would read as a graph id; "
                "pass graph_id=<the ONNX graph name> to write the model-level form"
            )
        return {name: graph}
    return graph


def _float_graph_name(result: Any) -> str | None:
    """The float model's ONNX graph name, read from the file the result's meta names."""
    path = (result.meta.get("float_model") or {}).get("path")
    if not path or not os.path.isfile(path):
        return None
    import onnx

    try:
        return onnx.load(path, load_external_data=False).graph.name or None
    except Exception:  # noqa: BLE001 - unreadable now: the caller asks for graph_id instead
        return None


def write_node_data(result: Any, path: str | os.PathLike[str], metric: str | None = None, *, graph_id: str | None = None) -> None:
    """Write :func:`node_data` as strict JSON, atomically."""
    data = node_data(result, metric, graph_id=graph_id)
    write_atomic(path, json.dumps(data, indent=2, allow_nan=False) + "\n")
