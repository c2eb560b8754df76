"""BatchNorm recalibration and bias correction (passes/recalibrate.py)."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from planning_helpers import plan_of
from torch import nn

from rankfold.passes import RankPolicy, analyze, decompose, trace
from rankfold.passes.blocks import FactorizedBlock
from rankfold.passes.core import ConfigError, DataError
from rankfold.passes.recalibrate import correct_bias, has_batchnorm, recalibrate_bn


class SmallBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(self.drop(x.mean((2, 3))))


class SmallPlain(nn.Module):
    """BN-free, like VGG/AlexNet: conv → ReLU → conv → ReLU → pool → linear."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=bias)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=bias)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def _inputs(n_batches: int = 4, batch: int = 32, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 8, 8, generator=generator) for _ in range(n_batches)]


def _accuracy(model: nn.Module, inputs: list[torch.Tensor], labels: list[torch.Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        right = sum(int((model(x).argmax(1) == y).sum()) for x, y in zip(inputs, labels))
    return right / sum(len(y) for y in labels)


def test_has_batchnorm() -> None:
    assert has_batchnorm(SmallBN())
    assert not has_batchnorm(SmallPlain(bias=True))
    assert not has_batchnorm(nn.Sequential(nn.BatchNorm2d(4, track_running_stats=False)))


def test_recalibration_restores_accuracy_after_shifted_activations() -> None:
    torch.manual_seed(3)
    model = SmallBN()
    data = _inputs()
    # Give the model the data's own statistics, then label the data with its predictions: the
    # unshifted model is right on every example by construction.
    assert recalibrate_bn(model, data) == 1
    model.eval()
    with torch.no_grad():
        labels = [model(x).argmax(1) for x in data]
    assert _accuracy(model, data, labels) == 1.0
    assert len(torch.cat(labels).unique()) >= 3  # not a constant prediction

    # Scale and shift each conv channel: the stale running statistics now misnormalize it.
    with torch.no_grad():
        model.conv.weight.mul_(torch.logspace(-1, 1, 8).view(-1, 1, 1, 1))
        model.conv.bias.add_(torch.linspace(-3, 3, 8))
    assert _accuracy(model, data, labels) < 0.3
    stale_mean = model.bn.running_mean.clone()

    model.train()  # the caller's mode must come back, for every module
    model.drop.eval()
    assert recalibrate_bn(model, data) == 1
    assert model.training and not model.drop.training and model.bn.training
    assert model.bn.momentum == pytest.approx(0.1)
    assert (model.bn.running_mean - stale_mean).abs().max() > 0.5
    # BN(a·z + b) = BN(z) per channel for a > 0, so accuracy returns to (almost) exactly 100 %.
    assert _accuracy(model, data, labels) >= 0.98


def test_recalibration_is_the_plain_average_over_batches() -> None:
    model = SmallBN()
    data = _inputs(n_batches=3)
    assert recalibrate_bn(model, [(x, torch.zeros(len(x))) for x in data]) == 1
    with torch.no_grad():
        per_batch = [model.conv(x) for x in data]
    expected_mean = torch.stack([z.mean((0, 2, 3)) for z in per_batch]).mean(0)
    expected_var = torch.stack([z.var((0, 2, 3), unbiased=True) for z in per_batch]).mean(0)
    torch.testing.assert_close(model.bn.running_mean, expected_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.bn.running_var, expected_var, atol=1e-5, rtol=1e-5)
    assert int(model.bn.num_batches_tracked) == 3

    assert recalibrate_bn(model, data, max_batches=1) == 1
    torch.testing.assert_close(
        model.bn.running_mean, per_batch[0].mean((0, 2, 3)), atol=1e-5, rtol=0
    )


def test_recalibration_without_batchnorm_changes_nothing() -> None:
    model = SmallPlain(bias=True)
    before = copy.deepcopy(model.state_dict())
    assert recalibrate_bn(model, _inputs()) == 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_recalibration_errors_leave_the_statistics_alone() -> None:
    model = SmallBN()
    recalibrate_bn(model, _inputs())
    mean, var = model.bn.running_mean.clone(), model.bn.running_var.clone()
    with pytest.raises(DataError, match="no calibration batches") as info:
        recalibrate_bn(model, [])
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="tensors or \\(inputs, labels\\) pairs"):
        recalibrate_bn(model, ["not a tensor"])
    with pytest.raises(ConfigError, match="max_batches must be >= 1"):
        recalibrate_bn(model, _inputs(), max_batches=0)
    assert torch.equal(model.bn.running_mean, mean) and torch.equal(model.bn.running_var, var)
    assert model.bn.momentum == pytest.approx(0.1)


def _decomposed(model: nn.Module, method: str, rank) -> tuple[torch.fx.GraphModule, ...]:
    gm = trace(model.eval(), torch.zeros(1, 3, 8, 8))
    analysis = analyze(gm)
    policy = RankPolicy(method=method, rank=rank, skip=["fc"], min_macs_share=0.0)
    compressed, _ = decompose(gm, analysis, plan_of(analysis, policy, "small"))
    return gm, compressed.eval()


def _layer_means(model: nn.Module, name: str, inputs: list[torch.Tensor]) -> torch.Tensor:
    outputs = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, out: outputs.append(out))
    with torch.no_grad():
        for x in inputs:
            model(x)
    handle.remove()
    return torch.cat(outputs).double().mean((0, 2, 3))


def _exact_blocks(model: nn.Module, names: tuple[str, ...]) -> tuple[torch.fx.GraphModule, ...]:
    """Each named conv becomes a block: the same conv without bias, then a 1×1 identity with it."""
    original = trace(model.eval(), torch.zeros(1, 3, 8, 8))
    compressed = copy.deepcopy(original)
    for name in names:
        conv = copy.deepcopy(original.get_submodule(name))
        out = nn.Conv2d(conv.out_channels, conv.out_channels, 1)
        with torch.no_grad():
            out.weight.copy_(torch.eye(conv.out_channels)[:, :, None, None])
            out.bias.copy_(conv.bias)
        conv.bias = None
        stages = OrderedDict(spatial=conv, pointwise_out=out)
        setattr(compressed, name, FactorizedBlock(stages, name, "exact", (conv.out_channels,)))
    return original, compressed.eval()


def test_bias_correction_removes_injected_shifts_layer_after_layer() -> None:
    torch.manual_seed(1)
    original, compressed = _exact_blocks(SmallPlain(bias=True), ("conv1", "conv2"))
    data = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(compressed(data[0]), original(data[0]), atol=1e-5, rtol=0)
    shifts = {"conv1": torch.linspace(-0.5, 0.3, 16), "conv2": torch.linspace(0.4, -0.2, 16)}
    with torch.no_grad():
        for name, shift in shifts.items():
            compressed.get_submodule(name)[-1].bias.sub_(shift)
    # The downstream shift is only measured right after the upstream one is removed: with both
    # measured at once, the ReLU between them would make conv2's correction wrong.
    found = correct_bias(original, compressed, ["conv2", "conv1"], data)
    assert list(found) == ["conv2", "conv1"]
    for name, shift in shifts.items():
        assert found[name] == pytest.approx(float(shift.abs().max()), abs=1e-4)
    with torch.no_grad():
        for x in data:
            torch.testing.assert_close(compressed(x), original(x), atol=1e-4, rtol=0)


def test_bias_correction_matches_channel_means_of_a_low_rank_model() -> None:
    torch.manual_seed(2)
    original, compressed = _decomposed(SmallPlain(bias=False), "tucker2", [3, 3])
    data = _inputs(seed=3)
    assert compressed.conv2[-1].bias is None
    before = {name: _layer_means(compressed, name, data) for name in ("conv1", "conv2")}
    reference = {name: _layer_means(original, name, data) for name in ("conv1", "conv2")}
    with torch.no_grad():
        logit_error_before = sum(float((compressed(x) - original(x)).pow(2).mean()) for x in data)

    corrected = []
    found = correct_bias(
        original,
        compressed,
        ["conv1", "conv2"],
        data,
        max_batches=4,
        progress=lambda: corrected.append(len(corrected)),
    )

    assert corrected == [0, 1]  # the progress bar moves once per layer
    assert isinstance(compressed.conv2[-1].bias, nn.Parameter)
    for name in ("conv1", "conv2"):
        assert found[name] > 1e-3  # low rank really did shift the means
        gap_before = float((before[name] - reference[name]).abs().max())
        gap_after = float((_layer_means(compressed, name, data) - reference[name]).abs().max())
        assert gap_after < 1e-5 < gap_before
    with torch.no_grad():
        logit_error_after = sum(float((compressed(x) - original(x)).pow(2).mean()) for x in data)
    assert logit_error_after < logit_error_before


class _Opaque(nn.Module):
    """A model that is no graph: bias correction then runs it once per layer."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_bias_correction_in_one_pass_over_the_graph_equals_one_pass_per_layer() -> None:
    torch.manual_seed(4)
    original, compressed = _decomposed(SmallPlain(bias=True), "cp", 3)
    data = _inputs(seed=5)
    per_layer = _Opaque(copy.deepcopy(compressed))
    passes: list[int] = []
    counter = compressed.register_forward_pre_hook(lambda *_: passes.append(1))
    graph = correct_bias(original, compressed, ["conv1", "conv2"], data)
    counter.remove()
    assert passes == []  # the graph ran node by node, not as whole forward passes
    names = ["inner.conv1", "inner.conv2"]
    opaque = correct_bias(_Opaque(original), per_layer, names, data)
    assert list(graph.values()) == pytest.approx(list(opaque.values()), rel=1e-5)
    assert min(graph.values()) > 1e-3
    for name in ("conv1", "conv2"):
        torch.testing.assert_close(
            compressed.get_submodule(name)[-1].bias,
            per_layer.inner.get_submodule(name)[-1].bias,
            atol=1e-6,
            rtol=0,
        )


def test_bias_correction_bad_inputs() -> None:
    original, compressed = _decomposed(SmallPlain(bias=True), "tucker2", [4, 4])
    data = _inputs(n_batches=1)
    assert correct_bias(original, compressed, [], data) == {}
    with pytest.raises(ConfigError, match="no layer 'conv9'") as info:
        correct_bias(original, compressed, ["conv9"], data)
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="no calibration batches"):
        correct_bias(original, compressed, ["conv1"], [])
    with pytest.raises(ConfigError, match="no per-channel bias"):
        bn_model = trace(SmallBN().eval(), torch.zeros(1, 3, 8, 8))
        correct_bias(bn_model, copy.deepcopy(bn_model), ["bn"], data)


@pytest.mark.slow
def test_resnet20_statistics_need_the_training_augmentation(data_dir) -> None:
    """Re-estimating the original's own BN statistics: clean images cost accuracy, crop+flip not."""
    from rankfold.models import batches, load_dataset, load_model, training_batches
    from rankfold.runtime import torch_accuracy

    model, spec = load_model("resnet20", data_dir / "weights/resnet20-12fca82f.th")
    train = load_dataset(data_dir / "cifar10/train_lossless_5085.npz", spec, limit=2560)
    test = load_dataset(data_dir / "cifar10/test_lossless_1017.npz", spec)
    original = torch_accuracy(model, batches(test, spec))
    clean = copy.deepcopy(model)
    recalibrate_bn(clean, batches(train, spec, 256))
    augmented = copy.deepcopy(model)
    recalibrate_bn(augmented, training_batches(train, spec, 256))
    assert torch_accuracy(clean, batches(test, spec)) < original - 0.015
    assert torch_accuracy(augmented, batches(test, spec)) == pytest.approx(original, abs=0.005)


def test_compress_recalibrates_on_the_first_recalibrate_samples_images(tmp_path, monkeypatch):
    import numpy as np

    from rankfold.converter import build_config, compress, pipeline
    from rankfold.models import load_model, train_digits_cnn
    from rankfold.models.digits import digits_splits

    train, _ = digits_splits()
    np.savez(tmp_path / "train.npz", x=train.x[:300], y=train.y[:300])
    trained = train_digits_cnn(epochs=1)
    _, spec = load_model("digits-cnn")
    seen = []
    real_recalibrate = pipeline.recalibrate_bn

    def counting(model, inputs):
        return real_recalibrate(model, (seen.append(len(x)) or x for x in inputs))

    monkeypatch.setattr(pipeline, "recalibrate_bn", counting)
    for samples, expected in ((100, 100), (None, 300)):  # None: the default, 8192 > 300
        settings = {
            "model": "digits-cnn",
            "ranks": {"method": "tucker2", "macs_reduction": 2},
            "train_data": str(tmp_path / "train.npz"),
            "refit": False,
            "latency": {"enabled": False},
            "search": {"cache_dir": str(tmp_path / "cache")},
        }
        if samples is not None:
            settings["recalibrate_samples"] = samples
        seen.clear()
        result = compress(
            copy.deepcopy(trained), torch.zeros(1, *spec.input_shape), build_config(settings), spec
        )
        assert result.recalibration == "batchnorm" and sum(seen) == expected


def test_compress_corrects_biases_on_the_images_whose_activations_fit(tmp_path):
    """A BN-free model: bias correction reads the first training images, as many as the node-by-
    node pass can hold within --refit-memory-mb."""
    import numpy as np

    from rankfold.converter import build_config, compress
    from rankfold.models.spec import ModelSpec
    from rankfold.passes.correction import pass_bytes_per_image

    generator = np.random.default_rng(0)
    x = generator.integers(0, 256, (300, 3, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "train.npz", x=x, y=generator.integers(0, 5, 300))
    spec = ModelSpec("small", (3, 8, 8), 5, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    torch.manual_seed(0)
    model = SmallPlain(bias=True).eval()
    example = torch.zeros(1, 3, 8, 8)
    settings = {
        "model": "small",
        "ranks": {"method": "tucker2", "rank": [3, 3], "skip": ["fc"], "min_macs_share": 0},
        "train_data": str(tmp_path / "train.npz"),
        "refit": False,
        "latency": {"enabled": False},
        "search": {"cache_dir": str(tmp_path / "cache")},
    }
    whole = compress(copy.deepcopy(model), example, build_config(settings), spec)
    assert whole.recalibration == "bias"
    assert (whole.recalibration_images, whole.recalibration_images_left_out) == (300, 0)
    capped = build_config({**settings, "refit_memory_mb": 1})
    result = compress(copy.deepcopy(model), example, capped, spec)
    fits = (1 << 20) // pass_bytes_per_image(result.compressed, torch.zeros(2, 3, 8, 8))
    assert result.recalibration_images == fits < 300
    assert result.recalibration_images_left_out == 300 - fits
