"""PARS throughput with 1 and 2 worker processes on a shared study, PostgreSQL vs SQLite.

Each configuration starts N `rankfold compress resnet20 … --select pars --storage URL
--study-name S` processes at once (the documented recipe for workers on several machines), each
with one torch thread, a fresh decomposition cache folder shared by them, and Tucker-2 at 3×
fewer MACs. Throughput is the study's complete trials per minute between the first trial's start
and the last trial's end (the search alone: loading, the final decomposition, ONNX export and
validation of each process are outside it, and reported as wall time; the last-stage refit after
the search is off, as it is not part of it). PostgreSQL is a throwaway server started by
.ci/postgres.sh, as in CI.

    flock -x /tmp/rankfold-quiet.lock flock /tmp/rankfold-bench.lock \\
        .venv/bin/python benchmarks/pars_workers.py --trials 40
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--backends", default="postgresql,sqlite")
    parser.add_argument("--calib", type=int, default=1024, help="proxy images")
    parser.add_argument("--bn", type=int, default=512, help="BatchNorm recalibration images")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "pars_workers.json")
    return parser.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()  # before the heavy imports below: --help answers at once

import optuna  # noqa: E402

from rankfold.models import shared_file  # noqa: E402
from rankfold.passes.core import atomic_write_json  # noqa: E402
from rankfold.passes.search import open_storage, redacted  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = "weights/resnet20-12fca82f.th"
TRAIN = "cifar10/train_lossless_5085.npz"


def run_configuration(url: str, study: str, workers: int, args, work: Path) -> dict:
    rankfold = Path(sys.executable).parent / "rankfold"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cache = work / f"cache-{study}"
    processes, logs = [], []
    start = time.perf_counter()
    for worker in range(workers):
        out = work / f"{study}-{worker}"
        command = [
            str(rankfold), "compress", "resnet20", "--weights", str(shared_file(WEIGHTS)),
            "--method", "tucker2", "--select", "pars", "--macs-reduction", "3",
            "--trials", str(args.trials), "--storage", url, "--study-name", study,
            "--train-data", str(shared_file(TRAIN)), "--calib-samples", str(args.calib),
            "--bn-samples", str(args.bn), "--search-cache-dir", str(cache), "--no-latency",
            "--no-refit",
            "--out", str(out),
        ]  # fmt: skip
        log = open(work / f"{study}-{worker}.log", "w")  # noqa: SIM115 - closed below
        logs.append(log)
        processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
    load_before = os.getloadavg()[0]
    codes = [process.wait() for process in processes]
    wall = time.perf_counter() - start
    for log in logs:
        log.close()
    if any(codes):
        tail = (work / f"{study}-0.log").read_text()[-2000:]
        raise SystemExit(f"a worker of {study} failed (exit codes {codes}):\n{tail}")
    trials = optuna.load_study(study_name=study, storage=open_storage(url)).get_trials()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    first = min(t.datetime_start for t in complete)
    last = max(t.datetime_complete for t in complete)
    search_seconds = (last - first).total_seconds()
    report = json.loads((work / f"{study}-0" / "report.json").read_text())["selection"]
    per_process = {}
    for t in complete:
        per_process[t.user_attrs["pid"]] = per_process.get(t.user_attrs["pid"], 0) + 1
    return {
        "storage": url.split(":", 1)[0],
        "workers": workers,
        "trials_complete": len(complete),
        "trials_other": len(trials) - len(complete),
        "trials_per_process": sorted(per_process.values(), reverse=True),
        "search_seconds": search_seconds,
        "trials_per_minute": 60 * len(complete) / search_seconds,
        "wall_seconds": wall,
        # Other work on the machine: the 1-minute load average as the run started and ended.
        "load_average": [load_before, os.getloadavg()[0]],
        "best_proxy": max(t.value for t in complete),
        "report_best_proxy": report["best"]["proxy"],
        "decompositions_computed": report["decompositions_computed"],
        "macs_reduction": json.loads((work / f"{study}-0" / "report.json").read_text())[
            "macs_reduction"
        ],
    }


def main(args: argparse.Namespace) -> None:
    work = args.work or Path(tempfile.mkdtemp(prefix="rankfold-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    server = Path(tempfile.mkdtemp(prefix="rankfold-postgres-"))
    postgres = REPO / ".ci" / "postgres.sh"
    backends = args.backends.split(",")
    rows = []
    try:
        url_of = {"sqlite": f"sqlite:///{work / 'studies.db'}"}
        if "postgresql" in backends:
            started = subprocess.run(
                ["bash", str(postgres), "start", str(server)],
                capture_output=True,
                text=True,
                check=True,
            )
            url_of["postgresql"] = started.stdout.strip()
        stamp = time.strftime("%H%M%S")
        for workers in (int(w) for w in args.workers.split(",")):
            for backend in backends:  # side by side: the two storages alternate
                study = f"r20-{backend}-{workers}w-{stamp}"
                row = run_configuration(url_of[backend], study, workers, args, work)
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        subprocess.run(["bash", str(postgres), "stop", str(server)], check=False)
    for backend in backends:
        one = next(r for r in rows if r["storage"].startswith(backend) and r["workers"] == 1)
        for row in rows:
            if row["storage"].startswith(backend):
                row["speedup"] = row["trials_per_minute"] / one["trials_per_minute"]
    atomic_write_json(
        args.out,
        {
            "command": " ".join(sys.argv),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "settings": {
                "trials": args.trials,
                "calib": args.calib,
                "bn": args.bn,
                "storages": [redacted(u) for u in url_of.values()],
            },
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main(ARGS)
