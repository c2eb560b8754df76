"""What data-driven selectors read: a labelled proxy split and BatchNorm recalibration inputs."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from rankfold.passes.core import ConfigError, DataError
from rankfold.passes.layout import fast_layout


@dataclass
class Calibration:
    """What data-driven selectors need: a labelled proxy split and BatchNorm recalibration inputs.

    Inputs are normalised float tensors (N×C×H×W, or N×features); the two splits should be
    disjoint so the proxy is not scored on the images the statistics were taken from.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    bn_inputs: torch.Tensor
    batch_size: int = 128

    def __post_init__(self) -> None:
        if len(self.inputs) == 0 or len(self.bn_inputs) == 0:
            raise DataError("calibration data is empty; pass at least one labelled image")
        if self.labels.ndim != 1 or len(self.labels) != len(self.inputs):
            raise DataError(
                f"calibration has {len(self.inputs)} inputs but labels of shape "
                f"{tuple(self.labels.shape)}; pass one integer label per input"
            )
        if self.batch_size < 1:
            raise ConfigError(f"calibration batch_size must be >= 1, got {self.batch_size}")
        self.labels = self.labels.to(torch.int64)

    def bn_batches(self) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.bn_inputs), self.batch_size):
            yield fast_layout(self.bn_inputs[start : start + self.batch_size])

    def digest(self) -> str:
        h = hashlib.sha256()
        for tensor in (self.inputs, self.labels, self.bn_inputs):
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()
