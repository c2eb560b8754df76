"""`cp-lrf`: CP with low-rank factor matrices as a conv layer chain.

The kernel as K = S×T×(kh·kw) gets a rank-R CP whose channel factors are low rank,
A_S = U_S V_Sᵀ (rank L_S) and A_T = U_T V_Tᵀ (rank L_T); the spatial factor is free. Layers:
1×1 S→L_S (U_Sᵀ), 1×1 L_S→R (V_S), depthwise kh×kw on R (original geometry), 1×1 R→L_T (V_Tᵀ),
1×1 L_T→T (U_T, bias): the 5-stage block of `rankfold.passes.blocks` (adjacent 1×1 pairs merged
when cheaper), with L_in = L_S and L_out = L_T.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from rankfold.passes.analysis import LayerInfo
from rankfold.passes.blocks import (
    FactorizedBlock,
    copy_bias,
    fill_five_stage,
    five_stage_block,
    five_stage_cost,
)
from rankfold.passes.core import PlanError
from rankfold.passes.factorizations.epc import max_cp_rank
from rankfold.passes.factorizations.lrf_cp import lrf_cp
from rankfold.passes.methods import (
    Cost,
    FillResult,
    Method,
    Ranks,
    cp_tensor,
    kernel_array,
    register_method,
)


class CPLRFMethod(Method):
    """CP with low-rank factor matrices: R components on rank-L_S / rank-L_T channel factors."""

    name = "cp-lrf"
    rank_names = ("rank", "rank_in", "rank_out")

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
        return FillResult(fitted.rel_error, {"lrf_params": float(fitted.factors.n_params)})


register_method(CPLRFMethod())


def error_bounded_ranks(
    gm: nn.Module, analysis, rel_error: float, rank_fraction: float = 1.0, seed: int = 0
) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Per-layer (R, L_S, L_T) whose LRF-CPD meets relative error `rel_error`, before any surgery.

    R is `rank_fraction` of the layer's CP break-even rank; `lrf_cp_auto` then picks the smallest
    factor ranks within the bound. Layers whose block would not be smaller than the layer, or that
    cannot reach the bound at that R, are returned in the second dict with the reason.
    """
    from threadpoolctl import threadpool_limits

    from rankfold.passes.factorizations.lrf_cp import lrf_cp_auto
    from rankfold.passes.methods import METHODS, method_for_layer

    method = METHODS["cp-lrf"]
    ranks: dict[str, list[int]] = {}
    skipped: dict[str, str] = {}
    for layer in analysis.layers:
        chosen, _ = method_for_layer("cp-lrf", layer)
        if chosen is not method or method.unsupported_reason(layer):
            continue
        (r,) = METHODS["cp"].ranks_from_ratio(layer, rank_fraction)
        tensor = cp_tensor(kernel_array(gm.get_submodule(layer.name)))
        try:
            with threadpool_limits(limits=1, user_api="blas"):
                fitted = lrf_cp_auto(tensor, r, rel_error, seed=seed, constrained_modes=(0, 1))
        except ValueError as exc:
            skipped[layer.name] = f"LRF-CPD at rank {r} cannot reach error {rel_error:g} ({exc})"
            continue
        l_s, l_t = (
            v.shape[1] if v is not None else min(n, r)
            for v, n in zip(fitted.factors.right[:2], tensor.shape[:2])
        )
        candidate = (r, l_s, l_t)
        cost = method.cost(layer, candidate)
        if cost.params >= layer.params or cost.macs >= layer.macs:
            skipped[layer.name] = f"error {rel_error:g} needs ranks {list(candidate)}, not smaller"
            continue
        ranks[layer.name] = list(candidate)
    return ranks, skipped
