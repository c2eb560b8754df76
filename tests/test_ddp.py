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
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT of one uninterrupted 2-process run (rank0.pt, rank1.pt, checkpoints/)."""
    out = tmp_path_factory.mktemp("ddp")
    launched = _torchrun(str(out))
    if launched.returncode != 0:
        pytest.fail(f"torchrun failed ({launched.returncode}):\n{launched.stderr[-3000:]}")
    return out


def test_two_process_ddp_equals_single_process(uninterrupted: Path, tmp_path: Path) -> None:
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


def test_resume_mid_epoch_under_torchrun_equals_uninterrupted(
    uninterrupted: Path, tmp_path: Path
) -> None:
    # 5 steps per epoch, a checkpoint every 2: killed during step 8 (epoch 2, step 3), the run
    # resumes from epoch 2's step-2 checkpoint and replays step 3 onwards.
    killed = _torchrun(str(tmp_path), "2", "7")
    assert killed.returncode != 0 and not (tmp_path / "rank0.pt").exists()
    checkpoint = torch.load(tmp_path / "checkpoints" / "finetune_last.pt", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["step"]) == (1, 2)
    resumed = _torchrun(str(tmp_path), "2", "resume")
    if resumed.returncode != 0:
        pytest.fail(f"resumed torchrun failed:\n{resumed.stderr[-3000:]}")
    expected = torch.load(uninterrupted / "rank0.pt", weights_only=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        # Same processes, same sample order and draws: equal up to float32 summation order.
        for key, value in expected["state"].items():
            torch.testing.assert_close(got["state"][key], value, atol=1e-6, rtol=1e-6)
        for row, reference in zip(got["history"], expected["history"], strict=True):
            assert row["loss"] == pytest.approx(reference["loss"], rel=1e-6)
            assert row["train_accuracy"] == pytest.approx(reference["train_accuracy"], abs=1e-9)
            assert row["lr"] == pytest.approx(reference["lr"], rel=1e-12)
