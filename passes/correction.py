"""Sequential correction: refit each block's last stage to the original layer's outputs.

A block fitted layer by layer reproduces its layer on the *original* network's activations at
best; in the compressed network its input already carries the errors of every block before it.
Walking the graph in topological order, each block's last stage (a 1×1 conv or a linear layer,
plus a bias) is refitted by regularised least squares so that the block, fed the activations of
the already-corrected compressed network, reproduces the original layer's outputs on the
original network's activations:

    B* = argmin_B ‖Y − Z·B‖² + λ‖B − B₀‖²,   λ = damping · tr(ZᵀZ)/(R+1),

with Z the last stage's inputs (one row per position, a column of ones for the bias), Y the
original layer's outputs and B₀ the stage as fitted. Since the objective at B* is at most its
value at B₀, the output error never rises on the calibration data (checked in float64; a stage
whose refit would raise it is left as it was).

Both networks run once, side by side over one graph (the compressed network is the original
with some modules swapped for blocks of the same name), so the cost is one forward pass of each
on the calibration images, not one per block.

Hand-written: the lockstep pass over two fx graphs and the closed-form refit have no library.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from rankfold.passes.core import ConfigError, DataError

DEFAULT_CORRECTION_DAMPING = 1e-3


@dataclass(frozen=True)
class Refit:
    """One block's relative output error √(‖Y − Ŷ‖²/‖Y‖²) on the calibration data."""

    before: float
    after: float


def refit_last_stages(
    original: fx.GraphModule,
    compressed: fx.GraphModule,
    names: Sequence[str],
    inputs: Iterable[torch.Tensor],
    damping: float = DEFAULT_CORRECTION_DAMPING,
    progress: Callable[[], None] | None = None,
) -> dict[str, Refit]:
    """Refit the last stage of every named block of `compressed`, in the order the graph runs
    them; returns each refitted block's output error before and after. `inputs` are batches
    of network inputs, held in memory for the pass. Blocks whose last stage is not a linear map
    of channels (a 1×1 conv with stride 1, or a linear layer), or that the graph calls more than
    once, are left alone and not reported. `progress` is called once per named block reached."""
    if not damping >= 0:
        raise ConfigError(f"correction damping must be ≥ 0, got {damping}; use e.g. 1e-3")
    nodes_o, nodes_c = list(original.graph.nodes), list(compressed.graph.nodes)
    shape = [(n.op, str(n.target)) for n in nodes_o]
    if shape != [(n.op, str(n.target)) for n in nodes_c]:
        raise ConfigError(
            "the compressed model's graph is not the original's with blocks swapped in (was it "
            "cleaned up or traced anew?); refit the blocks before clean-up"
        )
    chunks = [x.detach() for x in inputs]
    if not chunks:
        raise DataError("no calibration batches for the sequential correction; pass training data")
    calls: dict[str, int] = {}
    for node in nodes_o:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    wanted = {name for name in names if calls.get(name) == 1}
    # The graphs match node for node, so one table of positions serves both.
    position = {node: i for i, node in enumerate(nodes_o)} | {n: i for i, n in enumerate(nodes_c)}
    last_use = {}
    for index, node in enumerate(nodes_o):
        for used in node.all_input_nodes:
            last_use[position[used]] = index
    values_o: dict[int, list] = {}  # position → the node's value on each chunk
    values_c: dict[int, list] = {}
    refits: dict[str, Refit] = {}
    modes = [(m, m.training) for m in (*original.modules(), *compressed.modules())]
    original.eval()
    compressed.eval()
    try:
        with torch.no_grad():
            seen_input = False
            for index, (node_o, node_c) in enumerate(zip(nodes_o, nodes_c, strict=True)):
                if node_o.op == "output":
                    break
                if node_o.op == "placeholder":
                    if seen_input:
                        raise ConfigError(
                            f"the model takes more than one input ('{node_o.target}'); the "
                            "sequential correction feeds one"
                        )
                    seen_input = True
                    values_o[index] = values_c[index] = chunks
                    continue
                values_o[index] = _run(original, node_o, values_o, position, len(chunks))
                target = str(node_o.target)
                if node_o.op == "call_module" and target in wanted:
                    block = compressed.get_submodule(target)
                    head_inputs = [
                        args for args, _ in _arguments(node_c, values_c, position, len(chunks))
                    ]
                    refit = _refit(block, values_o[index], head_inputs, damping)
                    if refit is not None:
                        refits[target] = refit
                if node_o.op == "call_module" and target in names and progress is not None:
                    progress()
                values_c[index] = _run(compressed, node_c, values_c, position, len(chunks))
                for used in {position[n] for n in node_o.all_input_nodes}:
                    if last_use[used] == index:
                        del values_o[used], values_c[used]
    finally:
        for module, mode in modes:
            module.training = mode
    return refits


def _arguments(node: fx.Node, values: dict, position: dict, count: int) -> list[tuple[tuple, dict]]:
    """The node's (args, kwargs) on each chunk."""
    return [
        (
            fx.node.map_arg(node.args, lambda n, i=i: values[position[n]][i]),
            fx.node.map_arg(node.kwargs, lambda n, i=i: values[position[n]][i]),
        )
        for i in range(count)
    ]


def _run(gm: fx.GraphModule, node: fx.Node, values: dict, position: dict, count: int) -> list:
    """One graph node evaluated on every chunk (fx.Interpreter's semantics, chunk by chunk)."""
    outputs = []
    for args, kwargs in _arguments(node, values, position, count):
        if node.op == "call_module":
            outputs.append(gm.get_submodule(str(node.target))(*args, **kwargs))
        elif node.op == "call_function":
            outputs.append(node.target(*args, **kwargs))
        elif node.op == "call_method":
            self_obj, *rest = args
            outputs.append(getattr(self_obj, node.target)(*rest, **kwargs))
        else:  # get_attr
            value = gm
            for part in str(node.target).split("."):
                value = getattr(value, part)
            outputs.append(value)
    return outputs


def _channel_rows(x: torch.Tensor, conv: bool) -> torch.Tensor:
    """Channel vectors as float64 rows (conv: one per position)."""
    return (x.movedim(1, -1) if conv else x).reshape(-1, x.shape[1 if conv else -1]).double()


def _refit(block: nn.Module, targets: list, head_args: list[tuple], damping: float) -> Refit | None:
    if not isinstance(block, nn.Sequential) or len(block) < 2:
        return None
    *head, last = list(block)
    conv = isinstance(last, nn.Conv1d | nn.Conv2d)
    if conv and not (
        set(last.kernel_size) == set(last.stride) == {1}
        and (last.padding == "valid" or set(last.padding) == {0})
        and last.groups == 1
    ):
        return None
    if not conv and not isinstance(last, nn.Linear):
        return None

    def features(args: tuple) -> torch.Tensor:
        (z,) = args
        for stage in head:
            z = stage(z)
        return z

    width = last.weight.shape[1] + 1
    gram = torch.zeros(width, width, dtype=torch.float64)
    cross = torch.zeros(width, last.weight.shape[0], dtype=torch.float64)
    energy = 0.0
    for args, y in zip(head_args, targets, strict=True):
        z = _channel_rows(features(args), conv)
        z = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], 1)
        rows = _channel_rows(y, conv)
        gram += z.T @ z
        cross += z.T @ rows
        energy += float((rows * rows).sum())
    weight = last.weight.detach().double().reshape(last.weight.shape[0], -1)
    bias = last.bias.detach().double() if last.bias is not None else torch.zeros(len(weight))
    start = torch.cat([weight.T, bias[None]], 0)  # (R+1)×O: Y ≈ Z·B

    def error(b: torch.Tensor) -> float:
        value = energy - 2 * float((b * cross).sum()) + float((b * (gram @ b)).sum())
        return max(value, 0.0) / max(energy, 1e-300)

    lam = damping * float(torch.trace(gram)) / width
    regularised = gram + lam * torch.eye(width, dtype=gram.dtype)
    try:
        solved = torch.linalg.solve(regularised, cross + lam * start)
    except RuntimeError:  # singular without damping: keep the stage as fitted
        solved = start
    before, after = error(start), error(solved)
    if not after <= before:
        solved, after = start, before
    with torch.no_grad():
        last.weight.copy_(solved[:-1].T.reshape(last.weight.shape).to(last.weight.dtype))
        if last.bias is None:
            last.bias = nn.Parameter(torch.zeros(len(weight), dtype=last.weight.dtype))
        last.bias.copy_(solved[-1].to(last.bias.dtype))
    return Refit(before**0.5, after**0.5)
