"""Build a model by name: the CIFAR ResNets, any torchvision classifier, segmentation model or
detection backbone, the digits demo CNN, or a factory in a user's Python file, each with the
`ModelSpec` saying what input it takes.

Models start from random initialisation; trained weights come only from an explicit `weights`
checkpoint (the CLI's --weights). Users add names of their own with `register_model`.
"""

from __future__ import annotations

import difflib
import importlib.util
import itertools
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from torch.utils import _pytree as pytree

from rankfold.models.checkpoint import check_finite, load_weights
from rankfold.models.digits import DIGITS32_SPEC, DIGITS_SPEC, Digits32CNN, DigitsCNN
from rankfold.models.resnet_cifar import resnet20, resnet32, resnet44, resnet56, resnet110
from rankfold.models.spec import IMAGENET_MEAN, IMAGENET_STD, ModelSpec
from rankfold.passes.core import ConfigError, ModelLoadError

TORCHVISION_PREFIX = "torchvision:"
TORCHVISION_EXAMPLES = (
    "torchvision:resnet18",
    "torchvision:resnet50",
    "torchvision:vgg11",
    "torchvision:alexnet",
    "torchvision:mobilenet_v2",
)
# torchvision's other tasks, named by their module in torchvision.models. A segmentation model
# returns {"out", "aux"} (FCN, DeepLabV3) or {"out"} (LR-ASPP); a detector's forward takes a
# list of images and returns a variable number of boxes, which no fixed ONNX graph holds, so
# only its backbone (feature maps, {"0", "1", …, "pool"} for an FPN) is a model here.
SEGMENTATION = "segmentation."
DETECTION = "detection."
BACKBONE = ".backbone"
TASK_EXAMPLES = (
    "torchvision:segmentation.fcn_resnet50",
    "torchvision:segmentation.lraspp_mobilenet_v3_large",
    "torchvision:detection.fasterrcnn_mobilenet_v3_large_fpn.backbone",
)
# torchvision's evaluation size for its segmentation models (resize to 520).
SEGMENTATION_SIZE = 520
# The pretrained checkpoints of the shared data folder (path under data_dir(), sha256), for
# callers that want `load_weights(..., sha256=...)` to confirm they have the original files.
SHARED_CHECKPOINTS = {
    "resnet20": (
        "weights/resnet20-12fca82f.th",
        "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8",
    ),
    "resnet56": (
        "weights/resnet56-4bfd9763.th",
        "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367",
    ),
}
SPEC_KEYS = ("input_shape", "num_classes", "mean", "std")

_REGISTRY: dict[str, tuple[Callable[[], nn.Module], ModelSpec]] = {}
# Each user file is imported under a fresh module name, so loading an edited file again (or two
# files with the same name) never returns a stale module.
_USER_MODULE_IDS = itertools.count()


def register_model(
    name: str, factory: Callable[[], nn.Module], spec: ModelSpec, *, replace_existing: bool = False
) -> None:
    """Make `load_model(name)` build `factory()` with `spec` (stored under the name `name`)."""
    if not name or ":" in name or name.endswith(".py"):
        raise ValueError(f"model name {name!r} must be non-empty, without ':' and not end in .py")
    if name in _REGISTRY and not replace_existing:
        raise ValueError(f"model '{name}' is already registered; pass replace_existing=True")
    _REGISTRY[name] = (factory, replace(spec, name=name))


def registered_specs() -> dict[str, ModelSpec]:
    """Each registered name's spec (input shape, classes, description)."""
    return {name: spec for name, (_, spec) in _REGISTRY.items()}


def list_models() -> list[str]:
    """The registered names, then a few of the torchvision classifiers, segmentation models and
    detection backbones `load_model` accepts."""
    return [*_REGISTRY, *TORCHVISION_EXAMPLES, *TASK_EXAMPLES]


def load_model(
    name: str,
    weights: str | Path | None = None,
    input_shape: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int = 0,
) -> tuple[nn.Module, ModelSpec]:
    """Build model `name` in eval mode, float32, randomly initialised from `seed` (the same
    weights every run; the global random state is left as it was) unless `weights` is given.

    `name` is a registered name (resnet20/32/44/56/110, digits-cnn), "torchvision:NAME" (a
    classifier), "torchvision:segmentation.NAME", "torchvision:detection.NAME.backbone" or
    "path/to/file.py:factory". `input_shape` (C, H, W) replaces the spec's; a user file without
    a module-level `RANKFOLD_SPEC` dict needs it. `mean` and `std` (per channel, on the 0..1
    scale) replace the spec's normalisation, which a bare factory leaves at 0 and 1.
    """
    shape = None if input_shape is None else _checked_shape(input_shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, spec = _build(name, shape)
    if shape is not None:
        spec = _with_shape(spec, shape)
    if mean is not None or std is not None:
        spec = _with_normalization(spec, mean, std)
    if weights is not None:
        load_weights(model, weights, name)
    return model.float().eval(), spec


def _build(name: str, shape: tuple[int, int, int] | None) -> tuple[nn.Module, ModelSpec]:
    if name.startswith(TORCHVISION_PREFIX + SEGMENTATION):
        model, spec = _segmentation(name[len(TORCHVISION_PREFIX + SEGMENTATION) :])
    elif name.startswith(TORCHVISION_PREFIX + DETECTION):
        model, spec = _detection_backbone(name[len(TORCHVISION_PREFIX + DETECTION) :])
    elif name.startswith(TORCHVISION_PREFIX):
        model, spec = _torchvision(name[len(TORCHVISION_PREFIX) :])
    elif name in _REGISTRY:
        factory, spec = _REGISTRY[name]
        model = factory()
    elif ".py:" in name or name.endswith(".py"):
        model, spec = _from_file(name, shape)
    else:
        raise ModelLoadError(f"unknown model '{name}'; {_suggest(name)}")
    return model, spec


def _torchvision(arch: str) -> tuple[nn.Module, ModelSpec]:
    # Imported here: torchvision is slow to import and only these names need it.
    import torchvision.models

    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=3)
        hint = (
            "did you mean " + " or ".join(f"'{TORCHVISION_PREFIX}{c}'" for c in close) + "? "
            if close
            else ""
        )
        raise ModelLoadError(
            f"unknown torchvision model '{arch}'; {hint}torchvision has {len(known)} classifiers, "
            "e.g. resnet18, vgg11, mobilenet_v2 (see torchvision.models.list_models())"
        )
    # weights=None: random initialisation, so nothing is ever downloaded.
    model = torchvision.models.get_model(arch, weights=None)
    spec = ModelSpec(
        name=TORCHVISION_PREFIX + arch,
        input_shape=(3, 224, 224),
        num_classes=1000,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        description=f"torchvision {arch}, ImageNet classifier (random init unless weights given)",
    )
    return model, spec


def _task_model(task: str, arch: str, example: str):
    """torchvision.models.<task>'s builder `arch`, randomly initialised, backbone included."""
    import torchvision.models

    module = getattr(torchvision.models, task)
    known = torchvision.models.list_models(module=module)
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=3)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise ModelLoadError(
            f"unknown torchvision {task} model '{arch}'; {hint}torchvision has "
            f"{', '.join(known)} (e.g. {example})"
        )
    # weights=None and weights_backbone=None: nothing is downloaded.
    kwargs = {"weights": None, "weights_backbone": None}
    if task == "segmentation" and not arch.startswith("lraspp"):
        # Pretrained FCN/DeepLabV3 checkpoints carry the auxiliary head: build it, so that
        # --weights loads them and the model returns {"out", "aux"} as trained.
        kwargs["aux_loss"] = True
    return torchvision.models.get_model(arch, **kwargs)


def _segmentation(arch: str) -> tuple[nn.Module, ModelSpec]:
    model = _task_model("segmentation", arch, TASK_EXAMPLES[0])
    head = model.classifier  # FCN/DeepLabV3: a Sequential ending in the class conv
    classes = (head.low_classifier if hasattr(head, "low_classifier") else head[-1]).out_channels
    spec = ModelSpec(
        name=TORCHVISION_PREFIX + SEGMENTATION + arch,
        input_shape=(3, SEGMENTATION_SIZE, SEGMENTATION_SIZE),
        num_classes=classes,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        description=f"torchvision {arch}, semantic segmentation: returns "
        f"{{{', '.join(_segmentation_outputs(model))}}} (random init unless weights given)",
    )
    return model, spec


def _segmentation_outputs(model: nn.Module) -> list[str]:
    return ["out", "aux"] if getattr(model, "aux_classifier", None) is not None else ["out"]


def _detection_backbone(name: str) -> tuple[nn.Module, ModelSpec]:
    arch = name.removesuffix(BACKBONE)
    if arch == name:
        raise ModelLoadError(
            f"torchvision:{DETECTION}{name} is a whole detector, whose forward takes a list of "
            "images and returns a variable number of boxes (no fixed ONNX graph holds that); "
            f"compress its backbone: torchvision:{DETECTION}{name}{BACKBONE}"
        )
    detector = _task_model("detection", arch, TASK_EXAMPLES[2])
    backbone = getattr(detector, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise ModelLoadError(
            f"torchvision {arch} has no backbone module; pick a detector with one "
            "(fasterrcnn_*, retinanet_*, fcos_*, maskrcnn_*, keypointrcnn_*)"
        )
    transform = detector.transform  # the detector resizes images to its min_size first
    size = int(transform.min_size[0])
    classes = _detector_classes(detector)
    spec = ModelSpec(
        name=TORCHVISION_PREFIX + DETECTION + name,
        input_shape=(3, size, size),
        num_classes=classes,
        mean=tuple(transform.image_mean),
        std=tuple(transform.image_std),
        description=f"torchvision {arch}'s backbone: returns its feature maps by name "
        "(random init unless weights given; the detector's heads are not included)",
    )
    return backbone, spec


def _detector_classes(detector: nn.Module) -> int:
    """The detector's class count (background included), for the spec."""
    for module in detector.modules():
        if hasattr(module, "num_classes") and isinstance(module.num_classes, int):
            return module.num_classes
    # Faster/Mask/Keypoint R-CNN: the box predictor's class scores.
    return detector.roi_heads.box_predictor.cls_score.out_features


def _from_file(name: str, input_shape: tuple[int, int, int] | None) -> tuple[nn.Module, ModelSpec]:
    """Call the factory named after the last ':' in the file before it, and work out its spec."""
    file_part, _, factory_name = name.rpartition(":") if ".py:" in name else (name, "", "")
    if not factory_name:
        raise ModelLoadError(
            f"model '{name}' names a file but no factory; write it as {name}:FACTORY, where "
            "FACTORY() returns the nn.Module"
        )
    path = Path(file_part).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"model file {path} not found; check the path in '{name}'")
    with _importable_dir(path.parent.resolve()):
        module = _import_file(path)
        factory = getattr(module, factory_name, None)
        if not callable(factory):
            available = sorted(k for k, v in vars(module).items() if callable(v) and k[0] != "_")
            raise ModelLoadError(
                f"{path} has no callable '{factory_name}'; pick one of its callables "
                f"({', '.join(available[:8]) or 'none'}) after the ':'"
            )
        try:
            model = factory()
        except Exception as exc:  # any failure in user code reads the same
            raise ModelLoadError(
                f"{factory_name}() in {path} raised {_describe(exc)}; fix the factory"
            ) from None
    if not isinstance(model, nn.Module):
        raise ModelLoadError(
            f"{factory_name}() in {path} returned a {type(model).__name__}, not an nn.Module; "
            "return the model itself"
        )
    model = model.float().eval()
    check_finite(model)
    declared = getattr(module, "RANKFOLD_SPEC", None)
    if declared is None and input_shape is None:
        raise ModelLoadError(
            f"model '{name}' has no input shape; add RANKFOLD_SPEC = {{'input_shape': [C, H, W], "
            "'num_classes': N, 'mean': [...], 'std': [...]} to the file (only input_shape is "
            "required) or pass --input-shape"
        )
    if declared is None:
        # Only the shape is known: read the class count off the model, and leave inputs as is.
        channels = input_shape[0]
        return model, ModelSpec(
            name=name,
            input_shape=input_shape,
            num_classes=_output_classes(model, input_shape, name)[0],
            mean=(0.0,) * channels,
            std=(1.0,) * channels,
            description=f"{factory_name}() from {path}",
        )
    spec = _declared_spec(declared, name, path, model)
    if input_shape is not None:
        spec = _with_shape(spec, input_shape)
    num_classes, logits = _output_classes(model, spec.input_shape, name)
    if logits and num_classes != spec.num_classes:
        raise ModelLoadError(
            f"model '{name}' outputs {num_classes} classes but RANKFOLD_SPEC says "
            f"{spec.num_classes}; fix num_classes in {path.name}"
        )
    return model, spec


def _import_file(path: Path) -> object:
    module_name = f"rankfold_user_model_{next(_USER_MODULE_IDS)}"
    import_spec = importlib.util.spec_from_file_location(module_name, path)
    if import_spec is None or import_spec.loader is None:
        raise ModelLoadError(f"{path} cannot be imported as Python; give a .py file")
    module = importlib.util.module_from_spec(import_spec)
    # Registered before running it: dataclasses and pickling look modules up in sys.modules.
    sys.modules[module_name] = module
    try:
        import_spec.loader.exec_module(module)
    except Exception as exc:  # any failure in user code reads the same
        del sys.modules[module_name]
        raise ModelLoadError(f"importing {path} raised {_describe(exc)}; fix the file") from None
    return module


@contextmanager
def _importable_dir(folder: Path) -> Iterator[None]:
    """Let the user file import modules beside it, as `python file.py` would."""
    added = str(folder) not in sys.path
    if added:
        sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        if added:
            sys.path.remove(str(folder))


def _declared_spec(declared: object, name: str, path: Path, model: nn.Module) -> ModelSpec:
    """The spec RANKFOLD_SPEC declares: input_shape required; num_classes read off the model,
    mean and std 0 and 1 (inputs as read; --mean/--std set them) where it leaves them out."""
    fix = (
        f"RANKFOLD_SPEC in {path.name} must be a dict with input_shape and optionally "
        f"{', '.join(k for k in SPEC_KEYS if k != 'input_shape')}, description"
    )
    if not isinstance(declared, dict):
        raise ModelLoadError(f"{fix}, got a {type(declared).__name__}")
    unknown = sorted(set(declared) - {*SPEC_KEYS, "description"})
    if "input_shape" not in declared or unknown:
        missing = "input_shape" if "input_shape" not in declared else "none"
        raise ModelLoadError(f"{fix}; missing {missing}, unknown {unknown or 'none'}")
    values = dict(declared)
    try:
        shape = _checked_shape(values["input_shape"])
    except ConfigError as exc:
        raise ModelLoadError(f"RANKFOLD_SPEC in {path.name} is invalid: {exc}") from None
    if "num_classes" not in values:
        values["num_classes"] = _output_classes(model, shape, name)[0]
    values.setdefault("mean", (0.0,) * shape[0])
    values.setdefault("std", (1.0,) * shape[0])
    try:
        return ModelSpec(
            name=name,
            description=values.get("description", ""),
            **{k: values[k] for k in SPEC_KEYS},
        )
    except ValueError as exc:
        raise ModelLoadError(f"RANKFOLD_SPEC in {path.name} is invalid: {exc}") from None


def _output_classes(
    model: nn.Module, input_shape: tuple[int, int, int], name: str
) -> tuple[int, bool]:
    """The class count read off one forward pass of zeros, and whether the model returns one
    logits tensor (1×classes); the pass also checks the shape works."""
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *input_shape))
    except Exception as exc:  # any failure in user code reads the same
        raise ModelLoadError(
            f"model '{name}' fails on a {_fmt((1, *input_shape))} input "
            f"({_describe(exc)}); check the input shape"
        ) from None
    leaves = pytree.tree_leaves(out)
    if not leaves or not all(isinstance(leaf, torch.Tensor) and leaf.ndim >= 1 for leaf in leaves):
        raise ModelLoadError(
            f"model '{name}' returns {type(out).__name__} for one input, not tensors; make "
            "forward return one tensor, or a tuple, list or dict of tensors"
        )
    # Logits: their width. Any other output (segmentation maps, feature maps): the first
    # tensor's channels, the classes of a segmentation map; no top-1 is read off it.
    first = leaves[0]
    logits = isinstance(out, torch.Tensor) and out.ndim == 2
    return (int(first.shape[1]) if first.ndim >= 2 else 1), logits


def _with_shape(spec: ModelSpec, shape: tuple[int, int, int]) -> ModelSpec:
    """`spec` with input shape `shape`, which must keep its channel count (mean/std are per C)."""
    if shape[0] != spec.channels:
        raise ConfigError(
            f"input shape {_fmt(shape)} has {shape[0]} channels but model '{spec.name}' takes "
            f"{spec.channels}; keep C={spec.channels}"
        )
    return replace(spec, input_shape=shape)


def _with_normalization(
    spec: ModelSpec, mean: Sequence[float] | None, std: Sequence[float] | None
) -> ModelSpec:
    """`spec` with the given mean and/or std, one value per input channel."""
    try:
        return replace(
            spec,
            mean=spec.mean if mean is None else tuple(mean),
            std=spec.std if std is None else tuple(std),
        )
    except ValueError as exc:
        raise ConfigError(
            f"--mean/--std for model '{spec.name}': {exc}; give {spec.channels} value(s) each, "
            "e.g. --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225"
        ) from None


def _checked_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in input_shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or min(shape) < 1 or list(shape) != list(input_shape):
        raise ConfigError(
            f"input shape must be three positive integers C,H,W (e.g. 3,32,32), got {input_shape}"
        )
    return shape  # type: ignore[return-value]


def _suggest(name: str) -> str:
    import torchvision.models

    torchvision_names = torchvision.models.list_models(module=torchvision.models)
    candidates = {key: key for key in _REGISTRY}
    candidates.update({arch: TORCHVISION_PREFIX + arch for arch in torchvision_names})
    candidates.update(
        {TORCHVISION_PREFIX + arch: TORCHVISION_PREFIX + arch for arch in torchvision_names}
    )
    close = [candidates[c] for c in difflib.get_close_matches(name, candidates, n=3)]
    hint = f"did you mean {' or '.join(map(repr, dict.fromkeys(close)))}? " if close else ""
    return (
        f"{hint}valid names: {', '.join(_REGISTRY)}, torchvision:NAME (e.g. torchvision:resnet18), "
        f"torchvision:{SEGMENTATION}NAME, torchvision:{DETECTION}NAME{BACKBONE} "
        "or path/to/file.py:factory"
    )


def _describe(exc: Exception) -> str:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _fmt(shape: Sequence[int]) -> str:
    return "×".join(map(str, shape))


for _name, _factory, _params in (
    ("resnet20", resnet20, "0.27M"),
    ("resnet32", resnet32, "0.46M"),
    ("resnet44", resnet44, "0.66M"),
    ("resnet56", resnet56, "0.85M"),
    ("resnet110", resnet110, "1.7M"),
):
    register_model(
        _name,
        _factory,
        ModelSpec(
            name=_name,
            input_shape=(3, 32, 32),
            num_classes=10,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            description=f"CIFAR-10 ResNet-{_name[6:]} (He et al. 2016, option A), {_params} params",
        ),
    )
register_model("digits-cnn", DigitsCNN, DIGITS_SPEC)
register_model("digits32-cnn", Digits32CNN, DIGITS32_SPEC)
