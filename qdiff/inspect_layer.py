"""The values of one layer in both models, for one sample: what :func:`qdiff.plot.layer_values` draws.

::

    match both graphs -> the layer's tensor pair (and its region: output scale / zero point)
      -> tap just that tensor in each model -> run sample ``sample`` through both
      -> dequantize an integer tap with the pair's scale/zero point -> LayerValues

The quantization grid of the layer's output (``step * (k - zero_point)``) comes from the
quantized output group: the scale and zero point of its QuantizeLinear / integer tensor, or of the
integer tap itself. It is None where the output is not quantized (FP16, dynamic quantization) or
quantized per channel.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from qdiff.errors import UsageError
from qdiff.graph import Graph, ModelLike, load_model
from qdiff.inputs import DataLike, check_same_inputs, input_specs, make_source, parse_input_shapes
from qdiff.engine.sessions import SessionFactory, SessionOptions, default_session_factory, feed_for, open_session, tap_model
from qdiff.structs import DequantParams, Matching, TensorPair

__all__ = ["LayerValues", "layer_values"]


@dataclass(frozen=True, eq=False)
class LayerValues:
    """One layer's output in the float and the quantized model, for one sample.

    Attributes:
        layer: the layer name (as in ``CompareResult.layers``).
        float_values: the float model's tensor.
        quant_values: the quantized model's tensor, dequantized where it is an integer tensor.
        step: the output quantization step (scale), None when unknown or per channel.
        zero_point: the output zero point, None when unknown.
        qmin: smallest integer of the output's quantized type (e.g. 0 for uint8), None if unknown.
        qmax: largest integer of the output's quantized type (e.g. 255 for uint8), None if unknown.
        float_tensor: the tapped float tensor.
        quant_tensor: the tapped quantized tensor.
        sample: which sample (batch index) was run.
    """

    layer: str
    float_values: np.ndarray
    quant_values: np.ndarray
    step: float | None
    zero_point: float | None
    qmin: int | None = None
    qmax: int | None = None
    float_tensor: str = ""
    quant_tensor: str = ""
    sample: int = 0


def layer_values(
    float_model: ModelLike,
    quant_model: ModelLike,
    layer: str,
    data: DataLike = None,
    sample: int = 0,
    *,
    batch_size: int = 1,
    seed: int = 0,
    input_shapes: Mapping[str, Any] | list[str] | None = None,
    provider: str = "CPUExecutionProvider",
    session_factory: SessionFactory | None = None,
    tensor_map: Mapping[str, str] | str | None = None,
) -> LayerValues:
    """Run one sample through both models and return one layer's values.

    Args:
        float_model: the reference model (path or ModelProto).
        quant_model: the quantized model.
        layer: a layer name of ``CompareResult.layers`` (``conv1+relu1``, ``input:x``, ...), or
            one of its float tensor names.
        data: as for :func:`qdiff.compare`.
        sample: the index of the sample (of the batch, with ``batch_size`` > 1) to run.
        batch_size, seed, input_shapes, provider, session_factory, tensor_map: as for
            :func:`qdiff.compare`.

    Returns:
        A :class:`LayerValues`.

    Raises:
        UsageError: the layer is not among the matched layers, or the data has no such sample.
    """
    if sample < 0:
        raise UsageError(f"sample must be 0 or more, got {sample}")
    f_loaded = load_model(float_model, role="float model")
    q_loaded = load_model(quant_model, role="quantized model")
    if session_factory is None:
        session_factory = default_session_factory(SessionOptions(provider=provider))
    fg, qg = Graph(f_loaded.proto), Graph(q_loaded.proto)
    specs = input_specs(fg)
    check_same_inputs(specs, input_specs(qg), f_loaded.label, q_loaded.label)
    if isinstance(tensor_map, str):
        from qdiff.matching import load_tensor_map

        tensor_map = load_tensor_map(tensor_map)
    from qdiff.matching import match_models, no_weight_values

    matching = match_models(fg, qg, tensor_map, weigh=no_weight_values)
    pair = _find_pair(matching, layer)
    step, zero_point, qmin, qmax = _grid(matching, pair)

    source = make_source(
        data, specs, samples=(sample + 1) * batch_size, batch_size=batch_size, seed=seed,
        input_shapes=parse_input_shapes(input_shapes),
    )  # fmt: skip
    batch = None
    for b, item in enumerate(source):
        if b == sample:
            batch = item
            break
    if batch is None:
        raise UsageError(f"sample {sample} is not in {source.description} (it has {source.batches} run(s))")
    f_sess, _ = open_session(session_factory, tap_model(f_loaded.proto, [pair.float_tensor]), f_loaded.label)
    q_sess, _ = open_session(session_factory, tap_model(q_loaded.proto, [pair.quant_tensor]), q_loaded.label)
    (ref,) = f_sess.run([pair.float_tensor], feed_for(f_sess, batch))
    (cand,) = q_sess.run([pair.quant_tensor], feed_for(q_sess, batch))
    from qdiff.engine.taps import real_values as _real

    return LayerValues(
        layer=pair.layer,
        float_values=np.asarray(ref),
        quant_values=np.asarray(_real(cand, pair)),
        step=step,
        zero_point=zero_point,
        qmin=qmin,
        qmax=qmax,
        float_tensor=pair.float_tensor,
        quant_tensor=pair.quant_tensor,
        sample=sample,
    )


def _find_pair(matching: Matching, layer: str) -> TensorPair:
    candidates = list(matching.pairs) + [o for o in matching.outputs if o.layer not in {p.layer for p in matching.pairs}]
    for p in candidates:
        if p.layer == layer:
            return p
    for p in candidates:
        if p.float_tensor == layer:
            return p
    names = ", ".join(p.layer for p in matching.pairs)
    raise UsageError(f"layer '{layer}' is not a matched layer; the layers are: {names}")


def _grid(matching: Matching, pair: TensorPair) -> tuple[float | None, float | None, int | None, int | None]:
    """Step, zero point and integer range of the layer's output quantization, where known."""
    params: DequantParams | None = None
    for region in matching.regions:
        if region.layer != pair.layer:
            continue
        if region.output_dequant is not None:
            params = region.output_dequant
        else:
            params = next((m.params for m in region.members if m.domain == "quant" and m.params is not None), None)
        break
    if params is None:
        params = pair.dequant
    if params is None or params.per_channel:
        return None, None, None, None
    step = float(np.asarray(params.scale).reshape(-1)[0])
    zp_arr = np.asarray(params.zero_point)
    zero_point = float(zp_arr.reshape(-1)[0]) if zp_arr.size else 0.0
    qmin = qmax = None
    if zp_arr.dtype.kind in "iu":
        info = np.iinfo(zp_arr.dtype)
        qmin, qmax = int(info.min), int(info.max)
    return step, zero_point, qmin, qmax
