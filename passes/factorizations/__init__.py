"""Factorizations as pure functions on weight tensors (float64 NumPy in, small result objects out).

Nothing here knows about torch.nn or graphs; `rankfold.passes.blocks` builds the layers.
"""

from rankfold.passes.factorizations.cp import CPFactors, cp_als, cp_sensitivity
from rankfold.passes.factorizations.epc import (
    EPCResult,
    Tucker2CPFactors,
    cp_epc,
    max_cp_rank,
    tucker2_cp,
)
from rankfold.passes.factorizations.lrf_cp import LRFCPFactors, LRFCPResult, lrf_cp, lrf_cp_auto
from rankfold.passes.factorizations.svd import SVDFactors, truncated_svd
from rankfold.passes.factorizations.tucker import Tucker2Factors, tucker2

__all__ = [
    "CPFactors",
    "EPCResult",
    "Tucker2CPFactors",
    "cp_epc",
    "max_cp_rank",
    "tucker2_cp",
    "LRFCPFactors",
    "LRFCPResult",
    "lrf_cp",
    "lrf_cp_auto",
    "SVDFactors",
    "Tucker2Factors",
    "cp_als",
    "cp_sensitivity",
    "truncated_svd",
    "tucker2",
]
