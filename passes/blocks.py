"""Factorized layer blocks: built from shapes alone (so a saved plan can be rebuilt), then filled.

A block is an nn.Sequential with named stages that records where it came from (`source`, `method`,
`ranks`), so reports, exports and restores can trace every new module back to its layer. The
spatial stage carries the original stride, padding (incl. 'same' and per-dimension), dilation and
padding mode; pointwise stages commute with any padding because they have no bias.

The stages have the layer's own dimension (Conv1d stages for a Conv1d). For a transposed conv
only the spatial stage is transposed (its stride, padding, output padding and dilation): the 1×1
stages act on each position alone, so they commute with the transposed geometry and stay
ordinary convs. Methods factorize every conv's kernel in the conv layout T×(S/g)×k…
(`kernel_of`); a transposed conv holds S×(T/g)×k…, which `set_kernel` writes back.

A grouped conv (g groups) is g convs side by side, so its block is one group's block with every
stage grouped g times more (`grouped_block`): group i's channels stay contiguous in every stage,
and group i's factors fill the i-th slice of each stage's weight (`set_group`).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from rankfold.passes.analysis import CONV_TYPES, LayerInfo

_POINTWISE = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class FactorizedBlock(nn.Sequential):
    """A chain of layers replacing one conv/linear layer."""

    def __init__(
        self, stages: OrderedDict[str, nn.Module], source: str, method: str, ranks
    ) -> None:
        super().__init__(stages)
        self.source = source
        self.method = method
        self.ranks = tuple(int(r) for r in ranks)

    def extra_repr(self) -> str:
        return f"source={self.source!r}, method={self.method!r}, ranks={self.ranks}"


def pointwise(in_ch: int, out_ch: int, bias: bool = False, dims: int = 2) -> nn.Module:
    """A 1×1 conv over `dims` spatial dimensions (a layer's `spatial_dims`)."""
    return _POINTWISE[dims](in_ch, out_ch, kernel_size=1, bias=bias)


def spatial_like(layer: LayerInfo, in_ch: int, out_ch: int, groups: int = 1) -> nn.Module:
    """A conv of the original layer's type and kernel geometry, without bias."""
    geometry = {"output_padding": layer.output_padding} if layer.transposed else {}
    return getattr(nn, layer.type)(
        in_ch,
        out_ch,
        kernel_size=layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=groups,
        bias=False,
        padding_mode=layer.padding_mode,
        **geometry,
    )


def _other_layout(weight: np.ndarray, groups: int) -> np.ndarray:
    """A conv kernel T×(S/g)×k… as a transposed conv holds it, S×(T/g)×k…, and back (the
    same swap of each group's two channel modes either way)."""
    rows, cols, spatial = weight.shape[0] // groups, weight.shape[1], weight.shape[2:]
    grouped = weight.reshape(groups, rows, cols, *spatial).swapaxes(1, 2)
    return grouped.reshape(groups * cols, rows, *spatial)


def _is_transposed(module: nn.Module) -> bool:
    return bool(getattr(module, "transposed", False))


def kernel_of(module: nn.Module) -> np.ndarray:
    """The weight as a float64 kernel in the conv layout (T×(S/g)×k…; out×in for Linear)."""
    weight = module.weight.detach().cpu().double().numpy()
    return _other_layout(weight, module.groups) if _is_transposed(module) else weight


def set_kernel(module: nn.Module, kernel: np.ndarray) -> None:
    """Set a conv's or transposed conv's weight from a kernel in the conv layout."""
    set_weight(module, _other_layout(kernel, module.groups) if _is_transposed(module) else kernel)


def set_matrix(module: nn.Module, matrix: np.ndarray) -> None:
    """Set a Linear's or a 1×1 conv's (of any dimension) weight from an out×in matrix."""
    set_weight(module, matrix.reshape(*matrix.shape, *(1,) * (module.weight.dim() - 2)))


def set_weight(module: nn.Module, array: np.ndarray) -> None:
    weight = module.weight
    if tuple(array.shape) != tuple(weight.shape):
        raise ValueError(f"factor of shape {array.shape} does not fit weight {tuple(weight.shape)}")
    with torch.no_grad():
        weight.copy_(torch.from_numpy(np.ascontiguousarray(array)).to(weight.dtype))


def copy_bias(target: nn.Module, original: nn.Module) -> None:
    if original.bias is not None:
        with torch.no_grad():
            target.bias.copy_(original.bias)


def balanced(columns: list[np.ndarray], weights: np.ndarray) -> list[np.ndarray]:
    """Spread λ evenly over unit-norm factors: equal column norms keep fine-tuning well posed."""
    share = np.abs(weights) ** (1.0 / len(columns))
    scaled = [c * share for c in columns]
    scaled[-1] = scaled[-1] * np.sign(weights)
    return scaled


def equalize_stages(block: nn.Sequential, rounds: int = 40) -> None:
    """Rescale each channel between two consecutive stages so that the weights writing it and
    the weights reading it have equal norms, the reader compensating exactly (a positive scale
    passes through a linear stage unchanged), until every stage carries its share of the scale.
    The block computes the same function, but fine-tuning is well posed: SGD moves every weight
    by the same rate, so a stage 20× smaller than its neighbours (a factorization that puts all
    of λ in one stage) is changed 20× faster than the others. Stages are dense or depthwise."""
    stages = list(block.children())
    kernels = [kernel_of(stage) for stage in stages]
    for stage, kernel in zip(stages, kernels):
        if stage.groups not in (1, kernel.shape[0]):
            raise ValueError(f"cannot equalize a stage with {stage.groups} groups")
    depthwise = [stage.groups > 1 for stage in stages]
    scales = [np.ones(kernel.shape[0]) for kernel in kernels]  # each stage's outputs (biases)
    for _ in range(rounds):
        for i in range(len(stages) - 1):
            writer, reader = kernels[i], kernels[i + 1]
            out_norms = np.sqrt(np.sum(writer * writer, axis=tuple(range(1, writer.ndim))))
            read_axes = tuple(a for a in range(reader.ndim) if a != (0 if depthwise[i + 1] else 1))
            in_norms = np.sqrt(np.sum(reader * reader, axis=read_axes))
            scale = np.ones_like(out_norms)
            alive = (out_norms > 0) & (in_norms > 0)
            scale[alive] = np.sqrt(in_norms[alive] / out_norms[alive])
            shape = (-1,) + (1,) * (writer.ndim - 1)
            kernels[i] = writer * scale.reshape(shape)
            scales[i] = scales[i] * scale
            if depthwise[i + 1]:
                kernels[i + 1] = reader / scale.reshape(shape)
            else:
                kernels[i + 1] = reader / scale.reshape(1, -1, *(1,) * (reader.ndim - 2))
    for stage, kernel, scale in zip(stages, kernels, scales):
        set_kernel(stage, kernel)
        if stage.bias is not None:
            with torch.no_grad():
                stage.bias.mul_(torch.from_numpy(scale).to(stage.bias.dtype))


# The 5-stage block shared by `cp-lrf` and `tucker2-cp`: 1×1 S→L_in, 1×1 L_in→R, depthwise kh×kw
# on R (the layer's geometry), 1×1 R→L_out, 1×1 L_out→T (bias). Each adjacent 1×1 pair runs at
# one resolution, so it is one conv whenever that costs no more; the decision depends on shapes
# and ranks alone, so a saved plan rebuilds the same block.


def merge_in(s: int, inner: int, r: int) -> bool:
    """Whether 1×1 S→L_in then 1×1 L_in→R become one 1×1 S→R: S·R ≤ L_in·(S+R)."""
    return s * r <= inner * (s + r)


def merge_out(t: int, inner: int, r: int) -> bool:
    """Whether 1×1 R→L_out then 1×1 L_out→T become one 1×1 R→T: R·T ≤ L_out·(R+T)."""
    return r * t <= inner * (r + t)


def five_stage_cost(layer: LayerInfo, r: int, inner_in: int, inner_out: int) -> tuple[int, int]:
    """(params, MACs) of the 5-stage block: [S·R | L_in(S+R)] + R·kh·kw + [R·T | L_out(R+T)]
    (+T bias) parameters; the input side runs at the input positions, the depthwise stage at the
    layer's kernel positions, the output side at the output positions."""
    s, t, k = layer.in_features, layer.out_features, layer.kernel_area
    side_in = s * r if merge_in(s, inner_in, r) else inner_in * (s + r)
    side_out = r * t if merge_out(t, inner_out, r) else inner_out * (r + t)
    bias = t if layer.bias else 0
    macs = (
        layer.in_positions * side_in
        + layer.kernel_positions * r * k
        + layer.out_positions * side_out
    )
    return side_in + r * k + side_out + bias, macs * layer.calls


def five_stage_block(
    layer: LayerInfo, r: int, inner_in: int, inner_out: int, method: str, ranks
) -> FactorizedBlock:
    s, t, dims = layer.in_features, layer.out_features, layer.spatial_dims
    stages: OrderedDict[str, nn.Module] = OrderedDict()
    if merge_in(s, inner_in, r):
        stages["pointwise_in"] = pointwise(s, r, dims=dims)
    else:
        stages["pointwise_in"] = pointwise(s, inner_in, dims=dims)
        stages["core_in"] = pointwise(inner_in, r, dims=dims)
    stages["depthwise"] = spatial_like(layer, r, r, groups=r)
    if merge_out(t, inner_out, r):
        stages["pointwise_out"] = pointwise(r, t, bias=layer.bias, dims=dims)
    else:
        stages["core_out"] = pointwise(r, inner_out, dims=dims)
        stages["pointwise_out"] = pointwise(inner_out, t, bias=layer.bias, dims=dims)
    return FactorizedBlock(stages, layer.name, method, ranks)


def fill_five_stage(
    block: FactorizedBlock,
    project_in: np.ndarray,
    core_in: np.ndarray,
    spatial: np.ndarray,
    core_out: np.ndarray,
    project_out: np.ndarray,
) -> None:
    """Set the block's weights from the five maps (as matrices: L_in×S, R×L_in, R×k…,
    L_out×R, T×L_out); a merged pair gets their product."""
    if "core_in" in block._modules:
        set_matrix(block.pointwise_in, project_in)
        set_matrix(block.core_in, core_in)
    else:
        set_matrix(block.pointwise_in, core_in @ project_in)
    r = spatial.shape[0]
    set_kernel(block.depthwise, spatial.reshape(r, 1, *spatial.shape[1:]))
    if "core_out" in block._modules:
        set_matrix(block.core_out, core_out)
        set_matrix(block.pointwise_out, project_out)
    else:
        set_matrix(block.pointwise_out, project_out @ core_out)


def _regrouped(conv: nn.Module, factor: int, more: bool) -> nn.Module:
    """`conv` (of any conv type) with channels and groups multiplied (`more`) or divided by
    `factor`."""
    scale = (lambda n: n * factor) if more else (lambda n: n // factor)
    geometry = {"output_padding": conv.output_padding} if conv.transposed else {}
    return type(conv)(
        scale(conv.in_channels),
        scale(conv.out_channels),
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=scale(conv.groups),
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        **geometry,
    )


def _conv_stages(block: FactorizedBlock) -> OrderedDict[str, nn.Module]:
    stages = OrderedDict(block.named_children())
    for name, stage in stages.items():
        if type(stage) not in CONV_TYPES:
            raise ValueError(
                f"{block.method} builds a {type(stage).__name__} stage '{name}'; only blocks of "
                "conv stages can be grouped, so skip grouped convs for this method"
            )
    return stages


def grouped_block(group: FactorizedBlock, groups: int) -> FactorizedBlock:
    """The block of a `groups`-group conv from the block of one of its groups."""
    stages = OrderedDict(
        (name, _regrouped(stage, groups, more=True)) for name, stage in _conv_stages(group).items()
    )
    return FactorizedBlock(stages, group.source, group.method, group.ranks)


def group_block(block: FactorizedBlock, groups: int) -> FactorizedBlock:
    """One group's block (fresh weights) of a grouped conv's block: `grouped_block` undone."""
    stages = OrderedDict(
        (name, _regrouped(stage, groups, more=False)) for name, stage in _conv_stages(block).items()
    )
    return FactorizedBlock(stages, block.source, block.method, block.ranks)


def conv_group(conv: nn.Module, index: int) -> nn.Module:
    """Group `index` of a grouped conv as a conv of its own, sharing nothing with `conv`."""
    single = _regrouped(conv, conv.groups, more=False)
    # A group's weight rows are its output channels, or its input ones for a transposed conv.
    n = single.weight.shape[0]
    rows = slice(index * n, (index + 1) * n)
    outputs = slice(index * single.out_channels, (index + 1) * single.out_channels)
    with torch.no_grad():
        single = single.to(conv.weight.device, conv.weight.dtype)
        single.weight.copy_(conv.weight[rows])
        if conv.bias is not None:
            single.bias.copy_(conv.bias[outputs])
    return single


def set_group(block: FactorizedBlock, group: FactorizedBlock, index: int) -> None:
    """Write one group's filled block into slice `index` of every stage of `block`."""
    with torch.no_grad():
        for stage, part in zip(block, group):
            for name, tensor in part.named_parameters():
                rows = tensor.shape[0]
                getattr(stage, name)[index * rows : (index + 1) * rows].copy_(tensor)


def block_kernel(block: nn.Sequential) -> np.ndarray:
    """The one kernel (T×S×k… in the conv layout, or out×in for Linear) a filled block
    computes, in float64: its stages composed. A block has at most one stage with a spatial
    extent (dense or depthwise, transposed or not); the 1×1 stages around it multiply its
    channel modes."""
    kernel: np.ndarray | None = None
    for stage in block:
        w = kernel_of(stage)
        if isinstance(stage, nn.Linear):
            kernel = w if kernel is None else w @ kernel
            continue
        ones = (1,) * (w.ndim - 2)
        if stage.groups == 1 and w.shape[2:] == ones:
            kernel = (
                w
                if kernel is None
                else np.einsum("oi,is...->os...", w.reshape(w.shape[:2]), kernel, optimize=True)
            )
            continue
        if kernel is not None and kernel.shape[2:] != ones:
            raise ValueError("a block with two spatial stages has no single kernel")
        if stage.groups == 1:
            kernel = (
                w
                if kernel is None
                else np.einsum(
                    "oi...,is->os...", w, kernel.reshape(kernel.shape[:2]), optimize=True
                )
            )
        elif stage.groups == stage.in_channels == stage.out_channels and kernel is not None:
            kernel = w[:, 0][:, None] * kernel.reshape(*kernel.shape[:2], *ones)
        else:
            raise ValueError(f"stage {stage} cannot be composed into one kernel")
    return kernel
