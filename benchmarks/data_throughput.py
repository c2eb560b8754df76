"""Streaming data throughput and memory on the CIFAR-10 JPEG ImageFolder (issue #15).

    python benchmarks/data_throughput.py [--images 10000] [--finetune-images 2560]

1. Data loading alone: `load_dataset(train folder, resnet20's spec, workers=W)` then every batch
   of `batches()` (decode, convert, preprocess, normalise) over the first --images images (the
   folder's round-robin order keeps them class-balanced), W = 0, 1, 2, each in a fresh process:
   images/s and peak RSS (the main process and the largest worker).
2. Fine-tuning: one epoch of ResNet-20 (real weights, distilled from itself) on the first
   --finetune-images images through the public `finetune`, in 1 process and in 2 processes under
   torchrun (gloo), each process with one torch thread and one data worker: images/s and peak
   RSS per process.

Writes benchmarks/results/data_throughput.json and prints a Markdown table. Run it under
`flock /tmp/rankfold-bench.lock` so benchmarks do not overlap.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def loading_worker(folder: str, images: int, workers: int) -> dict:
    from rankfold.models import batches, load_dataset, load_model

    _, spec = load_model("resnet20")
    data = load_dataset(folder, spec, workers=workers).subset(images)
    start = time.perf_counter()
    seen = sum(len(labels) for _, labels in batches(data, spec, batch_size=256))
    seconds = time.perf_counter() - start
    return {
        "workers": workers,
        "images": seen,
        "seconds": seconds,
        "images_per_s": seen / seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def finetune_worker(folder: str, weights: str, images: int, out: str) -> None:
    import torch

    from rankfold.converter.finetune import FinetuneConfig, finetune
    from rankfold.models import load_dataset, load_model

    torch.set_num_threads(1)
    student, spec = load_model("resnet20", weights)
    teacher, _ = load_model("resnet20", weights)
    train = load_dataset(folder, spec, workers=1).subset(images)
    config = FinetuneConfig(epochs=1, batch_size=128)
    with tempfile.TemporaryDirectory() as checkpoints:
        start = time.perf_counter()
        result = finetune(student, teacher, train, spec, config, checkpoints, seed=0)
        seconds = time.perf_counter() - start
    rank = int(os.environ.get("RANK", "0"))
    row = {
        "rank": rank,
        "world": int(os.environ.get("WORLD_SIZE", "1")),
        "images": len(train),
        "seconds": seconds,
        "images_per_s": len(train) / seconds,
        "loss": result.history[-1]["loss"],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(row))


def _run(command: list[str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command[:6])} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="RANKFOLD_DATA folder")
    parser.add_argument("--images", type=int, default=10_000, help="images for loading alone")
    parser.add_argument("--finetune-images", type=int, default=2_560, help="one epoch's images")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = parser.parse_args()
    from rankfold.models import data_dir

    base = args.data or data_dir()
    folder = str(base / "cifar10/jpeg/train")
    weights = str(base / "weights/resnet20-12fca82f.th")
    script = str(Path(__file__).resolve())

    loading = []
    for workers in (0, 1, 2):
        stdout = _run([sys.executable, script, "load", folder, str(args.images), str(workers)])
        loading.append(json.loads(stdout.strip().splitlines()[-1]))
    tuning = []
    for world in (1, 2):
        with tempfile.TemporaryDirectory() as out:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            _run([*launcher, f"--nproc_per_node={world}", script, "finetune", folder, weights,
                  str(args.finetune_images), out])  # fmt: skip
            ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
        tuning.append({"world": world, "ranks": ranks, "images_per_s": ranks[0]["images_per_s"]})

    results = {
        "loading": loading,
        "finetune": tuning,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data_throughput.json").write_text(json.dumps(results, indent=2))
    first = loading[0]["images_per_s"]
    print(f"Data loading alone ({args.images} JPEG images, batches of 256):\n")
    print("| workers | images/s | vs 0 workers | peak RSS main (MiB) | peak RSS worker (MiB) |")
    print("|---|---|---|---|---|")
    for row in loading:
        print(
            f"| {row['workers']} | {row['images_per_s']:.0f} | "
            f"{row['images_per_s'] / first:.2f}× | {row['peak_rss_mib']:.0f} | "
            f"{row['worker_peak_rss_mib']:.0f} |"
        )
    single = tuning[0]["images_per_s"]
    print(f"\nOne fine-tuning epoch of ResNet-20 ({args.finetune_images} images, batch 128):\n")
    print("| processes | images/s | vs 1 process | seconds | peak RSS per process (MiB) |")
    print("|---|---|---|---|---|")
    for row in tuning:
        peaks = ", ".join(f"{r['peak_rss_mib']:.0f}" for r in row["ranks"])
        print(
            f"| {row['world']} | {row['images_per_s']:.0f} | {row['images_per_s'] / single:.2f}× "
            f"| {row['ranks'][0]['seconds']:.1f} | {peaks} |"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "load":
        print(json.dumps(loading_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
    elif len(sys.argv) > 1 and sys.argv[1] == "finetune":
        finetune_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        main()
