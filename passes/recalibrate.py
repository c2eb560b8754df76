"""Recover a decomposed model's activation statistics without training.

A factorized layer is close to, not equal to, the layer it replaces, so the activations after it
drift in mean and scale, and the drift compounds through the network. Two fixes, both data-driven
and gradient-free:

- `recalibrate_bn`: re-estimate every BatchNorm's running mean/variance on calibration batches, so
  each BN normalizes the activations the compressed network really produces.
- `correct_bias`: for models without BatchNorm (VGG, AlexNet), shift each decomposed block's output
  bias so that its per-channel output mean equals the original layer's on the same data (the
  empirical bias correction of Nagel et al., "Data-Free Quantization", ICCV 2019, applied to
  factorization error instead of quantization error).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from rankfold.passes.core import ConfigError, DataError
from rankfold.passes.layout import in_conv_layout

Batch = torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether `model` holds a BatchNorm layer that tracks running statistics."""
    return bool(_batchnorms(model))


def recalibrate_bn(
    model: nn.Module, inputs: Iterable[Batch], max_batches: int | None = None
) -> int:
    """Re-estimate every BatchNorm's running statistics on `inputs`; return how many BNs changed.

    Each BN's statistics are reset and recomputed as the plain average over the batches
    (momentum=None), with only the BN layers in train mode so dropout and the like stay off.
    `inputs` yields input tensors or `(inputs, labels)` pairs (as `rankfold.models.batches` does).
    Every module's mode and momentum are restored afterwards; on any error (also Ctrl-C) the
    previous running statistics are put back. Without BatchNorm the model is untouched and 0 is
    returned.
    """
    _check_max_batches(max_batches)
    norms = _batchnorms(model)
    if not norms:
        return 0
    modes = [(module, module.training) for module in model.modules()]
    saved = [(bn, bn.momentum, _stats(bn)) for bn in norms]
    device = _device_of(model)
    completed = False
    try:
        model.eval()
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative moving average: every batch weighs the same
            bn.train()
        seen = 0
        with torch.no_grad(), in_conv_layout((model,)):
            for x in _limited(inputs, max_batches):
                model(_input_of(x).to(device))
                seen += 1
        if seen == 0:
            raise DataError(
                "no calibration batches to recalibrate BatchNorm on; pass at least one batch of "
                "training data"
            )
        completed = True
    finally:
        for bn, momentum, stats in saved:
            bn.momentum = momentum
            if not completed:
                _restore_stats(bn, stats)
        for module, mode in modes:
            module.training = mode
    return len(norms)


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has run."""


def correct_bias(
    original: nn.Module,
    compressed: nn.Module,
    layer_names: Sequence[str],
    inputs: Iterable[Batch],
    max_batches: int | None = None,
    progress: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Match each named layer's per-channel output mean in `compressed` to the one in `original`.

    For every name, the module at that dotted name in `compressed` (a factorized block, or a plain
    layer) gets `mean_original - mean_compressed` added to the bias of its last stage (a zero bias
    is created when it has none). Means are taken over the batch and spatial positions of the
    outputs of the same inputs through each model. Layers are corrected one at a time in the order
    they run, and each is measured after the layers before it were corrected, so a correction never
    compensates a shift that an upstream correction already removed. Returns each layer's largest
    absolute shift. `inputs` yields tensors or `(inputs, labels)` pairs, held in memory (up to
    `max_batches`): a graph calling each layer once is corrected in one pass that holds each
    live value for all of them, any other model by one forward pass per layer. `progress` is
    called after each layer is corrected.
    """
    _check_max_batches(max_batches)
    if not layer_names:
        return {}
    cached = [_input_of(x) for x in _limited(inputs, max_batches)]
    if not cached:
        raise DataError(
            "no calibration batches for bias correction; pass at least one batch of training data"
        )
    targets = {name: _bias_target(compressed, name) for name in layer_names}
    for name in layer_names:
        _module_at(original, name, "original")
    order = _execution_order(compressed, layer_names)

    shifts: dict[str, float] = {}

    def correct(name: str, measured: torch.Tensor) -> torch.Tensor:
        """Shift the layer's bias by reference − measured; return the shift."""
        if measured.shape != reference[name].shape:
            raise ConfigError(
                f"layer '{name}' has {reference[name].numel()} output channels in the original "
                f"model but {measured.numel()} in the compressed one; pass the compressed model "
                "made from this original"
            )
        shift = reference[name] - measured
        stage, channel_count = targets[name]
        if stage.bias is None:
            stage.bias = nn.Parameter(
                torch.zeros(channel_count, dtype=stage.weight.dtype, device=stage.weight.device)
            )
        with torch.no_grad():
            stage.bias.add_(shift.to(stage.bias.dtype).to(stage.bias.device))
        shifts[name] = float(shift.abs().max())
        if progress is not None:
            progress()
        return shift

    with in_conv_layout((original, compressed)):
        reference = _channel_means(original, "original", order, cached, stop_after=None)
        if _runs_each_once(compressed, order):
            _correct_in_one_pass(compressed, order, cached, correct)
        else:
            for name in order:
                correct(name, _channel_means(compressed, "compressed", [name], cached, name)[name])
    return {name: shifts[name] for name in layer_names}


def _runs_each_once(model: nn.Module, names: Sequence[str]) -> bool:
    """Whether `model` is a graph with one input that calls each named module at one node."""
    if not isinstance(model, fx.GraphModule):
        return False
    nodes = list(model.graph.nodes)
    calls = [str(n.target) for n in nodes if n.op == "call_module"]
    inputs = [n for n in nodes if n.op == "placeholder"]
    return len(inputs) == 1 and all(calls.count(name) == 1 for name in names)


def _correct_in_one_pass(
    gm: fx.GraphModule,
    names: Sequence[str],
    inputs: list[torch.Tensor],
    correct: Callable[[str, torch.Tensor], torch.Tensor],
) -> None:
    """The layer-by-layer correction in one pass over the graph: every node runs on all the
    batches before the next, so each named layer's mean is measured, its bias corrected and its
    outputs shifted by as much before any later node reads them. The same result as one forward
    pass per layer, at the cost of one, holding each live value for all the batches."""
    interpreter = fx.Interpreter(gm)  # for its op dispatch; the pass keeps its own environment
    corrected = set(names)
    nodes = list(gm.graph.nodes)
    last_use = {used: node for node in nodes for used in node.all_input_nodes}
    values: dict[fx.Node, list] = {}
    device = _device_of(gm)
    modes = [(module, module.training) for module in gm.modules()]
    try:
        gm.eval()
        with torch.no_grad():
            for node in nodes:
                if node.op == "output":
                    break
                if node.op == "placeholder":
                    values[node] = [x.to(device) for x in inputs]
                    continue
                run = getattr(interpreter, node.op)
                outputs = []
                for index in range(len(inputs)):
                    args, kwargs = fx.node.map_arg(
                        (node.args, node.kwargs), lambda n, i=index: values[n][i]
                    )
                    outputs.append(run(node.target, args, kwargs))
                if node.op == "call_module" and str(node.target) in corrected:
                    outputs = _shifted(gm, str(node.target), outputs, correct)
                values[node] = outputs
                for used in node.all_input_nodes:
                    if last_use[used] is node:
                        del values[used]
    finally:
        for module, mode in modes:
            module.training = mode


def _shifted(
    gm: fx.GraphModule,
    name: str,
    outputs: list[torch.Tensor],
    correct: Callable[[str, torch.Tensor], torch.Tensor],
) -> list[torch.Tensor]:
    """Correct layer `name` from its `outputs` on all the batches; return them shifted."""
    channel_dim = _channel_dim(gm.get_submodule(name))
    total, count = 0, 0
    for output in outputs:
        flat = _channel_rows(output, channel_dim)
        total, count = total + flat.sum(0).cpu(), count + len(flat)
    shift = correct(name, total / count)
    shape = [-1] + [1] * (outputs[0].dim() - 2) if channel_dim == 1 else [-1]
    return [output + shift.to(output).reshape(shape) for output in outputs]


def _channel_dim(module: nn.Module) -> int:
    """The channel axis of a layer's outputs, a property of a block's last stage (conv: 1;
    linear: the last)."""
    last = module[-1] if isinstance(module, nn.Sequential) and len(module) else module
    return 1 if isinstance(last, nn.modules.conv._ConvNd) else -1


def _channel_rows(output: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """One float64 row of channels per sample and position."""
    values = output.to(torch.float64).movedim(channel_dim, -1)
    return values.reshape(-1, values.shape[-1])


def _channel_means(
    model: nn.Module,
    which: str,
    names: list[str],
    inputs: list[torch.Tensor],
    stop_after: str | None,
) -> dict[str, torch.Tensor]:
    """Per-output-channel mean of each named module's output over all `inputs` (float64)."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(names, 0)
    handles = []

    def hook_for(name: str, module: nn.Module):
        channel_dim = _channel_dim(module)

        def hook(_module: nn.Module, _args: object, output: torch.Tensor) -> None:
            flat = _channel_rows(output.detach(), channel_dim)
            sums[name] = sums.get(name, 0) + flat.sum(0).cpu()
            counts[name] += flat.shape[0]
            if name == stop_after:
                raise _StopForward

        return hook

    for name in names:
        module = _module_at(model, name, which)
        handles.append(module.register_forward_hook(hook_for(name, module)))
    device = _device_of(model)
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            for x in inputs:
                try:
                    model(x.to(device))
                except _StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes:
            module.training = mode
    missing = [name for name in names if counts[name] == 0]
    if missing:
        raise ConfigError(
            f"layer '{missing[0]}' never ran in the model's forward pass; pass names of layers "
            "the model calls"
        )
    return {name: sums[name] / counts[name] for name in names}


def _execution_order(model: nn.Module, names: Sequence[str]) -> list[str]:
    """`names` in the order a GraphModule calls them (unknown order: as given)."""
    if not isinstance(model, fx.GraphModule):
        return list(dict.fromkeys(names))
    position = {}
    for index, node in enumerate(model.graph.nodes):
        if node.op == "call_module":
            position.setdefault(str(node.target), index)
    # A name without a node of its own (inside a leaf module) keeps its given place at the end.
    return sorted(dict.fromkeys(names), key=lambda name: position.get(name, len(position)))


def _bias_target(model: nn.Module, name: str) -> tuple[nn.Module, int]:
    """The stage whose bias absorbs the correction, and its number of output channels."""
    module = _module_at(model, name, "compressed")
    stage = module[-1] if isinstance(module, nn.Sequential) and len(module) else module
    if isinstance(stage, nn.modules.conv._ConvNd):
        return stage, stage.out_channels
    if isinstance(stage, nn.Linear):
        return stage, stage.out_features
    raise ConfigError(
        f"layer '{name}' ends in {type(stage).__name__}, which has no per-channel bias to correct; "
        "pass names of conv/linear layers or of the blocks that replace them"
    )


def _module_at(model: nn.Module, name: str, which: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ConfigError(
            f"the {which} model has no layer '{name}'; pass the dotted names of decomposed layers"
        ) from None


def _batchnorms(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def _stats(bn: _BatchNorm) -> dict[str, torch.Tensor]:
    return {
        key: value.detach().clone()
        for key, value in (
            ("running_mean", bn.running_mean),
            ("running_var", bn.running_var),
            ("num_batches_tracked", bn.num_batches_tracked),
        )
        if value is not None
    }


def _restore_stats(bn: _BatchNorm, stats: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for key, value in stats.items():
            getattr(bn, key).copy_(value)


def _limited(inputs: Iterable[Batch], max_batches: int | None) -> Iterator[Batch]:
    return iter(inputs) if max_batches is None else itertools.islice(inputs, max_batches)


def _input_of(batch: Batch) -> torch.Tensor:
    x = batch[0] if isinstance(batch, tuple | list) else batch
    if not isinstance(x, torch.Tensor):
        raise DataError(
            f"calibration batches must be tensors or (inputs, labels) pairs, got "
            f"{type(x).__name__}; pass e.g. rankfold.models.batches(dataset, spec)"
        )
    return x


def _check_max_batches(max_batches: int | None) -> None:
    if max_batches is not None and max_batches < 1:
        raise ConfigError(
            f"max_batches must be >= 1, got {max_batches}; omit it to use every batch"
        )


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


__all__ = ["correct_bias", "has_batchnorm", "recalibrate_bn"]
