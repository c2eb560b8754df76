"""Orchestration: typed config, the pipeline (`compress`, `restore`) and the CLI.

Names are imported on first use (PEP 562), so `rankfold --help` loads neither torch nor
onnxruntime: the CLI module lives in this package.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CompressConfig": "config",
    "ExportConfig": "config",
    "LatencyConfig": "config",
    "build_config": "config",
    "Artifacts": "pipeline",
    "CompressionResult": "pipeline",
    "Report": "results",
    "Validation": "pipeline",
    "validate": "pipeline",
    "write_report": "pipeline",
    "compress": "pipeline",
    "restore": "pipeline",
    "run_compress": "pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rankfold.converter' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"rankfold.converter.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
