"""Data-driven selection: decomposition cache, eps-search, PARS, storages, resumption, workers."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import optuna
import pytest
import torch
from planning_helpers import resolve

from rankfold.converter.report import plot_search
from rankfold.converter.search_data import calibration_from_dataset
from rankfold.models import (
    DIGITS_SPEC,
    digits_splits,
    load_dataset,
    load_model,
    normalize,
    train_digits_cnn,
)
from rankfold.passes import analyze, decompose, plan_cost, trace
from rankfold.passes.core import ConfigError
from rankfold.passes.methods import get_method
from rankfold.passes.plan import RankPolicy, draft_plan
from rankfold.passes.search import (
    DecompositionCache,
    Evaluator,
    SearchConfig,
    check_storage,
    fail_orphaned_trials,
    journal_lease,
    open_storage,
    redacted,
    slot_choices,
)
from rankfold.passes.search.storage import retry_of
from rankfold.passes.selectors.pars import pareto_front


@pytest.fixture(scope="module")
def digits():
    """A trained digits CNN (BatchNorm), traced, with a calibration split of its training data."""
    model = train_digits_cnn(epochs=3)
    gm = trace(model, torch.zeros(1, *DIGITS_SPEC.input_shape))
    train, _ = digits_splits()
    calibration = calibration_from_dataset(train, DIGITS_SPEC, samples=300, bn_samples=200)
    return gm, analyze(gm), calibration


def _policy(**kwargs) -> RankPolicy:
    return RankPolicy(method="tucker2", min_macs_share=0, round_to=None, **kwargs)


def test_calibration_splits_are_disjoint_then_shared():
    train, _ = digits_splits()
    calibration = calibration_from_dataset(train, DIGITS_SPEC, samples=300, bn_samples=200)
    assert len(calibration.inputs) == 300 and len(calibration.bn_inputs) == 200
    assert torch.equal(calibration.labels, torch.from_numpy(train.y[200:500]))
    small = calibration_from_dataset(train.subset(250), DIGITS_SPEC, samples=300, bn_samples=200)
    assert len(small.inputs) == 250 and len(small.bn_inputs) == 200


def test_calibration_recalibrates_on_augmented_and_scores_on_clean_images(data_dir):
    _, spec = load_model("resnet20")
    train = load_dataset(data_dir / "cifar10/train_lossless_5085.npz", spec, limit=300)
    calibration = calibration_from_dataset(train, spec, samples=100, bn_samples=200, seed=5)
    # Scored on the clean images, exactly; recalibrated on crop + flip of the first 200.
    torch.testing.assert_close(calibration.inputs, normalize(train.x[200:], spec), atol=0, rtol=0)
    clean = normalize(train.x[:200], spec)
    assert calibration.bn_inputs.shape == clean.shape
    changed = (calibration.bn_inputs != clean).flatten(1).any(1)
    assert changed.float().mean() > 0.8  # a crop at offset (4, 4) without a flip is the image
    again = calibration_from_dataset(train, spec, samples=100, bn_samples=200, seed=5)
    other = calibration_from_dataset(train, spec, samples=100, bn_samples=200, seed=6)
    assert torch.equal(calibration.bn_inputs, again.bn_inputs)
    assert not torch.equal(calibration.bn_inputs, other.bn_inputs)
    assert calibration.digest() == again.digest() != other.digest()
    plain = calibration_from_dataset(train, spec, 100, 200, seed=5, augment="none")
    torch.testing.assert_close(plain.bn_inputs, clean, atol=0, rtol=0)


def test_cached_blocks_equal_decompose_and_are_reused_from_disk(digits, tmp_path):
    gm, analysis, calibration = digits
    plan, _ = resolve(gm, analysis, _policy(macs_reduction=2.5), "digits")
    reference, _ = decompose(gm, analysis, plan, seed=3)
    draft = draft_plan(analysis, _policy(macs_reduction=2.5))
    choices = {e.name: (get_method(e.method), tuple(e.ranks)) for e in plan.decomposed()}
    first = DecompositionCache(tmp_path, seed=3)
    evaluator = Evaluator(gm, analysis, calibration, first)
    built = evaluator.build(choices)
    x = calibration.inputs[:16]
    assert torch.allclose(built(x), reference(x), atol=1e-5)
    assert first.misses == len(choices) and first.hits == 0
    second = DecompositionCache(tmp_path, seed=3)
    Evaluator(gm, analysis, calibration, second).build(choices)
    assert second.misses == 0 and second.hits == len(choices)
    # The key is the weights' hash: changed weights (or another seed) are new entries.
    changed = copy.deepcopy(gm)
    name = next(iter(choices))
    with torch.no_grad():
        changed.get_submodule(name).weight.mul_(1.01)
    module, method_ranks = changed.get_submodule(name), choices[name]
    assert second.key(module, *method_ranks) != second.key(gm.get_submodule(name), *method_ranks)
    assert DecompositionCache(tmp_path, seed=4).key(gm.get_submodule(name), *method_ranks) != (
        second.key(gm.get_submodule(name), *method_ranks)
    )
    # A damaged entry is recomputed, not trusted.
    for path in tmp_path.rglob("*.pt"):
        path.write_bytes(b"not a torch file")
    third = DecompositionCache(tmp_path, seed=3)
    assert torch.allclose(Evaluator(gm, analysis, calibration, third).build(choices)(x), built(x))
    assert third.misses == len(choices)
    assert len(draft.slots) >= len(choices)


def test_eps_search_takes_the_smallest_rank_within_epsilon(digits, tmp_path):
    gm, analysis, calibration = digits
    epsilon = 0.02
    search = SearchConfig(cache_dir=tmp_path)
    steps = []
    plan, report = resolve(
        gm,
        analysis,
        _policy(select="eps-search", epsilon=epsilon),
        "digits",
        calibration,
        search,
        progress=steps.append,
    )
    assert len(steps) == len(report["layers"])
    tolerance = 0.5 / len(calibration.labels)
    draft = draft_plan(analysis, _policy(select="eps-search"), global_rank=False)
    for slot, row in zip(draft.slots, report["layers"]):
        drops = {tuple(e["ranks"]): e["drop"] for e in row["evaluations"]}
        ladder = slot.candidates()
        if row["ranks"] is None:
            assert drops[ladder[-1]] > epsilon + tolerance
            continue
        assert drops[tuple(row["ranks"])] <= epsilon + tolerance
        index = ladder.index(tuple(row["ranks"]))
        if index > 0:  # binary search evaluated the next smaller candidate, and it failed
            assert drops[ladder[index - 1]] > epsilon + tolerance
    # Re-measure one chosen layer alone: the drop the report states is what it costs.
    chosen = next(e for e in plan.layers if e.decompose)
    evaluator = Evaluator(gm, analysis, calibration, DecompositionCache(tmp_path))
    alone = evaluator.evaluate({chosen.name: (get_method(chosen.method), tuple(chosen.ranks))})
    row = next(r for r in report["layers"] if r["layer"] == chosen.name)
    assert report["baseline_accuracy"] - alone["accuracy"] == pytest.approx(row["drop"], abs=1e-9)


def test_eps_search_keeps_layers_that_miss_epsilon_whole(digits, tmp_path, monkeypatch):
    gm, analysis, calibration = digits
    # A layer whose every replacement costs accuracy must stay whole: make one layer's blocks
    # useless by zeroing their weights, so even its largest candidate misses ε.
    victim = draft_plan(analysis, _policy(select="eps-search"), global_rank=False).slots[0].layer
    original_block = DecompositionCache.block

    def broken(self, module, layer, method, ranks):
        block, entry = original_block(self, module, layer, method, ranks)
        if layer.name == victim.name:
            with torch.no_grad():
                for parameter in block.parameters():
                    parameter.zero_()
        return block, entry

    monkeypatch.setattr(DecompositionCache, "block", broken)
    plan, report = resolve(
        gm,
        analysis,
        _policy(select="eps-search", epsilon=0.02, macs_reduction=2.0),
        "digits",
        calibration,
        SearchConfig(cache_dir=tmp_path),
    )
    entry = next(e for e in plan.layers if e.name == victim.name)
    assert not entry.decompose and "eps-search: kept whole" in entry.reason
    assert plan_cost(analysis, plan).macs <= analysis.total_macs / 2.0
    assert report["budget_scale"] > 0


def test_eps_search_in_two_processes_matches_one(digits, tmp_path):
    gm, analysis, calibration = digits
    policy = _policy(select="eps-search", epsilon=0.03, macs_reduction=2.5)
    one, _ = resolve(gm, analysis, policy, "d", calibration, SearchConfig(cache_dir=tmp_path))
    two, report = resolve(
        gm, analysis, policy, "d", calibration, SearchConfig(cache_dir=tmp_path, workers=2)
    )
    assert report["workers"] == 2
    assert [e.ranks for e in one.layers] == [e.ranks for e in two.layers]


def test_pars_best_plan_within_budget_with_table_pareto_and_plot(digits, tmp_path):
    gm, analysis, calibration = digits
    steps = []
    search = SearchConfig(trials=12, cache_dir=tmp_path / "cache")
    plan, report = resolve(
        gm,
        analysis,
        _policy(select="pars", macs_reduction=3.0),
        "digits",
        calibration,
        search,
        progress=steps.append,
        seed=1,
    )
    goal = analysis.total_macs / 3.0
    cost = plan_cost(analysis, plan)
    assert cost.macs <= goal and report["macs"] == cost.macs
    table = report["table"]
    assert len(table) == 12 == len(steps) == report["trials_complete"]
    assert all(row["state"] == "COMPLETE" and row["macs"] <= goal for row in table)
    assert table[0]["seed"] == "uniform"  # the baseline is always trial 0
    best = max(table, key=lambda row: row["proxy"])
    assert report["best"]["proxy"] == best["proxy"] >= table[0]["proxy"]
    assert report["best"]["macs"] == cost.macs  # the returned plan is the best trial's
    assert report["pareto"] == pareto_front(table) and report["pareto"]
    assert report["decompositions_computed"] > 0
    path = plot_search(report, tmp_path / "search.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Every decomposition of the search is in the cache: the same search again computes none.
    _, again = resolve(
        gm,
        analysis,
        _policy(select="pars", macs_reduction=3.0),
        "digits",
        calibration,
        search,
        seed=1,
    )
    assert again["decompositions_computed"] == 0
    assert [r["proxy"] for r in again["table"]] == [r["proxy"] for r in table]


def test_pars_tpe_sampler_and_kd_proxy(digits, tmp_path):
    gm, analysis, calibration = digits
    search = SearchConfig(trials=6, sampler="tpe", proxy="kd", cache_dir=tmp_path)
    plan, report = resolve(
        gm, analysis, _policy(select="pars", params_reduction=2.0), "d", calibration, search
    )
    assert plan_cost(analysis, plan).params <= analysis.total_params / 2.0
    assert report["sampler"] == "tpe" and report["trials_complete"] == 6
    assert all(row["proxy"] == pytest.approx(-row["kd"]) for row in report["table"])


def test_pars_on_a_batchnorm_free_model_uses_bias_correction(digits, tmp_path):
    from torch.fx.experimental.optimization import fuse

    gm, _, calibration = digits
    fused = trace(fuse(gm), torch.zeros(1, *DIGITS_SPEC.input_shape))  # BN folded into convs
    analysis = analyze(fused)
    evaluator = Evaluator(fused, analysis, calibration, DecompositionCache(tmp_path))
    assert not evaluator.uses_bn
    draft = draft_plan(analysis, _policy(macs_reduction=3.0))
    choices = slot_choices(draft, [slot.candidates()[0] for slot in draft.slots])
    model = evaluator.build(choices)
    name = next(iter(choices))
    before = model.get_submodule(name)[-1].bias.detach().clone()
    evaluator.recalibrate(model, list(choices))
    assert not torch.allclose(model.get_submodule(name)[-1].bias, before)
    _, report = resolve(
        fused,
        analysis,
        _policy(select="pars", macs_reduction=3.0),
        "fused",
        calibration,
        SearchConfig(trials=3, cache_dir=tmp_path),
    )
    assert report["calibration"]["recalibration"] == "bias correction"


_POP_ENQUEUED = textwrap.dedent(
    """
    import json, sys
    import optuna
    from rankfold.passes.search import open_storage

    study = optuna.load_study(study_name="q", storage=open_storage(sys.argv[1]))
    claimed = []
    while (trial_id := study._pop_waiting_trial_id()) is not None:
        claimed.append(trial_id)
    print(json.dumps(claimed))
    """
)


def test_two_processes_on_a_sqlite_study_never_claim_the_same_enqueued_trial(tmp_path):
    """optuna's SELECT … FOR UPDATE is a no-op on SQLite: without serialized transactions two
    workers claim the same enqueued trial (14–15 of 200 here), and one of them later fails on
    'Cannot tell a COMPLETE trial'."""
    url = f"sqlite:///{tmp_path / 'q.db'}"
    study = optuna.create_study(study_name="q", storage=open_storage(url))
    for x in range(200):
        study.enqueue_trial({"x": x})
    workers = [
        subprocess.Popen([sys.executable, "-c", _POP_ENQUEUED, url], stdout=subprocess.PIPE)
        for _ in range(2)
    ]
    claimed = [json.loads(worker.communicate(timeout=120)[0]) for worker in workers]
    assert all(worker.returncode == 0 for worker in workers)
    assert not set(claimed[0]) & set(claimed[1])
    assert sorted(claimed[0] + claimed[1]) == sorted(t._trial_id for t in study.get_trials())


def test_storage_urls_and_fingerprint_mismatch(digits, tmp_path):
    gm, analysis, calibration = digits
    assert isinstance(open_storage(f"journal:{tmp_path / 'a.log'}"), optuna.storages.JournalStorage)
    assert isinstance(open_storage(str(tmp_path / "b.log")), optuna.storages.JournalStorage)
    assert isinstance(open_storage(f"sqlite:///{tmp_path / 'c.db'}"), optuna.storages.RDBStorage)
    with pytest.raises(ConfigError, match="journal has no heartbeat, so it serves one process"):
        check_storage(f"journal:{tmp_path / 'a.log'}", workers=2)
    assert redacted("postgresql://u:p:w@h:5/db") == "postgresql://u:***@h:5/db"
    assert redacted("postgresql://:pw@h/db") == "postgresql://:***@h/db"
    assert redacted("postgresql://u@h/db") == "postgresql://u@h/db"
    with pytest.raises(ConfigError) as info:
        open_storage("postgresql+nodriver://x:s3cret-pw@localhost/db")
    assert "s3cret-pw" not in str(info.value) and "x:***@localhost" in str(info.value)
    for bad in ("nonsense", "postgresql+nodriver://x@localhost/db"):
        with pytest.raises(ConfigError, match="cannot open search storage") as info:
            open_storage(bad)
        assert "\n" not in str(info.value)
    search = SearchConfig(
        trials=2, storage=f"sqlite:///{tmp_path / 's.db'}", study_name="s", cache_dir=tmp_path
    )
    resolve(gm, analysis, _policy(select="pars", macs_reduction=3.0), "d", calibration, search)
    with pytest.raises(ConfigError, match="study 's' .* another model, budget"):
        resolve(gm, analysis, _policy(select="pars", macs_reduction=2.0), "d", calibration, search)


RUNNER = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from rankfold.passes import PlanningContext, RankPolicy, analyze, select_ranks, trace
    from rankfold.passes.search import SearchConfig
    payload = torch.load(sys.argv[1], weights_only=False)
    gm = trace(payload["gm"], torch.zeros(1, 1, 8, 8))  # pickling drops the traced shapes
    search = SearchConfig(**payload["search"])
    policy = RankPolicy(
        method="tucker2", min_macs_share=0, select="pars", macs_reduction=3.0, round_to=None
    )
    context = PlanningContext(
        gm=gm, calibration=payload["calibration"], search=search, model_name="digits"
    )
    select_ranks(analyze(gm), policy, context)
    """
)


def _completed(storage: str, name: str) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=name, storage=open_storage(storage))
    return study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the test asks trials by hand
def test_orphaned_trials_are_failed_and_requeued_without_process_ids(tmp_path):
    """RDB: a trial killed before its heartbeat started is failed once older than the grace
    period; a journal's RUNNING trials are orphans once its lease is free, and a second process
    cannot take a held lease (flock: per open file, so this process's second open conflicts)."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    storage = open_storage(url, heartbeat=1)
    study = optuna.create_study(storage=storage, study_name="orphan")
    lost = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    assert fail_orphaned_trials(study, storage, journal=False, grace=60) == 0  # may be starting
    assert fail_orphaned_trials(study, storage, journal=False, grace=0) == 1
    assert fail_orphaned_trials(study, storage, journal=False, grace=0) == 0  # done once
    trials = study.get_trials()
    assert trials[lost.number].state == optuna.trial.TrialState.FAIL
    retry = trials[-1]
    assert retry.state == optuna.trial.TrialState.WAITING and retry.params == lost.params
    assert retry_of(retry) == 0
    journal = f"journal:{tmp_path / 'study.log'}"
    with journal_lease(journal):
        with pytest.raises(ConfigError, match="in use by another process"):
            with journal_lease(journal):
                pass
        storage = open_storage(journal)
        study = optuna.create_study(storage=storage, study_name="j")
        study.set_user_attr("x", 1)
        running = study.ask()
        running.set_user_attr("host", "elsewhere")  # the journal does not care who owned it
        assert fail_orphaned_trials(study, storage, journal=True, grace=60) == 1
    assert study.get_trials()[0].state == optuna.trial.TrialState.FAIL
    with journal_lease(journal):  # free again once its holder is done
        pass


def test_pars_resumes_after_a_kill(digits, tmp_path):
    gm, analysis, calibration = digits
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    settings = {
        "trials": 10_000,
        "storage": storage,
        "study_name": "k",
        "cache_dir": str(tmp_path),
        "heartbeat": 1,
    }
    torch.save({"gm": gm, "calibration": calibration, "search": settings}, tmp_path / "job.pt")
    (tmp_path / "runner.py").write_text(RUNNER)
    process = subprocess.Popen(
        [sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "job.pt")]
    )
    try:
        deadline = time.monotonic() + 120
        done: list = []
        while len(done) < 3:
            assert process.poll() is None, "the search process died on its own"
            assert time.monotonic() < deadline, "the search process made no progress"
            time.sleep(0.5)
            try:
                done = _completed(storage, "k")
            except KeyError:  # the study does not exist yet
                done = []
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()
    before = {t.number: t.value for t in _completed(storage, "k")}
    target = len(before) + 3
    search = SearchConfig(**{**settings, "trials": target})
    steps = []
    plan, report = resolve(
        gm,
        analysis,
        _policy(select="pars", macs_reduction=3.0),
        "digits",
        calibration,
        search,
        progress=steps.append,
    )
    # The bar counts the study's trials: the resumed ones first, then this run's.
    assert len(steps) == target and steps.count("resumed trial") == len(before)
    study = optuna.load_study(study_name="k", storage=open_storage(storage))
    states = [t.state for t in study.get_trials()]
    assert states.count(optuna.trial.TrialState.COMPLETE) == target == report["trials_complete"]
    assert optuna.trial.TrialState.RUNNING not in states  # the killed trial was failed
    assert states.count(optuna.trial.TrialState.FAIL) <= 1
    assert report["trials_resumed"] == len(before)
    after = {t.number: t.value for t in _completed(storage, "k")}
    assert {n: after[n] for n in before} == before  # earlier trials kept, not redone
    assert plan_cost(analysis, plan).macs <= analysis.total_macs / 3.0


def test_two_workers_finish_the_requested_trials_without_loss_or_duplicates(digits, tmp_path):
    gm, analysis, calibration = digits
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    search = SearchConfig(trials=16, storage=storage, study_name="w", workers=2, cache_dir=tmp_path)
    steps = []

    def step_once_both_work(*args: object) -> None:
        # The spawned worker imports torch before its first trial, which can take longer than
        # this process needs for all 16: hold this one after its first trial until the other
        # has taken a trial too (bounded; the assertions below then fail if it never did).
        steps.append(args)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            trials = optuna.load_study(study_name="w", storage=storage).get_trials(deepcopy=False)
            if any(t.user_attrs.get("worker") == 1 for t in trials):
                return
            time.sleep(0.2)

    _, report = resolve(
        gm,
        analysis,
        _policy(select="pars", macs_reduction=3.0),
        "d",
        calibration,
        search,
        progress=step_once_both_work,
    )
    study = optuna.load_study(study_name="w", storage=open_storage(storage))
    trials = study.get_trials()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 16 == report["trials_complete"] == len(steps)
    assert len({t.number for t in complete}) == 16
    # Anything else is a surplus trial that stepped back before running (at most one per worker).
    others = [t for t in trials if t.state != optuna.trial.TrialState.COMPLETE]
    assert all(t.user_attrs.get("surplus") for t in others) and len(others) <= 2
    assert {t.user_attrs["worker"] for t in complete} == {0, 1}
    drawn = {
        worker: {
            tuple(sorted(t.params.items()))
            for t in complete
            if "seed" not in t.user_attrs and t.user_attrs["worker"] == worker
        }
        for worker in (0, 1)
    }
    # Not the same draws in lockstep (differently seeded samplers). A GP may re-propose a box
    # corner it has already evaluated, so repeats across the study are not excluded.
    assert drawn[0] - drawn[1] and drawn[1] - drawn[0]
