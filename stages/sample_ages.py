"""Stage sample_ages: the training texts of the age-predictor reward (reward.objective: age), the TnD paper's.

From each teacher checkpoint that train_teacher kept (models/teacher_ages/step-NNNNNN/, see
teacher.train.age_checkpoints), sample reward.age.n_samples_per_checkpoint continuations of the trial
prompts (data/prepared/prompts.jsonl, cycled; the same prompts for every checkpoint, so that only the
continuation tells the ages apart) and label each sample, prompt + continuation, with the checkpoint's age,
log2(step). Writes data/ages/labelled.jsonl, rows {"text", "ids", "label"}: "ids" are the prompt's and the
sampled continuation's token ids as they are (no eos unless the sample ended), the sequence PPO scores for
a trial, which train_reward fits by regression; "text" is their decoding, for people. The student's PPO
score is then the predicted age minus log2(PPO step) (tnd.score_offset: log2_step).
Sampling is seeded per checkpoint (seed + step), on the accelerator and in the mixed precision of `engine`.

Under any other reward.objective it writes an empty file and loads no model: DVC runs every stage of
dvc.yaml, so the default pipeline pays only for starting it.
"""

from __future__ import annotations

import math

from tqdm.auto import tqdm

from tnd.config import Params
from tnd.errors import TndError
from tnd.io import atomic_write_jsonl
from tnd.tracking import Tracker

from stages.common import (
    AGES, TEACHER_AGES, TOKENIZER, age_checkpoint_path, age_checkpoint_steps, check_positions, prepared_rows,
    run_stage,
)


def sample_ages(params: Params, run: Tracker) -> None:
    rows = age_rows(params, run) if params.reward.objective == "age" else []
    atomic_write_jsonl(AGES, rows)
    run.log_metrics({"rows": len(rows)})
    print(f"sample_ages: {len(rows)} labelled texts (reward.objective: {params.reward.objective})")


def age_rows(params: Params, run: Tracker) -> list[dict]:
    """{"text", "ids", "label": log2(step)} for every sample of every kept checkpoint, oldest last; each checkpoint's
    mean sample length and share of samples that ended (eos) go to MLflow at its step."""
    # Imported here, not at the top: under the other objectives the stage loads neither transformers nor a model.
    from tnd.data.tokenizer import load_tokenizer
    from tnd.engine import make_accelerator
    from tnd.evaluation import sample_rows
    from tnd.models import load_causal_lm

    cfg = params.reward.age
    steps = age_checkpoint_steps()
    if len(steps) < 2:
        raise TndError(
            f"{TEACHER_AGES}: {len(steps)} teacher checkpoint(s), but the age reward needs at least 2 ages; run "
            "`dvc repro train_teacher` with teacher.train.age_checkpoints >= 2"
        )
    tokenizer = load_tokenizer(TOKENIZER)
    prompts = [row["prompt_ids"] for row in prepared_rows("prompts.jsonl")]
    prompts = [prompts[i % len(prompts)] for i in range(cfg.n_samples_per_checkpoint)]
    accelerator = make_accelerator(params.engine.mixed_precision)
    run.log_metrics({"checkpoints": len(steps)})
    rows: list[dict] = []
    for step in tqdm(steps, desc="ages"):
        model = load_causal_lm(age_checkpoint_path(step), tokenizer, role="teacher").to(accelerator.device)
        check_positions({"teacher": model}, max(map(len, prompts)) + cfg.max_new_tokens, "reward.age.max_new_tokens",
                        cfg.max_new_tokens, "prompts + samples")
        with accelerator.autocast():
            samples = sample_rows(model, tokenizer, prompts, cfg.max_new_tokens, params.seed + step, cfg.temperature,
                                  desc=f"step {step}")
        rows += [{"text": sample["text"], "ids": sample["prompt_ids"] + sample["continuation_ids"],
                  "label": math.log2(step)} for sample in samples]
        run.log_metrics({"mean_length": sum(s["length"] for s in samples) / len(samples),
                         "ended": sum(s["ended"] for s in samples) / len(samples)}, step)
    return rows


def main(argv: list[str] | None = None) -> None:
    run_stage("sample_ages", sample_ages, argv)


if __name__ == "__main__":
    main()
