"""Typed results: save only writes, validation is its own step, report.json has a schema."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

from rankfold.converter import CompressConfig, Report, compress, validate, write_report
from rankfold.converter.results import LatencyGate, Refit, RefitSegment
from rankfold.converter.summary import layer_table, print_summary, shorten, summary_lines
from rankfold.models import load_model
from rankfold.passes import RankPolicy
from rankfold.passes.core import ConfigError


@pytest.fixture(scope="module")
def result():
    torch.manual_seed(0)
    model, spec = load_model("digits-cnn")
    config = CompressConfig(
        model="digits-cnn",
        ranks=RankPolicy(method="tucker2", macs_reduction=2.0, round_to=None),
        latency={"batch": [1, 2], "repeats": 3, "warmup": 1, "gate": False, "threads": 1},
    )
    return compress(model, torch.zeros(1, *spec.input_shape), config, spec)


def test_a_budget_the_gate_cut_is_a_warning_and_the_written_files_are_all_named(result, tmp_path):
    """The gate (on by default with a budget) may keep most layers whole where blocks are not
    faster at the deployment's threads: the summary says the budget was missed and how to act;
    the files line names the plots this run wrote."""
    report = result.to_report(result.save(tmp_path), validate(result, result.save(tmp_path)))
    gate = LatencyGate(
        provider="cpu", batch=[1], threads=[None], gate=True, margin=0.05, min_efficiency=0.0,
        round_to=16, rounded=[], reverted=["conv2"], measurements=4, cache="c.json",
    )  # fmt: skip
    cut = report.model_copy(
        update={
            "selection": report.selection.model_copy(update={"latency_gate": gate}),
            "macs_reduction": 1.01,
        }
    )
    warnings = [line for line in summary_lines(cut, tmp_path) if line.startswith("WARNING")]
    assert warnings == [
        "WARNING: 1.01× fewer MACs of the 2× asked: the latency gate kept 1 planned layer(s) "
        "whole, their blocks not faster at batch 1, all cores; give the deployment's --threads "
        "and --batch (one thread per request is --threads 1), or --no-latency-gate to keep the "
        "budget whatever the speed"
    ]
    near = cut.model_copy(update={"macs_reduction": 1.92})  # within the selectors' ±5 %
    assert not any("of the 2× asked" in line for line in summary_lines(near, tmp_path))
    # Less than half of the reduction taken by the gate: a note, not a warning.
    most = cut.model_copy(update={"macs_reduction": 1.8})
    assert [line for line in summary_lines(most, tmp_path) if "of the 2× asked" in line] == [
        warnings[0].replace("WARNING: 1.01×", "1.80×")
    ]
    # Timed INT8 on the deployment's one thread: the warning says so and asks for no --threads.
    int8 = gate.model_copy(update={"precision": "int8", "threads": [1]})
    one_thread = cut.model_copy(
        update={"selection": cut.selection.model_copy(update={"latency_gate": int8})}
    )
    (warning,) = [line for line in summary_lines(one_thread, tmp_path) if "WARNING" in line]
    assert "their INT8 blocks not faster at batch 1, 1 thread; check --threads and --batch" in (
        warning
    )
    # A parameter budget leads the headline with what it asked for.
    by_params = report.model_copy(update={"target": {"params_reduction": 2.0}})
    assert summary_lines(by_params, tmp_path)[0].startswith(
        f"{report.params_reduction:.1f}× fewer params, {report.macs_reduction:.1f}× fewer MACs, "
    )
    assert summary_lines(report, tmp_path)[-1] == (
        f"wrote {tmp_path}/: model.onnx original.onnx plan.json model.pt report.json layers.png"
    )
    trained = report.model_copy(
        update={
            "recovery": report.recovery.model_copy(update={"finetune": {"history": [{}]}}),
            "selection": report.selection.model_copy(update={"selector": "pars"}),
        }
    )
    assert summary_lines(trained, tmp_path)[-1].endswith("layers.png search.png finetune.png")


def test_outputs_too_small_for_the_parity_tolerance_are_a_warning(result, tmp_path):
    """A random-init model whose logits are ~1e-15 passes any parity check: the summary says so."""
    report = result.to_report(result.save(tmp_path), validate(result, result.save(tmp_path)))
    assert report.onnx.outputs and report.onnx.outputs[0].scale > 10 * report.onnx.atol
    assert not any("parity tolerance" in line for line in summary_lines(report, tmp_path))
    tiny = report.onnx.outputs[0].model_copy(update={"scale": 3.5e-15, "max_abs_diff": 4.5e-21})
    quiet = report.model_copy(update={"onnx": report.onnx.model_copy(update={"outputs": [tiny]})})
    (warning,) = [line for line in summary_lines(quiet, tmp_path) if "parity tolerance" in line]
    assert warning.startswith(
        "WARNING: outputs far below the parity tolerance (largest |output|: logits 3.5e-15; "
        "--atol 1e-04): the check cannot tell a wrong export here"
    )


def test_save_writes_files_and_measures_nothing(result, tmp_path):
    artifacts = result.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.onnx",
        "model.pt",
        "original.onnx",
        "plan.json",
    ]
    assert artifacts.model_onnx == tmp_path / "model.onnx" and artifacts.cleanup is not None
    assert result.report is None  # nothing validated yet


def test_validation_is_its_own_step_and_the_report_round_trips(result, tmp_path):
    artifacts = result.save(tmp_path)
    validation = validate(result, artifacts)
    assert validation.parity.passed and validation.parity.max_abs_diff <= 1e-4
    assert [row.batch for row in validation.latency] == [1, 2]
    report = result.to_report(artifacts, validation)
    assert report.schema_version == 17
    assert report.macs_reduction == pytest.approx(2.0, rel=0.05)
    # Tucker-2 under a budget plans by energy unless a selector is named.
    assert report.selection.selector == "energy" and report.selection.by_default
    assert report.selection.latency_gate is None
    lines = summary_lines(report, tmp_path)
    assert lines[2].startswith("ranks: chosen by energy, the tucker2 method's default under a")
    why = "energy, the tucker2 method's default, cannot plan every layer (…): uniform planned"
    selection = report.selection.model_copy(
        update={"selector": "uniform", "by_default": False, "default_fallback": why}
    )
    gave_way = report.model_copy(update={"selection": selection})
    assert summary_lines(gave_way, tmp_path)[2] == f"ranks: {why}"
    assert report.latency.per_batch[1].batch == 2
    write_report(result, report, tmp_path)
    assert (tmp_path / "layers.png").read_bytes()[:4] == b"\x89PNG"
    loaded = Report.load(tmp_path / "report.json")
    assert loaded == report
    lines = summary_lines(loaded, tmp_path)
    assert lines[0].startswith(f"{report.macs_reduction:.1f}× fewer MACs, ")
    assert lines[1].startswith("MACs ") and f"({report.macs_reduction:.2f}×)" in lines[1]
    # The thread count timed at is recorded, per row and for the section.
    assert report.latency.threads == [1]
    assert [row.threads for row in report.latency.per_batch] == [1, 1]
    assert all("1 thread" in line for line in lines if line.startswith("latency (cpu"))


def test_the_summary_says_how_the_refit_ran_and_whether_its_segments_were_the_default(
    result, tmp_path
):
    artifacts = result.save(tmp_path)
    report = result.to_report(artifacts, validate(result, artifacts))
    first, second = report.layers[0].name, report.layers[1].name
    reads = ["moments", *["images"] * (len(report.layers) - 1)]
    rows = [
        row.model_copy(
            update={"refit_error_before": 0.5, "refit_error_after": 0.25, "refit_steps_read": read}
        )
        for row, read in zip(report.layers, reads, strict=True)
    ]
    segments = [
        RefitSegment(blocks=[first], error_before=0.2, error_after=0.1, steps_read="windows"),
        RefitSegment(blocks=[second], error_before=0.4, error_after=0.3, steps_read="windows"),
    ]
    refit = Refit(
        images=64,
        layers=len(rows),
        damping=1e-3,
        seconds=1.0,
        refine_steps=50,
        segment_steps=50,
        segments=segments,
    )

    def refit_lines(**update) -> list[str]:
        recovery = report.recovery.model_copy(update={"refit": refit.model_copy(update=update)})
        changed = report.model_copy(update={"recovery": recovery, "layers": rows})
        return [line for line in summary_lines(changed, tmp_path) if line.startswith("refit:")]

    blocks, given = refit_lines()
    assert f"{len(rows)} block(s)" in blocks and "all stages by 50 steps" in blocks
    assert "0.500 → 0.250" in blocks
    assert f"by 50 steps: {len(rows) - 1} on whole images, 1 on exact moments)" in blocks
    assert "2 segment(s) by 50 steps on 8×8-output windows," in given
    assert "0.300 → 0.200" in given
    assert "by default" not in given
    assert refit_lines(segments_by_default=True)[1].endswith(
        "(on by default for this plan's method; --refit-segment-steps 0 turns it off)"
    )
    assert len(refit_lines(segments=[], segment_steps=0)) == 1
    assert "Adam steps in" not in blocks  # float32, the default, goes unsaid
    assert refit_lines(precision="bfloat16 autocast")[0].endswith(
        "0.500 → 0.250; Adam steps in bfloat16 autocast (--no-amp: float32)"
    )


def test_the_summary_fits_80_columns_without_wrapping(result, tmp_path):
    artifacts = result.save(tmp_path)
    report = result.to_report(artifacts, validate(result, artifacts))
    long = "reverted by latency gate: block 0.0312 ms vs layer 0.0290 ms (batch 32, cpu, 2 threads)"
    rows = [row.model_copy(update={"status": "skipped", "reason": long}) for row in report.layers]
    report = report.model_copy(update={"layers": rows})
    console = Console(width=80, record=True, file=io.StringIO())
    print_summary(report, tmp_path, console)
    text = console.export_text()
    table = text[: text.index(summary_lines(report, tmp_path)[0])].splitlines()
    assert max(len(line) for line in table) <= 80
    # One line per layer (no cell wraps): title, header, rule, then the layers.
    assert len([line for line in table if line.strip()]) == 3 + len(rows)
    # The summary lines are soft-wrapped: one fact per line in a log file.
    assert all(line in text.splitlines() for line in summary_lines(report, tmp_path))
    assert shorten(long) in text
    assert long not in text and report.layers[0].reason == long  # report.json keeps it whole


def test_a_report_of_another_schema_is_refused(result, tmp_path):
    artifacts = result.save(tmp_path)
    report = result.to_report(artifacts, validate(result, artifacts))
    data = report.to_json()
    (tmp_path / "old.json").write_text(json.dumps({**data, "schema_version": 1}))
    with pytest.raises(ConfigError, match="schema 1, this rankfold reads 17"):
        Report.load(tmp_path / "old.json")
    (tmp_path / "odd.json").write_text(json.dumps({**data, "macs_reduction": "fast"}))
    with pytest.raises(ConfigError, match="does not match the report schema"):
        Report.load(tmp_path / "odd.json")


def test_the_final_decomposition_reuses_the_blocks_the_search_factorized(tmp_path):
    """One cache: --select error factorizes candidates; the chosen ones are not computed again."""
    torch.manual_seed(0)
    model, spec = load_model("digits-cnn")
    config = CompressConfig(
        model="digits-cnn",
        ranks=RankPolicy(method="tucker2", select="error", rel_error=0.5, round_to=None),
        search={"cache_dir": tmp_path / "cache"},
        latency={"enabled": False},
    )
    result = compress(model, torch.zeros(1, *spec.input_shape), config, spec)
    decomposed = [row for row in result.decomposition.layers if row.status == "decomposed"]
    assert decomposed and all(row.from_cache for row in decomposed)
    assert all(row.rel_error <= 0.5 for row in decomposed)
    # Without a search, blocks are factorized by the decomposition itself.
    plain = config.model_copy(
        update={
            "ranks": RankPolicy(method="tucker2", macs_reduction=2.0, round_to=None),
            "search": config.search.model_copy(update={"cache_dir": tmp_path / "fresh"}),
        }
    )
    again = compress(model, torch.zeros(1, *spec.input_shape), plain, spec)
    rows = [row for row in again.decomposition.layers if row.status == "decomposed"]
    assert rows and not any(row.from_cache for row in rows)
    # Each finished layer went to the on-disk cache: the same plan again factorizes nothing.
    rerun = compress(model, torch.zeros(1, *spec.input_shape), plain, spec)
    rerun_rows = [row for row in rerun.decomposition.layers if row.status == "decomposed"]
    assert rerun_rows and all(row.from_cache for row in rerun_rows)
    assert [row.rel_error for row in rerun_rows] == [row.rel_error for row in rows]


def test_a_model_file_holding_constant_buffers_restores(tmp_path):
    """torch 2.11's fx graphs save non-persistent buffers (ResNet-56's shortcut kernels); a
    model file written there restores under another torch."""
    from rankfold.converter.pipeline import restore, save_model

    model, spec = load_model("resnet20")
    config = CompressConfig(
        model="resnet20",
        ranks=RankPolicy(method="svd", macs_reduction=2.0, round_to=None),
        latency={"enabled": False},
    )
    result = compress(model, torch.zeros(1, *spec.input_shape), config, spec)
    save_model(result, tmp_path / "model.pt")
    payload = torch.load(tmp_path / "model.pt", weights_only=False)
    constants = {
        name: buffer
        for name, buffer in result.compressed.named_buffers()
        if name not in result.compressed.state_dict()
    }
    assert sorted(constants) == ["layer2.0.shortcut.kernel", "layer3.0.shortcut.kernel"]
    payload["state_dict"] = {**payload["state_dict"], **constants}
    torch.save(payload, tmp_path / "model.pt")
    x = torch.randn(2, *spec.input_shape)
    with torch.no_grad():
        assert torch.equal(restore(tmp_path / "model.pt")(x), result.compressed(x))


def test_the_layer_table_cuts_names_and_statuses_never_numbers():
    """A torchvision model's long layer names and a long status squeezed the numeric columns to
    "tuck…" and "0.…"; now those keep their width and the table stays within 80 columns."""
    layer = SimpleNamespace(
        name="layer4.0.downsample.0.a.very.long.name",
        method="tucker2-cp",
        rank=[208, 208],
        original_macs=115_605_504,
        macs=29_360_128,
        rel_error=0.8931,
        status="decomposed",
        reason="",
    )
    skipped = SimpleNamespace(
        name="fc", method=None, rank=None, original_macs=512_000, macs=512_000,
        rel_error=None, status="skipped", reason="reverted by latency gate: block 2 ms vs 1 ms",
    )  # fmt: skip
    report = SimpleNamespace(
        model="torchvision:resnet18", method="tucker2-cp", layers=[layer, skipped]
    )
    console = Console(file=io.StringIO(), width=80)
    console.print(layer_table(report))
    lines = console.file.getvalue().splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80
    row = next(line for line in lines if "layer4" in line)
    assert "tucker2-cp" in row and "208×208" in row and "116M→29.4M" in row and "0.893" in row
    assert "layer4.0.downsample.0.a.very.long.name" not in row and "…" in row
    assert "reverted" in next(line for line in lines if " fc " in line)
    # A wider console (a wide terminal, or a log: 200 columns) shows names and reasons whole.
    wide = Console(file=io.StringIO(), width=200)
    wide.print(layer_table(report, wide.width))
    lines = wide.file.getvalue().splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 200
    wide_row, fc_row = (next(line for line in lines if key in line) for key in ("layer4", " fc "))
    assert "layer4.0.downsample.0.a.very.long.name" in wide_row
    assert "reverted by latency gate: block 2 ms vs 1 ms" in fc_row
