"""MLflow: one run per stage execution with params and tags; a broken store never fails a stage."""

import mlflow
import pytest

from tnd import tracking
from tnd.config import parse_params


def params_for(uri):
    return parse_params({"tracking": {"uri": uri, "experiment": "test"}})


def test_run_records_params_tags_and_step_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "exp-abc")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    params = params_for(uri)
    with tracking.stage_run("train_teacher", params) as run:
        assert run.active
        for step in range(3):
            run.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["test"], output_format="list")
    assert len(runs) == 1
    data = runs[0].data
    assert data.tags["stage"] == "train_teacher"
    assert data.tags["params_hash"] == params.fingerprint()
    assert data.tags["dvc_exp"] == "exp-abc"
    assert "git_commit" in data.tags
    assert data.params["ppo.learning_rate"] == str(params.ppo.learning_rate)
    history = mlflow.tracking.MlflowClient().get_metric_history(runs[0].info.run_id, "loss")
    assert [m.step for m in history] == [0, 1, 2]
    assert runs[0].info.status == "FINISHED"


def test_failed_stage_marks_run_failed_and_reraises(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(ZeroDivisionError):
        with tracking.stage_run("x", params_for(uri)):
            1 / 0
    mlflow.set_tracking_uri(uri)
    assert mlflow.search_runs(experiment_names=["test"], output_format="list")[0].info.status == "FAILED"


def test_unwritable_store_warns_and_the_stage_goes_on(tmp_path, capsys):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    with tracking.stage_run("x", params_for(f"sqlite:///{blocker}/mlflow.db")) as run:
        run.log_metrics({"a": 1.0})  # must be a no-op, not an error
        assert not run.active
    assert "warning: MLflow" in capsys.readouterr().err


def test_disabled_tracking_logs_nothing(tmp_path):
    params = parse_params({"tracking": {"enabled": False, "uri": f"sqlite:///{tmp_path}/m.db"}})
    with tracking.stage_run("x", params) as run:
        assert not run.active
    assert not (tmp_path / "m.db").exists()
