"""The one planning entry point: (analysis, policy, context) → a Plan, for every selector and
method, budgets in MACs, parameters or measured latency included.

Rounding to fast ranks, the latency gate and whole-model latency calibration refine the Plan
afterwards (Plan → Plan: `rankfold.passes.latency_gate`, `rankfold.converter.calibration`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rankfold.passes.analysis import ModelAnalysis
from rankfold.passes.core import ConfigError
from rankfold.passes.plan import Plan, RankPolicy, draft_plan, plan_cost
from rankfold.passes.search import DecompositionCache, SearchConfig, default_cache_dir
from rankfold.passes.selectors import PlanningContext, get_selector


@dataclass
class Selection:
    """A plan and how it was chosen: the selector, its own report, and the planned cost."""

    plan: Plan
    selector: str
    seconds: float
    macs: int
    params: int
    macs_reduction: float
    params_reduction: float
    details: dict[str, Any] = field(default_factory=dict)
    by_default: bool = False  # the selector is the method's default, not one the user named

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.details,
            "selector": self.selector,
            "by_default": self.by_default,
            "macs": self.macs,
            "params": self.params,
            "macs_reduction": self.macs_reduction,
            "params_reduction": self.params_reduction,
            "seconds": self.seconds,
        }


def select_ranks(
    analysis: ModelAnalysis, policy: RankPolicy, context: PlanningContext | None = None
) -> Selection:
    """Resolve per-layer methods and ranks into a Plan with the selector `policy.selector` names
    (the user's `select`, else the method's default).

    Explicit ranks, skips and unsupported layers are decided first (`draft_plan`); the selector
    fills the rest. `context` holds what selectors may read (the traced model, calibration data,
    measured latency, the decomposition cache) and a progress factory; selectors that need what
    is missing fail here with a one-line error, before any work.
    """
    start = time.perf_counter()
    context = context or PlanningContext()
    selector = get_selector(policy.selector)
    if policy.rank is not None and not selector.uses_global_rank:
        raise ConfigError(
            f"--select {selector.name} chooses every layer's ranks; drop --rank (ranks for "
            "single layers under 'layers' are kept)"
        )
    draft = draft_plan(
        analysis,
        policy,
        context.model_name,
        global_rank=selector.uses_global_rank,
        measured=context.measured,
    )
    fallback = None
    if policy.select is None and not selector.plans(draft, context):
        fallback = (
            f"{selector.name}, the {policy.method} method's default, cannot plan every layer "
            "(another method's among them): uniform planned the budget"
        )
        selector = get_selector("uniform")
    if selector.needs_calibration and context.calibration is None:
        raise ConfigError(
            f"--select {selector.name} needs calibration data; pass --train-data (labelled "
            "images, e.g. cifar10/train_lossless_5085.npz)"
        )
    if selector.needs_statistics and context.moments is None:
        raise ConfigError(
            f"--select {selector.name} reads the layers' input statistics; pass --train-data "
            "(or PlanningContext(moments=layer_statistics(...)))"
        )
    if selector.needs_kernels and context.gm is None:
        if policy.select is None:
            raise ConfigError(
                f"{selector.name}, the {policy.method} method's selector under a budget, reads "
                "the layers' weights; pass PlanningContext(gm=the traced model) or name a "
                "selector (RankPolicy(select='uniform'))"
            )
        raise ConfigError(
            f"--select {selector.name} reads the layers' weights; pass PlanningContext(gm=the "
            "traced model)"
        )
    if selector.needs_budget and draft.budget is None:
        raise ConfigError(
            f"--select {selector.name} searches under a budget; give --macs-reduction, "
            "--params-reduction or a latency reduction"
        )
    if selector.uses_cache:
        context.search = context.search or SearchConfig()
        if context.cache is None:
            directory = context.search.cache_dir or default_cache_dir()
            context.cache = DecompositionCache(directory, context.seed, context.statistics)
    details: dict[str, Any] = {}
    if draft.slots or draft.budget is not None:
        with context.progress(f"select ({selector.name})", selector.steps(draft, context)) as step:
            choice = selector.choose(draft, context, step)
        plan, details = draft.finish(choice.choices, choice.reasons), choice.report
    else:
        plan = draft.finish([], [])
    cost = plan_cost(analysis, plan)
    details.pop("selector", None)
    if fallback is not None:
        details["default_fallback"] = fallback
    return Selection(
        plan=plan,
        selector=selector.name,
        by_default=policy.select is None and selector.name != "uniform",
        seconds=time.perf_counter() - start,
        macs=cost.macs,
        params=cost.params,
        macs_reduction=analysis.total_macs / cost.macs,
        params_reduction=analysis.total_params / cost.params,
        details=details,
    )
