"""MLflow tracking: the only module that imports mlflow.

One MLflow run per stage execution, tagged so that runs can be found again from DVC:
`stage`, `git_commit`, `params_hash`, `pipeline` (shared by all stage runs of one pipeline
execution) and, under `dvc exp run`, `dvc_exp`. The experiment is marked as model development
(`mlflow.experimentKind`), a run records the files it read as dataset inputs (digest: the md5 DVC
records for the file), the models a stage trains as MLflow models (transformers flavor; the student
also registered, with the pipeline as alias), and system metrics (CPU, memory, GPU) sampled in the
background. Tracking is a side channel: if the store is corrupt or unwritable, the stage warns
once and carries on, so its DVC outputs are never lost to a tracking failure. A store that is
only busy (another stage process writing to the same sqlite file) is waited for instead, so
concurrent stages lose nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

from filelock import FileLock, Timeout

from tnd.config import Params
from tnd.errors import one_line

DEFAULT_URI = "sqlite:///mlflow.db"

# MLflow 3 keeps an experiment's kind in this tag; the UI of the MLflow 3 releases that read it opens a
# "custom_model_development" experiment on its runs (model training view), not on traces (GenAI view).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# Kinds the UI guessed (or left empty) rather than a user chose: ours replaces them.
_GUESSED_KINDS = ("", "no_inferred_type", "genai_development_inferred", "custom_model_development_inferred")
# The run tags a logged model (and a registered version) carries, to be found from DVC's side.
_MODEL_TAGS = ("stage", "pipeline", "mode", "dvc_exp", "git_commit")

# How long a busy store is waited for before giving up (then: one warning, tracking off).
RETRY_SECONDS = 30.0
# What sqlite says (SQLITE_BUSY, SQLITE_LOCKED), through MLflow's wrapping, locally or behind
# a tracking server, when another connection holds the lock. Only these are retried.
_LOCK_MESSAGES = ("database is locked", "database table is locked")

T = TypeVar("T")


class Tracker:
    """Logs to one MLflow run; waits out a locked store, and turns itself off (with one
    warning) on any other failure. Thread-safe: the system-metrics sampler logs through it too."""

    def __init__(
        self,
        client: Any = None,
        run_id: str | None = None,
        *,
        uri: str | None = None,
        experiment_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        settings: Any = None,
    ):
        self._client = client
        self._run_id = run_id
        self._uri = uri
        self._experiment_id = experiment_id
        self._tags = dict(tags or {})
        self._params = dict(params or {})
        self._settings = settings  # params.tracking (log_models, model_name, system_metrics_interval)
        self._lock = threading.RLock()
        self._sampler: _SystemMetrics | None = None

    @property
    def active(self) -> bool:
        return self._client is not None

    def log_inputs(self, inputs: Iterable[tuple[str | Path, str]]) -> None:
        """Record files the stage reads, each `(path, context)` (context: "training", "evaluation",
        ...), as MLflow dataset inputs. A dataset is named by its path in the project and its digest
        is the file's md5, the hash DVC records for it; a file that is not there is left out."""
        present = [(Path(path), context) for path, context in inputs if Path(path).is_file()]
        if present:
            self._call("log dataset inputs",
                       lambda c, run: c.log_inputs(run, datasets=[_dataset_input(*i) for i in present]))

    def log_model(self, path: str | Path, name: str, task: str, register: bool = False) -> None:
        """Log the model saved (save_pretrained, tokenizer beside it) in directory `path` as an MLflow
        model of this run: transformers flavor, `task` a transformers pipeline task. MLflow copies the
        saved files as they are (no reload, no second serialisation). With `register`, the model is
        also registered as tracking.model_name, with the run's pipeline as alias:
        `models:/<model_name>@<pipeline>` loads it back. A no-op when tracking.log_models is off."""
        if self._settings is not None and not self._settings.log_models:
            return
        register_as = self._settings.model_name if (register and self._settings is not None) else None
        self._call(
            f"log the {name} model", lambda c, run: self._log_model(c, run, Path(path), name, task, register_as),
            retry=False,  # its store calls are retried one by one, inside
            fatal=False,  # a model the flavor cannot take says nothing of the store: the run goes on
        )

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

    def start_system_metrics(self, interval: float) -> None:
        """Sample CPU, memory, disk, network and GPU use every `interval` seconds in a background
        thread, logged as `system/...` metrics until the run ends (as MLflow's log_system_metrics)."""
        if self.active and interval > 0 and self._sampler is None:
            try:
                self._sampler = _SystemMetrics(self, interval)
            except Exception as exc:  # psutil missing or broken: no system metrics, the rest goes on
                _warn(f"MLflow: no system metrics ({_short(exc)})")

    def end(self, status: str) -> None:
        if self._sampler is not None:
            self._sampler.stop()
        self._call("end the run", lambda c, run: c.set_terminated(run, status))

    def _call(self, what: str, fn: Callable[[Any, str], T], retry: bool = True, fatal: bool = True) -> T | None:
        with self._lock:
            if self._client is None:
                return None
            client, run_id = self._client, self._run_id
            try:
                if retry:
                    return _retry_while_locked(lambda: fn(client, run_id))
                return fn(client, run_id)
            except Exception as exc:  # tracking must never take the stage down with it
                if not fatal:
                    _warn(f"MLflow: could not {what} ({_short(exc)}); the stage and its run go on")
                    return None
                _warn(f"MLflow: could not {what} ({_short(exc)}); the stage goes on without tracking")
                self._client = None
                return None

    def _log_model(
        self, client: Any, run_id: str, path: Path, name: str, task: str, register_as: str | None
    ) -> None:
        import mlflow.transformers

        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}/config.json: not a saved model")
        experiment_id = self._experiment_id or _retry_while_locked(lambda: client.get_run(run_id).info.experiment_id)
        model_tags = {k: v for k, v in self._tags.items() if k in _MODEL_TAGS}
        # The flavor works through the process-wide tracking URI; point it at this run's store for the call.
        uri = self._uri or client.tracking_uri
        with _process_tracking_uri(uri), _quiet("mlflow.transformers"), _transformers_task_classes():
            model = _retry_while_locked(lambda: client.create_logged_model(
                experiment_id, name=name, source_run_id=run_id, tags=model_tags, params=self._params, model_type=name,
            ))
            # An absolute path: MLflow takes a relative one for a hub repository and looks it up online.
            _retry_while_locked(lambda: mlflow.transformers.log_model(
                str(path.resolve()), name=name, task=task, run_id=run_id, model_id=model.model_id,
                pip_requirements=_model_requirements(),
            ))
            if register_as:  # a local registry looks the logged model up through the process-wide URI too
                alias = model_alias(self._tags.get("pipeline", run_id))
                version = _retry_while_locked(
                    lambda: _register(client, register_as, model.model_id, run_id, alias, model_tags))
                print(f"MLflow: {name} registered as models:/{register_as}@{alias} (version {version})",
                      file=sys.stderr, flush=True)


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
def stage_run(
    stage: str, params: Params, tags: Mapping[str, str] | None = None, run_name: str | None = None
) -> Iterator[Tracker]:
    """Open an MLflow run for one stage execution and log params and tags (run_tags, plus `tags`)
    to it; the run is named `run_name` (default: the stage). System metrics are sampled every
    tracking.system_metrics_interval seconds while it runs.

    The run ends FINISHED if the block succeeds and FAILED if it raises; the block's
    own exception always propagates untouched.
    """
    if not params.tracking.enabled:
        yield Tracker(None)
        return
    tracker = _start_run(stage, params, {**run_tags(stage, params), **(tags or {})}, run_name or stage)
    tracker.start_system_metrics(params.tracking.system_metrics_interval)
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        tracker.end(status)


def _start_run(stage: str, params: Params, tags: Mapping[str, str], run_name: str) -> Tracker:
    uri = tracking_uri(params)
    run_id = None
    try:
        from mlflow.tracking import MlflowClient

        _quiet_mlflow_logging()
        with _store_creation_lock(uri):
            client = _retry_while_locked(lambda: MlflowClient(uri))
            experiment_id = _retry_while_locked(lambda: _experiment_id(client, params.tracking.experiment, uri))
        run = _retry_while_locked(lambda: client.create_run(experiment_id, tags=dict(tags), run_name=run_name))
        run_id = run.info.run_id
        flat = {k: _param_value(v) for k, v in params.flat().items()}
        _retry_while_locked(lambda: _log_params(client, run_id, flat))
        return Tracker(client, run_id, uri=uri, experiment_id=experiment_id, tags=tags, params=flat,
                       settings=params.tracking)
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
    """The experiment's id, creating it if need be, marked as model development (EXPERIMENT_KIND)
    unless someone chose another kind for it."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(
            name, artifact_location=_artifact_location(uri, name), tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
    if experiment.tags.get(EXPERIMENT_KIND_TAG, "") in _GUESSED_KINDS:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def _log_metrics(client: Any, run_id: str, numbers: Mapping[str, float], step: int | None) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    step = 0 if step is None else int(step)
    client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in numbers.items()])


def _log_params(client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    # MlflowClient.log_batch sends them 100 (the store's limit) at a time itself.
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in sorted(params.items())])


def _set_tags(client: Any, run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


# --- dataset inputs, models, the registry -------------------------------------------------


def file_md5(path: str | Path) -> str:
    """md5 of the file's bytes: the hash DVC 3 records for a file (in dvc.lock, or in the listing of
    a directory output such as data/prepared)."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _dataset_input(path: Path, context: str) -> Any:
    from mlflow.entities import Dataset, DatasetInput, InputTag

    profile: dict[str, Any] = {"bytes": path.stat().st_size}
    if path.suffix == ".jsonl":
        with open(path, "rb") as handle:
            profile["rows"] = sum(1 for line in handle if line.strip())
    name = path.as_posix()
    dataset = Dataset(
        name=name, digest=file_md5(path), source_type="local", source=json.dumps({"uri": name}),
        profile=json.dumps(profile),
    )
    return DatasetInput(dataset=dataset, tags=[InputTag(key="mlflow.data.context", value=context)])


def _model_requirements() -> list[str]:
    """What loading a logged model needs, pinned to the versions here. Passed to MLflow, which would
    otherwise list torchvision too for a saved directory and fail where it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("torch", "transformers", "tokenizers", "safetensors"):
        try:
            pins.append(f"{package}=={version(package).split('+')[0]}")  # no local label (+cpu): pip cannot find one
        except PackageNotFoundError:
            pins.append(package)
    return pins


def model_alias(pipeline: str) -> str:
    """The registry alias of a pipeline execution (the `pipeline` tag): MLflow takes letters, digits,
    `_` and `-`, and keeps `latest` and `v<N>` for itself."""
    alias = re.sub(r"[^\w-]", "-", pipeline)[:255] or "pipeline"
    if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        alias = f"exp-{alias}"
    return alias


def _register(client: Any, name: str, model_id: str, run_id: str, alias: str, tags: Mapping[str, str]) -> str:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="tnd-pipeline students; alias: the pipeline (DVC experiment)")
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    version = client.create_model_version(
        name, f"models:/{model_id}", run_id=run_id, tags=dict(tags), model_id=model_id)
    client.set_registered_model_alias(name, alias, version.version)
    return version.version


@contextlib.contextmanager
def _process_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to `uri` for the block, then put back as it was,
    MLFLOW_TRACKING_URI included (MLflow's own helper unsets a variable it did not set)."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    env = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


@contextlib.contextmanager
def _transformers_task_classes() -> Iterator[None]:
    """MLflow (3.17) logs a saved directory with `transformers.pipelines.check_task(task)[1]["impl"]`
    taken for a class; transformers 5 gives its dotted name. Hand MLflow the class for the call."""
    from transformers import pipelines

    check_task = pipelines.check_task

    def with_classes(task: str, *args: Any, **kwargs: Any) -> Any:
        name, meta, options = check_task(task, *args, **kwargs)
        if isinstance(meta.get("impl"), str):
            import importlib

            module, _, cls = meta["impl"].rpartition(".")
            meta = {**meta, "impl": getattr(importlib.import_module(module), cls)}
        return name, meta, options

    pipelines.check_task = with_classes
    try:
        yield
    finally:
        pipelines.check_task = check_task


# --- system metrics ------------------------------------------------------------------------


class _SystemMetrics:
    """What MLflow's log_system_metrics records (its CPU, memory, disk and network monitors, psutil;
    its GPU monitor where pynvml finds a GPU), sampled every `interval` seconds by a daemon thread
    and logged through the tracker as `system/<name>`: the same names, so the UI's System metrics
    section shows them, but on the tracker's lock, lock-retry and one-warning rule. A stage that
    ends within its first interval has none."""

    def __init__(self, tracker: Tracker, interval: float):
        self._tracker, self._interval = tracker, interval
        self._monitors = _system_monitors()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tnd-system-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=RETRY_SECONDS + 5)

    def _sample(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for monitor in self._monitors:
            monitor.collect_metrics()
            metrics.update(monitor.aggregate_metrics())
            monitor.clear_metrics()
        return metrics

    def _run(self) -> None:
        try:
            self._sample()  # primes psutil's CPU counter: its first reading covers no interval
            step = 0
            while not self._stop.wait(self._interval) and self._tracker.active:
                self._tracker.log_metrics({f"system/{k}": v for k, v in self._sample().items()}, step)
                step += 1
        except Exception as exc:  # a monitor that breaks ends the sampling, never the stage
            _warn(f"MLflow: system metrics stopped ({_short(exc)})")


def _system_monitors() -> list:
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    for module, cls in (("gpu_monitor", "GPUMonitor"), ("rocm_monitor", "ROCMMonitor")):
        try:  # NVIDIA through pynvml (nvidia-ml-py), else AMD; neither without a GPU
            import importlib

            monitors.append(getattr(importlib.import_module(f"mlflow.system_metrics.metrics.{module}"), cls)())
            break
        except Exception:
            continue
    return monitors


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
    the project stays clean; the lock (flock, through filelock) is released when the file closes,
    even if the process dies.
    """
    path = _sqlite_path(uri)
    if path is None:
        yield
        return
    key = hashlib.sha256(path.encode()).hexdigest()[:16]
    lock = FileLock(Path(tempfile.gettempdir()) / f"tnd-mlflow-{key}.lock")
    try:
        held = lock.acquire(timeout=RETRY_SECONDS)
    except Timeout:
        raise TimeoutError(f"another process held the lock on {path} for {RETRY_SECONDS:.0f}s") from None
    with held:
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


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Errors only from `logger` for the block (the flavor warns that a local model has no hub card)."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


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
    return one_line(exc, 200) or type(exc).__name__


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)
