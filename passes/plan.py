"""Decide, then do: resolve every layer's method and ranks into a Plan before any surgery.

Per-layer settings follow a fixed precedence (global < module type < glob or parent name < exact
name); keys are strings, never module objects. A budget (`macs_reduction` / `params_reduction`) is
met by a uniform allocation: every budgeted layer keeps the same fraction of its own cost, the
fraction found by bisection, then single rank steps close the remaining gap.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rankfold.passes.analysis import LayerInfo, ModelAnalysis
from rankfold.passes.errors import ConfigError, PlanError
from rankfold.passes.methods import Cost, Method, Ranks, get_method, method_for_layer
from rankfold.runtime.files import atomic_write_json

RankSpec = int | float | list[int]


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
    layers: dict[str, LayerOverride] = Field(default_factory=dict)
    skip: list[str] = Field(default_factory=list)
    min_macs_share: float = Field(default=0.005, ge=0, lt=1)

    _check = field_validator("rank")(classmethod(lambda cls, v: _check_rank_spec(v)))


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

    version: Literal[1] = 1
    model: str
    method: str
    target: dict[str, float] | None = None
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
        except (json.JSONDecodeError, ValidationError) as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError(f"plan file {path} is not a valid rankfold plan ({first})") from None


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
    if strict and not _smaller(cost, layer):
        largest = [c for c in method.candidates(layer) if _smaller(method.cost(layer, c), layer)]
        hint = f"at most {list(largest[-1])}" if largest else "skip the layer"
        raise PlanError(
            f"ranks {list(ranks)} make layer '{layer.name}' larger than the original "
            f"({cost.params:,} params / {cost.macs:,} MACs vs {layer.params:,} / {layer.macs:,}); "
            f"choose ranks {hint}"
        )
    return ranks, note


def _smaller(cost: Cost, layer: LayerInfo) -> bool:
    return cost.params < layer.params and cost.macs < layer.macs


def select_ranks(analysis: ModelAnalysis, policy: RankPolicy, model_name: str = "model") -> Plan:
    """Resolve per-layer methods and ranks (explicit, ratio or budget) into a Plan."""
    get_method(policy.method)  # an unknown method fails before anything else
    metric = "params" if policy.params_reduction else "macs"
    reduction = policy.params_reduction or policy.macs_reduction
    if policy.params_reduction and policy.macs_reduction:
        raise ConfigError("give either --macs-reduction or --params-reduction, not both")
    if (
        reduction is None
        and policy.rank is None
        and not any(o.rank for o in policy.layers.values())
    ):
        raise ConfigError(
            "no ranks to use: give --macs-reduction X, --params-reduction X or --rank"
        )

    entries: list[LayerPlan] = []
    budgeted: list[tuple[int, LayerInfo, Method, str]] = []
    for layer in analysis.layers:
        override, source = _resolved_override(policy, layer)
        if override.skip:
            entries.append(
                LayerPlan(name=layer.name, type=layer.type, reason=f"skipped by config ({source})")
            )
            continue
        method, note = method_for_layer(override.method or policy.method, layer)
        why_not = method.unsupported_reason(layer)
        if why_not:
            entries.append(
                LayerPlan(name=layer.name, type=layer.type, reason=f"skipped: {why_not}")
            )
            continue
        note = f" ({note})" if note else ""
        rank_spec = override.rank if override.rank is not None else policy.rank
        if rank_spec is not None and (override.rank is not None or reduction is None):
            per_layer = override.rank is not None
            ranks, clamped = normalize_ranks(method, layer, rank_spec, strict=per_layer)
            if not _smaller(method.cost(layer, ranks), layer):
                entries.append(
                    LayerPlan(
                        name=layer.name,
                        type=layer.type,
                        reason=f"skipped: global rank {rank_spec} would not make it smaller",
                    )
                )
                continue
            origin = f"layers['{source}']" if per_layer else "global rank"
            clamped = f", {clamped}" if clamped else ""
            entries.append(
                LayerPlan(
                    name=layer.name,
                    type=layer.type,
                    method=method.name,
                    ranks=list(ranks),
                    reason=f"explicit rank {rank_spec} from {origin}{clamped}{note}",
                )
            )
            continue
        share = layer.macs / max(analysis.total_macs, 1)
        if share < policy.min_macs_share:
            entries.append(
                LayerPlan(
                    name=layer.name,
                    type=layer.type,
                    reason=f"skipped: {share:.2%} of MACs < min_macs_share "
                    f"{policy.min_macs_share:.2%}",
                )
            )
            continue
        if not _smaller(method.cost(layer, method.candidates(layer)[0]), layer):
            entries.append(
                LayerPlan(
                    name=layer.name,
                    type=layer.type,
                    reason=f"skipped: {method.name} is not smaller than the layer even at rank 1",
                )
            )
            continue
        budgeted.append((len(entries), layer, method, note))
        entries.append(LayerPlan(name=layer.name, type=layer.type, reason="pending"))

    target = None
    if reduction is not None:
        chosen = _allocate_uniform(analysis, entries, budgeted, metric, reduction)
        for (index, layer, method, note), ranks in zip(budgeted, chosen):
            keep = method.cost(layer, ranks).get(metric) / max(getattr(layer, metric), 1)
            entries[index] = LayerPlan(
                name=layer.name,
                type=layer.type,
                method=method.name,
                ranks=list(ranks),
                reason=f"uniform allocation for {reduction:g}× {metric}: keeps {keep:.0%} of the "
                f"layer's {metric}{note}",
            )
        target = {f"{metric}_reduction": float(reduction)}
    return Plan(model=model_name, method=policy.method, target=target, layers=entries)


def plan_cost(analysis: ModelAnalysis, plan: Plan) -> Cost:
    """Whole-model params and MACs after applying `plan` (layers not in it keep their cost)."""
    params, macs = analysis.total_params, analysis.total_macs
    for entry in plan.decomposed():
        layer = analysis.layer(entry.name)
        cost = get_method(entry.method).cost(layer, tuple(entry.ranks))
        params += cost.params - layer.params
        macs += cost.macs - layer.macs
    return Cost(params=params, macs=macs)


def _allocate_uniform(
    analysis: ModelAnalysis,
    entries: list[LayerPlan],
    budgeted: list[tuple[int, LayerInfo, Method, str]],
    metric: str,
    reduction: float,
) -> list[Ranks]:
    total = analysis.total_params if metric == "params" else analysis.total_macs
    fixed = total - sum(getattr(layer, metric) for _, layer, _, _ in budgeted)
    for entry in entries:  # explicit ranks already chosen change the fixed part
        if entry.decompose:
            layer = analysis.layer(entry.name)
            cost = get_method(entry.method).cost(layer, tuple(entry.ranks)).get(metric)
            fixed += cost - getattr(layer, metric)
    goal = total / reduction
    if not budgeted:
        raise PlanError(
            f"no layer is left to compress for {reduction:g}× {metric}; remove skips or explicit ranks"
        )
    families = [
        (
            [c for c in method.candidates(layer) if _smaller(method.cost(layer, c), layer)],
            layer,
            method,
        )
        for _, layer, method, _ in budgeted
    ]
    costs = [[method.cost(layer, c).get(metric) for c in fam] for fam, layer, method in families]

    def pick(keep: float) -> list[int]:
        """Per layer, the largest candidate within `keep` of its cost (the smallest at least)."""
        chosen = []
        for (_, layer, _), layer_costs in zip(families, costs):
            limit = keep * getattr(layer, metric)
            index = max((i for i, c in enumerate(layer_costs) if c <= limit), default=0)
            chosen.append(index)
        return chosen

    def total_of(indices: list[int]) -> int:
        return fixed + sum(layer_costs[i] for layer_costs, i in zip(costs, indices))

    smallest = total_of([0] * len(families))
    if smallest > goal:
        raise PlanError(
            f"{reduction:g}× {metric} reduction is impossible: at the smallest ranks the model keeps "
            f"{smallest:,} {metric} (at most {total / smallest:.2f}×); lower the target or skip fewer layers"
        )
    low, high = 0.0, 1.0
    for _ in range(50):
        mid = (low + high) / 2
        if total_of(pick(mid)) <= goal:
            low = mid
        else:
            high = mid
    indices = pick(low)
    # Single rank steps, cheapest first, while they bring the total closer to the goal.
    improved = True
    while improved:
        improved = False
        for j in sorted(range(len(indices)), key=lambda j: getattr(families[j][1], metric)):
            if indices[j] + 1 < len(costs[j]):
                trial = indices.copy()
                trial[j] += 1
                if abs(total_of(trial) - goal) < abs(total_of(indices) - goal):
                    indices, improved = trial, True
    return [fam[i] for (fam, _, _), i in zip(families, indices)]
