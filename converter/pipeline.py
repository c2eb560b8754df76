"""The pipeline: load → trace → analyze → export original → plan → decompose → export →
validate → report.

Each arrow is one function from `rankfold.passes` / `rankfold.runtime`; this module only chains
them. Where torch.fx cannot trace the model, trace and analyze are the capture path's (forward
hooks, `rankfold.passes.capture`); the original is exported before planning either way, so a
model the exporter refuses fails in seconds. `compress` is the Python API;
`CompressionResult.save` exports, validates and writes every artefact atomically; `run_compress`
is what the CLI calls.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import fx, nn

from rankfold.converter.calibration import (
    PlanTimer,
    calibrate,
    calibration_summary,
    deployed_onnx,
    export_as_deployed,
)
from rankfold.converter.config import CompressConfig
from rankfold.converter.distributed import Handoff, launch_rank
from rankfold.converter.finetune import (
    FinetuneResult,
    check_resume,
    finetune,
    plot_history,
    refit_autocast,
    training_device,
    validation_split,
)
from rankfold.converter.metric import TOP1, TaskMetric, top1
from rankfold.converter.quantization import (
    QuantizedCheck,
    check_quantized,
    float_layer_choice,
    quantize_export,
    sensitive_reasons,
)
from rankfold.converter.report import plot_layers, plot_search
from rankfold.converter.results import (
    CalibrationPick,
    Capture,
    CompressedModel,
    EvalData,
    Latency,
    LatencyRow,
    LayerRow,
    OnnxCheck,
    OriginalModel,
    OutputParity,
    OutputTensor,
    Quantization,
    QuantizedFile,
    QuantizedLatencyRow,
    RecalibrationCheck,
    Recovery,
    Refit,
    RefitSegment,
    Report,
    SelectionReport,
    Sensitive,
    SensitiveLayer,
    StatisticsSummary,
)
from rankfold.converter.search_data import (
    StatisticsRun,
    calibration_from_dataset,
    layer_statistics,
)
from rankfold.converter.ui import console, progress_bar
from rankfold.models import (
    ImageData,
    ModelSpec,
    batches,
    check_finite,
    first_images,
    load_dataset,
    load_model,
    sha256_file,
    training_batches,
)
from rankfold.models import normalize as normalize_images
from rankfold.passes import (
    DecompositionReport,
    ModelAnalysis,
    Plan,
    decompose,
    plan_cost,
    restructure,
    select_ranks,
)
from rankfold.passes.capture import FX_ONLY_PASSES, Captured, trace_or_capture
from rankfold.passes.core import (
    ConfigError,
    ExportError,
    ModelLoadError,
    OutputError,
    PlanError,
    ValidationError,
    atomic_path,
    atomic_write_json,
)
from rankfold.passes.correction import (
    DEFAULT_CORRECTION_DAMPING,
    pass_bytes_per_image,
    refit_blocks,
)
from rankfold.passes.latency_gate import gate_plan, round_ranks
from rankfold.passes.layout import channels_last_allowed, in_conv_layout, runs_channels_last
from rankfold.passes.methods import get_method
from rankfold.passes.plan import RankPolicy, budgeted_slots, resolve_round_to
from rankfold.passes.recalibrate import correct_bias, has_batchnorm, recalibrate_bn
from rankfold.passes.search import DecompositionCache, check_storage, default_cache_dir
from rankfold.passes.selectors import PlanningContext, get_selector
from rankfold.passes.statistics import LayerStatistics
from rankfold.passes.surgery import FillProcesses, pool_shape, processes_pay
from rankfold.runtime import (
    LatencyResult,
    ParityReport,
    check_onnx,
    check_parity,
    get_backend,
    onnx_accuracy,
    parity_error,
    stamp_metadata,
)
from rankfold.runtime.latency import SideBySide, time_side_by_side
from rankfold.runtime.latency_model import LatencyMetric, LatencyTable
from rankfold.runtime.outputs import OutputLayout, named_outputs, output_layout
from rankfold.runtime.quantize import QuantizedModel, SensitiveChoice
from rankfold.runtime.validate import OnnxModule, agreement_error

MODEL_FILE_FORMAT = "rankfold-model-1"


@dataclass
class Artifacts:
    """The files `CompressionResult.save` wrote."""

    plan: Path
    model: Path  # model.pt: weights + plan, see `restore`
    original_onnx: Path
    model_onnx: Path
    cleanup: dict[str, dict[str, int]] | None  # what the export clean-up did, per model
    # With --quantize: "original" → original.int8.onnx, "compressed" → model.int8.onnx.
    quantized: dict[str, QuantizedModel] = field(default_factory=dict)
    deployment: dict[str, str] = field(default_factory=dict)  # every ONNX file's metadata_props


@dataclass
class Validation:
    """What `validate` measured on the exported files."""

    opset: int
    parity: ParityReport
    accuracy: float | None  # model.onnx on the evaluation data
    # Side by side with original.onnx, per thread count and batch size.
    latency: list[LatencyResult] | None
    # With --quantize: each INT8 file's checks, and the four models timed side by side
    # (original, original INT8, compressed, compressed INT8) per thread count and batch size.
    quantized: dict[str, QuantizedCheck] = field(default_factory=dict)
    four_way: list[SideBySide] | None = None


@dataclass
class CompressionResult:
    """The compressed model, how it was made, and what was measured so far."""

    config: CompressConfig
    spec: ModelSpec | None
    # GraphModules, or on the capture path the model itself and a copy with blocks swapped in.
    original: nn.Module
    compressed: nn.Module
    analysis: ModelAnalysis
    plan: Plan
    decomposition: DecompositionReport
    example_input: torch.Tensor
    selection: SelectionReport
    eval_data: ImageData | None = None
    # With --quantize: the training images activation ranges are calibrated on, and the layers
    # kept float (name or glob → why).
    calibration: ImageData | None = None
    float_layers: dict[str, str] = field(default_factory=dict)
    # The training images after the calibration ones: `--float-layers sensitive` measures its
    # agreement there (None when there are none).
    held_out: ImageData | None = None
    accuracy: dict[str, float | None] = field(default_factory=dict)
    refit: Refit | None = None  # when the last stages were refitted
    recalibration: str | None = None  # "batchnorm" | "bias" when recovery ran
    recalibration_check: RecalibrationCheck | None = None  # after a refit
    recalibration_images: int | None = None  # bias correction's
    recalibration_images_left_out: int = 0  # by --refit-memory-mb
    finetuning: FinetuneResult | None = None
    statistics: StatisticsRun | None = None  # data-aware fits: the layer statistics used
    report: Report | None = None  # set by `run_compress` (see `to_report`)
    capture: Capture = field(default_factory=Capture)
    # original.onnx as deployed, exported before planning (so an unexportable model fails
    # early), and what its clean-up did.
    original_onnx: bytes | None = None
    original_cleanup: dict[str, int] | None = None
    # The model's output tensors, and the task metric the accuracy fields hold (None: none).
    outputs: OutputLayout | None = None
    metric: TaskMetric | None = None

    def save(self, out_dir: str | Path) -> Artifacts:
        """Write plan.json, model.pt, original.onnx and model.onnx (with --quantize also
        original.int8.onnx and model.int8.onnx); nothing is measured here.

        Both models are cleaned up before export (BN folding, 1×1 merging, identity dropping;
        not on the capture path, which has no fx graph), so latency compares like with like;
        `validate` checks model.onnx against the uncleaned PyTorch model. original.onnx is the
        one `compress` exported before planning.
        """
        out = prepare_output_dir(out_dir)
        artifacts = Artifacts(
            plan=self.plan.save(out / "plan.json"),
            model=save_model(self, out / "model.pt"),
            original_onnx=out / "original.onnx",
            model_onnx=out / "model.onnx",
            cleanup=None,
        )
        if self.original_onnx is None:
            self.original_onnx, self.original_cleanup = deployed_onnx(
                self.original, self.example_input, self.config.export
            )
        with atomic_path(artifacts.original_onnx) as tmp:
            tmp.write_bytes(self.original_onnx)
        counts = export_as_deployed(
            self.compressed, self.example_input, artifacts.model_onnx, self.config.export
        )
        if counts is not None:
            artifacts.cleanup = {"original": self.original_cleanup, "compressed": counts}
        contract = artifacts.deployment = deployment_metadata(
            self.config, self.spec, tuple(self.example_input.shape[1:]), self.outputs
        )
        for path in (artifacts.original_onnx, artifacts.model_onnx):
            stamp_metadata(path, contract)
        if self.config.quantize.dtype is not None:
            pairs = (
                ("original", artifacts.original_onnx, out / "original.int8.onnx"),
                ("compressed", artifacts.model_onnx, out / "model.int8.onnx"),
            )
            with progress_bar("quantize int8", total=len(pairs)) as advance:
                for name, source, target in pairs:
                    artifacts.quantized[name] = quantize_export(
                        source,
                        target,
                        self.config.quantize,
                        self.float_layers,
                        self.calibration,
                        self.spec,
                        self.held_out,
                    )
                    stamp_metadata(target, contract)  # the quantizer drops the float file's
                    advance()
        return artifacts

    def to_report(self, artifacts: Artifacts, validation: Validation) -> Report:
        """The typed report of this run (report.json's content)."""
        analysis, plan = self.analysis, self.plan
        cost = plan_cost(analysis, plan)
        parity, latency = validation.parity, validation.latency
        return Report(
            model=self.config.model,
            method=plan.method,
            target=plan.target,
            capture=self.capture,
            outputs=[]
            if self.outputs is None
            else [
                OutputTensor(name=name, shape=list(shape))
                for name, shape in zip(self.outputs.names, self.outputs.shapes)
            ],
            metric=None if self.metric is None else self.metric.name,
            original=OriginalModel(
                params=analysis.total_params,
                macs=analysis.total_macs,
                accuracy=self.accuracy.get("original"),
                functional_macs=analysis.functional,
            ),
            compressed=CompressedModel(
                params=cost.params,
                macs=cost.macs,
                accuracy_decomposed=self.accuracy.get("decomposed"),
                accuracy_refitted=self.accuracy.get("refitted"),
                accuracy_recalibrated=self.accuracy.get("recalibrated"),
                accuracy_finetuned=self.accuracy.get("finetuned"),
            ),
            selection=self.selection,
            cleanup=artifacts.cleanup,
            recovery=Recovery(
                refit=self.refit,
                recalibration=self.recalibration,
                recalibration_check=self.recalibration_check,
                recalibration_images=self.recalibration_images,
                recalibration_images_left_out=self.recalibration_images_left_out,
                finetune=None if self.finetuning is None else self.finetuning.to_dict(),
            ),
            macs_reduction=analysis.total_macs / cost.macs,
            params_reduction=analysis.total_params / cost.params,
            onnx=OnnxCheck(
                path=str(artifacts.model_onnx),
                opset=validation.opset,
                max_abs_diff=parity.max_abs_diff,
                max_rel_diff=parity.max_rel_diff,
                atol=parity.atol,
                rtol=parity.rtol,
                parity_passed=parity.passed,
                # asdict, not to_dict: NaN/inf stay floats, as in the fields above.
                outputs=[OutputParity(**asdict(output)) for output in parity.outputs],
                accuracy=validation.accuracy,
            ),
            latency=None
            if not latency
            else Latency(
                provider=self.config.latency.provider,
                threads=self.config.latency.thread_counts,
                batch=latency[0].batch,
                original_ms=latency[0].original_ms,
                compressed_ms=latency[0].compressed_ms,
                speedup=latency[0].speedup,
                per_batch=[LatencyRow(**row.to_dict()) for row in latency],
                slower=any(row.verdict == "slower" for row in latency),
            ),
            eval_data=None
            if self.eval_data is None
            else EvalData(
                path=str(self.config.eval_data),
                samples=len(self.eval_data),
                skipped_images=sorted(self.eval_data.skipped),
            ),
            quantization=self._quantization_report(validation),
            deployment=artifacts.deployment,
            statistics=None
            if self.statistics is None
            else StatisticsSummary(
                images=self.statistics.statistics.images,
                layers=len(self.statistics.statistics.moments),
                damping=self.statistics.statistics.damping,
                seconds=self.statistics.seconds,
                from_cache=self.statistics.from_cache,
            ),
            layers=[LayerRow(**row.to_dict()) for row in self.decomposition.layers],
        )

    def _quantization_report(self, validation: Validation) -> Quantization | None:
        if not validation.quantized:
            return None
        settings = self.config.quantize

        def file(name: str) -> QuantizedFile:
            check = validation.quantized[name]
            agreement = check.agreement
            pick = check.model.calibration_choice
            return QuantizedFile(
                path=str(check.model.path),
                opset=check.opset,
                calibration=check.model.method,
                calibration_pick=None if pick is None else CalibrationPick(**asdict(pick)),
                quantized_nodes=check.model.quantized_nodes,
                float_nodes=check.model.float_nodes,
                equalized_edges=check.model.equalized_edges,
                reduce_range=check.model.reduce_range,
                top1_agreement=agreement.top1_agreement,
                max_logit_diff=agreement.max_logit_diff,
                logit_scale=agreement.logit_scale,
                samples=agreement.samples,
                accuracy=agreement.accuracy,
                float_accuracy=agreement.float_accuracy,
                passed=agreement.passed,
                sensitive=_sensitive_report(check.model.sensitive),
            )

        rows = None
        if validation.four_way is not None:
            rows = []
            for timing in validation.four_way:
                int8 = timing.compare(1, 3)
                rows.append(
                    QuantizedLatencyRow(
                        batch=timing.batch,
                        threads=timing.threads,
                        original_ms=timing.median_ms(0),
                        original_int8_ms=timing.median_ms(1),
                        compressed_ms=timing.median_ms(2),
                        compressed_int8_ms=timing.median_ms(3),
                        speedup=int8.speedup,
                        speedup_low=int8.speedup_low,
                        speedup_high=int8.speedup_high,
                        verdict=int8.verdict,
                        total_speedup=timing.compare(0, 3).speedup,
                    )
                )
        original, compressed = file("original"), file("compressed")
        return Quantization(
            dtype=settings.dtype,
            calibration=settings.calibration,
            calibration_samples=validation.quantized["compressed"].model.samples,
            float_layers=self.float_layers,
            min_agreement=settings.min_agreement,
            agreement_data="evaluation" if self.eval_data is not None else "calibration",
            original=original,
            compressed=compressed,
            latency=rows,
            passed=original.passed and compressed.passed,
        )

    def parity_inputs(self) -> torch.Tensor:
        """Evaluation images (normalised) when there are any, else seeded random inputs."""
        n = self.config.export.parity_samples
        if self.eval_data is not None and self.spec is not None:
            return normalize_images(first_images(self.eval_data, n), self.spec)
        generator = torch.Generator().manual_seed(self.config.seed)
        return torch.randn((n, *self.example_input.shape[1:]), generator=generator)


def _sensitive_report(choice: SensitiveChoice | None) -> Sensitive | None:
    if choice is None:
        return None
    fields = {k: v for k, v in asdict(choice).items() if k != "layers"}
    return Sensitive(
        **fields,
        kept=sensitive_reasons(choice),
        measured=[SensitiveLayer(**asdict(row), loss_db=row.loss_db) for row in choice.layers],
    )


def validate(result: CompressionResult, artifacts: Artifacts) -> Validation:
    """Check what `save` wrote: the ONNX checker on both files, parity of model.onnx with the
    uncleaned PyTorch model, its accuracy on the evaluation data, and latency side by side with
    the original on `config.latency`'s provider and batch sizes."""
    config = result.config
    check_onnx(artifacts.original_onnx)
    opset = check_onnx(artifacts.model_onnx)
    provider = config.latency.provider
    parity = check_parity(
        result.compressed,
        artifacts.model_onnx,
        result.parity_inputs(),
        provider=provider,
        atol=config.export.atol,
        rtol=config.export.rtol,
    )
    accuracy = None
    if result.metric is not None and result.metric.name == TOP1 and result.eval_data is not None:
        # onnxruntime batch by batch, without rebuilding the output structure.
        accuracy = onnx_accuracy(
            artifacts.model_onnx, batches(result.eval_data, result.spec), provider=provider
        )
    elif result.metric is not None:
        with torch.no_grad():
            reference = result.compressed(result.example_input)
        accuracy = result.metric(OnnxModule(artifacts.model_onnx, reference, provider))
    quantized = {}
    for name, float_path in (
        ("original", artifacts.original_onnx),
        ("compressed", artifacts.model_onnx),
    ):
        if name in artifacts.quantized:
            labelled = result.eval_data is not None
            quantized[name] = check_quantized(
                float_path,
                artifacts.quantized[name],
                config.quantize.min_agreement,
                result.eval_data if labelled else result.calibration,
                labelled,
                result.spec,
                provider,
            )
    latency = four_way = None
    if config.latency.enabled:
        settings = config.latency
        counts = settings.thread_counts
        shape = tuple(result.example_input.shape[1:])
        if quantized:
            # The four models side by side in one run, so the INT8 ratios are measured alike.
            paths = [
                artifacts.original_onnx,
                artifacts.quantized["original"].path,
                artifacts.model_onnx,
                artifacts.quantized["compressed"].path,
            ]
        else:
            paths = [artifacts.original_onnx, artifacts.model_onnx]
        runs = len(counts) * len(settings.batch) * len(paths) * settings.repeats
        with progress_bar("latency", total=runs) as advance:
            timings = [
                timing
                for threads in counts
                for timing in time_side_by_side(
                    paths,
                    shape,
                    settings.batch,
                    provider=provider,
                    warmup=settings.warmup,
                    repeats=settings.repeats,
                    threads=threads,
                    progress=lambda _: advance(),
                )
            ]
        compressed_index = len(paths) // 2  # model.onnx: second of two, third of four
        latency = [timing.compare(0, compressed_index) for timing in timings]
        four_way = timings if quantized else None
    return Validation(
        opset=opset,
        parity=parity,
        accuracy=accuracy,
        latency=latency,
        quantized=quantized,
        four_way=four_way,
    )


def deployment_metadata(
    config: CompressConfig,
    spec: ModelSpec | None,
    input_shape: tuple[int, ...],
    outputs: OutputLayout | None = None,
) -> dict[str, str]:
    """What a deployer must feed the ONNX files, as their metadata_props: the per-sample input
    shape and, for a model with a spec, the normalisation and, for a classifier (one logits
    output), its classes and the resize/crop the run's images went through
    (`rankfold.models.data`); other tasks resize their own way (detection and segmentation do
    not crop)."""
    contract = {
        "rankfold.model": config.model,
        "rankfold.input_shape": json.dumps(list(input_shape)),
    }
    if spec is None:
        contract["rankfold.preprocessing"] = "inputs as given: no normalisation recorded"
        return contract
    height, width = spec.input_shape[1:]
    channels = {1: "grayscale", 3: "RGB"}.get(spec.channels, f"{spec.channels} channels")
    ratio = config.data.crop_ratio
    contract["rankfold.mean"] = json.dumps(list(spec.mean))
    contract["rankfold.std"] = json.dumps(list(spec.std))
    contract["rankfold.preprocessing"] = (
        f"{channels} pixels in 0..255, float32 N×{spec.channels}×{height}×{width}, "
        "x = (pixels / 255 - mean) / std per channel"
    )
    if outputs is None or outputs.is_logits:
        contract["rankfold.num_classes"] = str(spec.num_classes)
        contract["rankfold.crop_ratio"] = repr(ratio)
        contract["rankfold.preprocessing"] += (
            f"; an image of another size: its shorter side resized to "
            f"{round(min(height, width) / ratio)} (= {min(height, width)} / {ratio:g}; bilinear, "
            f"antialiased), then center-cropped to {height}×{width}"
        )
    return contract


def write_report(result: CompressionResult, report: Report, out_dir: str | Path) -> None:
    """report.json and the plots, rendered from the typed report."""
    out = Path(out_dir)
    atomic_write_json(out / "report.json", report.to_json())
    title = f"{report.model}: {report.method}, {report.macs_reduction:.2f}× fewer MACs"
    plot_layers(report.layers, out / "layers.png", title)
    if report.selection.selector == "pars":
        plot_search(report.selection.details, out / "search.png")
    if result.finetuning is not None and result.finetuning.history:
        plot_history(
            result.finetuning.history, out / "finetune.png", f"{report.model}: fine-tuning"
        )


def backend_round_to(config: CompressConfig) -> int | None:
    """`ranks.round_to` with "auto" resolved to the channel block of `latency.provider`'s
    backend, the hardware the model is planned for (e.g. 8 for cuda whatever this CPU's AVX)."""
    block = get_backend(config.latency.provider).channel_block()
    return resolve_round_to(config.ranks.round_to, block)


def prepare_output_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder; choose a folder for the outputs")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise OutputError(
            f"output directory {out} is not writable ({exc.strerror}); choose another --out"
        ) from None
    return out


def compress(
    model: nn.Module,
    example_inputs: torch.Tensor,
    config: CompressConfig,
    spec: ModelSpec | None = None,
    workdir: str | Path | None = None,
    metric: TaskMetric | None = None,
) -> CompressionResult:
    """Trace, plan and decompose `model`, then recover accuracy when `config.train_data` is set.

    The task metric reported before and after (original, decomposed, each recovery stage, and
    model.onnx in `validate`) is `metric`, a user's score on the user's data, or else top-1 on
    `config.eval_data`, which needs a model returning one N×classes logits tensor.

    With training data and `statistics.data_aware` every layer is fitted to its
    output on the first `statistics.samples` training images instead of to its weights.

    `spec` (input shape, classes, mean/std) is needed to read data. Fine-tuning checkpoints go to
    `workdir` (default: a temporary folder, so only `--resume` needs a fixed one).

    Under torchrun (fine-tuning only) rank 0 does everything; the other ranks receive its model,
    fine-tune it with it and return a result holding only that model, the plan and the reports.
    """
    check_finite(model)
    model.eval()
    # From here on the passes see round_to as an int or None: they do not know the hardware.
    ranks = config.ranks.model_copy(update={"round_to": backend_round_to(config)})
    config = config.model_copy(update={"ranks": ranks})
    if (config.eval_data or config.train_data) and spec is None:
        raise ConfigError("reading data needs the model's spec (mean/std); pass spec=")
    if config.finetune.epochs > 0 and config.train_data is None:
        raise ConfigError("fine-tuning needs training data: pass --train-data")
    world = launch_rank()[1]
    if world > 1 and config.finetune.epochs == 0:
        # Every process would repeat the same compression and write the same --out.
        raise ConfigError(
            f"this is one of {world} torchrun processes, but only fine-tuning runs in several; "
            "pass --finetune-epochs N, or run rankfold without torchrun"
        )
    if config.finetune.epochs > 0 or (
        config.refits and (config.refit_steps or config.refit_segment_steps)
    ):
        training_device(config.finetune.device)  # --finetune-device cuda without a GPU fails now
    if metric is not None and config.eval_data is not None:
        raise ConfigError(
            f"metric= scores the model on its own data, --eval-data would score top-1 on "
            f"{config.eval_data}: pass one of them"
        )
    # Everything cheap to check is checked before tracing, planning and decomposing.
    train = None
    if config.train_data is not None:
        train = open_dataset(config.train_data, spec, config.train_limit, config)
    eval_data = None
    if config.eval_data is not None:
        eval_data = open_dataset(config.eval_data, spec, config.eval_limit, config)
        note_class_folders(eval_data, spec, "top-1")
    if train is not None and config.finetune.epochs > 0:
        note_class_folders(train, spec, "fine-tuning's label loss")
    if config.resume and config.finetune.epochs > 0:
        if workdir is None:
            raise ConfigError("--resume continues the fine-tuning in --out; pass workdir=")
        fine_tuned = held_out_split(config, train)[0]
        check_resume(
            Path(workdir) / "checkpoints",
            config.finetune,
            config.seed,
            fine_tuning_origin(config),
            {"train": fine_tuned.fingerprint(), "eval": eval_data and eval_data.fingerprint()},
        )
    handoff = None
    if world > 1:  # see converter/distributed.py: rank 0 compresses, every rank fine-tunes
        handoff = Handoff.start(training_device(config.finetune.device))
    captured = trace_or_capture(model, example_inputs, config.leaf_modules)
    channels_last = runs_channels_last(captured.module, example_inputs)
    if not channels_last:
        console.print(
            "[yellow]the model's forward does not run on channels-last tensors (an op that "
            "needs contiguous inputs, or a view that merges channels with rows?): its passes "
            "run in the contiguous layout, slower on a CPU[/yellow]"
        )
    with channels_last_allowed(channels_last):
        if handoff is None:
            return _compress_traced(
                captured, example_inputs, config, spec, train, eval_data, workdir, metric
            )
        if handoff.rank != 0:
            return _fine_tune_rank_zeros_model(
                handoff, captured, example_inputs, config, spec, train, eval_data, workdir
            )
        with handoff, handoff.leading():
            return _compress_traced(
                captured, example_inputs, config, spec, train, eval_data, workdir, metric, handoff
            )


def _compress_traced(
    captured: Captured,
    example_inputs: torch.Tensor,
    config: CompressConfig,
    spec: ModelSpec | None,
    train: ImageData | None,
    eval_data: ImageData | None,
    workdir: str | Path | None,
    metric: TaskMetric | None = None,
    handoff: Handoff | None = None,
) -> CompressionResult:
    """`compress` after its checks: plan, decompose, recover."""
    original, analysis = captured.module, captured.analysis
    train, validation = held_out_split(config, train)
    with torch.no_grad():
        outputs = output_layout(original(example_inputs))
    if not outputs.is_logits:
        check_task_options(outputs, config)
    # GIL-bound fits run in worker processes: started now, their interpreters load while
    # original.onnx is exported and the plan is made.
    with fill_processes(config, analysis) as processes:
        # original.onnx now, not after the decomposition: what the exporter refuses fails in
        # seconds.
        original_onnx, original_cleanup = export_original(captured, example_inputs, config)
        float_layers = {}
        if config.quantize.dtype is not None:  # a typo in --float-layers fails before planning
            float_layers = float_layer_choice(config.quantize.float_layers, analysis)
        tables: list[LatencyTable] = []
        if config.latency.gate or config.ranks.latency_reduction:
            get_backend(config.latency.provider).check()  # an unusable provider fails before timing
            # With --quantize the deployed models are the INT8 ones: plan for their kernels.
            precision = "int8" if config.quantize.dtype is not None else "float"
            tables = [
                LatencyTable(
                    config.latency.provider, config.latency.cache_dir, threads, precision=precision
                )
                for threads in config.latency.thread_counts
            ]
        cache_dir = config.search.cache_dir or default_cache_dir()
        statistics = None
        if config.data_aware or config.reads_moments:
            settings = config.statistics
            statistics = layer_statistics(
                original,
                analysis,
                train,
                spec,
                settings.samples,
                settings.damping,
                settings.memory_mb,
                cache_dir,
                batch_size=config.search.batch_size,
            )
        moments = None if statistics is None else statistics.statistics
        # Statistics collected for `--select output` alone leave the fits weight-only.
        fitted_to = moments if config.data_aware else None
        if not config.data_aware:
            statistics = None
        plan, selection, cache = _choose_plan(
            original,
            analysis,
            example_inputs,
            config,
            spec,
            train,
            tables,
            fitted_to,
            moments,
            processes,
        )
        if cache is None or cache.directory is None:
            # On disk, so every finished layer survives a killed run and a rerun computes nothing.
            cache = DecompositionCache(cache_dir, config.seed, fitted_to)
        with progress_bar("decompose", total=len(plan.decomposed())) as advance:
            compressed, decomposition = decompose(
                original,
                analysis,
                plan,
                seed=config.seed,
                progress=advance,
                cache=cache,
                processes=processes,
            )
    compressed.eval()
    result = CompressionResult(
        config,
        spec,
        original,
        compressed,
        analysis,
        plan,
        decomposition,
        example_inputs,
        selection=selection,
        float_layers=float_layers,
        statistics=statistics,
        capture=capture_report(captured, config),
        original_onnx=original_onnx,
        original_cleanup=original_cleanup,
        outputs=outputs,
        metric=metric if eval_data is None else top1(eval_data, spec),
    )
    if config.quantize.dtype is not None:
        samples = config.quantize.samples
        result.calibration = train.subset(samples)
        if len(train) > samples:
            result.held_out = train.take(np.arange(samples, min(len(train), 2 * samples)))
    result.eval_data = eval_data
    if result.metric is not None:
        result.accuracy["original"] = _accuracy(original, result)
        result.accuracy["decomposed"] = _accuracy(compressed, result)
    if config.refits and captured.traced and plan.decomposed():
        refit(result, train)
        if result.metric is not None:
            result.accuracy["refitted"] = _accuracy(compressed, result)
    if train is not None:
        with _working_folder(workdir) as folder:
            recover(result, train, folder, handoff, validation)
        if train.skipped:
            console.print(
                f"[yellow]left out {len(train.skipped)} unreadable training image(s) "
                f"(--skip-bad-images), e.g. {next(iter(train.skipped))}[/yellow]"
            )
    return result


def fill_processes(
    config: CompressConfig, analysis: ModelAnalysis
) -> AbstractContextManager[FillProcesses | None]:
    """Worker processes for the GIL-bound fits the config asks for, by `decompose`'s rule (one
    per core, worth starting from two fits per worker), or none."""
    methods = {config.ranks.method} | {
        override.method for override in config.ranks.layers.values() if override.method
    }
    workers, _ = pool_shape(len(analysis.layers))
    gil_bound = any(get_method(m).gil_bound for m in methods)
    if not (gil_bound and processes_pay(workers, len(analysis.layers))):
        return nullcontext(None)
    return FillProcesses(workers, spare_core=True)


def check_task_options(outputs: OutputLayout, config: CompressConfig) -> None:
    """Refuse, in one line and before any planning, the options that read class labels off
    one logits tensor, for a model that returns something else."""
    what = f"model '{config.model}' returns {outputs.describe()}"
    if config.eval_data is not None:
        raise ConfigError(
            f"--eval-data scores top-1, which needs one N×classes logits tensor, but {what}; "
            "drop --eval-data and score the task through the Python API (compress(..., "
            "metric=TaskMetric(name, score, data)))"
        )
    if config.finetune.epochs > 0:
        raise ConfigError(
            f"fine-tuning trains on class labels (cross-entropy, distilled logits), but {what}; "
            "drop --finetune-epochs and fine-tune the compressed model with your task's loss"
        )
    if config.quantize.dtype is not None:
        raise ConfigError(
            f"--quantize checks INT8 by top-1 agreement with the float model, but {what}; "
            "drop --quantize"
        )
    if get_selector(config.ranks.selector).needs_calibration:
        raise ConfigError(
            f"--select {config.ranks.selector} scores candidate plans by top-1 on training "
            f"images, but {what}; use --select uniform, energy, error or vbmf"
        )


def export_original(
    captured: Captured, example_input: torch.Tensor, config: CompressConfig
) -> tuple[bytes, dict[str, int] | None]:
    """original.onnx as deployed; an export failure becomes one line naming the module, and
    says why neither --leaf nor the capture path gets past a branch on tensor values."""
    try:
        return deployed_onnx(captured.module, example_input, config.export)
    except ExportError as exc:
        if not exc.data_dependent:
            raise
        fix = (
            "compute both sides and pick with torch.where (or use torch.cond) so the model "
            "can be exported"
        )
        fx_error = captured.fx_error
        if fx_error is not None:
            name = exc.module if exc.module is not None else fx_error.module
            site = f"module '{name}'" if name else "the model's forward"
            raise ExportError(
                f"neither torch.fx nor torch.export can trace {site}: {exc.reason}; {fix}"
            ) from None
        leaf = next(
            (
                leaf
                for leaf in config.leaf_modules
                if exc.module is not None
                and (exc.module == leaf or exc.module.startswith(leaf + "."))
            ),
            None,
        )
        if leaf is None:
            raise
        raise ExportError(
            f"ONNX export failed at module '{exc.module}': {exc.reason}; --leaf {leaf} keeps "
            f"it whole for torch.fx, but the exporter traces it too: {fix}"
        ) from None


def capture_report(captured: Captured, config: CompressConfig) -> Capture:
    """The report's account of how the model was read, and what the capture path skipped."""
    if captured.traced:
        return Capture()
    skipped = list(FX_ONLY_PASSES) if config.export.cleanup else []
    if config.refits:
        skipped.append("last-stage refit")  # runs the two fx graphs in lockstep
    error = captured.fx_error
    return Capture(
        path="forward hooks",
        fx_error=error.problem,
        fx_module=error.module,
        skipped_passes=skipped,
    )


def note_class_folders(data: ImageData, spec: ModelSpec, reader: str) -> None:
    """A note where an ImageFolder has fewer class folders than the model has classes: its
    labels are the folders' sorted positions, which are the model's class indices only if the
    folders are all of its classes in its order (e.g. a 10-folder subset of ImageNet is not)."""
    classes = getattr(data, "classes", None)
    if classes and len(classes) < spec.num_classes:
        console.print(
            f"[yellow]{data.root}: {len(classes)} class folders for a model of "
            f"{spec.num_classes} classes; {reader} reads folder i (sorted by name) as class i, "
            "right only if the folders are the model's classes in its order[/yellow]"
        )


def open_dataset(
    path: Path, spec: ModelSpec, limit: int | None, config: CompressConfig
) -> ImageData:
    """`load_dataset` with the run's data settings (crop ratio, workers, bad images)."""
    settings = config.data
    return load_dataset(
        path,
        spec,
        limit=limit,
        crop_ratio=settings.crop_ratio,
        skip_bad_images=settings.skip_bad_images,
        workers=settings.workers,
    )


def _choose_plan(
    original: nn.Module,
    analysis: ModelAnalysis,
    example_inputs: torch.Tensor,
    config: CompressConfig,
    spec: ModelSpec | None,
    train: ImageData | None,
    tables: list[LatencyTable],
    statistics: LayerStatistics | None = None,
    moments: LayerStatistics | None = None,
    processes: FillProcesses | None = None,
) -> tuple[Plan, SelectionReport, DecompositionCache | None]:
    """The plan to decompose with, how it was chosen, and the decomposition cache the selector
    filled (the final decomposition reuses it). `tables`: one per deployed thread count;
    `processes`: worker processes for GIL-bound fits, if started.

    One path: `select_ranks` plans, then Plan → Plan refinements: measured rank rounding and
    the latency gate, then (for a latency budget) calibration against whole-model timings.
    """
    if config.plan is not None:  # its rank settings were checked with the config
        # decompose checks the plan against this model before it factorizes anything.
        chosen = SelectionReport(selector="plan file", path=str(config.plan))
        return Plan.load(config.plan), chosen, None
    policy = config.ranks
    context = _planning_context(original, analysis, config, spec, train, tables[:1])
    context.statistics = statistics
    context.moments = moments
    context.processes = processes

    def planned(ranks: RankPolicy) -> tuple[Plan, dict[str, Any]]:
        selection = select_ranks(analysis, ranks, context)
        plan, summary = selection.plan, selection.to_dict()
        rounds = ranks.latency_reduction and ranks.round_to
        if config.latency.gate or rounds:
            plan, summary["latency_gate"] = _gate(plan, analysis, config, tables)
        if context.measured is not None:  # priced after the rounding and the gate
            summary["latency_ms"] = _predicted_latency(analysis, plan, context.measured)
        return plan, summary

    if context.measured is None or config.latency.calibrate == 0:
        plan, selection = planned(policy)
        return plan, SelectionReport.model_validate(selection), context.cache
    if policy.selector == "pars" and config.search.storage is not None:
        # A stored study is keyed by its budget; a calibrated one moves with timing noise, and
        # the next run could not resume the study.
        plan, selection = planned(policy)
        selection["latency_calibration"] = {
            "skipped": "a --storage study is keyed by its budget, which calibration would move "
            "with timing noise (and the study could not resume): the per-layer table's budget "
            "is used"
        }
        return plan, SelectionReport.model_validate(selection), context.cache
    # Uniform allocation re-plans in milliseconds; a search would run again every round, so
    # the other selectors run once, at the reduction the uniform rounds found.
    proxy = policy.selector != "uniform"

    def planned_at(requested: float, select: str = "uniform") -> tuple[Plan, dict[str, Any]]:
        return planned(policy.model_copy(update={"latency_reduction": requested, "select": select}))

    with PlanTimer(original, analysis, example_inputs, config) as timer:
        calibrated = calibrate(
            policy.latency_reduction,
            planned_at,
            lambda chosen, requested: timer(chosen[0], f"plan at {requested:.2f}×"),
            config.latency.calibrate,
        )
        if calibrated.plan is None:  # the target itself is out of reach
            raise PlanError(calibrated.rounds[0].error)
        summary = calibration_summary(calibrated, config, proxy)
        plan, selection = calibrated.plan
        if proxy:
            plan, selection = planned_at(calibrated.requested, policy.selector)
            summary["measured"] = timer(plan, f"{policy.selector} plan").measured
    selection["latency_calibration"] = summary
    return plan, SelectionReport.model_validate(selection), context.cache


def _planning_context(
    original: nn.Module,
    analysis: ModelAnalysis,
    config: CompressConfig,
    spec: ModelSpec | None,
    train: ImageData | None,
    tables: list[LatencyTable],
) -> PlanningContext:
    """What the selector may read: the model, calibration data (for selectors that score
    candidates on it), measured layer times (a latency budget, at the first thread count) and
    the progress display."""
    search = config.search
    calibration = None
    if get_selector(config.ranks.selector).needs_calibration and train is not None:
        calibration = calibration_from_dataset(
            train,
            spec,
            samples=search.calib_samples,
            bn_samples=search.bn_samples,
            batch_size=search.batch_size,
            seed=config.seed,
            # Without BatchNorm the proxy corrects biases on these images: clean, as in recover.
            augment=config.finetune.augment if has_batchnorm(original) else "none",
        )
    measured = None
    if config.ranks.latency_reduction:
        measured = _latency_metric(analysis, config, tables[0])
    return PlanningContext(
        gm=original,
        calibration=calibration,
        search=search,
        measured=measured,
        seed=config.seed,
        model_name=config.model,
        progress=_progress,
    )


def _progress(label: str, total: int):
    """A progress bar for `total` steps, or nothing when a stage reports none."""
    return progress_bar(label, total) if total else nullcontext(lambda *_: None)


def _predicted_latency(analysis: ModelAnalysis, plan: Plan, measured: LatencyMetric) -> dict:
    """Summed conv/linear times (the latency budget's convention) before and after `plan`."""
    original, planned = measured.total(analysis), measured.plan_total(analysis, plan)
    return {
        "batch": measured.batch,
        "original": original,
        "planned": planned,
        "reduction": original / planned,
    }


def _latency_metric(
    analysis: ModelAnalysis, config: CompressConfig, table: LatencyTable
) -> LatencyMetric:
    """Measured per-layer times at the first --batch size, timed up front under a progress bar."""
    metric = LatencyMetric(table, batch=config.latency.batch[0], round_to=config.ranks.round_to)
    slots = budgeted_slots(analysis, config.ranks, config.model)
    pairs = [(slot.layer, slot.method) for slot in slots]
    with progress_bar("latency table", total=len(analysis.layers) + len(pairs)) as advance:
        metric.warm(analysis, pairs, progress=advance)
    return metric


def _gate(
    plan: Plan, analysis: ModelAnalysis, config: CompressConfig, tables: list[LatencyTable]
) -> tuple[Plan, dict[str, Any]]:
    """Measured rank rounding (with round_to, at the first thread count), then the latency
    gate if asked for, at every thread count in turn: a block stays only if faster at each.
    Returns what changed."""
    batch, multiple = config.latency.batch, config.ranks.round_to
    planned = len(plan.decomposed())
    steps = (1 if multiple else 0) + (len(tables) if config.latency.gate else 0)
    with progress_bar("latency gate", total=planned * steps) as advance:
        rounded = gated = plan
        if multiple:
            rounded = gated = round_ranks(
                plan, analysis, tables[0], multiple, batch, progress=advance
            )
        if config.latency.gate:
            for table in tables:
                gated = gate_plan(
                    gated,
                    analysis,
                    table,
                    batch,
                    config.latency.gate_margin,
                    advance,
                    min_efficiency=config.latency.gate_efficiency,
                )
    before = {entry.name: entry.ranks for entry in plan.layers}
    summary = {
        "provider": tables[0].provider,
        "precision": tables[0].precision,
        "batch": batch,
        "threads": [table.threads for table in tables],
        "gate": config.latency.gate,
        "margin": config.latency.gate_margin,
        "min_efficiency": config.latency.gate_efficiency,
        "round_to": multiple,
        "rounded": [e.name for e in rounded.decomposed() if e.ranks != before[e.name]],
        "reverted": [
            e.name for e, g in zip(rounded.layers, gated.layers) if e.decompose and not g.decompose
        ],
        "measurements": sum(table.measured for table in tables),
        "cache": str(tables[0].path),
        "cache_error": next((t.cache_error for t in tables if t.cache_error), None),
    }
    return gated, summary


def _accuracy(module: nn.Module, result: CompressionResult) -> float | None:
    """The run's task metric of `module` (None without one)."""
    return None if result.metric is None else result.metric(module)


def _judge(
    result: CompressionResult, images: ImageData, expected: list[torch.Tensor] | None
) -> float:
    """How far the compressed model is from the original on `images`: the mean KL divergence
    of their predicted distributions, given the original's log-probabilities on each batch
    (`expected`, from `_log_probabilities`), else the relative squared error of all the
    outputs (the original run again: a dense output is too large to keep). Lower is closer."""
    error = reference = 0.0
    with torch.no_grad():
        if expected is not None:
            pairs = zip(batches(images, result.spec), expected, strict=True)
            for (x, _), original in pairs:
                actual = torch.log_softmax(result.compressed(x).double(), 1)
                error += float(
                    torch.nn.functional.kl_div(actual, original, log_target=True, reduction="sum")
                )
            return error / len(images)
        for x, _ in batches(images, result.spec):
            wanted = named_outputs(result.original(x))
            actual = named_outputs(result.compressed(x))
            for (_, a), (_, b) in zip(wanted, actual):
                error += float((b - a).square().sum())
                reference += float(a.square().sum())
    return error / max(reference, float(np.finfo(np.float32).tiny))


def _log_probabilities(result: CompressionResult, images: ImageData) -> list[torch.Tensor]:
    """The original's log-probabilities on each batch of `images`, which `_judge` compares
    with the compressed model's before and after the recalibration."""
    with torch.no_grad():
        return [
            torch.log_softmax(result.original(x).double(), 1)
            for x, _ in batches(images, result.spec)
        ]


def refit_segment_steps(config: CompressConfig, plan: Plan) -> int:
    """--refit-segment-steps, or by default --refit-steps where a planned method refines its
    segments (tucker2, tucker2-cp) and 0 elsewhere."""
    if config.refit_segment_steps is not None:
        return config.refit_segment_steps
    asked = any(get_method(layer.method).refines_segments for layer in plan.decomposed())
    return config.refit_steps if asked else 0


def refit(result: CompressionResult, train: ImageData) -> None:
    """The sequential correction on the first statistics.samples training images, clean (the
    distribution the model is used on, as for the layer statistics)."""
    started = time.perf_counter()
    config = result.config
    names = [entry.name for entry in result.plan.decomposed()]
    wanted = min(config.statistics.samples, len(train))
    images = train.subset(images_that_fit(result, wanted, networks=2))
    inputs = (x for x, _ in batches(images, result.spec, config.search.batch_size))
    segment_steps = refit_segment_steps(config, result.plan)
    steps = config.refit_steps or segment_steps
    device = training_device(config.finetune.device) if steps else None
    autocast = refit_autocast(device, config.finetune.amp) if device is not None else None
    with progress_bar("refit blocks", total=len(names)) as advance:
        done = refit_blocks(
            result.original,
            result.compressed,
            names,
            inputs,
            progress=advance,
            refine_steps=config.refit_steps,
            device=device,
            seed=config.seed,
            segment_steps=segment_steps,
            autocast=autocast,
        )
    for row in result.decomposition.layers:
        if (block := done.blocks.get(row.name)) is not None:
            row.extras["refit_error_before"] = block.before
            row.extras["refit_error_after"] = block.after
            row.extras["refit_steps_read"] = block.read
    result.refit = Refit(
        images=len(images),
        images_left_out=wanted - len(images),
        memory_mb=config.refit_memory_mb,
        layers=len(done.blocks),
        damping=DEFAULT_CORRECTION_DAMPING,
        seconds=time.perf_counter() - started,
        refine_steps=config.refit_steps,
        segment_steps=segment_steps,
        segments_by_default=config.refit_segment_steps is None and segment_steps > 0,
        precision="float32" if autocast is None else "bfloat16 autocast",
        segments=[
            RefitSegment(
                blocks=list(blocks),
                error_before=refit.before,
                error_after=refit.after,
                steps_read=refit.read,
            )
            for blocks, refit in done.segments.items()
        ],
    )


def images_that_fit(result: CompressionResult, wanted: int, networks: int) -> int:
    """How many of `wanted` images a node-by-node pass over `networks` copies of the model
    (the refit runs the original beside the compressed one) can hold within
    --refit-memory-mb; at least one. A model captured by hooks is no graph: its bias
    correction runs forward passes, a batch at a time, and reads them all."""
    if not isinstance(result.compressed, fx.GraphModule):
        return wanted
    per_image = networks * pass_bytes_per_image(result.compressed, result.example_input)
    return max(1, min(wanted, (result.config.refit_memory_mb << 20) // max(per_image, 1)))


Item = TypeVar("Item")


def _advancing(items: Iterable[Item], advance: Callable[[], None]) -> Iterator[Item]:
    """`items`, calling `advance` after each one is consumed."""
    for item in items:
        yield item
        advance()


BIAS_CORRECTION_IMAGES = 2048  # the first ones: enough for per-channel means

# Training images that judge recalibration after a refit: their labels are read by neither step,
# and the choice never looks at the evaluation data.
JUDGING_IMAGES = 1024


def judging_images(train: ImageData) -> ImageData:
    """The last JUDGING_IMAGES training images (the refit reads the first ones)."""
    count = min(JUDGING_IMAGES, len(train))
    return train.take(np.arange(len(train) - count, len(train)))


def recover(
    result: CompressionResult,
    train: ImageData,
    workdir: Path,
    handoff: Handoff | None = None,
    validation: ImageData | None = None,
) -> None:
    """BatchNorm recalibration on augmented training batches (bias correction without BN), kept
    after a refit only if it brings the model closer to the original on training images the
    refit did not read (see `_judge`), then optional fine-tuning, its epoch chosen on
    `validation` (`held_out_split`) when given (under torchrun, `handoff` first sends the model
    to the other ranks, which fine-tune it with this one)."""
    config = result.config
    if config.recalibrate and result.plan.decomposed():
        with in_conv_layout((result.original, result.compressed)):
            _recalibrate(result, train)
    if config.finetune.epochs > 0:
        if handoff is not None:
            handoff.send(
                {
                    "plan": result.plan,
                    "decomposition": result.decomposition,
                    "selection": result.selection,
                    "state_dict": result.compressed.state_dict(),
                }
            )
        _fine_tune(result, train, workdir, validation)
        result.accuracy["finetuned"] = _accuracy(result.compressed, result)


def _recalibrate(result: CompressionResult, train: ImageData) -> None:
    """BatchNorm recalibration (bias correction without BN), kept after a refit only if it
    brings the model closer to the original on training images the refit did not read."""
    config, spec = result.config, result.spec
    decomposed = [entry.name for entry in result.plan.decomposed()]
    # A refitted block's outputs are fitted to the original's, which recalibration may undo;
    # a continuous distance decides, not top-1, which 1,024 images resolve to a few images.
    judge = judging_images(train) if result.refit is not None else None
    logits = result.outputs is None or result.outputs.is_logits
    if judge is not None:
        refitted = {k: v.clone() for k, v in result.compressed.state_dict().items()}
        expected = _log_probabilities(result, judge) if logits else None
        refitted_score = _judge(result, judge, expected)
    if has_batchnorm(result.compressed):
        # The original statistics came from augmented images (see training_batches).
        images = train.subset(config.recalibrate_samples)
        inputs = training_batches(images, spec, 256, config.finetune.augment, config.seed)
        with progress_bar("recalibrate BatchNorm", total=math.ceil(len(images) / 256)) as step:
            recalibrate_bn(result.compressed, _advancing(inputs, step))
        result.recalibration = "batchnorm"
        result.recalibration_images = len(images)
    else:
        # Clean: bias correction matches the compressed model's channel means to the
        # original's on the same inputs, so no training statistics are involved, and clean
        # images are the distribution the model is used on.
        wanted = min(BIAS_CORRECTION_IMAGES, len(train))
        images = train.subset(images_that_fit(result, wanted, networks=1))
        with progress_bar("bias correction", total=len(decomposed)) as advance:
            correct_bias(
                result.original,
                result.compressed,
                decomposed,
                batches(images, spec, batch_size=256),
                progress=advance,
            )
        result.recalibration = "bias"
        result.recalibration_images = len(images)
        result.recalibration_images_left_out = wanted - len(images)
    kept = "recalibrated"
    if judge is not None:
        recalibrated_score = _judge(result, judge, expected)
        if not recalibrated_score < refitted_score:
            kept = "refitted"
            result.compressed.load_state_dict(refitted)
        scores = (
            {
                "divergence_refitted": refitted_score,
                "divergence_recalibrated": recalibrated_score,
            }
            if logits
            else {
                "output_error_refitted": refitted_score,
                "output_error_recalibrated": recalibrated_score,
            }
        )
        result.recalibration_check = RecalibrationCheck(
            images=len(judge),
            criterion="divergence" if logits else "output error",
            kept=kept,
            refit_images_among_them=max(0, result.refit.images + len(judge) - len(train)),
            **scores,
        )
    if kept == "recalibrated":
        result.accuracy["recalibrated"] = _accuracy(result.compressed, result)


def held_out_split(
    config: CompressConfig, train: ImageData | None
) -> tuple[ImageData | None, ImageData | None]:
    """(what the run fits on, the fine-tuning's validation split): with `--validation` the
    split is drawn before anything reads the training images, so that the model before
    fine-tuning, a candidate beside each epoch, is judged on images its refit never saw."""
    settings = config.finetune
    if train is None or settings.epochs == 0 or settings.validation == 0:
        return train, None
    return validation_split(train, settings.validation, config.seed)


def _fine_tune(
    result: CompressionResult, train: ImageData, workdir: Path, validation: ImageData | None
) -> None:
    """The recovery's fine-tuning, the same call on every rank of a torchrun launch."""
    config = result.config
    result.finetuning = finetune(
        result.compressed,
        result.original if config.finetune.distill else None,
        train,
        result.spec,
        config.finetune,
        workdir / "checkpoints",
        eval_data=result.eval_data,
        resume=config.resume,
        decomposed_names=[entry.name for entry in result.plan.decomposed()],
        seed=config.seed,
        validation=validation,
        origin=fine_tuning_origin(config),
    )


# Settings that do not change the model fine-tuning starts from: the fine-tuning's own (its
# checkpoint compares them itself), the evaluation's, the export's, INT8's, the timing's
# (the gate's decisions are its own settings' and the timings') and where caches live.
_NOT_ORIGIN: dict[str, Any] = {
    "finetune": True,
    "resume": True,
    "eval_data": True,
    "eval_limit": True,
    "export": True,
    "quantize": True,
    "latency": {"enabled", "warmup", "repeats", "fail_if_slower", "cache_dir"},
    "data": {"workers"},
    "search": {"cache_dir", "heartbeat"},
}


def fine_tuning_origin(config: CompressConfig) -> dict[str, Any]:
    """What decides the model fine-tuning starts from, as flat plain data: the settings (by
    config path) and the contents of the files read (weights, --plan, a model file). A
    checkpoint resumed from another origin would be published as this run's model."""
    origin: dict[str, Any] = {}

    def flatten(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                flatten(f"{prefix}{key}.", item)
        else:
            origin[prefix.removesuffix(".")] = value

    flatten("", config.model_dump(mode="json", exclude=_NOT_ORIGIN))
    model_file = config.model.rpartition(":")[0] if ".py:" in config.model else None
    for name, path in (("weights", config.weights), ("plan", config.plan), ("model", model_file)):
        if path is not None and Path(path).is_file():
            origin[f"the {name} file's contents"] = sha256_file(path)[:16]
    return origin


def _fine_tune_rank_zeros_model(
    handoff: Handoff,
    captured: Captured,
    example_inputs: torch.Tensor,
    config: CompressConfig,
    spec: ModelSpec | None,
    train: ImageData,
    eval_data: ImageData | None,
    workdir: str | Path | None,
) -> CompressionResult:
    """A torchrun rank other than 0: rebuild the model rank 0 compressed and recovered, take part
    in its fine-tuning, and return it; the measurements, files and report are rank 0's."""
    with handoff:
        payload = handoff.receive()
        compressed = _rebuild(captured, payload["plan"], payload["state_dict"], "rank 0's model")
        result = CompressionResult(
            config,
            spec,
            captured.module,
            compressed,
            captured.analysis,
            payload["plan"],
            payload["decomposition"],
            example_inputs,
            selection=payload["selection"],
            eval_data=eval_data,
        )
        train, validation = held_out_split(config, train)
        with _working_folder(workdir) as folder:
            _fine_tune(result, train, folder, validation)
    return result


@contextlib.contextmanager
def _working_folder(workdir: str | Path | None) -> Iterator[Path]:
    """`workdir`, or a temporary folder when the caller gave none."""
    if workdir is not None:
        yield Path(workdir)
        return
    with tempfile.TemporaryDirectory(prefix="rankfold-") as scratch:
        yield Path(scratch)


# Everything a compress run publishes into --out (fine-tuning checkpoints stay apart, for --resume).
ARTEFACTS = (
    "plan.json",
    "model.pt",
    "original.onnx",
    "model.onnx",
    "original.int8.onnx",
    "model.int8.onnx",
    "report.json",
    "layers.png",
    "search.png",
    "finetune.png",
)


def run_compress(
    config: CompressConfig, out_dir: str | Path, metric: TaskMetric | None = None
) -> CompressionResult:
    """The CLI's `compress`: load the model by name, compress, save, validate, report;
    `metric` is the task metric to report (see `compress`), else top-1 on --eval-data.

    The output folder is transactional: every artefact is written into a staging folder inside
    it and published together at the end, so a run that fails or is interrupted leaves the
    previous complete run as it was. When parity fails, the report is still published, then a
    ValidationError is raised. Under torchrun only rank 0 validates and writes; the other ranks
    return their copy of the fine-tuned model without a report.
    """
    out = prepare_output_dir(out_dir)  # an unwritable --out fails before minutes of work
    if config.latency.enabled:
        get_backend(config.latency.provider).check()  # an unusable provider fails before any work
    if config.ranks.selector == "pars":  # so does an unreachable study server
        check_storage(config.search.storage, config.search.workers)
    model, spec = load_model(
        config.model, config.weights, config.input_shape, config.mean, config.std, config.seed
    )
    example = torch.zeros(1, *spec.input_shape)
    result = compress(model, example, config, spec, workdir=out, metric=metric)
    if launch_rank()[0] != 0:
        return result  # rank 0 of the torchrun launch validates and writes --out
    with tempfile.TemporaryDirectory(prefix=".rankfold-staging-", dir=out) as staging:
        stage = Path(staging)
        try:
            artifacts = result.save(stage)
            validation = validate(result, artifacts)
            result.report = result.to_report(artifacts, validation)
            result.report.onnx.path = str(out / "model.onnx")
            if result.report.quantization is not None:
                for file in (
                    result.report.quantization.original,
                    result.report.quantization.compressed,
                ):
                    file.path = str(out / Path(file.path).name)
            write_report(result, result.report, stage)
        except OSError as exc:
            raise OutputError(
                f"writing the results failed ({exc.strerror or exc}); free space or choose "
                f"another --out ({out} still holds its previous run)"
            ) from None
        publish(stage, out)
    if not validation.parity.passed:
        raise parity_error(validation.parity)
    # The deployed file first; every failing file is named.
    failed = [
        validation.quantized[name]
        for name in ("compressed", "original")
        if name in validation.quantized and not validation.quantized[name].agreement.passed
    ]
    if failed:
        check = failed[0]
        pick = check.model.calibration_choice
        tried = [check.model.method] if pick is None else [*pick.errors, *pick.failed]
        error = agreement_error(check.agreement, out / check.model.path.name, tried)
        for other in failed[1:]:
            error = ValidationError(
                f"{error}; {other.model.path.name} fails too "
                f"({other.agreement.top1_agreement:.1%} agreement)"
            )
        raise error
    return result


def publish(stage: Path, out: Path) -> None:
    """Move a finished run's artefacts from `stage` into `out`, replacing the previous run's
    (one rename each, on the same file system) and removing those this run did not make."""
    made = {path.name for path in stage.iterdir()}
    for name in ARTEFACTS:
        if name not in made:
            (out / name).unlink(missing_ok=True)
    for name in made:
        os.replace(stage / name, out / name)


def save_model(result: CompressionResult, path: Path) -> Path:
    """State dict + plan + how to rebuild the architecture (see `restore`)."""
    file, sep, factory = result.config.model.rpartition(":")
    model = result.config.model
    if sep and file.endswith(".py"):  # restorable from any working directory
        model = f"{Path(file).resolve()}:{factory}"
    payload = {
        "format": MODEL_FILE_FORMAT,
        "model": model,
        "input_shape": list(result.example_input.shape[1:]),
        # The normalisation the model was compressed with, for `rankfold validate --eval-data`.
        "mean": None if result.spec is None else list(result.spec.mean),
        "std": None if result.spec is None else list(result.spec.std),
        "leaf_modules": list(result.config.leaf_modules),
        "plan": result.plan.model_dump(),
        "state_dict": result.compressed.state_dict(),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def restore(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a compressed model from `model.pt` (or its folder): architecture + plan + weights.

    `model` is the uncompressed architecture; by default it is rebuilt from the saved model name.
    A GraphModule, or for a model torch.fx cannot trace the model itself with blocks swapped in
    (the capture path, as `compress` took).
    """
    payload = read_model_file(path)
    input_shape = tuple(payload["input_shape"])
    if model is None:
        model, _ = load_model(payload["model"], None, input_shape)
    example = torch.zeros(1, *input_shape)
    captured = trace_or_capture(model.eval(), example, payload["leaf_modules"])
    plan = Plan.model_validate(payload["plan"])
    return _rebuild(captured, plan, payload["state_dict"], f"{path}", payload["model"])


def _rebuild(
    captured: Captured,
    plan: Plan,
    state: dict[str, torch.Tensor],
    source: str,
    model_name: str | None = None,
) -> nn.Module:
    """The traced model with `plan`'s blocks, holding the weights `state` (from `source`)."""
    rebuilt = restructure(captured.module, captured.analysis, plan)
    state = _without_constant_buffers(rebuilt, state)
    _add_fitted_biases(rebuilt, state)
    try:
        rebuilt.load_state_dict(state)
    except RuntimeError as exc:
        model = "the model" if model_name is None else f"model '{model_name}'"
        raise ModelLoadError(
            f"{source} does not fit {model} with its plan ({str(exc).splitlines()[0]})"
        ) from None
    return rebuilt.eval()


def _without_constant_buffers(
    model: nn.Module, state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """`state` less the model's non-persistent buffers (constants its code builds): some torch
    versions' fx graphs save them anyway (torch 2.11 did, ResNet-56's shortcut kernels), and
    another version's model then refuses the file."""
    own = model.state_dict().keys()
    constants = {name for name, _ in model.named_buffers()} - own
    return {key: value for key, value in state.items() if key not in constants}


def _add_fitted_biases(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Zero biases where recovery gave a bias-free stage one (the last-stage refit, bias
    correction), so the saved state dict loads."""
    own = model.state_dict()
    for key in state.keys() - own.keys():
        name, _, attribute = key.rpartition(".")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue  # load_state_dict names it
        if (
            attribute == "bias"
            and isinstance(module, nn.modules.conv._ConvNd | nn.Linear)
            and module.bias is None
        ):
            module.bias = nn.Parameter(torch.zeros_like(state[key]))


def read_model_file(path: str | Path) -> dict[str, Any]:
    """The payload `save_model` wrote, checked."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise ModelLoadError(
            f"{path} not found; pass the model.pt (or folder) a compress run wrote"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(f"{path} is not a readable rankfold model ({first})") from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FILE_FORMAT:
        raise ModelLoadError(f"{path} is not a rankfold model file (expected {MODEL_FILE_FORMAT})")
    return payload


__all__ = ["CompressionResult", "compress", "read_model_file", "restore", "run_compress"]
