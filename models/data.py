"""Labelled image data, streamed: loading from user paths, checking, preprocessing, batching.

Nothing here holds a whole dataset in memory unless it is given as arrays. An ImageFolder keeps
only its file list and labels; images are decoded on demand, in DataLoader worker processes when
`workers` > 0. An `.npz` whose members are stored uncompressed (`np.savez`) is memory-mapped; a
compressed one (`np.savez_compressed`) cannot be (deflate has no random access), so its images
are read into memory once, as uint8. Every batch is a uint8 N×C×H×W array until `normalize`
turns it into the model's float input with the model's `ModelSpec`.

Preprocessing is torchvision's convention, from the spec's input size: evaluation resizes the
shorter side to crop / `crop_ratio` and center-crops (224² models: 256 → 224); an image already of
the input size is left as it is (CIFAR). Training augmentation (`Augment`): "cifar" pads by 4,
crops back and flips (drawn per batch from a seeded generator, see `training_batches`);
"resized-crop" draws torchvision's RandomResizedCrop + flip per image, seeded by (seed, epoch,
image); "auto" picks "cifar" for 3×32×32 inputs and "resized-crop" for 3-channel inputs of at
least 96 px, and none otherwise (flips would change digits and text). Every problem with a file
is a one-line `DataError` naming the file and the fix. The shared real data lives outside the
repository (see `data_dir`).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from rankfold.models.spec import ModelSpec
from rankfold.passes.core import ConfigError, DataError

REPO_ROOT = Path(__file__).resolve().parents[1]
CIFAR_PADDING = 4
Augment = Literal["auto", "cifar", "resized-crop", "none"]
DEFAULT_CROP_RATIO = 0.875  # torchvision's evaluation convention: resize 256, crop 224
RESIZED_CROP_MIN_SIZE = 96  # "auto" uses random-resized-crop from this input size up
FINGERPRINT_SAMPLES = 1024  # images hashed to fingerprint an array dataset


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


# ---- datasets ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainAugment:
    """Per-image training augmentation applied while reading: "resized-crop" with its seeds."""

    seed: int
    epoch: int


class ImageData(Protocol):
    """What every dataset offers: labels in memory, images read by position on demand."""

    @property
    def labels(self) -> np.ndarray: ...  # int64, N

    @property
    def image_shape(self) -> tuple[int, ...]: ...  # C, H, W of what `read` returns

    @property
    def source(self) -> str: ...

    @property
    def workers(self) -> int: ...  # DataLoader worker processes that decode it

    @property
    def skipped(self) -> dict[str, str]: ...  # unreadable files skipped so far → reason

    def __len__(self) -> int: ...

    def read(
        self, positions: np.ndarray, augment: TrainAugment | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...  # uint8 images of the kept positions, kept mask

    def subset(self, n: int) -> ImageData: ...

    def take(self, positions: np.ndarray) -> ImageData: ...

    def fingerprint(self) -> str: ...


@dataclass(frozen=True)
class ArrayDataset:
    """Images `x` (uint8, N×C×H×W, in memory or memory-mapped) with labels `y` (int64, N)."""

    x: np.ndarray
    y: np.ndarray
    source: str = "arrays"

    def __post_init__(self) -> None:
        _check_arrays(self.x, self.y, "ArrayDataset")
        # Integer labels of any width become int64, the dtype cross-entropy and argmax compare to.
        object.__setattr__(self, "y", np.asarray(self.y, dtype=np.int64))

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def labels(self) -> np.ndarray:
        return self.y

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def workers(self) -> int:
        return 0  # slicing an array (or a memory map) is cheaper than sending it between processes

    @property
    def skipped(self) -> dict[str, str]:
        return {}

    def read(
        self, positions: np.ndarray, augment: TrainAugment | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        positions = np.asarray(positions)
        images = np.ascontiguousarray(self.x[positions])
        if augment is not None:
            images = np.stack(
                [
                    _resized_crop_flip(torch.from_numpy(image), self.image_shape[1:], augment, p)
                    for image, p in zip(images, positions, strict=True)
                ]
            )
        return images, np.ones(len(positions), dtype=bool)

    def subset(self, n: int) -> ArrayDataset:
        """The first `n` examples (all of them when there are fewer)."""
        if n < 1:
            raise ValueError(f"subset needs n >= 1, got {n}")
        return ArrayDataset(self.x[:n], self.y[:n], self.source)

    def take(self, positions: np.ndarray) -> ImageData:
        return DatasetView(self, np.asarray(positions, dtype=np.int64))

    def fingerprint(self) -> str:
        """Length, labels and up to `FINGERPRINT_SAMPLES` evenly spaced images, hashed: enough to
        tell datasets apart without reading a memory-mapped file whole."""
        digest = hashlib.sha256(np.ascontiguousarray(self.y).data)
        step = max(1, len(self) // FINGERPRINT_SAMPLES)
        digest.update(np.ascontiguousarray(self.x[::step]).data)
        return f"{len(self)}:{digest.hexdigest()[:16]}"


@dataclass(frozen=True)
class DatasetView:
    """The examples of `base` at `index`, in that order, read through `base`."""

    base: ImageData
    index: np.ndarray
    labels: np.ndarray = field(init=False)  # base.labels[index], gathered once

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", self.base.labels[self.index])

    def __len__(self) -> int:
        return len(self.index)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return self.base.image_shape

    @property
    def source(self) -> str:
        return self.base.source

    @property
    def workers(self) -> int:
        return self.base.workers

    @property
    def skipped(self) -> dict[str, str]:
        return self.base.skipped

    def read(
        self, positions: np.ndarray, augment: TrainAugment | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        return self.base.read(self.index[np.asarray(positions)], augment)

    def subset(self, n: int) -> DatasetView:
        if n < 1:
            raise ValueError(f"subset needs n >= 1, got {n}")
        return DatasetView(self.base, self.index[:n])

    def take(self, positions: np.ndarray) -> DatasetView:
        return DatasetView(self.base, self.index[np.asarray(positions)])

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.base.fingerprint().encode())
        digest.update(np.ascontiguousarray(self.index, dtype=np.int64).data)
        return f"{len(self)}:{digest.hexdigest()[:16]}"


@dataclass(eq=False)
class ImageFolderDataset:
    """An ImageFolder's file list and labels; images decoded when read.

    `files` are paths relative to `root` as bytes in one NumPy array: DataLoader workers fork
    from the main process, and a list of Python strings would be copied into each of them page
    by page as their reference counts are touched.
    """

    root: Path
    spec: ModelSpec
    files: np.ndarray  # bytes, relative to root
    labels: np.ndarray  # int64
    classes: list[str]
    crop_ratio: float = DEFAULT_CROP_RATIO
    skip_bad_images: bool = False
    workers: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # filled by the reading loop

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def source(self) -> str:
        return str(self.root)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return self.spec.input_shape

    def path(self, position: int) -> Path:
        return self.root / os.fsdecode(self.files[position])

    def read(
        self, positions: np.ndarray, augment: TrainAugment | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Decode, convert and preprocess the images at `positions`; with `skip_bad_images` an
        unreadable one is left out (kept mask False), else it is a DataError naming it."""
        positions = np.asarray(positions)
        channels, height, width = self.spec.input_shape
        out = np.empty((len(positions), channels, height, width), dtype=np.uint8)
        kept = np.ones(len(positions), dtype=bool)
        for slot, position in enumerate(positions):
            try:
                image = load_image(self.path(int(position)), channels)
            except DataError:
                if not self.skip_bad_images:
                    raise
                kept[slot] = False
                continue
            if augment is None:
                image = eval_transform(image, (height, width), self.crop_ratio)
                out[slot] = _chw(image)
            else:
                out[slot] = _resized_crop_flip(image, (height, width), augment, int(position))
        return out[kept], kept

    def subset(self, n: int) -> DatasetView:
        """The first `n` examples: close to class-balanced, as the order is round-robin."""
        if n < 1:
            raise ValueError(f"subset needs n >= 1, got {n}")
        return DatasetView(self, np.arange(min(n, len(self))))

    def take(self, positions: np.ndarray) -> DatasetView:
        return DatasetView(self, np.asarray(positions, dtype=np.int64))

    def fingerprint(self) -> str:
        """The file list, labels and preprocessing (reading every file would defeat streaming)."""
        digest = hashlib.sha256(self.files.tobytes())
        digest.update(self.labels.tobytes())
        digest.update(f"{self.spec.input_shape}:{self.crop_ratio}".encode())
        return f"{len(self)}:{digest.hexdigest()[:16]}"


def load_dataset(
    path: str | Path,
    spec: ModelSpec,
    limit: int | None = None,
    *,
    crop_ratio: float = DEFAULT_CROP_RATIO,
    skip_bad_images: bool = False,
    workers: int | None = None,
) -> ImageData:
    """Open a `.npz` (keys x: uint8 N×C×H×W, y: labels) or an ImageFolder directory for `spec`.

    An ImageFolder holds one subfolder per class (class index = position in sorted order; nested
    folders inside a class are searched too); images of any size and mode are converted to the
    spec's channel count and preprocessed for evaluation (see the module doc). Its examples are
    ordered round-robin over classes, so `limit` (and `subset`) keep every class represented
    without decoding anything. Its first image is decoded here, so an unreadable dataset fails
    before any expensive work. `workers`: DataLoader processes decoding an ImageFolder (None:
    up to 4, leaving one core free); arrays are sliced in the calling process.
    """
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1, got {limit}; omit it to use the whole dataset")
    if not 0 < crop_ratio <= 1:
        raise ConfigError(
            f"crop ratio must lie in (0, 1], got {crop_ratio}; 0.875 resizes 256 → crops 224"
        )
    if workers is not None and workers < 0:
        raise ConfigError(f"workers must be >= 0, got {workers}; 0 decodes in this process")
    path = Path(path)
    if path.is_dir():
        if workers is None:
            workers = max(0, min(4, (os.cpu_count() or 1) - 1))
        data = _image_folder(path, spec, limit, crop_ratio, skip_bad_images, workers)
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


# ---- preprocessing -------------------------------------------------------------------------------


def load_image(path: Path, channels: int):
    """`path` decoded and converted to RGB (3 channels) or L (1), as a PIL image.

    Palette images with transparency go through RGBA, as PIL asks; alpha is dropped, as
    torchvision's loader does; CMYK JPEGs convert through PIL's colour conversion.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")
            return image.convert("RGB" if channels == 3 else "L")
    except (
        OSError,
        UnidentifiedImageError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
    ) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"cannot read image {path} ({reason}); remove or replace it, or pass "
            "--skip-bad-images to leave such files out"
        ) from None


def eval_transform(image, size: tuple[int, int], crop_ratio: float = DEFAULT_CROP_RATIO):
    """A PIL image of the input size (H, W): unchanged if it is one, else its shorter side
    resized to min(H, W) / crop_ratio (bilinear, antialiased) and its center cropped, exactly
    as torchvision's Resize + CenterCrop."""
    from torchvision.transforms import functional as tf

    height, width = size
    if image.size == (width, height):
        return image
    image = tf.resize(image, [round(min(height, width) / crop_ratio)])
    return tf.center_crop(image, [height, width])


def augments(augment: Augment, spec: ModelSpec) -> Literal["cifar", "resized-crop", "none"]:
    """The training augmentation `augment` means for `spec` ("auto" resolved by input size)."""
    if augment != "auto":
        return augment
    channels, height, width = spec.input_shape
    if spec.input_shape == (3, 32, 32):
        return "cifar"
    if channels == 3 and min(height, width) >= RESIZED_CROP_MIN_SIZE:
        return "resized-crop"
    return "none"


def _resized_crop_flip(image, size: tuple[int, int], augment: TrainAugment, position: int):
    """torchvision's RandomResizedCrop (default scale and ratio) + horizontal flip of a PIL image
    or a C×H×W uint8 tensor, drawn from torch's RNG seeded by (seed, epoch, position), so an
    image gets the same crop whichever worker process reads it. Returns uint8 C×H×W."""
    from torchvision import transforms
    from torchvision.transforms import functional as tf

    seed = np.random.SeedSequence([augment.seed, augment.epoch, position]).generate_state(1)[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        top, left, crop_h, crop_w = transforms.RandomResizedCrop.get_params(
            image, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
        )
        flip = bool(torch.rand(()) < 0.5)
    image = tf.resized_crop(image, top, left, crop_h, crop_w, list(size), antialias=True)
    if flip:
        image = tf.hflip(image)
    return image.numpy() if isinstance(image, torch.Tensor) else _chw(image)


def _chw(image) -> np.ndarray:
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


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


# ---- reading in batches --------------------------------------------------------------------------


def read_groups(
    data: ImageData,
    groups: Sequence[np.ndarray],
    *,
    augment: TrainAugment | None = None,
    workers: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(uint8 images, int64 labels, kept mask) for each group of positions, in order.

    With workers (default: the dataset's own count) each group is read by a DataLoader worker
    process while the caller works on the previous ones. Unreadable files skipped under
    `skip_bad_images` are left out of the images and labels and recorded in `data.skipped`.
    """
    workers = data.workers if workers is None else workers
    if workers == 0 or len(groups) <= 1:
        batches_read = (_read_group(data, group, augment) for group in groups)
    else:
        loader = torch.utils.data.DataLoader(
            _GroupReader(data, augment),
            sampler=groups,
            batch_size=None,
            num_workers=min(workers, len(groups)),
            collate_fn=_as_is,
        )
        batches_read = iter(loader)
    for group, read in zip(groups, batches_read, strict=True):
        if isinstance(read, DataError):  # raised in a worker: one line here, not its traceback
            raise read
        images, kept = read
        labels = data.labels[group][kept]
        if not kept.all():
            for position in np.asarray(group)[~kept]:
                data.skipped.setdefault(_describe_position(data, int(position)), "unreadable")
        yield images, labels, kept


def batches(
    ds: ImageData, spec: ModelSpec, batch_size: int = 256, *, workers: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised float32 inputs and int64 labels, `batch_size` at a time, in order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for images, labels, _ in read_groups(ds, _consecutive(len(ds), batch_size), workers=workers):
        if len(labels):
            yield normalize(images, spec), torch.from_numpy(labels)


def training_batches(
    data: ImageData,
    spec: ModelSpec,
    batch_size: int = 256,
    augment: Augment = "auto",
    seed: int = 0,
    *,
    workers: int | None = None,
) -> Iterator[torch.Tensor]:
    """Normalised inputs in order, augmented as fine-tuning does: for BatchNorm recalibration.

    A network's BatchNorm statistics come from augmented training images and the layers after
    each BN are adapted to them, so re-estimating them on clean images costs accuracy: ResNet-20's
    own statistics re-estimated on the 5,085 clean CIFAR training images score 88.6 % instead of
    91.6 % on test_lossless_1017 (on the test images themselves 88.1 %), and on the same images
    with crop + flip 91.4 %. The augmentation is drawn from a generator seeded by `seed` (per
    batch for "cifar", per image for "resized-crop").
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    rng = np.random.default_rng([seed, 0])
    kind = augments(augment, spec)
    per_image = TrainAugment(seed, 0) if kind == "resized-crop" else None
    groups = _consecutive(len(data), batch_size)
    for images, _, kept in read_groups(data, groups, augment=per_image, workers=workers):
        if kind == "cifar":
            # Drawn for the whole group, so a skipped file does not shift the others' crops.
            images = crop_flip(images, *(part[kept] for part in crop_flip_params(rng, len(kept))))
        if len(images):
            yield normalize(images, spec)


def first_images(data: ImageData, n: int) -> np.ndarray:
    """The first `n` readable images (uint8), e.g. for parity checks and probes."""
    images, _, _ = next(read_groups(data, [np.arange(min(n, len(data)))], workers=0))
    return images


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


def _consecutive(n: int, size: int) -> list[np.ndarray]:
    return [np.arange(start, min(start + size, n)) for start in range(0, n, size)]


def _read_group(data: ImageData, group: np.ndarray, augment: TrainAugment | None):
    try:
        return data.read(group, augment)
    except DataError as exc:
        return exc


class _GroupReader(torch.utils.data.Dataset):
    """A DataLoader source whose items are whole groups of positions (batch_size=None)."""

    def __init__(self, data: ImageData, augment: TrainAugment | None) -> None:
        self.data, self.augment = data, augment

    def __getitem__(self, group: np.ndarray):
        return _read_group(self.data, group, self.augment)


def _as_is(item):
    return item


def _describe_position(data: ImageData, position: int) -> str:
    base = data
    while isinstance(base, DatasetView):
        position, base = int(base.index[position]), base.base
    return str(base.path(position)) if isinstance(base, ImageFolderDataset) else str(position)


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
        if not zipfile.is_zipfile(path):
            # np.save writes a bare array; anything else is not NumPy data at all.
            with open(path, "rb") as handle:
                if handle.read(6) == b"\x93NUMPY":
                    raise DataError(f"{path} holds a single array, not an .npz with arrays x and y")
            raise DataError(
                f"cannot read {path} (not a zip archive); the file is corrupt or not an .npz"
            )
        with zipfile.ZipFile(path) as archive:
            names = [name.removesuffix(".npy") for name in archive.namelist()]
            missing = [k for k in ("x", "y") if k not in names]
            if missing:
                raise DataError(
                    f"{path} has arrays {sorted(names)} but no {' or '.join(missing)}; "
                    "save it with np.savez(path, x=images_uint8_NCHW, y=labels)"
                )
            x = _npz_member(path, archive, "x.npy")
            with archive.open("y.npy") as handle:
                y = np.lib.format.read_array(handle, allow_pickle=False)
            return x, y
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"cannot read {path} ({reason}); the file is corrupt or not an .npz"
        ) from None


def _npz_member(path: Path, archive: zipfile.ZipFile, name: str) -> np.ndarray:
    """Member `name` of an .npz, memory-mapped when stored uncompressed (np.savez).

    Hand-written because np.load ignores mmap_mode for .npz archives and reads every member into
    memory: an uncompressed member is a plain .npy file at an offset inside the zip, which
    np.memmap maps directly. A compressed member (np.savez_compressed) has no random access, so
    it is read into memory.
    """
    info = archive.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        with archive.open(info) as handle:
            return np.lib.format.read_array(handle, allow_pickle=False)
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        local = handle.read(30)  # the zip local file header: its name and extra field lengths
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise ValueError(f"bad zip header for {name}")
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        handle.seek(info.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(handle)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }.get(version)
        if read_header is None:
            raise ValueError(f"unsupported .npy version {version} for {name}")
        shape, fortran_order, dtype = read_header(handle)
        offset = handle.tell()
    if dtype.hasobject:
        raise ValueError(f"{name} holds Python objects, which are never loaded")
    if int(np.prod(shape)) == 0:
        return np.empty(shape, dtype=dtype)
    order = "F" if fortran_order else "C"
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)


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
    return ArrayDataset(x, y, source)


def _folder_problem(root: Path, error: FileNotFoundError) -> str:
    """Why `root` is no ImageFolder, and what to pass instead: a class folder given by
    mistake holds its images directly."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    images = [p for p in root.iterdir() if p.is_file() and p.name.lower().endswith(IMG_EXTENSIONS)]
    if images:
        return (
            f"it holds {len(images)} images directly but no class subfolders; an ImageFolder "
            f"needs one subfolder of images per class (pass its parent, {root.parent}, if this "
            "is one class)"
        )
    return f"{str(error).rstrip('.')}; an ImageFolder needs one subfolder of images per class"


def _image_folder(
    root: Path,
    spec: ModelSpec,
    limit: int | None,
    crop_ratio: float,
    skip_bad_images: bool,
    workers: int,
) -> ImageFolderDataset:
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if spec.channels not in (1, 3):
        raise DataError(
            f"{root}: an ImageFolder gives 1- or 3-channel images but model '{spec.name}' takes "
            f"{spec.channels}; store the data as an .npz instead"
        )
    try:
        classes, class_to_idx = find_classes(str(root))
        samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as exc:
        raise DataError(f"{root}: {_folder_problem(root, exc)}") from None
    if len(classes) > spec.num_classes:
        raise DataError(
            f"{root}: labels span [0, {len(classes) - 1}] ({len(classes)} class folders) but "
            f"model '{spec.name}' has {spec.num_classes} classes, so labels must lie in "
            f"[0, {spec.num_classes - 1}]"
        )
    by_class: list[list[bytes]] = [[] for _ in classes]
    prefix = len(str(root)) + 1
    for file, label in samples:
        by_class[label].append(os.fsencode(file[prefix:]))
    del samples
    # Round-robin over classes, so any prefix of the dataset is close to class-balanced.
    longest = max(map(len, by_class))
    order = [
        (files[i], label)
        for i in range(longest)
        for label, files in enumerate(by_class)
        if i < len(files)
    ][:limit]
    data = ImageFolderDataset(
        root=root,
        spec=spec,
        files=np.array([file for file, _ in order], dtype=bytes),
        labels=np.array([label for _, label in order], dtype=np.int64),
        classes=classes,
        crop_ratio=crop_ratio,
        skip_bad_images=skip_bad_images,
        workers=workers,
    )
    # The first image, decoded now: a wrong mode or format fails before any expensive work.
    if not skip_bad_images:
        load_image(data.path(0), spec.channels)
    return data
