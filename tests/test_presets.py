"""Presets: `preset: <name>` applies params/<name>.yaml beneath params.yaml's own changes (tnd.config.parse_params);
the shipped presets, the stderr note, bad names and bad preset files, and DVC rerunning every stage on a change."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.common import LAUNCHED, run_stage
from tests.conftest import ROOT, dvc, init_git_dvc, merge, repo_params
from tnd.config import load_params, parse_params
from tnd.errors import ParamsError
from tnd.trainers.lm import age_steps

PRESETS = sorted(path.stem for path in (ROOT / "params").glob("*.yaml"))
# The command line params/tnd_original.yaml carried before presets were a param (its "# DVC_ARGS:" line).
TND_ORIGINAL_DVC_ARGS = (
    "-S student.train.steps=0 -S tnd.demos_as=ppo -S tnd.demos_from=teacher -S tnd.score_offset=log2_step "
    "-S tnd.lm_on_rollout=true -S tnd.lm_steps_per_ppo_step=3 -S tnd.lm_data=corpus -S tnd.lm_batch_size=64 "
    "-S tnd.lm_learning_rate=1.0e-4 -S tnd.lm_warmup_steps=10 -S ppo.learning_rate=2.0e-5 -S ppo.optimizer_name=Adam "
    "-S ppo.ppo_epochs=1 -S ppo.gradient_accumulation_steps=4 -S ppo.top_k=20 -S ppo.top_p=0.95 "
    "-S ppo.init_kl_coef=0 -S ppo.adap_kl_ctrl=false -S ppo.use_score_scaling=false -S ppo.use_score_norm=false"
)
# What the preset has set since: the paper's age-predictor reward.
TND_ORIGINAL_AGE_ARGS = "-S teacher.train.age_checkpoints=12 -S reward.objective=age -S tnd.demo_score=10.55"


def project(tmp_path: Path, preset: str | None, **changes) -> Path:
    """A project directory: the repository's params/ and its params.yaml with `preset` and `changes`."""
    shutil.copytree(ROOT / "params", tmp_path / "params", dirs_exist_ok=True)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(merge(repo_params(), {"preset": preset, **changes}), sort_keys=False))
    return path


def with_dvc_args(raw: dict, args: str) -> dict:
    """`raw` as `dvc exp run <args>` leaves it: each -S key=value set, the value read as YAML."""
    words = args.split()
    assert words[::2] == ["-S"] * (len(words) // 2)
    for word in words[1::2]:
        key, value = word.split("=", 1)
        *sections, name = key.split(".")
        node = raw
        for section in sections:
            node = node[section]
        node[name] = yaml.safe_load(value)
    return raw


def error(path: Path) -> str:
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- the shipped presets ----------------------------------------------------------------------------


def test_params_yaml_holds_no_preset_and_the_schema_defaults():
    # A preset's keys win only where params.yaml keeps the schema's default: so params.yaml must keep them all.
    assert repo_params()["preset"] is None
    assert load_params(ROOT / "params.yaml").model_dump() == parse_params({}).model_dump()


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_applies_and_logs_its_name(tmp_path, name):
    params = load_params(project(tmp_path, name))
    assert params.preset == name and params.flat()["preset"] == name  # MLflow logs params.flat()
    assert params.fingerprint() != parse_params({}).fingerprint()


def test_tnd_original_gives_what_its_old_command_line_gave(tmp_path):
    old = parse_params(with_dvc_args(repo_params(), f"{TND_ORIGINAL_DVC_ARGS} {TND_ORIGINAL_AGE_ARGS}"))
    new = load_params(project(tmp_path, "tnd_original"))
    assert new.model_dump(exclude={"preset"}) == old.model_dump(exclude={"preset"})
    assert new.fingerprint() == old.fingerprint()  # one configuration, however it is written
    # with params.yaml's batch sizes, one optimizer step per PPO update (as the paper's 256 rows / 16 x 16)
    assert new.ppo.batch_size == new.ppo.mini_batch_size * new.ppo.gradient_accumulation_steps
    assert "DVC_ARGS" not in (ROOT / "params" / "tnd_original.yaml").read_text()


def test_tnd_original_rewards_the_age_the_teacher_checkpoints_teach(tmp_path):
    params = load_params(project(tmp_path, "tnd_original"))
    assert params.reward.objective == "age" and params.teacher.source == "builtin"
    assert params.tnd.score_offset == "log2_step"  # a trial scores its predicted age minus log2(step) ...
    assert params.tnd.demo_score == round(math.log2(params.teacher.train.steps), 2)  # ... a demonstration the teacher's
    assert age_steps(params.teacher.train.age_checkpoints, params.teacher.train.steps) == [
        1, 2, 4, 7, 14, 28, 54, 105, 204, 397, 772, 1500]


def test_gpu_small_is_gpt2_small_shaped_with_a_32k_vocabulary_and_256_positions(tmp_path):
    params = load_params(project(tmp_path, "gpu_small"))
    teacher, student = params.teacher.arch, params.student.arch
    assert (teacher.num_layers, teacher.hidden_size, teacher.num_heads, teacher.intermediate_size) == (12, 768, 12, 3072)
    assert (student.num_layers, student.hidden_size) == (6, 768)
    assert params.tokenizer.pad_vocab_to == 32000 and params.engine.mixed_precision == "bf16"
    for model in (params.teacher, params.student, params.reward):
        assert model.arch.max_position_embeddings == 256 and model.train.max_length == 256
    assert params.eval.max_length == 256
    prompt = params.data.prompt_tokens + 1  # bos
    for new_tokens in (params.teacher.eval.max_new_tokens, params.cache.max_new_tokens, params.ppo.max_new_tokens,
                       params.eval.max_new_tokens):
        assert 64 < prompt + new_tokens <= 256


# --- the layers and the note ------------------------------------------------------------------------


def test_a_changed_key_wins_over_the_preset_with_one_note(tmp_path, capsys):
    path = project(tmp_path, "tnd_original", ppo={"learning_rate": 1e-4, "ppo_epochs": 1})
    params = load_params(path)
    assert params.ppo.learning_rate == 1e-4  # params.yaml's change
    assert params.ppo.optimizer_name == "Adam" and params.tnd.demos_as == "ppo"  # the preset's
    lines = capsys.readouterr().err.splitlines()
    # ppo_epochs: 1 is the preset's value too: no conflict, no note
    assert lines == [f"note: {path} overrides preset tnd_original: ppo.learning_rate = 0.0001 (preset: 2e-05)"]
    load_params(path, quiet=True)
    load_params(project(tmp_path, "tnd_original"))
    assert capsys.readouterr().err == ""


def test_a_value_equal_to_the_default_reads_as_unchanged(tmp_path):
    # The documented limit: 3e-4 is ppo.learning_rate's default, so the preset's 2e-5 stays.
    assert load_params(project(tmp_path, "tnd_original", ppo={"learning_rate": 3e-4})).ppo.learning_rate == 2e-5


def test_a_stage_prints_the_note_once(tmp_path, monkeypatch, capsys):
    path = project(tmp_path, "tnd_original", ppo={"learning_rate": 1e-4}, tracking={"enabled": False})
    seen = []
    run_stage("probe", lambda params, run: seen.append(params.ppo.learning_rate), ["--params", str(path)])
    assert seen == [1e-4] and capsys.readouterr().err.count("overrides preset tnd_original") == 1
    for env in ({LAUNCHED: "1"}, {"RANK": "1"}):  # started again under accelerate launch; another process
        with monkeypatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            run_stage("probe", lambda params, run: seen.append(params.ppo.learning_rate), ["--params", str(path)])
        assert "overrides preset" not in capsys.readouterr().err
    assert seen == [1e-4] * 3


# --- mistakes: one line ---------------------------------------------------------------------------------


def test_an_unknown_preset_lists_the_presets(tmp_path):
    message = error(project(tmp_path, "tnd_orignal"))
    assert message.startswith(f'{tmp_path / "params.yaml"}: preset = "tnd_orignal" is not a preset; ')
    assert "did you mean 'tnd_original'?" in message and all(f"'{name}'" in message for name in PRESETS)
    assert "is not a preset" in error(project(tmp_path, "../params"))  # a name, never a path


def test_a_bad_preset_file_is_named(tmp_path):
    path = project(tmp_path, "mine")
    preset = tmp_path / "params" / "mine.yaml"
    preset.write_text("ppo:\n  learnng_rate: 1.0e-4\n")
    assert error(path) == f"{preset}: unknown key 'ppo.learnng_rate'; did you mean 'ppo.learning_rate'?"
    preset.write_text("ppo:\n  learning_rate: -1\n")
    assert error(path).startswith(f"{preset}: ppo.learning_rate = -1 is invalid")
    preset.write_text("preset: tnd_original\n")
    assert error(path).startswith(f"{preset}: unknown key 'preset'")
    preset.write_text("- ppo\n")
    assert error(path).startswith(f"{preset}: a preset is a mapping")
    preset.write_text("ppo: [1, 2\n")
    assert error(path).startswith(f"{preset}: not valid YAML")


def test_a_mix_valid_apart_but_not_together_names_both_files(tmp_path):
    # the preset's gradient_accumulation_steps 4 against params.yaml's batch of 4 in mini-batches of 2
    path = project(tmp_path, "tnd_original", ppo={"batch_size": 4, "mini_batch_size": 2})
    assert error(path).startswith(f"{path} + {tmp_path / 'params' / 'tnd_original.yaml'}: ppo: batch_size (4)")


def test_a_stage_given_an_unknown_preset_exits_2_with_one_line(tmp_path):
    path = project(tmp_path, "nope")
    result = subprocess.run([sys.executable, "-m", "stages.prepare_data", "--params", str(path)], capture_output=True,
                            text=True, cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f'error: {path}: preset = "nope" is not a preset; allowed: null or '
                                                  f"one of {', '.join(map(repr, PRESETS))}"]


# --- DVC ---------------------------------------------------------------------------------------------------


def test_every_stage_reruns_when_the_preset_or_a_preset_file_changes():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert [name for name, stage in stages.items() if "preset" not in stage["params"] or "params" not in stage["deps"]] == []
    # the stages that build a model read the vocabulary's padding (a new value leaves artifacts/tokenizer as it is)
    assert [name for name, stage in stages.items() if "tokenizer.pad_vocab_to" in stage["params"]
            or "tokenizer" in stage["params"]] == ["prepare_data", "train_teacher", "train_ppo"]


@pytest.mark.slow
def test_dvc_sees_a_new_preset_and_an_edited_preset_file(dvc_project):
    init_git_dvc()
    dvc("repro", "prepare_data")
    params = dvc_project / "params.yaml"
    clean = params.read_text()
    params.write_text(clean.replace("preset: null", "preset: tnd_original"))
    assert "modified:           preset" in dvc("status", "prepare_data")
    params.write_text(clean)
    assert "up to date" in dvc("status", "prepare_data")
    with open(dvc_project / "params" / "gpu_small.yaml", "a") as preset:  # not even the preset in use
        preset.write("# edited\n")
    assert "modified:           params" in dvc("status", "prepare_data")
