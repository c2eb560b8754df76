"""The memory layout convolutions run fastest in, for every pass that runs a model in PyTorch:
the search's evaluations, the layer statistics, the refit, recalibration, scoring and
fine-tuning."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import chain

import torch
from torch import nn


def conv_layout(device: torch.device | None = None) -> torch.memory_format:
    """The layout convs run fastest in: channels-last on a CPU (oneDNN's convolutions run about
    twice as fast on it, BENCHMARKS.md; results the same up to float rounding); elsewhere
    tensors keep theirs (CUDA: not measured here). No device: the CPU."""
    return torch.channels_last if device is None or device.type == "cpu" else torch.preserve_format


def fast_layout(x: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """A batch of images in `conv_layout(device)` (other inputs as they are)."""
    layout = conv_layout(device)
    return (
        x.contiguous(memory_format=layout) if x.ndim == 4 and layout != torch.preserve_format else x
    )


@contextmanager
def in_conv_layout(modules: Iterable[nn.Module | None]) -> Iterator[None]:
    """Run `modules` with each 4-D weight in `conv_layout` of the device it is on: a conv whose
    weight is channels-last computes channels-last whatever its input's layout, and so does
    everything after it, so inputs need no conversion. Parameters keep their identity
    (optimizers and checkpoints see the same tensors); on exit each weight this changed is
    contiguous again, its values as they are then. Re-entrant: weights already in the layout,
    or in any layout but the contiguous one, are left alone."""
    changed: dict[int, torch.Tensor] = {}
    for module in modules:
        for tensor in chain(module.parameters(), module.buffers()) if module else ():
            layout = conv_layout(tensor.device)
            if (
                tensor.ndim == 4
                and layout != torch.preserve_format
                and id(tensor) not in changed
                and tensor.is_contiguous()
                and not tensor.is_contiguous(memory_format=layout)
            ):
                changed[id(tensor)] = tensor
                tensor.data = tensor.data.contiguous(memory_format=layout)
    try:
        yield
    finally:
        for tensor in changed.values():
            tensor.data = tensor.data.contiguous()
