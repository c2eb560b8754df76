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
from rankfold.passes import RankPolicy, analyze, correction, decompose, trace
from rankfold.passes.correction import refit_blocks
from rankfold.passes.layout import (
    channels_last_allowed,
    conv_layout,
    fast_layout,
    in_conv_layout,
    runs_channels_last,
)
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


def original_and_compressed() -> tuple[fx.GraphModule, fx.GraphModule]:
    original = net()
    analysis = analyze(original)
    policy = RankPolicy(method="tucker2", rank=(8, 8), skip=["fc"], min_macs_share=0.0)
    compressed, _ = decompose(original, analysis, plan_of(analysis, policy, "net"))
    return original, compressed


@pytest.mark.parametrize("name", PASSES)
def test_every_inference_pass_runs_channels_last_and_returns_contiguous_models(name: str) -> None:
    original, compressed = original_and_compressed()
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


def test_the_refit_takes_moment_steps_on_blocks_inside_its_channels_last_pass(monkeypatch) -> None:
    """torch's L-BFGS views gradients flat: the moment steps of a Tucker-2 block (whose 3×3
    core the pass holds channels-last) run on contiguous weights, and lower the error."""
    monkeypatch.setattr(correction, "DEAR_STEP_MACS", 0)  # these 8×8 inputs are cheap
    original, compressed = original_and_compressed()
    done = refit_blocks(original, compressed, ["conv1", "conv2"], images(1), refine_steps=20)
    assert {refit.read for refit in done.blocks.values()} == {"moments"}
    assert all(refit.after < refit.before for refit in done.blocks.values())
    assert all(p.is_contiguous() for p in compressed.parameters())


def test_a_model_that_views_a_feature_map_flat_runs_contiguous(capsys) -> None:
    class Viewing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 8 * 8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(x).view(x.shape[0], -1))

    x = images(0)[0]
    assert runs_channels_last(net(), x)
    assert not runs_channels_last(Viewing(), x)
    # A GraphModule prints the failing line of its code; the probe keeps that quiet.
    assert not runs_channels_last(trace(Viewing(), x), x)
    assert capsys.readouterr().err == ""
    with channels_last_allowed(False):
        assert conv_layout() == torch.preserve_format and fast_layout(x) is x
        assert runs_channels_last(Viewing(), x)
    assert conv_layout() == torch.channels_last


class ContiguousKernel(nn.Module):
    """Stands for a C++/CUDA extension op that checks its input is contiguous, as many do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.stride(1) == 1:  # channels innermost
            raise RuntimeError("expected a contiguous tensor")
        return torch.relu(x)


class DigitsWithKernel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.kernel = ContiguousKernel()
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.kernel(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def test_compress_runs_a_model_that_needs_contiguous_tensors_contiguous_and_says_so(
    tmp_path, capsys
) -> None:
    from rankfold.converter import build_config, compress
    from rankfold.models import load_model
    from rankfold.models.digits import digits_splits

    _, spec = load_model("digits-cnn")
    _, test = digits_splits()
    np.savez(tmp_path / "digits.npz", x=test.x[:64], y=test.y[:64])
    config = build_config(
        {
            "model": "digits-cnn",
            "ranks": {"method": "tucker2", "macs_reduction": 2, "select": "uniform"},
            "train_data": str(tmp_path / "digits.npz"),
            "eval_data": str(tmp_path / "digits.npz"),
            "refit_steps": 5,
            "finetune": {"epochs": 1},
            "latency": {"enabled": False},
            "search": {"cache_dir": str(tmp_path / "cache")},
            "leaf_modules": ["kernel"],
        }
    )
    torch.manual_seed(0)
    model = DigitsWithKernel().eval()
    layouts = watch_layouts(model)
    result = compress(model, torch.zeros(1, *spec.input_shape), config, spec, tmp_path / "work")
    err = capsys.readouterr().err
    assert "does not run on channels-last tensors" in err
    assert "Traceback" not in err and "FX-traced" not in err  # the probe's failure stays quiet
    # conv1's one input channel makes its weight either layout: conv2 shows what ran. The probe
    # ran it channels-last, every other pass contiguous.
    conv2 = layouts[1::2]
    assert len(conv2) > 3 and conv2.count(True) == 1
    assert result.refit is not None and result.refit.layers == 2
    assert {"original", "refitted", "finetuned"} <= set(result.accuracy)
    assert conv_layout() == torch.channels_last  # the next run decides afresh


def test_a_task_metric_reads_contiguous_outputs_of_a_channels_last_run() -> None:
    """A user's score written for the contiguous layout (here a `view` that merges channels
    with rows, which a channels-last map refuses) gets outputs it can read, while the model
    itself runs channels-last."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    seen = watch_layouts(model)

    def score(m: nn.Module, data: list[torch.Tensor]) -> float:
        return float(sum(m(x).view(len(x), 8 * 8, 8).amax(-1).mean() for x in data))

    with torch.no_grad():
        expected = score(model, images(1))
    value = TaskMetric("peak", score, images(1))(model)
    assert value == pytest.approx(expected, rel=1e-5)
    assert seen[-2:] == [True, True]  # the metric's two batches ran channels-last
    assert not model._forward_hooks  # the output hook is gone
