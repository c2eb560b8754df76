"""Fine-tune a small BatchNorm-free model; run by tests/test_ddp.py under torchrun and in-process.

Usage: python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py OUT
(see the main block for what it writes). The model has no BatchNorm
because under DDP each rank normalizes with its own shard's statistics (SyncBatchNorm needs
GPUs), which would make two-process training legitimately differ from one process.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from rankfold.converter.finetune import FinetuneConfig, FinetuneResult, finetune
from rankfold.models import ArrayDataset, ModelSpec

SPEC = ModelSpec(
    name="ddp-tiny", input_shape=(3, 10, 10), num_classes=3, mean=(0.5,) * 3, std=(0.25,) * 3
)
# 99 examples in global batches of 24: the last batch (3) splits unevenly over two ranks (2 + 1).
# float32 (no bfloat16 autocast on a CPU with AMX): the runs are compared to 1e-5.
CONFIG = FinetuneConfig(epochs=2, batch_size=24, lr=0.05, augment="cifar", amp=False)


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    ).eval()


def make_data(n: int, seed: int) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.integers(0, 150, size=(n, 3, 10, 10))
    for c in range(3):
        x[:, c] += np.where(y == c, 100, 0)[:, None, None]
    return ArrayDataset(x.astype(np.uint8), y)


def run(
    checkpoint_dir: Path, config: FinetuneConfig = CONFIG, resume: bool = False
) -> tuple[nn.Module, FinetuneResult]:
    """The same training in one process or under torchrun: student, teacher and data fixed."""
    student, teacher = make_model(0), make_model(1)
    result = finetune(
        student,
        teacher,
        make_data(99, 0),
        SPEC,
        config,
        checkpoint_dir,
        eval_data=make_data(31, 1),  # odd: the ranks score 16 and 15 examples
        resume=resume,
        seed=7,
    )
    return student, result


def stop_after(steps: int) -> None:
    """Make the run die (as if killed) when it is about to compute step `steps` + 1's loss."""
    module = sys.modules["rankfold.converter.finetune"]
    original, calls = module.kd_loss, [0]

    def counting(*args, **kwargs):
        calls[0] += 1
        if calls[0] > steps:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    module.kd_loss = counting


def kill_and_resume(out: Path) -> None:
    """Into `out`: a run that checkpoints every 2 steps dies during step 8 (as if killed), its
    last checkpoint is kept as killed.pt, then a fresh model resumes from it."""
    config = CONFIG.model_copy(update={"checkpoint_every": 2})
    module = sys.modules["rankfold.converter.finetune"]
    original = module.kd_loss
    stop_after(7)
    try:
        run(out / "checkpoints", config)
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the run was not interrupted")
    finally:
        module.kd_loss = original
    if int(os.environ["RANK"]) == 0:
        shutil.copyfile(out / "checkpoints" / "finetune_last.pt", out / "killed.pt")
    save(out, *run(out / "checkpoints", config, resume=True))


def save(out: Path, model: nn.Module, outcome: FinetuneResult) -> None:
    rank = int(os.environ["RANK"])
    torch.save({"state": model.state_dict(), "history": outcome.history}, out / f"rank{rank}.pt")


if __name__ == "__main__":
    # OUT: an uninterrupted run into OUT/uninterrupted, then kill_and_resume into OUT/resumed,
    # all in one launch (each torchrun start pays seconds of imports per process). Each rank
    # saves its final weights and history to rank<r>.pt.
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    for folder in ("uninterrupted", "resumed"):
        (out / folder).mkdir(exist_ok=True)
    # finetune creates (from torchrun's environment) and destroys its own process group here.
    save(out / "uninterrupted", *run(out / "uninterrupted" / "checkpoints"))
    # Then both later runs join one group of ours: re-creating a group on torchrun's store
    # hangs, so this one rendezvous through a fresh file store.
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out / 'store'}",
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
    )
    kill_and_resume(out / "resumed")
    dist.destroy_process_group()
