"""The memory layout convolutions run fastest in, for every pass that runs a model in PyTorch:
the search's evaluations, the layer statistics, the refit, recalibration, scoring and
fine-tuning."""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, redirect_stderr
from contextvars import ContextVar
from itertools import chain

import torch
from torch import nn

# Off for a model whose forward needs contiguous activations (`runs_channels_last`).
_CHANNELS_LAST = ContextVar("rankfold_channels_last", default=True)


def conv_layout(device: torch.device | None = None) -> torch.memory_format:
    """The layout convs run fastest in: channels-last on a CPU (oneDNN's convolutions run about
    twice as fast on it, BENCHMARKS.md; results the same up to float rounding); elsewhere, or
    inside `channels_last_allowed(False)`, tensors keep theirs (CUDA: not measured here). No
    device: the CPU."""
    cpu = device is None or device.type == "cpu"
    return torch.channels_last if cpu and _CHANNELS_LAST.get() else torch.preserve_format


@contextmanager
def channels_last_allowed(allowed: bool) -> Iterator[None]:
    """Whether `conv_layout` may pick channels-last inside the block."""
    token = _CHANNELS_LAST.set(allowed)
    try:
        yield
    finally:
        _CHANNELS_LAST.reset(token)


def fast_layout(x: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """A batch of images in `conv_layout(device)` (other inputs as they are)."""
    layout = conv_layout(device)
    return (
        x.contiguous(memory_format=layout) if x.ndim == 4 and layout != torch.preserve_format else x
    )


@contextmanager
def in_conv_layout(
    modules: Iterable[nn.Module | None], layout: torch.memory_format | None = None
) -> Iterator[None]:
    """Run `modules` with each 4-D weight in `layout`, by default `conv_layout` of the device it
    is on: a conv whose weight is channels-last computes channels-last whatever its input's
    layout, and so does everything after it, so inputs need no conversion. Parameters keep
    their identity (optimizers and checkpoints see the same tensors); on exit each weight this
    changed goes back to its layout, its values as they are then. Re-entrant: weights already
    in the layout, or in neither the contiguous nor the channels-last one, are left alone."""
    changed: dict[int, tuple[torch.Tensor, torch.memory_format]] = {}
    for module in modules:
        for tensor in chain(module.parameters(), module.buffers()) if module else ():
            wanted = layout or conv_layout(tensor.device)
            if tensor.ndim != 4 or wanted == torch.preserve_format or id(tensor) in changed:
                continue
            if tensor.is_contiguous(memory_format=wanted):
                continue
            for home in (torch.contiguous_format, torch.channels_last):
                if tensor.is_contiguous(memory_format=home):
                    changed[id(tensor)] = tensor, home
                    tensor.data = tensor.data.contiguous(memory_format=wanted)
                    break
    try:
        yield
    finally:
        for tensor, home in changed.values():
            tensor.data = tensor.data.contiguous(memory_format=home)


def runs_channels_last(model: nn.Module, example: torch.Tensor) -> bool:
    """Whether `model` runs on `example` in `conv_layout()`: not one whose forward needs
    contiguous activations (an extension op that checks for them, a `view` merging channels
    with rows). Any failure counts: the contiguous layout is the safe one, and a model that
    fails in both fails again where the run first calls it."""
    if conv_layout() == torch.preserve_format:
        return True
    try:
        # A GraphModule prints the failing line of its code to stderr before it raises.
        with torch.no_grad(), in_conv_layout((model,)), redirect_stderr(io.StringIO()):
            model(example)
    except Exception:
        return False
    return True
