"""Graph clean-up before export: drop identity ops, fold BatchNorm, merge adjacent 1×1 convs.

All three keep the eval-mode function (the result is returned in eval mode): dropout and
nn.Identity are identities at inference, a BatchNorm with running statistics is an affine map per
channel that folds into the conv/linear before it (torch's `fuse_conv_bn_eval` /
`fuse_linear_bn_eval` do the arithmetic), and two 1×1 convs with nothing between them are one
1×1 conv with the product weight, kept only when that product is cheaper.

Not torch.fx.experimental.optimization.fuse: it does not see into a FactorizedBlock (a BN right
after a block must fold into the block's last stage), re-traces the model unless told not to
(which inlines the blocks and drops the shape metadata), and folds a conv called from several
sites into each site's BN in turn, which is wrong. The pass matches with torch's
`matches_module_pattern` rules (exact module types, single-user producer) and guards those cases.
"""

from __future__ import annotations

import copy
from collections import Counter, OrderedDict
from collections.abc import Callable

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from rankfold.passes.blocks import FactorizedBlock

_IDENTITY_MODULES = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
# Functional dropouts: (function, index of the positional `training` argument).
_DROPOUT_FUNCTIONS = {
    F.dropout: 2,
    F.dropout1d: 2,
    F.dropout2d: 2,
    F.dropout3d: 2,
    F.alpha_dropout: 2,
    F.feature_alpha_dropout: 2,
}
_FOLDABLE = {
    (nn.Conv1d, nn.BatchNorm1d),
    (nn.Conv2d, nn.BatchNorm2d),
    (nn.Conv3d, nn.BatchNorm3d),
    (nn.Linear, nn.BatchNorm1d),
}

Setter = Callable[[nn.Module], None]


def cleanup(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, int]]:
    """A cleaned deep copy of `gm` (in eval mode) and what was done.

    Counts: identities_dropped, batchnorms_folded (into a plain conv/linear),
    batchnorms_folded_into_blocks (into a FactorizedBlock's last stage), convs_merged (pairs of
    1×1 convs made one, across nodes or inside a block).
    """
    new = copy.deepcopy(gm)
    new.eval()
    counts = {
        "identities_dropped": _drop_identities(new),
        "batchnorms_folded": 0,
        "batchnorms_folded_into_blocks": 0,
        "convs_merged": 0,
    }
    plain, into_blocks = _fold_batchnorms(new)
    counts["batchnorms_folded"], counts["batchnorms_folded_into_blocks"] = plain, into_blocks
    counts["convs_merged"] = _merge_pointwise(new)
    new.delete_all_unused_submodules()
    new.graph.lint()
    new.recompile()
    _propagate_shapes(new)
    return new, counts


def _propagate_shapes(gm: fx.GraphModule) -> None:
    """Re-record every node's shape when the input had one (merges change intermediate shapes)."""
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    metas = [node.meta.get("tensor_meta") for node in placeholders]
    if not placeholders or any(meta is None for meta in metas):
        return
    inputs = [torch.zeros(tuple(meta.shape), dtype=meta.dtype) for meta in metas]
    with torch.no_grad():
        ShapeProp(gm).propagate(*inputs)


def _call_sites(gm: fx.GraphModule) -> Counter:
    """Call_module nodes per module object (a shared module must stay as it is)."""
    sites: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            sites[id(gm.get_submodule(node.target))] += 1
    return sites


def _drop_identities(gm: fx.GraphModule) -> int:
    dropped = 0
    for node in list(gm.graph.nodes):
        if not node.args or not isinstance(node.args[0], fx.Node):
            continue
        if node.op == "call_module":
            is_identity = type(gm.get_submodule(node.target)) in _IDENTITY_MODULES
        elif node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS:
            index = _DROPOUT_FUNCTIONS[node.target]
            training = node.kwargs.get(
                "training", node.args[index] if len(node.args) > index else True
            )
            is_identity = training is False
        else:
            is_identity = False
        if is_identity:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            dropped += 1
    return dropped


def _edge_layer(module: nn.Module, end: int) -> tuple[nn.Module, Setter | None]:
    """The first (end=0) or last (end=-1) layer `module` applies, and how to replace it.

    A FactorizedBlock is a chain of linear stages, so its edge stage is what a neighbouring op
    sees; any other module is its own edge.
    """
    if isinstance(module, FactorizedBlock):
        index = end % len(module)

        def replace(new: nn.Module) -> None:
            module[index] = new

        return module[index], replace
    return module, None


def _single_input_from(node: fx.Node) -> fx.Node | None:
    """The call_module node feeding `node` when it is `node`'s only input and has no other user."""
    if node.kwargs or len(node.args) != 1:
        return None
    source = node.args[0]
    if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
        return None
    return source


def _fold_batchnorms(gm: fx.GraphModule) -> tuple[int, int]:
    sites = _call_sites(gm)
    plain = into_blocks = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        bn = gm.get_submodule(node.target)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_mean is None:
            continue  # not a BN, or one without running statistics (normalizes per batch)
        source = _single_input_from(node)
        if source is None:
            continue
        producer = gm.get_submodule(source.target)
        layer, replace_stage = _edge_layer(producer, -1)
        if (type(layer), type(bn)) not in _FOLDABLE or sites[id(producer)] > 1:
            continue
        if isinstance(layer, nn.Linear):
            shape = getattr(source.meta.get("tensor_meta"), "shape", None)
            if shape is None or len(shape) != 2:
                continue  # BatchNorm1d on N×C×L normalizes C, not the linear's output features
            fused = fuse_linear_bn_eval(layer, bn)
        else:
            fused = fuse_conv_bn_eval(layer, bn)
        if replace_stage is None:
            gm.set_submodule(source.target, fused)
            plain += 1
        else:
            replace_stage(fused)
            into_blocks += 1
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
    return plain, into_blocks


def _pointwise(module: nn.Module) -> bool:
    """A 1×1 dense conv without padding (then it is a matrix applied at every position)."""
    return (
        type(module) is nn.Conv2d
        and tuple(module.kernel_size) == (1, 1)
        and module.groups == 1
        and (isinstance(module.padding, str) or tuple(module.padding) == (0, 0))
    )


def _mergeable(first: nn.Module, second: nn.Module) -> bool:
    """Both 1×1, the second without stride (so both run at the same positions), and cheaper:
    S·T weights against S·R + R·T."""
    if not (_pointwise(first) and _pointwise(second)) or tuple(second.stride) != (1, 1):
        return False
    s, r, t = first.in_channels, first.out_channels, second.out_channels
    return s * t < r * (s + t)


def _merged(first: nn.Conv2d, second: nn.Conv2d) -> nn.Conv2d:
    """second ∘ first as one 1×1 conv: W = W₂·W₁, b = W₂·b₁ + b₂ (plain linear algebra)."""
    has_bias = first.bias is not None or second.bias is not None
    conv = nn.Conv2d(
        first.in_channels, second.out_channels, 1, stride=first.stride, bias=has_bias
    ).to(first.weight.device, first.weight.dtype)
    w1, w2 = first.weight[:, :, 0, 0], second.weight[:, :, 0, 0]
    with torch.no_grad():
        conv.weight.copy_((w2 @ w1)[:, :, None, None])
        if has_bias:
            bias = torch.zeros_like(conv.bias)
            if first.bias is not None:
                bias += w2 @ first.bias
            if second.bias is not None:
                bias += second.bias
            conv.bias.copy_(bias)
    return conv


def _without_stage(block: FactorizedBlock, index: int) -> FactorizedBlock:
    stages = OrderedDict(
        (name, m) for i, (name, m) in enumerate(block.named_children()) if i != index
    )
    return FactorizedBlock(stages, block.source, block.method, block.ranks)


def _merge_pointwise(gm: fx.GraphModule) -> int:
    merged = 0
    changed = True
    while changed:
        changed = False
        sites = _call_sites(gm)
        # Inside blocks: adjacent 1×1 stages.
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            block = gm.get_submodule(node.target)
            if not isinstance(block, FactorizedBlock) or sites[id(block)] > 1:
                continue
            for i in range(len(block) - 1):
                if _mergeable(block[i], block[i + 1]):
                    combined = _merged(block[i], block[i + 1])
                    block = _without_stage(block, i + 1)
                    block[i] = combined
                    gm.set_submodule(node.target, block)
                    merged, changed = merged + 1, True
                    break
        # Across nodes: the producer's last 1×1 and the consumer's first 1×1.
        for node in list(gm.graph.nodes):
            if node.op != "call_module":
                continue
            source = _single_input_from(node)
            if source is None:
                continue
            producer, consumer = gm.get_submodule(source.target), gm.get_submodule(node.target)
            if sites[id(producer)] > 1 or sites[id(consumer)] > 1:
                continue
            last, replace_last = _edge_layer(producer, -1)
            first, _ = _edge_layer(consumer, 0)
            if not _mergeable(last, first):
                continue
            combined = _merged(last, first)
            if replace_last is None:
                gm.set_submodule(source.target, combined)
            else:
                replace_last(combined)
            if isinstance(consumer, FactorizedBlock) and len(consumer) > 1:
                gm.set_submodule(node.target, _without_stage(consumer, 0))
            else:
                node.replace_all_uses_with(source)
                gm.graph.erase_node(node)
            merged, changed = merged + 1, True
            break  # module identities changed: recount call sites
    return merged
