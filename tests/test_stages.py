"""The foundation stages on tiny params, in-process and under `dvc repro`."""

import json

import mlflow
import pytest
import yaml

from tnd.data import nursery
from tnd.io import read_jsonl
from stages import prepare_data, train_teacher
from tests.conftest import ROOT, dvc, init_git_dvc, merge

pytestmark = pytest.mark.slow


def test_prepare_data_writes_every_output(project):
    prepare_data.main([])
    out = project.path / "data/prepared"
    train = read_jsonl(out / "train.jsonl")
    assert len(train) == 400 and len(read_jsonl(out / "eval.jsonl")) == 60
    prompts = read_jsonl(out / "prompts.jsonl")
    assert len(prompts) == 40 and all(len(p["prompt_ids"]) == 3 for p in prompts)  # bos + 2 tokens
    assert {p["prompt_ids"][0] for p in prompts} == {1}
    pairs = read_jsonl(out / "pairs_train.jsonl")
    assert {p["kind"] for p in pairs} <= {"agreement_swap", "drop_word", "duplicate_word"}
    assert all(nursery.is_grammatical(p["chosen"]) and not nursery.is_grammatical(p["rejected"]) for p in pairs)
    assert "adjacent_swap" in {p["kind"] for p in read_jsonl(out / "pairs_eval.jsonl")}
    assert (project.path / "artifacts/tokenizer/tokenizer.json").is_file()


def test_prepare_data_on_the_default_nursery_data_holds_its_splits_apart(project, capsys):
    # Finding 4 on the default params (repros r01, r06): 14.1% of the eval texts were training texts and 69.5%
    # of the eval prompts were training prompts; validation and test were one split.
    defaults = yaml.safe_load((ROOT / "params.yaml").read_text())
    project.write(data=defaults["data"], tokenizer=defaults["tokenizer"])
    prepare_data.main([])
    out = project.path / "data/prepared"
    prompts = {tuple(p["prompt_ids"]) for p in read_jsonl(out / "prompts.jsonl")}
    eval_prompts = [tuple(p["prompt_ids"]) for p in read_jsonl(out / "eval_prompts.jsonl")]
    overlap = sum(p in prompts for p in eval_prompts)
    assert len(eval_prompts) == 200 and overlap == 0, f"{overlap} eval prompts are training prompts"
    train, test = ({row["text"] for row in read_jsonl(out / f"{name}.jsonl")} for name in ("train", "eval"))
    assert not test & train, f"{len(test & train)} eval texts are training texts"
    texts = {name: [row["text"] for row in read_jsonl(out / f"{name}.jsonl")] for name in ("train", "valid", "eval")}
    valid = set(texts["valid"])
    assert not valid & train and not valid & test
    assert [len(texts[name]) for name in ("train", "valid", "eval")] == [20000, 1000, 1000]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["eval_prompts_in_train"] == overlap
    assert stats["duplicates_dropped"] > 0 and stats["n_valid"] == 1000
    pairs_valid = read_jsonl(out / "pairs_valid.jsonl")
    assert {p["chosen"] for p in pairs_valid} <= valid and len(pairs_valid) == stats["n_pairs_valid"]
    assert {p["kind"] for p in pairs_valid} <= set(defaults["data"]["pair_corruptions"])  # the held-out kind stays out
    assert "none of them a training prompt" in capsys.readouterr().out


def test_prepare_data_on_a_local_file(project):
    texts = [f"line {i} of my own corpus" for i in range(50)]
    (project.path / "mine.txt").write_text("\n".join(texts))
    project.write(data={"source": "mine.txt"})
    prepare_data.main([])
    train = read_jsonl(project.path / "data/prepared/train.jsonl")
    assert {row["text"] for row in train} < set(texts)


def test_train_teacher_is_deterministic(project):
    prepare_data.main([])
    train_teacher.main([])
    first = json.loads((project.path / "metrics/teacher.json").read_text())
    assert first["eval_perplexity"] > 1 and 0 <= first["grammaticality"] <= 1
    assert (project.path / "models/teacher/model.safetensors").is_file()
    train_teacher.main([])
    assert json.loads((project.path / "metrics/teacher.json").read_text()) == first


def test_teacher_from_a_local_saved_model(project):
    prepare_data.main([])
    train_teacher.main([])
    saved = project.path / "models/teacher"
    project.write(teacher={"source": str(saved)})
    train_teacher.main([])  # loads the model saved above instead of training one
    assert json.loads((project.path / "metrics/teacher.json").read_text())["eval_perplexity"] > 1


def test_teacher_with_a_too_small_vocabulary_is_refused(project, capsys):
    prepare_data.main([])
    project.write(tokenizer={"vocab_size": 300}, teacher={"train": {"steps": 1}})
    train_teacher.main([])
    saved = project.path / "small_teacher"
    (project.path / "models/teacher").rename(saved)
    project.write(tokenizer={"vocab_size": 800})
    prepare_data.main([])  # a larger tokenizer now
    project.write(tokenizer={"vocab_size": 800}, teacher={"source": str(saved)})
    with pytest.raises(SystemExit) as exit_info:
        train_teacher.main([])
    assert exit_info.value.code == 2
    assert "smaller than the tokenizer's" in capsys.readouterr().err


def test_every_stage_runs_under_bf16_autocast(project, fresh_accelerate_state, monkeypatch):
    """engine.mixed_precision: bf16 on CPU: every stage that runs a model takes it (training under autocast on
    fp32 weights, scoring and evaluation under autocast) and the pipeline completes with finite figures."""
    from stages import cache_teacher_logits, evaluate, score_rewards, train_ppo, train_reward
    from tests.test_train_ppo import PPO
    from tnd.trainers import ppo

    asked = set()
    for module in (train_teacher, train_reward, score_rewards, train_ppo, evaluate, ppo):
        def recording(mixed_precision="no", *args, _original=module.make_accelerator, _name=module.__name__, **kw):
            asked.add((_name.split(".")[-1], mixed_precision))
            return _original(mixed_precision, *args, **kw)
        monkeypatch.setattr(module, "make_accelerator", recording)

    project.write(**merge(PPO, {"engine": {"mixed_precision": "bf16"}, "ppo": {"steps": 2, "save_every": 2},
                                "eval": {"n_prompts": 4}}))
    for stage in (prepare_data, train_teacher, train_reward, cache_teacher_logits, score_rewards, train_ppo, evaluate):
        stage.main([])
    metrics = {name: json.loads((project.path / f"metrics/{name}.json").read_text())
               for name in ("teacher", "reward", "train", "eval")}
    assert metrics["teacher"]["eval_perplexity"] > 1 and metrics["train"]["steps"] == 2
    assert all(metrics["eval"][m]["perplexity"] > 1 for m in ("student", "initial_student", "teacher"))
    assert metrics["eval"]["student"]["reward"] is not None
    assert asked == {(name, "bf16") for name in ("train_teacher", "train_reward", "score_rewards", "train_ppo",
                                                  "evaluate", "ppo")}


def test_stage_run_is_recorded_in_mlflow(project):
    project.write(tracking={"enabled": True, "experiment": "stages"})
    prepare_data.main([])
    mlflow.set_tracking_uri(f"sqlite:///{project.path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["stages"], output_format="list")
    assert [r.data.tags["stage"] for r in runs] == ["prepare_data"]
    assert runs[0].data.params["data.n_train"] == "400"
    assert runs[0].data.metrics["n_train"] == 400


def test_dvc_repro_is_incremental(dvc_project):
    init_git_dvc()
    targets = ["prepare_data", "train_teacher"]
    first = dvc("repro", *targets)
    assert "Running stage 'train_teacher'" in first
    again = dvc("repro", *targets)
    assert "Running stage" not in again and "up to date" in again
    params = yaml.safe_load((dvc_project / "params.yaml").read_text())
    params["teacher"]["train"]["steps"] += 1
    (dvc_project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = dvc("repro", *targets)
    assert "Running stage 'train_teacher'" in third and "Running stage 'prepare_data'" not in third
