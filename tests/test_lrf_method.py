"""The cp-lrf chain: exact against its reconstructed kernel, exact cost, budget, ONNX parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from planning_helpers import plan_of
from torch import nn

from rankfold.passes import (
    RankPolicy,
    analyze,
    decompose,
    get_method,
    plan_cost,
    trace,
)
from rankfold.passes.blocks import equalize_stages, kernel_of, merge_in, merge_out
from rankfold.passes.core import PlanError
from rankfold.passes.factorizations.lrf_cp import lrf_cp
from rankfold.passes.methods import cp_tensor
from rankfold.runtime import check_parity, export_onnx


def _layer(conv: nn.Conv2d, x: torch.Tensor):
    gm = trace(nn.Sequential(conv), x)
    return analyze(gm).layers[0]


@pytest.mark.parametrize(
    "s,t,ranks,stride,padding",
    [
        (12, 10, (8, 3, 2), 1, 1),  # both pairs stay factorised
        (6, 5, (9, 6, 5), 2, (1, 0)),  # both pairs merged into one 1×1
        (16, 4, (10, 3, 4), 1, "same"),  # mixed
    ],
)
def test_block_equals_conv_with_reconstructed_kernel(s, t, ranks, stride, padding):
    torch.manual_seed(0)
    conv = nn.Conv2d(s, t, 3, stride=stride, padding=padding, bias=True).double()
    x = torch.randn(2, s, 9, 9, dtype=torch.float64)
    layer = _layer(conv, x)
    method = get_method("cp-lrf")
    block = method.build(layer, ranks).double()
    result = method.fill(block, conv, seed=0)
    r, l_s, l_t = ranks
    assert ("core_in" not in block._modules) == merge_in(s, l_s, r)
    assert ("core_out" not in block._modules) == merge_out(t, l_t, r)
    kernel = conv.weight.detach().numpy()
    fitted = lrf_cp(cp_tensor(kernel), r, [l_s, l_t, None], seed=0, max_sweeps=200, tol=1e-7)
    assert result.rel_error == pytest.approx(fitted.rel_error, rel=1e-9)
    rebuilt = fitted.factors.reconstruct().reshape(s, t, 3, 3).transpose(1, 0, 2, 3)
    reference = nn.Conv2d(s, t, 3, stride=stride, padding=padding).double()
    reference.weight.data.copy_(torch.from_numpy(np.ascontiguousarray(rebuilt)))
    reference.bias.data.copy_(conv.bias.data)
    expected = reference(x)
    assert float(((block(x) - expected).norm() / expected.norm()).detach()) < 1e-5
    cost = method.cost(layer, ranks)
    assert cost.params == sum(p.numel() for p in block.parameters())


def test_factor_rank_above_cp_rank_is_refused():
    conv = nn.Conv2d(8, 8, 3)
    layer = _layer(conv, torch.randn(1, 8, 6, 6))
    with pytest.raises(PlanError, match="exceed the CP rank"):
        get_method("cp-lrf").normalize_ranks(layer, [4, 6, 2])


def test_pipeline_budget_and_onnx_parity(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 24, 3, padding=1),
        nn.BatchNorm2d(24),
        nn.ReLU(),
        nn.Conv2d(24, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).eval()
    x = torch.randn(4, 3, 16, 16)
    gm = trace(model, x)
    analysis = analyze(gm)
    plan = plan_of(analysis, RankPolicy(method="cp-lrf", macs_reduction=2.0, min_macs_share=0))
    achieved = analysis.total_macs / plan_cost(analysis, plan).macs
    assert abs(achieved / 2 - 1) <= 0.05
    compressed, report = decompose(gm, analysis, plan)
    rows = report.by_name()
    assert rows["3"].method == "cp-lrf" and len(rows["3"].rank) == 3
    export_onnx(compressed, x, tmp_path / "m.onnx")
    parity = check_parity(compressed, tmp_path / "m.onnx", x, atol=1e-4)
    assert parity.passed, parity


def test_error_bound_resolves_into_per_layer_ranks(tmp_path):
    from rankfold.converter import CompressConfig, compress

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 24, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(24, 10),
    ).eval()
    config = CompressConfig(
        model="tiny", ranks=RankPolicy(method="cp-lrf", select="error", rel_error=0.4)
    )
    result = compress(model, torch.zeros(1, 3, 8, 8), config)
    rows = [row for row in result.decomposition.layers if row.status == "decomposed"]
    assert [row.name for row in rows] == ["0", "2"]
    assert all(row.method == "cp-lrf" and len(row.rank) == 3 for row in rows)
    assert all(row.rel_error <= 0.4 + 1e-9 for row in rows)
    assert all("within relative error 0.4" in row.reason for row in rows)
    # The same selector as every method: the classifier is below min_macs_share, as with cp.
    fc = result.decomposition.by_name()["6"]
    assert fc.status == "skipped" and "min_macs_share" in fc.reason


def _edge_norms(block: nn.Module) -> list[tuple[np.ndarray, np.ndarray]]:
    """(norms of the weights writing each channel, of those reading it) between stages."""
    stages = list(block.children())
    kernels = [kernel_of(stage) for stage in stages]
    edges = []
    for writer, reader, stage in zip(kernels, kernels[1:], stages[1:]):
        read_axis = 0 if stage.groups > 1 else 1
        out_norms = np.linalg.norm(writer.reshape(writer.shape[0], -1), axis=1)
        in_norms = np.linalg.norm(
            np.moveaxis(reader, read_axis, 0).reshape(len(out_norms), -1), axis=1
        )
        edges.append((out_norms, in_norms))
    return edges


@pytest.mark.parametrize("transposed", [False, True])
def test_equalized_stages_keep_the_function_and_share_the_scale(transposed: bool) -> None:
    torch.manual_seed(0)
    spatial = (
        nn.ConvTranspose2d(7, 7, 3, stride=2, groups=7, bias=False)
        if transposed
        else nn.Conv2d(7, 7, 3, padding=1, groups=7, bias=False)
    )
    block = nn.Sequential(
        nn.Conv2d(6, 5, 1, bias=False),
        nn.Conv2d(5, 7, 1, bias=True),  # an inner bias scales with its channel
        spatial,
        nn.Conv2d(7, 4, 1, bias=False),
        nn.Conv2d(4, 8, 1, bias=True),
    ).double()
    with torch.no_grad():
        block[4].weight.mul_(
            50.0
        )  # all of the scale in the last stage, as a factorization leaves it
        block[2].weight.mul_(0.1)
        block[1].bias.normal_()
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    before = block(x).detach()
    ratio_before = max(float(np.max(o / i)) for o, i in _edge_norms(block))
    equalize_stages(block)
    assert torch.allclose(block(x), before, rtol=1e-10, atol=1e-10 * float(before.abs().max()))
    for out_norms, in_norms in _edge_norms(block):
        np.testing.assert_allclose(out_norms, in_norms, rtol=1e-6)
    assert ratio_before > 10.0


def test_cp_lrf_blocks_leave_no_stage_with_all_the_scale() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 10, 3, padding=1).double()
    x = torch.randn(2, 12, 9, 9, dtype=torch.float64)
    method = get_method("cp-lrf")
    block = method.build(_layer(conv, x), (8, 3, 2)).double()
    method.fill(block, conv, seed=0)
    for out_norms, in_norms in _edge_norms(block):
        np.testing.assert_allclose(out_norms, in_norms, rtol=1e-6)
