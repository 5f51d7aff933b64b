"""Stage cache_teacher_logits: the teacher's demonstrations and its top-k log-probs, on disk.

The teacher samples one continuation per prompt (data/prepared/prompts.jsonl, the first
cache.n_prompts, cycled if there are fewer), then a forward pass over prompt +
continuation gives, at every position that predicts a continuation token, the top-k of
log_softmax(logits / cache.temperature) and the log of the remaining mass.

Writes cache/teacher/ (format: tnd/cache.py) and metrics/cache.json. In the metrics, a
token is a target (continuation) token, i.e. one stored top-k row; sample_seconds is the
time spent sampling, write_seconds the teacher forward passes + top-k + shard writes, and
tokens_per_second = n_tokens / write_seconds.
"""

from __future__ import annotations

import time
from pathlib import Path

from tnd.cache import CacheWriter, cache_bytes, fingerprint_model, fingerprint_tokenizer
from tnd.config import Params
from tnd.data.tokenizer import load_tokenizer
from tnd.errors import TndError
from tnd.generation import sample_continuations
from tnd.io import atomic_dir, atomic_write_json, read_jsonl
from tnd.models import load_causal_lm
from tnd.tracking import Tracker

from stages.common import CACHE, METRICS, PREPARED, TEACHER, TOKENIZER, run_stage


def load_prompts(n: int) -> list[list[int]]:
    path = Path(PREPARED) / "prompts.jsonl"
    rows = read_jsonl(path)
    if not rows:
        raise TndError(f"{path}: no prompts; rerun `dvc repro prepare_data`")
    return [list(rows[i % len(rows)]["prompt_ids"]) for i in range(n)]


def cache_teacher_logits(params: Params, run: Tracker) -> None:
    cfg = params.cache
    tokenizer = load_tokenizer(TOKENIZER)
    teacher = load_causal_lm(TEACHER, tokenizer, role="teacher")
    teacher.eval()
    # Ids beyond the tokenizer (padded embedding rows) can never be decoded or learnt by a
    # student built on this tokenizer, so the stored distribution is over the tokenizer's ids.
    vocab = len(tokenizer)
    if cfg.top_k > vocab:
        raise TndError(f"cache.top_k = {cfg.top_k} exceeds the vocabulary size ({vocab}); set cache.top_k <= {vocab}")
    prompts = load_prompts(cfg.n_prompts)
    max_positions = getattr(teacher.config, "max_position_embeddings", None)
    longest = max(len(p) for p in prompts) + cfg.max_new_tokens
    if max_positions and longest > max_positions:
        raise TndError(
            f"cache.max_new_tokens = {cfg.max_new_tokens}: prompts + continuations reach {longest} tokens, "
            f"more than the teacher's max_position_embeddings ({max_positions}); lower cache.max_new_tokens"
        )

    started = time.perf_counter()
    continuations = sample_continuations(
        teacher,
        tokenizer,
        prompts,
        cfg.max_new_tokens,
        params.seed,
        temperature=cfg.sample_temperature,
        top_k=cfg.sample_top_k,
        top_p=cfg.sample_top_p,
        batch_size=cfg.batch_size,
        desc="teacher demonstrations",
    )
    sample_seconds = time.perf_counter() - started

    started = time.perf_counter()
    with atomic_dir(CACHE) as out:
        writer = CacheWriter(
            out,
            vocab_size=vocab,
            k=cfg.top_k,
            temperature=cfg.temperature,
            dtype=cfg.dtype,
            teacher_fingerprint=fingerprint_model(teacher),
            tokenizer_fingerprint=fingerprint_tokenizer(tokenizer),
            shard_tokens=cfg.shard_tokens,
        )
        writer.add_demonstrations(teacher, prompts, continuations, tokenizer.pad_token_id, cfg.batch_size)
        index = writer.close()
    write_seconds = time.perf_counter() - started

    on_disk = cache_bytes(CACHE)
    n_tokens = index["n_tokens"]
    per_token = on_disk / max(n_tokens, 1)
    metrics = {
        "n_sequences": index["n_sequences"],
        "n_tokens": n_tokens,
        "n_shards": len(index["shards"]),
        "bytes_on_disk": on_disk,
        "bytes_per_token": per_token,
        "dense_fp16_bytes_per_token": 2 * vocab,
        "compression_vs_dense": 2 * vocab / per_token if per_token else None,
        "sample_seconds": sample_seconds,
        "write_seconds": write_seconds,
        "tokens_per_second": n_tokens / write_seconds if write_seconds > 0 else None,
    }
    atomic_write_json(Path(METRICS) / "cache.json", metrics)
    run.log_metrics({k: v for k, v in metrics.items() if v is not None})
    print(
        f"cache_teacher_logits: {metrics['n_sequences']} sequences, {n_tokens} tokens, "
        f"{per_token:.1f} bytes/token ({metrics['compression_vs_dense'] or 0:.1f}x smaller than dense fp16)"
    )


def main(argv: list[str] | None = None) -> None:
    run_stage("cache_teacher_logits", cache_teacher_logits, argv)


if __name__ == "__main__":
    main()
