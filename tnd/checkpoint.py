"""Checkpoints of a PPO run and the student snapshots kept beside them, for resuming and for evaluate.

A checkpoint directory (train_ppo's checkpoints/ppo/) holds:

    latest.json      names the checkpoint to resume from; replaced atomically once a new one is complete
    step-NNNNNN/     the trainer's save_checkpoint (accelerate's save_state: weights and optimizers,
                     sharded under FSDP; RNG states per process; the trainer's own state) and run.pt:
                     the csv rows so far, the trial word counts, the initial student (built-in students) and a meta
                     block (params fingerprint, step, fingerprints of teacher, reward model, tokenizer, cache)
    students/        the student's weights at the steps snapshot_due picks (ppo.snapshot_schedule), for
                     evaluate's word curve (stages/common.py names the files)

An unfinished checkpoint resumes only under the same training params and inputs (check_checkpoint), so a
run is never silently continued under changed settings.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from tnd.config import Params
from tnd.errors import TndError, one_line
from tnd.io import atomic_write_bytes, atomic_write_json, read_json

CHECKPOINT_FORMAT = 5  # 4: run.pt holds trial_words; 5: only the trials that entered an update are counted
LATEST = "latest.json"  # names the checkpoint to resume from; replaced, atomically, only once a new one is complete
RUN_STATE = "run.pt"  # the stage's part of a checkpoint: meta, csv rows so far, trial word counts, the initial student
SNAPSHOTS_PER_DECADE = 5  # ppo.snapshot_schedule: log
PAPER_SNAPSHOTS = ((20, 2), (100, 5), (500, 10), (math.inf, 50))  # ppo.snapshot_schedule: paper (up to, every)
# The params that change what training computes (not tracking/eval, not kernels.backend, not save_every).
TRAINING_SECTIONS = ("seed", "data", "tokenizer", "teacher", "reward", "cache", "student", "ppo", "distill", "tnd",
                     "engine")


def delete_hint(root: Path) -> str:
    return f"delete it (rm -r {root}) to start over"


def training_fingerprint(params: Params) -> str:
    """A hash of the params a resumed run must share with the run that wrote the checkpoint."""
    dump = params.model_dump(mode="json")
    blob = {key: dump[key] for key in TRAINING_SECTIONS}
    blob["ppo"] = {k: v for k, v in blob["ppo"].items()
                   if k not in ("save_every", "keep_student_snapshots", "snapshot_schedule")}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def read_checkpoint(root: Path) -> Optional[dict]:
    """The checkpoint latest.json names (meta, rows, initial_student, and `dir` for load_checkpoint), or None."""
    if (root / "state.pt").exists():
        raise TndError(f"{root / 'state.pt'}: a checkpoint in the one-file format of an older tnd, which cannot be "
                       f"resumed; {delete_hint(root)}")
    latest = root / LATEST
    if not latest.is_file():
        return None
    try:
        pointer = read_json(latest)
        if pointer.get("format_version") != CHECKPOINT_FORMAT:
            raise ValueError(f"unknown checkpoint format {pointer.get('format_version')!r}")
        directory = root / pointer["dir"]
        ckpt = torch.load(io.BytesIO((directory / RUN_STATE).read_bytes()), map_location="cpu", weights_only=True)
        if not {"meta", "rows", "trial_words"} <= ckpt.keys():
            raise ValueError(f"{RUN_STATE} lacks meta, rows or trial_words")
    except Exception as exc:
        raise TndError(
            f"{latest}: the checkpoint it names cannot be read (truncated or corrupted: "
            f"{one_line(exc, 120)}); {delete_hint(root)}"
        ) from None
    return {**ckpt, "dir": directory}


def check_checkpoint(where: str, old: dict, new: dict, root: Path) -> None:
    """Refuse to resume an unfinished run under other params or inputs."""
    where = f"{where}: checkpoint of an unfinished run (step {old['step']} of {old['steps']})"
    if old["params_fingerprint"] != new["params_fingerprint"]:
        raise TndError(
            f"{where} was written with different training params (fingerprint {old['params_fingerprint']}, "
            f"now {new['params_fingerprint']}); restore those params to resume it, or {delete_hint(root)}"
        )
    for key in ("tokenizer_fingerprint", "teacher_fingerprint", "reward_fingerprint", "cache_fingerprint"):
        if old[key] != new[key]:
            what = key.removesuffix("_fingerprint")
            raise TndError(f"{where} was trained against a different {what} (it changed since); {delete_hint(root)}")


def atomic_torch_save(path: Path, obj: Any) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def write_checkpoint(root: Path, trainer: Any, meta: dict, rows: list, trial_words: dict,
                     initial: Optional[dict]) -> None:
    """Every process: the trainer (a CustomPPOTrainer; this module sits below tnd/trainers/) into step-NNNNNN/ (save_checkpoint), process 0 the stage's part beside it,
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


# --- student snapshots: when to keep one ----------------------------------------------------


def snapshot_due(step: int, steps: int, schedule: str, save_every: int) -> bool:
    """Whether train_ppo keeps the student's weights at `step` of `steps` (ppo.snapshot_schedule).

    "paper": the TnD paper's (sled-group/TnD trainer_util.save_condition): every 2 steps to 20, every 5 to 100,
    every 10 to 500, and every 50 beyond, and the last: dense where most words move, for the nAoA fits and the
    effective-vocabulary curve. "every": at each checkpoint (every save_every steps and the last). "log": at the steps
    round(10 ** (i / 5)), i = 0, 1, ... -- 1, 2, 3, 4, 6, 10, 16, 25, 40, 63, 100, 158, ... -- and the
    last, log-spaced as the TnD paper saves its checkpoints (sled-group/TnD trainer_util.save_condition:
    every 2 steps to 20, every 5 to 100, every 10 to 500, ...), so that evaluate's word-surprisal curve
    and the nAoA fitted on it (tnd.evaluation.word_naoa) see the early steps where most words move.
    """
    if step < 1 or step == steps:
        return step == steps
    if schedule == "every":
        return step % save_every == 0
    if schedule == "paper":
        return step % next(every for below, every in PAPER_SNAPSHOTS if step <= below) == 0
    i = round(SNAPSHOTS_PER_DECADE * math.log10(step))
    return any(round(10 ** (j / SNAPSHOTS_PER_DECADE)) == step for j in (i - 1, i, i + 1))


def drop_snapshots_after(snapshots: dict[int, Path], step: int) -> None:
    """Of the snapshots (step -> file), those past the resume point (or all, step 0, for a fresh run): they
    belong to no run any more."""
    for later, path in snapshots.items():
        if later > step:
            path.unlink()
