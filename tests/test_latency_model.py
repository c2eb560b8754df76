"""Latency model, latency gate, rank rounding and the bench table (rankfold issue #7)."""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from onnx import numpy_helper
from planning_helpers import plan_of
from torch import nn
from torch.nn import functional as F

from rankfold.passes import RankPolicy, analyze, plan_cost, trace
from rankfold.passes.analysis import LayerInfo, ModelAnalysis
from rankfold.passes.blocks import FactorizedBlock, pointwise, spatial_like
from rankfold.passes.core import ConfigError, ProviderError
from rankfold.passes.latency_gate import gate_plan, round_ranks, rounded_ranks
from rankfold.passes.methods import METHODS, CPMethod, get_method
from rankfold.passes.plan import LayerPlan, Plan
from rankfold.runtime import export_onnx, get_backend
from rankfold.runtime.latency import (
    BENCH_COLUMNS,
    LatencyResult,
    bench_providers,
    bench_rows,
    format_bench_row,
    onnx_macs,
)
from rankfold.runtime.latency_model import (
    CHAIN_MACS,
    CONTEXT_IN,
    CONTEXT_OUT,
    MAX_COPIES,
    MAX_EFFICIENCY,
    SESSIONS,
    LatencyMetric,
    LatencyTable,
    chain_copies,
    layer_module,
    module_to_onnx,
)


def conv_layer(
    name: str = "conv",
    channels: tuple[int, int] = (16, 16),
    hw: int = 16,
    kernel: int = 3,
    **geometry,
) -> LayerInfo:
    """The LayerInfo `analyze` gives a conv with this geometry (padding k//2 unless given)."""
    conv = nn.Conv2d(*channels, kernel, **{"padding": kernel // 2, **geometry})
    (layer,) = analyze(trace(nn.Sequential(conv), torch.zeros(1, channels[0], hw, hw))).layers
    return dataclasses.replace(layer, name=name)


def one_layer_analysis(layer: LayerInfo) -> ModelAnalysis:
    return ModelAnalysis((layer,), layer.params, layer.macs)


def plan_for(layer: LayerInfo, method: str, ranks: list[int]) -> Plan:
    entry = LayerPlan(name=layer.name, type=layer.type, method=method, ranks=ranks, reason="test")
    return Plan(model="m", method=method, layers=[entry])


@pytest.fixture
def table(tmp_path: Path) -> LatencyTable:
    return LatencyTable("cpu", cache_dir=tmp_path / "cache", threads=1, repeats=3)


class FakeTable:
    """Deterministic times: a layer costs 1 ms; a block's time is given per ranks."""

    provider = "fake"
    threads = 1

    def __init__(self, times: dict[tuple[int, ...], float], default: float = 0.5) -> None:
        self.times, self.default = times, default
        self.calls: list[tuple] = []

    def layer_ms(self, layer: LayerInfo, batch: int) -> float:
        return 1.0

    def block_ms(self, layer: LayerInfo, method: str, ranks, batch: int) -> float:
        self.calls.append((method, tuple(ranks), batch))
        return self.times.get(tuple(ranks), self.default) * (1 + 0.1 * (batch > 1))

    def speedup_range(self, layer: LayerInfo, method: str, ranks, batch: int):
        return None  # no samples: the reasons carry no interval


class LinearTable(FakeTable):
    """A block costs 0.01 ms per unit of its first rank."""

    def __init__(self) -> None:
        super().__init__({})

    def block_ms(self, layer: LayerInfo, method: str, ranks, batch: int) -> float:
        self.calls.append((method, tuple(ranks), batch))
        return 0.01 * ranks[0]


# --- probe graphs -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp"])
@pytest.mark.parametrize(
    "geometry",
    [
        {"stride": (2, 2)},
        {"dilation": (2, 2), "padding": "same", "padding_mode": "reflect"},
        {"padding": (1, 1), "padding_mode": "circular"},
    ],
)
def test_probe_graph_computes_what_the_block_computes(method: str, geometry: dict) -> None:
    layer = conv_layer(channels=(6, 10), hw=9, bias=True, **geometry)
    torch.manual_seed(0)
    modules = [
        layer_module(layer),
        get_method(method).build(layer, (3,) * 2 if method == "tucker2" else (4,)),
    ]
    x = torch.randn(2, *layer.in_shape)
    for module in modules:
        module.eval()
        probe = module_to_onnx(module, layer.in_shape)
        # Opset 19's IR version (9), not the onnx package's newest: an onnxruntime older than
        # the onnx package (IR 14 against its 13, seen on a GPU machine) loads it.
        assert probe.ir_version == 9
        session = onnxruntime.InferenceSession(
            probe.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        actual = session.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            expected = module(x).numpy()
        assert actual.shape == expected.shape
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5)


def test_context_probe_is_the_block_between_two_depthwise_convs(table: LatencyTable) -> None:
    """A conv is timed between stand-ins for its neighbours (a depthwise 1×1 conv each side);
    the context's own time, timed per shape, is what the table takes off."""
    layer = conv_layer(channels=(16, 32), hw=8, stride=2)
    block = get_method("cp").build(layer, (16,)).eval()
    probe = module_to_onnx(block, layer.in_shape, context=True)
    convs = [node for node in probe.graph.node if node.op_type == "Conv"]
    assert [node.name for node in convs[:: len(convs) - 1]] == [CONTEXT_IN, CONTEXT_OUT]
    assert [c.attribute[0].i for c in (convs[0], convs[-1])] == [16, 32]  # depthwise groups
    weights = {i.name: numpy_helper.to_array(i).copy() for i in probe.graph.initializer}
    x = torch.randn(2, *layer.in_shape)
    with torch.no_grad():
        inner = F.conv2d(x, torch.from_numpy(weights[f"{CONTEXT_IN}.w"]), groups=16)
        expected = F.conv2d(block(inner), torch.from_numpy(weights[f"{CONTEXT_OUT}.w"]), groups=32)
    session = onnxruntime.InferenceSession(
        probe.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    actual = session.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(actual, expected.numpy(), rtol=0, atol=1e-5)
    # The context is timed once per shape and batch, then read from the cache.
    around = table.context_ms(layer.in_shape, layer.out_shape, 1)
    measured = table.measured
    assert around > 0 and table.context_ms(layer.in_shape, layer.out_shape, 1) == around
    assert table.measured == measured and len(table.entries) == 2
    # Linear layers have no layout to keep: their probes carry no context.
    linear = module_to_onnx(nn.Linear(12, 3), (12,), context=True)
    assert [node.op_type for node in linear.graph.node] == ["Gemm"]


def test_a_small_shape_keeping_layer_is_timed_as_a_chain_of_copies() -> None:
    """Its probe chains copies (each with its own weights) for CHAIN_MACS of work at most
    MAX_COPIES; a layer that changes the shape, or is large enough alone, is one copy."""
    small = conv_layer(channels=(16, 16), hw=8)  # 147,456 MACs
    assert chain_copies(small, 1) == MAX_COPIES
    assert chain_copies(conv_layer(channels=(64, 64), hw=8), 1) == CHAIN_MACS // 2_359_296
    assert chain_copies(conv_layer(channels=(64, 64), hw=8), 8) == 1
    assert chain_copies(conv_layer(channels=(16, 32), hw=8), 1) == 1  # changes the channels
    assert chain_copies(conv_layer(channels=(16, 16), hw=8, stride=2), 1) == 1
    torch.manual_seed(0)
    block = get_method("tucker2").build(small, (4, 4)).eval()
    probe = module_to_onnx(block, small.in_shape, copies=3)
    assert sum(node.op_type == "Conv" for node in probe.graph.node) == 3 * len(block)
    x = torch.randn(2, *small.in_shape)
    session = onnxruntime.InferenceSession(
        probe.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    with torch.no_grad():
        expected = block(block(block(x))).numpy()
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], expected, atol=1e-4)


def test_a_chained_probe_is_divided_by_its_copies_and_timed_in_several_sessions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each probe runs in SESSIONS sessions and keeps the median one, its interval their
    range; a chain's net time is per copy."""
    sessions: list[int] = []
    medians = iter([0.5, 0.1, 0.3] * 10)  # ms of each session's runs, in order

    def session_median(self, path, x) -> float:
        sessions.append(int(np.prod(x.shape)))
        return next(medians)

    monkeypatch.setattr(LatencyTable, "_session_median", session_median)
    monkeypatch.setattr(LatencyTable, "overhead_ms", lambda self: 0.0)
    monkeypatch.setattr(LatencyTable, "context_ms", lambda self, *shapes: 0.0)
    table = LatencyTable("cpu", cache_dir=tmp_path, threads=1)
    layer = conv_layer(channels=(16, 16), hw=8)
    assert table.layer_ms(layer, 1) == pytest.approx(0.3 / MAX_COPIES)
    assert len(sessions) == SESSIONS
    key = table.key(layer, "original", (), 1)
    assert table.ranges[key] == pytest.approx((0.1 / MAX_COPIES, 0.5 / MAX_COPIES))


def test_no_block_is_priced_beyond_its_plausible_speed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A block timed near zero (the context's noise taken off a probe of a few µs) is priced at
    MAX_EFFICIENCY × its MAC reduction faster than its layer, and its speedup interval with it."""
    times = {"original": 0.04, "tucker2": 1e-6}

    def lookup(self, layer, block, ranks, batch, build) -> float:
        key = self.key(layer, block, ranks, batch)
        self.ranges[key] = (times[block] * 0.9, times[block] * 1.1)
        return times[block]

    monkeypatch.setattr(LatencyTable, "_lookup", lookup)
    table = LatencyTable("cpu", cache_dir=tmp_path, threads=1)
    layer = conv_layer(channels=(64, 32), hw=8, stride=2)
    share = get_method("tucker2").cost(layer, (8, 8)).macs / layer.macs
    assert table.block_ms(layer, "tucker2", (8, 8), 1) == pytest.approx(
        0.04 * share / MAX_EFFICIENCY
    )
    low, high = table.speedup_range(layer, "tucker2", (8, 8), 1)
    assert high == pytest.approx(0.04 * 1.1 / (0.04 * share / MAX_EFFICIENCY))
    assert low == pytest.approx(0.04 * 0.9 / (0.04 * share / MAX_EFFICIENCY))
    times["tucker2"] = 0.03  # a time above the bound is kept as measured
    assert table.block_ms(layer, "tucker2", (16, 16), 1) == 0.03


def test_probe_graph_for_linear_blocks() -> None:
    torch.manual_seed(0)
    for shape in [(12,), (5, 12)]:
        block = nn.Sequential(nn.Linear(12, 3, bias=False), nn.Linear(3, 7))
        x = torch.randn(4, *shape)
        session = onnxruntime.InferenceSession(
            module_to_onnx(block, shape).SerializeToString(), providers=["CPUExecutionProvider"]
        )
        with torch.no_grad():
            expected = block(x).numpy()
        np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], expected, atol=1e-5)


# --- the table and its cache --------------------------------------------------------------------


def test_cache_is_keyed_by_provider_shape_and_batch(table: LatencyTable, tmp_path: Path) -> None:
    layer = conv_layer(hw=16)
    rng = torch.get_rng_state()
    first = table.layer_ms(layer, 1)
    assert torch.equal(torch.get_rng_state(), rng)  # random probe weights, caller's RNG intact
    assert first > 0 and table.measured == 1
    assert table.layer_ms(layer, 1) == first and table.measured == 1  # cached
    table.layer_ms(layer, 2)
    assert table.measured == 2  # another batch is another entry
    table.layer_ms(conv_layer(hw=8), 1)
    assert table.measured == 3  # another input shape is another entry
    table.layer_ms(conv_layer(name="other_name", hw=16), 1)
    assert table.measured == 3  # same geometry under another name: same entry
    table.block_ms(layer, "cp", [4], 1)
    assert table.measured == 4

    data = json.loads(table.path.read_text())
    assert data["provider"] == "cpu" and data["machine"] == get_backend("cpu").machine_id()
    assert data["machine"]["onnxruntime"] == onnxruntime.__version__
    timed = [json.loads(key) for key in data["entries"]]
    assert sum("block" in key for key in timed) == 4
    # Plus the conv context, once per shape and batch: 16×16 at batch 1 and 2, 8×8 at batch 1.
    assert sorted((k["context"][1], k["batch"]) for k in timed if "context" in k) == [
        (8, 1),
        (16, 1),
        (16, 2),
    ]

    again = LatencyTable("cpu", cache_dir=tmp_path / "cache", threads=1, repeats=3)
    assert again.path == table.path
    assert again.layer_ms(layer, 1) == first and again.measured == 0

    cuda = LatencyTable("cuda", cache_dir=tmp_path / "cache", threads=1)
    assert cuda.path != table.path and cuda.path.name.startswith("cuda-")
    assert cuda.entries == {}
    other_threads = LatencyTable("cpu", cache_dir=tmp_path / "cache", threads=2)
    assert other_threads.path != table.path and other_threads.entries == {}


def test_damaged_cache_is_measured_again(table: LatencyTable, tmp_path: Path) -> None:
    table.path.parent.mkdir(parents=True)
    table.path.write_text("{not json")
    fresh = LatencyTable("cpu", cache_dir=tmp_path / "cache", threads=1, repeats=3)
    assert fresh.entries == {}
    fresh.layer_ms(conv_layer(), 1)
    entries = json.loads(fresh.path.read_text())["entries"]
    assert len(entries) == 2 and fresh.measured == 1  # the layer and its context


def test_unwritable_cache_still_measures(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    table = LatencyTable(cache_dir=blocker / "cache", repeats=2)
    assert table.layer_ms(conv_layer(hw=8), 1) > 0
    assert table.cache_error is not None and "not written" in table.cache_error


def test_table_rejects_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="repeats >= 1"):
        LatencyTable(cache_dir=tmp_path, repeats=0)
    with pytest.raises(ConfigError, match="threads"):
        LatencyTable(cache_dir=tmp_path, threads=0)
    with pytest.raises(ConfigError, match="batch"):
        LatencyTable(cache_dir=tmp_path).layer_ms(conv_layer(), 0)


def test_cache_dir_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANKFOLD_LATENCY_CACHE", str(tmp_path / "env"))
    assert LatencyTable().path.parent == tmp_path / "env"


def test_cuda_table_measures_or_skips_with_the_reason(tmp_path: Path) -> None:
    try:
        get_backend("cuda").check()
    except ProviderError as exc:
        pytest.skip(str(exc))
    cuda = LatencyTable("cuda", cache_dir=tmp_path)
    layer = conv_layer(channels=(64, 64), hw=32)
    assert cuda.layer_ms(layer, 8) > 0
    assert cuda.block_ms(layer, "cp", [16], 8) > 0


# --- the latency gate ---------------------------------------------------------------------------


class HugeDetour(CPMethod):
    """A method that reports CP's cost but builds a block through 1024 channels: slow on purpose."""

    name = "huge_detour"

    def build(self, layer: LayerInfo, ranks) -> FactorizedBlock:
        stages = OrderedDict(
            up=pointwise(layer.in_features, 1024),
            spatial=spatial_like(layer, 1024, 1024, groups=1024),
            down=pointwise(1024, layer.out_features),
        )
        return FactorizedBlock(stages, layer.name, self.name, ranks)


def test_gate_reverts_an_artificially_slow_block_and_keeps_a_fast_one(
    table: LatencyTable, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(METHODS, "huge_detour", HugeDetour())
    slow = conv_layer("slow", channels=(16, 16), hw=16)
    fast = conv_layer("fast", channels=(64, 64), hw=32)
    analysis = ModelAnalysis((slow, fast), 0, slow.macs + fast.macs)
    plan = Plan(
        model="m",
        method="cp",
        layers=[
            LayerPlan(name="slow", type="Conv2d", method="huge_detour", ranks=[4], reason="a"),
            LayerPlan(name="fast", type="Conv2d", method="cp", ranks=[8], reason="b"),
        ],
    )
    gated = gate_plan(plan, analysis, table, batch=[1, 2], margin=0.05)
    reverted, kept = gated.layers
    assert not reverted.decompose and reverted.method is None
    assert reverted.reason.startswith("reverted by latency gate: block ")
    assert "ms vs layer" in reverted.reason and "cpu, 1 thread)" in reverted.reason
    assert reverted.reason.endswith(")") and "×" in reverted.reason  # the measured interval
    block_ms = table.block_ms(slow, "huge_detour", [4], 1)
    assert block_ms > 3 * table.layer_ms(slow, 1)  # 1024-channel detour vs a 16-channel conv
    assert kept.decompose and kept.ranks == [8] and kept.reason.startswith("b; latency ")
    assert table.block_ms(fast, "cp", [8], 1) < 0.5 * table.layer_ms(fast, 1)
    assert plan.layers[0].decompose  # the input plan is unchanged


def test_gate_margin_and_worst_batch() -> None:
    layer = conv_layer()
    plan = plan_for(layer, "cp", [4])
    analysis = one_layer_analysis(layer)
    # 0.92 ms at batch 1 and 1.012 ms at batch 8 against a 1 ms layer.
    table = FakeTable({(4,): 0.92})
    assert gate_plan(plan, analysis, table, 1, margin=0.05).layers[0].decompose
    assert not gate_plan(plan, analysis, table, 1, margin=0.10).layers[0].decompose
    worst = gate_plan(plan, analysis, table, [1, 8], margin=0.0).layers[0]
    assert worst.reason == (
        "reverted by latency gate: block 1.01 ms vs layer 1.00 ms (batch 8, fake, 1 thread)"
    )
    with pytest.raises(ConfigError, match="margin"):
        gate_plan(plan, analysis, table, 1, margin=1.0)
    with pytest.raises(ConfigError, match="batch"):
        gate_plan(plan, analysis, table, [], margin=0.05)


def test_gate_efficiency_reverts_blocks_that_waste_their_mac_savings() -> None:
    layer = conv_layer()
    plan = plan_for(layer, "cp", [4])
    analysis = one_layer_analysis(layer)
    mac_reduction = layer.macs / get_method("cp").cost(layer, (4,)).macs
    table = FakeTable({(4,): 0.5})  # 2× faster at batch 1
    efficiency = 2.0 / mac_reduction
    assert 0 < efficiency < 1
    kept = gate_plan(plan, analysis, table, 1, min_efficiency=efficiency * 0.99).layers[0]
    assert kept.decompose
    reverted = gate_plan(plan, analysis, table, 1, min_efficiency=efficiency * 1.01).layers[0]
    assert not reverted.decompose
    assert reverted.reason.endswith(
        f"2.00× faster for {mac_reduction:.2f}× fewer MACs, efficiency {efficiency:.2f} < "
        f"{efficiency * 1.01:g}"
    )
    with pytest.raises(ConfigError, match="efficiency"):
        gate_plan(plan, analysis, table, 1, min_efficiency=1.5)


# --- rank rounding ------------------------------------------------------------------------------


def test_rounded_ranks_go_to_the_nearest_valid_multiple() -> None:
    cp, tucker = get_method("cp"), get_method("tucker2")
    layer = conv_layer(channels=(64, 64), hw=8)
    assert rounded_ranks(cp, layer, (37,), 8) == (40,)
    assert rounded_ranks(cp, layer, (35,), 8) == (32,)
    assert rounded_ranks(cp, layer, (36,), 8) == (40,)  # ties go up
    assert rounded_ranks(cp, layer, (32,), 8) is None  # already a multiple
    assert rounded_ranks(cp, layer, (3,), 8) == (8,)  # 0 is not a rank
    assert rounded_ranks(tucker, layer, (37, 43), 8) == (40, 40)
    stem = conv_layer(channels=(3, 64), hw=8)
    # rank_in is capped by 3 input channels and stays; 28 would go up to 32, which makes the
    # block larger than the 3→64 layer, so it goes down to 16 instead.
    assert rounded_ranks(tucker, stem, (28, 3), 16) == (16, 3)
    assert tucker.cost(stem, (32, 3)).params > stem.params
    # (61, 61) → 64 is the full, larger layer; 56 is the valid multiple below.
    assert rounded_ranks(tucker, layer, (61, 61), 8) == (56, 56)


def test_round_ranks_switches_only_when_measured_faster() -> None:
    layer = conv_layer(channels=(64, 64), hw=8)
    analysis = one_layer_analysis(layer)
    plan = plan_for(layer, "cp", [37])
    faster = FakeTable({(37,): 0.5, (32,): 0.3, (40,): 0.40})
    rounded = round_ranks(plan, analysis, faster, 8, [1, 8]).layers[0]
    assert rounded.ranks == [40]  # nearest, though 32 would be faster still
    assert rounded.reason == (
        "test; rounded [37] → [40] (multiple of 8): 0.40 ms vs 0.50 ms (batch 1, fake, 1 thread)"
    )
    assert {c[1] for c in faster.calls} == {(37,), (40,)}  # only planned and rounded are timed

    slower = FakeTable({(37,): 0.5, (40,): 0.6})
    kept = round_ranks(plan, analysis, slower, 8, 1).layers[0]
    assert kept.ranks == [37] and kept.reason == "test"
    with pytest.raises(ConfigError, match="round-to"):
        round_ranks(plan, analysis, slower, 1, 1)


def test_round_and_gate_a_real_plan_with_measured_times(table: LatencyTable) -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 48, 3, padding=1), nn.ReLU()
    ).eval()
    gm = trace(model, torch.zeros(1, 3, 16, 16))
    analysis = analyze(gm)
    plan = plan_of(analysis, RankPolicy(method="tucker2", macs_reduction=2.0), "seq")
    rounded = round_ranks(plan, analysis, table, 8, 1)
    gated = gate_plan(rounded, analysis, table, 1)
    for before, after in zip(plan.layers, gated.layers):
        assert after.name == before.name
        if after.decompose:
            assert "latency" in after.reason
            layer = analysis.layer(after.name)
            assert table.block_ms(layer, after.method, after.ranks, 1) <= 0.95 * table.layer_ms(
                layer, 1
            )
        else:
            assert after.reason.startswith(("skipped", "reverted by latency gate"))
    # Everything here is measured once per geometry and batch: a second pass costs nothing.
    measured = table.measured
    gate_plan(round_ranks(plan, analysis, table, 8, 1), analysis, table, 1)
    assert table.measured == measured


# --- latency as the budgeted cost ---------------------------------------------------------------


def test_latency_metric_interpolates_between_measured_anchors() -> None:
    layer = conv_layer(channels=(32, 32), hw=8)
    cp = get_method("cp")
    table = LinearTable()
    metric = LatencyMetric(table, batch=1, anchors=4)  # type: ignore[arg-type]
    assert metric.layer(layer) == 1.0
    assert metric.total(one_layer_analysis(layer)) == 1.0
    # ms is linear in rank and CP's MACs are linear in rank: interpolation is exact.
    for rank in (1, 7, 20):
        assert metric.block(layer, cp, (rank,)) == pytest.approx(0.01 * rank, rel=1e-9)
    values = [metric.block(layer, cp, c) for c in cp.candidates(layer)]
    assert values == sorted(values)
    with pytest.raises(ConfigError, match="anchors"):
        LatencyMetric(table, 1, anchors=1)  # type: ignore[arg-type]


def test_latency_metric_lets_no_slow_small_block_hide_faster_larger_ones() -> None:
    """Off-block ranks can run slower than larger aligned ones: an anchor counts as the fastest
    time at its MACs or above, never as the slowest below."""
    layer = conv_layer(channels=(32, 32), hw=8)
    cp = get_method("cp")

    class OffBlockSlow(LinearTable):
        def block_ms(self, layer: LayerInfo, method: str, ranks, batch: int) -> float:
            return 0.9 if ranks[0] < 16 else 0.01 * ranks[0]

    metric = LatencyMetric(OffBlockSlow(), batch=1, anchors=8)  # type: ignore[arg-type]
    values = [metric.block(layer, cp, c) for c in cp.candidates(layer)]
    assert values == sorted(values)  # still non-decreasing in MACs
    # Between two aligned anchors the (linear) times interpolate exactly, unraised by rank < 16.
    assert metric.block(layer, cp, (64,)) == pytest.approx(0.64, rel=1e-9)
    # Anchors at ranks 1, 19, 37, …: rank 1 (0.9 ms measured) counts as rank 19's 0.19 ms.
    assert metric.block(layer, cp, (1,)) == pytest.approx(0.19, rel=1e-9)
    assert metric.block(layer, cp, (37,)) == pytest.approx(0.37, rel=1e-9)


def test_latency_metric_prices_ranks_as_the_measured_rounding_deploys_them() -> None:
    """ResNet-56's 16-channel layers: off-block ranks run slower than the next block-aligned one.
    With round_to an aligned rank is priced from aligned anchors only, and an off-block rank at
    most what its rounded ranks cost, since `round_ranks` moves it there when that is faster."""
    layer = conv_layer(channels=(32, 32), hw=8)
    cp = get_method("cp")

    class OffBlockSlow(LinearTable):
        def block_ms(self, layer: LayerInfo, method: str, ranks, batch: int) -> float:
            self.calls.append((method, tuple(ranks), batch))
            return 0.01 * ranks[0] + (0 if ranks[0] % 16 == 0 else 0.5)

    table = OffBlockSlow()
    free = LatencyMetric(table, batch=1, anchors=6)  # type: ignore[arg-type]
    rounding = LatencyMetric(table, batch=1, anchors=6, round_to=16)  # type: ignore[arg-type]
    # Without rounding one curve runs through slow off-block anchors: rank 16 looks slow.
    assert free.block(layer, cp, (16,)) > 0.5
    # Aligned anchors are linear in rank, so aligned ranks interpolate exactly.
    for rank in (16, 32, 48, 64):
        assert rounding.block(layer, cp, (rank,)) == pytest.approx(0.01 * rank, rel=1e-9)
    # Rank 20 rounds to 16 and rank 30 to 32; each costs what it will deploy as.
    assert rounding.block(layer, cp, (20,)) == pytest.approx(0.16, rel=1e-9)
    assert rounding.block(layer, cp, (30,)) == pytest.approx(0.32, rel=1e-9)
    values = [rounding.block(layer, cp, c) for c in cp.candidates(layer)]
    assert values == sorted(values)
    with pytest.raises(ConfigError, match="round_to"):
        LatencyMetric(table, 1, round_to=1)  # type: ignore[arg-type]
    # Curves belong to a geometry: a same-named layer of another model is priced afresh.
    wide = conv_layer(channels=(64, 64), hw=8)
    assert wide.name == layer.name
    assert rounding.block(wide, cp, (64,)) == pytest.approx(0.64, rel=1e-9)
    assert rounding.block(wide, cp, (128,)) == pytest.approx(1.28, rel=1e-9)


# --- the bench table ----------------------------------------------------------------------------


def test_bench_rows_add_mac_reduction_and_its_share() -> None:
    rows = bench_rows(
        [LatencyResult(1, 4.0, 2.0, 2.0, 1.9, 2.1, 1), LatencyResult(8, 30.0, 12.0, 2.5)], 2.5
    )
    assert rows[0] == {
        "batch": 1,
        "original_ms": 4.0,
        "compressed_ms": 2.0,
        "speedup": 2.0,
        "speedup_low": 1.9,
        "speedup_high": 2.1,
        "threads": 1,
        "verdict": "faster",
        "mac_reduction": 2.5,
        "speedup_per_mac_reduction": pytest.approx(0.8),
    }
    assert rows[1]["speedup_per_mac_reduction"] == pytest.approx(1.0)
    cells = ["1", "1", "4.000", "2.000", "2.00× (1.90–2.10)", "2.50×", "0.80"]
    assert format_bench_row(rows[0]) == cells
    # Without an interval (one block) there is no measurable difference to report.
    assert format_bench_row(rows[1])[:2] == ["all cores", "8"]
    assert format_bench_row(rows[1])[4] == "no measurable difference"
    assert len(BENCH_COLUMNS) == 7
    with pytest.raises(ValueError, match="positive"):
        bench_rows([], 0.0)


def test_bench_providers_counts_macs_and_skips_cuda_with_the_reason(tmp_path: Path) -> None:
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3)).eval()
    layer = conv_layer(channels=(32, 32), hw=8, padding=0)
    compressed = nn.Sequential(original[0], original[1], get_method("cp").build(layer, (8,))).eval()
    x = torch.zeros(1, 3, 8, 8)
    a = export_onnx(original, x, tmp_path / "a.onnx")
    b = export_onnx(compressed, x, tmp_path / "b.onnx")
    macs_a = 8 * 8 * 32 * 3 * 9 + 6 * 6 * 32 * 32 * 9
    macs_b = 8 * 8 * 32 * 3 * 9 + 8 * 8 * 32 * 8 + 6 * 6 * 8 * (9 + 32)
    assert onnx_macs(a) == macs_a and onnx_macs(b) == macs_b
    table = bench_providers(
        a, b, (3, 8, 8), [1, 2], ("cpu", "cuda"), warmup=1, repeats=3, threads=[1]
    )
    assert table["mac_reduction"] == pytest.approx(macs_a / macs_b)
    rows = table["providers"]["cpu"]["rows"]
    assert [row["batch"] for row in rows] == [1, 2]
    assert all(row["original_ms"] > 0 and row["compressed_ms"] > 0 for row in rows)
    try:
        get_backend("cuda").check()
    except ProviderError as exc:
        assert table["providers"]["cuda"] == {"skipped": str(exc)}
    else:
        assert len(table["providers"]["cuda"]["rows"]) == 2
    json.dumps(table, allow_nan=False)


def test_onnx_macs_matches_the_analysis_of_a_traced_model(tmp_path: Path) -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    ).eval()
    x = torch.zeros(1, 3, 8, 8)
    assert (
        onnx_macs(export_onnx(model, x, tmp_path / "m.onnx")) == analyze(trace(model, x)).total_macs
    )


# --- a latency budget (--target latency) --------------------------------------------------------


class MacsTimes:
    """A CostModel: 0.2 ms per node plus 1 ms per million MACs (blocks have several nodes)."""

    name = "latency"

    def layer(self, layer: LayerInfo) -> float:
        return 0.2 + layer.macs / 1e6

    def block(self, layer: LayerInfo, method, ranks) -> float:
        return 0.2 * len(method.build(layer, tuple(ranks))) + method.cost(layer, ranks).macs / 1e6

    def total(self, analysis: ModelAnalysis) -> float:
        return sum(self.layer(layer) for layer in analysis.layers)


def test_latency_budget_is_met_in_measured_time_not_macs() -> None:
    model = nn.Sequential(
        nn.Conv2d(16, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1)
    )
    analysis = analyze(trace(model, torch.zeros(1, 16, 16, 16)))
    times = MacsTimes()
    policy = RankPolicy(method="cp", latency_reduction=2.0, round_to=None)
    plan = plan_of(analysis, policy, measured=times)
    assert plan.target == {"latency_reduction": 2.0}
    planned = sum(
        times.block(layer, get_method(entry.method), entry.ranks)
        if entry.decompose
        else times.layer(layer)
        for layer, entry in zip(analysis.layers, plan.layers)
    )
    original = times.total(analysis)
    assert planned <= original / 2.0 and planned >= original / 2.0 * 0.95  # used, not overshot
    # Each CP block pays three extra nodes (0.6 ms), so 2× in time needs more than 2× in MACs.
    assert analysis.total_macs / plan_cost(analysis, plan).macs > 2.0
    with pytest.raises(ConfigError, match="latency budget needs measured"):
        plan_of(analysis, policy)
    with pytest.raises(ConfigError, match="give one budget"):
        plan_of(analysis, policy.model_copy(update={"macs_reduction": 2.0}), measured=times)
