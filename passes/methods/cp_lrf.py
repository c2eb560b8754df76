"""`cp-lrf`: CP with low-rank factor matrices as a conv layer chain.

The kernel as K = S×T×(kh·kw) gets a rank-R CP whose channel factors are low rank,
A_S = U_S V_Sᵀ (rank L_S) and A_T = U_T V_Tᵀ (rank L_T); the spatial factor is free. Layers:
1×1 S→L_S (U_Sᵀ), 1×1 L_S→R (V_S), depthwise kh×kw on R (original geometry), 1×1 R→L_T (V_Tᵀ),
1×1 L_T→T (U_T, bias): the 5-stage block of `rankfold.passes.blocks` (adjacent 1×1 pairs merged
when cheaper), with L_in = L_S and L_out = L_T.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import nn

from rankfold.passes.analysis import LayerInfo
from rankfold.passes.blocks import (
    FactorizedBlock,
    copy_bias,
    equalize_stages,
    fill_five_stage,
    five_stage_block,
    five_stage_cost,
)
from rankfold.passes.core import PlanError
from rankfold.passes.factorizations.epc import max_cp_rank
from rankfold.passes.factorizations.lrf_cp import lrf_cp, lrf_cp_auto
from rankfold.passes.methods.base import Cost, FillResult, Method, Ranks, kernel_array
from rankfold.passes.methods.cp import CPMethod, cp_tensor


class CPLRFMethod(Method):
    """CP with low-rank factor matrices: R components on rank-L_S / rank-L_T channel factors."""

    name = "cp-lrf"
    rank_names = ("rank", "rank_in", "rank_out")
    layer_types = ("Conv2d", "Conv1d", "ConvTranspose2d", "Linear")

    def max_ranks(self, layer: LayerInfo) -> Ranks:
        s, t, k = layer.in_features, layer.out_features, layer.kernel_area
        return (max_cp_rank((s, t, k)), s, t)

    def normalize_ranks(self, layer: LayerInfo, ranks) -> Ranks:
        values = super().normalize_ranks(layer, ranks)
        if len(values) == 3 and (values[1] > values[0] or values[2] > values[0]):
            raise PlanError(
                f"cp-lrf factor ranks {list(values[1:])} of layer '{layer.name}' exceed the CP "
                f"rank {values[0]}; give rank_in, rank_out ≤ rank"
            )
        return values

    def clamp_ranks(self, layer: LayerInfo, ranks: Sequence[int]) -> Ranks:
        # The factors are I_n×R: once R is capped at the kernel's largest CP rank, a factor rank
        # above it is above the factor's too.
        r, l_s, l_t = super().clamp_ranks(layer, ranks)
        return r, min(l_s, r), min(l_t, r)

    def cost(self, layer: LayerInfo, ranks: Ranks) -> Cost:
        r, l_s, l_t = ranks
        params, macs = five_stage_cost(layer, r, l_s, l_t)
        return Cost(params=params, macs=macs)

    def _family(self, layer: LayerInfo, fraction: float) -> Ranks:
        """Factor ranks a fraction of the channels, CP rank their sum (capped by the core's)."""
        s, t, k = layer.in_features, layer.out_features, layer.kernel_area
        l_s, l_t = max(1, round(fraction * s)), max(1, round(fraction * t))
        r = max(l_s, l_t, min(l_s + l_t, max_cp_rank((l_s, l_t, k))))
        return (r, l_s, l_t)

    def candidates(self, layer: LayerInfo) -> list[Ranks]:
        steps = np.linspace(0, 1, 2 * max(layer.in_features, layer.out_features) + 1)[1:]
        family = sorted(
            {self._family(layer, f) for f in steps}, key=lambda c: self.cost(layer, c).macs
        )
        return self._grow_until_not_smaller(layer, family)

    def ranks_from_ratio(self, layer: LayerInfo, ratio: float) -> Ranks:
        return self._family(layer, ratio)

    def build(self, layer: LayerInfo, ranks: Ranks) -> FactorizedBlock:
        r, l_s, l_t = ranks
        return five_stage_block(layer, r, l_s, l_t, self.name, ranks)

    def fill(self, block: FactorizedBlock, original: nn.Module, seed: int) -> FillResult:
        kernel = kernel_array(original)
        tensor = cp_tensor(kernel)
        r, l_s, l_t = block.ranks
        fitted = lrf_cp(tensor, r, [l_s, l_t, None], seed=seed, max_sweeps=200, tol=1e-7)
        factors = fitted.factors.absorbed(1)
        (u_s, u_t, spatial), (v_s, v_t, _) = factors.left, factors.right
        fill_five_stage(block, u_s.T, v_s, spatial.T.reshape(r, *kernel.shape[2:]), v_t.T, u_t)
        copy_bias(block.pointwise_out, original)
        # All of λ sits in mode 1's factor; spread over the stages, as `cp` does.
        equalize_stages(block)
        return FillResult(fitted.rel_error, {"lrf_params": float(fitted.factors.n_params)})

    def ranks_within_error(
        self, layer: LayerInfo, module: nn.Module, rel_error: float, seed: int
    ) -> Ranks | str:
        """LRF-CPD picks the factor ranks: R is the layer's CP break-even rank, and
        `lrf_cp_auto` finds the smallest (L_S, L_T) within `rel_error` at that R."""
        from threadpoolctl import threadpool_limits

        (r,) = CPMethod().ranks_from_ratio(layer, 1.0)
        tensor = cp_tensor(kernel_array(module))
        try:
            with threadpool_limits(limits=1, user_api="blas"):
                fitted = lrf_cp_auto(tensor, r, rel_error, seed=seed, constrained_modes=(0, 1))
        except ValueError as exc:
            return f"LRF-CPD at rank {r} cannot reach error {rel_error:g} ({exc})"
        l_s, l_t = (
            v.shape[1] if v is not None else min(n, r)
            for v, n in zip(fitted.factors.right[:2], tensor.shape[:2])
        )
        ranks = (r, l_s, l_t)
        if not self.shrinks(layer, ranks):
            return f"error {rel_error:g} needs ranks {list(ranks)}, not smaller"
        return ranks
