"""Labelled image data as uint8 arrays: loading from user paths, checking, normalising, batching.

The pipeline keeps images as uint8 N×C×H×W (a quarter of float32's memory) and normalises one
batch at a time with the model's `ModelSpec`. Every problem with a file is a one-line `DataError`
naming the file and the fix, raised here rather than deep inside a pass. The shared real data lives
outside the repository (see `data_dir`).
"""

from __future__ import annotations

import gzip
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from rankfold.models.spec import ModelSpec
from rankfold.passes.core import ConfigError, DataError

REPO_ROOT = Path(__file__).resolve().parents[1]
CIFAR_PADDING = 4
Augment = Literal["auto", "cifar", "none"]  # auto: cifar for 3×32×32 inputs


def data_dir() -> Path:
    """`$RANKFOLD_DATA`, else `../shared/data` beside the repository root."""
    return Path(os.environ.get("RANKFOLD_DATA", REPO_ROOT.parent / "shared" / "data")).resolve()


def shared_file(relative: str) -> Path:
    """`data_dir() / relative`, or a DataError naming RANKFOLD_DATA when the file is absent."""
    path = data_dir() / relative
    if not path.is_file():
        raise DataError(
            f"shared data file {path} not found; set RANKFOLD_DATA to the folder holding "
            f"{relative} (default ../shared/data beside the repository)"
        )
    return path


@dataclass(frozen=True)
class ArrayDataset:
    """Images `x` (uint8, N×C×H×W) with labels `y` (int64, N), in a fixed order."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        _check_arrays(self.x, self.y, "ArrayDataset")
        # Integer labels of any width become int64, the dtype cross-entropy and argmax compare to.
        object.__setattr__(self, "y", np.asarray(self.y, dtype=np.int64))

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, n: int) -> ArrayDataset:
        """The first `n` examples (all of them when there are fewer)."""
        if n < 1:
            raise ValueError(f"subset needs n >= 1, got {n}")
        return ArrayDataset(self.x[:n], self.y[:n])


def load_dataset(path: str | Path, spec: ModelSpec, limit: int | None = None) -> ArrayDataset:
    """Load a `.npz` (keys x: uint8 N×C×H×W, y: labels) or an ImageFolder directory for `spec`.

    An ImageFolder holds one subfolder per class (class index = position in sorted order); images
    are converted to the spec's channel count and resized to its H×W. Its examples are ordered
    round-robin over classes, so `limit` (and `subset`) keep every class represented.
    """
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1, got {limit}; omit it to use the whole dataset")
    path = Path(path)
    if path.is_dir():
        data = _load_image_folder(path, spec, limit)
    elif path.is_file():
        if path.suffix.lower() != ".npz":
            raise DataError(
                f"{path} is neither a .npz file nor a directory; give an .npz with arrays x and y "
                "or an ImageFolder directory (one subfolder per class)"
            )
        x, y = _read_npz(path)
        data = _validated(x[:limit], y[:limit], spec, str(path))
    else:
        raise DataError(f"data path {path} not found; check the path")
    return data


def normalize(x: np.ndarray | torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """uint8-range N×C×H×W images → float32 `(x/255 - mean) / std` per channel."""
    if isinstance(x, torch.Tensor):
        images = x.detach().cpu().to(torch.float32) / 255.0
    else:
        # np.array copies: the source may be a read-only buffer that torch must not alias.
        images = torch.from_numpy(np.array(x, dtype=np.float32)) / 255.0
    if images.ndim != 4 or images.shape[1] != spec.channels:
        raise ValueError(
            f"normalize expects N×{spec.channels}×H×W images for model '{spec.name}', "
            f"got shape {tuple(images.shape)}"
        )
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images - mean) / std


def batches(
    ds: ArrayDataset, spec: ModelSpec, batch_size: int = 256
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised float32 inputs and int64 labels, `batch_size` at a time, in order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(ds), batch_size):
        stop = start + batch_size
        yield normalize(ds.x[start:stop], spec), torch.from_numpy(ds.y[start:stop].copy())


def training_batches(
    data: ArrayDataset,
    spec: ModelSpec,
    batch_size: int = 256,
    augment: Augment = "auto",
    seed: int = 0,
) -> Iterator[torch.Tensor]:
    """Normalised inputs in order, augmented as fine-tuning does: for BatchNorm recalibration.

    A network's BatchNorm statistics come from augmented training images and the layers after
    each BN are adapted to them, so re-estimating them on clean images costs accuracy: ResNet-20's
    own statistics re-estimated on the 5,085 clean CIFAR training images score 88.6 % instead of
    91.6 % on test_lossless_1017 (on the test images themselves 88.1 %), and on the same images
    with crop + flip 91.4 %. The augmentation is drawn from a generator seeded by `seed`.
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    rng = np.random.default_rng([seed, 0])
    crop = augments(augment, spec)
    for start in range(0, len(data), batch_size):
        images = data.x[start : start + batch_size]
        if crop:
            images = crop_flip(images, *crop_flip_params(rng, len(images)))
        yield normalize(images, spec)


def augments(augment: Augment, spec: ModelSpec) -> bool:
    """Whether CIFAR-style crop + flip applies ("auto": for 3×32×32 inputs)."""
    return augment == "cifar" or (augment == "auto" and spec.input_shape == (3, 32, 32))


def crop_flip_params(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random crop offsets (top, left) into the padded image and horizontal flips for `n` images."""
    offsets = rng.integers(0, 2 * CIFAR_PADDING + 1, size=(2, n))
    return offsets[0], offsets[1], rng.random(n) < 0.5


def crop_flip(
    images: np.ndarray, top: np.ndarray, left: np.ndarray, flip: np.ndarray
) -> np.ndarray:
    """Zero-pad by 4, crop back to H×W at (top, left), mirror where `flip`: CIFAR augmentation.

    Vectorised over the batch by hand: torchvision's transforms draw one crop per call from the
    global RNG, and these parameters must come from the caller's seeded generator.
    """
    n, _, height, width = images.shape
    pad = CIFAR_PADDING
    padded = np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    rows = top[:, None] + np.arange(height)
    cols = left[:, None] + np.arange(width)
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
    # Advanced indices split by a slice go first: the result is N×H×W×C.
    cropped = padded[np.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return np.ascontiguousarray(cropped.transpose(0, 3, 1, 2))


def read_idx(path: str | Path) -> np.ndarray:
    """Read a (optionally gzipped) uint8 idx file, the MNIST distribution format.

    Hand-written because torchvision's reader in this version opens files without gzip and checks
    the header with `assert`; the format is a 4-byte magic (0, 0, dtype 0x08, ndim) then big-endian
    uint32 sizes, then the raw bytes.
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path} ({exc}); replace it with the original file") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
        raise DataError(f"{path} is not a uint8 idx file (bad magic number); use the original file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} ends inside its header; the file is truncated or corrupt")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if len(raw) - header != int(np.prod(shape)):
        raise DataError(
            f"{path} declares shape {shape} but holds {len(raw) - header} bytes of data; "
            "the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        # allow_pickle=False: a data file must never run code when loaded.
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise DataError(f"{path} holds a single array, not an .npz with arrays x and y")
        with archive:
            missing = [k for k in ("x", "y") if k not in archive.files]
            if missing:
                raise DataError(
                    f"{path} has arrays {sorted(archive.files)} but no {' or '.join(missing)}; "
                    "save it with np.savez(path, x=images_uint8_NCHW, y=labels)"
                )
            return archive["x"], archive["y"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"cannot read {path} ({reason}); the file is corrupt or not an .npz"
        ) from None


def _check_arrays(x: np.ndarray, y: np.ndarray, source: str) -> None:
    """Checks that need no model: dtypes, ranks, matching lengths, at least one example."""
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, np.ndarray) else type(x).__name__
        hint = " (add the channel axis with x[:, None])" if getattr(x, "ndim", 0) == 3 else ""
        raise DataError(f"{source}: x must be uint8 N×C×H×W, got {got}{hint}")
    if not isinstance(y, np.ndarray) or y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        got = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, np.ndarray) else type(y).__name__
        raise DataError(f"{source}: y must be 1-D integer labels, got {got}")
    if len(x) != len(y):
        raise DataError(
            f"{source}: x has {len(x)} images but y has {len(y)} labels; they must match"
        )
    if len(x) == 0:
        raise DataError(f"{source}: the dataset is empty; give at least one labelled image")


def _validated(x: np.ndarray, y: np.ndarray, spec: ModelSpec, source: str) -> ArrayDataset:
    """An ArrayDataset, after checking the arrays fit `spec` (shape and label range)."""
    _check_arrays(x, y, source)
    if tuple(x.shape[1:]) != spec.input_shape:
        channels, height, width = spec.input_shape
        fix = "resize the data or pass a matching input shape"
        if tuple(x.shape[1:]) == (height, width, channels):
            fix = "the arrays look channels-last (N×H×W×C); store x.transpose(0, 3, 1, 2)"
        raise DataError(
            f"{source}: images are {'×'.join(map(str, x.shape[1:]))} (C×H×W) but model "
            f"'{spec.name}' expects {'×'.join(map(str, spec.input_shape))}; {fix}"
        )
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= spec.num_classes:
        raise DataError(
            f"{source}: labels span [{low}, {high}] but model '{spec.name}' has "
            f"{spec.num_classes} classes, so labels must lie in [0, {spec.num_classes - 1}]"
        )
    return ArrayDataset(x, y)


def _load_image_folder(root: Path, spec: ModelSpec, limit: int | None) -> ArrayDataset:
    from PIL import Image, UnidentifiedImageError
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    modes = {1: "L", 3: "RGB"}
    if spec.channels not in modes:
        raise DataError(
            f"{root}: an ImageFolder gives 1- or 3-channel images but model '{spec.name}' takes "
            f"{spec.channels}; store the data as an .npz instead"
        )
    try:
        classes, class_to_idx = find_classes(str(root))
        samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as exc:
        raise DataError(
            f"{root}: {exc}; an ImageFolder needs one subfolder of images per class"
        ) from None
    by_class: list[list[str]] = [[] for _ in classes]
    for file, label in samples:
        by_class[label].append(file)
    # Round-robin over classes, so any prefix of the dataset is close to class-balanced.
    order = [
        (files[i], label)
        for i in range(max(map(len, by_class)))
        for label, files in enumerate(by_class)
        if i < len(files)
    ][:limit]
    height, width = spec.input_shape[1:]
    x = np.empty((len(order), spec.channels, height, width), dtype=np.uint8)
    for index, (file, _) in enumerate(order):
        try:
            with Image.open(file) as image:
                pixels = image.convert(modes[spec.channels])
                if pixels.size != (width, height):
                    pixels = pixels.resize((width, height), Image.Resampling.BILINEAR)
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"cannot read image {file} ({exc}); remove or replace it") from None
        array = np.asarray(pixels, dtype=np.uint8)
        x[index] = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    y = np.array([label for _, label in order], dtype=np.int64)
    return _validated(x, y, spec, str(root))
