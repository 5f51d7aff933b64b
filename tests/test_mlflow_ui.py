"""The pipeline as a user of MLflow 3 sees it on a real `mlflow server` (127.0.0.1), read back over
its REST API and with the client: the experiment marked as model development, the student in the
registry under its alias and loading back, each run's dataset inputs with DVC's digests, system
metrics on the training runs, the evaluate run tagged and named by experiment and mode; and a model
that cannot be logged loses no output of its stage."""

from __future__ import annotations

import json
import urllib.parse

import mlflow
import mlflow.transformers
import pytest
import torch

from tests.test_experiments import http_get, http_json, mlflow_server  # noqa: F401  (a fixture)
from tests.test_train_ppo import PPO

pytestmark = pytest.mark.slow

STAGES = ("prepare_data", "train_teacher", "train_reward", "cache_teacher_logits", "score_rewards", "train_ppo",
          "evaluate")


def run_pipeline() -> None:
    import importlib

    for stage in STAGES:
        importlib.import_module(f"stages.{stage}").main([])


def test_the_pipeline_on_a_tracking_server_as_a_user_of_mlflow_3_sees_it(
    project, mlflow_server, monkeypatch, capsys  # noqa: F811  (the fixture imported above)
):
    from dvc_data.hashfile.hash import file_md5
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("DVC_EXP_NAME", "ablation-a")  # as under `dvc exp run -n ablation-a`
    project.write(**{**PPO, "tnd": {**PPO["tnd"], "mode": "demos_only"}}, eval={"n_prompts": 4, "max_new_tokens": 8},
                  tracking={"enabled": True, "uri": mlflow_server, "experiment": "tnd", "system_metrics_interval": 0.2})
    run_pipeline()
    err = capsys.readouterr().err
    assert "warning" not in err, err
    assert "models:/tnd-student@ablation-a (version 1)" in err  # the stage says where the student went

    api = f"{mlflow_server}/api/2.0/mlflow"
    experiment = http_json(f"{api}/experiments/get-by-name?experiment_name=tnd")["experiment"]
    # 1. The model-training view, not the GenAI one.
    assert {t["key"]: t["value"] for t in experiment["tags"]}["mlflow.experimentKind"] == "custom_model_development"

    found = http_json(f"{api}/runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                             "filter": "tags.pipeline = 'ablation-a'"})["runs"]
    runs = {{t["key"]: t["value"] for t in r["data"]["tags"]}["stage"]: r for r in found}
    assert sorted(runs) == sorted(STAGES)

    # 2. Every trained model is an MLflow model of its run; the student is registered under its alias.
    for stage in ("train_teacher", "train_reward", "train_ppo"):
        assert len(runs[stage]["outputs"]["model_outputs"]) == 1, stage
    query = urllib.parse.urlencode({"name": "tnd-student", "alias": "ablation-a"})
    version = http_json(f"{api}/registered-models/alias?{query}")["model_version"]
    assert version["run_id"] == runs["train_ppo"]["info"]["run_id"]
    assert version["source"] == f"models:/{runs['train_ppo']['outputs']['model_outputs'][0]['model_id']}"
    assert {t["key"]: t["value"] for t in version["tags"]}["mode"] == "demos_only"

    mlflow.set_tracking_uri(mlflow_server)
    uri = "models:/tnd-student@ablation-a"
    generator = mlflow.transformers.load_model(uri)
    text = generator("the dog", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("the dog") and len(text) > len("the dog")
    local = mlflow.artifacts.download_artifacts(uri)
    weights = f"{local}/model/model.safetensors"
    with open(weights, "rb") as logged, open(project.path / "models/student/model.safetensors", "rb") as saved:
        assert logged.read() == saved.read()  # the saved file itself, not a re-serialisation
    model = AutoModelForCausalLM.from_pretrained(f"{local}/model")
    tokenizer = AutoTokenizer.from_pretrained(f"{local}/model")
    ids = tokenizer("the dog", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids.shape[1]

    # 3. What each run was trained (or evaluated) on, with the md5 DVC records for the file.
    prepared = project.path / "data/prepared"
    expected = {
        "train_teacher": {"data/prepared/train.jsonl": "training", "data/prepared/valid.jsonl": "validation",
                          "data/prepared/eval.jsonl": "evaluation", "data/prepared/eval_prompts.jsonl": "evaluation"},
        "train_reward": {"data/prepared/pairs_train.jsonl": "training", "data/prepared/pairs_valid.jsonl": "validation",
                         "data/prepared/pairs_eval.jsonl": "evaluation"},
        "train_ppo": {"data/prepared/prompts.jsonl": "training", "cache/teacher/index.json": "training",
                      "data/prepared/train.jsonl": "training", "data/prepared/valid.jsonl": "validation"},
        "evaluate": {"data/prepared/eval_prompts.jsonl": "evaluation", "data/prepared/eval.jsonl": "evaluation"},
    }
    for stage, files in expected.items():
        inputs = runs[stage]["inputs"]["dataset_inputs"]
        got = {i["dataset"]["name"]: ({t["key"]: t["value"] for t in i["tags"]}["mlflow.data.context"],
                                      i["dataset"]["digest"]) for i in inputs}
        assert got == {name: (context, file_md5(str(project.path / name))) for name, context in files.items()}, stage
    profile = next(i["dataset"]["profile"] for i in runs["train_teacher"]["inputs"]["dataset_inputs"]
                   if i["dataset"]["name"] == "data/prepared/train.jsonl")
    assert json.loads(profile)["rows"] == len((prepared / "train.jsonl").read_text().splitlines())

    # 4. System metrics on the training runs, as MLflow's log_system_metrics names them.
    for stage in ("train_teacher", "train_ppo"):
        keys = {m["key"] for m in runs[stage]["data"]["metrics"]}
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys, (stage, keys)
        query = urllib.parse.urlencode({"run_id": runs[stage]["info"]["run_id"],
                                        "metric_key": "system/system_memory_usage_megabytes"})
        assert all(m["value"] > 0 for m in http_json(f"{api}/metrics/get-history?{query}")["metrics"])

    # 5. The ablation reads off the runs table: a `mode` tag and a name with experiment and mode.
    evaluate = runs["evaluate"]
    assert evaluate["info"]["run_name"] == "evaluate: ablation-a (demos_only)"
    assert {t["key"]: t["value"] for t in evaluate["data"]["tags"]}["mode"] == "demos_only"


def test_a_model_that_cannot_be_logged_costs_its_stage_no_output(project, monkeypatch, capsys):
    """Tracking failures never lose a stage's outputs: here the flavor fails after the model is saved."""
    from stages import prepare_data, train_teacher

    prepare_data.main([])
    project.write(tracking={"enabled": True, "uri": f"sqlite:///{project.path}/mlflow.db", "experiment": "x"})

    def broken(*args, **kwargs):
        raise RuntimeError("artifact store full")

    monkeypatch.setattr(mlflow.transformers, "log_model", broken)
    train_teacher.main([])  # returns: no SystemExit
    err = capsys.readouterr().err
    assert err.count("warning: MLflow") == 1 and "artifact store full" in err
    assert (project.path / "models/teacher/model.safetensors").is_file()
    assert json.loads((project.path / "metrics/teacher.json").read_text())["eval_perplexity"] > 1
    mlflow.set_tracking_uri(f"sqlite:///{project.path}/mlflow.db")
    (run,) = mlflow.search_runs(experiment_names=["x"], output_format="list")
    assert run.info.status == "FINISHED" and run.data.metrics["eval_perplexity"] > 1  # logged before the model
