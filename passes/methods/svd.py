"""`svd`: the kernel as a T×(S·kh·kw) matrix, truncated to rank R."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from torch import nn

from rankfold.passes.analysis import LayerInfo
from rankfold.passes.blocks import (
    FactorizedBlock,
    copy_bias,
    pointwise,
    set_kernel,
    set_matrix,
    spatial_like,
)
from rankfold.passes.factorizations import truncated_svd
from rankfold.passes.methods.base import Cost, FillResult, Method, Ranks, kernel_array


class SVDMethod(Method):
    """Linear: in→R→out. Conv: kh×kw S→R (the layer's geometry), then 1×1 R→T (the bias).

    The kh×kw stage has the layer's type (Conv1d, Conv2d, ConvTranspose2d: transposed or not).
    """

    name = "svd"
    layer_types = ("Conv2d", "Conv1d", "ConvTranspose2d", "Linear")

    def max_ranks(self, layer: LayerInfo) -> Ranks:
        return (min(layer.out_features, layer.in_features * layer.kernel_area),)

    def cost(self, layer: LayerInfo, ranks: Ranks) -> Cost:
        (r,) = ranks
        s, t, k = layer.in_features, layer.out_features, layer.kernel_area
        bias = t if layer.bias else 0
        return Cost(
            params=s * k * r + r * t + bias,
            macs=(layer.kernel_positions * r * s * k + layer.out_positions * t * r) * layer.calls,
        )

    def candidates(self, layer: LayerInfo) -> list[Ranks]:
        return self._grow_until_not_smaller(
            layer, ((r,) for r in range(1, self.max_ranks(layer)[0] + 1))
        )

    def ranks_from_ratio(self, layer: LayerInfo, ratio: float) -> Ranks:
        return (max(1, round(ratio * self.max_ranks(layer)[0])),)

    def unfoldings(self, kernel: np.ndarray) -> list[np.ndarray]:
        return [kernel.reshape(kernel.shape[0], -1)]

    def build(self, layer: LayerInfo, ranks: Ranks) -> FactorizedBlock:
        (r,) = ranks
        if layer.type == "Linear":
            stages = OrderedDict(
                project=nn.Linear(layer.in_features, r, bias=False),
                expand=nn.Linear(r, layer.out_features, bias=layer.bias),
            )
        else:
            stages = OrderedDict(
                spatial=spatial_like(layer, layer.in_features, r),
                pointwise_out=pointwise(
                    r, layer.out_features, bias=layer.bias, dims=layer.spatial_dims
                ),
            )
        return FactorizedBlock(stages, layer.name, self.name, ranks)

    def fill(self, block: FactorizedBlock, original: nn.Module, seed: int) -> FillResult:
        weight = kernel_array(original)
        matrix = weight.reshape(weight.shape[0], -1)
        factors = truncated_svd(matrix, block.ranks[0])
        first, second = block[0], block[1]
        set_kernel(first, factors.right.reshape(-1, *weight.shape[1:]))
        set_matrix(second, factors.left)
        copy_bias(second, original)
        return FillResult(factors.rel_error(matrix))
