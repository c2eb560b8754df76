"""Cross-cutting basics every sub-package uses: typed errors, atomic writes, hardware facts.

This module imports nothing else of rankfold, so `converter`, `runtime`, `models` and `passes` can
all depend on it without the sub-packages depending on each other (dependencies run one way:
converter → runtime → passes, converter → models).

Errors: every message is one line that names the problem and the fix; the CLI prints it as is and
exits non-zero, so no stage needs its own error formatting.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
import platform
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


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


class SymbolicTraceError(TraceError):
    """torch.fx's symbolic trace stopped at Python control flow on a traced value; the capture
    path (forward hooks, torch.export) may still compress the model."""

    def __init__(self, problem: str, fix: str, module: str | None) -> None:
        super().__init__(f"{problem}; {fix}")
        self.problem = problem  # what fx refused, without the fix
        self.module = module  # the innermost module fx was tracing (None: the top level)


class PlanError(RankfoldError):
    """Impossible rank or budget."""


class DecompositionError(RankfoldError):
    """A factorization or graph-surgery step failed on a named layer."""


class ExportError(RankfoldError):
    """ONNX export or checking failed."""

    def __init__(
        self,
        message: str,
        module: str | None = None,
        reason: str | None = None,
        data_dependent: bool = False,
    ) -> None:
        super().__init__(message)
        self.module = module  # the submodule the exporter failed in ("": the top level)
        self.reason = reason  # the root cause, one line, without the fix
        self.data_dependent = data_dependent  # a Python branch on tensor values stopped it


class ValidationError(RankfoldError):
    """The exported model does not match PyTorch within tolerance."""


class ProviderError(RankfoldError):
    """The requested onnxruntime execution provider is not available."""


class OutputError(RankfoldError):
    """The output location cannot be written."""


# --------------------------------------------------------------------------- atomic files


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.
    A device or a pipe (/dev/null, /dev/stdout, a FIFO) is yielded itself, written in place:
    a rename would put a regular file where it was."""
    target = Path(path)
    if target.exists() and not target.is_file() and not target.is_dir():
        yield target
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise OutputError(
            f"cannot write to {target.parent} ({exc.strerror}); choose a writable output directory"
        ) from None
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; give the final file the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


# --------------------------------------------------------------------------- hardware facts


@cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this CPU (empty where /proc/cpuinfo is not readable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


@cache
def cpu_model() -> str:
    """The CPU's model name, for keying measured times to the machine."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


# --------------------------------------------------------------------------- plug-in registries


class Registry(dict[str, T]):
    """Named plug-ins of one kind (methods, selectors): the built-in ones, then those installed
    packages declare in an entry-point group. A plug-in that fails to load is recorded in
    `errors`, not fatal: the others keep working and listings say why it is missing."""

    def __init__(self, kind: str, base: type, group: str) -> None:
        super().__init__()
        self.kind, self.base, self.group = kind, base, group
        self.errors: dict[str, str] = {}

    def register(self, item: T) -> T:
        self[item.name] = item
        return item

    def get_named(self, name: str) -> T:
        """The plug-in called `name`, or a ConfigError with the closest name and the choices."""
        if name in self:
            return self[name]
        if name in self.errors:
            raise ConfigError(f"{self.kind} '{name}' failed to load: {self.errors[name]}")
        close = difflib.get_close_matches(name, self, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown {self.kind} '{name}'{hint}; choose one of {', '.join(self)}")

    def load_entry_points(self) -> None:
        for entry in entry_points(group=self.group):
            try:
                loaded = entry.load()
                item = loaded() if isinstance(loaded, type) else loaded
                if not isinstance(item, self.base):
                    raise TypeError(f"{entry.value} is not a rankfold {self.base.__name__}")
            except Exception as exc:  # a broken third-party package must not break rankfold
                self.errors[entry.name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
                continue
            self.register(item)


# --------------------------------------------------------------------------- lazy package exports


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable, Callable]:
    """PEP 562 `__getattr__` and `__dir__` for `package`, whose names (name → submodule) load on
    first use, so importing one light submodule does not import torch through the package."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module '{package}' has no attribute '{name}'")
        value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__


def import_gated(gate: Any, module: str) -> None:
    """A worker process's initializer: import `module` holding `gate` (a multiprocessing
    semaphore shared by processes started together, or None), so that only so many load at a
    time."""
    if gate is None:
        importlib.import_module(module)
        return
    with gate:
        importlib.import_module(module)
