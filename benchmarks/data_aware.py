"""Data-aware decomposition (issue #20): weight-only vs data-aware fits, side by side.

For each model, method and MAC reduction, two `compress` runs (the public Python API, what
`rankfold compress` runs) with the same training data: the default weight-only fit, and the
data-aware fit of `--data-aware` (each layer fitted to its output on the first --stats-samples
training images).
Both arms plan the same ranks (uniform selection under the budget does not read the data), so
they differ by the fit alone. Each decomposed model is scored on cifar10/test_lossless_1017.npz
straight after decomposition and after BatchNorm recalibration (`recalibrate_bn` on the
augmented training batches, as the pipeline does); accuracies are paired on the same images,
with standard errors of the paired differences. No fine-tuning.

Reduced to fit about 10 minutes of CPU on the shared 2-core VM (the defaults): statistics on
512 images, BatchNorm recalibrated on the first 2,048 training images (the pipeline uses all
5,085), cp and tucker2 only (no cp-epc, tucker2-cp, cp-lrf, 4×, JPEG set, fine-tuning or
pruning arm). Writes benchmarks/results/data_aware.json.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rankfold.converter import build_config, compress
from rankfold.models import (
    SHARED_CHECKPOINTS,
    ArrayDataset,
    ModelSpec,
    batches,
    load_dataset,
    load_model,
    shared_file,
    training_batches,
)
from rankfold.passes import plan_cost
from rankfold.passes.core import atomic_write_json
from rankfold.passes.recalibrate import recalibrate_bn

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
TRAIN = "cifar10/train_lossless_5085.npz"
TEST = "cifar10/test_lossless_1017.npz"


def correct(model: nn.Module, data: ArrayDataset, spec: ModelSpec) -> np.ndarray:
    """Per image: 1 where the model's top-1 class is the label."""
    model.eval()
    hits = []
    with torch.no_grad():
        for x, y in batches(data, spec, 256):
            hits.append((model(x).argmax(1) == y).numpy())
    return np.concatenate(hits).astype(np.float64)


def paired(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Mean of a − b in points, and its standard error (same images)."""
    d = 100.0 * (a - b)
    return {"diff": float(d.mean()), "se": float(d.std(ddof=1) / math.sqrt(len(d)))}


def run(args, model_name: str, method: str, reduction: float, weight_only: bool, cache: Path):
    weights = shared_file(SHARED_CHECKPOINTS[model_name][0])
    model, spec = load_model(model_name, weights)
    settings: dict[str, Any] = {
        "model": model_name,
        "weights": str(weights),
        "ranks": {"method": method, "macs_reduction": reduction},
        "train_data": str(shared_file(TRAIN)),
        "train_limit": args.train_limit,
        "recalibrate": False,  # recalibrated below, after the decomposed model is scored
        "latency": {"enabled": False},
        "search": {"cache_dir": str(cache)},
        "statistics": {} if weight_only else {"data_aware": True, "samples": args.stats_samples},
    }
    start = time.perf_counter()
    result = compress(model, torch.zeros(1, *spec.input_shape), build_config(settings), spec)
    seconds = time.perf_counter() - start
    test = load_dataset(shared_file(TEST), spec)
    decomposed = correct(result.compressed, test, spec)
    train = load_dataset(shared_file(TRAIN), spec, limit=args.train_limit)
    recalibrate_bn(result.compressed, training_batches(train, spec, 256, "auto", 0))
    recalibrated = correct(result.compressed, test, spec)
    layers = [row for row in result.decomposition.layers if row.status == "decomposed"]
    output_errors = [row.output_error for row in layers if row.output_error is not None]
    baseline_errors = [
        row.weight_only_output_error for row in layers if row.weight_only_output_error is not None
    ]
    return (
        {
            "macs_reduction": result.analysis.total_macs
            / plan_cost(result.analysis, result.plan).macs,
            "seconds": seconds,
            "statistics_seconds": None if result.statistics is None else result.statistics.seconds,
            "mean_output_error": float(np.mean(output_errors)) if output_errors else None,
            "mean_weight_only_output_error": float(np.mean(baseline_errors))
            if baseline_errors
            else None,
            "ranks": {row.name: row.rank for row in layers},
        },
        decomposed,
        recalibrated,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,resnet56")
    parser.add_argument("--methods", default="cp,tucker2")
    parser.add_argument("--reductions", default="2,3")
    parser.add_argument("--stats-samples", type=int, default=512)
    parser.add_argument("--train-limit", type=int, default=2048)
    parser.add_argument("--cache", type=Path, default=None, help="decomposition cache folder")
    parser.add_argument("--out", type=Path, default=RESULTS / "data_aware.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cache = args.cache or Path(tempfile.mkdtemp(prefix="rankfold-data-aware-"))
    rows = []
    started = time.perf_counter()
    for model_name in args.models.split(","):
        model, spec = load_model(model_name, shared_file(SHARED_CHECKPOINTS[model_name][0]))
        original = correct(model, load_dataset(shared_file(TEST), spec), spec)
        for method in args.methods.split(","):
            for reduction in (float(r) for r in args.reductions.split(",")):
                arms = {}
                for weight_only in (True, False):
                    arms[weight_only] = run(args, model_name, method, reduction, weight_only, cache)
                (plain, plain_dec, plain_rec), (aware, aware_dec, aware_rec) = (
                    arms[True],
                    arms[False],
                )
                assert plain["ranks"] == aware["ranks"], "the arms must plan the same ranks"
                row = {
                    "model": model_name,
                    "method": method,
                    "macs_reduction_target": reduction,
                    "macs_reduction": aware["macs_reduction"],
                    "original": 100 * original.mean(),
                    "weight_only": {
                        "decomposed": 100 * plain_dec.mean(),
                        "recalibrated": 100 * plain_rec.mean(),
                        "drop_decomposed": paired(original, plain_dec),
                        "drop_recalibrated": paired(original, plain_rec),
                        "seconds": plain["seconds"],
                        "mean_output_error": aware["mean_weight_only_output_error"],
                    },
                    "data_aware": {
                        "decomposed": 100 * aware_dec.mean(),
                        "recalibrated": 100 * aware_rec.mean(),
                        "drop_decomposed": paired(original, aware_dec),
                        "drop_recalibrated": paired(original, aware_rec),
                        "seconds": aware["seconds"],
                        "statistics_seconds": aware["statistics_seconds"],
                        "mean_output_error": aware["mean_output_error"],
                    },
                    "gain_decomposed": paired(aware_dec, plain_dec),
                    "gain_recalibrated": paired(aware_rec, plain_rec),
                }
                rows.append(row)
                w, a = row["weight_only"], row["data_aware"]
                print(
                    f"{model_name} {method} {reduction:g}x: decomposed {w['decomposed']:.2f} → "
                    f"{a['decomposed']:.2f}, recalibrated {w['recalibrated']:.2f} → "
                    f"{a['recalibrated']:.2f} (weight-only → data-aware)",
                    flush=True,
                )
                # Written after every row: a run cut short keeps what it measured.
                atomic_write_json(
                    args.out,
                    {
                        "settings": {k: str(v) for k, v in vars(args).items()}
                        | {"cache": str(cache)},
                        "seconds": time.perf_counter() - started,
                        "rows": rows,
                    },
                )


if __name__ == "__main__":
    main()
