"""Attention whose projections are ordinary Linear modules, so they are counted and decomposed.

`nn.MultiheadAttention` keeps its q/k/v projections packed in one `in_proj_weight` that
`F.multi_head_attention_forward` multiplies directly, and torchvision's Swin attention passes its
`qkv` and `proj` weights to a `torch.fx.wrap`ped function: to torch.fx neither is a Linear call.
`split_attention` replaces them, on a copy of the model, by modules that compute the same
function (the same masks, dropout, layouts and returned weights) but call q/k/v/output (or
qkv/proj) `nn.Linear` submodules, which the analysis, planner, fits, export and restore then
treat like any Linear. What remains between the projections (scores, softmax, weighted sum;
Swin's windows) is one `torch.fx.wrap`ped function per call, counted in the analysis by
`ATTENTION_MACS` and never decomposed.

An `nn.MultiheadAttention` with `add_bias_kv` or `add_zero_attn` (keys/values extended after the
projection), a subclass (its forward may differ) or one that is (or is inside) a `--leaf` module
is kept whole, `kept_reason` saying why in the analysis's key; so is one inside a torch.nn module
(nn.TransformerEncoderLayer reads its packed weights; torch.fx keeps it whole, uncounted).
"""

from __future__ import annotations

import copy
import functools
import math
import sys
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True: not allowed) as the additive float mask torch builds from it."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        mask, float("-inf")
    )


def batch_first(x: torch.Tensor, is_batch_first: bool) -> torch.Tensor:
    """(N, L, E) from nn.MultiheadAttention's input layouts: unbatched (L, E), (L, N, E) or
    (N, L, E). The projections then see the batch first, so their MACs per sample are right."""
    if x.dim() == 2:
        return x.unsqueeze(0)
    return x if is_batch_first else x.transpose(0, 1)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    need_weights: bool,
    average_attn_weights: bool,
    is_causal: bool,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Multi-head attention on projected q (N, L, E), k and v (N, S, E), as
    `F.multi_head_attention_forward` computes it between its projections: the (N, L, E) output
    before the output projection, and the attention weights when `need_weights`."""
    n, length, e = q.shape
    source = k.shape[1]
    d = e // num_heads
    q = q.view(n, length, num_heads, d).transpose(1, 2)
    k = k.view(n, source, num_heads, d).transpose(1, 2)
    v = v.view(n, source, num_heads, d).transpose(1, 2)
    padding = _float_mask(key_padding_mask, q.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
    if is_causal and padding is None and not need_weights:
        mask = None  # SDPA's causal hint, as torch uses it
    else:
        mask = _float_mask(attn_mask, q.dtype)
        is_causal = False
        if mask is not None:  # (L, S) or (N·heads, L, S)
            mask = mask.view(-1, num_heads, length, source) if mask.dim() == 3 else mask
        if padding is not None:  # (N, S), or (S,) for an unbatched input
            padding = padding.view(-1, 1, 1, source)
            mask = padding if mask is None else mask + padding
    weights = None
    if need_weights:
        scores = (q * math.sqrt(1.0 / d)) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        weights = F.dropout(F.softmax(scores, dim=-1), p=dropout_p)
        out = weights @ v
        if average_attn_weights:
            weights = weights.mean(dim=1)
    else:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal
        )
    return out.transpose(1, 2).reshape(n, length, e), weights


def restore_layout(
    out: torch.Tensor, weights: torch.Tensor | None, query: torch.Tensor, is_batch_first: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output (and weights) back in the query's layout, as nn.MultiheadAttention returns."""
    if query.dim() == 2:
        return out.squeeze(0), None if weights is None else weights.squeeze(0)
    return (out if is_batch_first else out.transpose(0, 1)), weights


def attend_macs(q: Sequence[int], k: Sequence[int], *_: object) -> int:
    """MACs per sample of `attend`: scores and weighted sum, L·S·E each."""
    return 2 * q[-2] * k[-2] * q[-1]


class SplitMultiheadAttention(nn.Module):
    """nn.MultiheadAttention with q/k/v and output projections as nn.Linear submodules.

    Same arguments and results as the module it replaces (`from_attention`); parameters
    q_proj, k_proj, v_proj and out_proj."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        kdim: int,
        vdim: int,
        bias: bool,
        dropout: float,
        batch_first: bool,
    ) -> None:
        super().__init__()
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.dropout, self.batch_first = dropout, batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_attention(cls, module: nn.MultiheadAttention) -> SplitMultiheadAttention:
        e = module.embed_dim
        split = cls(
            e,
            module.num_heads,
            module.kdim,
            module.vdim,
            module.in_proj_bias is not None,
            module.dropout,
            module.batch_first,
        )
        weight = module.in_proj_weight
        weights = (
            (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
            if weight is None
            else weight.chunk(3)
        )
        biases = (None,) * 3 if module.in_proj_bias is None else module.in_proj_bias.chunk(3)
        projections = (split.q_proj, split.k_proj, split.v_proj, split.out_proj)
        weights = (*weights, module.out_proj.weight)
        biases = (*biases, module.out_proj.bias)
        with torch.no_grad():
            for linear, w, b in zip(projections, weights, biases, strict=True):
                linear.to(w)
                linear.weight.copy_(w)
                if b is not None:
                    linear.bias.copy_(b)
        return split.train(module.training)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q = self.q_proj(batch_first(query, self.batch_first))
        k = self.k_proj(batch_first(key, self.batch_first))
        v = self.v_proj(batch_first(value, self.batch_first))
        out, weights = attend(
            q,
            k,
            v,
            self.num_heads,
            attn_mask,
            key_padding_mask,
            need_weights,
            average_attn_weights,
            is_causal,
            self.dropout if self.training else 0.0,
        )
        return restore_layout(self.out_proj(out), weights, query, self.batch_first)


def kept_reason(module: nn.MultiheadAttention) -> str:
    """Why `split_attention` keeps this nn.MultiheadAttention whole."""
    if type(module) is not nn.MultiheadAttention:
        return f"a subclass ({type(module).__name__}) whose forward may differ"
    if module.bias_k is not None:
        return "add_bias_kv appends learned key/value rows after the projections"
    if module.add_zero_attn:
        return "add_zero_attn appends zero key/value rows after the projections"
    return "a leaf module (--leaf), so its packed projections are not split"


def _window_geometry(
    x: torch.Tensor, window_size: Sequence[int], shift_size: Sequence[int]
) -> tuple[int, int, int, int, list[int]]:
    """Padding and shift of torchvision's `shifted_window_attention` for input x (B, H, W, C):
    (pad_bottom, pad_right, padded H, padded W, shift), no shift along a side one window covers."""
    _, h, w, _ = x.shape
    pad_r = (window_size[1] - w % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - h % window_size[0]) % window_size[0]
    pad_h, pad_w = h + pad_b, w + pad_r
    shift = [0 if window_size[0] >= pad_h else shift_size[0]]
    shift.append(0 if window_size[1] >= pad_w else shift_size[1])
    return pad_b, pad_r, pad_h, pad_w, shift


def partition_windows(
    x: torch.Tensor, window_size: list[int], shift_size: list[int]
) -> torch.Tensor:
    """(B, H, W, C) padded, shifted and cut into windows: (B, windows, positions, C)."""
    b, _, _, c = x.shape
    pad_b, pad_r, pad_h, pad_w, shift = _window_geometry(x, window_size, shift_size)
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    wh, ww = window_size
    x = x.view(b, pad_h // wh, wh, pad_w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (pad_h // wh) * (pad_w // ww), wh * ww, c)


def _shift_mask(
    x: torch.Tensor, pad_h: int, pad_w: int, window_size: list[int], shift: list[int]
) -> torch.Tensor:
    """torchvision's mask of the shifted windows: (windows, positions, positions), -100 between
    positions that came from different regions."""
    mask = x.new_zeros((pad_h, pad_w))
    h_slices = ((0, -window_size[0]), (-window_size[0], -shift[0]), (-shift[0], None))
    w_slices = ((0, -window_size[1]), (-window_size[1], -shift[1]), (-shift[1], None))
    for count, (h, w) in enumerate((h, w) for h in h_slices for w in w_slices):
        mask[h[0] : h[1], w[0] : w[1]] = count
    wh, ww = window_size
    mask = mask.view(pad_h // wh, wh, pad_w // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def window_attention(
    qkv: torch.Tensor,
    x: torch.Tensor,
    relative_position_bias: torch.Tensor,
    window_size: list[int],
    shift_size: list[int],
    num_heads: int,
    logit_scale: torch.Tensor | None,
    attention_dropout: float,
    training: bool,
) -> torch.Tensor:
    """Attention within each window, from qkv (B, windows, positions, 3C) to (B, windows,
    positions, C), as torchvision's `shifted_window_attention` (v1 scaled dot product, v2
    cosine with `logit_scale`); `x` is the attention's input, for the shift mask's geometry."""
    b, windows, n, c3 = qkv.shape
    c = c3 // 3
    qkv = qkv.reshape(b, windows, n, 3, num_heads, c // num_heads).permute(3, 0, 1, 4, 2, 5)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (B, windows, heads, positions, C/heads)
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * (c // num_heads) ** -0.5).matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    _, _, pad_h, pad_w, shift = _window_geometry(x, window_size, shift_size)
    if sum(shift) > 0:
        attn = attn + _shift_mask(x, pad_h, pad_w, window_size, shift).unsqueeze(1)
    attn = F.dropout(F.softmax(attn, dim=-1), p=attention_dropout, training=training)
    return attn.matmul(v).transpose(2, 3).reshape(b, windows, n, c)


def window_attention_macs(qkv: Sequence[int], *_: object) -> int:
    """MACs per sample of `window_attention`: scores and weighted sum in every window."""
    windows, n, c3 = qkv[-3:]
    return 2 * windows * n * n * (c3 // 3)


def merge_windows(
    windows: torch.Tensor, x: torch.Tensor, window_size: list[int], shift_size: list[int]
) -> torch.Tensor:
    """`partition_windows` undone: windows (B, windows, positions, C) back to x's (B, H, W, C)."""
    b, h, w, _ = x.shape
    c = windows.shape[-1]
    _, _, pad_h, pad_w, shift = _window_geometry(x, window_size, shift_size)
    wh, ww = window_size
    out = windows.reshape(b, pad_h // wh, pad_w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    out = out.reshape(b, pad_h, pad_w, c)
    if sum(shift) > 0:
        out = torch.roll(out, shifts=(shift[0], shift[1]), dims=(1, 2))
    return out[:, :h, :w, :].contiguous()


for _name in ("batch_first", "attend", "restore_layout"):
    fx.wrap(_name)
for _name in ("partition_windows", "window_attention", "merge_windows"):
    fx.wrap(_name)

# The wrapped functions that hold attention's own products, and their MACs per sample from the
# shapes of their first tensor arguments.
ATTENTION_MACS: dict[Callable, Callable[..., int]] = {
    attend: attend_macs,
    window_attention: window_attention_macs,
}


class _SplitWindowForward:
    """torchvision's Swin attention forward with `self.qkv` and `self.proj` called as modules."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.get_relative_position_bias()
        qkv = self.qkv(partition_windows(x, self.window_size, self.shift_size))
        out = window_attention(
            qkv,
            x,
            bias,
            self.window_size,
            self.shift_size,
            self.num_heads,
            getattr(self, "logit_scale", None),
            self.attention_dropout,
            self.training,
        )
        out = F.dropout(self.proj(out), p=self.dropout, training=self.training)
        return merge_windows(out, x, self.window_size, self.shift_size)


@functools.cache
def _window_split_classes() -> dict[type, type]:
    """torchvision's Swin attention classes → their split subclasses. Made on first use, because
    importing torchvision's models costs about a second, which every process that decomposes
    layers would pay (the worker processes of `decompose` load this module, never a Swin)."""
    from torchvision.models.swin_transformer import (
        ShiftedWindowAttention,
        ShiftedWindowAttentionV2,
    )

    class SplitShiftedWindowAttention(_SplitWindowForward, ShiftedWindowAttention):
        """torchvision's ShiftedWindowAttention (same parameters) calling its qkv and proj."""

    class SplitShiftedWindowAttentionV2(_SplitWindowForward, ShiftedWindowAttentionV2):
        """torchvision's ShiftedWindowAttentionV2 (same parameters) calling its qkv and proj.
        Its forward zeroes the key part of the qkv bias on every call; here it is zeroed once
        (still trainable by fine-tuning, a freedom the original lacks)."""

    splits = {
        ShiftedWindowAttention: SplitShiftedWindowAttention,
        ShiftedWindowAttentionV2: SplitShiftedWindowAttentionV2,
    }
    for split in splits.values():  # where pickle and torch.save look them up
        split.__qualname__ = split.__name__
    return splits


def _window_splits() -> dict[type, type]:
    """The split classes, or none while torchvision's Swin module is not loaded: a model holding
    a Swin attention module has loaded it."""
    if "torchvision.models.swin_transformer" not in sys.modules:
        return {}
    return _window_split_classes()


def __getattr__(name: str) -> type:
    if name in ("SplitShiftedWindowAttention", "SplitShiftedWindowAttentionV2"):
        return next(s for s in _window_split_classes().values() if s.__name__ == name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _inside(name: str, leaves: Sequence[str]) -> bool:
    return any(name == leaf or name.startswith(f"{leaf}.") for leaf in leaves)


def _in_torch_leaf(model: nn.Module, name: str) -> bool:
    """Whether a parent of module `name` is one torch.fx keeps whole (a torch.nn module such as
    nn.TransformerEncoderLayer, whose forward reads its attention's packed weights)."""
    tracer = fx.Tracer()
    parts = name.split(".")
    parents = (".".join(parts[:i]) for i in range(1, len(parts)))
    return any(tracer.is_leaf_module(model.get_submodule(p), p) for p in parents)


def split_attention(model: nn.Module, leaf_modules: Sequence[str] = ()) -> nn.Module:
    """`model` with every supported attention module replaced by its split equivalent, on a
    deep copy (the model itself where there is nothing to replace). Modules in or under
    `leaf_modules`, or inside a torch.nn module torch.fx keeps whole, stay as they are."""
    window_splits = _window_splits()
    targets = [
        name
        for name, module in model.named_modules()
        if name
        and not _inside(name, leaf_modules)
        and not _in_torch_leaf(model, name)
        and (
            type(module) in window_splits
            or (
                type(module) is nn.MultiheadAttention
                and module.bias_k is None
                and not module.add_zero_attn
            )
        )
    ]
    if not targets:
        return model
    model = copy.deepcopy(model)
    for name in targets:
        module = model.get_submodule(name)
        if type(module) is nn.MultiheadAttention:
            parent, _, attribute = name.rpartition(".")
            split = SplitMultiheadAttention.from_attention(module)
            setattr(model.get_submodule(parent), attribute, split)
            continue
        if hasattr(module, "logit_scale") and module.qkv.bias is not None:  # V2
            length = module.qkv.bias.numel() // 3
            with torch.no_grad():
                module.qkv.bias[length : 2 * length] = 0
        module.__class__ = window_splits[type(module)]
    return model


__all__ = [
    "ATTENTION_MACS",
    "SplitMultiheadAttention",
    "kept_reason",
    "split_attention",
]
