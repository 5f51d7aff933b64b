"""Stage cache_teacher_logits: the teacher's demonstrations and its distribution over them, on disk.

The teacher samples one continuation per prompt (data/prepared/prompts.jsonl, the first
cache.n_prompts, cycled if there are fewer), then a forward pass over prompt +
continuation gives, at every position that predicts a continuation token, by cache.targets: the
top-k of log_softmax(logits / cache.temperature) and the log of the remaining mass (topk_tail), or
cache.samples draws from softmax(logits / cache.temperature), kept as distinct ids and counts (sampled).

Several processes: with engine.processes > 1 the stage starts itself again under `accelerate launch`
(stages/common.py), as train_ppo does; each process samples and writes its share of the shards
(shard j holds a fixed range of prompts; process r writes shards r, r + R, ...; each batch of prompts
is sampled with the seed params.seed + the index of its first prompt) and process 0 writes index.json
once all have finished, so the cache is the same files whatever the number of processes
(tnd/cache/writer.py: `write_teacher_cache`). Memory per batch: the teacher's body on cache.batch_size
sequences, then its output head on cache.chunk_tokens positions at a time.

Writes cache/teacher/ (format: tnd/cache/codec.py) and metrics/cache.json. In the metrics, a
token is a target (continuation) token, i.e. one stored row; sample_seconds is the
time spent sampling, write_seconds the teacher forward passes + top-k + encoding + shard writes
(both summed over the processes), seconds the wall time of both, tokens_per_second =
n_tokens / write_seconds, and reconstruction_kl_mean / _max the KL of the stored (k+1)-bucket
distribution from the exact one (0 for float32; the rounding of the compact code or of float16;
topk_tail only), distinct_mean the mean distinct ids of a sampled row (sampled only).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from stages.common import CACHE, METRICS, PREPARED, TEACHER, TOKENIZER, run_stage
from tnd.cache import cache_bytes, index_bits, write_teacher_cache
from tnd.config import Params
from tnd.data.tokenizer import load_tokenizer
from tnd.errors import TndError
from tnd.io import atomic_write_json, read_jsonl
from tnd.models import load_causal_lm
from tnd.tracking import Tracker


def load_prompts(n: int) -> list[list[int]]:
    path = Path(PREPARED) / "prompts.jsonl"
    rows = read_jsonl(path)
    if not rows:
        raise TndError(f"{path}: no prompts; rerun `dvc repro prepare_data`")
    return [list(rows[i % len(rows)]["prompt_ids"]) for i in range(n)]


def launch_accelerator():
    """accelerate's view of the launch (rank, world size, device), or None for a plain single process."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def cache_teacher_logits(params: Params, run: Tracker) -> None:
    cfg = params.cache
    accelerator = launch_accelerator()
    tokenizer = load_tokenizer(TOKENIZER)
    teacher = load_causal_lm(TEACHER, tokenizer, role="teacher")
    teacher.eval()
    if accelerator is not None:
        teacher.to(accelerator.device)
    elif torch.cuda.is_available():
        teacher.to("cuda")
    # Ids beyond the tokenizer (padded embedding rows) can never be decoded or learnt by a
    # student built on this tokenizer, so the stored distribution is over the tokenizer's ids.
    vocab = len(tokenizer)
    width = "top_k" if cfg.targets == "topk_tail" else "samples"
    if getattr(cfg, width) > vocab:  # sampled: each row's slots hold distinct ids, fillers included
        raise TndError(f"cache.{width} = {getattr(cfg, width)} exceeds the vocabulary size ({vocab}); "
                       f"set cache.{width} <= {vocab}")
    prompts = load_prompts(cfg.n_prompts)
    max_positions = getattr(teacher.config, "max_position_embeddings", None)
    longest = max(len(p) for p in prompts) + cfg.max_new_tokens
    if max_positions and longest > max_positions:
        raise TndError(
            f"cache.max_new_tokens = {cfg.max_new_tokens}: prompts + continuations reach {longest} tokens, "
            f"more than the teacher's max_position_embeddings ({max_positions}); lower cache.max_new_tokens"
        )

    started = time.perf_counter()
    index = write_teacher_cache(
        CACHE, teacher, tokenizer, prompts,
        k=cfg.top_k, max_new_tokens=cfg.max_new_tokens, seed=params.seed, temperature=cfg.temperature,
        dtype=cfg.dtype, targets=cfg.targets, samples=cfg.samples, sample_temperature=cfg.sample_temperature,
        sample_top_k=cfg.sample_top_k,
        sample_top_p=cfg.sample_top_p, batch_size=cfg.batch_size, shard_tokens=cfg.shard_tokens,
        chunk_tokens=cfg.chunk_tokens, accelerator=accelerator,
    )
    seconds = time.perf_counter() - started
    if index is None:  # not process 0: its shards are written, process 0 wrote the index
        return

    on_disk = cache_bytes(CACHE)
    n_tokens = index["n_tokens"]
    per_token = on_disk / max(n_tokens, 1)
    timing = index["timing"]
    metrics = {
        "n_sequences": index["n_sequences"],
        "n_tokens": n_tokens,
        "n_shards": len(index["shards"]),
        "processes": accelerator.num_processes if accelerator is not None else 1,
        "targets": index["targets"],
        "format": index.get("dtype", "sampled"),
        "index_bits": index_bits(vocab),
        "bytes_on_disk": on_disk,
        "bytes_per_token": per_token,
        "dense_fp16_bytes_per_token": 2 * vocab,
        "compression_vs_dense": 2 * vocab / per_token if per_token else None,
        **({"reconstruction_kl_mean": index["reconstruction_kl"]["mean"],
            "reconstruction_kl_max": index["reconstruction_kl"]["max"]} if "reconstruction_kl" in index
           else {"samples": index["samples"], "distinct_mean": index["distinct_mean"]}),
        "sample_seconds": timing["sample_seconds"],
        "write_seconds": timing["write_seconds"],
        "seconds": seconds,
        "tokens_per_second": n_tokens / timing["write_seconds"] if timing["write_seconds"] > 0 else None,
    }
    atomic_write_json(Path(METRICS) / "cache.json", metrics)
    run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None})
    stored = (f"{index['dtype']} log-probs, reconstruction KL {metrics['reconstruction_kl_mean']:.2e} mean"
              if "reconstruction_kl" in index else f"{index['samples']} draws, {index['distinct_mean']:.2f} distinct ids mean")
    print(
        f"cache_teacher_logits: {metrics['n_sequences']} sequences, {n_tokens} tokens, "
        f"{per_token:.1f} bytes/token ({metrics['compression_vs_dense'] or 0:.1f}x smaller than dense fp16), {stored}"
    )


def main(argv: list[str] | None = None) -> None:
    run_stage("cache_teacher_logits", cache_teacher_logits, argv, multi_process=True)


if __name__ == "__main__":
    main()
