"""Deployment latency after the latency gate (issue #7): does saving MACs save time on ORT CPU?

Grid: torchvision ResNet-18 (224², random init) and CIFAR ResNet-56 (the shared pretrained
weights), each compressed with CP / CP-EPC / Tucker-2 at 2×, 3× and 4× fewer MACs (each
method's default selector, or --select: uniform for CP, energy for Tucker-2; ranks aligned to 16
channels where the layer is ≥ 4 blocks wide), in five variants, each one `run_compress` run
(what `rankfold compress` does) with the options named:
  plan         `--macs-reduction X --round-to 16 --no-latency-gate`: the MAC-budgeted plan as it
               is (the gate is on by default with a budget);
  gate         plus `--latency-gate`: per-layer table at batch 1 and 8; each rank moves to its
               nearest multiple of 16 where the table says that is faster, then every layer whose
               block is not 5 % faster than the layer at both batch sizes reverts to the layer;
  gate+eff0.9  plus `--gate-efficiency 0.9`: a block must also be ≥ 0.9 × its own MAC
               reduction faster, or its layer reverts;
  latency+gate `--latency-reduction X --latency-gate --calibrate 0`: the budget in measured time
               (a speedup of the conv layers at batch 1, priced by the same table), then the
               measured rounding and the gate;
  latency+cal  the same with the default `--calibrate 2`: each plan exported and timed against
               the original at batch 1, the table asked for more (or less) until the model is
               within 3 % of the target, the closest plan kept.
The pipeline factorizes, cleans up (BN folding, 1×1 merging, identity dropping), exports, checks
parity and times the ONNX models side by side at batch 1 and 8 with one thread; this script reads
each run's report.json. All runs share one latency-table cache, so a layer is timed once.

CP-ALS on ResNet-18's 512-channel kernels takes minutes per layer, and every variant factorizes
for real, so the whole grid takes hours here; select rows with --models/--methods/--targets/
--variants (one row: `--models resnet56 --methods cp --targets 3 --variants gate`, ~3 min).

  flock /tmp/rankfold-bench.lock .venv/bin/python benchmarks/deploy_latency.py
Writes benchmarks/results/deploy_latency.json and prints the BENCHMARKS.md table.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before NumPy/torch load: one thread, as the shared machine needs

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet56")
    parser.add_argument("--methods", default="cp,cp-epc,tucker2")
    parser.add_argument("--targets", default="2,3,4")
    parser.add_argument(
        "--variants", default="plan,gate,gate+eff0.9,latency+gate,latency+cal", help="see above"
    )
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--select", default=None, help="rank selector (default: the method's)")
    parser.add_argument("--margin", type=float, default=0.05)
    parser.add_argument("--round-to", type=int, default=16, help="multiple ranks align to")
    parser.add_argument("--efficiency", type=float, default=0.9, help="gate+eff minimum")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--work", type=Path, default=None, help="folder for the runs' outputs")
    parser.add_argument("--out", type=Path, default=RESULTS / "deploy_latency.json")
    args = parser.parse_args()
    for variant in args.variants.split(","):
        if variant.startswith("gate+eff") and variant != f"gate+eff{args.efficiency:g}":
            parser.error(f"variant {variant} does not match --efficiency {args.efficiency:g}")
    return args


if __name__ == "__main__":
    ARGS = parse_args()  # before the heavy imports below: --help answers at once

import onnxruntime  # noqa: E402
import torch  # noqa: E402

from rankfold.converter import build_config, run_compress  # noqa: E402
from rankfold.models import load_model, shared_file  # noqa: E402
from rankfold.passes import ModelAnalysis, Plan, analyze, trace  # noqa: E402
from rankfold.passes.core import PlanError, atomic_write_json  # noqa: E402
from rankfold.runtime import get_backend  # noqa: E402
from rankfold.runtime.latency_model import LatencyTable  # noqa: E402

MACHINE = "2-core x86-64 CPU, 24 GiB, no GPU"

MODELS = {
    "resnet18": ("torchvision:resnet18", None),
    "resnet56": ("resnet56", "weights/resnet56-4bfd9763.th"),
}


def variant_settings(variant: str, target: float, efficiency: float) -> tuple[dict, dict]:
    """The `ranks` and `latency` settings of a variant: the CLI options it stands for."""
    settings: dict[str, tuple[dict, dict]] = {
        "plan": ({"macs_reduction": target}, {"gate": False}),  # the gate is on by default
        "gate": ({"macs_reduction": target}, {"gate": True}),
        f"gate+eff{efficiency:g}": (
            {"macs_reduction": target},
            {"gate": True, "gate_efficiency": efficiency},
        ),
        "latency+gate": ({"latency_reduction": target}, {"gate": True, "calibrate": 0}),
        "latency+cal": ({"latency_reduction": target}, {"gate": True}),
    }
    return settings[variant]


def slowest_kept(plan: Plan, analysis: ModelAnalysis, table: LatencyTable, batches) -> float:
    """Largest block/layer time ratio among the layers the plan decomposes (0.0 = none); the
    gated runs timed these already, so the shared table cache answers without new timings."""
    ratios = [
        table.block_ms(analysis.layer(e.name), e.method, e.ranks, b)
        / table.layer_ms(analysis.layer(e.name), b)
        for e in plan.decomposed()
        for b in batches
    ]
    return max(ratios, default=0.0)


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    batches = [int(b) for b in args.batches.split(",")]
    targets = [float(t) for t in args.targets.split(",")]
    variants = args.variants.split(",")
    work = args.work or Path(tempfile.mkdtemp(prefix="rankfold-deploy-"))
    cache = work / "latency-table"  # a fresh table per benchmark, shared by its runs
    table = LatencyTable("cpu", cache_dir=cache, threads=1)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for key in args.models.split(","):
        name, weights = MODELS[key]
        model, spec = load_model(name, shared_file(weights) if weights else None)
        analysis = analyze(trace(model, torch.zeros(1, *spec.input_shape)))
        for method in args.methods.split(","):
            for target in targets:
                for variant in variants:
                    ranks, latency = variant_settings(variant, target, args.efficiency)
                    config = build_config(
                        {
                            "model": name,
                            "weights": str(shared_file(weights)) if weights else None,
                            "ranks": {
                                "method": method,
                                "round_to": args.round_to,
                                "select": args.select,
                                **ranks,
                            },
                            "latency": {
                                "batch": batches,
                                "threads": 1,
                                "warmup": args.warmup,
                                "repeats": args.repeats,
                                "gate_margin": args.margin,
                                "cache_dir": str(cache),
                                **latency,
                            },
                        }
                    )
                    out = work / f"{key}-{method}-{target:g}x-{variant}"
                    started = time.perf_counter()
                    try:
                        run_compress(config, out)
                    except PlanError as exc:  # e.g. 4× faster convs is out of reach
                        notes.append(f"{key} {method} {target:g}× {variant}: {exc}")
                        continue
                    seconds = time.perf_counter() - started
                    report = json.loads((out / "report.json").read_text())
                    slowest = slowest_kept(Plan.load(out / "plan.json"), analysis, table, batches)
                    for row in report_rows(report, key, method, target, variant, seconds):
                        rows.append({**row, "max_block_over_layer_ms": slowest})
                        print_progress(rows[-1])

    payload = {
        "machine": MACHINE,
        "machine_id": get_backend("cpu").machine_id(),
        "platform": platform.platform(),
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "threads": 1,
        "batches": batches,
        "margin": args.margin,
        "round_to": args.round_to,
        "select": args.select,
        "min_efficiency": args.efficiency,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "notes": notes,
        "work": str(work),
        "rows": rows,
    }
    atomic_write_json(args.out, payload)
    print_markdown(rows, notes)


def report_rows(
    report: dict, key: str, method: str, target: float, variant: str, seconds: float
) -> list[dict[str, Any]]:
    """One row per batch size from a run's report.json."""
    selection = report["selection"]
    gate = selection.get("latency_gate") or {"reverted": [], "rounded": []}
    calibration = selection.get("latency_calibration")
    predicted = selection.get("latency_ms")
    reduction = report["macs_reduction"]
    common = {
        "model": key,
        "method": method,
        "target": target,
        "variant": variant,
        "run_seconds": seconds,
        "decompose_seconds": sum(row["seconds"] for row in report["layers"]),
        "decomposed_layers": sum(row["status"] == "decomposed" for row in report["layers"]),
        "reverted_layers": len(gate["reverted"]),
        "reverted": gate["reverted"],
        "rounded_layers": len(gate["rounded"]),
        "parity_max_abs_diff": report["onnx"]["max_abs_diff"],
        "cleanup": report["cleanup"],
        # What the --latency-reduction budget predicted at batch 1 (the per-layer table).
        "table_speedup_b1": predicted["reduction"] if predicted else None,
        "calibration": calibration["rounds"] if calibration else None,
        "mac_reduction": reduction,
    }
    return [
        {**common, **row, "speedup_per_mac_reduction": row["speedup"] / reduction}
        for row in report["latency"]["per_batch"]
    ]


def print_progress(r: dict[str, Any]) -> None:
    print(
        f"{r['model']:9s} {r['method']:8s} {r['target']:g}× {r['variant']:12s} b{r['batch']}: "
        f"MACs {r['mac_reduction']:.2f}× ({r['reverted_layers']} reverted, "
        f"{r['rounded_layers']} rounded), {r['original_ms']:.2f} → {r['compressed_ms']:.2f} ms, "
        f"speedup {r['speedup']:.2f}×, ratio {r['speedup_per_mac_reduction']:.2f}, "
        f"parity {r['parity_max_abs_diff']:.1e}, run {r['run_seconds']:.0f} s",
        flush=True,
    )


def print_markdown(rows: list[dict], notes: list[str]) -> None:
    """One line per model/method/target/variant, its batch sizes side by side (BENCHMARKS.md)."""
    grouped: dict[tuple, list[dict]] = {}
    for r in rows:
        grouped.setdefault((r["model"], r["method"], r["target"], r["variant"]), []).append(r)
    batches = sorted({r["batch"] for r in rows})
    per_batch = " | ".join(
        f"b{b} ms orig → comp | b{b} speedup | b{b} speedup/MACs×" for b in batches
    )
    print()
    print(
        f"| model | method | target | variant | MACs × | reverted / rounded | {per_batch} | "
        "slowest block/layer |"
    )
    print("|---|---|---|---|---:|---:|" + "---:|---:|---:|" * len(batches) + "---:|")
    for (model, method, target, variant), group in grouped.items():
        first = group[0]
        cells = []
        for b in batches:
            r = next(x for x in group if x["batch"] == b)
            ms = f"{r['original_ms']:.2f} → {r['compressed_ms']:.2f}"
            if r["original_ms"] >= 100:
                ms = f"{r['original_ms']:.1f} → {r['compressed_ms']:.1f}"
            cells.append(f"{ms} | {r['speedup']:.2f} | {r['speedup_per_mac_reduction']:.2f}")
        print(
            f"| {model} | {method} | {target:g}× | {variant} | {first['mac_reduction']:.2f} | "
            f"{first['reverted_layers']} / {first['rounded_layers']} | {' | '.join(cells)} | "
            f"{first['max_block_over_layer_ms']:.2f} |"
        )
    print_calibration(rows)
    for note in notes:
        print(f"\n{note}")


def print_calibration(rows: list[dict]) -> None:
    """Latency targets at batch 1: the table alone against the calibrated plan (BENCHMARKS.md)."""
    at_b1 = {
        (r["model"], r["method"], r["target"], r["variant"]): r for r in rows if r["batch"] == 1
    }
    print()
    print(
        "| model | method | target | table only: table → measured (MACs ×) | calibrated: "
        "rounds requested → timed | kept: measured (MACs ×) |"
    )
    print("|---|---|---:|---:|---|---:|")
    for (model, method, target, variant), r in at_b1.items():
        plain = at_b1.get((model, method, target, "latency+gate"))
        if variant != "latency+cal" or plain is None:
            continue
        rounds = ", ".join(
            f"{c['requested']:.2f} → {c['measured']:.2f}" if c["measured"] else "out of reach"
            for c in r["calibration"]
        )
        print(
            f"| {model} | {method} | {target:g}× | {plain['table_speedup_b1']:.2f} → "
            f"{plain['speedup']:.2f} ({plain['mac_reduction']:.2f}) | {rounds} | "
            f"{r['speedup']:.2f} ({r['mac_reduction']:.2f}) |"
        )


if __name__ == "__main__":
    main(ARGS)
