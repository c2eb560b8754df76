"""Named settings for common goals: the lowest layer of a run (preset < config file < options)."""

from __future__ import annotations

import difflib
from typing import Any

from rankfold.passes.core import ConfigError

# name → (one-line goal, settings in the config file's shape)
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "fast": (
        "2× fewer MACs, uniform ranks, latency gate on: faster on this machine, not only smaller",
        {"ranks": {"select": "uniform", "macs_reduction": 2.0}, "latency": {"gate": True}},
    ),
    "small": (
        "4× fewer parameters, uniform ranks",
        {"ranks": {"select": "uniform", "params_reduction": 4.0}},
    ),
    "accurate": (
        "2× fewer MACs chosen by energy, then 5 epochs of distilled fine-tuning (needs "
        "--train-data)",
        {"ranks": {"select": "energy", "macs_reduction": 2.0}, "finetune": {"epochs": 5}},
    ),
}


def preset_settings(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"choose one of {', '.join(PRESETS)}"
        raise ConfigError(f"--preset '{name}' is unknown; {hint}")
    return PRESETS[name][1]


def describe() -> str:
    return "; ".join(f"{name}: {goal}" for name, (goal, _) in PRESETS.items())
