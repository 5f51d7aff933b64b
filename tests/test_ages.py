"""The age-predictor reward (reward.objective: age, the TnD paper's): the teacher's log-spaced checkpoints,
the texts sampled from them and labelled log2(step) (stage sample_ages), the regression reward model trained
on them, and the params that ask for it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from stages.common import AGE_INDEX, AGES, TEACHER_AGES, stage_inputs
from tests.conftest import ROOT, tiny_params
from tests.test_config import error_for
from tnd import health
from tnd.config import ArchParams, LMTrainParams, parse_params
from tnd.data.tokenizer import train_bpe
from tnd.models import build_causal_lm
from tnd.trainers.fit import Validation
from tnd.trainers.lm import age_steps, pretrain_lm

# teacher.train.steps 8 of tiny_params is too few for ages the reward model can tell apart
AGE = {
    "teacher": {"train": {"steps": 64, "age_checkpoints": 4}},
    "reward": {"objective": "age", "age": {"n_samples_per_checkpoint": 60, "max_new_tokens": 8},
               "train": {"steps": 200}},
}


# --- the schedule --------------------------------------------------------------------------------


def test_age_steps_are_log_spaced_from_the_first_step_to_the_last():
    assert age_steps(12, 1500) == [1, 2, 4, 7, 14, 28, 54, 105, 204, 397, 772, 1500]
    assert age_steps(4, 64) == [1, 4, 16, 64] and age_steps(2, 8) == [1, 8]
    assert age_steps(12, 8) == [1, 2, 3, 4, 5, 7, 8]  # fewer than asked: early steps coincide once rounded
    assert age_steps(1, 10) == [10] and age_steps(0, 10) == [] and age_steps(3, 0) == []
    gaps = [math.log2(b) - math.log2(a) for a, b in zip(age_steps(12, 1500), age_steps(12, 1500)[1:])]
    assert max(gaps) - min(gaps) < 0.2  # about as many bits of age apart


def test_pretraining_calls_on_step_after_every_step_and_flags_the_last_of_an_early_stop(monkeypatch):
    texts = ["the cat sat on the mat .", "a dog runs in the park ."] * 8
    tokenizer = train_bpe(texts, vocab_size=300, min_frequency=1)
    arch = ArchParams(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    cfg = LMTrainParams(steps=6, batch_size=4, warmup_steps=1, eval_every=0)
    seen = []
    pretrain_lm(build_causal_lm(arch, tokenizer, 0), tokenizer, texts, cfg, 0, on_step=lambda *a: seen.append(a))
    assert seen == [(1, False), (2, False), (3, False), (4, False), (5, False), (6, True)]
    seen.clear()
    monkeypatch.setattr(Validation, "step", lambda self, step, loss: step == 3)  # validation stops training
    out = pretrain_lm(build_causal_lm(arch, tokenizer, 0), tokenizer, texts, cfg, 0, on_step=lambda *a: seen.append(a))
    assert seen == [(1, False), (2, False), (3, True)] and out["steps_run"] == 3


# --- params --------------------------------------------------------------------------------------


def test_the_age_reward_needs_checkpoints_of_the_builtin_teacher():
    assert parse_params(tiny_params(**AGE)).reward.objective == "age"
    needs = "reward.objective: age learns the ages of texts sampled from checkpoints of the built-in teacher"
    for teacher in ({"train": {"age_checkpoints": 0}}, {"train": {"age_checkpoints": 1}},
                    {"train": {"steps": 1, "age_checkpoints": 4}}, {"source": "gpt2", "train": {"age_checkpoints": 4}}):
        message = error_for({"reward": {"objective": "age"}, "teacher": teacher})
        assert needs in message and "teacher.train.age_checkpoints >= 2" in message
    message = error_for({"teacher": {"source": "gpt2", "train": {"age_checkpoints": 4}}})
    assert message.endswith("teacher.train.age_checkpoints (4) keeps checkpoints of the built-in teacher's "
                            "pretraining, but teacher.source is gpt2, loaded pretrained; set it to 0")
    # checkpoints without the age reward are allowed (nothing reads them), and cost nothing when 0 (the default)
    assert parse_params(tiny_params(teacher={"train": {"age_checkpoints": 3}})).reward.objective == "pairwise"
    assert parse_params({}).teacher.train.age_checkpoints == 0


def test_the_age_stages_log_what_they_read_and_dvc_yaml_lists_it():
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    params = parse_params(tiny_params(**AGE))
    assert stage_inputs("train_reward", params) == [(AGES, "training")]
    assert stage_inputs("sample_ages", params) == [("data/prepared/prompts.jsonl", "prompts")]
    assert stage_inputs("sample_ages", parse_params({})) == []
    assert "data/ages" in stages["train_reward"]["deps"] and stages["sample_ages"]["outs"] == ["data/ages"]
    assert Path(AGES).parent == Path("data/ages")
    assert TEACHER_AGES in stages["train_teacher"]["outs"] and TEACHER_AGES in stages["sample_ages"]["deps"]


def test_small_data_counts_the_age_reward_models_labelled_texts():
    params = parse_params(tiny_params(**AGE))  # reward: 200 steps x 8 over 40 texts = 40 passes
    check = health.small_data(params, {"n_train": 10**6, "n_pairs_train": 10**6}, {"n_train": 40})
    assert check.warn and "reward model 200 steps x 8 = 40 passes over 40 labelled texts" in check.message


# --- the stages ----------------------------------------------------------------------------------


def test_sample_ages_under_another_objective_writes_an_empty_file_at_once(project):
    from stages import sample_ages

    sample_ages.main([])  # reads nothing: no prepared data, no checkpoints
    assert (project.path / AGES).read_bytes() == b""


def test_sample_ages_without_checkpoints_is_one_line(project, capsys):
    from stages import sample_ages

    project.write(**AGE)
    with pytest.raises(SystemExit) as exit_info:
        sample_ages.main([])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {TEACHER_AGES}: 0 teacher checkpoint(s), but the age reward needs at least 2 ages; "
                      "run `dvc repro train_teacher` with teacher.train.age_checkpoints >= 2"]


def test_labelled_ages_without_token_ids_are_one_line(project):
    """A data/ages/labelled.jsonl of the old sample_ages (text only): the age model trains on the ids PPO scores."""
    from stages.train_reward import age_rows
    from tnd.errors import TndError
    from tnd.io import atomic_write_jsonl

    atomic_write_jsonl(project.path / AGES, [{"text": "the cat", "label": 0.0}, {"text": "a dog .", "label": 2.0}])
    with pytest.raises(TndError) as error:
        age_rows()
    assert str(error.value) == (f'{AGES}: 2 of 2 labelled texts lack their token ids ("ids"; the file predates '
                                "them); rerun `dvc repro sample_ages`")


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


@pytest.mark.slow
def test_teacher_checkpoints_ages_and_the_age_reward_model(project, capsys):
    from stages import prepare_data, sample_ages, train_reward, train_teacher

    prepare_data.main([])
    train_teacher.main([])  # the default: no checkpoints, an index of none (the folder is a DVC out)
    assert [p.name for p in (project.path / TEACHER_AGES).iterdir()] == [AGE_INDEX]
    assert json.loads((project.path / TEACHER_AGES / AGE_INDEX).read_text()) == {"steps": []}

    project.write(**AGE)
    with pytest.raises(SystemExit):  # the texts are not sampled yet
        train_reward.main([])
    assert "run `dvc repro sample_ages`" in capsys.readouterr().err
    train_teacher.main([])
    kept = sorted(p.name for p in (project.path / TEACHER_AGES).glob("step-*"))
    assert kept == ["step-000001", "step-000004", "step-000016", "step-000064"]
    assert json.loads((project.path / TEACHER_AGES / AGE_INDEX).read_text()) == {"steps": [1, 4, 16, 64]}
    first, last = (_weights(project.path / TEACHER_AGES / name) for name in (kept[0], kept[-1]))
    assert not all(torch.equal(first[k], last[k]) for k in first)  # weights of different steps
    teacher = _weights(project.path / "models/teacher")  # validated only at its last step: kept as it ended
    assert all(torch.equal(teacher[k], last[k]) for k in teacher)

    sample_ages.main([])
    written = (project.path / AGES).read_bytes()
    rows = [json.loads(line) for line in written.decode().splitlines()]
    assert len(rows) == 4 * 60 and all(set(row) == {"text", "ids", "label"} and row["text"] for row in rows)
    from tnd.data.tokenizer import decode, load_tokenizer

    tokenizer = load_tokenizer(project.path / "artifacts/tokenizer")
    prompts = [json.loads(line)["prompt_ids"] for line in (project.path / "data/prepared/prompts.jsonl").open()]
    for i, row in enumerate(rows):  # the prompt's ids and the sampled ones as they are, no eos added
        prompt = prompts[i % 60 % len(prompts)]
        assert row["ids"][: len(prompt)] == prompt and len(row["ids"]) <= len(prompt) + 8
        assert decode(tokenizer, row["ids"]) == row["text"]
    assert not all(row["ids"][-1] == tokenizer.eos_token_id for row in rows)
    assert [row["label"] for row in rows] == [label for label in (0.0, 2.0, 4.0, 6.0) for _ in range(60)]  # log2
    sample_ages.main([])
    assert (project.path / AGES).read_bytes() == written  # seeded

    train_reward.main([])
    metrics = json.loads((project.path / "metrics/reward.json").read_text())
    labels = torch.tensor([row["label"] for row in rows])
    assert metrics["objective"] == "age" and (metrics["n_train"], metrics["n_eval"]) == (192, 24)  # + 24 validation
    # on held-out texts: well below the MSE of always predicting the mean age, and correlated
    assert metrics["mse"] < 0.8 * float(labels.var(unbiased=False)) and metrics["pearson"] > 0.5
    curve = (project.path / "plots/reward_validation.csv").read_text().splitlines()
    assert curve[0] == "step,train_loss,eval_loss,eval_pearson,best_step"
    held_out_mse = [float(line.split(",")[2]) for line in curve[1:]]
    assert held_out_mse[-1] < held_out_mse[0]
