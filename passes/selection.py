"""Rank selectors behind one interface: `resolve_plan` dispatches on `RankPolicy.select`.

- uniform: every budgeted layer keeps the same fraction of its cost (`select_ranks`).
- energy: per layer, the smallest ranks whose unfoldings keep a fraction of their squared
  singular values (mode-T and mode-S unfoldings for Tucker-2, the T×(S·kh·kw) matrix for SVD).
- error: per layer, the smallest candidate whose decomposition's relative reconstruction error is
  within a bound (decompositions come from the cache, so any method works).
- vbmf: per-unfolding ranks estimated by empirical variational Bayesian matrix factorisation
  (Nakajima et al., JMLR 2013), as Kim et al. (ICLR 2016) and MUSCO (Gusak et al., 2019) do for
  Tucker-2 and SVD.
- eps-search, pars: data-driven, in `rankfold.passes.search`.

With a budget, the per-layer criterion has one free setting (the energy or error threshold, the
VBMF ranks' scale, the ε-ranks' cost scale): it is moved by bisection until the model fits, then
single rank steps use what is left of the budget (`rankfold.passes.plan.allocate`). No returned
plan exceeds its budget. Without a budget the criterion's own value (`RankPolicy.energy`,
`rel_error`, `epsilon`) decides, and a layer whose ranks would not make it smaller stays whole.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from torch import fx

from rankfold.passes.analysis import ModelAnalysis
from rankfold.passes.core import ConfigError
from rankfold.passes.methods import Ranks
from rankfold.passes.plan import (
    CostModel,
    Plan,
    PlanDraft,
    RankPolicy,
    Slot,
    allocate,
    budgeted_slots,
    draft_plan,
    plan_cost,
    select_ranks,
)
from rankfold.passes.search import (
    Calibration,
    DecompositionCache,
    SearchConfig,
    SearchContext,
    default_cache_dir,
    eps_search,
    pars_search,
    plot_search,
)

Choices = list[Ranks | None]
DATA_DRIVEN = ("eps-search", "pars")


def resolve_plan(
    gm: fx.GraphModule,
    analysis: ModelAnalysis,
    policy: RankPolicy,
    model_name: str = "model",
    calibration: Calibration | None = None,
    search: SearchConfig | None = None,
    progress: Callable[..., None] | None = None,
    seed: int = 0,
    measured: CostModel | None = None,
) -> tuple[Plan, dict[str, Any]]:
    """The plan `policy.select` chooses, and a JSON-serialisable report of how it chose.

    `gm`/`analysis` come from `trace`/`analyze`; `calibration` is required by eps-search and
    pars; `search` holds their settings (defaults otherwise); `progress(label)` is called once per
    finished trial (pars) or layer (eps-search), see `progress_total`; `seed` is the
    factorization seed the pipeline will decompose with, so searched blocks are the final ones;
    `measured` prices a latency budget (`policy.latency_reduction`).
    """
    start = time.perf_counter()
    search = search or SearchConfig()
    select = policy.select
    if select == "uniform":
        plan = select_ranks(analysis, policy, model_name, measured)
        return plan, _summary({"selector": "uniform"}, analysis, plan, start)
    if policy.rank is not None:
        raise ConfigError(
            f"--select {select} chooses every layer's ranks; drop --rank (ranks for single "
            "layers under 'layers' are kept)"
        )
    if select in DATA_DRIVEN and calibration is None:
        raise ConfigError(
            f"--select {select} needs calibration data; pass --train-data (labelled images, "
            "e.g. cifar10/train_lossless_5085.npz)"
        )
    draft = draft_plan(analysis, policy, model_name, needs_ranks=False, measured=measured)
    if select == "pars" and draft.budget is None:
        raise ConfigError(
            "--select pars searches under a budget; give --macs-reduction or --params-reduction"
        )
    if not draft.slots and draft.budget is None:
        return draft.finish([], []), _summary(
            {"selector": select}, analysis, draft.finish([], []), start
        )
    if select == "energy":
        choices, reasons, report = energy_selection(draft, gm, policy.energy)
    elif select == "vbmf":
        choices, reasons, report = vbmf_selection(draft, gm)
    elif select == "error":
        cache = DecompositionCache(search.cache_dir or default_cache_dir(), seed)
        choices, reasons, report = error_selection(draft, gm, policy.rel_error, cache)
    else:
        context = SearchContext(
            gm=gm,
            analysis=analysis,
            draft=draft,
            calibration=calibration,
            search=search,
            seed=seed,
            threads=torch.get_num_threads(),
        )
        if select == "eps-search":
            choices, reasons, report = eps_search(context, policy.epsilon, progress)
        else:
            choices, reasons, report = pars_search(context, pars_seeds(draft, gm), progress)
    plan = draft.finish(choices, reasons)
    return plan, _summary(report, analysis, plan, start)


def progress_total(policy: RankPolicy, analysis: ModelAnalysis, search: SearchConfig | None) -> int:
    """How many times `resolve_plan` will call `progress` (0 for selectors that do not)."""
    if policy.select == "pars":
        return (search or SearchConfig()).trials
    if policy.select == "eps-search":
        return len(budgeted_slots(analysis, policy))
    return 0


def _summary(report: dict[str, Any], analysis: ModelAnalysis, plan: Plan, start: float) -> dict:
    cost = plan_cost(analysis, plan)
    return {
        **report,
        "macs": cost.macs,
        "params": cost.params,
        "macs_reduction": analysis.total_macs / cost.macs,
        "params_reduction": analysis.total_params / cost.params,
        "seconds": time.perf_counter() - start,
    }


def pars_seeds(draft: PlanDraft, gm: fx.GraphModule) -> list[tuple[str, Choices]]:
    """Configurations PARS tries right after the uniform one: the energy and VBMF allocations
    where the methods have unfoldings (they cost no decomposition)."""
    if not all(slot.method.name in _UNFOLDING_METHODS for slot in draft.slots):
        return []
    return [
        ("energy", energy_selection(draft, gm, 1.0)[0]),
        ("vbmf", vbmf_selection(draft, gm)[0]),
    ]


# --------------------------------------------------------------------------- unfoldings

_UNFOLDING_METHODS = ("svd", "tucker2")


def _unfoldings(slot: Slot, gm: fx.GraphModule, select: str) -> list[np.ndarray]:
    """The matrices whose ranks are the method's ranks, in the order of `rank_names`."""
    name = slot.method.name
    if name not in _UNFOLDING_METHODS:
        raise ConfigError(
            f"--select {select} reads ranks off unfolding spectra, which fits svd and tucker2 but "
            f"not {name} (layer '{slot.layer.name}'); use --select error or pars for {name}"
        )
    kernel = gm.get_submodule(slot.layer.name).weight.detach().cpu().double().numpy()
    t, s = kernel.shape[:2]
    if name == "svd":
        return [kernel.reshape(t, -1)]
    return [kernel.reshape(t, -1), kernel.transpose(1, 0, *range(2, kernel.ndim)).reshape(s, -1)]


def _capped(slot: Slot, ranks: Sequence[int]) -> Ranks:
    """Clamp to the valid range; a Tucker-2 rank above the other rank × kernel area adds nothing."""
    ranks = tuple(min(max(int(r), 1), m) for r, m in zip(ranks, slot.method.max_ranks(slot.layer)))
    if slot.method.name == "tucker2":
        k = slot.layer.kernel_area
        ranks = (min(ranks[0], ranks[1] * k), min(ranks[1], ranks[0] * k))
    return ranks


def _smaller(slot: Slot, ranks: Ranks) -> bool:
    cost = slot.method.cost(slot.layer, ranks)
    return cost.params < slot.layer.params and cost.macs < slot.layer.macs


class _Chains:
    """Per slot, ranks as a non-decreasing function of one setting x, as allocation ladders.

    `ranks_at(j, x)` must be non-decreasing in x in every rank; `breakpoints[j]` are the x values
    at which slot j's ranks change. The ladder is the chain of distinct ranks that make the layer
    smaller (a prefix, since the cost only grows along the chain).
    """

    def __init__(
        self,
        draft: PlanDraft,
        ranks_at: Callable[[int, float], Ranks],
        breakpoints: Sequence[Sequence[float]],
    ) -> None:
        self.draft = draft
        self.ranks_at = ranks_at
        self.ladders: list[list[Ranks]] = []
        self.index: list[dict[Ranks, int]] = []
        for j, (slot, points) in enumerate(zip(draft.slots, breakpoints)):
            ladder: list[Ranks] = []
            for x in (-math.inf, *sorted(points)):
                ranks = ranks_at(j, x)
                if not _smaller(slot, ranks):
                    break
                if not ladder or ranks != ladder[-1]:
                    ladder.append(ranks)
            if not ladder:  # even rank 1 per mode is not smaller; the smallest candidate is
                ladder = [slot.method.candidates(slot.layer)[0]]
            self.ladders.append(ladder)
            self.index.append({ranks: i for i, ranks in enumerate(ladder)})

    def level(self, j: int, x: float) -> int:
        return self.index[j].get(self.ranks_at(j, x), len(self.ladders[j]) - 1)

    def fit(self, high: float) -> tuple[Choices, float]:
        """Allocate within the budget; also returns the setting x the bisection settled on."""
        indices, setting = allocate(self.draft, self.ladders, self.level, 0.0, high)
        return [ladder[i] for ladder, i in zip(self.ladders, indices)], setting

    def at(self, x: float) -> Choices:
        """Without a budget: each slot's ranks at x, or None where they would not shrink it."""
        out: Choices = []
        for j, slot in enumerate(self.draft.slots):
            ranks = self.ranks_at(j, x)
            out.append(ranks if _smaller(slot, ranks) else None)
        return out


# --------------------------------------------------------------------------- energy


def energy_selection(
    draft: PlanDraft, gm: fx.GraphModule, energy: float
) -> tuple[Choices, list[str], dict[str, Any]]:
    """Smallest ranks keeping `energy` of every unfolding's squared singular values per layer;
    with a budget, the common energy threshold that fits it."""
    cumulative = []
    for slot in draft.slots:
        modes = []
        for matrix in _unfoldings(slot, gm, "energy"):
            power = np.linalg.svd(matrix, compute_uv=False) ** 2
            modes.append(np.cumsum(power) / max(power.sum(), 1e-300))
        cumulative.append(modes)

    def ranks_at(j: int, e: float) -> Ranks:
        # The smallest r whose leading r values keep a fraction e (a hair of slack for rounding).
        return _capped(
            draft.slots[j],
            [int(np.searchsorted(c, e - 1e-12)) + 1 for c in cumulative[j]],
        )

    chains = _Chains(draft, ranks_at, [np.concatenate(c) for c in cumulative])
    budget = draft.budget
    if budget is None:
        choices, threshold = chains.at(energy), energy
    else:
        choices, threshold = chains.fit(1.0)
    reasons, layers = [], []
    for slot, ranks, modes in zip(draft.slots, choices, cumulative):
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
    return choices, reasons, report


# --------------------------------------------------------------------------- VBMF


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


def vbmf_selection(
    draft: PlanDraft, gm: fx.GraphModule
) -> tuple[Choices, list[str], dict[str, Any]]:
    """EVBMF ranks of each unfolding; with a budget, all scaled by the one factor that fits it."""
    estimates = [
        [evbmf_rank(matrix) for matrix in _unfoldings(slot, gm, "vbmf")] for slot in draft.slots
    ]

    def ranks_at(j: int, scale: float) -> Ranks:
        scale = max(scale, 0.0)
        return _capped(draft.slots[j], [math.floor(scale * r + 0.5) for r in estimates[j]])

    limits = [slot.method.max_ranks(slot.layer) for slot in draft.slots]
    breakpoints = [
        [(k - 0.5) / r for r, m in zip(est, lim) for k in range(1, m + 1)]
        for est, lim in zip(estimates, limits)
    ]
    chains = _Chains(draft, ranks_at, breakpoints)
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
    return choices, reasons, report


# --------------------------------------------------------------------------- error


def error_selection(
    draft: PlanDraft, gm: fx.GraphModule, rel_error: float, cache: DecompositionCache
) -> tuple[Choices, list[str], dict[str, Any]]:
    """Smallest candidate whose relative reconstruction error is within the bound, per layer;
    with a budget, the common bound that fits it. Errors are taken as non-increasing in the
    candidate (true for SVD and Tucker-2 up to ALS noise), so each layer is a binary search."""
    ladders = [slot.candidates() for slot in draft.slots]
    errors: dict[tuple[int, int], float] = {}

    def error(j: int, i: int) -> float:
        if (j, i) not in errors:
            slot = draft.slots[j]
            module = gm.get_submodule(slot.layer.name)
            errors[j, i] = cache.get(module, slot.layer, slot.method, ladders[j][i]).rel_error
        return errors[j, i]

    def smallest_within(j: int, bound: float) -> int | None:
        top = len(ladders[j]) - 1
        if error(j, top) > bound:
            return None
        low, high = 0, top
        while low < high:
            mid = (low + high) // 2
            if error(j, mid) <= bound:
                high = mid
            else:
                low = mid + 1
        return high

    def level(j: int, x: float) -> int:
        found = smallest_within(j, 1.0 - x)  # x = 1 - bound: larger x, larger ranks
        return len(ladders[j]) - 1 if found is None else found

    budget = draft.budget
    if budget is None:
        found = [smallest_within(j, rel_error) for j in range(len(ladders))]
        choices = [None if i is None else ladder[i] for ladder, i in zip(ladders, found)]
        bound = rel_error
    else:
        indices, setting = allocate(draft, ladders, level, 0.0, 1.0)
        choices = [ladder[i] for ladder, i in zip(ladders, indices)]
        found = indices
        bound = 1.0 - setting
    reasons, layers = [], []
    for j, (slot, i) in enumerate(zip(draft.slots, found)):
        if i is None:
            reasons.append(
                f"error: kept whole; even its largest candidate has relative error "
                f"{error(j, len(ladders[j]) - 1):.3f} > {rel_error:g}"
            )
            layers.append({"layer": slot.layer.name, "ranks": None})
            continue
        where = f"for {budget.reduction:g}× {budget.metric}" if budget else f"(≤ {rel_error:g})"
        reasons.append(f"error: relative reconstruction error {error(j, i):.3f} {where}")
        layers.append(
            {"layer": slot.layer.name, "ranks": list(ladders[j][i]), "rel_error": error(j, i)}
        )
    report = {
        "selector": "error",
        "bound": float(bound),
        "decompositions": cache.misses,
        "cache_hits": cache.hits,
        "layers": layers,
    }
    return choices, reasons, report


__all__ = [
    "Calibration",
    "SearchConfig",
    "energy_selection",
    "error_selection",
    "evbmf_rank",
    "pars_seeds",
    "plot_search",
    "progress_total",
    "resolve_plan",
    "vbmf_selection",
]
