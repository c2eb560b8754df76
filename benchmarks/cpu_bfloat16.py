"""Fine-tuning on a CPU in float32 and in bfloat16 autocast, side by side, through the CLI.

    .venv/bin/python benchmarks/cpu_bf16_finetune.py [--rounds 2] [--out FILE]

Each case is one `rankfold compress` run twice per round, `--amp` and `--no-amp` in turn, the same
plan (a first run fills the decomposition cache both then read) and the same images:

- ResNet-20 (real weights), cp-epc at 3× fewer MACs, the refit and recalibration as by default,
  one epoch of the default distilled fine-tuning on the first 6,400 images of the CIFAR-10 JPEG
  folder, scored on test_lossless_1017.npz;
- torchvision ResNet-50 (seeded random weights, time only), tucker2 at 2× at 224², no refit or
  recalibration, one epoch on 320 JPEG images in batches of 32.

`--amp` is the default; on a CPU without AMX it trains in float32 like `--no-amp`, and the
report's `finetune.precision` says which ran. Epoch seconds and accuracies come from each run's
report.json. Writes benchmarks/results/cpu_bf16_finetune.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RANKFOLD_DATA", ROOT.parent / "shared" / "data"))
JPEG_TRAIN = DATA / "cifar10" / "jpeg" / "train"
CASES = {
    "resnet20 cp-epc 3×, 6,400 CIFAR images": [
        "resnet20",
        "--weights", str(DATA / "weights" / "resnet20-12fca82f.th"),
        "--method", "cp-epc", "--macs-reduction", "3",
        "--train-data", str(JPEG_TRAIN), "--train-limit", "6400",
        "--eval-data", str(DATA / "cifar10" / "test_lossless_1017.npz"),
    ],
    "resnet50 tucker2 2× at 224², 320 images": [
        "torchvision:resnet50", "--method", "tucker2", "--macs-reduction", "2",
        "--train-data", str(JPEG_TRAIN), "--train-limit", "320", "--batch-size", "32",
        "--no-refit", "--no-recalibrate",
    ],
}  # fmt: skip


def run(cli: Path, arguments: list[str], out: Path, cache: Path) -> dict:
    command = [
        str(cli), "compress", *arguments, "--finetune-epochs", "1", "--no-latency",
        "--seed", "0", "--search-cache-dir", str(cache), "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    finetune = report["recovery"]["finetune"]
    row = finetune["history"][-1]
    return {
        "precision": finetune["precision"],
        "epoch_seconds": row["seconds"],
        "eval_accuracy": row["eval_accuracy"],
        "loss": row["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu_bf16_finetune.json"
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    cli = Path(sys.executable).with_name("rankfold")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        cache = Path(work) / "cache"
        for name, arguments in CASES.items():
            run(cli, [*arguments, "--no-amp"], Path(work) / "warm", cache)  # fills the cache
            for round_ in range(1, args.rounds + 1):
                for flag in ("--amp", "--no-amp"):
                    result = run(cli, [*arguments, flag], Path(work) / f"{flag}{round_}", cache)
                    rows.append({"case": name, "flag": flag, "round": round_, **result})
                    print(json.dumps(rows[-1]), flush=True)
    summary = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print("| case | flag | precision | epoch seconds, rounds | eval top-1, rounds |")
    print("|---|---|---|---|---|")
    for name in CASES:
        for flag in ("--amp", "--no-amp"):
            mine = [r for r in rows if r["case"] == name and r["flag"] == flag]
            seconds = " / ".join(f"{r['epoch_seconds']:.1f}" for r in mine)
            accuracy = " / ".join(
                "–" if r["eval_accuracy"] is None else f"{100 * r['eval_accuracy']:.2f} %"
                for r in mine
            )
            print(f"| {name} | `{flag}` | {mine[0]['precision']} | {seconds} | {accuracy} |")


if __name__ == "__main__":
    main()
