"""Tests' shorthand for the one planning entry point, `select_ranks`."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from rankfold.passes import PlanningContext, select_ranks
from rankfold.passes.plan import Plan


def resolve(
    gm,
    analysis,
    policy,
    model_name: str = "model",
    calibration=None,
    search=None,
    progress=None,
    seed: int = 0,
    measured=None,
) -> tuple[Plan, dict[str, Any]]:
    """The plan and its selection report; `progress(label)` is called once per step."""
    context = PlanningContext(
        gm=gm,
        calibration=calibration,
        search=search,
        measured=measured,
        seed=seed,
        model_name=model_name,
    )
    if progress is not None:
        context.progress = lambda _label, _total: nullcontext(progress)
    selection = select_ranks(analysis, policy, context)
    return selection.plan, selection.to_dict()


def plan_of(analysis, policy, model_name: str = "model", measured=None) -> Plan:
    """The uniform/explicit plan, which needs no traced model."""
    context = PlanningContext(model_name=model_name, measured=measured)
    return select_ranks(analysis, policy, context).plan
