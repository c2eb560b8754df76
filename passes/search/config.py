"""Settings of the data-driven selectors (eps-search, pars) and of the decomposition cache."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SearchConfig(BaseModel):
    """Settings of the data-driven selectors (eps-search, pars) and of the decomposition cache."""

    model_config = ConfigDict(extra="forbid")

    trials: int = Field(default=100, ge=1)
    sampler: Literal["gp", "tpe"] = "gp"
    proxy: Literal["accuracy", "agreement", "kd"] = "accuracy"
    storage: str | None = None  # optuna RDB URL, or journal:PATH / PATH.log for a journal file
    study_name: str | None = None
    workers: int = Field(default=1, ge=1)
    heartbeat: int = Field(default=10, ge=1)  # seconds; a trial silent for 3 is failed, redone
    calib_samples: int = Field(default=1024, ge=1)  # images the proxy is scored on
    bn_samples: int = Field(default=512, ge=1)  # images BatchNorm is recalibrated on
    batch_size: int = Field(default=128, ge=1)
    cache_dir: Path | None = None  # default: $RANKFOLD_CACHE or ~/.cache/rankfold/decompositions
    timeout: float | None = Field(default=None, gt=0)  # seconds; no new trial starts after it
