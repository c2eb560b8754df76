"""Peak memory of INT8 calibration (issue #16): the public `quantize_int8` on torchvision
ResNet-50 (224², random init: memory does not depend on the weights) with N calibration images
(seeded random, batches of 32, as `--quantize int8` feeds them), each setting in a fresh process
whose peak resident memory is read from the OS (`os.wait4`).

  .venv/bin/python benchmarks/int8_memory.py [--images 64,256] [--methods minmax,auto]
Writes benchmarks/results/int8_memory.json and prints the BENCHMARKS.md table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "torchvision:resnet50"
CHILD = """
import sys, torch
from rankfold.runtime import quantize_int8
images, method, source, target = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
generator = torch.Generator().manual_seed(0)
calibration = torch.randn(images, 3, 224, 224, generator=generator).split(32)
quantize_int8(source, target, calibration, method=method)
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="64,256")
    parser.add_argument("--methods", default="minmax,auto")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/int8_memory.json")
    return parser.parse_args()


def peak_rss_mb(args: list[str]) -> tuple[float, float]:
    """Run `python -c CHILD args` to its end: (peak resident MB, seconds)."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", CHILD, *args])
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"quantize_int8 {' '.join(args[:2])} failed (exit {child.returncode})")
    return usage.ru_maxrss / 1024, time.perf_counter() - start  # ru_maxrss is in KB on Linux


def main() -> None:
    args = parse_args()
    import torch

    from rankfold.models import load_model
    from rankfold.runtime import export_onnx

    rows = []
    with tempfile.TemporaryDirectory(prefix="rankfold-int8-memory-") as folder:
        source = Path(folder) / "resnet50.onnx"
        model, spec = load_model(MODEL)
        export_onnx(model.eval(), torch.zeros(1, *spec.input_shape), source)
        for method in args.methods.split(","):
            for images in (int(n) for n in args.images.split(",")):
                target = Path(folder) / f"{method}_{images}.int8.onnx"
                peak, seconds = peak_rss_mb([str(images), method, str(source), str(target)])
                rows.append({"method": method, "images": images, "peak_mb": peak, "s": seconds})
                print(f"{method} {images} images: peak {peak:,.0f} MB, {seconds:.0f} s", flush=True)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "model": MODEL,
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| calibration | images | peak resident memory | seconds |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['method']} | {row['images']} | {row['peak_mb']:,.0f} MB | {row['s']:.0f} |")


if __name__ == "__main__":
    main()
