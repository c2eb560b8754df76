"""Typed results of a compress run: report.json's schema, and what the summary and plots read.

Each section is a pydantic model; `Report.model_dump(mode="json")` is report.json, and
`Report.load` reads one back (refusing other schema versions), so every consumer — the CLI
summary, the plots, `rankfold validate`, benchmarks — reads fields, never string keys of a dict
that grew through the pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rankfold.passes.core import ConfigError
from rankfold.passes.correction import StepsRead

# 2: typed sections; 3: latency intervals, threads, the slower flag; 4: INT8 quantization;
# 5: data-aware fits (layer statistics, per-layer output errors beside the weight-only fit's);
# 6: how the model was captured (torch.fx or forward hooks) and the passes that needs skipped;
# 7: named outputs (tuple/dict models), parity per output, the task metric's name; INT8 layers
#    kept float by measured sensitivity (`QuantizedFile.sensitive`); 8: the refit's refinement
#    steps, recalibration judged by KL divergence; 9: the refit's segments; 10: whether they ran
#    by default (`Refit.segments_by_default`); 11: whether the selector was the method's default
#    (`SelectionReport.by_default`); 12: each INT8 file's calibration, and what `auto` measured
#    (`QuantizedFile.calibration_pick`); 13: the candidates `auto` could not calibrate
#    (`CalibrationPick.failed`); 14: images the refit and bias correction left out for memory
#    (`Refit.images_left_out`, `Recovery.recalibration_images_left_out`); 15: what each block's
#    and segment's refinement steps read (moments, windows or whole images); 16: the refit's
#    images among those the recalibration check read (`RecalibrationCheck.
#    refit_images_among_them`), and the images BatchNorm recalibration read; 17: the input
#    contract stamped into every ONNX file (`Report.deployment`)
SCHEMA_VERSION = 17


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OriginalModel(_Section):
    params: int
    macs: int
    accuracy: float | None = None
    # Functional convs / matrix products (node → MACs): in `macs`, but no layer to decompose.
    functional_macs: dict[str, int] = {}


class Capture(_Section):
    """How the model was read for planning: torch.fx's symbolic trace, or forward hooks where
    fx stops at Python control flow (the capture path, `rankfold.passes.capture`)."""

    path: Literal["torch.fx", "forward hooks"] = "torch.fx"
    fx_error: str | None = None  # why torch.fx could not trace the model
    fx_module: str | None = None  # the module fx stopped in (None: the top-level forward)
    skipped_passes: list[str] = []  # optional passes that need the fx graph and did not run


class CompressedModel(_Section):
    params: int
    macs: int
    accuracy_decomposed: float | None = None
    accuracy_refitted: float | None = None  # after the last-stage refit (--refit)
    accuracy_recalibrated: float | None = None
    accuracy_finetuned: float | None = None


class LatencyGate(_Section):
    """What measured rank rounding and the latency gate changed in the plan."""

    provider: str
    precision: str = "float"  # int8 with --quantize: layers and blocks timed quantized
    batch: list[int]
    threads: list[int | None]  # the gate passed a block only if faster at each; None: all cores
    gate: bool
    margin: float
    min_efficiency: float
    round_to: int | None
    rounded: list[str]
    reverted: list[str]
    measurements: int
    cache: str
    cache_error: str | None = None


class CalibrationRound(_Section):
    requested: float
    measured: float | None
    original_ms: float | None = None
    compressed_ms: float | None = None
    macs_reduction: float | None = None
    error: str | None = None


class LatencyCalibration(_Section):
    """`--target latency`: table budgets re-planned against whole-model timings."""

    target: float | None = None
    provider: str | None = None
    batch: int | None = None
    tolerance: float | None = None
    selector: str | None = None
    rounds: list[CalibrationRound] = []
    requested: float | None = None
    measured: float | None = None
    skipped: str | None = None  # why calibration did not run


class PredictedLatency(_Section):
    """Summed per-layer conv/linear times of the latency table, before and after the plan."""

    batch: int
    original: float
    planned: float
    reduction: float


class SelectionReport(BaseModel):
    """How the plan was chosen. Known fields are typed; a selector's own report (PARS trials,
    eps-search evaluations, …) is kept beside them as it made it."""

    model_config = ConfigDict(extra="allow")

    selector: str
    by_default: bool = False  # the method's default selector (`Method.budget_selector`)
    default_fallback: str | None = None  # why uniform planned instead of the method's default
    macs: int | None = None
    params: int | None = None
    macs_reduction: float | None = None
    params_reduction: float | None = None
    seconds: float | None = None
    path: str | None = None  # a replayed plan file
    latency_gate: LatencyGate | None = None
    latency_calibration: LatencyCalibration | None = None
    latency_ms: PredictedLatency | None = None

    @property
    def details(self) -> dict[str, Any]:
        """The selector's own report (the fields no other selector has)."""
        return dict(self.model_extra or {})


class RefitSegment(_Section):
    """One segment refined on its output: its blocks, in graph order, the segment output's
    relative error before and after, and what its steps read (windows or whole images)."""

    blocks: list[str]
    error_before: float
    error_after: float
    steps_read: StepsRead | None = None


class Refit(_Section):
    """The sequential correction: blocks refitted (last stage by least squares, then all stages
    by `refine_steps` Adam steps, then each segment's blocks by `segment_steps`), on how many
    images."""

    images: int
    # Of the first statistics.samples training images, those whose activations would not fit
    # in memory_mb (--refit-memory-mb).
    images_left_out: int = 0
    memory_mb: int | None = None
    layers: int
    damping: float
    seconds: float
    refine_steps: int = 0
    segment_steps: int = 0
    # Whether segment_steps came from the default (a planned method asks for it), not the user.
    segments_by_default: bool = False
    segments: list[RefitSegment] = Field(default_factory=list)
    # The Adam steps' forward passes: "bfloat16 autocast" where fine-tuning's --amp picks
    # bfloat16 (CUDA, CPUs with AMX); errors, least squares and moments stay float32/64.
    precision: str = "float32"


class RecalibrationCheck(_Section):
    """After a refit: how far the refitted and the recalibrated model are from the original on
    the last training images (the refit reads the first ones; no labels, no evaluation data),
    and which was kept. Logits are compared by the mean KL divergence of the original's
    predicted distribution from the compressed model's, any other outputs by their relative
    squared error."""

    images: int
    criterion: Literal["divergence", "output error"] = "divergence"
    divergence_refitted: float | None = None
    divergence_recalibrated: float | None = None
    output_error_refitted: float | None = None
    output_error_recalibrated: float | None = None
    kept: Literal["recalibrated", "refitted"]
    # With fewer training images than the refit reads plus these, some are the refit's own:
    # the check then favours the refitted model.
    refit_images_among_them: int = 0


class Recovery(_Section):
    refit: Refit | None = None
    recalibration: str | None = None  # "batchnorm" | "bias"
    recalibration_check: RecalibrationCheck | None = None
    # The training images recalibration read, and those --refit-memory-mb left out of bias
    # correction.
    recalibration_images: int | None = None
    recalibration_images_left_out: int = 0
    finetune: dict[str, Any] | None = None


class OutputTensor(_Section):
    """One output tensor of the model: its name (the ONNX output's) and per-sample shape."""

    name: str
    shape: list[int]


class OutputParity(_Section):
    """One output's parity: it passes when max_abs_diff ≤ atol + rtol × its own scale."""

    name: str
    max_abs_diff: float
    max_rel_diff: float
    scale: float  # the largest |PyTorch output| of this tensor
    passed: bool


class OnnxCheck(_Section):
    """model.onnx against PyTorch; the top-level diffs are the worst output's."""

    path: str
    opset: int
    max_abs_diff: float
    max_rel_diff: float
    atol: float
    rtol: float = 0.0
    parity_passed: bool
    outputs: list[OutputParity] = []
    accuracy: float | None = None  # the task metric (Report.metric) on model.onnx


Verdict = Literal["faster", "slower", "no measurable difference"]


class LatencyRow(_Section):
    """One batch size at one thread count; the interval is that of the per-block speedups."""

    batch: int
    threads: int | None  # None: onnxruntime's default, all cores
    original_ms: float
    compressed_ms: float
    speedup: float
    speedup_low: float | None
    speedup_high: float | None
    verdict: Verdict


class Latency(_Section):
    """Side-by-side timings; the top-level figures are the first row's."""

    provider: str
    threads: list[int | None]
    batch: int
    original_ms: float
    compressed_ms: float
    speedup: float
    per_batch: list[LatencyRow]
    # Measurably slower than the original at some batch size and thread count.
    slower: bool


class SensitiveLayer(_Section):
    """One layer `--float-layers sensitive` measured: the SQNR (float vs INT8, dB) it loses."""

    layer: str
    sqnr_in_db: float
    sqnr_out_db: float
    loss_db: float  # sqnr_in_db − sqnr_out_db
    mac_share: float  # of the model's conv/linear MACs
    kept_float: bool
    agreement: float | None = None  # top-1 agreement after it was kept float
    # Skipped: onnxruntime quantizes a float conv between int8 tensors when it loads the file.
    requantized_by_runtime: bool = False


class Sensitive(_Section):
    """`--float-layers sensitive` on one file: layers kept float, most SQNR lost first, until
    top-1 agreement with the float file on `images` reached `min_agreement`, within the cap."""

    min_agreement: float
    max_float_share: float
    images: str
    samples: int
    agreement_before: float
    agreement: float
    float_share: float  # conv/linear MACs in float at the end, every float layer included
    outcome: Literal["reached", "cap", "exhausted"]
    kept: dict[str, str]  # layer → why, with its numbers
    measured: list[SensitiveLayer]  # most SQNR lost first (empty when none was needed)


class CalibrationPick(_Section):
    """`--quant-calibration auto` on one file: each candidate's output error against the float
    file (Σ‖y − ŷ‖² / Σ‖y‖² over every output) on `images`; the smallest was kept."""

    errors: dict[str, float]
    images: str
    samples: int
    failed: dict[str, str] = {}  # candidate → why it could not calibrate this file


class QuantizedFile(_Section):
    """One INT8 file, checked against the float file it was quantized from."""

    path: str
    opset: int
    calibration: str  # the method its activation ranges came from
    calibration_pick: CalibrationPick | None = None  # with --quant-calibration auto
    quantized_nodes: int  # conv/linear nodes running in int8
    float_nodes: dict[str, str]  # ONNX conv/linear node kept float → its layer
    # conv → conv edges (factorized blocks' stages) rescaled before calibration
    equalized_edges: int = 0
    reduce_range: bool = False  # weights in 7 bits (--quant-reduce-range, or this CPU's need)
    top1_agreement: float  # same top-1 class as the float file, share of `samples`
    max_logit_diff: float
    logit_scale: float  # largest |float logit|, to read max_logit_diff against
    samples: int
    accuracy: float | None = None  # on the evaluation data
    float_accuracy: float | None = None  # the float file's, on the same images
    passed: bool  # top1_agreement ≥ Quantization.min_agreement
    sensitive: Sensitive | None = None  # with --float-layers sensitive


class QuantizedLatencyRow(_Section):
    """The four models timed side by side at one batch size and thread count; the speedup
    (with the interval of its per-block ratios) is INT8 compressed against INT8 original."""

    batch: int
    threads: int | None
    original_ms: float
    original_int8_ms: float
    compressed_ms: float
    compressed_int8_ms: float
    speedup: float
    speedup_low: float | None
    speedup_high: float | None
    verdict: Verdict
    total_speedup: float  # float original → INT8 compressed


class Quantization(_Section):
    """`--quantize int8`: static QDQ quantization of both exports, their checks and timings."""

    dtype: Literal["int8"]
    scheme: str = "QDQ; activations uint8 per tensor, weights int8 per output channel"
    calibration: str  # as asked: auto | minmax | entropy | percentile (each file's: its own)
    calibration_samples: int
    float_layers: dict[str, str]  # layer name or glob → why it stays float
    min_agreement: float  # the stated tolerance on top-1 agreement
    agreement_data: Literal["evaluation", "calibration"]
    original: QuantizedFile
    compressed: QuantizedFile
    latency: list[QuantizedLatencyRow] | None = None
    passed: bool


class EvalData(_Section):
    path: str
    samples: int
    # Unreadable files left out under --skip-bad-images, seen while evaluating.
    skipped_images: list[str] = Field(default_factory=list)


class StatisticsSummary(_Section):
    """The layer input statistics data-aware fits used."""

    images: int
    layers: int
    damping: float
    seconds: float
    from_cache: bool


class LayerRow(BaseModel):
    """One layer of the plan as decomposed; a method's extras (sensitivity, EPC sweeps, …) are
    kept beside the common fields."""

    model_config = ConfigDict(extra="allow")

    name: str
    type: str
    method: str | None
    rank: list[int] | None
    params: int
    macs: int
    original_params: int
    original_macs: int
    rel_error: float | None
    status: Literal["decomposed", "skipped"]
    reason: str
    seconds: float = 0.0
    from_cache: bool = False  # factorized during rank search and reused, not computed again
    # Data-aware fits: relative output error on the layer statistics (conv: over the input
    # channels' second moment), and the weight-only fit's errors at the same ranks.
    output_error: float | None = None
    weight_only_rel_error: float | None = None
    weight_only_output_error: float | None = None
    # Last-stage refit: the block's relative output error in the compressed network, fed its
    # activations, on the refit's images, before and after refitting.
    refit_error_before: float | None = None
    refit_error_after: float | None = None
    # What its refinement's steps read: the moments of what each output position reads (exact
    # over all the images), windows of the images, or whole images; None: no refinement ran.
    refit_steps_read: StepsRead | None = None


class Report(_Section):
    """report.json. The `accuracy` fields hold the task metric `metric` names: "top-1" on
    --eval-data for a classifier, a Python API metric's name, or None when none was computed
    (no evaluation data, or outputs top-1 cannot be read from and no metric given)."""

    schema_version: Literal[17] = SCHEMA_VERSION
    model: str
    method: str
    target: dict[str, float] | None
    capture: Capture = Capture()
    outputs: list[OutputTensor] = []
    metric: str | None = None
    original: OriginalModel
    compressed: CompressedModel
    selection: SelectionReport
    cleanup: dict[str, dict[str, int]] | None = None
    recovery: Recovery
    macs_reduction: float
    params_reduction: float
    onnx: OnnxCheck
    latency: Latency | None = None
    eval_data: EvalData | None = None
    quantization: Quantization | None = None
    statistics: StatisticsSummary | None = None  # None: weight-only fits
    # The metadata_props every ONNX file of the run carries (input shape, normalisation, crop).
    deployment: dict[str, str] = {}
    layers: list[LayerRow]

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def load(cls, path: str | Path) -> Report:
        """report.json as written by `rankfold compress`, checked against this schema."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(
                f"{path} is not a readable report ({exc}); pass a report.json"
            ) from None
        version = data.get("schema_version") if isinstance(data, dict) else None
        if version != SCHEMA_VERSION:
            raise ConfigError(
                f"{path} has report schema {version}, this rankfold reads {SCHEMA_VERSION}; "
                "re-run the compress command that made it"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError(f"{path} does not match the report schema ({first})") from None
