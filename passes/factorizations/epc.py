"""Stable CP by Error Preserving Correction (EPC), and the hybrid Tucker-2 + CP (TKD-CPD).

Hand-written: no maintained library (tensorly, scipy, TensorLy-Torch) implements EPC, so this
module codes the published method (Phan et al., "Stable low-rank tensor decomposition for
compression of convolutional neural network", ECCV 2020) from its math.

Problem.  ALS often returns a *degenerate* CP: a few nearly collinear components with huge,
cancelling weights. The fit is fine but the factors are extremely sensitive to perturbation
(`cp.cp_sensitivity`), so the compressed layer chain fine-tunes badly. EPC keeps the ALS error
δ = ‖K − K_ALS‖ and looks for the most stable model with that error:

    min Σ_r λ_r²   s.t.   ‖K − [[λ; U_1, …, U_N]]‖_F ≤ δ,   unit-norm columns in every U_n.

Update for mode n (derivation).  Normalise all other modes and put the whole scale into
U = U_n (I_n×R), so Σ λ_r² = ‖U‖_F². With Z the Khatri–Rao product of the other factors,
G = K_(n) Z (the MTTKRP) and Γ = ZᵀZ (the Hadamard product of the other Grams),

    ‖K_(n) − U Zᵀ‖² = ‖K‖² − 2 tr(UᵀG) + tr(U Γ Uᵀ).

The Lagrangian ‖U‖² + μ(error − τ²) is stationary at U(η) = G (Γ + ηI)⁻¹ with η = 1/μ. With
Γ = Q diag(γ) Qᵀ, F = G Q and φ_r = ‖F[:, r]‖², U(η) = F diag(1/(γ+η)) Qᵀ and

    ‖U(η)‖² = Σ φ_r / (γ_r + η)²                      (decreasing in η)
    e(η)    = ‖K‖² − Σ φ_r (γ_r + 2η) / (γ_r + η)²     (increasing in η)
            = e(0) + Σ (φ_r / γ_r) · (η / (γ_r + η))².

The second form of e(η) has no cancellation, so η is found from it: the largest η with
e(η) = τ² (Newton on log η from the mode's η of the last sweep, Brent's method as the fallback),
where τ² = δ² when the least-squares error e(0) ≤ δ², else the current error (the error never
grows). Once the model is within the bound, τ² = δ² (unless not even e(0) meets it, which one
Cholesky factor at η → 0 tells), and from the last sweep's η one Cholesky factor of Γ + ηI
mostly suffices (`_eta_by_cholesky`): U(η) moved to first order in η, whose error is exactly
quadratic in the move, lands in the window, and Halley's method with another factor is the
route for longer moves; the eigendecomposition stays the route for the first sweep and the
fallback. That route may stop short of the bound by 3e-5 of ‖U‖². The problem is convex, so
that U(η) is the minimum-norm model within the bound; the old U is feasible, hence Σ λ² never
increases. An update that would break the bound (or raise Σ λ²) through rounding is shrunk
toward η = 0 or dropped. Within a sweep a candidate's error comes from the Gram formula above
(no residual); the model at the end of every sweep is checked against the exact residual, and
a sweep that fails the check is redone with every candidate checked exactly: in floating point
Σ λ² never rises and the error of every model EPC keeps stays ≤ τ²·(1 + 1e-10).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import tensorly as tl
from scipy.linalg import lapack
from scipy.optimize import brentq

from rankfold.passes.factorizations.cp import CPFactors, cp_als, cp_sensitivity
from rankfold.passes.factorizations.tucker import tucker2

# Eigenvalues of Γ below this are floored: Γ has a unit diagonal, so this is relative to 1.
_GAMMA_FLOOR = 1e-10
# Slack on the error bound for rounding in the exactly recomputed residual.
_BOUND_RTOL = 1e-10
# Steps for η from the last sweep's value (Newton, or Halley on the Cholesky route) before
# the fallback.
_ETA_STEPS = 8
# How short of the error bound a Cholesky-route update may stop, as a share of ‖U‖² given up:
# the error left goes to the next mode's update, and a wider window saves Cholesky factors
# (BENCHMARKS.md, decomposition speed, round 10).
_ETA_SHORTFALL = 3e-5
# Largest |Δη|/η for which a Cholesky-route update takes U(η)'s first-order move instead of a
# factor at η + Δη: at 0.1 EPC's path on a degenerate tensor already departs from the exact
# updates' (BENCHMARKS.md, decomposition speed, round 13).
_MOVE_LIMIT = 0.05


@dataclass(frozen=True)
class EPCResult:
    """EPC output and its history (`sum_sq_weights[0]`, `errors[0]` describe the start)."""

    cp: CPFactors  # unit-norm columns, all scale in the weights
    als: CPFactors  # the starting model
    rel_error: float
    als_rel_error: float
    sensitivity: float
    sensitivity_before: float
    sum_sq_weights: tuple[float, ...]  # Σ λ_r² at the start, then after each sweep
    errors: tuple[float, ...]  # ‖K − model‖_F at the start, then after each sweep
    n_sweeps: int


def max_cp_rank(shape: Sequence[int]) -> int:
    """min_n Π_{m≠n} I_m: slicing along the largest mode gives an exact CP of that rank."""
    sizes = [int(s) for s in shape]
    return min(math.prod(sizes[:n] + sizes[n + 1 :]) for n in range(len(sizes)))


def _check_rank(rank: int, shape: tuple[int, ...]) -> None:
    bound = max_cp_rank(shape)
    if not 1 <= rank <= bound:
        raise ValueError(
            f"CP rank {rank} is outside [1, {bound}] for a tensor of shape {shape} "
            f"(rank {bound} already fits it exactly); choose a rank from 1 to {bound}"
        )


def _as_tensor(tensor: np.ndarray) -> np.ndarray:
    array = np.asarray(tensor, dtype=np.float64)
    if array.ndim < 2:
        raise ValueError(f"CP needs a tensor with at least 2 modes, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"tensor of shape {array.shape} contains NaN or inf")
    return array


def _unit_columns(u: np.ndarray, fallback: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(directions, norms) of u's columns; a zero column keeps its previous unit direction."""
    norms = np.sqrt(np.einsum("ir,ir->r", u, u))
    if norms.all():
        return u / norms, norms
    alive = norms > 0
    directions = fallback.copy()
    directions[:, alive] = u[:, alive] / norms[alive]
    return directions, norms


def _solve_eta(ratio: np.ndarray, gamma: np.ndarray, target: float, hint: float | None) -> float:
    """Largest η ≥ 0 with h(η) = Σ ratio_r (η/(γ_r+η))² ≤ target (h rises from 0 to Σ ratio).

    From `hint` (the η this mode took in the previous sweep, near convergence within a few per
    cent of the answer): Newton on log η, kept inside a bracket that every evaluation narrows;
    without a hint, or if Newton has not settled after a few steps, Brent's method on the
    bracket. Both stop at a step of 1e-12 in log η."""
    if target <= 0.0:
        return 0.0

    def excess(log_eta: float) -> float:
        share = np.reciprocal(1.0 + gamma * math.exp(-log_eta))
        return float(ratio @ (share * share)) - target

    # Beyond these bounds every share is within e⁻⁴⁰ of 0 or 1, so h is flat to rounding.
    lo = math.log(float(gamma.min())) - 40.0
    hi = math.log(float(gamma.max())) + 40.0
    if excess(lo) >= 0.0:
        return 0.0
    if excess(hi) <= 0.0:
        return math.exp(hi)
    if hint is not None and hint > 0.0 and lo < math.log(hint) < hi:
        log_eta = math.log(hint)
        for _ in range(_ETA_STEPS):
            share = np.reciprocal(1.0 + gamma * math.exp(-log_eta))
            weighted = ratio * share * share
            value = float(np.sum(weighted)) - target
            if value < 0.0:
                lo = log_eta
            elif value > 0.0:
                hi = log_eta
            else:
                return math.exp(log_eta)
            # dh/d log η = Σ 2 ratio_r share_r² (1 − share_r) > 0 inside the bracket.
            slope = 2.0 * float(weighted @ (1.0 - share))
            step = -value / slope if slope > 0.0 else math.inf
            if abs(step) <= 1e-12:
                return math.exp(log_eta + step)
            log_eta = log_eta + step
            if not lo < log_eta < hi:
                break
    return math.exp(brentq(excess, lo, hi, xtol=1e-12, maxiter=200))


def _khatri_rao(matrices: list[np.ndarray], skip: int) -> np.ndarray:
    """Column-wise Kronecker product of all matrices but `skip`, in tensorly's order and with
    the same products, but without its overhead (many times faster on 64×64 modes; the exact
    residual forms one every sweep)."""
    others = [m for n, m in enumerate(matrices) if n != skip]
    out = others[0]
    for m in others[1:]:
        out = (out[:, None, :] * m[None, :, :]).reshape(-1, out.shape[1])
    return out


class _ModeProducts:
    """What a mode's update needs of the others: the MTTKRP and Γ, the Hadamard product of the
    other modes' Grams.

    MTTKRP: unfold(tensor, mode) @ KhatriRao(other factors), I_mode×R, without forming the
    Khatri–Rao product: one other mode is contracted by a matrix product (the partial), the rest
    column by column. NumPy rather than `cp.mttkrp` (torch): EPC's kernels are small, and per
    call torch's einsum costs more than the arithmetic.

    The partial is the costly step, and consecutive updates share it (a dimension tree): mode n
    contracts mode n − 1 first, the mode updated just before it, so the next mode's update finds
    that partial computed with the very factor it needs and pays only the column-wise steps. One
    partial is kept per contracted mode, valid while the factor it was computed with is the one
    passed (factors are never changed in place). The tensor is unfolded for each contracted
    mode once, up front (a view for mode 0, a copy for another)."""

    def __init__(self, tensor: np.ndarray) -> None:
        shape = tensor.shape
        self.first = {mode: self._first_mode(shape, mode) for mode in range(tensor.ndim)}
        self.unfolded = {
            first: (
                tensor.reshape(shape[0], -1).T
                if first == 0
                else np.ascontiguousarray(np.moveaxis(tensor, first, -1).reshape(-1, shape[first]))
            )
            for first in set(self.first.values())
        }
        self.shape = shape
        self.partials: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        # Each mode's Gram, kept by the same rule as the partials.
        self.grams: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @staticmethod
    def _first_mode(shape: tuple[int, ...], mode: int) -> int:
        """The mode updated before `mode` (cyclically), unless it is under half the largest other
        mode: contracting a short mode first is a poorly shaped product with a large result."""
        others = [m for m in range(len(shape)) if m != mode]
        largest = max(others, key=shape.__getitem__)
        previous = (mode - 1) % len(shape)
        return previous if 2 * shape[previous] >= shape[largest] else largest

    def gamma(self, factors: list[np.ndarray], mode: int) -> np.ndarray:
        """Γ = ⊛_{m≠mode} U_mᵀU_m (R×R, a new array)."""
        grams = []
        for m, f in enumerate(factors):
            if m == mode:
                continue
            if m not in self.grams or self.grams[m][0] is not f:
                self.grams[m] = (f, f.T @ f)
            grams.append(self.grams[m][1])
        gamma = grams[0].copy()
        for gram in grams[1:]:
            gamma *= gram
        return gamma

    def mttkrp(self, factors: list[np.ndarray], mode: int) -> np.ndarray:
        reusable = next(
            (m for m, (f, _) in self.partials.items() if m != mode and f is factors[m]), None
        )
        if reusable is not None:
            first, out = reusable, self.partials[reusable][1]
        else:
            first = self.first[mode]
            out = (self.unfolded[first] @ factors[first]).reshape(
                *(n for m, n in enumerate(self.shape) if m != first), factors[first].shape[1]
            )
            self.partials[first] = (factors[first], out)
        # einsum's operand/sublist form names the contracted axis in place (no moved view).
        rank_label = len(self.shape)
        axes = [m for m in range(len(self.shape)) if m != first] + [rank_label]
        for m in axes[:-1]:
            if m != mode:
                kept = [a for a in axes if a != m]
                out = np.einsum(out, axes, factors[m], [m, rank_label], kept)
                axes = kept
        return out


class _Residual:
    """‖K − [[λ; U_1, …, U_N]]‖² computed exactly from the residual, unfolded along the largest
    mode L so that the only Khatri–Rao product formed is of the small modes (Π_{m≠L} I_m × R),
    and only one unfolding of K is kept."""

    def __init__(self, tensor: np.ndarray) -> None:
        self.mode = int(np.argmax(tensor.shape))
        self.unfolded = tl.unfold(tensor, self.mode)
        self.norm_sq = float(np.sum(self.unfolded * self.unfolded))

    def __call__(self, factors: list[np.ndarray]) -> float:
        diff = factors[self.mode] @ _khatri_rao(factors, self.mode).T
        np.subtract(self.unfolded, diff, out=diff)
        return float(np.sum(np.square(diff, out=diff)))


def _linear_move(eta: float, zz: float, ww: float, miss: float, limit: float) -> float | None:
    """Δ with e(Uᵀ − ΔW) = e(U) − `miss`, where U = U(η) and W = (Γ + ηI)⁻¹Uᵀ, or None when
    |Δ| would exceed `limit`·η or no Δ reaches it.

    With A = Γ + ηI, AUᵀ = Gᵀ and AW = Uᵀ give ΓUᵀ and ΓW in terms of Gᵀ, Uᵀ and W, so

        e(Uᵀ − ΔW) = e(U) + 2η‖Z‖²Δ + (‖Z‖² − η‖W‖²)Δ²,   ‖Z‖² = ⟨Uᵀ, W⟩,

    exact for this candidate (not an expansion of e(η)); ‖Z‖² − η‖W‖² = Σ c_r² γ_r/(γ_r + η)²
    ≥ 0 in Γ's eigenbasis. The candidate is U(η + Δ) up to terms in (Δ/(γ_r + η))², so its
    ‖U‖² at that error is the minimum's to fourth order in Δ/η."""
    slope = 2.0 * eta * zz
    curvature = max(zz - eta * ww, 0.0)
    discriminant = slope * slope - 4.0 * curvature * miss
    if not slope > 0.0 or discriminant < 0.0:
        return None
    # The root nearer 0, in the form without cancellation.
    delta = -2.0 * miss / (slope + math.sqrt(discriminant))
    return delta if abs(delta) <= limit * eta else None


def _eta_by_cholesky(
    g: np.ndarray, gamma_matrix: np.ndarray, norm_sq: float, tau_sq: float, hint: float
) -> tuple[float, np.ndarray | None] | None:
    """(η, U(η)) with e(η) at most τ² and short of it by little, by Halley's method on log η
    from `hint`, each step one Cholesky factor L Lᵀ = Γ + ηI and up to four triangular solves
    instead of Γ's eigendecomposition (several times the cost of one step at R = 90). With
    Uᵀ = L⁻ᵀL⁻¹Gᵀ, Γ = (Γ + ηI) − ηI, Z = L⁻¹Uᵀ and W = L⁻ᵀZ = (Γ + ηI)⁻¹Uᵀ,

        e(η) = ‖K‖² − ‖L⁻¹Gᵀ‖² − η‖U‖²,   de/dη = 2η‖Z‖²,   d²e/dη² = 2‖Z‖² − 6η‖W‖².

    e is convex in log η near the root, so Newton from below overshoots and then creeps up on
    the root from the infeasible side; Halley's step, from the curvature, mostly lands within
    the accepted window in one step from the last sweep's η (BENCHMARKS.md, decomposition
    speed, round 9). Shorter steps skip that factor: `_linear_move` (round 13).

    (η, None) when not even the least-squares fit (η → 0) meets the bound: the caller keeps
    its model. None when Γ + ηI is not positive definite in floating point, or the iteration
    leaves its bracket or has not settled after a few steps: the caller then solves by the
    eigendecomposition."""
    # LAPACK directly: at these sizes SciPy's checked wrappers cost about as much as the work.
    rows = gamma_matrix.shape[0]
    # e may end above τ² by a tenth of the bound's slack (the candidate is checked against
    # τ²·(1 + _BOUND_RTOL)), or by rounding: e is a difference of sums of ~‖K‖².
    above = max(0.1 * _BOUND_RTOL * tau_sq, 64.0 * np.finfo(np.float64).eps * norm_sq)
    # Γ has a unit diagonal, so its eigenvalues lie in [0, R]: as `_solve_eta`'s bracket.
    lo, hi = math.log(_GAMMA_FLOOR) - 40.0, math.log(rows) + 40.0
    log_eta = math.log(hint)
    if not lo < log_eta < hi:
        return None
    least_squares_checked = False

    def factor(eta: float) -> np.ndarray | None:
        shifted = gamma_matrix.copy()
        shifted.flat[:: rows + 1] += eta
        chol, info = lapack.dpotrf(shifted, lower=1, clean=0, overwrite_a=1)
        return chol if info == 0 else None

    def excess(chol: np.ndarray, eta: float) -> tuple[float, np.ndarray]:
        """(e(η) − τ², Uᵀ)."""
        y, _ = lapack.dtrtrs(chol, g.T, lower=1)
        u_t, _ = lapack.dtrtrs(chol, y, lower=1, trans=1)
        return norm_sq - float(np.vdot(y, y)) - eta * float(np.vdot(u_t, u_t)) - tau_sq, u_t

    for _ in range(_ETA_STEPS):
        eta = math.exp(log_eta)
        chol = factor(eta)
        if chol is None:
            return None
        value, u_t = excess(chol, eta)
        # Ending short of the root by Δe leaves Δe/η on ‖U‖² (d‖U‖²/dη = −(de/dη)/η): at most
        # `_ETA_SHORTFALL` of it, and the error left unused goes to the next mode's update.
        below = _ETA_SHORTFALL * eta * float(np.vdot(u_t, u_t))
        if -below <= value <= above:
            return eta, u_t.T
        if value < 0.0:
            lo = log_eta
        else:
            hi = log_eta
        z, _ = lapack.dtrtrs(chol, u_t, lower=1)
        w, _ = lapack.dtrtrs(chol, z, lower=1, trans=1)
        zz, ww = float(np.vdot(z, z)), float(np.vdot(w, w))
        slope = 2.0 * eta * eta * zz  # de/d log η
        curvature = slope + eta * eta * (2.0 * zz - 6.0 * eta * ww)  # d²e/d(log η)²
        if not slope > 0.0:
            return None
        # Aim at the middle of the accepted window.
        miss = value + 0.5 * below
        if value > 0.0 and -miss / slope < -math.log(2.0) and not least_squares_checked:
            # Far above the bound, and Newton would more than halve η: is any η feasible?
            least_squares_checked = True
            floor_chol = factor(_GAMMA_FLOOR)
            if floor_chol is None:
                return None
            if excess(floor_chol, _GAMMA_FLOOR)[0] > _BOUND_RTOL * tau_sq:
                return eta, None
        # Uᵀ − Δ·W, the first-order move of U(η) to η + Δ, has an error exactly quadratic in Δ
        # (the inner products above give it, see `_linear_move`): solved for the middle of the
        # window it is a candidate without another factor, as good as U(η + Δ) while Δ ≪ η.
        moved = _linear_move(eta, zz, ww, miss, _MOVE_LIMIT)
        if moved is not None:
            return eta + moved, (u_t - moved * w).T
        denominator = 2.0 * slope * slope - miss * curvature
        step = -2.0 * miss * slope / denominator if denominator > 0.0 else -miss / slope
        if abs(step) <= 1e-12:
            return eta, u_t.T
        log_eta = log_eta + step
        if not lo < log_eta < hi:
            return None
    return None


def _update_mode(
    g: np.ndarray,
    gamma_matrix: np.ndarray,
    norm_sq: float,
    residual_sq: Callable[[np.ndarray], float],
    direction: np.ndarray,
    weights: np.ndarray,
    err_now: float,
    delta_sq: float,
    eta_hint: float | None = None,
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Minimum-norm update of one mode within the error bound, from its MTTKRP `g`, the
    Hadamard product of the other Grams, ‖K‖² and `residual_sq(U)` (the exact squared error
    with this mode's factor U, all scale in it); `eta_hint` starts the search for η.

    Returns the new (unit directions, weights, exact squared error) and the η solved for; the
    model is returned unchanged when no candidate keeps both the bound and Σ λ² ≤ its current
    value.
    """
    sum_now = float(np.sum(weights**2))

    def kept_model(u: np.ndarray, limit: float) -> tuple[np.ndarray, np.ndarray, float] | None:
        """The model to return for candidate U: U renormalised if its exact error is within
        `limit` and Σ λ² does not rise, the unchanged model if it is within but Σ λ² rises (a
        smaller η only raises it further: rounding, at convergence), None if over the limit."""
        new_direction, new_weights = _unit_columns(u, direction)
        err = residual_sq(new_direction * new_weights)
        if err > limit:
            return None
        if float(np.sum(new_weights**2)) <= sum_now:
            return new_direction, new_weights, err
        return direction, weights, err_now

    # Within the bound, e(0) ≤ e(now) ≤ δ² and τ² = δ² without the least-squares error: from a
    # hint, η comes from Cholesky factors alone.
    if eta_hint is not None and eta_hint > 0.0 and err_now <= delta_sq * (1.0 + _BOUND_RTOL):
        found = _eta_by_cholesky(g, gamma_matrix, norm_sq, delta_sq, eta_hint)
        if found is not None:
            eta, u = found
            if u is None:
                # The least-squares fit is above the bound (a jump too long): nothing to keep,
                # and the hint stays for the next update of this mode.
                return direction, weights, err_now, eta_hint
            kept = kept_model(u, delta_sq * (1.0 + _BOUND_RTOL))
            if kept is not None:
                return (*kept, eta)
            eta_hint = eta

    gamma, q = np.linalg.eigh(gamma_matrix)
    gamma = np.maximum(gamma, _GAMMA_FLOOR)
    f = g @ q
    phi = np.sum(f * f, axis=0)
    err_ls = residual_sq((f / gamma) @ q.T)
    tau_sq = delta_sq if delta_sq >= err_ls else err_now
    limit = tau_sq * (1.0 + _BOUND_RTOL)

    eta = solved = _solve_eta(phi / gamma, gamma, tau_sq - err_ls, eta_hint)
    # The formula is exact only in exact arithmetic (and for unfloored γ): check the true error
    # of the renormalised model, and back off toward the least-squares end if rounding pushed it
    # over the bound.
    for _ in range(40):
        kept = kept_model((f / (gamma + eta)) @ q.T, limit)
        if kept is not None:
            return (*kept, solved)
        if eta == 0.0:
            break
        eta = eta * 0.25 if eta > 1e-300 else 0.0
    return direction, weights, err_now, solved


def _update(
    products: _ModeProducts,
    residual: _Residual,
    directions: list[np.ndarray],
    weights: np.ndarray,
    mode: int,
    err_sq: float,
    delta_sq: float,
    exact: bool,
    etas: list[float | None],
) -> tuple[np.ndarray, np.ndarray, float]:
    """`_update_mode` of `mode` with the other modes' directions taken from `directions`;
    candidates' errors from the exact residual if `exact`, else from the Gram formula.
    `etas[mode]` (the mode's last η) starts the search for η and is replaced by the new one."""
    gamma = products.gamma(directions, mode)
    g = products.mttkrp(directions, mode)

    def residual_sq(u: np.ndarray) -> float:
        if not exact:
            # ‖K‖² − 2⟨U, G⟩ + ⟨UΓ, U⟩: an I×R×R product instead of the I×(Π others)×R residual.
            return residual.norm_sq - 2.0 * float(np.vdot(u, g)) + float(np.vdot(u @ gamma, u))
        return residual([u if m == mode else d for m, d in enumerate(directions)])

    direction, weights, err_sq, etas[mode] = _update_mode(
        g,
        gamma,
        residual.norm_sq,
        residual_sq,
        directions[mode],
        weights,
        err_sq,
        delta_sq,
        etas[mode],
    )
    return direction, weights, err_sq


# Extrapolation step: it starts at half the last sweep's step, triples after an accepted jump
# (up to this many steps) and falls to a tenth after a rejected one, which costs a mode solve
# more (against doubling and halving: BENCHMARKS.md, decomposition speed, round 8).
_JUMP_START, _JUMP_MAX, _JUMP_MIN = 0.5, 100.0, 0.1
_JUMP_GROWTH, _JUMP_CUT = 3.0, 0.1


def epc(
    tensor: np.ndarray,
    init: CPFactors,
    delta: float | None = None,
    max_sweeps: int = 300,
    tol: float = 1e-6,
    patience: int = 3,
    extrapolate: bool = True,
) -> EPCResult:
    """EPC from `init`: minimise Σλ² keeping ‖K − model‖ ≤ δ (default: the error of `init`).

    Stops after `patience` consecutive sweeps whose relative change of Σλ² is below `tol`, or
    after `max_sweeps`.

    With `extrapolate`, every sweep ends with a jump along the last sweep's step, as ALS line
    search does (Bro 1998): the directions of every mode but the last move by `jump` × their
    change over the sweep, and the last mode is solved by the same minimum-norm update at the
    jumped model; the jump is kept only if it stays within the bound and lowers Σλ², else the
    last mode is solved at the plain one. The plain sweeps crawl (Σλ² still falling after 1000
    sweeps on ResNet-56 kernels); with the jump, about a quarter of the sweeps reach the same
    Σλ², and a sweep whose jump is kept costs no more than a plain one.
    """
    k = _as_tensor(tensor)
    if init.shape != k.shape:
        raise ValueError(f"CP model of shape {init.shape} does not match tensor shape {k.shape}")
    _check_rank(init.rank, k.shape)
    if max_sweeps < 0 or patience < 1 or not tol >= 0.0:
        raise ValueError(
            f"need max_sweeps ≥ 0, patience ≥ 1, tol ≥ 0; got {max_sweeps}, {patience}, {tol}"
        )
    start = init.normalized()
    directions = [np.array(f, dtype=np.float64) for f in start.factors]
    for d in directions:
        # A zero column (weight 0) still needs a unit direction for Γ's unit diagonal.
        d[0, np.linalg.norm(d, axis=0) == 0] = 1.0
    # Signs live in the directions so that λ stays ≥ 0.
    directions[0] = directions[0] * np.where(start.weights < 0, -1.0, 1.0)
    weights = np.abs(start.weights).astype(np.float64)
    residual = _Residual(k)
    products = _ModeProducts(k)
    # Every error, this one included, comes from the same residual computation.
    err_sq = residual([directions[0] * weights, *directions[1:]])
    if delta is None:
        delta = math.sqrt(err_sq)
    if not (math.isfinite(delta) and delta >= 0.0):
        raise ValueError(f"EPC error bound delta must be a finite number ≥ 0, got {delta}")
    delta_sq = float(delta) ** 2

    sums = [float(np.sum(weights**2))]
    errors = [math.sqrt(err_sq)]
    calm = 0
    last = k.ndim - 1
    jump = _JUMP_START
    etas: list[float | None] = [None] * k.ndim

    def sweep(exact: bool) -> tuple[list[np.ndarray], np.ndarray, float, float]:
        """One sweep from the current model: (directions, weights, squared error, next jump)."""
        new_directions, new_weights, new_err, new_jump = list(directions), weights, err_sq, jump
        jumping = extrapolate and len(sums) > 1
        # A jump re-solves the last mode, so the plain update of it waits until a jump fails.
        for n in range(last if jumping else k.ndim):
            new_directions[n], new_weights, new_err = _update(
                products, residual, new_directions, new_weights, n, new_err, delta_sq, exact, etas
            )
        if not jumping:
            return new_directions, new_weights, new_err, new_jump
        # Along this sweep's step, from the model it started from.
        trial = [d + jump * (d - p) for d, p in zip(new_directions[:last], directions)]
        norms = [np.linalg.norm(t, axis=0) for t in trial]
        if all(np.all(norm > 0.0) for norm in norms):
            trial = [t / norm for t, norm in zip(trial, norms)] + [new_directions[last]]
            solved, jumped_weights, jumped_err = _update(
                products, residual, trial, new_weights, last, new_err, delta_sq, exact, etas
            )
            # `_update_mode` hands back the model unchanged when the jump does not pay.
            if solved is not new_directions[last]:
                trial[last] = solved
                return trial, jumped_weights, jumped_err, min(_JUMP_GROWTH * jump, _JUMP_MAX)
        new_directions[last], new_weights, new_err = _update(
            products, residual, new_directions, new_weights, last, new_err, delta_sq, exact, etas
        )
        return new_directions, new_weights, new_err, max(_JUMP_CUT * jump, _JUMP_MIN)

    while len(sums) <= max_sweeps and calm < patience:
        # The sweep may only keep the error within the larger of δ and the error it starts from.
        limit = max(delta_sq, err_sq) * (1.0 + _BOUND_RTOL)
        new_directions, new_weights, _, new_jump = sweep(exact=False)
        new_err = residual([new_directions[0] * new_weights, *new_directions[1:]])
        if new_err > limit:
            new_directions, new_weights, new_err, new_jump = sweep(exact=True)
        directions, weights, err_sq, jump = new_directions, new_weights, new_err, new_jump
        sums.append(float(np.sum(weights**2)))
        errors.append(math.sqrt(err_sq))
        change = abs(sums[-2] - sums[-1])
        calm = calm + 1 if change <= tol * max(sums[-2], 1e-300) else 0

    cp = CPFactors(weights, tuple(directions))
    return EPCResult(
        cp=cp,
        als=init,
        rel_error=cp.rel_error(k),
        als_rel_error=init.rel_error(k),
        sensitivity=cp_sensitivity(cp),
        sensitivity_before=cp_sensitivity(init),
        sum_sq_weights=tuple(sums),
        errors=tuple(errors),
        n_sweeps=len(sums) - 1,
    )


def cp_epc(
    tensor: np.ndarray, rank: int, seed: int = 0, als_iter: int = 500, **epc_kwargs: object
) -> EPCResult:
    """CP by ALS (`cp_als`), then EPC with δ = the ALS error (unless `delta` is passed)."""
    k = _as_tensor(tensor)
    _check_rank(rank, k.shape)
    als = cp_als(k, rank, seed=seed, n_iter_max=als_iter)
    return epc(k, als, **epc_kwargs)


@dataclass(frozen=True)
class Tucker2CPFactors:
    """Tucker-2 on the channel modes with an EPC-CP core.

    Layer chain: 1×1 conv S→R_S (in_factorᵀ), 1×1 conv R_S→R (CP mode 0), depthwise kh×kw on R
    channels (CP mode 2), 1×1 conv R→R_T (CP mode 1 · diag λ), 1×1 conv R_T→T (out_factor).
    """

    in_factor: np.ndarray  # S×R_S
    out_factor: np.ndarray  # T×R_T
    core: EPCResult  # CP of the Tucker core reshaped to R_S×R_T×(kh·kw)
    kernel_size: tuple[int, ...]

    @property
    def ranks(self) -> tuple[int, int, int]:
        """(R_T, R_S, R): Tucker output and input ranks, CP rank."""
        return self.out_factor.shape[1], self.in_factor.shape[1], self.core.cp.rank

    @property
    def sensitivity(self) -> float:
        """`cp_sensitivity` of the CP core (orthonormal Tucker factors carry it to W unchanged)."""
        return self.core.sensitivity

    def reconstruct(self) -> np.ndarray:
        """The kernel T×S×k…."""
        r_s, r_t = self.in_factor.shape[1], self.out_factor.shape[1]
        core = self.core.cp.reconstruct().reshape(r_s, r_t, *self.kernel_size)
        return np.einsum("ba...,ta,sb->ts...", core, self.out_factor, self.in_factor, optimize=True)

    def rel_error(self, kernel: np.ndarray) -> float:
        return float(
            np.linalg.norm(kernel - self.reconstruct()) / max(np.linalg.norm(kernel), 1e-300)
        )


def tucker2_cp(
    kernel: np.ndarray, rank_out: int, rank_in: int, rank_cp: int, seed: int = 0
) -> Tucker2CPFactors:
    """Hybrid TKD-CPD: Tucker-2 (ranks R_T, R_S) of W, then `cp_epc` of the core (R_S×R_T×kh·kw)."""
    w = np.asarray(kernel, dtype=np.float64)
    if w.ndim != 4:
        raise ValueError(f"tucker2_cp expects a conv kernel T×S×kh×kw, got shape {w.shape}")
    kh, kw = w.shape[2:]
    _check_rank(rank_cp, (rank_in, rank_out, kh * kw))  # before the Tucker work, not after
    tucker = tucker2(w, rank_out, rank_in, seed=seed)
    core = tucker.core.transpose(1, 0, 2, 3).reshape(rank_in, rank_out, kh * kw)
    return Tucker2CPFactors(
        in_factor=tucker.in_factor,
        out_factor=tucker.out_factor,
        core=cp_epc(core, rank_cp, seed=seed),
        kernel_size=(kh, kw),
    )
