"""User-facing errors, typed by pipeline stage.

Every error's message is one line that names the problem and the fix; the CLI prints it as is and
exits non-zero, so no stage needs its own error formatting.
"""

from __future__ import annotations


class RankfoldError(Exception):
    """Base class: `str(error)` is one line that says what is wrong and what to do."""


class ConfigError(RankfoldError):
    """Invalid configuration or command-line option."""


class ModelLoadError(RankfoldError):
    """Unknown model, missing or corrupt checkpoint, mismatched keys, non-finite weights."""


class DataError(RankfoldError):
    """Data file missing, malformed, of the wrong shape, or with labels out of range."""


class TraceError(RankfoldError):
    """torch.fx could not trace the model."""


class PlanError(RankfoldError):
    """Impossible rank or budget."""


class DecompositionError(RankfoldError):
    """A factorization or graph-surgery step failed on a named layer."""


class ExportError(RankfoldError):
    """ONNX export or checking failed."""


class ValidationError(RankfoldError):
    """The exported model does not match PyTorch within tolerance."""


class ProviderError(RankfoldError):
    """The requested onnxruntime execution provider is not available."""


class OutputError(RankfoldError):
    """The output location cannot be written."""
