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
lm_only, whose trials are sampled for monitoring only). Every
ppo.save_every steps and after the last one it checkpoints into checkpoints/ppo/:

    latest.json      names the checkpoint to resume from; replaced atomically once a new one is complete
    step-NNNNNN/     the trainer's save_checkpoint (accelerate's save_state: weights and optimizers,
                     sharded under FSDP; RNG states per process; the trainer's own state) and run.pt:
                     the csv rows so far, the trial word counts, the initial student (built-in students) and a meta block
                     (params fingerprint, step, fingerprints of teacher, reward model, tokenizer, cache)

With ppo.keep_student_snapshots, the student's weights are also kept at the steps of
ppo.snapshot_schedule (log: log-spaced, 1, 2, 3, 4, 6, 10, 16, ..., and the last; every: each
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

import csv
import hashlib
import io
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from tnd.batching import encode_for_lm
from tnd.cache import TeacherCache, fingerprint_model, fingerprint_tokenizer
from tnd.config import Params
from tnd.data import nursery
from tnd.data.tokenizer import load_tokenizer
from tnd.engine import make_accelerator
from tnd.errors import TndError, one_line
from tnd.evaluation import word_counts
from tnd.io import atomic_write_bytes, atomic_write_csv, atomic_write_json, atomic_write_text
from tnd.models import build_causal_lm, load_causal_lm, save_model
from tnd.numbers import finite, finite_mean
from tnd.tracking import Tracker
from tnd.trainers import CustomPPOConfig, CustomPPOTrainer
from tnd.trainers.lm import pretrain_lm
from tnd.trainers.ppo import STAT_KEYS, accelerator_for
from tnd.trainers.reward import load_reward_model

from stages.common import (
    CACHE, CHECKPOINTS, INITIAL_STUDENT, METRICS, PLOTS, PREPARED, REWARD, STUDENT, TEACHER, TOKENIZER,
    check_positions, fmt, prepared_rows, run_stage, snapshot_due, snapshot_path, snapshot_steps, validation_logger,
)

CHECKPOINT_FORMAT = 5  # 4: run.pt holds trial_words; 5: only the trials that entered an update are counted
LATEST = "latest.json"  # names the checkpoint to resume from; replaced, atomically, only once a new one is complete
RUN_STATE = "run.pt"  # the stage's part of a checkpoint: meta, csv rows so far, trial word counts, the initial student
# The params that change what training computes (not tracking/eval, not kernels.backend, not save_every).
TRAINING_SECTIONS = ("seed", "data", "tokenizer", "teacher", "reward", "cache", "student", "ppo", "distill", "tnd",
                     "engine")
CSV_COLUMNS = ("step", *STAT_KEYS)
SUMMARY = {  # metrics/train.json name -> trainer stat
    "reward": "env/reward_mean", "score": "env/score_mean", "kl": "objective/kl", "kl_coef": "objective/kl_coef",
    "entropy": "objective/entropy", "response_length": "tokens/response_length", "loss_total": "loss/total",
    "loss_policy": "loss/policy", "loss_value": "loss/value", "loss_distill": "loss/distill",
    "loss_online_distill": "loss/online_distill", "loss_lm": "loss/lm",
}
DELETE = f"delete it (rm -r {CHECKPOINTS}) to start over"


def training_fingerprint(params: Params) -> str:
    dump = params.model_dump(mode="json")
    blob = {key: dump[key] for key in TRAINING_SECTIONS}
    blob["ppo"] = {k: v for k, v in blob["ppo"].items()
                   if k not in ("save_every", "keep_student_snapshots", "snapshot_schedule")}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _read_json(path: Path, stage: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TndError(f"{path}: cannot be read ({one_line(exc, 120)}); run `dvc repro {stage}`") from None


def reward_seed(path: Path) -> dict:
    """reward_mean / reward_std / reward_count for CustomPPOConfig, from the demonstrations' rewards."""
    stats = _read_json(path, "score_rewards").get("demonstrations") or {}
    if stats.get("mean") is None or not (stats.get("std") or 0) > 0:
        return {}
    count = stats["count"] - stats["nan_count"]
    return {"reward_mean": stats["mean"], "reward_std": stats["std"], "reward_count": count}


# --- checkpoints -----------------------------------------------------------------------------


def read_checkpoint(root: Path) -> Optional[dict]:
    """The checkpoint latest.json names (meta, rows, initial_student, and `dir` for load_checkpoint), or None."""
    if (root / "state.pt").exists():
        raise TndError(f"{root / 'state.pt'}: a checkpoint in the one-file format of an older tnd, which cannot be "
                       f"resumed; {DELETE}")
    latest = root / LATEST
    if not latest.is_file():
        return None
    try:
        pointer = json.loads(latest.read_text())
        if pointer.get("format_version") != CHECKPOINT_FORMAT:
            raise ValueError(f"unknown checkpoint format {pointer.get('format_version')!r}")
        directory = root / pointer["dir"]
        ckpt = torch.load(io.BytesIO((directory / RUN_STATE).read_bytes()), map_location="cpu", weights_only=True)
        if not {"meta", "rows", "trial_words"} <= ckpt.keys():
            raise ValueError(f"{RUN_STATE} lacks meta, rows or trial_words")
    except Exception as exc:
        raise TndError(
            f"{latest}: the checkpoint it names cannot be read (truncated or corrupted: "
            f"{one_line(exc, 120)}); {DELETE}"
        ) from None
    return {**ckpt, "dir": directory}


def check_checkpoint(where: str, old: dict, new: dict) -> None:
    """Refuse to resume an unfinished run under other params or inputs."""
    where = f"{where}: checkpoint of an unfinished run (step {old['step']} of {old['steps']})"
    if old["params_fingerprint"] != new["params_fingerprint"]:
        raise TndError(
            f"{where} was written with different training params (fingerprint {old['params_fingerprint']}, "
            f"now {new['params_fingerprint']}); restore those params to resume it, or {DELETE}"
        )
    for key in ("tokenizer_fingerprint", "teacher_fingerprint", "reward_fingerprint", "cache_fingerprint"):
        if old[key] != new[key]:
            what = key.removesuffix("_fingerprint")
            raise TndError(f"{where} was trained against a different {what} (it changed since); {DELETE}")


def atomic_torch_save(path: Path, obj: Any) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def write_checkpoint(root: Path, trainer: CustomPPOTrainer, meta: dict, rows: list, trial_words: dict,
                     initial: Optional[dict]) -> None:
    """Every process: the trainer into step-NNNNNN/ (save_checkpoint), process 0 the stage's part beside it,
    then latest.json names it and the older one goes. Until latest.json is replaced it names the previous,
    complete checkpoint, so a crash or kill at any point leaves one to resume from."""
    accelerator, main = trainer.accelerator, trainer.accelerator.is_main_process
    target = root / f"step-{trainer.global_step:06d}"
    try:
        if main and target.exists():  # a save that was interrupted, which latest.json never named
            shutil.rmtree(target)
        accelerator.wait_for_everyone()
        trainer.save_checkpoint(target)
        if main:
            state = {"meta": {**meta, "step": trainer.global_step}, "rows": rows, "trial_words": trial_words,
                     "initial_student": initial}
            atomic_torch_save(target / RUN_STATE, state)
        accelerator.wait_for_everyone()
    except BaseException:
        if main:
            shutil.rmtree(target, ignore_errors=True)
        raise
    if main:
        atomic_write_json(root / LATEST, {"format_version": CHECKPOINT_FORMAT, "step": trainer.global_step,
                                          "dir": target.name})
        drop_checkpoints(root, keep=target)


def drop_checkpoints(root: Path, keep: Optional[Path]) -> None:
    """Every step-NNNNNN/ but `keep`: superseded, interrupted, or (keep None) of a finished earlier run."""
    for directory in root.glob("step-*"):
        if directory != keep:
            shutil.rmtree(directory)


def drop_snapshots_after(step: int) -> None:
    """Snapshots past the resume point (or all, step 0, for a fresh run) belong to no run any more."""
    for later in snapshot_steps():
        if later > step:
            snapshot_path(later).unlink()


# --- outputs ---------------------------------------------------------------------------------


def _cell(value: float) -> str:
    return "" if isinstance(value, float) and math.isnan(value) else repr(value)


def write_csv(path: Path, rows: list[dict]) -> None:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows([[_cell(row[key]) for key in CSV_COLUMNS] for row in rows])
    atomic_write_text(path, out.getvalue())


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
        check_checkpoint(str(ckpt["dir"]), ckpt["meta"], meta)
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
                f"{one_line(exc, 120)}); {DELETE}"
            ) from None
        rows, trial_words = list(ckpt["rows"]), dict(ckpt["trial_words"])
        if main:
            print(f"train_ppo: resuming from {ckpt['dir']} at step {trainer.global_step} of {config.steps}")
    del ckpt
    if main:
        drop_snapshots_after(trainer.global_step)

    csv_path = Path(PLOTS) / "train.csv"
    progress = tqdm(total=config.steps, initial=trainer.global_step, desc="ppo", disable=not main)

    def on_step(stats: dict, step: int) -> None:
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
