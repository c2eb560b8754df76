"""Fine-tuning on the GPU against the CPU, and the CUDA provider, through the CLI, side by side.

    python benchmarks/gpu_finetune.py [--model resnet56] [--method cp-epc] [--reduction 4]
        [--epochs 6] [--cpu-epochs 1] [--devices cuda,cpu] [--seed N]
        [--providers cpu,cuda | --skip-bench] [--work DIR] [--out JSON]

Each device is one `rankfold compress MODEL --weights … --method M --macs-reduction X
--train-data cifar10/train_lossless_5085.npz --eval-data cifar10/test_lossless_1017.npz
--finetune-epochs E --finetune-device D --no-latency`, everything else at its default, the runs
sharing one decomposition cache (the second run reuses the first one's factors, so the devices
differ only in the fine-tuning). The CPU arm trains `--cpu-epochs` epochs, since there an epoch
takes minutes: devices are compared by their seconds per epoch (training on the 5,085 images plus
scoring the 1,017 evaluation images, the median over epochs), accuracy after E epochs is each
arm's own (`--seed` seeds the factorizations, shuffling and augmentation). Then `rankfold
bench` times the first arm's original.onnx against its model.onnx on each of `--providers` (an
unusable provider is skipped with its reason) at batch 1, 8 and 64.
Writes benchmarks/results/gpu_finetune.json (after each step, so a cut run keeps what it did) and
prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from output_selector import RESULTS, TESTS, TRAIN, WEIGHTS

BENCH_BATCHES = "1,8,64"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(WEIGHTS), default="resnet56")
    parser.add_argument("--method", default="cp-epc")
    parser.add_argument("--reduction", type=float, default=4.0)
    parser.add_argument("--epochs", type=int, default=6, help="epochs of every arm but the CPU's")
    parser.add_argument("--cpu-epochs", type=int, default=1)
    parser.add_argument("--devices", default="cuda,cpu", help="--finetune-device of each arm")
    parser.add_argument("--seed", type=int, default=0, help="rankfold compress --seed")
    parser.add_argument("--providers", default="cpu,cuda", help="rankfold bench --provider")
    parser.add_argument("--skip-bench", action="store_true", help="no rankfold bench at the end")
    parser.add_argument("--bench-repeats", type=int, default=50)
    parser.add_argument("--data", type=Path, default=None, help="RANKFOLD_DATA folder")
    parser.add_argument("--work", type=Path, default=Path("/tmp/rankfold-gpu-finetune"))
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_finetune.json")
    args = parser.parse_args()
    if shutil.which("rankfold") is None:
        parser.error("the rankfold command is not on PATH: pip install -e . first")
    return args


def run(command: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    print("$ " + " ".join(command), flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done, time.perf_counter() - start


def compress(args, base: Path, device: str) -> dict:
    epochs = args.cpu_epochs if device == "cpu" else args.epochs
    out = args.work / f"{device}-e{epochs}-s{args.seed}"
    command = [
        "rankfold", "compress", args.model, "--weights", str(base / WEIGHTS[args.model]),
        "--method", args.method, "--macs-reduction", f"{args.reduction:g}",
        "--train-data", str(base / TRAIN), "--eval-data", str(base / TESTS["lossless_1017"]),
        "--finetune-epochs", str(epochs), "--finetune-device", device, "--no-latency",
        "--seed", str(args.seed),
        "--search-cache-dir", str(args.work / "cache"), "--out", str(out),
    ]  # fmt: skip
    _, seconds = run(command)
    report = json.loads((out / "report.json").read_text())
    finetune = report["recovery"]["finetune"]
    epoch_seconds = [row["seconds"] for row in finetune["history"]]
    accuracy = report["compressed"]
    return {
        "device": device,
        "ran_on": finetune["device"],
        "epochs": epochs,
        "seed": args.seed,
        "epoch_seconds": epoch_seconds,
        "median_epoch_seconds": statistics.median(epoch_seconds),
        "stages": {
            stage: accuracy.get(f"accuracy_{stage}")
            for stage in ("decomposed", "refitted", "recalibrated", "finetuned")
        },
        "original_accuracy": report["original"].get("accuracy"),
        "onnx_accuracy": report["onnx"].get("accuracy"),
        "macs_reduction": report["macs_reduction"],
        "wall_seconds": seconds,
        "command": " ".join(command),
        "out": str(out),
    }


def bench(args, out: Path) -> dict:
    table = args.work / "bench.json"
    command = [
        "rankfold", "bench", str(out / "model.onnx"), "--baseline", str(out / "original.onnx"),
        "--provider", args.providers, "--batch", BENCH_BATCHES,
        "--repeats", str(args.bench_repeats), "--json", str(table),
    ]  # fmt: skip
    _, seconds = run(command)
    data = json.loads(table.read_text())
    for provider, timing in data["providers"].items():
        for row in timing.get("rows", []):
            print(
                f"{provider} batch {row['batch']}: original {row['original_ms']:.3f} ms, "
                f"compressed {row['compressed_ms']:.3f} ms, speedup {row['speedup']:.2f}×"
            )
        if "skipped" in timing:
            print(f"{provider}: skipped ({timing['skipped']})")
    return {"command": " ".join(command), "seconds": seconds, **data}


def gpu_name() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return done.stdout.strip() or None


def main() -> None:
    args = parse_args()
    from rankfold.models import data_dir

    base = (args.data or data_dir()).resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor(),
                    "gpu": gpu_name()},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "arms": [],
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    for device in args.devices.split(","):
        result["arms"].append(compress(args, base, device))
        print(json.dumps(result["arms"][-1]), flush=True)
        save()
    if not args.skip_bench:
        result["bench"] = bench(args, Path(result["arms"][0]["out"]))
        save()

    print(
        "\n| device | epochs | s per epoch (median) | vs first arm | top-1 decomposed → refitted "
        "→ recalibrated → fine-tuned | ONNX |"
    )
    print("|---|---:|---:|---:|---|---:|")
    first = result["arms"][0]["median_epoch_seconds"]
    for arm in result["arms"]:
        stages = " → ".join(
            "–" if value is None else f"{100 * value:.2f}" for value in arm["stages"].values()
        )
        onnx = arm["onnx_accuracy"]
        print(
            f"| {arm['ran_on']} | {arm['epochs']} | {arm['median_epoch_seconds']:.2f} | "
            f"{arm['median_epoch_seconds'] / first:.1f}× | {stages} | "
            f"{'–' if onnx is None else f'{100 * onnx:.2f}'} |"
        )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
