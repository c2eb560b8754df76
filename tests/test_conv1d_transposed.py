"""Conv1d and ConvTranspose2d decompose like Conv2d: blocks reproduce the layer, costs count
exactly, and small nets compress, export and match on onnxruntime through the public API."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from planning_helpers import plan_of, resolve
from torch import nn

from rankfold.converter import CompressConfig, compress, restore, validate
from rankfold.passes import RankPolicy, analyze, decompose, get_method, trace
from rankfold.passes.blocks import block_kernel, kernel_of
from rankfold.passes.capture import analyze_captured
from rankfold.passes.correction import refit_blocks
from rankfold.passes.latency_gate import gate_plan
from rankfold.passes.methods import Cost, method_for_layer
from rankfold.passes.search.cache import DecompositionCache
from rankfold.passes.statistics import InputMoment, LayerStatistics, collect_statistics
from rankfold.runtime.latency import onnx_macs
from rankfold.runtime.latency_model import LatencyTable, layer_module, module_to_onnx

METHODS = ["svd", "tucker2", "cp"]  # closed forms or exact at full rank
ALL_METHODS = [*METHODS, "cp-epc", "tucker2-cp", "cp-lrf"]


@st.composite
def conv1d_configs(draw):
    groups = draw(st.sampled_from([1, 1, 2]))
    stride = draw(st.sampled_from([1, 2, 3]))
    return {
        "in_channels": groups * draw(st.integers(2, 6)),
        "out_channels": groups * draw(st.integers(2, 6)),
        "kernel_size": draw(st.sampled_from([2, 3, 5])),
        "stride": stride,
        "padding": draw(st.sampled_from(["same", 0, 2] if stride == 1 else [0, 1, 2])),
        "dilation": draw(st.sampled_from([1, 2])),
        "groups": groups,
        "bias": draw(st.booleans()),
        "padding_mode": draw(st.sampled_from(["zeros", "zeros", "reflect", "circular"])),
    }


@st.composite
def transposed_configs(draw):
    groups = draw(st.sampled_from([1, 1, 2]))
    stride = draw(st.sampled_from([(1, 1), (2, 2), (2, 1), (3, 2)]))
    dilation = draw(st.sampled_from([(1, 1), (2, 1)]))
    # torch needs output_padding < stride or < dilation, per dimension.
    limit = [max(s, d) for s, d in zip(stride, dilation)]
    return {
        "in_channels": groups * draw(st.integers(2, 6)),
        "out_channels": groups * draw(st.integers(2, 6)),
        "kernel_size": draw(st.sampled_from([(3, 3), (4, 4), (2, 3), (1, 3)])),
        "stride": stride,
        "padding": draw(st.sampled_from([0, 1, (1, 0)])),
        "output_padding": tuple(draw(st.integers(0, n - 1)) for n in limit),
        "dilation": dilation,
        "groups": groups,
        "bias": draw(st.booleans()),
    }


def _layer(conv: nn.Module):
    size = 4 + 2 * max(np.atleast_1d(conv.kernel_size)) * max(np.atleast_1d(conv.dilation))
    spatial = (size + 3,) if isinstance(conv, nn.Conv1d) else (size - 3, size - 4)
    x = torch.randn(2, conv.in_channels, *spatial, dtype=torch.float64)
    return x, analyze(trace(nn.Sequential(conv), x)).layers[0]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm() / b.norm().clamp_min(1e-300)).detach())


def _counted_macs(block: nn.Module, x: torch.Tensor) -> int:
    """MACs per sample of every conv stage, counted on the tensors that ran: a conv multiplies
    each output element by C_in/g·k weights, a transposed conv each input element by C_out/g·k."""
    macs = []

    def hook(module, inputs, output):
        k = math.prod(module.kernel_size)
        if module.transposed:
            macs.append(inputs[0][0].numel() * module.out_channels // module.groups * k)
        else:
            macs.append(output[0].numel() * module.in_channels // module.groups * k)

    convs = [
        m for m in block.modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.ConvTranspose2d)
    ]
    handles = [m.register_forward_hook(hook) for m in convs]
    block(x)
    for handle in handles:
        handle.remove()
    return sum(macs)


def _check_full_rank(conv: nn.Module, method_name: str) -> None:
    x, layer = _layer(conv)
    method = get_method(method_name)
    assert method.unsupported_reason(layer) is None
    ranks = method.max_ranks(layer)
    block = method.build(layer, ranks).double()
    result = method.fill(block, conv, seed=0)
    # One stage with the layer's kernel and type; the 1×1 stages of the layer's dimension, never
    # transposed.
    spatial = [stage for stage in block if stage.kernel_size == conv.kernel_size]
    assert [type(stage) for stage in spatial] == [type(conv)]
    pointwise = nn.Conv1d if isinstance(conv, nn.Conv1d) else nn.Conv2d
    assert all(type(stage) is pointwise for stage in block if stage not in spatial)
    # The other two reach the exact rank by a closed form; CP-ALS iteratively, and the method's
    # ALS stops once a sweep moves the error by under 1e-6 (or after 100 sweeps): below 1e-6 on
    # 7,694 of 7,695 random kernels, but a slow tail ended at 3.0e-5 on one 5×5×3 kernel in CI.
    tolerance = 1e-4 if method_name == "cp" else 1e-9
    assert result.rel_error < tolerance
    assert _relative(block(x), conv(x)) < tolerance
    cost = method.cost(layer, ranks)
    assert cost.params == sum(p.numel() for p in block.parameters())
    assert cost.macs == _counted_macs(block, x)
    assert layer.macs == _counted_macs(conv, x)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv1d_configs(), st.sampled_from(METHODS), st.integers(0, 2**16))
def test_full_rank_conv1d_block_reproduces_the_layer(config, method_name, seed):
    torch.manual_seed(seed)  # the layer's random init: a failing example replays exactly
    _check_full_rank(nn.Conv1d(**config).double(), method_name)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(transposed_configs(), st.sampled_from(METHODS), st.integers(0, 2**16))
def test_full_rank_transposed_block_reproduces_the_layer(config, method_name, seed):
    torch.manual_seed(seed)
    _check_full_rank(nn.ConvTranspose2d(**config).double(), method_name)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        conv1d_configs().map(lambda c: nn.Conv1d(**c)),
        transposed_configs().map(lambda c: nn.ConvTranspose2d(**c)),
    ),
    st.sampled_from(ALL_METHODS),
    st.floats(0.1, 1.0),
)
def test_cost_counts_the_built_block(conv, method_name, ratio):
    x, layer = _layer(conv.double())
    method = get_method(method_name)
    ranks = method.clamp_ranks(layer, method.ranks_from_ratio(layer, ratio))
    block = method.build(layer, ranks).double()
    cost = method.cost(layer, ranks)
    assert cost.params == sum(p.numel() for p in block.parameters())
    assert cost.macs == _counted_macs(block, x)
    assert block(x).shape == conv(x).shape


def _reconstructed(conv: nn.Module, kernel: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """The layer run with `kernel` (conv layout T×S×k…) in place of its own weight."""
    weight = torch.from_numpy(kernel)
    bias = conv.bias
    if isinstance(conv, nn.Conv1d):
        pad = conv.padding if conv.padding_mode == "zeros" else 0
        if conv.padding_mode != "zeros":
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        return F.conv1d(x, weight, bias, conv.stride, pad, conv.dilation)
    return F.conv_transpose2d(
        x,
        weight.transpose(0, 1),  # transposed layout S×T×k…
        bias,
        conv.stride,
        conv.padding,
        conv.output_padding,
        1,
        conv.dilation,
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        conv1d_configs().map(lambda c: nn.Conv1d(**{**c, "groups": 1})),
        transposed_configs().map(lambda c: nn.ConvTranspose2d(**{**c, "groups": 1})),
    ),
    st.sampled_from(ALL_METHODS),
    st.floats(0.2, 0.8),
)
# cp-lrf's CP rank capped at the kernel's largest (4·2 = 8) below its factor rank 9 (a CI find).
@example(nn.Conv1d(4, 12, 2, padding="same", bias=False), "cp-lrf", 0.75)
def test_reduced_rank_block_is_the_layer_with_the_reconstructed_kernel(conv, method_name, ratio):
    conv = conv.double()
    x, layer = _layer(conv)
    method = get_method(method_name)
    ranks = method.clamp_ranks(layer, method.ranks_from_ratio(layer, ratio))
    block = method.build(layer, ranks).double()
    result = method.fill(block, conv, seed=0)
    kernel, approx = kernel_of(conv), block_kernel(block)
    assert approx.shape == kernel.shape
    error = np.linalg.norm(kernel - approx) / np.linalg.norm(kernel)
    assert result.rel_error == pytest.approx(error, rel=1e-6, abs=1e-12)
    assert _relative(block(x), _reconstructed(conv, approx, x)) < 1e-9


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv1d(6, 8, 3, stride=2, padding=1),
        nn.ConvTranspose2d(6, 8, 3, stride=2, padding=1, output_padding=1),
    ],
    ids=["Conv1d", "ConvTranspose2d"],
)
def test_cp_epc_builds_the_cp_block_and_fills_it_with_its_kernel(conv):
    conv = conv.double()
    x, layer = _layer(conv)
    method = get_method("cp-epc")
    block = method.build(layer, (4,)).double()
    result = method.fill(block, conv, seed=0)
    approx = block_kernel(block)
    error = np.linalg.norm(kernel_of(conv) - approx) / np.linalg.norm(kernel_of(conv))
    assert result.rel_error == pytest.approx(error, rel=1e-6)
    assert result.extras["sensitivity"] <= result.extras["sensitivity_before"]
    assert _relative(block(x), _reconstructed(conv, approx, x)) < 1e-9


def test_energy_reads_the_transposed_kernel_in_the_conv_layout():
    """A transposed conv whose kernel has exact Tucker-2 ranks (R_T, R_S) = (5, 2): energy
    selection must find them on the output and input channel modes, not swapped."""
    rng = np.random.default_rng(0)
    kernel = np.einsum(  # conv layout T×S×kh×kw
        "abhw,ta,sb->tshw",
        rng.standard_normal((5, 2, 3, 3)),
        rng.standard_normal((16, 5)),
        rng.standard_normal((12, 2)),
    )
    deconv = nn.ConvTranspose2d(12, 16, 3, stride=2, bias=False)
    deconv.weight.data.copy_(torch.from_numpy(kernel.transpose(1, 0, 2, 3)))
    gm = trace(nn.Sequential(deconv).eval(), torch.randn(1, 12, 6, 6))
    policy = RankPolicy(method="tucker2", select="energy", energy=0.999999, min_macs_share=0)
    plan, report = resolve(gm, analyze(gm), policy, "deconv")
    assert plan.layers[0].ranks == [5, 2]
    assert min(report["layers"][0]["retained_energy"]) >= 0.999999


DATA_AWARE = [
    (nn.Conv1d(16, 24, 3, padding=1), (16, 9)),
    (nn.ConvTranspose2d(16, 24, 3, stride=2, padding=1, output_padding=1), (16, 4, 5)),
]


@pytest.mark.parametrize("layer_and_shape", DATA_AWARE, ids=["Conv1d", "ConvTranspose2d"])
@pytest.mark.parametrize("method_name, ranks", [("svd", (5,)), ("tucker2", (6, 4)), ("cp", (10,))])
def test_data_aware_fit_on_conv1d_and_transposed(layer_and_shape, method_name, ranks):
    """Identity statistics give the weight-only fit; correlated inputs (3 dominant directions)
    a lower output error than it."""
    conv, shape = layer_and_shape
    torch.manual_seed(2)
    conv.reset_parameters()
    gm = trace(nn.Sequential(conv), torch.zeros(1, *shape))
    layer, module = analyze(gm).layers[0], gm.get_submodule("0")
    method = get_method(method_name)
    identity = LayerStatistics({layer.name: InputMoment(np.eye(16), 100)}, 10)
    aware, _ = DecompositionCache(None, 0, identity).block(module, layer, method, ranks)
    plain, _ = DecompositionCache(None, 0).block(module, layer, method, ranks)
    for key, value in plain.state_dict().items():
        assert torch.equal(aware.state_dict()[key], value), key
    mix = np.random.default_rng(2).standard_normal((16, 3))
    stats = LayerStatistics({layer.name: InputMoment(mix @ mix.T + 0.02 * np.eye(16), 1000)}, 10)
    cache = DecompositionCache(None, 0, stats)
    aware, entry = cache.block(module, layer, method, ranks)
    plain, _ = cache.weight_only().block(module, layer, method, ranks)
    whitening, kernel = stats.whitening(layer.name), kernel_of(module)
    aware_error = whitening.output_error(kernel, block_kernel(aware))
    assert entry.extras["output_error"] == pytest.approx(aware_error, rel=1e-6)
    assert aware_error < 0.9 * whitening.output_error(kernel, block_kernel(plain))


def test_statistics_pass_measures_conv1d_and_transposed_inputs():
    model = nn.Sequential(nn.Conv1d(3, 5, 3, padding=1), nn.Unflatten(2, (2, 4)))
    model.append(nn.ConvTranspose2d(5, 4, 3, stride=2))
    gm = trace(model, torch.zeros(1, 3, 8))
    batches = [torch.randn(6, 3, 8) for _ in range(2)]
    stats = collect_statistics(gm, ["0", "2"], batches, 12)
    x = torch.cat(batches).double()
    with torch.no_grad():
        hidden = model[0](x.float()).double()
    for name, inputs in (("0", x), ("2", hidden)):
        vectors = inputs.transpose(0, 1).reshape(inputs.shape[1], -1)
        expected = (vectors @ vectors.T / vectors.shape[1]).numpy()
        assert np.allclose(stats.moments[name].moment, expected, atol=1e-6), name


class Mixed(nn.Module):
    """A transposed conv, then a Conv1d over its flattened rows."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(8, 12, 3, stride=2, padding=1, bias=False)
        self.conv = nn.Conv1d(12, 16, 5, padding=2)

    def forward(self, x):
        return self.conv(torch.relu(self.up(x)).flatten(2))


def test_last_stage_refit_corrects_conv1d_and_transposed_blocks():
    torch.manual_seed(0)
    gm = trace(Mixed().eval(), torch.zeros(1, 8, 5, 5))
    analysis = analyze(gm)
    policy = RankPolicy(method="tucker2", rank=(4, 3), min_macs_share=0.0)
    compressed, _ = decompose(gm, analysis, plan_of(analysis, policy, "mixed"))
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(16, 8, 5, 5, generator=generator) for _ in range(3)]
    refits = refit_blocks(gm, compressed, ["up", "conv"], batches).blocks
    assert set(refits) == {"up", "conv"}
    with torch.no_grad():
        x = torch.cat(batches)
        for name, original in (("up", gm.up(x)), ("conv", gm(x))):
            upstream = compressed.get_submodule(name)
            y = upstream(x) if name == "up" else compressed(x)
            error = float((y - original).norm() / original.norm())
            assert refits[name].after == pytest.approx(error, rel=1e-4), name
            assert refits[name].after < refits[name].before, name


def test_costs_match_a_hand_count():
    # Conv1d 8→12, k=5, stride 2, padding 2 on length 20: 10 output positions.
    conv1d = nn.Conv1d(8, 12, 5, stride=2, padding=2, bias=True)
    layer = analyze(trace(nn.Sequential(conv1d), torch.zeros(1, 8, 20))).layers[0]
    assert (layer.params, layer.macs) == (12 * 8 * 5 + 12, 10 * 12 * 8 * 5)
    # 1×1 8→4 at 20 positions, k=5 4→6 at 10, 1×1 6→12 at 10.
    assert get_method("tucker2").cost(layer, (6, 4)) == Cost(
        params=8 * 4 + 4 * 6 * 5 + 6 * 12 + 12, macs=20 * 8 * 4 + 10 * (4 * 6 * 5 + 6 * 12)
    )
    # ConvTranspose2d 8→6, 4×4, stride 2, padding 1 on 5×5: 25 input positions, 10×10 output.
    deconv = nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1, bias=True)
    layer = analyze(trace(nn.Sequential(deconv), torch.zeros(1, 8, 5, 5))).layers[0]
    assert layer.out_shape == (6, 10, 10)
    assert (layer.params, layer.macs) == (8 * 6 * 16 + 6, 25 * 8 * 6 * 16)
    hand = {
        # transposed 4×4 8→3 scattered from 25 positions, then 1×1 3→6 at 100.
        ("svd", (3,)): (8 * 16 * 3 + 3 * 6 + 6, 25 * 8 * 16 * 3 + 100 * 3 * 6),
        # 1×1 8→4 at 25, transposed 4×4 4→3 from 25, 1×1 3→6 at 100.
        ("tucker2", (3, 4)): (8 * 4 + 4 * 3 * 16 + 3 * 6 + 6, 25 * (32 + 192) + 100 * 18),
        # 1×1 8→5 at 25, depthwise transposed 4×4 on 5 from 25, 1×1 5→6 at 100.
        ("cp", (5,)): (5 * (8 + 16 + 6) + 6, 25 * (40 + 80) + 100 * 30),
    }
    for (name, ranks), (params, macs) in hand.items():
        cost = get_method(name).cost(layer, ranks)
        assert (cost.params, cost.macs) == (params, macs), name


class FunctionalUp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(8, 6, 3, stride=2, groups=2)

    def forward(self, x):
        return F.conv_transpose2d(x, self.up.weight, None, 2, 0, 0, 2)


def test_functional_transposed_convs_count_as_the_module_does():
    x = torch.zeros(1, 8, 5, 5)
    model = FunctionalUp().eval()
    (module_macs,) = (layer.macs for layer in analyze(trace(nn.Sequential(model.up), x)).layers)
    assert module_macs == 25 * 8 * 3 * 9
    for analysis in (analyze(trace(model, x)), analyze_captured(model, x)):
        assert list(analysis.functional.values()) == [module_macs]
        assert analysis.total_macs == module_macs


def test_kept_layers_say_why():
    x = torch.randn(1, 8, 6, 6)
    deconv1d = analyze(trace(nn.Sequential(nn.ConvTranspose1d(8, 8, 3)), x[:, :, 0])).layers[0]
    assert get_method("tucker2").unsupported_reason(deconv1d) == (
        "tucker2 does not decompose ConvTranspose1d layers "
        "(it takes Conv2d, Conv1d, ConvTranspose2d, Linear)"
    )
    conv3d = analyze(trace(nn.Sequential(nn.Conv3d(8, 8, 3)), torch.zeros(1, 8, 4, 4, 4))).layers[0]
    assert (
        get_method("cp-lrf")
        .unsupported_reason(conv3d)
        .startswith("cp-lrf does not decompose Conv3d layers")
    )
    depthwise = analyze(trace(nn.Sequential(nn.ConvTranspose2d(8, 8, 3, groups=8)), x)).layers[0]
    assert "depthwise conv (groups=8)" in get_method("svd").unsupported_reason(depthwise)
    pointwise = analyze(trace(nn.Sequential(nn.ConvTranspose2d(8, 4, 1, stride=2)), x)).layers[0]
    method, note = method_for_layer("tucker2", pointwise)
    assert method.name == "svd" and note == "tucker2 of a 1×1 kernel is its SVD"


@pytest.mark.parametrize(
    "layer_module_args",
    [
        (nn.Conv1d(6, 10, 3, stride=2, padding=1, bias=True), (6, 15)),
        (nn.Conv1d(6, 10, 4, padding="same", dilation=2, padding_mode="reflect"), (6, 15)),
        (nn.ConvTranspose2d(6, 10, 3, stride=2, padding=1, output_padding=1, bias=True), (6, 5, 7)),
        (nn.ConvTranspose2d(6, 10, (2, 3), stride=(2, 1), dilation=(1, 2), groups=2), (6, 5, 7)),
    ],
)
def test_latency_probes_compute_what_the_layer_and_its_blocks_compute(layer_module_args):
    """The latency gate times hand-written ONNX graphs of the layer and its blocks: they must
    be the same computation as the torch modules."""
    conv, shape = layer_module_args
    x = torch.randn(2, *shape)
    layer = analyze(trace(nn.Sequential(conv), x)).layers[0]
    torch.manual_seed(0)
    modules = [layer_module(layer)] + [
        get_method(name).build(layer, (3,) * len(get_method(name).rank_names))
        for name in ALL_METHODS
    ]
    for module in modules:
        session = onnxruntime.InferenceSession(
            module_to_onnx(module.eval(), layer.in_shape).SerializeToString(),
            providers=["CPUExecutionProvider"],
        )
        actual = session.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            expected = module(x).numpy()
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5)


def test_latency_gate_times_conv1d_and_transposed_blocks(tmp_path):
    model = nn.Sequential(nn.ConvTranspose2d(16, 32, 4, stride=2, padding=1), nn.Flatten(2))
    model.append(nn.Conv1d(32, 32, 5, padding=2))
    gm = trace(model.eval(), torch.zeros(1, 16, 6, 6))
    analysis = analyze(gm)
    assert [layer.type for layer in analysis.layers] == ["ConvTranspose2d", "Conv1d"]
    plan = plan_of(analysis, RankPolicy(method="tucker2", macs_reduction=2.0), "seq")
    assert [entry.decompose for entry in plan.layers] == [True, True]
    table = LatencyTable("cpu", cache_dir=tmp_path, threads=1, repeats=3)
    gated = gate_plan(plan, analysis, table, 1)
    for entry in gated.layers:
        assert (
            ("; latency " in entry.reason)
            if entry.decompose
            else (entry.reason.startswith("reverted by latency gate"))
        )
        assert table.layer_ms(analysis.layer(entry.name), 1) > 0


class AudioNet(nn.Module):
    """A small 1-D conv net (audio / time series): 4 channels × 64 steps → 5 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 32, 5, padding=2)
        self.bn1 = nn.BatchNorm1d(32)
        self.conv2 = nn.Conv1d(32, 48, 5, stride=2, padding=2, bias=False)
        self.depthwise = nn.Conv1d(48, 48, 3, padding=1, groups=48)
        self.conv3 = nn.Conv1d(48, 64, 3, padding=2, dilation=2)
        self.head = nn.Linear(64, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.depthwise(torch.relu(self.conv2(x))))
        return self.head(torch.relu(self.conv3(x)).mean(-1))


class Decoder(nn.Module):
    """A small image decoder: 16×4×4 codes → 3×16×16 images through transposed convs."""

    def __init__(self) -> None:
        super().__init__()
        self.up1 = nn.ConvTranspose2d(16, 48, 4, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(48)
        self.up2 = nn.ConvTranspose2d(48, 32, 3, stride=2, padding=1, output_padding=1)
        self.grouped = nn.ConvTranspose2d(32, 32, 3, padding=1, groups=2, bias=False)
        self.out = nn.Conv2d(32, 3, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.bn1(self.up1(x)))
        x = torch.relu(self.grouped(torch.relu(self.up2(x))))
        return torch.tanh(self.out(x))


@pytest.mark.parametrize("method", ["svd", "tucker2"])
@pytest.mark.parametrize("net, shape", [(AudioNet, (4, 64)), (Decoder, (16, 4, 4))])
def test_nets_compress_and_match_on_onnxruntime(net, shape, method, tmp_path):
    torch.manual_seed(0)
    model = net().eval()
    for module in model.modules():  # BN statistics that are not the identity
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    config = CompressConfig(
        model=net.__name__,
        ranks=RankPolicy(method=method, macs_reduction=1.5),
        latency={"enabled": False},
        export={"parity_samples": 8},
    )
    result = compress(model, torch.randn(1, *shape), config)
    rows = {row.name: row for row in result.decomposition.layers}
    decomposed = {name for name, row in rows.items() if row.status == "decomposed"}
    convs = {"conv1", "conv2", "conv3"} if net is AudioNet else {"up1", "up2", "grouped"}
    assert convs <= decomposed, rows
    if net is AudioNet:
        assert "depthwise conv (groups=48)" in rows["depthwise"].reason
    else:
        assert "ranks per group: 2 groups of 16→16" in rows["grouped"].reason
    for name in convs:
        block = result.compressed.get_submodule(name)
        assert type(block.pointwise_out) is (nn.Conv1d if net is AudioNet else nn.Conv2d)
    artifacts = result.save(tmp_path)
    validation = validate(result, artifacts)
    report = result.to_report(artifacts, validation)
    assert abs(report.macs_reduction / 1.5 - 1) <= 0.05
    assert validation.parity.passed
    # The ONNX file's Conv/ConvTranspose nodes count the MACs the analysis does.
    assert onnx_macs(artifacts.original_onnx) == result.analysis.total_macs
    # onnxruntime against the compressed PyTorch model, relative to the output scale.
    x = result.parity_inputs()
    session = onnxruntime.InferenceSession(
        str(artifacts.model_onnx), providers=["CPUExecutionProvider"]
    )
    with torch.no_grad():
        expected = result.compressed(x).numpy()
    actual = session.run(None, {"input": x.numpy()})[0]
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= 1e-4 * np.abs(expected).max()
    # The saved plan and weights rebuild the same model (plan fingerprint, block shapes).
    with torch.no_grad():
        restored = restore(artifacts.model, net())(x)
    assert torch.equal(restored, torch.from_numpy(expected))
