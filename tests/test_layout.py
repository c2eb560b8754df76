"""Every pass that runs a model in PyTorch on a CPU runs its convs channels-last (oneDNN's fast
layout) and hands the models back contiguous, with the results of the contiguous layout."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytest
import torch
from planning_helpers import plan_of
from torch import fx, nn

from rankfold.converter.metric import TaskMetric
from rankfold.passes import RankPolicy, analyze, decompose, trace
from rankfold.passes.correction import refit_blocks
from rankfold.passes.layout import in_conv_layout
from rankfold.passes.recalibrate import correct_bias, recalibrate_bn
from rankfold.passes.statistics import collect_statistics

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA keeps the layout")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))


def net(seed: int = 0) -> fx.GraphModule:
    torch.manual_seed(seed)
    model = Net().eval()
    model.bn1.running_mean.uniform_(-0.5, 0.5)
    model.bn1.running_var.uniform_(0.5, 2.0)
    return trace(model, torch.zeros(1, 3, 8, 8))


def images(seed: int, batches: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 8, 8, generator=generator) for _ in range(batches)]


def watch_layouts(model: nn.Module) -> list[bool]:
    """Whether each conv call saw a channels-last weight, appended as the model runs."""
    seen: list[bool] = []

    def record(conv: nn.Module, _args: object) -> None:
        seen.append(conv.weight.is_contiguous(memory_format=torch.channels_last))

    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1):
            module.register_forward_pre_hook(record)
    return seen


def test_in_conv_layout_converts_weights_in_place_and_back_keeping_changes() -> None:
    model = net()
    x = images(0)[0]
    with torch.no_grad():
        expected = model(x)
    weight = model.conv1.weight
    elsewhere = torch.randn(4, 4, 3, 3).transpose(0, 1)  # neither layout: left alone
    model.register_buffer("odd", elsewhere)
    with in_conv_layout((model, model, None)), torch.no_grad():  # a module twice; None skipped
        assert model.conv1.weight is weight  # optimizers keep their tensors
        assert weight.is_contiguous(memory_format=torch.channels_last)
        assert not weight.is_contiguous()
        assert model.odd.stride() == elsewhere.stride()
        out = model(x)
        assert out.shape == expected.shape
        with in_conv_layout((model,)):  # nested: the outer context's weights stay converted
            pass
        assert weight.is_contiguous(memory_format=torch.channels_last)
        weight.add_(1.0)  # a change made inside survives the way back
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert model.conv1.weight is weight and weight.is_contiguous()
    assert all(p.is_contiguous() for p in model.parameters())
    with torch.no_grad():
        moved = model(x)
    assert not torch.allclose(moved, expected)


PASSES: dict[str, Callable[[fx.GraphModule, fx.GraphModule], object]] = {
    "layer statistics": lambda original, _: collect_statistics(
        original, ["conv1", "conv2"], images(1), images=16
    ),
    "BatchNorm recalibration": lambda _, compressed: recalibrate_bn(compressed, images(1)),
    "bias correction": lambda original, compressed: correct_bias(
        original, compressed, ["conv1", "conv2"], images(1)
    ),
    "refit": lambda original, compressed: refit_blocks(
        original, compressed, ["conv1", "conv2"], images(1)
    ),
    "task metric": lambda _, compressed: TaskMetric(
        "mean logit", lambda model, data: float(sum(model(x).mean() for x in data)), images(1)
    )(compressed),
}


@pytest.mark.parametrize("name", PASSES)
def test_every_inference_pass_runs_channels_last_and_returns_contiguous_models(name: str) -> None:
    original = net()
    analysis = analyze(original)
    policy = RankPolicy(method="tucker2", rank=(8, 8), skip=["fc"], min_macs_share=0.0)
    compressed, _ = decompose(original, analysis, plan_of(analysis, policy, "net"))
    seen_original, seen_compressed = watch_layouts(original), watch_layouts(compressed)
    reference = copy.deepcopy(compressed)
    result = PASSES[name](original, compressed)
    calls = seen_original + seen_compressed
    assert calls and set(calls) == {True}, name
    for model in (original, compressed):
        assert all(t.is_contiguous() for t in (*model.parameters(), *model.buffers()))
    if name == "layer statistics":
        # The moments are those of the contiguous layout's activations, to float rounding.
        moment = result.moments["conv2"].moment
        inputs = torch.cat([torch.relu(original.bn1(original.conv1(x))) for x in images(1)])
        rows = inputs.detach().movedim(1, -1).reshape(-1, 16).double().numpy()
        np.testing.assert_allclose(moment, rows.T @ rows / len(rows), rtol=1e-4, atol=1e-6)
    if name == "refit":
        assert result.blocks  # the pass did refit, on the channels-last passes' values
        assert any(
            not torch.equal(a, b)
            for a, b in zip(compressed.state_dict().values(), reference.state_dict().values())
        )
