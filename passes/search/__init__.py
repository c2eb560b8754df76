"""Data-driven rank search: calibration data, the decomposition cache, trial evaluation, and
optuna storages. The searches themselves are selectors (`rankfold.passes.selectors`:
eps_search, pars).

A trial is a choice of ranks for every budgeted layer. Evaluating one costs graph surgery from
cached blocks, BatchNorm recalibration (per-channel bias correction for BN-free models) and one
forward pass over a calibration split.
"""

from rankfold.passes.search.cache import CachedBlock, DecompositionCache, default_cache_dir
from rankfold.passes.search.calibration import Calibration
from rankfold.passes.search.config import SearchConfig
from rankfold.passes.search.evaluator import (
    Evaluator,
    SearchContext,
    proxy_value,
    slot_choices,
    spawn_context,
    weights_digest,
)
from rankfold.passes.search.storage import (
    HOST,
    check_storage,
    fail_orphaned_trials,
    journal_lease,
    journal_path,
    open_storage,
    redacted,
)

__all__ = [
    "HOST",
    "CachedBlock",
    "Calibration",
    "DecompositionCache",
    "Evaluator",
    "SearchConfig",
    "SearchContext",
    "default_cache_dir",
    "check_storage",
    "fail_orphaned_trials",
    "journal_lease",
    "journal_path",
    "open_storage",
    "proxy_value",
    "redacted",
    "slot_choices",
    "spawn_context",
    "weights_digest",
]
