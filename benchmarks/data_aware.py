"""Data-aware decomposition (issue #20): weight-only vs data-aware fits, side by side.

For each model, method and MAC reduction, three `compress` runs (the public Python API, what
`rankfold compress` runs) with the same training data:

- `weight_only`: the weight-only fit, nothing else (`--no-refit`);
- `refit`: the same fit, then the sequential correction (each block's last stage refitted in
  graph order to the original layer's outputs on the first --stats-samples training images,
  fed the compressed network's activations): the default with training data;
- `data_aware`: the whitened fit of `--data-aware` (each layer fitted to its output in the metric
  of its input second moment on the same images), then the same refit.

All arms plan the same ranks (`uniform` selection, which reads neither the data nor the weights), so
they differ by the fit alone. Each model is scored on cifar10/test_lossless_1017.npz as
`compress` returns it (decomposed, and refitted where the arm refits) and after BatchNorm
recalibration (`recalibrate_bn` on the augmented training batches, as the pipeline does);
accuracies are paired on the same images, with standard errors of the paired differences
against the weight-only arm. No fine-tuning.

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

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,resnet56")
    parser.add_argument("--methods", default="cp,tucker2")
    parser.add_argument("--reductions", default="2,3")
    parser.add_argument("--stats-samples", type=int, default=512)
    parser.add_argument("--train-limit", type=int, default=2048)
    parser.add_argument("--cache", type=Path, default=None, help="decomposition cache folder")
    parser.add_argument("--out", type=Path, default=RESULTS / "data_aware.json")
    return parser.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()  # before the heavy imports below: --help answers at once

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from rankfold.converter import build_config, compress  # noqa: E402
from rankfold.models import (  # noqa: E402
    SHARED_CHECKPOINTS,
    ArrayDataset,
    ModelSpec,
    batches,
    load_dataset,
    load_model,
    shared_file,
    training_batches,
)
from rankfold.passes import plan_cost  # noqa: E402
from rankfold.passes.core import atomic_write_json  # noqa: E402
from rankfold.passes.recalibrate import recalibrate_bn  # noqa: E402

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


ARMS = {  # name → (data-aware fit, refit)
    "weight_only": (False, False),
    "refit": (False, True),
    "data_aware": (True, True),
}


def run(args, model_name: str, method: str, reduction: float, arm: str, cache: Path):
    weights = shared_file(SHARED_CHECKPOINTS[model_name][0])
    model, spec = load_model(model_name, weights)
    aware, refits = ARMS[arm]
    settings: dict[str, Any] = {
        "model": model_name,
        "weights": str(weights),
        "ranks": {"method": method, "macs_reduction": reduction, "select": "uniform"},
        "train_data": str(shared_file(TRAIN)),
        "train_limit": args.train_limit,
        "recalibrate": False,  # recalibrated below, after the decomposed model is scored
        "refit": refits,
        "latency": {"enabled": False},
        "search": {"cache_dir": str(cache)},
        "statistics": {"data_aware": aware, "samples": args.stats_samples}
        if aware or refits
        else {},
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
    refitted = [row.extras for row in layers if "refit_error_after" in row.extras]
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
            "mean_refit_error": [
                float(np.mean([extras[key] for extras in refitted]))
                for key in ("refit_error_before", "refit_error_after")
            ]
            if refitted
            else None,
        },
        decomposed,
        recalibrated,
    )


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    cache = args.cache or Path(tempfile.mkdtemp(prefix="rankfold-data-aware-"))
    rows = []
    started = time.perf_counter()
    for model_name in args.models.split(","):
        model, spec = load_model(model_name, shared_file(SHARED_CHECKPOINTS[model_name][0]))
        original = correct(model, load_dataset(shared_file(TEST), spec), spec)
        for method in args.methods.split(","):
            for reduction in (float(r) for r in args.reductions.split(",")):
                arms = {arm: run(args, model_name, method, reduction, arm, cache) for arm in ARMS}
                plain, plain_dec, plain_rec = arms["weight_only"]
                assert all(a[0]["ranks"] == plain["ranks"] for a in arms.values()), "same ranks"
                row = {
                    "model": model_name,
                    "method": method,
                    "macs_reduction_target": reduction,
                    "macs_reduction": plain["macs_reduction"],
                    "original": 100 * original.mean(),
                    "mean_weight_only_output_error": arms["data_aware"][0][
                        "mean_weight_only_output_error"
                    ],
                }
                for arm, (info, dec, rec) in arms.items():
                    row[arm] = {
                        "decomposed": 100 * dec.mean(),
                        "recalibrated": 100 * rec.mean(),
                        "drop_decomposed": paired(original, dec),
                        "drop_recalibrated": paired(original, rec),
                        "gain_decomposed": paired(dec, plain_dec),
                        "gain_recalibrated": paired(rec, plain_rec),
                        "seconds": info["seconds"],
                        "statistics_seconds": info["statistics_seconds"],
                        "mean_output_error": info["mean_output_error"],
                        "mean_refit_error": info["mean_refit_error"],
                    }
                rows.append(row)
                print(
                    f"{model_name} {method} {reduction:g}x "
                    + ", ".join(
                        f"{arm}: {row[arm]['decomposed']:.2f} → {row[arm]['recalibrated']:.2f}"
                        for arm in ARMS
                    )
                    + " (as returned → recalibrated)",
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
    main(ARGS)
