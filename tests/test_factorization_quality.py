"""The hand-written Tucker-2 and CP-ALS against tensorly's reference implementations on real
ResNet-20 kernels at the same ranks: the speed-up must not cost accuracy."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tensorly as tl
import torch
from tensorly.decomposition import parafac, partial_tucker

from rankfold.models import load_model
from rankfold.passes.factorizations import CPFactors, cp_als, tucker2
from rankfold.passes.factorizations.cp import _solve_spd
from rankfold.passes.methods import cp_tensor

# New error ≤ reference error × (1 + this): HOOI stops on a 1e-6 change of the fit.
TOLERANCE = 1e-4
LAYERS = ["conv1", "layer1.1.conv2", "layer2.0.conv1", "layer2.2.conv2", "layer3.0.conv2"]


@pytest.fixture(scope="module")
def kernels(data_dir) -> dict[str, np.ndarray]:
    model, _ = load_model("resnet20", data_dir / "weights/resnet20-12fca82f.th")
    modules = dict(model.named_modules())
    return {name: modules[name].weight.detach().double().numpy() for name in LAYERS}


def tensorly_tucker2_error(kernel: np.ndarray, ranks: tuple[int, int]) -> float:
    """Relative error of tensorly's HOOI (`partial_tucker`, 100 iterations, tol 1e-8)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (core, (u_out, u_in)), _ = partial_tucker(
            tl.tensor(kernel), rank=list(ranks), modes=[0, 1], init="svd", n_iter_max=100,
            tol=1e-8,
        )  # fmt: skip
    reference = np.einsum("abhw,ta,sb->tshw", core, u_out, u_in)
    return float(np.linalg.norm(kernel - reference) / np.linalg.norm(kernel))


def assert_orthonormal(factors) -> None:
    for u in (factors.out_factor, factors.in_factor):
        np.testing.assert_allclose(u.T @ u, np.eye(u.shape[1]), atol=1e-10)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_tucker2_is_as_accurate_as_tensorly_hooi(kernels, name: str, ratio: float) -> None:
    kernel = kernels[name]
    t, s = kernel.shape[:2]
    ranks = max(1, round(ratio * t)), max(1, round(ratio * s))
    reference_error = tensorly_tucker2_error(kernel, ranks)
    factors = tucker2(kernel, *ranks)
    assert factors.rel_error(kernel) <= reference_error * (1.0 + TOLERANCE)
    assert_orthonormal(factors)


@pytest.mark.parametrize("ranks", [(24, 24), (40, 16), (8, 30)])
def test_pointwise_tucker2_meets_the_eckart_young_bound(ranks: tuple[int, int]) -> None:
    # A 1×1 kernel is a matrix: nothing can beat its rank-min(ranks) truncated SVD, and
    # tensorly's HOOI may only come close to it.
    generator = np.random.default_rng(0)
    # A decaying spectrum with small gaps, like a trained 1×1 layer's.
    left, _ = np.linalg.qr(generator.standard_normal((96, 64)))
    right, _ = np.linalg.qr(generator.standard_normal((64, 64)))
    sigma = 1.0 / np.sqrt(np.arange(1, 65))
    kernel = ((left * sigma) @ right.T)[:, :, None, None]
    factors = tucker2(kernel, *ranks)
    bound = np.sqrt(np.sum(sigma[min(ranks) :] ** 2) / np.sum(sigma**2))
    assert factors.rel_error(kernel) == pytest.approx(bound, rel=1e-10)
    assert factors.core.shape == (*ranks, 1, 1)
    reference_error = tensorly_tucker2_error(kernel, ranks)
    assert factors.rel_error(kernel) <= reference_error * (1.0 + 1e-12)
    assert_orthonormal(factors)


@pytest.mark.parametrize("name", LAYERS[1:])
@pytest.mark.parametrize("linesearch", [False, True])
def test_cp_als_is_as_accurate_as_tensorly_parafac(kernels, name: str, linesearch: bool) -> None:
    tensor = cp_tensor(kernels[name])
    s, t, k = tensor.shape
    rank = max(1, int(s * t * k / (s + t + k) / 3))  # the cp method's rank at 3×
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weights, factors = parafac(
            tl.tensor(tensor), rank, init="svd", n_iter_max=100, tol=1e-6,
            linesearch=linesearch, random_state=0, normalize_factors=True,
        )  # fmt: skip
    reference = CPFactors(np.asarray(weights), tuple(np.asarray(f) for f in factors))
    torch.manual_seed(0)
    new = cp_als(tensor, rank, seed=0, n_iter_max=100, tol=1e-6, linesearch=linesearch)
    assert new.rel_error(tensor) <= reference.rel_error(tensor) * (1.0 + TOLERANCE)


def test_tucker2_beats_tensorly_hooi_where_the_spectrum_is_flat() -> None:
    # An untrained layer's kernel (i.i.d. entries, like a Kaiming init): plain HOOI is still
    # gaining after 100 iterations (100 plain sweeps end within 1e-9 of it); the extrapolated
    # sweeps get further (7e-5 lower here), and the factors must match the core they come with.
    kernel = np.random.default_rng(3).standard_normal((96, 80, 3, 3)) / np.sqrt(80 * 9)
    ranks = (40, 36)
    reference_error = tensorly_tucker2_error(kernel, ranks)
    factors = tucker2(kernel, *ranks)
    assert factors.rel_error(kernel) <= reference_error - 3e-5
    assert_orthonormal(factors)
    projected = np.einsum("tshw,ta,sb->abhw", kernel, factors.out_factor, factors.in_factor)
    np.testing.assert_allclose(factors.core, projected, atol=1e-12)


def test_cp_normal_equations_fall_back_to_lu_when_cholesky_fails() -> None:
    generator = torch.Generator().manual_seed(0)
    rhs = torch.randn(6, 4, dtype=torch.float64, generator=generator)
    spd = torch.randn(6, 6, dtype=torch.float64, generator=generator)
    spd = spd @ spd.T + torch.eye(6, dtype=torch.float64)
    indefinite = spd - 3.0 * torch.linalg.eigvalsh(spd)[2] * torch.eye(6, dtype=torch.float64)
    for matrix in (spd, indefinite):
        expected = torch.linalg.solve(matrix, rhs)
        torch.testing.assert_close(_solve_spd(matrix, rhs), expected, rtol=1e-9, atol=1e-12)
