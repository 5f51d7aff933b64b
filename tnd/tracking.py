"""MLflow tracking: the only module that imports mlflow.

One MLflow run per stage execution, tagged so that runs can be found again from DVC:
`stage`, `git_commit`, `params_hash`, `pipeline` (shared by all stage runs of one pipeline
execution) and, under `dvc exp run`, `dvc_exp`. Tracking is a side channel: if the store
is corrupt or unwritable, the stage warns once and carries on, so its DVC outputs are
never lost to a tracking failure. A store that is only busy (another stage process
writing to the same sqlite file) is waited for instead, so concurrent stages lose nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

from tnd.config import Params

try:
    import fcntl
except ImportError:  # Windows: no flock; store creation is then not serialised
    fcntl = None

DEFAULT_URI = "sqlite:///mlflow.db"

# How long a busy store is waited for before giving up (then: one warning, tracking off).
RETRY_SECONDS = 30.0
# What sqlite says (SQLITE_BUSY, SQLITE_LOCKED), through MLflow's wrapping, locally or behind
# a tracking server, when another connection holds the lock. Only these are retried.
_LOCK_MESSAGES = ("database is locked", "database table is locked")

T = TypeVar("T")


class Tracker:
    """Logs to one MLflow run; waits out a locked store, and turns itself off (with one
    warning) on any other failure."""

    def __init__(self, client: Any = None, run_id: str | None = None):
        self._client = client
        self._run_id = run_id

    @property
    def active(self) -> bool:
        return self._client is not None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if numbers:
            self._call("log metrics", lambda c, run: _log_metrics(c, run, numbers, step))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._call("set tags", lambda c, run: _set_tags(c, run, tags))

    # Artifacts are not retried: log_table appends to an existing file, so a retry after a
    # partial success would duplicate rows. They do not write the sqlite file anyway.
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call(
            f"log artifact {path}",
            lambda c, run: c.log_artifact(run, str(path), artifact_path),
            retry=False,
        )

    def log_table(self, rows: list[dict], artifact_file: str) -> None:
        columns = {key: [row.get(key) for row in rows] for key in (rows[0] if rows else {})}
        self._call(
            f"log table {artifact_file}",
            lambda c, run: c.log_table(run, columns, artifact_file),
            retry=False,
        )

    def end(self, status: str) -> None:
        self._call("end the run", lambda c, run: c.set_terminated(run, status))

    def _call(self, what: str, fn: Callable[[Any, str], None], retry: bool = True) -> None:
        if self._client is None:
            return
        client, run_id = self._client, self._run_id
        try:
            if retry:
                _retry_while_locked(lambda: fn(client, run_id))
            else:
                fn(client, run_id)
        except Exception as exc:  # tracking must never take the stage down with it
            _warn(f"MLflow: could not {what} ({_short(exc)}); the stage goes on without tracking")
            self._client = None


def tracking_uri(params: Params) -> str:
    uri = params.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    return _at_project_root(uri)


def pipeline_id(params: Params, commit: str | None = None) -> str:
    """The `pipeline` tag, shared by every stage run of one pipeline execution: the
    experiment's name under `dvc exp run`, else commit + params (one `dvc repro` of one
    configuration; rerunning the same configuration on the same commit shares it too)."""
    if os.environ.get("DVC_EXP_NAME"):
        return os.environ["DVC_EXP_NAME"]
    return f"{(commit or _git_commit())[:8]}-{params.fingerprint()[:8]}"


def run_tags(stage: str, params: Params) -> dict[str, str]:
    commit = _git_commit()
    tags = {
        "stage": stage,
        "git_commit": commit,
        "params_hash": params.fingerprint(),
        "pipeline": pipeline_id(params, commit),
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc_exp_baseline"] = os.environ["DVC_EXP_BASELINE_REV"]
    return tags


@contextlib.contextmanager
def stage_run(stage: str, params: Params) -> Iterator[Tracker]:
    """Open an MLflow run for one stage execution and log params and tags to it.

    The run ends FINISHED if the block succeeds and FAILED if it raises; the block's
    own exception always propagates untouched.
    """
    if not params.tracking.enabled:
        yield Tracker(None)
        return
    tracker = _start_run(stage, params)
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        tracker.end(status)


def _start_run(stage: str, params: Params) -> Tracker:
    uri = tracking_uri(params)
    run_id = None
    try:
        from mlflow.tracking import MlflowClient

        _quiet_mlflow_logging()
        with _store_creation_lock(uri):
            client = _retry_while_locked(lambda: MlflowClient(uri))
            experiment_id = _retry_while_locked(lambda: _experiment_id(client, params.tracking.experiment, uri))
        tags = run_tags(stage, params)
        run = _retry_while_locked(lambda: client.create_run(experiment_id, tags=tags, run_name=stage))
        run_id = run.info.run_id
        flat = {k: _param_value(v) for k, v in params.flat().items()}
        _retry_while_locked(lambda: _log_params(client, run_id, flat))
        return Tracker(client, run_id)
    except Exception as exc:
        _warn(
            f"MLflow: tracking to {uri} failed ({_short(exc)}); the stage runs "
            "without tracking. Fix or move the store (tracking.uri / MLFLOW_TRACKING_URI)"
        )
        if run_id is not None:
            with contextlib.suppress(Exception):
                client.set_terminated(run_id, "FAILED")
        return Tracker(None)


def _experiment_id(client: Any, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=_artifact_location(uri, name))


def _log_metrics(client: Any, run_id: str, numbers: Mapping[str, float], step: int | None) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    step = 0 if step is None else int(step)
    client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in numbers.items()])


def _log_params(client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    keys = sorted(params)
    for i in range(0, len(keys), 100):  # MLflow takes at most 100 params per call
        client.log_batch(run_id, params=[Param(k, str(params[k])) for k in keys[i : i + 100]])


def _set_tags(client: Any, run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


# --- a shared sqlite store: waiting instead of failing ---------------------------------


def _retry_while_locked(fn: Callable[[], T]) -> T:
    """Call fn, retrying with jittered exponential backoff while the store is locked.

    sqlite allows one writer; MLflow waits for it (busy_timeout), but a read-then-write
    transaction that meets another writer fails at once with "database is locked" instead
    of waiting (sqlite's deadlock avoidance). Each MLflow call is its own transaction, rolled
    back on that error, so calling it again is safe. Jitter keeps two stages that collided
    from retrying in lockstep.
    """
    deadline = time.monotonic() + RETRY_SECONDS
    delay = 0.05
    while True:
        try:
            return fn()
        except Exception as exc:
            if not _is_lock_error(exc) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay * random.uniform(0.5, 1.5))
        delay = min(delay * 2, 2.0)


def _is_lock_error(exc: BaseException | None) -> bool:
    """True if exc or anything it wraps (MLflow wraps sqlalchemy, which wraps sqlite3)
    says the database is locked or busy."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if any(message in str(exc).lower() for message in _LOCK_MESSAGES):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def _store_creation_lock(uri: str) -> Iterator[None]:
    """Hold an inter-process lock while opening a sqlite store and creating the experiment.

    MLflow creates and migrates a fresh database's schema without any lock, so two stages
    starting at once on a new mlflow.db both try, and one fails ("table runs already
    exists"); both would also create the experiment. The lock file lives in the temp dir so
    the project stays clean; it is released when the file closes, even if the process dies.
    """
    path = _sqlite_path(uri)
    if path is None or fcntl is None:
        yield
        return
    key = hashlib.sha256(path.encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"tnd-mlflow-{key}.lock", "a") as handle:
        deadline = time.monotonic() + RETRY_SECONDS
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process held the lock on {path} for {RETRY_SECONDS:.0f}s")
                time.sleep(0.05)
        yield


def _sqlite_path(uri: str) -> str | None:
    if not uri.startswith("sqlite:///"):
        return None
    return os.path.realpath(uri[len("sqlite:///") :].split("?")[0])


# --- DVC temporary workspaces -----------------------------------------------------------


def _at_project_root(uri: str) -> str:
    """Resolve a relative sqlite path against the project, not the current directory.

    `dvc exp run --queue` / `--temp` run stages in a temporary copy of the project that is
    deleted afterwards; a relative `sqlite:///mlflow.db` would put the runs in that copy and
    lose them. DVC names the real project in DVC_ROOT (the current directory otherwise).
    """
    root = os.environ.get("DVC_ROOT")
    if not root or not uri.startswith("sqlite:///") or os.path.isabs(uri[len("sqlite:///") :]):
        return uri
    return "sqlite:///" + os.path.join(root, uri[len("sqlite:///") :])


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment of a local store keeps its artifacts: MLflow's default,
    ./mlruns, unless the stage runs in a DVC temporary workspace (see _at_project_root)."""
    root = os.environ.get("DVC_ROOT")
    if not uri.startswith("sqlite:") or not root or os.path.realpath(root) == os.path.realpath("."):
        return None
    return Path(root, "mlruns", experiment).resolve().as_uri()


# --- small helpers ----------------------------------------------------------------------


def _quiet_mlflow_logging() -> None:
    # Quiet the store's schema migrations and the "run started" chatter on stdout.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # MLflow logs a full traceback for every sqlalchemy OperationalError, including the
    # lock errors retried here; a real failure is reported by our one warning line.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 500 else text[:497] + "..."


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _short(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)
