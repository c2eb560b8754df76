"""Decomposition methods: a registry of per-layer decomposers, open to users.

A method knows which layers it applies to (or why not), the exact parameter and MAC cost of its
block at given ranks (equal to counting the built block's layers), a one-parameter family of
candidate ranks ordered by cost (what budgeted allocation walks), how to build the block from
shapes alone, and how to fill it from the layer's weights. The factorizations themselves live in
`rankfold.passes.factorizations` as pure functions.
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from rankfold.passes.analysis import LayerInfo
from rankfold.passes.blocks import (
    FactorizedBlock,
    balanced,
    copy_bias,
    pointwise,
    set_weight,
    spatial_like,
)
from rankfold.passes.core import ConfigError
from rankfold.passes.factorizations import cp_als, cp_sensitivity, truncated_svd, tucker2

Ranks = tuple[int, ...]


@dataclass(frozen=True)
class Cost:
    params: int
    macs: int

    def get(self, metric: str) -> int:
        return self.params if metric == "params" else self.macs


@dataclass
class FillResult:
    """What filling a block measured: the kernel's relative reconstruction error and extras."""

    rel_error: float
    extras: dict[str, float] = field(default_factory=dict)


def kernel_array(module: nn.Module) -> np.ndarray:
    return module.weight.detach().cpu().double().numpy()


class Method(ABC):
    """One decomposition method; subclasses register themselves with `register_method`."""

    name: str
    rank_names: tuple[str, ...] = ("rank",)

    def unsupported_reason(self, layer: LayerInfo) -> str | None:
        """None when the method applies to `layer`, else why not (shown in the report)."""
        if layer.type not in ("Conv2d", "Linear"):
            return f"{layer.type} is not supported (Conv2d and Linear are)"
        if layer.groups > 1:
            kind = "depthwise" if layer.groups == layer.in_features else "grouped"
            return f"{kind} conv (groups={layer.groups}) has no shared channel modes to factorize"
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
        """Ranks ordered by increasing cost, from the smallest up to the first not below the layer."""

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

    def _grow_until_not_smaller(self, layer: LayerInfo, family) -> list[Ranks]:
        out = []
        for ranks in family:
            out.append(ranks)
            c = self.cost(layer, ranks)
            if c.params >= layer.params and c.macs >= layer.macs:
                break
        return out


class SVDMethod(Method):
    """Linear: in→R→out. Conv: kh×kw S→R (original geometry), then 1×1 R→T (the bias)."""

    name = "svd"

    def max_ranks(self, layer: LayerInfo) -> Ranks:
        return (min(layer.out_features, layer.in_features * layer.kernel_area),)

    def cost(self, layer: LayerInfo, ranks: Ranks) -> Cost:
        (r,) = ranks
        s, t, k = layer.in_features, layer.out_features, layer.kernel_area
        bias = t if layer.bias else 0
        return Cost(
            params=s * k * r + r * t + bias,
            macs=layer.out_positions * (r * s * k + t * r) * layer.calls,
        )

    def candidates(self, layer: LayerInfo) -> list[Ranks]:
        return self._grow_until_not_smaller(
            layer, ((r,) for r in range(1, self.max_ranks(layer)[0] + 1))
        )

    def ranks_from_ratio(self, layer: LayerInfo, ratio: float) -> Ranks:
        return (max(1, round(ratio * self.max_ranks(layer)[0])),)

    def build(self, layer: LayerInfo, ranks: Ranks) -> FactorizedBlock:
        (r,) = ranks
        if layer.type == "Linear":
            stages = OrderedDict(
                project=nn.Linear(layer.in_features, r, bias=False),
                expand=nn.Linear(r, layer.out_features, bias=layer.bias),
            )
        else:
            stages = OrderedDict(
                spatial=spatial_like(layer, layer.in_features, r),
                pointwise_out=pointwise(r, layer.out_features, bias=layer.bias),
            )
        return FactorizedBlock(stages, layer.name, self.name, ranks)

    def fill(self, block: FactorizedBlock, original: nn.Module, seed: int) -> FillResult:
        weight = kernel_array(original)
        matrix = weight.reshape(weight.shape[0], -1)
        factors = truncated_svd(matrix, block.ranks[0])
        first, second = block[0], block[1]
        set_weight(first, factors.right.reshape(first.weight.shape))
        set_weight(second, factors.left.reshape(second.weight.shape))
        copy_bias(second, original)
        return FillResult(factors.rel_error(matrix))


class Tucker2Method(Method):
    """1×1 S→R_S, kh×kw R_S→R_T (original geometry), 1×1 R_T→T (the bias)."""

    name = "tucker2"
    rank_names = ("rank_out", "rank_in")

    def max_ranks(self, layer: LayerInfo) -> Ranks:
        return (layer.out_features, layer.in_features)

    def cost(self, layer: LayerInfo, ranks: Ranks) -> Cost:
        r_out, r_in = ranks
        s, t, k = layer.in_features, layer.out_features, layer.kernel_area
        bias = t if layer.bias else 0
        macs = layer.in_positions * s * r_in + layer.out_positions * (r_out * r_in * k + t * r_out)
        return Cost(params=s * r_in + r_in * r_out * k + r_out * t + bias, macs=macs * layer.calls)

    def candidates(self, layer: LayerInfo) -> list[Ranks]:
        # Both ranks grow in proportion to their channel counts: one ratio, many layers. A rank
        # above the other rank × kernel area adds nothing (the core's unfolding caps it), so cap it.
        t, s, k = layer.out_features, layer.in_features, layer.kernel_area
        family = set()
        for f in np.linspace(0, 1, 4 * max(s, t) + 1)[1:]:
            r_out, r_in = max(1, round(f * t)), max(1, round(f * s))
            family.add((min(r_out, r_in * k), min(r_in, r_out * k)))
        family = sorted(family, key=lambda ranks: (self.cost(layer, ranks).macs, ranks))
        return self._grow_until_not_smaller(layer, family)

    def ranks_from_ratio(self, layer: LayerInfo, ratio: float) -> Ranks:
        return (max(1, round(ratio * layer.out_features)), max(1, round(ratio * layer.in_features)))

    def build(self, layer: LayerInfo, ranks: Ranks) -> FactorizedBlock:
        r_out, r_in = ranks
        stages = OrderedDict(
            pointwise_in=pointwise(layer.in_features, r_in),
            core=spatial_like(layer, r_in, r_out),
            pointwise_out=pointwise(r_out, layer.out_features, bias=layer.bias),
        )
        return FactorizedBlock(stages, layer.name, self.name, ranks)

    def fill(self, block: FactorizedBlock, original: nn.Module, seed: int) -> FillResult:
        kernel = kernel_array(original)
        factors = tucker2(kernel, *block.ranks, seed=seed)
        set_weight(block.pointwise_in, factors.in_factor.T[:, :, None, None])
        set_weight(block.core, factors.core)
        set_weight(block.pointwise_out, factors.out_factor[:, :, None, None])
        copy_bias(block.pointwise_out, original)
        return FillResult(factors.rel_error(kernel))


def cp_tensor(kernel: np.ndarray) -> np.ndarray:
    """T×S×kh×kw → S×T×(kh·kw), the 3-way tensor every CP method decomposes."""
    t, s = kernel.shape[:2]
    return kernel.transpose(1, 0, 2, 3).reshape(s, t, -1)


class CPMethod(Method):
    """CP-ALS of the S×T×(kh·kw) kernel: 1×1 S→R, depthwise kh×kw on R, 1×1 R→T (the bias)."""

    name = "cp"

    def max_ranks(self, layer: LayerInfo) -> Ranks:
        # A rank-(min over modes of the other modes' product) CP is exact, so more is never needed.
        s, t, k = layer.in_features, layer.out_features, layer.kernel_area
        return (min(s * t, s * k, t * k),)

    def cost(self, layer: LayerInfo, ranks: Ranks) -> Cost:
        (r,) = ranks
        s, t, k = layer.in_features, layer.out_features, layer.kernel_area
        bias = t if layer.bias else 0
        macs = layer.in_positions * s * r + layer.out_positions * r * (k + t)
        return Cost(params=r * (s + k + t) + bias, macs=macs * layer.calls)

    def candidates(self, layer: LayerInfo) -> list[Ranks]:
        return self._grow_until_not_smaller(
            layer, ((r,) for r in range(1, self.max_ranks(layer)[0] + 1))
        )

    def ranks_from_ratio(self, layer: LayerInfo, ratio: float) -> Ranks:
        # CP's "full" rank is the break-even rank: the block costs as much as the layer, in
        # parameters or in MACs, whichever comes first.
        s, t, k = layer.in_features, layer.out_features, layer.kernel_area
        by_params = s * t * k / (s + k + t)
        by_macs = (
            layer.out_positions
            * s
            * t
            * k
            / (layer.in_positions * s + layer.out_positions * (k + t))
        )
        return (max(1, int(ratio * min(by_params, by_macs))),)

    def build(self, layer: LayerInfo, ranks: Ranks) -> FactorizedBlock:
        (r,) = ranks
        stages = OrderedDict(
            pointwise_in=pointwise(layer.in_features, r),
            depthwise=spatial_like(layer, r, r, groups=r),
            pointwise_out=pointwise(r, layer.out_features, bias=layer.bias),
        )
        return FactorizedBlock(stages, layer.name, self.name, ranks)

    def factorize(self, tensor: np.ndarray, rank: int, seed: int):
        # 100 sweeps stopped at 1e-6: near ALS's error without drifting into degenerate
        # components whose float32 cancellation breaks ONNX parity (see cp_als).
        return cp_als(tensor, rank, seed=seed, n_iter_max=100, tol=1e-6, linesearch=False), {}

    def fill(self, block: FactorizedBlock, original: nn.Module, seed: int) -> FillResult:
        kernel = kernel_array(original)
        tensor = cp_tensor(kernel)
        cp, extras = self.factorize(tensor, block.ranks[0], seed)
        load_cp(block, cp, kernel.shape[2:])
        copy_bias(block.pointwise_out, original)
        return FillResult(cp.rel_error(tensor), {"sensitivity": cp_sensitivity(cp), **extras})


def load_cp(block: FactorizedBlock, cp, kernel_size: tuple[int, ...]) -> None:
    """Write a CP of the S×T×(kh·kw) tensor into pointwise_in / depthwise / pointwise_out."""
    unit = cp.normalized()
    a, b, c = balanced(list(unit.factors), unit.weights)
    r = unit.rank
    set_weight(block.pointwise_in, a.T[:, :, None, None])
    set_weight(block.depthwise, c.T.reshape(r, 1, *kernel_size))
    set_weight(block.pointwise_out, b[:, :, None, None])


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Make `method` available by name to plans, the API and the CLI."""
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown method '{name}'{hint}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def method_for_layer(requested: str, layer: LayerInfo) -> tuple[Method, str]:
    """The method a layer gets, and a note when it differs from the requested one.

    A Linear layer or a 1×1 conv is a matrix: every tensor method reduces to its SVD there.
    """
    method = get_method(requested)
    if requested != "svd" and layer.type == "Linear":
        return METHODS["svd"], f"{requested} of a matrix is its SVD"
    if requested != "svd" and layer.type == "Conv2d" and layer.kernel_area == 1:
        return METHODS["svd"], f"{requested} of a 1×1 kernel is its SVD"
    return method, ""


for _method in (SVDMethod(), Tucker2Method(), CPMethod()):
    register_method(_method)
