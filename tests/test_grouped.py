"""Grouped convs decompose per group: grouped stages reproduce the conv, costs count exactly."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from planning_helpers import resolve
from torch import nn
from typer.testing import CliRunner

from rankfold.converter.cli import app
from rankfold.passes import RankPolicy, analyze, get_method, trace
from rankfold.passes.blocks import conv_group
from rankfold.passes.methods import method_for_layer


@st.composite
def grouped_configs(draw):
    groups = draw(st.integers(2, 4))
    kernel = draw(st.sampled_from([(1, 1), (3, 3), (1, 3), (3, 2)]))
    stride = draw(st.sampled_from([1, 2]))
    padding = draw(st.sampled_from(["same", 0, 1, (1, 2)] if stride == 1 else [0, 1, (1, 2)]))
    return {
        "in_channels": groups * draw(st.integers(2, 5)),
        "out_channels": groups * draw(st.integers(1, 5)),
        "kernel_size": kernel,
        "stride": stride,
        "padding": padding,
        "dilation": draw(st.sampled_from([1, 2])),
        "groups": groups,
        "bias": draw(st.booleans()),
        "padding_mode": draw(st.sampled_from(["zeros", "zeros", "reflect"])),
    }


def _layer(conv: nn.Conv2d, batch: int = 2):
    size = 9 + 2 * max(conv.kernel_size) * conv.dilation[0]
    x = torch.randn(batch, conv.in_channels, size, size - 1, dtype=torch.float64)
    return x, analyze(trace(nn.Sequential(conv), x)).layers[0]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm() / b.norm().clamp_min(1e-300)).detach())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grouped_configs(), st.sampled_from(["svd", "tucker2"]))
def test_full_rank_grouped_block_reproduces_the_conv(config, method_name):
    conv = nn.Conv2d(**config).double()
    x, layer = _layer(conv)
    method = get_method(method_name)
    assert method.unsupported_reason(layer) is None
    block = method.build(layer, method.max_ranks(layer)).double()
    result = method.fill(block, conv, seed=0)
    assert all(stage.groups % config["groups"] == 0 for stage in block)
    assert result.rel_error < 1e-10
    assert _relative(block(x), conv(x)) < 1e-10


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grouped_configs(), st.sampled_from(["svd", "tucker2", "cp"]), st.floats(0.2, 0.7))
def test_reduced_rank_grouped_block_is_the_per_group_fits(config, method_name, ratio):
    """Group i of the block is exactly the block fitted to group i alone; the reported error is
    the per-group errors combined (‖W − Ŵ‖² adds up over groups)."""
    conv = nn.Conv2d(**config).double()
    x, layer = _layer(conv)
    method = get_method(method_name)
    ranks = method.clamp_ranks(layer, method.ranks_from_ratio(layer, ratio))
    block = method.build(layer, ranks).double()
    result = method.fill(block, conv, seed=0)
    g = config["groups"]
    out = block(x)
    squared, norms = 0.0, 0.0
    for index, x_part in enumerate(torch.chunk(x, g, dim=1)):
        single = conv_group(conv, index)
        alone = method.build(layer.one_group, ranks).double()
        fitted = method.fill(alone, single, seed=0)
        rows = slice(index * single.out_channels, (index + 1) * single.out_channels)
        assert _relative(out[:, rows], alone(x_part)) < 1e-9
        norm = float(single.weight.detach().norm())
        squared += (fitted.rel_error * norm) ** 2
        norms += norm**2
    assert result.rel_error == pytest.approx(math.sqrt(squared / norms), rel=1e-9)


def _counted(block: nn.Module, x: torch.Tensor) -> int:
    macs = []

    def hook(module, inputs, output):
        k = module.kernel_size[0] * module.kernel_size[1]
        macs.append(output[0].numel() * module.in_channels // module.groups * k)

    handles = [m.register_forward_hook(hook) for m in block.modules() if isinstance(m, nn.Conv2d)]
    block(x)
    for handle in handles:
        handle.remove()
    return sum(macs)


def test_grouped_costs_match_a_hand_count_and_the_built_block():
    # 48→64, 3×3, 4 groups (12→16 each), stride 1, padding 1 on 8×8: 64 positions.
    conv = nn.Conv2d(48, 64, 3, padding=1, groups=4, bias=True).double()
    x = torch.randn(1, 48, 8, 8, dtype=torch.float64)
    layer = analyze(trace(nn.Sequential(conv), x)).layers[0]
    assert (layer.params, layer.macs) == (64 * 12 * 9 + 64, 64 * 64 * 12 * 9)
    hand = {
        # per group: 1×1 12→6, 3×3 6→8, 1×1 8→16; then ×4 groups and the bias.
        ("tucker2", (8, 6)): (4 * (12 * 6 + 6 * 8 * 9 + 8 * 16) + 64, 64 * 4 * 632),
        # per group: 3×3 12→5, 1×1 5→16.
        ("svd", (5,)): (4 * (12 * 9 * 5 + 5 * 16) + 64, 64 * 4 * (540 + 80)),
        # per group: 1×1 12→7, depthwise 3×3 on 7, 1×1 7→16.
        ("cp", (7,)): (4 * 7 * (12 + 9 + 16) + 64, 64 * 4 * 7 * 37),
    }
    for (name, ranks), (params, macs) in hand.items():
        method = get_method(name)
        cost = method.cost(layer, ranks)
        block = method.build(layer, ranks).double()
        assert (cost.params, cost.macs) == (params, macs), name
        assert cost.params == sum(p.numel() for p in block.parameters())
        assert cost.macs == _counted(block, x)
        assert method.max_ranks(layer) == get_method(name).max_ranks(layer.one_group)


def test_depthwise_stays_skipped_and_grouped_reason_says_per_group():
    x = torch.randn(1, 16, 8, 8)
    gm = trace(nn.Sequential(nn.Conv2d(16, 16, 3, groups=16), nn.Conv2d(16, 32, 3, groups=4)), x)
    depthwise, grouped = analyze(gm).layers
    assert "depthwise conv (groups=16)" in get_method("tucker2").unsupported_reason(depthwise)
    method, note = method_for_layer("tucker2", grouped)
    assert method.unsupported_reason(grouped) is None
    assert note == "ranks per group: 4 groups of 4→8"


def test_energy_reads_per_group_spectra_and_keeps_every_group_exact():
    """Group 0 has exact Tucker-2 ranks (3, 2), group 1 (5, 4): one rank pair for all groups
    keeps all the energy only at the larger group's ranks."""
    rng = np.random.default_rng(0)
    kernels = [
        np.einsum(
            "abhw,ta,sb->tshw",
            rng.standard_normal((r_out, r_in, 3, 3)),
            rng.standard_normal((16, r_out)),
            rng.standard_normal((12, r_in)),
        )
        for r_out, r_in in ((3, 2), (5, 4))
    ]
    conv = nn.Conv2d(24, 32, 3, padding=1, groups=2, bias=False)
    conv.weight.data.copy_(torch.from_numpy(np.concatenate(kernels)))
    gm = trace(nn.Sequential(conv).eval(), torch.randn(1, 24, 10, 10))
    policy = RankPolicy(method="tucker2", select="energy", energy=0.999999, min_macs_share=0)
    plan, report = resolve(gm, analyze(gm), policy, "grouped")
    assert plan.layers[0].ranks == [5, 4]
    assert min(report["layers"][0]["retained_energy"]) >= 0.999999
    lower = RankPolicy(method="tucker2", select="energy", energy=0.9, min_macs_share=0)
    assert resolve(gm, analyze(gm), lower, "grouped")[0].layers[0].ranks < [5, 4]


MODEL = """
import torch
from torch import nn

RANKFOLD_SPEC = {"input_shape": [3, 16, 16], "num_classes": 5, "mean": [0, 0, 0],
                 "std": [1, 1, 1]}


class Next(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.grouped = nn.Conv2d(32, 48, 3, stride=2, padding=2, dilation=2, groups=4)
        self.bn = nn.BatchNorm2d(48)
        self.depthwise = nn.Conv2d(48, 48, 3, padding=1, groups=48)
        self.head = nn.Linear(48, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.grouped(torch.relu(self.stem(x)))))
        return self.head(self.depthwise(x).mean((2, 3)))


def build():
    torch.manual_seed(0)
    return Next().eval()
"""


def test_grouped_model_compresses_end_to_end_through_the_cli(tmp_path):
    (tmp_path / "next.py").write_text(MODEL)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "compress", f"{tmp_path / 'next.py'}:build", "--method", "tucker2",
            "--macs-reduction", "1.5", "--no-latency", "--parity-samples", "8", "--out", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    rows = {row["name"]: row for row in report["layers"]}
    assert rows["grouped"]["status"] == "decomposed"
    assert "ranks per group: 4 groups of 8→12" in rows["grouped"]["reason"]
    assert rows["depthwise"]["status"] == "skipped"
    assert "depthwise conv" in rows["depthwise"]["reason"]
    assert abs(report["macs_reduction"] / 1.5 - 1) <= 0.05
    assert report["onnx"]["parity_passed"] is True and report["onnx"]["max_abs_diff"] < 1e-4
