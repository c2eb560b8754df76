"""pars: proxy-based automatic rank selection, Bayesian optimisation with optuna over per-layer
budget shares.

A trial samples one share per layer; `allocate` turns the shares into ranks that fit the budget
(the largest common scale whose ranks fit, then single steps), so every sampled configuration is
feasible and within a few tenths of a percent of the budget; the budget is a hard constraint by
construction rather than a penalty. Shares lie in [0.25, 1] (log scale): a wider range mostly
produced useless random trials. The sampler is optuna's GPSampler by default (it conditions on
running trials, so parallel workers spread out); `sampler="tpe"` selects multivariate TPE with
constant liar. The uniform allocation (every share 1) is enqueued first, then the energy and
VBMF allocations where the method has unfoldings, so the search starts from the baselines it has
to beat. Hand-written on optuna (no library implements PARS).

Scale-out uses optuna's storages: any RDB URL (SQLite on one host, PostgreSQL across machines)
shares one study between `workers` child processes and any number of `rankfold compress` runs
started with the same --storage and --study-name; a trial whose worker died is failed by
optuna's heartbeat and redone by another worker (`rankfold.passes.search.storage`); a killed run
resumes where it stopped, and a finished study re-opened rebuilds the report.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rankfold.passes.core import ConfigError, RankfoldError
from rankfold.passes.methods import Ranks
from rankfold.passes.plan import Choices, PlanDraft, allocate, plan_cost
from rankfold.passes.recalibrate import has_batchnorm
from rankfold.passes.search import (
    HOST,
    Evaluator,
    SearchConfig,
    SearchContext,
    check_storage,
    fail_orphaned_trials,
    journal_lease,
    journal_path,
    open_storage,
    proxy_value,
    redacted,
    slot_choices,
    spawn_context,
    weights_digest,
)
from rankfold.passes.search.storage import GRACE_HEARTBEATS, retry_of
from rankfold.passes.selectors.base import Advance, Choice, PlanningContext, Selector
from rankfold.passes.selectors.chains import has_unfoldings
from rankfold.passes.selectors.energy import energy_choice
from rankfold.passes.selectors.eps_search import last_within
from rankfold.passes.selectors.output import output_choice
from rankfold.passes.selectors.vbmf import vbmf_choice

if TYPE_CHECKING:
    import optuna

    from rankfold.passes.statistics import LayerStatistics

SHARE_LOW = 0.25  # a layer keeps at least a quarter of the share of the most favoured one


class ParsSelector(Selector):
    name = "pars"
    summary = "Bayesian search (optuna) over per-layer budget shares, scored on a proxy"
    needs_calibration = True
    needs_budget = True
    uses_cache = True
    reads = frozenset(
        f"search.{key}"
        for key in (
            "trials",
            "sampler",
            "proxy",
            "storage",
            "study_name",
            "workers",
            "heartbeat",
            "calib_samples",
            "bn_samples",
            "timeout",
        )
    )

    def steps(self, draft: PlanDraft, context: PlanningContext) -> int:
        return context.search.trials

    def choose(self, draft: PlanDraft, context: PlanningContext, advance: Advance) -> Choice:
        seeds = pars_seeds(draft, context.gm, context.moments)
        return pars_search(SearchContext.of(draft, context), seeds, advance)


def pars_seeds(
    draft: PlanDraft, gm, moments: LayerStatistics | None = None
) -> list[tuple[str, Choices]]:
    """Configurations PARS tries right after the uniform one: the energy and VBMF allocations
    where the methods have unfoldings (they cost no decomposition), and with layer statistics
    the output-error allocation (`--select output`)."""
    if not has_unfoldings(draft, gm):
        return []
    seeds = [
        ("energy", energy_choice(draft, gm, 1.0).choices),
        ("vbmf", vbmf_choice(draft, gm).choices),
    ]
    if moments is not None and all(slot.layer.name in moments.moments for slot in draft.slots):
        seeds.append(("output", output_choice(draft, gm, moments).choices))
    return seeds


def plan_totals(draft: PlanDraft, choices: Choices) -> dict[str, int]:
    """Whole-model params and MACs with the slots at `choices` (other entries as drafted)."""
    cost = plan_cost(draft.analysis, draft.finish(choices, [""] * len(choices)))
    return {"params": cost.params, "macs": cost.macs}


class ParsSpace:
    """Per-layer budget shares → ranks within the budget. Options: the candidates, then whole."""

    def __init__(self, draft: PlanDraft) -> None:
        if draft.budget is None:
            raise ConfigError(
                "--select pars searches under a budget; give --macs-reduction or --params-reduction"
            )
        self.draft = draft
        metric = draft.budget.metric
        self.names = [slot.layer.name for slot in draft.slots]
        self.ladders: list[list[Ranks | None]] = [
            [*slot.candidates(), None] for slot in draft.slots
        ]
        self.costs = [
            np.array([slot.cost(option, metric) for option in ladder])
            for slot, ladder in zip(draft.slots, self.ladders)
        ]
        self.sizes = [slot.cost(None, metric) for slot in draft.slots]

    def choices(self, shares: Sequence[float]) -> Choices:
        def level(j: int, x: float) -> int:
            return last_within(self.costs[j], x * shares[j] * self.sizes[j])

        indices, _ = allocate(self.draft, self.ladders, level, 0.0, 1.0 / min(shares))
        return [ladder[i] for ladder, i in zip(self.ladders, indices)]

    def shares_of(self, choices: Choices) -> dict[str, float]:
        """Shares approximating `choices` (a seed trial): each layer's kept fraction, rescaled."""
        metric = self.draft.budget.metric
        keep = [
            slot.cost(ranks, metric) / size
            for slot, ranks, size in zip(self.draft.slots, choices, self.sizes)
        ]
        top = max(keep)
        return {name: min(max(k / top, SHARE_LOW), 1.0) for name, k in zip(self.names, keep)}


def _fingerprint(context: SearchContext) -> str:
    """What makes two runs the same study: model weights, plan space, budget, proxy, data."""
    draft = context.draft
    description = {
        "model": draft.model_name,
        "weights": weights_digest(context.gm),
        "policy": draft.policy.model_dump(mode="json", exclude={"select"}),
        "slots": [[s.layer.name, s.method.name] for s in draft.slots],
        "proxy": context.search.proxy,
        "calibration": context.calibration.digest(),
        "seed": context.seed,
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def _sampler(search: SearchConfig, base_seed: int, worker: int) -> optuna.samplers.BaseSampler:
    import optuna

    seed = base_seed + 1000 * worker  # workers must not draw the same random startup trials
    if search.storage is not None:
        # A shared study is joined by `rankfold compress` runs started alike (all worker 0),
        # possibly on several hosts; its trial order depends on their timing anyway.
        seed = (seed + zlib.crc32(f"{HOST}:{os.getpid()}".encode())) % 2**31
    startup = min(10, max(search.trials // 5, 1))
    if search.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    return optuna.samplers.TPESampler(
        seed=seed,
        n_startup_trials=startup,
        multivariate=True,
        constant_liar=True,
    )


class ParsRun:
    """One process's part of a PARS study: sample shares, allocate, evaluate, tell."""

    def __init__(self, context: SearchContext, storage_url: str | None, study_name: str) -> None:
        self.context = context
        self.space = ParsSpace(context.draft)
        self.storage_url = storage_url
        self.study_name = study_name
        self.evaluator: Evaluator | None = None

    def optimize(
        self,
        worker: int,
        study: optuna.Study | None = None,
        storage: optuna.storages.BaseStorage | None = None,
        on_trial: Callable[[optuna.Study], None] | None = None,
    ) -> None:
        """Run trials until the study holds `trials` complete ones (or the timeout passes),
        waiting for other workers' last trials and redoing those whose worker died.

        `study` is the parent's own study object on `storage` (its sampler seeded for worker
        0); worker processes load the study from the storage URL with their own sampler.
        """
        import optuna
        from optuna.trial import TrialState

        search = self.context.search
        if study is None:
            storage = open_storage(self.storage_url, search.heartbeat)
            study = optuna.load_study(
                study_name=self.study_name,
                storage=storage,
                sampler=_sampler(search, self.context.seed, worker),
            )
        target = search.trials

        heartbeat = (
            isinstance(storage, optuna.storages.RDBStorage)
            and storage.get_heartbeat_interval() is not None
        )
        study_id = storage.get_study_id_from_name(study.study_name) if heartbeat else None

        def objective(trial: optuna.Trial) -> float:
            if heartbeat:
                # Optuna's heartbeat thread writes its first beat when it gets the database: a
                # worker killed before that leaves a RUNNING trial with no beat, which the
                # heartbeat never fails. With one beat written here, before "host" marks the
                # trial as reached, every trial is failed by one of the two rules.
                storage.record_heartbeat(
                    storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
                )
            trial.set_user_attr("host", HOST)
            trial.set_user_attr("pid", os.getpid())
            trial.set_user_attr("worker", worker)
            if self._surplus(study, trial.number, target):
                trial.set_user_attr("surplus", True)
                study.stop()
                raise optuna.TrialPruned()
            start = time.perf_counter()
            misses = self.evaluator.cache.misses
            shares = [
                trial.suggest_float(name, SHARE_LOW, 1.0, log=True) for name in self.space.names
            ]
            choices = self.space.choices(shares)
            scores = self.evaluator.evaluate(slot_choices(self.context.draft, choices))
            totals = plan_totals(self.context.draft, choices)
            for key, value in {**scores, **totals}.items():
                trial.set_user_attr(key, value)
            trial.set_user_attr("kept_whole", sum(c is None for c in choices))
            trial.set_user_attr("decompositions", self.evaluator.cache.misses - misses)
            trial.set_user_attr("seconds", time.perf_counter() - start)
            return proxy_value(scores, search.proxy)

        def counts() -> dict[TrialState, int]:
            states = [t.state for t in study.get_trials(deepcopy=False)]
            return {state: states.count(state) for state in TrialState}

        def enough(study: optuna.Study, _trial: optuna.trial.FrozenTrial) -> None:
            now = counts()
            if now[TrialState.COMPLETE] + now[TrialState.RUNNING] >= target:
                study.stop()
            if on_trial is not None:
                on_trial(study)

        journal = journal_path(self.storage_url) is not None
        deadline = None if search.timeout is None else time.monotonic() + search.timeout
        while True:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # heartbeat: no-op for a journal
            if storage is not None:
                fail_orphaned_trials(study, storage, journal, GRACE_HEARTBEATS * search.heartbeat)
            now = counts()
            left = None if deadline is None else deadline - time.monotonic()
            if now[TrialState.COMPLETE] >= target or (left is not None and left <= 0):
                return
            busy = now[TrialState.COMPLETE] + now[TrialState.RUNNING]
            if now[TrialState.WAITING] or busy < target:
                if self.evaluator is None:
                    self.evaluator = self.context.evaluator()
                study.optimize(objective, n_trials=None, timeout=left, callbacks=[enough])
            else:  # the last trials run elsewhere: wait until they finish or go stale
                time.sleep(search.heartbeat if left is None else min(search.heartbeat, left))
                if on_trial is not None:
                    on_trial(study)

    @staticmethod
    def _surplus(study: optuna.Study, number: int, target: int) -> bool:
        """True when `target` earlier trials already ran or run: this one would be one too many.

        Trial numbers are assigned atomically by the storage, so of two workers that start the
        last trial at once, exactly one sees the other's lower number and steps back.
        """
        from optuna.trial import TrialState

        states = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
        earlier = [t for t in study.get_trials(deepcopy=False, states=states) if t.number < number]
        return len(earlier) >= target


def _trial_row(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    attrs = trial.user_attrs
    keys = ("accuracy", "agreement", "kd", "macs", "params", "kept_whole", "decompositions")
    row: dict[str, Any] = {
        "trial": trial.number,
        "state": trial.state.name,
        "proxy": trial.value,
        **{key: attrs.get(key) for key in keys},
        "seconds": attrs.get("seconds"),
        "worker": attrs.get("worker"),
        "seed": attrs.get("seed"),
        "host": attrs.get("host"),
        "retry_of": retry_of(trial),
    }
    return json.loads(json.dumps(row, default=float))


def pareto_front(table: Sequence[Mapping[str, Any]]) -> list[int]:
    """Trials no other trial beats on both fewer MACs and a higher proxy, by increasing MACs."""
    done = sorted(
        (r for r in table if r["state"] == "COMPLETE" and r["proxy"] is not None),
        key=lambda r: (r["macs"], -r["proxy"]),
    )
    front, best = [], -math.inf
    for row in done:
        if row["proxy"] > best:
            front.append(row["trial"])
            best = row["proxy"]
    return front


def _pars_worker(
    context: SearchContext, storage_url: str, study_name: str, worker: int, error_file: str
) -> None:
    import optuna

    try:
        torch.set_num_threads(context.threads)
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        ParsRun(context, storage_url, study_name).optimize(worker)
    except BaseException as exc:
        Path(error_file).write_text(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
        raise


def pars_search(
    context: SearchContext, seeds: Sequence[tuple[str, Choices]], advance: Advance
) -> Choice:
    """Bayesian search over per-layer budget shares; returns the best trial's ranks and a report.

    `seeds` are (label, choices) configurations enqueued before the first trial (the uniform
    allocation always is, first).
    """
    import optuna
    from optuna.trial import TrialState

    # Optuna's warnings (e.g. about optional speed-ups) would break the CLI's progress display.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    start = time.perf_counter()
    search, draft = context.search, context.draft
    space = ParsSpace(draft)
    fingerprint = _fingerprint(context)
    study_name = search.study_name or f"rankfold-{draft.model_name}-{fingerprint[:12]}"
    with (
        tempfile.TemporaryDirectory(prefix="rankfold-search-") as scratch,
        contextlib.ExitStack() as held,
    ):
        storage_url = search.storage
        if storage_url is None and search.workers > 1:  # processes need a shared one
            storage_url = f"sqlite:///{Path(scratch) / 'study.db'}"
        check_storage(storage_url, search.workers)
        held.enter_context(journal_lease(storage_url))
        storage = open_storage(storage_url, search.heartbeat)
        study = optuna.create_study(
            storage=storage,
            sampler=_sampler(search, context.seed, 0),
            study_name=study_name,
            direction="maximize",
            load_if_exists=True,
        )
        known = study.user_attrs.get("rankfold_fingerprint")
        if known is None:
            study.set_user_attr("rankfold_fingerprint", fingerprint)
        elif known != fingerprint:
            raise ConfigError(
                f"study '{study_name}' in {redacted(search.storage)} was made for another model, "
                "budget, proxy or calibration data; choose another --study-name or storage"
            )
        if not study.get_trials(deepcopy=False):
            uniform = {name: 1.0 for name in space.names}
            study.enqueue_trial(uniform, user_attrs={"seed": "uniform"})
            for label, choices in list(seeds)[: search.trials - 1]:
                study.enqueue_trial(space.shares_of(choices), user_attrs={"seed": label})
        earlier = {
            t.number for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        }
        resumed = len(earlier)
        for _ in range(min(resumed, search.trials)):  # the bar counts the study's trials
            advance("resumed trial")
        reported = [resumed]

        def report_progress(current: optuna.Study) -> None:
            done = len(current.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            for _ in range(max(done - reported[0], 0)):
                advance("trial")
            reported[0] = max(done, reported[0])

        children = []
        errors = []
        if search.workers > 1:
            ctx = spawn_context()
            for worker in range(1, search.workers):
                error_file = Path(scratch) / f"worker{worker}.err"
                process = ctx.Process(
                    target=_pars_worker,
                    args=(context, storage_url, study_name, worker, str(error_file)),
                    daemon=True,
                )
                process.start()
                children.append(process)
                errors.append(error_file)
        try:
            run = ParsRun(context, storage_url, study_name)
            run.optimize(0, study=study, storage=storage, on_trial=report_progress)
            while any(process.is_alive() for process in children):
                for process in children:
                    process.join(timeout=1.0)
                report_progress(study)
        finally:
            for process in children:  # only on an error or interrupt in this process
                if process.is_alive():
                    process.terminate()
                    process.join()
        for process, error_file in zip(children, errors):
            if process.exitcode != 0:
                reason = error_file.read_text() if error_file.is_file() else "no message"
                raise RankfoldError(
                    f"search worker {process.pid} failed ({reason}); fix the cause and rerun "
                    "with the same --storage to resume"
                )
        report_progress(study)
        trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise RankfoldError(
            "the search finished no trial; raise --timeout or check the calibration data"
        )
    best = max(complete, key=lambda t: (t.value, -t.number))
    choices = space.choices([best.params[name] for name in space.names])
    budget = draft.budget
    reasons = [
        f"pars: trial {best.number} of {len(complete)} ({search.sampler}, proxy "
        f"{search.proxy} {best.value:.4f}) for {budget.reduction:g}× {budget.metric}"
        for _ in choices
    ]
    table = [_trial_row(t) for t in trials if not t.user_attrs.get("surplus")]
    report = {
        "selector": "pars",
        "sampler": search.sampler,
        "proxy": search.proxy,
        "study_name": study_name,
        "storage": redacted(search.storage),
        "workers": search.workers,
        "trials_requested": search.trials,
        "trials_complete": len(complete),
        "trials_resumed": resumed,
        # Trials whose worker died (heartbeat lost): failed, each redone as a `retry_of` row.
        "trials_failed": sum(t.state == TrialState.FAIL for t in trials),
        "heartbeat_seconds": search.heartbeat,
        "processes": len({(t.user_attrs.get("host"), t.user_attrs.get("pid")) for t in complete}),
        "budget": {
            "metric": budget.metric,
            "reduction": budget.reduction,
            "goal": budget.goal,
            "total": budget.total,
        },
        "calibration": {
            "proxy_samples": len(context.calibration.labels),
            "bn_samples": len(context.calibration.bn_inputs),
            "recalibration": "batchnorm" if has_batchnorm(context.gm) else "bias correction",
        },
        "best": _trial_row(best),
        "pareto": pareto_front(table),
        # By this run's trials: a resumed study's earlier trials decomposed in earlier runs.
        "decompositions_computed": int(
            sum(r.get("decompositions") or 0 for r in table if r["trial"] not in earlier)
        ),
        "table": table,
        "seconds": time.perf_counter() - start,
    }
    return Choice(choices, reasons, report)
