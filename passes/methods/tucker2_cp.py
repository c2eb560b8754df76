"""`tucker2-cp`: Tucker-2 on the channel modes (ranks R_T, R_S) with an EPC-CP (rank R) of the
R_S×R_T×(kh·kw) core.

Layers: 1×1 S→R_S, 1×1 R_S→R, depthwise kh×kw on R (original geometry), 1×1 R→R_T, 1×1 R_T→T
(bias): the 5-stage block of `rankfold.passes.blocks` (adjacent 1×1 pairs merged when cheaper),
with L_in = R_S and L_out = R_T.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
from torch import nn

from rankfold.passes.analysis import LayerInfo
from rankfold.passes.blocks import (
    FactorizedBlock,
    balanced,
    copy_bias,
    fill_five_stage,
    five_stage_block,
    five_stage_cost,
)
from rankfold.passes.core import PlanError
from rankfold.passes.factorizations import Tucker2CPFactors, max_cp_rank, tucker2
from rankfold.passes.factorizations.epc import epc
from rankfold.passes.methods.base import Cost, FillResult, Method, Ranks, kernel_array
from rankfold.passes.methods.cp import CPMethod
from rankfold.passes.methods.cp_epc import (
    DEFAULT_MAX_SWEEPS,
    DEFAULT_PATIENCE,
    DEFAULT_TOL,
    check_epc_settings,
    epc_extras,
)


class Tucker2CPMethod(Method):
    """Tucker-2 on the channels, EPC-CP of the core: 1×1 S→R_S→R, depthwise, 1×1 R→R_T→T."""

    name = "tucker2-cp"
    gil_bound = True  # EPC's sweeps on the core: many small NumPy steps
    refines_segments = True
    rank_names = ("rank_out", "rank_in", "rank")
    layer_types = ("Conv2d", "Conv1d", "ConvTranspose2d", "Linear")

    def __init__(
        self,
        cp_per_tucker_rank: float = 2.0,
        max_sweeps: int = DEFAULT_MAX_SWEEPS,
        tol: float = DEFAULT_TOL,
        patience: int = DEFAULT_PATIENCE,
    ) -> None:
        if not cp_per_tucker_rank > 0:
            raise ValueError(f"cp_per_tucker_rank must be > 0, got {cp_per_tucker_rank}")
        check_epc_settings(max_sweeps, tol, patience)
        self.cp_per_tucker_rank = cp_per_tucker_rank
        self.max_sweeps, self.tol, self.patience = max_sweeps, tol, patience
        self._als = CPMethod()

    def max_ranks(self, layer: LayerInfo) -> Ranks:
        s, t, k = layer.in_features, layer.out_features, layer.kernel_area
        return (t, s, max_cp_rank((s, t, k)))

    def normalize_ranks(self, layer: LayerInfo, ranks) -> Ranks:
        values = super().normalize_ranks(layer, ranks)
        if len(values) != 3 or any(not 1 <= v <= m for v, m in zip(values, self.max_ranks(layer))):
            return values  # the planner reports counts and ranges out of [1, max]
        r_out, r_in, r = values
        k = layer.kernel_area
        if r_out > r_in * k or r_in > r_out * k:
            raise PlanError(
                f"tucker2-cp ranks {list(values)} of layer '{layer.name}': a Tucker rank above "
                f"the other × kernel area ({k}) cannot be reached; give rank_out ≤ {r_in * k} "
                f"and rank_in ≤ {r_out * k}"
            )
        limit = max_cp_rank((r_in, r_out, k))
        if r > limit:
            raise PlanError(
                f"tucker2-cp CP rank {r} of layer '{layer.name}' exceeds {limit}, which already "
                f"fits its {r_in}×{r_out}×{k} Tucker core exactly; give rank ≤ {limit}"
            )
        return values

    def cost(self, layer: LayerInfo, ranks: Ranks) -> Cost:
        r_out, r_in, r = ranks
        params, macs = five_stage_cost(layer, r, r_in, r_out)
        return Cost(params=params, macs=macs)

    def _family(self, layer: LayerInfo, fraction: float) -> Ranks:
        """Tucker ranks in proportion to the channels, CP rank `cp_per_tucker_rank` × the larger.

        A Tucker rank above the other × kernel area is capped (the core's unfolding caps it),
        and R at the rank that already fits the core exactly.
        """
        s, t, k = layer.in_features, layer.out_features, layer.kernel_area
        r_out, r_in = max(1, round(fraction * t)), max(1, round(fraction * s))
        r_out, r_in = min(r_out, r_in * k), min(r_in, r_out * k)
        r = max(1, round(self.cp_per_tucker_rank * max(r_out, r_in)))
        return r_out, r_in, min(r, max_cp_rank((r_in, r_out, k)))

    def candidates(self, layer: LayerInfo) -> list[Ranks]:
        steps = 4 * max(layer.in_features, layer.out_features)
        family = {self._family(layer, f) for f in np.linspace(0, 1, steps + 1)[1:]}
        ordered = sorted(family, key=lambda ranks: (self.cost(layer, ranks).macs, ranks))
        # With full Tucker ranks the block may still be smaller than the layer; R alone grows
        # from there (cost rises with every rank, so the order is kept).
        r_out, r_in, r = self._family(layer, 1.0)
        beyond = ((r_out, r_in, x) for x in range(r + 1, self.max_ranks(layer)[2] + 1))
        return self._grow_until_not_smaller(layer, itertools.chain(ordered, beyond))

    def ranks_from_ratio(self, layer: LayerInfo, ratio: float) -> Ranks:
        return self._family(layer, ratio)

    def build(self, layer: LayerInfo, ranks: Ranks) -> FactorizedBlock:
        r_out, r_in, r = ranks
        return five_stage_block(layer, r, r_in, r_out, self.name, ranks)

    def fill(self, block: FactorizedBlock, original: nn.Module, seed: int) -> FillResult:
        kernel = kernel_array(original)
        spatial = kernel.shape[2:]
        r_out, r_in, r = block.ranks
        tucker = tucker2(kernel, r_out, r_in, seed=seed)
        core = tucker.core.swapaxes(0, 1).reshape(r_in, r_out, -1)
        # The core gets exactly what cp-epc does to a kernel: the cp method's ALS, then EPC.
        als, _ = self._als.factorize(core, r, seed)
        hybrid = Tucker2CPFactors(
            in_factor=tucker.in_factor,
            out_factor=tucker.out_factor,
            core=epc(core, als, max_sweeps=self.max_sweeps, tol=self.tol, patience=self.patience),
            kernel_size=spatial,
        )
        unit = hybrid.core.cp.normalized()
        a, b, c = balanced(list(unit.factors), unit.weights)  # R_S×R, R_T×R, (∏k)×R
        fill_five_stage(
            block, hybrid.in_factor.T, a.T, c.T.reshape(r, *spatial), b, hybrid.out_factor
        )
        copy_bias(block.pointwise_out, original)
        # The same Tucker factors with the ALS core: what EPC started from, on the whole kernel.
        with_als = dataclasses.replace(
            hybrid, core=dataclasses.replace(hybrid.core, cp=hybrid.core.als)
        )
        return FillResult(
            hybrid.rel_error(kernel), epc_extras(hybrid.core, with_als.rel_error(kernel))
        )
