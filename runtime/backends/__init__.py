"""Runtime backends, one module per onnxruntime execution provider, registered by name.

Code that runs or times ONNX models takes a provider name once, turns it into a `Backend` with
`get_backend`, and asks the backend rather than comparing names. A new provider is one module
here plus one entry in `BACKENDS`.
"""

from __future__ import annotations

from rankfold.passes.core import ProviderError
from rankfold.runtime.backends.base import Backend
from rankfold.runtime.backends.cpu import CpuBackend
from rankfold.runtime.backends.cuda import CudaBackend

BACKENDS: dict[str, Backend] = {backend.name: backend for backend in (CpuBackend(), CudaBackend())}


def get_backend(name: str) -> Backend:
    """The backend `--provider name` means (case and surrounding spaces ignored); not checked
    for availability, which `Backend.check` does."""
    key = name.strip().lower()
    if key not in BACKENDS:
        raise ProviderError(
            f"unknown execution provider '{name}'; use one of: {', '.join(BACKENDS)}"
        )
    return BACKENDS[key]


__all__ = ["BACKENDS", "Backend", "CpuBackend", "CudaBackend", "get_backend"]
