"""Tracing, analysis, plan resolution (precedence, budgets, refusals) and graph surgery."""

from __future__ import annotations

import pytest
import torch
from planning_helpers import plan_of
from torch import nn

from rankfold.passes import (
    Plan,
    RankPolicy,
    analyze,
    decompose,
    plan_cost,
    restructure,
    trace,
)
from rankfold.passes.core import ConfigError, PlanError, TraceError
from rankfold.passes.plan import LayerOverride


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 48, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(48, 48, 3, padding=1, groups=4),
            nn.Conv2d(48, 48, 3, padding=1, groups=48),
            nn.Conv2d(48, 64, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.block = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.Conv2d(64, 64, 1))
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = self.block(self.features(x))
        return self.head(x.mean((2, 3)))


@pytest.fixture(scope="module")
def traced():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 16, 16)
    gm = trace(model, x)
    return model, x, gm, analyze(gm)


def test_trace_lints_and_records_shapes(traced):
    model, x, gm, analysis = traced
    gm.graph.lint()
    assert torch.equal(gm(x), model(x))
    names = [layer.name for layer in analysis.layers]
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert names == convs
    stride2 = analysis.layer("features.6")
    assert stride2.in_shape == (48, 16, 16) and stride2.out_shape == (64, 8, 8)
    assert stride2.macs == 64 * 8 * 8 * 48 * 9
    assert analysis.total_macs == sum(layer.macs for layer in analysis.layers)


def test_untraceable_model_names_the_module_and_leaf_fixes_it():
    class Branchy(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.gate = Branchy()

        def forward(self, x):
            return self.gate(self.conv(x))

    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(TraceError, match=r"module 'gate' \(Branchy\).*--leaf gate"):
        trace(Outer(), x)
    gm = trace(Outer(), x, leaf_modules=["gate"])
    assert [layer.name for layer in analyze(gm).layers] == ["conv"]


def test_wrong_input_shape_is_one_line_trace_error(traced):
    model = traced[0]
    with pytest.raises(TraceError, match="input of shape \\(1, 1, 16, 16\\)") as info:
        trace(model, torch.randn(1, 1, 16, 16))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp"])
@pytest.mark.parametrize("metric,target", [("macs", 2.0), ("macs", 3.0), ("params", 2.5)])
def test_uniform_budget_met_within_five_percent(traced, method, metric, target):
    _, _, _, analysis = traced
    policy = RankPolicy(method=method, **{f"{metric}_reduction": target}, min_macs_share=0)
    plan = plan_of(analysis, policy)
    cost = plan_cost(analysis, plan)
    total = analysis.total_macs if metric == "macs" else analysis.total_params
    achieved = total / getattr(cost, metric)
    assert abs(achieved / target - 1) <= 0.05
    reasons = {entry.name: entry.reason for entry in plan.layers}
    assert "ranks per group: 4 groups of 12→12" in reasons["features.4"]
    assert "depthwise conv (groups=48)" in reasons["features.5"]
    assert plan.target == {f"{metric}_reduction": target}


def test_matrices_fall_back_to_svd_with_a_note(traced):
    plan = plan_of(traced[3], RankPolicy(method="cp", rank=0.3))
    by_name = {entry.name: entry for entry in plan.layers}
    assert by_name["head"].method == "svd" and "of a matrix is its SVD" in by_name["head"].reason
    assert by_name["block.1"].method == "svd" and "1×1 kernel" in by_name["block.1"].reason
    assert by_name["block.0"].method == "cp"


def test_precedence_global_type_glob_exact(traced):
    policy = RankPolicy(
        method="tucker2",
        rank=0.5,
        layers={
            "Conv2d": LayerOverride(rank=0.25),
            "features.*": LayerOverride(method="cp"),
            "features.2": LayerOverride(rank=8),
            "block": LayerOverride(skip=True),
        },
        skip=["Linear"],
    )
    by_name = {e.name: e for e in plan_of(traced[3], policy).layers}
    assert by_name["features.2"].method == "cp" and by_name["features.2"].ranks == [8]
    assert "layers['features.2']" in by_name["features.2"].reason
    assert by_name["features.6"].method == "cp" and "0.25" in by_name["features.6"].reason
    assert (
        not by_name["block.0"].decompose
        and "skipped by config (block)" in by_name["block.0"].reason
    )
    assert not by_name["head"].decompose


def test_cp_list_rank_is_refused_with_count(traced):
    policy = RankPolicy(method="cp", layers={"features.2": LayerOverride(rank=[8, 6])})
    with pytest.raises(PlanError, match="cp takes 1 rank"):
        plan_of(traced[3], policy)


def test_impossible_ranks_and_budgets_are_refused(traced):
    analysis = traced[3]
    with pytest.raises(
        PlanError, match=r"rank 500 for layer 'features.2' \(svd\) is impossible.*\[1, 48\]"
    ):
        plan_of(analysis, RankPolicy(method="svd", layers={"features.2": LayerOverride(rank=500)}))
    with pytest.raises(PlanError, match="larger than the original"):
        plan_of(analysis, RankPolicy(method="svd", layers={"features.2": LayerOverride(rank=47)}))
    with pytest.raises(PlanError, match="impossible"):
        plan_of(analysis, RankPolicy(method="tucker2", macs_reduction=500))
    with pytest.raises(ConfigError, match="unknown method 'tuker2'.*did you mean 'tucker2'"):
        plan_of(analysis, RankPolicy(method="tuker2", rank=4))
    with pytest.raises(ConfigError, match="no ranks"):
        plan_of(analysis, RankPolicy(method="cp"))


def test_decompose_keeps_input_and_restore_roundtrips(traced, tmp_path):
    model, x, gm, analysis = traced
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    plan = plan_of(analysis, RankPolicy(method="tucker2", macs_reduction=2.0, min_macs_share=0))
    new, report = decompose(gm, analysis, plan)
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())
    new.graph.lint()
    rows = report.by_name()
    assert rows["features.2"].status == "decomposed" and rows["features.5"].status == "skipped"
    assert rows["features.4"].status == "decomposed"  # grouped: ranks per group, grouped stages
    assert [stage.groups for stage in new.get_submodule("features.4")] == [4, 4, 4]
    assert rows["features.2"].macs < rows["features.2"].original_macs
    assert 0 <= rows["features.2"].rel_error < 1
    assert type(new.get_submodule("features.2")).__name__ == "FactorizedBlock"
    assert new.get_submodule("features.2").source == "features.2"

    plan.save(tmp_path / "plan.json")
    replayed = Plan.load(tmp_path / "plan.json")
    assert replayed == plan
    rebuilt = restructure(gm, analysis, replayed)
    rebuilt.load_state_dict(new.state_dict())
    assert torch.allclose(rebuilt(x), new(x), atol=1e-6)


def test_plan_for_another_model_is_refused(traced, tmp_path):
    _, _, gm, analysis = traced
    plan = plan_of(analysis, RankPolicy(method="cp", rank=4))
    assert plan.fingerprint == analysis.fingerprint() and plan.version == 2
    renamed = plan.model_copy(deep=True)
    renamed.layers[1].name = "features.99"
    with pytest.raises(PlanError, match=r"lacks layers \['features.2'\].*features.99"):
        decompose(gm, analysis, renamed)
    wider = trace(Net().eval(), torch.zeros(1, 3, 24, 24))  # other shapes: another plan
    with pytest.raises(PlanError, match="made for another architecture"):
        decompose(wider, analyze(wider), plan)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"ranks": [0]}, r"rank 0 for layer 'features.0' \(cp\) is impossible; choose a value"),
        ({"ranks": [100000]}, r"rank 100000 for layer 'features.0' \(cp\) is impossible"),
        ({"method": "tucker2"}, r"tucker2 takes 2 rank\(s\) .* was given \[4\]; give 2"),
        ({"method": "svdd"}, r"unknown method 'svdd' \(did you mean 'svd'\?\)"),
        ({"method": None}, r"plan entry 'features.0' has ranks \[4\] but no method: to keep"),
    ],
)
def test_a_hand_edited_plan_is_refused_before_surgery(traced, edit, message):
    _, _, gm, analysis = traced
    plan = plan_of(analysis, RankPolicy(method="cp", rank=4))
    entry = plan.layers[0]
    for key, value in edit.items():
        setattr(entry, key, value)
    with pytest.raises((PlanError, ConfigError), match=message) as info:
        decompose(gm, analysis, plan)
    assert "\n" not in str(info.value)


def test_conflicting_or_unmatched_rank_settings_are_errors(traced):
    analysis = traced[3]
    with pytest.raises(ConfigError, match="give --rank or --macs-reduction, not both"):
        plan_of(analysis, RankPolicy(rank=8, macs_reduction=2))
    with pytest.raises(ConfigError, match=r"--layer-rank 'featurs.0' matches no layer \(closest: "):
        plan_of(analysis, RankPolicy(rank=8, layers={"featurs.0": {"rank": 4}}))
    with pytest.raises(ConfigError, match="--skip 'Conv1d' matches no layer"):
        plan_of(analysis, RankPolicy(macs_reduction=2, skip=["Conv1d"]))
    empty = analyze(trace(nn.Sequential(nn.ReLU()).eval(), torch.zeros(1, 3, 4, 4)))
    with pytest.raises(PlanError, match="no Conv2d or Linear layer"):
        plan_of(empty, RankPolicy(rank=0.5))


def test_a_plan_file_that_is_not_a_plan_is_refused(tmp_path):
    (tmp_path / "bad.json").write_text('{"version": 1, "model": "x", "method": "cp", "layerz": []}')
    with pytest.raises(ConfigError, match="not a valid rankfold plan"):
        Plan.load(tmp_path / "bad.json")
