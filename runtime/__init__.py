"""ONNX export, checking, onnxruntime parity, accuracy and latency."""

from __future__ import annotations

from rankfold.runtime.export import check_onnx, export_onnx
from rankfold.runtime.latency import LatencyResult, compare_latency, measure_latency
from rankfold.runtime.providers import create_session, resolve_providers
from rankfold.runtime.validate import (
    ParityReport,
    check_parity,
    onnx_accuracy,
    parity_error,
    torch_accuracy,
)

__all__ = [
    "LatencyResult",
    "ParityReport",
    "check_onnx",
    "check_parity",
    "compare_latency",
    "create_session",
    "export_onnx",
    "measure_latency",
    "onnx_accuracy",
    "parity_error",
    "resolve_providers",
    "torch_accuracy",
]
