"""Sequential correction: each block's last stage refitted to the original layer's outputs."""

from __future__ import annotations

import copy
from functools import partial

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from planning_helpers import compress_digits, plan_of
from torch import nn

from rankfold.passes import RankPolicy, analyze, correction, decompose, trace
from rankfold.passes.core import ConfigError, DataError
from rankfold.passes.correction import (
    DEFAULT_REFINE_STEPS,
    pass_bytes_per_image,
    refine_block,
    refit_blocks,
)


class Chain(nn.Module):
    """conv-BN-ReLU twice, a residual add, pool, linear: the shapes of a CIFAR ResNet."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 12, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.conv3 = nn.Conv2d(12, 16, 3, padding=1, bias=True)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)) + x)
        return self.fc(torch.relu(self.conv3(x)).mean((2, 3)))


def chain_and_blocks(method: str, rank):
    torch.manual_seed(0)
    model = Chain()
    for bn in (model.bn1, model.bn2):  # non-trivial statistics, so the BNs shift and scale
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    gm = trace(model.eval(), torch.zeros(1, 3, 8, 8))
    analysis = analyze(gm)
    policy = RankPolicy(method=method, rank=rank, skip=["fc"], min_macs_share=0.0)
    compressed, _ = decompose(gm, analysis, plan_of(analysis, policy, "chain"))
    return gm, compressed.eval()


def inputs(seed: int, batches: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 8, 8, generator=generator) for _ in range(batches)]


def layer_error(original, compressed, name: str, batches: list[torch.Tensor]) -> float:
    """√(‖Y − Ŷ‖²/‖Y‖²) of one layer, each network fed its own activations."""
    outputs = {}
    for which, model in (("original", original), ("compressed", compressed)):
        seen: list[torch.Tensor] = []
        handle = model.get_submodule(name).register_forward_hook(
            lambda m, a, y, seen=seen: seen.append(y)
        )
        with torch.no_grad():
            for x in batches:
                model(x)
        handle.remove()
        outputs[which] = torch.cat(seen).double()
    diff = outputs["original"] - outputs["compressed"]
    return float(diff.norm() / outputs["original"].norm())


@pytest.mark.parametrize(("method", "rank"), [("cp", 4), ("tucker2", (3, 3))])
def test_refit_never_raises_a_blocks_output_error_and_reports_it(method, rank):
    original, compressed = chain_and_blocks(method, rank)
    names = ["conv1", "conv2", "conv3"]
    calibration = inputs(1)
    before = {name: layer_error(original, compressed, name, calibration) for name in names}
    refits = refit_blocks(original, compressed, names, calibration).blocks
    assert set(refits) == set(names)
    for name in names:
        after = layer_error(original, compressed, name, calibration)
        # What the refit reports is what the corrected network computes.
        assert refits[name].after == pytest.approx(after, rel=1e-4)
        assert refits[name].after <= refits[name].before + 1e-12
    # The first block sees the original's input, so its "before" is the plain fit's error;
    # later blocks start from upstream-corrected activations.
    assert refits["conv1"].before == pytest.approx(before["conv1"], rel=1e-4)
    # conv1 reads white noise, where the weight fit is already near the output optimum
    # (measured 0.757 → 0.756); the later blocks read post-ReLU activations, carrying the
    # upstream error, where least squares gains a lot (measured 0.89-0.97 → 0.60-0.74).
    assert refits["conv1"].after < refits["conv1"].before
    for name in ("conv2", "conv3"):
        assert refits[name].after < 0.85 * refits[name].before, name
    assert after < before["conv3"]
    # The network's logits move towards the original's on held-out inputs too.
    held_out = inputs(2)
    with torch.no_grad():
        x = torch.cat(held_out)
        logits = original(x)
        _, plain = chain_and_blocks(method, rank)
        gap_plain = float((plain(x) - logits).norm() / logits.norm())
        gap_refit = float((compressed(x) - logits).norm() / logits.norm())
    assert gap_refit < 0.8 * gap_plain


@pytest.mark.parametrize(("method", "rank"), [("cp", 4), ("tucker2", (3, 3))])
def test_refinement_lowers_every_blocks_error_below_the_least_squares_refit(method, rank):
    names = ["conv1", "conv2", "conv3"]
    calibration = inputs(1)
    original, least_squares = chain_and_blocks(method, rank)
    plain = refit_blocks(original, least_squares, names, calibration).blocks
    original, refined = chain_and_blocks(method, rank)
    refits = refit_blocks(original, refined, names, calibration, refine_steps=300, seed=1).blocks
    for name in names:
        # What the refinement reports is what the corrected network computes.
        assert refits[name].after == pytest.approx(
            layer_error(original, refined, name, calibration), rel=1e-4
        )
        assert refits[name].after < plain[name].after, name
    # conv1 reads white noise, where the last stage alone is near the optimum (measured 0.1-0.3 %
    # lower); behind it all stages together gain more (measured 3-6 % lower).
    assert refits["conv1"].before == pytest.approx(plain["conv1"].before, rel=1e-6)
    for name in ("conv2", "conv3"):
        assert refits[name].after < 0.98 * plain[name].after, name
    # The same seed gives the same blocks.
    original, again = chain_and_blocks(method, rank)
    refit_blocks(original, again, names, calibration, refine_steps=300, seed=1)
    for key, value in refined.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_steps_in_bfloat16_autocast_still_lower_every_error_and_keep_float32_weights():
    """The Adam steps' forward passes in bfloat16 (as on CPUs with AMX): the errors that decide
    what is kept are float32's, so every block and segment still ends below its start."""
    names = ["conv1", "conv2", "conv3"]
    calibration = inputs(1)
    runs = {}
    for dtype in (None, torch.bfloat16):
        original, compressed = chain_and_blocks("cp", 4)
        runs[dtype] = (
            compressed,
            refit_blocks(
                original,
                compressed,
                names,
                calibration,
                refine_steps=300,
                seed=1,
                segment_steps=100,
                autocast=dtype,
            ),
        )
        for segment, refit in runs[dtype][1].segments.items():
            assert refit.after < refit.before, segment
        # Reported in float32: the last segment's error is the logits' the network computes.
        with torch.no_grad():
            x = torch.cat(calibration)
            logits = original(x)
            last = float((compressed(x) - logits).norm() / logits.norm())
        assert runs[dtype][1].segments[("conv3",)].after == pytest.approx(last, rel=1e-4)
        assert all(p.dtype == torch.float32 for p in compressed.parameters())
    float32, lowered = (runs[d][1] for d in (None, torch.bfloat16))
    for name in names:
        # Each block ends within 1 % of the float32 steps' error (measured within 0.01 %)...
        assert lowered.blocks[name].after < 1.01 * float32.blocks[name].after, name
        assert lowered.blocks[name].after < lowered.blocks[name].before, name
    # ...by other steps: the forward passes did run in bfloat16.
    weights = runs[torch.bfloat16][0].state_dict()
    assert any(not torch.equal(v, weights[k]) for k, v in runs[None][0].state_dict().items())


def test_steps_on_a_cpu_run_channels_last_and_the_blocks_come_back_contiguous():
    names = ["conv1", "conv2", "conv3"]
    original, compressed = chain_and_blocks("cp", 4)
    layouts: list[bool] = []
    for name in names:
        for stage in compressed.get_submodule(name).children():
            stage.register_forward_pre_hook(
                lambda m, args: (
                    layouts.append(
                        args[0].is_contiguous(memory_format=torch.channels_last)
                        and m.weight.is_contiguous(memory_format=torch.channels_last)
                    )
                    if torch.is_grad_enabled()
                    else None
                )
            )
    done = refit_blocks(
        original, compressed, names, inputs(1), refine_steps=20, seed=1, segment_steps=10
    )
    assert layouts and set(layouts) == {True}  # every step's every stage
    assert len(done.segments) == 3
    assert all(p.is_contiguous() for p in compressed.parameters())


class Unit(nn.Module):
    """A stem conv, then one residual unit holding two convs: one segment each."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.inner = nn.Conv2d(12, 12, 3, padding=1)
        self.outer = nn.Conv2d(12, 12, 3, padding=1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.outer(torch.relu(self.inner(x))) + x)
        return self.fc(x.mean((2, 3)))


def test_segments_are_cut_where_one_tensor_carries_everything():
    torch.manual_seed(0)
    model = Unit().eval()
    gm = trace(model, torch.zeros(1, 3, 8, 8))
    policy = RankPolicy(method="cp", rank=4, skip=["fc"], min_macs_share=0.0)
    analysis = analyze(gm)
    compressed, _ = decompose(gm, analysis, plan_of(analysis, policy, "unit"))
    names = ["stem", "inner", "outer"]
    done = refit_blocks(gm, compressed.eval(), names, inputs(1), segment_steps=20)
    # The stem through its ReLU; the residual unit's two convs through the add, its ReLU and
    # the classifier (the output comes next).
    assert list(done.segments) == [("stem",), ("inner", "outer")]
    assert set(done.blocks) == set(names)


@pytest.mark.parametrize(("method", "rank"), [("cp", 4), ("tucker2", (3, 3))])
def test_segment_refinement_brings_the_network_closer_to_the_original(method, rank):
    names = ["conv1", "conv2", "conv3"]
    calibration, held_out = inputs(1), torch.cat(inputs(2))
    gaps = {}
    for steps in (0, 300):
        original, compressed = chain_and_blocks(method, rank)
        done = refit_blocks(
            original, compressed, names, calibration, refine_steps=300, seed=1, segment_steps=steps
        )
        with torch.no_grad():
            logits = original(held_out)
            gaps[steps] = float((compressed(held_out) - logits).norm() / logits.norm())
        if steps:
            # conv1 through its BN and ReLU, conv2 through the residual add and ReLU, conv3
            # through the classifier: each segment's error on the calibration data falls.
            assert list(done.segments) == [("conv1",), ("conv2",), ("conv3",)]
            for segment, refit in done.segments.items():
                assert refit.after < refit.before, segment
            with torch.no_grad():
                x = torch.cat(calibration)
                last = float((compressed(x) - original(x)).norm() / original(x).norm())
            # The last segment ends at the output: what it reports is the logits' error.
            assert done.segments[("conv3",)].after == pytest.approx(last, rel=1e-4)
        else:
            assert done.segments == {}
    # On inputs it never saw, the logits' relative error falls from 0.13 to 0.06 (measured,
    # both methods): the segments see the ReLUs and sums that block-wise fits cannot.
    assert gaps[300] < 0.7 * gaps[0]


def test_segments_are_on_by_default_where_a_planned_method_asks_for_them():
    from rankfold.converter import build_config
    from rankfold.converter.pipeline import refit_segment_steps
    from rankfold.passes.plan import LayerPlan, Plan

    def plan(*methods: str | None) -> Plan:
        layers = [
            LayerPlan(name=f"conv{i}", type="Conv2d", method=m, ranks=[4, 4], reason="test")
            for i, m in enumerate(methods)
        ]
        return Plan(model="m", method=methods[0] or "cp", layers=layers)

    config = build_config({"model": "digits-cnn", "train_data": "t.npz", "refit_steps": 50})
    assert refit_segment_steps(config, plan("tucker2", "cp")) == 50
    assert refit_segment_steps(config, plan("tucker2-cp")) == 50
    for method in ("cp", "cp-epc", "svd", "cp-lrf"):
        assert refit_segment_steps(config, plan(method, None)) == 0
    # The user's value wins either way.
    given = config.model_copy(update={"refit_segment_steps": 7})
    assert refit_segment_steps(given, plan("cp")) == 7
    off = config.model_copy(update={"refit_segment_steps": 0})
    assert refit_segment_steps(off, plan("tucker2")) == 0


def test_refinement_is_undone_when_it_does_not_lower_the_error():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Conv2d(2, 4, 1))
    x = [torch.randn(8, 3, 5, 5) for _ in range(2)]
    with torch.no_grad():
        y = [block(chunk) for chunk in x]  # the block is already exact
    kept = copy.deepcopy(block.state_dict())
    refit = refine_block(block, x, y, steps=20, lr=1e-2, device=torch.device("cpu"))
    assert refit.before == refit.after < 1e-6
    for key, value in kept.items():
        assert torch.equal(block.state_dict()[key], value)
    # A target it can only approach: the error falls, and the block keeps the better weights.
    target = [chunk + 0.1 * torch.randn_like(chunk) for chunk in y]
    noisy = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Conv2d(2, 4, 1))
    refit = refine_block(noisy, x, target, steps=200, lr=1e-2, device=torch.device("cpu"))
    assert refit.after < 0.5 * refit.before
    with torch.no_grad():
        error = sum(float((noisy(a) - b).square().sum()) for a, b in zip(x, target, strict=True))
    energy = sum(float(b.square().sum()) for b in target)
    assert refit.after == pytest.approx((error / energy) ** 0.5, rel=1e-4)


def test_a_rate_that_overshoots_a_close_start_is_backed_off_after_a_quarter(monkeypatch):
    """Started near its target, a block whose rate overshoots has a higher error after a quarter
    of its steps; the rest start again at a tenth of the rate and end below the start (without
    the back-off, at the same rate throughout, the refinement is undone)."""
    torch.manual_seed(0)
    x = [torch.randn(64, 12) for _ in range(2)]
    truth = nn.Sequential(nn.Linear(12, 4, bias=False), nn.Linear(4, 20), nn.Identity())
    with torch.no_grad():
        y = [truth(chunk) + 0.3 * torch.randn(64, 20) for chunk in x]
        for parameter in truth.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    cpu = torch.device("cpu")
    backed_off = refine_block(copy.deepcopy(truth), x, y, steps=40, lr=0.3, device=cpu)
    assert backed_off.after < 0.96 * backed_off.before
    monkeypatch.setattr(correction, "BACKED_OFF_RATE", 1.0)
    same_rate = refine_block(copy.deepcopy(truth), x, y, steps=40, lr=0.3, device=cpu)
    assert same_rate.after == same_rate.before == backed_off.before


@pytest.mark.parametrize("stage", ["linear", "conv1x1"])
def test_a_block_acting_per_position_is_refined_on_moments_as_well_as_on_minibatches(stage):
    """Per-position blocks take exact full-batch steps from the input's moments; the result
    matches the minibatch refinement's and the errors it reports are the data's."""
    torch.manual_seed(0)
    mixing = torch.randn(12, 12) * torch.logspace(0, -2, 12)  # correlated channels
    layer = nn.Linear(12, 20)
    x = [torch.randn(4, 6, 6, 12) @ mixing for _ in range(3)]
    with torch.no_grad():
        y = [layer(chunk) + 0.05 * torch.randn(4, 6, 6, 20) for chunk in x]
    block = nn.Sequential(nn.Linear(12, 4, bias=False), nn.Linear(4, 20))
    if stage == "conv1x1":
        x = [chunk.movedim(-1, 1) for chunk in x]
        y = [chunk.movedim(-1, 1) for chunk in y]
        block = nn.Sequential(nn.Conv2d(12, 4, 1, bias=False), nn.Conv2d(4, 20, 1))
    assert_moments_match_minibatches(block, x, y)


def test_refinement_on_moments_reaches_the_reduced_rank_optimum():
    """A per-position block Linear(C→r) → Linear(r→N, bias) can at best be the reduced-rank
    regression of y on x: the least-squares fit's values cut to their top r singular values.
    Refined on moments with the default 200 steps, a block started at random reaches that
    optimum's error (Adam at the default rate was at 4.4 times it after 400 steps)."""
    torch.manual_seed(0)
    width, rank, outputs = 16, 3, 12
    mixing = torch.randn(width, width) * torch.logspace(0, -2, width)
    x = [torch.randn(32, 4, 4, width) @ mixing + 0.5 for _ in range(2)]
    truth = torch.randn(width, outputs)
    y = [chunk @ truth + 0.3 * torch.randn(32, 4, 4, outputs) + 1.0 for chunk in x]
    block = nn.Sequential(nn.Linear(width, rank, bias=False), nn.Linear(rank, outputs))
    result = refine_block(block, x, y, DEFAULT_REFINE_STEPS, 1e-3, torch.device("cpu"))
    z = torch.cat(x).reshape(-1, width).double()
    target = torch.cat(y).reshape(-1, outputs).double()
    centred_z, centred_y = z - z.mean(0), target - target.mean(0)
    fitted = centred_z @ torch.linalg.lstsq(centred_z, centred_y).solution
    spectrum = torch.linalg.svdvals(fitted)
    optimum = (centred_y - fitted).square().sum() + spectrum[rank:].square().sum()
    best = float(optimum / target.square().sum()) ** 0.5
    assert result.before > 2 * best
    assert result.after == pytest.approx(best, rel=1e-3)


def assert_moments_match_minibatches(block: nn.Sequential, x: list, y: list) -> None:
    """`block` refined on moments lands lower than the same block on minibatches (an
    Identity stage sends it down that path), reports the data's own errors, and draws nothing:
    another seed gives the same weights, unlike minibatches."""
    minibatch = nn.Sequential(*copy.deepcopy(block), nn.Identity())
    cpu = torch.device("cpu")
    reseeded, resampled = copy.deepcopy(block), copy.deepcopy(minibatch)
    exact = refine_block(block, x, y, steps=300, lr=1e-2, device=cpu)
    sampled = refine_block(minibatch, x, y, steps=300, lr=1e-2, device=cpu)
    refine_block(reseeded, x, y, steps=300, lr=1e-2, device=cpu, seed=1)
    refine_block(resampled, x, y, steps=300, lr=1e-2, device=cpu, seed=1)
    assert all(map(torch.equal, block.parameters(), reseeded.parameters()))
    assert not all(map(torch.equal, minibatch.parameters(), resampled.parameters()))
    assert exact.read == "moments" and sampled.read in ("images", "windows")
    assert exact.before == pytest.approx(sampled.before, rel=1e-6)
    assert exact.after < 0.6 * exact.before
    assert exact.after < 0.97 * sampled.after
    with torch.no_grad():
        error = sum(float((block(a) - b).double().square().sum()) for a, b in zip(x, y))
    energy = sum(float(b.double().square().sum()) for b in y)
    assert exact.after == pytest.approx((error / energy) ** 0.5, rel=1e-6)


PATCH_BLOCKS = {
    # Tucker-2: 1×1 → 3×3 (stride 2, padded) → 1×1
    "tucker2": lambda: nn.Sequential(
        nn.Conv2d(6, 4, 1, bias=False), nn.Conv2d(4, 5, 3, 2, 1), nn.Conv2d(5, 8, 1)
    ),
    # CP: 1×1 → depthwise 3×3 (dilated, padded) → 1×1
    "cp": lambda: nn.Sequential(
        nn.Conv2d(6, 5, 1, bias=False),
        nn.Conv2d(5, 5, 3, padding=2, dilation=2, groups=5),
        nn.Conv2d(5, 8, 1),
    ),
    # a stride-2 1×1 (a downsampling shortcut's SVD) reads one position of every other
    "svd-stride2": lambda: nn.Sequential(nn.Conv2d(6, 3, 1, 2), nn.Conv2d(3, 8, 1)),
}


@pytest.mark.parametrize("kind", sorted(PATCH_BLOCKS))
def test_a_block_acting_per_patch_is_refined_on_patch_moments(kind, monkeypatch):
    """A block of convs with one spatial stage is one affine map of each output position's input
    patch: where a minibatch step is dear it takes exact full-batch steps from the patches'
    moments, reports the data's own errors and lands below minibatches."""
    monkeypatch.setattr(correction, "DEAR_STEP_MACS", 0)  # these 12×12 inputs are cheap
    torch.manual_seed(0)
    mixing = torch.randn(6, 6) * torch.logspace(0, -2, 6)
    x = [torch.einsum("nchw,cd->ndhw", torch.randn(4, 6, 12, 12), mixing) for _ in range(3)]
    layer = {
        "tucker2": nn.Conv2d(6, 8, 3, 2, 1),
        "cp": nn.Conv2d(6, 8, 3, padding=2, dilation=2),
        "svd-stride2": nn.Conv2d(6, 8, 1, 2),
    }[kind]
    with torch.no_grad():
        y = [layer(chunk) for chunk in x]
        y = [chunk + 0.05 * torch.randn_like(chunk) for chunk in y]
    assert_moments_match_minibatches(PATCH_BLOCKS[kind](), x, y)


@pytest.mark.parametrize("kind", ["tucker2", "cp"])
def test_the_least_squares_refit_from_patch_moments_is_the_one_from_features(kind, monkeypatch):
    """A block refined on moments takes its last stage's least-squares refit from the same
    moments (its inputs are the patches times the map up to it): the stage and the errors
    equal those of the refit on the features themselves."""
    monkeypatch.setattr(correction, "DEAR_STEP_MACS", 0)
    torch.manual_seed(0)
    x = [torch.randn(4, 6, 12, 12) for _ in range(3)]
    layer = (
        nn.Conv2d(6, 8, 3, 2, 1) if kind == "tucker2" else nn.Conv2d(6, 8, 3, padding=2, dilation=2)
    )
    with torch.no_grad():
        y = [layer(chunk) + 0.05 * torch.randn_like(layer(chunk)) for chunk in x]
    from_moments, from_features = PATCH_BLOCKS[kind](), PATCH_BLOCKS[kind]()
    from_features.load_state_dict(from_moments.state_dict())
    cpu = torch.device("cpu")
    moments = refine_block(from_moments, x, y, steps=0, lr=1e-3, device=cpu, damping=1e-3)
    features = correction._refit(from_features, y, [(chunk,) for chunk in x], 1e-3)
    assert moments.read == "moments"
    assert moments.before == pytest.approx(features.before, rel=1e-6)
    assert moments.after == pytest.approx(features.after, rel=1e-5)
    assert features.after < 0.9 * features.before
    for a, b in zip(from_moments[-1].parameters(), from_features[-1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_patch_blocks_keep_minibatches_where_a_step_is_cheap_or_padding_would_meet_a_bias():
    """On small inputs a patch block's minibatch step costs milliseconds and stays the path; a
    first stage with a bias before a padded conv is not one affine map of the patch (the padding
    reads zeros, not the bias), so it keeps minibatches wherever it runs."""
    torch.manual_seed(0)
    x = [torch.randn(4, 6, 12, 12) for _ in range(2)]
    y = [torch.randn(4, 8, 6, 6) for _ in range(2)]
    cheap = [PATCH_BLOCKS["tucker2"]() for _ in range(2)]
    biased = [
        nn.Sequential(nn.Conv2d(6, 4, 1), nn.Conv2d(4, 5, 3, 2, 1), nn.Conv2d(5, 8, 1))
        for _ in range(2)
    ]
    for pair in (cheap, biased):
        pair[1].load_state_dict(pair[0].state_dict())
    cpu = torch.device("cpu")
    for seed in range(2):
        refine_block(cheap[seed], x, y, steps=5, lr=1e-2, device=cpu, seed=seed)
    assert not all(map(torch.equal, cheap[0].parameters(), cheap[1].parameters()))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(correction, "DEAR_STEP_MACS", 0)
        for seed in range(2):
            refine_block(
                biased[seed], x, y, steps=5, lr=1e-2, device=torch.device("cpu"), seed=seed
            )
    assert not all(map(torch.equal, biased[0].parameters(), biased[1].parameters()))


def test_a_wide_block_on_few_positions_keeps_minibatches():
    """On moments a step costs (C+1) rows' worth of the block and a (C+1)²×O product: with a
    wide input and one position per image, minibatches are cheaper, and drawn (seeded)."""
    torch.manual_seed(0)
    x = [torch.randn(8, 256) for _ in range(2)]
    y = [torch.randn(8, 16) for _ in range(2)]
    blocks = [nn.Sequential(nn.Linear(256, 4, bias=False), nn.Linear(4, 16)) for _ in range(2)]
    blocks[1].load_state_dict(blocks[0].state_dict())
    for seed, block in enumerate(blocks):
        refine_block(block, x, y, steps=5, lr=1e-2, device=torch.device("cpu"), seed=seed)
    assert not all(map(torch.equal, blocks[0].parameters(), blocks[1].parameters()))


def test_a_pass_holds_each_value_until_its_last_reader_has_run():
    """conv 3→8 → ReLU → 1×1 conv 8→4 on 5×5 images: the ReLU's input and output (800 bytes
    an image each) are held together, the network's input is already freed."""
    gm = trace(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval(),
        torch.zeros(1, 3, 5, 5),
    )
    assert pass_bytes_per_image(gm, torch.zeros(2, 3, 5, 5)) == 2 * 8 * 25 * 4


def test_infinite_damping_keeps_the_fit():
    original, compressed = chain_and_blocks("cp", 4)
    kept = copy.deepcopy(compressed.state_dict())
    refits = refit_blocks(original, compressed, ["conv3"], inputs(1), damping=1e12).blocks
    assert refits["conv3"].after == pytest.approx(refits["conv3"].before, rel=1e-6)
    # conv2's block was not named: untouched.
    for key, value in kept.items():
        if key.startswith("conv2"):
            assert torch.equal(compressed.state_dict()[key], value)


def test_refit_rejects_another_graph_and_empty_data():
    original, compressed = chain_and_blocks("cp", 4)
    other = trace(nn.Sequential(nn.Conv2d(3, 4, 1)), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ConfigError, match="not the original's"):
        refit_blocks(other, compressed, ["conv1"], inputs(1))
    with pytest.raises(DataError, match="no calibration batches"):
        refit_blocks(original, compressed, ["conv1"], [])
    with pytest.raises(ConfigError, match="damping"):
        refit_blocks(original, compressed, ["conv1"], inputs(1), damping=-1)
    with pytest.raises(ConfigError, match="steps ≥ 0"):
        refit_blocks(original, compressed, ["conv1"], inputs(1), refine_steps=-1)
    with pytest.raises(ConfigError, match="steps ≥ 0"):
        refit_blocks(original, compressed, ["conv1"], inputs(1), segment_steps=-1)


def test_compress_refits_with_training_data_and_the_saved_model_restores(tmp_path):
    from rankfold.converter import build_config
    from rankfold.converter.pipeline import restore, save_model
    from rankfold.models.digits import digits_splits

    _, test = digits_splits()
    np.savez(tmp_path / "digits.npz", x=test.x[:128], y=test.y[:128])
    settings = {
        "model": "digits-cnn",
        "ranks": {"method": "svd", "macs_reduction": 2},
        "train_data": str(tmp_path / "digits.npz"),
        "eval_data": str(tmp_path / "digits.npz"),
        "recalibrate": False,
        "latency": {"enabled": False},
        "search": {"cache_dir": str(tmp_path / "cache")},
    }

    run = partial(compress_digits, settings)

    refitted = run()  # on by default with training data
    rows = [row for row in refitted.decomposition.layers if "refit_error_after" in row.extras]
    assert rows and refitted.refit.layers == len(rows) and refitted.refit.images == 128
    for row in rows:
        assert row.extras["refit_error_after"] <= row.extras["refit_error_before"]
    # The digits CNN's blocks and segments are cheap on whole 8×8 images: their steps read them.
    assert {row.extras["refit_steps_read"] for row in rows} == {"images"}
    assert refitted.accuracy["refitted"] >= refitted.accuracy["decomposed"]
    assert not build_config({**settings, "refit": False}).refits
    assert not build_config({**settings, "train_data": None, "eval_data": None}).refits
    assert refitted.refit.segments == [] and refitted.refit.segment_steps == 0
    # With segment steps the report lists each segment's blocks and its output error, lower.
    segmented = run(refit_segment_steps=30)
    assert segmented.refit.segment_steps == 30
    assert [s.blocks for s in segmented.refit.segments] == [[row.name] for row in rows]
    for segment in segmented.refit.segments:
        assert segment.error_after <= segment.error_before
    assert {s.steps_read for s in segmented.refit.segments} == {"images"}
    assert any(s.error_after < s.error_before for s in segmented.refit.segments)
    assert not segmented.refit.segments_by_default
    # Tucker-2 asks for the segments: on by default, with the refit's steps; 0 turns them off.
    tucker2 = {"method": "tucker2", "macs_reduction": 2}
    by_default = run(ranks=tucker2, refit_steps=30)
    assert by_default.refit.segment_steps == 30 and by_default.refit.segments_by_default
    assert [s.blocks for s in by_default.refit.segments] == [
        [row.name] for row in by_default.decomposition.layers if "refit_error_after" in row.extras
    ]
    assert run(ranks=tucker2, refit_steps=30, refit_segment_steps=0).refit.segments == []
    assert run(ranks=tucker2, refit_steps=0).refit.segment_steps == 0
    # The activations of both networks for all the images must fit in --refit-memory-mb.
    per_image = 2 * pass_bytes_per_image(
        refitted.compressed, refitted.example_input.repeat(2, 1, 1, 1)
    )
    capped = run(refit_steps=0, refit_memory_mb=1)
    assert capped.refit.images == (1 << 20) // per_image < 128
    assert capped.refit.images + capped.refit.images_left_out == 128
    assert all(
        row.extras["refit_steps_read"] is None
        for row in capped.decomposition.layers
        if "refit_error_after" in row.extras
    )
    assert refitted.refit.images_left_out == 0
    # The refit gives bias-free last stages a bias; the saved model still loads.
    save_model(refitted, tmp_path / "model.pt")
    restored = restore(tmp_path / "model.pt")
    x = torch.randn(4, *refitted.example_input.shape[1:])
    with torch.no_grad():
        assert torch.allclose(restored(x), refitted.compressed(x), atol=1e-5)


@pytest.mark.parametrize("amx", [True, False])
def test_the_refit_steps_in_bfloat16_where_fine_tuning_would_unless_amp_is_off(
    tmp_path, monkeypatch, amx
):
    from rankfold.converter import finetune
    from rankfold.models.digits import digits_splits

    monkeypatch.setattr(finetune, "native_bfloat16_cpu", lambda: amx)
    _, test = digits_splits()
    np.savez(tmp_path / "digits.npz", x=test.x[:64], y=test.y[:64])
    settings = {
        "model": "digits-cnn",
        "ranks": {"method": "cp", "macs_reduction": 2},
        "train_data": str(tmp_path / "digits.npz"),
        "refit_steps": 20,
        "recalibrate": False,
        "latency": {"enabled": False},
        "search": {"cache_dir": str(tmp_path / "cache")},
    }
    default = compress_digits(settings)
    assert default.refit.precision == ("bfloat16 autocast" if amx else "float32")
    # --no-amp needs no fine-tuning where the refit's steps read it.
    assert compress_digits(settings, finetune={"amp": False}).refit.precision == "float32"
    lowered = [
        row.extras for row in default.decomposition.layers if "refit_error_after" in row.extras
    ]
    assert lowered and all(e["refit_error_after"] <= e["refit_error_before"] for e in lowered)


def test_recalibration_after_a_refit_is_kept_only_if_it_brings_the_model_closer(
    tmp_path, monkeypatch
):
    from rankfold.converter import build_config, compress, pipeline
    from rankfold.models import batches, load_model, train_digits_cnn
    from rankfold.models.digits import digits_splits

    train, _ = digits_splits()
    np.savez(tmp_path / "train.npz", x=train.x[:300], y=train.y[:300])
    config = build_config(
        {
            "model": "digits-cnn",
            "ranks": {"method": "tucker2", "macs_reduction": 2},
            "train_data": str(tmp_path / "train.npz"),
            "statistics": {"samples": 128},
            "latency": {"enabled": False},
            "search": {"cache_dir": str(tmp_path / "cache")},
        }
    )
    trained = train_digits_cnn(epochs=2)
    _, spec = load_model("digits-cnn")

    def run():
        return compress(copy.deepcopy(trained), torch.zeros(1, *spec.input_shape), config, spec)

    judge = pipeline.judging_images(pipeline.open_dataset(config.train_data, spec, None, config))
    assert len(judge) == 300  # fewer than JUDGING_IMAGES: all of them

    def divergence(result) -> float:
        """Mean KL(original ‖ compressed) of the predicted distributions on the judging images."""
        total = 0.0
        with torch.no_grad():
            for x, _ in batches(judge, spec):
                p = torch.log_softmax(result.original(x).double(), 1)
                q = torch.log_softmax(result.compressed(x).double(), 1)
                total += float((p.exp() * (p - q)).sum())
        return total / len(judge)

    honest = run()
    check = honest.recalibration_check
    assert check.images == 300 and honest.recalibration == "batchnorm"
    # All 300 images are judged, the refit's first 128 among them: said, not hidden.
    assert check.refit_images_among_them == 128 and honest.recalibration_images == 300
    assert check.criterion == "divergence" and check.divergence_refitted > 0
    closer = check.divergence_recalibrated < check.divergence_refitted
    assert (check.kept == "recalibrated") == closer
    assert divergence(honest) == pytest.approx(
        min(check.divergence_refitted, check.divergence_recalibrated), rel=1e-6
    )

    # A recalibration that wrecks the statistics is undone: the refitted weights come back.
    real_recalibrate = pipeline.recalibrate_bn

    def wrecking_recalibrate(model, inputs):
        real_recalibrate(model, inputs)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_var.mul_(1e4)

    monkeypatch.setattr(pipeline, "recalibrate_bn", wrecking_recalibrate)
    wrecked = run()
    check = wrecked.recalibration_check
    assert check.kept == "refitted"
    assert check.divergence_recalibrated > 10 * check.divergence_refitted
    assert wrecked.accuracy.get("recalibrated") is None
    assert divergence(wrecked) == pytest.approx(check.divergence_refitted, rel=1e-6)


class StridedUnit(nn.Module):
    """conv → BN → ReLU → conv, plus a strided 1×1 shortcut (and an optional squeeze-excite
    gate, which reads every position)."""

    def __init__(self, kernels, strides, dilations, pool=False, gate=False) -> None:
        super().__init__()
        layers, width = [], 4
        for kernel, stride, dilation in zip(kernels, strides, dilations, strict=True):
            padding = dilation * (kernel - 1) // 2
            layers += [nn.Conv2d(width, 6, kernel, stride, padding, dilation), nn.BatchNorm2d(6)]
            layers.append(nn.ReLU())
            width = 6
        if pool:
            layers.append(nn.MaxPool2d(3, 1, 1))
        self.body = nn.Sequential(*layers)
        self.shortcut = nn.Conv2d(4, 6, 1, int(np.prod(strides)))
        self.gate = nn.AdaptiveAvgPool2d(1) if gate else None

    def forward(self, x):
        out = self.body(x) + self.shortcut(x)
        return out * self.gate(out).sigmoid() if self.gate is not None else out.relu()


def segment_of(module: nn.Module, size: int):
    gm = trace(module.eval(), torch.zeros(1, 4, size, size))
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    return gm, nodes


@given(
    kernels=st.lists(st.sampled_from([1, 3, 5]), min_size=1, max_size=3),
    data=st.data(),
    size=st.integers(9, 30),
    pool=st.booleans(),
)
@settings(max_examples=40, deadline=None)
def test_windows_give_the_whole_images_values(kernels, data, size, pool):
    """Every window the steps draw, run through the segment, gives the whole image's output
    at its positions exactly: its input starts at a multiple of the stride and covers all
    that the kept positions read (strides, dilations, a pool and a shortcut included)."""
    strides = data.draw(st.lists(st.sampled_from([1, 2]), min_size=len(kernels), max_size=3))
    dilations = data.draw(st.lists(st.sampled_from([1, 2]), min_size=len(kernels), max_size=3))
    strides, dilations = strides[: len(kernels)], dilations[: len(kernels)]
    torch.manual_seed(0)
    gm, segment = segment_of(StridedUnit(kernels, strides, dilations, pool), size)
    reach = correction._segment_reach(gm, segment)
    assert reach is not None and reach.stride == (int(np.prod(strides)),) * 2
    x = torch.randn(1, 4, size, size)
    with torch.no_grad():
        whole = gm(x)
    crops = correction._Crops(reach, (size, size), tuple(whole.shape[2:]))
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        read, kept, written = crops.draw(generator)
        with torch.no_grad():
            window = correction._run_segment(gm, segment, x[(slice(None), *read)])[kept]
        torch.testing.assert_close(window, whole[(slice(None), *written)], rtol=1e-5, atol=1e-5)


def test_steps_on_dear_images_read_windows_and_still_lower_the_error(monkeypatch):
    """With a step on whole images counted dear, a segment's steps read CROP_SIDE² windows of
    its outputs (the first conv sees at most 12×12 inputs, not 24×24), and the segment's error
    on the whole images still falls."""
    monkeypatch.setattr(correction, "DEAR_STEP_MACS", 0)
    torch.manual_seed(0)
    gm, segment = segment_of(StridedUnit([3, 3], [1, 1], [1, 1]), 24)
    target_unit = copy.deepcopy(gm)
    with torch.no_grad():
        for parameter in target_unit.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
        x = [torch.randn(8, 4, 24, 24) for _ in range(2)]
        y = [target_unit(chunk) for chunk in x]
    seen = []
    first = gm.get_submodule("body.0")
    hook = first.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[-1]))
    blocks = ["body.0", "body.3"]
    cpu = torch.device("cpu")
    with torch.no_grad():
        now = [gm(chunk) for chunk in x]
    refit, outputs = correction.refine_segment(gm, segment, blocks, x, now, y, 60, 1e-2, cpu)
    hook.remove()
    # every step's window: 8 outputs and the two 3×3 convs' margins (less at an edge)
    assert sum(1 for side in seen if side <= 12) >= 60
    assert refit.read == "windows"
    assert refit.after < 0.8 * refit.before
    with torch.no_grad():
        error = sum(float((gm(a) - b).double().square().sum()) for a, b in zip(x, y))
    energy = sum(float(b.double().square().sum()) for b in y)
    assert refit.after == pytest.approx((error / energy) ** 0.5, rel=1e-5)
    before = sum(float((a - b).double().square().sum()) for a, b in zip(now, y))
    assert refit.before == pytest.approx((before / energy) ** 0.5, rel=1e-6)
    with torch.no_grad():  # the values returned are the refined segment's
        assert all(torch.equal(out, gm(a)) for out, a in zip(outputs, x, strict=True))


def test_a_segment_that_cannot_improve_is_kept_and_returns_its_values():
    """A segment already equal to its targets keeps its weights, and what it returns is the
    values it was given (no step's values leak out)."""
    torch.manual_seed(0)
    gm, segment = segment_of(StridedUnit([3, 3], [1, 1], [1, 1]), 12)
    x = [torch.randn(4, 4, 12, 12) for _ in range(2)]
    with torch.no_grad():
        y = [gm(chunk) for chunk in x]
    kept = copy.deepcopy(gm.state_dict())
    now = [chunk.clone() for chunk in y]
    cpu = torch.device("cpu")
    refit, outputs = correction.refine_segment(
        gm, segment, ["body.0", "body.3"], x, now, y, 10, 1e-2, cpu
    )
    assert refit.before == refit.after < 1e-6
    assert all(torch.equal(value, gm.state_dict()[key]) for key, value in kept.items())
    assert all(torch.equal(out, chunk) for out, chunk in zip(outputs, now, strict=True))


def test_operations_that_read_every_position_keep_whole_images(monkeypatch):
    """A squeeze-excite gate (a global pool) has no reach, so steps take whole images; and a
    reach that misses an operation's margin fails the check on a drawn window."""
    monkeypatch.setattr(correction, "DEAR_STEP_MACS", 0)
    torch.manual_seed(0)
    gm, segment = segment_of(StridedUnit([3], [1], [1], gate=True), 20)
    assert correction._segment_reach(gm, segment) is None
    gm, segment = segment_of(StridedUnit([3], [1], [1]), 20)
    x, forward = torch.randn(2, 4, 20, 20), partial(correction._run_segment, gm, segment)
    with torch.no_grad():
        y = forward(x)
    cpu = torch.device("cpu")
    right = correction._segment_reach(gm, segment)
    assert correction._crops(right, forward, [gm], x, y, 2, cpu) is not None
    wrong = correction._Reach((1, 1), (0, 0), (0, 0))  # as if the 3×3 conv were 1×1
    assert correction._crops(wrong, forward, [gm], x, y, 2, cpu) is None
