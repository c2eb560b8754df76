"""Factorized blocks reproduce their layer: hypothesis over conv geometries, tables for the rest."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from rankfold.passes import analyze, get_method, trace
from rankfold.passes.blocks import FactorizedBlock
from rankfold.passes.factorizations import CPFactors
from rankfold.passes.methods import cp_tensor, load_cp


@st.composite
def conv_configs(draw):
    kernel = draw(st.sampled_from([(1, 1), (3, 3), (5, 5), (1, 3), (3, 1), (2, 4)]))
    dilation = draw(st.sampled_from([1, 2]))
    stride = draw(st.sampled_from([1, 2]))
    padding = draw(
        st.sampled_from(
            ["same", "valid", 0, 1, (1, 2), (2, 0)] if stride == 1 else [0, 1, (1, 2), (2, 0)]
        )
    )
    return {
        "in_channels": draw(st.integers(1, 12)),
        "out_channels": draw(st.integers(1, 12)),
        "kernel_size": kernel,
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "bias": draw(st.booleans()),
        "padding_mode": draw(st.sampled_from(["zeros", "zeros", "reflect", "circular"])),
    }


def _layer(conv: nn.Module, x: torch.Tensor):
    model = nn.Sequential(conv).double()
    gm = trace(model, x)
    return model, gm, analyze(gm).layers[0]


def _input(config: dict, batch: int = 2) -> torch.Tensor:
    size = 11 + 2 * max(config["kernel_size"]) * config["dilation"]
    return torch.randn(batch, config["in_channels"], size, size - 1, dtype=torch.float64)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm() / b.norm().clamp_min(1e-300)).detach())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_configs(), st.sampled_from(["svd", "tucker2"]))
def test_full_rank_svd_and_tucker2_reproduce_the_conv(config, method_name):
    conv = nn.Conv2d(**config).double()
    x = _input(config)
    model, _, layer = _layer(conv, x)
    method = get_method(method_name)
    block = method.build(layer, method.max_ranks(layer)).double()
    result = method.fill(block, conv, seed=0)
    assert result.rel_error < 1e-10
    assert _relative(block(x), model(x)) < 1e-5


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_configs(), st.integers(1, 6), st.integers(0, 2**16))
def test_cp_block_equals_conv_with_reconstructed_kernel(config, rank, seed):
    conv = nn.Conv2d(**config).double()
    x = _input(config)
    _, _, layer = _layer(conv, x)
    s, t, kh, kw = config["in_channels"], config["out_channels"], *config["kernel_size"]
    rng = np.random.default_rng(seed)
    cp = CPFactors(
        rng.standard_normal(rank),
        (
            rng.standard_normal((s, rank)),
            rng.standard_normal((t, rank)),
            rng.standard_normal((kh * kw, rank)),
        ),
    )
    block = get_method("cp").build(layer, (rank,)).double()
    load_cp(block, cp, (kh, kw))
    if conv.bias is not None:
        block.pointwise_out.bias.data.copy_(conv.bias.data)
    kernel = cp.reconstruct().reshape(s, t, kh, kw).transpose(1, 0, 2, 3)
    reference = nn.Conv2d(**config).double()
    reference.weight.data.copy_(torch.from_numpy(np.ascontiguousarray(kernel)))
    if conv.bias is not None:
        reference.bias.data.copy_(conv.bias.data)
    assert _relative(block(x), reference(x)) < 1e-5


def test_cp_tensor_layout_matches_kernel():
    kernel = np.arange(2 * 3 * 2 * 2, dtype=float).reshape(2, 3, 2, 2)  # T×S×kh×kw
    tensor = cp_tensor(kernel)
    assert tensor.shape == (3, 2, 4)
    assert tensor[1, 0, 3] == kernel[0, 1, 1, 1]


@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_svd_reproduces_linear(bias):
    linear = nn.Linear(13, 7, bias=bias).double()
    x = torch.randn(5, 13, dtype=torch.float64)
    _, _, layer = _layer(linear, x)
    method = get_method("svd")
    block = method.build(layer, method.max_ranks(layer)).double()
    method.fill(block, linear, seed=0)
    assert _relative(block(x), linear(x)) < 1e-10


def test_cp_als_on_exact_low_rank_kernel_is_exact():
    rng = np.random.default_rng(0)
    s, t, k, rank = 6, 5, 9, 3
    cp = CPFactors(np.ones(rank), tuple(rng.standard_normal((n, rank)) for n in (s, t, k)))
    conv = nn.Conv2d(s, t, 3, padding=1, bias=False).double()
    conv.weight.data.copy_(
        torch.from_numpy(cp.reconstruct().reshape(s, t, 3, 3).transpose(1, 0, 2, 3).copy())
    )
    x = torch.randn(2, s, 8, 8, dtype=torch.float64)
    _, _, layer = _layer(conv, x)
    method = get_method("cp")
    block = method.build(layer, (rank,)).double()
    result = method.fill(block, conv, seed=0)
    assert result.rel_error < 1e-6
    assert result.extras["sensitivity"] > 0
    assert _relative(block(x), conv(x)) < 1e-6


@pytest.mark.parametrize("method_name", ["svd", "tucker2", "cp"])
def test_block_cost_equals_counting_hook(method_name):
    conv = nn.Conv2d(16, 24, (3, 5), stride=2, padding=(1, 2), bias=True)
    x = torch.randn(1, 16, 20, 18, dtype=torch.float64)
    _, _, layer = _layer(conv, x)
    method = get_method(method_name)
    ranks = method.candidates(layer)[len(method.candidates(layer)) // 3]
    block = method.build(layer, ranks).double()
    counted = {"macs": 0}

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            per_out = (
                module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            )
            counted["macs"] += output[0].numel() * per_out

    handles = [m.register_forward_hook(hook) for m in block.modules() if isinstance(m, nn.Conv2d)]
    block(x)
    for handle in handles:
        handle.remove()
    cost = method.cost(layer, ranks)
    assert cost.macs == counted["macs"]
    assert cost.params == sum(p.numel() for p in block.parameters())
    assert layer.macs == conv(x)[0].numel() * 16 * 3 * 5
    assert isinstance(block, FactorizedBlock) and block.source == layer.name
