"""The capture path: compress a model torch.fx cannot trace, without a whole-graph trace.

torch.fx stops at any Python branch on a traced value, including shape tests (`if x.shape[-1] >
8:`) that torch.export resolves on the example input. On this path the layers are the Conv2d and
Linear modules the forward calls on the example input (forward hooks record their shapes and how
often each runs), decompose swaps the planned ones in place at module level (the same blocks as
on a GraphModule), and the ONNX exporter (torch.export) traces the Python control flow itself.

What needs the fx graph is skipped, and `FX_ONLY_PASSES` names it for the report. Branches on
tensor values (`if x.sum() > 0:`) stop torch.export too: the pipeline exports the original model
before planning, so such a model fails early.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from rankfold.passes.analysis import (
    CONV_FUNCTIONS,
    LAYER_TYPES,
    MATMUL_FUNCTIONS,
    TRANSPOSED_CONV_FUNCTIONS,
    ModelAnalysis,
    analyze,
    attention_kept_key,
    attention_macs,
    conv_macs,
    einsum_macs,
    fixed_kernel_key,
    layer_info,
    matmul_macs,
    transposed_conv_macs,
)
from rankfold.passes.attention import split_attention
from rankfold.passes.core import SymbolicTraceError
from rankfold.passes.tracing import input_shape_error, trace

FX_ONLY_PASSES = (
    "BatchNorm folding",
    "1×1 conv merging",
    "identity dropping",
)

_MATMULS = (*MATMUL_FUNCTIONS, torch.Tensor.matmul, torch.Tensor.__matmul__)


@dataclass
class Captured:
    """A model ready for planning: `module` is the fx GraphModule, or on the capture path the
    model itself (decompose copies it before changing anything)."""

    module: nn.Module
    analysis: ModelAnalysis
    fx_error: SymbolicTraceError | None = None  # why torch.fx could not trace it

    @property
    def traced(self) -> bool:
        return self.fx_error is None


def trace_or_capture(
    model: nn.Module, example_input: torch.Tensor, leaf_modules: tuple[str, ...] | list[str] = ()
) -> Captured:
    """torch.fx's trace and analysis, or the capture path where fx stops at control flow;
    either way on the model with its attention split (`split_attention`)."""
    model = split_attention(model, leaf_modules)
    try:
        gm = trace(model, example_input, leaf_modules)
    except SymbolicTraceError as exc:
        return Captured(model, analyze_captured(model, example_input), exc)
    return Captured(gm, analyze(gm))


class _FunctionalCalls(TorchFunctionMode):
    """Counts convs and matrix products called outside a hooked module (F.conv2d, x @ w)."""

    def __init__(self, buffers: dict[int, str]) -> None:
        super().__init__()
        self.inside = 0  # depth of hooked module calls
        self.found: dict[str, int] = {}
        self.buffers = buffers  # id of each buffer tensor → its qualified name

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's)
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.inside == 0 and isinstance(out, torch.Tensor):
            if func in CONV_FUNCTIONS:
                weight = args[1] if len(args) > 1 else kwargs["weight"]
                macs = conv_macs(tuple(out.shape), tuple(weight.shape))
                self._add(func, macs, [weight])
            elif func in TRANSPOSED_CONV_FUNCTIONS:
                weight = args[1] if len(args) > 1 else kwargs["weight"]
                macs = transposed_conv_macs(tuple(args[0].shape), tuple(weight.shape))
                self._add(func, macs, [weight])
            elif func in _MATMULS and isinstance(args[0], torch.Tensor):
                self._add(func, matmul_macs(tuple(out.shape), tuple(args[0].shape)), args[:2])
            elif func is torch.einsum and isinstance(args[0], str):
                operands = args[1] if isinstance(args[1], list | tuple) else args[1:]
                macs = einsum_macs(args[0], [t.shape for t in operands], tuple(out.shape))
                if macs is not None:
                    self._add(func, macs)
            elif func is F.scaled_dot_product_attention:
                query, key = (args[0], args[1]) if len(args) > 1 else (args[0], kwargs["key"])
                self._add(func, 2 * math.prod(query.shape[1:]) * key.shape[-2])
        return out

    def _add(self, func: Any, macs: int, operands: Sequence = ()) -> None:
        fixed = [self.buffers[id(t)] for t in operands if id(t) in self.buffers]
        if fixed:
            key = fixed_kernel_key(fixed[0])
            self.found[key] = self.found.get(key, 0) + macs
            return
        base = getattr(func, "__name__", "matmul").strip("_")
        index = sum(1 for key in self.found if key.split("_")[0] == base)
        self.found[base if index == 0 else f"{base}_{index}"] = macs


def analyze_captured(model: nn.Module, example_input: torch.Tensor) -> ModelAnalysis:
    """One LayerInfo per conv/linear module the forward calls on `example_input`, in call order,
    on the model as given (`trace_or_capture` splits its attention first),
    with shapes from forward hooks; functional convs and matrix products, and
    nn.MultiheadAttention calls, counted as `analyze` counts them."""
    seen: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
    attention: dict[str, int] = {}
    counter = _FunctionalCalls({id(b): name for name, b in model.named_buffers()})
    handles = []

    def enter(_module: nn.Module, _args: Any) -> None:
        counter.inside += 1

    def leave(name: str, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        counter.inside -= 1
        if isinstance(module, nn.MultiheadAttention):
            names = ("query", "key", "value")
            inputs = [*args, *(kwargs[n] for n in names[len(args) :] if n in kwargs)][:3]
            macs = attention_macs(module, *(tuple(t.shape) for t in inputs))
            key = attention_kept_key(name, module)
            attention[key] = attention.get(key, 0) + macs
        else:
            shapes = (tuple(args[0].shape[1:]), tuple(output.shape[1:]))
            seen.setdefault(name, []).append(shapes)

    for name, module in model.named_modules():
        if isinstance(module, (*LAYER_TYPES, nn.MultiheadAttention)) and name:
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(
                module.register_forward_hook(
                    lambda m, a, k, o, name=name: leave(name, m, a, k, o), with_kwargs=True
                )
            )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            model(example_input)
    except Exception as exc:
        raise input_shape_error(exc, example_input, "the model") from None
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    layers = tuple(
        layer_info(name, model.get_submodule(name), *calls[0], calls=len(calls))
        for name, calls in seen.items()
    )
    functional = {**counter.found, **attention}
    total_macs = sum(info.macs for info in layers) + sum(functional.values())
    total_params = sum(p.numel() for p in model.parameters())
    return ModelAnalysis(layers, total_params, total_macs, functional)


def recompiled(module: nn.Module) -> nn.Module:
    """Regenerate a GraphModule's code after its submodules changed (nothing to do on the
    capture path, where the module's own forward calls the new blocks)."""
    if isinstance(module, fx.GraphModule):
        module.recompile()
        module.graph.lint()
    return module


__all__ = ["FX_ONLY_PASSES", "Captured", "analyze_captured", "recompiled", "trace_or_capture"]
