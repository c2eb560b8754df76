"""The latency-budget calibration loop on modelled whole-model timings (no clock involved)."""

from __future__ import annotations

import math

import pytest

from rankfold.converter.calibration import (
    MAX_STEP,
    TOLERANCE,
    CalibrationRound,
    calibrate,
    next_request,
)
from rankfold.passes.core import PlanError


def power_law(scale: float, exponent: float):
    """Whole-model speedup `scale · requested^exponent`: fixed costs make it grow slower."""

    def measure(plan: str, requested: float) -> CalibrationRound:
        return CalibrationRound(math.nan, scale * requested**exponent)

    return measure


def test_next_request_steps():
    # One point: assume proportionality.
    assert next_request(2.0, [(2.0, 1.6)]) == pytest.approx(2.0 * 2.0 / 1.6)
    # Two points of a power law: the log-log secant lands on the target in one step.
    scale, k = 0.8, 0.7
    tried = [(q, scale * q**k) for q in (2.0, 3.0)]
    assert scale * next_request(2.0, tried) ** k == pytest.approx(2.0, rel=1e-12)
    # Steps are bounded, a slope flattened by noise falls back to proportionality, and a
    # latency budget always asks for some reduction.
    assert next_request(2.0, [(2.0, 0.5)]) == pytest.approx(2.0 * MAX_STEP)
    assert next_request(2.0, [(2.0, 1.6), (3.0, 1.6)]) == pytest.approx(3.0 * 2.0 / 1.6)
    assert next_request(1.1, [(1.1, 8.0)]) == pytest.approx(1.001)


def test_calibrate_meets_the_target_and_keeps_the_closest_plan():
    calls: list[float] = []

    def plan_for(requested: float) -> str:
        calls.append(requested)
        return f"plan@{requested:.4f}"

    result = calibrate(2.0, plan_for, power_law(0.8, 0.7), rounds=2)
    # 2 → 1.30× measured, proportional step to 3.08 → 1.757×, secant to 2.5^(1/0.7) → 2.00×.
    assert calls[0] == 2.0 and calls[1] == pytest.approx(2.0 * 2.0 / (0.8 * 2.0**0.7))
    assert result.requested == pytest.approx(2.5 ** (1 / 0.7), rel=1e-9)
    assert result.measured == pytest.approx(2.0, rel=1e-9)
    assert result.plan == f"plan@{result.requested:.4f}"
    assert [round(r.measured, 3) for r in result.rounds] == [1.3, 1.757, 2.0]

    # Out of rounds: the closest measured plan wins, not the last.
    noisy = iter([1.5, 2.6, 2.3])
    result = calibrate(2.0, plan_for, lambda plan, q: CalibrationRound(q, next(noisy)), rounds=2)
    assert [r.measured for r in result.rounds] == [1.5, 2.6, 2.3]
    assert result.measured == 2.3 and abs(2.3 / 2.0 - 1) > TOLERANCE

    # Already within tolerance: no re-plan.
    calls.clear()
    result = calibrate(2.0, plan_for, power_law(1.0, 1.0), rounds=2)
    assert calls == [2.0] and result.measured == 2.0


def test_calibrate_stops_where_no_plan_reaches_the_request():
    def plan_for(requested: float) -> str:
        if requested > 3.0:
            raise PlanError(f"{requested:.2f}× latency reduction is impossible")
        return "plan"

    result = calibrate(2.0, plan_for, power_law(0.5, 1.0), rounds=3)
    # 2 → 1.0×; doubling to 4 is out of reach: keep the measured plan and say why.
    assert [r.requested for r in result.rounds] == [2.0, 4.0]
    assert result.rounds[1].measured is None and "impossible" in result.rounds[1].error
    assert result.plan == "plan" and result.requested == 2.0 and result.measured == 1.0

    unreachable = calibrate(5.0, plan_for, power_law(0.5, 1.0), rounds=3)
    assert unreachable.plan is None and len(unreachable.rounds) == 1


def test_calibrate_stops_when_the_step_would_repeat_a_request():
    # A plateau (every plan measures the same) clamps the step to where it already was.
    calls: list[float] = []

    def plan_for(requested: float) -> str:
        calls.append(requested)
        return "plan"

    result = calibrate(1.05, plan_for, lambda plan, q: CalibrationRound(q, 4.0), rounds=5)
    assert calls == [1.05, 1.001] and result.measured == 4.0
