"""energy: per layer, the smallest ranks whose unfoldings keep a fraction of their squared
singular values (mode-T and mode-S unfoldings for Tucker-2, the T×(S·kh·kw) matrix for SVD).

With a budget, the common energy threshold is moved by bisection until the model fits, ranks
aligned to channel blocks as uniform's are; without one, `RankPolicy.energy` decides and a layer
whose ranks would not make it smaller stays whole. The default for Tucker-2 under a MACs or
parameter budget (`Method.budget_selector`).
"""

from __future__ import annotations

import numpy as np
from torch import fx

from rankfold.passes.methods import Ranks
from rankfold.passes.plan import Budget, Choices, PlanDraft, Slot
from rankfold.passes.selectors.base import (
    Advance,
    Choice,
    PlanningContext,
    Selector,
    aligned_or_free,
)
from rankfold.passes.selectors.chains import RankChains, has_unfoldings, unfoldings


class EnergySelector(Selector):
    name = "energy"
    summary = "smallest ranks keeping a share of each unfolding's energy (svd; tucker2, by default)"

    def plans(self, draft: PlanDraft, context: PlanningContext) -> bool:
        return context.gm is None or has_unfoldings(draft, context.gm)

    def steps(self, draft: PlanDraft, context: PlanningContext) -> int:
        return len(draft.slots)  # one spectrum each: seconds per wide Linear layer

    def choose(self, draft: PlanDraft, context: PlanningContext, advance: Advance) -> Choice:
        return energy_choice(draft, context.gm, draft.policy.energy, advance)


def energy_choice(
    draft: PlanDraft, gm: fx.GraphModule, energy: float, advance: Advance | None = None
) -> Choice:
    """Smallest ranks keeping `energy` of every unfolding's squared singular values per layer;
    with a budget, the common energy threshold that fits it, ranks aligned as uniform's are.
    `advance(layer)` is called once per layer's spectra."""
    cumulative = []
    for slot in draft.slots:
        # A grouped conv keeps the same rank r in every group: the energy it keeps is the sum
        # over groups of each group's r leading squared singular values.
        per_group = unfoldings(slot, gm, "energy")
        modes = []
        for matrices in zip(*per_group):
            power = sum(np.linalg.svd(matrix, compute_uv=False) ** 2 for matrix in matrices)
            modes.append(np.cumsum(power) / max(power.sum(), 1e-300))
        cumulative.append(modes)
        if advance is not None:
            advance(slot.layer.name)
    budget = draft.budget

    def choose(aligned_or_not: PlanDraft) -> Choice:
        slots = aligned_or_not.slots

        def ranks_at(j: int, e: float) -> Ranks:
            # The smallest r whose leading r values keep a fraction e (a hair of slack for
            # rounding); under a budget, rounded up to the slot's channel block.
            ranks = [int(np.searchsorted(c, e - 1e-12)) + 1 for c in cumulative[j]]
            block = slots[j].block if budget is not None else None
            if block:
                ranks = [r if r < block else -(-r // block) * block for r in ranks]
            return slots[j].method.clamp_ranks(slots[j].layer, ranks)

        chains = RankChains(aligned_or_not, ranks_at, [np.concatenate(c) for c in cumulative])
        if budget is None:
            choices, threshold = chains.at(energy), energy
        else:
            choices, threshold = chains.fit(1.0)
        return _explained(slots, choices, cumulative, budget, energy, threshold)

    return aligned_or_free(draft, choose)


def _explained(
    slots: list[Slot],
    choices: Choices,
    cumulative: list[list[np.ndarray]],
    budget: Budget | None,
    energy: float,
    threshold: float,
) -> Choice:
    reasons, layers = [], []
    for slot, ranks, modes in zip(slots, choices, cumulative):
        if ranks is None:
            reasons.append(
                f"energy: kept whole; keeping {energy:.1%} of the energy needs ranks that do not "
                "make it smaller"
            )
            layers.append({"layer": slot.layer.name, "ranks": None})
            continue
        kept = [float(c[min(r, len(c)) - 1]) for c, r in zip(modes, ranks)]
        where = f"for {budget.reduction:g}× {budget.metric}" if budget else f"(≥ {energy:.1%})"
        reasons.append(
            f"energy: the ranks keep {'/'.join(f'{k:.1%}' for k in kept)} of the "
            f"{'/'.join(slot.method.rank_names)} unfolding energy {where}"
        )
        layers.append({"layer": slot.layer.name, "ranks": list(ranks), "retained_energy": kept})
    report = {"selector": "energy", "threshold": float(threshold), "layers": layers}
    return Choice(choices, reasons, report)
