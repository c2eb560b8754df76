"""End-to-end compression + ONNX latency of original vs compressed, measured side by side.

    python benchmarks/pipeline_latency.py --model torchvision:resnet18 --method cp \\
        --macs-reduction 3

Runs the normal pipeline (`run_compress`, what `rankfold compress` does), reads its report.json,
prints a table, writes benchmarks/results/pipeline_<model>_<method>_<x>.json and appends a
section to BENCHMARKS.md (not with --no-record, e.g. for a quick check on `--model resnet20`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="torchvision:resnet18")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--method", default="cp")
    parser.add_argument("--macs-reduction", type=float, default=3.0)
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default="/tmp/rankfold-bench")
    parser.add_argument("--no-record", action="store_true", help="Do not append to BENCHMARKS.md.")
    return parser.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()  # before the heavy imports below: --help answers at once

from rankfold.converter import CompressConfig, LatencyConfig, run_compress  # noqa: E402
from rankfold.passes import RankPolicy  # noqa: E402
from rankfold.passes.core import atomic_write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(args: argparse.Namespace) -> None:
    config = CompressConfig(
        model=args.model,
        weights=args.weights,
        ranks=RankPolicy(method=args.method, macs_reduction=args.macs_reduction),
        latency=LatencyConfig(
            batch=[int(b) for b in args.batch.split(",")], warmup=10, repeats=args.repeats
        ),
    )
    start = time.perf_counter()
    run_compress(config, args.out)
    report = json.loads((Path(args.out) / "report.json").read_text())
    seconds = time.perf_counter() - start
    reduction = report["macs_reduction"]
    rows = [
        {
            **row,
            "macs_reduction": reduction,
            "speedup_per_mac_reduction": row["speedup"] / reduction,
        }
        for row in report["latency"]["per_batch"]
    ]
    header = (
        "| batch | original ms | compressed ms | speedup | MAC reduction | "
        "speedup / MAC reduction |"
    )
    lines = [header, "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['batch']} | {row['original_ms']:.2f} | {row['compressed_ms']:.2f} | "
            f"{row['speedup']:.2f}× | {reduction:.2f}× | {row['speedup_per_mac_reduction']:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    tag = f"{args.model.replace(':', '_')}_{args.method}_{args.macs_reduction:g}x"
    atomic_write_json(
        ROOT / "benchmarks" / "results" / f"pipeline_{tag}.json",
        {
            "args": vars(args),
            "seconds": seconds,
            "rows": rows,
            "params_reduction": report["params_reduction"],
            "onnx_max_abs_diff": report["onnx"]["max_abs_diff"],
        },
    )
    if args.no_record:
        return
    command = (
        f"python benchmarks/pipeline_latency.py --model {args.model} --method {args.method} "
        f"--macs-reduction {args.macs_reduction:g} --batch {args.batch} --repeats {args.repeats}"
    )
    section = (
        f"\n## Pipeline latency: {args.model}, {args.method}, {args.macs_reduction:g}× MACs\n\n"
        f"Command: `{command}`  \nMachine: 2-core x86-64 CPU "
        f"({platform.processor() or 'x86_64'}), 24 GiB, no GPU; onnxruntime CPU provider, "
        f"default threads.  \nDate: {datetime.date.today().isoformat()}. Whole run (decompose, "
        f"export, validate, time): {seconds:.0f} s. Params {report['params_reduction']:.2f}× "
        f"fewer; ONNX parity max abs diff {report['onnx']['max_abs_diff']:.1e}. Medians of "
        f"{args.repeats} interleaved runs.\n\n"
        f"{table}\n"
    )
    with open(ROOT / "BENCHMARKS.md", "a", encoding="utf-8") as handle:
        handle.write(section)


if __name__ == "__main__":
    main(ARGS)
