"""What every stage shares: argument parsing, params loading, and turning bad input into
one line on stderr with exit code 2 instead of a traceback."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from tnd import tracking
from tnd.config import EngineParams, Params, load_params
from tnd.errors import TndError
from tnd.io import read_json, read_jsonl
from tnd.tracking import Tracker

EXIT_BAD_INPUT = 2
EXIT_ENVIRONMENT = 3
# Set in the processes a stage starts again under `accelerate launch`: the starting process has printed the
# params' notes (keys overriding the preset), so that a stage prints them once.
LAUNCHED = "TND_STAGE_LAUNCHED"


def run_stage(
    name: str, body: Callable[[Params, Tracker], None], argv: list[str] | None = None, multi_process: bool = False,
    sharded: bool = False,
) -> None:
    """Parse --params, seed, and run `body` inside this stage's MLflow run. A `multi_process` stage started
    as one process with engine.processes > 1 starts itself again under `accelerate launch` and waits: under
    engine.config when the stage can shard its models (`sharded`: train_ppo), else with DDP."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        params = load_params(args.params, quiet=LAUNCHED in os.environ or not is_main_process())
        if multi_process and params.engine.processes > 1 and "WORLD_SIZE" not in os.environ:
            command = launch_command(name, params.engine, args.params, sharded)
            print(f"{name}: {params.engine.processes} processes: {' '.join(command[2:])}", file=sys.stderr, flush=True)
            code = subprocess.run(command, env={**os.environ, LAUNCHED: "1"}).returncode
            if code:
                raise SystemExit(code)
            return
        seed_everything(params.seed)
        if not is_main_process():  # under `accelerate launch`, process 0 alone logs the run
            params = params.model_copy(update={"tracking": params.tracking.model_copy(update={"enabled": False})})
        with tracking.stage_run(name, params, **run_labels(name, params)) as run:
            run.log_inputs(stage_inputs(name, params))
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


def launch_command(name: str, engine: EngineParams, params_path: str, sharded: bool = True) -> list[str]:
    """`accelerate launch` of stage `name` on this machine: engine.processes processes, DDP (gloo on CPU,
    NCCL on GPUs) or, for a `sharded` stage, what the accelerate config file engine.config says (FSDP,
    DeepSpeed)."""
    config = engine.config if sharded else None
    if config is not None and not Path(config).is_file():
        raise TndError(f"engine.config = {config}: file not found; pick one of configs/*.yaml or set null")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(engine.processes),
               "--num_machines", "1", "--mixed_precision", engine.mixed_precision, "--dynamo_backend", "no",
               "--main_process_port", str(free_port())]
    command += ["--config_file", config] if config is not None else ["--multi_gpu"]
    return command + ["-m", f"stages.{name}", "--params", params_path]


def validation_logger(run: Tracker, curve: list[dict]) -> Callable[[dict], None]:
    """`on_eval` for the trainers' held-out validation: keep each row (for plots/) and log its figures to
    MLflow at its step, as validation/<name>."""

    def on_eval(row: dict) -> None:
        curve.append(row)
        run.log_metrics({f"validation/{k}": v for k, v in row.items() if k != "step"}, row["step"])

    return on_eval


def validation_summary(metrics: dict) -> str:
    """`; best validation at step 350 of 600 run (stopped early)`, or nothing without validation."""
    if "best_step" not in metrics:
        return ""
    stopped = " (stopped early)" if metrics["stopped_early"] else ""
    return f"; best validation at step {metrics['best_step']} of {metrics['steps_run']} run{stopped}"


def fmt(value: Optional[float]) -> str:
    """A figure in a stage's closing line: 3 decimals, or n/a when undefined (None)."""
    return "n/a" if value is None else f"{value:.3f}"


def check_positions(models: Mapping[str, Any], tokens: int, key: str, value: int, what: str) -> None:
    """Refuse, in one line naming the param `key` (= `value`) to lower, sequences of `tokens` tokens (`what`
    reach that many) that are longer than a model's max_position_embeddings; `models` by role."""
    for role, model in models.items():
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if limit and tokens > limit:
            raise TndError(
                f"{key} = {value}: {what} reach {tokens} tokens, more than the {role}'s max_position_embeddings "
                f"({limit}); lower {key}"
            )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (a launch's rendezvous; tests use it too)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
TEACHER_AGES = "models/teacher_ages"
AGE_INDEX = "steps.json"  # in TEACHER_AGES: {"steps": [the kept checkpoints' steps]}
AGES = "data/ages/labelled.jsonl"
CACHE = "cache/teacher"
REWARD = "models/reward"
METRICS = "metrics"
STUDENT = "models/student"
INITIAL_STUDENT = "models/initial_student"
CHECKPOINTS = "checkpoints/ppo"
PLOTS = "plots"
EVAL = "eval"


# What each stage reads, recorded as MLflow dataset inputs of its run: (path, context). The paths
# are in dvc.yaml's deps of the stage (tests/test_tracking.py checks); the cache by its index, which
# holds every shard's sha256.
def stage_inputs(name: str, params: Params) -> list[tuple[str, str]]:
    prepared, index = Path(PREPARED), str(Path(CACHE) / "index.json")
    warm_up = params.student.source == "builtin" and params.student.train.steps > 0
    objective = params.reward.objective
    inputs = {
        "prepare_data": [(params.data.source, "source")],  # a local file; the nursery and hub names are not
        "train_teacher": [
            (prepared / "train.jsonl", "training"), (prepared / "valid.jsonl", "validation"),
            (prepared / "eval.jsonl", "evaluation"), (prepared / "eval_prompts.jsonl", "evaluation"),
        ],
        "sample_ages": [(prepared / "prompts.jsonl", "prompts")] if objective == "age" else [],
        "train_reward": {
            "pairwise": [(prepared / "pairs_train.jsonl", "training"), (prepared / "pairs_valid.jsonl", "validation"),
                         (prepared / "pairs_eval.jsonl", "evaluation")],
            "regression": [(params.data.source, "training")],
            "age": [(AGES, "training")],
        }[objective],
        "cache_teacher_logits": [(prepared / "prompts.jsonl", "prompts")],
        "score_rewards": [(index, "scoring"), (prepared / "eval.jsonl", "scoring")],
        "train_ppo": [(prepared / "prompts.jsonl", "training"), (index, "training")]
        + ([(prepared / "train.jsonl", "training")] if warm_up or params.tnd.lm_data == "corpus" else [])
        + ([(prepared / "valid.jsonl", "validation")] if warm_up else []),  # the warm-up's validation
        "evaluate": [(prepared / "eval_prompts.jsonl", "evaluation"), (prepared / "eval.jsonl", "evaluation")],
    }
    return [(str(path), context) for path, context in inputs.get(name, [])]


# The stages whose outputs depend on tnd.mode: their runs carry a `mode` tag and are named after the
# experiment and the mode, so the ablation reads off the MLflow runs table.
MODE_STAGES = ("train_ppo", "evaluate")


def run_labels(name: str, params: Params) -> dict:
    if name not in MODE_STAGES:
        return {}
    mode = params.tnd.mode
    return {"tags": {"mode": mode}, "run_name": f"{name}: {tracking.pipeline_id(params)} ({mode})"}


def prepared_rows(name: str) -> list[dict]:
    """The rows of data/prepared/<name> (a .jsonl file that prepare_data writes)."""
    path = Path(PREPARED) / name
    if not path.is_file():
        raise TndError(f"{path}: not found; run `dvc repro prepare_data`")
    return read_jsonl(path)


def snapshot_path(step: int) -> Path:
    """The student's weights at PPO step `step` (train_ppo keeps them at tnd.checkpoint.snapshot_due's steps for
    evaluate's word curve)."""
    return Path(CHECKPOINTS) / "students" / f"step-{step:06d}.pt"


def age_checkpoint_path(step: int, folder: str | Path = TEACHER_AGES) -> Path:
    """The teacher's weights at pretraining step `step` (train_teacher keeps them for sample_ages)."""
    return Path(folder) / f"step-{step:06d}"


def age_checkpoint_steps() -> list[int]:
    """Steps of the teacher checkpoints train_teacher kept (its index beside them), sorted; none without one."""
    index = Path(TEACHER_AGES) / AGE_INDEX
    return read_json(index)["steps"] if index.is_file() else []


def snapshot_steps() -> list[int]:
    """Steps of the kept student snapshots, sorted."""
    return sorted(int(p.stem.removeprefix("step-")) for p in (Path(CHECKPOINTS) / "students").glob("step-*.pt"))
