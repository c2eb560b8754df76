"""How far apart fresh latency tables price the same blocks: the per-layer table's noise.

The gate and `--latency-reduction` plan from the per-layer latency table (`LatencyTable`, the
product's own instrument). On a CIFAR ResNet a conv runs in tens of µs, close to the context
and overhead the table takes off, so two tables measured a minute apart can disagree. This
builds `--tables` fresh tables (empty caches) one after the other and reports, per layer and
block, the spread of the layer / block speedup across them and the largest one any claimed.

Layers: ResNet-20's 16-, 32- and 64-channel convs and its stride-2 64-channel conv; Tucker-2
at a quarter, half and three quarters of the channels, CP at a quarter and a half.

Run (~1 min, idle machine):
  .venv/bin/python benchmarks/latency_table_noise.py [--threads 1]
Writes benchmarks/results/latency_table_noise[_threads1].json and prints the BENCHMARKS.md table.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", type=int, default=4, help="fresh tables to compare")
    parser.add_argument("--threads", type=int, default=None, help="default: all cores")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()  # before the heavy imports below: --help answers at once

import torch  # noqa: E402

from rankfold.models import load_model  # noqa: E402
from rankfold.passes import analyze, trace  # noqa: E402
from rankfold.passes.core import atomic_write_json  # noqa: E402
from rankfold.runtime.latency_model import LatencyTable  # noqa: E402

LAYERS = ["layer1.1.conv1", "layer2.1.conv1", "layer3.1.conv1", "layer3.0.conv1"]
BLOCKS = {"tucker2": (0.25, 0.5, 0.75), "cp": (0.25, 0.5)}


def main(args: argparse.Namespace) -> None:
    model, spec = load_model("resnet20", None, None)
    analysis = analyze(trace(model.eval(), torch.zeros(1, *spec.input_shape)))
    rows: dict[tuple[str, str, tuple[int, ...]], list[float]] = {}
    layer_ms: dict[str, list[float]] = {name: [] for name in LAYERS}
    for _ in range(args.tables):
        with tempfile.TemporaryDirectory() as cache:
            table = LatencyTable("cpu", cache_dir=cache, threads=args.threads)
            for name in LAYERS:
                layer = analysis.layer(name)
                original = table.layer_ms(layer, args.batch)
                layer_ms[name].append(original)
                channels = layer.in_shape[0]
                for method, shares in BLOCKS.items():
                    for share in shares:
                        rank = max(1, round(share * channels))
                        ranks = (rank, rank) if method == "tucker2" else (rank,)
                        block = table.block_ms(layer, method, ranks, args.batch)
                        rows.setdefault((name, method, ranks), []).append(original / block)
    results = [
        {
            "layer": name,
            "method": method,
            "ranks": list(ranks),
            "speedups": speedups,
            "layer_ms": layer_ms[name],
        }
        for (name, method, ranks), speedups in rows.items()
    ]
    suffix = f"_threads{args.threads}" if args.threads else ""
    out = args.out or REPO / "benchmarks" / "results" / f"latency_table_noise{suffix}.json"
    atomic_write_json(out, {"threads": args.threads, "batch": args.batch, "rows": results})
    print("| layer | layer µs (min–max) | block | speedup min–max | max / min |")
    print("|---|---|---|---|---:|")
    for row in results:
        low, high = min(row["speedups"]), max(row["speedups"])
        times = f"{1000 * min(row['layer_ms']):.0f}–{1000 * max(row['layer_ms']):.0f}"
        block = f"{row['method']} {'×'.join(map(str, row['ranks']))}"
        print(f"| {row['layer']} | {times} | {block} | {low:.2f}–{high:.2f}× | {high / low:.2f} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(ARGS)
