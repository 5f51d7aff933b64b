"""Teacher-logit cache formats: bytes per token and reconstruction error (CPU).

Bytes per token, at V = 32,000 and 128,256 with k = 128, of one shard of the default size
(cache.shard_tokens 65536: 2,688 sequences of a 3-token prompt + 24 continuation tokens, the default
pipeline's shape) plus its share of index.json, for:

  * v2         the previous layout (format_version 2): float16 log-probs, int16 (V < 32768) or int32
               indices, float32 tail; written here as that code wrote it
  * compact    format 3, the default: bit-packed ceil(log2 V)-bit indices, the 2.875-bit log-prob code,
               float16 step, float32 tail (tnd/cache/codec.py)
  * float16    format 3 with float16 log-probs (bit-packed indices)

Reconstruction error: the mean (and median, 99th percentile, max) over stored rows of KL(exact || stored)
between the exact (k+1)-bucket teacher distribution (top-k log-probs in float32 + the tail) and the one
the cache gives back, for each format, on the rows the stage would store: teacher-sampled continuations
of prompts, then the teacher's top-k at each continuation position (`teacher_rows`). Two teachers:

  * default    the pipeline's teacher (models/teacher, after `dvc repro train_teacher`) on
               data/prepared/prompts.jsonl, cache.max_new_tokens 24
  * 32k        a teacher with a 32,000-token vocabulary built here: a byte-level BPE of 32,000 tokens
               trained on the Python standard library's source (sys.base_prefix; no download) and a small
               Llama (hidden 128, 2 layers) trained --steps32k steps on it; prompts are the first 4 tokens
               of held-out chunks

    python benchmarks/cache_format.py            # -> benchmarks/results/cache-format-cpu.json (a few minutes)
    python benchmarks/cache_format.py --smoke --out /tmp/x.json   # tiny sizes: proves it runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safetensors.torch import save as safetensors_save

from tnd.cache import (
    INDEX,
    CacheWriter,
    cache_bytes,
    index_bits,
    shard_prompts,
    teacher_rows,
)
from tnd.io import atomic_write_json

K = 128
PROMPT, CONTINUATION = 3, 24
FORMATS = ("compact", "float16", "bfloat16")


# --- bytes per token ---------------------------------------------------------------------------


def random_rows(n: int, vocab: int, k: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Sorted top-k log-probs, distinct indices and a tail for n rows: sizes do not depend on the values."""
    logprobs = -(torch.rand(n, k, generator=generator) * 20).sort(dim=-1).values - 0.05
    indices = torch.stack([torch.randperm(vocab, generator=generator)[:k] for _ in range(min(n, 64))])
    indices = indices.repeat(math.ceil(n / indices.shape[0]), 1)[:n]
    return logprobs, indices, torch.full((n,), math.log(0.1))


def write_v2_shard(path: Path, sequences: list[list[int]], logprobs, indices, tails, vocab: int) -> int:
    """One shard and index.json in format 2 (the code before this one), as it wrote them; returns the bytes."""
    n_seq = len(sequences)
    targets = [len(s) - PROMPT for s in sequences]
    tensors = {
        "input_ids": torch.tensor([t for s in sequences for t in s], dtype=torch.int32),
        "seq_offsets": torch.tensor([0] + [len(s) for s in sequences], dtype=torch.int64).cumsum(0),
        "prompt_lengths": torch.full((n_seq,), PROMPT, dtype=torch.int32),
        "topk_logprobs": logprobs.to(torch.float16),
        "topk_indices": indices.to(torch.int16 if vocab < 32768 else torch.int32),
        "tail_logmass": tails.float(),
        "target_offsets": torch.tensor([0] + targets, dtype=torch.int64).cumsum(0),
    }
    data = safetensors_save(tensors, metadata={"format_version": "2"})
    (path / "shard-00000.safetensors").write_bytes(data)
    index = {"format_version": 2, "teacher_fingerprint": "0" * 64, "tokenizer_fingerprint": "0" * 64,
             "vocab_size": vocab, "k": K, "temperature": 1.0, "dtype": "float16", "n_sequences": n_seq,
             "n_tokens": sum(targets), "shards": [{"file": "shard-00000.safetensors", "n_sequences": n_seq,
                                                    "n_tokens": sum(targets), "bytes": len(data), "sha256": "0" * 64}]}
    (path / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return cache_bytes(path)


def bytes_per_token(vocab: int, n_seq: int, generator: torch.Generator) -> list[dict]:
    sequences = [torch.randint(0, vocab, (PROMPT + CONTINUATION,), generator=generator).tolist() for _ in range(n_seq)]
    n_tokens = n_seq * CONTINUATION
    logprobs, indices, tails = random_rows(n_tokens, vocab, K, generator)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v2"
        path.mkdir()
        total = write_v2_shard(path, sequences, logprobs, indices, tails, vocab)
        out.append({"vocab": vocab, "format": "v2", "description": "format 2: float16 log-probs, int16/int32 indices",
                    "bytes_per_token": total / n_tokens})
        for dtype in ("compact", "float16"):
            path = Path(tmp) / dtype
            started = time.perf_counter()
            writer = CacheWriter(path, vocab_size=vocab, k=K, dtype=dtype, shard_tokens=None)
            for i in range(0, n_seq, 64):  # a stage batch at a time, as the stage adds them
                rows = slice(i * CONTINUATION, min(i + 64, n_seq) * CONTINUATION)
                writer.add_batch([torch.tensor(s) for s in sequences[i : i + 64]], [PROMPT] * len(sequences[i : i + 64]),
                                 logprobs[rows], indices[rows], tails[rows])
            writer.close()
            encode_s = time.perf_counter() - started
            out.append({"vocab": vocab, "format": f"v3-{dtype}", "description": f"format 3, {dtype} log-probs, "
                        f"{index_bits(vocab)}-bit indices", "bytes_per_token": cache_bytes(path) / n_tokens,
                        "encode_rows_per_s": n_tokens / encode_s})
    return out


# --- reconstruction error ----------------------------------------------------------------------


def kl_stats(kl: torch.Tensor) -> dict:
    kl = kl.double()
    return {"mean": float(kl.mean()), "median": float(kl.median()), "p99": float(torch.quantile(kl, 0.99)),
            "max": float(kl.max())}


def reconstruction(teacher, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 64) -> dict:
    """KL statistics of each format over the rows of teacher-sampled continuations of `prompts`."""
    from tnd.generation import sample_continuations

    vocab = len(tokenizer)
    kls: dict[str, list[torch.Tensor]] = {dtype: [] for dtype in FORMATS}
    top1, mass, n_rows = [], [], 0
    scratch = tempfile.TemporaryDirectory()  # the writers only encode: nothing is written there
    writers = {dtype: CacheWriter(scratch.name, vocab_size=vocab, k=min(K, vocab), dtype=dtype) for dtype in FORMATS}
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        continuations = sample_continuations(teacher, tokenizer, batch, max_new_tokens, seed=start, batch_size=len(batch),
                                             progress=False)
        sequences = [p + c for p, c in zip(batch, continuations)]
        logprobs, indices, tails = teacher_rows(teacher, sequences, [len(p) for p in batch], tokenizer.pad_token_id,
                                                k=min(K, vocab), temperature=1.0, vocab_size=vocab)
        for dtype, writer in writers.items():
            kls[dtype].append(writer.encode(logprobs, indices, tails)["kl"])
        top1.append(logprobs[:, 0].exp())
        mass.append(-torch.expm1(tails))
        n_rows += logprobs.shape[0]
    scratch.cleanup()
    return {
        "vocab": vocab, "k": min(K, vocab), "rows": n_rows, "prompts": len(prompts),
        "mean_top1_prob": float(torch.cat(top1).mean()), "mean_topk_mass": float(torch.cat(mass).mean()),
        "kl": {dtype: kl_stats(torch.cat(parts)) for dtype, parts in kls.items()},
    }


def default_teacher(args) -> dict:
    from tnd.data.tokenizer import load_tokenizer
    from tnd.io import read_jsonl
    from tnd.models import load_causal_lm

    project = Path(args.project)
    tokenizer = load_tokenizer(project / "artifacts/tokenizer")
    teacher = load_causal_lm(project / "models/teacher", tokenizer, role="teacher").eval()
    prompts = [list(row["prompt_ids"]) for row in read_jsonl(project / "data/prepared/prompts.jsonl")][: args.prompts]
    return {"teacher": f"default ({project / 'models/teacher'})", **reconstruction(teacher, tokenizer, prompts, 24)}


def stdlib_texts(max_chars: int) -> list[str]:
    """Chunks of about 20 lines of the standard library's Python source, in path order."""
    base = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    texts, total = [], 0
    for file in sorted(base.rglob("*.py")):
        if "site-packages" in file.parts or "test" in file.parts or "tests" in file.parts:
            continue
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except (UnicodeDecodeError, OSError):
            continue
        for i in range(0, len(lines), 20):
            chunk = "\n".join(lines[i : i + 20]).strip()
            if len(chunk) > 40:
                texts.append(chunk)
                total += len(chunk)
        if total >= max_chars:
            break
    return texts


def teacher_32k(args) -> dict:
    from tnd.config import ArchParams, LMTrainParams
    from tnd.data.tokenizer import encode, train_bpe
    from tnd.models import build_causal_lm
    from tnd.trainers.lm import pretrain_lm

    started = time.perf_counter()
    texts = stdlib_texts(args.corpus_chars)
    held_out, train = texts[::50], [t for i, t in enumerate(texts) if i % 50]
    tokenizer = train_bpe(train, vocab_size=args.vocab32k, min_frequency=2)
    arch = ArchParams(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=384, max_position_embeddings=128)
    teacher = build_causal_lm(arch, tokenizer, seed=0)
    cfg = LMTrainParams(steps=args.steps32k, batch_size=16, learning_rate=3e-3, warmup_steps=min(50, args.steps32k),
                        max_length=64, eval_every=0)
    result = pretrain_lm(teacher, tokenizer, train, cfg, seed=0, desc="32k teacher")
    teacher.eval()
    prompts = [[tokenizer.bos_token_id, *encode(tokenizer, t)[:4]] for t in held_out][: args.prompts]
    built = time.perf_counter() - started
    return {"teacher": f"32k: BPE {len(tokenizer)} tokens on {sum(map(len, train))} chars of stdlib source, "
                       f"Llama hidden 128 x 2 layers, {args.steps32k} steps (train loss {result['train_loss']:.2f})",
            "build_seconds": built, **reconstruction(teacher, tokenizer, prompts, 24)}


# --- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocabs", default="32000,128256")
    parser.add_argument("--project", default=str(ROOT), help="where the pipeline ran (models/teacher, ...)")
    parser.add_argument("--prompts", type=int, default=512, help="prompts per teacher for the KL")
    parser.add_argument("--steps32k", type=int, default=400)
    parser.add_argument("--vocab32k", type=int, default=32000)
    parser.add_argument("--corpus-chars", type=int, default=12_000_000)  # enough for 32,000 BPE tokens
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: proves the script runs")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    n_seq = shard_prompts(65536, CONTINUATION, 64)  # the default shard: 2,688 sequences
    if args.smoke:
        n_seq, args.prompts, args.steps32k, args.vocab32k, args.corpus_chars = 64, 8, 3, 600, 60_000
    generator = torch.Generator().manual_seed(0)
    sizes = [row for vocab in map(int, args.vocabs.split(",")) for row in bytes_per_token(vocab, n_seq, generator)]
    for row in sizes:
        print(f"V = {row['vocab']:>6}  {row['format']:<11} {row['bytes_per_token']:6.1f} bytes/token  ({row['description']})")

    teachers = []
    if (Path(args.project) / "models/teacher").is_dir():
        teachers.append(default_teacher(args))
    else:
        print(f"no default teacher at {args.project}/models/teacher (run `dvc repro train_teacher`): skipped")
    teachers.append(teacher_32k(args))
    for row in teachers:
        kl = "  ".join(f"{dtype} {stats['mean']:.2e} (p99 {stats['p99']:.1e})" for dtype, stats in row["kl"].items())
        print(f"{row['teacher']}\n  V = {row['vocab']}, {row['rows']} rows, top-1 p {row['mean_top1_prob']:.3f}, "
              f"top-k mass {row['mean_topk_mass']:.3f}; mean KL: {kl}")

    record = {
        "meta": {
            "date": datetime.date.today().isoformat(), "k": K, "shape": f"{PROMPT}-token prompt + {CONTINUATION} "
            f"continuation tokens per sequence, one shard of {n_seq} sequences + index.json",
            "smoke": args.smoke, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count(), "index_bits": {v: index_bits(int(v))
                                                                                 for v in args.vocabs.split(",")},
            "loadavg": os.getloadavg(),
        },
        "bytes_per_token": sizes,
        "reconstruction": teachers,
    }
    out = Path(args.out) if args.out else None if args.smoke else ROOT / "benchmarks/results/cache-format-cpu.json"
    if out is not None:
        atomic_write_json(out, record)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
