"""rankfold.models.data and the digits splits: loading, checking, normalising and batching."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rankfold.models import (
    DIGITS_SPEC,
    ArrayDataset,
    ModelSpec,
    batches,
    data_dir,
    digits_splits,
    load_dataset,
    normalize,
    read_idx,
    shared_file,
    training_batches,
)
from rankfold.models.data import crop_flip
from rankfold.models.digits import DIGITS_MEAN, DIGITS_STD
from rankfold.models.spec import IMAGENET_MEAN, IMAGENET_STD
from rankfold.passes.core import ConfigError, DataError

CIFAR_SPEC = ModelSpec("resnet20", (3, 32, 32), 10, IMAGENET_MEAN, IMAGENET_STD)
# First ten labels of the official test sets (published with the datasets).
CIFAR10_TEST_HEAD = [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
MNIST_TEST_HEAD = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def _one_line(error: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(error.value)
    assert message and "\n" not in message
    return message


def _toy(n: int = 5, shape: tuple[int, int, int] = (3, 2, 2)) -> ArrayDataset:
    x = (np.arange(n * int(np.prod(shape))) % 256).astype(np.uint8).reshape(n, *shape)
    return ArrayDataset(x, np.arange(n, dtype=np.int32) % 10)


# ---------------------------------------------------------------- locations


def test_data_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RANKFOLD_DATA", str(tmp_path))
    assert data_dir() == tmp_path.resolve()
    monkeypatch.delenv("RANKFOLD_DATA")
    assert data_dir() == (Path(__file__).resolve().parents[2] / "shared" / "data").resolve()


def test_shared_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RANKFOLD_DATA", str(tmp_path))
    with pytest.raises(DataError) as error:
        shared_file("cifar10/test_lossless_1017.npz")
    assert "RANKFOLD_DATA" in _one_line(error) and "cifar10/test_lossless_1017.npz" in str(
        error.value
    )
    (tmp_path / "a.npz").write_bytes(b"")
    assert shared_file("a.npz") == tmp_path.resolve() / "a.npz"


# ---------------------------------------------------------------- ArrayDataset, normalize, batches


def test_array_dataset_casts_labels_and_subsets() -> None:
    ds = _toy(5)
    assert len(ds) == 5 and ds.y.dtype == np.int64
    head = ds.subset(2)
    assert len(head) == 2 and np.array_equal(head.x, ds.x[:2]) and head.y.tolist() == [0, 1]
    assert len(ds.subset(99)) == 5
    with pytest.raises(ValueError, match="n >= 1"):
        ds.subset(0)


@pytest.mark.parametrize(
    ("x", "y", "fragment"),
    [
        (np.zeros((2, 3, 4, 4), np.float32), np.zeros(2, np.int64), "x must be uint8 N×C×H×W"),
        (np.zeros((2, 4, 4), np.uint8), np.zeros(2, np.int64), "add the channel axis"),
        (np.zeros((2, 3, 4, 4), np.uint8), np.zeros(2, np.float32), "y must be 1-D integer"),
        (np.zeros((2, 3, 4, 4), np.uint8), np.zeros(3, np.int64), "x has 2 images but y has 3"),
        (np.zeros((0, 3, 4, 4), np.uint8), np.zeros(0, np.int64), "the dataset is empty"),
    ],
)
def test_array_dataset_rejects(x: np.ndarray, y: np.ndarray, fragment: str) -> None:
    with pytest.raises(DataError) as error:
        ArrayDataset(x, y)
    assert fragment in _one_line(error)


def test_normalize_values() -> None:
    images = np.stack([np.zeros((3, 1, 1)), np.full((3, 1, 1), 255)]).astype(np.uint8)
    x = normalize(images, CIFAR_SPEC)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 1, 1)
    top = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    bottom = [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    torch.testing.assert_close(x[1, :, 0, 0], torch.tensor(top), atol=1e-6, rtol=0)
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor(bottom), atol=1e-6, rtol=0)
    torch.testing.assert_close(normalize(torch.from_numpy(images), CIFAR_SPEC), x, atol=0, rtol=0)
    with pytest.raises(ValueError, match="N×3×H×W"):
        normalize(np.zeros((2, 1, 4, 4), np.uint8), CIFAR_SPEC)


def test_batches_in_order() -> None:
    ds = _toy(5)
    spec = ModelSpec("toy", (3, 2, 2), 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    got = list(batches(ds, spec, batch_size=2))
    assert [len(y) for _, y in got] == [2, 2, 1]
    assert all(x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in got)
    assert torch.cat([y for _, y in got]).tolist() == [0, 1, 2, 3, 4]
    expected = (torch.from_numpy(ds.x).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(torch.cat([x for x, _ in got]), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        next(batches(ds, spec, batch_size=0))


# ---------------------------------------------------------------- augmented training batches


def test_cifar_augmentation_crops_with_zero_padding_and_flips() -> None:
    images = np.arange(2 * 3 * 12 * 12, dtype=np.int64).reshape(2, 3, 12, 12).astype(np.uint8)
    centre = crop_flip(images, np.array([4, 0]), np.array([4, 8]), np.array([False, True]))
    assert centre.shape == images.shape and centre.dtype == np.uint8
    np.testing.assert_array_equal(centre[0], images[0])  # offset 4 of padding 4: unchanged
    # Second image: 4 rows of zero padding on top, shifted 4 columns left, then mirrored.
    np.testing.assert_array_equal(centre[1, :, :4], 0)
    shifted = np.zeros((3, 12, 12), dtype=np.uint8)
    shifted[:, 4:, :8] = images[1, :, :8, 4:]
    np.testing.assert_array_equal(centre[1], shifted[:, :, ::-1])


def test_training_batches_augment_reproducibly() -> None:
    train = _toy(128, (3, 12, 12))
    spec = ModelSpec("toy", (3, 12, 12), 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    plain = list(training_batches(train, spec, batch_size=50, augment="none"))
    assert [len(x) for x in plain] == [50, 50, 28]
    torch.testing.assert_close(torch.cat(plain), normalize(train.x, spec), atol=0, rtol=0)
    first = torch.cat(list(training_batches(train, spec, 50, augment="cifar", seed=3)))
    again = torch.cat(list(training_batches(train, spec, 50, augment="cifar", seed=3)))
    other = torch.cat(list(training_batches(train, spec, 50, augment="cifar", seed=4)))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert not torch.equal(first, torch.cat(plain))
    # "auto" augments only 3×32×32 inputs (CIFAR); these 12×12 images stay as they are.
    auto = torch.cat(list(training_batches(train, spec, 50, augment="auto", seed=3)))
    assert torch.equal(auto, torch.cat(plain))
    with pytest.raises(ConfigError, match="batch size must be >= 1"):
        next(training_batches(train, spec, batch_size=0))


# ---------------------------------------------------------------- load_dataset: npz


GOOD_X = np.arange(4 * 3 * 32 * 32, dtype=np.int64).astype(np.uint8).reshape(4, 3, 32, 32)
GOOD_Y = np.array([0, 1, 2, 9], np.int64)


def test_npz_loads_and_limits(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=GOOD_X, y=GOOD_Y.astype(np.uint8))
    ds = load_dataset(path, CIFAR_SPEC)
    assert np.array_equal(ds.x, GOOD_X) and ds.y.tolist() == GOOD_Y.tolist()
    assert ds.y.dtype == np.int64
    limited = load_dataset(str(path), CIFAR_SPEC, limit=3)
    assert len(limited) == 3 and np.array_equal(limited.x, GOOD_X[:3])
    with pytest.raises(ConfigError, match="limit must be >= 1"):
        load_dataset(path, CIFAR_SPEC, limit=0)


@pytest.mark.parametrize(
    ("arrays", "fragment"),
    [
        ({"x": GOOD_X}, "but no y"),
        ({"images": GOOD_X, "labels": GOOD_Y}, "but no x or y"),
        ({"x": GOOD_X[:, :1], "y": GOOD_Y}, "images are 1×32×32 (C×H×W) but model 'resnet20' "),
        ({"x": GOOD_X[:, :, :16], "y": GOOD_Y}, "expects 3×32×32"),
        ({"x": GOOD_X.astype(np.float32), "y": GOOD_Y}, "x must be uint8 N×C×H×W, got float32"),
        ({"x": GOOD_X.transpose(0, 2, 3, 1), "y": GOOD_Y}, "look channels-last (N×H×W×C)"),
        ({"x": GOOD_X, "y": GOOD_Y[:3]}, "x has 4 images but y has 3 labels"),
        ({"x": GOOD_X[:0], "y": GOOD_Y[:0]}, "the dataset is empty"),
        ({"x": GOOD_X, "y": np.array([0, 1, 2, 10])}, "labels span [0, 10]"),
        ({"x": GOOD_X, "y": np.array([-1, 1, 2, 3])}, "must lie in [0, 9]"),
        ({"x": GOOD_X, "y": GOOD_Y.astype(np.float32)}, "y must be 1-D integer labels"),
    ],
)
def test_npz_malformed(tmp_path: Path, arrays: dict[str, np.ndarray], fragment: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError) as error:
        load_dataset(path, CIFAR_SPEC)
    message = _one_line(error)
    assert fragment in message and str(path) in message


def test_unreadable_or_missing_paths(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.npz"
    np.savez(corrupt, x=GOOD_X, y=GOOD_Y)
    corrupt.write_bytes(corrupt.read_bytes()[:100])
    single = tmp_path / "single.npz"
    with open(single, "wb") as handle:
        np.save(handle, GOOD_X)
    text = tmp_path / "data.csv"
    text.write_text("1,2\n")
    cases = [
        (corrupt, "cannot read"),
        (single, "holds a single array"),
        (text, "neither a .npz file nor a directory"),
        (tmp_path / "absent.npz", "not found"),
    ]
    for path, fragment in cases:
        with pytest.raises(DataError) as error:
            load_dataset(path, CIFAR_SPEC)
        assert fragment in _one_line(error), path


# ---------------------------------------------------------------- load_dataset: ImageFolder


def _write_folder(root: Path, colors: dict[str, list[tuple[int, int, int]]], size: int) -> None:
    for name, class_colors in colors.items():
        (root / name).mkdir(parents=True)
        for i, color in enumerate(class_colors):
            Image.new("RGB", (size, size), color).save(root / name / f"img{i}.png")


def test_image_folder_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    # Class folders sort as cat < dog; PNG is lossless, so pixels come back exactly.
    _write_folder(
        root, {"dog": [(0, 0, 255), (9, 9, 9)], "cat": [(255, 0, 0), (0, 255, 0)]}, size=32
    )
    (root / "cat" / "notes.txt").write_text("not an image")
    ds = load_dataset(root, CIFAR_SPEC, workers=0)
    images, kept = ds.read(np.arange(len(ds)))
    assert images.shape == (4, 3, 32, 32) and images.dtype == np.uint8 and kept.all()
    # Round-robin over classes: cat0, dog0, cat1, dog1.
    assert ds.labels.tolist() == [0, 1, 0, 1]
    expected = [(255, 0, 0), (0, 0, 255), (0, 255, 0), (9, 9, 9)]
    for image, color in zip(images, expected, strict=True):
        assert np.array_equal(image, np.broadcast_to(np.array(color)[:, None, None], (3, 32, 32)))
    assert load_dataset(root, CIFAR_SPEC, limit=2).labels.tolist() == [0, 1]


def test_image_folder_converts_and_resizes(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    _write_folder(root, {str(d): [(255, 255, 255)] for d in range(3)}, size=20)
    ds = load_dataset(root, DIGITS_SPEC)
    images, _ = ds.read(np.arange(len(ds)))
    assert images.shape == (3, 1, 8, 8) and ds.labels.tolist() == [0, 1, 2]
    assert int(images.min()) == 255 and int(images.max()) == 255


def test_image_folder_errors(tmp_path: Path) -> None:
    empty_class = tmp_path / "empty_class"
    _write_folder(empty_class, {"a": [(1, 2, 3)]}, size=32)
    (empty_class / "b").mkdir()
    no_classes = tmp_path / "no_classes"
    no_classes.mkdir()
    one_class = tmp_path / "folder" / "cat"
    _write_folder(tmp_path / "folder", {"cat": [(1, 2, 3), (4, 5, 6)]}, size=32)
    broken = tmp_path / "broken"
    _write_folder(broken, {"a": [(1, 2, 3)]}, size=32)
    (broken / "a" / "bad.png").write_bytes(b"\x89PNG not really")
    too_many = tmp_path / "too_many"
    _write_folder(too_many, {f"c{i:02d}": [(i, i, i)] for i in range(11)}, size=32)
    spec4 = ModelSpec("rgba", (4, 32, 32), 10, (0.0,) * 4, (1.0,) * 4)
    cases = [
        (empty_class, CIFAR_SPEC, "one subfolder of images per class"),
        (no_classes, CIFAR_SPEC, "one subfolder of images per class"),
        (
            one_class,
            CIFAR_SPEC,
            "holds 2 images directly but no class subfolders; an ImageFolder needs one "
            f"subfolder of images per class (pass its parent, {one_class.parent},",
        ),
        (broken, CIFAR_SPEC, "cannot read image"),
        (too_many, CIFAR_SPEC, "labels span [0, 10]"),
        (empty_class, spec4, "1- or 3-channel images"),
    ]
    for root, spec, fragment in cases:
        with pytest.raises(DataError) as error:
            load_dataset(root, spec)
        assert fragment in _one_line(error), root.name


# ---------------------------------------------------------------- real data


def test_cifar10_real(data_dir: Path) -> None:
    path = data_dir / "cifar10" / "test_lossless_1017.npz"
    ds = load_dataset(path, CIFAR_SPEC)
    assert ds.x.shape == (1017, 3, 32, 32) and ds.y[:10].tolist() == CIFAR10_TEST_HEAD
    assert np.bincount(ds.y, minlength=10).min() > 0
    assert len(load_dataset(path, CIFAR_SPEC, limit=100)) == 100


def test_mnist_real(data_dir: Path) -> None:
    images = read_idx(data_dir / "mnist" / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(data_dir / "mnist" / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and labels[:10].tolist() == MNIST_TEST_HEAD
    assert np.bincount(labels).tolist()[:3] == [980, 1135, 1032]


def _idx(values: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, values.ndim]) + struct.pack(f">{values.ndim}I", *values.shape)
    return header + values.astype(np.uint8).tobytes()


def test_read_idx_roundtrip_and_errors(tmp_path: Path) -> None:
    values = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    good = tmp_path / "good.gz"
    good.write_bytes(gzip.compress(_idx(values)))
    np.testing.assert_array_equal(read_idx(good), values)
    bad_magic = tmp_path / "magic.idx"
    bad_magic.write_bytes(b"\x00\x00\x0d\x01" + _idx(values)[4:])
    with pytest.raises(DataError, match="bad magic number"):
        read_idx(bad_magic)
    truncated = tmp_path / "short.idx"
    truncated.write_bytes(_idx(values)[:-5])
    with pytest.raises(DataError, match=r"declares shape \(2, 3, 4\) but holds 19 bytes"):
        read_idx(truncated)
    header_only = tmp_path / "header.idx"
    header_only.write_bytes(_idx(values)[:9])
    with pytest.raises(DataError, match="ends inside its header"):
        read_idx(header_only)


# ---------------------------------------------------------------- digits


def test_digits_splits() -> None:
    train, test = digits_splits()
    assert (len(train), len(test)) == (1437, 360)
    assert train.x.shape[1:] == (1, 8, 8) and train.x.dtype == np.uint8
    assert int(train.x.max()) == 255 and int(train.x.min()) == 0
    counts = np.bincount(test.y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    train_rows = {row.tobytes() for row in train.x.reshape(len(train), -1)}
    # Digits contains a few exact duplicate images; a split can share only those.
    shared = sum(row.tobytes() in train_rows for row in test.x.reshape(len(test), -1))
    assert shared <= 3
    pixels = train.x.astype(np.float64) / 255
    assert pixels.mean() == pytest.approx(DIGITS_MEAN[0], abs=1e-4)
    assert pixels.std() == pytest.approx(DIGITS_STD[0], abs=1e-4)
    again, _ = digits_splits(0)
    other, _ = digits_splits(1)
    assert np.array_equal(again.x, train.x) and not np.array_equal(other.x, train.x)


def test_fewer_class_folders_than_model_classes_get_a_note(tmp_path: Path, capsys) -> None:
    """Folder i is read as class i: right for all of a model's classes in its order, a silent
    mismatch for a subset of them (10 ImageNet synsets before a 1,000-class model)."""
    from rankfold.converter.pipeline import note_class_folders

    _write_folder(tmp_path / "three", {str(d): [(255, 255, 255)] for d in range(3)}, size=8)
    _write_folder(tmp_path / "ten", {str(d): [(255, 255, 255)] for d in range(10)}, size=8)
    note_class_folders(load_dataset(tmp_path / "ten", DIGITS_SPEC), DIGITS_SPEC, "top-1")
    assert capsys.readouterr().err == ""
    note_class_folders(load_dataset(tmp_path / "three", DIGITS_SPEC), DIGITS_SPEC, "top-1")
    err = " ".join(capsys.readouterr().err.split())
    assert "3 class folders for a model of 10 classes; top-1 reads folder i" in err
