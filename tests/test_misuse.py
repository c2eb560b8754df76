"""Misuse catalogue: every bad or conflicting input gets exit code 1 and one line naming the
problem and the fix, before the expensive work, and a failed run leaves the previous one intact.

Each case is (id, files to create, arguments, expected exit code, fragment of the error line).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from rankfold.converter.cli import app
from rankfold.runtime import check_parity, export_onnx

runner = CliRunner()

USER_MODELS = '''
import torch
from torch import nn

RANKFOLD_SPEC = {"input_shape": [3, 8, 8], "num_classes": 4, "mean": [0.5] * 3, "std": [0.25] * 3}


class Optional(nn.Module):
    """forward takes an optional second input: traced at its default."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x, bias=None):
        h = self.fc(self.conv(x).mean((2, 3)))
        return h if bias is None else h + bias


class NoLayers(nn.Module):
    def forward(self, x):
        return x.mean((2, 3)).repeat(1, 2)[:, :4]


def optional():
    return Optional()


class Grouped(nn.Module):
    """Only depthwise convs and a grouped 1×1 whose groups (3→1) no factorization shrinks."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 12, 3, groups=3)
        self.b = nn.Conv2d(12, 12, 3, groups=12)
        self.c = nn.Conv2d(12, 4, 1, groups=4)

    def forward(self, x):
        return self.c(self.b(self.a(x))).mean((2, 3))


def grouped():
    return Grouped()


def no_layers():
    return NoLayers()


class Gate(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


class Gated(nn.Module):
    """A branch on tensor values: neither torch.fx nor torch.export can trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.gate = Gate()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.gate(self.conv(x)).mean((2, 3)))


def gated():
    return Gated()
'''

COMMON = ("--no-latency", "--out", "out")
CASES = [
    (
        "rank-and-budget",
        {},
        ["compress", "digits-cnn", "--rank", "8", "--macs-reduction", "2", *COMMON],
        "give --rank or --macs-reduction, not both",
    ),
    (
        "layer-rank-typo",
        {},
        ["compress", "digits-cnn", "--layer-rank", "cnv2=4", "--rank", "8", *COMMON],
        "--layer-rank 'cnv2' matches no layer (closest: conv2",
    ),
    (
        "skip-typo",
        {},
        ["compress", "digits-cnn", "--skip", "Linaer", "--macs-reduction", "2", *COMMON],
        "--skip 'Linaer' matches no layer (closest: Linear",
    ),
    (
        "plan-with-rank",
        {"plan.json": "PLAN"},
        ["compress", "digits-cnn", "--plan", "plan.json", "--rank", "4", *COMMON],
        "--plan replays plan.json, which fixes every layer's method and ranks; drop",
    ),
    (
        "plan-for-another-model",
        {"plan.json": "PLAN"},
        ["compress", "digits32-cnn", "--plan", "plan.json", *COMMON],
        "the plan was made for another architecture",
    ),
    (
        "plan-rank-0",
        {"plan.json": "PLAN:ranks=[0]"},
        ["compress", "digits-cnn", "--plan", "plan.json", *COMMON],
        "rank 0 for layer 'conv2' (cp) is impossible; choose a value in [1,",
    ),
    (
        "plan-rank-huge",
        {"plan.json": "PLAN:ranks=[100000]"},
        ["compress", "digits-cnn", "--plan", "plan.json", *COMMON],
        "rank 100000 for layer 'conv2' (cp) is impossible",
    ),
    (
        "plan-method-switched",
        {"plan.json": "PLAN:method=tucker2"},
        ["compress", "digits-cnn", "--plan", "plan.json", *COMMON],
        "tucker2 takes 2 rank(s) (rank_out, rank_in) but layer 'conv2' was given",
    ),
    (
        "random-weights-file",
        {"w.pt": b"RANDOM"},
        ["compress", "digits-cnn", "--weights", "w.pt", "--rank", "4", *COMMON],
        "checkpoint w.pt cannot be read",
    ),
    (
        "config-ranks-list",
        {"c.yaml": "ranks: [cp, 2]\n"},
        ["compress", "digits-cnn", "--config", "c.yaml", *COMMON],
        "invalid value for 'ranks'",
    ),
    (
        "no-decomposable-layer",
        {"m.py": USER_MODELS},
        ["compress", "m.py:no_layers", "--rank", "0.5", *COMMON],
        "no Conv2d or Linear layer to decompose",
    ),
    (
        "only-grouped-convs",
        {"m.py": USER_MODELS},
        ["compress", "m.py:grouped", "--macs-reduction", "2", *COMMON],
        "no layer is left to compress for 2× macs (2× skipped: depthwise conv; 1× skipped: svd "
        "is not smaller than the layer even at rank 1)",
    ),
    (
        # Before: traced, planned and decomposed, then failed at ONNX export, leaving plan.json
        # and model.pt behind.
        "leaf-with-data-dependent-branch",
        {"m.py": USER_MODELS},
        ["compress", "m.py:gated", "--leaf", "gate", "--rank", "4", *COMMON],
        "ONNX export failed at module 'gate': a Python branch tests tensor values (m.py:",
    ),
    (
        "untraceable-data-dependent-branch",
        {"m.py": USER_MODELS},
        ["compress", "m.py:gated", "--rank", "4", *COMMON],
        "neither torch.fx nor torch.export can trace module 'gate': a Python branch tests "
        "tensor values (m.py:",
    ),
    (
        # The cap bounds what 'sensitive' keeps float: without it, it would bound nothing.
        "float-share-cap-without-sensitive",
        {},
        ["compress", "digits-cnn", "--rank", "4", "--quantize", "int8", "--float-layers", "auto"]
        + ["--max-float-share", "0.5", *COMMON],
        "--float-layers has no 'sensitive'",
    ),
    (
        "budget-out-of-range-names-its-flag",
        {},
        ["compress", "digits-cnn", "--macs-reduction", "0.5", *COMMON],
        "invalid value for --macs-reduction (ranks.macs_reduction): Input should be greater than 1",
    ),
    (
        "out-is-a-file",
        {"afile": "not a folder"},
        ["compress", "digits-cnn", "--rank", "4", "--no-latency", "--out", "afile"],
        "--out afile is a file, not a folder; choose a folder for the outputs",
    ),
    (
        "gate-asked-for-with-a-plan",
        {"p.json": "PLAN"},
        ["compress", "digits-cnn", "--plan", "p.json", "--latency-gate", *COMMON],
        "--latency-gate (latency.gate) is read by the latency gate, which does not run with "
        "--plan (the plan is replayed); drop --plan or drop --latency-gate",
    ),
    (
        "gate-margin-under-a-latency-budget-without-the-gate",
        {},
        ["compress", "digits-cnn", "--latency-reduction", "1.5", "--gate-margin", "0.3"]
        + ["--calibrate", "0", *COMMON],
        "--gate-margin (latency.gate_margin) is read by the latency gate, off in this run",
    ),
    (
        "device-without-steps-or-fine-tuning",
        {"t.npz": "not read"},
        ["compress", "digits-cnn", "--rank", "4", "--train-data", "t.npz", "--refit-steps", "0"]
        + ["--refit-segment-steps", "0", "--finetune-device", "cpu", *COMMON],
        "--finetune-device (finetune.device) is read by the refit's steps and the fine-tuning",
    ),
    (
        "stem-output-without-auto",
        {"t.npz": "not read"},
        ["compress", "digits-cnn", "--rank", "4", "--quantize", "int8", "--train-data", "t.npz"]
        + ["--float-layers", "none", "--quant-stem-output", *COMMON],
        "--quant-stem-output quantizes the last stage of a factorized first conv that 'auto' "
        "keeps float, and --float-layers has no 'auto'",
    ),
    (
        "validate-eval-limit-without-data",
        {"model.onnx": "ONNX"},
        ["validate", "model.onnx", "--eval-limit", "10"],
        "--eval-limit is read with --eval-data; add it or drop --eval-limit",
    ),
    (
        "leaf-naming-no-module",
        {},
        ["compress", "digits-cnn", "--rank", "4", "--leaf", "conv*", *COMMON],
        "--leaf conv* names no module of DigitsCNN (it takes dotted module names, not globs)",
    ),
    (
        "plan-with-a-layer-twice",
        {"plan.json": "PLAN+conv2"},
        ["compress", "digits-cnn", "--plan", "plan.json", *COMMON],
        "the plan names layers ['conv2'] more than once; keep one entry per layer",
    ),
    (
        "plan-with-a-text-rank",
        {"plan.json": 'PLAN:ranks=["four"]'},
        ["compress", "digits-cnn", "--plan", "plan.json", *COMMON],
        "is not a valid rankfold plan (layers.1.ranks.0: Input should be a valid integer",
    ),
    # Each a setting that nothing in the run reads: refused, not silently ignored.
    (
        "int8-setting-without-int8",
        {},
        ["compress", "digits-cnn", "--rank", "4", "--quant-samples", "64", *COMMON],
        "--quant-samples (quantize.samples) is read by INT8 quantization; add --quantize int8 "
        "or drop --quant-samples",
    ),
    (
        "pars-setting-under-another-selector",
        {},
        ["compress", "digits-cnn", "--macs-reduction", "2", "--trials", "5", *COMMON],
        "--trials (search.trials) is read by --select pars, not --select energy; add --select "
        "pars or drop --trials",
    ),
    (
        "timing-setting-without-timing",
        {},
        ["compress", "digits-cnn", "--rank", "4", "--repeats", "3", *COMMON],
        "--repeats (latency.repeats) is read by the latency measurement and a latency "
        "budget's calibration, both off here",
    ),
    (
        "resume-without-fine-tuning",
        {},
        ["compress", "digits-cnn", "--rank", "4", "--resume", *COMMON],
        "--resume (resume) is read by the fine-tuning; add --finetune-epochs N or drop --resume",
    ),
    (
        "eval-limit-without-eval-data",
        {},
        ["compress", "digits-cnn", "--rank", "4", "--eval-limit", "10", *COMMON],
        "--eval-limit (eval_limit) is read by the evaluation; add --eval-data or drop --eval-limit",
    ),
    (
        "round-to-without-a-budget",
        {},
        ["compress", "digits-cnn", "--rank", "4", "--round-to", "8", *COMMON],
        "--round-to (ranks.round_to) is read by a budget's planning and the latency gate",
    ),
    (
        "rel-error-without-error-selector",
        {},
        ["compress", "digits-cnn", "--macs-reduction", "2", "--rel-error", "0.2", *COMMON],
        "is read by --select error only",
    ),
    (
        "data-aware-setting-without-data",
        {},
        ["compress", "digits-cnn", "--macs-reduction", "2", "--damping", "0.1", *COMMON],
        "statistics.damping is read by data-aware fits and --select output, but they need "
        "--train-data",
    ),
    (
        "stats-samples-read-by-nothing",
        {"t.npz": "not read"},
        [
            "compress",
            "digits-cnn",
            "--macs-reduction",
            "2",
            "--train-data",
            "t.npz",
            "--no-refit",
            "--stats-samples",
            "64",
            *COMMON,
        ],
        "statistics.samples is read by data-aware fits and the last-stage refit, but they need "
        "--data-aware or --refit",
    ),
    (
        "refit-steps-without-the-refit",
        {"t.npz": "not read"},
        [
            "compress",
            "digits-cnn",
            "--macs-reduction",
            "2",
            "--train-data",
            "t.npz",
            "--no-refit",
            "--refit-steps",
            "50",
            *COMMON,
        ],
        "--refit-steps (refit_steps) is read by the refit, which needs --refit",
    ),
    (
        "refit-steps-without-data",
        {},
        ["compress", "digits-cnn", "--macs-reduction", "2", "--refit-steps", "0", *COMMON],
        "--refit-steps (refit_steps) is read by the refit, which needs --train-data",
    ),
    (
        "refit-memory-without-data",
        {},
        ["compress", "digits-cnn", "--macs-reduction", "2", "--refit-memory-mb", "64", *COMMON],
        "--refit-memory-mb (refit_memory_mb) is read by the refit and bias correction, which "
        "need --train-data",
    ),
    (
        "validation-without-fine-tuning",
        {"t.npz": "not read"},
        [
            "compress",
            "digits-cnn",
            "--macs-reduction",
            "2",
            "--train-data",
            "t.npz",
            "--validation",
            "0.1",
            *COMMON,
        ],
        "--validation (finetune.validation) is read by the fine-tuning, which runs with "
        "--finetune-epochs N; add it or drop --validation",
    ),
    (
        "optimizer-without-fine-tuning",
        {},
        ["compress", "digits-cnn", "--macs-reduction", "2", "--optimizer", "adamw", *COMMON],
        "--optimizer (finetune.optimizer) is read by the fine-tuning, which runs with "
        "--finetune-epochs N",
    ),
    (
        "no-amp-without-fine-tuning-or-refit-steps",
        {"t.npz": "not read"},
        [
            "compress",
            "digits-cnn",
            "--macs-reduction",
            "2",
            "--train-data",
            "t.npz",
            "--refit-steps",
            "0",
            "--no-amp",
            *COMMON,
        ],
        "--amp/--no-amp (finetune.amp) is read by the fine-tuning and the refit's Adam steps, "
        "which run with --finetune-epochs N or with --train-data and --refit-steps above 0; add "
        "one or drop --amp/--no-amp",
    ),
    (
        "no-distill-without-fine-tuning",
        {},
        ["compress", "digits-cnn", "--macs-reduction", "2", "--no-distill", *COMMON],
        "--distill/--no-distill (finetune.distill) is read by the fine-tuning",
    ),
    (
        "recalibrate-samples-without-recalibration",
        {"t.npz": "not read"},
        [
            "compress",
            "digits-cnn",
            "--macs-reduction",
            "2",
            "--train-data",
            "t.npz",
            "--no-recalibrate",
            "--recalibrate-samples",
            "512",
            *COMMON,
        ],
        "--recalibrate-samples is read by BatchNorm recalibration, which needs --recalibrate",
    ),
    (
        "recalibrate-samples-without-data",
        {},
        [
            "compress",
            "digits-cnn",
            "--macs-reduction",
            "2",
            "--recalibrate-samples",
            "512",
            *COMMON,
        ],
        "--recalibrate-samples is read by BatchNorm recalibration, which needs --train-data",
    ),
    (
        "refit-segment-steps-without-data",
        {},
        ["compress", "digits-cnn", "--macs-reduction", "2", "--refit-segment-steps", "50", *COMMON],
        "--refit-segment-steps (refit_segment_steps) is read by the refit, which needs "
        "--train-data",
    ),
    (
        "bench-missing-baseline",
        {"model.onnx": "ONNX"},
        ["bench", "model.onnx", "--baseline", "nothere.onnx"],
        "nothere.onnx not found",
    ),
    (
        "bench-garbage-baseline",
        {"model.onnx": "ONNX", "junk.onnx": b"RANDOM"},
        ["bench", "model.onnx", "--baseline", "junk.onnx"],
        "junk.onnx is not a readable ONNX model",
    ),
    (
        "bench-shape-mismatched-baseline",
        {"model.onnx": "ONNX", "other.onnx": "ONNX3"},
        ["bench", "model.onnx", "--baseline", "other.onnx"],
        "--baseline other.onnx takes inputs of shape (3, 8, 8) but model.onnx takes (1, 8, 8)",
    ),
    (
        "bench-baseline-of-another-model",
        {"model.onnx": "ONNX", "other.onnx": "ONNX8"},
        ["bench", "model.onnx", "--baseline", "other.onnx"],
        "--baseline other.onnx has outputs of shapes [(288,)] but model.onnx [(144,)]",
    ),
    (
        "unknown-selector",
        {},
        ["compress", "digits-cnn", "--select", "vbfm", "--macs-reduction", "2", *COMMON],
        "unknown rank selector 'vbfm' (did you mean 'vbmf'?)",
    ),
    (
        "unknown-method",
        {},
        ["compress", "digits-cnn", "--method", "tuker2", "--rank", "4", *COMMON],
        "unknown method 'tuker2' (did you mean 'tucker2'?)",
    ),
]


def _materialise(folder: Path, files: dict[str, object], plan: dict) -> None:
    for name, content in files.items():
        path = folder / name
        if content in ("ONNX", "ONNX3", "ONNX8"):
            channels = 3 if content == "ONNX3" else 1
            width = 8 if content == "ONNX8" else 4  # ONNX8: another model's outputs
            model = nn.Sequential(nn.Conv2d(channels, width, 3), nn.Flatten()).eval()
            export_onnx(model, torch.zeros(1, channels, 8, 8), path)
        elif isinstance(content, bytes):
            path.write_bytes(np.random.default_rng(0).bytes(4096))
        elif isinstance(content, str) and content.startswith("PLAN"):
            edited = json.loads(json.dumps(plan))
            if ":" in content:
                key, _, value = content.partition(":")[2].partition("=")
                entry = next(e for e in edited["layers"] if e["name"] == "conv2")
                entry[key] = json.loads(value) if value.startswith("[") else value
            if content == "PLAN+conv2":  # conv2's entry twice
                edited["layers"].append(next(e for e in edited["layers"] if e["name"] == "conv2"))
            path.write_text(json.dumps(edited))
        else:
            path.write_text(content)


@pytest.fixture(scope="module")
def cp_plan(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("plan")
    result = runner.invoke(
        app,
        ["compress", "digits-cnn", "--method", "cp", "--rank", "4", "--no-latency", "--out",
         str(folder)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return json.loads((folder / "plan.json").read_text())


@pytest.mark.parametrize(
    ("files", "args", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_catalogue(files, args, message, cp_plan, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _materialise(tmp_path, files, cp_plan)
    result = runner.invoke(app, args)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1, result.output
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "model.onnx").exists()  # refused before writing anything


def test_an_optional_forward_argument_is_traced_at_its_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.py").write_text(USER_MODELS)
    result = runner.invoke(app, ["compress", "m.py:optional", "--rank", "4", *COMMON])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["onnx"]["parity_passed"] and report["macs_reduction"] > 1


def test_a_user_model_restores_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.py").write_text(USER_MODELS)
    assert runner.invoke(app, ["compress", "m.py:optional", "--rank", "4", *COMMON]).exit_code == 0
    code = "from rankfold.converter import restore; print(type(restore(%r)).__name__)"
    done = subprocess.run(
        [sys.executable, "-c", code % str(tmp_path / "out")],
        cwd=Path("/"),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and done.stdout.strip() == "GraphModule", done.stderr


def test_a_failed_rerun_leaves_the_previous_run_intact(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = runner.invoke(app, ["compress", "digits-cnn", "--rank", "4", *COMMON])
    assert first.exit_code == 0, first.output
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}

    def full_disk(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("rankfold.converter.pipeline.export_as_deployed", full_disk)
    second = runner.invoke(app, ["compress", "digits-cnn", "--rank", "2", *COMMON])
    assert second.exit_code == 1
    assert "No space left on device" in second.output and "previous run" in second.output
    after = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    assert after == before
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".rankfold")] == []


def test_validate_does_not_compare_original_onnx_with_the_compressed_weights(tmp_path):
    out = tmp_path / "out"
    args = ["compress", "digits-cnn", "--rank", "4", "--no-latency", "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, ["validate", str(out / "original.onnx")])
    assert result.exit_code == 0, result.output
    assert "parity: skipped" in result.output and "parity_passed" not in result.output


def test_parity_tolerance_scales_with_the_outputs(tmp_path):
    """Logits of order 1e5 differ by float32 rounding (~1e-2) however right the export is."""
    torch.manual_seed(0)
    exported = nn.Linear(64, 10).eval()
    with torch.no_grad():
        exported.weight.mul_(1e4)
    export_onnx(exported, torch.zeros(1, 64), tmp_path / "m.onnx")
    drifted = nn.Linear(64, 10).eval()
    drifted.load_state_dict(exported.state_dict())
    with torch.no_grad():
        drifted.weight.mul_(1 + 1e-7)  # the size of float32 rounding
    x = torch.randn(16, 64)
    absolute = check_parity(drifted, tmp_path / "m.onnx", x, atol=1e-4)
    scaled = check_parity(drifted, tmp_path / "m.onnx", x, atol=1e-4, rtol=1e-5)
    assert not absolute.passed and absolute.max_rel_diff < 1e-5
    assert scaled.passed and scaled.max_abs_diff == absolute.max_abs_diff


def test_interrupting_a_rerun_keeps_the_previous_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert runner.invoke(app, ["compress", "digits-cnn", "--rank", "4", *COMMON]).exit_code == 0
    before = (tmp_path / "out" / "report.json").read_bytes()

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("rankfold.converter.pipeline.validate", interrupted)
    result = runner.invoke(app, ["compress", "digits-cnn", "--rank", "2", *COMMON])
    assert result.exit_code == 130
    assert "still holds its previous complete run" in result.output
    assert "--resume" not in result.output  # nothing was fine-tuned: nothing to resume
    assert (tmp_path / "out" / "report.json").read_bytes() == before
    assert not (tmp_path / "out" / "plan.json").read_text().count('"ranks": [\n        2')
    assert os.listdir(tmp_path / "out").count("report.json") == 1


def test_random_and_bit_flipped_checkpoints_are_one_line_errors(data_dir, tmp_path):
    """Fuzz the checkpoint reader: 150 random files and 150 real ResNet-20 checkpoints with 1-7
    flipped bits either load or raise ModelLoadError, never another exception."""
    from rankfold.models import load_model
    from rankfold.passes.core import ModelLoadError

    rng = np.random.default_rng(0)
    real = (data_dir / "weights" / "resnet20-12fca82f.th").read_bytes()
    path = tmp_path / "w.th"
    refused = 0
    for i in range(300):
        if i < 150:
            data = rng.bytes(int(rng.integers(1, 8192)))
        else:
            flipped = bytearray(real)
            for _ in range(int(rng.integers(1, 8))):
                flipped[int(rng.integers(0, len(flipped)))] ^= 1 << int(rng.integers(0, 8))
            data = bytes(flipped)
        path.write_bytes(data)
        try:
            load_model("resnet20", path)
        except ModelLoadError as exc:
            assert "\n" not in str(exc) and "w.th" in str(exc)
            refused += 1
    assert refused >= 150  # every random file at least


def test_functional_convs_are_counted_and_reported(tmp_path, monkeypatch):
    """A conv called as F.conv2d costs MACs the plan cannot remove: the reduction says so."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f.py").write_text(
        USER_MODELS
        + """

class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.kernel = nn.Parameter(torch.randn(16, 16, 3, 3) * 0.1)
        self.fc = nn.Linear(16, 4)
        self.register_buffer("average", torch.ones(16, 1, 2, 2) / 4)

    def forward(self, x):
        h = torch.nn.functional.conv2d(self.conv(x), self.kernel, padding=1)
        h = torch.nn.functional.conv2d(h, self.average, stride=2, groups=16)
        return self.fc(h.mean((2, 3)))


def functional():
    return Functional()
"""
    )
    result = runner.invoke(app, ["compress", "f.py:functional", "--rank", "2", *COMMON])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    functional = report["original"]["functional_macs"]
    fixed = "average (fixed kernel: a buffer, not a parameter)"
    assert functional == {"conv2d": 8 * 8 * 16 * 16 * 9, fixed: 4 * 4 * 16 * 4}
    modules = sum(row["original_macs"] for row in report["layers"])
    assert report["original"]["macs"] == modules + sum(functional.values())
    after = sum(row["macs"] for row in report["layers"]) + sum(functional.values())
    assert report["macs_reduction"] == pytest.approx(report["original"]["macs"] / after)
    # Only the conv on a parameter is sent to be made a module; the buffer's is explained.
    assert "not decomposable: 1 functional call(s) counted in the MACs (conv2d 147,456)" in (
        result.output
    )
    assert "fixed kernels: functional calls on buffers, not parameters, counted in the MACs " in (
        result.output
    )
    assert "(average 1,024); nothing trained there to decompose" in result.output


def test_resume_with_other_settings_fails_before_any_work(tmp_path, monkeypatch):
    from rankfold.models.digits import digits_splits

    monkeypatch.chdir(tmp_path)
    train, _ = digits_splits()
    np.savez(tmp_path / "train.npz", x=train.x[:256], y=train.y[:256])
    args = ["compress", "digits-cnn", "--rank", "4", "--train-data", "train.npz", *COMMON]
    first = runner.invoke(app, [*args, "--finetune-epochs", "1", "--lr", "0.01"])
    assert first.exit_code == 0, first.output
    planned = []
    monkeypatch.setattr(
        "rankfold.converter.pipeline.select_ranks",
        lambda *a, **k: planned.append(a) or (_ for _ in ()).throw(AssertionError("planned")),
    )
    again = runner.invoke(app, [*args, "--finetune-epochs", "1", "--lr", "0.05", "--resume"])
    assert again.exit_code == 1 and planned == []
    assert "was made with other settings: lr=0.01 (now 0.05)" in again.output


def test_an_unexpected_error_is_one_line_and_its_traceback_is_behind_debug(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RANKFOLD_DEBUG", raising=False)

    def bug(*_args, **_kwargs):
        raise TypeError("boom\nsecond line")

    monkeypatch.setattr("rankfold.converter.pipeline.validate", bug)
    args = ["compress", "digits-cnn", "--rank", "4", *COMMON]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "error: internal error (TypeError: boom); rerun with `rankfold --debug" in result.output
    debugged = runner.invoke(app, ["--debug", *args])
    assert isinstance(debugged.exception, TypeError)
    monkeypatch.delenv("RANKFOLD_DEBUG", raising=False)
