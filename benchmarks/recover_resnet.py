"""Accuracy recovery (issue #6): decompose a pretrained CIFAR ResNet, recalibrate BN, fine-tune.

Every stage is a `run_compress` run (what `rankfold compress` does), replaying the first run's
plan.json so all stages hold the same blocks: "decomposed" (no training data), "recalibrated"
(`--train-data` train_lossless_5085.npz: BatchNorm recalibration on augmented batches) and
"finetuned" (the same plus `--finetune-epochs N`: the pipeline's distilled fine-tuning). Each
stage's model.pt is scored on cifar10/test_lossless_1017.npz (exact images; also the runs'
--eval-data, so report.json holds the per-epoch curve) and test_jpeg_10000.npz (JPEG copies of
the full test set, for deltas on many images).

The fine-tuned numbers are those of the LAST epoch's weights (the run's checkpoints/
finetune_last.pt): with --eval-data the pipeline keeps the best epoch on the test images, which
is optimistic (reported for reference only). The drop is paired (same 1,017 images): its
standard error is sqrt(b + c - (b - c)²/n) / n with b, c the images only one model gets right.

Quick variant (the default): ResNet-20, CP, 2× fewer MACs; `--epochs 0` stops after BN
recalibration. The goal run:
    flock /tmp/rankfold-bench.lock .venv/bin/python benchmarks/recover_resnet.py \\
        --model resnet56 --macs-reduction 3 --epochs 6
Single-threaded. Writes benchmarks/results/recover_<model>_<method>_<r>x.json and .png; the
runs' folders stay under --work.
"""

from __future__ import annotations

import os

# Before NumPy and torch load: one BLAS/OpenMP thread on the shared 2-core machine.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("resnet20", "resnet56"), default="resnet20")
    parser.add_argument("--method", choices=("cp", "cp-epc", "tucker2"), default="cp")
    parser.add_argument("--macs-reduction", type=float, default=2.0)
    parser.add_argument("--epochs", type=int, default=4, help="0: stop after BN recalibration")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="folder for the runs' outputs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.epochs < 0:
        parser.error("--epochs must be >= 0")
    return args


if __name__ == "__main__":
    ARGS = parse_args()  # before the heavy imports below: --help answers at once

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from rankfold.converter import build_config, restore, run_compress  # noqa: E402
from rankfold.converter.finetune import LAST_CHECKPOINT, plot_history  # noqa: E402
from rankfold.models import (  # noqa: E402
    SHARED_CHECKPOINTS,
    ArrayDataset,
    ModelSpec,
    batches,
    load_dataset,
    load_model,
    shared_file,
)
from rankfold.passes.core import atomic_write_json  # noqa: E402

MACHINE = "2-core x86-64 CPU, 24 GiB, no GPU"
GOAL_DROP_PT = 0.3
TRAIN = "cifar10/train_lossless_5085.npz"
TEST = "cifar10/test_lossless_1017.npz"


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="rankfold-recover-"))

    weights = shared_file(SHARED_CHECKPOINTS[args.model][0])
    original, spec = load_model(args.model, weights)
    test_sets = {
        "lossless_1017": load_dataset(shared_file(TEST), spec),
        "jpeg_10000": load_dataset(shared_file("cifar10/test_jpeg_10000.npz"), spec),
    }
    settings = {
        "model": args.model,
        "weights": str(weights),
        "ranks": {"method": args.method, "macs_reduction": args.macs_reduction},
        "eval_data": str(shared_file(TEST)),
        "latency": {"enabled": False},
        "seed": args.seed,
        "finetune": {"lr": args.lr, "batch_size": args.batch_size},
    }
    stages: dict[str, dict[str, Any]] = {"original": score(original, test_sets, spec)}
    reports, configs, seconds = {}, {}, {}
    runs = [("decomposed", False, 0), ("recalibrated", True, 0)]
    if args.epochs:
        runs.append(("finetuned", True, args.epochs))
    for stage, train, epochs in runs:
        config = build_config(
            {
                **settings,
                "plan": str(work / "decomposed" / "plan.json") if stage != "decomposed" else None,
                "train_data": str(shared_file(TRAIN)) if train else None,
                # The fine-tuning's settings are refused where nothing reads them.
                "finetune": {**settings["finetune"], "epochs": epochs} if epochs else {},
            }
        )
        configs[stage], start = config, time.perf_counter()
        run_compress(config, work / stage)
        seconds[stage] = time.perf_counter() - start
        reports[stage] = json.loads((work / stage / "report.json").read_text())
        model = restore(work / stage / "model.pt")
        if epochs:  # the last epoch's weights: no selection on test images
            last = torch.load(work / stage / "checkpoints" / LAST_CHECKPOINT, weights_only=True)
            model.load_state_dict(last["model"])
        stages[stage] = score(model, test_sets, spec)

    reference = stages["original"]["lossless_1017"]["predictions"]
    labels = test_sets["lossless_1017"].y
    for row in stages.values():
        lossless = row["lossless_1017"]
        lossless.update(paired_drop(reference, lossless["predictions"], labels))
        for scored in row.values():
            del scored["predictions"]
    final = runs[-1][0]
    report = reports[final]
    finetune = report["recovery"]["finetune"] or {"history": [], "best_epoch": None}
    history = finetune["history"]
    tag = f"{args.model}_{args.method}_{args.macs_reduction:g}x"
    layer_seconds = sum(row["seconds"] for row in reports["decomposed"]["layers"])
    summary = {
        "model": args.model,
        "method": args.method,
        "macs_reduction_target": args.macs_reduction,
        "macs": {
            "original": report["original"]["macs"],
            "compressed": report["compressed"]["macs"],
        },
        "params": {
            "original": report["original"]["params"],
            "compressed": report["compressed"]["params"],
        },
        "macs_reduction": report["macs_reduction"],
        "params_reduction": report["params_reduction"],
        "decomposed_layers": sum(row["status"] == "decomposed" for row in report["layers"]),
        "recalibration": report["recovery"]["recalibration"],
        "reports": {stage: r["compressed"] for stage, r in reports.items()},
        "finetune_config": configs[final].finetune.model_dump(),
        "stages": stages,
        "history": history,
        "best_epoch_on_test": finetune.get("best_epoch"),
        "seconds": {
            "decompose": layer_seconds,
            "runs": seconds,
            "finetune": sum(row["seconds"] for row in history),
            "finetune_per_epoch": [row["seconds"] for row in history],
            "total_run": time.perf_counter() - started,
        },
        "goal": {
            "max_drop_pt": GOAL_DROP_PT,
            "drop_pt": stages[final]["lossless_1017"]["drop_pt"],
            "met": stages[final]["lossless_1017"]["drop_pt"] <= GOAL_DROP_PT
            and report["macs_reduction"] >= args.macs_reduction - 1e-6,
        },
        "machine": MACHINE,
        "torch_threads": torch.get_num_threads(),
        "work": str(work),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / f"recover_{tag}.json", summary)
    if history:
        plot_history(
            history,
            args.out / f"recover_{tag}.png",
            f"{args.model}, {args.method} {summary['macs_reduction']:.2f}× fewer MACs: "
            "accuracy per epoch (lossless 1017)",
            reference={
                stage: stages[stage]["lossless_1017"]["accuracy"]
                for stage in ("original", "decomposed", "recalibrated")
            },
        )
    print(table(summary))


def predictions(model: nn.Module, data: ArrayDataset, spec: ModelSpec) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for x, _ in batches(data, spec, 500):
            out.append(model(x).argmax(1).numpy())
    return np.concatenate(out)


def score(
    model: nn.Module, test_sets: dict[str, ArrayDataset], spec: ModelSpec
) -> dict[str, dict[str, Any]]:
    row = {}
    for name, data in test_sets.items():
        start = time.perf_counter()
        predicted = predictions(model, data, spec)
        row[name] = {
            "accuracy": float((predicted == data.y).mean()),
            "eval_seconds": time.perf_counter() - start,
            "predictions": predicted,
        }
    return row


def paired_drop(reference: np.ndarray, predicted: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy drop vs the original on the same images, in points, with its standard error."""
    n = len(labels)
    only_reference = int(((reference == labels) & (predicted != labels)).sum())
    only_this = int(((reference != labels) & (predicted == labels)).sum())
    diff = only_reference - only_this
    return {
        "drop_pt": 100 * diff / n,
        "drop_se_pt": 100 * math.sqrt(max(only_reference + only_this - diff**2 / n, 0)) / n,
        "only_original_right": only_reference,
        "only_this_right": only_this,
    }


def table(summary: dict[str, Any]) -> str:
    stages = summary["stages"]
    lines = [
        f"{summary['model']}, {summary['method']}: MACs {summary['macs']['original'] / 1e6:.1f}M "
        f"→ {summary['macs']['compressed'] / 1e6:.1f}M ({summary['macs_reduction']:.2f}×), "
        f"params {summary['params']['original'] / 1e3:.0f}k → "
        f"{summary['params']['compressed'] / 1e3:.0f}k ({summary['params_reduction']:.2f}×), "
        f"{summary['decomposed_layers']} layers decomposed",
        "",
        "| stage | top-1 lossless 1017 | paired drop (pt) | top-1 JPEG 10000 | Δ JPEG (pt) |",
        "|---|---|---|---|---|",
    ]
    jpeg_reference = stages["original"]["jpeg_10000"]["accuracy"]
    for name, row in stages.items():
        lossless, jpeg = row["lossless_1017"], row["jpeg_10000"]
        drop = (
            "—"
            if name == "original"
            else f"{lossless['drop_pt']:+.2f} ± {lossless['drop_se_pt']:.2f}"
        )
        delta = "—" if name == "original" else f"{100 * (jpeg_reference - jpeg['accuracy']):+.2f}"
        lines.append(
            f"| {name} | {100 * lossless['accuracy']:.2f} % | {drop} | "
            f"{100 * jpeg['accuracy']:.2f} % | {delta} |"
        )
    seconds = summary["seconds"]
    per_epoch = ", ".join(f"{s:.0f}" for s in seconds["finetune_per_epoch"])
    lines += [
        "",
        "| epoch | loss | train acc (augmented) | lossless 1017 acc | lr at start | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for row in summary["history"]:
        lines.append(
            f"| {row['epoch']} | {row['loss']:.4f} | {100 * row['train_accuracy']:.2f} % | "
            f"{100 * row['eval_accuracy']:.2f} % | {row['lr']:.4f} | {row['seconds']:.0f} |"
        )
    runs = ", ".join(f"{stage} {s:.0f} s" for stage, s in seconds["runs"].items())
    lines += [
        "",
        f"wall time: decompose {seconds['decompose']:.0f} s; runs: {runs}; fine-tuning "
        f"{seconds['finetune']:.0f} s ({len(seconds['finetune_per_epoch'])} epochs: {per_epoch} s);"
        f" whole benchmark {seconds['total_run']:.0f} s",
        f"goal (drop ≤ {GOAL_DROP_PT} pt at ≥ {summary['macs_reduction_target']:g}× MACs): "
        f"{'met' if summary['goal']['met'] else 'NOT met'} "
        f"(drop {summary['goal']['drop_pt']:+.2f} pt)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main(ARGS)
