"""PARS across processes on a shared study: PostgreSQL (the server .ci/run starts) and SQLite.

Workers are separate OS processes that share nothing but the study's URL and the decomposition
cache folder, as `rankfold compress … --storage URL --study-name S` started N times would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np
import optuna
import pytest
import torch
from typer.testing import CliRunner

from rankfold.converter.cli import app
from rankfold.converter.search_data import calibration_from_dataset
from rankfold.models import DIGITS_SPEC, digits_splits, train_digits_cnn
from rankfold.passes import trace
from rankfold.passes.core import ConfigError
from rankfold.passes.search import check_storage, open_storage, redacted
from rankfold.passes.search.storage import retry_of

TRIALS = 8


@pytest.fixture(scope="module")
def postgres_url() -> str:
    """`$RANKFOLD_TEST_POSTGRES` (.ci/run starts a throwaway server): skips when it is unset or
    unreachable, fails when RANKFOLD_REQUIRE_DATA=1 (CI)."""
    url = os.environ.get("RANKFOLD_TEST_POSTGRES")
    problem = None
    if not url:
        problem = "RANKFOLD_TEST_POSTGRES is not set (.ci/postgres.sh start DIR prints one)"
    else:
        try:
            check_storage(url, 1)
        except ConfigError as exc:
            problem = str(exc)
    if problem is not None:
        if os.environ.get("RANKFOLD_REQUIRE_DATA") == "1":
            pytest.fail(f"{problem}; RANKFOLD_REQUIRE_DATA=1 makes the PostgreSQL tests required")
        pytest.skip(problem)
    return url


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict[str, Path]:
    """A trained digits CNN: traced with its calibration split (job.pt, for worker processes),
    as a checkpoint, and the digits test split as .npz (for the CLI)."""
    root = tmp_path_factory.mktemp("digits")
    model = train_digits_cnn(epochs=2)
    gm = trace(model, torch.zeros(1, *DIGITS_SPEC.input_shape))
    train, test = digits_splits()
    calibration = calibration_from_dataset(train, DIGITS_SPEC, samples=200, bn_samples=100)
    torch.save({"gm": gm, "calibration": calibration}, root / "job.pt")
    torch.save(model.state_dict(), root / "digits.pt")
    np.savez(root / "digits.npz", x=test.x, y=test.y)
    return {"job": root / "job.pt", "weights": root / "digits.pt", "data": root / "digits.npz"}


# One worker: waits for the start signal, searches, writes its selection report. With a stall
# number it hangs inside its n-th trial's evaluation (heartbeat running), for the test to kill;
# with a worker's name to wait for, its evaluations after the first wait until that worker has
# stalled (else a fast worker could take every trial before the other reached its n-th).
WORKER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from rankfold.passes import PlanningContext, RankPolicy, analyze, select_ranks, trace
    from rankfold.passes.search import Evaluator, SearchConfig
    job, settings, folder, name, stall, waits_for = sys.argv[1:]
    folder = Path(folder)
    payload = torch.load(job, weights_only=False)
    gm = trace(payload["gm"], torch.zeros(1, 1, 8, 8))  # pickling drops the traced shapes
    policy = RankPolicy(
        method="tucker2", min_macs_share=0, select="pars", macs_reduction=3.0, round_to=None
    )
    context = PlanningContext(
        gm=gm, calibration=payload["calibration"], search=SearchConfig(**json.loads(settings)),
        model_name="digits",
    )
    if int(stall):
        evaluate, calls = Evaluator.evaluate, []
        def stalling(self, choices):
            calls.append(1)
            if len(calls) == int(stall):
                (folder / f"{name}.stalled").touch()
                time.sleep(3600)
            return evaluate(self, choices)
        Evaluator.evaluate = stalling
    if waits_for:
        evaluate, calls = Evaluator.evaluate, []
        def waiting(self, choices):
            calls.append(1)
            while len(calls) > 1 and not (folder / f"{waits_for}.stalled").exists():
                time.sleep(0.05)
            return evaluate(self, choices)
        Evaluator.evaluate = waiting
    (folder / f"{name}.ready").touch()
    while not (folder / "go").exists():
        time.sleep(0.05)
    selection = select_ranks(analyze(gm), policy, context)
    (folder / f"{name}.json").write_text(json.dumps(selection.to_dict()))
    """
)


def _start_workers(
    job: Path,
    folder: Path,
    settings: dict,
    stalls: dict[str, int],
    waits: Mapping[str, str] = MappingProxyType({}),
):
    (folder / "worker.py").write_text(WORKER)
    processes = {
        name: subprocess.Popen(
            [
                sys.executable,
                str(folder / "worker.py"),
                str(job),
                json.dumps(settings),
                str(folder),
                name,
                str(stall),
                waits.get(name, ""),
            ]
        )  # fmt: skip
        for name, stall in stalls.items()
    }
    _wait_for(lambda: all((folder / f"{n}.ready").exists() for n in stalls), processes)
    (folder / "go").touch()  # both start searching together
    return processes


def _wait_for(condition, processes, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        for name, process in processes.items():
            assert process.poll() in (None, 0), f"worker {name} failed"
        assert time.monotonic() < deadline, "the workers made no progress"
        time.sleep(0.1)


def _settings(storage: str, folder: Path) -> dict:
    study = f"t{uuid.uuid4().hex[:12]}"  # the server's database outlives each test
    return {
        "trials": TRIALS,
        "storage": storage,
        "study_name": study,
        "cache_dir": str(folder / "cache"),  # one folder, shared by the workers
        "heartbeat": 1,
    }


def _trials(settings: dict) -> list[optuna.trial.FrozenTrial]:
    storage = open_storage(settings["storage"])
    return optuna.load_study(study_name=settings["study_name"], storage=storage).get_trials()


def test_two_processes_on_postgres_finish_exactly_the_trials(postgres_url, digits, tmp_path):
    settings = _settings(postgres_url, tmp_path)
    processes = _start_workers(digits["job"], tmp_path, settings, {"a": 0, "b": 0})
    for process in processes.values():
        assert process.wait(timeout=300) == 0
    trials = _trials(settings)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == TRIALS and len({t.number for t in complete}) == TRIALS
    # Anything else is a surplus trial that stepped back before running (at most one each).
    others = [t for t in trials if t.state != optuna.trial.TrialState.COMPLETE]
    assert all(t.user_attrs.get("surplus") for t in others) and len(others) <= 2
    assert len({t.user_attrs["pid"] for t in complete}) == 2  # both processes ran trials
    # Not asserted: that the two processes never evaluate the same configuration. Their samplers
    # are seeded apart, but optuna's GPSampler has no constant liar and warm-starts its
    # acquisition search from the best finished trial: two processes sampling from the same
    # finished trials can converge on the same point (4 distinct of 5 sampled, once in about ten
    # CI runs).
    for name in "ab":  # each process reports the whole study, the same best trial
        report = json.loads((tmp_path / f"{name}.json").read_text())
        assert report["trials_complete"] == TRIALS and report["processes"] == 2
        assert report["best"]["proxy"] == max(t.value for t in complete)
        assert report["storage"] == redacted(postgres_url) and "***" in report["storage"]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_killed_worker_s_trial_is_failed_by_heartbeat_and_redone(
    digits, backend, tmp_path, request
):
    url = (
        f"sqlite:///{tmp_path / 'study.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    settings = _settings(url, tmp_path)
    processes = _start_workers(
        digits["job"],
        tmp_path,
        settings,
        {"victim": 2, "survivor": 0},
        waits={"survivor": "victim"},
    )
    try:
        _wait_for(lambda: (tmp_path / "victim.stalled").exists(), processes)
    finally:
        os.kill(processes["victim"].pid, signal.SIGKILL)  # mid-trial: its heartbeat stops
    processes["victim"].wait()
    assert processes["survivor"].wait(timeout=300) == 0
    trials = _trials(settings)
    states = [t.state for t in trials]
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert states.count(optuna.trial.TrialState.COMPLETE) == TRIALS
    assert optuna.trial.TrialState.RUNNING not in states
    assert len(failed) == 1 and failed[0].user_attrs["pid"] == processes["victim"].pid
    redo = [t for t in trials if retry_of(t) == failed[0].number]
    assert len(redo) == 1 and redo[0].state == optuna.trial.TrialState.COMPLETE
    assert redo[0].params == failed[0].params
    assert redo[0].user_attrs["pid"] == processes["survivor"].pid
    report = json.loads((tmp_path / "survivor.json").read_text())
    assert report["trials_complete"] == TRIALS and report["trials_failed"] == 1
    rows = {row["trial"]: row for row in report["table"]}
    assert rows[failed[0].number]["state"] == "FAIL"
    assert rows[redo[0].number]["retry_of"] == failed[0].number


def test_a_trial_has_a_heartbeat_before_it_is_marked_as_reached(digits, tmp_path, monkeypatch):
    """A worker killed after its trial got "host" (so `fail_orphaned_trials` leaves it to the
    heartbeat) but before optuna's heartbeat thread wrote a beat would leave the trial RUNNING
    for ever. With the thread's beats dropped, every trial must still have a beat by the time
    "host" is set: the objective writes one itself."""
    import sqlite3
    import threading

    from rankfold.passes import PlanningContext, RankPolicy, analyze, select_ranks
    from rankfold.passes.search import SearchConfig

    record = optuna.storages.RDBStorage.record_heartbeat

    def main_thread_only(self, trial_id):
        if threading.current_thread() is threading.main_thread():
            record(self, trial_id)

    monkeypatch.setattr(optuna.storages.RDBStorage, "record_heartbeat", main_thread_only)
    database = tmp_path / "study.db"
    beats_at_host: list[int] = []
    set_user_attr = optuna.Trial.set_user_attr

    def checked(self, key, value):
        if key == "host":
            with sqlite3.connect(database) as connection:
                (count,) = connection.execute(
                    "SELECT COUNT(*) FROM trial_heartbeats WHERE trial_id = ?", (self._trial_id,)
                ).fetchone()
            beats_at_host.append(count)
        set_user_attr(self, key, value)

    monkeypatch.setattr(optuna.Trial, "set_user_attr", checked)
    payload = torch.load(digits["job"], weights_only=False)
    gm = trace(payload["gm"], torch.zeros(1, 1, 8, 8))
    settings = {**_settings(f"sqlite:///{database}", tmp_path), "trials": 3}
    context = PlanningContext(
        gm=gm, calibration=payload["calibration"], search=SearchConfig(**settings),
        model_name="digits",
    )  # fmt: skip
    policy = RankPolicy(
        method="tucker2", min_macs_share=0, select="pars", macs_reduction=3.0, round_to=None
    )
    select_ranks(analyze(gm), policy, context)
    assert len(beats_at_host) == 3 and all(count == 1 for count in beats_at_host)


def test_cli_resumes_a_postgres_study_and_never_shows_its_password(digits, postgres_url, tmp_path):
    password = postgres_url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
    assert len(password) >= 8
    out = tmp_path / "out"
    command = [
        "compress", "digits-cnn", "--weights", digits["weights"], "--method", "tucker2",
        "--select", "pars", "--macs-reduction", "3", "--trials", "4", "--storage", postgres_url,
        "--study-name", f"cli{uuid.uuid4().hex[:12]}", "--train-data", digits["data"],
        "--out", out, "--no-latency",
    ]  # fmt: skip
    runner = CliRunner()
    outputs = []
    for _ in range(2):  # the second run re-opens the finished study and rebuilds the report
        result = runner.invoke(app, [str(a) for a in command], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        outputs.append(result.output)
        selection = json.loads((out / "report.json").read_text())["selection"]
        assert selection["trials_complete"] == 4
    assert selection["trials_resumed"] == 4  # nothing ran again
    printed = runner.invoke(app, [str(a) for a in [*command, "--print-config", "-"]])
    assert "***@127.0.0.1" in printed.output
    outputs.append(printed.output)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and not [p for p in files if password.encode() in p.read_bytes()]
    assert not [text for text in outputs if password in text]
    bad = postgres_url.replace(password, "wrong-" + password[::-1])
    wrong = [bad if a == postgres_url else a for a in command]
    result = runner.invoke(app, [str(a) for a in wrong])
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and len(lines) == 1 and "cannot open search storage" in lines[0]
    assert password[::-1] not in result.output


# Fills the same cache entries as its twin, at the same moment, and after each one loads every
# file in the folder: a reader that ever sees a half-written entry exits 1.
CACHE_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from rankfold.passes import analyze, trace
    from rankfold.passes.methods import get_method
    from rankfold.passes.search import DecompositionCache
    folder, name = Path(sys.argv[1]), sys.argv[2]
    torch.manual_seed(0)  # both processes decompose the same weights: the same keys
    gm = trace(torch.nn.Sequential(torch.nn.Conv2d(24, 24, 3)), torch.zeros(1, 24, 8, 8))
    layer = analyze(gm).layers[0]
    module, method = gm.get_submodule(layer.name), get_method("tucker2")
    cache = DecompositionCache(folder / "cache", seed=0)
    (folder / f"{name}.ready").touch()
    while not (folder / "go").exists():
        time.sleep(0.01)
    for rank in range(1, 25):
        cache.lookup(module, layer, method, (rank, rank))
        for path in (folder / "cache").rglob("*.pt"):
            data = torch.load(path, map_location="cpu", weights_only=True)
            assert set(data) == {"state", "rel_error", "extras"}, path
    print(cache.misses, cache.hits)
    """
)


def test_decomposition_cache_is_safe_under_two_concurrent_writers(tmp_path):
    from rankfold.passes import analyze, trace
    from rankfold.passes.methods import get_method
    from rankfold.passes.search import DecompositionCache

    (tmp_path / "writer.py").write_text(CACHE_WRITER)
    processes = {
        name: subprocess.Popen(
            [sys.executable, str(tmp_path / "writer.py"), str(tmp_path), name],
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in "ab"
    }
    _wait_for(lambda: all((tmp_path / f"{n}.ready").exists() for n in "ab"), processes)
    (tmp_path / "go").touch()
    counts = [process.communicate(timeout=120)[0].split() for process in processes.values()]
    assert [process.returncode for process in processes.values()] == [0, 0]
    misses, hits = (sum(int(c[i]) for c in counts) for i in (0, 1))
    assert misses + hits == 48 and misses >= 24  # every key computed at least once
    files = list((tmp_path / "cache").rglob("*"))
    assert len([p for p in files if p.suffix == ".pt"]) == 24
    assert not [p for p in files if p.name.endswith(".tmp")]
    torch.manual_seed(0)
    gm = trace(torch.nn.Sequential(torch.nn.Conv2d(24, 24, 3)), torch.zeros(1, 24, 8, 8))
    layer = analyze(gm).layers[0]
    module, method = gm.get_submodule(layer.name), get_method("tucker2")
    shared, fresh = DecompositionCache(tmp_path / "cache"), DecompositionCache(None)
    for rank in (1, 12, 24):
        stored, computed = shared.lookup(module, layer, method, (rank, rank))
        again, _ = fresh.lookup(module, layer, method, (rank, rank))
        assert not computed and stored.rel_error == pytest.approx(again.rel_error, abs=1e-6)
        for key, tensor in again.state.items():
            torch.testing.assert_close(stored.state[key], tensor, atol=1e-5, rtol=0)
