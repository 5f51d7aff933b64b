"""MLflow: one run per stage execution with params and tags, dataset inputs, system metrics and the
experiment's kind; a broken store never fails a stage."""

import json
import threading
import time
from pathlib import Path

import mlflow
import pytest
import yaml

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
    assert len(data.params) == len(params.flat()) > 100  # more than the store takes in one call
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


def test_a_store_being_created_elsewhere_too_long_warns_and_the_stage_goes_on(tmp_path, monkeypatch, capsys):
    from filelock import FileLock

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setattr(tracking, "RETRY_SECONDS", 0.3)
    monkeypatch.setattr(tracking, "FileLock", lambda path: FileLock(tmp_path / "creation.lock"))
    other = {}
    holder = threading.Thread(target=lambda: other.setdefault("lock", FileLock(tmp_path / "creation.lock").acquire()))
    holder.start(), holder.join()  # held by another thread: the stage's own FileLock must wait for it
    started = time.monotonic()
    with tracking.stage_run("x", params_for(uri)) as run:
        assert not run.active
    assert time.monotonic() - started < 5
    assert f"another process held the lock on {tmp_path / 'mlflow.db'} for 0s" in capsys.readouterr().err


def test_disabled_tracking_logs_nothing(tmp_path):
    params = parse_params({"tracking": {"enabled": False, "uri": f"sqlite:///{tmp_path}/m.db"}})
    with tracking.stage_run("x", params) as run:
        assert not run.active
    assert not (tmp_path / "m.db").exists()


# --- what a user of MLflow 3 expects: the kind, datasets, system metrics, models (issue 20) --------


def client_for(uri):
    return mlflow.tracking.MlflowClient(uri)


def test_the_experiment_is_marked_as_model_development(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = client_for(uri)
    with tracking.stage_run("x", params_for(uri)):
        pass
    assert client.get_experiment_by_name("test").tags["mlflow.experimentKind"] == "custom_model_development"

    # An experiment made before (no kind) or one the UI guessed a kind for gets ours; a chosen kind stays.
    for name, before, after in [("old", None, "custom_model_development"),
                                ("guessed", "genai_development_inferred", "custom_model_development"),
                                ("chosen", "genai_development", "genai_development")]:
        experiment_id = client.create_experiment(name)
        if before:
            client.set_experiment_tag(experiment_id, "mlflow.experimentKind", before)
        with tracking.stage_run("x", parse_params({"tracking": {"uri": uri, "experiment": name}})):
            pass
        assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == after, name


def test_inputs_are_datasets_whose_digest_is_dvcs_md5(tmp_path, monkeypatch):
    from dvc_data.hashfile.hash import file_md5

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data/train.jsonl").write_text('{"text": "a dog"}\n{"text": "the cat"}\n')
    (tmp_path / "data/index.json").write_text('{"shards": []}')
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with tracking.stage_run("x", params_for(uri)) as run:
        run.log_inputs([("data/train.jsonl", "training"), ("data/index.json", "demonstrations"),
                        ("data/absent.jsonl", "evaluation")])
        assert run.active
    mlflow.set_tracking_uri(uri)
    (found,) = mlflow.search_runs(experiment_names=["test"], output_format="list")
    inputs = {i.dataset.name: i for i in found.inputs.dataset_inputs}
    assert set(inputs) == {"data/train.jsonl", "data/index.json"}  # a file that is not there is left out
    for name, context in [("data/train.jsonl", "training"), ("data/index.json", "demonstrations")]:
        dataset = inputs[name].dataset
        assert dataset.digest == file_md5(str(tmp_path / name))  # what DVC records for the file
        assert dataset.source_type == "local" and json.loads(dataset.source) == {"uri": name}
        assert {t.key: t.value for t in inputs[name].tags} == {"mlflow.data.context": context}
    assert json.loads(inputs["data/train.jsonl"].dataset.profile)["rows"] == 2


def test_system_metrics_are_sampled_while_the_run_lasts(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    params = parse_params({"tracking": {"uri": uri, "experiment": "test", "system_metrics_interval": 0.1}})
    with tracking.stage_run("long", params):
        time.sleep(0.8)
    with tracking.stage_run("short", params.model_copy(update={
            "tracking": params.tracking.model_copy(update={"system_metrics_interval": 0})})):
        time.sleep(0.3)
    assert not [t for t in threading.enumerate() if t.name == "tnd-system-metrics"]  # stopped with the run

    client = client_for(uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("test").experiment_id])}
    long_metrics = runs["long"].data.metrics
    for name in ("cpu_utilization_percentage", "system_memory_usage_megabytes", "system_memory_usage_percentage"):
        assert f"system/{name}" in long_metrics, name
    history = client.get_metric_history(runs["long"].info.run_id, "system/system_memory_usage_megabytes")
    assert len(history) >= 3 and [m.step for m in history] == list(range(len(history)))
    assert all(m.value > 0 for m in history)
    assert not [k for k in runs["short"].data.metrics if k.startswith("system/")]  # interval 0: none


class BrokenClient:
    """A store that fails every call, as a disk that went read-only would."""

    def __init__(self):
        self.calls = 0

    def __getattr__(self, name):
        def fail(*args, **kwargs):
            self.calls += 1
            raise OSError("disk I/O error")
        return fail


def test_a_store_failing_under_the_sampler_warns_once_and_the_stage_goes_on(capsys):
    client = BrokenClient()
    run = tracking.Tracker(client, "run-1")
    run.start_system_metrics(0.05)
    deadline = time.monotonic() + 10
    while run.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not run.active  # the sampler met the failure and turned tracking off
    run.log_metrics({"loss": 1.0})  # the stage's own logging: a no-op now
    run.log_model("nowhere", "student", task="text-generation", register=True)
    run.end("FINISHED")
    assert capsys.readouterr().err.count("warning: MLflow") == 1


def test_a_model_that_cannot_be_logged_warns_once_and_the_run_goes_on(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    (tmp_path / "not_a_model").mkdir()
    with tracking.stage_run("x", params_for(uri)) as run:
        run.log_model(tmp_path / "not_a_model", "student", task="text-generation", register=True)
        run.log_metrics({"after": 1.0})  # the store is fine: the run goes on
    err = capsys.readouterr().err
    assert err.count("warning: MLflow") == 1 and "could not log the student model" in err
    mlflow.set_tracking_uri(uri)
    (found,) = mlflow.search_runs(experiment_names=["test"], output_format="list")
    assert found.info.status == "FINISHED" and found.data.metrics["after"] == 1.0
    assert not client_for(uri).search_registered_models()


@pytest.mark.parametrize("pipeline,alias", [
    ("lucky-lark", "lucky-lark"), ("lr.1e-4 run", "lr-1e-4-run"), ("v2", "exp-v2"), ("Latest", "exp-Latest"),
    ("4aaf308a-1a2b3c4d", "4aaf308a-1a2b3c4d"),
])
def test_the_registry_alias_is_the_pipeline_as_mlflow_takes_it(pipeline, alias):
    assert tracking.model_alias(pipeline) == alias


# --- what stages/common.py logs around every stage ------------------------------------------------


def run_fake_stage(tmp_path, name, **tracking_params):
    from stages import common

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"tnd": {"mode": "demos_only", "demos_as": "distill"},
                                      "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "stages",
                                                   **tracking_params}}))
    common.run_stage(name, lambda params, run: None, ["--params", str(params)])
    client = client_for(f"sqlite:///{tmp_path}/mlflow.db")
    experiment_id = client.get_experiment_by_name("stages").experiment_id
    return client.search_runs([experiment_id], order_by=["attributes.start_time DESC"])[0]


def test_mode_stages_are_tagged_with_the_mode_and_named_after_experiment_and_mode(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_EXP_NAME", "ablation-7")
    for name in ("evaluate", "train_ppo"):
        run = run_fake_stage(tmp_path, name)
        assert run.data.tags["mode"] == "demos_only"
        assert run.info.run_name == f"{name}: ablation-7 (demos_only)"
    run = run_fake_stage(tmp_path, "train_teacher")  # its outputs do not depend on tnd.mode
    assert "mode" not in run.data.tags and run.info.run_name == "train_teacher"


def test_every_stage_logs_what_it_reads_as_dataset_inputs(tmp_path, monkeypatch):
    from stages import common

    monkeypatch.chdir(tmp_path)
    prepared = tmp_path / common.PREPARED
    prepared.mkdir(parents=True)
    for name in ("train.jsonl", "eval.jsonl", "eval_prompts.jsonl"):
        (prepared / name).write_text('{"text": "a dog"}\n')
    run = run_fake_stage(tmp_path, "train_teacher")
    contexts = {i.dataset.name: [t.value for t in i.tags] for i in run.inputs.dataset_inputs}
    assert contexts == {"data/prepared/train.jsonl": ["training"], "data/prepared/eval.jsonl": ["evaluation"],
                        "data/prepared/eval_prompts.jsonl": ["evaluation"]}


def test_the_inputs_a_stage_logs_are_its_deps_in_dvc_yaml():
    from stages import common
    from tests.conftest import ROOT

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for objective in ("pairwise", "regression"):
        params = parse_params({"data": {"source": "mine.jsonl"}, "reward": {"objective": objective},
                               "tnd": {"lm_data": "corpus"}})
        for name, stage in stages.items():
            deps = [Path(d) for d in stage.get("deps", [])]
            for path, _ in common.stage_inputs(name, params):
                if path == params.data.source:
                    continue  # the user's own file, outside the pipeline
                assert any(Path(path) == d or d in Path(path).parents for d in deps), (name, path)
    data_stages = {"train_teacher", "train_reward", "cache_teacher_logits", "score_rewards", "train_ppo", "evaluate"}
    default = parse_params({})
    reading = {n for n in stages if any(path != default.data.source for path, _ in common.stage_inputs(n, default))}
    assert reading == data_stages  # the stages that read the pipeline's data log it


def saved_tiny_lm(path):
    """A causal LM saved as the stages save one: save_pretrained, the tokenizer beside the weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["the", "a", "dog", "cat", "runs", "sleeps"]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=32, max_position_embeddings=32,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_the_student_is_logged_from_its_directory_registered_and_loads_back(tmp_path, monkeypatch, capsys):
    import mlflow.transformers

    monkeypatch.chdir(tmp_path)  # a local store keeps artifacts in ./mlruns
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-lark")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    saved = saved_tiny_lm(tmp_path / "models/student")
    with tracking.stage_run("train_ppo", params_for(uri)) as run:
        run.log_model(saved, "student", task="text-generation", register=True)
        run.log_model(saved, "teacher", task="text-generation")  # logged, not registered
        assert run.active
    assert "models:/tnd-student@lucky-lark (version 1)" in capsys.readouterr().err

    client = client_for(uri)
    version = client.get_model_version_by_alias("tnd-student", "lucky-lark")
    assert [m.name for m in client.search_registered_models()] == ["tnd-student"]
    (found,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert version.run_id == found.info.run_id and len(found.outputs.model_outputs) == 2
    mlflow.set_tracking_uri(uri)
    generator = mlflow.transformers.load_model("models:/tnd-student@lucky-lark")
    text = generator("the dog", max_new_tokens=3, do_sample=False)[0]["generated_text"]
    assert text.startswith("the dog") and len(text.split()) > 2
    local = mlflow.artifacts.download_artifacts("models:/tnd-student@lucky-lark")
    assert (Path(local) / "model/model.safetensors").read_bytes() == (saved / "model.safetensors").read_bytes()


def test_log_models_off_logs_and_registers_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    params = parse_params({"tracking": {"uri": uri, "experiment": "test", "log_models": False}})
    with tracking.stage_run("train_ppo", params) as run:
        run.log_model(saved_tiny_lm(tmp_path / "student"), "student", task="text-generation", register=True)
    client = client_for(uri)
    (found,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert not found.outputs.model_outputs and not client.search_registered_models()
