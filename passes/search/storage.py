"""optuna storages for shared studies, and how trials of dead workers are failed and redone.

RDB storages (sqlite:///…, postgresql://…) use optuna's heartbeat: every running trial records
one each `heartbeat` seconds; a worker that finds a trial silent for three intervals fails it,
and `RetryHeartbeatStaleTrialCallback` enqueues a copy with the same parameters, which the next
free worker runs. That works across machines, since only the database is shared.

A journal file has no heartbeat, so it serves one process at a time: the process holds an
exclusive lock on `<file>.owner` for the whole search, and a trial still RUNNING when the next
process takes the lock belonged to a process that is gone (it is failed and re-queued the same
way). Several workers need an RDB storage."""

from __future__ import annotations

import fcntl
import re
import socket
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from rankfold.passes.core import ConfigError

if TYPE_CHECKING:
    import optuna
    import sqlalchemy

HOST = socket.gethostname()
HEARTBEAT_SECONDS = 10
GRACE_HEARTBEATS = 3  # a trial is stale after this many missed heartbeats
MAX_RETRY = 2  # a configuration that killed its worker this often is not tried again
CONNECT_TIMEOUT_SECONDS = 10
SQLITE_LOCK_TIMEOUT_SECONDS = 60
SCHEMA_ATTEMPTS = 3
SCHEMA_RACE_SIGNS = ("already exists", "UNIQUE constraint failed: alembic_version")


def journal_path(url: str | None) -> Path | None:
    """The journal file `url` names (journal:PATH, or a PATH ending .log/.journal/.jsonl)."""
    if url is None:
        return None
    if url.startswith("journal:"):
        return Path(url.removeprefix("journal:"))
    if url.endswith((".log", ".journal", ".jsonl")) and "://" not in url:
        return Path(url)
    return None


def retry_callback() -> optuna.storages.RetryHeartbeatStaleTrialCallback:
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)


def retry_of(trial: optuna.trial.FrozenTrial) -> int | None:
    """The number of the failed trial that `trial` redoes, if it is such a copy."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)


def open_storage(
    url: str | None, heartbeat: int = HEARTBEAT_SECONDS
) -> optuna.storages.BaseStorage | None:
    """An optuna storage from a URL: RDB (sqlite:///…, postgresql://…) or a journal file.

    Connects at once, so a bad URL or an unreachable server is a one-line `ConfigError`."""
    import optuna

    if url is None:
        return None
    journal = journal_path(url)
    shown = redacted(url)
    try:
        if journal is not None:
            journal.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(
                optuna.storages.journal.JournalFileBackend(str(journal))
            )
        engine_kwargs = {}
        if "://" not in url:
            raise ValueError("not a URL")
        if url.startswith("postgresql"):
            engine_kwargs = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_SECONDS}}
        if url.startswith("sqlite"):
            # Transactions wait for each other's lock (serialized below) rather than fail.
            engine_kwargs = {"connect_args": {"timeout": SQLITE_LOCK_TIMEOUT_SECONDS}}
        if url.startswith(("postgresql://", "postgres://")):
            # The driver rankfold ships, whichever one SQLAlchemy's version defaults to.
            url = "postgresql+psycopg://" + url.partition("://")[2]
        for attempt in range(SCHEMA_ATTEMPTS):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    storage = optuna.storages.RDBStorage(
                        url,
                        engine_kwargs=engine_kwargs,
                        heartbeat_interval=heartbeat,
                        grace_period=GRACE_HEARTBEATS * heartbeat,
                        heartbeat_stale_trial_callback=retry_callback(),
                    )
                if url.startswith("sqlite"):
                    _serialize_sqlite_transactions(storage.engine)
                return storage
            except Exception as exc:  # noqa: BLE001 - re-raised unless it is the race below
                # Workers started together on a new database all create its tables (and stamp
                # its schema version); the losers fail and find both made when they retry.
                raced = any(sign in str(exc) for sign in SCHEMA_RACE_SIGNS)
                if not raced or attempt == SCHEMA_ATTEMPTS - 1:
                    raise
                time.sleep(0.5)
    except (ValueError, ImportError, OSError) as exc:
        raise ConfigError(
            f"cannot open search storage '{shown}' ({_first_line(exc, url)}); give an optuna URL "
            "such as sqlite:///search.db or postgresql://user@host/db, or journal:search.log"
        ) from None
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy's errors have no common base here
        raise ConfigError(
            f"cannot open search storage '{shown}' ({_first_line(exc, url)}); check the URL, "
            "that the database server is reachable and that its driver is installed "
            "(postgresql: pip install 'psycopg[binary]')"
        ) from None


def _serialize_sqlite_transactions(engine: sqlalchemy.engine.Engine) -> None:
    """Every transaction on `engine` takes SQLite's write lock when it begins (BEGIN IMMEDIATE).

    optuna claims an enqueued trial by reading it WAITING and writing RUNNING under
    SELECT … FOR UPDATE, which SQLite ignores, and Python's sqlite3 runs the read outside any
    transaction: two workers can claim the same trial (PARS's seed trials, retried ones), and
    the later `tell` fails with "Cannot tell a COMPLETE trial" (optuna issues #4002, #4621).
    SQLAlchemy's documented recipe for pysqlite: let it issue BEGIN itself."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def no_implicit_transactions(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def begin_with_the_write_lock(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    # Connections opened while the storage checked its schema predate the hooks.
    engine.dispose()


def check_storage(url: str | None, workers: int) -> None:
    """Fail fast, before a model is loaded: the storage opens (the server answers) and can
    serve `workers` processes."""
    if url is None:
        return
    if journal_path(url) is not None and workers > 1:
        raise ConfigError(
            f"--workers {workers} with journal storage {url}: a journal has no heartbeat, so it "
            "serves one process; use sqlite:///FILE or postgresql://… for several workers"
        )
    storage = open_storage(url)
    engine = getattr(storage, "engine", None)  # RDBStorage's SQLAlchemy engine
    if engine is not None:
        engine.dispose()


def _first_line(exc: BaseException, url: str) -> str:
    """The error's first line, with the URL's password removed wherever the driver echoed it."""
    text = (str(exc).splitlines() or [""])[0] or type(exc).__name__
    text = text.replace(url, redacted(url))
    password = _password(url)
    # A very short password would also match ordinary words of the message.
    return text.replace(password, "***") if password and len(password) >= 4 else text


def _password(url: str) -> str | None:
    match = re.search(r"://[^/@:]*:([^/@]*)@", url)
    return match.group(1) if match and match.group(1) else None


def redacted(url: str | None) -> str | None:
    """The storage URL without its password (reports and logs are shared; credentials are not)."""
    return None if url is None else re.sub(r"(://[^/@:]*):[^/@]*@", r"\1:***@", url)


@contextmanager
def journal_lease(url: str | None) -> Iterator[None]:
    """Hold the journal file's owner lock while a search uses it (nothing for RDB storages).

    The lock is the kernel's (flock), released when the process ends however it ends, so the
    next holder knows every RUNNING trial in the journal is an orphan."""
    journal = journal_path(url)
    if journal is None:
        yield
        return
    journal.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{journal}.owner", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"journal storage {journal} is in use by another process; a journal serves one "
                "process at a time: use sqlite:///FILE or postgresql://… for several workers"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fail_orphaned_trials(
    study: optuna.Study, storage: optuna.storages.BaseStorage, journal: bool, grace: float
) -> int:
    """Fail (and re-queue, as the heartbeat does) RUNNING trials nobody can still own.

    Journal (lease held): every RUNNING trial. RDB: those older than `grace` seconds that never
    reached the objective (no `host` attribute): killed between optuna creating the trial and
    its heartbeat starting, they would otherwise stay RUNNING for ever. Returns how many."""
    from datetime import datetime, timedelta

    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    now = datetime.now()
    study_id = storage.get_study_id_from_name(study.study_name)
    failed = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        started = trial.datetime_start or now
        if not journal and ("host" in trial.user_attrs or now - started < timedelta(0, grace)):
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        try:  # of two workers failing the same trial, the storage lets exactly one do it
            if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:
            continue
        retry_callback()(study, storage.get_trial(trial_id))
        failed += 1
    return failed
