"""A model's outputs as named tensors: one tensor (a classifier's logits), or a tuple, list or
dict of them (segmentation's {"out", "aux"}, a detection backbone's feature maps).

The names are the ONNX graph's output names and the report's, so parity is read per output:
dict keys as they are (nested ones joined by "."), sequence items as `output_0`, `output_1`,
and a lone tensor as `logits`. The order is torch's pytree order (dict insertion order), the
order torch.export flattens outputs in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree

from rankfold.passes.core import ExportError

LOGITS = "logits"


@dataclass(frozen=True)
class OutputLayout:
    """Names and per-sample shapes (batch axis dropped) of a model's output tensors."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def is_logits(self) -> bool:
        """One N×classes tensor: the only output top-1 accuracy can be read from."""
        return self.names == (LOGITS,) and len(self.shapes[0]) == 1

    def describe(self) -> str:
        """Each output with its shape, e.g. "out N×21×64×64, aux N×21×64×64"."""
        return ", ".join(
            f"{name} {'×'.join(map(str, ('N', *shape)))}"
            for name, shape in zip(self.names, self.shapes)
        )


def named_outputs(output: object) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor in `output`, in pytree order; anything else in it (a
    number, a string) is an ExportError, since an ONNX graph returns tensors only."""
    leaves, _ = pytree.tree_flatten_with_path(output)
    if not leaves:
        raise ExportError(
            f"the model's forward returns {type(output).__name__} with no tensor in it; "
            "return the output tensors (one tensor, or a tuple, list or dict of them)"
        )
    named = []
    for path, leaf in leaves:
        name = _name(path)
        if not isinstance(leaf, torch.Tensor):
            raise ExportError(
                f"the model's output {name} is a {type(leaf).__name__}, not a tensor; return "
                "tensors only (one tensor, or a tuple, list or dict of them)"
            )
        named.append((name, leaf))
    names = [name for name, _ in named]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ExportError(
            f"the model's output names {duplicates} repeat (dict keys that read the same as "
            "text); give the outputs distinct keys"
        )
    return named


def output_layout(output: object) -> OutputLayout:
    """The layout of one forward pass's `output`."""
    named = named_outputs(output)
    return OutputLayout(
        names=tuple(name for name, _ in named),
        shapes=tuple(tuple(tensor.shape[1:]) for _, tensor in named),
    )


def _name(path: tuple[pytree.KeyEntry, ...]) -> str:
    if not path:
        return LOGITS
    parts = []
    for key in path:
        if isinstance(key, pytree.MappingKey):
            parts.append(str(key.key))
        elif isinstance(key, pytree.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, pytree.GetAttrKey):
            parts.append(key.name)
        else:
            parts.append(str(key))
    name = ".".join(parts)
    return f"output_{name}" if isinstance(path[0], pytree.SequenceKey) else name
