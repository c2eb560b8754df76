"""The task metric a run reports before and after compression: top-1 on `--eval-data` for a
classifier, or a user's own score (mean IoU, mAP, …) through the Python API.

    metric = TaskMetric("mIoU", mean_iou, loader)   # mean_iou(model, loader) -> float
    result = compress(model, example, config, metric=metric)

`score(model, data)` gets `data` as given, so its targets can be anything the task needs (masks,
boxes); it is called with the model in eval mode under `torch.no_grad()` (on a CPU its convs
run channels-last; the outputs it reads are contiguous), on the original, the decomposed and
each recovered model, and on model.onnx through an nn.Module that runs the file in
onnxruntime and returns the PyTorch model's output structure (tensors on the CPU).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from rankfold.models import ImageData, ModelSpec, batches
from rankfold.passes.core import ValidationError
from rankfold.passes.layout import in_conv_layout
from rankfold.runtime import torch_accuracy
from rankfold.runtime.export import eval_mode

TOP1 = "top-1"


@dataclass(frozen=True)
class TaskMetric:
    """A named score of a model on data, higher is better."""

    name: str
    score: Callable[[nn.Module, Any], float]  # score(model, data)
    data: Iterable[Any]  # re-iterable (a DataLoader, a list of batches): it is read every call

    def __call__(self, module: nn.Module) -> float:
        # The model runs channels-last where that is faster; the score reads its outputs in the
        # layout it was written for (a `view` of a channels-last map can fail).
        handle = module.register_forward_hook(_contiguous_outputs)
        try:
            with eval_mode(module), torch.no_grad(), in_conv_layout((module,)):
                raw = self.score(module, self.data)
        finally:
            handle.remove()
        try:
            value = float(raw)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise ValidationError(
                f"task metric '{self.name}' returned {raw!r}, not a finite number; make its "
                "score function return a float"
            )
        return value


def _contiguous_outputs(_module: nn.Module, _args: object, output: Any) -> Any:
    return pytree.tree_map_only(torch.Tensor, lambda t: t.contiguous(), output)


@dataclass(frozen=True)
class _LabelledBatches:
    """`batches(data, spec)` afresh on every iteration, so top-1 is one TaskMetric too."""

    data: ImageData
    spec: ModelSpec

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return batches(self.data, self.spec)


def top1(data: ImageData, spec: ModelSpec) -> TaskMetric:
    """Top-1 accuracy (a fraction) on labelled images, the classifier default."""
    return TaskMetric(TOP1, torch_accuracy, _LabelledBatches(data, spec))
