"""`rankfold demo`: the whole pipeline offline on scikit-learn's digits, in well under 3 minutes.

It goes through the same files a user would: the trained checkpoint and the test split are
written to the output folder and read back by the normal `compress` path.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rankfold.converter.config import CompressConfig, LatencyConfig
from rankfold.converter.pipeline import prepare_output_dir, run_compress
from rankfold.converter.ui import progress_bar
from rankfold.models.digits import digits_splits, train_digits_cnn
from rankfold.passes.plan import RankPolicy
from rankfold.runtime.files import atomic_path, atomic_write_bytes


def run_demo(
    out_dir: str | Path, epochs: int = 8, method: str = "tucker2", macs_reduction: float = 2.0
) -> dict[str, Any]:
    out = prepare_output_dir(out_dir)
    _, test = digits_splits()
    with progress_bar("train digits-cnn", total=epochs) as advance:
        model = train_digits_cnn(
            epochs=epochs, progress=lambda epoch, acc: advance(f"train acc {acc:.1%}")
        )
    weights = out / "digits-cnn.pt"
    with atomic_path(weights) as tmp:
        torch.save(model.state_dict(), tmp)
    test_file = out / "digits_test.npz"
    buffer = io.BytesIO()
    np.savez(buffer, x=test.x, y=test.y)
    atomic_write_bytes(test_file, buffer.getvalue())
    config = CompressConfig(
        model="digits-cnn",
        weights=weights,
        eval_data=test_file,
        ranks=RankPolicy(method=method, macs_reduction=macs_reduction),
        latency=LatencyConfig(batch=[1, 32]),
    )
    return run_compress(config, out).report
