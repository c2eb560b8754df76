"""How much of a block's MAC reduction onnxruntime turns into time, per layer and aligned rank.

Efficiency = (layer ms / block ms) / (layer MACs / block MACs), from the per-layer latency table
(each conv timed in context, between two depthwise 1×1 convs). A model's speedup / MAC reduction
after the gate cannot exceed the best efficiency of the blocks it keeps, so this bounds the
deployment benchmark's goal (issue #7) per method and layer geometry.

Layers: ResNet-56's three conv geometries (16, 32, 64 channels at 32², 16², 8²) and ResNet-18's
four stage convs at 224² input; the ranks on the 16-channel block that make the layer smaller
(up to 16 of them per layer, evenly spread).

Run (~3 min, one thread, idle machine):
  flock /tmp/rankfold-bench.lock .venv/bin/python benchmarks/block_efficiency.py
Writes benchmarks/results/block_efficiency.json and prints the BENCHMARKS.md table.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before NumPy/torch load: one thread, as the shared machine needs

import argparse  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="cp,tucker2")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--block", type=int, default=16, help="channel block ranks align to")
    parser.add_argument("--ranks", type=int, default=16, help="aligned ranks timed per layer")
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "block_efficiency.json"
    )
    return parser.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()  # before the heavy imports below: --help answers at once

import torch  # noqa: E402

from rankfold.models import load_model  # noqa: E402
from rankfold.passes import analyze, trace  # noqa: E402
from rankfold.passes.core import atomic_write_json  # noqa: E402
from rankfold.passes.latency_gate import on_block  # noqa: E402
from rankfold.passes.methods import get_method  # noqa: E402
from rankfold.runtime.backends import get_backend  # noqa: E402
from rankfold.runtime.latency_model import LatencyTable  # noqa: E402

LAYERS = {
    "resnet56": ["layer1.1.conv1", "layer2.1.conv1", "layer3.1.conv1"],
    "torchvision:resnet18": [
        "layer1.0.conv1",
        "layer2.0.conv2",
        "layer3.0.conv2",
        "layer4.0.conv2",
    ],
}


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    table = LatencyTable("cpu", cache_dir=tempfile.mkdtemp(prefix="rankfold-eff-"), threads=1)
    rows = []
    for model_name, names in LAYERS.items():
        model, spec = load_model(model_name)
        analysis = analyze(trace(model, torch.zeros(1, *spec.input_shape)))
        for name in names:
            layer = analysis.layer(name)
            for method_name in args.methods.split(","):
                method = get_method(method_name)
                for batch in (int(b) for b in args.batches.split(",")):
                    original = table.layer_ms(layer, batch)
                    aligned = [
                        c
                        for c in method.candidates(layer)
                        if method.cost(layer, c).macs < layer.macs
                        and on_block(method, layer, c, args.block)
                    ]
                    # Up to --ranks of them, evenly spread (ResNet-18's layer4 has 142 for CP).
                    step = max(1, -(-len(aligned) // args.ranks))
                    points = []
                    for ranks in aligned[::step]:
                        cost = method.cost(layer, ranks)
                        block = table.block_ms(layer, method.name, ranks, batch)
                        reduction = layer.macs / cost.macs
                        points.append(
                            {
                                "ranks": list(ranks),
                                "mac_reduction": reduction,
                                "speedup": original / block,
                                "efficiency": original / block / reduction,
                            }
                        )
                    if not points:
                        continue
                    efficiencies = sorted(p["efficiency"] for p in points)
                    quartiles = [
                        efficiencies[round(q * (len(points) - 1))] for q in (0.25, 0.5, 0.75)
                    ]
                    rows.append(
                        {
                            "model": model_name,
                            "layer": name,
                            "shape": list(layer.in_shape),
                            "out_channels": layer.out_features,
                            "method": method.name,
                            "batch": batch,
                            "layer_ms": original,
                            "aligned_ranks": len(aligned),
                            "timed_ranks": len(points),
                            "efficiency_quartiles": quartiles,
                            "points": points,
                        }
                    )
                    print_row(rows[-1])
    atomic_write_json(
        args.out,
        {
            "machine_id": get_backend("cpu").machine_id(),
            "block": args.block,
            "threads": 1,
            "rows": rows,
        },
    )


def print_row(r: dict) -> None:
    # Quartiles, not the best rank: blocks of a few µs time within ±30 % run to run here.
    low, median, high = r["efficiency_quartiles"]
    print(
        f"| {r['model'].removeprefix('torchvision:')} | {r['layer']} | "
        f"{r['shape'][0]}→{r['out_channels']} @ {r['shape'][1]}² | {r['method']} | {r['batch']} | "
        f"{r['layer_ms'] * 1e3:.0f} | {r['timed_ranks']} of {r['aligned_ranks']} | "
        f"{median:.2f} ({low:.2f}–{high:.2f}) |",
        flush=True,
    )


if __name__ == "__main__":
    main(ARGS)
