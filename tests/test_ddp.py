"""Two CPU processes under torchrun (gloo) train to the single-process result on the same data."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


def _worker_module():
    spec = importlib.util.spec_from_file_location("rankfold_ddp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torchrun(*args: str) -> subprocess.CompletedProcess:
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
        str(WORKER),
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
