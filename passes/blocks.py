"""Factorized layer blocks: built from shapes alone (so a saved plan can be rebuilt), then filled.

A block is an nn.Sequential with named stages that records where it came from (`source`, `method`,
`ranks`), so reports, exports and restores can trace every new module back to its layer. The
spatial stage carries the original stride, padding (incl. 'same' and per-dimension), dilation and
padding mode; pointwise stages commute with any padding because they have no bias.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from rankfold.passes.analysis import LayerInfo


class FactorizedBlock(nn.Sequential):
    """A chain of layers replacing one conv/linear layer."""

    def __init__(
        self, stages: OrderedDict[str, nn.Module], source: str, method: str, ranks
    ) -> None:
        super().__init__(stages)
        self.source = source
        self.method = method
        self.ranks = tuple(int(r) for r in ranks)

    def extra_repr(self) -> str:
        return f"source={self.source!r}, method={self.method!r}, ranks={self.ranks}"


def pointwise(in_ch: int, out_ch: int, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, bias=bias)


def spatial_like(layer: LayerInfo, in_ch: int, out_ch: int, groups: int = 1) -> nn.Conv2d:
    """A conv with the original layer's kernel geometry, without bias."""
    return nn.Conv2d(
        in_ch,
        out_ch,
        kernel_size=layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=groups,
        bias=False,
        padding_mode=layer.padding_mode,
    )


def set_weight(module: nn.Module, array: np.ndarray) -> None:
    weight = module.weight
    if tuple(array.shape) != tuple(weight.shape):
        raise ValueError(f"factor of shape {array.shape} does not fit weight {tuple(weight.shape)}")
    with torch.no_grad():
        weight.copy_(torch.from_numpy(np.ascontiguousarray(array)).to(weight.dtype))


def copy_bias(target: nn.Module, original: nn.Module) -> None:
    if original.bias is not None:
        with torch.no_grad():
            target.bias.copy_(original.bias)


def balanced(columns: list[np.ndarray], weights: np.ndarray) -> list[np.ndarray]:
    """Spread λ evenly over unit-norm factors: equal column norms keep fine-tuning well conditioned."""
    share = np.abs(weights) ** (1.0 / len(columns))
    scaled = [c * share for c in columns]
    scaled[-1] = scaled[-1] * np.sign(weights)
    return scaled
