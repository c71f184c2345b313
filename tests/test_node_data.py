"""--node-data: Google Model Explorer node data, validated against the format's documented schema.

The schema below transcribes Model Explorer's own definition of a node data file:
``src/ui/src/components/visualizer/common/types.ts`` (``NodeDataProviderGraphData``,
``NodeDataProviderResultData``, ``ThresholdItem``, ``GradientItem``; a model-level file is an
object of graph data indexed by graph id) and ``src/server/package/src/model_explorer/
node_data_builder.py`` (the same as Python dataclasses), in github.com/google-ai-edge/model-explorer.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import jsonschema
import onnx
import pandas as pd
import pytest
from conftest import strict_json_load

import qdiff
from qdiff.cli._common import add_report_options, check_report_options, write_reports
from qdiff.errors import UsageError
from qdiff.node_data import node_data, node_keys, write_node_data

_COLOR = {"type": "string", "minLength": 1}
_HEX_OR_NAME = {"type": "string", "pattern": r"^(#[0-9a-fA-F]{6}|[a-zA-Z]+)$"}  # gradient colours: hex or a name only
GRAPH_NODE_DATA_SCHEMA = {
    "type": "object",
    "required": ["results"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "results": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["value"],
                "additionalProperties": False,
                "properties": {"value": {}, "bgColor": _COLOR, "textColor": _COLOR},
            },
        },
        "thresholds": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["value", "bgColor"],
                "additionalProperties": False,
                "properties": {"value": {"type": "number"}, "bgColor": _COLOR, "textColor": _COLOR},
            },
        },
        "gradient": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["stop"],
                "additionalProperties": False,
                "properties": {
                    "stop": {"type": "number", "minimum": 0, "maximum": 1},
                    "bgColor": _HEX_OR_NAME,
                    "textColor": _HEX_OR_NAME,
                },
            },
        },
        "hideInAggregatedStatsTable": {"type": "boolean"},
        "hideInChildrenStatsTable": {"type": "boolean"},
        "hideAggregatedStats": {"type": "array", "items": {"enum": ["min", "max", "sum", "avg"]}},
        "showExpandedSummaryOnGroupNode": {"type": "boolean"},
        "showLabelCountColumnsInChildrenStatsTable": {"type": "boolean"},
    },
}
MODEL_NODE_DATA_SCHEMA = {"type": "object", "minProperties": 1, "additionalProperties": GRAPH_NODE_DATA_SCHEMA}


def _validate_graph_data(doc: dict) -> None:
    jsonschema.validate(doc, GRAPH_NODE_DATA_SCHEMA)
    # what the schema cannot say: numeric values, thresholds ascending, gradient from stop 0 to stop 1
    assert all(isinstance(r["value"], (int, float)) for r in doc["results"].values())
    if "thresholds" in doc:
        bounds = [t["value"] for t in doc["thresholds"]]
        assert bounds == sorted(bounds)
    if "gradient" in doc:
        stops = [g["stop"] for g in doc["gradient"]]
        assert stops[0] == 0 and stops[-1] == 1 and stops == sorted(stops)
    # Model Explorer reads a top-level "results" without a nested "results" as single-graph data
    assert "results" not in doc["results"]


@pytest.fixture(scope="module")
def compare_result(samples_dir):
    return qdiff.compare(
        samples_dir / "digits_cnn.float.onnx", samples_dir / "digits_cnn.qdq_per_tensor.onnx",
        data=samples_dir / "digits_test.npz", samples=8,
    )  # fmt: skip


@pytest.fixture(scope="module")
def float_node_names(samples_dir):
    return {n.name for n in onnx.load(str(samples_dir / "digits_cnn.float.onnx")).graph.node}


def test_schema_accepts_model_explorers_own_example_and_rejects_garbage():
    # node_data_builder.py's documented threshold example, as GraphNodeData.to_json_string writes it
    example = {
        "results": {"conv1": {"value": 10}, "relu1": {"value": 42, "bgColor": "blue"}},
        "thresholds": [{"value": 10, "bgColor": "red"}, {"value": 50, "bgColor": "blue"}, {"value": 100, "bgColor": "yellow"}],
    }
    jsonschema.validate(example, GRAPH_NODE_DATA_SCHEMA)
    jsonschema.validate({"main_graph": example}, MODEL_NODE_DATA_SCHEMA)
    for bad in ({"results": {"a": {"val": 1}}}, {"results": {}, "thresholds": [{"value": 1}]},
                {"results": {}, "gradient": [{"stop": 2, "bgColor": "red"}]}, {"values": {}}):  # fmt: skip
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, GRAPH_NODE_DATA_SCHEMA)


def test_compare_node_data_is_keyed_by_float_node_names(compare_result, float_node_names, tmp_path):
    path = tmp_path / "nd.json"
    write_node_data(compare_result, path)
    doc = strict_json_load(path)
    _validate_graph_data(doc)
    results = doc["results"]
    assert set(results) <= float_node_names
    # every non-input layer is there; a fused layer gives one entry per float node, same value
    layers = compare_result.layers[compare_result.layers["kind"] != "input"]
    assert set(results) == {k for layer in layers["layer"] for k in node_keys(layer)}
    cos = dict(zip(compare_result.layers["layer"], compare_result.layers["cosine"]))
    assert results["conv1"]["value"] == results["relu1"]["value"] == pytest.approx(cos["conv1+relu1"])
    assert results["fc2"]["value"] == pytest.approx(cos["fc2"])
    assert not any(k.startswith("input") for k in results)
    # cosine colours: red at or below 0.99 (thresholds colour values <= their bound)
    assert doc["thresholds"][0] == {"value": 0.99, "bgColor": "#d32f2f"}
    assert "gradient" not in doc
    assert doc["name"] == "qdiff compare: cosine"


def test_model_level_form_is_keyed_by_graph_id(compare_result, samples_dir):
    graph_name = onnx.load(str(samples_dir / "digits_cnn.float.onnx")).graph.name
    doc = node_data(compare_result, "mse", graph_id=graph_name)
    jsonschema.validate(doc, MODEL_NODE_DATA_SCHEMA)
    assert list(doc) == [graph_name]
    graph = doc[graph_name]
    _validate_graph_data(graph)
    assert "gradient" in graph and "thresholds" not in graph  # error metrics: a green-to-red gradient
    assert graph["results"]["fc2"]["value"] == pytest.approx(float(compare_result.layers.set_index("layer").loc["fc2", "mse"]))


def test_sensitivity_node_data_defaults_to_isolated_cosine(samples_dir, float_node_names):
    result = qdiff.sensitivity(
        samples_dir / "digits_cnn.float.onnx", samples_dir / "digits_cnn.qdq_per_tensor.onnx",
        data=samples_dir / "digits_test.npz", samples=4, gain=False,
    )  # fmt: skip
    doc = node_data(result)
    _validate_graph_data(doc)
    assert doc["name"] == "qdiff sensitivity: isolated_cosine"
    assert set(doc["results"]) <= float_node_names
    iso = dict(zip(result.layers["layer"], result.layers["isolated_cosine"]))
    assert doc["results"]["fc1"]["value"] == pytest.approx(iso["fc1+relu3"])
    _validate_graph_data(node_data(result, "noise_ratio"))


def test_multi_output_layers_keep_the_worst_value_and_nan_is_left_out():
    df = pd.DataFrame({"layer": ["split:0", "split:1", "a+b", "input:x", "c"], "cosine": [0.999, 0.95, 0.98, 0.9, float("nan")]})
    doc = node_data(SimpleNamespace(layers=df, meta={}))
    _validate_graph_data(doc)
    assert doc["results"] == {"split": {"value": 0.95}, "a": {"value": 0.98}, "b": {"value": 0.98}}
    json.dumps(doc, allow_nan=False)


def test_a_node_named_results_gets_the_model_level_form(samples_dir):
    df = pd.DataFrame({"layer": ["results"], "cosine": [0.999]})
    meta = {"float_model": {"path": str(samples_dir / "digits_cnn.float.onnx")}}
    doc = node_data(SimpleNamespace(layers=df, meta=meta))
    assert list(doc) == ["digits_cnn"]
    jsonschema.validate(doc, MODEL_NODE_DATA_SCHEMA)
    with pytest.raises(UsageError, match="graph_id"):
        node_data(SimpleNamespace(layers=df, meta={}))


def test_unknown_metric_is_a_usage_error(compare_result):
    with pytest.raises(UsageError, match="cosine"):
        node_data(compare_result, "layer")


def test_cli_report_helpers_write_both_files(compare_result, tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    add_report_options(parser)
    html_path, nd_path = tmp_path / "r.html", tmp_path / "nd.json"
    args = parser.parse_args(["--html", str(html_path), "--node-data", str(nd_path), "--node-data-metric", "sqnr_db"])
    args.argv = ["compare", "a b.onnx", "q.onnx", "--html", str(html_path)]
    check_report_options(args, "compare")
    written = write_reports(args, compare_result, "compare")
    assert written == [str(html_path), str(nd_path)]
    doc = strict_json_load(nd_path)
    _validate_graph_data(doc)
    assert doc["name"] == "qdiff compare: sqnr_db"
    assert "qdiff compare &#x27;a b.onnx&#x27; q.onnx" in html_path.read_text()  # the command, shell-quoted, escaped


def test_cli_report_checks_before_the_run(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    add_report_options(parser, node_data=False)
    args = parser.parse_args(["--html", str(tmp_path / "missing" / "r.html")])
    assert not hasattr(args, "node_data")
    with pytest.raises(UsageError, match="--html"):
        check_report_options(args, "fallback")
    parser = argparse.ArgumentParser()
    add_report_options(parser)
    with pytest.raises(UsageError, match="--node-data-metric"):
        check_report_options(parser.parse_args(["--node-data-metric", "gain"]), "compare")
    with pytest.raises(UsageError, match="kind"):
        write_reports(parser.parse_args([]), None, "match")
