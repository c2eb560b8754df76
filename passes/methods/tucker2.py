"""`tucker2`: Tucker-2 on the channel modes (ranks R_T, R_S), the spatial modes kept whole."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

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
from rankfold.passes.factorizations import tucker2
from rankfold.passes.methods.base import Cost, FillResult, Method, Ranks, kernel_array


class Tucker2Method(Method):
    """1×1 S→R_S, kh×kw R_S→R_T (the layer's geometry), 1×1 R_T→T (the bias).

    The kh×kw core has the layer's type (Conv1d, Conv2d, ConvTranspose2d: transposed or not).
    """

    name = "tucker2"
    rank_names = ("rank_out", "rank_in")
    layer_types = ("Conv2d", "Conv1d", "ConvTranspose2d", "Linear")
    refines_segments = True
    # Trained kernels' unfolding spectra differ a lot between layers; keeping a common share of
    # their energy beats keeping a common share of every layer's cost (BENCHMARKS.md, #20).
    budget_selector = "energy"

    def max_ranks(self, layer: LayerInfo) -> Ranks:
        return (layer.out_features, layer.in_features)

    def cost(self, layer: LayerInfo, ranks: Ranks) -> Cost:
        r_out, r_in = ranks
        s, t, k = layer.in_features, layer.out_features, layer.kernel_area
        bias = t if layer.bias else 0
        macs = (
            layer.in_positions * s * r_in
            + layer.kernel_positions * r_out * r_in * k
            + layer.out_positions * t * r_out
        )
        return Cost(params=s * r_in + r_in * r_out * k + r_out * t + bias, macs=macs * layer.calls)

    def candidates(self, layer: LayerInfo) -> list[Ranks]:
        # Both ranks grow in proportion to their channel counts: one ratio, many layers. A rank
        # above the other rank × kernel area adds nothing (the core's unfolding caps it), so cap it.
        t, s, k = layer.out_features, layer.in_features, layer.kernel_area
        family = set()
        for f in np.linspace(0, 1, 4 * max(s, t) + 1)[1:]:
            r_out, r_in = max(1, round(f * t)), max(1, round(f * s))
            family.add((min(r_out, r_in * k), min(r_in, r_out * k)))
        family = sorted(family, key=lambda ranks: (self.cost(layer, ranks).macs, ranks))
        return self._grow_until_not_smaller(layer, family)

    def ranks_from_ratio(self, layer: LayerInfo, ratio: float) -> Ranks:
        return (max(1, round(ratio * layer.out_features)), max(1, round(ratio * layer.in_features)))

    def clamp_ranks(self, layer: LayerInfo, ranks: Sequence[int]) -> Ranks:
        # A rank above the other rank × kernel area adds nothing: the core's unfolding caps it.
        r_out, r_in = super().clamp_ranks(layer, ranks)
        k = layer.kernel_area
        return min(r_out, r_in * k), min(r_in, r_out * k)

    def unfoldings(self, kernel: np.ndarray) -> list[np.ndarray]:
        t, s = kernel.shape[:2]
        mode_in = kernel.transpose(1, 0, *range(2, kernel.ndim)).reshape(s, -1)
        return [kernel.reshape(t, -1), mode_in]

    def build(self, layer: LayerInfo, ranks: Ranks) -> FactorizedBlock:
        r_out, r_in = ranks
        dims = layer.spatial_dims
        stages = OrderedDict(
            pointwise_in=pointwise(layer.in_features, r_in, dims=dims),
            core=spatial_like(layer, r_in, r_out),
            pointwise_out=pointwise(r_out, layer.out_features, bias=layer.bias, dims=dims),
        )
        return FactorizedBlock(stages, layer.name, self.name, ranks)

    def fill(self, block: FactorizedBlock, original: nn.Module, seed: int) -> FillResult:
        kernel = kernel_array(original)
        factors = tucker2(kernel, *block.ranks, seed=seed)
        set_matrix(block.pointwise_in, factors.in_factor.T)
        set_kernel(block.core, factors.core)
        set_matrix(block.pointwise_out, factors.out_factor)
        copy_bias(block.pointwise_out, original)
        return FillResult(factors.rel_error(kernel))
