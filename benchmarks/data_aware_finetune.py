"""Low rank with the refit, fine-tuned, against structured pruning at the same MACs (issue #20).

    .venv/bin/python benchmarks/data_aware_finetune.py [--model resnet56]
        [--methods cp-epc,cp,tucker2] [--reduction 4] [--epochs 6]
        [--arms refit,weight_only] [--select S] [--pruning global|local|none]
        [--mixup A] [--lr X] [--validation S]

Each low-rank cell is one `rankfold compress` (a subprocess) on ResNet-56 (`--model resnet20`:
ResNet-20) with its real weights, `--train-data cifar10/train_lossless_5085.npz --eval-data
cifar10/test_lossless_1017.npz --finetune-epochs E`, everything else at its default; the arms
differ by one option:

- `refit` (the default with training data): weight-only fit, the refit (last stage by least
  squares, then all stages by Adam steps, then for tucker2 and tucker2-cp each segment's
  blocks together), BatchNorm recalibration kept only where it brings the model closer to the
  original, then fine-tuning;
- `last_stage`: `--refit-steps 0`, the refit of the last stage alone (the default before the
  refinement existed);
- `segments`: `--refit-segment-steps 200`, the refit followed by each segment's blocks refined
  together on the segment's output (for every method);
- `no_segments`: `--refit-segment-steps 0`, the refit without segments (Tucker-2's default
  before they were on for it);
- `weight_only`: `--no-refit` (fit, BatchNorm recalibration, fine-tuning), the pipeline before
  issue #20.

Top-1 after each stage comes from the run's report.json; the final model.pt is then scored on the
1,017 lossless test images (paired against the original on the same images, ± standard error)
and on the 10,000 JPEG test images.

The pruning arm is Torch-Pruning's documented CIFAR recipe (group-norm importance, global
pruning, GroupNormPruner stepping until the MAC target is reached; `--pruning local` prunes every
layer by the same share instead, `--methods none` runs the pruning arm alone), run through its
public API, with rankfold's fine-tuning (the same epochs, data, distillation and defaults as the
low-rank arms; `--mixup A`, `--lr X` and `--validation S` change them for every arm, pruning
too). The option-A
shortcut of these ResNets is a fixed channel-padding map, so the residual stream's channels are
coupled across each stage through it; only each block's inner channels (conv1's outputs) are
pruned, as in L1-norm filter pruning on these networks. MACs of every arm are counted by
rankfold's `analyze` on the traced model.

Finally the original, every compressed model.onnx and the pruned model are timed side by side on
onnxruntime's CPU provider at batch 1 and 8 (`time_side_by_side`). A run directory that already
holds a report.json is reused, so an interrupted benchmark resumes. Needs the `bench` extra
(torch-pruning). Writes benchmarks/results/data_aware_finetune.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# The same data, weights and paired difference (± standard error) as the selector comparison.
from output_selector import RESULTS, TESTS, TRAIN, WEIGHTS, paired

ARMS = {
    "refit": [],
    "last_stage": ["--refit-steps", "0"],
    "segments": ["--refit-segment-steps", "200"],
    "no_segments": ["--refit-segment-steps", "0"],
    "weight_only": ["--no-refit"],
}
BATCHES = (1, 8)
PRUNING_STEPS = 400  # Torch-Pruning's iterative steps; each removes about 1/400 of the channels


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(WEIGHTS), default="resnet56")
    parser.add_argument("--methods", default="cp-epc,cp,tucker2")
    parser.add_argument("--reduction", type=float, default=4.0)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--arms", default="refit,weight_only")
    parser.add_argument(
        "--select", default="default", help="rank selector of every arm (default: the method's)"
    )
    parser.add_argument("--pruning", choices=("global", "local", "none"), default="global")
    parser.add_argument(
        "--mixup",
        type=float,
        default=0.0,
        help="fine-tune every arm with `--mixup A` (0: the default fine-tuning, no mixup)",
    )
    parser.add_argument(
        "--lr", type=float, default=None, help="fine-tuning rate of every arm (default: rankfold's)"
    )
    parser.add_argument(
        "--validation",
        type=float,
        default=0.0,
        help="every arm keeps the epoch (0: the model before fine-tuning) best on this share of "
        "the training images, held out (0: the last epoch)",
    )
    parser.add_argument("--latency-repeats", type=int, default=50)
    parser.add_argument("--data", type=Path, default=None, help="RANKFOLD_DATA folder")
    parser.add_argument("--work", type=Path, default=Path("/tmp/rankfold-data-aware-finetune"))
    parser.add_argument("--out", type=Path, default=RESULTS / "data_aware_finetune.json")
    parser.add_argument(
        "--summarize",
        nargs="+",
        type=Path,
        metavar="RESULTS",
        help="print one table of these results files (any models and reductions) and exit",
    )
    args = parser.parse_args()
    unknown = set(args.arms.split(",")) - set(ARMS)
    if unknown:
        parser.error(f"unknown arm(s) {sorted(unknown)}; choose from {sorted(ARMS)}")
    needs_pruning = args.pruning != "none" and not args.summarize
    if needs_pruning and importlib.util.find_spec("torch_pruning") is None:
        parser.error(
            "the pruning arm needs Torch-Pruning: pip install -e '.[bench]', or pass --pruning none"
        )
    return args


def compress(args, base: Path, method: str, arm: str, out: Path) -> tuple[dict, float, list]:
    rankfold = Path(sys.executable).with_name("rankfold")
    command = [
        str(rankfold), "compress", args.model, "--weights", str(base / WEIGHTS[args.model]),
        "--method", method, "--macs-reduction", f"{args.reduction:g}",
        "--train-data", str(base / TRAIN), "--eval-data", str(base / TESTS["lossless_1017"]),
        "--finetune-epochs", str(args.epochs), "--no-latency",
        *(["--select", args.select] if args.select != "default" else []),
        "--search-cache-dir", str(args.work / "cache"), "--out", str(out), *ARMS[arm],
        *(part for name, value in finetune_changes(args) for part in (f"--{name}", f"{value:g}")),
    ]  # fmt: skip
    if (out / "report.json").is_file():
        print(f"reusing {out}", flush=True)
        return json.loads((out / "report.json").read_text()), float("nan"), command
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return json.loads((out / "report.json").read_text()), time.perf_counter() - start, command


def prune(original, example, target: float, macs_of, scope: str):
    """Torch-Pruning's group-norm pruning (`scope`: global or local) of the blocks' inner
    channels, stepped until rankfold's MAC count falls by `target`; returns the pruned copy and
    its MAC reduction."""
    import torch_pruning as tp
    from torch import nn

    model = copy.deepcopy(original)
    ignored = [  # the residual stream (stem, each block's conv2) and the classifier stay whole
        module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) or name == "conv1" or name.endswith(".conv2")
    ]
    pruner = tp.pruner.GroupNormPruner(
        model,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        iterative_steps=PRUNING_STEPS,
        pruning_ratio=1.0,
        max_pruning_ratio=0.95,
        global_pruning=scope == "global",
        ignored_layers=ignored,
    )
    base = macs_of(original)
    reduction = 1.0
    for _ in range(PRUNING_STEPS):
        pruner.step()
        reduction = base / macs_of(model)
        if reduction >= target:
            break
    return model, reduction


def main() -> None:
    args = parse_args()
    if args.summarize:
        print(summary_table(args.summarize))
        return
    import numpy as np
    import torch

    from rankfold.converter import restore
    from rankfold.converter.finetune import finetune, finetune_config
    from rankfold.models import batches, data_dir, load_dataset, load_model
    from rankfold.passes import analyze, trace
    from rankfold.runtime import export_onnx, time_side_by_side

    base = (args.data or data_dir()).resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    original, spec = load_model(args.model, base / WEIGHTS[args.model])
    example = torch.zeros(1, *spec.input_shape)
    tests = {name: load_dataset(base / rel, spec) for name, rel in TESTS.items()}

    def predict(model) -> dict[str, Any]:
        """Logits on each test set, in float64."""
        model.eval()
        with torch.no_grad():
            return {
                name: torch.cat([model(x) for x, _ in batches(data, spec, 500)]).double()
                for name, data in tests.items()
            }

    labels = {
        name: np.concatenate([np.asarray(y) for _, y in batches(data, spec, 500)])
        for name, data in tests.items()
    }
    reference = predict(original)
    reference_top = {n: reference[n].argmax(1).numpy() for n in tests}
    expected = {n: torch.log_softmax(reference[n], 1) for n in tests}

    def scores(logits: dict[str, Any]) -> dict[str, Any]:
        top = {n: logits[n].argmax(1).numpy() for n in tests}
        return {
            "final": {n: float((top[n] == labels[n]).mean()) for n in tests},
            "vs_original": {n: paired(top[n], reference_top[n], labels[n]) for n in tests},
            # Mean KL divergence of the original's predictions from the model's: a finer
            # distance than top-1, which resolves 0.1 pt on 1,017 images.
            "divergence": {
                n: float(
                    torch.nn.functional.kl_div(
                        torch.log_softmax(logits[n], 1),
                        expected[n],
                        log_target=True,
                        reduction="batchmean",
                    )
                )
                for n in tests
            },
        }

    def macs_of(model) -> float:
        return analyze(trace(model, example)).total_macs

    rows: list[dict[str, Any]] = []
    onnx_files: dict[str, Path] = {}
    latency: dict[str, dict[str, float]] = {}

    def save() -> None:  # after every row: a run cut short keeps what it measured
        summary = {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "settings": {k: str(v) for k, v in vars(args).items()},
            "original": {n: float((reference_top[n] == labels[n]).mean()) for n in tests},
            "original_latency_ms": latency.get("original"),
            "rows": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2))

    methods = [] if args.methods == "none" else args.methods.split(",")
    runs = [(m, arm) for arm in args.arms.split(",") for m in methods]
    for method, arm in runs:
        mixed = "".join(f"-{name}{value:g}" for name, value in finetune_changes(args))
        label = arm + finetune_label(args)
        out = args.work / f"{args.model}-{method}-{args.reduction:g}-{arm}-{args.select}{mixed}"
        report, seconds, command = compress(args, base, method, arm, out)
        onnx_files.setdefault("original", out / "original.onnx")
        onnx_files[f"{method} {label}"] = out / "model.onnx"
        acc = report["compressed"]
        rows.append(
            {
                "arm": label,
                "method": method,
                "select": args.select,
                "macs_reduction": report["macs_reduction"],
                "stages": {
                    stage: acc.get(f"accuracy_{stage}")
                    for stage in ("decomposed", "refitted", "recalibrated", "finetuned")
                },
                "recalibration_kept": (report["recovery"].get("recalibration_check") or {}).get(
                    "kept"
                ),
                **scores(predict(restore(out / "model.pt"))),
                "seconds": seconds,
                "command": " ".join(command),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        save()

    if not runs:
        onnx_files["original"] = export_onnx(
            original, example, args.work / f"{args.model}-original.onnx"
        )
    if args.pruning != "none":
        start = time.perf_counter()
        pruned, reduction = prune(original, example, args.reduction, macs_of, args.pruning)
        pruned_scores = scores(predict(pruned))
        train = load_dataset(base / TRAIN, spec)
        with tempfile.TemporaryDirectory() as checkpoints:
            history = finetune(
                pruned,
                original,
                train,
                spec,
                finetune_config({"epochs": args.epochs} | dict(finetune_changes(args))),
                checkpoints,
                eval_data=tests["lossless_1017"],
            )
        onnx_files["pruned"] = export_onnx(pruned, example, args.work / f"{args.model}-pruned.onnx")
        rows.append(
            {
                "arm": "pruning" + finetune_label(args),
                "method": f"torch-pruning group-norm, {args.pruning} (inner channels)",
                "macs_reduction": reduction,
                "stages": {"pruned": pruned_scores["final"]["lossless_1017"]}
                | {"finetuned": history.final_accuracy},
                **scores(predict(pruned)),
                "seconds": time.perf_counter() - start,
                "command": "torch_pruning.pruner.GroupNormPruner + rankfold finetune",
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        save()

    timings = time_side_by_side(
        list(onnx_files.values()), spec.input_shape, BATCHES, repeats=args.latency_repeats
    )
    for i, name in enumerate(onnx_files):
        latency[name] = {str(t.batch): t.median_ms(i) for t in timings}
    for row in rows:
        key = "pruned" if row["arm"].startswith("pruning") else f"{row['method']} {row['arm']}"
        row["latency_ms"] = latency[key]
    save()
    print(table(rows, latency["original"]))


def finetune_changes(args: argparse.Namespace) -> list[tuple[str, float]]:
    """The fine-tuning settings given that differ from rankfold's defaults, by option name."""
    given = (("mixup", args.mixup), ("lr", args.lr), ("validation", args.validation))
    return [(name, value) for name, value in given if value]


def finetune_label(args: argparse.Namespace) -> str:
    """What the arms' fine-tuning changes from rankfold's defaults, e.g. " + mixup 1, lr 0.003"."""
    changes = [f"{name} {value:g}" for name, value in finetune_changes(args)]
    return f" + {', '.join(changes)}" if changes else ""


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f} %"


HEADER = (
    "| arm | method | MACs × | decomposed / pruned | refitted | recalibrated | fine-tuned "
    "| drop, lossless 1,017 (paired) | JPEG 10k | drop, JPEG 10k | KL lossless / JPEG "
    "| batch 1 speed-up | batch 8 speed-up |"
)


def row_cells(r: dict[str, Any], original_ms: dict[str, float] | None) -> str:
    s, d1, d2 = r["stages"], r["vs_original"]["lossless_1017"], r["vs_original"]["jpeg_10000"]
    speed = [
        "–" if original_ms is None else f"{original_ms[str(b)] / r['latency_ms'][str(b)]:.2f}×"
        for b in BATCHES
    ]
    return (
        f"{r['arm']} | {r['method']} | {r['macs_reduction']:.2f} | "
        f"{pct(s.get('decomposed', s.get('pruned')))} | {pct(s.get('refitted'))} | "
        f"{pct(s.get('recalibrated'))} | {pct(s.get('finetuned'))} | "
        f"{0.0 - d1['delta_pt']:.2f} ± {d1['se_pt']:.2f} pt | "
        f"{pct(r['final']['jpeg_10000'])} | {0.0 - d2['delta_pt']:.2f} ± {d2['se_pt']:.2f} pt | "
        f"{divergence(r)} | {speed[0]} | {speed[1]} |"
    )


def divergence(r: dict[str, Any]) -> str:
    """Mean KL divergence from the original on both test sets (rows measured before the
    script recorded it show a dash)."""
    kl = r.get("divergence")
    return "–" if kl is None else f"{kl['lossless_1017']:.3f} / {kl['jpeg_10000']:.3f}"


def table(rows: list[dict[str, Any]], original_ms: dict[str, float]) -> str:
    lines = [HEADER, "|---" * 13 + "|"]
    lines += [f"| {row_cells(r, original_ms)}" for r in rows]
    return "\n".join(lines)


def summary_table(files: list[Path]) -> str:
    """One table of several runs: model and target first, then each run's rows. Files written
    before the script recorded the original's latency show no speed-ups."""
    lines = ["| model | target " + HEADER, "|---" * 15 + "|"]
    for file in files:
        result = json.loads(file.read_text())
        # Results written before `--model` existed are ResNet-56's, the only model then.
        model = result["settings"].get("model", "resnet56")
        target = float(result["settings"]["reduction"])
        lines += [
            f"| {model} | {target:g}× | {row_cells(r, result.get('original_latency_ms'))}"
            for r in result["rows"]
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
