"""CP (CANDECOMP/PARAFAC) of a conv kernel reshaped to K = S×T×(kh·kw).

K ≈ Σ_r λ_r a_r ∘ b_r ∘ c_r is the layer chain 1×1 conv S→R (A), depthwise kh×kw conv on R
channels (C reshaped, original stride/padding/dilation), 1×1 conv R→T (B·diag λ, original bias).
Params: R·(S + kh·kw + T).  MACs: H_in·W_in·S·R + H_out·W_out·R·(kh·kw + T).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import tensorly as tl
from tensorly.decomposition import parafac


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


def cp_als(
    tensor: np.ndarray,
    rank: int,
    seed: int = 0,
    n_iter_max: int = 300,
    tol: float = 1e-8,
    linesearch: bool = True,
) -> CPFactors:
    """CP fitted by alternating least squares (tensorly `parafac`), SVD-initialised.

    Long ALS runs and line search lower the error a little but drift towards degenerate
    solutions (large cancelling components). On ResNet-56's 64×64×9 kernels at 2×: 100 sweeps
    give error 0.347 with Σλ² 3.7e3, 300 line-searched sweeps 0.321 with Σλ² 2.6e4 — and those
    cancellations cost float32 parity in the deployed network. `cp-epc` removes them properly.
    Sweeps stop early once the relative error changes by less than `tol`; line search speeds
    convergence (exact low-rank tensors are recovered to 1e-10) at the price of that drift.
    """
    if rank < 1:
        raise ValueError(f"CP rank must be ≥ 1, got {rank}")
    with warnings.catch_warnings():
        # A rank above a mode's size makes tensorly pad the SVD start with random columns, as wanted.
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        cp = parafac(
            tl.tensor(tensor.astype(np.float64)),
            rank=rank,
            init="svd",
            n_iter_max=n_iter_max,
            tol=tol,
            linesearch=linesearch,
            random_state=seed,
            normalize_factors=True,
        )
    weights, factors = cp
    return CPFactors(np.asarray(weights), tuple(np.asarray(f) for f in factors))


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
