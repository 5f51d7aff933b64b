"""Stage train_teacher: build and pretrain the built-in teacher, or load one by name/path.

Writes models/teacher/ (save_pretrained, with the tokenizer), metrics/teacher.json
(perplexity on the eval split, and on nursery data the grammaticality of sampled continuations of
the eval prompts; the validation's best step, steps run, early stop) and plots/teacher_validation.csv
(the validation curve: train and held-out loss every teacher.train.eval_every steps, also logged
to MLflow per step). The built-in teacher is validated on the validation split (valid.jsonl, disjoint
from the eval split it is reported on) while it trains, stops after teacher.train.patience validations
without improvement, and is saved with the weights of its best validation (teacher.train.keep_best).

With teacher.train.age_checkpoints (reward.objective: age), the built-in teacher's weights at
log-spaced steps of its pretraining (`tnd.trainers.lm.age_steps`) and at the step it ends on are
kept in models/teacher_ages/step-NNNNNN/ for stage sample_ages, listed in models/teacher_ages/steps.json
(written also when none are kept: the folder is a DVC out); the folder is replaced whole when training ends.

It trains on the accelerator and with the mixed precision of the `engine` params, in
engine.processes processes (the stage starts itself under `accelerate launch`, as train_ppo).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Optional

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tnd.config import Params, TeacherTrainParams
from tnd.data.tokenizer import load_tokenizer
from tnd.engine import make_accelerator
from tnd.errors import TndError
from tnd.evaluation import grammaticality, sample_rows
from tnd.io import atomic_dir, atomic_write_csv, atomic_write_json, read_jsonl
from tnd.models import build_causal_lm, load_causal_lm, save_model
from tnd.trainers.lm import age_steps, perplexity, pretrain_lm
from tnd.tracking import Tracker

from stages.common import (
    AGE_INDEX, METRICS, PLOTS, PREPARED, TEACHER, TEACHER_AGES, TOKENIZER, age_checkpoint_path, run_stage,
    validation_logger, validation_summary,
)

CURVE_COLUMNS = ("step", "train_loss", "eval_loss", "eval_perplexity", "best_step")
SAMPLE_COLUMNS = ("prompt", "text", "length", "ended")  # the logged samples: text, not token ids


def train_teacher(params: Params, run: Tracker) -> None:
    cfg = params.teacher
    tokenizer = load_tokenizer(TOKENIZER)
    train_texts = [row["text"] for row in read_jsonl(Path(PREPARED) / "train.jsonl")]
    valid_texts = [row["text"] for row in read_jsonl(Path(PREPARED) / "valid.jsonl")]  # selects the weights
    eval_texts = [row["text"] for row in read_jsonl(Path(PREPARED) / "eval.jsonl")]  # reports them
    prompts = [row["prompt_ids"] for row in read_jsonl(Path(PREPARED) / "eval_prompts.jsonl")]

    metrics: dict = {}
    curve: list[dict] = []
    accelerator = make_accelerator(params.engine.mixed_precision)
    kept: list[int] = []
    # process 0 alone writes models/teacher_ages/ (the others' folder is None)
    with atomic_dir(TEACHER_AGES) if accelerator.is_main_process else contextlib.nullcontext() as ages:
        if cfg.source == "builtin":
            train = planned(cfg.train, len(train_texts), params.reward.objective)
            metrics["steps_planned"] = train.steps
            if cfg.train.steps is None and accelerator.is_main_process:  # they follow the data: say how
                print(f"train_teacher: at most {train.steps} steps of {train.batch_size} texts, "
                      f"{train.steps * train.batch_size / len(train_texts):.1f} passes over the {len(train_texts)} "
                      f"training texts (teacher.train.epochs {cfg.train.epochs:g}, at least min_steps "
                      f"{cfg.train.min_steps}; a number in teacher.train.steps fixes them)", flush=True)
            model = build_causal_lm(cfg.arch, tokenizer, params.seed, params.tokenizer.pad_vocab_to)
            metrics.update(pretrain_lm(
                model, tokenizer, train_texts, train, params.seed, on_log=run.log_metrics, desc="teacher",
                eval_texts=valid_texts, on_eval=validation_logger(run, curve), accelerator=accelerator,
                on_step=age_keeper(model, tokenizer, train, ages, kept),
            ))
        else:
            model = load_causal_lm(cfg.source, tokenizer, role="teacher").to(accelerator.device)
        if ages is not None:  # also when nothing is kept: DVC warns of an empty output folder
            atomic_write_json(ages / AGE_INDEX, {"steps": kept})
    if not accelerator.is_main_process:  # the others helped train; process 0 evaluates and writes
        return
    metrics["n_parameters"] = sum(p.numel() for p in model.parameters())
    with accelerator.autocast():
        metrics["eval_perplexity"] = perplexity(model, tokenizer, eval_texts, cfg.train.max_length)
        samples = sample_rows(
            model, tokenizer, prompts[: cfg.eval.n_samples], cfg.eval.max_new_tokens, params.seed, cfg.eval.temperature
        )
    # Grammaticality needs the nursery grammar; on other data it stays null.
    metrics["grammaticality"] = grammaticality(samples) if params.data.source == "nursery" else None
    metrics["mean_sample_length"] = sum(row["length"] for row in samples) / max(len(samples), 1)

    save_model(model, tokenizer, TEACHER)
    atomic_write_json(Path(METRICS) / "teacher.json", metrics)
    atomic_write_csv(Path(PLOTS) / "teacher_validation.csv", curve, CURVE_COLUMNS)
    run.log_metrics({k: v for k, v in metrics.items() if v is not None})
    run.log_table([{key: row[key] for key in SAMPLE_COLUMNS} for row in samples[:100]], "teacher_samples.json")
    run.log_model(TEACHER, "teacher", task="text-generation")
    print(f"train_teacher: perplexity {metrics['eval_perplexity']:.2f}, grammaticality {metrics['grammaticality']}"
          + validation_summary(metrics))


def planned(train: TeacherTrainParams, n_texts: int, objective: str) -> TeacherTrainParams:
    """`train` with the steps it plans for `n_texts` training texts: teacher.train.steps, or from epochs and
    min_steps when that is null (`TeacherTrainParams.planned_steps`)."""
    steps = train.planned_steps(n_texts)
    if objective == "age" and steps < 2:
        raise TndError(f"reward.objective: age needs a teacher of at least 2 steps, and teacher.train plans {steps} "
                       f"on {n_texts} texts; raise teacher.train.min_steps or teacher.train.epochs")
    return train.model_copy(update={"steps": steps})


def age_keeper(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, train: TeacherTrainParams, folder: Optional[Path],
    kept: list[int],
) -> Optional[Callable[[int, bool], None]]:
    """pretrain_lm's `on_step` that saves the model into `folder` at the age steps of train.age_checkpoints and at
    the step training ends on (an early stop's too: the oldest age must be there), adding each step to `kept`;
    None when nothing is kept."""
    due = set(age_steps(train.age_checkpoints, train.steps))
    if folder is None or not due:
        return None

    def keep(step: int, last: bool) -> None:
        if step in due or last:
            save_model(model, tokenizer, age_checkpoint_path(step, folder))
            kept.append(step)

    return keep


def main(argv: list[str] | None = None) -> None:
    run_stage("train_teacher", train_teacher, argv, multi_process=True)


if __name__ == "__main__":
    main()
