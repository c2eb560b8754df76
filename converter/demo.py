"""`rankfold demo`: the whole pipeline offline on scikit-learn's digits, in under 3 minutes.

Train a CNN on the digits upscaled to 32×32 (96–192-channel convs: large enough that saved MACs
become saved time in onnxruntime), compress it with Tucker-2 (the latency gate keeping whole any
layer whose block is not faster), recalibrate BatchNorm and fine-tune with distillation, export,
validate. It goes through the same files a user would: the checkpoint and the data splits are
written to the output folder and read back by the normal `compress` path.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from rankfold.converter.config import CompressConfig, LatencyConfig
from rankfold.converter.finetune import FinetuneConfig
from rankfold.converter.pipeline import prepare_output_dir, run_compress
from rankfold.converter.results import Report
from rankfold.converter.ui import progress_bar
from rankfold.models.digits import DEMO_SCALE, digits_splits, train_digits_cnn
from rankfold.passes.core import atomic_path, atomic_write_bytes
from rankfold.passes.plan import RankPolicy

# Fine-tuning rate of the demo: after BatchNorm recalibration the blocks are close already, and a
# higher rate with few epochs leaves the weights noisier than it found them.
DEMO_LR = 3e-3


def run_demo(
    out_dir: str | Path,
    epochs: int = 3,
    method: str = "tucker2",
    macs_reduction: float = 3.0,
    finetune_epochs: int = 2,
    latency_gate: bool = True,
    threads: list[int] | None = None,
) -> Report:
    out = prepare_output_dir(out_dir)
    train, test = digits_splits(scale=DEMO_SCALE)
    with progress_bar("train digits32-cnn", total=epochs) as advance:
        model = train_digits_cnn(
            epochs=epochs, progress=lambda epoch, acc: advance(f"train acc {acc:.1%}"), demo=True
        )
    weights = out / "digits32-cnn.pt"
    with atomic_path(weights) as tmp:
        torch.save(model.state_dict(), tmp)
    train_file, test_file = out / "digits_train.npz", out / "digits_test.npz"
    for path, split in ((train_file, train), (test_file, test)):
        buffer = io.BytesIO()
        np.savez(buffer, x=split.x, y=split.y)
        atomic_write_bytes(path, buffer.getvalue())
    config = CompressConfig(
        model="digits32-cnn",
        weights=weights,
        eval_data=test_file,
        train_data=train_file,
        ranks=RankPolicy(method=method, macs_reduction=macs_reduction),
        finetune=FinetuneConfig(epochs=finetune_epochs, lr=DEMO_LR, batch_size=64)
        if finetune_epochs
        else FinetuneConfig(epochs=0),
        # Where onnxruntime's per-node cost outweighs a layer's saved MACs, the gate keeps the
        # layer whole, so the deployed model is faster, not only smaller.
        latency=LatencyConfig(batch=[1, 32], gate=latency_gate, threads=threads),
    )
    return run_compress(config, out).report
