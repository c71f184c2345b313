"""Loading ONNX models and a read-only view of their graphs.

This module imports onnx only, never onnxruntime. It answers the questions the matcher and the
tapper ask of a graph: who produces a tensor, who consumes it, which tensors are constants and what
their values are, which element type and shape a tensor has, and the nodes in topological order.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import onnx
from onnx import numpy_helper

from qdiff.ops import COMPUTE_OPS
from qdiff.errors import ModelError

__all__ = [
    "LoadedModel", "Graph", "load_model", "with_ir_version", "ModelLike", "external_dir", "initializer_bytes",
]

log = logging.getLogger(__name__)

ModelLike = Union[str, Path, onnx.ModelProto]

#: metadata key naming the folder of a model's external data when qdiff leaves it on disk
EXTERNAL_DIR_KEY = "qdiff.external_data_dir"
#: models whose external data is larger than this keep it on disk: onnxruntime reads it from
#: the folder, qdiff reads single tensors when it needs them, and protobuf's 2 GB limit on a
#: serialized model never applies (smaller external data is loaded into the proto). Loaded into
#: the proto, the weights are held in Python and twice in a session built from the serialized
#: bytes, which costs more peak memory and time than reading them from disk (figures in
#: bench/RESULTS.md). compare's fused-graph taps stop at the same size
#: (EngineOptions.prefuse_max_bytes), so no model loses them.
KEEP_EXTERNAL_BYTES = 256 << 20
#: constant values up to this size are cached by Graph.const_value
_CACHE_MAX_BYTES = 16 << 20


def initializer_bytes(model: onnx.ModelProto, where: Callable[[onnx.TensorProto], bool] | None = None) -> int:
    """Bytes of the model's initializers (those ``where`` accepts), from their shapes and element
    types: no data is read or serialized."""
    total = 0
    sizes: dict[int, int] = {}
    for t in model.graph.initializer:
        if where is not None and not where(t):
            continue
        item = sizes.get(t.data_type)
        if item is None:
            try:
                item = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            except Exception:  # noqa: BLE001 - strings, undefined types
                item = 1
            sizes[t.data_type] = item
        total += math.prod(t.dims) * item
    return total




def layer_macs(g: Graph) -> int | None:
    """Multiply-accumulates of one run through the Conv/ConvTranspose/MatMul/Gemm nodes, from the
    inferred shapes (symbolic dimensions count 1): output elements times the reduction length.
    None where such a node's shapes are unknown."""
    total = 0
    for node in g.nodes:
        if node.op_type not in COMPUTE_OPS or len(node.input) < 2:
            continue
        out, w = g.shape(node.output[0]), g.shape(node.input[1])
        if not out or not w:
            return None
        dims = [d if isinstance(d, int) and d > 0 else 1 for d in out]
        wd = [d if isinstance(d, int) and d > 0 else 1 for d in w]
        if node.op_type == "Conv":
            k = math.prod(wd[1:])
        elif node.op_type == "ConvTranspose":
            k = wd[0] * math.prod(wd[2:]) // max(1, int(attr_value(node, "group", 1)))
        elif node.op_type == "Gemm" and attr_value(node, "transB", 0):
            k = wd[-1]
        else:
            k = wd[-2] if len(wd) >= 2 else wd[0]
        total += math.prod(dims) * k
    return total


def external_dir(model: onnx.ModelProto) -> str | None:
    """The folder of the external data a model loaded by :func:`load_model` left on disk."""
    for prop in model.metadata_props:
        if prop.key == EXTERNAL_DIR_KEY:
            return prop.value
    return None


def save_with_data(model: onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    """Save ``model`` to ``path`` for a tool that reads it from there (onnxruntime's quantizer and
    calibrator): weights :func:`load_model` left on disk are copied into ``path``'s folder, since
    their locations are relative to the model's own folder (onnx refuses symbolic links and files
    with several hard links there)."""
    import shutil

    onnx.save(model, path)
    folder = external_dir(model)
    if folder is None:
        return
    target = Path(path).resolve().parent
    for loc in {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}:
        src, dst = (Path(folder) / loc).resolve(), (target / loc).resolve()
        if not dst.is_relative_to(target):  # a location outside the model's folder: not ours to write
            continue
        if src.exists() and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)


def _check_external_locations(proto: onnx.ModelProto, path: Path, role: str) -> None:
    """Refuse external data outside the model's folder (``../x.bin``, ``/etc/x``, a link out):
    a model file must not make qdiff or onnxruntime read any other file (path traversal)."""
    try:
        from onnx.external_data_helper import _get_all_tensors

        tensors = list(_get_all_tensors(proto))
    except ImportError:  # pragma: no cover - older onnx
        tensors = list(proto.graph.initializer)
    folder = path.resolve().parent
    for t in tensors:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = next((e.value for e in t.external_data if e.key == "location"), "")
        rel = Path(loc)
        if not loc or rel.is_absolute() or ".." in rel.parts or not (folder / rel).resolve().is_relative_to(folder):
            raise ModelError(
                f"{role} '{path}': tensor '{t.name}' keeps its data at '{loc}', outside the model's folder "
                f"'{path.parent}' (a path traversal); qdiff reads external data only from beside the model: put the "
                "file in that folder and give its location as a name relative to it"
            )


def _external_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            total += int(info.get("length", 0) or 0)
    return total

#: onnx element types holding real numbers (the ones a quantization error is measured on).
FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
)


@dataclass(frozen=True)
class LoadedModel:
    """A model as qdiff received it.

    Attributes:
        proto: the ModelProto, external data loaded (or, above ``KEEP_EXTERNAL_BYTES``, left on
            disk with its folder recorded under ``EXTERNAL_DIR_KEY`` in the metadata).
        label: how messages name it (the file name, or ``"<float ModelProto>"``).
        path: the file it came from, or None for an in-memory ModelProto.
        sha256: hash of the serialized model, recorded in a result's meta.
    """

    proto: onnx.ModelProto
    label: str
    path: Path | None
    sha256: str


def load_model(model: ModelLike, *, role: str = "model") -> LoadedModel:
    """Load a model from a path or take a ModelProto, with a user-facing error on failure.

    Args:
        model: a path to an .onnx file or a ModelProto (not modified).
        role: how error messages name the model ("float model", "quantized model").

    Raises:
        ModelError: the file is missing, unreadable or not an ONNX model.
    """
    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        try:
            data = proto.SerializeToString()
        except Exception:  # noqa: BLE001 - protobuf's EncodeError above 2 GB
            data = b""
        return LoadedModel(proto, f"<{role} ModelProto>", None, hashlib.sha256(data).hexdigest())
    path = Path(model)
    if not path.exists():
        raise ModelError(f"{role} '{path}' does not exist; check the path")
    if path.is_dir():
        raise ModelError(f"{role} '{path}' is a directory, not an .onnx file")
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ModelError(
            f"{role} '{path}' is not a readable ONNX model ({type(exc).__name__}: {exc}); "
            "pass the .onnx file the exporter or quantizer wrote, with its external data files beside it"
        ) from None
    _check_external_locations(proto, path, role)
    try:
        if _external_bytes(proto) > KEEP_EXTERNAL_BYTES:
            entry = proto.metadata_props.add()
            entry.key, entry.value = EXTERNAL_DIR_KEY, str(path.resolve().parent)
        elif any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
            from onnx.external_data_helper import load_external_data_for_model

            load_external_data_for_model(proto, str(path.parent))
    except Exception as exc:  # protobuf raises DecodeError and friends; missing data files
        raise ModelError(
            f"{role} '{path}' is not a readable ONNX model ({type(exc).__name__}: {exc}); "
            "pass the .onnx file the exporter or quantizer wrote, with its external data files beside it"
        ) from None
    if not proto.graph.node and not proto.graph.output:
        raise ModelError(f"{role} '{path}' is not an ONNX model (it holds no graph); pass an .onnx file")
    return LoadedModel(proto, path.name, path, digest.hexdigest())


def default_opset(model: onnx.ModelProto) -> int | None:
    """The model's default-domain (``ai.onnx``) opset version, None if it imports none."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def with_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto | None:
    """``model`` raised to default-domain opset ``version`` by onnx's version converter (a new
    model; node and tensor names kept), the model itself if it is already there, None if the
    converter fails or the model keeps weights on disk."""
    have = default_opset(model)
    if have is None or have >= version:
        return model
    if external_dir(model) is not None:
        return None
    from onnx import version_converter

    try:
        out = version_converter.convert_version(model, version)
    except Exception as exc:  # noqa: BLE001 - the converter's own limits (unsupported ops)
        log.debug("opset conversion %s -> %s failed: %s", have, version, exc)
        return None
    out.ir_version = max(model.ir_version, 7)
    return out


def with_ir_version(model: onnx.ModelProto, ir_version: int) -> onnx.ModelProto:
    """Return a copy of ``model`` whose IR version is lowered to ``ir_version`` (a pass: input untouched)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if out.ir_version > ir_version:
        log.info("lowering IR version %d to %d", out.ir_version, ir_version)
        out.ir_version = ir_version
    return out



def node_label(node: onnx.NodeProto, idx: int) -> str:
    """The one name qdiff gives a node everywhere (layers, configs, exports, node data): its name, or
    ``op_type(first output)`` when it has none (``quantize.prepare_model`` names unnamed nodes so)."""
    return node.name or f"{node.op_type}({node.output[0] if node.output else idx})"

class Graph:
    """Read-only view of the main graph of a model.

    Attributes:
        model: the ModelProto (after shape inference where it succeeded).
        nodes: the graph's nodes in topological order.
        inputs: names of the real graph inputs (initializers excluded).
        outputs: names of the graph outputs.
        producer: tensor name -> index (into ``nodes``) of the node writing it.
        consumers: tensor name -> indices of the nodes reading it.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = _infer_shapes(model)  # its large initializers have no data: read them from ``model``
        graph = self.model.graph
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in model.graph.initializer}
        self.inputs: list[str] = [i.name for i in graph.input if i.name not in self.initializers]
        self.outputs: list[str] = [o.name for o in graph.output]
        self.nodes: list[onnx.NodeProto] = _topological(list(graph.node), set(self.inputs) | set(self.initializers))
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        for idx, node in enumerate(self.nodes):
            for out in node.output:
                if out:
                    self.producer[out] = idx
            for name in node.input:
                if name:
                    self.consumers[name].append(idx)
        self._types: dict[str, onnx.TypeProto] = {}
        for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
            if vi.type.HasField("tensor_type"):
                self._types[vi.name] = vi.type
        self._constants = self._find_constants()
        self._value_cache: dict[str, np.ndarray | None] = {}
        self.external_dir = external_dir(model)

    # -- structure ------------------------------------------------------------------------
    def node_label(self, idx: int) -> str:
        """The node's name, or ``op_type(first output)`` for unnamed nodes (:func:`node_label`)."""
        return node_label(self.nodes[idx], idx)

    def is_constant(self, name: str) -> bool:
        """True for initializers, Constant outputs and tensors computed from constants only."""
        if not name:
            return True
        return name in self._constants

    def _find_constants(self) -> set[str]:
        """One pass in topological order (no recursion: graphs may be thousands of nodes deep)."""
        constants = set(self.initializers)
        for node in self.nodes:
            if node.op_type.startswith("Random") or _has_subgraph(node):
                continue
            inputs = [i for i in node.input if i]
            if node.op_type == "Constant" or (inputs and all(i in constants for i in inputs)):
                constants.update(o for o in node.output if o)
        return constants

    def const_value(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant node output (None if not such a tensor)."""
        if name in self._value_cache:
            return self._value_cache[name]
        value: np.ndarray | None = None
        if name in self.initializers:
            value = numpy_helper.to_array(self.initializers[name], base_dir=self.external_dir or "")
        elif name in self.producer:
            node = self.nodes[self.producer[name]]
            if node.op_type == "Constant":
                value = _constant_node_value(node)
            elif node.op_type in ("Identity",) and node.input:
                value = self.const_value(node.input[0])
            elif node.op_type == "Cast" and node.input:
                src = self.const_value(node.input[0])
                if src is not None:
                    to = onnx.helper.get_attribute_value(_attr(node, "to"))
                    value = src.astype(onnx.helper.tensor_dtype_to_np_dtype(to))
        if value is None or value.nbytes <= _CACHE_MAX_BYTES:  # big weights are read again when needed
            self._value_cache[name] = value
        return value

    # -- types ----------------------------------------------------------------------------
    def elem_type(self, name: str) -> int | None:
        """onnx element type of a tensor, when known."""
        if name in self.initializers:
            return self.initializers[name].data_type
        tp = self._types.get(name)
        if tp is not None and tp.tensor_type.elem_type:
            return tp.tensor_type.elem_type
        if name in self.producer:
            node = self.nodes[self.producer[name]]
            if node.op_type == "Constant":
                value = self.const_value(name)
                if value is not None:
                    return onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        return None

    def shape(self, name: str) -> list[int | str | None] | None:
        """Shape of a tensor (ints, symbolic names or None per axis), when known."""
        if name in self.initializers:
            return list(self.initializers[name].dims)
        tp = self._types.get(name)
        if tp is None or not tp.tensor_type.HasField("shape"):
            return None
        return [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tp.tensor_type.shape.dim
        ]

    def elements(self, name: str, unknown_dim: int | None = None) -> int | None:
        """Number of elements of a tensor from its static shape; an unknown or symbolic dimension
        counts as ``unknown_dim``, or makes the answer None when that is None (also None when the
        shape itself is unknown and ``unknown_dim`` is None; 1 otherwise)."""
        shape = self.shape(name)
        if shape is None:
            return None if unknown_dim is None else 1
        total = 1
        for d in shape:
            if not isinstance(d, int) or d <= 0:
                if unknown_dim is None:
                    return None
                d = unknown_dim
            total *= d
        return total

    def is_float(self, name: str) -> bool | None:
        """Whether a tensor holds real numbers (None when its type is unknown)."""
        et = self.elem_type(name)
        return None if et is None else et in FLOAT_TYPES


def _attr(node: onnx.NodeProto, name: str) -> onnx.AttributeProto | None:
    for a in node.attribute:
        if a.name == name:
            return a
    return None


def attr_value(node: onnx.NodeProto, name: str, default=None):
    """Value of a node attribute, or ``default``."""
    a = _attr(node, name)
    return default if a is None else onnx.helper.get_attribute_value(a)


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None


#: initializers with more bytes than this are left out of the copy that shape inference works on
_SKELETON_BYTES = 1 << 16


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model's graph after onnx's shape inference, run on a copy whose large initializers keep
    their names, types and shapes but no data (marked external): inferring on the model itself
    copied every weight (as many bytes again as the model) and was impossible above 2 GB. Shapes that
    depend on a large constant's values are not inferred; nothing in qdiff needs those. The model as
    given where inference fails."""
    skeleton = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(skeleton, field, getattr(model, field))
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    g, src = skeleton.graph, model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    g.sparse_initializer.extend(src.sparse_initializer)
    for t in src.initializer:
        if len(t.raw_data) > _SKELETON_BYTES:
            stub = g.initializer.add()
            stub.name, stub.data_type = t.name, t.data_type
            stub.dims.extend(t.dims)
            stub.data_location = onnx.TensorProto.EXTERNAL
            entry = stub.external_data.add()
            entry.key, entry.value = "location", "qdiff-not-loaded"
        else:
            g.initializer.append(t)
    try:
        return onnx.shape_inference.infer_shapes(skeleton, strict_mode=False)
    except Exception as exc:  # custom domains can make inference give up; the graph stays usable
        log.debug("shape inference failed: %s", exc)
        return model


def _topological(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Kahn's algorithm, stable with respect to the file order."""
    produced_by: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            if o:
                produced_by[o] = i
    deps: list[set[int]] = []
    users: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(nodes):
        d = {produced_by[x] for x in _all_inputs(n) if x in produced_by and produced_by[x] != i}
        deps.append(d)
        for j in d:
            users[j].append(i)
    ready = deque(i for i, d in enumerate(deps) if not d)
    order: list[int] = []
    remaining = [len(d) for d in deps]
    while ready:
        i = ready.popleft()
        order.append(i)
        for u in users[i]:
            remaining[u] -= 1
            if remaining[u] == 0:
                ready.append(u)
    if len(order) != len(nodes):  # a cycle or dangling input: keep file order for the rest
        seen = set(order)
        order += [i for i in range(len(nodes)) if i not in seen]
    return [nodes[i] for i in order]


def _all_inputs(node: onnx.NodeProto) -> list[str]:
    """Inputs of a node including outer-scope names its subgraphs read."""
    names = [x for x in node.input if x]
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            for sub in g.node:
                local.update(sub.output)
            for sub in g.node:
                names.extend(x for x in _all_inputs(sub) if x and x not in local)
    return names
