"""Stage train_ppo: TnD training of the student (tnd.trainers.CustomPPOTrainer) for ppo.steps.

Reads the tokenizer, teacher, reward model, prompts, the training texts (the student's warm-up, and the
interleaved LM steps when tnd.lm_data is corpus), the teacher-logit cache (checked
against this teacher and tokenizer) and metrics/rewards.json (the demonstrations' reward
statistics seed the score normaliser). The built-in student is built from student.arch and
warmed up for student.train.steps LM steps (0 = from scratch); otherwise it is loaded by
name/path. The student training starts from is saved to models/initial_student/.

Writes models/student/, metrics/train.json (step-1 / final / mean-of-last-10 figures, time
and tokens/s), plots/train.csv (one row per step: `step` + every trainer stat) and
plots/train_trial_words.csv (each nursery content word's count, `trained_count`, in the trials that entered a
PPO update over the run: the practice evaluate sets against how well the word is known; none in demos_only and
lm_only, whose trials are sampled for monitoring only). Every ppo.save_every steps and after the last one it
checkpoints into checkpoints/ppo/ (the layout: tnd/checkpoint.py).

With ppo.keep_student_snapshots, the student's weights are also kept at the steps of
ppo.snapshot_schedule (paper: every 2 steps to 20, every 5 to 100, every 10 to 500, every 50 beyond; log: log-spaced,
1, 2, 3, 4, 6, 10, 16, ..., and the last; every: each
checkpoint) in checkpoints/ppo/students/step-NNNNNN.pt, from which evaluate draws the word-surprisal
learning curve and the words' ages of acquisition (nAoA). On several nodes, checkpoints/ must be on storage that every node sees.

Resuming: an unfinished checkpoint written with the same training params and inputs is
resumed (bit-exactly on CPU); one written with other params or inputs is refused, so that
a run is never silently continued under changed settings. A finished checkpoint is only
the end state of an earlier run: it is ignored and training starts afresh (so that
`dvc exp run -S ...` works with the persisted checkpoint directory).

Several processes: with engine.processes > 1 the stage starts itself again under `accelerate launch`
(stages/common.py), so `dvc repro` / `dvc exp run -S engine.processes=2` run and record it; started by
`accelerate launch` or `torchrun` by hand, it runs in the processes given. The trainer runs on
accelerate's engine (DDP, or FSDP / DeepSpeed from engine.config; tnd/engine.py); each process takes its
share of every batch, and process 0 alone writes the outputs and logs to MLflow.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from pathlib import Path
from typing import Any

from accelerate.utils import gather_object
from tqdm.auto import tqdm

from tnd.batching import encode_for_lm
from tnd.cache import TeacherCache, fingerprint_model, fingerprint_tokenizer
from tnd.checkpoint import (
    CHECKPOINT_FORMAT, LATEST, atomic_torch_save, check_checkpoint, delete_hint, drop_checkpoints,
    drop_snapshots_after, read_checkpoint, snapshot_due, training_fingerprint, write_checkpoint,
)
from tnd.config import Params
from tnd.data import nursery
from tnd.data.tokenizer import load_tokenizer
from tnd.engine import make_accelerator
from tnd.errors import TndError, one_line
from tnd.evaluation import grammatical_count, word_counts
from tnd.io import atomic_write_csv, atomic_write_json, read_json
from tnd.models import build_causal_lm, load_causal_lm, save_model
from tnd.numbers import finite, finite_mean
from tnd.tracking import Tracker
from tnd.trainers import CustomPPOConfig, CustomPPOTrainer
from tnd.trainers.lm import pretrain_lm
from tnd.trainers.ppo import STAT_KEYS, accelerator_for
from tnd.reward import load_reward_model

from stages.common import (
    CACHE, CHECKPOINTS, INITIAL_STUDENT, METRICS, PLOTS, PREPARED, REWARD, STUDENT, TEACHER, TOKENIZER,
    check_positions, fmt, prepared_rows, run_stage, snapshot_path, snapshot_steps, validation_logger,
)

CSV_COLUMNS = ("step", *STAT_KEYS, "trials/grammaticality")  # the last: nursery data only
SUMMARY = {  # metrics/train.json name -> trainer stat
    "reward": "env/reward_mean", "score": "env/score_mean", "kl": "objective/kl", "kl_coef": "objective/kl_coef",
    "entropy": "objective/entropy", "response_length": "tokens/response_length", "loss_total": "loss/total",
    "loss_policy": "loss/policy", "loss_value": "loss/value", "loss_distill": "loss/distill",
    "loss_online_distill": "loss/online_distill", "loss_lm": "loss/lm",
}


def _read_json(path: Path, stage: str) -> Any:
    try:
        return read_json(path)
    except (OSError, ValueError) as exc:
        raise TndError(f"{path}: cannot be read ({one_line(exc, 120)}); run `dvc repro {stage}`") from None


def reward_seed(path: Path) -> dict:
    """reward_mean / reward_std / reward_count for CustomPPOConfig, from the demonstrations' rewards."""
    stats = _read_json(path, "score_rewards").get("demonstrations") or {}
    if stats.get("mean") is None or not (stats.get("std") or 0) > 0:
        return {}
    count = stats["count"] - stats["nan_count"]
    return {"reward_mean": stats["mean"], "reward_std": stats["std"], "reward_count": count}


# --- outputs ---------------------------------------------------------------------------------


def write_csv(path: Path, rows: list[dict]) -> None:
    """plots/train.csv: a NaN stat (e.g. no finite reward that step) is an empty cell, as dvc plots reads it."""
    cells = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()} for row in rows]
    atomic_write_csv(path, cells, CSV_COLUMNS)


def summarise(rows: list[dict], batch_size: int) -> dict:
    """Step-1 (the initial student's trials), final and mean-of-last-10 figures; time and throughput
    (time is the sum of the steps' wall times, so a resumed run counts only training)."""
    seconds = sum(row["time/step"] for row in rows)
    lengths = [row["tokens/response_length"] for row in rows]
    tokens = batch_size * sum(n for n in lengths if math.isfinite(n))
    return {
        "steps": len(rows),
        "first": {name: finite(rows[0][key]) for name, key in SUMMARY.items()},
        "final": {name: finite(rows[-1][key]) for name, key in SUMMARY.items()},
        "last10": {name: finite_mean([row[key] for row in rows[-10:]]) for name, key in SUMMARY.items()},
        "skipped_steps": int(sum(row["skipped"] for row in rows)),
        "nonfinite_rewards": int(sum(row["nonfinite_rewards"] for row in rows)),
        "total_seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else None,  # sampled trial tokens
    }


# --- the stage -------------------------------------------------------------------------------


def warn_if_single_process_launch() -> None:
    """`accelerate launch --cpu --num_processes N` starts one process (accelerate issue #2741):
    it sets MASTER_ADDR but no WORLD_SIZE. Say so rather than train alone in silence."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in os.environ \
            and "WORLD_SIZE" not in os.environ:
        print(
            "warning: accelerate launch --cpu starts a single process; for N processes on CPU use "
            "`accelerate launch --multi_gpu --num_processes N -m stages.train_ppo` (gloo without CUDA)",
            file=sys.stderr, flush=True,
        )


def train_ppo(params: Params, run: Tracker) -> None:
    warn_if_single_process_launch()
    tokenizer = load_tokenizer(TOKENIZER)
    teacher = load_causal_lm(TEACHER, tokenizer, role="teacher").eval()
    reward_model = load_reward_model(REWARD, tokenizer)
    prompts = [list(row["prompt_ids"]) for row in prepared_rows("prompts.jsonl")]
    if not prompts:
        raise TndError(f"{PREPARED}/prompts.jsonl: no prompts; run `dvc repro prepare_data`")
    meta = {
        "format_version": CHECKPOINT_FORMAT, "steps": params.ppo.steps,
        "params_fingerprint": training_fingerprint(params),
        "tokenizer_fingerprint": fingerprint_tokenizer(tokenizer), "teacher_fingerprint": fingerprint_model(teacher),
        "reward_fingerprint": fingerprint_model(reward_model),
    }
    cache = TeacherCache(CACHE, meta["teacher_fingerprint"], meta["tokenizer_fingerprint"])
    meta["cache_fingerprint"] = hashlib.sha256((Path(CACHE) / "index.json").read_bytes()).hexdigest()
    config = CustomPPOConfig.from_params(params, **reward_seed(Path(METRICS) / "rewards.json"))
    # The warm-up trains on an accelerator of its own (tnd/trainers/fit.py), made first: accelerate keeps one
    # gradient-accumulation setting per process, and the last Accelerator made sets it, the trainer's below.
    accelerator = make_accelerator(params.engine.mixed_precision)
    main = accelerator.is_main_process

    root = Path(CHECKPOINTS)
    ckpt = read_checkpoint(root)
    if ckpt is not None and ckpt["meta"]["step"] >= ckpt["meta"]["steps"]:
        if main:
            print(f"train_ppo: {ckpt['dir']} is from a finished run; starting afresh")
        ckpt = None
    if ckpt is not None:
        check_checkpoint(str(ckpt["dir"]), ckpt["meta"], meta, root)
    accelerator.wait_for_everyone()  # every process has read the checkpoint before process 0 tidies up
    if main:
        for stale in root.rglob(".*.tmp"):  # checkpoint or snapshot temp left by a kill mid-write
            stale.unlink()
        if ckpt is None:
            (root / LATEST).unlink(missing_ok=True)
        drop_checkpoints(root, keep=None if ckpt is None else ckpt["dir"])

    # The student training starts from (on resume: the one the checkpointed run started from).
    initial = None
    texts = [row["text"] for row in prepared_rows("train.jsonl")]
    if params.student.source == "builtin":
        student = build_causal_lm(params.student.arch, tokenizer, params.student_seed, params.tokenizer.pad_vocab_to)
        if ckpt is not None:
            student.load_state_dict(ckpt["initial_student"])
        elif params.student.train.steps:
            # its validation: the validation split (the eval split stays for evaluate's report)
            eval_texts = [row["text"] for row in prepared_rows("valid.jsonl")]
            pretrain_lm(student, tokenizer, texts, params.student.train, params.student_seed, desc="student warm-up",
                        eval_texts=eval_texts, on_eval=validation_logger(run, []), accelerator=accelerator,
                        name="student")
        initial = {k: v.clone() for k, v in student.state_dict().items()}
    else:
        student = load_causal_lm(params.student.source, tokenizer, role="student")
    if main:
        save_model(student, tokenizer, INITIAL_STUDENT)
    check_positions({"student": student, "teacher": teacher, "reward": reward_model},
                    max(map(len, prompts)) + params.ppo.max_new_tokens, "ppo.max_new_tokens", params.ppo.max_new_tokens,
                    "prompts + samples")

    trainer = CustomPPOTrainer(
        teacher, student, reward_model, config, prompts,
        demonstrations=cache, tokenizer=tokenizer, accelerator=accelerator_for(config),
        lm_dataset=encode_for_lm(tokenizer, texts, params.student.train.max_length)
        if params.tnd.lm_data == "corpus" else None,
    )
    rows: list[dict] = []
    trial_words: dict[str, int] = {}  # content word -> times in the trained trials so far, over all processes
    if ckpt is not None:
        try:
            trainer.load_checkpoint(ckpt["dir"])
        except Exception as exc:
            raise TndError(
                f"{ckpt['dir']}: the trainer's checkpoint cannot be read (truncated or corrupted: "
                f"{one_line(exc, 120)}); {delete_hint(root)}"
            ) from None
        rows, trial_words = list(ckpt["rows"]), dict(ckpt["trial_words"])
        if main:
            print(f"train_ppo: resuming from {ckpt['dir']} at step {trainer.global_step} of {config.steps}")
    del ckpt
    if main:
        drop_snapshots_after({step: snapshot_path(step) for step in snapshot_steps()}, trainer.global_step)

    csv_path = Path(PLOTS) / "train.csv"
    progress = tqdm(total=config.steps, initial=trainer.global_step, desc="ppo", disable=not main)

    nursery_data = params.data.source == "nursery"

    def on_step(stats: dict, step: int) -> None:
        if nursery_data:  # the grammaticality of the student's free samples as it trains, over all processes
            local = (grammatical_count(tokenizer, trainer.last_trial_prompts, trainer.last_trials), len(trainer.last_trials))
            ok, n = map(sum, zip(*gather_object([local])))
            stats = {**stats, "trials/grammaticality": ok / n if n else math.nan}
        rows.append({"step": step, **stats})
        practised = word_counts(tokenizer.batch_decode(trainer.trained_trials, skip_special_tokens=True),
                                nursery.CONTENT_WORDS)
        for counts in gather_object([practised]):
            for word, n in counts.items():
                trial_words[word] = trial_words.get(word, 0) + n
        run.log_metrics({k: v for k, v in stats.items() if math.isfinite(v)}, step)
        progress.update(1)
        progress.set_postfix(reward=f"{stats['env/reward_mean']:.3f}", kl=f"{stats['objective/kl']:.3f}")
        if params.ppo.keep_student_snapshots and snapshot_due(step, config.steps, params.ppo.snapshot_schedule,
                                                              config.save_every):
            weights = trainer.student_state_dict()  # every process (FSDP gathers); before the checkpoint, so that
            if main:  # a resume never lacks one (it drops those past its step and writes them again)
                atomic_torch_save(snapshot_path(step), weights)
        if step % config.save_every == 0 or step == config.steps:  # every process: FSDP gathers, saves shards
            write_checkpoint(root, trainer, meta, rows, trial_words, initial)
            if main:
                write_csv(csv_path, rows)

    trainer.train(on_step=on_step)
    progress.close()
    weights = trainer.student_state_dict()
    if not main:
        return

    summary = {**summarise(rows, config.batch_size), "processes": trainer.accelerator.num_processes}
    write_csv(csv_path, rows)
    by_count = sorted(trial_words.items(), key=lambda item: (-item[1], item[0]))
    atomic_write_csv(Path(PLOTS) / "train_trial_words.csv", [{"word": w, "trained_count": n} for w, n in by_count],
                     ["word", "trained_count"])
    save_model(trainer.student, tokenizer, STUDENT, state_dict=weights)
    atomic_write_json(Path(METRICS) / "train.json", summary)
    run.log_metrics({f"{part}.{k}": v for part in ("final", "last10") for k, v in summary[part].items()
                     if v is not None})
    run.log_model(STUDENT, "student", task="text-generation", register=True)
    print(
        f"train_ppo: reward {fmt(summary['first']['reward'])} -> {fmt(summary['last10']['reward'])} (last 10), "
        f"kl {fmt(summary['first']['kl'])} -> {fmt(summary['last10']['kl'])}, "
        f"{fmt(summary['tokens_per_second'])} tokens/s"
    )


def main(argv: list[str] | None = None) -> None:
    run_stage("train_ppo", train_ppo, argv, multi_process=True, sharded=True)


if __name__ == "__main__":
    main()
