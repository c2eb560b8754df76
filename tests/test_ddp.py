"""Two CPU processes under torchrun (gloo): fine-tuning trains to the single-process result on the
same data, and `rankfold compress` compresses once, on rank 0, and fine-tunes on both."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import rankfold.converter.finetune as finetune_module
from rankfold.converter.cli import app
from rankfold.converter.pipeline import restore
from rankfold.models import load_model, normalize
from rankfold.models.digits import DigitsCNN, digits_splits

WORKER = Path(__file__).with_name("ddp_worker.py")


def _worker_module():
    spec = importlib.util.spec_from_file_location("rankfold_ddp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torchrun(*args: str, script: str | Path = WORKER) -> subprocess.CompletedProcess:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        *(["--no-python"] if script == "rankfold" else []),
        str(Path(sys.executable).with_name("rankfold") if script == "rankfold" else script),
        *args,
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT of one torchrun launch: OUT/uninterrupted (rank0.pt, rank1.pt, checkpoints/) and
    OUT/resumed (a run killed mid-epoch, its checkpoint at the kill as killed.pt, then resumed)."""
    out = tmp_path_factory.mktemp("ddp")
    launch = _torchrun(str(out))
    if launch.returncode != 0:
        pytest.fail(f"torchrun failed ({launch.returncode}):\n{launch.stderr[-3000:]}")
    return out


def test_two_process_ddp_equals_single_process(launched: Path, tmp_path: Path) -> None:
    uninterrupted = launched / "uninterrupted"
    worker = _worker_module()
    single, single_result = worker.run(tmp_path / "single")
    ranks = [torch.load(uninterrupted / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    # Both ranks end with identical weights (DDP keeps them in step; buffers come from rank 0).
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    # Equal to one process on the same global batches, up to float32 summation order.
    for key, value in single.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][key], value, atol=1e-5, rtol=1e-4)
    initial = worker.make_model(0).state_dict()
    moved = max(
        float((value - initial[key]).abs().max()) for key, value in single.state_dict().items()
    )
    assert moved > 1e-2  # training really changed the weights, so the comparison means something
    for ddp_row, row in zip(ranks[0]["history"], single_result.history, strict=True):
        assert ddp_row["loss"] == pytest.approx(row["loss"], rel=1e-4)
        assert ddp_row["train_accuracy"] == pytest.approx(row["train_accuracy"], abs=1e-9)
        assert ddp_row["eval_accuracy"] == pytest.approx(row["eval_accuracy"], abs=1e-9)
        assert ddp_row["lr"] == pytest.approx(row["lr"], rel=1e-12)
    # Only rank 0 wrote checkpoints, atomically (no temporary files left behind).
    written = sorted(p.name for p in (uninterrupted / "checkpoints").iterdir())
    assert written == ["finetune_last.pt"]


def test_resume_mid_epoch_under_torchrun_equals_uninterrupted(launched: Path) -> None:
    # 5 steps per epoch, a checkpoint every 2: killed during step 8 (epoch 2, step 3), the run
    # resumed from epoch 2's step-2 checkpoint and replayed step 3 onwards, in the same ranks.
    resumed, uninterrupted = launched / "resumed", launched / "uninterrupted"
    checkpoint = torch.load(resumed / "killed.pt", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["step"]) == (1, 2)
    expected = torch.load(uninterrupted / "rank0.pt", weights_only=True)
    for rank in (0, 1):
        got = torch.load(resumed / f"rank{rank}.pt", weights_only=True)
        # Same processes, same sample order and draws: equal up to float32 summation order.
        for key, value in expected["state"].items():
            torch.testing.assert_close(got["state"][key], value, atol=1e-6, rtol=1e-6)
        for row, reference in zip(got["history"], expected["history"], strict=True):
            assert row["loss"] == pytest.approx(reference["loss"], rel=1e-6)
            assert row["train_accuracy"] == pytest.approx(reference["train_accuracy"], abs=1e-9)
            assert row["lr"] == pytest.approx(reference["lr"], rel=1e-12)


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits.pt (an untrained DigitsCNN), train.npz and test.npz."""
    folder = tmp_path_factory.mktemp("digits")
    torch.manual_seed(0)
    torch.save(DigitsCNN().state_dict(), folder / "digits.pt")
    for name, split in zip(("train", "test"), digits_splits(), strict=True):
        np.savez(folder / f"{name}.npz", x=split.x, y=split.y)
    return folder


def _torchrun_compress(files: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    return _torchrun(
        "compress", "digits-cnn", "--weights", str(files / "digits.pt"), "--method", "cp",
        "--train-data", str(files / "train.npz"), "--eval-data", str(files / "test.npz"),
        "--finetune-epochs", "1", "--no-latency", "--out", str(out), *options, script="rankfold",
    )  # fmt: skip


def test_compress_under_torchrun_compresses_on_rank_zero_and_writes_once(
    digits_files: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    launch = _torchrun_compress(digits_files, out, "--macs-reduction", "2")
    assert launch.returncode == 0, launch.stderr[-3000:]
    log = launch.stdout + launch.stderr
    # One decomposition, refit and recalibration (rank 0's), one summary: rank 1 only trained.
    for bar in ("decompose", "refit blocks", "recalibrate BatchNorm"):
        assert len(re.findall(rf"^{bar} ", log, flags=re.MULTILINE)) == 1, (bar, log[-3000:])
    assert log.count("wrote ") == 1
    report = json.loads((out / "report.json").read_text())
    assert len(report["recovery"]["finetune"]["history"]) == 1
    finetuned = report["recovery"]["finetune"]
    assert finetuned["processes"] == 2
    # bfloat16 autocast on a CPU with AMX, float32 elsewhere; the line says which.
    native = finetune_module.native_bfloat16_cpu()
    assert finetuned["precision"] == ("bfloat16 autocast" if native else "float32")
    precision = ", bfloat16 autocast" if native else ""
    assert f"fine-tuning on cpu{precision} in 2 processes" in log
    # model.pt holds the fine-tuned model the report scored.
    restored = restore(out, load_model("digits-cnn", digits_files / "digits.pt", None)[0])
    spec = load_model("digits-cnn", None, None)[1]
    test = np.load(digits_files / "test.npz")
    with torch.no_grad():
        predicted = restored(normalize(test["x"], spec)).argmax(1).numpy()
    accuracy = float((predicted == test["y"]).mean())
    assert accuracy == pytest.approx(report["compressed"]["accuracy_finetuned"], abs=1e-9)
    assert report["compressed"]["accuracy_finetuned"] != report["compressed"]["accuracy_decomposed"]


def test_rank_zero_failing_before_the_handoff_stops_the_other_ranks(
    digits_files: Path, tmp_path: Path
) -> None:
    # The plan fails on rank 0 alone (the other ranks do not plan): they hear why, not hang.
    launch = _torchrun_compress(digits_files, tmp_path / "out", "--macs-reduction", "1000")
    assert launch.returncode != 0
    assert "error: 1000× macs reduction is impossible" in launch.stderr
    assert "error: rank 0 stopped before fine-tuning: 1000× macs reduction is impossible" in (
        launch.stderr
    )


def test_torchrun_without_finetuning_is_a_one_line_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    result = CliRunner().invoke(
        app, ["compress", "digits-cnn", "--macs-reduction", "2", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1
    assert "only fine-tuning runs in several; pass --finetune-epochs N" in result.output
    assert not (tmp_path / "o" / "report.json").exists()
