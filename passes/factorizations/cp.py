"""CP (CANDECOMP/PARAFAC) of a conv kernel reshaped to K = S×T×(kh·kw).

K ≈ Σ_r λ_r a_r ∘ b_r ∘ c_r is the layer chain 1×1 conv S→R (A), depthwise kh×kw conv on R
channels (C reshaped, original stride/padding/dilation), 1×1 conv R→T (B·diag λ, original bias).
Params: R·(S + kh·kw + T).  MACs: H_in·W_in·S·R + H_out·W_out·R·(kh·kw + T).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tensorly as tl
import torch

from rankfold.passes.factorizations.tucker import leading_left_vectors


@dataclass(frozen=True)
class CPFactors:
    """λ (R,) and factor matrices U_n (I_n×R); the tensor is Σ_r λ_r u_{1,r} ∘ … ∘ u_{N,r}."""

    weights: np.ndarray
    factors: tuple[np.ndarray, ...]

    @property
    def rank(self) -> int:
        return self.weights.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(f.shape[0] for f in self.factors)

    def reconstruct(self) -> np.ndarray:
        return tl.cp_to_tensor((self.weights, list(self.factors)))

    def rel_error(self, tensor: np.ndarray) -> float:
        return float(
            np.linalg.norm(tensor - self.reconstruct()) / max(np.linalg.norm(tensor), 1e-300)
        )

    def normalized(self) -> CPFactors:
        """Unit-norm columns, all scale moved into λ."""
        norms = [np.linalg.norm(f, axis=0) for f in self.factors]
        safe = [np.where(n > 0, n, 1.0) for n in norms]
        weights = self.weights * np.prod(norms, axis=0)
        return CPFactors(weights, tuple(f / n for f, n in zip(self.factors, safe)))

    def absorbed(self, mode: int) -> tuple[np.ndarray, ...]:
        """Factors with λ multiplied into `mode`'s factor, as the layer chain needs."""
        return tuple(f * self.weights if n == mode else f for n, f in enumerate(self.factors))


def _contract(tensor: torch.Tensor, factor: torch.Tensor, mode: int) -> torch.Tensor:
    """tensor ×_mode factorᵀ with the rank as a new last axis (the mode removed)."""
    return torch.tensordot(tensor, factor, dims=([mode], [0]))


def _finish(partial: torch.Tensor, factors: list[torch.Tensor], keep: int) -> torch.Tensor:
    """Sum a partial MTTKRP (modes but `keep` and the contracted one, then R) against the
    remaining factors column by column, leaving I_keep×R."""
    out = partial
    axis = 0
    for n, f in enumerate(factors):
        if f is None:
            continue
        if n == keep:
            axis += 1
            continue
        # Broadcast product and sum: torch's einsum makes this an R-batch of tiny matrix
        # products, about 7× slower on a 512×9×761 partial.
        out = (out.movedim(axis, -2) * f).sum(-2)
    return out


def mttkrp(
    tensor: torch.Tensor, factors: list[torch.Tensor], mode: int, first: int
) -> torch.Tensor:
    """unfold(tensor, mode) @ KhatriRao(other factors) without the Khatri–Rao product: contract
    mode `first` by a matrix product, then the other modes column by column. Memory is the
    partial product (tensor size / I_first × R), not the (Π others)×R Khatri–Rao matrix."""
    partial = _contract(tensor, factors[first], first)
    rest = [None if n == first else f for n, f in enumerate(factors)]
    return _finish(partial, rest, mode)


def _svd_init(tensor: torch.Tensor, rank: int, seed: int) -> list[torch.Tensor]:
    """tensorly's `init="svd"`: each mode's leading left singular vectors (mode 0 scaled by the
    singular values, signs flipped to a positive largest entry), padded with uniform random
    columns when the mode is smaller than the rank; from small Gram eigenproblems."""
    rng = np.random.RandomState(seed)
    factors = []
    for n in range(tensor.ndim):
        unfolded = tensor.movedim(n, 0).reshape(tensor.shape[n], -1)
        size = min(rank, tensor.shape[n])
        u = leading_left_vectors(unfolded, size)
        if n == 0:
            u = u * torch.linalg.norm(unfolded.T @ u, dim=0)
        if size < rank:
            pad = torch.from_numpy(rng.random_sample((tensor.shape[n], rank - size)))
            u = torch.cat([u, pad], dim=1)
        factors.append(u)
    return factors


def _grams(factors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [f.T @ f for f in factors]


def _hadamard(grams: list[torch.Tensor], skip: int | None = None) -> torch.Tensor:
    """The elementwise product of the Grams, all but `skip`'s."""
    product = torch.ones_like(grams[0])
    for m, gram in enumerate(grams):
        if m != skip:
            product = product * gram
    return product


def _sq_error(
    norm_sq: float,
    factors: list[torch.Tensor],
    grams: list[torch.Tensor],
    last_mttkrp: torch.Tensor,
) -> float:
    """‖K − model‖² from the factors' Grams and the last mode's MTTKRP (no reconstruction)."""
    inner = float(torch.sum(last_mttkrp * factors[-1]))
    return abs(norm_sq + float(_hadamard(grams).sum()) - 2.0 * inner)


def _sweep(
    tensor: torch.Tensor, factors: list[torch.Tensor], grams: list[torch.Tensor]
) -> torch.Tensor:
    """One ALS sweep, factors and their Grams updated in place; returns the last mode's MTTKRP
    (for the error). Modes ≥ 1 share the contraction with mode 0's new factor, so a sweep
    costs two tensor-sized products."""
    shared = None
    for n in range(tensor.ndim):
        if n == 0:
            g = mttkrp(
                tensor, factors, 0, first=max(range(1, tensor.ndim), key=tensor.shape.__getitem__)
            )
        else:
            if shared is None:
                shared = _contract(tensor, factors[0], 0)
            g = _finish(shared, [None, *factors[1:]], n)
        factors[n] = _solve_spd(_hadamard(grams, skip=n), g.T).T
        grams[n] = factors[n].T @ factors[n]
    return g


def _solve_spd(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """matrix⁻¹ rhs for the normal equations' Hadamard product of Grams, positive definite
    unless factors are rank-deficient: by Cholesky (half LU's work), by LU when it fails."""
    cholesky, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, cholesky)
    return torch.linalg.solve(matrix, rhs)


def cp_als(
    tensor: np.ndarray,
    rank: int,
    seed: int = 0,
    n_iter_max: int = 300,
    tol: float = 1e-8,
    linesearch: bool = True,
) -> CPFactors:
    """CP fitted by alternating least squares, SVD-initialised: tensorly's `parafac` algorithm
    (same start, sweeps, line search and stopping rule) in float64 torch.

    Hand-written because `parafac` forms the (Π other modes)×R Khatri–Rao product of every mode
    (1.6 GB for a 512×512×9 kernel at R = 761); `mttkrp` never does.
    Long ALS runs and line search lower the error a little but drift towards degenerate
    solutions (large cancelling components). On ResNet-56's 64×64×9 kernels at 2×: 100 sweeps
    give error 0.347 with Σλ² 3.7e3, 300 line-searched sweeps 0.321 with Σλ² 2.6e4 — and those
    cancellations cost float32 parity in the deployed network. `cp-epc` removes them properly.
    Sweeps stop early once the relative error changes by less than `tol`; line search speeds
    convergence (exact low-rank tensors are recovered to 1e-10) at the price of that drift.
    """
    if rank < 1:
        raise ValueError(f"CP rank must be ≥ 1, got {rank}")
    k = torch.from_numpy(np.ascontiguousarray(tensor, dtype=np.float64))
    norm_sq = float(torch.sum(k * k))
    norm = max(math.sqrt(norm_sq), 1e-300)
    factors = _svd_init(k, rank, seed)
    grams = _grams(factors)
    errors: list[float] = []
    acc_pow, acc_fail = 2.0, 0
    last: list[torch.Tensor] = factors
    for iteration in range(n_iter_max):
        if linesearch and iteration % 2 == 0:
            last = [f.clone() for f in factors]
        g = _sweep(k, factors, grams)
        if linesearch and iteration % 2 == 0 and iteration > 5:
            # tensorly's extrapolation: jump along the last two sweeps' step when it helps.
            jump = iteration ** (1.0 / acc_pow)
            trial = [p + (f - p) * jump for p, f in zip(last, factors)]
            trial_grams = _grams(trial)
            trial_error = math.sqrt(
                _sq_error(norm_sq, trial, trial_grams, mttkrp(k, trial, k.ndim - 1, 0))
            )
            if trial_error / norm < errors[-1]:
                factors, grams, acc_fail = trial, trial_grams, 0
                error = trial_error
            else:
                error = math.sqrt(_sq_error(norm_sq, factors, grams, g))
                acc_fail += 1
                if acc_fail == 4:
                    acc_pow, acc_fail = acc_pow + 1.0, 0
        else:
            error = math.sqrt(_sq_error(norm_sq, factors, grams, g))
        errors.append(error / norm)
        if tol and iteration >= 1 and abs(errors[-2] - errors[-1]) < tol:
            break
    norms = [torch.linalg.norm(f, dim=0) for f in factors]
    weights = torch.prod(torch.stack(norms), dim=0)
    unit = [f / torch.where(n > 0, n, 1.0) for f, n in zip(factors, norms)]
    return CPFactors(weights.numpy(), tuple(f.numpy() for f in unit))


def cp_sensitivity(cp: CPFactors, scale_mode: int | None = 1) -> float:
    """Expected squared change of the reconstruction per unit Gaussian noise on the factors.

    For factor matrices U_n that carry all the scale, i.i.d. N(0, σ²) noise E_n on their entries
    changes the unfolded tensor by Σ_n E_n Z_nᵀ to first order (Z_n: Khatri–Rao product of the
    other factors); the cross terms have zero mean, so E‖ΔK‖²/σ² is exactly
    ss = Σ_n I_n · Σ_r Π_{m≠n} ‖u_{m,r}‖²  (Phan et al., ECCV 2020).
    ss depends on how λ is split among the factors, so it must be evaluated for the split that is
    perturbed (Monte-Carlo agrees only then): unit-norm columns and
      - scale_mode=n (default 1, the T mode of K = S×T×(kh·kw)): all of λ in mode n, the split
        the issue's formula and EPC assume; ss = I_n·R + (Σ_{m≠n} I_m) · Σ_r λ_r², so
        minimising Σ λ_r² minimises it;
      - scale_mode=None: |λ_r|^{1/N} on every factor (a balanced split);
        ss = (Σ_n I_n) · Σ_r |λ_r|^{2(N−1)/N}, which EPC need not reduce.
    Degenerate CP solutions, with huge cancelling components, have huge sensitivity even when
    their error is small.
    """
    unit = cp.normalized()
    n_modes = len(unit.factors)
    if scale_mode is None:
        share = np.abs(unit.weights) ** (1.0 / n_modes)
        factors = tuple(f * share for f in unit.factors)
    else:
        factors = unit.absorbed(scale_mode % n_modes)
    sq_norms = np.stack([np.sum(f * f, axis=0) for f in factors])
    total = 0.0
    for n, size in enumerate(cp.shape):
        total += size * float(np.prod(np.delete(sq_norms, n, axis=0), axis=0).sum())
    return total
