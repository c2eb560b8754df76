"""EPC (stable CP), CP sensitivity and the hybrid Tucker-2 + CP: pure math on NumPy tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorly as tl
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import brentq, minimize
from tensorly.decomposition import parafac
from tensorly.tenalg import khatri_rao

from rankfold.passes.factorizations import epc as epc_module
from rankfold.passes.factorizations.cp import CPFactors, cp_als, cp_sensitivity
from rankfold.passes.factorizations.epc import (
    _linear_move,
    _solve_eta,
    _update_mode,
    cp_epc,
    epc,
    max_cp_rank,
    tucker2_cp,
)

BOUND = 1.0 + 1e-6  # allowed relative excess of the error over δ


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=0)


def _random_cp(shape: tuple[int, ...], weights: np.ndarray, seed: int) -> CPFactors:
    rng = np.random.default_rng(seed)
    factors = tuple(rng.standard_normal((size, len(weights))) for size in shape)
    return CPFactors(np.asarray(weights, dtype=np.float64), factors)


def _split(cp: CPFactors, scale_mode: int | None) -> list[np.ndarray]:
    """The factor matrices that carry the scale, as `cp_sensitivity` documents the split."""
    unit = cp.normalized()
    if scale_mode is not None:
        return list(unit.absorbed(scale_mode))
    share = np.abs(unit.weights) ** (1.0 / len(unit.factors))
    factors = [f * share for f in unit.factors]
    factors[0] = factors[0] * np.sign(unit.weights)
    return factors


def _monte_carlo_sensitivity(factors: list[np.ndarray], samples: int, seed: int) -> float:
    """Mean of ‖K(U + σE) − K(U)‖² / σ² over Gaussian E, with σ small enough for first order."""
    rng = np.random.default_rng(seed)
    sigma = 1e-6 * min(float(np.abs(f).max()) for f in factors)
    base = np.einsum("ir,jr,kr->ijk", *factors)
    noisy = [f + sigma * rng.standard_normal((samples, *f.shape)) for f in factors]
    change = np.einsum("bir,bjr,bkr->bijk", *noisy) - base
    return float(np.mean(np.sum(change**2, axis=(1, 2, 3)))) / sigma**2


UNBALANCED = CPFactors(
    np.array([1e-2, 0.7, 3.0, 80.0]),
    tuple(
        f * scale
        for f, scale in zip(_random_cp((6, 5, 4), np.ones(4), seed=3).factors, (1e3, 1.0, 1e-3))
    ),
)


@pytest.mark.parametrize("scale_mode", [None, 0, 1, 2])
@pytest.mark.parametrize(
    "cp",
    [_random_cp((6, 5, 4), np.array([1.0, 0.8, 1.3]), seed=1), UNBALANCED],
    ids=["random", "unbalanced"],
)
def test_sensitivity_matches_monte_carlo(cp: CPFactors, scale_mode: int | None) -> None:
    estimate = _monte_carlo_sensitivity(_split(cp, scale_mode), samples=8000, seed=7)
    assert cp_sensitivity(cp, scale_mode) == pytest.approx(estimate, rel=0.05)


def test_sensitivity_closed_forms_and_split_dependence() -> None:
    cp = UNBALANCED
    sizes = np.array(cp.shape)
    weights = cp.normalized().weights
    for n in range(3):
        expected = sizes[n] * cp.rank + (sizes.sum() - sizes[n]) * np.sum(weights**2)
        assert cp_sensitivity(cp, n) == pytest.approx(expected, rel=1e-12)
    balanced = sizes.sum() * np.sum(np.abs(weights) ** (4.0 / 3.0))
    assert cp_sensitivity(cp, None) == pytest.approx(balanced, rel=1e-12)
    # The split matters: with one large λ the one-mode split is far more sensitive.
    assert cp_sensitivity(cp) > 10.0 * cp_sensitivity(cp, None)


def _planted_degenerate(seed: int, shape: tuple[int, ...], n_normal: int) -> tuple[np.ndarray, int]:
    """Two nearly collinear rank-1 terms with weights ±300, `n_normal` ordinary ones, 1 % noise."""
    rng = np.random.default_rng(seed)
    first = [_unit(rng.standard_normal((size, 1))) for size in shape]
    second = [_unit(a + 0.03 * _unit(rng.standard_normal(a.shape))) for a in first]
    normal = [_unit(rng.standard_normal((size, n_normal))) for size in shape]
    factors = [np.hstack(group) for group in zip(first, second, normal)]
    weights = np.r_[300.0, -300.0, rng.uniform(1.0, 2.0, n_normal)]
    tensor = tl.cp_to_tensor((weights, factors))
    noise = rng.standard_normal(tensor.shape)
    tensor = tensor + 0.01 * np.linalg.norm(tensor) / math.sqrt(tensor.size) * noise
    return tensor, n_normal + 2


@pytest.mark.parametrize(("seed", "shape"), [(9, (9, 8, 3)), (4, (8, 7, 3))])
def test_epc_repairs_degenerate_als(seed: int, shape: tuple[int, ...]) -> None:
    tensor, rank = _planted_degenerate(seed, shape, n_normal=3)
    # Plain tensorly ALS from a random start (not cp_als, whose tuning may change) stalls in the
    # swamp of the planted pair with huge cancelling weights.
    weights, factors = parafac(
        tensor, rank, init="random", n_iter_max=500, tol=1e-8, random_state=0,
        normalize_factors=True,
    )  # fmt: skip
    als = CPFactors(np.asarray(weights), tuple(np.asarray(f) for f in factors))
    delta = float(np.linalg.norm(tensor - als.reconstruct()))
    als_sum = float(np.sum(als.normalized().weights ** 2))
    assert als_sum > 1e4  # degenerate: the normal components alone have Σλ² < 12

    result = epc(tensor, als)
    assert max(result.errors) <= delta * BOUND
    assert result.rel_error <= result.als_rel_error * BOUND
    assert result.sum_sq_weights[0] == pytest.approx(als_sum, rel=1e-12)
    assert result.sum_sq_weights[-1] * 5.0 <= als_sum
    assert result.sensitivity * 5.0 <= result.sensitivity_before
    assert result.sensitivity == pytest.approx(cp_sensitivity(result.cp, 1), rel=1e-12)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    shape=st.lists(st.integers(2, 6), min_size=3, max_size=4).map(tuple),
    rank_seed=st.integers(0, 1000),
    seed=st.integers(0, 1000),
)
def test_epc_invariants_on_random_tensors(
    shape: tuple[int, ...], rank_seed: int, seed: int
) -> None:
    tensor = np.random.default_rng(seed).standard_normal(shape)
    rank = 1 + rank_seed % min(max_cp_rank(shape), 6)
    result = cp_epc(tensor, rank, seed=seed, max_sweeps=60)

    delta = result.errors[0]
    assert delta == pytest.approx(np.linalg.norm(tensor - result.als.reconstruct()), rel=1e-12)
    sums = np.array(result.sum_sq_weights)
    errors = np.array(result.errors)
    assert np.all(np.isfinite(sums)) and np.all(np.isfinite(errors))
    assert np.all(errors <= delta * BOUND)
    assert np.all(np.diff(sums) <= 0.0)  # exactly: an update that would raise it is dropped
    assert len(sums) == len(errors) == result.n_sweeps + 1
    cp = result.cp
    assert all(np.all(np.isfinite(f)) for f in cp.factors)
    assert np.all(cp.weights >= 0)
    for f in cp.factors:
        np.testing.assert_allclose(np.linalg.norm(f, axis=0), 1.0, rtol=1e-12)
    assert result.rel_error == pytest.approx(errors[-1] / np.linalg.norm(tensor), rel=1e-9)
    assert math.isfinite(result.sensitivity)
    assert result.sensitivity <= result.sensitivity_before * (1.0 + 1e-12)


def test_a_sweep_the_exact_residual_rejects_is_redone_exactly(monkeypatch) -> None:
    """Within a sweep errors come from the Gram formula; the exact check at the sweep's end is
    what keeps the bound. A formula that understates every error by 5 % of ‖K‖² picks models
    beyond the bound: each sweep must be rejected and redone with exact errors, ending where
    the run with the true formula ends (to the shortfall the honest run's Cholesky-route
    updates may leave: up to `_ETA_SHORTFALL` of ‖U‖² per update, where the redone run, whose
    formula fails every Cholesky candidate, solves each update exactly by the
    eigendecomposition; over 40 sweeps that adds up to at most 100 times the shortfall)."""
    tensor, rank = _planted_degenerate(4, (8, 7, 3), n_normal=3)
    als = cp_als(tensor, rank, seed=0, n_iter_max=300, tol=1e-10)
    honest = epc(tensor, als, max_sweeps=40)

    init = epc_module._Residual.__init__

    def understated(self, k: np.ndarray) -> None:
        init(self, k)
        self.norm_sq *= 0.95

    monkeypatch.setattr(epc_module._Residual, "__init__", understated)
    redone = epc(tensor, als, max_sweeps=40)

    delta = honest.errors[0]
    assert max(redone.errors) <= delta * (1.0 + 1e-9)
    assert np.all(np.diff(redone.sum_sq_weights) <= 0.0)
    assert redone.sum_sq_weights[-1] <= 0.7 * redone.sum_sq_weights[0]
    assert max(honest.errors) <= delta * (1.0 + 1e-9)
    np.testing.assert_allclose(
        redone.sum_sq_weights, honest.sum_sq_weights, rtol=100 * epc_module._ETA_SHORTFALL
    )
    np.testing.assert_allclose(redone.errors, honest.errors, rtol=1e-6)


def test_larger_delta_buys_more_stability_and_smaller_never_raises_error() -> None:
    tensor = np.random.default_rng(0).standard_normal((6, 5, 4))
    base = cp_epc(tensor, 4, seed=0, max_sweeps=100)
    delta = base.errors[0]

    loose = epc(tensor, base.als, delta=1.2 * delta, max_sweeps=100)
    assert max(loose.errors) <= 1.2 * delta * BOUND
    assert loose.sum_sq_weights[-1] < base.sum_sq_weights[-1]

    # δ below the start's error: the bound is the current error, which must never grow.
    tight = epc(tensor, base.als, delta=0.5 * delta, max_sweeps=100)
    errors = np.array(tight.errors)
    assert np.all(np.diff(errors) <= 1e-9 * errors[0])
    assert tight.sum_sq_weights[-1] <= tight.sum_sq_weights[0]


def test_no_nan_from_zero_columns_or_a_bound_that_allows_zero() -> None:
    rng = np.random.default_rng(2)
    tensor = rng.standard_normal((5, 4, 3))
    start = _random_cp((5, 4, 3), np.array([1.0, 0.0, 2.0]), seed=2)
    start = CPFactors(start.weights, (start.factors[0] * [1.0, 0.0, 1.0], *start.factors[1:]))
    start_error = float(np.linalg.norm(tensor - start.reconstruct()))
    # δ ≥ ‖K‖ lets the zero model in: EPC must shrink every weight to ~0, not divide by it.
    loose = 2.0 * max(start_error, float(np.linalg.norm(tensor)))
    for delta in (None, loose):
        result = epc(tensor, start, delta=delta, max_sweeps=20)
        assert all(np.all(np.isfinite(f)) for f in result.cp.factors)
        assert np.all(np.isfinite(result.cp.weights))
        assert np.all(np.isfinite(result.errors)) and math.isfinite(result.sensitivity)
        for f in result.cp.factors:
            np.testing.assert_allclose(np.linalg.norm(f, axis=0), 1.0, rtol=1e-12)
        assert max(result.errors) <= (start_error if delta is None else delta) * BOUND
    assert result.sum_sq_weights[-1] < 1e-12 * result.sum_sq_weights[0]


def test_max_cp_rank() -> None:
    assert max_cp_rank((32, 32, 9)) == 288
    assert max_cp_rank((2, 3, 4)) == 6
    assert max_cp_rank((7, 3)) == 3


@pytest.mark.parametrize("rank", [0, 7])
def test_rank_out_of_range_is_refused(rank: int) -> None:
    tensor = np.ones((2, 3, 4))
    with pytest.raises(ValueError, match=r"\[1, 6\].*\(2, 3, 4\)"):
        cp_epc(tensor, rank)
    with pytest.raises(ValueError, match=rf"CP rank {rank} .*\[1, 6\]"):
        epc(tensor, _random_cp((2, 3, 4), np.ones(rank), seed=0))


def test_tucker2_cp_rank_bound_is_refused() -> None:
    kernel = np.random.default_rng(0).standard_normal((6, 5, 3, 3))
    with pytest.raises(ValueError, match=r"CP rank 50 .*\[1, 6\].*\(3, 2, 9\)"):
        tucker2_cp(kernel, rank_out=2, rank_in=3, rank_cp=50)


@pytest.mark.parametrize(("rank_out", "rank_in"), [(4, 3), (6, 5)], ids=["tucker", "full"])
def test_tucker2_cp_recovers_exact_structure(rank_out: int, rank_in: int) -> None:
    """A kernel built as Tucker-2 (ranks 4, 3) with a rank-3 CP core is reproduced exactly."""
    rng = np.random.default_rng(11)
    t, s, kh, kw, rank_cp = 6, 5, 3, 3, 3
    core_cp = _random_cp((3, 4, kh * kw), rng.uniform(1.0, 2.0, rank_cp), seed=12)
    core = core_cp.reconstruct().reshape(3, 4, kh, kw).transpose(1, 0, 2, 3)
    kernel = np.einsum(
        "abhw,ta,sb->tshw", core, rng.standard_normal((t, 4)), rng.standard_normal((s, 3))
    )

    hybrid = tucker2_cp(kernel, rank_out, rank_in, rank_cp, seed=0)
    assert hybrid.reconstruct().shape == kernel.shape
    assert hybrid.ranks == (rank_out, rank_in, rank_cp)
    assert hybrid.kernel_size == (kh, kw)
    # HOOI sweeps run in float32 (fit and core in float64): exact to float32's resolution.
    assert hybrid.rel_error(kernel) < 1e-5
    assert hybrid.core.rel_error < 1e-5
    assert hybrid.sensitivity == hybrid.core.sensitivity
    assert math.isfinite(hybrid.sensitivity)


def _mode_problem(
    rng: np.random.Generator, shape: tuple[int, int, int], rank: int, share: float
) -> tuple[tuple, np.ndarray, np.ndarray]:
    """A mode-0 update at the least-squares model of a random tensor, its bound `share` of the
    way from the least-squares error to the zero model's: (`_update_mode`'s arguments, the
    mode-0 unfolding, the Khatri–Rao product Z of the other modes)."""
    tensor = rng.standard_normal(shape)
    others = [_unit(rng.standard_normal((size, rank))) for size in shape[1:]]
    z = khatri_rao([np.ones((shape[0], rank)), *others], skip_matrix=0)
    unfolded = tl.unfold(tensor, 0)
    least_squares = np.linalg.lstsq(z, unfolded.T, rcond=None)[0].T
    err_ls = float(np.sum((unfolded - least_squares @ z.T) ** 2))
    norm_sq = float(np.sum(tensor**2))
    weights = np.linalg.norm(least_squares, axis=0)
    args = (
        unfolded @ z,
        np.prod([d.T @ d for d in others], axis=0),
        norm_sq,
        lambda u: float(np.sum((unfolded - u @ z.T) ** 2)),
        least_squares / weights,
        weights,
        err_ls,
        err_ls + share * (norm_sq - err_ls),
    )
    return args, unfolded, z


def test_mode_update_is_the_constrained_minimum_of_a_generic_solver() -> None:
    """One EPC mode update equals SLSQP on min ‖U‖² s.t. ‖K_(0) − U Zᵀ‖² ≤ τ² (a convex QCQP)."""
    # Start at the least-squares model and allow 30 % of the way to the zero model's error.
    args, unfolded, z = _mode_problem(np.random.default_rng(0), (5, 4, 3), 3, 0.3)
    least_squares, weights, tau_sq = args[4] * args[5], args[5], args[7]
    _, new_weights, err, _ = _update_mode(*args)
    assert err == pytest.approx(tau_sq, rel=1e-9)  # the bound is active at the optimum

    def residual(u: np.ndarray) -> float:
        return float(np.sum((unfolded - u.reshape(-1, 3) @ z.T) ** 2))

    def slack_gradient(u: np.ndarray) -> np.ndarray:
        return (2.0 * (unfolded - u.reshape(-1, 3) @ z.T) @ z).ravel()

    generic = minimize(
        lambda u: float(np.sum(u**2)),
        least_squares.ravel(),
        jac=lambda u: 2.0 * u,
        constraints=[
            {"type": "ineq", "fun": lambda u: tau_sq - residual(u), "jac": slack_gradient}
        ],
        method="SLSQP",
        options={"ftol": 1e-12, "maxiter": 1000},
    )
    assert generic.success and residual(generic.x) <= tau_sq * (1 + 1e-8)
    assert np.sum(new_weights**2) == pytest.approx(generic.fun, rel=1e-6)
    assert np.sum(new_weights**2) < 0.9 * np.sum(weights**2)


@pytest.mark.parametrize("seed", range(6))
def test_eta_from_a_hint_is_the_root_brent_finds(seed: int, monkeypatch) -> None:
    """Newton from the last sweep's η, near or far (or off the bracket), lands on the same root
    of the secular equation as Brent's method from scratch; from a near hint without Brent."""
    rng = np.random.default_rng(seed)
    gamma = np.exp(rng.uniform(-12, 2, 40))
    ratio = rng.uniform(0, 1, 40) ** 3
    target = float(rng.uniform(0.01, 0.99) * ratio.sum())
    scratch = _solve_eta(ratio, gamma, target, None)
    share = scratch / (gamma + scratch)
    assert ratio @ (share * share) == pytest.approx(target, rel=1e-10)
    for hint in (scratch * 1.03, scratch * 0.5, scratch * 1e6, scratch * 1e-9, 1e300):
        assert _solve_eta(ratio, gamma, target, hint) == pytest.approx(scratch, rel=1e-10)

    def no_brent(*args, **kwargs):
        raise AssertionError("Brent's method was called")

    monkeypatch.setattr(epc_module, "brentq", no_brent)
    assert _solve_eta(ratio, gamma, target, scratch * 1.03) == pytest.approx(scratch, rel=1e-10)


def _forbid_the_eigendecomposition(monkeypatch) -> None:
    def no_eigh(*args, **kwargs):
        raise AssertionError("the eigendecomposition was used")

    monkeypatch.setattr(epc_module.np.linalg, "eigh", no_eigh)


@pytest.mark.parametrize("seed", range(4))
def test_mode_update_from_a_hint_by_cholesky_equals_the_eigendecomposition(
    seed: int, monkeypatch
) -> None:
    """Within the bound and from a near hint, the update takes η from Cholesky factors alone
    (no eigendecomposition) and lands on the eigendecomposition route's model, short of the
    bound by at most the allowed shortfall (`_ETA_SHORTFALL` of ‖U‖²); from a far hint it still
    does."""
    # Rank 12 > 9: Γ is far from diagonal, as in CNN kernels at 3× MACs.
    args, _, _ = _mode_problem(np.random.default_rng(seed), (9, 7, 6), 12, 0.2)
    delta_sq = args[7]
    direction, new_weights, err, eta = _update_mode(*args)
    assert err == pytest.approx(delta_sq, rel=1e-9)
    sum_sq = float(np.sum(new_weights**2))
    shortfall = 1.01 * epc_module._ETA_SHORTFALL

    def assert_within_the_shortfall(update) -> None:
        update_direction, update_weights, update_err, update_eta = update
        update_sum_sq = float(np.sum(update_weights**2))
        assert update_eta <= eta * (1.0 + 1e-8)
        assert sum_sq * (1.0 - 1e-9) <= update_sum_sq <= sum_sq * (1.0 + shortfall)
        # Stopping short by Δe leaves Δe/η on ‖U‖².
        assert delta_sq - shortfall * update_eta * update_sum_sq <= update_err
        assert update_err <= delta_sq * (1.0 + 1e-10)
        # The model moves with ‖U‖²: by about the shortfall, relative.
        np.testing.assert_allclose(update_weights, new_weights, rtol=10 * shortfall)
        np.testing.assert_allclose(
            update_direction * update_weights, direction * new_weights, atol=10 * shortfall
        )

    assert_within_the_shortfall(_update_mode(*args, eta * 1e4))

    _forbid_the_eigendecomposition(monkeypatch)
    assert_within_the_shortfall(_update_mode(*args, eta * 1.05))


@pytest.mark.parametrize("relative_move", [-0.04, -0.01, 0.01, 0.04])
def test_linear_move_hits_its_error_and_is_nearly_the_minimum_norm_model(
    relative_move: float,
) -> None:
    """U(η)ᵀ − ΔW has exactly the error `_linear_move` solved for (checked by the residual),
    and at that error its ‖U‖² exceeds the minimum, U(η') with e(η') equal, by far less than
    the Cholesky route's allowed shortfall; a move beyond the limit is refused."""
    args, unfolded, z = _mode_problem(np.random.default_rng(1), (9, 7, 6), 12, 0.2)
    g, gamma_matrix = args[0], args[1]
    gamma, q = np.linalg.eigh(gamma_matrix)
    f = g @ q

    def model(eta: float) -> np.ndarray:
        return (f / (gamma + eta)) @ q.T

    def error(u: np.ndarray) -> float:
        return float(np.sum((unfolded - u @ z.T) ** 2))

    eta = 0.3
    u = model(eta)
    w = np.linalg.solve(gamma_matrix + eta * np.eye(12), u.T)
    zz, ww = float(np.vdot(u.T, w)), float(np.vdot(w, w))
    # The error a move of `relative_move`·η along e(η) would add, to first order.
    miss = -2.0 * eta * zz * relative_move * eta
    delta = _linear_move(eta, zz, ww, miss, limit=0.05)
    assert delta == pytest.approx(relative_move * eta, rel=0.1)
    moved = u - delta * w.T
    assert error(moved) == pytest.approx(error(u) - miss, rel=1e-11)
    # The minimum-norm model with the moved candidate's error.
    target = error(moved)
    best = model(brentq(lambda e: error(model(e)) - target, eta * 0.8, eta * 1.25, xtol=1e-15))
    excess = float(np.sum(moved**2)) / float(np.sum(best**2)) - 1.0
    assert 0.0 <= excess + 1e-13 and excess <= 1e-3 * epc_module._ETA_SHORTFALL
    assert _linear_move(eta, zz, ww, miss, limit=0.5 * abs(relative_move)) is None


def test_mode_update_above_the_bound_even_at_least_squares_keeps_the_model(monkeypatch) -> None:
    """A bound below the least-squares error (a jump too long) leaves no feasible η: from a
    hint the Cholesky route finds it out without the eigendecomposition, keeps the model and
    the hint."""
    args, _, _ = _mode_problem(np.random.default_rng(0), (9, 7, 6), 12, 0.2)
    g, gamma, norm_sq, residual_sq, direction, weights, err_ls, _ = args
    # The bound 1 % below the least-squares error; the model said to be at it.
    delta_sq = 0.99 * err_ls

    _forbid_the_eigendecomposition(monkeypatch)
    kept = _update_mode(g, gamma, norm_sq, residual_sq, direction, weights, delta_sq, delta_sq, 0.3)
    assert kept[0] is direction and kept[1] is weights
    assert kept[2] == delta_sq and kept[3] == 0.3


def test_extrapolation_reaches_a_lower_sum_in_the_same_sweeps(monkeypatch) -> None:
    tensor = np.random.default_rng(0).standard_normal((12, 10, 9))
    als = cp_als(tensor, 12, seed=0, n_iter_max=100, tol=1e-6, linesearch=False)
    solved = []

    def counted(*args):
        solved.append(1)
        return _update_mode(*args)

    monkeypatch.setattr(epc_module, "_update_mode", counted)
    jumped = epc(tensor, als, max_sweeps=40, tol=0.0)
    # A kept jump replaces the sweep's plain update of the last mode: 3 mode solves per sweep,
    # one more when the jump fails (always 4 before).
    assert len(solved) < 3 + 39 * 4
    plain = epc(tensor, als, max_sweeps=40, tol=0.0, extrapolate=False)
    assert jumped.sum_sq_weights[0] == plain.sum_sq_weights[0]
    # Measured: 983 against 1440 from 5658.
    assert jumped.sum_sq_weights[-1] <= 0.8 * plain.sum_sq_weights[-1]
    assert max(jumped.errors) <= jumped.errors[0] * BOUND
    assert np.all(np.diff(jumped.sum_sq_weights) <= 0.0)


@pytest.mark.parametrize("shape", [(8, 7, 3), (6, 5, 4, 3), (9, 2)])
def test_mode_products_reuse_partials_and_match_the_khatri_rao_reference(shape) -> None:
    """The MTTKRP and Γ of a sweep's updates, with each mode's factor replaced after its
    update (as EPC does), equal tensorly's unfold @ Khatri–Rao and the Hadamard product of the
    other Grams. In a 3-way sweep the last mode's update reuses the partial the update before
    it computed (mode 1 contracts mode 0 first, and mode 0's factor has not changed since)."""
    rng = np.random.default_rng(len(shape))
    tensor = rng.standard_normal(shape)
    rank = 5
    factors = [rng.standard_normal((n, rank)) for n in shape]
    products = epc_module._ModeProducts(tensor)
    for _ in range(2):
        for mode in range(len(shape)):
            partials_before = dict(products.partials)
            g = products.mttkrp(factors, mode)
            others = [f for m, f in enumerate(factors) if m != mode]
            np.testing.assert_allclose(
                g, tl.unfold(tensor, mode) @ khatri_rao(others), rtol=1e-12, atol=1e-12
            )
            gamma = np.prod([f.T @ f for f in others], axis=0)
            np.testing.assert_allclose(products.gamma(factors, mode), gamma, rtol=1e-12)
            if len(shape) == 3 and mode == 2:
                assert products.partials[0] is partials_before[0]
            factors[mode] = rng.standard_normal((shape[mode], rank))
