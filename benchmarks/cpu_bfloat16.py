"""Fine-tuning and the refit on a CPU in float32 and in bfloat16 autocast, side by side, through
the CLI.

    .venv/bin/python benchmarks/cpu_bfloat16.py [--stage finetune|refit] [--rounds 2]
        [--old-cli PATH [--no-amp]] [--out FILE]

Each case is one `rankfold compress` run twice per round, `--amp` and `--no-amp` in turn (with
`--old-cli`: an older checkout's CLI and this one's, both with their defaults, or both with
`--no-amp`: float32 as on any CPU without AMX), the same plan (a first run fills the
decomposition cache both then read) and the same images. Stage
`finetune` (the default):

- ResNet-20 (real weights), cp-epc at 3× fewer MACs, the refit and recalibration as by default,
  one epoch of the default distilled fine-tuning on the first 6,400 images of the CIFAR-10 JPEG
  folder, scored on test_lossless_1017.npz;
- torchvision ResNet-50 (seeded random weights, time only), tucker2 at 2× at 224², no refit or
  recalibration, one epoch on 320 JPEG images in batches of 32.

Stage `refit` (no fine-tuning; the refit's Adam steps are what `--amp` changes):

- ResNet-56 (real weights), cp-epc at 4× fewer MACs, the refit on the first 1,024 images of
  train_lossless_5085.npz as by default, scored on test_lossless_1017.npz;
- torchvision ResNet-50 (seeded random weights), tucker2 at 2× at 224², the refit (blocks and
  segments, as by default) on 256 JPEG images.

`--amp` is the default; on a CPU without AMX it runs in float32 like `--no-amp`, and the report's
`finetune.precision` and `recovery.refit.precision` say which ran. Seconds, errors and
accuracies come from each run's report.json, the whole command's seconds from the clock. Writes
benchmarks/results/cpu_bf16_STAGE.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RANKFOLD_DATA", ROOT.parent / "shared" / "data"))
JPEG_TRAIN = DATA / "cifar10" / "jpeg" / "train"
FINETUNE_CASES = {
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
REFIT_CASES = {
    "resnet56 cp-epc 4×, 1,024 CIFAR images": [
        "resnet56",
        "--weights", str(DATA / "weights" / "resnet56-4bfd9763.th"),
        "--method", "cp-epc", "--macs-reduction", "4",
        "--train-data", str(DATA / "cifar10" / "train_lossless_5085.npz"),
        "--eval-data", str(DATA / "cifar10" / "test_lossless_1017.npz"),
    ],
    "resnet50 tucker2 2× at 224², 256 images": [
        "torchvision:resnet50", "--method", "tucker2", "--macs-reduction", "2",
        "--train-data", str(JPEG_TRAIN), "--train-limit", "256",
    ],
}  # fmt: skip


def run(cli: Path, stage: str, arguments: list[str], out: Path, cache: Path) -> dict:
    epochs = ["--finetune-epochs", "1"] if stage == "finetune" else []
    command = [
        str(cli), "compress", *arguments, *epochs, "--no-latency",
        "--seed", "0", "--search-cache-dir", str(cache), "--out", str(out),
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    if stage == "finetune":
        finetune = report["recovery"]["finetune"]
        row = finetune["history"][-1]
        return {
            "precision": finetune["precision"],
            "epoch_seconds": row["seconds"],
            "eval_accuracy": row["eval_accuracy"],
            "loss": row["loss"],
        }
    refit = report["recovery"]["refit"]
    rows = [row for row in report["layers"] if row.get("refit_error_after") is not None]
    segments = refit["segments"]
    return {
        "precision": refit["precision"],
        "refit_seconds": refit["seconds"],
        "command_seconds": seconds,
        "block_error_after": sum(r["refit_error_after"] for r in rows) / len(rows),
        "segment_error_after": (
            sum(s["error_after"] for s in segments) / len(segments) if segments else None
        ),
        "accuracy_refitted": report["compressed"]["accuracy_refitted"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("finetune", "refit"), default="finetune")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--old-cli", type=Path, help="compare this older `rankfold` with ours")
    parser.add_argument(
        "--no-amp", action="store_true", help="with --old-cli: both CLIs in float32 (--no-amp)"
    )
    parser.add_argument("--out", type=Path, help="default: results/cpu_bf16_STAGE.json")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.no_amp and not args.old_cli:
        parser.error("--no-amp compares two CLIs in float32: give --old-cli too")
    out = args.out or ROOT / "benchmarks" / "results" / f"cpu_bf16_{args.stage}.json"
    cases = FINETUNE_CASES if args.stage == "finetune" else REFIT_CASES
    cli = Path(sys.executable).with_name("rankfold")
    variants = {"--amp": (cli, ["--amp"]), "--no-amp": (cli, ["--no-amp"])}
    if args.old_cli:
        both = ["--no-amp"] if args.no_amp else []
        variants = {"old CLI": (args.old_cli, both), "this CLI": (cli, both)}
    rows = []
    with tempfile.TemporaryDirectory() as work:
        cache = Path(work) / "cache"
        for name, arguments in cases.items():
            warm = [*arguments, "--no-amp"]
            run(cli, args.stage, warm, Path(work) / "warm", cache)  # fills the cache
            for round_ in range(1, args.rounds + 1):
                for flag, (which, options) in variants.items():
                    where = Path(work) / f"{flag}{round_}"
                    result = run(which, args.stage, [*arguments, *options], where, cache)
                    rows.append({"case": name, "flag": flag, "round": round_, **result})
                    print(json.dumps(rows[-1]), flush=True)
    summary = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(),
        "stage": args.stage,
        "old_cli": None if args.old_cli is None else str(args.old_cli),
        "no_amp": args.no_amp,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    table = finetune_table if args.stage == "finetune" else refit_table
    for line in table(cases, variants, rows):
        print(line)


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f} %"


def finetune_table(cases: dict, variants: dict, rows: list[dict]) -> list[str]:
    lines = [
        "| case | flag | precision | epoch seconds, rounds | eval top-1, rounds |",
        "|---|---|---|---|---|",
    ]
    for name in cases:
        for flag in variants:
            mine = [r for r in rows if r["case"] == name and r["flag"] == flag]
            seconds = " / ".join(f"{r['epoch_seconds']:.1f}" for r in mine)
            accuracy = " / ".join(percent(r["eval_accuracy"]) for r in mine)
            lines.append(f"| {name} | `{flag}` | {mine[0]['precision']} | {seconds} | {accuracy} |")
    return lines


def refit_table(cases: dict, variants: dict, rows: list[dict]) -> list[str]:
    lines = [
        "| case | flag | precision | refit seconds, rounds | command seconds, rounds | mean "
        "block error after | mean segment error after | refitted top-1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in cases:
        for flag in variants:
            mine = [r for r in rows if r["case"] == name and r["flag"] == flag]

            def each(key: str, form: str, mine=mine) -> str:
                return " / ".join("–" if r[key] is None else format(r[key], form) for r in mine)

            lines.append(
                f"| {name} | `{flag}` | {mine[0]['precision']} | {each('refit_seconds', '.1f')} "
                f"| {each('command_seconds', '.1f')} | {each('block_error_after', '.4f')} "
                f"| {each('segment_error_after', '.4f')} "
                f"| {' / '.join(percent(r['accuracy_refitted']) for r in mine)} |"
            )
    return lines


if __name__ == "__main__":
    main()
