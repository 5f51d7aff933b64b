"""Stage train_ppo on tiny params: outputs, bit-exact resume, refused checkpoints, the paper preset."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT, merge, tiny_params
from tnd.data import nursery
from tnd.trainers import CustomPPOTrainer

PRESET = ROOT / "params" / "tnd_original.yaml"
PPO = {
    "cache": {"n_prompts": 16, "max_new_tokens": 8, "batch_size": 16},
    "ppo": {"steps": 4, "batch_size": 4, "mini_batch_size": 2, "save_every": 2, "max_new_tokens": 8, "ppo_epochs": 2},
    "tnd": {"demo_batch_size": 4},
}
UPSTREAM = ("data", "artifacts", "models", "cache", "metrics")
TIMING = {"total_seconds", "tokens_per_second"}


# --- end to end -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """prepare_data .. score_rewards run once on tiny params; each test copies the results."""
    from stages import cache_teacher_logits, prepare_data, score_rewards, train_reward, train_teacher

    path = tmp_path_factory.mktemp("upstream")
    (path / "params.yaml").write_text(yaml.safe_dump(tiny_params(**PPO), sort_keys=False))
    cwd = os.getcwd()
    os.chdir(path)
    try:
        for stage in (prepare_data, train_teacher, train_reward, cache_teacher_logits, score_rewards):
            stage.main([])
    finally:
        os.chdir(cwd)
    return path


@pytest.fixture
def ready(project, upstream):
    for name in UPSTREAM:
        shutil.copytree(upstream / name, project.path / name)
    project.write(**PPO)
    return project


def run_stage() -> None:
    from stages import train_ppo

    train_ppo.main([])


def refused(capsys) -> str:
    from stages import train_ppo

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        train_ppo.main([])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    message = err[err.index("error: "):]
    assert message.count("\n") == 1, message  # one line, and nothing after it
    return message.strip()


class Crash(Exception):
    pass


def crash_after(monkeypatch, step: int) -> None:
    """Run the stage and die right after trainer step `step` (the checkpoint of an earlier step is on disk)."""
    original = CustomPPOTrainer.step

    def step_then_crash(self, prompts):
        stats = original(self, prompts)
        if self.global_step == step:
            raise Crash(f"simulated crash after step {step}")
        return stats

    with monkeypatch.context() as patch:
        patch.setattr(CustomPPOTrainer, "step", step_then_crash)
        with pytest.raises(Crash):
            run_stage()


def outputs(path: Path) -> dict:
    """Everything the stage writes, minus wall-clock figures."""
    train = json.loads((path / "metrics/train.json").read_text())
    with open(path / "plots/train.csv", newline="") as handle:
        rows = [{k: v for k, v in row.items() if k != "time/step"} for row in csv.DictReader(handle)]
    return {
        "train": {k: v for k, v in train.items() if k not in TIMING},
        "csv": rows,
        "trial_words": (path / "plots/train_trial_words.csv").read_text(),
        "student": (path / "models/student/model.safetensors").read_bytes(),
        "initial": (path / "models/initial_student/model.safetensors").read_bytes(),
    }


def clear_outputs(path: Path) -> None:
    for name in ("models/student", "models/initial_student", "checkpoints", "plots", "metrics/train.json"):
        target = path / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)


@pytest.mark.slow
def test_stage_writes_every_output_and_a_finished_checkpoint_is_not_resumed(ready):
    run_stage()
    p = ready.path
    for name in ("models/student/model.safetensors", "models/initial_student/model.safetensors",
                 "models/student/tokenizer.json", "checkpoints/ppo/latest.json", "checkpoints/ppo/step-000004/run.pt"):
        assert (p / name).is_file(), name
    train = json.loads((p / "metrics/train.json").read_text())
    assert train["steps"] == 4
    for part in ("first", "final", "last10"):
        for key in ("reward", "kl", "kl_coef", "loss_total", "loss_policy", "loss_value", "loss_distill"):
            assert math.isfinite(train[part][key]), (part, key)
    assert train["total_seconds"] > 0 and train["tokens_per_second"] > 0
    rows = list(csv.DictReader(open(p / "plots/train.csv", newline="")))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    assert "env/reward_mean" in rows[0] and "loss/distill" in rows[0]
    practised = list(csv.DictReader(open(p / "plots/train_trial_words.csv", newline="")))
    assert practised and all(r["word"] in nursery.CONTENT_WORDS and int(r["trained_count"]) > 0 for r in practised)
    assert [int(r["trained_count"]) for r in practised] == sorted((int(r["trained_count"]) for r in practised), reverse=True)
    # The checkpoint of a finished run is no resume point: other params start afresh.
    ready.write(**merge(PPO, {"ppo": {"learning_rate": 3e-4, "steps": 2}}))
    run_stage()
    assert json.loads((p / "metrics/train.json").read_text())["steps"] == 2


@pytest.mark.slow
def test_a_crashed_run_resumes_bit_exactly(ready, monkeypatch, capsys):
    run_stage()
    uninterrupted = outputs(ready.path)
    clear_outputs(ready.path)

    crash_after(monkeypatch, 3)  # the step-2 checkpoint is on disk, step 3 is lost
    assert json.loads((ready.path / "checkpoints/ppo/latest.json").read_text())["dir"] == "step-000002"
    assert not (ready.path / "models/student").exists()
    shutil.rmtree(ready.path / "models/initial_student")  # as `dvc repro` removes outs before a rerun
    capsys.readouterr()
    run_stage()
    assert "resuming from checkpoints/ppo/step-000002 at step 2 of 4" in capsys.readouterr().out
    assert outputs(ready.path) == uninterrupted


@pytest.mark.slow
def test_an_unfinished_checkpoint_from_other_params_is_refused(ready, monkeypatch, capsys):
    crash_after(monkeypatch, 3)
    ready.write(**merge(PPO, {"ppo": {"learning_rate": 1e-5}}))
    err = refused(capsys)
    assert "checkpoints/ppo/step-000002" in err and "different training params" in err and "rm -r checkpoints/ppo" in err
    # Tracking and evaluation settings do not affect training: the run resumes.
    ready.write(**merge(PPO, {"eval": {"n_prompts": 3}}))
    run_stage()
    assert json.loads((ready.path / "metrics/train.json").read_text())["steps"] == 4


@pytest.mark.slow
def test_a_corrupted_checkpoint_is_refused(ready, monkeypatch, capsys):
    crash_after(monkeypatch, 3)
    for part in ("model.safetensors", "optimizer.bin"):  # the trainer's part, read by accelerate
        state = ready.path / "checkpoints/ppo/step-000002" / part
        whole = state.read_bytes()
        state.write_bytes(whole[: len(whole) // 2])
        err = refused(capsys)
        assert "checkpoints/ppo/step-000002: the trainer's checkpoint cannot be read" in err and "corrupted" in err
        state.write_bytes(whole)
    state = ready.path / "checkpoints/ppo/step-000002/run.pt"  # the stage's part
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    err = refused(capsys)
    assert "checkpoints/ppo/latest.json: the checkpoint it names cannot be read" in err and "corrupted" in err
    (ready.path / "checkpoints/ppo/latest.json").write_text("{")
    assert "checkpoints/ppo/latest.json: the checkpoint it names cannot be read" in refused(capsys)


@pytest.mark.slow
def test_missing_inputs_name_the_stage_to_run(ready, capsys):
    (ready.path / "metrics/rewards.json").unlink()
    assert "metrics/rewards.json: cannot be read" in (err := refused(capsys)) and "dvc repro score_rewards" in err
    shutil.rmtree(ready.path / "cache/teacher")
    assert "dvc repro cache_teacher_logits" in refused(capsys)


@pytest.mark.slow
def test_the_paper_preset_runs(ready):
    preset = yaml.safe_load(PRESET.read_text())
    # one optimizer step per PPO update, as the preset makes it for params.yaml's batch sizes
    steps = PPO["ppo"]["batch_size"] // PPO["ppo"]["mini_batch_size"]
    ready.write(**merge(merge(PPO, preset), {"ppo": {"steps": 1, "gradient_accumulation_steps": steps}}))
    run_stage()
    rows = list(csv.DictReader(open(ready.path / "plots/train.csv", newline="")))
    assert len(rows) == 1
    assert float(rows[0]["objective/kl_coef"]) == 0.0
    assert math.isfinite(float(rows[0]["loss/lm"])) and math.isfinite(float(rows[0]["loss/lm_rollout"]))
    assert rows[0]["loss/distill"] == ""  # demonstrations go through PPO, not the KL loss


@pytest.mark.slow
def test_disk_full_while_checkpointing_keeps_the_last_checkpoint_and_resumes(ready, monkeypatch, capsys):
    from tnd import checkpoint

    run_stage()
    uninterrupted = outputs(ready.path)
    clear_outputs(ready.path)

    real_write, calls = checkpoint.atomic_write_bytes, []

    def second_write_hits_a_full_disk(path, data):
        if Path(path).name == "run.pt":
            calls.append(path)
        with monkeypatch.context() as patch:
            if len(calls) == 2:  # the step-4 checkpoint; the step-2 one is on disk
                patch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
            real_write(path, data)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "atomic_write_bytes", second_write_hits_a_full_disk)
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            run_stage()
    assert exc.value.code == 3
    err = capsys.readouterr().err
    message = err[err.index("error: "):]
    assert message.count("\n") == 1 and "No space left on device" in message, message
    assert sorted(p.name for p in (ready.path / "checkpoints/ppo").iterdir()) == [
        "latest.json", "step-000002", "students"]  # no temp, no half-written step-000004
    assert checkpoint.read_checkpoint(ready.path / "checkpoints/ppo")["meta"]["step"] == 2

    run_stage()  # space freed: resumes from step 2 and ends as if nothing happened
    assert outputs(ready.path) == uninterrupted


@pytest.mark.slow
def test_prompts_plus_samples_longer_than_the_context_are_refused(ready, capsys):
    ready.write(**merge(PPO, {"ppo": {"max_new_tokens": 100}}))
    err = refused(capsys)
    assert "max_position_embeddings (64)" in err and "lower ppo.max_new_tokens" in err


@pytest.mark.slow
def test_a_student_with_a_smaller_vocabulary_is_refused(ready, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(ready.path / "small_student")
    ready.write(**merge(PPO, {"student": {"source": str(ready.path / "small_student")}}))
    assert "student: model vocabulary (100) is smaller than the tokenizer's" in refused(capsys)


@pytest.mark.slow
def test_an_unfinished_checkpoint_against_another_reward_model_is_refused(ready, monkeypatch, capsys):
    from tnd.data.tokenizer import load_tokenizer
    from tnd.models import save_model
    from tnd.reward import load_reward_model

    crash_after(monkeypatch, 3)
    tokenizer = load_tokenizer(ready.path / "artifacts/tokenizer")
    reward = load_reward_model(ready.path / "models/reward", tokenizer)
    with torch.no_grad():
        next(reward.parameters()).add_(0.01)  # e.g. the reward model was retrained meanwhile
    save_model(reward, tokenizer, ready.path / "models/reward")
    err = refused(capsys)
    assert "was trained against a different reward" in err and "rm -r checkpoints/ppo" in err


@pytest.mark.slow
def test_the_docs_library_example_runs(ready, capsys):
    run_stage()  # the example loads models/initial_student, which train_ppo writes
    capsys.readouterr()
    page = (ROOT / "docs" / "trainer.md").read_text()
    code = re.search(r"## As a library\n\n```python\n(.*?)```", page, re.S).group(1)
    exec(compile(code.replace("steps=10", "steps=2"), "docs/trainer.md", "exec"), {})
    printed = capsys.readouterr().out.split()
    assert printed[0::2] == ["1", "2"] and all(math.isfinite(float(r)) for r in printed[1::2])


@pytest.mark.slow
def test_the_student_warm_up_is_validated_on_the_validation_split(ready, monkeypatch):
    # Finding 4c: the warm-up's early stopping and keep_best read eval.jsonl, the split evaluate reports on.
    from stages import train_ppo
    from tnd.io import read_jsonl

    seen = {}

    def warm_up(model, tokenizer, texts, cfg, seed, eval_texts=None, **kwargs):
        seen["eval_texts"] = list(eval_texts)
        raise Crash("stop after the warm-up's inputs")

    monkeypatch.setattr(train_ppo, "pretrain_lm", warm_up)
    with pytest.raises(Crash):
        run_stage()
    prepared = ready.path / "data/prepared"
    valid = [row["text"] for row in read_jsonl(prepared / "valid.jsonl")]
    assert seen["eval_texts"] == valid
    assert not set(valid) & {row["text"] for row in read_jsonl(prepared / "eval.jsonl")}
