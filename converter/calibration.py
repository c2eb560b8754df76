"""Closing the loop on a latency budget: time the whole exported model, re-plan until it meets it.

The per-layer table sums conv/linear times, each timed between stand-in neighbours. A whole model
also pays what no probe sees: per-node dispatch, the ops between layers, the memory traffic of a
deeper graph (ResNet-56 CP asked for 2× ran 1.82–1.89× faster). So `--latency-reduction` times each
plan as it will be deployed: the plan's architecture with unfilled blocks (time does not depend
on the weights, so nothing is factorized), cleaned and exported like `model.onnx`, run side by
side with the original. The requested reduction then moves by a secant step in log space until
the measured speedup is within `TOLERANCE` of the target or the rounds run out; the plan measured
closest to the target is kept.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Generic, TypeVar

import torch
from torch import fx, nn

from rankfold.converter.config import CompressConfig, ExportConfig
from rankfold.converter.quantization import float_layer_choice
from rankfold.converter.ui import progress_bar
from rankfold.passes import ModelAnalysis, Plan, plan_cost, restructure
from rankfold.passes.cleanup import cleanup
from rankfold.passes.core import PlanError
from rankfold.runtime import compare_latency, export_onnx, quantize_int8

TOLERANCE = 0.03  # whole-model timings on a quiet CPU repeat within about 2 %
MAX_STEP = 2.0  # one round moves the requested reduction by at most this factor


@dataclass
class CalibrationRound:
    requested: float  # the reduction the per-layer table was asked for
    measured: float | None  # whole-model speedup (None: no plan reached `requested`)
    original_ms: float | None = None
    compressed_ms: float | None = None
    macs_reduction: float | None = None
    error: str | None = None


P = TypeVar("P")


@dataclass
class Calibrated(Generic[P]):
    plan: P | None  # the plan measured closest to the target (None: no round produced one)
    requested: float
    rounds: list[CalibrationRound]

    @property
    def measured(self) -> float | None:
        return next(r.measured for r in self.rounds if r.requested == self.requested)


def next_request(target: float, tried: list[tuple[float, float]]) -> float:
    """The reduction to ask the table for next, from (requested, measured) pairs so far.

    Measured speedup grows with the requested reduction but not in proportion (fixed costs do
    not shrink), so the step is a secant through the last two points in log-log space; with one
    point, or a slope the noise made flat or negative, it assumes proportionality.
    """
    requested, measured = tried[-1]
    slope = 1.0
    if len(tried) > 1:
        (q0, m0), (q1, m1) = tried[-2], tried[-1]
        if q0 != q1:
            fitted = (math.log(m1) - math.log(m0)) / (math.log(q1) - math.log(q0))
            if fitted > 0.1:
                slope = fitted
    step = math.exp((math.log(target) - math.log(measured)) / slope)
    step = min(max(step, 1 / MAX_STEP), MAX_STEP)
    return max(requested * step, 1.0 + 1e-3)  # a latency budget must ask for some reduction


def calibrate(
    target: float,
    plan_for: Callable[[float], P],
    measure: Callable[[P, float], CalibrationRound],  # (plan, requested); fills in `measured`
    rounds: int,
) -> Calibrated[P]:
    """Up to `rounds` re-plans after the first, each measured; `plan_for(requested)` raises
    PlanError when no plan reaches `requested` (the search then stops there)."""
    requested = target
    history: list[CalibrationRound] = []
    plans: dict[float, P] = {}
    for _ in range(rounds + 1):
        try:
            plan = plan_for(requested)
        except PlanError as exc:
            history.append(CalibrationRound(requested, None, error=str(exc)))
            break
        row = replace(measure(plan, requested), requested=requested)
        history.append(row)
        plans[requested] = plan
        if abs(row.measured / target - 1) <= TOLERANCE:
            break
        tried = [(r.requested, r.measured) for r in history if r.measured]
        proposal = next_request(target, tried)
        if any(abs(proposal / q - 1) < 1e-3 for q, _ in tried):
            break  # clamped to where it already was: another round would repeat it
        requested = proposal
    measured = [r for r in history if r.measured]
    if not measured:
        return Calibrated(None, target, history)
    best = min(measured, key=lambda r: abs(math.log(r.measured / target)))
    return Calibrated(plans[best.requested], best.requested, history)


def export_as_deployed(
    module: nn.Module, example_input: torch.Tensor, path: Path, export: ExportConfig
) -> dict[str, int] | None:
    """Export `module` as `model.onnx` is exported (cleaned up unless turned off, or without an
    fx graph to clean: the capture path); returns what the clean-up did (None without it)."""
    counts = None
    if export.cleanup and isinstance(module, fx.GraphModule):
        module, counts = cleanup(module)
    export_onnx(module, example_input, path, opset=export.opset)
    return counts


def deployed_onnx(
    module: nn.Module, example_input: torch.Tensor, export: ExportConfig
) -> tuple[bytes, dict[str, int] | None]:
    """`export_as_deployed` into memory: the file's bytes and the clean-up counts."""
    with tempfile.TemporaryDirectory(prefix="rankfold-export-") as folder:
        path = Path(folder) / "model.onnx"
        counts = export_as_deployed(module, example_input, path, export)
        return path.read_bytes(), counts


class PlanTimer:
    """Whole-model speedup of plans for one traced model, timed as `CompressionResult.save` will
    deploy them (clean-up, export, INT8 with --quantize, onnxruntime on the configured provider,
    first batch size)."""

    def __init__(
        self,
        original: nn.Module,
        analysis: ModelAnalysis,
        example_input: torch.Tensor,
        config: CompressConfig,
    ) -> None:
        self.original, self.analysis, self.config = original, analysis, config
        self.example_input = example_input
        self._folder = tempfile.TemporaryDirectory(prefix="rankfold-calibrate-")
        self._timed: dict[str, CalibrationRound] = {}
        self._original_onnx = self._export(original, "original")

    def close(self) -> None:
        self._folder.cleanup()

    def __enter__(self) -> PlanTimer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _export(self, module: nn.Module, name: str) -> Path:
        path = Path(self._folder.name) / f"{name}.onnx"
        export_as_deployed(module, self.example_input, path, self.config.export)
        settings = self.config.quantize
        if settings.dtype is None:
            return path
        # Deployed as INT8: timed as INT8, the same layers float. Random inputs calibrate: the
        # ranges change the int8 values, not the kernels' time.
        generator = torch.Generator().manual_seed(self.config.seed)
        inputs = torch.randn((8, *self.example_input.shape[1:]), generator=generator)
        # The named and auto layers float; 'sensitive' ones are chosen after the final export.
        float_layers = float_layer_choice(settings.float_layers, self.analysis)
        target = path.with_suffix(".int8.onnx")
        return quantize_int8(path, target, [inputs], float_layers=list(float_layers)).path

    def __call__(self, plan: Plan, label: str = "plan") -> CalibrationRound:
        """The plan's whole-model timing; nearby requests often round and gate to one plan,
        which is timed once."""
        key = repr([(e.name, e.method, e.ranks) for e in plan.decomposed()])
        if key not in self._timed:
            self._timed[key] = self._time(plan, label)
        return self._timed[key]

    def _time(self, plan: Plan, label: str) -> CalibrationRound:
        structure = restructure(self.original, self.analysis, plan).eval()
        latency = self.config.latency
        planned = self._export(structure, "planned")
        with progress_bar(f"time {label}", total=2 * latency.repeats) as advance:
            (result,) = compare_latency(
                self._original_onnx,
                planned,
                tuple(self.example_input.shape[1:]),
                latency.batch[:1],
                provider=latency.provider,
                warmup=latency.warmup,
                repeats=latency.repeats,
                threads=latency.thread_counts[0],  # a budget is planned at the first
                progress=lambda _: advance(),
            )
        cost = plan_cost(self.analysis, plan)
        return CalibrationRound(
            requested=math.nan,
            measured=result.speedup,
            original_ms=result.original_ms,
            compressed_ms=result.compressed_ms,
            macs_reduction=self.analysis.total_macs / cost.macs,
        )


def calibration_summary(calibrated: Calibrated, config: CompressConfig, proxy: bool) -> dict:
    return {
        "target": config.ranks.latency_reduction,
        "provider": config.latency.provider,
        "batch": config.latency.batch[0],
        "tolerance": TOLERANCE,
        "selector": "uniform (stand-in for the search)" if proxy else "uniform",
        "rounds": [asdict(r) for r in calibrated.rounds],
        "requested": calibrated.requested,
        "measured": None if calibrated.plan is None else calibrated.measured,
    }
