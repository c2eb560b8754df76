"""Latency-aware plan passes: revert blocks that are not faster, round ranks to fast multiples.

Both passes read measured times from a `TimingTable` (the layer's real input shape and batch, on
the deployment provider) and return a new Plan; the reasons say what was measured, so a report
shows why a layer was kept whole or why its rank moved.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from rankfold.passes.analysis import LayerInfo, ModelAnalysis
from rankfold.passes.core import ConfigError
from rankfold.passes.methods import Method, Ranks, get_method
from rankfold.passes.plan import LayerPlan, Plan

Batches = int | Sequence[int]
Progress = Callable[[str], None]
NO_DIFFERENCE = "no measurable difference"


def verdict(low: float | None, high: float | None) -> str:
    """ "faster" when a whole speedup interval lies above 1, "slower" below, else NO_DIFFERENCE
    (an interval that holds 1, or none: one sample cannot show a difference)."""
    if low is None or high is None:
        return NO_DIFFERENCE
    return "faster" if low > 1 else "slower" if high < 1 else NO_DIFFERENCE


def threads_text(threads: int | None) -> str:
    return "all cores" if threads is None else f"{threads} thread{'s' if threads > 1 else ''}"


class TimingTable(Protocol):
    """What the passes need of measured times; `rankfold.runtime.latency_model.LatencyTable` is
    one (passes import nothing of runtime, so they stay usable without onnxruntime)."""

    provider: str  # named in the reasons
    threads: int | None  # intra-op threads the times were taken at (None: all cores)

    def speedup_range(
        self, layer: LayerInfo, method_name: str, ranks: Sequence[int], batch: int
    ) -> tuple[float, float] | None:
        """The interval of layer time / block time, None when unknown."""

    def layer_ms(self, layer: LayerInfo, batch: int) -> float: ...

    def block_ms(
        self, layer: LayerInfo, method_name: str, ranks: Sequence[int], batch: int
    ) -> float: ...


def fmt_ms(value: float) -> str:
    """Milliseconds with two decimals, or three significant digits below 0.1 ms."""
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3g}"


def _batches(batch: Batches) -> list[int]:
    values = [batch] if isinstance(batch, int) else list(batch)
    if not values or any(int(b) < 1 for b in values):
        raise ConfigError(f"batch sizes must be positive integers, got {values}; pass e.g. 1,8")
    return [int(b) for b in values]


def gate_plan(
    plan: Plan,
    analysis: ModelAnalysis,
    table: TimingTable,
    batch: Batches,
    margin: float = 0.05,
    progress: Progress | None = None,
    min_efficiency: float = 0.0,
) -> Plan:
    """Revert every planned layer whose block is not at least `margin` faster than the layer.

    With `min_efficiency` > 0 a block must also turn its saved MACs into time: its speedup over
    the layer must be at least `min_efficiency` × its MAC reduction (a block 1.2× faster for 4×
    fewer MACs has efficiency 0.3), so the model's speedup tracks its MAC reduction.
    With several batch sizes a block must pass at each of them (the deployed model runs them
    all). A kept layer's reason gains the measured times; a reverted one is skipped with
    "reverted by latency gate: block X ms vs layer Y ms (batch B, provider)" at its worst batch.
    `progress(name)` is called once per planned layer.
    """
    if not 0 <= margin < 1:
        raise ConfigError(f"latency margin must lie in [0, 1), got {margin}; pass e.g. 0.05")
    if not 0 <= min_efficiency <= 1:
        raise ConfigError(
            f"minimum efficiency must lie in [0, 1], got {min_efficiency}; pass e.g. 0.9"
        )
    sizes = _batches(batch)
    layers = []
    for entry in plan.layers:
        if not entry.decompose:
            layers.append(entry)
            continue
        layer = analysis.layer(entry.name)
        if progress is not None:
            progress(entry.name)
        times = [
            (b, table.block_ms(layer, entry.method, entry.ranks, b), table.layer_ms(layer, b))
            for b in sizes
        ]
        worst_batch, block, original = max(times, key=lambda t: t[1] / t[2])
        where = f"batch {worst_batch}, {table.provider}, {threads_text(table.threads)}"
        spread = table.speedup_range(layer, entry.method, entry.ranks, worst_batch)
        # The times' own noise: a block within it is reported as such, not as a difference.
        noise = (
            ""
            if spread is None
            else f"; {NO_DIFFERENCE} ({spread[0]:.2f}–{spread[1]:.2f}×)"
            if verdict(*spread) == NO_DIFFERENCE
            else f"; {original / block:.2f}× ({spread[0]:.2f}–{spread[1]:.2f})"
        )
        mac_reduction = layer.macs / get_method(entry.method).cost(layer, entry.ranks).macs
        efficiency = original / block / mac_reduction
        if block > (1 - margin) * original or efficiency < min_efficiency:
            why = (
                ""
                if block > (1 - margin) * original
                else f"; {original / block:.2f}× faster for {mac_reduction:.2f}× fewer MACs, "
                f"efficiency {efficiency:.2f} < {min_efficiency:g}"
            )
            layers.append(
                LayerPlan(
                    name=entry.name,
                    type=entry.type,
                    reason=f"reverted by latency gate: block {fmt_ms(block)} ms vs layer "
                    f"{fmt_ms(original)} ms ({where}){noise}{why}",
                )
            )
        else:
            layers.append(
                entry.model_copy(
                    update={
                        "reason": f"{entry.reason}; latency {fmt_ms(block)} ms vs "
                        f"{fmt_ms(original)} ms ({where}){noise}"
                    }
                )
            )
    return plan.model_copy(update={"layers": layers})


def on_block(method: Method, layer: LayerInfo, ranks: Ranks, multiple: int) -> bool:
    """Every rank a multiple of `multiple`, or in a mode too small to hold one."""
    return all(
        value % multiple == 0 or limit < multiple
        for value, limit in zip(ranks, method.max_ranks(layer))
    )


def rounded_ranks(method: Method, layer: LayerInfo, ranks: Ranks, multiple: int) -> Ranks | None:
    """Each rank moved to its nearest multiple of `multiple` (ties upwards), or None.

    Nearest, not "whichever is faster": rounding down is nearly always faster (fewer MACs) and
    would quietly compress more than planned; nearest keeps the MAC budget on average. A rank
    already a multiple, or in a mode too small to hold one (e.g. 3 input channels), stays. When
    the nearest ranks exceed the method's maximum or do not make the layer smaller (in params
    and MACs), the multiples below are used instead; None when nothing valid differs from
    `ranks`.
    """
    nearest, below = [], []
    for value, limit in zip(ranks, method.max_ranks(layer)):
        if value % multiple == 0 or limit < multiple:
            nearest.append(value)
            below.append(value)
            continue
        low = max(value // multiple * multiple, multiple)
        high = low + multiple if value > low else low
        up = high if high <= limit and high - value <= value - low else low
        nearest.append(up)
        below.append(low)
    for candidate in (tuple(nearest), tuple(below)):
        if method.shrinks(layer, candidate):
            return None if candidate == tuple(ranks) else candidate
    return None


def round_ranks(
    plan: Plan,
    analysis: ModelAnalysis,
    table: TimingTable,
    multiple: int,
    batch: Batches,
    progress: Progress | None = None,
) -> Plan:
    """Per planned layer, move to the rounded ranks (see `rounded_ranks`) when measured faster.

    The rounded block must be faster than the planned one at every batch size; the reason
    records the move and both times. Only the planned and the rounded ranks are timed.
    `progress(name)` is called once per planned layer.
    """
    if multiple < 2:
        raise ConfigError(f"--round-to must be an integer >= 2 (e.g. 8 or 16), got {multiple}")
    sizes = _batches(batch)
    layers = []
    for entry in plan.layers:
        if not entry.decompose:
            layers.append(entry)
            continue
        layer = analysis.layer(entry.name)
        if progress is not None:
            progress(entry.name)
        method = get_method(entry.method)
        planned = tuple(entry.ranks)
        candidate = rounded_ranks(method, layer, planned, multiple)
        if candidate is None:
            layers.append(entry)
            continue
        base = {b: table.block_ms(layer, method.name, planned, b) for b in sizes}
        times = {b: table.block_ms(layer, method.name, candidate, b) for b in sizes}
        if not all(times[b] < base[b] for b in sizes):
            layers.append(entry)
            continue
        first = sizes[0]
        layers.append(
            entry.model_copy(
                update={
                    "ranks": list(candidate),
                    "reason": f"{entry.reason}; rounded {list(planned)} → {list(candidate)} "
                    f"(multiple of {multiple}): {fmt_ms(times[first])} ms vs "
                    f"{fmt_ms(base[first])} ms (batch {first}, {table.provider}, "
                    f"{threads_text(table.threads)})",
                }
            )
        )
    return plan.model_copy(update={"layers": layers})
