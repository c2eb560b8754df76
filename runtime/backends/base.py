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
        """All graph optimisations, errors-only logging, no thread-pool spinning, `threads`
        intra-op threads if given."""
        if threads is not None and threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}; pass a positive thread count")
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Errors only: onnxruntime's load-time warnings (e.g. unused initializers) are not
        # actionable.
        options.log_severity_level = 3
        if threads is not None:
            options.intra_op_num_threads = threads
        # Idle pool threads sleep instead of spinning between ops: a factorized model runs
        # three small ops per layer, and spinning workers then take the cores the next op
        # (and other processes) need. ResNet-56 CP at 3×, 2 threads, busy 2-core VM: 17.3 →
        # 6.0 ms at batch 1 (original 12.3 → 8.2 ms); BENCHMARKS.md, "Threads".
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
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
