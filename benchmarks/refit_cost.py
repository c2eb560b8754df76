"""The refit's cost on 224² models: this checkout's CLI against an older one's, side by side.

    python benchmarks/refit_cost.py --old-cli /tmp/rankfold-old/.venv/bin/rankfold [--model M]
        [--steps N|default] [--cases N]

Each case runs `rankfold compress` (one model, method and MAC reduction, the refit on the first
--images training images of the CIFAR-10 JPEG folder, resized to the model's 224² input) with
each checkout's CLI, one after the other under `flock /tmp/rankfold-bench.lock`; an old run is
stopped after --old-limit seconds. The report gives the refit's seconds and every block's output
error before and after it (and every refined segment's); the wall time is the whole command's.
Writes benchmarks/results/refit_cost.json (after every case) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RANKFOLD_DATA", ROOT.parent / "shared" / "data"))
# (model, method, MAC reduction, refit steps or None for the default, options for this
# checkout only: in the first case its refit reads the 256 images the old one does, which the
# default --refit-memory-mb would cut to 198)
CASES = [
    ("torchvision:convnext_tiny", "svd", 2.0, 20, ["--refit-memory-mb", "8192"]),
    ("torchvision:convnext_tiny", "svd", 2.0, None, []),
    # Tucker-2 blocks and residual-unit segments (refined by default for Tucker-2)
    ("torchvision:resnet50", "tucker2", 2.0, 20, []),
    ("torchvision:resnet50", "tucker2", 2.0, None, []),
]


def run_case(cli: str, case: dict, images: int, limit: float, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        command = [
            "flock",
            "/tmp/rankfold-bench.lock",
            cli,
            "compress",
            case["model"],
            "--method",
            case["method"],
            "--macs-reduction",
            str(case["reduction"]),
            "--train-data",
            str(DATA / "cifar10" / "jpeg" / "train"),
            "--train-limit",
            str(images),
            "--eval-data",
            str(DATA / "cifar10" / "jpeg" / "test"),
            "--eval-limit",
            "64",
            "--out",
            out,
        ]
        if case["steps"] is not None:
            command += ["--refit-steps", str(case["steps"])]
        command += extra
        start = time.perf_counter()
        # Its own process group, so that a stopped run frees the lock and the cores.
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env={**os.environ, "COLUMNS": "100"},
        )
        try:
            _, stderr = process.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return {"stopped_after_s": limit}
        wall = time.perf_counter() - start
        report = Path(out) / "report.json"
        if not report.exists():
            return {"failed": stderr.strip().splitlines()[-1:], "exit": process.returncode}
        data = json.loads(report.read_text())
    refit = data["recovery"]["refit"]
    rows = [row for row in data["layers"] if row.get("refit_error_after") is not None]
    segments = refit.get("segments") or []
    return {
        "exit": process.returncode,
        "wall_s": wall,
        "refit_s": refit["seconds"],
        "refit_images": refit["images"],
        "blocks": refit["layers"],
        "refine_steps": refit["refine_steps"],
        "mean_error_before": statistics.fmean(row["refit_error_before"] for row in rows),
        "mean_error_after": statistics.fmean(row["refit_error_after"] for row in rows),
        "errors_after": {row["name"]: row["refit_error_after"] for row in rows},
        "blocks_read": dict(Counter(row.get("refit_steps_read") for row in rows)),
        "segments": len(segments),
        "segment_steps": refit.get("segment_steps"),
        "mean_segment_error_before": (
            statistics.fmean(s["error_before"] for s in segments) if segments else None
        ),
        "mean_segment_error_after": (
            statistics.fmean(s["error_after"] for s in segments) if segments else None
        ),
    }


def cell(result: dict, key: str) -> str:
    if not result:
        return "not run"
    if "stopped_after_s" in result:
        return f"> {result['stopped_after_s']:.0f} s, stopped"
    if "failed" in result:
        return f"failed: {result['failed']}"
    return f"{result[key]:.0f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-cli", help="the older checkout's `rankfold` executable")
    parser.add_argument("--old-limit", type=float, default=1800.0)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--model", help="only the cases of this model (e.g. torchvision:resnet50)")
    parser.add_argument("--cases", type=int, help="run the first N cases (of --model's)")
    parser.add_argument(
        "--steps", help="only the cases with this many refit steps ('default': the default's)"
    )
    parser.add_argument(
        "--options", default="", help="more options for both CLIs, e.g. '--no-latency'"
    )
    parser.add_argument("--out", default="benchmarks/results/refit_cost.json")
    args = parser.parse_args()
    new_cli = shutil.which("rankfold", path=str(Path(sys.executable).parent))
    if new_cli is None:
        parser.error(f"no rankfold executable beside {sys.executable}; run it from the venv")
    rows = []
    if args.steps not in (None, "default") and not args.steps.isdigit():
        parser.error("--steps takes a whole number or 'default'")
    steps = None if args.steps in (None, "default") else int(args.steps)
    chosen = [
        case
        for case in CASES
        if args.model in (None, case[0]) and (args.steps is None or case[3] == steps)
    ][: args.cases]
    for model, method, reduction, steps, new_extra in chosen:
        case = {"model": model, "method": method, "reduction": reduction, "steps": steps}
        common = args.options.split()
        new = run_case(new_cli, case, args.images, 6 * 3600, common + new_extra)
        old = (
            run_case(args.old_cli, case, args.images, args.old_limit, common)
            if args.old_cli
            else {}
        )
        case["new_options"], case["options"] = new_extra, common
        rows.append({**case, "images": args.images, "new": new, "old": old})
        print(json.dumps({**case, "new": new, "old": old}), flush=True)
        (ROOT / args.out).write_text(json.dumps(rows, indent=2) + "\n")
    print(
        "| model | method | MACs | refit steps | refit images old / new | refit old | refit new "
        "| command old | command new | mean block error before → after, old | … new | blocks "
        "| mean segment error before → after, old | … new | segments |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        old, new = row["old"], row["new"]
        errors = [
            f"{side[f'mean_{kind}before']:.3f} → {side[f'mean_{kind}after']:.3f}"
            if side.get(f"mean_{kind}after") is not None
            else "–"
            for kind in ("error_", "segment_error_")
            for side in (old, new)
        ]
        print(
            f"| {row['model']} | {row['method']} | {row['reduction']:g}× | "
            f"{row['steps'] or 'default'} | {old.get('refit_images', '–')} / "
            f"{new.get('refit_images', '–')} | {cell(old, 'refit_s')} | {cell(new, 'refit_s')} | "
            f"{cell(old, 'wall_s')} | {cell(new, 'wall_s')} | {errors[0]} | {errors[1]} | "
            f"{new.get('blocks', '')} | {errors[2]} | {errors[3]} | {new.get('segments', '')} |"
        )


if __name__ == "__main__":
    main()
