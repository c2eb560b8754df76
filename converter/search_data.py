"""Data the passes read, built from a training set (passes never read datasets): the rank
search's calibration data and the layer statistics of data-aware fits."""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import fx

from rankfold.converter.ui import progress_bar
from rankfold.models import ImageData, ModelSpec, batches, normalize, training_batches
from rankfold.models.data import Augment, read_groups
from rankfold.passes import ModelAnalysis
from rankfold.passes.search import Calibration, DecompositionCache
from rankfold.passes.statistics import (
    LayerStatistics,
    collect_statistics,
    statistics_key,
    statistics_layers,
)


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


@dataclass
class StatisticsRun:
    statistics: LayerStatistics
    seconds: float
    from_cache: bool


def layer_statistics(
    gm: fx.GraphModule,
    analysis: ModelAnalysis,
    data: ImageData,
    spec: ModelSpec,
    samples: int,
    damping: float,
    memory_mb: int,
    cache_dir: str | Path,
    batch_size: int = 128,
) -> StatisticsRun:
    """Input second moments of every layer a method can decompose, on the first `samples`
    images, clean (the distribution the model is used on); kept in the decomposition cache's
    folder, keyed by the model's tensors, the layers and the images."""
    start = time.perf_counter()
    images = data.subset(samples)
    single = [layer.name for layer in analysis.layers if layer.calls == 1]
    names = list(statistics_layers(gm, single))
    h = hashlib.sha256(images.fingerprint().encode())
    h.update(f"{images.image_shape}{spec.mean}{spec.std}".encode())
    key = statistics_key(gm, names, h.hexdigest())
    store = DecompositionCache(cache_dir)
    found = store.load_statistics(key, damping)
    if found is not None:
        return StatisticsRun(found, time.perf_counter() - start, True)
    with progress_bar("layer statistics", total=math.ceil(len(images) / batch_size)) as advance:
        statistics = collect_statistics(
            gm,
            names,
            (x for x, _ in batches(images, spec, batch_size)),
            images=len(images),
            damping=damping,
            memory_bytes=memory_mb << 20,
            progress=advance,
        )
    store.store_statistics(key, statistics)
    return StatisticsRun(statistics, time.perf_counter() - start, False)
