"""Rank selectors, one module each, in a registry open to packages.

A selector fills the open slots of a PlanDraft (`rankfold.passes.plan.draft_plan`); the one
planning entry point, `rankfold.passes.planning.select_ranks`, drafts, checks the selector's
needs and finishes the Plan. Adding a selector is one module with a `Selector` subclass, listed
here or declared by a package in the entry-point group `rankfold.selectors`.
"""

from __future__ import annotations

from rankfold.passes.core import Registry
from rankfold.passes.selectors.base import (
    Advance,
    Choice,
    PlanningContext,
    ProgressFactory,
    Selector,
    no_progress,
)
from rankfold.passes.selectors.energy import EnergySelector
from rankfold.passes.selectors.eps_search import EpsSearchSelector
from rankfold.passes.selectors.error import ErrorSelector
from rankfold.passes.selectors.output import OutputErrorSelector
from rankfold.passes.selectors.pars import ParsSelector
from rankfold.passes.selectors.uniform import UniformSelector
from rankfold.passes.selectors.vbmf import VBMFSelector, evbmf_rank

SELECTORS: Registry[Selector] = Registry("rank selector", Selector, "rankfold.selectors")
register_selector = SELECTORS.register
get_selector = SELECTORS.get_named


for _selector in (
    UniformSelector(),
    EnergySelector(),
    ErrorSelector(),
    OutputErrorSelector(),
    VBMFSelector(),
    EpsSearchSelector(),
    ParsSelector(),
):
    SELECTORS.register(_selector)
SELECTORS.load_entry_points()

__all__ = [
    "Advance",
    "Choice",
    "PlanningContext",
    "ProgressFactory",
    "SELECTORS",
    "Selector",
    "evbmf_rank",
    "get_selector",
    "no_progress",
    "register_selector",
]
