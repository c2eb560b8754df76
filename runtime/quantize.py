"""Static INT8 quantization of an exported model with onnxruntime's own quantizer, and its check.

`quantize_int8` calls `onnxruntime.quantization.quantize_static`: QDQ format, weights int8 per
output channel, activations uint8 with ranges calibrated on preprocessed images (min/max, entropy
or percentile). Activations are uint8, not onnxruntime's default int8, because its CPU provider
fuses only u8 activations × s8 weights into QLinearConv/QLinearAdd on x86: with s8 activations
most QDQ convs stay float between Quantize/Dequantize pairs and the model runs slower than float.

With `method="auto"` the ranges are calibrated twice, by min/max and by percentile (onnxruntime's
calibrators), and the file whose outputs are closest to the float model's on held-out images
(`output_error`) is kept: min/max ranges cover outliers at the cost of resolution, percentile
ranges clip them, and which costs less depends on the model.

Before calibration, every conv → conv edge (a factorized block's stages, with no nonlinearity
between them) is equalized (`equalize_conv_chains`): each intermediate channel is rescaled, and
the next stage compensates exactly, so that one per-tensor uint8 range serves all channels.

Weights use 7 of their 8 bits (`reduce_range`) where this CPU's int8 kernels can saturate: on
x86 without VNNI, onnxruntime's u8×s8 kernels multiply with VPMADDUBSW, which adds pairs of
u8·s8 products in int16 with saturation, and full-range weights overflow it; VNNI instructions
(and other architectures) accumulate in int32. The choice can be forced for a deployment CPU
other than the quantizing one.

`quant_pre_process` is not run: it re-infers shapes the exporter already wrote (seconds per model)
and left the fused graph of rankfold's exports unchanged.

Layers kept in float are named as in the PyTorch model: the exporter records each node's module
path (`pkg.torch.onnx.name_scopes`), so `layer1.0.conv1` (or a glob, or a parent) selects the
node(s) of that layer, including every stage of its factorized block. A layer kept float for
what its input is (the first conv, which reads the image) can keep only the stages of its block
that see that input float: the block's last stage reads the block's own activations, and is
quantized like any other conv.

With a `SensitiveSearch`, layers are also kept float by measurement: after quantizing, the float
and INT8 models are run side by side through onnxruntime's own debugging tool
(`onnxruntime.quantization.qdq_loss_debug`), which gives each activation's SQNR (float vs INT8,
20·log10(‖x‖ / ‖x − x̂‖)). A layer's sensitivity is the SQNR it loses, from its input to its output:
the noise its own int8 weights and inner activations add (a degenerate CP block, whose output is
a small difference of large stage outputs, loses tens of dB). The layers losing most are kept
float one at a time, re-quantized on the same calibrated ranges (onnxruntime's calibration
cache), until the INT8 model's top-1 agreement with the float model on the search's images
reaches the target, or the next layer would take the float share of the conv/linear MACs past
the cap.
"""

from __future__ import annotations

import ast
import contextlib
import fnmatch
import io
import logging
import math
import platform
import re
import shutil
import tempfile
from collections.abc import Collection, Iterable, Iterator, Sequence
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
from onnxruntime.quantization import qdq_loss_debug as qdq_debug
from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

from rankfold.passes.core import ConfigError, DataError, ExportError, atomic_path

CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
# `auto` calibrates each of these and keeps the file whose outputs stay closest to the float
# model's (entropy is left out: furthest from the float model in every cell measured, and slowest).
AUTO_CALIBRATIONS = ("minmax", "percentile")
# onnxruntime's histogram calibrators (percentile, entropy) bin each activation's values with
# numpy, which refuses a range narrower than float32 can split into the bins: an activation that
# is nearly constant over the calibration images (a saturated gate, an untrained squeeze-excite).
HISTOGRAM_FAILURE = "Too many bins for data range"
NEARLY_CONSTANT = (
    "an activation is nearly constant over the calibration images, too narrow a range for "
    "onnxruntime's histogram"
)
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
SCOPES_KEY = "pkg.torch.onnx.name_scopes"


# Calibration images the sensitivity is measured on.
SENSITIVITY_SAMPLES = 64
# Images per calibration pass: onnxruntime's calibrators hold all activations of a pass, about
# 0.1 GB per image for a 224² ResNet-50.
CALIBRATION_PIECE = 16


@dataclass(frozen=True)
class SensitiveSearch:
    """Keep the layers that lose most SQNR float until top-1 agreement with the float model on
    `images` (preprocessed batches) reaches `min_agreement`, within `max_float_share` of the
    model's conv/linear MACs in float (the layers kept float anyway included)."""

    min_agreement: float
    max_float_share: float
    images: Sequence[np.ndarray | torch.Tensor]
    images_label: str = "held-out training images"


@dataclass
class LayerSensitivity:
    """One layer's measured quantization noise and what keeping it float did."""

    layer: str
    sqnr_in_db: float  # float vs INT8 activation at the layer's input
    sqnr_out_db: float  # ... at its output (after the ReLU onnxruntime folds into it)
    mac_share: float  # of the model's conv/linear MACs
    kept_float: bool = False
    agreement: float | None = None  # top-1 agreement after it was kept float
    # Left int8: kept float alone, onnxruntime would quantize it anyway (see float_units).
    requantized_by_runtime: bool = False

    @property
    def loss_db(self) -> float:
        return self.sqnr_in_db - self.sqnr_out_db


@dataclass
class SensitiveChoice:
    """What a `SensitiveSearch` measured and chose."""

    min_agreement: float
    max_float_share: float
    images: str  # what the agreement was measured on
    samples: int
    agreement_before: float
    agreement: float  # after the layers below were kept float
    float_share: float  # conv/linear MACs in float at the end, all float layers included
    # "reached" (with no layer or after some), "cap" (every layer left would pass the share),
    # "exhausted" (no layer left to keep float)
    outcome: str
    layers: list[LayerSensitivity] = field(default_factory=list)  # most sensitive first

    @property
    def kept(self) -> list[LayerSensitivity]:
        return [layer for layer in self.layers if layer.kept_float]


@dataclass
class CalibrationChoice:
    """What `method="auto"` measured: each candidate calibration's `output_error`."""

    errors: dict[str, float]  # method → its output error
    images: str  # what the errors were measured on
    samples: int
    failed: dict[str, str] = field(default_factory=dict)  # method → why it could not calibrate

    @property
    def chosen(self) -> str:
        return min(self.errors, key=self.errors.__getitem__)


@dataclass
class QuantizedModel:
    """What `quantize_int8` wrote."""

    path: Path
    method: str  # calibration method of the written file's ranges
    samples: int  # calibration images
    quantized_nodes: int  # conv/linear nodes now int8
    float_nodes: dict[str, str] = field(default_factory=dict)  # ONNX node → its layer, kept float
    equalized_edges: int = 0  # conv → conv edges rescaled before calibration
    sensitive: SensitiveChoice | None = None  # with a SensitiveSearch
    reduce_range: bool = False  # weights in 7 bits (see the module docstring)
    calibration_choice: CalibrationChoice | None = None  # with method "auto"


def _in_pieces(batches: Iterable[np.ndarray | torch.Tensor]) -> list[np.ndarray | torch.Tensor]:
    """The batches cut into pieces of at most `CALIBRATION_PIECE` images, in order."""
    return [
        batch[start : start + CALIBRATION_PIECE]
        for batch in batches
        for start in range(0, len(batch), CALIBRATION_PIECE)
    ]


class BatchReader(CalibrationDataReader):
    """Feeds preprocessed float batches to onnxruntime's calibrator in pieces of at most
    `CALIBRATION_PIECE` images, and counts the images.

    With `len` and `set_range` it is a strided reader: `quantize_static` (option
    CalibStridedMinMax, for every method) and `_entropy_ranges` calibrate one piece per pass.
    onnxruntime's calibrators hold every activation of a pass until they reduce it, so memory
    stays at one piece's activations whatever the number of images; and the histogram
    calibrators, which stack a pass's arrays into one, never see two sizes."""

    def __init__(self, input_name: str, batches: Iterable[np.ndarray | torch.Tensor]) -> None:
        self.input_name = input_name
        self._pieces = _in_pieces(batches)
        self._next, self._end = 0, len(self._pieces)
        self.samples = 0

    def __len__(self) -> int:
        return len(self._pieces)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next, self._end = start_index, min(end_index, len(self._pieces))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._end:
            return None
        array = as_input_array(self._pieces[self._next])
        self._next += 1
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


def _without_output_stages(model: onnx.ModelProto, matched: dict[str, str]) -> dict[str, str]:
    """`matched` (node → layer) less the output stages of its factorized blocks: the nodes that
    read another matched node's output directly (a block's stages follow each other with no op
    between) and feed none. A layer of one node reads and feeds none, and stays."""
    producer_of = {
        output: node.name
        for node in model.graph.node
        if node.name in matched
        for output in node.output
    }
    reads = {  # node → the matched nodes whose outputs it reads
        node.name: {producer_of[name] for name in node.input if name in producer_of} - {node.name}
        for node in model.graph.node
        if node.name in matched
    }
    feeds = {producer for producers in reads.values() for producer in producers}
    return {name: layer for name, layer in matched.items() if not reads[name] or name in feeds}


def int8_dot_saturates() -> bool:
    """Whether onnxruntime's u8×s8 kernels on this CPU add products in int16 with saturation:
    x86 without VNNI (an x86 CPU whose flags cannot be read counts as one)."""
    if platform.machine().lower() not in {"x86_64", "amd64", "i386", "i686", "x86"}:
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return re.search(r"\b(avx512_vnni|avx_vnni|amx_int8)\b", flags) is None


def quantize_int8(
    float_path: str | Path,
    out_path: str | Path,
    calibration: Iterable[np.ndarray | torch.Tensor],
    method: str = "minmax",
    float_layers: Sequence[str] = (),
    equalize: bool = True,
    sensitive: SensitiveSearch | None = None,
    reduce_range: bool | None = None,
    input_stages_only: Collection[str] = (),
    held_out: Sequence[np.ndarray | torch.Tensor] = (),
    held_out_label: str = "held-out images",
) -> QuantizedModel:
    """Write a statically quantized copy of `float_path` to `out_path`.

    `calibration` yields preprocessed N×C×H×W float batches (as the model is fed); `method`
    "auto" calibrates each of `AUTO_CALIBRATIONS` and keeps the file whose outputs are closest
    to the float model's on `held_out` (batches like `calibration`'s; without them, on the
    calibration images) by `output_error`; conv/linear nodes of layers matching `float_layers`
    (names, globs or parents) stay float, but of the factorized blocks of those also in
    `input_stages_only` the last stage is quantized; with `equalize` the conv → conv edges are
    equalized first (`equalize_conv_chains`); with `sensitive` the layers losing most SQNR are
    kept float too, as the module docstring says; `reduce_range` (7-bit weights) defaults to
    `int8_dot_saturates()`. Raises DataError when `calibration` (or the search's images) yields
    nothing, ConfigError for an unknown method or a pattern that matches no layer.
    """
    if method != "auto" and method not in CALIBRATION_METHODS:
        raise ConfigError(
            f"calibration method '{method}' is unknown; use auto or one of "
            f"{', '.join(CALIBRATION_METHODS)}"
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
        if pattern in input_stages_only:
            matched = _without_output_stages(model, matched)
        excluded.update(matched)
    batches = iter(calibration)
    first = next(batches, None)
    if first is None or len(first) == 0:
        raise DataError("the calibration set is empty; give calibration images (--train-data)")
    if sensitive is not None and not any(len(batch) for batch in sensitive.images):
        raise DataError(
            "the sensitivity search has no images to measure agreement on; give more "
            "--train-data images or drop 'sensitive' from --float-layers"
        )
    calibration_batches = [first, *batches]
    if reduce_range is None:
        reduce_range = int8_dot_saturates()
    input_name = model.graph.input[0].name
    pooled = pool_before_relu(model, excluded)
    equalized = equalize_conv_chains(model, calibration_batches) if equalize else 0
    target = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="rankfold-int8-") as folder:
        work = Path(folder)
        float_file = work / "float.onnx"  # what is quantized: equalized, the search's reference
        if equalized or pooled:
            onnx.save(model, str(float_file))
        else:
            shutil.copyfile(source, float_file)
        tried = AUTO_CALIBRATIONS if method == "auto" else (method,)
        failed: dict[str, str] = {}
        read: dict[str, int] = {}  # images each candidate's calibration read
        for candidate in tried:
            # calibrated once per method, reused by every re-quantization
            ranges = work / f"ranges.{candidate}.json"
            reader = BatchReader(input_name, calibration_batches)
            try:
                if candidate == "entropy":
                    _entropy_ranges(float_file, reader, ranges, work)
                _quantize(
                    float_file,
                    work / f"{candidate}.onnx",
                    reader,
                    candidate,
                    excluded,
                    ranges,
                    reduce_range,
                )
            except ValueError as exc:
                if HISTOGRAM_FAILURE not in str(exc):
                    raise
                failed[candidate] = NEARLY_CONSTANT
            read[candidate] = reader.samples
        if method != "auto" and failed:
            raise DataError(
                f"{method} calibration of {source.name} failed: {NEARLY_CONSTANT}; calibrate "
                "with --quant-calibration minmax (or auto, which then keeps minmax)"
            )
        candidates = [candidate for candidate in tried if candidate not in failed]
        calibration_choice = None
        if len(tried) > 1:
            judged, label = (
                (held_out, held_out_label)
                if len(held_out)
                else (calibration_batches, "calibration images")
            )
            errors = output_errors(
                float_file, [work / f"{candidate}.onnx" for candidate in candidates], judged
            )
            calibration_choice = CalibrationChoice(
                errors=dict(zip(candidates, errors, strict=True)),
                images=label,
                samples=sum(len(batch) for batch in judged),
                failed=failed,
            )
            method = calibration_choice.chosen
        ranges = work / f"ranges.{method}.json"
        quantized = work / f"{method}.onnx"
        choice = None
        if sensitive is not None:
            choice = _keep_sensitive_float(
                float_file,
                quantized,
                calibration_batches,
                method,
                excluded,
                ranges,
                sensitive,
                reduce_range,
            )
        with atomic_path(target) as tmp:
            shutil.copyfile(quantized, tmp)
    return QuantizedModel(
        path=target,
        method=method,
        samples=read[method],
        quantized_nodes=len(nodes) - len(excluded),
        float_nodes=excluded,
        equalized_edges=equalized,
        sensitive=choice,
        reduce_range=reduce_range,
        calibration_choice=calibration_choice,
    )


def _quantize(
    float_file: Path,
    out: Path,
    reader: CalibrationDataReader | None,  # None: the ranges are in the `ranges` cache
    method: str,
    excluded: dict[str, str],
    ranges: Path,
    reduce_range: bool,
) -> None:
    with _quiet_quantizer():
        quantize_static(
            float_file,
            out,
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CALIBRATION_METHODS[method],
            nodes_to_exclude=sorted(excluded),
            calibration_cache_path=ranges,
            extra_options={"CalibStridedMinMax": 1},  # one BatchReader piece per pass
        )


# KL-divergence calibration over onnxruntime's signed histogram [-T, T]: each candidate range
# [-t, t] is modelled with ENTROPY_LEVELS levels, the 256 of uint8 on one-sided (post-ReLU) data
# (its 128, TensorRT's signed-int8 setting, modelled 64 and clipped far too much); candidates run
# from T/2 to T in steps of T/512.
ENTROPY_BINS, ENTROPY_LEVELS = 1024, 512


def _entropy_ranges(float_file: Path, reader: BatchReader, ranges: Path, work: Path) -> None:
    """Write `ranges` (quantize_static's calibration cache) by onnxruntime's entropy calibrator.
    quantize_static does not pass the bin counts on, and its defaults (128 bins for 128 levels)
    leave the KL search a single candidate, the min/max range: entropy would equal minmax."""
    with _quiet_quantizer():
        calibrator = create_calibrator(
            float_file,
            augmented_model_path=str(work / "entropy_augmented.onnx"),
            calibrate_method=CalibrationMethod.Entropy,
            extra_options={"num_bins": ENTROPY_BINS, "num_quantized_bins": ENTROPY_LEVELS},
        )
        for piece in range(len(reader)):
            reader.set_range(piece, piece + 1)
            calibrator.collect_data(reader)
        save_tensors_data(calibrator.compute_data(), ranges)


def _keep_sensitive_float(
    float_file: Path,
    quantized: Path,
    calibration: Sequence[np.ndarray | torch.Tensor],
    method: str,
    excluded: dict[str, str],
    ranges: Path,
    search: SensitiveSearch,
    reduce_range: bool,
) -> SensitiveChoice:
    """The greedy search of `SensitiveSearch`; `quantized` and `excluded` are updated in place."""
    model = onnx.load(str(float_file))
    macs = node_macs(model)
    total = sum(macs.values()) or 1
    layer_nodes = float_units(model)

    def share(names: Iterable[str]) -> float:
        return sum(macs.get(name, 0) for name in names) / total

    reference = _top1(float_file, search.images)

    def agreement() -> float:
        return float(np.mean(_top1(quantized, search.images) == reference))

    before = current = agreement()
    choice = SensitiveChoice(
        min_agreement=search.min_agreement,
        max_float_share=search.max_float_share,
        images=search.images_label,
        samples=len(reference),
        agreement_before=before,
        agreement=before,
        float_share=share(excluded),
        outcome="reached",
    )
    if current >= search.min_agreement:
        return choice
    probe = _first_samples(calibration, SENSITIVITY_SAMPLES)
    candidates = {layer: names for layer, names in layer_nodes.items() if names[0] not in excluded}
    measured = layer_sensitivity(float_file, quantized, probe, candidates, model)
    for row in measured:
        row.mac_share = share(candidates[row.layer])
    choice.layers = sorted(measured, key=lambda row: row.loss_db, reverse=True)
    choice.outcome = "exhausted"
    for row in choice.layers:
        if choice.float_share + row.mac_share > search.max_float_share:
            choice.outcome = "cap"  # a less sensitive, smaller layer may still fit
            continue
        chosen = dict.fromkeys(candidates[row.layer], row.layer)
        trial = quantized.with_name("trial.onnx")
        _quantize(float_file, trial, None, method, {**excluded, **chosen}, ranges, reduce_range)
        if _requantized_by_runtime(onnx.load(str(trial))) & set(chosen):
            row.requantized_by_runtime = True  # float in the file, int8 when it runs
            continue
        trial.replace(quantized)
        excluded.update(chosen)
        current = agreement()
        row.kept_float, row.agreement = True, current
        choice.float_share += row.mac_share
        if current >= search.min_agreement:
            choice.outcome = "reached"
            break
    choice.agreement = current
    return choice


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name → the nodes that read it."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def float_units(model: onnx.ModelProto) -> dict[str, list[str]]:
    """The conv/linear nodes the search keeps float together, named by their common layer: a
    chain whose nodes feed each other directly (a factorized block's stages). A stage kept float
    alone still has int8 neighbours on both sides, and onnxruntime re-quantizes it (see
    `_requantized_by_runtime`); the whole chain float leaves no Quantize/Dequantize inside. A
    single conv between int8 layers is re-quantized the same way, so the search skips it."""
    producer = {node.output[0]: node for node in model.graph.node}
    consumers = _consumers(model.graph)
    chains: list[list[tuple[onnx.NodeProto, str]]] = []
    chain_of: dict[str, int] = {}
    for node, layer in compute_nodes(model):
        before = producer.get(node.input[0])
        if before is not None and before.name in chain_of and len(consumers[before.output[0]]) == 1:
            chain_of[node.name] = chain_of[before.name]
            chains[chain_of[node.name]].append((node, layer))
        else:
            chain_of[node.name] = len(chains)
            chains.append([(node, layer)])
    units = {}
    for chain in chains:
        parts = [layer.split(".") for _, layer in chain]
        common = [p[0] for p in zip(*parts) if all(part == p[0] for part in p)]
        units[".".join(common) or chain[0][1]] = [node.name for node, _ in chain]
    return units


def _requantized_by_runtime(quantized: onnx.ModelProto) -> set[str]:
    """Conv/linear nodes left float that onnxruntime quantizes anyway when it loads the file:
    its WeightBiasQuantization optimizer gives per-tensor int8 weights to a float conv, or Gemm
    whose input comes from a DequantizeLinear and whose output (through ReLU/Clip) goes to a
    QuantizeLinear. Such a node cannot be kept float alone."""
    producer = {out: node for node in quantized.graph.node for out in node.output}
    consumers = _consumers(quantized.graph)
    found = set()
    for node in quantized.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm"):
            continue
        source = producer.get(node.input[0])
        weight = producer.get(node.input[1])
        if source is None or source.op_type != "DequantizeLinear":
            continue
        if weight is not None and weight.op_type == "DequantizeLinear":
            continue  # quantized already
        current = node
        while len(users := consumers.get(current.output[0], [])) == 1:
            if users[0].op_type == "QuantizeLinear":
                found.add(node.name)
                break
            if users[0].op_type not in ("Relu", "Clip"):
                break
            current = users[0]
    return found


def layer_sensitivity(
    float_file: Path,
    quantized: Path,
    batches: Sequence[np.ndarray | torch.Tensor],
    layers: dict[str, list[str]],
    model: onnx.ModelProto,
) -> list[LayerSensitivity]:
    """Each layer's SQNR at its input and output, float vs `quantized` on `batches`, from
    onnxruntime's qdq_loss_debug (the float model saves its conv/linear/ReLU tensors, the QDQ
    model the tensors around its Quantize/Dequantize pairs). A layer's input is its first node's,
    its output its last node's, or the following ReLU's when onnxruntime folded that ReLU into
    the quantized range (the conv's own output is then not kept). Layers whose tensors are not
    quantized on both sides are left out.

    The images go through `CALIBRATION_PIECE` at a time and each tensor's SQNR is summed over
    the pieces (10·log10 Σ‖x‖² / Σ‖x − x̂‖², the same number as qdq_loss_debug's
    compute_activation_error over all images at once): collect_activations holds every saved
    tensor of what it is given, both models' at 224² far more than the images."""
    signal: dict[str, float] = {}
    noise: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="rankfold-sqnr-") as folder:
        work = Path(folder)
        augmented = {}
        for name, path, ops in (
            ("float", float_file, [*COMPUTE_OPS, "Relu"]),
            ("int8", quantized, ["QuantizeLinear", "DequantizeLinear"]),
        ):
            augmented[name] = work / f"{name}.onnx"
            qdq_debug.modify_model_output_intermediate_tensors(path, augmented[name], ops)
        for piece in _in_pieces(batches):
            saved = {
                name: qdq_debug.collect_activations(
                    str(path), _Feed(model.graph.input[0].name, [piece])
                )
                for name, path in augmented.items()
            }
            matched = qdq_debug.create_activation_matching(saved["int8"], saved["float"])
            for name, pair in matched.items():
                if "float" not in pair:
                    continue
                exact = np.concatenate(pair["float"]).astype(np.float64)
                rounded = np.concatenate(pair["post_qdq"]).astype(np.float64)
                signal[name] = signal.get(name, 0.0) + float(np.square(exact).sum())
                noise[name] = noise.get(name, 0.0) + float(np.square(exact - rounded).sum())
    tiny = float(np.finfo(float).eps) ** 2  # onnxruntime floors both norms at eps
    errors = {
        name: {"xmodel_err": 10 * math.log10(max(signal[name], tiny) / max(noise[name], tiny))}
        for name in signal
    }
    by_name = {node.name: node for node in model.graph.node}
    consumers = _consumers(model.graph)
    rows = []
    for layer, names in layers.items():
        entry = by_name[names[0]].input[0]
        output = by_name[names[-1]].output[0]
        after = consumers.get(output, [])
        if output not in errors and len(after) == 1 and after[0].op_type == "Relu":
            output = after[0].output[0]
        if entry in errors and output in errors:
            rows.append(
                LayerSensitivity(
                    layer=layer,
                    sqnr_in_db=errors[entry]["xmodel_err"],
                    sqnr_out_db=errors[output]["xmodel_err"],
                    mac_share=0.0,
                )
            )
    return rows


def node_macs(model: onnx.ModelProto) -> dict[str, int]:
    """Multiply-accumulates per sample of each conv/linear node, from the inferred shapes: a
    conv's weight size times its output positions (a transposed conv's: its input positions),
    a matrix product's inner size times its output size."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {
        info.name: [dim.dim_value for dim in info.type.tensor_type.shape.dim]
        for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    }
    shapes.update({init.name: list(init.dims) for init in model.graph.initializer})
    macs = {}
    for node in model.graph.node:
        if node.op_type not in COMPUTE_OPS:
            continue
        weight = shapes.get(node.input[1], [])
        positions = shapes.get(node.input[0] if node.op_type == "ConvTranspose" else node.output[0])
        if not weight or not positions:
            continue
        if node.op_type in ("Conv", "ConvTranspose"):
            macs[node.name] = int(np.prod(weight)) * int(np.prod(positions[2:]))
        else:
            inner = shapes.get(node.input[0], [0])[-1]
            macs[node.name] = int(inner) * int(np.prod(positions[1:]))
    return macs


class _Feed(CalibrationDataReader):
    """The given batches once, as qdq_loss_debug's collect_activations reads them."""

    def __init__(self, input_name: str, batches: Sequence[np.ndarray | torch.Tensor]) -> None:
        self._feeds = iter([{input_name: as_input_array(batch)} for batch in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _first_samples(
    batches: Sequence[np.ndarray | torch.Tensor], n: int
) -> list[np.ndarray | torch.Tensor]:
    taken, count = [], 0
    for batch in batches:
        if count >= n:
            break
        taken.append(batch[: n - count])
        count += len(taken[-1])
    return taken


def output_error(
    float_file: Path, quantized: Path, batches: Sequence[np.ndarray | torch.Tensor]
) -> float:
    """Σ‖y − ŷ‖² / Σ‖y‖² over every output of the two files on `batches`: how far the INT8
    outputs (logits, or a dense head's maps) are from the float ones, for any output shape. A
    sum of squares over all images, so that no single image near a decision boundary decides
    it (as one flipped prediction among a few hundred would a KL divergence or an agreement)."""
    return output_errors(float_file, [quantized], batches)[0]


def output_errors(
    float_file: Path, quantized: Sequence[Path], batches: Sequence[np.ndarray | torch.Tensor]
) -> list[float]:
    """`output_error` of each of `quantized`, the float file run once per batch for all."""
    reference, *candidates = (
        onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for path in (float_file, *quantized)
    )
    name = reference.get_inputs()[0].name
    errors = [0.0] * len(candidates)
    energy = 0.0
    for batch in batches:
        feed = {name: as_input_array(batch)}
        exact = [y.astype(np.float64) for y in reference.run(None, feed)]
        energy += sum(float(np.square(y).sum()) for y in exact)
        for index, session in enumerate(candidates):
            rounded = session.run(None, feed)
            errors[index] += sum(
                float(np.square(y - y_int8).sum()) for y, y_int8 in zip(exact, rounded, strict=True)
            )
    return [error / energy if energy else 0.0 for error in errors]


def _top1(path: Path, batches: Sequence[np.ndarray | torch.Tensor]) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate(
        [session.run(None, {name: as_input_array(batch)})[0].argmax(axis=1) for batch in batches]
    )


def pool_before_relu(model: onnx.ModelProto, float_nodes: Collection[str]) -> int:
    """Rewrite, in place, each Relu → MaxPool whose Relu reads a node kept float as MaxPool →
    Relu; returns the number rewritten. Exact: a max commutes with a monotone map.

    Why: onnxruntime's QDQ propagation moves the QuantizeLinear after such a MaxPool above it,
    and a uint8 MaxPool in NCHW layout runs its generic kernel, tens of times slower than the
    float pool in the float conv's blocked layout (ResNet-18's stem: BENCHMARKS.md, INT8).
    After the swap the pool stays float and the quantization happens on the pooled tensor.
    """
    graph = model.graph
    producers = {output: node for node in graph.node for output in node.output}
    consumers = _consumers(graph)
    outputs = {output.name for output in graph.output}
    rewritten = 0
    for relu in [node for node in graph.node if node.op_type == "Relu"]:
        source = producers.get(relu.input[0])
        users = consumers.get(relu.output[0], [])
        if source is None or source.name not in float_nodes or relu.output[0] in outputs:
            continue
        if len(users) != 1 or users[0].op_type != "MaxPool" or len(users[0].output) != 1:
            continue
        pool = users[0]
        stale, pooled = relu.output[0], pool.output[0]
        pool.input[0], pool.output[0] = relu.input[0], f"{pooled}_before_relu"
        relu.input[0], relu.output[0] = pool.output[0], pooled
        graph.node.remove(relu)  # the Relu now follows the pool in topological order
        graph.node.insert(list(graph.node).index(pool) + 1, relu)
        for info in [info for info in graph.value_info if info.name == stale]:
            graph.value_info.remove(info)  # the unpooled activation no longer exists
        rewritten += 1
    return rewritten


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
    consumers = _consumers(model.graph)
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
