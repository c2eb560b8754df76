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

With `refine_steps`, every block is then refined as a whole: all its stages take Adam steps on the
same objective (minibatches of the calibration images, a cosine-decayed rate), starting from the
least-squares fit; a refinement that does not lower the block's error on all the images is undone,
and one that has not lowered it after a quarter of its steps starts again at a tenth of the rate.
The last stage alone is a linear problem; the stages together are not, and this is where most of
the remaining error goes at high compression (ResNet-56 at 4×: BENCHMARKS.md, issue #20). A
block whose stages are all linear layers or 1×1 convs is one affine map per position, and a
block of 2-D convs with one spatial stage (Tucker-2, CP) one affine map of each output position's
input patch, so its objective is a quadratic in that map over the moments of what the positions
read: it is refined on moments summed once, whatever the number of images and positions, by
L-BFGS on the exact loss (taken where a step costs less than a minibatch step, and for patches
only where a minibatch step is dear: on 224² inputs, not on 32²).

With `segment_steps`, the graph is also cut into segments at the points where one tensor carries
everything later nodes read (in a ResNet: each residual unit's output after its ReLU), each
segment ending right before the next block's segment begins (the last one at the output). After
its blocks are refitted, a segment's blocks take Adam steps together so that the *segment's*
output, from the compressed network's input to it, matches the original's: the objective then
sees the BatchNorms, the ReLUs that discard part of a block's error and the residual sums, and
one block can make up for another's error (block reconstruction, as BRECQ does for
quantization). A segment whose error does not fall is left as it was. Where a step on whole
images is dear (224² inputs), each step reads a window of CROP_SIDE² output positions and the
input positions they read (a segment or block is local: its reach through the convs, pools and
position-wise operations bounds what an output position reads), checked exact on drawn windows.

Both networks run once, side by side over one graph (the compressed network is the original
with some modules swapped for blocks of the same name), so the cost is one forward pass of each
on the calibration images, not one per block.

Hand-written: the lockstep pass over two fx graphs, the closed-form refit, the block- and
segment-wise refinements, their moments and their windows have no library.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import fx, nn
from torch.nn import functional
from torch.nn.modules.utils import _pair
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.flop_counter import FlopCounterMode

from rankfold.passes.core import ConfigError, DataError
from rankfold.passes.layout import fast_layout, in_conv_layout

DEFAULT_CORRECTION_DAMPING = 1e-3
DEFAULT_REFINE_STEPS = 200
DEFAULT_REFINE_LR = 1e-3
REFINE_BATCH = 32  # calibration images per refinement step
StepsRead = Literal["moments", "windows", "images"]


@dataclass(frozen=True)
class Refit:
    """One block's (or segment's) relative output error √(‖Y − Ŷ‖²/‖Y‖²) on the calibration
    data, and what its refinement's steps read: the moments of what each output position reads
    (exact over all the images), windows of REFINE_BATCH images, or whole images (None where
    no refinement ran)."""

    before: float
    after: float
    read: StepsRead | None = None


@dataclass(frozen=True)
class Correction:
    """What `refit_blocks` did: each block's output error before and after its refit, and each
    refined segment's (keyed by the blocks it holds, in graph order)."""

    blocks: dict[str, Refit]
    segments: dict[tuple[str, ...], Refit]


def refit_blocks(
    original: fx.GraphModule,
    compressed: fx.GraphModule,
    names: Sequence[str],
    inputs: Iterable[torch.Tensor],
    damping: float = DEFAULT_CORRECTION_DAMPING,
    progress: Callable[[], None] | None = None,
    refine_steps: int = 0,
    refine_lr: float = DEFAULT_REFINE_LR,
    device: torch.device | None = None,
    seed: int = 0,
    segment_steps: int = 0,
    autocast: torch.dtype | None = None,
) -> Correction:
    """Refit the last stage of every named block of `compressed`, in the order the graph runs
    them, then (with `refine_steps`) refine all its stages together, then (with
    `segment_steps`) refine the blocks of each segment together on the segment's output
    (`refine_lr` is the rate of their Adam steps; a block refined on moments takes L-BFGS
    steps, which need none).
    `inputs` are batches of network inputs, held in memory for the pass. The least-squares step
    needs a last stage that is a linear map of channels (a 1×1 conv with stride 1, or a linear
    layer); the refinements take any block. Blocks the graph calls more than once, or that no
    step applies to, are left alone and not reported. The refinements run on `device`
    (default: the CPU), their Adam steps under `autocast` to that dtype if given (errors,
    least squares and moments stay in float32 or float64). `progress` is called once per named
    block reached."""
    if not damping >= 0:
        raise ConfigError(f"correction damping must be ≥ 0, got {damping}; use e.g. 1e-3")
    if refine_steps < 0 or segment_steps < 0 or not refine_lr > 0:
        raise ConfigError(
            f"refinement needs steps ≥ 0 and a rate > 0, got {refine_steps}, {segment_steps} "
            f"and {refine_lr}; use e.g. {DEFAULT_REFINE_STEPS} and {DEFAULT_REFINE_LR:g}"
        )
    device = device or torch.device("cpu")
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
    segments: dict[tuple[str, ...], Refit] = {}
    ends = _segment_ends(nodes_o, last_use, wanted)
    segment_input: list = chunks  # the compressed network's value where the segment starts
    segment_start, segment_blocks = 0, []
    modes = [(m, m.training) for m in (*original.modules(), *compressed.modules())]
    original.eval()
    compressed.eval()
    try:
        # The passes over both networks run on the CPU, in its fast layout.
        with torch.no_grad(), in_conv_layout((original, compressed)):
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
                    if refine_steps:
                        refit = refine_block(
                            block,
                            [args[0] for args in head_inputs],
                            values_o[index],
                            refine_steps,
                            refine_lr,
                            device,
                            seed,
                            damping,
                            autocast,
                        )
                    else:
                        refit = _refit(block, values_o[index], head_inputs, damping)
                    if refit is not None:
                        refits[target] = refit
                        segment_blocks.append(target)
                if node_o.op == "call_module" and target in names and progress is not None:
                    progress()
                values_c[index] = _run(compressed, node_c, values_c, position, len(chunks))
                if index in ends:
                    if segment_steps and segment_blocks:
                        segment = nodes_c[segment_start + 1 : index + 1]
                        refined = refine_segment(
                            compressed,
                            segment,
                            segment_blocks,
                            segment_input,
                            values_c[index],
                            values_o[index],
                            segment_steps,
                            refine_lr,
                            device,
                            seed,
                            autocast,
                        )
                        if refined is not None:
                            segments[tuple(segment_blocks)], values_c[index] = refined
                    segment_input, segment_start, segment_blocks = values_c[index], index, []
                for used in {position[n] for n in node_o.all_input_nodes}:
                    if last_use[used] == index:
                        del values_o[used], values_c[used]
    finally:
        for module, mode in modes:
            module.training = mode
    return Correction(refits, segments)


def pass_bytes_per_image(gm: fx.GraphModule, example: torch.Tensor) -> int:
    """The most bytes a node-by-node pass over `gm` (the refit's, bias correction's) holds at
    once per input image: each value lives until its last reader has run, for all the images.
    `example` is one batch of inputs; the count is divided by its size."""
    sizes: dict[fx.Node, int] = {}

    def size(value: object) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, tuple | list):
            return sum(map(size, value))
        return sum(map(size, value.values())) if isinstance(value, dict) else 0

    class Sizes(fx.Interpreter):
        def run_node(self, node: fx.Node):
            value = super().run_node(node)
            if node.op != "get_attr":  # the model's own tensors, not per image
                sizes[node] = size(value)
            return value

    with torch.no_grad():
        Sizes(gm).run(example)
    nodes = list(gm.graph.nodes)
    last_use = {used: node for node in nodes for used in node.all_input_nodes}
    held = peak = 0
    for node in nodes:
        held += sizes.get(node, 0)
        peak = max(peak, held)
        held -= sum(sizes.get(used, 0) for used in node.all_input_nodes if last_use[used] is node)
    return -(-peak // max(len(example), 1))


def _segment_ends(nodes: list[fx.Node], last_use: dict[int, int], blocks: set[str]) -> set[int]:
    """Where segments end: positions whose value alone carries everything later nodes read (no
    earlier value is used after them) and that come right before a block or the output."""
    ends, reach = set(), 0
    for index, node in enumerate(nodes[:-1]):
        following = nodes[index + 1]
        starts_block = following.op == "call_module" and str(following.target) in blocks
        if (
            reach <= index
            and node.op != "placeholder"
            and (starts_block or following.op == "output")
        ):
            ends.add(index)
        reach = max(reach, last_use.get(index, index))
    return ends


def _run_segment(gm: fx.GraphModule, segment: list[fx.Node], x: torch.Tensor) -> torch.Tensor:
    """The segment's last value, from `x`, the value its first node reads (fx.Interpreter's
    semantics on one batch)."""
    env: dict[fx.Node, object] = {}
    inside = set(segment)
    for node in segment:
        for used in node.all_input_nodes:
            if used not in inside:
                env[used] = x
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        value = _call(gm, node, args, kwargs)
        if node.op == "get_attr" and isinstance(value, torch.Tensor):
            value = value.to(x.device)  # a constant of the graph's own, not of a moved module
        env[node] = value
    return env[segment[-1]]


def _call(gm: fx.GraphModule, node: fx.Node, args: tuple, kwargs: dict):
    if node.op == "call_module":
        return gm.get_submodule(str(node.target))(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        self_obj, *rest = args
        return getattr(self_obj, node.target)(*rest, **kwargs)
    value = gm  # get_attr
    for part in str(node.target).split("."):
        value = getattr(value, part)
    return value


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
    return [_call(gm, node, *arguments) for arguments in _arguments(node, values, position, count)]


def _channel_rows(x: torch.Tensor, conv: bool, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Channel vectors as rows (conv: one per position)."""
    return (x.movedim(1, -1) if conv else x).reshape(-1, x.shape[1 if conv else -1]).to(dtype)


def _last_stage(block: nn.Module) -> nn.Linear | nn.Conv1d | nn.Conv2d | None:
    """The block's last stage where it is a linear map of channels that least squares can
    refit: a linear layer, or a 1×1 conv with stride 1, no padding and no groups."""
    if not isinstance(block, nn.Sequential) or len(block) < 2:
        return None
    last = block[-1]
    if isinstance(last, nn.Linear):
        return last
    if isinstance(last, nn.Conv1d | nn.Conv2d) and (
        set(last.kernel_size) == set(last.stride) == {1}
        and (last.padding == "valid" or set(last.padding) == {0})
        and last.groups == 1
    ):
        return last
    return None


def _refit(block: nn.Module, targets: list, head_args: list[tuple], damping: float) -> Refit | None:
    last = _last_stage(block)
    if last is None:
        return None
    head = list(block)[:-1]
    conv = not isinstance(last, nn.Linear)

    def features(args: tuple) -> torch.Tensor:
        (z,) = args
        for stage in head:
            z = stage(z)
        return z

    width = last.weight.shape[1] + 1
    gram = torch.zeros(width, width, dtype=torch.float64)
    cross = torch.zeros(width, last.weight.shape[0], dtype=torch.float64)
    energy = 0.0
    with torch.no_grad():
        for args, y in zip(head_args, targets, strict=True):
            z = _channel_rows(features(args), conv)
            z = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], 1)
            rows = _channel_rows(y, conv)
            gram += z.T @ z
            cross += z.T @ rows
            energy += float((rows * rows).sum())
    return _solve_last_stage(last, gram, cross, energy, damping)


def _solve_last_stage(
    last: nn.Module, gram: torch.Tensor, cross: torch.Tensor, energy: float, damping: float
) -> Refit:
    """Set `last` (weight and bias, a bias added if it had none) to the damped least-squares
    fit B* from the moments of its inputs Z = [z, 1] (gram ZᵀZ, cross ZᵀY, energy ‖Y‖²); kept as
    it was where B* is not closer."""
    width = len(gram)
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


def refine_block(
    block: nn.Module,
    inputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    steps: int,
    lr: float,
    device: torch.device,
    seed: int = 0,
    damping: float | None = None,
    autocast: torch.dtype | None = None,
) -> Refit | None:
    """Adam on all of `block`'s parameters to lower Σ‖block(x) − y‖² over the chunks of
    (`inputs`, `targets`), REFINE_BATCH images a step, or, for a block that is one affine map of
    what each output position reads, L-BFGS on exact moments (at most about `steps` evaluations;
    no rate); the block is left as it was unless its relative error on all the chunks falls.
    With `damping`, the last stage is first refitted by least squares (as `refit_blocks` does;
    from the moments where the steps take them), and the error before is the block's before
    that. `autocast`: the dtype the Adam steps' forward passes run in (None: float32). None
    for a block without parameters, whose chunks are not single tensors, or whose targets are
    all zero."""
    form = _affine_form(block)
    if _moments_are_cheaper(form, inputs, targets):
        return _refine_from_moments(form, block, inputs, targets, steps, damping)
    fitted = None
    if damping is not None:
        fitted = _refit(block, list(targets), [(x,) for x in inputs], damping)
    parameters = [p for p in block.parameters() if p.is_floating_point()]
    reach = _module_reach(block, _Reach.identity())
    refined = _refine(
        parameters,
        [block],
        block,
        inputs,
        targets,
        steps,
        lr,
        device,
        seed,
        reach,
        autocast=autocast,
    )
    if refined is None:
        return fitted
    before = fitted.before if fitted is not None else refined[0].before
    return Refit(before, refined[0].after, refined[0].read)


@dataclass(frozen=True)
class _AffineForm:
    """A block that is one affine map of what each output position reads: its channels, or, for
    a block of 2-D convs with one spatial stage, its input patch (unfold's order). `rows` gives
    those inputs one row per output position; `factors` gives the map as B = P·Q (Q None: B =
    P) with B = [A; b], the position's output being z·A + b, built from the stages' weights
    (differentiable), P ending where the last stage begins, so that products with B can go
    through the last stage's narrower input."""

    width: int  # features per row
    rows: Callable[[torch.Tensor], torch.Tensor]
    factors: Callable[[], tuple[torch.Tensor, torch.Tensor | None]]
    factor_macs: int  # MACs of building the factors and B from them
    inner: int  # P's columns
    image_macs: Callable[[torch.Tensor], int]  # the block's MACs on one image of this input
    conv: bool  # channels on axis 1 (else last)
    spatial: bool  # reads a patch (else one position)


def _pointwise_map(stage: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear layer or a pointwise conv as z ↦ z·M + c on channel rows (M block-diagonal for
    a grouped conv)."""
    if isinstance(stage, nn.Linear):
        return stage.weight.T, stage.bias
    weight = stage.weight.reshape(stage.groups, -1, stage.weight.shape[1]).transpose(1, 2)
    return torch.block_diag(*weight.unbind(0)), stage.bias


def _patch_map(
    before: torch.Tensor | None, bias: torch.Tensor | None, stage: nn.Conv2d, width: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The spatial stage after the channel map z ↦ z·before + bias (None: identity, zero) as
    one map of the `width` input channels' patch, rows in unfold's order (channel, then kernel
    row, then column). A grouped kernel only meets its group's channels."""
    groups, (kh, kw) = stage.groups, stage.kernel_size
    kernel = stage.weight.reshape(groups, stage.out_channels // groups, -1, kh, kw)
    if before is None:
        spread = torch.eye(groups, dtype=kernel.dtype, device=kernel.device)
        matrix = torch.einsum("gabij,gh->hbijga", kernel, spread)
    else:
        matrix = torch.einsum("cgb,gabij->cijga", before.reshape(width, groups, -1), kernel)
    matrix = matrix.reshape(width * kh * kw, stage.out_channels)
    if bias is not None:  # only where the stage reads no padding (checked by `_affine_form`)
        carried = torch.einsum("gb,gabij->ga", bias.reshape(groups, -1), kernel).flatten()
        bias = carried if stage.bias is None else carried + stage.bias
    return matrix, stage.bias if bias is None else bias


def _then(
    matrix: torch.Tensor | None, bias: torch.Tensor | None, stage: nn.Module
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """z ↦ (z·matrix + bias)·M + c for a pointwise `stage` (None: identity, zero)."""
    following, added = _pointwise_map(stage)
    if matrix is not None:
        matrix = matrix @ following
    if bias is not None:
        bias = bias @ following if added is None else bias @ following + added
    return (following if matrix is None else matrix), (added if bias is None else bias)


def _affine_form(block: nn.Module) -> _AffineForm | None:
    """The block as one affine map per output position, or None. Per position: every stage a
    linear layer, or every stage a 1×1 conv (stride 1, no padding). Per patch: 2-D convs with
    zero padding, all 1×1 (stride 1, no padding) but one; the stages before that one have no
    bias where it pads, since its padding reads zeros where a bias would have put a value."""
    stages = list(block.children()) if isinstance(block, nn.Sequential) else []
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    linear = bool(stages) and all(isinstance(stage, nn.Linear) for stage in stages)
    if not linear and not (
        stages
        and all(isinstance(stage, convs) and stage.padding_mode == "zeros" for stage in stages)
        and not any(isinstance(s.padding, str) and s.padding != "valid" for s in stages)
    ):
        return None

    def pointwise(stage: nn.Module) -> bool:
        return set(stage.kernel_size) == set(stage.stride) == {1} and (
            stage.padding == "valid" or set(stage.padding) == {0}
        )

    spatial = [] if linear else [i for i, stage in enumerate(stages) if not pointwise(stage)]
    width = stages[0].in_features if linear else stages[0].in_channels
    if len(spatial) > 1 or (spatial and not all(isinstance(s, nn.Conv2d) for s in stages)):
        return None
    at = spatial[0] if spatial else None
    features = width
    if at is not None:
        patch = stages[at]
        padding = (0, 0) if patch.padding == "valid" else tuple(patch.padding)
        if any(padding) and any(stage.bias is not None for stage in stages[:at]):
            return None
        features = width * patch.kernel_size[0] * patch.kernel_size[1]
        unfold = nn.Unfold(patch.kernel_size, patch.dilation, padding, patch.stride)
    head = len(stages) if at == len(stages) - 1 else len(stages) - 1  # P's stages

    def factors() -> tuple[torch.Tensor, torch.Tensor | None]:
        matrix, bias = None, None
        for i, stage in enumerate(stages[:head]):
            if i == at:
                matrix, bias = _patch_map(matrix, bias, stage, width)
            else:
                matrix, bias = _then(matrix, bias, stage)
        like = stages[0].weight
        if matrix is None:
            matrix = torch.eye(features, dtype=like.dtype, device=like.device)
        if bias is None:
            bias = torch.zeros(matrix.shape[1], dtype=like.dtype, device=like.device)
        if head == len(stages):
            return torch.cat([matrix, bias[None]]), None
        last, last_bias = _pointwise_map(stages[-1])
        if last_bias is None:
            last_bias = torch.zeros(last.shape[1], dtype=last.dtype, device=last.device)
        corner = torch.zeros(features + 1, 1, dtype=matrix.dtype, device=matrix.device)
        corner[-1] = 1
        return (
            torch.cat([torch.cat([matrix, bias[None]]), corner], 1),
            torch.cat([last, last_bias[None]]),
        )

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        first, second = factors()
        if second is not None:
            first @ second
    inner = first.shape[1]

    if at is None:
        macs = sum(stage.weight.numel() for stage in stages)
        return _AffineForm(
            width,
            lambda x: _channel_rows(x, not linear, x.dtype),
            factors,
            counter.get_total_flops() // 2,
            inner,
            lambda x: macs * (x[0].numel() // width),
            not linear,
            False,
        )
    before = sum(stage.weight.numel() for stage in stages[:at])
    after = sum(stage.weight.numel() for stage in stages[at:])

    def rows(x: torch.Tensor) -> torch.Tensor:
        return unfold(x).transpose(1, 2).reshape(-1, features)

    def image_macs(x: torch.Tensor) -> int:
        return before * x[0, 0].numel() + after * (unfold(x[:1, :1]).shape[-1])

    return _AffineForm(
        features,
        rows,
        factors,
        counter.get_total_flops() // 2,
        inner,
        image_macs,
        True,
        True,
    )


DEAR_STEP_MACS = 10**9  # a minibatch step's MACs from which a patch block may take moments
MAX_MOMENT_WIDTH = 8192  # a (width+1)² float64 moment of at most 0.5 GiB


def _moments_are_cheaper(
    form: _AffineForm | None, inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]
) -> bool:
    """Whether an affine block's step on moments costs less than a minibatch step. The former
    builds the map from its factors, forward and back, and multiplies the (width+1)² moment by
    it (through P where P is the narrower); the latter runs the block forward and back on
    REFINE_BATCH images (at 224² a second or more, as few as 49 positions in a 224² network's
    last stage, where a 3,072-wide input makes moments dearer). Patch blocks take moments only
    where a minibatch step is also dear (DEAR_STEP_MACS): on 32² inputs, where every CIFAR
    figure in BENCHMARKS.md was measured, their steps stay minibatches."""
    tensors = all(isinstance(v, torch.Tensor) for v in (*inputs, *targets))
    if form is None or not (tensors and inputs) or form.width > MAX_MOMENT_WIDTH:
        return False
    outputs = targets[0].shape[1 if form.conv else -1]
    positions = len(form.rows(inputs[0][:1]))
    if positions * outputs != targets[0][0].numel():
        return False
    rows = form.width + 1
    product = rows * rows * min(form.inner, outputs)
    if form.inner < outputs:
        product += rows * form.inner * outputs
    moments = 3 * form.factor_macs + product
    minibatch = 3 * min(REFINE_BATCH, sum(len(x) for x in inputs)) * form.image_macs(inputs[0])
    return moments < minibatch and (not form.spatial or minibatch >= DEAR_STEP_MACS)


LBFGS_HISTORY = 10  # past steps kept: 2·10 copies of a block's parameters
MOMENT_ELEMENTS = 1 << 24  # row entries converted to float64 at a time (128 MiB) for the moments


def _refine_from_moments(
    form: _AffineForm,
    block: nn.Module,
    inputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    steps: int,
    damping: float | None,
) -> Refit | None:
    """`refine_block` for a block that is one affine map per output position. Its output is
    z·A + b with z what the position reads (`form.rows`), so Σ‖block(x) − y‖² = E − 2⟨B, ZᵀY⟩ +
    ⟨B, ZᵀZ·B⟩ with B = [A; b] and Z = [z, 1]: one pass sums the moments, then every step
    takes the exact loss and gradient over all the images at a cost independent of their
    number (instead of minibatches of whole images, which on 224² inputs cost seconds a step).
    Exact, noiseless values are what a quasi-Newton method with a line search wants: torch's
    L-BFGS, where Adam's per-coordinate steps of about its rate overshoot or crawl. The
    least-squares refit of the last stage (with `damping`) reads the same moments: its inputs
    are Z·P, P the map up to it.
    Hand-written: no library refines a factorized map on moments."""
    width = form.width
    gram = torch.zeros(width, width, dtype=torch.float64)
    sums = torch.zeros(width, dtype=torch.float64)
    count, cross, output_sums, energy = 0, None, None, 0.0
    for x, y in zip(inputs, targets, strict=True):
        images = max(1, MOMENT_ELEMENTS // (len(form.rows(x[:1])) * width))
        for start in range(0, len(x), images):
            part = slice(start, start + images)
            z = form.rows(x[part]).double()
            rows = _channel_rows(y[part], form.conv)
            gram += z.T @ z
            sums += z.sum(0)
            count += len(z)
            products, totals = z.T @ rows, rows.sum(0)
            cross = products if cross is None else cross + products
            output_sums = totals if output_sums is None else output_sums + totals
            energy += float((rows * rows).sum())
    if cross is None or energy == 0:
        return None
    # The moments of Z = [z, 1]: the column of ones adds the sums and the count.
    gram = torch.cat(
        [torch.cat([gram, sums[:, None]], 1), torch.cat([sums, sums.new_tensor([count])])[None]]
    )
    cross = torch.cat([cross, output_sums[None]])
    fitted, last = None, _last_stage(block)
    if damping is not None and last is not None:
        with torch.no_grad():
            head = form.factors()[0].double()
        spread = gram @ head
        fitted = _solve_last_stage(last, head.T @ spread, head.T @ cross, energy, damping)
    parameters = [p for p in block.parameters() if p.is_floating_point()]
    if not parameters:
        return fitted
    home = parameters[0]

    def affine() -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The factors P, Q and the map B = P·Q."""
        first, second = form.factors()
        return first, second, first if second is None else first @ second

    def error() -> float:
        """The relative error, in float64 (the steps' float32 loss drops the constant E, which
        would cancel most of its digits)."""
        b = affine()[2].double()
        value = energy - 2 * float((b * cross).sum()) + float((b * (gram @ b)).sum())
        return max(value, 0.0) / energy

    gram32, cross32 = gram.to(home.dtype) / energy, cross.to(home.dtype) / energy
    saved = [p.detach().clone() for p in parameters]
    modes = [(m, m.training) for m in block.modules()]
    block.eval()
    try:
        with torch.no_grad():
            before = error()
        optimizer = torch.optim.LBFGS(
            parameters,
            max_iter=steps,
            max_eval=steps,
            history_size=LBFGS_HISTORY,
            line_search_fn="strong_wolfe",
        )

        def loss() -> torch.Tensor:
            """The relative error less its constant 1, with the gradient 2(G·B − ZᵀY)/E taken
            without differentiating through the (C+1)²-sized product G·B, which goes through
            P where P is the narrower factor."""
            optimizer.zero_grad(set_to_none=True)
            first, second, b = affine()
            if second is None or second.shape[0] >= second.shape[1]:
                spread = gram32 @ b.detach()
            else:
                spread = (gram32 @ first.detach()) @ second.detach()
            (b * (2 * (spread - cross32))).sum().backward()
            return (b.detach() * (spread - 2 * cross32)).sum()

        if steps:
            # torch's L-BFGS views every gradient flat, which a channels-last weight's is not.
            with torch.enable_grad(), in_conv_layout((block,), torch.contiguous_format):
                optimizer.step(loss)
        with torch.no_grad():
            after = error()
            if not after < before:
                for parameter, value in zip(parameters, saved, strict=True):
                    parameter.copy_(value)
                after = before
    finally:
        for module, mode in modes:
            module.training = mode
    return Refit(fitted.before if fitted else before**0.5, after**0.5, "moments")


BACKED_OFF_RATE = 0.1  # of the rate, for the steps after a quarter that did not lower the error
CROP_SIDE = 8  # output positions per side of a step's window: a CIFAR ResNet's last stage


@dataclass(frozen=True)
class _Reach:
    """The input positions a value's position i reads, per spatial axis: from i·stride − lo to
    i·stride + hi."""

    stride: tuple[int, int]
    lo: tuple[int, int]
    hi: tuple[int, int]

    @staticmethod
    def identity() -> _Reach:
        return _Reach((1, 1), (0, 0), (0, 0))

    def then(self, kernel, stride, padding, dilation) -> _Reach:
        """After a sliding window (a conv or a pool) on this value."""
        k, t, p, d = _pair(kernel), _pair(stride), _pair(padding), _pair(dilation)
        return _Reach(
            (self.stride[0] * t[0], self.stride[1] * t[1]),
            tuple(self.lo[i] + p[i] * self.stride[i] for i in range(2)),
            tuple(self.hi[i] + (d[i] * (k[i] - 1) - p[i]) * self.stride[i] for i in range(2)),
        )


POINTWISE_MODULES = (
    nn.BatchNorm2d,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.Identity,
    nn.Dropout,
)
POINTWISE_FUNCTIONS = {
    operator.add,
    operator.mul,
    operator.sub,
    operator.truediv,
    torch.add,
    torch.mul,
    torch.relu,
    torch.sigmoid,
    functional.relu,
    functional.relu6,
    functional.silu,
    functional.gelu,
    functional.hardswish,
    functional.hardsigmoid,
}
POINTWISE_METHODS = {"add", "add_", "mul", "mul_", "sub", "relu", "relu_", "sigmoid", "contiguous"}


def _module_reach(module: nn.Module, reach: _Reach) -> _Reach | None:
    """`reach` carried through `module`, or None where it is not a known conv, pool or
    position-wise module."""
    if isinstance(module, POINTWISE_MODULES):
        return reach
    if isinstance(module, nn.Sequential):
        for child in module:
            if (reach := _module_reach(child, reach)) is None:
                return None
        return reach
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return None
        return reach.then(module.kernel_size, module.stride, module.padding, module.dilation)
    if isinstance(module, nn.MaxPool2d | nn.AvgPool2d) and not module.ceil_mode:
        dilation = module.dilation if isinstance(module, nn.MaxPool2d) else 1
        return reach.then(module.kernel_size, module.stride, module.padding, dilation)
    return None


def _segment_reach(gm: fx.GraphModule, segment: list[fx.Node]) -> _Reach | None:
    """Which input positions each output position of the segment reads, or None where a node
    is not a known conv, pool or position-wise operation (a global pool, a norm over
    positions, a reshape)."""
    inside, reaches = set(segment), {}
    for node in segment:
        if node.op == "get_attr":
            continue  # a constant: reads no input position
        found = [reaches.get(n) if n in inside else _Reach.identity() for n in node.all_input_nodes]
        found = [r for r in found if r is not None]
        if not found or len({r.stride for r in found}) != 1:
            return None
        joined = _Reach(
            found[0].stride,
            tuple(max(r.lo[i] for r in found) for i in range(2)),
            tuple(max(r.hi[i] for r in found) for i in range(2)),
        )
        if node.op == "call_module":
            reaches[node] = _module_reach(gm.get_submodule(str(node.target)), joined)
        elif node.op == "call_function" and node.target in POINTWISE_FUNCTIONS:
            reaches[node] = joined
        elif node.op == "call_function" and node.target is torch.cat:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            reaches[node] = joined if dim == 1 else None
        elif node.op == "call_method" and node.target in POINTWISE_METHODS:
            reaches[node] = joined
        else:
            return None
        if reaches[node] is None:
            return None
    return reaches.get(segment[-1])


@dataclass(frozen=True)
class _Crops:
    """Windows of CROP_SIDE² output positions and the input positions they read."""

    reach: _Reach
    inputs: tuple[int, int]  # the input's spatial size
    outputs: tuple[int, int]  # the output's

    @property
    def share(self) -> float:
        """Whole outputs over a window's: scales a window's error to an image's."""
        sides = [min(CROP_SIDE, n) for n in self.outputs]
        return self.outputs[0] * self.outputs[1] / (sides[0] * sides[1])

    def draw(self, generator: torch.Generator) -> tuple[tuple, tuple, tuple]:
        """(the input window, the slice of the window's output that is exact, the output
        window), as indices of a (C, H, W) input, an (N, C, H, W) output and a (C, H, W)
        target. The input window starts at a multiple of the stride, so the convs inside read
        the positions they read on the whole image."""
        read, kept, written = [], [], []
        for axis in range(2):
            side = min(CROP_SIDE, self.outputs[axis])
            first = int(torch.randint(self.outputs[axis] - side + 1, (1,), generator=generator))
            stride = self.reach.stride[axis]
            start = max(0, first * stride - self.reach.lo[axis]) // stride * stride
            stop = min(self.inputs[axis], (first + side - 1) * stride + self.reach.hi[axis] + 1)
            offset = first - start // stride
            read.append(slice(start, stop))
            kept.append(slice(offset, offset + side))
            written.append(slice(first, first + side))
        return (slice(None), *read), (slice(None), slice(None), *kept), (slice(None), *written)


def _crops(
    reach: _Reach | None,
    forward: Callable[[torch.Tensor], torch.Tensor],
    modules: Sequence[nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    size: int,
    device: torch.device,
) -> _Crops | None:
    """Windows for the steps where a step on `size` whole images is dear (DEAR_STEP_MACS), the
    reach is known, the outputs are larger than a window, and windows drawn on one image give
    its whole output's values there (checked: a reach that missed an operation fails it)."""
    if reach is None or x.dim() != 4 or y.dim() != 4 or max(y.shape[2:]) <= CROP_SIDE:
        return None
    image = x[:1].to(device)
    macs = 0

    def count(module: nn.Module, args: tuple, out: object) -> None:
        nonlocal macs
        if isinstance(module, nn.Conv2d | nn.Linear) and isinstance(out, torch.Tensor):
            macs += out.numel() * module.weight[0].numel()

    hooks = [m.register_forward_hook(count) for module in modules for m in module.modules()]
    try:
        with torch.no_grad():
            whole = forward(image)
    finally:
        for hook in hooks:
            hook.remove()
    if 3 * size * macs < DEAR_STEP_MACS or whole.shape != y[:1].shape:
        return None
    crops = _Crops(reach, tuple(x.shape[2:]), tuple(y.shape[2:]))
    generator = torch.Generator().manual_seed(0)
    tolerance = 1e-4 * float(whole.abs().max()) + 1e-6
    try:
        with torch.no_grad():
            for _ in range(4):
                read, kept, written = crops.draw(generator)
                window = forward(image[(slice(None), *read)])[kept]
                if not torch.allclose(window, whole[(slice(None), *written)], atol=tolerance):
                    return None
    except (RuntimeError, IndexError, ValueError):  # the window did not even run
        return None
    return crops


def refine_segment(
    gm: fx.GraphModule,
    segment: list[fx.Node],
    blocks: Sequence[str],
    inputs: Sequence[torch.Tensor],
    outputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    steps: int,
    lr: float,
    device: torch.device,
    seed: int = 0,
    autocast: torch.dtype | None = None,
) -> tuple[Refit, list[torch.Tensor]] | None:
    """`refine_block` for a run of graph nodes: Adam on the named blocks' parameters so that the
    segment's last value, computed from `inputs` (the value its first node reads; `outputs`
    is that value now), matches `targets`. Returns the segment's error before and after and
    its outputs on every chunk."""
    parameters = [
        p for name in blocks for p in gm.get_submodule(name).parameters() if p.is_floating_point()
    ]
    modules = [gm.get_submodule(str(n.target)) for n in segment if n.op == "call_module"]
    forward = partial(_run_segment, gm, segment)
    reach = _segment_reach(gm, segment)
    return _refine(
        parameters,
        modules,
        forward,
        inputs,
        targets,
        steps,
        lr,
        device,
        seed,
        reach,
        outputs,
        autocast,
    )


def _refine(
    parameters: list[nn.Parameter],
    modules: Sequence[nn.Module],
    forward: Callable[[torch.Tensor], torch.Tensor],
    inputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    steps: int,
    lr: float,
    device: torch.device,
    seed: int,
    reach: _Reach | None = None,
    outputs: Sequence[torch.Tensor] | None = None,
    autocast: torch.dtype | None = None,
) -> tuple[Refit, list[torch.Tensor] | None] | None:
    """Adam on `parameters` to lower Σ‖forward(x) − y‖²; `modules` (all that `forward` runs)
    move to `device` for it and back. Undone unless the error on all the chunks falls; where it
    has not fallen after a quarter of the steps (the rate overshoots a start that is already
    close, as on 224² segments), the rest start again from the start at BACKED_OFF_RATE times
    the rate. Where a step on whole images is dear and `reach` (which input positions an
    output position reads) is known and checked exact, each step reads one CROP_SIDE² window
    of the outputs and the input positions they read. Given `outputs` (forward's values on
    `inputs` now), the error before is read from them, and the values after are returned
    beside the Refit (one pass over the images where the error passes alone would take two;
    None without). With `autocast` the steps' forward passes run in that dtype (bfloat16 where
    the hardware multiplies it natively) and the loss in float32; the error that decides what is
    kept is always float32's."""
    if not parameters or not all(isinstance(v, torch.Tensor) for v in (*inputs, *targets)):
        return None
    home = parameters[0].device
    saved = [p.detach().clone() for p in parameters]
    sizes = torch.tensor([len(x) for x in inputs])
    starts = torch.cumsum(sizes, 0) - sizes
    energy = sum(float(y.double().square().sum()) for y in targets)
    if energy == 0:
        return None

    def batch(pick: torch.Tensor, chunks: Sequence[torch.Tensor], window=...) -> torch.Tensor:
        chunk = torch.searchsorted(starts, pick, right=True) - 1
        at = zip(chunk.tolist(), (pick - starts[chunk]).tolist())
        return fast_layout(torch.stack([chunks[c][r][window] for c, r in at]).to(device), device)

    def distance(out: torch.Tensor, y: torch.Tensor) -> float:
        return float((out.double() - y.to(out.device).double()).square().sum())

    def error(kept: list[torch.Tensor] | None = None) -> float:
        """The relative squared error now, keeping the outputs in `kept` if given."""
        total = 0.0
        with torch.no_grad():
            for x, y in zip(inputs, targets, strict=True):
                out = forward(x.to(device))
                total += distance(out, y)
                if kept is not None:
                    kept.append(out.to(home))
        return total / energy

    modes = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.to(device).eval()
    try:
        with in_conv_layout(modules):
            if outputs is None:
                before = error()
            else:
                pairs = zip(outputs, targets, strict=True)
                before = sum(distance(out, y) for out, y in pairs) / energy

            def restore() -> None:
                with torch.no_grad():
                    for parameter, value in zip(parameters, saved, strict=True):
                        parameter.copy_(value.to(parameter.device))

            def adam(rate: float, count: int) -> tuple[torch.optim.Adam, LRScheduler]:
                optimizer = torch.optim.Adam(parameters, lr=rate)
                return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, count)

            optimizer, schedule = adam(lr, steps)
            generator = torch.Generator().manual_seed(seed)
            count = int(sizes.sum())
            size = min(REFINE_BATCH, count)
            scale = count / (size * energy)  # the batch's share of the whole error
            crops = _crops(reach, forward, modules, inputs[0], targets[0], size, device)
            windows = torch.Generator().manual_seed(seed)
            lowered = torch.autocast(device.type, dtype=autocast, enabled=autocast is not None)
            with torch.enable_grad():
                for step in range(steps):
                    if step == steps // 4 > 0 and not error() < before:
                        restore()
                        optimizer, schedule = adam(lr * BACKED_OFF_RATE, steps - step)
                    pick = torch.randint(count, (size,), generator=generator)
                    with lowered:
                        if crops is None:
                            x, y = batch(pick, inputs), batch(pick, targets)
                            out = forward(x)
                        else:
                            read, kept, written = crops.draw(windows)
                            x, y = batch(pick, inputs, read), batch(pick, targets, written)
                            out = forward(x)[kept]
                    optimizer.zero_grad(set_to_none=True)
                    loss = (out.float() - y).square().sum() * scale * (crops.share if crops else 1)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
            kept = None if outputs is None else []
            after = error(kept)
            if not after < before:
                restore()
                after, kept = before, None if outputs is None else list(outputs)
    finally:
        for module in modules:
            module.to(home)
        for module, mode in modes:
            module.training = mode
    return Refit(before**0.5, after**0.5, "images" if crops is None else "windows"), kept
