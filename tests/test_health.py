"""Health checks (tnd/health.py) and the health stage: each check stays quiet on the default nursery run
and fires on a case built to trigger it; health.strict fails the stage cleanly."""

from __future__ import annotations

import copy
import csv
import io
import json
import typing

import pytest
import yaml

from tests.conftest import merge, repo_params
from tests.real_text import sentences
from tnd import health
from tnd.config import HealthParams, Params, parse_params
from tnd.io import atomic_write_json, atomic_write_text

# What the default pipeline wrote on nursery data (every stage of params.yaml, seed 1234, CPU, with this
# change): the figures the checks read. train.csv: its first and last 10 rows (the windows compared).
NURSERY = {
    "stats": {"n_train": 20000, "n_eval": 1000, "n_prompts": 2000, "n_pairs_train": 20000, "n_pairs_eval": 1000},
    "reward": {"objective": "pairwise", "pairwise_accuracy": 0.961, "train_accuracy": 1.0, "n_eval_pairs": 1000},
    "eval": {
        "student": {"reward": 6.1151, "perplexity": 16.6177, "kl_to_teacher": 0.1721, "distinct_2": 0.839},
        "initial_student": {"reward": -1.6324, "perplexity": 18.4599, "kl_to_teacher": 0.2798, "distinct_2": 0.875},
        "teacher": {"reward": 8.8759, "perplexity": 14.0574, "kl_to_teacher": 0.0, "distinct_2": 0.8162},
    },
    # step, env/reward_mean, tokens/response_length, objective/kl
    "train": [(1, -1.25, 5.5, 4.47), (2, -3.76, 6.56, 6.51), (3, -0.42, 6.34, 5.34), (4, -5.95, 5.47, 5.79),
              (5, 1.69, 5.28, 2.75), (6, 0.95, 5.31, 3.6), (7, -2.02, 6.62, 5.16), (8, 0.69, 5.41, 3.8),
              (9, 3.65, 5.69, 2.99), (10, 0.8, 6.22, 3.7), (91, 7.99, 6.16, 1.16), (92, 8.32, 4.84, 0.52),
              (93, 5.33, 5.88, 1.63), (94, 7.34, 5.69, 0.72), (95, 5.11, 5.34, 0.8), (96, 7.45, 5.28, 0.67),
              (97, 10.29, 6.16, 0.7), (98, 7.41, 5.41, 0.45), (99, 7.19, 6.19, 1.13), (100, 6.84, 5.72, 1.67)],
}
COLUMNS = ("step", "env/reward_mean", "tokens/response_length", "objective/kl")


def rows(table) -> list[dict]:
    return [dict(zip(COLUMNS, map(str, row))) for row in table]  # as csv.DictReader reads plots/train.csv


def checks(case: dict, params: Params | None = None) -> dict[str, bool | None]:
    found = health.run_checks(params or Params(), case["stats"], case["reward"], case["eval"], rows(case["train"]))
    return {c.name: c.warn for c in found}


def test_every_check_is_quiet_on_the_default_nursery_run():
    assert checks(NURSERY) == {name: False for name in health.CHECKS}


def test_the_ignore_param_names_exactly_the_checks():
    ignore = typing.get_args(HealthParams.model_fields["ignore"].annotation)[0]
    assert typing.get_args(ignore) == health.CHECKS
    with pytest.raises(Exception, match="health.ignore"):
        parse_params({"health": {"ignore": ["reward_hacking"]}})


def _scaled(table, column: int, factor: float, last: bool = True):
    return [tuple(v * factor if i == column and (row[0] > 10) == last else v for i, v in enumerate(row))
            for row in table]


def _trigger(name: str) -> tuple[dict, Params]:
    case, params = copy.deepcopy(NURSERY), Params()
    if name == "small_data":  # 3000 texts: the teacher's 1500 x 64 is 32 passes; enough for the 2000 prompts
        case["stats"]["n_train"] = 3000
    elif name == "prompts_repeated":
        params = Params(data={"n_eval_prompts": 1500})
    elif name == "teacher_not_better_than_student":
        case["eval"]["teacher"]["perplexity"] = 25.0
    elif name == "reward_near_chance":
        case["reward"]["pairwise_accuracy"] = 0.57
    elif name == "student_kl_worse":
        case["eval"]["student"]["kl_to_teacher"] = 0.31  # initial 0.28
    elif name == "student_perplexity_worse":
        case["eval"]["student"]["perplexity"] = 20.4  # initial 18.46
    elif name == "reward_hacking_length":  # responses fell from ~5.8 to ~2.3 tokens while the reward rose
        case["train"] = _scaled(case["train"], 2, 0.4)
    elif name == "reward_hacking_diversity":
        case["eval"]["student"]["distinct_2"] = 0.6
    elif name == "kl_blowup":  # ppo.kl_target is 6: the KL ended at ~19 nats
        case["train"] = _scaled(case["train"], 3, 20.0)
    return case, params


@pytest.mark.parametrize("name", health.CHECKS)
def test_each_check_fires_alone_on_a_case_built_for_it(name):
    case, params = _trigger(name)
    found = health.run_checks(params, case["stats"], case["reward"], case["eval"], rows(case["train"]))
    assert {c.name for c in found if c.warn} == {name}
    fired = next(c for c in found if c.name == name)
    assert "\n" not in fired.message and len(fired.message) > 60  # one line that says what to do


def test_hacking_needs_the_reward_to_rise():
    case = copy.deepcopy(NURSERY)
    case["train"] = _scaled(_scaled(case["train"], 2, 0.4), 1, -1.0)  # shorter, but the reward fell
    case["eval"]["student"].update(distinct_2=0.6, reward=-3.0)
    fired = {name for name, warn in checks(case).items() if warn}
    assert not {"reward_hacking_length", "reward_hacking_diversity"} & fired


def test_checks_without_their_inputs_are_not_applicable():
    found = {c.name: c for c in health.run_checks(Params())}
    assert all(c.warn is None and c.message.startswith("not checked") for c in found.values())
    # demos_only: no trials, so no trial reward, length or KL in plots/train.csv
    no_trials = [{"step": "1", "env/reward_mean": "", "tokens/response_length": "", "objective/kl": ""}] * 3
    case = checks({**NURSERY, "train": []})
    assert case["kl_blowup"] is None and case["reward_hacking_length"] is None
    found = {c.name: c.warn for c in health.run_checks(Params(), train_rows=no_trials)}
    assert found["kl_blowup"] is None and found["reward_hacking_length"] is None


def test_a_regression_reward_model_is_judged_by_its_correlation():
    params = Params(reward={"objective": "regression"})
    assert health.reward_near_chance(params, {"pearson": 0.05}).warn is True
    assert health.reward_near_chance(params, {"pearson": 0.6}).warn is False
    assert "more labelled texts" in health.reward_near_chance(params, {"pearson": 0.05}).message


@pytest.mark.parametrize("tnd", [{"mode": "demos_only"}, {"mode": "lm_on_rollout"},
                                 {"mode": "trials_only", "trial_reward": "teacher"}])
def test_a_reward_model_that_does_not_steer_ppo_is_not_warned_about(tnd):
    params = Params(tnd=tnd)
    check = health.reward_near_chance(params, {"pairwise_accuracy": 0.5})
    assert check.warn is False and "only monitors" in check.message
    steering = health.reward_near_chance(Params(tnd={"mode": "trials_only", "trial_reward": "both"}),
                                         {"pairwise_accuracy": 0.5})
    assert steering.warn is True and "tnd.trial_reward: teacher" in steering.message


def test_an_age_reward_near_chance_is_told_to_sample_more_checkpoints():
    params = parse_params({"preset": "tnd_original"}, quiet=True)  # reward.objective: age
    check = health.reward_near_chance(params, {"pearson": 0.05})
    assert check.warn is True and "reward.age.n_samples_per_checkpoint" in check.message


# --- on a small real corpus ------------------------------------------------------------------------


@pytest.mark.slow
def test_a_small_real_corpus_with_the_default_params_is_flagged(project):
    """prepare_data on 600 real sentences with the default sizes: the data checks fire, from the stage's
    own stats.json."""
    from stages import prepare_data
    from tnd.config import load_params

    (project.path / "texts.txt").write_text("\n".join(sentences(600)) + "\n")
    write_params(project.path, data={"source": "texts.txt"})
    prepare_data.main([])
    stats = json.loads((project.path / "data/prepared/stats.json").read_text())
    assert stats["n_train"] == 480 and stats["n_valid"] == stats["n_eval"] == 60  # a tenth each held out
    found = {c.name: c for c in health.run_checks(load_params(project.path / "params.yaml"), stats)}
    assert found["prompts_repeated"].warn and "data.n_prompts = 2000 from 480 training texts" in found[
        "prompts_repeated"].message
    assert found["small_data"].warn and "teacher 1500 steps x 64 = 200 passes over 480 texts" in found[
        "small_data"].message


# --- the stage ----------------------------------------------------------------------------------------


def write_inputs(path, case: dict) -> None:
    atomic_write_json(path / "data/prepared/stats.json", case["stats"])
    atomic_write_json(path / "metrics/reward.json", case["reward"])
    atomic_write_json(path / "metrics/eval.json", case["eval"])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(case["train"])
    atomic_write_text(path / "plots/train.csv", out.getvalue())


def write_params(path, **overrides) -> None:
    """The repository's params.yaml (the default sizes the NURSERY figures come from), tracking off."""
    params = merge(repo_params(), {"tracking": {"enabled": False}, **overrides})
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_health_stage_quiet_warns_and_strict_fails_cleanly(project, capsys):
    from stages import health as stage

    case = copy.deepcopy(NURSERY)
    write_params(project.path)
    write_inputs(project.path, case)
    stage.main([])
    report = json.loads((project.path / "metrics/health.json").read_text())
    assert report["warnings"] == 0 and report["messages"] == [] and report["reward_near_chance"] is False
    assert "warning:" not in capsys.readouterr().err

    case["reward"]["pairwise_accuracy"] = 0.55
    case["eval"]["teacher"]["perplexity"] = 30.0
    write_inputs(project.path, case)
    stage.main([])  # warnings only: the stage succeeds
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("warning: health:")]
    assert [line.split(":")[2].strip() for line in lines] == ["teacher_not_better_than_student", "reward_near_chance"]
    report = json.loads((project.path / "metrics/health.json").read_text())
    assert report["warnings"] == 2 and report["teacher_not_better_than_student"] is True
    assert len(report["messages"]) == 2

    write_params(project.path, health={"strict": True})
    (project.path / "metrics/health.json").unlink()
    with pytest.raises(SystemExit) as exit_info:
        stage.main([])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("warning: health:") == 2
    error = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "health.strict" in error[0] and "reward_near_chance" in error[0]
    assert json.loads((project.path / "metrics/health.json").read_text())["warnings"] == 2  # written first

    write_params(project.path, health={"strict": True, "ignore": ["teacher_not_better_than_student",
                                                                  "reward_near_chance"]})
    stage.main([])
    report = json.loads((project.path / "metrics/health.json").read_text())
    assert report["warnings"] == 0 and report["reward_near_chance"] is True and len(report["ignored"]) == 2
    assert "warning:" not in capsys.readouterr().err
