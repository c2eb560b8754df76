"""Static INT8 quantization of an exported model with onnxruntime's own quantizer, and its check.

`quantize_int8` calls `onnxruntime.quantization.quantize_static`: QDQ format, weights int8 per
output channel, activations uint8 with ranges calibrated on preprocessed images (min/max, entropy
or percentile). Activations are uint8, not onnxruntime's default int8, because its CPU provider
fuses only u8 activations × s8 weights into QLinearConv/QLinearAdd on x86: with s8 activations
most QDQ convs stay float between Quantize/Dequantize pairs and the model runs slower than float.

Before calibration, every conv → conv edge (a factorized block's stages, with no nonlinearity
between them) is equalized (`equalize_conv_chains`): each intermediate channel is rescaled, and
the next stage compensates exactly, so that one per-tensor uint8 range serves all channels.

`quant_pre_process` is not run: it re-infers shapes the exporter already wrote (seconds per model)
and left the fused graph of rankfold's exports unchanged.

Layers kept in float are named as in the PyTorch model: the exporter records each node's module
path (`pkg.torch.onnx.name_scopes`), so `layer1.0.conv1` (or a glob, or a parent) selects the
node(s) of that layer, including every stage of its factorized block.
"""

from __future__ import annotations

import ast
import contextlib
import fnmatch
import io
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from rankfold.passes.core import ConfigError, DataError, ExportError, atomic_path

CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
SCOPES_KEY = "pkg.torch.onnx.name_scopes"


@dataclass
class QuantizedModel:
    """What `quantize_int8` wrote."""

    path: Path
    method: str  # calibration method
    samples: int  # calibration images
    quantized_nodes: int  # conv/linear nodes now int8
    float_nodes: dict[str, str] = field(default_factory=dict)  # ONNX node → its layer, kept float
    equalized_edges: int = 0  # conv → conv edges rescaled before calibration


class BatchReader(CalibrationDataReader):
    """Feeds preprocessed float batches to onnxruntime's calibrator and counts the images."""

    def __init__(self, input_name: str, batches: Iterable[np.ndarray | torch.Tensor]) -> None:
        self.input_name = input_name
        self._batches: Iterator[np.ndarray | torch.Tensor] = iter(batches)
        self.samples = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        if batch is None:
            return None
        array = as_input_array(batch)
        self.samples += len(array)
        return {self.input_name: array}


def node_layer(node: onnx.NodeProto) -> str:
    """The dotted module path the exporter recorded for `node` ('' at the top level), else the
    node's name (files from other exporters)."""
    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            scopes = ast.literal_eval(prop.value)  # the exporter writes a Python list literal
            return scopes[-2] if len(scopes) >= 2 else ""
    return node.name


def layer_matches(layer: str, pattern: str) -> bool:
    """A layer name matches itself, a glob, or a parent (a setting on a parent covers its
    children, as in per-layer rank settings)."""
    return (
        layer == pattern or fnmatch.fnmatchcase(layer, pattern) or layer.startswith(pattern + ".")
    )


def compute_nodes(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, str]]:
    """Conv/linear nodes with their layer names, in graph order."""
    return [(node, node_layer(node)) for node in model.graph.node if node.op_type in COMPUTE_OPS]


def quantize_int8(
    float_path: str | Path,
    out_path: str | Path,
    calibration: Iterable[np.ndarray | torch.Tensor],
    method: str = "minmax",
    float_layers: Sequence[str] = (),
    equalize: bool = True,
) -> QuantizedModel:
    """Write a statically quantized copy of `float_path` to `out_path`.

    `calibration` yields preprocessed N×C×H×W float batches (as the model is fed); conv/linear
    nodes of layers matching `float_layers` (names, globs or parents) stay float; with `equalize`
    the conv → conv edges are equalized first (`equalize_conv_chains`). Raises DataError
    when `calibration` yields nothing, ConfigError for an unknown method or a pattern that
    matches no layer.
    """
    if method not in CALIBRATION_METHODS:
        raise ConfigError(
            f"calibration method '{method}' is unknown; use one of {', '.join(CALIBRATION_METHODS)}"
        )
    source = Path(float_path)
    if not source.is_file():
        raise ExportError(f"ONNX file {source} not found; export the model first")
    model = onnx.load(str(source))
    nodes = compute_nodes(model)
    excluded: dict[str, str] = {}
    for pattern in float_layers:
        matched = {node.name: layer for node, layer in nodes if layer_matches(layer, pattern)}
        if not matched:
            known = ", ".join(sorted({layer for _, layer in nodes})[:8])
            raise ConfigError(
                f"float layer '{pattern}' matches no conv/linear layer of {source.name} "
                f"(layers: {known}, …); give a layer name, glob or parent"
            )
        excluded.update(matched)
    batches = iter(calibration)
    first = next(batches, None)
    if first is None or len(first) == 0:
        raise DataError("the calibration set is empty; give calibration images (--train-data)")
    calibration_batches = [first, *batches]
    reader = BatchReader(model.graph.input[0].name, calibration_batches)
    equalized = equalize_conv_chains(model, calibration_batches) if equalize else 0
    target = Path(out_path)
    with atomic_path(target) as tmp, _quiet_quantizer():
        quantize_static(
            model if equalized else source,
            tmp,
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CALIBRATION_METHODS[method],
            nodes_to_exclude=sorted(excluded),
        )
    return QuantizedModel(
        path=target,
        method=method,
        samples=reader.samples,
        quantized_nodes=len(nodes) - len(excluded),
        float_nodes=excluded,
        equalized_edges=equalized,
    )


# A channel is scaled up at most this much: a near-dead channel is not blown up to full range.
MAX_CHANNEL_SCALE = 1e3


def equalize_conv_chains(
    model: onnx.ModelProto, batches: Sequence[np.ndarray | torch.Tensor]
) -> int:
    """Rescale, in place, the channels of every conv → conv edge so that per-tensor activation
    quantization wastes no range; returns the number of edges rescaled. The model's function
    is unchanged: channel r of the first conv's output is multiplied by m_r (its weights and
    bias rows) and the second conv's input weights of channel r divided by it.

    The multipliers come from each channel's largest |activation| a_r on `batches`. When every
    input channel of the second conv feeds its own outputs only (depthwise), its per-output-
    channel weight scales absorb any m_r, so all channels are brought to the largest range
    (m_r = max a / a_r). Otherwise m_r also shrinks or grows that conv's weight column, so range
    is shared between activation and weight as SmoothQuant does (m_r ∝ √(w_r / a_r), w_r the
    column's largest |weight|, α = 0.5). Hand-written: onnxruntime's quantizer has no
    cross-layer equalization, and neither torch.ao's nor AIMET's applies to an ONNX file.
    """
    edges = _conv_edges(model)
    if not edges:
        return 0
    ranges = _channel_ranges(model, [a.output[0] for a, _ in edges], batches)
    weights = {init.name: init for init in model.graph.initializer}
    for first, second in edges:
        activation = ranges[first.output[0]]
        w_first = onnx.numpy_helper.to_array(weights[first.input[1]]).copy()
        w_second = onnx.numpy_helper.to_array(weights[second.input[1]]).copy()
        channels = w_first.shape[0]
        groups = _attribute(second, "group", 1)
        # (group, its outputs, its input channels, kernel): input channel r is [r // per_group,
        # :, r % per_group], so channel order is the flattened (group, input channel) order.
        by_group = w_second.reshape(groups, -1, channels // groups, *w_second.shape[2:])
        column = np.abs(by_group).max(axis=(1, *range(3, by_group.ndim))).reshape(-1)
        alive = (activation > 0) & (column > 0)
        multiplier = np.ones(channels)
        if channels == groups:
            multiplier[alive] = activation[alive].max() / activation[alive]
        else:
            balance = np.sqrt(column[alive] / activation[alive])
            multiplier[alive] = balance / balance.min()
        multiplier = np.minimum(multiplier, MAX_CHANNEL_SCALE)
        w_first *= multiplier.reshape(-1, *[1] * (w_first.ndim - 1))
        _store(weights[first.input[1]], w_first)
        if len(first.input) > 2 and first.input[2]:
            bias = onnx.numpy_helper.to_array(weights[first.input[2]]) * multiplier
            _store(weights[first.input[2]], bias)
        by_group /= multiplier.reshape(groups, 1, -1, *[1] * (by_group.ndim - 3))
        _store(weights[second.input[1]], w_second)
    return len(edges)


def _conv_edges(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """(first, second) conv pairs where the first's output feeds the second alone, and both
    weights (and the first's bias) are initializers neither shares."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    initializers = {init.name for init in model.graph.initializer}
    outputs = {output.name for output in model.graph.output}

    def owned(node: onnx.NodeProto, names: Sequence[str]) -> bool:
        return all(name in initializers and len(consumers[name]) == 1 for name in names if name)

    edges = []
    for node in model.graph.node:
        if node.op_type != "Conv" or node.output[0] in outputs:
            continue
        users = consumers.get(node.output[0], [])
        if len(users) != 1 or users[0].op_type != "Conv" or users[0].input[0] != node.output[0]:
            continue
        if owned(node, node.input[1:]) and owned(users[0], users[0].input[1:2]):
            edges.append((node, users[0]))
    return edges


def _channel_ranges(
    model: onnx.ModelProto, tensors: list[str], batches: Sequence[np.ndarray | torch.Tensor]
) -> dict[str, np.ndarray]:
    """Each tensor's largest |value| per channel (axis 1) over `batches`, from onnxruntime."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    for name in tensors:
        probe.graph.output.append(
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        )
    session = onnxruntime.InferenceSession(
        probe.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    input_name = session.get_inputs()[0].name
    ranges: dict[str, np.ndarray] = {}
    for batch in batches:
        values = session.run(tensors, {input_name: as_input_array(batch)})
        for name, value in zip(tensors, values):
            peak = np.abs(value).max(axis=tuple(i for i in range(value.ndim) if i != 1))
            ranges[name] = np.maximum(ranges.get(name, peak), peak).astype(np.float64)
    return ranges


def as_input_array(batch: np.ndarray | torch.Tensor) -> np.ndarray:
    """A batch as onnxruntime takes it: contiguous float32 NumPy."""
    if isinstance(batch, torch.Tensor):
        batch = batch.detach().cpu().numpy()
    return np.ascontiguousarray(batch, dtype=np.float32)


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    return next(
        (onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default
    )


def _store(initializer: onnx.TensorProto, array: np.ndarray) -> None:
    dtype = onnx.helper.tensor_dtype_to_np_dtype(initializer.data_type)
    initializer.CopyFrom(onnx.numpy_helper.from_array(array.astype(dtype), initializer.name))


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    # The quantizer logs "consider pre-processing" through the root logger (see the module
    # docstring for why it is skipped) and its histogram calibrators print progress to stdout,
    # which is the CLI's JSON channel: neither is actionable here.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)
