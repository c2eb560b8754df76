"""Rank selectors on ResNet-56 at a 3× MAC budget: accuracy after decomposition + BN recalibration.

Selectors: uniform, energy, vbmf, error, eps-search and pars (optuna, N trials, W worker
processes), each one `run_compress` run (what `rankfold compress --select S` does) with
`--train-data` cifar10/train_lossless_5085.npz (the search proxies' images, then BatchNorm
recalibration of the chosen model on augmented batches of all of it) and `--eval-data`
test_lossless_1017.npz; the recalibrated model.pt is also scored on test_jpeg_10000.npz (deltas
to the original only). Each selector starts from an empty decomposition cache, so its selection
time includes every decomposition it needs.

    flock /tmp/rankfold-bench.lock .venv/bin/python benchmarks/rank_selection_resnet56.py
One row: `--selectors energy` (~3 min here).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SELECTORS = ("uniform", "energy", "vbmf", "error", "eps-search", "pars")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="tucker2")
    parser.add_argument("--reduction", type=float, default=3.0)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sampler", default="gp")
    parser.add_argument("--calib", type=int, default=1024, help="proxy images")
    parser.add_argument("--bn", type=int, default=512, help="the proxies' BN images")
    parser.add_argument("--eps-calib", type=int, default=512, help="eps-search proxy images")
    parser.add_argument("--eps-bn", type=int, default=256, help="eps-search BN images")
    parser.add_argument("--epsilon", type=float, default=0.01)
    parser.add_argument("--selectors", default=",".join(SELECTORS))
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (runs, caches)")
    parser.add_argument("--out", type=Path, default=RESULTS / "rank_selection_resnet56.json")
    return parser.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()  # before the heavy imports below: --help answers at once

import torch  # noqa: E402

from rankfold.converter import build_config, restore, run_compress  # noqa: E402
from rankfold.converter.report import plot_search  # noqa: E402
from rankfold.models import batches, load_dataset, load_model, shared_file  # noqa: E402
from rankfold.passes.core import atomic_write_json  # noqa: E402
from rankfold.runtime import torch_accuracy  # noqa: E402

WEIGHTS = "weights/resnet56-4bfd9763.th"
TRAIN = "cifar10/train_lossless_5085.npz"
TEST = "cifar10/test_lossless_1017.npz"


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="rankfold-bench-"))

    model, spec = load_model("resnet56", shared_file(WEIGHTS))
    jpeg = load_dataset(shared_file("cifar10/test_jpeg_10000.npz"), spec)
    original_jpeg = torch_accuracy(model, batches(jpeg, spec, 256))

    rows, reports = [], {}
    for select in args.selectors.split(","):
        cache = work / f"cache-{select}"
        shutil.rmtree(cache, ignore_errors=True)  # cold: the selection time includes decompositions
        eps = select == "eps-search"
        config = build_config(
            {
                "model": "resnet56",
                "weights": str(shared_file(WEIGHTS)),
                "ranks": {
                    "method": args.method,
                    "macs_reduction": args.reduction,
                    "select": select,
                    "epsilon": args.epsilon,
                },
                "search": {
                    "trials": args.trials,
                    "workers": args.workers,
                    "sampler": args.sampler,
                    "calib_samples": args.eps_calib if eps else args.calib,
                    "bn_samples": args.eps_bn if eps else args.bn,
                    "cache_dir": str(cache),
                    "storage": f"journal:{work / 'pars.log'}" if select == "pars" else None,
                    "study_name": f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
                    if select == "pars"
                    else None,
                },
                "train_data": str(shared_file(TRAIN)),
                "eval_data": str(shared_file(TEST)),
                "latency": {"enabled": False},
            }
        )
        out = work / select
        start = time.perf_counter()
        run_compress(config, out)
        run_seconds = time.perf_counter() - start
        report = json.loads((out / "report.json").read_text())
        selection, original = report["selection"], report["original"]
        goal = original["macs"] / args.reduction
        compressed = restore(out / "model.pt")  # recalibrated, as the run saved it
        row = {
            "selector": select,
            "macs": report["compressed"]["macs"],
            "macs_reduction": report["macs_reduction"],
            "budget_use": report["compressed"]["macs"] / goal,
            "params_reduction": report["params_reduction"],
            "decomposed_layers": sum(r["status"] == "decomposed" for r in report["layers"]),
            "test_raw": report["compressed"]["accuracy_decomposed"],
            "test_recal": report["compressed"]["accuracy_recalibrated"],
            "jpeg_delta_recal": torch_accuracy(compressed, batches(jpeg, spec, 256))
            - original_jpeg,
            "select_seconds": selection["seconds"],
            "run_seconds": run_seconds,
        }
        if select == "pars":
            row["trials"] = selection["trials_complete"]
            row["proxy"] = selection["best"]["proxy"]
            plot_search(selection, args.out.with_name(args.out.stem + "_pars.png"))
        rows.append(row)
        reports[select] = report
        print(json.dumps(row), flush=True)

    first = next(iter(reports.values()))["original"]
    result = {
        "benchmark": "rank_selection_resnet56",
        "machine": "2-core x86-64 CPU, 24 GiB, no GPU",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "original": {
            "test": first["accuracy"],
            "jpeg": original_jpeg,
            "macs": first["macs"],
            "params": first["params"],
        },
        "rows": rows,
        "reports": reports,
    }
    atomic_write_json(args.out, result)
    print_table(result)


def print_table(result: dict) -> None:
    original = result["original"]
    print(
        f"\nResNet-56 ({original['macs'] / 1e6:.1f} M MACs), target "
        f"{result['settings']['reduction']:g}× MACs, method {result['settings']['method']}; "
        f"original test {original['test']:.2%}"
    )
    print(
        "| selector | MACs (M) | reduction | budget use | test raw | test + BN recal | "
        "Δ JPEG-10k + recal | select time |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in result["rows"]:
        name = row["selector"] + (f" ({row['trials']} trials)" if "trials" in row else "")
        print(
            f"| {name} | {row['macs'] / 1e6:.2f} | {row['macs_reduction']:.3f}× | "
            f"{row['budget_use']:.2%} | {row['test_raw']:.2%} | {row['test_recal']:.2%} | "
            f"{row['jpeg_delta_recal'] * 100:+.2f} pt | {row['select_seconds']:.0f} s |"
        )


if __name__ == "__main__":
    main(ARGS)
