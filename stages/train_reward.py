"""Stage train_reward: build (or load) the reward model and train it.

pairwise (default): Bradley-Terry on data/prepared/pairs_train.jsonl, evaluated on
pairs_eval.jsonl (every corruption kind, so a kind left out of data.pair_corruptions
is a held-out test). regression: MSE to reward.label_field of the labelled texts in
data.source (a local .jsonl/.csv). age (the TnD paper's age predictor): the same regression on
data/ages/labelled.jsonl, samples of the teacher's checkpoints labelled log2(step) by stage
sample_ages, trained on their token ids as PPO scores them (`RewardTrainer._sequences`). Labelled
texts are split three ways (`split_labelled`): validation and test rows apart, every other row
trains. On nursery data the model is also checked on fresh sentences, each corrupted with every kind.

While it trains, the built-in model is validated every reward.train.eval_every steps on the
first reward.train.eval_size validation rows (eval pairs, or the labelled validation rows), stops
after reward.train.patience validations without a lower held-out loss, and ends on the weights
of its best validation (reward.train.keep_best). It trains on the accelerator, with the mixed
precision and in the processes of the `engine` params (as train_teacher and train_ppo).

Writes models/reward/ (save_pretrained, with the tokenizer), metrics/reward.json and
plots/reward_validation.csv (the validation curve, also logged to MLflow per step).
"""

from __future__ import annotations

import random
from pathlib import Path

from tnd.config import CORRUPTION_KINDS, Params
from tnd.data import nursery
from tnd.data.sources import load_labelled_texts
from tnd.data.tokenizer import load_tokenizer
from tnd.engine import make_accelerator
from tnd.errors import TndError
from tnd.io import atomic_write_csv, atomic_write_json, read_jsonl
from tnd.models import save_model
from tnd.numbers import finite
from tnd.tracking import Tracker
from tnd.reward import build_reward_model, load_reward_model
from tnd.trainers.reward import RewardTrainer, corruption_separation

from stages.common import (
    AGES, METRICS, PLOTS, PREPARED, REWARD, TOKENIZER, run_stage, validation_logger, validation_summary,
)

N_FRESH = 500
FRESH_SEED_OFFSET = 10_000


def split_labelled(rows: list[dict], params: Params) -> tuple[list[dict], list[dict], list[dict]]:
    """Labelled texts (regression, age), shuffled with params.seed, as (train, validation, test), disjoint.

    The test rows, min(data.n_eval, a tenth), are what metrics/reward.json reports; the validation
    rows, min(reward.train.eval_size, a tenth; none below 10 texts or when reward.train.eval_every is 0),
    pick the early stop and the weights kept, so the reported figures are of rows that chose nothing.
    Every other row trains: data.n_train caps the text corpus, not these, whose number is chosen where
    they are made (reward.age.n_samples_per_checkpoint x the checkpoints, or the rows of data.source)."""
    rows = list(rows)
    random.Random(params.seed).shuffle(rows)
    n_test = min(params.data.n_eval, max(1, len(rows) // 10))
    train = params.reward.train
    n_valid = min(train.eval_size, len(rows) // 10) if train.eval_every else 0
    return rows[n_test + n_valid :], rows[n_test : n_test + n_valid], rows[:n_test]


def age_rows() -> list[dict]:
    """reward.objective: age -- the samples sample_ages labelled with their age, each with its token ids
    ("ids": prompt + continuation as sampled), which the age model trains on as PPO scores a trial."""
    rows = read_jsonl(AGES) if Path(AGES).is_file() else []
    if len(rows) < 2:
        raise TndError(f"{AGES}: {len(rows)} labelled text(s), the age reward needs texts of several ages; "
                       "run `dvc repro sample_ages`")
    without = sum("ids" not in row for row in rows)
    if without:
        raise TndError(f"{AGES}: {without} of {len(rows)} labelled texts lack their token ids (\"ids\"; the file "
                       "predates them); rerun `dvc repro sample_ages`")
    return rows


def train_reward(params: Params, run: Tracker) -> None:
    cfg = params.reward
    tokenizer = load_tokenizer(TOKENIZER)
    if cfg.objective == "pairwise":
        train_rows = read_jsonl(Path(PREPARED) / "pairs_train.jsonl")
        eval_rows = read_jsonl(Path(PREPARED) / "pairs_eval.jsonl")  # the reported figures
        valid_rows = read_jsonl(Path(PREPARED) / "pairs_valid.jsonl")  # early stopping and keep_best
    else:
        labelled = age_rows() if cfg.objective == "age" else load_labelled_texts(
            params.data.source, params.data.text_field, cfg.label_field)
        train_rows, valid_rows, eval_rows = split_labelled(labelled, params)

    if cfg.source == "builtin":
        model = build_reward_model(cfg.arch, tokenizer, params.seed)
    else:
        model = load_reward_model(cfg.source, tokenizer)
    accelerator = make_accelerator(params.engine.mixed_precision)
    trainer = RewardTrainer(model, tokenizer, cfg, params.seed)
    metrics: dict = {"objective": cfg.objective, "n_train": len(train_rows)}
    curve: list[dict] = []
    metrics.update(trainer.train(train_rows, on_log=run.log_metrics, eval_rows=valid_rows,
                                 on_eval=validation_logger(run, curve), accelerator=accelerator))
    if not accelerator.is_main_process:  # the others helped train; process 0 evaluates and writes
        return
    metrics.update(trainer.evaluate(eval_rows))
    metrics["n_parameters"] = sum(p.numel() for p in model.parameters())

    if params.data.source == "nursery":
        # Sentences the training never saw as such, each corrupted with every kind.
        fresh = nursery.generate_sentences(N_FRESH, params.seed + FRESH_SEED_OFFSET)
        seen = {row["chosen"] for row in train_rows} if cfg.objective == "pairwise" else set()
        metrics["fresh_seen_in_train"] = sum(s in seen for s in fresh) / max(len(fresh), 1)
        metrics.update(
            corruption_separation(
                model,
                tokenizer,
                fresh,
                CORRUPTION_KINDS,
                nursery.corrupt,
                params.seed + FRESH_SEED_OFFSET,
                max_length=cfg.train.max_length,
            )
        )
        held_out = [kind for kind in CORRUPTION_KINDS if kind not in params.data.pair_corruptions]
        metrics["held_out_kinds"] = ",".join(held_out) if cfg.objective == "pairwise" else ""

    # NaN is not JSON (dvc metrics would choke): an undefined figure is written as null.
    metrics = {k: finite(v) if isinstance(v, float) else v for k, v in metrics.items()}
    save_model(model, tokenizer, REWARD)
    atomic_write_json(Path(METRICS) / "reward.json", metrics)
    held_out = "eval_accuracy" if cfg.objective == "pairwise" else "eval_pearson"
    atomic_write_csv(Path(PLOTS) / "reward_validation.csv", curve,
                     ("step", "train_loss", "eval_loss", held_out, "best_step"))
    run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    run.log_model(REWARD, "reward", task="text-classification")
    shown = ("pairwise_accuracy", "fresh_accuracy", "fresh_accuracy_duplicate_word", "mse", "pearson")
    summary = ", ".join(f"{k} {metrics[k]:.3f}" for k in shown if metrics.get(k) is not None)
    print(f"train_reward: {summary}{validation_summary(metrics)}")


def main(argv: list[str] | None = None) -> None:
    run_stage("train_reward", train_reward, argv, multi_process=True)


if __name__ == "__main__":
    main()
