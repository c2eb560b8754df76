"""The run summary the CLI prints, rendered from the typed report."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from rankfold.converter.results import Report
from rankfold.converter.ui import console


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def summary_lines(report: Report, out: Path) -> list[str]:
    """What happened, one fact a line: cost, accuracy at each stage, parity, latency."""
    original, compressed, onnx = report.original, report.compressed, report.onnx
    lines = [
        f"MACs {original.macs:,} → {compressed.macs:,} ({report.macs_reduction:.2f}×), "
        f"params {report.params_reduction:.2f}× fewer",
        f"accuracy: original {_percent(original.accuracy)}, decomposed "
        f"{_percent(compressed.accuracy_decomposed)}, recalibrated "
        f"{_percent(compressed.accuracy_recalibrated)}, fine-tuned "
        f"{_percent(compressed.accuracy_finetuned)}, ONNX {_percent(onnx.accuracy)}",
        f"ONNX parity: max abs diff {onnx.max_abs_diff:.2e} (tolerance {onnx.atol:.0e})",
    ]
    gate = report.selection.latency_gate
    if gate is not None:
        where = f"{gate.provider}, batch {','.join(map(str, gate.batch))}"
        lines.append(
            f"latency gate ({where}, margin {gate.margin:.0%}): {len(gate.reverted)} "
            f"layer(s) kept whole, {len(gate.rounded)} rank(s) rounded, "
            f"{gate.measurements} new timings"
            if gate.gate
            else f"measured rank rounding ({where}, multiple of {gate.round_to}): "
            f"{len(gate.rounded)} rank(s) rounded, {gate.measurements} new timings"
        )
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
            lines.append(
                f"latency ({report.latency.provider}, batch {row.batch}): "
                f"{row.original_ms:.2f} ms → {row.compressed_ms:.2f} ms "
                f"(speedup {row.speedup:.2f}×)"
            )
    lines.append(
        f"wrote {out}/: model.onnx original.onnx plan.json model.pt report.json layers.png"
    )
    return lines


def print_summary(report: Report, out: Path) -> None:
    """The per-layer table, then the summary lines, on the console (stderr)."""
    table = Table(title=f"{report.model} — {report.method}")
    for column, justify in (
        ("layer", "left"),
        ("method", "left"),
        ("rank", "left"),
        ("MACs", "right"),
        ("rel. error", "right"),
        ("status / reason", "left"),
    ):
        table.add_column(column, justify=justify)
    for row in report.layers:
        table.add_row(
            row.name,
            row.method or "-",
            "×".join(map(str, row.rank or [])) or "-",
            f"{row.original_macs:,} → {row.macs:,}",
            "-" if row.rel_error is None else f"{row.rel_error:.3f}",
            row.reason if row.status == "skipped" else row.status,
        )
    console.print(table)
    for line in summary_lines(report, out):
        console.print(line)
