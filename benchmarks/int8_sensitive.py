"""INT8 with layers kept float by measured sensitivity (issue #16): paired accuracy of a
`rankfold compress --quantize int8` run's float and INT8 compressed files.

Reads DIR (a `rankfold compress … --quantize int8 --out DIR` folder): model.onnx,
model.int8.onnx and report.json (the layers `--float-layers` kept float, with their MAC share).
Prints, on test_lossless_1017.npz and test_jpeg_10000.npz, top-1 of both files, INT8 − float
paired over the same images with its standard error (the per-image differences' standard
deviation / √n), and top-1 agreement. With --sweep TARGET:CAP,… it also re-quantizes DIR's
model.onnx as `--quantize int8` would (same calibration and held-out training images, the
pipeline's `quantize_export`) at each --min-agreement TARGET and --max-float-share CAP.

  nice -n 10 .venv/bin/python benchmarks/int8_sensitive.py DIR [--sweep 0.99:0.25,0.99:0.5]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--sweep", default="", help="TARGET:CAP pairs, e.g. 0.99:0.25,0.99:0.5")
    return parser.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()  # before the heavy imports below: --help answers at once

import numpy as np  # noqa: E402

from rankfold.converter.config import QuantizeConfig  # noqa: E402
from rankfold.converter.quantization import quantize_export  # noqa: E402
from rankfold.converter.results import Report  # noqa: E402
from rankfold.models import batches, load_model, shared_file  # noqa: E402
from rankfold.models.data import load_dataset  # noqa: E402
from rankfold.runtime import create_session  # noqa: E402

TEST_SETS = ("cifar10/test_lossless_1017.npz", "cifar10/test_jpeg_10000.npz")
TRAIN = "cifar10/train_lossless_5085.npz"


def predictions(path: Path, data, spec) -> tuple[np.ndarray, np.ndarray]:
    session = create_session(path)
    predicted, labels = [], []
    for x, y in batches(data, spec):
        predicted.append(session.run(None, {"input": x.numpy()})[0].argmax(axis=1))
        labels.append(y.numpy())
    return np.concatenate(predicted), np.concatenate(labels)


def paired(float_path: Path, int8_path: Path, spec) -> list[str]:
    cells = []
    for name in TEST_SETS:
        data = load_dataset(shared_file(name), spec)
        reference, labels = predictions(float_path, data, spec)
        quantized, _ = predictions(int8_path, data, spec)
        right_float, right_int8 = reference == labels, quantized == labels
        differences = right_int8.astype(float) - right_float
        error = differences.std(ddof=1) / np.sqrt(len(differences))
        cells.append(
            f"{right_float.mean():.2%} → {right_int8.mean():.2%}, "
            f"{100 * differences.mean():+.2f} ± {100 * error:.2f} pt, "
            f"agreement {np.mean(reference == quantized):.1%}"
        )
    return cells


def describe(kept: list[str], choice) -> str:
    """The layers kept float, their MAC share and the held-out agreement (report or runtime)."""
    return (
        f"{len(kept)} ({', '.join(kept) or 'none'}); {choice.float_share:.1%} of MACs float; "
        f"held-out agreement {choice.agreement_before:.1%} → {choice.agreement:.1%} "
        f"({choice.outcome})"
    )


def row(label: str, kept: str, float_path: Path, int8_path: Path, spec) -> str:
    return f"| {label} | {kept} | " + " | ".join(paired(float_path, int8_path, spec)) + " |"


def main(args: argparse.Namespace) -> None:
    _, spec = load_model(args.model, None)
    report = Report.load(args.run / "report.json")
    quant = report.quantization
    choice = quant.compressed.sensitive
    kept = "—" if choice is None else describe(list(choice.kept), choice)
    model = args.run / "model.onnx"
    print(row("CLI", kept, model, args.run / "model.int8.onnx", spec), flush=True)
    if not args.sweep:
        return
    train = load_dataset(shared_file(TRAIN), spec)
    settings = QuantizeConfig(dtype="int8", calibration=quant.calibration)
    calibration = train.subset(settings.samples)
    held_out = train.take(np.arange(settings.samples, 2 * settings.samples))
    for pair in args.sweep.split(","):
        target, cap = (float(value) for value in pair.split(":"))
        settings = QuantizeConfig(
            dtype="int8", calibration=quant.calibration, min_agreement=target, max_float_share=cap
        )
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "model.int8.onnx"
            quantized = quantize_export(
                model, out, settings, quant.float_layers, calibration, spec, held_out
            )
            choice = quantized.sensitive
            kept = describe([layer.layer for layer in choice.kept], choice)
            label = f"target {target:.0%}, cap {cap:.0%}"
            print(row(label, kept, model, out, spec), flush=True)


if __name__ == "__main__":
    main(ARGS)
