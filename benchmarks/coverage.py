"""Architecture coverage: what `rankfold compress` decomposes and keeps on torchvision models.

    python benchmarks/coverage.py            # the table of BENCHMARKS.md (reduced input sizes)
    python benchmarks/coverage.py --quick    # RegNetX-400MF and ConvNeXt-tiny only
    python benchmarks/coverage.py --only swin_t,maxvit_t   # rows whose name holds a part
    python benchmarks/coverage.py --only segmentation. --only detection. \
        --results coverage_tasks.json      # the segmentation and detection rows only

Each model runs through the public pipeline (`run_compress`, what `rankfold compress` does) with
random weights and no latency timing: layers decomposed / kept (by reason), MAC reduction, ONNX
parity (per output for models returning several tensors) and wall time. For the grouped-conv
models it also reports the MAC reduction reachable (every budgeted layer at its smallest ranks,
the planner's own ceiling) with grouped convs kept whole, as before grouped support, and
decomposed per group. Input sizes are reduced where the
architecture allows (said in the table) to keep the whole run within ~10 CPU minutes. Writes
benchmarks/results/coverage.json and, unless --no-record, a section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import platform
import re
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="RegNetX-400MF and ConvNeXt only.")
    parser.add_argument("--out", default="/tmp/rankfold-coverage")
    parser.add_argument("--no-record", action="store_true", help="Do not append to BENCHMARKS.md.")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        help="Run only the models whose name contains one of these comma-separated parts "
        "(repeatable).",
    )
    parser.add_argument(
        "--results", default="coverage.json", help="File name under benchmarks/results/."
    )
    parser.add_argument(
        "--reachable-only",
        action="store_true",
        help="Only the grouped models' MACs reachable (analysis, no compression; ~1 minute).",
    )
    return parser.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()  # before the heavy imports below: --help answers at once

import torch  # noqa: E402

from rankfold.converter import CompressConfig, ExportConfig, LatencyConfig, run_compress  # noqa: E402
from rankfold.models import load_model  # noqa: E402
from rankfold.passes import RankPolicy, analyze, trace  # noqa: E402
from rankfold.passes.analysis import (  # noqa: E402
    ACTIVATION_PRODUCT_NOTE,
    ATTENTION_PRODUCTS_NOTE,
)
from rankfold.passes.core import atomic_write_json  # noqa: E402
from rankfold.passes.plan import budgeted_slots  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# (model, method, MAC reduction, input shape or None for the model's own 3×224×224). ViT and
# MaxViT check their input size against the one they were built for, so they run at 224². The
# ViTs get a random head (torchvision's is zeros, so their outputs would be zeros).
VIT_FILE = ROOT / "benchmarks" / "model_files" / "vit_random_head.py"
MODELS = [
    ("torchvision:regnet_x_400mf", "tucker2", 1.5, (3, 128, 128)),
    ("torchvision:resnext50_32x4d", "tucker2", 1.5, (3, 64, 64)),
    ("torchvision:convnext_tiny", "svd", 1.2, (3, 64, 64)),
    ("torchvision:swin_t", "svd", 1.5, (3, 64, 64)),
    (f"{VIT_FILE}:vit_b_32", "svd", 1.5, None),
    (f"{VIT_FILE}:vit_b_16", "svd", 1.5, None),
    ("torchvision:maxvit_t", "svd", 1.5, None),
    # Outputs other than logits: {"out", "aux"}, {"out"}, and five FPN feature maps.
    ("torchvision:segmentation.fcn_resnet50", "tucker2", 1.5, (3, 128, 128)),
    ("torchvision:segmentation.lraspp_mobilenet_v3_large", "svd", 1.5, (3, 128, 128)),
    ("torchvision:detection.fasterrcnn_resnet50_fpn.backbone", "svd", 1.5, (3, 128, 128)),
]
GROUPED = {"torchvision:regnet_x_400mf", "torchvision:resnext50_32x4d"}


def label(model_name: str) -> str:
    """The table's name for a row: the torchvision name, and whether its head was replaced."""
    name = model_name.split(":")[-1]
    return f"{name} (random head)" if model_name.startswith(str(VIT_FILE)) else name


def reason_kind(reason: str) -> str:
    """A kept layer's reason without its numbers, so equal reasons count together."""
    text = reason.removeprefix("skipped: ")
    return re.sub(r"\s*\(groups=\d+\)|[\d.]+%", "", text).split(";")[0].strip()


def reachable(model_name: str, method: str, shape) -> list[dict]:
    """Per min_macs_share (the default, and 0), the MACs in budgeted layers and the planner's
    MAC-reduction ceiling, with grouped convs kept whole (before) and decomposed (after)."""
    model, spec = load_model(model_name, input_shape=shape)
    analysis = analyze(trace(model, torch.zeros(1, *spec.input_shape)))
    grouped = [
        layer for layer in analysis.layers if 1 < layer.groups < layer.in_features
    ]  # not depthwise, which stays whole
    rows = []
    for share in (RankPolicy().min_macs_share, 0.0):
        row = {
            "min_macs_share": share,
            "grouped_layers": len(grouped),
            "grouped_macs_share": sum(layer.macs for layer in grouped) / analysis.total_macs,
        }
        for label, skip in (("before", [layer.name for layer in grouped]), ("after", [])):
            policy = RankPolicy(method=method, skip=skip, min_macs_share=share)
            slots = budgeted_slots(analysis, policy)
            smallest = sum(slot.cost(slot.candidates()[0], "macs") for slot in slots)
            budgeted = sum(slot.cost(None, "macs") for slot in slots)
            row[f"{label}_budgeted_share"] = budgeted / analysis.total_macs
            row[f"{label}_reachable"] = analysis.total_macs / (
                analysis.total_macs - budgeted + smallest
            )
        rows.append(row)
    return rows


def run(model_name: str, method: str, reduction: float, shape, out: Path) -> dict:
    config = CompressConfig(
        model=model_name,
        input_shape=shape,
        ranks=RankPolicy(method=method, macs_reduction=reduction),
        export=ExportConfig(parity_samples=8),
        latency=LatencyConfig(enabled=False),
    )
    start = time.perf_counter()
    run_compress(config, out)
    seconds = time.perf_counter() - start
    report = json.loads((out / "report.json").read_text())
    layers = report["layers"]
    kept = collections.Counter(
        reason_kind(row["reason"]) for row in layers if row["status"] == "skipped"
    )
    functional = report["original"]["functional_macs"]
    notes = (ATTENTION_PRODUCTS_NOTE, ACTIVATION_PRODUCT_NOTE)
    products = {k: v for k, v in functional.items() if k.endswith(notes)}
    functional = {k: v for k, v in functional.items() if k not in products}
    return {
        "model": model_name,
        "method": method,
        "target": reduction,
        "input_shape": list(shape) if shape else [3, 224, 224],
        "layers": len(layers),
        "decomposed": sum(row["status"] == "decomposed" for row in layers),
        "grouped_decomposed": sum(
            row["status"] == "decomposed" and "per group" in row["reason"] for row in layers
        ),
        "kept": dict(kept),
        "not_decomposable_calls": len(functional),
        "not_decomposable_macs_share": sum(functional.values()) / report["original"]["macs"],
        "attention_products": len(products),
        "attention_products_macs_share": sum(products.values()) / report["original"]["macs"],
        "macs_reduction": report["macs_reduction"],
        "max_abs_diff": report["onnx"]["max_abs_diff"],
        "parity_passed": report["onnx"]["parity_passed"],
        "outputs": [
            {key: o[key] for key in ("name", "max_abs_diff", "max_rel_diff", "scale")}
            for o in report["onnx"]["outputs"]
        ],
        "seconds": seconds,
    }


def main(args: argparse.Namespace) -> None:
    models = [m for m in MODELS if not args.quick or m[0].endswith(("400mf", "convnext_tiny"))]
    if args.only:
        parts = [part for value in args.only for part in value.split(",") if part]
        unknown = sorted(p for p in parts if not any(p in m[0] for m in MODELS))
        if unknown:
            names = ", ".join(m[0].split(":")[-1] for m in MODELS)
            raise SystemExit(f"--only: no row matches {', '.join(unknown)}; rows: {names}")
        models = [m for m in models if any(part in m[0] for part in parts)]
    rows, ceilings = [], {}
    for model_name, method, reduction, shape in models:
        tag = model_name.split(":")[-1]
        if model_name in GROUPED:
            ceilings[model_name] = reachable(model_name, method, shape)
            print(tag, ceilings[model_name], flush=True)
        if not args.reachable_only:
            rows.append(run(model_name, method, reduction, shape, Path(args.out) / tag))
            print(json.dumps(rows[-1]), flush=True)
    name = "coverage_reachable.json" if args.reachable_only else args.results
    atomic_write_json(
        ROOT / "benchmarks" / "results" / name,
        {"args": vars(args), "rows": rows, "reachable": ceilings},
    )

    lines = [
        "| model | input | method, target | layers decomposed | kept (by reason) | MACs "
        "reduction | ONNX parity (max abs diff) | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        kept = "; ".join(f"{n}× {why}" for why, n in sorted(row["kept"].items())) or "none"
        if row["attention_products"]:
            kept += (
                f"; {row['attention_products']} activation product(s) (attention) "
                f"({row['attention_products_macs_share']:.1%} of MACs)"
            )
        if row["not_decomposable_calls"]:
            kept += (
                f"; {row['not_decomposable_calls']} functional/attention call(s) "
                f"({row['not_decomposable_macs_share']:.0%} of MACs) not decomposable"
            )
        grouped = f" ({row['grouped_decomposed']} grouped)" if row["grouped_decomposed"] else ""
        parity = f"{row['max_abs_diff']:.1e}"
        if len(row["outputs"]) > 1:  # each output's max abs diff and the scale it is read on
            parity = ", ".join(
                f"{o['name']} {o['max_abs_diff']:.1e} of {o['scale']:.2g}" for o in row["outputs"]
            )
        lines.append(
            f"| {label(row['model'])} | {'×'.join(map(str, row['input_shape']))} | "
            f"{row['method']}, {row['target']:g}× | {row['decomposed']}/{row['layers']}{grouped} | "
            f"{kept} | {row['macs_reduction']:.2f}× | "
            f"{'passed' if row['parity_passed'] else 'FAILED'} ({parity}) | "
            f"{row['seconds']:.0f} |"
        )
    table = "\n".join(lines)
    ceiling_lines = [
        "| model | grouped convs (MAC share) | min_macs_share | before: MACs in budgeted "
        "layers, reachable | after: MACs in budgeted layers, reachable |",
        "|---|---|---|---|---|",
    ]
    for model_name, ceiling in ceilings.items():
        for c in ceiling:
            ceiling_lines.append(
                f"| {model_name.split(':')[-1]} | {c['grouped_layers']} "
                f"({c['grouped_macs_share']:.1%}) | {c['min_macs_share']:.1%} | "
                f"{c['before_budgeted_share']:.1%}, {c['before_reachable']:.2f}× | "
                f"{c['after_budgeted_share']:.1%}, {c['after_reachable']:.2f}× |"
            )
    ceiling_table = "\n".join(ceiling_lines)
    print(table)
    if ceilings:
        print(ceiling_table)
    if args.no_record:
        return
    flags = [
        f for f, on in (("--quick", args.quick), ("--reachable-only", args.reachable_only)) if on
    ]
    flags += [f"--only {part}" for part in args.only]
    if args.results != "coverage.json":
        flags.append(f"--results {args.results}")
    command = " ".join(["python benchmarks/coverage.py", *flags])
    header = (
        f"Command: `{command}`  \nMachine: 2-core x86-64 CPU ({platform.processor() or 'x86_64'}"
        f"), AVX-512, no GPU; shared with other jobs (wall times are not comparable to quiet "
        f"runs).  \nDate: {datetime.date.today().isoformat()}. Random weights"
    )
    title = (
        "models returning several outputs (segmentation, detection backbones)"
        if args.only
        else "grouped convs and transformers"
    )
    coverage = (
        f"\n## Architecture coverage: {title}\n\n"
        f"{header}, no latency timing, 8 parity samples; input sizes reduced where the "
        "architecture accepts it (ViT and MaxViT check their 224² input; the ViTs with a random "
        "head, `benchmarks/model_files/vit_random_head.py`). Kept layers are counted by "
        f"reason.\n\n{table}\n\n"
    )
    if not ceilings:
        with open(ROOT / "BENCHMARKS.md", "a", encoding="utf-8") as handle:
            handle.write(coverage)
        return
    section = (
        ("" if args.reachable_only else coverage)
        + "\n## Grouped convs: MACs reachable before and after grouped support\n\n"
        + f"{header}; input sizes as in the coverage table. "
        "MACs held by the layers a budget may decompose, and the MAC reduction reachable "
        "(every budgeted layer at its smallest ranks: the planner's ceiling), tucker2, with "
        "grouped convs kept whole as before grouped support, and decomposed per group; at "
        "the default min_macs_share (layers below it are kept whole) and at 0:\n\n"
        f"{ceiling_table}\n"
    )
    with open(ROOT / "BENCHMARKS.md", "a", encoding="utf-8") as handle:
        handle.write(section)


if __name__ == "__main__":
    main(ARGS)
