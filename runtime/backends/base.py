"""What a runtime backend is: one onnxruntime execution provider, and what timings on it need."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import ClassVar

import onnxruntime

from rankfold.passes.core import ConfigError, ProviderError, cpu_model


class Backend(ABC):
    """An onnxruntime execution provider: how sessions open on it, which rank multiple it runs
    fastest (`--round-to auto`) and which facts of the machine its timings depend on."""

    name: ClassVar[str]  # what --provider takes
    label: ClassVar[str]  # the provider's name in messages
    providers: ClassVar[tuple[str, ...]]  # onnxruntime providers, preferred first
    device: ClassVar[str]  # the OrtValue device I/O binding keeps inputs and outputs on
    # Convs run in a blocked channel layout converted to at the model's edges only, so a lone
    # conv probe is timed between stand-in neighbours (rankfold.runtime.latency_model).
    blocked_layout: ClassVar[bool]
    install_hint: ClassVar[str]  # the fix when this onnxruntime build lacks the provider
    start_hint: ClassVar[str]  # why a provider the build has may not start, and the fix

    def check(self) -> None:
        """Raise ProviderError when this onnxruntime build lacks the provider."""
        available = onnxruntime.get_available_providers()
        if self.providers[0] not in available:
            raise ProviderError(
                f"onnxruntime here has no {self.label} execution provider "
                f"(available: {', '.join(available)}); {self.install_hint}"
            )

    def check_session(self, session: onnxruntime.InferenceSession) -> None:
        """Raise ProviderError when `session` silently runs on another provider than this one."""
        if self.providers[0] not in session.get_providers():
            raise ProviderError(
                f"onnxruntime could not start its {self.label} execution provider (it fell back "
                f"to {', '.join(session.get_providers())}); {self.start_hint}"
            )

    def session_options(self, threads: int | None = None) -> onnxruntime.SessionOptions:
        """All graph optimisations, errors-only logging, `threads` intra-op threads if given."""
        if threads is not None and threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}; pass a positive thread count")
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Errors only: onnxruntime's load-time warnings (e.g. unused initializers) are not
        # actionable.
        options.log_severity_level = 3
        if threads is not None:
            options.intra_op_num_threads = threads
        return options

    @abstractmethod
    def channel_block(self) -> int | None:
        """The rank multiple `--round-to auto` aligns to; None where no multiple runs faster."""

    def machine_id(self) -> dict[str, str | int]:
        """What timings depend on besides the graph: CPU model, cores, onnxruntime version."""
        return {
            "cpu": cpu_model(),
            "cores": os.cpu_count() or 1,
            "onnxruntime": onnxruntime.__version__,
        }
