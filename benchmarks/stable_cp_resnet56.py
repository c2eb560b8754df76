"""Stable CP (issue #3): CP-ALS vs CP-EPC vs the Tucker-2 + CP hybrid on a pretrained ResNet-56.

Every 3×3 conv except the stem (54 layers) gets, per layer, the largest ranks whose block has at
most a third of the layer's MACs (per-layer 3×; the whole model then runs 2.97× fewer MACs, since
the stem and the classifier stay whole). `cp` is the pipeline's CP-ALS; `cp-epc` starts from the
very same ALS (same call, same seed) and runs EPC at the ALS error; `tucker2-cp` is the hybrid at
the same per-layer MAC cap. Reported per layer: relative kernel error, sensitivity (the issue's
ss, all scale in the T mode; for the hybrid that of its R_S×R_T×kh·kw core), the largest
component norm max|λ_r|, and seconds; per model: top-1 accuracy on cifar10/test_lossless_1017.npz
right after decomposition and after BatchNorm recalibration on train_lossless_5085.npz, and the
decomposition wall time. Each method is one `run_compress` run (what `rankfold compress` does
with these per-layer ranks, `--train-data` and `--eval-data`); the figures come from its
report.json. A diagnostic row refactorizes cp-epc's plan (`decompose`, same seed, so the same
blocks), rescales each kernel to its least-squares scale (EPC's minimum-norm fit shrinks the
kernel a little) and scores that model right after decomposition.

The pipeline's ALS is short (100 plain sweeps) on purpose: long line-searched ALS drifts into
degenerate components. To show what EPC does to such a start, the run also decomposes with
`cp_als`'s own defaults (up to 300 line-searched sweeps; `cp-ls` / `cp-epc-ls`, skip with
--no-long-als).

    flock /tmp/rankfold-bench.lock .venv/bin/python benchmarks/stable_cp_resnet56.py
One row (cp → cp-epc, ~5 min): add --quick (no long ALS, no hybrid, no rescaling diagnostic).

Single-threaded. Writes benchmarks/results/stable_cp_resnet56.json and .png and prints the
tables for BENCHMARKS.md.
"""

from __future__ import annotations

import os

# Before NumPy and torch load: one BLAS/OpenMP thread on the shared 2-core machine.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-long-als", action="store_true", help="skip cp-ls / cp-epc-ls")
    parser.add_argument(
        "--quick", action="store_true", help="cp and cp-epc only: the cp → cp-epc row"
    )
    parser.add_argument("--work", type=Path, default=None, help="folder for the runs' outputs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()  # before the heavy imports below: --help answers at once

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rankfold.converter import build_config, run_compress  # noqa: E402
from rankfold.models import (  # noqa: E402
    SHARED_CHECKPOINTS,
    batches,
    load_dataset,
    load_model,
    shared_file,
)
from rankfold.passes import (  # noqa: E402
    Plan,
    RankPolicy,
    analyze,
    decompose,
    get_method,
    plan_cost,
    register_method,
    select_ranks,
    trace,
)
from rankfold.passes.blocks import merge_in, merge_out  # noqa: E402
from rankfold.passes.core import atomic_path, atomic_write_json  # noqa: E402
from rankfold.passes.factorizations import cp_als  # noqa: E402
from rankfold.passes.methods import METHODS, CPEPCMethod, CPMethod  # noqa: E402
from rankfold.runtime import get_backend, torch_accuracy  # noqa: E402

MACHINE = "2-core x86-64 CPU, 24 GiB, no GPU"
DATE = "2026-11-24"
REDUCTION = 3.0
EPC_SLACK = 1.001  # the "EPC ≤ ALS × 1.001"
COMMAND = "flock /tmp/rankfold-bench.lock .venv/bin/python benchmarks/stable_cp_resnet56.py"
WEIGHTS = SHARED_CHECKPOINTS["resnet56"][0]


class LongALSCP(CPMethod):
    """CP by `cp_als` with its defaults (up to 300 sweeps with line search): a degenerate start."""

    name = "cp-ls"

    def factorize(self, tensor: np.ndarray, rank: int, seed: int):
        return cp_als(tensor, rank, seed=seed), {}


class LongALSEPC(CPEPCMethod, LongALSCP):
    """EPC from LongALSCP's start (CPEPCMethod.factorize's super() resolves to LongALSCP)."""

    name = "cp-epc-ls"


def per_layer_ranks(method_name: str, layers) -> dict[str, list[int]]:
    """Per layer, the largest candidate whose block keeps ≤ 1/REDUCTION of the layer's MACs."""
    method = get_method(method_name)
    chosen = {}
    for layer in layers:
        fits = [
            c
            for c in method.candidates(layer)
            if method.cost(layer, c).macs * REDUCTION <= layer.macs
        ]
        chosen[layer.name] = list(fits[-1])
    return chosen


def accuracy(model, dataset, spec) -> float:
    return torch_accuracy(model, batches(dataset, spec, 256))


def cp_block_kernel(block) -> np.ndarray:
    """T×S×kh×kw kernel of a cp block: pointwise_out · diag(depthwise) · pointwise_in."""
    p_in = block.pointwise_in.weight.detach().double()[:, :, 0, 0]
    depth = block.depthwise.weight.detach().double()[:, 0]
    p_out = block.pointwise_out.weight.detach().double()[:, :, 0, 0]
    return torch.einsum("tr,rhw,rs->tshw", p_out, depth, p_in).numpy()


def least_squares_rescaled(model, gm, targets) -> tuple[torch.nn.Module, dict[str, float]]:
    """A copy with each block's kernel K̂ scaled by α = ⟨K, K̂⟩ / ‖K̂‖² (error-minimising).

    ALS's least-squares fit has α = 1; EPC's minimum-norm fit at the same error is shrunk
    (α > 1 at its optimum), which the next BatchNorm's frozen statistics do not expect.
    """
    scaled = copy.deepcopy(model)
    alphas = {}
    for layer in targets:
        block = scaled.get_submodule(layer.name)
        kernel = gm.get_submodule(layer.name).weight.detach().double().numpy()
        approx = cp_block_kernel(block)
        alphas[layer.name] = float(np.sum(kernel * approx) / np.sum(approx * approx))
        with torch.no_grad():
            block.pointwise_out.weight.mul_(alphas[layer.name])
    return scaled, alphas


def run_method(name: str, ranks: dict[str, list[int]], work: Path) -> dict:
    """`rankfold compress` with these per-layer ranks, BN recalibration and evaluation."""
    config = build_config(
        {
            "model": "resnet56",
            "weights": str(shared_file(WEIGHTS)),
            "ranks": {
                "method": name,
                "layers": {layer: {"rank": r} for layer, r in ranks.items()},
                "skip": ["conv1", "Linear"],
            },
            "train_data": str(shared_file("cifar10/train_lossless_5085.npz")),
            "eval_data": str(shared_file("cifar10/test_lossless_1017.npz")),
            "latency": {"enabled": False},
        }
    )
    start = time.perf_counter()
    run_compress(config, work / name)
    run_seconds = time.perf_counter() - start
    report = json.loads((work / name / "report.json").read_text())
    rows = {row["name"]: row for row in report["layers"] if row["method"] == name}
    compressed = report["compressed"]
    run = {
        "method": name,
        "seconds": sum(row["seconds"] for row in rows.values()),
        "run_seconds": run_seconds,
        "macs": compressed["macs"],
        "params": compressed["params"],
        "macs_reduction": report["macs_reduction"],
        "accuracy": compressed["accuracy_decomposed"],
        "accuracy_bn": compressed["accuracy_recalibrated"],
        "rows": rows,
    }
    print(
        f"{name:>11}: {run['seconds']:7.1f} s, MACs {run['macs_reduction']:.3f}× fewer, "
        f"top-1 {run['accuracy']:.2%} → {run['accuracy_bn']:.2%} after BN recalibration",
        flush=True,
    )
    return run


def layer_rows(targets, runs: dict[str, dict]) -> list[dict]:
    out = []
    for layer in targets:
        row = {
            "name": layer.name,
            "in": layer.in_features,
            "out": layer.out_features,
            "stride": layer.stride[0],
            "macs": layer.macs,
        }
        for name, run in runs.items():
            r = run["rows"][layer.name]
            # The report's layer row, extras (sensitivity, …) included, less what row has.
            row[name] = {k: v for k, v in r.items() if k not in ("name", "type", "method")}
        out.append(row)
    return out


def pair_summary(rows: list[dict], als: str, stable: str) -> dict:
    ratios = [r[stable]["sensitivity_before"] / r[stable]["sensitivity"] for r in rows]
    return {
        "same_start_max_abs_diff": max(
            abs(r[als]["rel_error"] - r[stable]["als_rel_error"]) for r in rows
        ),
        "epc_le_als_x1001": sum(
            r[stable]["rel_error"] <= r[als]["rel_error"] * EPC_SLACK for r in rows
        ),
        "max_rel_error_increase": max(r[stable]["rel_error"] / r[als]["rel_error"] for r in rows),
        "sensitivity_ratio_median": statistics.median(ratios),
        "sensitivity_ratio_min": min(ratios),
        "sensitivity_ratio_max": max(ratios),
        "layers_ratio_ge_10": sum(x >= 10 for x in ratios),
        "largest_component_als": max(r[stable]["largest_component_before"] for r in rows),
        "largest_component_epc": max(r[stable]["largest_component"] for r in rows),
        "median_epc_sweeps": statistics.median(r[stable]["epc_sweeps"] for r in rows),
    }


def plot(rows: list[dict], runs: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(rows))
    fig, axes = plt.subplots(3, 1, figsize=(12, 10), sharex=True)
    series = [
        ("cp-epc", "sensitivity_before", "CP-ALS (pipeline start)", "tab:red"),
        ("cp-epc", "sensitivity", "CP-EPC", "tab:blue"),
        ("tucker2-cp", "sensitivity", "hybrid (core)", "tab:green"),
    ]
    if "cp-epc-ls" in runs:
        series[2:2] = [
            ("cp-epc-ls", "sensitivity_before", "CP-ALS-LS", "tab:orange"),
            ("cp-epc-ls", "sensitivity", "CP-EPC from ALS-LS", "tab:purple"),
        ]
    for method, key, label, color in series:
        axes[0].semilogy(x, [r[method][key] for r in rows], ".-", color=color, label=label, lw=1)
    axes[0].set_ylabel("sensitivity ss")
    axes[0].legend(fontsize=8, ncol=3)
    for method, key, label, color in series:
        base = key.replace("sensitivity", "largest_component")
        axes[1].semilogy(x, [r[method][base] for r in rows], ".-", color=color, label=label, lw=1)
    axes[1].set_ylabel("largest component max|λ|")
    for method, color in (("cp", "tab:red"), ("cp-epc", "tab:blue"), ("tucker2-cp", "tab:green")):
        axes[2].plot(
            x, [r[method]["rel_error"] for r in rows], ".-", color=color, label=method, lw=1
        )
    axes[2].set_ylabel("relative kernel error")
    axes[2].legend(fontsize=8)
    axes[2].set_xticks(x[::3], [rows[i]["name"] for i in x[::3]], rotation=60, fontsize=7)
    fig.suptitle("ResNet-56, every 3×3 conv but the stem at ≤ 1/3 of its MACs")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def markdown(summary: dict, runs: dict[str, dict], original: float) -> str:
    lines = [
        "| model | decomposition wall time | MACs | top-1 after decomposition "
        "| after BN recalibration |",
        "|---|---|---|---|---|",
        f"| original | – | 1.00× | {original:.2%} | – |",
    ]
    for name, run in runs.items():
        lines.append(
            f"| {name} | {run['seconds']:.0f} s | {run['macs_reduction']:.2f}× fewer | "
            f"{run['accuracy']:.2%} | {run['accuracy_bn']:.2%} |"
        )
    restored = summary.get("cp_epc_scale_restored")
    if restored:
        lines.append(
            f"| cp-epc, each kernel rescaled to least squares (α median "
            f"{restored['alpha_median']:.3f}, max {restored['alpha_max']:.3f}) | – | "
            f"{runs['cp-epc']['macs_reduction']:.2f}× fewer | {restored['accuracy']:.2%} | – |"
        )
    lines += [
        "",
        "| start → stable | layers with EPC err ≤ ALS err × 1.001 | max err ratio EPC/ALS | "
        "sensitivity ratio ALS/EPC median (min … max) | layers ≥ 10× | "
        "max largest component ALS → EPC |",
        "|---|---|---|---|---|---|",
    ]
    for label, key in summary["pairs"].items():
        s = summary[key]
        lines.append(
            f"| {label} | {s['epc_le_als_x1001']}/{summary['layers']} | "
            f"{s['max_rel_error_increase']:.6f} | {s['sensitivity_ratio_median']:.1f}× "
            f"({s['sensitivity_ratio_min']:.1f} … {s['sensitivity_ratio_max']:.1f}) | "
            f"{s['layers_ratio_ge_10']}/{summary['layers']} | "
            f"{s['largest_component_als']:.2f} → {s['largest_component_epc']:.2f} |"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    full = not args.quick
    long_als = full and not args.no_long_als
    work = args.work or Path(tempfile.mkdtemp(prefix="rankfold-stable-cp-"))
    if long_als:
        for method in (LongALSCP(), LongALSEPC()):
            register_method(method)

    model, spec = load_model("resnet56", shared_file(WEIGHTS))
    test = load_dataset(shared_file("cifar10/test_lossless_1017.npz"), spec)
    gm = trace(model, torch.zeros(1, *spec.input_shape))
    analysis = analyze(gm)
    targets = [
        layer
        for layer in analysis.layers
        if layer.type == "Conv2d" and layer.kernel_size == (3, 3) and layer.name != "conv1"
    ]
    original = accuracy(gm, test, spec)
    print(f"ResNet-56: {len(targets)} 3×3 convs (stem excluded); original top-1 {original:.2%}")

    cp_ranks = per_layer_ranks("cp", targets)
    hybrid_ranks = per_layer_ranks("tucker2-cp", targets)
    # The uniform allocator at 3× the whole model, for comparison with "3× per layer".
    uniform = select_ranks(
        analysis,
        RankPolicy(
            method="cp",
            macs_reduction=REDUCTION,
            skip=["conv1", "Linear"],
            min_macs_share=0,
            round_to=get_backend("cpu").channel_block(),  # as the CLI's round_to "auto"
        ),
    ).plan
    uniform_ranks = {entry.name: entry.ranks for entry in uniform.decomposed()}
    differ = {
        n: (cp_ranks[n][0], uniform_ranks[n][0])
        for n in cp_ranks
        if cp_ranks[n] != uniform_ranks[n]
    }

    methods = ["cp", "cp-epc"] + (["tucker2-cp"] if full else [])
    methods += ["cp-ls", "cp-epc-ls"] if long_als else []
    runs = {}
    for name in methods:
        ranks = hybrid_ranks if name == "tucker2-cp" else cp_ranks
        runs[name] = run_method(name, ranks, work)

    rows = layer_rows(targets, runs)
    pairs = {"cp (ALS, 100 plain sweeps) → cp-epc": "cp_vs_cp_epc"}
    summary = {
        "layers": len(targets),
        "original_accuracy": original,
        "epc_settings": {
            "max_sweeps": METHODS["cp-epc"].max_sweeps,
            "tol": METHODS["cp-epc"].tol,
            "patience": METHODS["cp-epc"].patience,
        },
        "cp_vs_cp_epc": pair_summary(rows, "cp", "cp-epc"),
        "uniform_allocator_3x": {
            "macs_reduction": analysis.total_macs / plan_cost(analysis, uniform).macs,
            "layers_with_other_rank": len(differ),
            "rank_differences": differ,
        },
    }
    if full:
        # The same blocks as the cp-epc run (same plan, same seed), before any recalibration.
        epc_model, _ = decompose(gm, analysis, Plan.load(work / "cp-epc" / "plan.json"), seed=0)
        scaled, alphas = least_squares_rescaled(epc_model, gm, targets)
        scaled_acc = accuracy(scaled, test, spec)
        for row in rows:
            row["cp-epc"]["least_squares_scale"] = alphas[row["name"]]
        print(f"cp-epc with each kernel rescaled to least squares: top-1 {scaled_acc:.2%}")
        summary["hybrid_cp_per_tucker_rank"] = METHODS["tucker2-cp"].cp_per_tucker_rank
        summary["hybrid"] = {
            "sensitivity_ratio_median": statistics.median(
                r["tucker2-cp"]["sensitivity_before"] / r["tucker2-cp"]["sensitivity"] for r in rows
            ),
            "largest_component_als": max(r["tucker2-cp"]["largest_component_before"] for r in rows),
            "largest_component_epc": max(r["tucker2-cp"]["largest_component"] for r in rows),
            "layers_with_both_1x1_pairs_merged": sum(_fully_merged(r) for r in rows),
            "median_rel_error_vs_cp": statistics.median(
                r["tucker2-cp"]["rel_error"] / r["cp"]["rel_error"] for r in rows
            ),
        }
        summary["cp_epc_scale_restored"] = {
            "alpha_median": statistics.median(alphas.values()),
            "alpha_min": min(alphas.values()),
            "alpha_max": max(alphas.values()),
            "accuracy": scaled_acc,
        }
    if long_als:
        pairs["cp-ls (ALS, ≤ 300 line-searched sweeps) → cp-epc-ls"] = "cp_ls_vs_cp_epc_ls"
        summary["cp_ls_vs_cp_epc_ls"] = pair_summary(rows, "cp-ls", "cp-epc-ls")
    summary["pairs"] = pairs
    result = {
        "benchmark": "stable_cp_resnet56",
        "machine": MACHINE,
        "date": DATE,
        "command": COMMAND,
        "summary": summary,
        "models": {
            name: {k: v for k, v in run.items() if k not in ("rows", "model")}
            for name, run in runs.items()
        },
        "layers": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "stable_cp_resnet56.json", result)
    if full:
        plot(rows, runs, args.out / "stable_cp_resnet56.png")
    print()
    print(markdown(summary, runs, original))
    print()
    print({k: v for k, v in summary.items() if k not in ("pairs",)})


def _fully_merged(row: dict) -> bool:
    """Whether the hybrid block of this layer merged both 1×1 pairs (then it is CP-shaped)."""
    r_out, r_in, r = row["tucker2-cp"]["rank"]
    return merge_in(row["in"], r_in, r) and merge_out(row["out"], r_out, r)


if __name__ == "__main__":
    main(ARGS)
