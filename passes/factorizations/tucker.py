"""Tucker-2 of a conv kernel on its two channel modes.

W (T×S×kh×kw) ≈ core (R_T×R_S×kh×kw) ×₁ U_T (T×R_T) ×₂ U_S (S×R_S), which is the layer chain
1×1 conv S→R_S (weights U_Sᵀ), kh×kw conv R_S→R_T (the core, original stride/padding/dilation),
1×1 conv R_T→T (weights U_T, original bias).
Params: S·R_S + R_S·R_T·kh·kw + R_T·T.  MACs: H_in·W_in·S·R_S + H_out·W_out·(R_S·R_T·kh·kw + R_T·T).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import tensorly as tl
from tensorly.decomposition import partial_tucker


@dataclass(frozen=True)
class Tucker2Factors:
    core: np.ndarray  # R_T×R_S×kh×kw
    out_factor: np.ndarray  # T×R_T
    in_factor: np.ndarray  # S×R_S

    @property
    def ranks(self) -> tuple[int, int]:
        return self.out_factor.shape[1], self.in_factor.shape[1]

    def reconstruct(self) -> np.ndarray:
        return np.einsum("abhw,ta,sb->tshw", self.core, self.out_factor, self.in_factor)

    def rel_error(self, kernel: np.ndarray) -> float:
        return float(
            np.linalg.norm(kernel - self.reconstruct()) / max(np.linalg.norm(kernel), 1e-300)
        )


def tucker2(kernel: np.ndarray, rank_out: int, rank_in: int, seed: int = 0) -> Tucker2Factors:
    """HOOI on modes 0 (T) and 1 (S) via tensorly's `partial_tucker`, SVD-initialised."""
    t, s = kernel.shape[:2]
    if not (1 <= rank_out <= t and 1 <= rank_in <= s):
        raise ValueError(f"Tucker-2 ranks ({rank_out}, {rank_in}) must lie in [1, {t}] × [1, {s}]")
    with warnings.catch_warnings():
        # A rank above the other mode's rank × kernel area is clamped by tensorly; harmless.
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        (core, (out_factor, in_factor)), _ = partial_tucker(
            tl.tensor(kernel.astype(np.float64)),
            rank=[rank_out, rank_in],
            modes=[0, 1],
            init="svd",
            n_iter_max=100,
            tol=1e-8,
            random_state=seed,
        )
    return Tucker2Factors(
        core=np.asarray(core), out_factor=np.asarray(out_factor), in_factor=np.asarray(in_factor)
    )
