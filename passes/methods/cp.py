"""`cp`: CP-ALS of the S×T×(kh·kw) kernel tensor."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from torch import nn

from rankfold.passes.analysis import LayerInfo
from rankfold.passes.blocks import (
    FactorizedBlock,
    balanced,
    copy_bias,
    pointwise,
    set_kernel,
    set_matrix,
    spatial_like,
)
from rankfold.passes.factorizations import cp_als, cp_sensitivity
from rankfold.passes.methods.base import Cost, FillResult, Method, Ranks, kernel_array


def cp_tensor(kernel: np.ndarray) -> np.ndarray:
    """T×S×k… → S×T×(∏k), the 3-way tensor every CP method decomposes."""
    t, s = kernel.shape[:2]
    return kernel.swapaxes(0, 1).reshape(s, t, -1)


class CPMethod(Method):
    """CP-ALS of the S×T×(kh·kw) kernel: 1×1 S→R, depthwise kh×kw on R, 1×1 R→T (the bias)."""

    name = "cp"
    layer_types = ("Conv2d", "Conv1d", "ConvTranspose2d", "Linear")

    def max_ranks(self, layer: LayerInfo) -> Ranks:
        # A rank-(min over modes of the other modes' product) CP is exact, so more is never needed.
        s, t, k = layer.in_features, layer.out_features, layer.kernel_area
        return (min(s * t, s * k, t * k),)

    def cost(self, layer: LayerInfo, ranks: Ranks) -> Cost:
        (r,) = ranks
        s, t, k = layer.in_features, layer.out_features, layer.kernel_area
        bias = t if layer.bias else 0
        macs = (
            layer.in_positions * s * r
            + layer.kernel_positions * r * k
            + layer.out_positions * r * t
        )
        return Cost(params=r * (s + k + t) + bias, macs=macs * layer.calls)

    def candidates(self, layer: LayerInfo) -> list[Ranks]:
        return self._grow_until_not_smaller(
            layer, ((r,) for r in range(1, self.max_ranks(layer)[0] + 1))
        )

    def ranks_from_ratio(self, layer: LayerInfo, ratio: float) -> Ranks:
        # CP's "full" rank is the break-even rank: the block costs as much as the layer, in
        # parameters or in MACs, whichever comes first.
        s, t, k = layer.in_features, layer.out_features, layer.kernel_area
        by_params = s * t * k / (s + k + t)
        by_macs = (
            layer.kernel_positions
            * s
            * t
            * k
            / (layer.in_positions * s + layer.kernel_positions * k + layer.out_positions * t)
        )
        return (max(1, int(ratio * min(by_params, by_macs))),)

    def build(self, layer: LayerInfo, ranks: Ranks) -> FactorizedBlock:
        (r,) = ranks
        dims = layer.spatial_dims
        stages = OrderedDict(
            pointwise_in=pointwise(layer.in_features, r, dims=dims),
            depthwise=spatial_like(layer, r, r, groups=r),
            pointwise_out=pointwise(r, layer.out_features, bias=layer.bias, dims=dims),
        )
        return FactorizedBlock(stages, layer.name, self.name, ranks)

    def factorize(self, tensor: np.ndarray, rank: int, seed: int):
        # 100 sweeps stopped at 1e-6: near ALS's error without drifting into degenerate
        # components whose float32 cancellation breaks ONNX parity (see cp_als).
        return cp_als(tensor, rank, seed=seed, n_iter_max=100, tol=1e-6, linesearch=False), {}

    def fill(self, block: FactorizedBlock, original: nn.Module, seed: int) -> FillResult:
        kernel = kernel_array(original)
        tensor = cp_tensor(kernel)
        cp, extras = self.factorize(tensor, block.ranks[0], seed)
        load_cp(block, cp, kernel.shape[2:])
        copy_bias(block.pointwise_out, original)
        return FillResult(cp.rel_error(tensor), {"sensitivity": cp_sensitivity(cp), **extras})


def load_cp(block: FactorizedBlock, cp, kernel_size: tuple[int, ...]) -> None:
    """Write a CP of the S×T×(∏k) tensor into pointwise_in / depthwise / pointwise_out."""
    unit = cp.normalized()
    a, b, c = balanced(list(unit.factors), unit.weights)
    r = unit.rank
    set_matrix(block.pointwise_in, a.T)
    set_kernel(block.depthwise, c.T.reshape(r, 1, *kernel_size))
    set_matrix(block.pointwise_out, b)
