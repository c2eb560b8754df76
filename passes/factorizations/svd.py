"""Truncated SVD of a matrix: M (m×n) ≈ U (m×R) · V (R×n).

For a Linear layer (out×in) or a conv kernel unfolded as T×(S·kh·kw), the pair becomes two layers:
first V (in→R, carrying the kernel's spatial extent), then U (R→out, carrying the bias).
Params: R·(m + n) instead of m·n; MACs per output position scale the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SVDFactors:
    left: np.ndarray  # m×R, singular values absorbed (√σ on each side keeps the factors balanced)
    right: np.ndarray  # R×n

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    def reconstruct(self) -> np.ndarray:
        return self.left @ self.right

    def rel_error(self, matrix: np.ndarray) -> float:
        return float(
            np.linalg.norm(matrix - self.reconstruct()) / max(np.linalg.norm(matrix), 1e-300)
        )


def truncated_svd(matrix: np.ndarray, rank: int) -> SVDFactors:
    """Best rank-`rank` approximation in Frobenius norm (Eckart–Young)."""
    if matrix.ndim != 2:
        raise ValueError(f"truncated_svd expects a matrix, got shape {matrix.shape}")
    if not 1 <= rank <= min(matrix.shape):
        raise ValueError(
            f"SVD rank {rank} is outside [1, {min(matrix.shape)}] for shape {matrix.shape}"
        )
    u, s, vt = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
    root = np.sqrt(s[:rank])
    return SVDFactors(left=u[:, :rank] * root, right=root[:, None] * vt[:rank])


def singular_values(matrix: np.ndarray) -> np.ndarray:
    return np.linalg.svd(matrix.astype(np.float64), compute_uv=False)
