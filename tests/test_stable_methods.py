"""cp-epc and tucker2-cp in the pipeline: error kept, sensitivity lowered, exact cost, export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from planning_helpers import plan_of
from torch import nn

from rankfold.models import load_model
from rankfold.passes import (
    LayerOverride,
    RankPolicy,
    analyze,
    decompose,
    get_method,
    plan_cost,
    restructure,
    trace,
)
from rankfold.passes.blocks import merge_in, merge_out
from rankfold.passes.core import PlanError
from rankfold.passes.factorizations import max_cp_rank
from rankfold.passes.methods import METHODS, CPEPCMethod, Tucker2CPMethod, cp_tensor
from rankfold.runtime import check_parity, export_onnx

BOUND = 1.0 + 1e-6  # allowed relative excess of EPC's error over the ALS error


@pytest.fixture
def fast_methods(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registered instances with fewer EPC sweeps: the tests check structure, not convergence."""
    monkeypatch.setitem(METHODS, "cp-epc", CPEPCMethod(max_sweeps=150))
    monkeypatch.setitem(METHODS, "tucker2-cp", Tucker2CPMethod(max_sweeps=150))


class TinyNet(nn.Module):
    """Strided, dilated 'same', biased and BN convs: every geometry the blocks must carry."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding="same", dilation=2, bias=True)
        self.conv4 = nn.Conv2d(32, 24, (3, 5), padding=(1, 2), bias=True)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        return self.fc(x.mean(dim=(2, 3)))


def _tiny() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = TinyNet()
    for bn in (model.bn1, model.bn2):  # non-trivial statistics, as after training
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    return model.eval(), torch.randn(6, 3, 16, 16)


def _layer(conv: nn.Module, x: torch.Tensor):
    gm = trace(nn.Sequential(conv).double(), x)
    return analyze(gm).layers[0]


def _effective_kernel(block: nn.Module) -> np.ndarray:
    """T×S×kh×kw kernel of a pointwise…/depthwise/…pointwise chain (products of its 1×1s)."""
    stages = dict(block.named_children())
    mat = lambda name: stages[name].weight.detach().double()[:, :, 0, 0]  # noqa: E731
    p_in = mat("pointwise_in")
    if "core_in" in stages:
        p_in = mat("core_in") @ p_in
    p_out = mat("pointwise_out")
    if "core_out" in stages:
        p_out = p_out @ mat("core_out")
    depth = stages["depthwise"].weight.detach().double()[:, 0]
    return torch.einsum("tr,rhw,rs->tshw", p_out, depth, p_in).numpy()


def _synthetic_kernel(t: int, s: int, kh: int, kw: int, seed: int) -> np.ndarray:
    """Decaying-spectrum kernel plus noise: trained kernels are neither random nor low rank."""
    rng = np.random.default_rng(seed)
    kernel = sum(
        0.7**r * np.einsum("t,s,k->tsk", *(rng.standard_normal(n) for n in (t, s, kh * kw)))
        for r in range(24)
    )
    return (kernel + 0.05 * rng.standard_normal(kernel.shape)).reshape(t, s, kh, kw)


def test_cp_epc_starts_from_cp_and_never_raises_the_error() -> None:
    tensor = cp_tensor(_synthetic_kernel(20, 12, 3, 3, seed=1))
    als, als_extras = get_method("cp").factorize(tensor, 10, 0)
    cp, extras = CPEPCMethod(max_sweeps=200).factorize(tensor, 10, 0)
    assert extras["als_rel_error"] == pytest.approx(als.rel_error(tensor), rel=1e-12)
    assert extras["largest_component_before"] == pytest.approx(
        float(np.max(np.abs(als.normalized().weights))), rel=1e-12
    )
    assert cp.rel_error(tensor) <= extras["als_rel_error"] * BOUND
    assert extras["sensitivity"] <= extras["sensitivity_before"]
    assert extras["largest_component"] <= extras["largest_component_before"]
    assert 1 <= extras["epc_sweeps"] <= 200


def test_cp_epc_on_a_real_kernel_is_several_times_less_sensitive(data_dir) -> None:
    model, _ = load_model("resnet20", data_dir / "weights/resnet20-12fca82f.th")
    conv = model.layer2[1].conv1
    x = torch.randn(1, 32, 16, 16, dtype=torch.float64)
    layer = _layer(conv, x)
    method = CPEPCMethod(max_sweeps=200)
    block = method.build(layer, (42,)).double()
    result = method.fill(block, conv.double(), seed=0)
    # Measured: ratio 13.0 after 200 sweeps (sensitivity 5.3e3 from 6.9e4), error 0.4446 kept.
    assert result.rel_error <= result.extras["als_rel_error"] * BOUND
    assert result.extras["sensitivity_before"] / result.extras["sensitivity"] >= 5.0
    kernel = conv.weight.detach().double().numpy()
    achieved = np.linalg.norm(_effective_kernel(block) - kernel) / np.linalg.norm(kernel)
    assert achieved == pytest.approx(result.rel_error, rel=1e-9)


GEOMETRIES = [
    {"kernel_size": 3, "padding": 1},
    {"kernel_size": 3, "stride": 2, "padding": (1, 0), "bias": True},
    {"kernel_size": (3, 5), "padding": "same", "dilation": 2, "bias": True},
    {"kernel_size": (2, 4), "padding": "valid", "padding_mode": "zeros"},
    {"kernel_size": 3, "padding": 2, "dilation": 2, "padding_mode": "reflect"},
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: str(sorted(g.items())))
@pytest.mark.parametrize("ranks", [(4, 3, 10), (12, 10, 22)], ids=["separate", "merged"])
def test_tucker2_cp_block_is_the_reported_kernel(geometry: dict, ranks: tuple) -> None:
    geometry = dict(geometry)
    conv = nn.Conv2d(10, 14, bias=geometry.pop("bias", False), **geometry).double()
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(_synthetic_kernel(14, 10, *conv.kernel_size, seed=2)))
    x = torch.randn(2, 10, 13, 12, dtype=torch.float64)
    layer = _layer(conv, x)
    method = Tucker2CPMethod(max_sweeps=100)
    block = method.build(layer, ranks).double()
    merged = ranks == (12, 10, 22)
    assert merge_in(10, ranks[1], ranks[2]) == merge_out(14, ranks[0], ranks[2]) == merged
    assert ("core_in" in dict(block.named_children())) != merged
    result = method.fill(block, conv, seed=0)

    kernel = conv.weight.detach().numpy()
    effective = _effective_kernel(block)
    achieved = np.linalg.norm(effective - kernel) / np.linalg.norm(kernel)
    assert achieved == pytest.approx(result.rel_error, rel=1e-9)
    assert result.rel_error <= result.extras["als_rel_error"] * BOUND
    assert result.extras["sensitivity"] <= result.extras["sensitivity_before"]
    reference = nn.Conv2d(10, 14, bias=conv.bias is not None, **geometry).double()
    with torch.no_grad():
        reference.weight.copy_(torch.from_numpy(effective))
        if conv.bias is not None:
            reference.bias.copy_(conv.bias)
    with torch.no_grad():
        expected, actual = reference(x), block(x)
    assert torch.allclose(actual, expected, rtol=0, atol=1e-10 * float(expected.abs().max()))


@pytest.mark.parametrize("ranks", [(4, 3, 10), (12, 10, 22), (12, 3, 20), (4, 10, 20)])
def test_tucker2_cp_cost_equals_counting_hook(ranks: tuple) -> None:
    conv = nn.Conv2d(10, 14, (3, 5), stride=2, padding=(1, 2), bias=True)
    x = torch.randn(1, 10, 20, 18, dtype=torch.float64)
    layer = _layer(conv, x)
    method = get_method("tucker2-cp")
    block = method.build(layer, ranks).double()
    counted = {"macs": 0}

    def hook(module, inputs, output):
        kh, kw = module.kernel_size
        counted["macs"] += output[0].numel() * module.in_channels // module.groups * kh * kw

    handles = [m.register_forward_hook(hook) for m in block.modules() if isinstance(m, nn.Conv2d)]
    assert block(x).shape == conv.double()(x).shape
    for handle in handles:
        handle.remove()
    cost = method.cost(layer, ranks)
    assert cost.macs == counted["macs"]
    assert cost.params == sum(p.numel() for p in block.parameters())


def test_tucker2_cp_candidates_and_ratios_are_valid_and_ordered() -> None:
    conv = nn.Conv2d(24, 40, 3, padding=1)
    layer = _layer(conv, torch.randn(1, 24, 8, 8, dtype=torch.float64))
    method = get_method("tucker2-cp")
    family = method.candidates(layer)
    macs = [method.cost(layer, ranks).macs for ranks in family]
    assert macs == sorted(macs) and len(family) > 10
    assert macs[-1] >= layer.macs > macs[-2]
    for ranks in family[:-1]:
        assert method.normalize_ranks(layer, list(ranks)) == ranks  # no PlanError
        r_out, r_in, r = ranks
        assert r <= max_cp_rank((r_in, r_out, 9)) and r_out <= 40 and r_in <= 24
    assert method.ranks_from_ratio(layer, 0.5) in family
    assert method.ranks_from_ratio(layer, 0.5) == (20, 12, 40)


def test_tucker2_cp_impossible_ranks_are_refused_at_plan_time() -> None:
    model, x = _tiny()
    gm = trace(model, x)
    analysis = analyze(gm)
    for ranks, words in [
        ([4, 3, 40], r"CP rank 40 .* exceeds 12,.*3×4×9"),
        ([30, 3, 10], r"rank_out ≤ 27"),
    ]:
        policy = RankPolicy(method="tucker2-cp", layers={"conv3": LayerOverride(rank=ranks)})
        with pytest.raises(PlanError, match=words):
            plan_of(analysis, policy)


def test_epc_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="max_sweeps"):
        CPEPCMethod(max_sweeps=-1)
    with pytest.raises(ValueError, match="cp_per_tucker_rank"):
        Tucker2CPMethod(cp_per_tucker_rank=0)


@pytest.mark.parametrize("method_name", ["cp-epc", "tucker2-cp"])
def test_pipeline_budget_report_onnx_and_restore(
    method_name: str, fast_methods: None, tmp_path
) -> None:
    model, x = _tiny()
    gm = trace(model, x)
    analysis = analyze(gm)
    # One layer at explicit ranks keeps tucker2-cp's unmerged 1×1 pairs in the test.
    layers = {"conv3": LayerOverride(rank=[4, 4, 12])} if method_name == "tucker2-cp" else {}
    policy = RankPolicy(method=method_name, macs_reduction=2, min_macs_share=0, layers=layers)
    plan = plan_of(analysis, policy, "tiny")
    assert plan_cost(analysis, plan).macs == pytest.approx(analysis.total_macs / 2, rel=0.05)

    new, report = decompose(gm, analysis, plan, seed=0)
    rows = [row for row in report.layers if row.method == method_name]
    assert [row.name for row in rows] == ["conv1", "conv2", "conv3", "conv4"]
    for row in rows:
        assert row.extras["sensitivity"] <= row.extras["sensitivity_before"]
        assert row.rel_error <= row.extras["als_rel_error"] * BOUND
        assert {"sensitivity", "sensitivity_before", "rel_error"} <= set(row.to_dict())
    if method_name == "tucker2-cp":
        assert hasattr(new.conv3, "core_in") and hasattr(new.conv3, "core_out")

    path = export_onnx(new, x[:1], tmp_path / f"{method_name}.onnx")
    parity = check_parity(new, path, x, atol=1e-4)
    assert parity.passed, parity

    restored = restructure(gm, analysis, plan)
    restored.load_state_dict(new.state_dict())
    with torch.no_grad():
        assert torch.allclose(restored(x), new(x), rtol=0, atol=1e-6)
        # The compressed network still computes something close to the original.
        expected = model(x)
        assert float((new(x) - expected).norm() / expected.norm()) < 0.8
