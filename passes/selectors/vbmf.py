"""vbmf: per-unfolding ranks estimated by empirical variational Bayesian matrix factorisation
(Nakajima et al., JMLR 2013), as Kim et al. (ICLR 2016) and MUSCO (Gusak et al., 2019) do for
Tucker-2 and SVD. With a budget, all estimates are scaled by the one factor that fits it.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar
from torch import fx

from rankfold.passes.methods import Ranks
from rankfold.passes.plan import PlanDraft
from rankfold.passes.selectors.base import Advance, Choice, PlanningContext, Selector
from rankfold.passes.selectors.chains import RankChains, unfoldings


class VBMFSelector(Selector):
    name = "vbmf"
    summary = "ranks estimated by empirical variational Bayesian matrix factorisation"

    def choose(self, draft: PlanDraft, context: PlanningContext, advance: Advance) -> Choice:
        return vbmf_choice(draft, context.gm)


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    return 0.5 * (x - (1 + alpha) + np.sqrt(np.maximum((x - (1 + alpha)) ** 2 - 4 * alpha, 0)))


def _evb_free_energy(
    sigma2: float, rows: int, cols: int, values: np.ndarray, x_bar: float
) -> float:
    """Minus the log evidence of EVB matrix factorisation at noise variance `sigma2`, up to
    constants (Nakajima et al., JMLR 2013, the objective minimised for σ²)."""
    alpha = rows / cols
    x = np.maximum(values**2 / (cols * sigma2), 1e-300)
    large, small = x[x > x_bar], x[x <= x_bar]
    tau = _tau(large, alpha)
    return float(
        np.sum(small - np.log(small))
        + np.sum(large - tau)
        + np.sum(np.log((tau + 1) / large))
        + alpha * np.sum(np.log(tau / alpha + 1))
    )


def evbmf_rank(matrix: np.ndarray) -> int:
    """The rank empirical variational Bayesian matrix factorisation keeps (≥ 1).

    Hand-written (no maintained library implements EVBMF): the global analytic solution of
    Nakajima, Sugiyama, Babacan and Tomioka (JMLR 2013). The noise variance σ² minimises the free
    energy over its analytic bounds; a singular value survives when it exceeds
    √(M σ² (1 + τ̄)(1 + α/τ̄)), with α = L/M ≤ 1 and τ̄ = 2.5129 √α.
    """
    y = np.asarray(matrix, dtype=np.float64)
    if y.ndim != 2:
        raise ValueError(f"evbmf_rank expects a matrix, got shape {y.shape}")
    if y.shape[0] > y.shape[1]:
        y = y.T
    rows, cols = y.shape
    values = np.linalg.svd(y, compute_uv=False)
    if rows < 2 or values[0] <= 0:
        return 1
    alpha = rows / cols
    tau_bar = 2.5129 * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    upper_rank = min(math.ceil(rows / (1 + alpha)) - 1, rows) - 1
    upper = float(np.sum(values**2) / (rows * cols))
    lower = max(
        float(values[upper_rank + 1] ** 2 / (cols * x_bar)),
        float(np.mean(values[upper_rank + 1 :] ** 2) / cols),
    )
    if not lower < upper:
        return 1
    sigma2 = minimize_scalar(
        _evb_free_energy,
        args=(rows, cols, values, x_bar),
        bounds=(lower, upper),
        method="bounded",
    ).x
    threshold = math.sqrt(cols * sigma2 * x_bar)
    return max(int(np.sum(values > threshold)), 1)


def vbmf_choice(draft: PlanDraft, gm: fx.GraphModule) -> Choice:
    """EVBMF ranks of each unfolding; with a budget, all scaled by the one factor that fits it."""
    # A grouped conv's ranks are per group, equal in every group: the largest group's estimate.
    estimates = [
        [
            max(evbmf_rank(matrix) for matrix in matrices)
            for matrices in zip(*unfoldings(slot, gm, "vbmf"))
        ]
        for slot in draft.slots
    ]

    def ranks_at(j: int, scale: float) -> Ranks:
        scale = max(scale, 0.0)
        slot = draft.slots[j]
        return slot.method.clamp_ranks(
            slot.layer, [math.floor(scale * r + 0.5) for r in estimates[j]]
        )

    limits = [slot.method.max_ranks(slot.layer) for slot in draft.slots]
    breakpoints = [
        [(k - 0.5) / r for r, m in zip(est, lim) for k in range(1, m + 1)]
        for est, lim in zip(estimates, limits)
    ]
    chains = RankChains(draft, ranks_at, breakpoints)
    budget = draft.budget
    if budget is None:
        choices, scale = chains.at(1.0), 1.0
    else:
        high = max(max(lim) / min(est) for est, lim in zip(estimates, limits)) + 1
        choices, scale = chains.fit(high)
    reasons, layers = [], []
    for slot, ranks, est in zip(draft.slots, choices, estimates):
        layers.append(
            {"layer": slot.layer.name, "vbmf": est, "ranks": None if ranks is None else list(ranks)}
        )
        if ranks is None:
            reasons.append(f"vbmf: kept whole; the estimated ranks {est} do not make it smaller")
        elif budget is None:
            reasons.append(f"vbmf: estimated ranks {est}")
        else:
            reasons.append(
                f"vbmf: estimated ranks {est}, scaled ×{scale:.2f} for {budget.reduction:g}× "
                f"{budget.metric}"
            )
    report = {"selector": "vbmf", "scale": float(scale), "layers": layers}
    return Choice(choices, reasons, report)
