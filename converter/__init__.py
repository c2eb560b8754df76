"""Orchestration: typed config, the pipeline (`compress`, `restore`) and the CLI."""

from rankfold.converter.config import CompressConfig, ExportConfig, LatencyConfig, build_config
from rankfold.converter.pipeline import CompressionResult, compress, restore, run_compress

__all__ = [
    "CompressConfig",
    "CompressionResult",
    "ExportConfig",
    "LatencyConfig",
    "build_config",
    "compress",
    "restore",
    "run_compress",
]
