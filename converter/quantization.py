"""`--quantize int8`: which layers stay float, both exports quantized alike, and their checks.

The original and the compressed model are quantized with the same settings on the same
calibration images, so every INT8 comparison is like for like. The images go through the same
preprocessing as evaluation (`rankfold.models.batches`: scale to [0, 1], normalise with the
model's mean/std), clean: the deployed model sees clean images, and the ranges must cover them.

`auto` ranges (the default) are chosen per file on the same images: min/max and percentile ranges
are both calibrated, and the file whose outputs are closer to the float file's there is kept
(relative squared error of all outputs, `rankfold.runtime.quantize.output_error`).

`sensitive` in --float-layers is decided per file, after quantizing it
(`rankfold.runtime.quantize.SensitiveSearch`): the layers that lose most SQNR are kept float
until top-1 agreement with the float file reaches --min-agreement on the training images after
the calibration ones. Not on the calibration images themselves: the ranges were fitted to them,
so agreement there flatters (ResNet-56 CP: 97.7 % on them, 96.2 % on the next 1,024 training
images, 93.7 % on test images; BENCHMARKS.md). Each choice is explained with its numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from rankfold.converter.config import QuantizeConfig
from rankfold.models import ImageData, ModelSpec, batches
from rankfold.passes import ModelAnalysis
from rankfold.passes.core import ConfigError
from rankfold.runtime import check_onnx
from rankfold.runtime.quantize import (
    SENSITIVITY_SAMPLES,
    QuantizedModel,
    SensitiveChoice,
    SensitiveSearch,
    layer_matches,
    quantize_int8,
)
from rankfold.runtime.validate import AgreementReport, check_agreement

AUTO = "auto"
SENSITIVE = "sensitive"
# Why the automatic choice keeps these layers in float (written into the report).
FIRST_CONV = (
    "first conv: its input is the normalised image, a few channels over a wide range that one "
    "uint8 scale per tensor resolves coarsely, and its error reaches every later layer; it holds "
    "few of the model's weights"
)
LAST_LINEAR = (
    "last linear: it writes the logits the top-1 is read from, so its rounding moves the "
    "prediction directly; one small matrix, little time"
)
ASKED = "asked for (--float-layers)"
HELD_OUT = "held-out training images"
CALIBRATION_BATCH = 32


def float_layer_choice(patterns: list[str], analysis: ModelAnalysis) -> dict[str, str]:
    """Layer name or glob → why it stays float. `auto` becomes the first conv and the last
    linear layer; `sensitive` is measured later, per file (`quantize_export`); any other pattern
    must match a layer (a typo would silently quantize it)."""
    chosen: dict[str, str] = {}
    for pattern in patterns:
        if pattern == SENSITIVE:
            continue
        if pattern == AUTO:
            convs = [layer.name for layer in analysis.layers if layer.is_conv]
            linears = [layer.name for layer in analysis.layers if layer.type == "Linear"]
            if convs:
                chosen.setdefault(convs[0], FIRST_CONV)
            if linears:
                chosen.setdefault(linears[-1], LAST_LINEAR)
        elif any(layer_matches(layer.name, pattern) for layer in analysis.layers):
            chosen[pattern] = ASKED
        else:
            names = ", ".join(layer.name for layer in analysis.layers[:6])
            raise ConfigError(
                f"--float-layers '{pattern}' matches no conv/linear layer (layers: {names}, …); "
                "give a layer name, glob or parent, auto, sensitive, or none"
            )
    return chosen


def calibration_inputs(data: ImageData, spec: ModelSpec) -> Iterator[torch.Tensor]:
    """The calibration images preprocessed as for evaluation, without labels."""
    return (x for x, _ in batches(data, spec, batch_size=CALIBRATION_BATCH))


def quantize_export(
    float_path: Path,
    out_path: Path,
    settings: QuantizeConfig,
    float_layers: dict[str, str],
    calibration: ImageData,
    spec: ModelSpec,
    held_out: ImageData | None = None,
) -> QuantizedModel:
    """Write the INT8 copy of one exported file, calibrated on `calibration`; `auto` ranges are
    chosen, and with `sensitive` in the settings' float layers agreement is measured, on
    `held_out` (training images the ranges were not calibrated on), else, when there are none,
    on `calibration`."""
    images, label = (
        (held_out, HELD_OUT)
        if held_out is not None
        else (calibration, "calibration images (no other training images)")
    )
    needed = settings.calibration == "auto" or SENSITIVE in settings.float_layers
    judged = list(calibration_inputs(images, spec)) if needed else []
    search = None
    if SENSITIVE in settings.float_layers:
        search = SensitiveSearch(
            min_agreement=settings.min_agreement,
            max_float_share=settings.max_float_share,
            images=judged,
            images_label=label,
        )
    return quantize_int8(
        float_path,
        out_path,
        calibration_inputs(calibration, spec),
        method=settings.calibration,
        float_layers=list(float_layers),
        equalize=settings.equalize,
        sensitive=search,
        reduce_range=settings.reduce_range,
        input_stages_only=[name for name, why in float_layers.items() if why == FIRST_CONV]
        if settings.stem_output
        else (),
        held_out=judged,
        held_out_label=label,
    )


def sensitive_reasons(choice: SensitiveChoice) -> dict[str, str]:
    """Layer → why `sensitive` kept it float, with its numbers."""
    reasons = {}
    previous = choice.agreement_before
    for row in choice.kept:
        reasons[row.layer] = (
            f"loses {row.loss_db:.1f} dB SQNR ({row.sqnr_in_db:.1f} dB at its input → "
            f"{row.sqnr_out_db:.1f} dB at its output, float vs INT8 on "
            f"{SENSITIVITY_SAMPLES} calibration images), the most of the quantized layers left; "
            f"kept float: top-1 agreement {previous:.1%} → {row.agreement:.1%} on "
            f"{choice.samples} {choice.images}; {row.mac_share:.1%} of the MACs"
        )
        previous = row.agreement
    return reasons


@dataclass
class QuantizedCheck:
    """One INT8 file: what was quantized, the checker's opset, agreement with its float file."""

    model: QuantizedModel
    opset: int
    agreement: AgreementReport


def check_quantized(
    float_path: Path,
    quantized: QuantizedModel,
    min_agreement: float,
    data: ImageData,
    labelled: bool,
    spec: ModelSpec,
    provider: str,
) -> QuantizedCheck:
    """The ONNX checker on the INT8 file, then its agreement with the float file on `data`
    (and accuracy when `labelled`: evaluation data, not the calibration images)."""
    opset = check_onnx(quantized.path)
    agreement = check_agreement(
        float_path,
        quantized.path,
        ((x, y if labelled else None) for x, y in batches(data, spec)),
        provider=provider,
        min_agreement=min_agreement,
    )
    return QuantizedCheck(model=quantized, opset=opset, agreement=agreement)
