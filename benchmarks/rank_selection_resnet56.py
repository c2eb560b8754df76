"""Rank selectors on ResNet-56 at a 3× MAC budget: accuracy after decomposition + BN recalibration.

Selectors: uniform, energy, vbmf, error, eps-search and pars (optuna, N trials, W worker
processes). Calibration (BN recalibration + search proxies) uses cifar10/train_lossless_5085.npz;
scores use cifar10/test_lossless_1017.npz (absolute) and test_jpeg_10000.npz (deltas to the
original only). Each selector starts from an empty decomposition cache, so its wall time includes
every decomposition it needs.

Then PARS's central claim: for ~8 PARS trials spanning the proxy range, the Spearman correlation
between each cheap proxy (raw accuracy, BN-recalibrated accuracy, top-1 agreement and KD loss with
the original, all on the calibration split) and the test accuracy after a short fixed fine-tune
(1 epoch of SGD on the 5,085 training images, see `finetune`).

    flock /tmp/rankfold-bench.lock .venv/bin/python benchmarks/rank_selection_resnet56.py
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from rankfold.models import ArrayDataset, load_dataset, load_model, normalize, shared_file
from rankfold.passes import analyze, decompose, plan_cost, trace
from rankfold.passes.core import atomic_write_json
from rankfold.passes.plan import RankPolicy, draft_plan
from rankfold.passes.recalibrate import recalibrate_bn
from rankfold.passes.search import (
    DecompositionCache,
    Evaluator,
    ParsSpace,
    open_storage,
    slot_choices,
)
from rankfold.passes.selection import Calibration, SearchConfig, plot_search, resolve_plan
from rankfold.runtime.backends import get_backend

RESULTS = Path(__file__).parent / "results"
SELECTORS = ("uniform", "energy", "vbmf", "error", "eps-search", "pars")


def channels_last(model: torch.nn.Module) -> torch.nn.Module:
    return model.to(memory_format=torch.channels_last)


def accuracy(model: torch.nn.Module, data: ArrayDataset, spec, batch_size: int = 256) -> float:
    """Top-1 accuracy; channels-last is only a faster layout (same predictions up to rounding)."""
    model = channels_last(model).eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            x = normalize(data.x[start : start + batch_size], spec)
            logits = model(x.contiguous(memory_format=torch.channels_last))
            correct += int((logits.argmax(1).numpy() == data.y[start : start + batch_size]).sum())
    return correct / len(data)


def finetune(
    model: torch.nn.Module, train: ArrayDataset, spec, epochs: int, seed: int = 0
) -> torch.nn.Module:
    """The fixed short fine-tune: SGD (lr 0.01, momentum 0.9, weight decay 5e-4, cosine to 0),
    batch 64, cross-entropy, random crop (pad 4) + horizontal flip, `epochs` passes."""
    model = channels_last(copy.deepcopy(model)).train()
    rng = np.random.default_rng(seed)
    batch = 64
    steps = epochs * math.ceil(len(train) / batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(epochs):
        order = rng.permutation(len(train))
        for start in range(0, len(train), batch):
            index = order[start : start + batch]
            x = normalize(train.x[index], spec)
            x = F.pad(x, (4, 4, 4, 4))
            tops, lefts = rng.integers(0, 9, len(index)), rng.integers(0, 9, len(index))
            x = torch.stack([img[:, t : t + 32, s : s + 32] for img, t, s in zip(x, tops, lefts)])
            flip = torch.from_numpy(rng.random(len(index)) < 0.5)
            x[flip] = x[flip].flip(-1)
            loss = F.cross_entropy(
                model(x.contiguous(memory_format=torch.channels_last)),
                torch.from_numpy(train.y[index]),
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="tucker2")
    parser.add_argument("--reduction", type=float, default=3.0)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sampler", default="gp")
    parser.add_argument("--calib", type=int, default=1024, help="proxy images")
    parser.add_argument("--bn", type=int, default=512, help="BN recalibration images")
    parser.add_argument("--eps-calib", type=int, default=512, help="eps-search proxy images")
    parser.add_argument("--eps-bn", type=int, default=256, help="eps-search BN images")
    parser.add_argument("--epsilon", type=float, default=0.01)
    parser.add_argument("--plans", type=int, default=8, help="plans in the correlation study")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--selectors", default=",".join(SELECTORS))
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (caches, study)")
    parser.add_argument("--out", type=Path, default=RESULTS / "rank_selection_resnet56.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    work = args.work or Path(tempfile.mkdtemp(prefix="rankfold-bench-"))

    model, spec = load_model("resnet56", shared_file("weights/resnet56-4bfd9763.th"))
    gm = trace(model, torch.zeros(1, *spec.input_shape))
    analysis = analyze(gm)
    train = load_dataset(shared_file("cifar10/train_lossless_5085.npz"), spec)
    test = load_dataset(shared_file("cifar10/test_lossless_1017.npz"), spec)
    jpeg = load_dataset(shared_file("cifar10/test_jpeg_10000.npz"), spec)
    calibration = Calibration.from_dataset(train, spec, args.calib, args.bn)
    eps_calibration = Calibration.from_dataset(train, spec, args.eps_calib, args.eps_bn)
    goal = analysis.total_macs / args.reduction
    original = {"test": accuracy(copy.deepcopy(gm), test, spec)}
    original["jpeg"] = accuracy(copy.deepcopy(gm), jpeg, spec)
    print(f"original: test {original['test']:.2%}, jpeg {original['jpeg']:.2%}", flush=True)

    rows, reports, plans = [], {}, {}
    storage = f"journal:{work / 'pars.log'}"
    for select in args.selectors.split(","):
        cache = work / f"cache-{select}"
        shutil.rmtree(cache, ignore_errors=True)  # cold: the wall time includes decompositions
        search = SearchConfig(
            trials=args.trials,
            workers=args.workers,
            sampler=args.sampler,
            cache_dir=cache,
            storage=storage if select == "pars" else None,
            study_name=f"bench-{time.strftime('%Y%m%d-%H%M%S')}" if select == "pars" else None,
        )
        policy = RankPolicy(
            method=args.method,
            macs_reduction=args.reduction,
            select=select,
            epsilon=args.epsilon,
            round_to=get_backend("cpu").channel_block(),  # as the CLI's round_to "auto"
        )
        start = time.perf_counter()
        plan, report = resolve_plan(
            gm,
            analysis,
            policy,
            "resnet56",
            eps_calibration if select == "eps-search" else calibration,
            search,
        )
        select_seconds = time.perf_counter() - start
        start = time.perf_counter()
        compressed, _ = decompose(gm, analysis, plan, seed=0)
        decompose_seconds = time.perf_counter() - start
        raw = accuracy(compressed, test, spec)
        budgeted = [
            slot.layer.name for slot in draft_plan(analysis, policy, needs_ranks=False).slots
        ]
        decomposed = {entry.name: entry.decompose for entry in plan.layers}
        recalibrate_bn(compressed, calibration.bn_batches())
        row = {
            "selector": select,
            "macs": plan_cost(analysis, plan).macs,
            "macs_reduction": analysis.total_macs / plan_cost(analysis, plan).macs,
            "budget_use": plan_cost(analysis, plan).macs / goal,
            "params_reduction": analysis.total_params / plan_cost(analysis, plan).params,
            "kept_whole": sum(1 for name in budgeted if not decomposed.get(name)),
            "test_raw": raw,
            "test_recal": accuracy(compressed, test, spec),
            "jpeg_delta_recal": accuracy(compressed, jpeg, spec) - original["jpeg"],
            "select_seconds": select_seconds,
            "decompose_seconds": decompose_seconds,
        }
        if select == "pars":
            row["trials"] = report["trials_complete"]
            row["proxy"] = report["best"]["proxy"]
        rows.append(row)
        reports[select], plans[select] = report, plan
        print(json.dumps(row), flush=True)
        if select == "pars":
            plot_search(report, args.out.with_name(args.out.stem + "_pars.png"))

    correlation = None
    if "pars" in plans and args.plans > 1:
        correlation = correlation_study(
            gm, analysis, calibration, train, test, spec, args, work, storage, reports["pars"]
        )

    result = {
        "benchmark": "rank_selection_resnet56",
        "machine": "2-core x86-64 CPU, 24 GiB, no GPU",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "optuna": optuna.__version__,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "original": {**original, "macs": analysis.total_macs, "params": analysis.total_params},
        "goal_macs": goal,
        "rows": rows,
        "correlation": correlation,
        "reports": reports,
        "plans": {k: v.model_dump() for k, v in plans.items()},
    }
    atomic_write_json(args.out, json.loads(json.dumps(result, default=float)))
    print_table(result)


def correlation_study(gm, analysis, calibration, train, test, spec, args, work, storage, report):
    """Proxies vs fine-tuned test accuracy for `args.plans` PARS trials spanning the proxy range."""
    policy = RankPolicy(
        method=args.method,
        macs_reduction=args.reduction,
        select="pars",
        round_to=get_backend("cpu").channel_block(),  # as the CLI's round_to "auto"
    )
    draft = draft_plan(analysis, policy, "resnet56", needs_ranks=False)
    space = ParsSpace(draft)
    study = optuna.load_study(study_name=report["study_name"], storage=open_storage(storage))
    trials = sorted(
        (t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE),
        key=lambda t: t.value,
    )
    picks = sorted({round(i) for i in np.linspace(0, len(trials) - 1, args.plans)})
    evaluator = Evaluator(gm, analysis, calibration, DecompositionCache(work / "cache-pars", 0))
    rows = []
    for index in picks:
        trial = trials[index]
        start = time.perf_counter()
        choices = space.choices([trial.params[name] for name in space.names])
        scores = evaluator.evaluate(slot_choices(draft, choices), raw=True)
        plan = draft.finish(choices, ["correlation study"] * len(choices))
        compressed, _ = decompose(gm, analysis, plan, seed=0)
        recalibrate_bn(compressed, calibration.bn_batches())
        before = accuracy(compressed, test, spec)
        tuned = finetune(compressed, train, spec, args.finetune_epochs)
        recalibrate_bn(tuned, calibration.bn_batches())
        row = {
            "trial": trial.number,
            "macs": plan_cost(analysis, plan).macs,
            "raw_accuracy": scores["raw_accuracy"],
            "recal_accuracy": scores["accuracy"],
            "agreement": scores["agreement"],
            "kd": scores["kd"],
            "test_before_finetune": before,
            "test_after_finetune": accuracy(tuned, test, spec),
            "seconds": time.perf_counter() - start,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    target = [r["test_after_finetune"] for r in rows]
    proxies = {
        "raw_accuracy": [r["raw_accuracy"] for r in rows],
        "recal_accuracy": [r["recal_accuracy"] for r in rows],
        "agreement": [r["agreement"] for r in rows],
        "neg_kd": [-r["kd"] for r in rows],
        "test_before_finetune": [r["test_before_finetune"] for r in rows],
    }
    spearman = {}
    for name, values in proxies.items():
        rho, p = spearmanr(values, target)
        # Too few or tied values give NaN, which JSON cannot hold.
        spearman[name] = {
            "rho": float(rho) if np.isfinite(rho) else None,
            "p": float(p) if np.isfinite(p) else None,
        }
    return {"plans": rows, "spearman": spearman, "finetune_epochs": args.finetune_epochs}


def print_table(result: dict) -> None:
    original = result["original"]
    print(
        f"\nResNet-56 ({original['macs'] / 1e6:.1f} M MACs), target "
        f"{result['settings']['reduction']:g}× MACs, method {result['settings']['method']}; "
        f"original test {original['test']:.2%}"
    )
    print(
        "| selector | MACs (M) | reduction | budget use | test raw | test + BN recal | "
        "Δ JPEG-10k + recal | select time | "
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in result["rows"]:
        name = row["selector"] + (f" ({row['trials']} trials)" if "trials" in row else "")
        print(
            f"| {name} | {row['macs'] / 1e6:.2f} | {row['macs_reduction']:.3f}× | "
            f"{row['budget_use']:.2%} | {row['test_raw']:.2%} | {row['test_recal']:.2%} | "
            f"{row['jpeg_delta_recal'] * 100:+.2f} pt | {row['select_seconds']:.0f} s |"
        )
    if result["correlation"]:
        print("\n| proxy | Spearman ρ vs fine-tuned test accuracy | p |")
        print("|---|---:|---:|")
        for name, value in result["correlation"]["spearman"].items():
            rho = "n/a" if value["rho"] is None else f"{value['rho']:+.2f}"
            p = "n/a" if value["p"] is None else f"{value['p']:.3f}"
            print(f"| {name} | {rho} | {p} |")


if __name__ == "__main__":
    main()
