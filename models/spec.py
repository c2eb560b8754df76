"""What a model consumes: input shape, class count and the per-channel input normalisation."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# ImageNet statistics: torchvision's classifiers use them, and so did the pretrained CIFAR-10
# ResNets' training code (data README), so both families share them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """A classifier's contract: N×C×H×W float inputs normalised as `(x/255 - mean) / std`.

    Lists are accepted for the tuple fields (as in a user's `RANKFOLD_SPEC`) and stored as tuples;
    malformed values raise ValueError.
    """

    name: str
    input_shape: tuple[int, int, int]  # C, H, W
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    description: str = ""

    def __post_init__(self) -> None:
        shape = _ints(self.input_shape, "input_shape")
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"input_shape must be 3 positive ints (C, H, W), got {shape}")
        mean = _floats(self.mean, "mean")
        std = _floats(self.std, "std")
        if len(mean) != shape[0] or len(std) != shape[0]:
            raise ValueError(
                f"mean and std need one value per input channel ({shape[0]}), "
                f"got {len(mean)} and {len(std)}"
            )
        if not all(math.isfinite(v) for v in mean) or not all(
            math.isfinite(s) and s > 0 for s in std
        ):
            raise ValueError(f"mean must be finite and std finite and > 0, got {mean} and {std}")
        (num_classes,) = _ints((self.num_classes,), "num_classes")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        # Frozen dataclass: normalised values are stored through object.__setattr__.
        object.__setattr__(self, "input_shape", shape)
        object.__setattr__(self, "num_classes", num_classes)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @property
    def channels(self) -> int:
        return self.input_shape[0]

    def example_input(self, batch_size: int = 1, *, seed: int = 0) -> torch.Tensor:
        """A reproducible standard-normal batch of this input shape (for tracing and export)."""
        generator = torch.Generator().manual_seed(seed)
        return torch.randn((batch_size, *self.input_shape), generator=generator)


def _ints(values: Sequence[int], field: str) -> tuple[int, ...]:
    try:
        # operator.index accepts NumPy integers but refuses floats such as 32.0.
        items = tuple(operator.index(v) for v in values)
    except TypeError:
        raise ValueError(f"{field} must be a sequence of ints, got {values!r}") from None
    if any(isinstance(v, bool) for v in values):
        raise ValueError(f"{field} must be a sequence of ints, got {values!r}")
    return items


def _floats(values: Sequence[float], field: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{field} must be a sequence of numbers, got {values!r}") from None
