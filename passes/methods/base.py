"""The method interface: what every decomposition method provides, and its capability hooks."""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from rankfold.passes.analysis import LayerInfo
from rankfold.passes.blocks import (
    FactorizedBlock,
    conv_group,
    group_block,
    grouped_block,
    kernel_of,
    set_group,
)

Ranks = tuple[int, ...]


@dataclass(frozen=True)
class Cost:
    params: int
    macs: int

    def get(self, metric: str) -> int:
        return self.params if metric == "params" else self.macs

    def smaller_than(self, layer: LayerInfo) -> bool:
        """The one meaning of "the block is smaller than the layer": fewer params and MACs."""
        return self.params < layer.params and self.macs < layer.macs


@dataclass
class FillResult:
    """What filling a block measured: the kernel's relative reconstruction error and extras."""

    rel_error: float
    extras: dict[str, float] = field(default_factory=dict)


def kernel_array(module: nn.Module) -> np.ndarray:
    """The layer's kernel in float64, in the conv layout T×(S/g)×k… for every conv type."""
    return kernel_of(module)


class Method(ABC):
    """One decomposition method, registered by name (`register_method`, or the entry-point group
    `rankfold.methods` for third-party packages).

    Besides the abstract core (ranks, cost, candidates, build, fill), a method declares what it
    can do through hooks whose defaults say "not this method": selectors ask the hooks and never
    test method names.

    Grouped convs: each group is a conv of its own, so a subclass writes its hooks for one group
    and `__init_subclass__` makes them whole-layer hooks: the rank hooks see `layer.one_group`
    (ranks are per group, equal in every group), `cost` is g × one group's, `build` groups
    every stage of one group's block g times more, `fill` factorizes each group into its slice,
    and `ranks_within_error` takes the largest group's ranks (every group within the error).
    """

    name: str
    rank_names: tuple[str, ...] = ("rank",)
    # The layer types (LayerInfo.type) whose blocks the method builds and fills.
    layer_types: tuple[str, ...] = ("Conv2d", "Linear")
    # Whether `fill` is mostly Python-level steps holding the GIL (then `decompose` runs layers
    # in worker processes rather than threads).
    gil_bound: bool = False
    # Whether the refit refines, by default, the segments holding its blocks together on the
    # segments' outputs (`refit_blocks(segment_steps=…)`): for blocks whose errors the per-block
    # fit leaves large enough to compound through a residual unit.
    refines_segments: bool = False
    # The selector that plans a MACs or parameter budget when the user names none
    # (`RankPolicy.selector`): a registered selector's name.
    budget_selector: str = "uniform"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, per_layer in _WHOLE_LAYER.items():
            if name in cls.__dict__:
                setattr(cls, name, per_layer(cls.__dict__[name]))

    def unsupported_reason(self, layer: LayerInfo) -> str | None:
        """None when the method applies to `layer`, else why not (shown in the report)."""
        if layer.type not in self.layer_types:
            takes = ", ".join(self.layer_types)
            return f"{self.name} does not decompose {layer.type} layers (it takes {takes})"
        if layer.groups > 1 and layer.groups == layer.in_features:
            return (
                f"depthwise conv (groups={layer.groups}) has one input channel per group: no "
                "channel mode to factorize"
            )
        if layer.calls > 1:
            return f"module is called {layer.calls} times; shared modules are kept whole"
        return None

    @abstractmethod
    def max_ranks(self, layer: LayerInfo) -> Ranks:
        """Largest valid ranks (a larger rank is refused)."""

    @abstractmethod
    def cost(self, layer: LayerInfo, ranks: Ranks) -> Cost:
        """Exact params and per-sample MACs of the block."""

    @abstractmethod
    def candidates(self, layer: LayerInfo) -> list[Ranks]:
        """Ranks by increasing cost, from the smallest up to the first that is not smaller."""

    @abstractmethod
    def ranks_from_ratio(self, layer: LayerInfo, ratio: float) -> Ranks:
        """Ranks for a per-layer ratio in (0, 1] of the method's full rank."""

    @abstractmethod
    def build(self, layer: LayerInfo, ranks: Ranks) -> FactorizedBlock:
        """The block's layers with the right shapes and uninitialised weights."""

    @abstractmethod
    def fill(self, block: FactorizedBlock, original: nn.Module, seed: int) -> FillResult:
        """Factorize `original`'s weights into `block` in place."""

    def normalize_ranks(self, layer: LayerInfo, ranks: int | list[int] | tuple[int, ...]) -> Ranks:
        values = (ranks,) * len(self.rank_names) if isinstance(ranks, int) else tuple(ranks)
        return tuple(int(v) for v in values)

    def shrinks(self, layer: LayerInfo, ranks: Ranks) -> bool:
        """Whether the block at `ranks` is smaller than the layer (fewer params and MACs)."""
        return self.cost(layer, ranks).smaller_than(layer)

    def clamp_ranks(self, layer: LayerInfo, ranks: Sequence[int]) -> Ranks:
        """`ranks` moved into the valid range (and wherever else larger ranks add nothing)."""
        return tuple(min(max(int(r), 1), m) for r, m in zip(ranks, self.max_ranks(layer)))

    def unfoldings(self, kernel: np.ndarray) -> list[np.ndarray] | None:
        """Matrices whose ranks are this method's ranks, in `rank_names` order, for selectors
        that read ranks off spectra (energy, vbmf); None when the method has no such matrices."""
        return None

    def ranks_within_error(
        self, layer: LayerInfo, module: nn.Module, rel_error: float, seed: int
    ) -> Ranks | str | None:
        """The method's own smallest ranks within `rel_error` (or why there are none), for
        `--select error`; None: the selector searches the candidates itself."""
        return None

    def settings(self) -> dict[str, Any]:
        """What besides the ranks and seed changes the factors (the decomposition cache's key)."""
        return {
            key: value
            for key, value in sorted(vars(self).items())
            if not key.startswith("_") and isinstance(value, int | float | str | bool)
        }

    def _grow_until_not_smaller(self, layer: LayerInfo, family) -> list[Ranks]:
        out = []
        for ranks in family:
            out.append(ranks)
            if not self.shrinks(layer, ranks):
                break
        return out


# The whole-layer forms of the per-group hooks (see `Method`); each is the hook itself for a
# layer with one group, so wrapping a hook that calls its parent's wrapped hook changes nothing.


def _on_one_group(hook):
    @functools.wraps(hook)
    def per_layer(self, layer: LayerInfo, *args, **kwargs):
        return hook(self, layer.one_group, *args, **kwargs)

    return per_layer


def _cost(hook):
    @functools.wraps(hook)
    def per_layer(self, layer: LayerInfo, ranks: Ranks) -> Cost:
        one = hook(self, layer.one_group, ranks)
        return Cost(params=one.params * layer.groups, macs=one.macs * layer.groups)

    return per_layer


def _build(hook):
    @functools.wraps(hook)
    def per_layer(self, layer: LayerInfo, ranks: Ranks) -> FactorizedBlock:
        block = hook(self, layer.one_group, ranks)
        return block if layer.groups == 1 else grouped_block(block, layer.groups)

    return per_layer


def _grouped(module: nn.Module) -> int:
    return getattr(module, "groups", 1)


def _fill(hook):
    @functools.wraps(hook)
    def per_layer(self, block: FactorizedBlock, original: nn.Module, seed: int) -> FillResult:
        groups = _grouped(original)
        if groups == 1:
            return hook(self, block, original, seed)
        one = group_block(block, groups).to(original.weight.device, original.weight.dtype)
        errors, norms, extras = [], [], {}
        for index in range(groups):
            part = conv_group(original, index)
            result = hook(self, one, part, seed)
            set_group(block, one, index)
            errors.append(result.rel_error)
            norms.append(float(part.weight.detach().double().norm()))
            for key, value in result.extras.items():
                extras[key] = max(extras.get(key, value), value)
        # ‖W − Ŵ‖² adds up over groups; extras are the worst group's.
        total = math.sqrt(sum(n * n for n in norms)) or 1.0
        rel_error = math.sqrt(sum((e * n) ** 2 for e, n in zip(errors, norms))) / total
        return FillResult(rel_error, extras)

    return per_layer


def _ranks_within_error(hook):
    @functools.wraps(hook)
    def per_layer(self, layer: LayerInfo, module: nn.Module, rel_error: float, seed: int):
        groups = _grouped(module)
        if groups == 1:
            return hook(self, layer, module, rel_error, seed)
        answers = []
        for index in range(groups):
            answer = hook(self, layer.one_group, conv_group(module, index), rel_error, seed)
            if answer is None or isinstance(answer, str):
                return answer if answer is None else f"group {index}: {answer}"
            answers.append(answer)
        # Every group within the error keeps the whole kernel within it.
        return tuple(max(values) for values in zip(*answers))

    return per_layer


_WHOLE_LAYER = {
    "max_ranks": _on_one_group,
    "candidates": _on_one_group,
    "ranks_from_ratio": _on_one_group,
    "clamp_ranks": _on_one_group,
    "normalize_ranks": _on_one_group,
    "cost": _cost,
    "build": _build,
    "fill": _fill,
    "ranks_within_error": _ranks_within_error,
}
