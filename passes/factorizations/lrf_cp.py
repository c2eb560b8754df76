"""CP with low-rank factor matrices (LRF-CPD; Phan, Tichavský et al., ICASSP 2021).

X ≈ Σ_r λ_r a_{1,r} ∘ … ∘ a_{N,r}, where a constrained factor A_n = U_n V_nᵀ (I_n×R) has rank
L_n < R. A high CP rank R then costs few parameters: Σ_n L_n (I_n + R) instead of R Σ_n I_n. The
model is a Tucker model X = G ×₁ U_1 … ×_N U_N whose core G = Σ_r λ_r v_{1,r} ∘ … ∘ v_{N,r}
(L_1×…×L_N) has CP rank R.

Hand-written: tensorly, scipy and the other maintained libraries have CP and Tucker but no CP
with rank-constrained factor matrices; tensorly still does the HOSVD and the MTTKRP products.

Algorithm (alternating least squares; each mode update is a reduced-rank regression with a
closed form). With W the Khatri–Rao product of the other factors, Γ = WᵀW, G = X_(n) W and
T = G Γ^{-1/2}, the best rank-L update is A_n = P_L(T) Γ^{-1/2} (P_L: truncated SVD), and its
squared error is ‖X‖² − ‖T‖² + Σ_{i>L} σ_i(T)². Γ is singular whenever R exceeds the product
of the other factors' ranks (common here), so Γ^{-1/2} is a pseudo-inverse square root:
eigenvalues below 1e-12·max are dropped, which gives the minimum-norm least-squares update and
keeps the error formula exact. Initialisation: truncated HOSVD with ranks L_n (tensorly) plus a
rank-R CP of the core, best of 3 random starts (`init="hosvd"`), or a plain CP projected to
ranks L_n (`init="cp"`). Both CPs use this module's ALS with every mode unconstrained: R often
exceeds the product of the core's other dimensions, and tensorly's parafac then fails on the
singular Γ. The ALS adds Bro's line search (as tensorly's parafac does) against slow "swamps";
like any CP-ALS it is non-convex and can stop in a local minimum (a few % of random planted
models in the tests' sizes; another seed then succeeds).
A mode longer than the product of the others (e.g. 10,000 images of 28×28) is first compressed
losslessly by a QR of its unfolding: the fit, the ranks and the error are unchanged, each sweep
is cheaper.

`lrf_cp_auto` picks the ranks under a relative error bound ε: each mode update takes the
smallest L_n with Σ_{i>L_n} σ_i(T)² ≤ ε²‖X‖² − (‖X‖² − ‖T‖²), and keeps the current L_n while
that is infeasible. Once the error is below ε every later update stays below it, so the ranks
only decrease from then on; it raises if ALS ends above ε (R too small for ε). Sweeps visit the
longest modes first, so the error budget goes first to the ranks that cost the most parameters.

Representation (`LRFCPFactors`): λ (R,), and per mode `left[n]`, `right[n]`:
- constrained: U_n (I_n×L_n, orthonormal columns) and V_n (R×L_n); A_n = U_n V_nᵀ;
- unconstrained (`factor_ranks[n] is None`): left[n] = A_n (I_n×R), right[n] = None.
Columns of every A_n have unit norm; the scale is in λ. λ is not counted in `n_params`: it can
always be folded into a V_n or an unconstrained A_n at no cost (`absorbed`). So
n_params = Σ_constrained L_n (I_n + R) + Σ_unconstrained I_n R, and plain CP costs R Σ_n I_n.
`compact()` stores a mode unfactorised where L_n (I_n + R) ≥ I_n R (`lrf_cp_auto` applies it).

Conv kernels (W T×S×kh×kw as K = S×T×(kh·kw), modes (0, 1) constrained, mode 2 unconstrained;
`absorbed(1)` puts λ into V_T): the layer chain is
1×1 conv S→L_S (weights U_Sᵀ), 1×1 conv L_S→R (V_S), depthwise kh×kw conv on R channels (the
spatial factor reshaped R×1×kh×kw, original stride/padding/dilation), 1×1 conv R→L_T (V_Tᵀ),
1×1 conv L_T→T (U_T, original bias). An unconstrained channel mode is one 1×1 conv instead
(S→R with A_Sᵀ, or R→T with A_T).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import tensorly as tl
from tensorly.decomposition import tucker

from rankfold.passes.factorizations.cp import CPFactors

# Γ eigenvalues below this fraction of the largest are treated as zero (pseudo-inverse).
_EIG_RTOL = 1e-12
# ‖X‖² − ‖T‖² loses ~1e-16·‖X‖² to cancellation; the ε bound keeps this much (relative²) slack.
_BOUND_SLACK = 1e-13
# Sweeps of the CP that initialises the ALS (of the HOSVD core, or of the tensor for init="cp").
_INIT_CP_SWEEPS = 100
# Random starts of the core's CP (cheap: the core is small); the best fit initialises the ALS.
_INIT_RESTARTS = 3
_INITS = ("hosvd", "cp")
_AUTO_ATTEMPTS = 2


@dataclass(frozen=True)
class LRFCPFactors:
    """λ (R,), left[n] = U_n (I_n×L_n) or A_n (I_n×R), right[n] = V_n (R×L_n) or None."""

    weights: np.ndarray
    left: tuple[np.ndarray, ...]
    right: tuple[np.ndarray | None, ...]

    @property
    def rank(self) -> int:
        return self.weights.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(u.shape[0] for u in self.left)

    @property
    def factor_ranks(self) -> tuple[int | None, ...]:
        """L_n per mode; None for an unconstrained mode."""
        return tuple(None if v is None else v.shape[1] for v in self.right)

    def factor(self, n: int) -> np.ndarray:
        """A_n (I_n×R) = U_n V_nᵀ, or the stored A_n of an unconstrained mode."""
        v = self.right[n]
        return self.left[n] if v is None else self.left[n] @ v.T

    def to_cp(self) -> CPFactors:
        return CPFactors(self.weights, tuple(self.factor(n) for n in range(len(self.left))))

    def reconstruct(self) -> np.ndarray:
        return self.to_cp().reconstruct()

    def rel_error(self, tensor: np.ndarray) -> float:
        return self.to_cp().rel_error(tensor)

    @property
    def n_params(self) -> int:
        """Σ_n L_n (I_n + R) over constrained modes + I_n R over unconstrained ones (λ folded)."""
        r = self.rank
        return sum(
            u.shape[0] * r if v is None else v.shape[1] * (u.shape[0] + r)
            for u, v in zip(self.left, self.right)
        )

    def compact(self) -> LRFCPFactors:
        """The same tensor with each mode stored unfactorised where L_n (I_n + R) ≥ I_n R."""
        left, right = list(self.left), list(self.right)
        for n, (u, v) in enumerate(zip(self.left, self.right)):
            if v is not None and v.shape[1] * (u.shape[0] + self.rank) >= u.shape[0] * self.rank:
                left[n], right[n] = u @ v.T, None
        return LRFCPFactors(self.weights, tuple(left), tuple(right))

    def absorbed(self, mode: int) -> LRFCPFactors:
        """The same tensor with λ folded into V_mode (or A_mode if unconstrained); λ = 1."""
        left, right = list(self.left), list(self.right)
        v = right[mode]
        if v is None:
            left[mode] = left[mode] * self.weights
        else:
            right[mode] = v * self.weights[:, None]
        return LRFCPFactors(np.ones_like(self.weights), tuple(left), tuple(right))


@dataclass(frozen=True)
class LRFCPResult:
    """Fitted factors, their exact relative error, and the per-sweep history."""

    factors: LRFCPFactors
    rel_error: float
    errors: tuple[float, ...]  # relative error after each sweep (closed-form, ~1e-8 accurate)
    rank_history: tuple[tuple[int | None, ...], ...]  # factor ranks after each sweep
    n_sweeps: int


def lrf_cp(
    tensor: np.ndarray,
    rank: int,
    factor_ranks: Sequence[int | None],
    init: str = "hosvd",
    max_sweeps: int = 500,
    tol: float = 1e-8,
    seed: int = 0,
) -> LRFCPResult:
    """LRF-CPD with fixed ranks: CP rank `rank`, factor_ranks[n] = L_n or None (unconstrained).

    Stops when the relative error changes by less than `tol` over a sweep, or after `max_sweeps`;
    `seed` drives the random starts of the initial CP.
    """
    x = _as_tensor(tensor)
    _check_common(x, rank, init, max_sweeps)
    ranks = list(factor_ranks)
    if len(ranks) != x.ndim:
        raise ValueError(
            f"factor_ranks has {len(ranks)} entries for a {x.ndim}-way tensor; give one per mode"
        )
    for n, lr in enumerate(ranks):
        if lr is not None:
            _check_factor_rank(n, lr, x.shape[n], rank)
    return _fit(x, rank, ranks, None, init, max_sweeps, tol, seed)


def lrf_cp_auto(
    tensor: np.ndarray,
    rank: int,
    rel_error: float,
    init: str = "hosvd",
    max_sweeps: int = 500,
    tol: float = 1e-8,
    seed: int = 0,
    constrained_modes: Sequence[int] | None = None,
) -> LRFCPResult:
    """LRF-CPD whose factor ranks are chosen so that the relative error ends ≤ `rel_error` (ε).

    Constrained modes (default: all) start at L_n = min(I_n, R) and shrink as the bound allows;
    the others stay unconstrained. A mode whose factorised form ends no smaller than A_n itself is
    returned unconstrained (`LRFCPFactors.compact`). If ALS ends above ε it retries once from
    another random start (seed + 1), then raises ValueError: rank R cannot reach ε.
    """
    x = _as_tensor(tensor)
    _check_common(x, rank, init, max_sweeps)
    bound = float(rel_error)
    if not 0.0 < bound < 1.0:
        raise ValueError(f"relative error bound must lie in (0, 1), got {rel_error!r}")
    modes = range(x.ndim) if constrained_modes is None else list(constrained_modes)
    for n in modes:
        if not (isinstance(n, (int, np.integer)) and 0 <= n < x.ndim):
            raise ValueError(f"constrained mode {n!r} must be an int in [0, {x.ndim - 1}]")
    # Starting ranks are capped later, at the (possibly compressed) mode size.
    start = [min(x.shape[n], rank) if n in modes else None for n in range(x.ndim)]
    # ALS can stop in a local minimum above ε; one more random start settles most of those.
    for attempt in range(_AUTO_ATTEMPTS):
        result = _fit(x, rank, list(start), bound, init, max_sweeps, tol, seed + attempt)
        if result.rel_error <= bound:
            return replace(result, factors=result.factors.compact())
    raise ValueError(
        f"CP rank {rank} reaches relative error {result.rel_error:.4g} > bound {bound:.4g} "
        f"even at full factor ranks ({_AUTO_ATTEMPTS} starts of {max_sweeps} sweeps); "
        "raise the rank or the bound"
    )


def _as_tensor(tensor: np.ndarray) -> np.ndarray:
    x = np.asarray(tensor, dtype=np.float64)
    if x.ndim < 2 or min(x.shape) < 1:
        raise ValueError(f"LRF-CPD needs a tensor with ≥ 2 non-empty modes, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("tensor contains NaN or inf; clean the input before decomposing it")
    return x


def _check_common(x: np.ndarray, rank: int, init: str, max_sweeps: int) -> None:
    if not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"CP rank must be an int ≥ 1, got {rank!r}")
    if init not in _INITS:
        raise ValueError(f"init must be one of {', '.join(_INITS)}, got {init!r}")
    if max_sweeps < 1:
        raise ValueError(f"max_sweeps must be ≥ 1, got {max_sweeps}")
    if not np.any(x):
        raise ValueError("tensor is all zeros; there is nothing to decompose")


def _check_factor_rank(n: int, lr: int, size: int, rank: int) -> None:
    top = min(size, rank)
    if not isinstance(lr, (int, np.integer)) or not 1 <= lr <= top:
        raise ValueError(
            f"factor rank L_{n}={lr!r} (mode {n}, size {size}) must lie in [1, {top}] "
            f"= [1, min(I_{n}, R={rank})], or be None for an unconstrained mode"
        )


def _fit(
    x: np.ndarray,
    rank: int,
    ranks: list[int | None],
    bound: float | None,
    init: str,
    max_sweeps: int,
    tol: float,
    seed: int,
) -> LRFCPResult:
    xc, long_mode, basis = _compress(x, ranks, fixed=bound is None)
    if bound is not None and long_mode is not None and ranks[long_mode] is not None:
        # The rank of A_n never exceeds the compressed size; start there.
        ranks[long_mode] = min(ranks[long_mode], xc.shape[long_mode])
    left, right = _initialise(xc, rank, ranks, init, tol, seed)
    errors, history = _als(xc, left, right, ranks, bound, max_sweeps, tol)
    weights = _normalise_all(left, right)
    # Exact error, in the compressed space where it is the same and cheaper.
    exact = LRFCPFactors(weights, tuple(left), tuple(right)).rel_error(xc)
    if long_mode is not None:
        left[long_mode] = basis @ left[long_mode]
    return LRFCPResult(
        factors=LRFCPFactors(weights, tuple(left), tuple(right)),
        rel_error=exact,
        errors=tuple(errors),
        rank_history=tuple(history),
        n_sweeps=len(errors),
    )


def _als(
    x: np.ndarray,
    left: list[np.ndarray],
    right: list[np.ndarray | None],
    ranks: list[int | None],
    bound: float | None,
    max_sweeps: int,
    tol: float,
) -> tuple[list[float], list[tuple[int | None, ...]]]:
    """Sweeps of mode updates in place on (left, right, ranks): per-sweep errors and ranks."""
    rank = left[0].shape[1] if right[0] is None else right[0].shape[0]
    norm_sq = float(np.vdot(x, x))
    budget = None if bound is None else (bound**2 - _BOUND_SLACK) * norm_sq
    errors: list[float] = []
    history: list[tuple[int | None, ...]] = []
    # Largest modes first: in lrf_cp_auto the first feasible update takes the slack, and a rank
    # saved on a long mode saves the most parameters.
    order = sorted(range(x.ndim), key=lambda n: -x.shape[n])
    jump_power = 2.0  # extrapolation step sweep**(1/power); grows after repeated failures
    failures = 0
    for sweep in range(max_sweeps):
        start = [_full(left[m], right[m]) for m in range(x.ndim)]
        changed = False
        err_sq = norm_sq
        for n in order:
            for m in range(x.ndim):
                if m != n:
                    # The mode-n update absorbs any column scaling of the others, rank included.
                    _normalise(left, right, m)
            full = [_full(left[m], right[m]) for m in range(x.ndim)]
            gram = np.ones((rank, rank))
            for m in range(x.ndim):
                if m != n:
                    gram *= full[m].T @ full[m]
            mttkrp = tl.tenalg.unfolding_dot_khatri_rao(x, (None, full), n)
            left[n], right[n], err_sq, new_rank = _solve_mode(
                mttkrp, gram, norm_sq, ranks[n], budget
            )
            changed |= new_rank != ranks[n]
            ranks[n] = new_rank
        if sweep >= 2 and sweep % 2 == 0 and not changed:
            # Line search (Bro 1998, as in tensorly's parafac): ALS crawls through "swamps" of
            # nearly collinear components, common when factors are rank-deficient by design.
            # A step only ever lowers the error, so the ε bound and the ranks are kept.
            step = 1.0 + sweep ** (1.0 / jump_power)
            trial_left, trial_right = _extrapolate(start, left, right, step)
            full = [_full(u, v) for u, v in zip(trial_left, trial_right)]
            trial_err = _error_sq(x, norm_sq, full)
            if trial_err < err_sq:
                left[:], right[:], err_sq = trial_left, trial_right, trial_err
            else:
                failures += 1
                if failures == 4:
                    jump_power, failures = jump_power + 1.0, 0
        errors.append(math.sqrt(max(err_sq, 0.0) / norm_sq))
        history.append(tuple(ranks))
        if sweep > 0 and not changed and abs(errors[-2] - errors[-1]) < tol:
            break
    return errors, history


def _compress(
    x: np.ndarray, ranks: list[int | None], fixed: bool
) -> tuple[np.ndarray, int | None, np.ndarray | None]:
    """Replace a mode longer than the product of the others by its QR basis coordinates.

    X_(n) = Q C with Q orthonormal: fitting the tensor whose mode-n unfolding is C, with
    A_n = Q Ã_n, is fitting X. Skipped when a fixed L_n exceeds the compressed size (U_n would
    not fit); automatic ranks never exceed it.
    """
    for n, size in enumerate(x.shape):
        rest = math.prod(x.shape) // size
        if size > rest and (not fixed or ranks[n] is None or ranks[n] <= rest):
            q, r = np.linalg.qr(tl.unfold(x, n))
            new_shape = list(x.shape)
            new_shape[n] = rest
            return tl.fold(r, n, new_shape), n, q
    return x, None, None


def _initialise(
    x: np.ndarray, rank: int, ranks: list[int | None], init: str, tol: float, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    left: list[np.ndarray] = []
    right: list[np.ndarray | None] = []
    if init == "hosvd":
        # Tucker core of ranks L_n (min(I_n, R) if unconstrained) with a rank-R CP: A_n = U_n C_n.
        # The core's CP uses this module's ALS, not tensorly's parafac: R often exceeds the core's
        # other dimensions' product, and only the pseudo-inverse update copes with a singular Γ.
        sizes = [min(s, rank) if lr is None else lr for s, lr in zip(x.shape, ranks)]
        with warnings.catch_warnings():
            # L_n above an unfolding's rank: tensorly warns, then completes U_n orthonormally.
            warnings.filterwarnings("ignore", "Trying to compute SVD with n_eigenvecs")
            core, bases = tucker(x, rank=sizes, n_iter_max=0, init="svd")
        core = np.asarray(core)
        rng = np.random.default_rng(seed)
        best = math.inf
        for _ in range(_INIT_RESTARTS):
            trial = [rng.standard_normal((s, rank)) for s in sizes]
            nones: list[np.ndarray | None] = [None] * x.ndim
            err = _als(core, trial, nones, [None] * x.ndim, None, _INIT_CP_SWEEPS, tol)[0][-1]
            if err < best:
                best, coefs = err, trial
        for n, (u, c) in enumerate(zip(bases, coefs)):
            u = np.asarray(u)
            if ranks[n] is None:
                left.append(u @ c)
                right.append(None)
            else:
                left.append(u)
                right.append(c.T.copy())
    else:
        # A plain CP (every mode unconstrained, this module's ALS), each A_n projected to rank L_n.
        plain = _fit(x, rank, [None] * x.ndim, None, "hosvd", _INIT_CP_SWEEPS, tol, seed)
        for n, a in enumerate(plain.factors.absorbed(0).left):
            if ranks[n] is None:
                left.append(a)
                right.append(None)
            else:
                u, w, _ = _truncate(a, ranks[n])
                left.append(u)
                right.append(w.T.copy())
    return left, right


def _solve_mode(
    mttkrp: np.ndarray,
    gram: np.ndarray,
    norm_sq: float,
    factor_rank: int | None,
    budget: float | None,
) -> tuple[np.ndarray, np.ndarray | None, float, int | None]:
    """Best rank-L_n A_n for fixed other factors: (left, right, squared error, L_n used).

    With `budget` (ε²‖X‖²), L_n is the smallest rank meeting it, or unchanged if none can.
    """
    eigvals, eigvecs = np.linalg.eigh(gram)
    keep = eigvals > _EIG_RTOL * eigvals[-1]
    inv_sqrt = eigvecs[:, keep] / np.sqrt(eigvals[keep])  # Γ^{+1/2} = inv_sqrt @ eigvecs_keepᵀ
    t = mttkrp @ inv_sqrt  # the same singular values and norm as G Γ^{+1/2}
    ls_err = norm_sq - float(np.vdot(t, t))
    if factor_rank is None:
        return t @ inv_sqrt.T, None, ls_err, None
    sing = np.linalg.svd(t, compute_uv=False)
    # tails[L] = Σ_{i>L} σ_i² (1-based i), zero beyond the number of singular values.
    tails = np.concatenate([np.cumsum((sing**2)[::-1])[::-1], [0.0]])
    if budget is not None and budget - ls_err >= 0.0:
        feasible = np.nonzero(tails[1:] <= budget - ls_err)[0]
        factor_rank = int(feasible[0]) + 1
    u, w, _ = _truncate(t, factor_rank)
    return u, inv_sqrt @ w.T, ls_err + float(tails[min(factor_rank, sing.size)]), factor_rank


def _extrapolate(
    start: list[np.ndarray], left: list[np.ndarray], right: list[np.ndarray | None], step: float
) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """A_n + step·(A_n − A_n at sweep start), constrained modes projected back to rank L_n."""
    new_left: list[np.ndarray] = []
    new_right: list[np.ndarray | None] = []
    for a0, u, v in zip(start, left, right):
        a = _full(u, v)
        moved = a0 + step * (a - a0)
        if v is None:
            new_left.append(moved)
            new_right.append(None)
        else:
            u_new, w, _ = _truncate(moved, v.shape[1])
            new_left.append(u_new)
            new_right.append(w.T.copy())
    return new_left, new_right


def _error_sq(x: np.ndarray, norm_sq: float, full: list[np.ndarray]) -> float:
    """‖X − [[A_1, …, A_N]]‖² from one MTTKRP and the factors' Gram matrices."""
    last = x.ndim - 1
    inner = float(np.vdot(tl.tenalg.unfolding_dot_khatri_rao(x, (None, full), last), full[last]))
    gram = np.ones((full[0].shape[1],) * 2)
    for a in full:
        gram *= a.T @ a
    return norm_sq - 2.0 * inner + float(gram.sum())


def _truncate(m: np.ndarray, lr: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P_L(M) = U W with U (rows×L) orthonormal; W is zero-padded where rank(M) < L."""
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    if lr <= s.size:
        return u[:, :lr], s[:lr, None] * vt[:lr], s
    # L ≤ rows, so a full U completes the orthonormal basis; the extra rows of W stay zero.
    u_full = np.linalg.svd(m, full_matrices=True)[0]
    w = np.zeros((lr, m.shape[1]))
    w[: s.size] = s[:, None] * vt
    return u_full[:, :lr], w, s


def _full(u: np.ndarray, v: np.ndarray | None) -> np.ndarray:
    return u if v is None else u @ v.T


def _normalise_all(left: list[np.ndarray], right: list[np.ndarray | None]) -> np.ndarray:
    """Unit-norm columns in every A_n; returns λ, the product of the removed norms."""
    return np.prod([_normalise(left, right, m) for m in range(len(left))], axis=0)


def _normalise(left: list[np.ndarray], right: list[np.ndarray | None], m: int) -> np.ndarray:
    """Scale A_m's columns to unit norm (through V_m when factorised); return the old norms."""
    norms = np.linalg.norm(_full(left[m], right[m]), axis=0)
    safe = np.where(norms > 0, norms, 1.0)
    v = right[m]
    if v is None:
        left[m] = left[m] / safe
    else:
        right[m] = v / safe[:, None]
    return norms
