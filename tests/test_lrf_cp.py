"""LRF-CPD (CP with low-rank factor matrices): recovery, error bound, closed form, validation."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rankfold.passes.factorizations.lrf_cp import (
    LRFCPFactors,
    _solve_mode,
    lrf_cp,
    lrf_cp_auto,
)

# Planted models that satisfy Kruskal's uniqueness condition Σ min(L_n, R) ≥ 2R + 2 with margin
# (ALS crawls on borderline ones, as plain CP-ALS does), and whose L_n save parameters.
PLANTED = [
    ((40, 36, 10), 6, (4, 5, None)),
    ((24, 22, 10, 6), 5, (3, 4, None, None)),
]


def planted(
    shape: tuple[int, ...], rank: int, ranks: tuple[int | None, ...], seed: int
) -> LRFCPFactors:
    rng = np.random.default_rng(seed)
    left, right = [], []
    for size, lr in zip(shape, ranks):
        if lr is None:
            left.append(rng.standard_normal((size, rank)))
            right.append(None)
        else:
            left.append(rng.standard_normal((size, lr)))
            right.append(rng.standard_normal((rank, lr)))
    return LRFCPFactors(rng.uniform(0.5, 2.0, rank), tuple(left), tuple(right))


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("shape", "rank", "ranks"), PLANTED)
def test_planted_fixed_ranks_recovered(
    shape: tuple[int, ...], rank: int, ranks: tuple[int | None, ...], seed: int
) -> None:
    x = planted(shape, rank, ranks, seed).reconstruct()
    result = lrf_cp(x, rank, ranks)
    assert result.factors.factor_ranks == ranks
    assert result.factors.shape == shape
    assert result.rel_error < 1e-4
    assert rel(result.factors.reconstruct(), x) < 1e-4
    for u, v in zip(result.factors.left, result.factors.right):
        if v is not None:  # documented invariant: U_n has orthonormal columns
            np.testing.assert_allclose(u.T @ u, np.eye(u.shape[1]), atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("shape", "rank", "ranks"), PLANTED)
def test_planted_auto_finds_the_ranks(
    shape: tuple[int, ...], rank: int, ranks: tuple[int | None, ...], seed: int
) -> None:
    x = planted(shape, rank, ranks, seed).reconstruct()
    modes = [n for n, lr in enumerate(ranks) if lr is not None]
    result = lrf_cp_auto(x, rank, 1e-5, constrained_modes=modes)
    assert result.factors.factor_ranks == ranks
    assert result.rank_history[-1] == ranks
    assert result.rel_error <= 1e-5
    assert result.factors.rel_error(x) <= 1e-5


def test_planted_from_cp_init() -> None:
    shape, rank, ranks = PLANTED[0]
    x = planted(shape, rank, ranks, 3).reconstruct()
    result = lrf_cp(x, rank, ranks, init="cp")
    assert result.rel_error < 1e-4


def noisy(seed: int, noise: float = 0.1) -> np.ndarray:
    x = planted((12, 10, 9), 5, (3, 4, None), seed).reconstruct()
    e = np.random.default_rng(seed + 100).standard_normal(x.shape)
    return x / np.linalg.norm(x) + noise * e / np.linalg.norm(e)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.floats(0.15, 0.9))
def test_auto_never_ends_above_the_bound(seed: int, eps: float) -> None:
    x = noisy(seed)
    result = lrf_cp_auto(x, 5, eps, max_sweeps=200, seed=seed)
    assert result.rel_error <= eps
    assert result.factors.rel_error(x) <= eps
    # Ranks never grow: infeasible updates keep them, feasible ones take the smallest fitting L.
    history = np.array(result.rank_history, dtype=float)
    assert np.all(np.diff(history, axis=0) <= 0)


def test_auto_looser_bound_buys_smaller_ranks() -> None:
    x = noisy(0)
    tight = lrf_cp_auto(x, 5, 0.12)
    loose = lrf_cp_auto(x, 5, 0.6)
    assert sum(loose.rank_history[-1]) < sum(tight.rank_history[-1])
    assert loose.factors.n_params < tight.factors.n_params
    assert 0.12 >= tight.rel_error and 0.6 >= loose.rel_error > 0.12


def test_auto_refuses_an_unreachable_bound() -> None:
    x = np.random.default_rng(0).standard_normal((6, 5, 4))
    with pytest.raises(ValueError, match=r"CP rank 1 reaches relative error .* raise the rank"):
        lrf_cp_auto(x, 1, 0.05)


def test_als_is_monotone_and_the_closed_form_error_is_exact() -> None:
    x = noisy(1, noise=0.3)
    result = lrf_cp(x, 8, (2, 3, 2), max_sweeps=300)
    errors = np.array(result.errors)
    assert np.all(np.diff(errors) <= 1e-12)
    assert result.n_sweeps == len(result.errors) == len(result.rank_history)
    assert errors[-1] == pytest.approx(result.rel_error, abs=1e-7)
    assert result.rel_error == pytest.approx(result.factors.rel_error(x), rel=1e-9)


@pytest.mark.parametrize("kr_rank", [7, 3])  # 3 < R: Γ = WᵀW singular, pseudo-inverse path
def test_mode_update_is_the_best_rank_l_regression(kr_rank: int) -> None:
    rng = np.random.default_rng(kr_rank)
    rank, lr = 6, 2
    w = rng.standard_normal((30, kr_rank)) @ rng.standard_normal((kr_rank, rank))
    xn = rng.standard_normal((9, 30))
    norm_sq = float(np.sum(xn**2))
    u, v, err_sq, used = _solve_mode(xn @ w, w.T @ w, norm_sq, lr, None)
    a = u @ v.T
    assert used == lr and np.linalg.matrix_rank(a) <= lr
    assert err_sq == pytest.approx(float(np.sum((xn - a @ w.T) ** 2)), rel=1e-9)
    # It beats the truncated unconstrained solution and any nearby rank-L competitor.
    a_ls = np.linalg.lstsq(w, xn.T, rcond=None)[0].T
    p, s, qt = np.linalg.svd(a_ls)
    truncated = (p[:, :lr] * s[:lr]) @ qt[:lr]
    assert err_sq <= float(np.sum((xn - truncated @ w.T) ** 2)) + 1e-9
    for _ in range(20):
        du, dv = 1e-3 * rng.standard_normal(u.shape), 1e-3 * rng.standard_normal(v.shape)
        nearby = (u + du) @ (v + dv).T
        assert err_sq <= float(np.sum((xn - nearby @ w.T) ** 2)) + 1e-12


def test_unconstrained_mode_update_is_least_squares() -> None:
    rng = np.random.default_rng(5)
    w, xn = rng.standard_normal((40, 6)), rng.standard_normal((7, 40))
    a, v, err_sq, used = _solve_mode(xn @ w, w.T @ w, float(np.sum(xn**2)), None, None)
    assert v is None and used is None
    np.testing.assert_allclose(a, np.linalg.lstsq(w, xn.T, rcond=None)[0].T, atol=1e-10)
    assert err_sq == pytest.approx(float(np.sum((xn - a @ w.T) ** 2)), rel=1e-9)


def test_long_mode_is_compressed_losslessly() -> None:
    # 60 > 5·4: fitted in a 20-dim QR basis, returned at full size with the same error.
    x = planted((5, 4, 60), 6, (None, None, 3), 0).reconstruct()
    x += (
        0.05
        * np.linalg.norm(x)
        / np.sqrt(x.size)
        * np.random.default_rng(1).standard_normal(x.shape)
    )
    result = lrf_cp(x, 6, (None, None, 3))
    assert result.factors.shape == (5, 4, 60)
    assert result.rel_error == pytest.approx(result.factors.rel_error(x), rel=1e-9)
    u = result.factors.left[2]
    np.testing.assert_allclose(u.T @ u, np.eye(3), atol=1e-10)
    assert 0.0 < result.rel_error < 0.1
    # L_3 = 25 > 20 cannot live in the QR basis: fitted uncompressed, U_3 completed orthonormally.
    wide = lrf_cp(x, 30, (None, None, 25), max_sweeps=50)
    assert wide.factors.factor_ranks == (None, None, 25)
    u = wide.factors.left[2]
    np.testing.assert_allclose(u.T @ u, np.eye(25), atol=1e-10)
    assert wide.rel_error == pytest.approx(wide.factors.rel_error(x), rel=1e-9)
    # Automatic ranks start at min(I_3, R) = 30, capped at the compressed size 20.
    auto = lrf_cp_auto(x, 30, 0.1, max_sweeps=50)
    assert auto.factors.shape == (5, 4, 60)
    assert auto.rank_history[0][2] <= 20
    assert auto.factors.rel_error(x) <= 0.1


def test_n_params_counts_the_stored_arrays() -> None:
    f = planted((9, 8, 7), 5, (2, None, 3), 0)
    stored = sum(u.size for u in f.left) + sum(v.size for v in f.right if v is not None)
    assert f.n_params == stored == 2 * (9 + 5) + 8 * 5 + 3 * (7 + 5)
    plain = planted((9, 8, 7), 5, (None, None, None), 0)
    assert plain.n_params == 5 * (9 + 8 + 7)


def test_views_agree_with_the_explicit_sum_of_rank_one_terms() -> None:
    f = planted((6, 5, 4), 4, (2, None, 3), 0)
    a = [f.left[0] @ f.right[0].T, f.left[1], f.left[2] @ f.right[2].T]
    explicit = np.einsum("r,ir,jr,kr->ijk", f.weights, *a)
    np.testing.assert_allclose(f.reconstruct(), explicit, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(f.to_cp().reconstruct(), explicit, rtol=1e-12, atol=1e-12)
    for n in range(3):
        np.testing.assert_allclose(f.factor(n), a[n])
        absorbed = f.absorbed(n)
        np.testing.assert_array_equal(absorbed.weights, np.ones(4))
        np.testing.assert_allclose(absorbed.reconstruct(), explicit, rtol=1e-12, atol=1e-12)
    assert f.compact().factor_ranks == (2, None, None)  # 3·(4+4) ≥ 4·4: A_2 is cheaper unfactored
    np.testing.assert_allclose(f.compact().reconstruct(), explicit, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("rank", "ranks", "message"),
    [
        (0, (1, 1, 1), r"CP rank must be an int ≥ 1, got 0"),
        (4, (5, 1, 1), r"L_0=5 \(mode 0, size 6\) must lie in \[1, 4\]"),
        (8, (1, 6, 1), r"L_1=6 \(mode 1, size 5\) must lie in \[1, 5\]"),
        (4, (1, 0, None), r"L_1=0 .* must lie in \[1, 4\]"),
        (4, (1, 1), r"factor_ranks has 2 entries for a 3-way tensor"),
    ],
)
def test_invalid_ranks_are_refused(rank: int, ranks: tuple, message: str) -> None:
    x = np.random.default_rng(0).standard_normal((6, 5, 4))
    with pytest.raises(ValueError, match=message):
        lrf_cp(x, rank, ranks)


def test_invalid_auto_arguments_are_refused() -> None:
    x = np.random.default_rng(0).standard_normal((6, 5, 4))
    with pytest.raises(ValueError, match=r"bound must lie in \(0, 1\), got 0"):
        lrf_cp_auto(x, 3, 0.0)
    with pytest.raises(ValueError, match=r"constrained mode 3 must be an int in \[0, 2\]"):
        lrf_cp_auto(x, 3, 0.5, constrained_modes=(0, 3))
    with pytest.raises(ValueError, match=r"CP rank must be an int ≥ 1"):
        lrf_cp_auto(x, 0, 0.5)
    with pytest.raises(ValueError, match=r"init must be one of hosvd, cp"):
        lrf_cp(x, 3, (1, 1, 1), init="random")
    bad = x.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf"):
        lrf_cp(bad, 3, (1, 1, 1))


def test_mnist_mode_rank_constraint_reaches_the_svd_bound(data_dir: Path) -> None:
    # A rank-L image factor cannot beat the rank-L SVD of the images; with R ≫ L it should match it.
    raw = gzip.open(data_dir / "mnist" / "t10k-images-idx3-ubyte.gz").read()
    images = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 28, 28)[:500]
    x = np.transpose(images, (1, 2, 0)).astype(np.float64) / 255.0
    s = np.linalg.svd(x.reshape(784, -1), compute_uv=False)
    bound = float(np.sqrt(np.sum(s[4:] ** 2) / np.sum(s**2)))
    result = lrf_cp(x, 24, (None, None, 4), max_sweeps=60)
    assert bound - 1e-9 <= result.rel_error <= bound * 1.01
