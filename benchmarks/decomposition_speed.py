"""Decomposition wall time and per-layer error: this checkout against an older one, side by side.

    python benchmarks/decomposition_speed.py --old-python /tmp/rankfold-old/.venv/bin/python

Each case runs the public `compress` (uniform ranks at a MAC reduction, no latency, no export) in
a fresh process of each checkout's Python, timed after a warm-up compress of one small layer,
under `flock /tmp/rankfold-bench.lock` so benchmarks do not overlap; an old run is stopped after
--old-limit seconds (without --old-python, this checkout alone). Writes
benchmarks/results/decomposition_speed.json (after every case) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESNET56 = "/work/shared/data/weights/resnet56-4bfd9763.th"
# (model, weights, method, MAC reduction), in order of value: the run stops at --budget.
CASES = [
    ("resnet56", RESNET56, "tucker2", 2.0),
    ("resnet56", RESNET56, "cp", 3.0),
    ("layer512", None, "tucker2", 2.0),
    ("layer512", None, "cp", 3.0),
    ("torchvision:resnet50", None, "tucker2", 2.0),
    ("torchvision:resnet18", None, "cp", 3.0),
    ("resnet56", RESNET56, "cp-epc", 3.0),
    ("torchvision:resnet18", None, "tucker2", 2.0),
    ("resnet56", RESNET56, "tucker2", 3.0),
    ("resnet56", RESNET56, "cp", 2.0),
    ("resnet56", RESNET56, "cp-epc", 2.0),
    ("layer512", None, "cp-epc", 3.0),
    ("torchvision:resnet18", None, "cp-epc", 3.0),
    ("torchvision:resnet18", None, "tucker2", 3.0),
    ("torchvision:resnet50", None, "tucker2", 3.0),
    ("layer512", None, "tucker2", 3.0),
    ("layer512", None, "cp", 2.0),
    ("torchvision:resnet18", None, "cp", 2.0),
    ("torchvision:resnet50", None, "cp", 3.0),
    ("torchvision:resnet50", None, "cp", 2.0),
    ("torchvision:resnet50", None, "cp-epc", 3.0),
    ("layer512", None, "cp-epc", 2.0),
    ("torchvision:resnet18", None, "cp-epc", 2.0),
    ("torchvision:resnet50", None, "cp-epc", 2.0),
]


def worker(case: dict) -> dict:
    """One compress in this process; the numbers the table needs."""
    import numpy as np
    import torch
    from torch import nn

    from rankfold.converter import CompressConfig, compress
    from rankfold.models import load_model
    from rankfold.passes import RankPolicy

    torch.manual_seed(0)
    if case["model"] == "layer512":
        model, spec = nn.Sequential(nn.Conv2d(512, 512, 3, padding=1, bias=False)), None
        example = torch.zeros(1, 512, 7, 7)
    else:
        model, spec = load_model(case["model"], case["weights"])
        example = torch.zeros(1, *spec.input_shape)

    def config_for(name: str, cache: str) -> CompressConfig:
        return CompressConfig(
            model=name,
            # Uniform ranks, as in every round before Tucker-2 planned by energy by default:
            # the fits' speed is compared at the same ranks across rounds and code versions.
            ranks=RankPolicy(
                method=case["method"],
                macs_reduction=case["reduction"],
                round_to=None,
                select="uniform",
            ),
            search={"cache_dir": Path(cache)},
            latency={"enabled": False},
        )

    # A warm-up compress of one small layer first: what compress imports on first use (about a
    # second) is then outside the timed run, whichever modules the checkout imports up front.
    with tempfile.TemporaryDirectory() as cache:
        warm_up = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1))
        compress(warm_up.eval(), torch.zeros(1, 16, 8, 8), config_for("warm-up", cache))
    with tempfile.TemporaryDirectory() as cache:
        config = config_for(case["model"], cache)
        start, cpu_start = time.perf_counter(), cpu_seconds()
        result = compress(model.eval(), example, config, spec)
        wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    rows = [row for row in result.decomposition.layers if row.status == "decomposed"]
    ratios = [
        row.extras["sensitivity_before"] / row.extras["sensitivity"]
        for row in rows
        if row.extras.get("sensitivity") and "sensitivity_before" in row.extras
    ]
    errors = [row.rel_error for row in rows]
    return {
        "wall_s": wall,
        # CPU seconds of all threads and worker processes: less sensitive than wall time to a
        # busy shared machine.
        "cpu_s": cpu,
        "layer_seconds_sum": sum(row.seconds for row in rows),
        "layers": len(rows),
        "mean_rel_error": float(np.mean(errors)),
        "errors": errors,
        "median_sensitivity_reduction": float(np.median(ratios))
        if "epc" in case["method"]
        else None,
    }


def cpu_seconds() -> float:
    """This process's CPU time and that of its finished children (cp-epc's worker processes)."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def run_case(python: str, case: dict, limit: float) -> dict:
    command = ["flock", "/tmp/rankfold-bench.lock", python, __file__, "--worker", json.dumps(case)]
    # Its own process group, so a stopped run's worker (flock's child) dies with it and frees
    # both the lock and the cores.
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return {"stopped_after_s": limit}
    if process.returncode != 0:
        return {"failed": stderr.strip().splitlines()[-1:]}
    return json.loads(stdout.strip().splitlines()[-1])


def cell(result: dict) -> str:
    if not result:
        return "not run"
    if "stopped_after_s" in result:
        return f"> {result['stopped_after_s']:.0f} s, stopped"
    if "failed" in result:
        return f"failed: {result['failed']}"
    return f"{result['wall_s']:.1f} s ({result['cpu_s']:.0f} CPU s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--old-python", required=False)
    parser.add_argument("--old-limit", type=float, default=120.0)
    parser.add_argument("--new-limit", type=float, default=400.0)
    parser.add_argument("--cases", type=int, default=len(CASES), help="run the first N cases")
    parser.add_argument(
        "--case",
        action="append",
        default=[],
        help="run only this case, MODEL/METHOD/REDUCTION (e.g. resnet56/cp-epc/3); repeatable",
    )
    parser.add_argument("--out", default="benchmarks/results/decomposition_speed.json")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    rows = []
    chosen = CASES[: args.cases]
    if args.case:
        chosen = [c for c in CASES if f"{c[0]}/{c[2]}/{c[3]:g}" in args.case]
        if len(chosen) != len(args.case):
            known = ", ".join(f"{c[0]}/{c[2]}/{c[3]:g}" for c in CASES)
            parser.error(f"--case must be one of {known}")
    for model, weights, method, reduction in chosen:
        case = {"model": model, "weights": weights, "method": method, "reduction": reduction}
        new = run_case(sys.executable, case, args.new_limit)
        old = run_case(args.old_python, case, args.old_limit) if args.old_python else {}
        rows.append({**case, "new": new, "old": old})
        brief = {
            side: {k: v for k, v in rows[-1][side].items() if k != "errors"}
            for side in ("new", "old")
        }
        print(json.dumps({**case, **brief}), flush=True)
        # After every case, so that a run stopped part-way keeps what it measured.
        (ROOT / args.out).write_text(json.dumps(rows, indent=2) + "\n")
    print(
        "| model | method | MACs | old | new | mean rel. error old → new | median sensitivity "
        "reduction old → new | layers |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        old, new = row["old"], row["new"]
        err = " → ".join(
            f"{side['mean_rel_error']:.4f}" if "mean_rel_error" in side else "–"
            for side in (old, new)
        )
        sens = " → ".join(
            f"{side['median_sensitivity_reduction']:.1f}×"
            if side.get("median_sensitivity_reduction")
            else "–"
            for side in (old, new)
        )
        print(
            f"| {row['model']} | {row['method']} | {row['reduction']:g}× | {cell(old)} | "
            f"{cell(new)} | {err} | {sens} | {new.get('layers', '')} |"
        )


if __name__ == "__main__":
    main()
