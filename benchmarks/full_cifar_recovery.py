"""Full-CIFAR recovery (issue #15): ResNet-20 CP-EPC at 3× fewer MACs, fine-tuned on the 50k JPEGs.

    TTY_COMPATIBLE=1 TTY_INTERACTIVE=1 flock -s /tmp/rankfold-quiet.lock \\
        .venv/bin/python benchmarks/full_cifar_recovery.py --epochs 3 [--train-limit N]

Every model comes from `rankfold compress` (a subprocess; under torchrun with --processes 2,
gloo, one torch thread per process):

1. "plan": resnet20 with its real weights, --method cp-epc --macs-reduction 3 --no-latency, no
   training data: the plan.json the next runs replay (it also fills the decomposition cache, so
   the processes of the next run read the blocks instead of factorizing them twice).
2. "compressed": --plan replayed, --train-data the CIFAR-10 JPEG ImageFolder (all 50,000 images,
   or the first --train-limit, class-balanced by the folder's round-robin order): last-stage
   refit, BatchNorm recalibration, then --finetune-epochs E of the pipeline's distilled
   fine-tuning (teacher: the original).
3. "control": the same command with a plan that keeps every layer whole, so refit and
   recalibration have nothing to do and the ORIGINAL is fine-tuned with the same recipe, data,
   epochs and seed, distilled from itself: what the JPEG training images alone give.

Each run's --eval-data is test_lossless_1017.npz (the per-epoch curve in its report.json); no
--validation, so model.pt holds the last epoch's weights and nothing is chosen on test images.
This script then scores the original and both model.pt files on test_lossless_1017.npz and on the
10k JPEG test folder (cifar10/jpeg/test). Every delta is paired (same images): its standard error
is sqrt(b + c - (b - c)²/n) / n, b and c the images only one of the two models gets right.

Writes benchmarks/results/full_cifar_recovery.json and prints a Markdown table. The runs' output
folders (report.json, logs of the CLI on stderr) stay under --work; with --reuse a stage whose
folder already holds the result of the same command is not run again.
Set TTY_COMPATIBLE=1 TTY_INTERACTIVE=1 to keep the CLI's live progress (images/s, ETA) in a log.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MACHINE = "2-core x86-64 VM, AVX-512, no GPU"
WEIGHTS = "weights/resnet20-12fca82f.th"
TRAIN = "cifar10/jpeg/train"
TEST_LOSSLESS = "cifar10/test_lossless_1017.npz"
TEST_JPEG = "cifar10/jpeg/test"
TEST_SETS = {"lossless_1017": TEST_LOSSLESS, "jpeg_10000": TEST_JPEG}
CONTROL_REASON = "kept whole: the self-distilled control of full_cifar_recovery.py"


def log(message: str) -> None:
    stamp = datetime.now(timezone.utc).strftime("%H:%M:%S")
    print(f"[{stamp} UTC] {message}", file=sys.stderr, flush=True)


def rankfold_command(processes: int) -> list[str]:
    """`rankfold`, or torchrun starting one `rankfold` per process."""
    exe = Path(sys.executable).with_name("rankfold")
    if not exe.is_file():
        sys.exit(f"no rankfold command beside {sys.executable}; pip install -e . first")
    if processes == 1:
        return [str(exe)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*launcher, f"--nproc_per_node={processes}", "--no-python", str(exe)]


# Runs a command and prints the largest peak RSS (KiB on Linux) among its descendants: each stage
# gets its own wrapper, so RUSAGE_CHILDREN covers that stage's processes only (torchrun's ranks
# are reaped by torchrun, whose own children's peak is folded into the wrapper's).
PEAK_RSS_WRAPPER = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[2:]).returncode; "
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
    "sys.exit(code)"
)


def run_stage(
    name: str, command: list[str], out: Path, threads: int, reuse: bool
) -> dict[str, Any]:
    """Run one `rankfold compress` into `out`; its report.json, wall seconds and peak RSS."""
    record = out / "benchmark_command.json"
    if reuse and record.is_file() and (out / "report.json").is_file():
        saved = json.loads(record.read_text())
        if saved["command"] == command:
            log(f"{name}: reusing {out} (same command)")
            return {"report": json.loads((out / "report.json").read_text()), **saved}
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = str(threads)
    log(f"{name}: {' '.join(command)}")
    peak_file = out.with_name(f"{out.name}.peak_rss_kib")
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_WRAPPER, str(peak_file), *command], env=env, cwd=REPO
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{name}: rankfold compress exited with {done.returncode} (see the log above)")
    log(f"{name}: done in {seconds:.0f} s")
    peak_mib = int(peak_file.read_text()) / 1024
    log(f"{name}: largest peak RSS of one process {peak_mib:.0f} MiB")
    saved = {"command": command, "seconds": seconds, "peak_rss_mib": peak_mib}
    record.write_text(json.dumps(saved, indent=2))
    return {"report": json.loads((out / "report.json").read_text()), **saved}


def control_plan(plan_file: Path, out: Path) -> Path:
    """The plan.json format with every layer kept whole (method and ranks null)."""
    plan = json.loads(plan_file.read_text())
    for layer in plan["layers"]:
        layer.update(method=None, ranks=None, reason=CONTROL_REASON)
    plan["target"] = None
    out.write_text(json.dumps(plan, indent=2))
    return out


def score(models: dict[str, Any], data: Any, spec: Any) -> dict[str, Any]:
    """Each model's predictions on `data`, reading every batch once for all models."""
    import numpy as np
    import torch

    from rankfold.models import batches

    predicted: dict[str, list[Any]] = {name: [] for name in models}
    labels = []
    with torch.no_grad():
        for x, y in batches(data, spec, 500):
            labels.append(np.asarray(y))
            for name, model in models.items():
                predicted[name].append(model(x).argmax(1).numpy())
    return {
        "labels": np.concatenate(labels),
        **{name: np.concatenate(rows) for name, rows in predicted.items()},
    }


def paired_delta(this: Any, reference: Any, labels: Any) -> dict[str, Any]:
    """acc(this) − acc(reference) in points on the same images, with its standard error."""
    n = len(labels)
    only_this = int(((this == labels) & (reference != labels)).sum())
    only_reference = int(((this != labels) & (reference == labels)).sum())
    gain = only_this - only_reference
    return {
        "delta_pt": 100 * gain / n,
        "se_pt": 100 * math.sqrt(max(only_this + only_reference - gain**2 / n, 0)) / n,
        "only_this_right": only_this,
        "only_reference_right": only_reference,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (issue: >= 3)")
    parser.add_argument(
        "--train-limit", type=int, default=None, help="first N training images (default: 50,000)"
    )
    parser.add_argument("--processes", type=int, choices=(1, 2), default=2, help="torchrun ranks")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per process (default 2 / N)"
    )
    parser.add_argument("--data-workers", type=int, default=1, help="decoders per process")
    parser.add_argument("--batch-size", type=int, default=128, help="global fine-tuning batch")
    parser.add_argument("--method", default="cp-epc")
    parser.add_argument("--macs-reduction", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=None, help="RANKFOLD_DATA folder")
    parser.add_argument("--work", type=Path, default=None, help="folder for the runs' outputs")
    parser.add_argument("--reuse", action="store_true", help="skip stages already done")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    if args.train_limit is not None and args.train_limit < args.processes:
        parser.error("--train-limit must give every process at least one image")
    threads = args.threads or max(1, 2 // args.processes)

    from rankfold.models import data_dir

    base = (args.data or data_dir()).resolve()
    for relative in (WEIGHTS, TRAIN, TEST_LOSSLESS, TEST_JPEG):
        if not (base / relative).exists():
            sys.exit(f"{base / relative} not found; pass --data or set RANKFOLD_DATA")
    work = args.work or Path(tempfile.mkdtemp(prefix="rankfold-full-cifar-"))
    work = work.resolve()
    started = time.perf_counter()
    common = ["resnet20", "--weights", str(base / WEIGHTS), "--no-latency",
              "--seed", str(args.seed)]  # fmt: skip
    recipe = [
        "--train-data", str(base / TRAIN),
        *(["--train-limit", str(args.train_limit)] if args.train_limit else []),
        "--eval-data", str(base / TEST_LOSSLESS),
        "--data-workers", str(args.data_workers),
        "--finetune-epochs", str(args.epochs),
        "--batch-size", str(args.batch_size),
    ]  # fmt: skip
    single = rankfold_command(1)
    plan_run = run_stage(
        "plan",
        [*single, "compress", *common, "--method", args.method,
         "--macs-reduction", f"{args.macs_reduction:g}", "--out", str(work / "plan")],
        work / "plan",
        2,
        args.reuse,
    )  # fmt: skip
    control_file = control_plan(work / "plan" / "plan.json", work / "control_plan.json")
    launcher = rankfold_command(args.processes)
    runs = {"plan": plan_run}
    for stage, plan in (("compressed", work / "plan" / "plan.json"), ("control", control_file)):
        command = [*launcher, "compress", *common, "--plan", str(plan), *recipe,
                   "--out", str(work / stage)]  # fmt: skip
        runs[stage] = run_stage(stage, command, work / stage, threads, args.reuse)

    import torch

    from rankfold.converter import restore
    from rankfold.models import load_dataset, load_model

    torch.set_num_threads(2)
    log("scoring the original, compressed and control models")
    original, spec = load_model("resnet20", base / WEIGHTS)
    models = {
        "original": original.eval(),
        "compressed": restore(work / "compressed" / "model.pt").eval(),
        "control": restore(work / "control" / "model.pt").eval(),
    }
    scores: dict[str, Any] = {}
    for name, relative in TEST_SETS.items():
        predicted = score(models, load_dataset(base / relative, spec), spec)
        labels = predicted.pop("labels")
        scores[name] = {
            "images": len(labels),
            "accuracy": {m: float((p == labels).mean()) for m, p in predicted.items()},
            "compressed_vs_original": paired_delta(
                predicted["compressed"], predicted["original"], labels
            ),
            "compressed_vs_control": paired_delta(
                predicted["compressed"], predicted["control"], labels
            ),
            "control_vs_original": paired_delta(
                predicted["control"], predicted["original"], labels
            ),
        }

    compressed = runs["compressed"]["report"]
    histories = {
        stage: (runs[stage]["report"]["recovery"]["finetune"] or {}).get("history", [])
        for stage in ("compressed", "control")
    }
    train_images = args.train_limit or 50_000
    summary = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": MACHINE,
        "model": "resnet20",
        "method": args.method,
        "macs_reduction_target": args.macs_reduction,
        "macs": {key: compressed[key]["macs"] for key in ("original", "compressed")},
        "params": {key: compressed[key]["params"] for key in ("original", "compressed")},
        "macs_reduction": compressed["macs_reduction"],
        "params_reduction": compressed["params_reduction"],
        "decomposed_layers": sum(row["status"] == "decomposed" for row in compressed["layers"]),
        "train_images": train_images,
        "epochs": args.epochs,
        "processes": args.processes,
        "threads_per_process": threads,
        "scores": scores,
        "pipeline_accuracy_lossless_1017": {
            stage: runs[stage]["report"]["compressed"] for stage in ("compressed", "control")
        },
        "history": histories,
        "recovery": {
            stage: {
                "refit": runs[stage]["report"]["recovery"]["refit"],
                "recalibration": runs[stage]["report"]["recovery"]["recalibration"],
                "recalibration_check": runs[stage]["report"]["recovery"]["recalibration_check"],
                "kept_epoch": (runs[stage]["report"]["recovery"]["finetune"] or {}).get(
                    "selected_by"
                ),
            }
            for stage in ("compressed", "control")
        },
        "images_per_s": {
            stage: [train_images / row["seconds"] for row in rows]
            for stage, rows in histories.items()
        },
        "seconds": {stage: run["seconds"] for stage, run in runs.items()},
        "peak_rss_mib_per_process": {stage: run["peak_rss_mib"] for stage, run in runs.items()},
        "commands": {stage: " ".join(run["command"]) for stage, run in runs.items()},
        "work": str(work),
        "total_seconds": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "full_cifar_recovery.json").write_text(json.dumps(summary, indent=2))
    print(table(summary))


def paired_cell(delta: dict[str, Any]) -> str:
    return f"{delta['delta_pt']:+.2f} ± {delta['se_pt']:.2f}"


def table(summary: dict[str, Any]) -> str:
    lines = [
        f"ResNet-20, {summary['method']}: MACs {summary['macs']['original'] / 1e6:.1f}M → "
        f"{summary['macs']['compressed'] / 1e6:.1f}M ({summary['macs_reduction']:.2f}×), "
        f"{summary['decomposed_layers']} layers decomposed; fine-tuned {summary['epochs']} "
        f"epochs on {summary['train_images']:,} JPEG training images, "
        f"{summary['processes']} process(es)",
        "",
        "| test set | original | control (FT, self-distilled) | compressed after FT "
        "| compressed − original | compressed − control | control − original |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in summary["scores"].items():
        accuracy = row["accuracy"]
        lines.append(
            f"| {name} ({row['images']:,}) | {100 * accuracy['original']:.2f} % | "
            f"{100 * accuracy['control']:.2f} % | {100 * accuracy['compressed']:.2f} % | "
            f"{paired_cell(row['compressed_vs_original'])} | "
            f"{paired_cell(row['compressed_vs_control'])} | "
            f"{paired_cell(row['control_vs_original'])} |"
        )
    lines += [
        "",
        "| run | epoch | loss | train acc (augmented) | lossless 1017 acc | images/s | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for stage, rows in summary["history"].items():
        for row, rate in zip(rows, summary["images_per_s"][stage], strict=True):
            lines.append(
                f"| {stage} | {row['epoch']} | {row['loss']:.4f} | "
                f"{100 * row['train_accuracy']:.2f} % | {100 * row['eval_accuracy']:.2f} % | "
                f"{rate:.0f} | {row['seconds']:.0f} |"
            )
    runs = ", ".join(f"{stage} {s:.0f} s" for stage, s in summary["seconds"].items())
    peaks = ", ".join(
        f"{stage} {mib:,.0f} MiB" for stage, mib in summary["peak_rss_mib_per_process"].items()
    )
    lines += [
        "",
        f"wall time: {runs}; whole benchmark {summary['total_seconds']:.0f} s",
        f"largest peak RSS of one process: {peaks}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
