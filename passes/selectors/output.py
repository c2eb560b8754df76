"""output: ranks that minimise the summed normalised output error of the layers under the budget.

A layer's output error at given ranks is read off the spectra of its *whitened* kernel, W ×₂ Lᵀ
with L Lᵀ the (damped) second moment of the layer's input (`rankfold.passes.statistics`):
E‖(W − Ŵ)x‖² = ‖(W − Ŵ)L‖², so the squared singular values the ranks drop from an unfolding of
the whitened kernel are the output error they cost. Per layer, normalised by E‖Wx‖²:

    e(r_1, …) = Σ_m Σ_{i > r_m} σ_i(unfolding_m(W ×₂ Lᵀ))² / ‖W ×₂ Lᵀ‖²

For `svd` this is exactly the error of the whitened SVD (`--data-aware`) in the channel-moment
metric, and a lower bound for the weight-only fit; for `tucker2` the sum over the two modes
bounds the truncated HOSVD's error. A grouped conv sums its groups' spectra, each whitened by its
own channels' moment. The allocation minimises Σ_layers e subject to the budget by a Lagrange
multiplier: each layer takes the candidate minimising e + λ·cost, λ moved by bisection until the
plan fits (`allocate`).

Hand-written: no library allocates ranks from whitened spectra; the algebra above is all of it.
"""

from __future__ import annotations

import math

import numpy as np
from torch import fx

from rankfold.passes.core import ConfigError
from rankfold.passes.methods import kernel_array
from rankfold.passes.plan import PlanDraft, Slot, allocate
from rankfold.passes.selectors.base import Advance, Choice, PlanningContext, Selector
from rankfold.passes.selectors.chains import unfoldings
from rankfold.passes.statistics import LayerStatistics, Whitening

# λ = e^(−x) per unit of the layers' whole cost: at x = −60 every layer takes its smallest
# candidate, at x = 60 its least-error one (normalised errors lie in [0, number of modes]).
_SETTING_RANGE = 60.0


class OutputErrorSelector(Selector):
    name = "output"
    summary = (
        "ranks minimising the summed output error on the training images under the budget "
        "(whitened spectra; svd, tucker2)"
    )
    needs_budget = True
    needs_statistics = True

    def choose(self, draft: PlanDraft, context: PlanningContext, advance: Advance) -> Choice:
        return output_choice(draft, context.gm, context.moments)


def output_error_curves(
    slot: Slot, gm: fx.GraphModule, moments: LayerStatistics
) -> list[np.ndarray]:
    """Per rank mode of the slot's method, the normalised output error the ranks 0, 1, 2, …
    of that mode leave (index r: the error at rank r), from the whitened kernel's spectra."""
    unfoldings(slot, gm, "output")  # a method without unfoldings fails with the usual advice
    name = slot.layer.name
    if name not in moments.moments:
        raise ConfigError(
            f"--select output has no input statistics for layer '{name}'; skip it (--skip "
            f"{name}) or use another selector"
        )
    kernel = kernel_array(gm.get_submodule(name))
    moment = moments.moments[name].moment
    groups = slot.layer.groups
    width = kernel.shape[1]  # input channels per group
    power: list[np.ndarray] | None = None
    total = 0.0
    for g, group in enumerate(np.split(kernel, groups)):
        block = moment[g * width : (g + 1) * width, g * width : (g + 1) * width]
        whitened = Whitening.from_moment(block, moments.damping).transform(group)
        total += float(np.sum(whitened * whitened))
        spectra = [
            np.linalg.svd(matrix, compute_uv=False) ** 2
            for matrix in slot.method.unfoldings(whitened)
        ]
        power = spectra if power is None else [p + s for p, s in zip(power, spectra)]
    total = max(total, 1e-300)
    return [np.concatenate([[total], total - np.cumsum(p)]).clip(min=0.0) / total for p in power]


def output_choice(draft: PlanDraft, gm: fx.GraphModule, moments: LayerStatistics | None) -> Choice:
    """The candidates minimising Σ normalised output error within the budget (Lagrangian)."""
    if moments is None:
        raise ConfigError("--select output reads layer input statistics; pass --train-data")
    budget = draft.budget
    if budget is None:
        raise ConfigError("--select output allocates a budget; give --macs-reduction or similar")
    ladders = [slot.candidates() for slot in draft.slots]
    errors, costs = [], []
    for slot, ladder in zip(draft.slots, ladders):
        curves = output_error_curves(slot, gm, moments)
        at = [sum(c[min(r, len(c) - 1)] for c, r in zip(curves, ranks)) for ranks in ladder]
        errors.append(np.array(at))
        costs.append(np.array([slot.cost(ranks, budget.metric) for ranks in ladder], dtype=float))
    scale = max(sum(float(c[-1]) for c in costs), 1e-300)

    def level(j: int, x: float) -> int:
        # The cost-sorted ladder's minimiser of e + λ·cost: its cost never falls as λ falls.
        return int(np.argmin(errors[j] + math.exp(-x) / scale * costs[j]))

    indices, setting = allocate(draft, ladders, level, -_SETTING_RANGE, _SETTING_RANGE)
    choices = [ladder[i] for ladder, i in zip(ladders, indices)]
    reasons, layers = [], []
    for slot, ladder, i, error in zip(draft.slots, ladders, indices, errors):
        reasons.append(
            f"output: predicted output error {float(error[i]):.4f} (share of the layer's output "
            f"energy) for {budget.reduction:g}× {budget.metric}"
        )
        layers.append(
            {
                "layer": slot.layer.name,
                "ranks": list(ladder[i]),
                "predicted_output_error": float(error[i]),
            }
        )
    report = {
        "selector": "output",
        "multiplier": math.exp(-setting) / scale,
        "images": moments.images,
        "summed_output_error": float(sum(e[i] for e, i in zip(errors, indices))),
        "layers": layers,
    }
    return Choice(choices, reasons, report)
