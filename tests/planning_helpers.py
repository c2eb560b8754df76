"""Tests' shorthands for the one planning entry point, `select_ranks`, and for `compress`."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from rankfold.converter import build_config, compress
from rankfold.models import load_model
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
    if policy.select is None:
        policy = policy.model_copy(update={"select": "uniform"})
    context = PlanningContext(model_name=model_name, measured=measured)
    return select_ranks(analysis, policy, context).plan


def compress_digits(settings: dict[str, Any], **changes: Any):
    """`compress` of a fresh, seeded digits CNN with `settings` updated by `changes`."""
    torch.manual_seed(0)
    model, spec = load_model("digits-cnn")
    config = build_config({**settings, **changes})
    return compress(model, torch.zeros(1, *spec.input_shape), config, spec)
