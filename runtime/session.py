"""onnxruntime session creation on a backend chosen by provider name."""

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

from rankfold.passes.core import ExportError, ValidationError
from rankfold.runtime.backends import get_backend

_LOAD_ERRORS = (
    Fail,
    InvalidArgument,
    InvalidGraph,
    InvalidProtobuf,
    NoSuchFile,
    NotImplemented,
    RuntimeException,
)


def create_session(
    path: str | Path, provider: str = "cpu", threads: int | None = None
) -> onnxruntime.InferenceSession:
    """A session on `path` on the `provider` backend, with its session options for `threads`."""
    backend = get_backend(provider)
    backend.check()
    file = Path(path)
    if not file.is_file():
        raise ExportError(f"ONNX file {file} not found; export the model first")
    options = backend.session_options(threads)
    try:
        session = onnxruntime.InferenceSession(
            str(file), options, providers=list(backend.providers)
        )
    except _LOAD_ERRORS as exc:
        message = " ".join(str(exc).split())
        raise ExportError(
            f"onnxruntime cannot load {file}: {message}; re-export the model (the file may be "
            "truncated or not an ONNX model)"
        ) from None
    backend.check_session(session)
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
