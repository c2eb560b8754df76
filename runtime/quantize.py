"""Static INT8 quantization of an exported model with onnxruntime's own quantizer, and its check.

`quantize_int8` calls `onnxruntime.quantization.quantize_static`: QDQ format, weights int8 per
output channel, activations uint8 with ranges calibrated on preprocessed images (min/max, entropy
or percentile). Activations are uint8, not onnxruntime's default int8, because its CPU provider
fuses only u8 activations × s8 weights into QLinearConv/QLinearAdd on x86: with s8 activations
most QDQ convs stay float between Quantize/Dequantize pairs and the model runs slower than float.

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
import itertools
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
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
        if isinstance(batch, torch.Tensor):
            batch = batch.detach().cpu().numpy()
        array = np.ascontiguousarray(batch, dtype=np.float32)
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
) -> QuantizedModel:
    """Write a statically quantized copy of `float_path` to `out_path`.

    `calibration` yields preprocessed N×C×H×W float batches (as the model is fed); conv/linear
    nodes of layers matching `float_layers` (names, globs or parents) stay float. Raises DataError
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
    reader = BatchReader(model.graph.input[0].name, itertools.chain([first], batches))
    target = Path(out_path)
    with atomic_path(target) as tmp, _quiet_quantizer():
        quantize_static(
            source,
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
    )


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
