"""CNNs for scikit-learn's digits: a small one at 8×8 (fast tests) and the offline demo's.

The data ship with scikit-learn and the models train from scratch on the CPU, so the demo needs
neither downloaded weights nor the data folder. The demo's network sees the digits upscaled to
32×32 and runs 96–192-channel 3×3 convolutions: big enough that onnxruntime's per-node cost is
small against their MACs, so factorized blocks run faster, as on real models (the 8×8 CNN runs
in 0.02 ms, where a factorized block's extra nodes cost as much as the MACs they save).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rankfold.models.data import ArrayDataset, normalize
from rankfold.models.spec import ModelSpec

# Mean and std of the seed-0 training pixels scaled to [0, 1] (checked by tests/test_data.py).
DIGITS_MEAN = (0.3054,)
DIGITS_STD = (0.3760,)
DIGITS_SPEC = ModelSpec(
    name="digits-cnn",
    input_shape=(1, 8, 8),
    num_classes=10,
    mean=DIGITS_MEAN,
    std=DIGITS_STD,
    description="small CNN for scikit-learn's 8×8 digits, trained offline in seconds",
)
DEMO_SCALE = 4  # 8×8 → 32×32
# Nearest-neighbour upscaling repeats pixels, so the mean and std are the 8×8 ones.
DIGITS32_SPEC = ModelSpec(
    name="digits32-cnn",
    input_shape=(1, 8 * DEMO_SCALE, 8 * DEMO_SCALE),
    num_classes=10,
    mean=DIGITS_MEAN,
    std=DIGITS_STD,
    description="the demo's CNN: digits upscaled to 32×32, 96–192-channel convs, 60M MACs",
)


def digits_splits(seed: int = 0, scale: int = 1) -> tuple[ArrayDataset, ArrayDataset]:
    """scikit-learn's 1,797 digits as uint8 N×1×8s×8s (`scale` s, nearest-neighbour), split
    80/20 stratified by `seed`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    # Pixels are integers 0..16; spread them over 0..255 like any 8-bit image.
    images = np.rint(bunch.images * (255 / 16)).astype(np.uint8)[:, None]
    images = images.repeat(scale, axis=2).repeat(scale, axis=3)
    x_train, x_test, y_train, y_test = train_test_split(
        images, bunch.target, test_size=0.2, random_state=seed, stratify=bunch.target
    )
    return ArrayDataset(x_train, y_train), ArrayDataset(x_test, y_test)


class DigitsCNN(nn.Module):
    """1×8×8 → conv(32) → conv(64) → 2×2 max-pool → conv(64) → global average pool → linear(10)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Digits32CNN(nn.Module):
    """1×32×32 → conv(32, stride 2) → conv(96) → conv(96) → 2×2 max-pool → conv(192) →
    conv(192) → global average pool → linear(10): 60M MACs, 99.9 % of them in the 96–192-channel
    convs, so that at batch 1 onnxruntime spends its time on arithmetic, not on per-op overhead."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        widths = [(1, 32, 2), (32, 96, 1), (96, 96, 1), (96, 192, 1), (192, 192, 1)]
        self.convs = nn.ModuleList(
            nn.Conv2d(c, t, 3, stride=stride, padding=1, bias=False) for c, t, stride in widths
        )
        self.bns = nn.ModuleList(nn.BatchNorm2d(t) for _, t, _ in widths)
        self.fc = nn.Linear(192, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            x = F.relu(bn(conv(x)))
            if index == 2:
                x = F.max_pool2d(x, 2)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def train_digits_cnn(
    epochs: int = 8,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
    *,
    train: ArrayDataset | None = None,
    batch_size: int = 64,
    lr: float = 3e-3,
    demo: bool = False,
) -> nn.Module:
    """Train a DigitsCNN, or with `demo` a Digits32CNN on 32×32 digits (AdamW, one-cycle
    schedule), on `train`, else the seed-0 train split.

    Reproducible for a given `seed`, leaving the global RNG untouched. `progress(epoch, accuracy)`
    is called after each epoch (1-based) with the fraction of training examples the model got right
    during that epoch (in train mode, as the batches went by). Returned in eval mode.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    spec, scale = (DIGITS32_SPEC, DEMO_SCALE) if demo else (DIGITS_SPEC, 1)
    data = digits_splits(0, scale)[0] if train is None else train
    x = normalize(data.x, spec)
    y = torch.from_numpy(data.y)
    steps_per_epoch = -(-len(y) // batch_size)
    # fork_rng keeps the caller's global RNG stream untouched by our seeding.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        model = (Digits32CNN if demo else DigitsCNN)(spec.num_classes)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch
        )
        model.train()
        for epoch in range(1, epochs + 1):
            correct = 0
            for index in torch.randperm(len(y), generator=generator).split(batch_size):
                optimizer.zero_grad(set_to_none=True)
                logits = model(x[index])
                F.cross_entropy(logits, y[index]).backward()
                optimizer.step()
                schedule.step()
                correct += int((logits.detach().argmax(1) == y[index]).sum())
            if progress is not None:
                progress(epoch, correct / len(y))
    return model.eval()
