"""The experiments workflow: concurrent stages on one sqlite store, a real MLflow tracking
server read back over REST, results shared through a DVC remote and a git clone, and the
`pipeline` tag that groups the stage runs of one pipeline execution."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import pytest
import sqlalchemy.exc
import yaml
from mlflow.exceptions import MlflowException

from tests.conftest import ROOT, init_git_dvc
from stages.common import free_port
from tnd import tracking
from tnd.config import parse_params


def params_for(uri: str, **overrides):
    return parse_params({"tracking": {"uri": uri, "experiment": "exp"}, **overrides})


def runs_in(uri: str, experiment: str = "exp", filter_string: str = ""):
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=[experiment], filter_string=filter_string, output_format="list")


# --- a locked store is waited for; any other failure still switches tracking off -------


def locked_error() -> MlflowException:
    """The exception chain MLflow raises when sqlite reports a lock: MlflowException from
    sqlalchemy's OperationalError from sqlite3's."""
    cause = sqlite3.OperationalError("database is locked")
    wrapped = sqlalchemy.exc.OperationalError("INSERT INTO metrics ...", {}, cause)
    wrapped.__cause__ = cause
    error = MlflowException(message=str(wrapped), error_code="TEMPORARILY_UNAVAILABLE")
    error.__cause__ = wrapped
    return error


class FlakyClient:
    """Stands in for MlflowClient: fails log_batch with `errors` in turn, then records."""

    def __init__(self, *errors: Exception):
        self.errors = list(errors)
        self.calls = 0
        self.logged = []

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        self.logged.extend((m.key, m.value, m.step) for m in metrics)


def test_a_locked_store_is_retried_until_it_frees(capsys):
    client = FlakyClient(locked_error(), locked_error(), locked_error())
    run = tracking.Tracker(client, "run-1")
    run.log_metrics({"loss": 0.5}, step=3)
    assert run.active and client.calls == 4
    assert client.logged == [("loss", 0.5, 3)]
    assert capsys.readouterr().err == ""


def test_any_other_error_warns_once_and_switches_tracking_off(capsys):
    client = FlakyClient(MlflowException("disk I/O error"))
    run = tracking.Tracker(client, "run-1")
    run.log_metrics({"loss": 0.5}, step=0)
    run.log_metrics({"loss": 0.4}, step=1)  # tracking is off now: a no-op
    assert not run.active and client.calls == 1
    err = capsys.readouterr().err
    assert err.count("warning: MLflow") == 1 and "disk I/O error" in err


def test_a_store_locked_for_too_long_is_given_up(capsys, monkeypatch):
    monkeypatch.setattr(tracking, "RETRY_SECONDS", 0.5)
    client = FlakyClient(*[locked_error() for _ in range(1000)])
    started = time.monotonic()
    tracking.Tracker(client, "run-1").log_metrics({"loss": 0.5})
    assert time.monotonic() - started < 5
    assert 1 < client.calls < 1000
    assert "database is locked" in capsys.readouterr().err


# --- two stage processes on one sqlite store ---------------------------------------------

# Each worker imports everything, says it is ready, then waits for "go" so that both open
# the (fresh) store at the same moment: the race that used to lose one of the two runs.
WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import mlflow
    from tnd import tracking
    from tnd.config import parse_params

    uri, name, seed, steps, sync = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
    params = parse_params({"seed": seed, "tracking": {"uri": uri, "experiment": "exp"}})
    (sync / f"ready-{name}").touch()
    deadline = time.monotonic() + 60
    while not (sync / "go").exists():
        if time.monotonic() > deadline:
            sys.exit("no go signal within 60 s")
        time.sleep(0.01)
    with tracking.stage_run(name, params) as run:
        for step in range(steps):
            run.log_metrics({"loss": 1.0 / (step + 1), "seed": float(seed)}, step=step)
        if not run.active:
            sys.exit("tracking switched itself off")
    """
)


def start_workers(uri: str, sync: Path, steps: int, names: list[str]) -> list[subprocess.Popen]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, uri, name, str(seed), str(steps), str(sync)],
            env=env,
            cwd=sync,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed, name in enumerate(names)
    ]


def wait_for(condition, timeout: float, what: str, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


@pytest.mark.slow
def test_two_stage_processes_log_everything_to_one_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    names, steps = ["worker0", "worker1"], 50
    workers = start_workers(uri, tmp_path, steps, names)
    try:
        wait_for(lambda: all((tmp_path / f"ready-{n}").exists() for n in names), 120, "the workers to start")
        (tmp_path / "go").touch()
        outputs = [w.communicate(timeout=120) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err
        assert "warning" not in err, err

    runs = {r.info.run_name: r for r in runs_in(uri)}
    assert sorted(runs) == names
    client = mlflow.tracking.MlflowClient(uri)
    for seed, name in enumerate(names):
        run = runs[name]
        sent = parse_params({"seed": seed, "tracking": {"uri": uri, "experiment": "exp"}})
        expected = {k: tracking._param_value(v) for k, v in sent.flat().items()}
        assert run.info.status == "FINISHED"
        assert run.data.params == expected
        loss = client.get_metric_history(run.info.run_id, "loss")
        assert sorted((m.step, m.value) for m in loss) == [(s, 1.0 / (s + 1)) for s in range(steps)]
        assert {m.value for m in client.get_metric_history(run.info.run_id, "seed")} == {float(seed)}


# --- a real MLflow tracking server, read back over its REST API --------------------------


# Loopback only, and never through a proxy that the environment might name.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 10) -> bytes:
    with _LOCAL.open(url, timeout=timeout) as response:
        return response.read()


def http_json(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with _LOCAL.open(request, timeout=10) as response:
        return json.load(response)


def healthy(url: str) -> bool:
    try:
        return http_get(f"{url}/health", timeout=2).strip() == b"OK"
    except OSError:
        return False


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on a sqlite store and a local artifact destination, on 127.0.0.1."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
            "--artifacts-destination", str(tmp_path / "artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the workers it forks go down with it
    )
    try:
        deadline = time.monotonic() + 60
        while not healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                tail = (tmp_path / "server.log").read_text()[-2000:]
                pytest.fail(f"mlflow server did not answer {url}/health within 60 s:\n{tail}")
            time.sleep(0.25)
        yield url
    finally:
        stop_group(server)
        log.close()


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group, then SIGKILL whatever of it outlived the leader."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


def write_png(path: Path) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(2, 2))
    axes.plot([0, 1, 2], [1.0, 0.5, 0.25])
    figure.savefig(path)
    plt.close(figure)
    return path.read_bytes()


@pytest.mark.slow
def test_a_stage_run_on_a_tracking_server_reads_back_over_rest(mlflow_server, tmp_path):
    params = params_for(mlflow_server)
    png = write_png(tmp_path / "curve.png")
    rows = [{"prompt": "the dog", "reward": 0.5}, {"prompt": "a cat", "reward": -1.0}]
    with tracking.stage_run("evaluate", params) as run:
        for step in range(5):
            run.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        run.log_artifact(tmp_path / "curve.png", "plots")
        run.log_table(rows, "samples.json")
        assert run.active

    api = f"{mlflow_server}/api/2.0/mlflow"
    experiment = http_json(f"{api}/experiments/get-by-name?experiment_name=exp")["experiment"]
    pipeline = tracking.pipeline_id(params)
    found = http_json(
        f"{api}/runs/search",
        {"experiment_ids": [experiment["experiment_id"]], "filter": f"tags.pipeline = '{pipeline}'"},
    )["runs"]
    assert len(found) == 1
    info, data = found[0]["info"], found[0]["data"]
    run_id = info["run_id"]
    assert info["status"] == "FINISHED" and info["run_name"] == "evaluate"
    tags = {t["key"]: t["value"] for t in data["tags"]}
    assert tags["stage"] == "evaluate" and tags["params_hash"] == params.fingerprint()
    assert tags["pipeline"] == pipeline
    assert {p["key"]: p["value"] for p in data["params"]}["ppo.learning_rate"] == str(params.ppo.learning_rate)

    query = urllib.parse.urlencode({"run_id": run_id, "metric_key": "loss"})
    history = http_json(f"{api}/metrics/get-history?{query}")["metrics"]
    assert sorted((m["step"], m["value"]) for m in history) == [(s, 1.0 / (s + 1)) for s in range(5)]

    top = http_json(f"{api}/artifacts/list?run_id={run_id}")["files"]
    assert {(f["path"], f["is_dir"]) for f in top} == {("plots", True), ("samples.json", False)}
    plots = http_json(f"{api}/artifacts/list?run_id={run_id}&path=plots")["files"]
    assert plots == [{"path": "plots/curve.png", "is_dir": False, "file_size": len(png)}]

    def artifact(path: str) -> bytes:
        return http_get(f"{mlflow_server}/get-artifact?" + urllib.parse.urlencode({"path": path, "run_uuid": run_id}))

    assert artifact("plots/curve.png") == png
    table = json.loads(artifact("samples.json"))
    assert table["columns"] == ["prompt", "reward"]
    assert table["data"] == [["the dog", 0.5], ["a cat", -1.0]]


# --- results shared through a DVC remote --------------------------------------------------

# The cheapest stages that produce cached outputs (data, tokenizer, a trained model).
STAGES = ["prepare_data", "train_teacher"]
OUTPUTS = ["data/prepared", "artifacts/tokenizer", "models/teacher"]


def run_ok(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout}{result.stderr}"
    return result.stdout


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# Python writes __pycache__/ into the code directories that stages depend on (tnd/data,
# tnd_kernels); the project's .dvcignore keeps it out of their hashes, or a fresh clone,
# which has none, would rerun everything.
DVCIGNORE = ROOT / ".dvcignore"


@pytest.mark.slow
def test_outputs_pushed_to_a_dvc_remote_pull_into_a_clone_up_to_date(dvc_project, tmp_path_factory, monkeypatch):
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)  # stages write __pycache__ as usual
    remote = tmp_path_factory.mktemp("dvc-remote")
    init_git_dvc()
    shutil.copy(DVCIGNORE, dvc_project / ".dvcignore")  # the project's, not dvc init's empty one
    run_ok("dvc", "repro", *STAGES)
    run_ok("dvc", "remote", "add", "-d", "local", str(remote))
    run_ok("git", "add", "-A")
    run_ok("git", "commit", "-q", "-m", "pipeline on tiny params")
    run_ok("dvc", "push", *STAGES)

    clone = tmp_path_factory.mktemp("clone") / "repo"
    run_ok("git", "clone", "-q", str(dvc_project), str(clone))
    monkeypatch.chdir(clone)
    monkeypatch.setenv("PYTHONPATH", str(clone))
    assert str(remote) in run_ok("dvc", "remote", "list")  # the remote travels in .dvc/config
    assert not any((clone / out).exists() for out in OUTPUTS)
    run_ok("dvc", "pull", *STAGES)

    again = run_ok("dvc", "repro", *STAGES)
    assert "Running stage" not in again and "up to date" in again, again
    for out in OUTPUTS:
        pulled, original = tree_bytes(clone / out), tree_bytes(dvc_project / out)
        assert pulled and pulled == original, out
    assert (clone / "metrics/teacher.json").read_bytes() == (dvc_project / "metrics/teacher.json").read_bytes()


@pytest.mark.slow
def test_queued_experiments_run_two_at_once_and_log_to_the_project_store(dvc_project, monkeypatch):
    """`dvc queue start -j 2` runs each experiment in a temporary copy of the project,
    two at once, all logging to the project's fresh mlflow.db."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = yaml.safe_load((dvc_project / "params.yaml").read_text())
    params["tracking"] = {"enabled": True}  # the default store: mlflow.db at the project root
    (dvc_project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    init_git_dvc()
    run_ok("git", "add", "-A")
    run_ok("git", "commit", "-q", "-m", "pipeline on tiny params")
    for seed in (1, 2):
        run_ok("dvc", "exp", "run", "--queue", "-n", f"seed-{seed}", "-S", f"seed={seed}", "prepare_data")
    try:
        run_ok("dvc", "queue", "start", "-j", "2")
        def drained() -> bool:
            return not any(state in run_ok("dvc", "queue", "status") for state in ("Queued", "Running"))

        wait_for(drained, 300, "the queue to finish", every=2)
    finally:
        subprocess.run(["dvc", "queue", "stop"], capture_output=True, timeout=120)  # workers left by a failure
    status = run_ok("dvc", "queue", "status")
    assert status.count("Success") == 2, status

    runs = runs_in(f"sqlite:///{dvc_project}/mlflow.db", experiment="tnd-pipeline")
    assert sorted(r.data.tags["pipeline"] for r in runs) == ["seed-1", "seed-2"]
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["stage"] == "prepare_data"
        assert run.data.params["seed"] == run.data.tags["dvc_exp"].removeprefix("seed-")
        artifacts = Path(urllib.parse.urlparse(run.info.artifact_uri).path)
        assert artifacts.is_relative_to(dvc_project / "mlruns") and (artifacts / "stats.json").is_file()


# --- the `pipeline` tag ---------------------------------------------------------------------


def test_stage_runs_of_one_configuration_share_the_pipeline_tag(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    params = params_for(uri)
    for stage in ("prepare_data", "train_teacher"):
        with tracking.stage_run(stage, params):
            pass
    with tracking.stage_run("prepare_data", params_for(uri, seed=params.seed + 1)):
        pass

    pipeline = f"{tracking._git_commit()[:8]}-{params.fingerprint()[:8]}"
    grouped = runs_in(uri, filter_string=f"tags.pipeline = '{pipeline}'")
    assert sorted(r.data.tags["stage"] for r in grouped) == ["prepare_data", "train_teacher"]
    assert len({r.data.tags["pipeline"] for r in runs_in(uri)}) == 2


def test_under_dvc_exp_run_the_pipeline_tag_is_the_experiment_name(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-lark")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with tracking.stage_run("train_teacher", params_for(uri)):
        pass
    (run,) = runs_in(uri, filter_string="tags.pipeline = 'lucky-lark'")
    assert run.data.tags["dvc_exp"] == "lucky-lark"


def test_a_dvc_temp_workspace_logs_to_the_project_store(tmp_path, monkeypatch):
    """`dvc exp run --queue` runs stages in a temporary copy; DVC_ROOT names the project."""
    project, workspace = tmp_path / "project", tmp_path / "project/.dvc/tmp/exps/tmp123"
    workspace.mkdir(parents=True)
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("DVC_ROOT", str(project))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = parse_params({"tracking": {"experiment": "exp"}})
    assert tracking.tracking_uri(params) == f"sqlite:///{project}/mlflow.db"
    with tracking.stage_run("prepare_data", params) as run:
        (tmp_path / "note.txt").write_text("kept")
        run.log_artifact(tmp_path / "note.txt")
    (found,) = runs_in(f"sqlite:///{project}/mlflow.db")
    assert Path(urllib.parse.urlparse(found.info.artifact_uri).path).is_relative_to(project / "mlruns")
    assert (project / "mlruns").is_dir() and not (workspace / "mlruns").exists()
    assert not (workspace / "mlflow.db").exists()
