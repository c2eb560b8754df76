"""INT8 on top of low rank (issue #16): float and INT8, original and compressed, side by side.

ResNet-18 (torchvision, 224², random init; latency only): the plan is uniform allocation at the
MAC reduction with ranks aligned to the CPU's channel block (`--round-to auto`), built by the
public `restructure` with unfilled blocks (time does not depend on the weights, and factorizing
ResNet-18's 512-channel kernels takes minutes per layer here), cleaned up and exported as
`rankfold compress` exports (`export_as_deployed`), quantized as `--quantize int8` quantizes
(`quantize_export`: calibration on CIFAR-10 JPEG training images resized to 224², first conv and
last linear kept float) and the four files timed side by side (`time_side_by_side`). CP and
CP-EPC build the same blocks, so one CP row stands for both.

ResNet-56 (the shared CIFAR weights): one `run_compress` per method (what `rankfold compress
--quantize int8` does: decomposition, BatchNorm recalibration on the lossless training images,
export, INT8 of both files, agreement, accuracy on test_lossless_1017.npz, the four models timed
side by side), then top-1 of the four files on test_jpeg_10000.npz.

  flock -x /tmp/rankfold-quiet.lock flock /tmp/rankfold-bench.lock \\
      .venv/bin/python benchmarks/int8.py
Writes benchmarks/results/int8.json and prints the BENCHMARKS.md tables.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before NumPy/torch load: one thread, as the shared machine needs

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="3", help="MAC reductions, e.g. 2,3")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--methods-r18", default="tucker2,cp")
    parser.add_argument("--methods-r56", default="tucker2,cp")
    parser.add_argument("--repeats-r18", type=int, default=10)
    parser.add_argument("--repeats-r56", type=int, default=20)
    parser.add_argument("--calib-r18", type=int, default=32, help="calibration images at 224²")
    parser.add_argument("--calib-r56", type=int, default=256)
    parser.add_argument("--train-limit", type=int, default=2048, help="BN recalibration images")
    parser.add_argument("--jpeg-limit", type=int, default=10000, help="0: skip the JPEG set")
    parser.add_argument("--skip-r18", action="store_true")
    parser.add_argument("--skip-r56", action="store_true")
    parser.add_argument(
        "--stem-output",
        action="store_true",
        help="--quant-stem-output: quantize a factorized first conv's last stage",
    )
    parser.add_argument("--out", type=Path, default=None, help="default: results/int8.json")
    return parser.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()  # before the heavy imports below: --help answers at once

import onnxruntime  # noqa: E402
import torch  # noqa: E402

from rankfold.converter import CompressConfig, QuantizeConfig, Report, run_compress  # noqa: E402
from rankfold.converter.calibration import export_as_deployed  # noqa: E402
from rankfold.converter.config import ExportConfig, LatencyConfig  # noqa: E402
from rankfold.converter.quantization import float_layer_choice, quantize_export  # noqa: E402
from rankfold.models import batches, data_dir, load_dataset, load_model, shared_file  # noqa: E402
from rankfold.passes import (  # noqa: E402
    PlanningContext,
    RankPolicy,
    analyze,
    plan_cost,
    restructure,
    select_ranks,
    trace,
)
from rankfold.passes.core import ValidationError, atomic_write_json  # noqa: E402
from rankfold.runtime import get_backend, onnx_accuracy, time_side_by_side  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
NAMES = ("float original", "INT8 original", "float compressed", "INT8 compressed")


def resnet18_rows(args: argparse.Namespace, work: Path) -> list[dict]:
    model, spec = load_model("torchvision:resnet18", None, None)
    example = torch.zeros(1, *spec.input_shape)
    original = trace(model.eval(), example)
    analysis = analyze(original)
    calibration = load_dataset(data_dir() / "cifar10/jpeg/train", spec, args.calib_r18)
    # `sensitive` would judge agreement on a random-init model: meaningless, so only `auto`.
    quantize = QuantizeConfig(
        dtype="int8", samples=args.calib_r18, float_layers=["auto"], stem_output=args.stem_output
    )
    float_layers = float_layer_choice(quantize.float_layers, analysis)
    export = ExportConfig()
    paths = {"original": work / "r18_original.onnx"}
    export_as_deployed(original, example, paths["original"], export)
    paths["original_int8"] = work / "r18_original.int8.onnx"
    quantize_export(
        paths["original"], paths["original_int8"], quantize, float_layers, calibration, spec
    )
    round_to = get_backend("cpu").channel_block()
    rows = []
    for method in args.methods_r18:
        for target in args.targets:
            # Uniform: random weights have no spectra worth planning by (energy would read them).
            policy = RankPolicy(
                method=method, macs_reduction=target, round_to=round_to, select="uniform"
            )
            plan = select_ranks(analysis, policy, PlanningContext(gm=original)).plan
            blocks = restructure(original, analysis, plan).eval()
            tag = f"r18_{method}_{target:g}x"
            compressed, compressed_int8 = work / f"{tag}.onnx", work / f"{tag}.int8.onnx"
            export_as_deployed(blocks, example, compressed, export)
            quantize_export(compressed, compressed_int8, quantize, float_layers, calibration, spec)
            files = [paths["original"], paths["original_int8"], compressed, compressed_int8]
            timings = time_side_by_side(
                files,
                spec.input_shape,
                args.batch,
                warmup=3,
                repeats=args.repeats_r18,
                threads=1,
            )
            rows.append(
                {
                    "model": "resnet18",
                    "method": method,
                    "target": target,
                    "macs_reduction": analysis.total_macs / plan_cost(analysis, plan).macs,
                    "latency": latency_rows(timings),
                }
            )
            print_progress(rows[-1])
    return rows


def latency_rows(timings) -> list[dict]:
    return [
        {
            "batch": t.batch,
            "ms": [t.median_ms(i) for i in range(4)],
            "float_speedup": t.compare(0, 2).speedup,
            "int8_speedup": t.compare(1, 3).speedup,
            "int8_speedup_interval": [t.compare(1, 3).speedup_low, t.compare(1, 3).speedup_high],
            "total_speedup": t.compare(0, 3).speedup,
        }
        for t in timings
    ]


def resnet56_rows(args: argparse.Namespace, work: Path) -> list[dict]:
    jpeg = None
    spec = load_model("resnet56", None, None)[1]
    if args.jpeg_limit:
        jpeg = load_dataset(shared_file("cifar10/test_jpeg_10000.npz"), spec, args.jpeg_limit)
    original_jpeg: list[float] | None = None
    rows = []
    for method in args.methods_r56:
        for target in args.targets:
            out = work / f"r56_{method}_{target:g}x"
            config = CompressConfig(
                model="resnet56",
                weights=shared_file("weights/resnet56-4bfd9763.th"),
                ranks=RankPolicy(method=method, macs_reduction=target),
                train_data=shared_file("cifar10/train_lossless_5085.npz"),
                train_limit=args.train_limit,
                eval_data=shared_file("cifar10/test_lossless_1017.npz"),
                quantize=QuantizeConfig(
                    dtype="int8", samples=args.calib_r56, stem_output=args.stem_output
                ),
                latency=LatencyConfig(
                    batch=args.batch, threads=[1], gate=False, warmup=3, repeats=args.repeats_r56
                ),
            )
            start = time.perf_counter()
            failed = None
            try:
                run_compress(config, out)
            except ValidationError as exc:  # below the agreement tolerance: the report is written
                failed = str(exc)
            report = Report.load(out / "report.json")
            quant = report.quantization
            row = {
                "model": "resnet56",
                "method": method,
                "target": target,
                "macs_reduction": report.macs_reduction,
                "seconds": time.perf_counter() - start,
                "failed": failed,
                "lossless": [
                    quant.original.float_accuracy,
                    quant.original.accuracy,
                    quant.compressed.float_accuracy,
                    quant.compressed.accuracy,
                ],
                "agreement": [quant.original.top1_agreement, quant.compressed.top1_agreement],
                "latency": [
                    {
                        "batch": r.batch,
                        "ms": [
                            r.original_ms,
                            r.original_int8_ms,
                            r.compressed_ms,
                            r.compressed_int8_ms,
                        ],
                        "float_speedup": r.original_ms / r.compressed_ms,
                        "int8_speedup": r.speedup,
                        "int8_speedup_interval": [r.speedup_low, r.speedup_high],
                        "total_speedup": r.total_speedup,
                    }
                    for r in quant.latency
                ],
            }
            if jpeg is not None:
                files = ["original.onnx", "original.int8.onnx", "model.onnx", "model.int8.onnx"]
                if original_jpeg is None:  # the original's files are the same in every run
                    original_jpeg = [
                        onnx_accuracy(out / name, batches(jpeg, spec)) for name in files[:2]
                    ]
                row["jpeg"] = original_jpeg + [
                    onnx_accuracy(out / name, batches(jpeg, spec)) for name in files[2:]
                ]
            rows.append(row)
            print_progress(row)
    return rows


def print_progress(row: dict) -> None:
    cells = ", ".join(
        f"b{r['batch']} " + " / ".join(f"{ms:.2f}" for ms in r["ms"]) + " ms"
        for r in row["latency"]
    )
    accuracy = "".join(
        f"; {key} " + " / ".join(f"{100 * a:.2f}" for a in row[key])
        for key in ("lossless", "jpeg")
        if key in row
    )
    print(f"{row['model']} {row['method']} {row['target']:g}×: {cells}{accuracy}", flush=True)


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | method | MACs × | batch | ms: " + " / ".join(NAMES) + " | float speedup | "
        "INT8 speedup (interval) | float orig. / INT8 comp. |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        for r in row["latency"]:
            low, high = r["int8_speedup_interval"]
            spread = "" if low is None else f" ({low:.2f}–{high:.2f})"
            lines.append(
                f"| {row['model']} | {row['method']} | {row['macs_reduction']:.2f} | {r['batch']} "
                f"| {' / '.join(f'{ms:.2f}' for ms in r['ms'])} | {r['float_speedup']:.2f}× | "
                f"{r['int8_speedup']:.2f}×{spread} | {r['total_speedup']:.2f}× |"
            )
    accuracy = [row for row in rows if "lossless" in row]
    if accuracy:
        lines += [
            "",
            "| model | method | MACs × | top-1 lossless-1017: "
            + " / ".join(NAMES)
            + " | INT8 − float compressed | top-1 JPEG-10k: "
            + " / ".join(NAMES)
            + " | agreement INT8 vs float (orig., comp.) |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for row in accuracy:
            lossless = row["lossless"]
            jpeg = row.get("jpeg")
            lines.append(
                f"| {row['model']} | {row['method']} | {row['macs_reduction']:.2f} | "
                + " / ".join(f"{100 * a:.2f}" for a in lossless)
                + f" | {100 * (lossless[3] - lossless[2]):+.2f} pt | "
                + ("–" if jpeg is None else " / ".join(f"{100 * a:.2f}" for a in jpeg))
                + f" | {100 * row['agreement'][0]:.2f} %, {100 * row['agreement'][1]:.2f} % |"
            )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    args.targets = [float(t) for t in args.targets.split(",")]
    args.batch = [int(b) for b in args.batch.split(",")]
    args.methods_r18 = [m for m in args.methods_r18.split(",") if m]
    args.methods_r56 = [m for m in args.methods_r56.split(",") if m]

    start = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="rankfold-int8-") as folder:
        work = Path(folder)
        if not args.skip_r18:
            rows += resnet18_rows(args, work)
        if not args.skip_r56:
            rows += resnet56_rows(args, work)
    seconds = time.perf_counter() - start
    table = markdown(rows)
    print(table)
    atomic_write_json(
        args.out or RESULTS / "int8.json",
        {
            "args": {k: str(v) for k, v in vars(args).items()},
            "date": datetime.date.today().isoformat(),
            "machine": platform.machine(),
            "onnxruntime": onnxruntime.__version__,
            "seconds": seconds,
            "rows": rows,
            "table": table,
        },
    )
    print(f"{seconds:.0f} s")


if __name__ == "__main__":
    main(ARGS)
