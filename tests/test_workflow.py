"""The whole workflow a user drives: `dvc repro` of every stage, `dvc metrics show`, `dvc plots show`,
and the TnD ablation as `dvc exp run -S tnd.mode=...` experiments, each recorded in MLflow."""

from __future__ import annotations

import csv
import io
import json
import subprocess

import mlflow
import pytest
import yaml

from tests.conftest import dvc, init_git_dvc, tiny_params
from tests.test_train_ppo import PPO

pytestmark = pytest.mark.slow

STAGES = ("prepare_data", "train_teacher", "train_reward", "cache_teacher_logits", "score_rewards", "train_ppo",
          "evaluate", "health")


def test_repro_metrics_plots_and_the_mode_ablation_as_experiments(dvc_project):
    params = tiny_params(**PPO, eval={"n_prompts": 4, "max_new_tokens": 8},
                         tracking={"enabled": True, "experiment": "workflow"})
    (dvc_project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    init_git_dvc()

    log = dvc("repro")
    assert all(f"Running stage '{stage}'" in log for stage in STAGES), log
    assert "Running stage" not in dvc("repro")

    metrics = json.loads(dvc("metrics", "show", "--json"))
    workspace = next(iter(metrics.values()))["data"]
    eval_json = workspace["metrics/eval.json"]["data"]
    assert set(eval_json) == {"student", "initial_student", "teacher", "naoa", "practice"}
    assert {"fitted", "not_learned", "too_few_points"} <= set(eval_json["naoa"]["overall"])
    # a few-step run fits no word, so its mean nAoA is null in the file, which DVC leaves out of its table
    overall = json.loads((dvc_project / "metrics/eval.json").read_text())["naoa"]["overall"]
    assert {"t50", "t95"} <= set(overall) and (overall["t50"] is None) == (overall["fitted"] == 0)
    assert {"reward", "grammaticality", "perplexity", "kl_to_teacher", "distinct_2", "mean_length"} <= set(
        eval_json["student"])
    health_json = workspace["metrics/health.json"]["data"]  # the health checks, one true/false each
    assert isinstance(health_json["warnings"], int) and isinstance(health_json["reward_near_chance"], bool)

    dvc("plots", "show", "--out", "plots_html")
    html = (dvc_project / "plots_html/index.html").read_text()
    for plot in ("word_surprisal_by_category", "ppo_kl", "ppo_losses", "eval_grammaticality", "plots_train_csv",
                 "plots_eval_models_csv", "plots_eval_word_surprisal_csv", "plots_eval_word_curve_csv",
                 "teacher_validation", "reward_validation", "plots_teacher_validation_csv",
                 "plots_reward_validation_csv", "naoa_by_category", "plots_eval_naoa_csv", "plots_eval_naoa_words_csv"):
        assert f"vegaEmbed('#{plot}'" in html, plot  # every declared plot is rendered

    subprocess.run(["git", "add", "-A"], check=True)
    subprocess.run(["git", "commit", "-qm", "baseline"], check=True)
    for mode in ("trials_only", "demos_only"):
        log = dvc("exp", "run", "-n", mode, "-S", f"tnd.mode={mode}")
        assert "Running stage 'train_ppo'" in log and "Running stage 'prepare_data'" not in log
    # two processes, started by the stage itself under dvc (accelerate launch, DDP over gloo) and recorded
    log = dvc("exp", "run", "-n", "two-processes", "-S", "engine.processes=2")
    assert "Running stage 'train_ppo'" in log, log
    assert json.loads((dvc_project / "metrics/train.json").read_text())["processes"] == 2
    assert "Running stage" not in dvc("repro"), "the two-process run is recorded: nothing left to run"
    table = list(csv.DictReader(io.StringIO(dvc("exp", "show", "--csv"))))
    modes = {row["Experiment"]: row["tnd.mode"] for row in table if row["Experiment"]}
    # each experiment starts from the workspace the last one left (demos_only)
    assert modes == {"trials_only": "trials_only", "demos_only": "demos_only", "two-processes": "demos_only"}
    assert {row["engine.processes"] for row in table if row["Experiment"] == "two-processes"} == {"2"}
    assert any(column.endswith("warnings") for column in table[0])  # the health checks, side by side

    mlflow.set_tracking_uri(f"sqlite:///{dvc_project}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["workflow"], output_format="list")
    for mode in ("trials_only", "demos_only"):
        stages = sorted(r.data.tags["stage"] for r in runs if r.data.tags.get("dvc_exp") == mode)
        assert stages == ["evaluate", "health", "train_ppo"], (mode, stages)
        assert all(r.data.params["tnd.mode"] == mode for r in runs if r.data.tags.get("dvc_exp") == mode)
