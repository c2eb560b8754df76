"""ONNX export, checking, onnxruntime parity, accuracy and latency."""

from __future__ import annotations

from rankfold.runtime.backends import BACKENDS, Backend, get_backend
from rankfold.runtime.export import check_onnx, export_onnx, read_metadata, stamp_metadata
from rankfold.runtime.latency import (
    LatencyResult,
    SideBySide,
    compare_latency,
    measure_latency,
    time_side_by_side,
)
from rankfold.runtime.quantize import (
    CALIBRATION_METHODS,
    QuantizedModel,
    SensitiveChoice,
    SensitiveSearch,
    quantize_int8,
)
from rankfold.runtime.session import create_session
from rankfold.runtime.validate import (
    AgreementReport,
    ParityReport,
    agreement_error,
    check_agreement,
    check_parity,
    onnx_accuracy,
    parity_error,
    torch_accuracy,
)

__all__ = [
    "BACKENDS",
    "CALIBRATION_METHODS",
    "AgreementReport",
    "QuantizedModel",
    "SensitiveChoice",
    "SensitiveSearch",
    "SideBySide",
    "agreement_error",
    "check_agreement",
    "quantize_int8",
    "time_side_by_side",
    "Backend",
    "LatencyResult",
    "ParityReport",
    "check_onnx",
    "check_parity",
    "compare_latency",
    "create_session",
    "export_onnx",
    "read_metadata",
    "stamp_metadata",
    "get_backend",
    "measure_latency",
    "onnx_accuracy",
    "parity_error",
    "torch_accuracy",
]
