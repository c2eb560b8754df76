"""Rank selectors side by side (issue #20): uniform, energy and output at the same MAC budget.

    .venv/bin/python benchmarks/output_selector.py [--models resnet56] [--reductions 2,3]

Each cell is one `rankfold compress` (a subprocess) with the pipeline's defaults and the same
training data: real weights, `--train-data cifar10/train_lossless_5085.npz --eval-data
cifar10/test_lossless_1017.npz --no-latency`, so the fit is weight-only, then the last-stage
refit and BatchNorm recalibration run as they do for any user; no fine-tuning. Only `--select`
differs. The accuracies after decomposition, refit and recalibration come from each run's
report.json; the final model.pt of each run is then scored on the 1,017 lossless test images and
on the 10,000-image JPEG test set, and every selector is compared with uniform on the same
images (paired difference ± its standard error). Writes benchmarks/results/output_selector.json
and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
WEIGHTS = {
    "resnet20": "weights/resnet20-12fca82f.th",
    "resnet56": "weights/resnet56-4bfd9763.th",
}
TRAIN = "cifar10/train_lossless_5085.npz"
TESTS = {
    "lossless_1017": "cifar10/test_lossless_1017.npz",
    "jpeg_10000": "cifar10/test_jpeg_10000.npz",
}
SELECTORS = ("uniform", "energy", "output")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet56")
    parser.add_argument("--method", default="tucker2")
    parser.add_argument("--reductions", default="2,3")
    parser.add_argument("--data", type=Path, default=None, help="RANKFOLD_DATA folder")
    parser.add_argument("--work", type=Path, default=Path("/tmp/rankfold-output-selector"))
    parser.add_argument("--out", type=Path, default=RESULTS / "output_selector.json")
    return parser.parse_args()


def compress(model: str, base: Path, method: str, reduction: float, select: str, out: Path):
    rankfold = Path(sys.executable).with_name("rankfold")
    command = [
        str(rankfold), "compress", model, "--weights", str(base / WEIGHTS[model]),
        "--method", method, "--macs-reduction", f"{reduction:g}", "--select", select,
        "--train-data", str(base / TRAIN), "--eval-data", str(base / TESTS["lossless_1017"]),
        "--no-latency", "--out", str(out),
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return json.loads((out / "report.json").read_text()), time.perf_counter() - start, command


def paired(this: Any, reference: Any, labels: Any) -> dict[str, float]:
    n = len(labels)
    b = int(((this == labels) & (reference != labels)).sum())
    c = int(((this != labels) & (reference == labels)).sum())
    return {
        "delta_pt": 100 * (b - c) / n,
        "se_pt": 100 * math.sqrt(max(b + c - (b - c) ** 2 / n, 0)) / n,
    }


def main() -> None:
    args = parse_args()
    import numpy as np
    import torch

    from rankfold.converter import restore
    from rankfold.models import batches, data_dir, load_dataset, load_model

    torch.set_num_threads(2)
    base = (args.data or data_dir()).resolve()
    rows = []
    for model in args.models.split(","):
        _, spec = load_model(model, base / WEIGHTS[model])
        tests = {name: load_dataset(base / rel, spec) for name, rel in TESTS.items()}
        for reduction in [float(r) for r in args.reductions.split(",")]:
            predictions: dict[str, dict[str, Any]] = {}
            labels: dict[str, Any] = {}
            for select in SELECTORS:
                out = args.work / f"{model}-{args.method}-{reduction:g}-{select}"
                report, seconds, command = compress(
                    model, base, args.method, reduction, select, out
                )
                compressed = restore(out / "model.pt").eval()
                predictions[select] = {}
                with torch.no_grad():
                    for name, data in tests.items():
                        got, truth = [], []
                        for x, y in batches(data, spec, 500):
                            got.append(compressed(x).argmax(1).numpy())
                            truth.append(np.asarray(y))
                        predictions[select][name] = np.concatenate(got)
                        labels[name] = np.concatenate(truth)
                acc = report["compressed"]
                rows.append(
                    {
                        "model": model,
                        "method": args.method,
                        "reduction": reduction,
                        "select": select,
                        "macs_reduction": report["macs_reduction"],
                        "decomposed": acc["accuracy_decomposed"],
                        "refitted": acc["accuracy_refitted"],
                        "recalibrated": acc["accuracy_recalibrated"],
                        "final": {
                            name: float((predictions[select][name] == labels[name]).mean())
                            for name in tests
                        },
                        "vs_uniform": {
                            name: paired(
                                predictions[select][name],
                                predictions["uniform"][name],
                                labels[name],
                            )
                            for name in tests
                        },  # fmt: skip
                        "summed_output_error": report["selection"].get("summed_output_error"),
                        "seconds": seconds,
                        "command": " ".join(command),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    summary = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(table(rows))


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f} %"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | method | MACs × | select | decomposed | refitted | recalibrated (final) "
        "| vs uniform, lossless 1,017 | JPEG 10k | vs uniform, JPEG 10k |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d1, d2 = r["vs_uniform"]["lossless_1017"], r["vs_uniform"]["jpeg_10000"]
        lines.append(
            f"| {r['model']} | {r['method']} | {r['macs_reduction']:.2f} | {r['select']} | "
            f"{pct(r['decomposed'])} | {pct(r['refitted'])} | {pct(r['recalibrated'])} | "
            f"{d1['delta_pt']:+.2f} ± {d1['se_pt']:.2f} | {pct(r['final']['jpeg_10000'])} | "
            f"{d2['delta_pt']:+.2f} ± {d2['se_pt']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
