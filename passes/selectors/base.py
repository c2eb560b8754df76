"""What a rank selector is: it fills the open slots of a PlanDraft with ranks."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rankfold.passes.plan import Choices, CostModel, PlanDraft, plan_cost

if TYPE_CHECKING:
    from torch import nn

    from rankfold.passes.search import Calibration, DecompositionCache, SearchConfig
    from rankfold.passes.statistics import LayerStatistics
    from rankfold.passes.surgery import FillProcesses

Advance = Callable[..., None]
# (label, total) → a context manager yielding a function called once per step done.
ProgressFactory = Callable[[str, int], AbstractContextManager[Advance]]


def no_progress(_label: str, _total: int) -> AbstractContextManager[Advance]:
    return nullcontext(lambda *_: None)


@dataclass
class PlanningContext:
    """What planning may read besides the layer table and the policy.

    `gm`: the traced model, or on the capture path the model itself (its kernels, for
    spectral, error and data-driven selectors);
    `calibration`: labelled data (eps-search, pars); `measured`: prices a latency budget;
    `cache`: the decomposition cache the search fills and the final decomposition reuses;
    `seed`: the factorization seed, so searched blocks are the final ones;
    `statistics`: layer input statistics, so searched blocks are fitted data-aware as the final
    ones are (the cache the selector makes carries them);
    `moments`: layer input statistics for selectors that read them (`--select output`), whether
    or not the fits are data-aware;
    `processes`: worker processes already started for GIL-bound fits (`compress` starts them
    early), which a selector that fits layers uses instead of starting its own.
    """

    gm: nn.Module | None = None
    calibration: Calibration | None = None
    search: SearchConfig | None = None
    measured: CostModel | None = None
    cache: DecompositionCache | None = None
    seed: int = 0
    statistics: LayerStatistics | None = None
    moments: LayerStatistics | None = None
    model_name: str = "model"
    progress: ProgressFactory = no_progress
    processes: FillProcesses | None = None


@dataclass
class Choice:
    """A selector's answer: ranks per slot (None keeps the layer whole), why, and its report."""

    choices: Choices
    reasons: list[str]
    report: dict[str, Any] = field(default_factory=dict)


class Selector(ABC):
    """One way of choosing ranks; registered by name in `rankfold.passes.selectors`."""

    name: str
    summary: str  # one line, for `rankfold selectors` and the CLI help
    uses_global_rank = False  # a global --rank decides the layers when there is no budget
    needs_kernels = True  # reads the layers' weights (context.gm)
    needs_calibration = False  # reads labelled data (context.calibration)
    needs_budget = False  # only works under a whole-model budget
    needs_statistics = False  # reads layer input statistics (context.moments)
    uses_cache = False  # factorizes candidates (context.cache)
    # The settings it reads beyond the budget, as dotted config paths (`search.trials`): a
    # given value is refused under a selector that reads none of them.
    reads: frozenset[str] = frozenset()

    def plans(self, draft: PlanDraft, context: PlanningContext) -> bool:
        """Whether this selector can choose every slot of `draft` (a method's default selector
        that cannot, e.g. energy with some layers planned by cp, gives way to uniform)."""
        return True

    def steps(self, draft: PlanDraft, context: PlanningContext) -> int:
        """How many progress steps `choose` reports (0: no progress bar)."""
        return 0

    @abstractmethod
    def choose(self, draft: PlanDraft, context: PlanningContext, advance: Advance) -> Choice:
        """Ranks for every slot of `draft`; with a budget, the plan must fit it."""


def aligned_or_free(draft: PlanDraft, choose: Callable[[PlanDraft], Choice]) -> Choice:
    """`choose` with ranks aligned to the slots' channel blocks (the fast ones); where a MACs or
    parameter budget then misses by more than 5 % (blocks too coarse for this model), `choose`
    again with free ranks, noted in every reason: exact budget first, speed second. A latency
    budget keeps aligned ranks whatever the MACs."""
    choice = choose(draft)
    budget = draft.budget
    if budget is None or budget.metric == "latency" or not any(s.block for s in draft.slots):
        return choice
    planned = draft.finish(choice.choices, choice.reasons)
    achieved = budget.total / plan_cost(draft.analysis, planned).get(budget.metric)
    if abs(achieved / budget.reduction - 1) <= 0.05:
        return choice
    free = dataclasses.replace(
        draft, slots=[dataclasses.replace(slot, round_to=None) for slot in draft.slots]
    )
    choice = choose(free)
    note = f" (ranks not aligned: aligned ones reach only {achieved:.2f}×)"
    choice.reasons = [reason + note for reason in choice.reasons]
    return choice
