"""Data-free rank selection: the exact cost model, uniform / energy / error / vbmf, the budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from planning_helpers import plan_of, resolve
from torch import nn

from rankfold.passes import analyze, decompose, plan_cost, select_ranks, trace
from rankfold.passes.core import ConfigError, PlanError
from rankfold.passes.methods import METHODS, method_for_layer
from rankfold.passes.plan import RankPolicy
from rankfold.passes.search import Calibration, SearchConfig
from rankfold.passes.selectors import evbmf_rank


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 48, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(48, 48, 3, padding=1, groups=48),
            nn.Conv2d(48, 40, 1),
        )
        self.head = nn.Linear(40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


@pytest.fixture(scope="module")
def traced():
    torch.manual_seed(0)
    gm = trace(Net().eval(), torch.randn(1, 3, 12, 12))
    return gm, analyze(gm)


def _counted(block: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Per-sample MACs of every conv / linear in `block` (forward hooks) and its parameters."""
    macs = [0]

    def hook(module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * int(np.prod(module.kernel_size))
        else:
            per_output = module.in_features
        macs[0] += output.numel() // x.shape[0] * per_output

    handles = [
        m.register_forward_hook(hook)
        for m in block.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    with torch.no_grad():
        block(x)
    for handle in handles:
        handle.remove()
    return macs[0], sum(p.numel() for p in block.parameters())


LAYERS = [
    (nn.Conv2d(16, 24, (3, 5), stride=2, padding=(1, 2), bias=True), (3, 16, 20, 18)),
    (nn.Conv2d(12, 10, 3, padding=1, dilation=1, bias=False), (2, 12, 9, 11)),
    (nn.Conv2d(8, 20, 1, bias=True), (2, 8, 7, 7)),
    (nn.Linear(13, 7), (3, 13)),
]


@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_cost_model_equals_counting_hook_for_every_registered_method(method_name):
    method = METHODS[method_name]
    tested = 0
    for module, shape in LAYERS:
        x = torch.randn(*shape, dtype=torch.float64)
        layer = analyze(trace(nn.Sequential(module).double(), x)).layers[0]
        whole_macs, whole_params = _counted(module.double(), x)
        assert (layer.macs, layer.params) == (whole_macs, whole_params)
        if (
            method.unsupported_reason(layer)
            or method_for_layer(method_name, layer)[0] is not method
        ):
            continue  # matrices go to svd whatever the requested method
        candidates = method.candidates(layer)
        for ranks in {candidates[0], candidates[len(candidates) // 2], candidates[-1]}:
            block = method.build(layer, ranks).double()
            cost = method.cost(layer, ranks)
            assert (cost.macs, cost.params) == _counted(block, x), (method_name, layer.name, ranks)
            tested += 1
    assert tested >= 3


def test_uniform_selector_is_select_ranks_and_stays_within_budget(traced):
    gm, analysis = traced
    policy = RankPolicy(method="tucker2", macs_reduction=2.5, min_macs_share=0, select="uniform")
    plan, report = resolve(gm, analysis, policy, "net")
    assert plan == plan_of(analysis, policy, "net")
    assert report["selector"] == "uniform" and not report["by_default"]
    assert report["macs"] == plan_cost(analysis, plan).macs <= analysis.total_macs / 2.5


def test_the_method_names_the_selector_of_a_budget_unless_the_user_does(traced):
    gm, analysis = traced
    budget = {"macs_reduction": 2.5, "min_macs_share": 0}
    plan, report = resolve(gm, analysis, RankPolicy(method="tucker2", **budget), "net")
    named, _ = resolve(gm, analysis, RankPolicy(method="tucker2", select="energy", **budget))
    assert report["selector"] == "energy" and report["by_default"]
    assert [layer.ranks for layer in plan.layers] == [layer.ranks for layer in named.layers]
    assert report["macs"] <= analysis.total_macs / 2.5
    # No budget-wide choice to make, a latency budget, or a method without a preference: uniform.
    assert RankPolicy(method="tucker2", rank=0.5).selector == "uniform"
    assert RankPolicy(method="tucker2", latency_reduction=2).selector == "uniform"
    assert RankPolicy(method="cp", macs_reduction=2).selector == "uniform"
    assert RankPolicy(method="tucker2", params_reduction=2).selector == "energy"
    with pytest.raises(ConfigError, match=r"energy, the tucker2 method's selector under a budget"):
        select_ranks(analysis, RankPolicy(method="tucker2", **budget))  # no weights to read


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    select=st.sampled_from(["uniform", "energy", "vbmf"]),
    method=st.sampled_from(["svd", "tucker2"]),
    metric=st.sampled_from(["macs", "params"]),
    reduction=st.floats(1.1, 8.0),
)
def test_no_returned_plan_exceeds_its_budget(traced, select, method, metric, reduction):
    gm, analysis = traced
    policy = RankPolicy(
        method=method, select=select, min_macs_share=0, **{f"{metric}_reduction": reduction}
    )
    try:
        plan, report = resolve(gm, analysis, policy, "net")
    except PlanError as exc:
        assert "impossible" in str(exc)
        return
    total = getattr(analysis, f"total_{metric}")
    achieved = getattr(plan_cost(analysis, plan), metric)
    assert achieved <= total / reduction
    assert report[metric] == achieved
    assert plan.target == {f"{metric}_reduction": reduction}


def test_error_selector_within_budget_and_same_bound_for_every_layer(traced, tmp_path):
    gm, analysis = traced
    policy = RankPolicy(
        method="tucker2", select="error", macs_reduction=3, min_macs_share=0, round_to=None
    )
    plan, report = resolve(gm, analysis, policy, "net", search=SearchConfig(cache_dir=tmp_path))
    assert plan_cost(analysis, plan).macs <= analysis.total_macs / 3
    _, decomposition = decompose(gm, analysis, plan)
    errors = {row.name: row.rel_error for row in decomposition.layers if row.rel_error is not None}
    # The bisection's bound holds for every layer; single steps afterwards only lower errors.
    assert errors and all(e <= report["bound"] + 1e-9 for e in errors.values())
    assert report["decompositions"] > 0


def _tucker_conv(rank_out: int, rank_in: int, noise: float, seed: int = 0) -> nn.Module:
    """A 3×3 conv 20→24 whose kernel has exact Tucker-2 ranks, plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    core = rng.standard_normal((rank_out, rank_in, 3, 3))
    kernel = np.einsum(
        "abhw,ta,sb->tshw",
        core,
        rng.standard_normal((24, rank_out)),
        rng.standard_normal((20, rank_in)),
    )
    kernel = kernel + noise * rng.standard_normal(kernel.shape)
    conv = nn.Conv2d(20, 24, 3, padding=1, bias=False)
    conv.weight.data.copy_(torch.from_numpy(kernel))
    return nn.Sequential(conv).eval()


def test_energy_without_budget_finds_exact_tucker_ranks():
    gm = trace(_tucker_conv(5, 3, noise=0.0), torch.randn(1, 20, 10, 10))
    policy = RankPolicy(method="tucker2", select="energy", energy=0.999999, min_macs_share=0)
    plan, report = resolve(gm, analyze(gm), policy, "conv")
    assert plan.layers[0].ranks == [5, 3]
    assert min(report["layers"][0]["retained_energy"]) >= 0.999999
    assert "unfolding energy" in plan.layers[0].reason


def test_the_method_s_selector_gives_way_to_uniform_where_it_cannot_plan_every_layer():
    torch.manual_seed(0)
    convs = [nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1)]
    gm = trace(nn.Sequential(convs[0], nn.ReLU(), convs[1]).eval(), torch.zeros(1, 3, 16, 16))
    analysis = analyze(gm)
    mixed = {"macs_reduction": 2.0, "min_macs_share": 0, "layers": {"2": {"method": "cp"}}}
    plan, report = resolve(gm, analysis, RankPolicy(method="tucker2", **mixed))
    assert report["selector"] == "uniform" and not report["by_default"]
    why = report["default_fallback"]
    assert why.startswith("energy, the tucker2 method's default, cannot plan every layer")
    assert [layer.method for layer in plan.layers] == ["tucker2", "cp"]
    assert analysis.total_macs / plan_cost(analysis, plan).macs == pytest.approx(2.0, rel=0.05)
    with pytest.raises(ConfigError, match="not cp"):  # named, energy is the user's choice
        resolve(gm, analysis, RankPolicy(method="tucker2", select="energy", **mixed))


@pytest.mark.parametrize(
    ("reduction", "ranks", "note"),
    # One 64→64 3×3 conv: aligned Tucker-2 ranks give 8.47× (16, 16), 4.80× (16, 32), 2.77×
    # (32, 32), 1.95× (32, 48) fewer MACs.
    [(2.7, [32, 32], None), (4.0, None, "ranks not aligned: aligned ones reach only 4.80×")],
)
def test_energy_under_a_budget_aligns_ranks_unless_that_misses_it(reduction, ranks, note):
    torch.manual_seed(0)
    gm = trace(nn.Sequential(nn.Conv2d(64, 64, 3, padding=1)).eval(), torch.zeros(1, 64, 8, 8))
    analysis = analyze(gm)
    policy = RankPolicy(
        method="tucker2", macs_reduction=reduction, round_to=16, min_macs_share=0, select="energy"
    )
    plan, _ = resolve(gm, analysis, policy)
    achieved = analysis.total_macs / plan_cost(analysis, plan).macs
    assert reduction <= achieved <= 1.05 * reduction
    if ranks is not None:
        assert plan.layers[0].ranks == ranks and "not aligned" not in plan.layers[0].reason
    else:
        assert note in plan.layers[0].reason
        assert any(r % 16 for r in plan.layers[0].ranks)


def test_energy_with_budget_keeps_at_least_the_common_threshold(traced):
    gm, analysis = traced
    policy = RankPolicy(method="tucker2", select="energy", params_reduction=2.0, min_macs_share=0)
    steps: list[str] = []
    plan, report = resolve(gm, analysis, policy, "net", progress=steps.append)
    assert steps == [row["layer"] for row in report["layers"]]  # one step per layer's spectra
    assert plan_cost(analysis, plan).params <= analysis.total_params / 2.0
    kept = [min(row["retained_energy"]) for row in report["layers"] if row["ranks"]]
    assert kept and min(kept) >= report["threshold"] - 1e-9
    assert 0 < report["threshold"] < 1


def test_energy_that_cannot_shrink_a_layer_keeps_it_whole(traced):
    gm, analysis = traced  # random kernels have flat spectra: 99.99 % needs (nearly) full ranks
    policy = RankPolicy(method="tucker2", select="energy", energy=0.9999, min_macs_share=0)
    plan, _ = resolve(gm, analysis, policy, "net")
    assert not any(entry.decompose for entry in plan.layers)
    assert any("energy: kept whole" in entry.reason for entry in plan.layers)


@pytest.mark.parametrize("shape", [(40, 60), (60, 40), (24, 180)])
def test_evbmf_recovers_the_rank_of_a_noisy_low_rank_matrix(shape):
    rng = np.random.default_rng(1)
    rank = 5
    signal = rng.standard_normal((shape[0], rank)) @ rng.standard_normal((rank, shape[1]))
    assert evbmf_rank(signal + 0.1 * rng.standard_normal(shape)) == rank
    assert evbmf_rank(rng.standard_normal(shape)) == 1  # pure noise: nothing survives (floor 1)


def test_vbmf_without_budget_uses_the_estimates_and_scales_with_one():
    gm = trace(_tucker_conv(6, 4, noise=0.05), torch.randn(1, 20, 10, 10))
    analysis = analyze(gm)
    policy = RankPolicy(method="tucker2", select="vbmf", min_macs_share=0)
    plan, report = resolve(gm, analysis, policy, "conv")
    assert report["layers"][0]["vbmf"] == [6, 4]
    assert plan.layers[0].ranks == [6, 4]
    budgeted, report = resolve(
        gm, analysis, policy.model_copy(update={"macs_reduction": 4.0}), "conv"
    )
    assert plan_cost(analysis, budgeted).macs <= analysis.total_macs / 4.0
    assert "scaled ×" in budgeted.layers[0].reason and report["scale"] > 0


def test_spectral_selectors_refuse_cp_with_the_fix(traced):
    gm, analysis = traced
    for select in ("energy", "vbmf"):
        policy = RankPolicy(method="cp", select=select, macs_reduction=2, min_macs_share=0)
        with pytest.raises(
            ConfigError, match=f"--select {select} .*svd and tucker2.*error or pars"
        ):
            resolve(gm, analysis, policy, "net")


def test_error_selector_without_budget_picks_the_smallest_rank_within_the_bound(traced, tmp_path):
    gm, analysis = traced
    policy = RankPolicy(
        method="svd", select="error", rel_error=0.6, min_macs_share=0, round_to=None
    )
    plan, report = resolve(gm, analysis, policy, "net", search=SearchConfig(cache_dir=tmp_path))
    _, decomposition = decompose(gm, analysis, plan)
    rows = decomposition.by_name()
    chosen = [entry for entry in plan.layers if entry.decompose]
    assert chosen
    for entry in chosen:
        assert rows[entry.name].rel_error <= 0.6
        smaller = [entry.ranks[0] - 1]
        if smaller[0] >= 1:  # one rank less breaks the bound: the rank is the smallest
            lower = plan.model_copy(deep=True)
            for layer in lower.layers:
                if layer.name == entry.name:
                    layer.ranks = smaller
            _, again = decompose(gm, analysis, lower)
            assert again.by_name()[entry.name].rel_error > 0.6
    whole = [r for r in report["layers"] if r["ranks"] is None]
    assert all(
        "kept whole" in e.reason for e in plan.layers if e.name in {r["layer"] for r in whole}
    )


def test_data_driven_selectors_need_calibration_and_pars_a_budget(traced):
    gm, analysis = traced
    for select in ("eps-search", "pars"):
        policy = RankPolicy(select=select, macs_reduction=2)
        with pytest.raises(ConfigError, match=f"--select {select} needs calibration data") as info:
            resolve(gm, analysis, policy, "net")
        assert "--train-data" in str(info.value) and "\n" not in str(info.value)
    calibration = Calibration(
        torch.randn(4, 3, 12, 12), torch.zeros(4, dtype=torch.int64), torch.randn(4, 3, 12, 12)
    )
    with pytest.raises(ConfigError, match="pars searches under a budget"):
        resolve(gm, analysis, RankPolicy(select="pars"), "net", calibration)
    with pytest.raises(ConfigError, match="drop --rank"):
        resolve(gm, analysis, RankPolicy(select="energy", rank=4), "net")
    with pytest.raises(ConfigError, match="vbmf reads the layers. weights; pass PlanningContext"):
        plan_of(analysis, RankPolicy(select="vbmf", macs_reduction=2))


def test_real_resnet56_selectors_fit_three_times_fewer_macs_within_two_percent(data_dir):
    from rankfold.models import load_model

    model, spec = load_model("resnet56", data_dir / "weights/resnet56-4bfd9763.th")
    gm = trace(model, torch.zeros(1, *spec.input_shape))
    analysis = analyze(gm)
    goal = analysis.total_macs / 3
    for select in ("uniform", "energy", "vbmf"):
        policy = RankPolicy(method="tucker2", select=select, macs_reduction=3)
        plan, report = resolve(gm, analysis, policy, "resnet56")
        macs = plan_cost(analysis, plan).macs
        assert 0.98 * goal <= macs <= goal, select
    assert len({tuple(e.ranks or ()) for e in plan.layers}) > 10  # vbmf ranks differ per layer


@pytest.mark.parametrize("method", ["tucker2", "cp-epc"])
def test_error_selector_searches_layers_side_by_side_as_one_would_in_turn(
    traced, tmp_path, monkeypatch, method
):
    """The same plan, bound and fits whether the layers' searches run side by side (threads;
    cp-epc's fits in worker processes) or one after another."""
    import rankfold.passes.selectors.error as error_module
    import rankfold.passes.surgery as surgery_module

    gm, analysis = traced
    policy = RankPolicy(
        method=method, select="error", macs_reduction=2, min_macs_share=0, round_to=None
    )
    spawned = []
    real_pool = surgery_module.worker_processes

    def counted(workers, gil_bound_fills, started=None):
        spawned.append(workers >= 2 and gil_bound_fills >= 2 * workers)
        return real_pool(workers, gil_bound_fills, started)

    monkeypatch.setattr(surgery_module, "worker_processes", counted)
    monkeypatch.setattr(error_module, "pool_shape", lambda jobs: (2, 1))
    side_by_side = resolve(
        gm, analysis, policy, "net", search=SearchConfig(cache_dir=tmp_path / "a")
    )
    monkeypatch.setattr(error_module, "pool_shape", lambda jobs: (1, 1))
    in_turn = resolve(gm, analysis, policy, "net", search=SearchConfig(cache_dir=tmp_path / "b"))
    assert spawned == [method == "cp-epc", False]  # processes only for the GIL-bound method
    assert [e.ranks for e in side_by_side[0].layers] == [e.ranks for e in in_turn[0].layers]
    assert side_by_side[1]["bound"] == in_turn[1]["bound"]
    assert side_by_side[1]["decompositions"] == in_turn[1]["decompositions"] > 0
    assert side_by_side[1]["layers"] == in_turn[1]["layers"]
