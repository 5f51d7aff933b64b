"""A few CustomPPOTrainer steps with the Triton kernels and with the torch backend, on one device:
their losses side by side, generation and update tokens/s, and peak memory.

Both runs start from the same models, prompts and demonstrations with the same seed, so they
differ only in `kernels.backend`: their first-step losses agree to rounding, and later steps
drift apart only as far as rounding differences grow through training.

Runs where dvc and mlflow are missing (the GPU image; pydantic comes from wheels carried in .whl/, see
benchmarks/run_gpu.sh): the models are built from params.yaml's `*.arch` sections (the student gets its `student.train`
LM warm-up, the teacher `--teacher-steps` LM steps, the reward model stays random: speed does
not depend on it), the tokenizer is trained on nursery sentences and `--demos` teacher
demonstrations are cached into a temporary directory.

    python benchmarks/trainer_backends.py            # CUDA: default models -> results/trainer-backends-<gpu>.json
    TRITON_INTERPRET=1 python benchmarks/trainer_backends.py --smoke --device cpu --out /tmp/x.json
                                                     # CPU, tiny: proves it runs (timings mean nothing)

Token counts and phases as benchmarks/ppo_step.py: generation tok/s = sampled response tokens /
sampling seconds; update tok/s = ppo_epochs x (prompt + response tokens) of the batch / seconds of
the step outside sampling and reward scoring (the demonstrations' distillation passes included).
Peak memory: torch.cuda.max_memory_allocated over the measured steps (CUDA only).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tnd.cache import CacheWriter, TeacherCache  # noqa: E402
from tnd.config import CustomPPOConfig, Params, load_params  # noqa: E402
from tnd.data.nursery import generate_sentences  # noqa: E402
from tnd.data.prompts import make_prompts  # noqa: E402
from tnd.data.tokenizer import train_bpe  # noqa: E402
from tnd.engine import make_accelerator  # noqa: E402
from tnd.generation import sample_continuations  # noqa: E402
from tnd.models import build_causal_lm  # noqa: E402
from tnd.trainers import CustomPPOTrainer  # noqa: E402
from tnd.trainers.lm import pretrain_lm  # noqa: E402
from tnd.reward import build_reward_model  # noqa: E402

SMOKE_ARCH = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
COMPARED = ("loss/total", "loss/policy", "loss/value", "loss/distill", "objective/kl", "policy/approx_kl",
            "env/reward_mean")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=8, help="measured steps per backend")
    p.add_argument("--warmup", type=int, default=2, help="steps per backend before measuring (Triton compiles here)")
    p.add_argument("--demos", type=int, default=512, help="teacher demonstrations to cache")
    p.add_argument("--teacher-steps", type=int, default=300, help="LM steps for the teacher")
    p.add_argument("--params", default=str(ROOT / "params.yaml"))
    p.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"),
                   help="engine.mixed_precision for both runs (under `accelerate launch --config_file configs/fsdp.yaml`: FSDP)")
    p.add_argument("--smoke", action="store_true", help="tiny models, 1 + 1 steps: proves it runs")
    p.add_argument("--out", default=None, help="JSON path (default: results/trainer-backends-<device>.json)")
    return p.parse_args(argv)


def arch(raw: dict, smoke: bool) -> SimpleNamespace:
    return SimpleNamespace(**{**raw, **(SMOKE_ARCH if smoke else {})})


def build(raw: dict, args, device: torch.device):
    """Tokenizer, teacher, warm student, reward model, demonstrations cache (in a temporary dir), prompts."""
    seed = raw["seed"]
    n_texts = 400 if args.smoke else raw["data"]["n_train"]
    texts = generate_sentences(n_texts, seed)
    tokenizer = train_bpe(texts, 400 if args.smoke else raw["tokenizer"]["vocab_size"], raw["tokenizer"]["min_frequency"])
    teacher = build_causal_lm(arch(raw["teacher"]["arch"], args.smoke), tokenizer, seed + 1)
    student = build_causal_lm(arch(raw["student"]["arch"], args.smoke), tokenizer, seed)
    reward = build_reward_model(arch(raw["reward"]["arch"], args.smoke), tokenizer, seed + 2)
    teacher_train = SimpleNamespace(**{**raw["teacher"]["train"], "steps": 5 if args.smoke else args.teacher_steps})
    student_train = SimpleNamespace(**{**raw["student"]["train"], **({"steps": 5} if args.smoke else {})})
    teacher.to(device), student.to(device), reward.to(device)
    # accelerate fixes one mixed precision per process: the pretraining takes the trainer's
    accelerator = make_accelerator(args.mixed_precision)
    pretrain_lm(teacher, tokenizer, texts, teacher_train, seed, desc="teacher", accelerator=accelerator)
    pretrain_lm(student, tokenizer, texts, student_train, seed, desc="student warm-up", accelerator=accelerator)

    prompts = [row["prompt_ids"] for row in make_prompts(
        tokenizer, texts, max(args.demos, 64), raw["data"]["prompt_tokens"], seed)]

    cache_dir = Path(tempfile.mkdtemp(prefix="trainer-backends-"))
    cache_cfg = raw["cache"]
    demo_prompts = prompts[: 16 if args.smoke else args.demos]
    continuations = sample_continuations(teacher, tokenizer, demo_prompts, cache_cfg["max_new_tokens"], seed,
                                         batch_size=cache_cfg["batch_size"], desc="demonstrations")
    vocab = len(tokenizer)
    with CacheWriter(cache_dir, vocab_size=vocab, k=min(cache_cfg["top_k"], vocab), temperature=cache_cfg["temperature"],
                     dtype=cache_cfg["dtype"]) as writer:
        writer.add_demonstrations(teacher, demo_prompts, continuations, tokenizer.pad_token_id, cache_cfg["batch_size"])
    return tokenizer, teacher, student, reward, TeacherCache(cache_dir), prompts


def run_backend(backend: str, params: Params, models, args, device: torch.device) -> dict:
    tokenizer, teacher, student, reward, cache, prompts = models
    overrides = {"kernel_backend": backend, "mixed_precision": args.mixed_precision}
    if args.smoke:
        overrides.update(batch_size=8, mini_batch_size=4, ppo_epochs=1, max_new_tokens=4, demo_batch_size=4)
    config = CustomPPOConfig.from_params(params, **overrides)
    torch.manual_seed(params.seed)
    trainer = CustomPPOTrainer(teacher, copy.deepcopy(student), reward, config, train_dataset=prompts,
                               demonstrations=cache, tokenizer=tokenizer)
    phase: dict = {}

    def timed(name, fn):
        def wrapper(*a, **kw):
            sync(device)
            t = time.perf_counter()
            out = fn(*a, **kw)
            sync(device)
            phase[name] = time.perf_counter() - t
            if name == "generation":
                phase["responses"] = out
            return out
        return wrapper

    trainer._sample = timed("generation", trainer._sample)
    trainer.compute_scores = timed("scoring", trainer.compute_scores)
    steps = []
    for i in range(args.warmup + args.steps):
        if i == args.warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        batch = trainer.next_prompts()
        sync(device)
        t = time.perf_counter()
        stats = trainer.step(batch)
        sync(device)
        total = time.perf_counter() - t
        update_s = total - phase["generation"] - phase["scoring"]
        tokens = sum(len(p) + len(r) for p, r in zip(batch, phase["responses"]))
        steps.append({"stats": {k: stats[k] for k in COMPARED},
                      "generation_tok_s": sum(map(len, phase["responses"])) / phase["generation"],
                      "update_tok_s": config.ppo_epochs * tokens / update_s, "update_s": update_s})
    measured = steps[args.warmup:]
    # save_checkpoint / load_checkpoint round trip (under FSDP: sharded): the step after a reload repeats the step
    # after the save, up to the device's nondeterminism
    with tempfile.TemporaryDirectory(prefix="trainer-backends-ckpt-") as ckpt:
        trainer.save_checkpoint(ckpt)
        after_save = trainer.step(trainer.next_prompts())
        trainer.load_checkpoint(ckpt)
        after_load = trainer.step(trainer.next_prompts())
    roundtrip = max(relative_diff(after_save[k], after_load[k]) for k in COMPARED)
    median = lambda key: sorted(s[key] for s in measured)[len(measured) // 2]  # noqa: E731
    return {
        "steps": steps,
        "generation_tok_s": median("generation_tok_s"),
        "update_tok_s": median("update_tok_s"),
        "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "padding_free": sorted(set(trainer._packed.values())),
        "engine": str(trainer.accelerator.distributed_type), "mixed_precision": args.mixed_precision,
        "checkpoint_roundtrip_max_rel_diff": roundtrip,
    }


def relative_diff(a: float, b: float) -> float:
    """|a - b| / |a|; 0 when both are NaN (a stat the step does not have), inf when only one is."""
    if math.isnan(a) or math.isnan(b):
        return 0.0 if math.isnan(a) and math.isnan(b) else math.inf
    return abs(a - b) / max(abs(a), 1e-8)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(a: dict, b: dict) -> list[dict]:
    """Per step, |triton - torch| of each compared stat (relative to the torch value where it is not ~0)."""
    rows = []
    for sa, sb in zip(a["steps"], b["steps"]):
        row = {}
        for key in COMPARED:
            x, y = sa["stats"][key], sb["stats"][key]
            row[key] = {"triton": x, "torch": y, "abs_diff": abs(x - y), "rel_diff": abs(x - y) / max(abs(y), 1e-8)}
        rows.append(row)
    return rows


def main() -> None:
    args = parse_args()
    if args.smoke:
        args.steps, args.warmup = 1, 1
    device = torch.device(args.device)
    params = load_params(args.params)
    torch.manual_seed(params.seed)
    models = build(params.model_dump(), args, device)
    results = {backend: run_backend(backend, params, models, args, device) for backend in ("triton", "torch")}
    diffs = compare(results["triton"], results["torch"])
    name = torch.cuda.get_device_name(device).replace(" ", "-") if device.type == "cuda" else "cpu"
    engine = results["torch"]["engine"].lower().removeprefix("distributedtype.")
    if engine != "no" or args.mixed_precision != "no":
        name = f"{name}-{engine}-{args.mixed_precision}"
    record = {
        "meta": {"device": name, "torch": torch.__version__, "smoke": args.smoke, "steps": args.steps,
                 "warmup": args.warmup, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "results": {k: {kk: vv for kk, vv in v.items() if kk != "steps"} for k, v in results.items()},
        "per_step": diffs,
    }
    print(f"{'':24s}{'triton':>14s}{'torch':>14s}{'triton/torch':>14s}")
    for key in ("generation_tok_s", "update_tok_s", "peak_memory_mib"):
        a, b = results["triton"][key], results["torch"][key]
        if a is not None:
            print(f"{key:24s}{a:14.1f}{b:14.1f}{a / b:14.2f}")
    first = diffs[0]
    print("step 1 losses (triton vs torch): " + ", ".join(
        f"{k} {v['triton']:.5g} / {v['torch']:.5g}" for k, v in first.items()))
    print("largest relative difference over all steps: " + ", ".join(
        f"{k} {max(row[k]['rel_diff'] for row in diffs):.2e}" for k in COMPARED))
    print("checkpoint round trip (step after load vs after save), largest relative difference: " + ", ".join(
        f"{b} {results[b]['checkpoint_roundtrip_max_rel_diff']:.2e}" for b in results))
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"trainer-backends-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
