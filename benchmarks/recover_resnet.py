"""Accuracy recovery (issue #6): decompose a pretrained CIFAR ResNet, recalibrate BN, fine-tune.

Stages, each scored on cifar10/test_lossless_1017.npz (exact images) and test_jpeg_10000.npz
(JPEG copies of the full test set, for deltas on many images): the original model, right after
decomposition, after BatchNorm recalibration on train_lossless_5085.npz, and after fine-tuning on
that file with distillation from the original (`rankfold.converter.finetune`).

The fine-tuned numbers are those of the LAST epoch's weights: the run scores the lossless test
set every epoch for the curve, so its "best epoch" was picked on test images and is optimistic
(reported for reference only). The drop is paired (same 1,017 images): its standard error is
sqrt(b + c - (b - c)²/n) / n with b, c the images only one of the two models gets right.

Quick variant (the default): ResNet-20, CP, 2× fewer MACs. The goal run:
    flock /tmp/rankfold-bench.lock .venv/bin/python benchmarks/recover_resnet.py \\
        --model resnet56 --macs-reduction 3 --epochs 6
Single-threaded. Writes benchmarks/results/recover_<model>_<method>_<r>x.json and .png.
`--cache-dir` keeps the decomposed model (CP-ALS takes minutes) for reruns with other settings;
its JSON records the decomposition time measured when the cache was made.
"""

from __future__ import annotations

import os

# Before NumPy and torch load: one BLAS/OpenMP thread on the shared 2-core machine.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import fx, nn  # noqa: E402

from rankfold.converter.finetune import (  # noqa: E402
    LAST_CHECKPOINT,
    FinetuneConfig,
    finetune,
    plot_history,
)
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
from rankfold.passes import (  # noqa: E402
    Plan,
    RankPolicy,
    analyze,
    decompose,
    plan_cost,
    restructure,
    select_ranks,
    trace,
)
from rankfold.passes.core import atomic_path, atomic_write_json  # noqa: E402
from rankfold.passes.recalibrate import recalibrate_bn  # noqa: E402
from rankfold.runtime.backends import get_backend  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MACHINE = "2-core x86-64 CPU, 24 GiB, no GPU"
DATE = "2026-11-24"
GOAL_DROP_PT = 0.3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("resnet20", "resnet56"), default="resnet20")
    parser.add_argument("--method", choices=("cp", "cp-epc", "tucker2"), default="cp")
    parser.add_argument("--macs-reduction", type=float, default=2.0)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error("--epochs must be >= 1 (the benchmark measures recovery by fine-tuning)")
    torch.set_num_threads(1)
    started = time.perf_counter()

    weights_file, _ = SHARED_CHECKPOINTS[args.model]
    original, spec = load_model(args.model, shared_file(weights_file))
    train = load_dataset(shared_file("cifar10/train_lossless_5085.npz"), spec)
    test_sets = {
        "lossless_1017": load_dataset(shared_file("cifar10/test_lossless_1017.npz"), spec),
        "jpeg_10000": load_dataset(shared_file("cifar10/test_jpeg_10000.npz"), spec),
    }
    example = torch.zeros(1, *spec.input_shape)
    traced = trace(original, example)
    analysis = analyze(traced)
    compressed, plan, decompose_seconds = decomposed_model(traced, analysis, args)
    cost = plan_cost(analysis, plan)
    names = [entry.name for entry in plan.decomposed()]

    stages: dict[str, dict[str, Any]] = {}
    stages["original"] = score(traced, test_sets, spec)
    stages["decomposed"] = score(compressed, test_sets, spec)
    start = time.perf_counter()
    # With fine-tuning's crop + flip: the original BN statistics came from augmented images.
    recalibrate_bn(compressed, training_batches(train, spec, 256, seed=args.seed))
    recalibrate_seconds = time.perf_counter() - start
    stages["recalibrated"] = score(compressed, test_sets, spec)

    config = FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory(prefix="rankfold-recover-") as checkpoints:
        result = finetune(
            compressed,
            traced,
            train,
            spec,
            config,
            checkpoints,
            eval_data=test_sets["lossless_1017"],
            decomposed_names=names,
            seed=args.seed,
        )
        last = torch.load(Path(checkpoints) / LAST_CHECKPOINT, weights_only=True)["model"]
    compressed.load_state_dict(last)  # the last epoch's weights: no selection on test images
    stages["finetuned"] = score(compressed, test_sets, spec)

    reference = stages["original"]["lossless_1017"]["predictions"]
    labels = test_sets["lossless_1017"].y
    for row in stages.values():
        lossless = row["lossless_1017"]
        lossless.update(paired_drop(reference, lossless["predictions"], labels))
        for scored in row.values():
            del scored["predictions"]
    total_seconds = time.perf_counter() - started
    tag = f"{args.model}_{args.method}_{args.macs_reduction:g}x"
    summary = {
        "model": args.model,
        "method": args.method,
        "macs_reduction_target": args.macs_reduction,
        "macs": {"original": analysis.total_macs, "compressed": cost.macs},
        "params": {"original": analysis.total_params, "compressed": cost.params},
        "macs_reduction": analysis.total_macs / cost.macs,
        "params_reduction": analysis.total_params / cost.params,
        "decomposed_layers": len(names),
        "finetune_config": config.model_dump(),
        "stages": stages,
        "history": result.history,
        "best_epoch_on_test": result.best_epoch,
        "best_accuracy_on_test": result.best_accuracy,
        "seconds": {
            "decompose": decompose_seconds,
            "recalibrate": recalibrate_seconds,
            "finetune": sum(row["seconds"] for row in result.history),
            "finetune_per_epoch": [row["seconds"] for row in result.history],
            "total_run": total_seconds,
        },
        "goal": {
            "max_drop_pt": GOAL_DROP_PT,
            "drop_pt": stages["finetuned"]["lossless_1017"]["drop_pt"],
            "met": stages["finetuned"]["lossless_1017"]["drop_pt"] <= GOAL_DROP_PT
            and analysis.total_macs / cost.macs >= args.macs_reduction - 1e-6,
        },
        "machine": MACHINE,
        "torch_threads": torch.get_num_threads(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / f"recover_{tag}.json", summary)
    plot_history(
        result.history,
        args.out / f"recover_{tag}.png",
        f"{args.model}, {args.method} {summary['macs_reduction']:.2f}× fewer MACs: "
        "accuracy per epoch (lossless 1017)",
        reference={
            stage: stages[stage]["lossless_1017"]["accuracy"]
            for stage in ("original", "decomposed", "recalibrated")
        },
    )
    print(table(summary))


def decomposed_model(
    traced: fx.GraphModule, analysis, args: argparse.Namespace
) -> tuple[fx.GraphModule, Plan, float]:
    """Plan and decompose (or reload the same from the cache); returns the decomposition time."""
    policy = RankPolicy(
        method=args.method,
        macs_reduction=args.macs_reduction,
        round_to=get_backend("cpu").channel_block(),  # as the CLI's round_to "auto"
    )
    plan = select_ranks(analysis, policy, model_name=args.model)
    cache = None
    if args.cache_dir is not None:
        cache = args.cache_dir / f"{args.model}_{args.method}_{args.macs_reduction:g}x_s0.pt"
        if cache.is_file():
            payload = torch.load(cache, weights_only=True)
            if payload["plan"] == plan.model_dump():
                rebuilt = restructure(traced, analysis, plan)
                rebuilt.load_state_dict(payload["state_dict"])
                return rebuilt.eval(), plan, payload["seconds"]
    start = time.perf_counter()
    compressed, _ = decompose(traced, analysis, plan, seed=0)
    seconds = time.perf_counter() - start
    if cache is not None:
        payload = {
            "plan": plan.model_dump(),
            "state_dict": compressed.state_dict(),
            "seconds": seconds,
        }
        with atomic_path(cache) as tmp:
            torch.save(payload, tmp)
    return compressed.eval(), plan, seconds


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
    lines += [
        "",
        f"wall time: decompose {seconds['decompose']:.0f} s, BN recalibration "
        f"{seconds['recalibrate']:.1f} s, fine-tuning {seconds['finetune']:.0f} s "
        f"({len(seconds['finetune_per_epoch'])} epochs: {per_epoch} s), whole run "
        f"{seconds['total_run']:.0f} s",
        f"goal (drop ≤ {GOAL_DROP_PT} pt at ≥ {summary['macs_reduction_target']:g}× MACs): "
        f"{'met' if summary['goal']['met'] else 'NOT met'} "
        f"(drop {summary['goal']['drop_pt']:+.2f} pt)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
