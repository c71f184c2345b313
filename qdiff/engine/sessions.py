"""Every onnxruntime session qdiff builds comes from here (onnxruntime's quantizer builds its own).

A *session factory* turns a ModelProto into something with onnxruntime's ``run`` / ``get_inputs``
interface. The default one builds an ``InferenceSession`` on the chosen execution provider;
callers (tests, other providers, a cluster) can hand in their own, so nothing needs patching.

Tapping: a model is copied with the requested intermediate tensors appended to its graph outputs
(:func:`tap_model`). Exposing a tensor as an output can stop onnxruntime from fusing Q/DQ pairs
into its int8 kernels, so a tapped quantized model runs the float simulation of those kernels; the
compare stage checks the tapped model's final outputs against an untapped session on the first
batch and records the difference in the result's meta.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnx

from qdiff.errors import ModelError, ProviderError
from qdiff.graph import external_dir, with_ir_version

__all__ = [
    "Session",
    "SessionFactory",
    "SessionOptions",
    "available_cpus",
    "default_session_factory",
    "optimized_model_file",
    "resolve_provider",
    "tap_model",
    "open_session",
]

log = logging.getLogger(__name__)

_PROTO_LIMIT = 2**31 - 1 - (64 << 20)  # serialized protos above this go through external data


class Session(Protocol):
    """What qdiff needs of an onnxruntime InferenceSession."""

    def run(self, output_names: Sequence[str] | None, input_feed: Mapping[str, Any]) -> list[Any]: ...

    def get_inputs(self) -> list[Any]: ...

    def get_outputs(self) -> list[Any]: ...


SessionFactory = Callable[[onnx.ModelProto], Session]

_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "qnn": "QNNExecutionProvider",
}


@dataclass(frozen=True)
class SessionOptions:
    """How sessions are built (recorded in a result's meta).

    Attributes:
        provider: onnxruntime execution provider name (aliases such as ``cuda`` accepted).
        intra_op_threads: threads per operator; 0 lets onnxruntime use every core.
        graph_optimization: onnxruntime graph optimization level name (``ORT_ENABLE_ALL`` ...).
        allow_spinning: let idle onnxruntime threads spin (onnxruntime's default; off for measuring).
        mem_pattern: onnxruntime's memory pattern (its default; off for measuring).
        profile_prefix: turn onnxruntime's profiler on, writing its trace to files starting with this.
        optimized_model_path: where onnxruntime saves the graph it optimised (None: nowhere);
            see :func:`optimized_model_file`. Not recorded in meta.
    """

    provider: str = "CPUExecutionProvider"
    intra_op_threads: int = 0
    graph_optimization: str = "ORT_ENABLE_ALL"
    extra: dict[str, Any] = field(default_factory=dict)
    allow_spinning: bool = False
    mem_pattern: bool = False
    profile_prefix: str | None = None
    optimized_model_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "intra_op_threads": self.intra_op_threads,
            "graph_optimization": self.graph_optimization,
            "allow_spinning": self.allow_spinning,
            "mem_pattern": self.mem_pattern,
            **self.extra,
        }


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_provider(name: str | None) -> str:
    """Full provider name for ``name`` (or an alias); ProviderError listing those available."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if not name:
        return "CPUExecutionProvider"
    full = _ALIASES.get(name.lower(), name)
    if full not in available:
        raise ProviderError(
            f"execution provider '{name}' is not available in this onnxruntime build; available: {', '.join(available)}"
        )
    return full


def default_session_factory(options: SessionOptions | None = None) -> SessionFactory:
    """A factory building onnxruntime InferenceSessions with ``options``."""
    import onnxruntime as ort

    options = options or SessionOptions()
    provider = resolve_provider(options.provider)

    def factory(model: onnx.ModelProto) -> Session:
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.intra_op_threads
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, options.graph_optimization)
        so.log_severity_level = 3
        if options.optimized_model_path is not None:
            so.optimized_model_filepath = options.optimized_model_path
        # no memory pattern: qdiff's sessions return many tapped tensors, run concurrently from
        # its worker threads and see several batch sizes; the per-shape pattern blocks cost
        # peak memory and save no time (figures in bench/RESULTS.md)
        so.enable_mem_pattern = options.mem_pattern
        # qdiff alternates onnxruntime runs with numpy work on the same cores: threads spinning
        # while waiting for the next run steal that time (much slower on few cores)
        spin = "1" if options.allow_spinning else "0"
        so.add_session_config_entry("session.intra_op.allow_spinning", spin)
        so.add_session_config_entry("session.inter_op.allow_spinning", spin)
        if options.profile_prefix is not None:
            so.enable_profiling = True
            so.profile_file_prefix = options.profile_prefix
        providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
        folder = external_dir(model)
        if folder is not None:  # weights left on disk by load_model: onnxruntime reads them there
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
        try:  # one serialization (counting the size first costs as much again on big models)
            data = model.SerializeToString()
        except Exception:  # noqa: BLE001 - protobuf's EncodeError above 2 GB
            data = None
        if data is not None and len(data) < _PROTO_LIMIT:
            return ort.InferenceSession(data, sess_options=so, providers=providers)
        del data
        with tempfile.TemporaryDirectory(prefix="qdiff-") as tmp:
            path = os.path.join(tmp, "model.onnx")
            onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="model.data")
            return ort.InferenceSession(path, sess_options=so, providers=providers)

    factory.options = options  # type: ignore[attr-defined]  # read by optimized_model_file
    return factory


def optimized_model_file(
    factory: SessionFactory, model: onnx.ModelProto, path: str, level: str = "ORT_ENABLE_EXTENDED"
) -> None:
    """Have onnxruntime optimise ``model`` at ``level`` and save the optimised graph to ``path``.

    The session is built as ``factory`` builds its own (its :class:`SessionOptions`: provider and
    threads) where it is a :func:`default_session_factory`; a custom factory cannot be asked
    for the optimised graph, so the default options (CPU) are used for it.
    """
    from dataclasses import replace

    base = getattr(factory, "options", None)
    if not isinstance(base, SessionOptions):
        base = SessionOptions()
    default_session_factory(replace(base, graph_optimization=level, optimized_model_path=path))(model)


_IR_RE = re.compile(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)")


def open_session(factory: SessionFactory, model: onnx.ModelProto, label: str) -> tuple[Session, list[str]]:
    """Build a session, lowering a too-new IR version where onnxruntime says which it accepts.

    Returns:
        The session and notes on what was normalised (for the result's meta).

    Raises:
        ModelError: onnxruntime cannot load the model; the message has its first line.
    """
    notes: list[str] = []
    try:
        return factory(model), notes
    except Exception as exc:
        text = str(exc)
        m = _IR_RE.search(text)
        if m is None:
            raise ModelError(f"onnxruntime cannot load {label}: {_first_line(text)}") from None
        lowered = with_ir_version(model, int(m.group(2)))
        notes.append(f"{label}: IR version {m.group(1)} lowered to {m.group(2)} for onnxruntime")
        log.warning(notes[-1])
    try:
        return factory(lowered), notes
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot load {label}: {_first_line(str(exc))}") from None


def open_sessions(factory: SessionFactory, items: Sequence[tuple[onnx.ModelProto, str]]) -> list[tuple[Session, list[str]]]:
    """:func:`open_session` of every ``(model, label)``, concurrently where there are several
    cores (onnxruntime builds a session without holding the GIL for most of it: on two cores
    the two tapped models of compare open in the time of the slower one)."""
    if len(items) < 2 or available_cpus() < 2:
        return [open_session(factory, m, label) for m, label in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(len(items) - 1, available_cpus() - 1), thread_name_prefix="qdiff-open") as pool:
        later = [pool.submit(open_session, factory, m, label) for m, label in items[1:]]
        first = open_session(factory, *items[0])
        return [first] + [f.result() for f in later]


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "unknown error"
    return re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", line)[:400]


def tap_model(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """Return a copy of ``model`` whose graph outputs also include ``tensors`` (a pass).

    Tensors already among the outputs are not added twice; the original outputs keep their order
    and come first.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {o.name for o in out.graph.output}
    for name in tensors:
        if name not in present:
            out.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    return out


def feed_for(session: Session, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cast a validated batch to the element types a session's inputs take (FP16 models)."""
    feed = {}
    for inp in session.get_inputs():
        arr = batch[inp.name]
        want = _ORT_TYPES.get(inp.type)
        feed[inp.name] = arr.astype(want) if want is not None and arr.dtype != want else arr
    return feed


_ORT_TYPES = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
}
