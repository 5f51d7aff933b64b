"""MLflow tracking: the only module that imports mlflow.

One MLflow run per stage execution, tagged so that runs can be found again from DVC:
`stage`, `git_commit`, `params_hash` and, under `dvc exp run`, `dvc_exp`. Tracking is
a side channel: if the store is locked, corrupt or unwritable, the stage warns once
and carries on, so its DVC outputs are never lost to a tracking failure.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping

from tnd.config import Params

DEFAULT_URI = "sqlite:///mlflow.db"


class Tracker:
    """Logs to one MLflow run; turns itself off (with one warning) on the first failure."""

    def __init__(self, mlflow: Any = None):
        self._mlflow = mlflow

    @property
    def active(self) -> bool:
        return self._mlflow is not None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self._call("log metrics", lambda m: m.log_metrics(numbers, step=step))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call(f"log artifact {path}", lambda m: m.log_artifact(str(path), artifact_path))

    def log_table(self, rows: list[dict], artifact_file: str) -> None:
        columns = {key: [row.get(key) for row in rows] for key in (rows[0] if rows else {})}
        self._call(f"log table {artifact_file}", lambda m: m.log_table(columns, artifact_file))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._call("set tags", lambda m: m.set_tags(dict(tags)))

    def _call(self, what: str, fn) -> None:
        if self._mlflow is None:
            return
        try:
            fn(self._mlflow)
        except Exception as exc:  # tracking must never take the stage down with it
            _warn(f"MLflow: could not {what} ({_short(exc)}); the stage goes on without tracking")
            self._mlflow = None


def tracking_uri(params: Params) -> str:
    return params.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def run_tags(stage: str, params: Params) -> dict[str, str]:
    tags = {"stage": stage, "git_commit": _git_commit(), "params_hash": params.fingerprint()}
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
    tracker = Tracker(_start_run(stage, params))
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        tracker._call("end the run", lambda m: m.end_run(status=status))


def _start_run(stage: str, params: Params) -> Any:
    try:
        import mlflow

        # Quiet the store's schema migrations and the "run started" chatter on stdout.
        logging.getLogger("alembic").setLevel(logging.WARNING)
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        mlflow.set_tracking_uri(tracking_uri(params))
        mlflow.set_experiment(params.tracking.experiment)
        mlflow.start_run(run_name=stage, tags=run_tags(stage, params))
        flat = {k: _param_value(v) for k, v in params.flat().items()}
        keys = sorted(flat)
        for i in range(0, len(keys), 100):  # MLflow takes at most 100 params per call
            mlflow.log_params({k: flat[k] for k in keys[i : i + 100]})
        return mlflow
    except Exception as exc:
        _warn(
            f"MLflow: tracking to {tracking_uri(params)} failed ({_short(exc)}); the stage runs "
            "without tracking. Fix or move the store (tracking.uri / MLFLOW_TRACKING_URI)"
        )
        with contextlib.suppress(Exception):
            import mlflow

            mlflow.end_run(status="FAILED")
        return None


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
