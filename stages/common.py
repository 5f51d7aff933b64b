"""What every stage shares: argument parsing, params loading, and turning bad input into
one line on stderr with exit code 2 instead of a traceback."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from tnd import tracking
from tnd.config import Params, load_params
from tnd.errors import TndError
from tnd.tracking import Tracker

EXIT_BAD_INPUT = 2
EXIT_ENVIRONMENT = 3


def run_stage(name: str, body: Callable[[Params, Tracker], None], argv: list[str] | None = None) -> None:
    """Parse --params, seed, and run `body` inside this stage's MLflow run."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        params = load_params(args.params)
        seed_everything(params.seed)
        if not is_main_process():  # under `accelerate launch`, process 0 alone logs the run
            params = params.model_copy(update={"tracking": params.tracking.model_copy(update={"enabled": False})})
        with tracking.stage_run(name, params) as run:
            body(params, run)
    except TndError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_BAD_INPUT) from None
    except OSError as exc:  # disk full, permissions, read-only filesystem: the machine, not a bug
        where = f"{exc.filename}: " if exc.filename else ""
        print(
            f"error: {name}: {where}{exc.strerror or exc}; outputs already written are intact (writes are "
            "atomic); fix the cause and rerun the stage (`dvc repro` resumes train_ppo from its last checkpoint)",
            file=sys.stderr, flush=True,
        )
        raise SystemExit(EXIT_ENVIRONMENT) from None
    print(f"{name}: done in {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)


def is_main_process() -> bool:
    """False in the other processes of a multi-process launch (`accelerate launch` sets RANK)."""
    return int(os.environ.get("RANK", "0")) == 0


def seed_everything(seed: int) -> None:
    """Same params, same seed, same numbers on CPU."""
    import random

    random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


# The pipeline's file layout (the same paths appear in dvc.yaml).
PREPARED = "data/prepared"
TOKENIZER = "artifacts/tokenizer"
TEACHER = "models/teacher"
CACHE = "cache/teacher"
REWARD = "models/reward"
METRICS = "metrics"
STUDENT = "models/student"
INITIAL_STUDENT = "models/initial_student"
CHECKPOINTS = "checkpoints/ppo"
PLOTS = "plots"
EVAL = "eval"


def snapshot_path(step: int) -> Path:
    """The student's weights at PPO step `step` (train_ppo keeps them for evaluate's word curve)."""
    return Path(CHECKPOINTS) / "students" / f"step-{step:06d}.pt"


def snapshot_steps() -> list[int]:
    """Steps of the kept student snapshots, sorted."""
    return sorted(int(p.stem.removeprefix("step-")) for p in (Path(CHECKPOINTS) / "students").glob("step-*.pt"))
