"""Trace a model with torch.fx and record every node's output shape.

Attention modules are first split (`rankfold.passes.attention`). A model fx cannot trace gets a
SymbolicTraceError naming the innermost module being traced when tracing broke (the pipeline then
tries the capture path, see `rankfold.passes.capture`).
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import io
from collections.abc import Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from rankfold.passes.attention import split_attention
from rankfold.passes.core import ConfigError, SymbolicTraceError, TraceError


class _RecordingTracer(fx.Tracer):
    """fx tracer that remembers which module it is inside, and treats named modules as leaves."""

    def __init__(self, leaf_modules: Sequence[str] = ()) -> None:
        super().__init__()
        self.leaf_modules = set(leaf_modules)
        self.failed_in: tuple[str, str] | None = None  # innermost (name, type) that raised

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaf_modules or super().is_leaf_module(
            m, module_qualified_name
        )

    def call_module(self, m, forward, args, kwargs):  # noqa: ANN001 (fx's signature)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = (self.path_of_module(m), type(m).__name__)
            raise


def _defaults(model: nn.Module) -> dict[str, object] | None:
    """forward's optional arguments at their defaults: the model is compressed as it is called
    with one input, so `forward(x, mask=None)` traces with mask=None rather than a proxy that
    no Python branch can test."""
    parameters = list(inspect.signature(model.forward).parameters.values())[1:]
    optional = {
        p.name: p.default
        for p in parameters
        if p.default is not inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    required = [
        p.name
        for p in parameters
        if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if required:
        raise TraceError(
            f"{type(model).__name__}.forward needs inputs besides the image "
            f"({', '.join(required)}); wrap the model in a module whose forward takes one tensor"
        )
    return optional or None


def _check_leaf_names(model: nn.Module, leaf_modules: Sequence[str]) -> None:
    """A leaf name that names no module would keep nothing whole, silently."""
    names = [name for name, _ in model.named_modules() if name]
    for leaf in leaf_modules:
        if leaf not in names:
            close = difflib.get_close_matches(leaf, names, n=1)
            hint = f"did you mean '{close[0]}'?" if close else "`rankfold analyze` lists them"
            raise ConfigError(
                f"--leaf {leaf} names no module of {type(model).__name__} (it takes dotted "
                f"module names, not globs); {hint}"
            )


def trace(
    model: nn.Module, example_input: torch.Tensor, leaf_modules: Sequence[str] = ()
) -> fx.GraphModule:
    """Symbolically trace `model` and run shape propagation on `example_input`.

    Every node gets `node.meta["tensor_meta"]` (shape, dtype). Attention modules are first
    replaced by their split equivalents (`split_attention`, on a copy), so their projections are
    Linear calls. Otherwise the returned GraphModule shares its submodules with `model`; passes
    deep-copy before they change anything.
    """
    _check_leaf_names(model, leaf_modules)
    model = split_attention(model, leaf_modules)
    tracer = _RecordingTracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=_defaults(model))
    except Exception as exc:  # fx raises many types; all mean "cannot trace here"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if tracer.failed_in is None:
            raise SymbolicTraceError(
                f"torch.fx cannot trace {type(model).__name__}.forward: {reason}",
                "remove data-dependent Python control flow from it, or move it into a submodule "
                "marked a leaf",
                None,
            ) from None
        name, kind = tracer.failed_in
        raise SymbolicTraceError(
            f"torch.fx cannot trace module '{name}' ({kind}): {reason}",
            f"mark it a leaf (--leaf {name}) so it is kept whole, or remove data-dependent "
            "Python control flow",
            name,
        ) from None
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    was_training = gm.training
    gm.eval()
    try:
        # A failing generated forward prints its own traceback to stderr; the error below says it.
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(example_input)
    except Exception as exc:
        root = exc
        while root.__cause__ is not None:  # ShapeProp wraps the real error in a node dump
            root = root.__cause__
        raise input_shape_error(root, example_input, "the traced model") from None
    finally:
        gm.train(was_training)
    return gm


def input_shape_error(exc: BaseException, example_input: torch.Tensor, what: str) -> TraceError:
    """`what` failed on the example input: most often the input shape is wrong for the model."""
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return TraceError(
        f"{what} fails on an input of shape {tuple(example_input.shape)}: {reason}; "
        "check the model's input shape (--input-shape)"
    )
