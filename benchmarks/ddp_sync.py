"""Gradient synchronisation of CustomPPOTrainer on accelerate's DDP: 2 gloo processes on CPU, the
default student (params.yaml `student.arch`, randomly initialised: the cost does not depend on the
weights) with its teacher and reward model, the default PPO batch.

Measured in one run, per optimizer step of a PPO mini-batch (the median of --repeats):
  backward_sync_ms     the backward with DDP synchronising (bucketed all-reduce, overlapped with the backward)
  backward_local_ms    the same backward under `no_sync` (no communication)
  sync_ms              their difference: what synchronisation adds to an optimizer step
  flat_allreduce_ms    one all_reduce of every gradient as one flat tensor: the floor any scheme pays
  per_param_ms         one blocking all_reduce per parameter: what tnd/trainers/distributed.py did before
                       the trainer moved onto accelerate
  token_counts_ms      the all-reduce of a mini-batch's three token counts, which makes each loss a mean over
                       every process's tokens (`_token_weights`), and `token_counts_share`: all of a step's
                       (ppo_epochs x mini-batches) as a share of the step's time
and the median time of a whole `trainer.step()`. Goal: sync_ms at most 1.2 x flat_allreduce_ms.

    python benchmarks/ddp_sync.py            # -> benchmarks/results/ddp-sync-cpu.json
    python benchmarks/ddp_sync.py --smoke    # tiny models, proves it runs (--out to keep the JSON)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tnd.config import load_params  # noqa: E402
from tnd.data.nursery import generate_sentences  # noqa: E402
from stages.common import free_port  # noqa: E402
from tnd.data.prompts import make_prompts  # noqa: E402
from tnd.data.tokenizer import train_bpe  # noqa: E402
from tnd.models import build_causal_lm  # noqa: E402
from tnd.trainers import CustomPPOConfig, CustomPPOTrainer  # noqa: E402
from tnd.reward import build_reward_model  # noqa: E402

SMOKE_ARCH = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=20, help="timed backward passes / all-reduces each")
    p.add_argument("--steps", type=int, default=3, help="timed trainer steps (after one warm-up step)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def worker(rank: int, port: int, args, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes on a 2-core machine
    params = load_params(ROOT / "params.yaml")
    raw = params.model_dump()
    arch = lambda section: SimpleNamespace(**{**raw[section]["arch"], **(SMOKE_ARCH if args.smoke else {})})  # noqa: E731
    texts = generate_sentences(400 if args.smoke else 4000, raw["seed"])
    tokenizer = train_bpe(texts, 400 if args.smoke else raw["tokenizer"]["vocab_size"])
    prompts = [row["prompt_ids"] for row in make_prompts(tokenizer, texts, 256, raw["data"]["prompt_tokens"], 0)]
    overrides = dict(mode="trials_only", kernel_backend="torch")
    if args.smoke:
        overrides.update(batch_size=8, mini_batch_size=4, ppo_epochs=1, max_new_tokens=4)
    config = CustomPPOConfig.from_params(params, **overrides)
    trainer = CustomPPOTrainer(build_causal_lm(arch("teacher"), tokenizer, 1), build_causal_lm(arch("student"), tokenizer, 2),
                               build_reward_model(arch("reward"), tokenizer, 3), config, prompts, tokenizer=tokenizer)
    accelerator = trainer.accelerator

    step_s = []
    for i in range(1 + args.steps):
        batch = trainer.next_prompts()
        dist.barrier()
        start = time.perf_counter()
        trainer.step(batch)
        if i:
            step_s.append(time.perf_counter() - start)

    stats: dict = {}
    rollout = trainer.rollout(trainer.next_prompts(), stats)
    index = torch.arange(config.mini_batch_size // accelerator.num_processes)
    empty = torch.zeros(0, dtype=torch.long)

    def backward(sync: bool) -> None:
        loss, _ = trainer.minibatch_loss(rollout, index, None, empty)  # the forward is not timed
        dist.barrier()
        start = time.perf_counter()
        if sync:
            loss.backward()
        else:
            with accelerator.no_sync(trainer.policy):
                loss.backward()
        timings[sync].append(time.perf_counter() - start)
        trainer.optimizer.zero_grad(set_to_none=True)

    timings = {True: [], False: []}
    for _ in range(args.repeats):  # alternate, so that other load falls on both alike
        backward(False)
        backward(True)
    backward_sync, backward_local = (1e3 * statistics.median(timings[s]) for s in (True, False))

    params = [p for p in trainer.policy.parameters() if p.requires_grad]
    grads = [torch.randn_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    flat_ms = median_ms(lambda: dist.all_reduce(flat), args.repeats)
    per_param_ms = median_ms(lambda: [dist.all_reduce(g) for g in grads], args.repeats)
    counts = torch.tensor([40.0, 0.0, 12.0], dtype=torch.float64)
    counts_ms = median_ms(lambda: trainer._tokens_per_process(counts), args.repeats)
    counts_share = counts_ms * 1e-3 * config.ppo_epochs * config.num_mini_batches / statistics.median(step_s)
    if rank == 0:
        record = {
            "meta": {"processes": 2, "backend": dist.get_backend(), "torch": torch.__version__, "smoke": args.smoke,
                     "parameters": int(flat.numel()), "tensors": len(params), "mini_batch_rows_per_process": len(index),
                     "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
            "backward_sync_ms": backward_sync, "backward_local_ms": backward_local,
            "sync_ms": backward_sync - backward_local, "flat_allreduce_ms": flat_ms, "per_param_ms": per_param_ms,
            "sync_over_flat": (backward_sync - backward_local) / flat_ms, "step_s": statistics.median(step_s),
            "token_counts_ms": counts_ms, "token_counts_share": counts_share,
        }
        Path(out).write_text(json.dumps(record, indent=1) + "\n")
    # No dist.destroy_process_group() here: the process group is accelerate's, torn down as the process
    # exits; destroying it first left one worker hanging at exit in 3 of 5 runs.


def main() -> None:
    args = parse_args()
    if args.smoke:
        args.repeats, args.steps = 2, 1
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = str(Path(tmp) / "record.json")
        mp.spawn(worker, args=(port, args, scratch), nprocs=2, join=True)
        record = json.loads(Path(scratch).read_text())
    print(f"{record['meta']['parameters']:,} parameters in {record['meta']['tensors']} tensors, 2 gloo processes")
    for key in ("backward_sync_ms", "backward_local_ms", "sync_ms", "flat_allreduce_ms", "per_param_ms",
                "token_counts_ms"):
        print(f"{key:20s}{record[key]:10.2f}")
    print(f"sync / flat all-reduce: {record['sync_over_flat']:.2f}x (goal <= 1.2); "
          f"per-parameter loop / flat: {record['per_param_ms'] / record['flat_allreduce_ms']:.2f}x; "
          f"trainer step {record['step_s']:.2f} s")
    print(f"token counts all-reduce {record['token_counts_ms']:.3f} ms per mini-batch, "
          f"{100 * record['token_counts_share']:.2f}% of a step")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / "ddp-sync-cpu.json"
    if args.out or not args.smoke:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
