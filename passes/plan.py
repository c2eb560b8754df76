"""Decide, then do: resolve every layer's method and ranks into a Plan before any surgery.

Per-layer settings follow a fixed precedence (global < module type < glob or parent name < exact
name); keys are strings, never module objects. A budget (`macs_reduction`, `params_reduction`,
or `latency_reduction` priced by a measured `CostModel`) is met by a selector
(`RankPolicy.selector`: uniform keeps the same fraction of every layer's cost, energy a common
share of its unfoldings' energy, …), its setting found by bisection, then single rank steps close
the remaining gap without exceeding it.
`draft_plan` and `allocate` are the shared machinery of every budgeted selector
(`rankfold.passes.selectors`): a draft decides all layers but the budgeted slots, and `allocate`
fits one option per slot into the budget.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rankfold.passes.analysis import LayerInfo, ModelAnalysis
from rankfold.passes.core import ConfigError, PlanError, atomic_write_json
from rankfold.passes.methods import Cost, Method, Ranks, get_method, method_for_layer

RankSpec = int | float | list[int]
Choices = list[Ranks | None]  # per budgeted slot: ranks, or None to keep the layer whole


def _check_rank_spec(value: RankSpec | None) -> RankSpec | None:
    if isinstance(value, bool):
        raise ValueError("a rank is an integer ≥ 1, a ratio in (0, 1], or a list of integers")
    if isinstance(value, float) and not 0 < value <= 1:
        raise ValueError(f"a rank ratio must lie in (0, 1], got {value}")
    if isinstance(value, int) and value < 1:
        raise ValueError(f"a rank must be ≥ 1, got {value}")
    if isinstance(value, list) and (not value or any(v < 1 for v in value)):
        raise ValueError(f"ranks must be integers ≥ 1, got {value}")
    return value


class LayerOverride(BaseModel):
    """Settings for the layers a key matches; unset fields fall through to less specific keys."""

    model_config = ConfigDict(extra="forbid")

    method: str | None = None
    rank: RankSpec | None = None
    skip: bool | None = None

    _check = field_validator("rank")(classmethod(lambda cls, v: _check_rank_spec(v)))


class RankPolicy(BaseModel):
    """How ranks are chosen: a method, then explicit ranks or a whole-model budget."""

    model_config = ConfigDict(extra="forbid")

    method: str = "tucker2"
    rank: RankSpec | None = None
    macs_reduction: float | None = Field(default=None, gt=1)
    params_reduction: float | None = Field(default=None, gt=1)
    # --latency-reduction: the sum of the conv/linear layers' measured times divided by this
    # (a speedup of those layers), priced by a CostModel such as runtime.LatencyMetric.
    latency_reduction: float | None = Field(default=None, gt=1)
    layers: dict[str, LayerOverride] = Field(default_factory=dict)
    skip: list[str] = Field(default_factory=list)
    min_macs_share: float = Field(default=0.005, ge=0, lt=1)
    # In layers at least four blocks wide, budgeted ranks of round_to and more are multiples of it
    # (dropped, with a note, when aligned ranks cannot meet the budget within 5 %). onnxruntime's
    # CPU convolutions work on channel blocks (16 with AVX-512, 8 with AVX2) and wrap other
    # channel counts in layout reorders: ResNet-18 CP at 3× ran 1.91× faster with raw ranks,
    # 2.79× rounded to 16. "auto" takes the --provider's block (the converter resolves it; a
    # pass left with "auto" does not round); explicit per-layer ranks are never rounded. With
    # the latency gate, the other layers' ranks move to a multiple when measured faster
    # (rankfold.passes.latency_gate.round_ranks).
    round_to: Annotated[int, Field(ge=0)] | Literal["auto"] | None = "auto"
    # How budgeted ranks are chosen: a registered selector (rankfold.passes.selectors; uniform
    # keeps the same fraction of every layer's cost, the others rank layers by a criterion).
    # None: `selector` decides.
    select: str | None = None
    # Without a budget: the per-layer criterion itself. With one, the criterion's threshold is
    # moved until the model fits the budget, so these values only matter without a budget.
    energy: float = Field(default=0.95, gt=0, le=1)  # retained energy of the unfoldings
    rel_error: float = Field(default=0.3, gt=0, lt=1)  # relative reconstruction error
    epsilon: float = Field(default=0.01, ge=0, lt=1)  # eps-search: accuracy drop, a fraction

    _check = field_validator("rank")(classmethod(lambda cls, v: _check_rank_spec(v)))

    @property
    def budgeted(self) -> bool:
        return any(
            value is not None
            for value in (self.macs_reduction, self.params_reduction, self.latency_reduction)
        )

    @property
    def reads_energy(self) -> bool:
        """Whether `energy` is read: by the energy selector without a budget (with one, the
        threshold is bisected until the plan fits)."""
        return self.selector == "energy" and not self.budgeted

    @property
    def selector(self) -> str:
        """The selector that plans: the one named, else the method's `budget_selector` under a
        MACs or parameter budget with no global rank, else uniform (which also plans latency
        budgets: measured times are flat over wide rank ranges)."""
        if self.select is not None:
            return self.select
        if self.budgeted and self.rank is None and self.latency_reduction is None:
            return get_method(self.method).budget_selector
        return "uniform"


class LayerPlan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    type: str
    method: str | None = None
    ranks: list[int] | None = None
    reason: str

    @property
    def decompose(self) -> bool:
        return self.method is not None


class Plan(BaseModel):
    """module name → method, ranks, reason; saved as plan.json and replayable with --plan."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1, 2] = 2  # 2: records the architecture's fingerprint
    model: str
    method: str
    target: dict[str, float] | None = None
    fingerprint: str | None = None  # ModelAnalysis.fingerprint() of the model it was made for
    layers: list[LayerPlan]

    def decomposed(self) -> list[LayerPlan]:
        return [layer for layer in self.layers if layer.decompose]

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.model_dump())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"plan file {path} not found; pass the plan.json a compress run wrote"
            )
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError(f"plan file {path} is not a valid rankfold plan ({first})") from None
        except ValidationError as exc:
            error = exc.errors()[0]  # where, and what was there
            where = ".".join(str(part) for part in error["loc"])
            raise ConfigError(
                f"plan file {path} is not a valid rankfold plan ({where}: {error['msg']}, got "
                f"{error['input']!r})"
            ) from None


def _matches(key: str, layer: LayerInfo) -> int:
    """Specificity of `key` for `layer`: 0 no match, 1 type, 2 glob or parent, 3 exact name."""
    if key == layer.name:
        return 3
    if layer.name.startswith(key + ".") or (
        any(ch in key for ch in "*?[") and fnmatch.fnmatchcase(layer.name, key)
    ):
        return 2
    if key == layer.type:
        return 1
    return 0


def _check_patterns(policy: RankPolicy, analysis: ModelAnalysis) -> None:
    """Every per-layer key and skip must match a layer (a typo would silently do nothing)."""
    for key, option in [
        *((k, "--layer-rank") for k in policy.layers),
        *((k, "--skip") for k in policy.skip),
    ]:
        if any(_matches(key, layer) for layer in analysis.layers):
            continue
        candidates = [layer.name for layer in analysis.layers]
        candidates += sorted({layer.type for layer in analysis.layers})
        close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.5)
        hint = (
            f"closest: {', '.join(close)}"
            if close
            else f"layers are e.g. {', '.join(candidates[:3])}"
        )
        raise ConfigError(f"{option} '{key}' matches no layer ({hint}); see `rankfold analyze`")


def _resolved_override(policy: RankPolicy, layer: LayerInfo) -> tuple[LayerOverride, str]:
    merged: dict = {}
    source = ""
    hits = sorted(
        ((_matches(key, layer), len(key), key, o) for key, o in policy.layers.items()),
        key=lambda item: item[:2],
    )
    for specificity, _, key, override in hits:
        if specificity:
            merged.update(override.model_dump(exclude_none=True))
            source = key
    if any(_matches(key, layer) for key in policy.skip):
        merged.setdefault("skip", True)
        source = source or "skip"
    return LayerOverride(**merged), source


def normalize_ranks(
    method: Method, layer: LayerInfo, spec: RankSpec, strict: bool = True
) -> tuple[Ranks, str]:
    """The one rank normaliser: an int, a ratio or a list becomes valid integer ranks.

    Strict (a rank given for this layer): out-of-range or enlarging ranks are errors. Not strict
    (one rank for all layers): ranks are clamped to the valid range, and the note says so.
    Returns the ranks and a note ("" when nothing was clamped).
    """
    if isinstance(spec, float):
        ratio_ranks = method.ranks_from_ratio(layer, spec)
        ranks = tuple(min(r, m) for r, m in zip(ratio_ranks, method.max_ranks(layer)))
    else:
        ranks = method.normalize_ranks(layer, spec)
    limits = method.max_ranks(layer)
    if len(ranks) != len(limits):
        raise PlanError(
            f"{method.name} takes {len(limits)} rank(s) ({', '.join(method.rank_names)}) but layer "
            f"'{layer.name}' was given {list(ranks)}; give {len(limits)} value(s)"
        )
    note = ""
    for value, limit, label in zip(ranks, limits, method.rank_names):
        if not 1 <= value <= limit:
            if strict:
                raise PlanError(
                    f"{label} {value} for layer '{layer.name}' ({method.name}) is impossible; "
                    f"choose a value in [1, {limit}]"
                )
            note = f"clamped to the maximum {list(limits)}"
    ranks = tuple(min(max(v, 1), m) for v, m in zip(ranks, limits))
    cost = method.cost(layer, ranks)
    if strict and not cost.smaller_than(layer):
        largest = [c for c in method.candidates(layer) if method.shrinks(layer, c)]
        hint = f"at most {list(largest[-1])}" if largest else "skip the layer"
        raise PlanError(
            f"ranks {list(ranks)} make layer '{layer.name}' larger than the original "
            f"({cost.params:,} params / {cost.macs:,} MACs vs {layer.params:,} / {layer.macs:,}); "
            f"choose ranks {hint}"
        )
    return ranks, note


def resolve_round_to(value: int | str | None, auto_block: int | None) -> int | None:
    """ "auto" → `auto_block`, the deployment backend's channel block (its caller knows the
    hardware; a pass does not, and passes None); 0 or None → no rounding."""
    return auto_block if value == "auto" else (value or None)


def _aligned(ranks: Ranks, multiple: int | None) -> bool:
    """Ranks below one block stay free; larger ones must fill whole blocks."""
    return multiple is None or all(r < multiple or r % multiple == 0 for r in ranks)


class CostModel(Protocol):
    """Measured cost of layers and blocks (milliseconds for latency), for non-analytic budgets."""

    name: str

    def layer(self, layer: LayerInfo) -> float: ...

    def block(self, layer: LayerInfo, method: Method, ranks: Sequence[int]) -> float: ...

    def total(self, analysis: ModelAnalysis) -> float: ...


@dataclass(frozen=True)
class Budget:
    """A whole-model target: `metric` ("macs", "params" or "latency") divided by `reduction`."""

    metric: str
    reduction: float
    total: float  # the original model's cost
    fixed: float  # cost of everything outside the budgeted layers (explicit ranks included)

    @property
    def goal(self) -> float:
        return self.total / self.reduction


@dataclass(frozen=True)
class Slot:
    """A layer whose ranks a selector chooses: where its entry sits in the plan, and its method."""

    index: int
    layer: LayerInfo
    method: Method
    note: str
    round_to: int | None = None
    measured: CostModel | None = None  # prices the "latency" metric

    def candidates(self) -> list[Ranks]:
        """The method's candidate ranks that make the layer smaller, by increasing cost."""
        return [
            c
            for c in self.method.candidates(self.layer)
            if self.method.shrinks(self.layer, c) and _aligned(c, self.block)
        ]

    @property
    def block(self) -> int | None:
        """The channel block ranks align to; layers under four blocks wide keep free ranks, where
        a block step costs accuracy (ResNet-56 CP at 2×: 87.9 % aligned vs 91.9 % free)."""
        one = self.layer.one_group  # a grouped conv's ranks are per group
        widest = max(one.in_features, one.out_features)
        return self.round_to if self.round_to and widest >= 4 * self.round_to else None

    def cost(self, ranks: Ranks | None, metric: str) -> float:
        """The block's cost at `ranks`; None means the layer is kept whole."""
        if metric == "latency":
            if self.measured is None:
                raise ConfigError("a latency budget needs measured times (a CostModel)")
            if ranks is None:
                return self.measured.layer(self.layer)
            return self.measured.block(self.layer, self.method, ranks)
        if ranks is None:
            return getattr(self.layer, metric)
        return self.method.cost(self.layer, ranks).get(metric)


@dataclass
class PlanDraft:
    """A plan whose budgeted layers are still open: every other layer is already decided."""

    model_name: str
    policy: RankPolicy
    analysis: ModelAnalysis
    entries: list[LayerPlan]
    slots: list[Slot]
    budget: Budget | None

    def finish(self, choices: Sequence[Ranks | None], reasons: Sequence[str]) -> Plan:
        """The plan with slot i at `choices[i]` (None: kept whole), explained by `reasons[i]`."""
        entries = list(self.entries)
        for slot, ranks, reason in zip(self.slots, choices, reasons, strict=True):
            note = f" ({slot.note})" if slot.note and ranks is not None else ""
            entries[slot.index] = LayerPlan(
                name=slot.layer.name,
                type=slot.layer.type,
                method=None if ranks is None else slot.method.name,
                ranks=None if ranks is None else list(ranks),
                reason=f"{reason}{note}",
            )
        target = None
        if self.budget is not None:
            target = {f"{self.budget.metric}_reduction": float(self.budget.reduction)}
        return Plan(
            model=self.model_name,
            method=self.policy.method,
            target=target,
            fingerprint=self.analysis.fingerprint(),
            layers=entries,
        )


def draft_plan(
    analysis: ModelAnalysis,
    policy: RankPolicy,
    model_name: str = "model",
    global_rank: bool = True,
    measured: CostModel | None = None,
) -> PlanDraft:
    """Decide every layer a selector does not choose: skips, unsupported layers, explicit ranks.

    The rest become slots. With `global_rank` (the uniform selector) the policy's global rank
    decides every layer when there is no budget, and a policy without a budget or ranks is an
    error; selectors that find ranks themselves pass False. A latency budget needs `measured`.
    """
    metric, reduction = _checked_target(analysis, policy, global_rank, measured)
    entries: list[LayerPlan] = []
    slots: list[Slot] = []
    for layer in analysis.layers:
        decided = _decide_layer(analysis, policy, layer, global_rank and reduction is None)
        if isinstance(decided, LayerPlan):
            entries.append(decided)
            continue
        method, note = decided
        round_to = resolve_round_to(policy.round_to, None)
        slots.append(Slot(len(entries), layer, method, note, round_to, measured))
        entries.append(LayerPlan(name=layer.name, type=layer.type, reason="pending"))
    budget = None
    if reduction is not None:
        budget = _budget(analysis, metric, reduction, entries, slots, measured)
    return PlanDraft(model_name, policy, analysis, entries, slots, budget)


def _checked_target(
    analysis: ModelAnalysis, policy: RankPolicy, global_rank: bool, measured: CostModel | None
) -> tuple[str, float | None]:
    """The budget's metric and reduction, after refusing policies that cannot plan this model."""
    get_method(policy.method)  # an unknown method fails before anything else
    targets = {
        "macs": policy.macs_reduction,
        "params": policy.params_reduction,
        "latency": policy.latency_reduction,
    }
    given = [name for name, value in targets.items() if value is not None]
    if len(given) > 1:
        raise ConfigError(
            f"give one budget, not {' and '.join(given)} reductions: keep one of "
            "--macs-reduction, --params-reduction, --latency-reduction"
        )
    metric = given[0] if given else "macs"
    reduction = targets[metric]
    if not analysis.layers:
        raise PlanError("the model has no Conv2d or Linear layer to decompose; nothing to compress")
    if reduction is not None and policy.rank is not None:
        raise ConfigError(
            f"give --rank or --{metric}-reduction, not both: --rank {policy.rank} sets every "
            f"layer's rank, --{metric}-reduction {reduction:g} has them chosen to fit a budget"
        )
    _check_patterns(policy, analysis)
    if metric == "latency" and measured is None:
        raise ConfigError(
            "a latency budget needs measured layer times: run it through the pipeline "
            "(--latency-reduction) or pass measured=LatencyMetric(...)"
        )
    if (
        global_rank
        and reduction is None
        and policy.rank is None
        and not any(o.rank for o in policy.layers.values())
    ):
        raise ConfigError(
            "no ranks to use: give --macs-reduction X, --params-reduction X or --rank"
        )
    return metric, reduction


def _decide_layer(
    analysis: ModelAnalysis, policy: RankPolicy, layer: LayerInfo, global_rank_decides: bool
) -> LayerPlan | tuple[Method, str]:
    """The layer's plan when config or capability decides it, else (method, note) for a slot."""

    def kept(reason: str) -> LayerPlan:
        return LayerPlan(name=layer.name, type=layer.type, reason=reason)

    override, source = _resolved_override(policy, layer)
    if override.skip:
        return kept(f"skipped by config ({source})")
    method, note = method_for_layer(override.method or policy.method, layer)
    why_not = method.unsupported_reason(layer)
    if why_not:
        return kept(f"skipped: {why_not}")
    rank_spec = override.rank if override.rank is not None else policy.rank
    if rank_spec is not None and (override.rank is not None or global_rank_decides):
        per_layer = override.rank is not None
        ranks, clamped = normalize_ranks(method, layer, rank_spec, strict=per_layer)
        if not method.shrinks(layer, ranks):
            return kept(f"skipped: global rank {rank_spec} would not make it smaller")
        origin = f"layers['{source}']" if per_layer else "global rank"
        clamped = f", {clamped}" if clamped else ""
        note_text = f" ({note})" if note else ""
        return LayerPlan(
            name=layer.name,
            type=layer.type,
            method=method.name,
            ranks=list(ranks),
            reason=f"explicit rank {rank_spec} from {origin}{clamped}{note_text}",
        )
    share = layer.macs / max(analysis.total_macs, 1)
    if share < policy.min_macs_share:
        return kept(f"skipped: {share:.2%} of MACs < min_macs_share {policy.min_macs_share:.2%}")
    if not method.shrinks(layer, method.candidates(layer)[0]):
        return kept(f"skipped: {method.name} is not smaller than the layer even at rank 1")
    return method, note


def _budget(
    analysis: ModelAnalysis,
    metric: str,
    reduction: float,
    entries: list[LayerPlan],
    slots: list[Slot],
    measured: CostModel | None,
) -> Budget:
    """The budget the slots share: the total less what skipped and explicit layers cost."""
    if metric == "latency":
        total = measured.total(analysis)
    else:
        total = analysis.total_params if metric == "params" else analysis.total_macs
    fixed = total - sum(slot.cost(None, metric) for slot in slots)
    for entry in entries:  # explicit ranks already chosen change the fixed part
        if entry.decompose:
            layer = analysis.layer(entry.name)
            explicit = Slot(-1, layer, get_method(entry.method), "", None, measured)
            fixed += explicit.cost(tuple(entry.ranks), metric) - explicit.cost(None, metric)
    return Budget(metric=metric, reduction=float(reduction), total=total, fixed=fixed)


def budgeted_slots(analysis: ModelAnalysis, policy: RankPolicy, model_name: str = "model"):
    """The layers a selector will choose ranks for; they do not depend on the budget's metric,
    so no measured times are needed to list them (e.g. to size a progress bar)."""
    unpriced = policy.model_copy(update={"latency_reduction": None})
    return draft_plan(analysis, unpriced, model_name, global_rank=False).slots


def check_plan(plan: Plan, analysis: ModelAnalysis) -> None:
    """Refuse a plan made for another architecture, or with entries no method can build
    (hand-edited ranks out of range, the wrong number of ranks, an unsupported layer), before
    any surgery: each with a one-line PlanError naming the layer and the fix."""
    names = [layer.name for layer in analysis.layers]
    if plan.fingerprint is not None and plan.fingerprint != analysis.fingerprint():
        raise PlanError(
            f"the plan was made for another architecture (model '{plan.model}'); this model's "
            "layers differ: make the plan with this model"
        )
    listed = [entry.name for entry in plan.layers]
    repeated = sorted({name for name in listed if listed.count(name) > 1})
    if repeated:
        raise PlanError(
            f"the plan names layers {repeated[:3]} more than once; keep one entry per layer"
        )
    if sorted(listed) != sorted(names):
        missing = sorted(set(names) - {entry.name for entry in plan.layers})
        extra = sorted({entry.name for entry in plan.layers} - set(names))
        raise PlanError(
            f"the plan (model '{plan.model}') does not fit this model: it lacks layers "
            f"{missing[:3]} and names layers {extra[:3]} the model does not have; make the plan "
            "with this model"
        )
    for entry in plan.layers:
        if not entry.decompose and entry.ranks is not None:
            raise PlanError(
                f"plan entry '{entry.name}' has ranks {entry.ranks} but no method: to keep the "
                "layer whole set its ranks to null too (and its reason to yours), to decompose "
                "it name a method"
            )
    for entry in plan.decomposed():
        layer = analysis.layer(entry.name)
        method = get_method(entry.method)
        why_not = method.unsupported_reason(layer)
        if why_not:
            raise PlanError(f"plan entry '{entry.name}' uses {method.name}, but {why_not}")
        if entry.type != layer.type:
            raise PlanError(
                f"plan entry '{entry.name}' is a {entry.type} but the model has a {layer.type}; "
                "make the plan with this model"
            )
        normalize_ranks(method, layer, list(entry.ranks), strict=True)


def plan_cost(analysis: ModelAnalysis, plan: Plan) -> Cost:
    """Whole-model params and MACs after applying `plan` (layers not in it keep their cost)."""
    params, macs = analysis.total_params, analysis.total_macs
    for entry in plan.decomposed():
        layer = analysis.layer(entry.name)
        cost = get_method(entry.method).cost(layer, tuple(entry.ranks))
        params += cost.params - layer.params
        macs += cost.macs - layer.macs
    return Cost(params=params, macs=macs)


# Bisection steps of `allocate` on its setting: 2⁻⁶⁰ of the range, below any rank's step.
BISECTION_STEPS = 60
# Times `allocate` evaluates every slot's level: at the top, each bisection step, the result
# (only twice when the top already fits).
ALLOCATE_EVALUATIONS = BISECTION_STEPS + 2


def allocate(
    draft: PlanDraft,
    ladders: Sequence[Sequence[Ranks | None]],
    level: Callable[[int, float], int],
    low: float,
    high: float,
    mapper: Callable[[Callable[[int], int], Iterable[int]], Iterable[int]] = map,
) -> tuple[list[int], float]:
    """Fit the budget: one index into each slot's ladder, with the total at most the goal.

    A ladder lists a slot's options by increasing cost (None: keep the layer whole), and
    `level(j, x)` is the index slot j takes at setting x, non-decreasing in x. The largest x in
    [low, high] whose total fits is found by bisection; then single ladder steps, cheapest layers
    first, use what is left of the budget without ever exceeding it. Returns the indices and x.
    `mapper` evaluates the slots' levels at one x (e.g. a thread pool's map, when a level costs
    decompositions).
    """
    budget = draft.budget
    if budget is None:
        raise ValueError("allocate needs a plan draft with a budget")
    metric, goal = budget.metric, budget.goal
    if not draft.slots:
        why = Counter(re.sub(r"\(.*", "", entry.reason).strip() for entry in draft.entries)
        kept = "; ".join(f"{n}× {reason}" for reason, n in why.most_common(3))
        raise PlanError(
            f"no layer is left to compress for {budget.reduction:g}× {metric} ({kept}); lower "
            "min_macs_share, drop skips or explicit ranks, or pick a method these layers support"
        )
    costs = [
        [slot.cost(option, metric) for option in ladder]
        for slot, ladder in zip(draft.slots, ladders, strict=True)
    ]

    def total_of(indices: list[int]) -> float:
        return budget.fixed + sum(c[i] for c, i in zip(costs, indices))

    def pick(x: float) -> list[int]:
        levels = mapper(lambda j: level(j, x), range(len(costs)))
        return [min(max(i, 0), len(c) - 1) for i, c in zip(levels, costs, strict=True)]

    smallest = budget.fixed + sum(c[0] for c in costs)
    if smallest > goal:
        kept = f"{smallest:.3g} ms" if metric == "latency" else f"{smallest:,.0f} {metric}"
        raise PlanError(
            f"{budget.reduction:g}× {metric} reduction is impossible: at the smallest ranks the "
            f"model keeps {kept} (at most {budget.total / smallest:.2f}×); lower "
            "the target or skip fewer layers"
        )
    if total_of(pick(high)) <= goal:
        low = high
    else:
        for _ in range(BISECTION_STEPS):
            mid = (low + high) / 2
            if total_of(pick(mid)) <= goal:
                low = mid
            else:
                high = mid
    indices = pick(low)
    if total_of(indices) > goal:  # a level function may give more than index 0 at `low`
        indices = [0] * len(costs)
    # Single steps up a ladder, cheapest layers first, while the total stays within the goal.
    total = total_of(indices)
    order = sorted(range(len(costs)), key=lambda j: draft.slots[j].cost(None, metric))
    improved = True
    while improved:
        improved = False
        for j in order:
            i = indices[j]
            if i + 1 < len(costs[j]) and total + costs[j][i + 1] - costs[j][i] <= goal:
                total += costs[j][i + 1] - costs[j][i]
                indices[j] = i + 1
                improved = True
    return indices, low
