"""The rank search's calibration data, built from a training set (passes never read datasets)."""

from __future__ import annotations

import numpy as np
import torch

from rankfold.models import ImageData, ModelSpec, normalize, training_batches
from rankfold.models.data import Augment, read_groups
from rankfold.passes.search import Calibration


def calibration_from_dataset(
    data: ImageData,
    spec: ModelSpec,
    samples: int = 1024,
    bn_samples: int = 512,
    batch_size: int = 128,
    seed: int = 0,
    augment: Augment = "auto",
) -> Calibration:
    """The first `bn_samples` images recalibrate, the next `samples` score the proxy.

    The recalibration images are augmented as fine-tuning augments them (`training_batches`,
    seeded by `seed`), so the proxy re-estimates BatchNorm as the product does; the scoring images
    stay clean, like the test images the proxy stands in for. A dataset smaller than both together
    is shared: the first `bn_samples` recalibrate, the last `samples` score.
    """
    n = len(data)
    proxy = (
        np.arange(bn_samples, bn_samples + samples)
        if n >= samples + bn_samples
        else np.arange(max(n - samples, 0), n)
    )
    recalibration = training_batches(data.subset(bn_samples), spec, batch_size, augment, seed)
    parts = [proxy[start : start + batch_size] for start in range(0, len(proxy), batch_size)]
    images, labels = zip(*((x, y) for x, y, _ in read_groups(data, parts)), strict=True)
    return Calibration(
        inputs=normalize(np.concatenate(images), spec),
        labels=torch.from_numpy(np.concatenate(labels)),
        bn_inputs=torch.cat(list(recalibration)),
        batch_size=batch_size,
    )
