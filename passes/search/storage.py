"""optuna storages for shared studies, and the clean-up of trials whose worker died."""

from __future__ import annotations

import os
import re
import socket
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from rankfold.passes.core import ConfigError

if TYPE_CHECKING:
    import optuna

HOST = socket.gethostname()


def open_storage(url: str | None) -> optuna.storages.BaseStorage | None:
    """An optuna storage from a URL: RDB (sqlite:///…, postgresql://…) or a journal file."""
    import optuna

    if url is None:
        return None
    journal = url.removeprefix("journal:") if url.startswith("journal:") else None
    if journal is None and url.endswith((".log", ".journal", ".jsonl")) and "://" not in url:
        journal = url
    try:
        if journal is not None:
            path = Path(journal)
            path.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(
                optuna.storages.journal.JournalFileBackend(str(path))
            )
        if "://" not in url:
            raise ValueError("not a URL")
        # The heartbeat marks trials of a killed process as failed, so a resumed run redoes them.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=120)
    except (ValueError, ImportError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"cannot open search storage '{url}' ({first}); give an optuna URL such as "
            "sqlite:///search.db or postgresql://user@host/db, or journal:search.log"
        ) from None
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy's errors have no common base here
        first = str(exc).splitlines()[0]
        raise ConfigError(
            f"cannot open search storage '{url}' ({first}); check the URL and that the database "
            "and its driver are available"
        ) from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


WORKER_ATTR = "rankfold_worker:"


def register_worker(study: optuna.Study) -> None:
    """Record this process in the study, so its orphaned trials can be told from live ones."""
    study.set_user_attr(f"{WORKER_ATTR}{HOST}:{os.getpid()}", time.time())


def _others_all_dead_here(study: optuna.Study) -> bool:
    """Whether every other process that ever worked on the study ran on this host and is gone."""
    for key in study.user_attrs:
        if not key.startswith(WORKER_ATTR):
            continue
        host, _, pid = key.removeprefix(WORKER_ATTR).rpartition(":")
        if int(pid) == os.getpid() and host == HOST:
            continue
        if host != HOST or _alive(int(pid)):
            return False
    return True


def fail_dead_trials(study: optuna.Study) -> int:
    """Mark RUNNING trials of dead processes on this host as FAIL (journal files have no
    heartbeat); RDB storages also fail stale trials by heartbeat. Returns how many were failed.

    A trial is RUNNING from the moment optuna creates it, before its sampler has run and before
    the objective can record the process id; a process killed in that window leaves a trial
    without one. Such trials are failed when no other registered worker can still own them.
    """
    import optuna
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    failed = 0
    orphans_are_dead: bool | None = None
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.user_attrs
        if "pid" in attrs:
            dead = attrs.get("host") == HOST and not _alive(int(attrs["pid"]))
        else:
            if orphans_are_dead is None:
                orphans_are_dead = _others_all_dead_here(study)
            dead = orphans_are_dead
        if dead:
            # skip_if_finished: another process may have failed it first.
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            failed += 1
    return failed


def redacted(url: str | None) -> str | None:
    """The storage URL without its password (reports are shared; credentials are not)."""
    return None if url is None else re.sub(r"(//[^:/@]+):[^@/]*@", r"\1:***@", url)
