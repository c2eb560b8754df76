"""`--select output`: ranks allocated by the layers' output error on their input statistics."""

from __future__ import annotations

import itertools
from functools import partial

import numpy as np
import pytest
import torch
from planning_helpers import compress_digits
from torch import nn

from rankfold.converter import CompressConfig
from rankfold.passes import PlanningContext, analyze, select_ranks, trace
from rankfold.passes.core import ConfigError
from rankfold.passes.plan import RankPolicy
from rankfold.passes.statistics import InputMoment, LayerStatistics

WIDTH, PLANTED, SAMPLES = 48, 4, 4096
DAMPING = 1e-6


class TwoLayers(nn.Module):
    """Two parallel Linear layers with their own inputs, so their statistics can differ."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(WIDTH, WIDTH, bias=False)
        self.b = nn.Linear(WIDTH, WIDTH, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x[:, 0]) + self.b(x[:, 1])


@pytest.fixture(scope="module")
def planted():
    """Layer a sees inputs in a 4-dimensional subspace (plus faint noise), b isotropic ones;
    both have i.i.d. Gaussian weights, so their weight spectra alike."""
    torch.manual_seed(0)
    model = TwoLayers().eval()
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((WIDTH, PLANTED)))[0]
    inputs = {
        "a": rng.standard_normal((SAMPLES, PLANTED)) @ basis.T
        + 1e-3 * rng.standard_normal((SAMPLES, WIDTH)),
        "b": rng.standard_normal((SAMPLES, WIDTH)),
    }
    moments = LayerStatistics(
        {k: InputMoment(x.T @ x / SAMPLES, SAMPLES) for k, x in inputs.items()}, SAMPLES, DAMPING
    )
    gm = trace(model, torch.zeros(2, 2, WIDTH))
    return gm, analyze(gm), moments, inputs


def _plan(planted, select: str, reduction: float = 2.0):
    gm, analysis, moments, _ = planted
    policy = RankPolicy(
        method="svd", select=select, macs_reduction=reduction, min_macs_share=0, round_to=None
    )
    return select_ranks(analysis, policy, PlanningContext(gm=gm, moments=moments))


def _whitened_svd_error(weight: np.ndarray, moment: np.ndarray, rank: int) -> float:
    """The closed form: the truncated SVD of W·L (L Lᵀ the damped moment) is the minimiser of
    ‖(W − Ŵ)L‖; its normalised error."""
    damped = moment + DAMPING * np.trace(moment) / len(moment) * np.eye(len(moment))
    whitened = weight @ np.linalg.cholesky(damped)
    u, s, vt = np.linalg.svd(whitened)
    approx = (u[:, :rank] * s[:rank]) @ vt[:rank]
    return float(np.sum((whitened - approx) ** 2) / np.sum(whitened**2))


def _measured_output_error(weight: np.ndarray, x: np.ndarray, rank: int, moment) -> float:
    """E‖(W − Ŵ)x‖² / E‖Wx‖² on the samples, Ŵ the whitened SVD mapped back."""
    damped = moment + DAMPING * np.trace(moment) / len(moment) * np.eye(len(moment))
    factor = np.linalg.cholesky(damped)
    u, s, vt = np.linalg.svd(weight @ factor)
    approx = ((u[:, :rank] * s[:rank]) @ vt[:rank]) @ np.linalg.inv(factor)
    return float(np.sum((x @ (weight - approx).T) ** 2) / np.sum((x @ weight.T) ** 2))


def test_planted_inputs_move_the_ranks_and_cut_the_output_error(planted):
    gm, _, moments, inputs = planted
    output = _plan(planted, "output")
    ranks = {entry.name: entry.ranks[0] for entry in output.plan.layers}
    # Layer a's outputs live in 4 dimensions: rank 4 keeps them; b takes the rest of the budget.
    assert ranks["a"] == PLANTED and ranks["b"] > 2 * PLANTED
    weights = {name: gm.get_submodule(name).weight.detach().double().numpy() for name in "ab"}

    def summed(plan) -> float:
        return sum(
            _measured_output_error(weights[e.name], inputs[e.name], e.ranks[0], m.moment)
            for e in plan.layers
            for m in [moments.moments[e.name]]
        )

    chosen = summed(output.plan)
    for select in ("uniform", "energy"):
        other = _plan(planted, select)
        assert other.macs_reduction == pytest.approx(output.macs_reduction, rel=0.05)
        # Both spread the ranks evenly (alike weight spectra) and lose b's output to a's idle rank.
        assert summed(other.plan) > 1.5 * chosen, select
    # The predicted errors are the closed-form whitened-SVD errors, and what the samples show.
    for row in output.details["layers"]:
        name, rank = row["layer"], row["ranks"][0]
        exact = _whitened_svd_error(weights[name], moments.moments[name].moment, rank)
        assert row["predicted_output_error"] == pytest.approx(exact, rel=1e-9, abs=1e-12)
        measured = _measured_output_error(
            weights[name], inputs[name], rank, moments.moments[name].moment
        )
        # On the samples' own moment, not the damped one the fit and the prediction use.
        assert row["predicted_output_error"] == pytest.approx(measured, rel=0.1)


def test_allocation_is_the_best_pair_within_the_budget(planted):
    gm, analysis, moments, _ = planted
    output = _plan(planted, "output", reduction=3.0)
    weights = {name: gm.get_submodule(name).weight.detach().double().numpy() for name in "ab"}
    budget = sum(layer.macs for layer in analysis.layers) / 3.0
    per_rank = 2 * WIDTH  # an SVD block of rank r costs r·(in + out) MACs per sample
    best = min(
        sum(_whitened_svd_error(weights[n], moments.moments[n].moment, r) for n, r in zip("ab", p))
        for p in itertools.product(range(1, WIDTH // 2), repeat=2)
        if per_rank * sum(p) <= budget
    )
    assert output.details["summed_output_error"] == pytest.approx(best, rel=1e-9)
    assert output.macs_reduction >= 3.0


def test_missing_statistics_and_methods_without_spectra_are_one_line_errors(planted):
    gm, analysis, _, _ = planted
    policy = RankPolicy(method="svd", select="output", macs_reduction=2, min_macs_share=0)
    with pytest.raises(ConfigError, match="input statistics; pass --train-data"):
        select_ranks(analysis, policy, PlanningContext(gm=gm))
    convs = trace(nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 16, 3)), torch.zeros(1, 8, 9, 9))
    moments = LayerStatistics({n: InputMoment(np.eye(c), 1) for n, c in (("0", 8), ("1", 16))}, 1)
    policy = RankPolicy(method="cp", select="output", macs_reduction=2, min_macs_share=0)
    with pytest.raises(ConfigError, match="fits svd and tucker2 but not cp"):
        select_ranks(analyze(convs), policy, PlanningContext(gm=convs, moments=moments))
    with pytest.raises(ConfigError, match="--select output weighs .* pass --train-data"):
        CompressConfig(model="resnet20", ranks={"select": "output", "macs_reduction": 2})


def test_compress_plans_on_statistics_and_keeps_the_fits_as_configured(tmp_path):
    from rankfold.models.digits import digits_splits

    _, test = digits_splits()
    np.savez(tmp_path / "digits.npz", x=test.x[:128], y=test.y[:128])
    settings = {
        "model": "digits-cnn",
        "ranks": {"method": "svd", "macs_reduction": 2, "select": "output"},
        "train_data": str(tmp_path / "digits.npz"),
        "recalibrate": False,
        "refit": False,
        "latency": {"enabled": False},
        "search": {"cache_dir": str(tmp_path / "cache")},
    }

    run = partial(compress_digits, settings)

    planned = run()  # statistics for the plan, weight-only fits
    details = planned.selection.model_dump()
    assert planned.statistics is None
    assert all(row.output_error is None for row in planned.decomposition.layers)
    assert planned.selection.macs_reduction >= 2.0
    aware = run(statistics={"data_aware": True, "samples": 128})
    assert [e.ranks for e in aware.plan.layers] == [e.ranks for e in planned.plan.layers]
    predicted = {row["layer"]: row["predicted_output_error"] for row in details["layers"]}
    for row in aware.decomposition.layers:
        if row.status == "decomposed":
            # The prediction is the whitened SVD's error on the damped moment; the row's is on
            # the moment itself (and a square root).
            assert row.output_error**2 == pytest.approx(predicted[row.name], rel=0.25, abs=1e-4)
