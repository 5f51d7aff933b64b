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

The bytes-vs-quality curve (issue 31), for cache.targets topk_tail at k = 8, 32, 64, 128 (compact) and
sampled at S = 4, 12, 32 draws:

  * bytes      per token of one default-size shard + index.json at each --vocabs size: topk_tail from random
               rows (its size does not depend on the values), sampled from the 32k teacher's own draws (its
               size follows the distinct ids per row)
  * stored KL  KL(exact || stored) over the k + 1 buckets for topk_tail, and the tail mass the buckets hide;
               for sampled KL(teacher || stored) is infinite (the draws' distribution is 0 off the draws):
               the mean distinct ids per row instead
  * id codes   what the top-128 ids would take under zstd of the packed stream, delta (Rice) coding and a
               frequency table's entropy code (`id_coding`)
  * end to end on the default (nursery) data at the small sizes of E2E: prepare_data, train_teacher and
               train_reward once, then per setting the cache and per student seed train_ppo in demos_only
               mode and evaluate: the student's held-out KL(teacher || student) and grammaticality
               (`end_to_end`); the figure docs/img/cache-format-curve.png (`plot_curve`)

    python benchmarks/cache_format.py            # -> benchmarks/results/cache-format-curve-cpu.json (an hour+ on 2 cores)
    python benchmarks/cache_format.py --e2e none # no end-to-end runs (minutes)
    python benchmarks/cache_format.py --reuse benchmarks/results/cache-format-curve-cpu.json  # the end-to-end runs only
    python benchmarks/cache_format.py --smoke --e2e "sampled S=4" --seeds 1 --out /tmp/x.json   # proves it runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safetensors.torch import save as safetensors_save

from tnd.cache import (
    INDEX,
    CacheWriter,
    cache_bytes,
    index_bits,
    pack_bits,
    shard_prompts,
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
    from tnd.cache import teacher_topk

    vocab = len(tokenizer)
    kls: dict[str, list[torch.Tensor]] = {dtype: [] for dtype in FORMATS}
    top1, mass, n_rows = [], [], 0
    scratch = tempfile.TemporaryDirectory()  # the writers only encode: nothing is written there
    writers = {dtype: CacheWriter(scratch.name, vocab_size=vocab, k=min(K, vocab), dtype=dtype) for dtype in FORMATS}
    for logits in teacher_logit_rows(teacher, tokenizer, prompts, max_new_tokens, batch_size):
        logprobs, indices, tails = teacher_topk(logits, min(K, vocab))
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
    curve = curve_rows(teacher, tokenizer, prompts, 24)
    record = {"teacher": f"32k: BPE {len(tokenizer)} tokens on {sum(map(len, train))} chars of stdlib source, "
                         f"Llama hidden 128 x 2 layers, {args.steps32k} steps (train loss {result['train_loss']:.2f})",
              "build_seconds": built, **reconstruction(teacher, tokenizer, prompts, 24),
              "settings": curve["rows"], "id_coding_k128": id_coding(curve["ids128"], len(tokenizer))}
    return record, curve["draws"]


# --- the bytes-vs-quality curve (issue 31) ------------------------------------------------------

KS = (8, 32, 64, 128)
SAMPLES = (4, 12, 32)


def curve_settings() -> list[dict]:
    return ([{"targets": "topk_tail", "top_k": k} for k in KS] + [{"targets": "sampled", "samples": s} for s in SAMPLES])


def setting_name(setting: dict) -> str:
    return f"topk_tail k={setting['top_k']}" if setting["targets"] == "topk_tail" else f"sampled S={setting['samples']}"


def teacher_logit_rows(teacher, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 64):
    """The teacher's logits [rows, V] at the continuation positions of its own samples of `prompts`, a batch at a time."""
    from tnd.cache import teacher_logit_chunks
    from tnd.generation import sample_continuations

    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        continuations = sample_continuations(teacher, tokenizer, batch, max_new_tokens, seed=start, batch_size=len(batch),
                                             progress=False)
        sequences = [p + c for p, c in zip(batch, continuations)]
        yield torch.cat(list(teacher_logit_chunks(teacher, sequences, [len(p) for p in batch], tokenizer.pad_token_id,
                                                  vocab_size=len(tokenizer))))


def id_coding(indices: torch.Tensor, vocab: int) -> dict:
    """Bytes per row of a row's k top-k ids [N, k] under the codes tried: the stored bit-packing, zstd of that
    packed stream (a whole shard, levels 3 and 19), delta coding (ids sorted, gaps Rice-coded with the row's best
    parameter, plus log2(k!) bits to restore the order) and the ideal entropy code of a per-cache frequency table
    (order 0, and by rank: one table per top-k position), table not counted: the bound no such coder beats."""
    n, k = indices.shape
    bits = index_bits(vocab)
    packed = pack_bits(indices, bits)
    out = {"rows": n, "k": k, "vocab": vocab, "packed": packed.shape[1]}
    try:
        import zstandard
    except ImportError:
        out["zstd"] = "zstandard not installed"
    else:
        raw = packed.numpy().tobytes()
        for level in (3, 19):
            out[f"zstd_{level}"] = len(zstandard.ZstdCompressor(level=level).compress(raw)) / n
    gaps = indices.sort(dim=-1).values.double()
    gaps = torch.cat([gaps[:, :1], gaps.diff(dim=-1) - 1], dim=-1)  # >= 0
    best = None
    for r in range(0, bits):  # Rice(r): quotient in unary (q + 1 bits) + r bits
        cost = ((gaps / (1 << r)).floor() + 1 + r).sum(-1)
        best = cost if best is None else torch.minimum(best, cost + 5)  # 5 bits name the parameter
    out["delta_rice"] = float((best + math.lgamma(k + 1) / math.log(2)).mean()) / 8
    flat = indices.reshape(-1)
    freq = torch.bincount(flat, minlength=vocab).double()
    p = freq / freq.sum()
    out["entropy_order0"] = float(-(torch.log2(p[flat])).sum()) / 8 / n
    by_rank = 0.0
    for j in range(k):
        f = torch.bincount(indices[:, j], minlength=vocab).double()
        by_rank += float(-(torch.log2((f / f.sum())[indices[:, j]])).sum())
    out["entropy_by_rank"] = by_rank / 8 / n
    return out


def curve_rows(teacher, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> dict:
    """Per setting on one teacher's rows: the (k+1)-bucket KL of the compact code for topk_tail (the stored
    distribution from the exact one), the mass the tail bucket hides; for sampled the mean distinct ids of a row
    (KL(teacher || stored) is infinite: the draws' distribution is 0 off the draws). And the draws themselves,
    for the bytes of `curve_bytes`, and the top-128 ids, for `id_coding`."""
    from tnd.cache import sample_targets, teacher_topk

    vocab = len(tokenizer)
    scratch = tempfile.TemporaryDirectory()
    writers = {k: CacheWriter(scratch.name, vocab_size=vocab, k=min(k, vocab)) for k in KS}
    kls: dict[int, list] = {k: [] for k in KS}
    tails: dict[int, list] = {k: [] for k in KS}
    draws: dict[int, list] = {s: [] for s in SAMPLES}
    ids128 = []
    generator = torch.Generator().manual_seed(0)
    for logits in teacher_logit_rows(teacher, tokenizer, prompts, max_new_tokens):
        for k, writer in writers.items():
            logprobs, indices, tail = teacher_topk(logits, min(k, vocab))
            kls[k].append(writer.encode(logprobs, indices, tail)["kl"])
            tails[k].append(tail.exp())
            if k == 128:
                ids128.append(indices)
        for s in SAMPLES:
            draws[s].append(sample_targets(logits, s, 1.0, generator))
    scratch.cleanup()
    rows = {}
    for k in KS:
        rows[f"topk_tail k={k}"] = {"kl_stored_from_teacher_buckets": kl_stats(torch.cat(kls[k])),
                                    "mean_tail_mass": float(torch.cat(tails[k]).mean())}
    for s in SAMPLES:
        d = torch.cat(draws[s])
        distinct = (d[:, 1:] != d[:, :-1]).sum(-1) + 1
        rows[f"sampled S={s}"] = {"kl_stored_from_teacher": None, "distinct_mean": float(distinct.double().mean())}
    return {"rows": rows, "draws": {s: torch.cat(v) for s, v in draws.items()}, "ids128": torch.cat(ids128)}


def curve_bytes(vocab: int, n_seq: int, draws: dict[int, torch.Tensor], generator: torch.Generator) -> dict:
    """Bytes per token of one default-size shard + index.json per setting at `vocab`: topk_tail with the compact code
    (random rows: its size does not depend on the values), sampled with a teacher's real draws (the size follows the
    distinct ids per row), cycled to fill the shard."""
    sequences = [torch.randint(0, vocab, (PROMPT + CONTINUATION,), generator=generator) for _ in range(n_seq)]
    n_tokens = n_seq * CONTINUATION
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for setting in curve_settings():
            path = Path(tmp) / setting_name(setting).replace(" ", "_")
            if setting["targets"] == "topk_tail":
                rows = random_rows(n_tokens, vocab, setting["top_k"], generator)
                writer = CacheWriter(path, vocab_size=vocab, k=setting["top_k"], shard_tokens=None)
            else:
                d = draws[setting["samples"]]
                rows = (d.repeat(math.ceil(n_tokens / d.shape[0]), 1)[:n_tokens],)
                writer = CacheWriter(path, vocab_size=vocab, targets="sampled", samples=setting["samples"],
                                     shard_tokens=None)
            writer.add_batch(sequences, [PROMPT] * n_seq, *rows)
            writer.close()
            out[setting_name(setting)] = cache_bytes(path) / n_tokens
    return out


# --- end to end: train_ppo demos_only on each setting ---------------------------------------------

E2E = {  # the sizes of the end-to-end runs: small enough for 2 CPU cores, large enough to read
    "data": {"n_train": 4000, "n_valid": 200, "n_eval": 300, "n_prompts": 500, "n_eval_prompts": 200},
    "teacher": {"arch": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 192},
                "train": {"steps": 400, "batch_size": 32, "warmup_steps": 40, "eval_every": 100},
                "eval": {"n_samples": 16, "max_new_tokens": 16}},
    "student": {"arch": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 96},
                "train": {"steps": 20, "batch_size": 32, "warmup_steps": 5, "eval_every": 0}},
    "reward": {"arch": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
               "train": {"steps": 8, "batch_size": 8, "warmup_steps": 2, "eval_every": 0}},
    "cache": {"n_prompts": 512, "max_new_tokens": 16, "batch_size": 64},
    "ppo": {"steps": 60, "batch_size": 4, "mini_batch_size": 4, "ppo_epochs": 1, "max_new_tokens": 8, "learning_rate": 3e-3,
            "warmup_steps": 0, "save_every": 1000, "keep_student_snapshots": False},
    "tnd": {"mode": "demos_only", "demo_batch_size": 32},
    "eval": {"n_prompts": 200},
    "tracking": {"enabled": False},
}


SMOKE_E2E = {"data": {"n_train": 300, "n_valid": 40, "n_eval": 40, "n_prompts": 40, "n_eval_prompts": 16},
             "tokenizer": {"vocab_size": 400}, "teacher": {"train": {"steps": 4, "eval_every": 0}},
             "student": {"train": {"steps": 2}}, "cache": {"n_prompts": 16, "max_new_tokens": 6},
             "ppo": {"steps": 2}, "tnd": {"demo_batch_size": 4}, "eval": {"n_prompts": 8}}


def merge_sizes(base: dict, override: dict) -> dict:
    from tests.conftest import merge

    return merge(base, override)


def end_to_end(settings: list[dict], seeds: list[int], sizes: dict, save: Callable[[dict], None]) -> dict:
    """prepare_data, train_teacher and train_reward once; then per setting cache_teacher_logits and score_rewards,
    and per seed (student.seed: the student's initialisation, warm-up and PPO) train_ppo in demos_only mode and
    evaluate: the student's held-out KL(teacher || student) per token on the eval texts and the share of its
    continuations the nursery grammar accepts. `save` gets the record after every run."""
    import yaml

    from stages import (cache_teacher_logits, evaluate, prepare_data, score_rewards, train_ppo, train_reward,
                        train_teacher)

    merge = merge_sizes
    base = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), sizes)
    cwd = os.getcwd()
    results, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            def write(params: dict) -> None:
                Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

            write(base)
            for stage in (prepare_data, train_teacher, train_reward):
                stage.main([])
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
            record = {"date": datetime.date.today().isoformat(), "commit": commit, "loadavg": os.getloadavg(),
                      "sizes": sizes, "seeds": seeds, "upstream_seconds": time.perf_counter() - started,
                      "teacher": default_curve(base), "runs": results}
            save(record)
            for setting in settings:
                params = merge(base, {"cache": setting})
                write(params)
                t0 = time.perf_counter()
                for stage in (cache_teacher_logits, score_rewards):
                    stage.main([])
                cache_metrics = json.loads(Path("metrics/cache.json").read_text())
                for seed in seeds:
                    write(merge(params, {"student": {"seed": seed}}))
                    for folder in ("checkpoints", "models/student", "models/initial_student"):
                        shutil.rmtree(folder, ignore_errors=True)
                    t1 = time.perf_counter()
                    train_ppo.main([])
                    evaluate.main([])
                    ev = json.loads(Path("metrics/eval.json").read_text())
                    row = {"setting": setting_name(setting), **setting, "student_seed": seed,
                           "bytes_per_token": cache_metrics["bytes_per_token"], "index_bits": cache_metrics["index_bits"],
                           "kl_to_teacher": ev["student"]["kl_to_teacher"], "grammaticality": ev["student"]["grammaticality"],
                           "initial_kl_to_teacher": ev["initial_student"]["kl_to_teacher"],
                           "initial_grammaticality": ev["initial_student"]["grammaticality"],
                           "teacher_grammaticality": ev["teacher"]["grammaticality"],
                           "seconds": time.perf_counter() - t1, "cache_seconds": cache_metrics["seconds"]}
                    print(f"  {row['setting']:<16} seed {seed}: {row['bytes_per_token']:6.1f} bytes/token (this vocabulary), "
                          f"held-out KL {row['kl_to_teacher']:.4f} (initial {row['initial_kl_to_teacher']:.4f}), "
                          f"grammatical {row['grammaticality']:.3f} ({row['seconds']:.0f} s)", flush=True)
                    results.append(row)
                    save(record)
                print(f"  {setting_name(setting)}: {time.perf_counter() - t0:.0f} s", flush=True)
        finally:
            os.chdir(cwd)
    return record


def default_curve(params: dict) -> dict:
    """`curve_rows` and `id_coding` on the teacher the end-to-end runs distil (cwd: their project)."""
    from tnd.data.tokenizer import load_tokenizer
    from tnd.io import read_jsonl
    from tnd.models import load_causal_lm

    tokenizer = load_tokenizer("artifacts/tokenizer")
    teacher = load_causal_lm("models/teacher", tokenizer, role="teacher").eval()
    prompts = [list(row["prompt_ids"]) for row in read_jsonl("data/prepared/prompts.jsonl")][:256]
    curve = curve_rows(teacher, tokenizer, prompts, params["cache"]["max_new_tokens"])
    return {"vocab": len(tokenizer), "prompts": len(prompts), "settings": curve["rows"],
            "id_coding_k128": id_coding(curve["ids128"], len(tokenizer))}


def plot_curve(record: dict, path: Path, vocab: str = "128256") -> None:
    """Held-out KL and grammaticality of the end-to-end students against the bytes/token their setting takes at
    `vocab` (mean over seeds, bars from the lowest to the highest seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = record["curve"]
    sizes = curve["bytes_per_token"][vocab]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for targets, marker in (("topk_tail", "o"), ("sampled", "s")):
        names = [n for n in sizes if n.startswith(targets) and any(r["setting"] == n for r in curve["end_to_end"]["runs"])]
        names.sort(key=lambda n: sizes[n])
        for ax, key in zip(axes, ("kl_to_teacher", "grammaticality")):
            values = [[r[key] for r in curve["end_to_end"]["runs"] if r["setting"] == n] for n in names]
            mean = [sum(v) / len(v) for v in values]
            low = [m - min(v) for m, v in zip(mean, values)]
            high = [max(v) - m for m, v in zip(mean, values)]
            ax.errorbar([sizes[n] for n in names], mean, yerr=[low, high], marker=marker, capsize=3, label=targets)
            for n, m in zip(names, mean):
                ax.annotate(n.split(" ")[1], (sizes[n], m), textcoords="offset points", xytext=(4, 4), fontsize=7)
    initial = curve["end_to_end"]["runs"][0]
    axes[0].axhline(initial["initial_kl_to_teacher"], color="grey", ls=":", label="student before")
    axes[1].axhline(initial["teacher_grammaticality"], color="grey", ls="--", label="teacher")
    for ax, label in zip(axes, ("student's held-out KL(teacher || student), nats/token", "grammatical continuations")):
        ax.set_xscale("log")
        ax.set_xlabel(f"cache bytes / token at V = {int(vocab):,}")
        ax.set_ylabel(label, fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    parser.add_argument("--e2e", default="all", help="end-to-end settings: all, none, or names as 'topk_tail k=128,sampled S=12'")
    parser.add_argument("--seeds", default="1,2", help="student seeds of each end-to-end setting")
    parser.add_argument("--out", default=None)
    parser.add_argument("--figure", default=str(ROOT / "docs/img/cache-format-curve.png"))
    parser.add_argument("--plot", default=None, help="only draw --figure from this results file")
    parser.add_argument("--reuse", default=None,
                        help="keep the bytes and stored-KL parts of this results file and run only the end-to-end part")
    args = parser.parse_args(argv)
    if args.plot:
        plot_curve(json.loads(Path(args.plot).read_text()), Path(args.figure))
        return
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.reuse:
        record = json.loads(Path(args.reuse).read_text())
        run_end_to_end(args, record, Path(args.out or args.reuse), record["curve"])
        return
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
    record_32k, draws_32k = teacher_32k(args)
    teachers.append(record_32k)
    for row in teachers:
        kl = "  ".join(f"{dtype} {stats['mean']:.2e} (p99 {stats['p99']:.1e})" for dtype, stats in row["kl"].items())
        print(f"{row['teacher']}\n  V = {row['vocab']}, {row['rows']} rows, top-1 p {row['mean_top1_prob']:.3f}, "
              f"top-k mass {row['mean_topk_mass']:.3f}; mean KL: {kl}")
    curve = {"bytes_per_token": {v: curve_bytes(int(v), n_seq, draws_32k, generator) for v in args.vocabs.split(",")},
             "bytes_from": "topk_tail: the compact code; sampled: the 32k teacher's draws (its distinct ids per row), "
                           "one default-size shard + index.json", "teacher_32k": record_32k["settings"]}
    for vocab, row in curve["bytes_per_token"].items():
        print(f"V = {vocab:>6}  " + "  ".join(f"{name} {value:.1f}" for name, value in row.items()))
    print("id coding, k = 128, 32k teacher (bytes/row):", json.dumps(record_32k["id_coding_k128"]))
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
        "curve": curve,
    }
    out = Path(args.out) if args.out else None if args.smoke else ROOT / "benchmarks/results/cache-format-curve-cpu.json"
    run_end_to_end(args, record, out, curve)


def run_end_to_end(args, record: dict, out: Optional[Path], curve: dict) -> None:
    """The end-to-end runs of --e2e into curve["end_to_end"], `record` written to `out` after every run (a stopped
    benchmark keeps its runs), then the figure."""
    by_name = {setting_name(st): st for st in curve_settings()}
    chosen = list(by_name.values()) if args.e2e == "all" else [by_name[n] for n in args.e2e.split(",") if n in by_name]

    def save(end_to_end_so_far: Optional[dict] = None) -> None:
        if end_to_end_so_far is not None:
            curve["end_to_end"] = end_to_end_so_far
        if out is not None:
            atomic_write_json(out, record)

    save()
    if args.e2e != "none" and chosen:
        sizes_e2e = E2E if not args.smoke else merge_sizes(E2E, SMOKE_E2E)
        end_to_end(chosen, [int(x) for x in args.seeds.split(",")], sizes_e2e, save)
        if not args.smoke:
            plot_curve(record, Path(args.figure))
    if out is not None:
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
