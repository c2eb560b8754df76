"""uniform: every budgeted layer keeps the same fraction of its own cost.

The fraction is found by bisection, then single rank steps close the remaining gap without
exceeding the budget (`rankfold.passes.plan.allocate`). Without a budget, the policy's global
rank (or ratio) decides every layer.
"""

from __future__ import annotations

import bisect

from rankfold.passes.plan import PlanDraft, allocate
from rankfold.passes.selectors.base import (
    Advance,
    Choice,
    PlanningContext,
    Selector,
    aligned_or_free,
)


class UniformSelector(Selector):
    name = "uniform"
    summary = "every budgeted layer keeps the same share of its cost (default, not for tucker2)"
    uses_global_rank = True
    needs_kernels = False

    def choose(self, draft: PlanDraft, context: PlanningContext, advance: Advance) -> Choice:
        return aligned_or_free(draft, _uniform)


def _uniform(draft: PlanDraft) -> Choice:
    budget = draft.budget
    if budget is None:  # only per-layer ranks were given: the other layers stay whole
        n = len(draft.slots)
        return Choice([None] * n, ["kept whole: no rank or budget covers this layer"] * n)
    ladders = [slot.candidates() for slot in draft.slots]
    # A latency budget still keeps the same share of MACs in every layer, the share set by the
    # measured total: measured time is flat over wide rank ranges (ranks 1 to 16 of a 16-channel
    # CP layer run alike), and a share of each layer's time would fall off such a plateau to
    # rank 1 for a microsecond.
    by = "macs" if budget.metric == "latency" else budget.metric
    costs = [[slot.cost(c, by) for c in ladder] for slot, ladder in zip(draft.slots, ladders)]
    sizes = [slot.cost(None, by) for slot in draft.slots]

    def level(j: int, keep: float) -> int:
        """The largest candidate within `keep` of the layer's cost (the smallest at least)."""
        return max(bisect.bisect_right(costs[j], keep * sizes[j]) - 1, 0)

    indices, _ = allocate(draft, ladders, level, 0.0, 1.0)
    reasons = []
    for slot, ladder, i in zip(draft.slots, ladders, indices):
        keep = slot.cost(ladder[i], by) / max(slot.cost(None, by), 1e-12)
        reason = f"uniform allocation for {budget.reduction:g}× {budget.metric}: keeps {keep:.0%} "
        if by != budget.metric:
            time = slot.cost(ladder[i], budget.metric) / slot.cost(None, budget.metric)
            reason += f"of the layer's {by} ({time:.0%} of its time)"
        else:
            reason += f"of the layer's {by}"
        reasons.append(reason)
    return Choice([ladder[i] for ladder, i in zip(ladders, indices)], reasons)
