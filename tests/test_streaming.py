"""Streaming data: ImageFolder decoded lazily (modes, sizes, bad files), torchvision's evaluation
preprocessing, per-image training crops, memory-mapped .npz, and bounded memory at scale."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from rankfold.models import (
    ArrayDataset,
    ModelSpec,
    batches,
    load_dataset,
    load_model,
    read_groups,
    training_batches,
)
from rankfold.models.data import augments
from rankfold.models.spec import IMAGENET_MEAN, IMAGENET_STD
from rankfold.passes.core import ConfigError, DataError

CIFAR_SPEC = ModelSpec("cifar", (3, 32, 32), 10, IMAGENET_MEAN, IMAGENET_STD)
IMAGENET_SPEC = ModelSpec("imagenet", (3, 224, 224), 10, IMAGENET_MEAN, IMAGENET_STD)


def _noise(width: int, height: int, seed: int) -> Image.Image:
    """A smooth random RGB image (noise upsampled), so resizing has something to interpolate."""
    small = np.random.default_rng(seed).integers(0, 256, (height // 8 + 1, width // 8 + 1, 3))
    return Image.fromarray(small.astype(np.uint8)).resize((width, height), Image.BICUBIC)


def _all(ds) -> np.ndarray:
    images, kept = ds.read(np.arange(len(ds)))
    assert kept.all()
    return images


# ---------------------------------------------------------------- modes, sizes, nesting


def test_mixed_modes_and_sizes_are_converted(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    for name in ("a", "b", "c", "d"):
        (root / name).mkdir(parents=True)
    Image.new("L", (40, 30), 100).save(root / "a" / "gray.png")
    Image.new("RGBA", (50, 64), (10, 20, 30, 128)).save(root / "b" / "rgba.png")
    # A CMYK JPEG (as print workflows save them); JPEG is lossy, so compared within a tolerance.
    Image.new("CMYK", (33, 45), (0, 255, 255, 0)).save(root / "c" / "cmyk.jpg", quality=95)
    palette = Image.new("P", (32, 32), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.info["transparency"] = 0
    (root / "d" / "nested" / "deeper").mkdir(parents=True)  # nested folders inside a class
    palette.save(root / "d" / "nested" / "deeper" / "palette.png", transparency=0)

    ds = load_dataset(root, CIFAR_SPEC, workers=0)
    assert ds.labels.tolist() == [0, 1, 2, 3]
    images = _all(ds)
    assert images.shape == (4, 3, 32, 32) and images.dtype == np.uint8
    expected = [(100, 100, 100), (10, 20, 30), (255, 0, 0), (200, 100, 50)]
    tolerance = [0, 0, 3, 0]
    for image, color, tol in zip(images, expected, tolerance, strict=True):
        difference = np.abs(image.astype(int) - np.array(color)[:, None, None])
        assert difference.max() <= tol, (color, image[:, 0, 0])
    gray = ModelSpec("gray", (1, 32, 32), 10, (0.5,), (0.5,))
    assert _all(load_dataset(root, gray, workers=0)).shape == (4, 1, 32, 32)


# ---------------------------------------------------------------- bad files


def _folder_with_bad_file(root: Path) -> Path:
    for i in range(3):
        (root / f"c{i}").mkdir(parents=True)
        _noise(32, 32, i).save(root / f"c{i}" / "0.png")
        _noise(32, 32, i + 10).save(root / f"c{i}" / "1.png")
    bad = root / "c1" / "2.png"  # third of class 1: not the first file, so found while reading
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return bad


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_is_one_line_naming_it(tmp_path: Path, workers: int) -> None:
    bad = _folder_with_bad_file(tmp_path / "data")
    ds = load_dataset(tmp_path / "data", CIFAR_SPEC, workers=workers)
    with pytest.raises(DataError) as error:
        for _ in batches(ds, CIFAR_SPEC, batch_size=2):
            pass
    message = str(error.value)
    assert "\n" not in message and str(bad) in message and "--skip-bad-images" in message


def test_corrupt_first_image_fails_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "a" / "0.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="cannot read image .*0.jpg"):
        load_dataset(tmp_path / "data", CIFAR_SPEC)


@pytest.mark.parametrize("workers", [0, 1])
def test_skip_bad_images_leaves_them_out_and_counts(tmp_path: Path, workers: int) -> None:
    bad = _folder_with_bad_file(tmp_path / "data")
    ds = load_dataset(tmp_path / "data", CIFAR_SPEC, workers=workers, skip_bad_images=True)
    assert len(ds) == 7
    got = list(batches(ds, CIFAR_SPEC, batch_size=3))
    labels = torch.cat([y for _, y in got]).tolist()
    # Round-robin order c0 c1 c2 c0 c1 c2 c1(bad): the bad one is dropped, nothing else is.
    assert labels == [0, 1, 2, 0, 1, 2] and sum(len(x) for x, _ in got) == 6
    assert list(ds.skipped) == [str(bad)]
    augmented = torch.cat(list(training_batches(ds, CIFAR_SPEC, batch_size=3, seed=1)))
    assert augmented.shape == (6, 3, 32, 32)


# ---------------------------------------------------------------- preprocessing


def test_eval_preprocessing_equals_torchvision_reference(tmp_path: Path) -> None:
    root = tmp_path / "big"
    (root / "x").mkdir(parents=True)
    sizes = [(300, 257), (256, 400), (500, 375), (231, 229)]
    for i, (width, height) in enumerate(sizes):
        _noise(width, height, i).save(root / "x" / f"{i}.jpg", quality=90)
    reference = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    ds = load_dataset(root, IMAGENET_SPEC, workers=0)
    got = _all(ds)
    for image, position in zip(got, range(len(ds)), strict=True):
        with Image.open(ds.path(position)) as source:
            expected = np.asarray(reference(source.convert("RGB"))).transpose(2, 0, 1)
        np.testing.assert_array_equal(image, expected)
    # Another ratio: resize to round(224 / 0.95) = 236, then crop.
    other = load_dataset(root, IMAGENET_SPEC, workers=0, crop_ratio=0.95)
    reference = transforms.Compose([transforms.Resize(236), transforms.CenterCrop(224)])
    with Image.open(other.path(0)) as source:
        expected = np.asarray(reference(source.convert("RGB"))).transpose(2, 0, 1)
    np.testing.assert_array_equal(other.read(np.array([0]))[0][0], expected)
    with pytest.raises(ConfigError, match="crop ratio must lie in"):
        load_dataset(root, IMAGENET_SPEC, crop_ratio=1.5)


def test_training_augmentation_by_input_size(tmp_path: Path) -> None:
    assert augments("auto", CIFAR_SPEC) == "cifar"
    assert augments("auto", IMAGENET_SPEC) == "resized-crop"
    assert augments("auto", ModelSpec("digits", (1, 8, 8), 10, (0.0,), (1.0,))) == "none"
    spec = ModelSpec("mid", (3, 96, 96), 10, IMAGENET_MEAN, IMAGENET_STD)
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    for i in range(4):
        _noise(130, 110, i).save(root / "a" / f"{i}.png")
    serial = load_dataset(root, spec, workers=0)
    first = torch.cat(list(training_batches(serial, spec, batch_size=2, seed=3)))
    again = torch.cat(list(training_batches(serial, spec, batch_size=2, seed=3)))
    other = torch.cat(list(training_batches(serial, spec, batch_size=2, seed=4)))
    clean = torch.cat([x for x, _ in batches(serial, spec, batch_size=2)])
    assert first.shape == (4, 3, 96, 96)
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert not torch.equal(first, other) and not torch.equal(first, clean)
    # The crop of an image depends on (seed, epoch, image), not on which process reads it.
    parallel = load_dataset(root, spec, workers=2)
    in_workers = torch.cat(list(training_batches(parallel, spec, batch_size=2, seed=3)))
    torch.testing.assert_close(first, in_workers, atol=0, rtol=0)


def test_cifar_augmentation_is_unchanged_for_arrays() -> None:
    # The per-batch crop/flip semantics BN recalibration relies on: same draws, any source.
    x = np.random.default_rng(0).integers(0, 256, (10, 3, 32, 32)).astype(np.uint8)
    data = ArrayDataset(x, np.arange(10) % 10)
    from rankfold.models.data import crop_flip, crop_flip_params, normalize

    rng = np.random.default_rng([7, 0])
    expected = [
        normalize(crop_flip(x[s : s + 4], *crop_flip_params(rng, len(x[s : s + 4]))), CIFAR_SPEC)
        for s in range(0, 10, 4)
    ]
    got = list(training_batches(data, CIFAR_SPEC, batch_size=4, seed=7))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_mean_std_for_a_bare_factory(tmp_path: Path) -> None:
    file = tmp_path / "net.py"
    file.write_text(
        "from torch import nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),"
        " nn.Linear(4, 5))\n"
    )
    name = f"{file}:build"
    _, plain = load_model(name, input_shape=(3, 16, 16))
    assert plain.mean == (0.0, 0.0, 0.0) and plain.std == (1.0, 1.0, 1.0)
    _, spec = load_model(name, input_shape=(3, 16, 16), mean=(0.5, 0.4, 0.3), std=(0.2,) * 3)
    assert spec.mean == (0.5, 0.4, 0.3) and spec.std == (0.2, 0.2, 0.2) and spec.num_classes == 5
    with pytest.raises(ConfigError, match="give 3 value"):
        load_model(name, input_shape=(3, 16, 16), mean=(0.5,))


# ---------------------------------------------------------------- .npz


def test_npz_memory_mapped_when_stored(tmp_path: Path) -> None:
    x = np.random.default_rng(1).integers(0, 256, (6, 3, 32, 32)).astype(np.uint8)
    y = np.arange(6) % 10
    np.savez(tmp_path / "stored.npz", x=x, y=y)
    np.savez_compressed(tmp_path / "deflated.npz", x=x, y=y)
    stored = load_dataset(tmp_path / "stored.npz", CIFAR_SPEC)
    deflated = load_dataset(tmp_path / "deflated.npz", CIFAR_SPEC)
    assert isinstance(stored.x, np.memmap) and not isinstance(deflated.x, np.memmap)
    for ds in (stored, deflated):
        np.testing.assert_array_equal(_all(ds), x)
        assert ds.labels.tolist() == y.tolist()
    assert stored.fingerprint() == deflated.fingerprint()


# ---------------------------------------------------------------- memory at scale

_RSS_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from rankfold.models import ModelSpec, batches, load_dataset
    spec = ModelSpec("m", (3, 48, 48), 10, (0.5,) * 3, (0.25,) * 3)
    peaks = []
    for folder in sys.argv[1:]:  # smaller first: the peak only grows
        data = load_dataset(folder, spec, workers=0)
        seen = sum(len(y) for _, y in batches(data, spec, batch_size=64))
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peaks.append({"seen": seen, "peak_mib": peak_mib})
    print(json.dumps(peaks))
    """
)


def test_peak_memory_does_not_grow_with_the_dataset(tmp_path: Path) -> None:
    # The scale: one 48×48 JPEG's bytes written 2,000 and 20,000 times. Holding the
    # decoded images would take 18,000 × 6.75 KiB = 119 MiB more for the larger folder (4× that
    # as float tensors); the allocator alone moves the peak by up to ~20 MiB.
    buffer = io.BytesIO()
    _noise(48, 48, 0).save(buffer, format="JPEG")
    payload = buffer.getvalue()
    folders = []
    for name, per_class in (("small", 200), ("large", 2_000)):
        for label in range(10):
            folder = tmp_path / name / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                (folder / f"{i:05d}.jpg").write_bytes(payload)
        folders.append(str(tmp_path / name))
    done = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, *folders],
        capture_output=True,
        text=True,
        check=True,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    small, large = json.loads(done.stdout.strip().splitlines()[-1])
    assert small["seen"] == 2_000 and large["seen"] == 20_000
    assert large["peak_mib"] - small["peak_mib"] < 40, (small, large)


# ---------------------------------------------------------------- real data


def test_cifar10_jpeg_folder_decodes_to_the_npz(data_dir: Path) -> None:
    folder = data_dir / "cifar10" / "jpeg" / "test"
    reference = load_dataset(data_dir / "cifar10" / "test_jpeg_10000.npz", CIFAR_SPEC)
    streamed = load_dataset(folder, CIFAR_SPEC, workers=0)
    assert len(streamed) == 10_000 and np.bincount(streamed.labels).tolist() == [1000] * 10
    # `NNNN` is the image's position among its class in the test set's original order.
    rows = {c: np.flatnonzero(reference.y == c) for c in range(10)}
    positions = np.random.default_rng(0).choice(len(streamed), 300, replace=False)
    images, _ = streamed.read(positions)
    for image, position in zip(images, positions, strict=True):
        label = int(streamed.labels[position])
        nth = int(Path(streamed.path(int(position))).stem)
        np.testing.assert_array_equal(image, reference.x[rows[label][nth]])
    # Balanced prefixes come from the file list alone.
    assert np.bincount(streamed.subset(50).labels).tolist() == [5] * 10


def test_read_groups_workers_match_serial(tmp_path: Path) -> None:
    _folder_with_bad_file(tmp_path / "data")
    (tmp_path / "data" / "c1" / "2.png").unlink()
    ds = load_dataset(tmp_path / "data", CIFAR_SPEC, workers=0)
    groups = [np.array([5, 0]), np.array([3]), np.array([1, 2, 4])]
    serial = list(read_groups(ds, groups, workers=0))
    parallel = list(read_groups(ds, groups, workers=2))
    for (a, la, _), (b, lb, _) in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(a, b)
        assert la.tolist() == lb.tolist()
