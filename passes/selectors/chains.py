"""Shared machinery of criterion selectors: ranks as a non-decreasing function of one setting
(an energy threshold, a scale), turned into allocation ladders; the spectra they read."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from torch import fx

from rankfold.passes.core import ConfigError
from rankfold.passes.methods import METHODS, Ranks, kernel_array
from rankfold.passes.plan import Choices, PlanDraft, Slot, allocate


def _kernel(slot: Slot, gm: fx.GraphModule) -> np.ndarray:
    # The conv layout T×(S/g)×k… for transposed convs too: groups are contiguous in T.
    return kernel_array(gm.get_submodule(slot.layer.name))


def unfoldings(slot: Slot, gm: fx.GraphModule, selector: str) -> list[list[np.ndarray]]:
    """Per group of the layer (one unless it is a grouped conv, whose ranks are per group), the
    matrices whose ranks are the slot method's ranks, in the order of `rank_names`."""
    kernel = _kernel(slot, gm)
    if slot.method.unfoldings(kernel) is None:
        fitting = [m.name for m in METHODS.values() if m.unfoldings(kernel) is not None]
        raise ConfigError(
            f"--select {selector} reads ranks off unfolding spectra, which fits "
            f"{' and '.join(fitting)} but not {slot.method.name} (layer '{slot.layer.name}'); "
            f"use --select error or pars for {slot.method.name}"
        )
    return [slot.method.unfoldings(group) for group in np.split(kernel, slot.layer.groups)]


def has_unfoldings(draft: PlanDraft, gm: fx.GraphModule) -> bool:
    """Whether every slot's method exposes unfoldings (energy and VBMF then apply)."""
    return all(slot.method.unfoldings(_kernel(slot, gm)) is not None for slot in draft.slots)


class RankChains:
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
                if not slot.method.shrinks(slot.layer, ranks):
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
            out.append(ranks if slot.method.shrinks(slot.layer, ranks) else None)
        return out
