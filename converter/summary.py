"""The run summary the CLI prints, rendered from the typed report."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from rankfold.converter.results import CalibrationPick, Report, SelectionReport, Sensitive
from rankfold.converter.ui import console
from rankfold.passes.analysis import (
    ACTIVATION_PRODUCT_NOTE,
    ATTENTION_PRODUCTS_NOTE,
    FIXED_KERNEL_NOTE,
    LEAF_NOTE,
)
from rankfold.passes.correction import CROP_SIDE
from rankfold.passes.latency_gate import threads_text
from rankfold.runtime.latency import format_speedup

REASON_WIDTH = 24  # the table's reason cell; the full text stays in report.json
# A budget reached below this share was cut by the gate: the selectors meet it within ±5 %.
BUDGET_SHORTFALL = 0.95
# Outputs whose largest value is under this multiple of --atol pass parity almost whatever the
# export did.
TINY_OUTPUTS = 10.0


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def headline(report: Report) -> str:
    """What the run did in one line, e.g. "2.4× fewer MACs, 1.9–2.1× faster, −0.2 pt"; a
    parameter budget's reduction first where one was asked."""
    parts = [f"{report.macs_reduction:.1f}× fewer MACs"]
    if "params_reduction" in (report.target or {}):
        parts.insert(0, f"{report.params_reduction:.1f}× fewer params")
    latency = report.latency
    if latency is not None:
        verdicts = {row.verdict for row in latency.per_batch}
        speedups = [row.speedup for row in latency.per_batch]
        low, high = min(speedups), max(speedups)
        span = f"{low:.1f}×" if f"{low:.1f}" == f"{high:.1f}" else f"{low:.1f}–{high:.1f}×"
        parts.append(
            f"{span} faster"
            if verdicts == {"faster"}
            else "SLOWER than the original"
            if latency.slower
            else f"{span}, not measurably faster everywhere"
        )
    final = report.onnx.accuracy
    if final is not None and report.original.accuracy is not None:
        if report.metric == "top-1":
            delta = 100 * (final - report.original.accuracy)
            parts.append(f"{delta:+.1f} pt".replace("-", "−"))
        else:
            parts.append(f"{report.metric} {_value(report.original.accuracy)} → {_value(final)}")
    return ", ".join(parts)


def metric_line(report: Report) -> str:
    """The task metric at each stage; top-1 as percentages, a user metric as it came."""
    original, compressed = report.original, report.compressed
    if report.metric is None:
        logits = [(o.name, len(o.shape)) for o in report.outputs] == [("logits", 1)]
        if report.outputs and not logits:
            shapes = ", ".join(f"{o.name} N×{'×'.join(map(str, o.shape))}" for o in report.outputs)
            return (
                f"task metric: none applies (the model returns {shapes}; top-1 needs one "
                "N×classes logits tensor: score the task with metric= in the Python API)"
            )
        return "accuracy: n/a (no --eval-data)"
    show = _percent if report.metric == "top-1" else _value
    label = "accuracy" if report.metric == "top-1" else report.metric
    return (
        f"{label}: original {show(original.accuracy)}, decomposed "
        f"{show(compressed.accuracy_decomposed)}, "
        + (
            ""
            if compressed.accuracy_refitted is None
            else f"refitted {show(compressed.accuracy_refitted)}, "
        )
        + f"recalibrated {show(compressed.accuracy_recalibrated)}, fine-tuned "
        f"{show(compressed.accuracy_finetuned)}, ONNX {show(report.onnx.accuracy)}"
    )


def epoch_choice(finetune: dict | None) -> str | None:
    """Which fine-tuning epoch a validation split chose, the model before it included."""
    if not finetune or finetune.get("validation_before") is None:
        return None
    epochs = [row["validation_accuracy"] for row in finetune["history"]]
    split = finetune["selected_by"]
    before = finetune["validation_before"]
    if finetune["best_epoch"] == 0:
        return (
            f"fine-tuning: no epoch beat the model before it on the {split} ({before:.2%}; "
            f"epochs {max(epochs, default=before):.2%} at best), so that model is kept"
        )
    return (
        f"fine-tuning: kept epoch {finetune['best_epoch']}/{len(epochs)}, best on the {split} "
        f"({finetune['best_accuracy']:.2%}; {before:.2%} before fine-tuning)"
    )


def _value(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _left_out(count: int, memory_mb: int | None) -> str:
    """The note on images a node-by-node pass left out for memory."""
    if not count:
        return ""
    limit = f"--refit-memory-mb {memory_mb}" if memory_mb else "--refit-memory-mb"
    return f" ({count} more left out: their activations would exceed {limit}; raise it for them)"


STEPS_READ = {
    "moments": "exact moments",
    "windows": f"{CROP_SIDE}×{CROP_SIDE}-output windows",
    "images": "whole images",
}


def _steps_read(reads: Iterable[str | None]) -> str:
    """What the refinement's steps read: " on whole images", or ": 40 on exact moments, 12 on
    whole images" where they differ."""
    counts = Counter(read for read in reads if read is not None)
    if len(counts) <= 1:
        return "".join(f" on {STEPS_READ[read]}" for read in counts)
    return ": " + ", ".join(f"{n} on {STEPS_READ[read]}" for read, n in counts.most_common())


def search_line(selection: SelectionReport) -> str:
    """What a PARS search did: its trials (resumed ones apart), study, best trial and cost."""
    search = selection.details
    best = search["best"]
    resumed = search["trials_resumed"]
    study = f"study '{search['study_name']}'" + (
        f" in {search['storage']}" if search.get("storage") else ""
    )
    return (
        f"ranks: pars search ({search['sampler']} sampler, {search['proxy']} proxy), "
        f"{search['trials_complete']} trials"
        + (f" ({resumed} resumed from {study})" if resumed else f" ({study})")
        + f"; best trial {best['trial']}, proxy {best['proxy']:.4f}; "
        f"{search['decompositions_computed']} decompositions computed in "
        f"{selection.seconds or 0:.0f} s"
    )


def functional_notes(functional: dict[str, int]) -> list[str]:
    """What the model's MACs count beyond its Conv/Linear layers (`ModelAnalysis.functional`):
    products of activations, fixed kernels, leaf modules' layers, other functional calls."""
    notes: list[str] = []
    products = {
        name: macs
        for name, macs in functional.items()
        if name.endswith((ATTENTION_PRODUCTS_NOTE, ACTIVATION_PRODUCT_NOTE))
    }
    if products:
        notes.append(
            f"products of activations (attention scores and weighted sums): {len(products)} "
            f"call(s), {sum(products.values()):,} MACs counted, no weights to decompose"
        )
    fixed = {k: v for k, v in functional.items() if k.endswith(FIXED_KERNEL_NOTE)}
    if fixed:
        calls = ", ".join(
            f"{name.removesuffix(FIXED_KERNEL_NOTE)}{macs:,}" for name, macs in fixed.items()
        )
        notes.append(
            f"fixed kernels: functional calls on buffers, not parameters, counted in the MACs "
            f"({calls}); nothing trained there to decompose"
        )
    leaves = {k: v for k, v in functional.items() if k.endswith(LEAF_NOTE)}
    if leaves:
        kept = ", ".join(f"{name.removesuffix(LEAF_NOTE)}{macs:,}" for name, macs in leaves.items())
        notes.append(
            f"leaf modules kept whole (--leaf), their layers counted in the MACs: {kept}; "
            "nothing inside them is decomposed"
        )
    others = {
        k: v
        for k, v in functional.items()
        if k not in products and k not in fixed and k not in leaves
    }
    if others:
        calls = ", ".join(f"{name} {macs:,}" for name, macs in others.items())
        notes.append(
            f"not decomposable: {len(others)} functional call(s) counted in "
            f"the MACs ({calls}); make them Conv2d/Linear modules to compress them"
        )
    return notes


def gate_shortfall(report: Report) -> str | None:
    """A note where the latency gate kept so many layers whole that a MACs or parameter budget
    is missed (the selectors meet it within ±5 %), naming the ways out; a warning where it
    took more than half of the reduction asked."""
    gate = report.selection.latency_gate
    if gate is None or not gate.gate or not gate.reverted:
        return None
    delivered = {"macs": report.macs_reduction, "params": report.params_reduction}
    for metric, asked in (report.target or {}).items():
        reached = delivered.get(metric.removesuffix("_reduction"))
        if reached is None or reached >= BUDGET_SHORTFALL * asked:
            continue
        what = "MACs" if metric.startswith("macs") else "parameters"
        threads = " and ".join(threads_text(t) for t in gate.threads)
        blocks = "INT8 blocks" if gate.precision == "int8" else "blocks"
        settings = (
            "give the deployment's --threads and --batch (one thread per request is --threads 1)"
            if None in gate.threads
            else "check --threads and --batch are the deployment's"
        )
        # A warning where the gate took more than half of the reduction asked, else a note.
        warning = "WARNING: " if reached - 1 < (asked - 1) / 2 else ""
        return (
            f"{warning}{reached:.2f}× fewer {what} of the {asked:g}× asked: the latency gate "
            f"kept {len(gate.reverted)} planned layer(s) whole, their {blocks} not faster at "
            f"batch {','.join(map(str, gate.batch))}, {threads}; {settings}, or "
            "--no-latency-gate to keep the budget whatever the speed"
        )
    return None


def summary_lines(report: Report, out: Path) -> list[str]:
    """What happened, one fact a line: the headline, cost, accuracy at each stage, parity,
    latency."""
    original, compressed, onnx = report.original, report.compressed, report.onnx
    lines = [
        headline(report),
        f"MACs {original.macs:,} → {compressed.macs:,} ({report.macs_reduction:.2f}×), "
        f"params {report.params_reduction:.2f}× fewer",
        metric_line(report),
        f"ONNX parity: max abs diff {onnx.max_abs_diff:.2e} (tolerance {onnx.atol:.0e} + "
        f"{onnx.rtol:.0e} × output scale)",
    ]
    chosen = epoch_choice(report.recovery.finetune)
    if chosen:
        lines.insert(3, chosen)
    if report.selection.by_default:
        lines.insert(
            2,
            f"ranks: chosen by {report.selection.selector}, the {report.method} "
            "method's default under a budget (--select uniform keeps the same share of every "
            "layer's cost)",
        )
    elif report.selection.default_fallback:
        lines.insert(2, f"ranks: {report.selection.default_fallback}")
    elif report.selection.selector == "pars":
        lines.insert(2, search_line(report.selection))
    tiny = [o for o in onnx.outputs if o.scale < TINY_OUTPUTS * onnx.atol]
    if tiny:
        names = ", ".join(f"{o.name} {o.scale:.1e}" for o in tiny)
        lines.append(
            f"WARNING: outputs far below the parity tolerance (largest |output|: {names}; "
            f"--atol {onnx.atol:.0e}): the check cannot tell a wrong export here (random or "
            "untrained weights?); pass a smaller --atol or trained --weights"
        )
    if len(onnx.outputs) > 1:
        lines.append(
            "ONNX parity per output (max abs diff / output scale): "
            + ", ".join(
                f"{o.name} {o.max_abs_diff:.1e}/{o.scale:.2g}{'' if o.passed else ' FAILED'}"
                for o in onnx.outputs
            )
        )
    if report.statistics is not None:
        stats = report.statistics
        aware = [row for row in report.layers if row.output_error is not None]
        compared = [row for row in aware if row.weight_only_output_error is not None]
        line = (
            f"data-aware fits: {len(aware)} layer(s) fitted to their outputs on "
            f"{stats.images} training images"
        )
        if compared:
            mean = sum(row.output_error for row in compared) / len(compared)
            baseline = sum(row.weight_only_output_error for row in compared) / len(compared)
            line += f"; mean relative output error {mean:.3f} (weight-only {baseline:.3f})"
        lines.append(line)
    if report.capture.path != "torch.fx":
        capture = report.capture
        skipped = ", ".join(capture.skipped_passes) or "none (export clean-up was off)"
        line = (
            f"capture path: {capture.fx_error}, so the layers were found with forward hooks and "
            f"replaced at module level, and exported through torch.export; fx-only passes "
            f"skipped: {skipped}"
        )
        if capture.fx_module and capture.skipped_passes:
            line += (
                f" (--leaf {capture.fx_module} keeps them if that module holds all the "
                "control flow fx cannot trace)"
            )
        lines.append(line)
    refitted = [row for row in report.layers if row.refit_error_after is not None]
    if refitted:
        before = sum(row.refit_error_before for row in refitted) / len(refitted)
        after = sum(row.refit_error_after for row in refitted) / len(refitted)
        refit = report.recovery.refit
        how = (
            f"last stage by least squares, then all stages by {refit.refine_steps} steps"
            f"{_steps_read(row.refit_steps_read for row in refitted)}"
            if refit.refine_steps
            else "last stage by least squares"
        )
        lowered = (
            f"; Adam steps in {refit.precision} (--no-amp: float32)"
            if refit.precision != "float32"
            else ""
        )
        lines.append(
            f"refit: {len(refitted)} block(s) refitted in graph order ({how}) on "
            f"{refit.images} training images{_left_out(refit.images_left_out, refit.memory_mb)}; "
            f"mean output error in the compressed network {before:.3f} → {after:.3f}{lowered}"
        )
        if refit.segments:
            first = sum(s.error_before for s in refit.segments) / len(refit.segments)
            last = sum(s.error_after for s in refit.segments) / len(refit.segments)
            lines.append(
                f"refit: then {len(refit.segments)} segment(s) by {refit.segment_steps} steps"
                f"{_steps_read(s.steps_read for s in refit.segments)}, fitting their outputs "
                "(stretches between points where one tensor carries everything on, e.g. a "
                f"residual unit); mean segment output error {first:.3f} → {last:.3f}"
                + (
                    " (on by default for this plan's method; --refit-segment-steps 0 turns it off)"
                    if refit.segments_by_default
                    else ""
                )
            )
    recovery = report.recovery
    if recovery.recalibration == "bias" and recovery.recalibration_images_left_out:
        left_out = _left_out(recovery.recalibration_images_left_out, None)
        read = recovery.recalibration_images
        lines.append(f"bias correction on {read} training images{left_out}")
    check = report.recovery.recalibration_check
    if check is not None:
        verdict = "kept" if check.kept == "recalibrated" else "undone (the refitted model is kept)"
        if check.criterion == "divergence":
            scores = (
                f"KL divergence from the original on the last {check.images} training images "
                # A divergence rounds to a tiny negative number where the models agree.
                f"refitted {max(check.divergence_refitted, 0.0):.4f}, recalibrated "
                f"{max(check.divergence_recalibrated, 0.0):.4f}"
            )
        else:
            scores = (
                f"relative output error against the original on the last {check.images} "
                f"training images refitted {check.output_error_refitted:.4f}, recalibrated "
                f"{check.output_error_recalibrated:.4f}"
            )
        if check.refit_images_among_them:
            scores += (
                f" ({check.refit_images_among_them} of them read by the refit: too few training "
                "images to hold them apart, which favours the refitted model)"
            )
        lines.append(f"recalibration after the refit {verdict}: {scores}")
    lines.extend(functional_notes(original.functional_macs))
    gate = report.selection.latency_gate
    if gate is not None:
        where = (
            f"{gate.provider}{', int8' if gate.precision == 'int8' else ''}, "
            f"batch {','.join(map(str, gate.batch))}, "
            f"{' and '.join(threads_text(t) for t in gate.threads)}"
        )
        lines.append(
            f"latency gate ({where}, margin {gate.margin:.0%}): {len(gate.reverted)} "
            f"layer(s) kept whole, {len(gate.rounded)} rank(s) rounded, "
            f"{gate.measurements} new timings"
            if gate.gate
            else f"measured rank rounding ({where}, multiple of {gate.round_to}): "
            f"{len(gate.rounded)} rank(s) rounded, {gate.measurements} new timings"
        )
        shortfall = gate_shortfall(report)
        if shortfall:
            lines.append(shortfall)
    calibration = report.selection.latency_calibration
    if calibration is not None and calibration.skipped:
        lines.append(f"latency calibration skipped: {calibration.skipped}")
    elif calibration is not None:
        steps = ", ".join(
            f"{r.requested:.2f}× → {r.measured:.2f}×"
            if r.measured
            else f"{r.requested:.2f}× out of reach"
            for r in calibration.rounds
        )
        lines.append(
            f"latency calibration ({calibration.provider}, batch {calibration.batch}, "
            f"table → whole model): {steps}; kept {calibration.requested:.2f}× "
            f"(measured {calibration.measured:.2f}× for target {calibration.target:.2f}×)"
        )
    if report.cleanup:
        done = report.cleanup["compressed"]
        lines.append(
            f"clean-up before export: {done['batchnorms_folded']} BatchNorm(s) folded into convs, "
            f"{done['batchnorms_folded_into_blocks']} into blocks, {done['convs_merged']} 1×1 "
            f"pair(s) merged, {done['identities_dropped']} identity op(s) dropped"
        )
    if report.latency is not None:
        for row in report.latency.per_batch:
            speedup = format_speedup(row.speedup, row.speedup_low, row.speedup_high)
            lines.append(
                f"latency ({report.latency.provider}, batch {row.batch}, "
                f"{threads_text(row.threads)}): {row.original_ms:.2f} ms → "
                f"{row.compressed_ms:.2f} ms, speedup {speedup}"
            )
        if report.latency.slower:
            lines.append(
                "WARNING: the compressed model is measurably SLOWER than the original at some "
                "batch size (see above); plan with --latency-gate or a smaller reduction"
            )
    lines.extend(quantization_lines(report))
    written = ["model.onnx", "original.onnx"]
    if report.quantization is not None:
        written += ["model.int8.onnx", "original.int8.onnx"]
    written += ["plan.json", "model.pt", "report.json", "layers.png"]
    if report.selection.selector == "pars":
        written.append("search.png")
    if report.recovery.finetune and report.recovery.finetune.get("history"):
        written.append("finetune.png")
    lines.append(f"wrote {out}/: {' '.join(written)}")
    return lines


def pick_text(chosen: str, pick: CalibrationPick) -> str:
    """Which ranges `auto` kept, and every candidate's output error."""
    others = ", ".join(
        f"{method} {error:.3%}" for method, error in pick.errors.items() if method != chosen
    )
    measured = f"against {others} " if others else ""
    failed = "".join(f"; {method} failed: {why}" for method, why in pick.failed.items())
    return (
        f"{chosen} ranges: output error {pick.errors[chosen]:.3%} of the float outputs' energy "
        f"{measured}on {pick.samples} {pick.images}{failed}"
    )


def quantization_lines(report: Report) -> list[str]:
    """The INT8 files: what stayed float, agreement with the float files, accuracy, and the four
    models' timings."""
    quant = report.quantization
    if quant is None:
        return []
    kept = ", ".join(quant.float_layers) or "none"
    # 7-bit weights: this CPU's int8 kernels saturate, or --quant-reduce-range asked for them.
    bits = "; weights in 7 bits" if quant.compressed.reduce_range else ""
    ranges = (
        "ranges chosen per file (auto)"
        if quant.calibration == "auto"
        else f"{quant.calibration} ranges"
    )
    lines = [
        f"INT8 ({quant.scheme}{bits}; {ranges} on {quant.calibration_samples} training images), "
        f"kept float: {kept}"
    ]
    for label, file in (("compressed", quant.compressed), ("original", quant.original)):
        verdict = "ok" if file.passed else "FAILED"
        lines.append(
            f"INT8 {label}: top-1 agreement {file.top1_agreement:.2%} with its float model on "
            f"{file.samples} {quant.agreement_data} images (tolerance ≥ "
            f"{quant.min_agreement:.1%}, {verdict}), max logit diff {file.max_logit_diff:.2g} "
            f"(logits up to {file.logit_scale:.2g}), accuracy {_percent(file.accuracy)} "
            f"(float {_percent(file.float_accuracy)})"
        )
        if file.calibration_pick is not None:
            lines.append(f"INT8 {label}: {pick_text(file.calibration, file.calibration_pick)}")
        if file.sensitive is not None:
            lines.append(f"INT8 {label}: {sensitive_text(file.sensitive)}")
    for row in quant.latency or []:
        speedup = format_speedup(row.speedup, row.speedup_low, row.speedup_high)
        lines.append(
            f"latency with INT8 (batch {row.batch}, {threads_text(row.threads)}): original "
            f"{row.original_ms:.2f} ms, INT8 {row.original_int8_ms:.2f} ms; compressed "
            f"{row.compressed_ms:.2f} ms, INT8 {row.compressed_int8_ms:.2f} ms; INT8 compressed "
            f"vs INT8 original {speedup}, vs float original {row.total_speedup:.2f}×"
        )
    not_faster = [row for row in quant.latency or [] if row.compressed_int8_ms >= row.compressed_ms]
    if not_faster:
        batches = ", ".join(str(row.batch) for row in not_faster)
        lines.append(
            f"WARNING: model.int8.onnx is not faster than model.onnx on this machine at batch "
            f"{batches} (see above): deploy the float file here; onnxruntime's int8 kernels pay "
            "on x86 CPUs with VNNI and gain little without"
        )
    return lines


def sensitive_text(choice: Sensitive) -> str:
    """What `--float-layers sensitive` kept float and why, in one line."""
    where = f"on {choice.samples} {choice.images}"
    if not choice.kept:
        verdict = {
            "reached": "no layer needed",
            "cap": f"no layer fits the cap of {choice.max_float_share:.0%} of the MACs",
            "exhausted": "no layer left to keep float",
        }[choice.outcome]
        return (
            f"sensitive layers: {verdict} (top-1 agreement {choice.agreement_before:.1%} {where}, "
            f"target {choice.min_agreement:.1%})"
        )
    layers = ", ".join(
        f"{row.layer} ({row.sqnr_in_db:.1f} → {row.sqnr_out_db:.1f} dB SQNR)"
        for row in choice.measured
        if row.kept_float
    )
    stop = {
        "reached": "target reached",
        "cap": f"no other layer fits the cap of {choice.max_float_share:.0%} of the MACs",
        "exhausted": "no layer left",
    }[choice.outcome]
    return (
        f"kept float as most sensitive: {layers}; top-1 agreement {choice.agreement_before:.1%} → "
        f"{choice.agreement:.1%} {where} (target {choice.min_agreement:.1%}, {stop}); "
        f"{choice.float_share:.1%} of the MACs float"
    )


def shorten(text: str, width: int = REASON_WIDTH) -> str:
    """The first clause of a reason, cut to `width` characters with an ellipsis."""
    first = text.split(";")[0].split(" (")[0]
    return first if len(first) <= width else first[: width - 1] + "…"


def _macs(value: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.3g}{unit}"
    return str(value)


LAYER_TABLE_WIDTH = 80


def layer_table(report: Report, width: int = LAYER_TABLE_WIDTH) -> Table:
    """One row per layer, at most `width` (at least LAYER_TABLE_WIDTH) columns wide: MACs in
    k/M/G, a skipped layer's reason cut to its first clause and to the room left (report.json
    has the whole text), no cell wrapping, horizontal rules only (vertical borders would take 16
    of 80 columns). The method, rank, MACs and error columns keep their full width; long layer
    names and statuses are cut instead (left to rich, a torchvision model's
    "layer4.0.downsample.0" squeezed the error column to "0.…")."""
    width = max(width, LAYER_TABLE_WIDTH)
    table = Table(
        title=f"{report.model} — {report.method}", title_justify="left", box=box.SIMPLE_HEAD
    )
    columns = (
        ("layer", "left"),
        ("method", "left"),
        ("rank", "right"),
        ("MACs", "right"),
        ("error", "right"),
        ("status", "left"),
    )
    rows = [
        (
            row.name,
            row.method or "-",
            "×".join(map(str, row.rank or [])) or "-",
            f"{_macs(row.original_macs)}→{_macs(row.macs)}",
            "-" if row.rel_error is None else f"{row.rel_error:.3f}",
            shorten(row.reason, REASON_WIDTH + width - LAYER_TABLE_WIDTH)
            if row.status == "skipped"
            else row.status,
        )
        for row in report.layers
    ]
    widest = [
        max([len(header), *(len(cells[index]) for cells in rows)])
        for index, (header, _) in enumerate(columns)
    ]
    # What the layer and status columns may share: the SIMPLE_HEAD frame takes one character at
    # the edge and three per column (padding and separator).
    left = width - (1 + 3 * len(columns)) - sum(widest[1:5])
    layer = min(widest[0], max(left - min(widest[5], len("decomposed")), len("layer")))
    caps = {0: layer, 5: max(left - layer, len("status"))}
    for index, (header, justify) in enumerate(columns):
        table.add_column(
            header,
            justify=justify,
            no_wrap=True,
            min_width=None if index in caps else widest[index],
            max_width=caps.get(index),
        )
    for cells in rows:
        table.add_row(*cells)
    return table


def print_summary(report: Report, out: Path, target: Console = console) -> None:
    """The per-layer table (as wide as the console), then the summary lines, on the console
    (stderr)."""
    target.print(layer_table(report, target.width))
    for line in summary_lines(report, out):
        target.print(line, soft_wrap=True)  # a log file keeps each fact on one line
