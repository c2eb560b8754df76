"""onnxruntime execution providers and session creation."""

from __future__ import annotations

from pathlib import Path

import onnxruntime
from onnxruntime.capi.onnxruntime_pybind11_state import (
    Fail,
    InvalidArgument,
    InvalidGraph,
    InvalidProtobuf,
    NoSuchFile,
    NotImplemented,
    RuntimeException,
)

from rankfold.passes.core import ConfigError, ExportError, ProviderError, ValidationError

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    # CPU stays listed after CUDA so ops without a CUDA kernel still run.
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}

_LOAD_ERRORS = (
    Fail,
    InvalidArgument,
    InvalidGraph,
    InvalidProtobuf,
    NoSuchFile,
    NotImplemented,
    RuntimeException,
)


def resolve_providers(provider: str) -> list[str]:
    """Map "cpu"/"cuda" to onnxruntime provider names, checking this onnxruntime build has them."""
    key = provider.strip().lower()
    if key not in PROVIDERS:
        raise ProviderError(
            f"unknown execution provider '{provider}'; use one of: {', '.join(PROVIDERS)}"
        )
    available = onnxruntime.get_available_providers()
    if key == "cuda" and "CUDAExecutionProvider" not in available:
        raise ProviderError(
            "onnxruntime here has no CUDA execution provider "
            f"(available: {', '.join(available)}); install the gpu extra "
            "(pip install 'rankfold[gpu]', i.e. onnxruntime-gpu) on a machine with an NVIDIA GPU, "
            "or use --provider cpu"
        )
    return list(PROVIDERS[key])


def create_session(
    path: str | Path, provider: str = "cpu", threads: int | None = None
) -> onnxruntime.InferenceSession:
    """A session on `path` with all graph optimisations and `threads` intra-op threads."""
    providers = resolve_providers(provider)
    file = Path(path)
    if not file.is_file():
        raise ExportError(f"ONNX file {file} not found; export the model first")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}; pass a positive thread count")
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Errors only: onnxruntime's load-time warnings (e.g. unused initializers) are not actionable.
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        session = onnxruntime.InferenceSession(str(file), options, providers=providers)
    except _LOAD_ERRORS as exc:
        message = " ".join(str(exc).split())
        raise ExportError(
            f"onnxruntime cannot load {file}: {message}; re-export the model (the file may be "
            "truncated or not an ONNX model)"
        ) from None
    if (
        "CUDAExecutionProvider" in providers
        and "CUDAExecutionProvider" not in session.get_providers()
    ):
        # onnxruntime-gpu lists CUDA as available but falls back to CPU, with only a log line,
        # when the CUDA/cuDNN libraries it was built against cannot be loaded.
        raise ProviderError(
            "onnxruntime could not start its CUDA execution provider (CUDA or cuDNN libraries "
            "missing or of the wrong version for this onnxruntime-gpu); install the CUDA/cuDNN "
            "versions onnxruntime-gpu requires, or use --provider cpu"
        )
    return session


def single_input_name(session: onnxruntime.InferenceSession, path: str | Path) -> str:
    """The name of the session's only input (rankfold models take one image tensor)."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ValidationError(
            f"{path} has {len(inputs)} inputs; rankfold runs single-input image classifiers, "
            "export the model with one image input"
        )
    return inputs[0].name
