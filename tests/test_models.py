"""rankfold.models: specs, the zoo, user-file models, checkpoints and the digits demo CNN."""

from __future__ import annotations

import copy
import pickle
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from rankfold.models import (
    DIGITS_SPEC,
    SHARED_CHECKPOINTS,
    ArrayDataset,
    DigitsCNN,
    ModelSpec,
    batches,
    check_finite,
    digits_splits,
    list_models,
    load_dataset,
    load_model,
    load_weights,
    read_state_dict,
    register_model,
    train_digits_cnn,
    zoo,
)
from rankfold.models.resnet_cifar import BLOCKS_PER_STAGE, SubsampleShortcut, resnet20
from rankfold.passes.core import ConfigError, ModelLoadError

CIFAR_NAMES = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]


def _one_line(error: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(error.value)
    assert message and "\n" not in message
    return message


@torch.no_grad()
def _accuracy(model: nn.Module, ds: ArrayDataset, spec: ModelSpec) -> float:
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches(ds, spec))
    return correct / len(ds)


# ---------------------------------------------------------------- ModelSpec


def test_model_spec_normalises_and_validates() -> None:
    spec = ModelSpec("m", [3, np.int64(8), 8], np.int64(5), [0, 0.5, 1], (1, 2, 3))
    assert spec.input_shape == (3, 8, 8) and spec.num_classes == 5 and spec.channels == 3
    assert spec.mean == (0.0, 0.5, 1.0) and isinstance(spec.std, tuple)
    assert hash(spec) == hash(ModelSpec("m", (3, 8, 8), 5, (0, 0.5, 1), (1, 2, 3)))
    torch.testing.assert_close(spec.example_input(2, seed=4), spec.example_input(2, seed=4))
    assert spec.example_input(2).shape == (2, 3, 8, 8)
    bad = [
        ({"input_shape": (3, 8)}, "3 positive ints"),
        ({"input_shape": (3, 8.0, 8)}, "sequence of ints"),
        ({"mean": (0.0,)}, "one value per input channel (3)"),
        ({"std": (1.0, 0.0, 1.0)}, "std finite and > 0"),
        ({"num_classes": 0}, "num_classes must be >= 1"),
        ({"num_classes": True}, "num_classes must be a sequence of ints"),
    ]
    good = {"name": "m", "input_shape": (3, 8, 8), "num_classes": 2, "mean": (0,) * 3}
    for change, fragment in bad:
        with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            ModelSpec(**{**good, "std": (1,) * 3, **change})


# ---------------------------------------------------------------- CIFAR ResNets


def _resnet_params(n: int) -> int:
    # Independent count from the architecture in the data README: stem, 3 stages of n blocks
    # (two 3×3 convs without bias, each followed by BN with 2 parameters per channel), linear.
    total = 3 * 16 * 9 + 2 * 16
    in_planes = 16
    for planes in (16, 32, 64):
        for _ in range(n):
            total += 9 * in_planes * planes + 9 * planes * planes + 4 * planes
            in_planes = planes
    return total + 64 * 10 + 10


@pytest.mark.parametrize("name", CIFAR_NAMES)
def test_resnet_layout(name: str) -> None:
    n = BLOCKS_PER_STAGE[name]
    model, spec = load_model(name)
    assert 6 * n + 2 == int(name[6:])
    assert spec.input_shape == (3, 32, 32) and spec.num_classes == 10
    assert sum(p.numel() for p in model.parameters()) == _resnet_params(n)
    convs = [k for k, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 6 * n + 1 and convs[0] == "conv1" and convs[-1] == f"layer3.{n - 1}.conv2"
    assert isinstance(model.layer2[0].shortcut, SubsampleShortcut)
    out = model(spec.example_input(2))
    assert out.shape == (2, 10) and out.dtype == torch.float32 and not model.training


def test_resnet_known_sizes_and_shortcut_is_plain_module() -> None:
    assert (_resnet_params(3), _resnet_params(9)) == (269722, 853018)  # akamaster's 0.27M, 0.85M
    model = resnet20().eval()
    x = torch.randn(2, 3, 32, 32)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(clone(x), model(x), atol=0, rtol=0)
    shortcut = SubsampleShortcut(16, 8)
    y = shortcut(torch.ones(1, 16, 4, 4))
    assert y.shape == (1, 32, 2, 2) and float(y[:, 8:24].min()) == 1.0
    assert float(y[:, :8].abs().max()) == 0.0 and float(y[:, 24:].abs().max()) == 0.0
    # The fixed 1×1 conv is exactly option A's slicing and zero padding.
    x = torch.randn(3, 16, 9, 9)
    sliced = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))
    torch.testing.assert_close(shortcut(x), sliced, atol=0, rtol=0)
    assert "kernel" not in model.state_dict() and not any(
        "shortcut" in k for k in model.state_dict()
    )


# ---------------------------------------------------------------- zoo


@pytest.mark.parametrize(
    ("name", "input_shape"),
    [
        ("resnet20", None),
        ("digits-cnn", None),
        ("torchvision:resnet18", (3, 64, 64)),
        ("torchvision:vgg11", (3, 64, 64)),
        ("torchvision:alexnet", (3, 64, 64)),
        ("torchvision:mobilenet_v2", (3, 64, 64)),
    ],
)
def test_traced_equals_eager(name: str, input_shape: tuple[int, int, int] | None) -> None:
    model, spec = load_model(name, input_shape=input_shape)
    assert spec.input_shape == (input_shape or spec.input_shape)
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
    x = spec.example_input(1)
    traced = fx.symbolic_trace(model)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(traced(x), expected, atol=0, rtol=0)
    assert expected.shape == (1, spec.num_classes)


def test_torchvision_spec() -> None:
    model, spec = load_model("torchvision:mobilenet_v2")
    assert spec.name == "torchvision:mobilenet_v2" and spec.input_shape == (3, 224, 224)
    assert spec.num_classes == 1000 and spec.mean == (0.485, 0.456, 0.406)
    assert model.classifier[-1].out_features == 1000


def test_random_weights_come_from_the_seed_and_leave_the_global_state_alone() -> None:
    """Without weights a model is the same every run for one seed (a latency study or a
    benchmark compares like with like), another seed gives other weights, and the caller's
    random stream is not consumed."""
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = load_model("resnet20")[0].state_dict()
    assert torch.equal(torch.rand(3), expected_next)
    again = load_model("resnet20")[0].state_dict()
    other = load_model("resnet20", seed=1)[0].state_dict()
    weight = "layer1.0.conv1.weight"
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.allclose(first[weight], other[weight])


def test_list_models() -> None:
    names = list_models()
    assert names[:6] == [*CIFAR_NAMES, "digits-cnn"]
    assert "torchvision:resnet18" in names and "torchvision:vgg11" in names


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("resnet-20", "unknown model 'resnet-20'; did you mean 'resnet20'"),
        ("resnet18", "did you mean 'torchvision:resnet18'"),
        ("digits_cnn", "did you mean 'digits-cnn'"),
        ("zzz", "valid names: resnet20, resnet32"),
        ("torchvision:resnt18", "unknown torchvision model 'resnt18'; did you mean "),
        ("torchvision:fasterrcnn_resnet50_fpn", "unknown torchvision model"),
    ],
)
def test_unknown_names(name: str, fragment: str) -> None:
    with pytest.raises(ModelLoadError) as error:
        load_model(name)
    assert fragment in _one_line(error)


def test_input_shape_override() -> None:
    _, spec = load_model("resnet20", input_shape=[3, 48, 40])
    assert spec.input_shape == (3, 48, 40)
    for shape, fragment in [
        ((1, 32, 32), "has 1 channels but model 'resnet20' takes 3"),
        ((3, 32), "three positive integers"),
        ((3, 0, 32), "three positive integers"),
        ((3, 32.5, 32), "three positive integers"),
    ]:
        with pytest.raises(ConfigError) as error:
            load_model("resnet20", input_shape=shape)
        assert fragment in _one_line(error)


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))


TINY_SPEC = ModelSpec("ignored", (1, 4, 4), 3, (0.5,), (0.5,))


def test_register_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zoo, "_REGISTRY", dict(zoo._REGISTRY))
    register_model("tiny", _tiny, TINY_SPEC)
    model, spec = load_model("tiny")
    assert spec.name == "tiny" and spec.input_shape == (1, 4, 4) and "tiny" in list_models()
    assert model(spec.example_input(2)).shape == (2, 3)
    with pytest.raises(ValueError, match="already registered"):
        register_model("tiny", _tiny, TINY_SPEC)
    register_model("tiny", DigitsCNN, DIGITS_SPEC, replace_existing=True)
    assert isinstance(load_model("tiny")[0], DigitsCNN)
    for bad in ("", "a:b", "model.py"):
        with pytest.raises(ValueError, match="must be non-empty"):
            register_model(bad, _tiny, TINY_SPEC)


# ---------------------------------------------------------------- user-file models


USER_FILE = """
    import torch
    from torch import nn

    from helper_layers import WIDTH  # a module beside the file must be importable

    {spec}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, WIDTH, 3, padding=1)
            self.head = nn.Linear(WIDTH, 4)

        def forward(self, x):
            return self.head(self.conv(x).mean(dim=(2, 3)))

    def build():
        return Net()

    def broken():
        raise RuntimeError("no GPU here")

    def not_a_model():
        return 42

    def nan_model():
        net = Net()
        with torch.no_grad():
            net.conv.weight[0, 0, 0, 0] = float("nan")
        return net

    class Shapes(nn.Module):
        def forward(self, x):
            return dict(shape=tuple(x.shape))

    def shapes():
        return Shapes()

    def linear_only():
        return nn.Linear(3, 2)
"""
USER_SPEC = (
    'RANKFOLD_SPEC = {"input_shape": [1, 6, 6], "num_classes": 4, "mean": [0.5], '
    '"std": [0.25], "description": "toy"}'
)


def _user_file(tmp_path: Path, spec: str = USER_SPEC, name: str = "user_model.py") -> Path:
    (tmp_path / "helper_layers.py").write_text("WIDTH = 5\n")
    path = tmp_path / name
    path.write_text(textwrap.dedent(USER_FILE.format(spec=spec)))
    return path


def test_user_file_with_spec(tmp_path: Path) -> None:
    path = _user_file(tmp_path)
    model, spec = load_model(f"{path}:build")
    assert spec == ModelSpec(f"{path}:build", (1, 6, 6), 4, (0.5,), (0.25,), "toy")
    assert type(model).__name__ == "Net" and not model.training
    x = spec.example_input(1)
    torch.testing.assert_close(fx.symbolic_trace(model)(x), model(x), atol=0, rtol=0)
    # Weights saved from one build load into another: the round trip the CLI's --weights makes.
    torch.save(model.state_dict(), tmp_path / "w.pt")
    again, _ = load_model(f"{path}:build", weights=tmp_path / "w.pt")
    torch.testing.assert_close(again(x), model(x), atol=0, rtol=0)
    _, wider = load_model(f"{path}:build", input_shape=(1, 10, 12))
    assert wider.input_shape == (1, 10, 12) and wider.mean == (0.5,)


def test_user_file_without_spec_reads_classes(tmp_path: Path) -> None:
    path = _user_file(tmp_path, spec="")
    _, spec = load_model(f"{path}:build", input_shape=(1, 6, 6))
    assert spec.num_classes == 4 and spec.mean == (0.0,) and spec.std == (1.0,)
    with pytest.raises(ModelLoadError) as error:
        load_model(f"{path}:build")
    assert "add RANKFOLD_SPEC" in _one_line(error) and "--input-shape" in str(error.value)


def test_user_file_spec_may_give_the_input_shape_alone(tmp_path: Path) -> None:
    """As with --input-shape alone: classes read off the model, inputs as read unless
    --mean/--std say otherwise."""
    path = _user_file(tmp_path, spec='RANKFOLD_SPEC = {"input_shape": [1, 6, 6]}')
    _, spec = load_model(f"{path}:build")
    assert (spec.input_shape, spec.num_classes) == ((1, 6, 6), 4)
    assert (spec.mean, spec.std) == ((0.0,), (1.0,))
    _, normalised = load_model(f"{path}:build", mean=(0.5,), std=(0.25,))
    assert (normalised.mean, normalised.std) == ((0.5,), (0.25,))


def test_user_file_errors(tmp_path: Path) -> None:
    path = _user_file(tmp_path)
    bad_spec = _user_file(tmp_path, spec='RANKFOLD_SPEC = {"num_classes": 4}', name="b.py")
    wrong_classes = _user_file(
        tmp_path, spec=USER_SPEC.replace('"num_classes": 4', '"num_classes": 7'), name="c.py"
    )
    bad_mean = _user_file(tmp_path, spec=USER_SPEC.replace("[0.5]", "[0.5, 0.5]"), name="d.py")
    syntax = tmp_path / "syntax.py"
    syntax.write_text("def build(:\n")
    cases = [
        (f"{tmp_path}/absent.py:build", "model file", "not found"),
        (str(path), "names a file but no factory", ":FACTORY"),
        (f"{path}:nope", "has no callable 'nope'", "build"),
        (f"{path}:broken", "broken() in", "raised RuntimeError: no GPU here"),
        (f"{path}:not_a_model", "returned a int, not an nn.Module", ""),
        (f"{path}:nan_model", "NaN or infinite values in conv.weight", ""),
        (f"{path}:shapes", "returns dict for one input, not tensors", "tuple, list or dict"),
        (f"{path}:linear_only", "fails on a 1×1×6×6 input", "RuntimeError"),
        (f"{bad_spec}:build", "missing input_shape, unknown none", ""),
        (f"{wrong_classes}:build", "outputs 4 classes but RANKFOLD_SPEC says 7", ""),
        (f"{bad_mean}:build", "RANKFOLD_SPEC in d.py is invalid", "one value per input channel"),
        (f"{syntax}:build", "importing", "raised SyntaxError"),
    ]
    for name, first, second in cases:
        with pytest.raises(ModelLoadError) as error:
            load_model(name)
        message = _one_line(error)
        assert first in message and second in message, message


def test_user_file_channel_override_is_config_error(tmp_path: Path) -> None:
    path = _user_file(tmp_path)
    with pytest.raises(ConfigError, match="has 3 channels but model"):
        load_model(f"{path}:build", input_shape=(3, 6, 6))


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "best_prec1": 1.0},
        lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
        lambda sd: {"model_state_dict": {f"_orig_mod.{k}": v for k, v in sd.items()}},
        lambda sd: {f"module.{k}": v for k, v in sd.items() if "num_batches" not in k},
    ],
    ids=["bare", "state_dict", "dataparallel", "compiled", "no-bn-counter"],
)
def test_checkpoint_wrappings_load_exactly(tmp_path: Path, wrap) -> None:
    torch.manual_seed(1)
    source = _tiny().eval()
    path = tmp_path / "ck.pt"
    torch.save(wrap(source.state_dict()), path)
    loaded = _tiny()
    load_weights(loaded, path, "tiny")
    x = torch.randn(2, 1, 4, 4)
    torch.testing.assert_close(loaded.eval()(x), source(x), atol=0, rtol=0)


def _save(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


def test_bad_checkpoints_raise_one_line(tmp_path: Path) -> None:
    sd = _tiny().state_dict()
    nan = {**sd, "3.weight": torch.full_like(sd["3.weight"], float("inf"))}
    random_bytes = tmp_path / "random.pt"
    random_bytes.write_bytes(np.random.default_rng(0).bytes(4096))
    fake_zip = tmp_path / "fake_zip.pt"
    fake_zip.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    cases = [
        (
            _save(tmp_path / "missing.pt", {k: v for k, v in sd.items() if k != "0.weight"}),
            "is missing 1 key (0.weight); it does not match model 'tiny'",
        ),
        (
            _save(tmp_path / "extra.pt", {**sd, "head.weight": torch.zeros(1)}),
            "has 1 unexpected key (head.weight); it does not match model 'tiny'",
        ),
        (
            _save(tmp_path / "shape.pt", {**sd, "3.bias": torch.zeros(4)}),
            "1 mis-shaped key (3.bias (4,) in checkpoint vs (3,) in model)",
        ),
        (_save(tmp_path / "nan.pt", nan), "NaN or infinite values in 1 tensor (3.weight)"),
        (_save(tmp_path / "list.pt", [1, 2]), "holds a list, not a state dict"),
        (_save(tmp_path / "meta.pt", {"epoch": 3}), "dict without a state dict"),
        (_save(tmp_path / "module.pt", _tiny()), "Python objects besides tensors"),
        (random_bytes, "cannot be read"),
        (fake_zip, "cannot be read"),
        (empty, "cannot be read"),
        (tmp_path / "absent.pt", "not found"),
    ]
    for path, fragment in cases:
        with pytest.raises(ModelLoadError) as error:
            load_weights(_tiny(), path, "tiny")
        message = _one_line(error)
        assert fragment in message, (path.name, message)


def test_missing_weights_through_load_model(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as error:
        load_model("digits-cnn", weights=tmp_path / "nope.th")
    assert "nope.th not found" in _one_line(error)


def test_check_finite_names_tensor() -> None:
    model = _tiny()
    check_finite(model)
    model[1].running_var[1] = float("nan")
    with pytest.raises(ModelLoadError) as error:
        check_finite(model)
    assert "NaN or infinite values in 1.running_var" in _one_line(error)


def test_sha256_mismatch(tmp_path: Path) -> None:
    path = _save(tmp_path / "ck.pt", _tiny().state_dict())
    with pytest.raises(ModelLoadError, match="has sha256 .* expected 000000000000"):
        load_weights(_tiny(), path, "tiny", sha256="0" * 64)


def test_real_checkpoint_keys_and_hash(data_dir: Path) -> None:
    relative, digest = SHARED_CHECKPOINTS["resnet20"]
    state = read_state_dict(data_dir / relative)
    assert not any(k.startswith("module.") for k in state)
    expected = {k for k in resnet20().state_dict() if not k.endswith("num_batches_tracked")}
    assert set(state) == expected
    load_weights(resnet20(), data_dir / relative, "resnet20", sha256=digest)


def test_real_checkpoint_corruptions(data_dir: Path, tmp_path: Path) -> None:
    source = data_dir / SHARED_CHECKPOINTS["resnet20"][0]
    truncated = tmp_path / "truncated.th"
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(ModelLoadError) as error:
        load_model("resnet20", weights=truncated)
    assert "truncated.th cannot be read" in _one_line(error)
    with pytest.raises(ModelLoadError) as error:
        load_model("resnet56", weights=source)
    message = _one_line(error)
    # ResNet-56 has 6 more blocks per stage, each with conv1, bn1 (4 tensors), conv2, bn2.
    assert "is missing 180 keys (layer1.3.conv1.weight, layer1.3.bn1.weight," in message
    assert "it does not match model 'resnet56'" in message
    state = torch.load(source, map_location="cpu", weights_only=True)
    state["state_dict"]["module.layer2.0.bn1.running_mean"][3] = float("nan")
    poisoned = _save(tmp_path / "nan.th", state)
    with pytest.raises(ModelLoadError) as error:
        load_model("resnet20", weights=poisoned)
    assert "NaN or infinite values in 1 tensor (layer2.0.bn1.running_mean)" in _one_line(error)
    # The copy in tmp_path is a faithful copy: only the corruption made the difference.
    shutil.copy(source, tmp_path / "copy.th")
    load_model("resnet20", weights=tmp_path / "copy.th")


@pytest.mark.slow
@pytest.mark.parametrize(("name", "reference"), [("resnet20", 0.9164), ("resnet56", 0.9272)])
def test_pretrained_accuracy_matches_readme(data_dir: Path, name: str, reference: float) -> None:
    model, spec = load_model(name, weights=data_dir / SHARED_CHECKPOINTS[name][0])
    ds = load_dataset(data_dir / "cifar10" / "test_lossless_1017.npz", spec)
    # The data README's measurement on these 1,017 images; ±0.5 pt allows for BLAS differences.
    assert _accuracy(model, ds, spec) == pytest.approx(reference, abs=0.005)


# ---------------------------------------------------------------- digits


def test_digits_training_is_reproducible_and_leaves_rng_alone() -> None:
    train = digits_splits()[0].subset(256)
    state = torch.get_rng_state()
    seen: list[tuple[int, float]] = []
    first = train_digits_cnn(
        epochs=2, seed=7, train=train, progress=lambda e, v: seen.append((e, v))
    )
    second = train_digits_cnn(epochs=2, seed=7, train=train)
    assert torch.equal(torch.get_rng_state(), state)
    for key, value in first.state_dict().items():
        torch.testing.assert_close(second.state_dict()[key], value, atol=0, rtol=0)
    assert [e for e, _ in seen] == [1, 2] and 0 <= seen[0][1] < seen[1][1] <= 1
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        train_digits_cnn(epochs=0)


def test_digits_cnn_is_conv_dominated() -> None:
    model, spec = load_model("digits-cnn")
    assert spec == DIGITS_SPEC and isinstance(model, DigitsCNN)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    conv_params = sum(m.weight.numel() for m in convs)
    total = sum(p.numel() for p in model.parameters())
    assert len(convs) >= 3 and min(m.out_channels for m in convs) >= 32
    assert all(m.kernel_size == (3, 3) for m in convs) and conv_params / total > 0.95


def test_digits_cnn_trains_to_95_percent() -> None:
    model = train_digits_cnn()
    assert not model.training
    _, test = digits_splits()
    assert _accuracy(model, test, DIGITS_SPEC) >= 0.95
