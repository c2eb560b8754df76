"""Orchestration: typed config, the pipeline (`compress`, `restore`) and the CLI.

Names are imported on first use (PEP 562), so `rankfold --help` loads neither torch nor
onnxruntime: the CLI module lives in this package.
"""

from __future__ import annotations

from rankfold.passes.core import lazy_exports

_EXPORTS = {
    "CompressConfig": "config",
    "ExportConfig": "config",
    "LatencyConfig": "config",
    "QuantizeConfig": "config",
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
    "TaskMetric": "metric",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
