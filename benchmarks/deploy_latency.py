"""Deployment latency after the latency gate (issue #7): does saving MACs save time on ORT CPU?

Grid: torchvision ResNet-18 (224², random init) and CIFAR ResNet-56 (the shared pretrained
weights), each compressed with CP / CP-EPC / Tucker-2 at 2×, 3× and 4× fewer MACs (uniform
allocation, ranks aligned to the CPU's channel block where the layer is ≥ 4 blocks wide), then
four variants of the plan:
  plan         the MAC-budgeted plan as it is;
  gate         what `--latency-gate` does: per-layer table at batch 1 and 8; each other rank
               moves to its nearest multiple of 16 where the table says that is faster, then
               every layer whose block is not 5 % faster than the layer at both batch sizes
               reverts to the layer;
  gate+eff0.9  the same with `--gate-efficiency 0.9`: a block must also be ≥ 0.9 × its own MAC
               reduction faster, or its layer reverts;
  latency+gate the budget in measured time instead of MACs (the target read as a speedup of
               the conv layers at batch 1, priced by the same table), then the measured
               rounding and the gate: `--target latency --latency-gate --calibrate 0`;
  latency+cal  the same, calibrated on the whole model as `--target latency --latency-gate`
               does: each plan exported and timed against the original at batch 1, the table
               asked for more (or less) until the model is within 3 % of the target, at most
               two re-plans, the closest kept;
each then decomposed → cleaned up (BN folding, 1×1 merging, identity dropping) → exported to
ONNX → timed on ORT CPU against the original model side by side (alternating blocks of 5
runs), batch 1 and 8, one thread.

Weights do not change the run time of dense kernels, so blocks are built with random weights
(`restructure`) except for ResNet-56's final variant, which is factorized for real from the
trained weights (CP-ALS on ResNet-18's 512-channel kernels would take minutes per layer).
Every cleaned export is checked against the PyTorch model to 1e-4.
CP-EPC comes from `rankfold.passes.stable_methods`; without it the script runs CP and Tucker-2
and says so.

Run (~30 min on the shared 2-core machine, waiting for the lock not counted):
  flock /tmp/rankfold-bench.lock .venv/bin/python benchmarks/deploy_latency.py
Writes benchmarks/results/deploy_latency.json and prints the BENCHMARKS.md table.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before NumPy/torch load: one thread, as the shared machine needs

import argparse  # noqa: E402
import functools  # noqa: E402
import importlib  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime  # noqa: E402
import torch  # noqa: E402

from rankfold.converter.calibration import PlanTimer, calibrate  # noqa: E402
from rankfold.converter.config import CompressConfig, LatencyConfig  # noqa: E402
from rankfold.models import load_model, shared_file  # noqa: E402
from rankfold.passes import (  # noqa: E402
    METHODS,
    RankPolicy,
    analyze,
    decompose,
    plan_cost,
    restructure,
    select_ranks,
    trace,
)
from rankfold.passes.cleanup import cleanup  # noqa: E402
from rankfold.passes.core import PlanError, atomic_write_json  # noqa: E402
from rankfold.passes.latency_gate import gate_plan, round_ranks  # noqa: E402
from rankfold.runtime import compare_latency, export_onnx  # noqa: E402
from rankfold.runtime.backends import get_backend  # noqa: E402
from rankfold.runtime.latency import bench_rows  # noqa: E402
from rankfold.runtime.latency_model import LatencyMetric, LatencyTable  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MACHINE = "2-core x86-64 CPU, 24 GiB, no GPU"
DATE = "2026-11-24"

MODELS = {
    "resnet18": ("torchvision:resnet18", None, "restructure"),
    "resnet56": ("resnet56", "weights/resnet56-4bfd9763.th", "decompose"),
}


def epc_method_name() -> str | None:
    """CP-EPC's registered name, when rankfold.passes.stable_methods is there to register it."""
    try:
        importlib.import_module("rankfold.passes.stable_methods")
    except ImportError:
        return None
    return next((name for name in METHODS if "epc" in name), None)


def parity(module: torch.nn.Module, path: Path, shape: tuple[int, ...]) -> float:
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(3))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = module(x).numpy()
    return float(np.abs(session.run(None, {"input": x.numpy()})[0] - expected).max())


def latency_plan(
    requested: float, method, key, analysis, metric: LatencyMetric, round_to, batches, margin
):
    """`--target latency --latency-gate --calibrate 0`: measured budget, rounding, gate."""
    table = metric.table
    # The CLI hands the passes its provider's channel block for round_to "auto"; so does this.
    policy = RankPolicy(method=method, latency_reduction=requested, round_to=round_to)
    plan = select_ranks(analysis, policy, key, measured=metric)
    plan = round_ranks(plan, analysis, table, round_to, batches)
    return gate_plan(plan, analysis, table, batches, margin=margin)


def slowest_kept(plan, analysis, table: LatencyTable, batches: list[int]) -> float:
    """Largest block/layer time ratio among the layers the plan decomposes (1.0 = none)."""
    ratios = [
        table.block_ms(analysis.layer(e.name), e.method, e.ranks, b)
        / table.layer_ms(analysis.layer(e.name), b)
        for e in plan.decomposed()
        for b in batches
    ]
    return max(ratios, default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet56")
    parser.add_argument("--methods", default="cp,cp-epc,tucker2")
    parser.add_argument("--targets", default="2,3,4")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--margin", type=float, default=0.05)
    parser.add_argument("--round-to", type=int, default=16, help="multiple for measured rounding")
    parser.add_argument("--efficiency", type=float, default=0.9, help="gate+eff minimum")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=RESULTS / "deploy_latency.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    batches = [int(b) for b in args.batches.split(",")]
    targets = [float(t) for t in args.targets.split(",")]
    methods, notes = [], []
    epc = epc_method_name()
    for name in args.methods.split(","):
        if name == "cp-epc":
            if epc is None:
                notes.append("CP-EPC not run: rankfold.passes.stable_methods is not available")
                continue
            name = epc
        methods.append(name)

    cache = Path(tempfile.mkdtemp(prefix="rankfold-deploy-cache-"))  # a fresh table per run
    table = LatencyTable("cpu", cache_dir=cache, threads=1)
    metric = LatencyMetric(table, batch=batches[0], round_to=args.round_to)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="rankfold-deploy-"))
    for key in args.models.split(","):
        name, weights, build = MODELS[key]
        model, spec = load_model(name, shared_file(weights) if weights else None)
        torch.manual_seed(0)
        example = torch.zeros(1, *spec.input_shape)
        gm = trace(model, example)
        analysis = analyze(gm)
        original, _ = cleanup(gm)
        original_onnx = export_onnx(original, example, work / f"{key}-original.onnx")
        timing = LatencyConfig(
            batch=batches[:1], threads=1, warmup=args.warmup, repeats=args.repeats
        )
        timer = PlanTimer(gm, analysis, example, CompressConfig(model=key, latency=timing))
        for method in methods:
            for target in targets:
                started = time.perf_counter()
                policy = RankPolicy(method=method, macs_reduction=target, round_to=args.round_to)
                plan = select_ranks(analysis, policy, key)
                measured, table_start = table.measured, time.perf_counter()
                rounded = round_ranks(plan, analysis, table, args.round_to, batches)
                gated = gate_plan(rounded, analysis, table, batches, margin=args.margin)
                efficient = gate_plan(
                    rounded,
                    analysis,
                    table,
                    batches,
                    margin=args.margin,
                    min_efficiency=args.efficiency,
                )
                variants = [
                    ("plan", plan),
                    ("gate", gated),
                    (f"gate+eff{args.efficiency:g}", efficient),
                ]

                planned_at = functools.partial(
                    latency_plan,
                    method=method,
                    key=key,
                    analysis=analysis,
                    metric=metric,
                    round_to=args.round_to,
                    batches=batches,
                    margin=args.margin,
                )
                try:
                    variants.append(("latency+gate", planned_at(target)))
                except PlanError as exc:  # e.g. 4× faster convs is out of reach
                    notes.append(f"{key} {method} latency {target:g}×: {exc}")
                else:
                    calibrated = calibrate(
                        target,
                        planned_at,
                        lambda p, q, timer=timer: timer(p, f"{q:.2f}×"),
                        rounds=2,
                    )
                    variants.append(("latency+cal", calibrated.plan))
                table_s = time.perf_counter() - table_start
                for index, (variant, chosen) in enumerate(variants):
                    # Factorize for real only where it is affordable and the variant is final.
                    real = build == "decompose" and index == len(variants) - 1
                    decompose_start = time.perf_counter()
                    if real:
                        compressed, _ = decompose(gm, analysis, chosen, seed=0)
                    else:
                        compressed = restructure(gm, analysis, chosen)
                    decompose_s = time.perf_counter() - decompose_start
                    compressed.eval()
                    cleaned, counts = cleanup(compressed)
                    path = export_onnx(cleaned, example, work / f"{key}-{method}-{target}.onnx")
                    diff = parity(compressed, path, spec.input_shape)
                    mac_reduction = analysis.total_macs / plan_cost(analysis, chosen).macs
                    latency = compare_latency(
                        original_onnx,
                        path,
                        spec.input_shape,
                        batches,
                        warmup=args.warmup,
                        repeats=args.repeats,
                        threads=1,
                    )
                    reverted = [e.name for e in chosen.layers if e.reason.startswith("reverted")]
                    moved = [e.name for e in chosen.layers if "; rounded " in e.reason]
                    for row in bench_rows(latency, mac_reduction):
                        rows.append(
                            {
                                "model": key,
                                "method": method,
                                "target": target,
                                "variant": variant,
                                "weights": "factorized" if real else "random (restructure)",
                                "decompose_seconds": decompose_s,
                                "decomposed_layers": len(chosen.decomposed()),
                                "reverted_layers": len(reverted),
                                "reverted": reverted,
                                "rounded_layers": len(moved),
                                "max_block_over_layer_ms": slowest_kept(
                                    chosen, analysis, table, batches
                                ),
                                "parity_max_abs_diff": diff,
                                "cleanup": counts,
                                # What the --target latency budget predicted (batch 1).
                                "table_speedup_b1": (
                                    metric.total(analysis) / metric.plan_total(analysis, chosen)
                                    if variant.startswith("latency")
                                    else None
                                ),
                                "calibration": (
                                    [asdict(r) for r in calibrated.rounds]
                                    if variant == "latency+cal"
                                    else None
                                ),
                                "table_new_measurements": table.measured - measured,
                                "table_seconds": table_s,
                                **row,
                            }
                        )
                        r = rows[-1]
                        print(
                            f"{key:9s} {method:8s} {target:g}× {variant:12s} b{r['batch']}: "
                            f"MACs {mac_reduction:.2f}× ({len(reverted)} reverted, "
                            f"{len(moved)} rounded), {r['original_ms']:.2f} → "
                            f"{r['compressed_ms']:.2f} ms, speedup {r['speedup']:.2f}×, ratio "
                            f"{r['speedup_per_mac_reduction']:.2f}, parity {diff:.1e}",
                            flush=True,
                        )
                print(
                    f"  ({time.perf_counter() - started:.0f} s, table {table_s:.1f} s, "
                    f"{table.measured - measured} new timings)",
                    flush=True,
                )

    payload = {
        "date": DATE,
        "machine": MACHINE,
        "machine_id": get_backend("cpu").machine_id(),
        "platform": platform.platform(),
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "threads": 1,
        "batches": batches,
        "margin": args.margin,
        "round_to": args.round_to,
        "min_efficiency": args.efficiency,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "notes": notes,
        "table_measurements": table.measured,
        "rows": rows,
    }
    atomic_write_json(args.out, payload)
    print_markdown(rows, notes)


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
        if variant != "latency+cal":
            continue
        plain = at_b1[(model, method, target, "latency+gate")]
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
    main()
