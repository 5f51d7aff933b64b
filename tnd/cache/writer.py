"""Writing a cache: the teacher's rows in bounded memory, `CacheWriter`, and `write_teacher_cache`
(sampling the demonstrations, by one process or several). The layout: `tnd/cache/codec.py`."""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from safetensors.torch import save as safetensors_save
from tqdm.auto import tqdm

from tnd.batching import right_pad
from tnd.generation import sample_continuations
from tnd.io import atomic_dir, atomic_write_bytes, atomic_write_json

from .codec import (
    DTYPES,
    FORMAT_VERSION,
    INDEX,
    SHARD_KEYS,
    TARGETS,
    decode_logprobs,
    encode_logprobs,
    encode_samples,
    index_bits,
    levels,
    pack_bits,
    reconstruction_kl,
    value_bytes,
)
from .fingerprints import fingerprint_model, fingerprint_tokenizer

VOCAB_SLICE = 16384  # vocabulary columns upcast to float32 at a time in teacher_topk
SAMPLE_FLOATS = 1 << 22  # float32 probabilities in memory at a time in sample_targets (16 MiB)


def teacher_topk(
    logits: torch.Tensor, k: int, temperature: float = 1.0, vocab_slice: int = VOCAB_SLICE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(topk_logprobs [N,k] fp32, topk_indices [N,k] int64, tail_logmass [N] fp32) from logits [N,V].

    logprobs are log_softmax(logits / temperature); the tail is the log of the mass outside the
    top-k (-inf when k == V). The top-k is taken in the logits' own dtype (bf16 logits stay bf16);
    the sums run over `vocab_slice` columns at a time upcast to float32, so no [N, V] float32 copy
    is made. The tail is summed over the entries outside the top-k relative to the largest of them
    (exp clamped at 0, so each top-k entry adds exactly 1, taken off after a float64 sum): it stays
    exact when the top-k mass is close to 1 (no 1 - sum cancellation).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    n, vocab = logits.shape
    if not 1 <= k <= vocab:
        raise ValueError(f"k = {k} must be between 1 and the vocabulary size ({vocab})")
    scale = 1.0 / float(temperature)
    raw, indices = torch.topk(logits, min(k + 1, vocab), dim=-1, sorted=True)
    top = raw[:, :k].float()
    top = top * scale if scale != 1.0 else top  # the same float32 op as on the slices below
    head = top[:, :1]
    top_sum = torch.exp(top - head).sum(-1)
    if k == vocab:
        total = head.squeeze(-1) + torch.log(top_sum)
        return top - total.unsqueeze(-1), indices[:, :k], torch.full((n,), -math.inf, device=logits.device)
    # The largest logit outside the top-k; every entry at or above it (the k top ones, and ties of
    # it) counts exp(0) = 1 below, so the k top-k entries add exactly k, taken off after the sum.
    rest_max = raw[:, k : k + 1].float() * scale
    rest_max = torch.where(torch.isfinite(rest_max), rest_max, top[:, -1:])  # the rest is all -inf
    rest_sum = torch.zeros(n, dtype=torch.float64, device=logits.device)
    for start in range(0, vocab, vocab_slice):
        x = logits[:, start : start + vocab_slice].float()
        x = x * scale if scale != 1.0 else x
        rest_sum += torch.exp(torch.sub(x, rest_max).clamp_max_(0.0)).sum(-1, dtype=torch.float64)
    rest_log = rest_max.squeeze(-1) + torch.log((rest_sum - k).clamp_min(0.0)).float()
    total = torch.logaddexp(head.squeeze(-1) + torch.log(top_sum), rest_log)
    return top - total.unsqueeze(-1), indices[:, :k], rest_log - total



def sample_targets(
    logits: torch.Tensor, samples: int, temperature: float, generator: torch.Generator
) -> torch.Tensor:
    """int64 [N, samples]: draws with replacement from softmax(logits / temperature) per row of
    logits [N, V], sorted within a row; a few rows at a time, so no [N, V] float32 copy is made."""
    n, vocab = logits.shape
    rows = max(1, SAMPLE_FLOATS // max(vocab, 1))
    out = [
        torch.multinomial(torch.softmax(logits[i : i + rows].float() / float(temperature), dim=-1), samples,
                          replacement=True, generator=generator)
        for i in range(0, n, rows)
    ]
    return torch.cat(out).sort(dim=-1).values if out else torch.zeros(0, samples, dtype=torch.long)


def target_seed(seed: int) -> int:
    """The seed of a batch's sampled targets, from the seed its continuations were sampled with:
    a different stream, so that the first draws do not repeat the draws of the continuation's tokens."""
    return int.from_bytes(hashlib.sha256(f"sampled targets {int(seed)}".encode()).digest()[:8], "little") >> 1


class CacheWriter:
    """Appends sequences and their teacher targets (top-k + tail, or sampled: `targets`); writes shards
    as they fill, index.json on close.

    Write into a fresh directory (the stage uses `tnd.io.atomic_dir`): shards are written
    atomically one by one and index.json last, so a crash leaves no index (or the old one)
    and the half-written cache does not read as valid.

        with CacheWriter(tmp, vocab_size=V, k=32, ...) as writer:
            writer.add(prompt + continuation, len(prompt), logits[len(prompt) - 1 : -1])

    With shard_tokens=None shards are written only by `flush(number)`, under the number given
    (several processes writing one cache; `write_teacher_cache`). Sampled targets are drawn with a
    generator seeded from `seed` (`target_seed`), reseeded by `add_demonstrations(..., seed=)`.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        vocab_size: int,
        k: int = 128,
        temperature: float = 1.0,
        dtype: str = "compact",
        targets: str = "topk_tail",
        samples: int = 12,
        seed: int = 0,
        teacher_fingerprint: str = "",
        tokenizer_fingerprint: str = "",
        shard_tokens: Optional[int] = 65536,
        chunk_tokens: int = 1024,
    ):
        if dtype not in DTYPES:
            raise ValueError(f"dtype = {dtype!r}; allowed: {', '.join(DTYPES)}")
        if targets not in TARGETS:
            raise ValueError(f"targets = {targets!r}; allowed: {', '.join(TARGETS)}")
        width, name = (k, "k") if targets == "topk_tail" else (samples, "samples")
        if not 1 <= width <= vocab_size:
            raise ValueError(f"{name} = {width} must be between 1 and vocab_size ({vocab_size})")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.vocab_size, self.k, self.temperature = int(vocab_size), int(k), float(temperature)
        self.dtype, self.targets, self.samples = dtype, targets, int(samples)
        self.sampled = targets == "sampled"
        self.seed = target_seed(seed)
        self._generators: dict[str, torch.Generator] = {}
        self.bits = index_bits(self.vocab_size)
        self.teacher_fingerprint, self.tokenizer_fingerprint = teacher_fingerprint, tokenizer_fingerprint
        self.shard_tokens = None if shard_tokens is None else int(shard_tokens)
        self.chunk_tokens = int(chunk_tokens)
        self.shards: list[dict] = []
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self._ids: list[torch.Tensor] = []
        self._prompt_lengths: list[int] = []
        self._target_lengths: list[int] = []
        self._rows: dict[str, list[torch.Tensor]] = {}
        self._kl_sum, self._kl_max, self._distinct = 0.0, 0.0, 0
        self._n_targets = 0

    def add(self, input_ids: Sequence[int] | torch.Tensor, prompt_len: int, logits: torch.Tensor) -> None:
        """One demonstration: its full token ids, its prompt length, and the teacher logits
        [len(input_ids) - prompt_len, V] at the positions that predict each continuation token
        (that is, logits[prompt_len - 1 : len(input_ids) - 1] of a forward pass over input_ids)."""
        if self.sampled:
            ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
            if not 1 <= prompt_len <= ids.numel() or logits.shape[0] != ids.numel() - prompt_len:
                raise ValueError(f"expected logits of {ids.numel() - prompt_len} rows (one per continuation token) "
                                 f"and 1 <= prompt_len <= {ids.numel()}, got {logits.shape[0]} rows, prompt_len {prompt_len}")
            self.add_batch([ids], [int(prompt_len)], self.draw(logits))
            return
        topk = teacher_topk(logits, self.k, self.temperature) if logits.shape[0] else None
        self.add_topk(input_ids, prompt_len, *(topk or self._empty_rows()))

    def draw(self, logits: torch.Tensor) -> torch.Tensor:
        """The sampled targets [N, samples] of teacher logits [N, V], from this writer's generator on
        the logits' device (one stream per device, continued from call to call)."""
        device = str(logits.device)
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=logits.device).manual_seed(self.seed)
        return sample_targets(logits, self.samples, self.temperature, self._generators[device])

    def add_topk(
        self,
        input_ids: Sequence[int] | torch.Tensor,
        prompt_len: int,
        topk_logprobs: torch.Tensor,
        topk_indices: torch.Tensor,
        tail_logmass: torch.Tensor,
    ) -> None:
        """Like `add`, with the top-k rows already computed (see `teacher_topk`)."""
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
        n_targets = ids.numel() - int(prompt_len)
        if prompt_len < 1 or n_targets < 0:
            raise ValueError(f"prompt_len = {prompt_len} must be in [1, len(input_ids) = {ids.numel()}]")
        if topk_logprobs.shape != (n_targets, self.k) or topk_indices.shape != (n_targets, self.k):
            raise ValueError(
                f"expected top-k rows of shape ({n_targets}, {self.k}) (one per continuation token), "
                f"got {tuple(topk_logprobs.shape)} and {tuple(topk_indices.shape)}"
            )
        if tail_logmass.shape != (n_targets,):
            raise ValueError(f"expected tail_logmass of shape ({n_targets},), got {tuple(tail_logmass.shape)}")
        self.add_batch([ids], [int(prompt_len)], topk_logprobs, topk_indices, tail_logmass)

    def add_batch(self, sequences: list[torch.Tensor], prompt_lens: list[int], *rows: torch.Tensor) -> None:
        """Sequences (int64 ids), their prompt lengths and their rows, concatenated in sequence order
        (not validated: see `add_topk`): (logprobs, indices, tails) of `teacher_topk` for topk_tail,
        (draws,) of `sample_targets` for sampled. The rows are encoded now."""
        if self.closed:
            raise RuntimeError("CacheWriter is closed")
        n_rows = int(rows[0].shape[0])
        rows = self.encode(*rows)
        kl = rows.pop("kl", None)
        if kl is not None and kl.numel():
            self._kl_sum += float(kl.sum())
            self._kl_max = max(self._kl_max, float(kl.max()))
        if self.sampled:
            self._distinct += int(rows["sample_ids"].numel())
        for name, value in rows.items():
            self._rows.setdefault(name, []).append(value)
        for ids, prompt_len in zip(sequences, prompt_lens):
            self._ids.append(ids.to(torch.int32))
            self._prompt_lengths.append(prompt_len)
            self._target_lengths.append(ids.numel() - prompt_len)
        self._n_targets += n_rows
        if self.shard_tokens is not None and self._n_targets >= self.shard_tokens:
            self.flush()

    def encode(self, *rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored form of rows (as `add_batch` takes them; CPU tensors by shard tensor name, the
        sampled ids still unpacked), and for topk_tail `kl` [N]: each row's `reconstruction_kl` (the
        stored distribution decoded against the exact one)."""
        if self.sampled:
            (draws,) = rows
            draws = draws.detach().cpu()
            if draws.shape[1:] != (self.samples,):
                raise ValueError(f"expected sampled rows of shape (N, {self.samples}), got {tuple(draws.shape)}")
            if draws.numel() and not 0 <= int(draws.min()) <= int(draws.max()) < self.vocab_size:
                raise ValueError(f"sampled ids must lie in [0, vocab_size = {self.vocab_size})")
            groups, distinct = encode_samples(draws)
            return {"sample_groups": groups, "sample_ids": distinct}
        logprobs, indices, tails = rows
        logprobs = logprobs.detach().to("cpu", torch.float32)
        indices = indices.detach().cpu()
        tails = tails.detach().to("cpu", torch.float32).contiguous()
        if self.dtype == "compact" and self.k > 1 and not bool((logprobs[:, 1:] <= logprobs[:, :-1]).all()):
            logprobs, order = logprobs.sort(dim=-1, descending=True, stable=True)  # the code needs them sorted
            indices = indices.gather(1, order)
        if indices.numel() and not 0 <= int(indices.min()) <= int(indices.max()) < self.vocab_size:
            raise ValueError(f"top-k indices must lie in [0, vocab_size = {self.vocab_size})")
        rows = {"topk_indices": pack_bits(indices, self.bits), "tail_logmass": tails}
        if self.dtype == "compact":
            rows["topk_codes"], rows["topk_step"] = encode_logprobs(logprobs)
            stored = decode_logprobs(rows["topk_codes"], rows["topk_step"], tails, self.k)
        else:
            rows["topk_logprobs"] = logprobs.to(DTYPES[self.dtype])
            stored = rows["topk_logprobs"].float()
        rows["kl"] = reconstruction_kl(logprobs, stored)
        return rows

    @torch.no_grad()
    def add_demonstrations(
        self,
        teacher: torch.nn.Module,
        prompts: Sequence[Sequence[int]],
        continuations: Sequence[Sequence[int]],
        pad_id: int,
        batch_size: int,
        seed: Optional[int] = None,
    ) -> None:
        """Each prompt + its continuation, with the teacher's targets at the continuation's positions,
        from one forward pass per `batch_size` demonstrations (`teacher_logit_chunks`: the output head on
        chunk_tokens rows at a time). The teacher's logits beyond `vocab_size` (padded embedding
        rows) are dropped. With `seed`, the sampled targets are drawn afresh from `target_seed(seed)`,
        so that they depend on this call's demonstrations only."""
        if seed is not None:
            self.seed, self._generators = target_seed(seed), {}
        for start in range(0, len(prompts), batch_size):
            batch_prompts = [list(p) for p in prompts[start : start + batch_size]]
            sequences = [p + list(c) for p, c in zip(batch_prompts, continuations[start : start + batch_size])]
            chunks = teacher_logit_chunks(teacher, sequences, [len(p) for p in batch_prompts], pad_id,
                                          vocab_size=self.vocab_size, chunk_tokens=self.chunk_tokens)
            if self.sampled:
                rows: tuple = (torch.cat([self.draw(c).cpu() for c in chunks] or [torch.zeros(0, self.samples).long()]),)
            else:
                rows = _cat_rows([teacher_topk(c, self.k, self.temperature) for c in chunks], self.k)
            self.add_batch([torch.tensor(s, dtype=torch.long) for s in sequences], [len(p) for p in batch_prompts],
                           *rows)

    def _empty_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.zeros(0, self.k), torch.zeros(0, self.k, dtype=torch.long), torch.zeros(0)

    def flush(self, number: Optional[int] = None) -> Optional[dict]:
        """Write what was added since the last shard as shard `number` (default: the next one);
        returns its index entry (None when nothing was added)."""
        if not self._ids:
            return None
        seq_lengths = torch.tensor([0] + [t.numel() for t in self._ids], dtype=torch.int64)
        target_lengths = torch.tensor([0] + self._target_lengths, dtype=torch.int64)
        tensors = {
            "input_ids": torch.cat(self._ids),
            "seq_offsets": seq_lengths.cumsum(0),
            "prompt_lengths": torch.tensor(self._prompt_lengths, dtype=torch.int32),
            "target_offsets": target_lengths.cumsum(0),
            **{name: torch.cat(parts).contiguous() for name, parts in self._rows.items()},
        }
        if self.sampled:  # one bit string for the shard: no row pads its ids to a whole byte
            tensors["sample_ids"] = pack_bits(tensors["sample_ids"].reshape(1, -1), self.bits).reshape(-1)
        data = safetensors_save(tensors, metadata={"format_version": str(FORMAT_VERSION)})
        name = f"shard-{len(self.shards) if number is None else number:05d}.safetensors"
        atomic_write_bytes(self.path / name, data)
        entry = {
            "file": name,
            "n_sequences": len(self._ids),
            "n_tokens": self._n_targets,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "kl_sum": self._kl_sum,
            "kl_max": self._kl_max,
            "distinct": self._distinct,
        }
        self.shards.append(entry)
        self._reset()
        return entry

    def index_for(self, shards: list[dict]) -> dict:
        """index.json for `shards` (entries as `flush` returns them, in shard order)."""
        n_tokens = sum(s["n_tokens"] for s in shards)
        kl_mean = sum(s["kl_sum"] for s in shards) / n_tokens if n_tokens else 0.0
        index = {
            "format_version": FORMAT_VERSION,
            "targets": self.targets,
            "teacher_fingerprint": self.teacher_fingerprint,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "vocab_size": self.vocab_size,
            "temperature": self.temperature,
            "index_bits": self.bits,
            "n_sequences": sum(s["n_sequences"] for s in shards),
            "n_tokens": n_tokens,
            "shards": [{key: s[key] for key in SHARD_KEYS} for s in shards],
        }
        if self.sampled:
            distinct = sum(s["distinct"] for s in shards)
            index.update(samples=self.samples, distinct_mean=distinct / n_tokens if n_tokens else 0.0)
            return index
        kl_max = max((s["kl_max"] for s in shards), default=0.0)
        index.update(k=self.k, dtype=self.dtype, reconstruction_kl={"mean": kl_mean, "max": kl_max})
        if self.dtype == "compact":
            index.update(value_bytes=value_bytes(self.k), levels=levels(self.k))
        return index

    def close(self, write_index: bool = True) -> dict:
        """Write the last shard, then (with write_index) index.json; returns the index."""
        if self.closed:
            return self.index
        self.flush()
        self.index = self.index_for(self.shards)
        if write_index:
            atomic_write_json(self.path / INDEX, self.index)
        self.closed = True
        return self.index

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()  # on error, no index is written: the partial cache never reads as valid



def _head_split(teacher: torch.nn.Module) -> Optional[tuple[torch.nn.Module, torch.nn.Module]]:
    """(body, head) when the teacher's logits are head(body(x).last_hidden_state), checked once per
    model on a short probe; None (use the whole model) for one whose logits are more than that
    (a logit scale or soft-cap) or that has no separate head."""
    known = getattr(teacher, "_tnd_head_split", None)
    if known is not None:
        return known or None
    body = getattr(teacher, "base_model", None)
    head = teacher.get_output_embeddings() if hasattr(teacher, "get_output_embeddings") else None
    split: Any = False
    if body is not None and body is not teacher and head is not None:
        device = next(teacher.parameters()).device
        vocab = teacher.get_input_embeddings().num_embeddings
        ids = ((torch.arange(1, 9, device=device) * 7919) % vocab).unsqueeze(0)
        with torch.no_grad():
            try:
                whole = teacher(input_ids=ids, use_cache=False).logits.float()
                parts = head(body(input_ids=ids, use_cache=False).last_hidden_state).float()
                scale = whole.abs().max().clamp_min(1e-6)
                if parts.shape == whole.shape and float((parts - whole).abs().max() / scale) < 1e-2:
                    split = (body, head)
            except Exception:  # noqa: BLE001 - any failure means: run the whole model
                split = False
    with contextlib.suppress(AttributeError, TypeError):
        object.__setattr__(teacher, "_tnd_head_split", split)
    return split or None


@torch.no_grad()
def teacher_logit_chunks(
    teacher: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    prompt_lens: Sequence[int],
    pad_id: int,
    *,
    vocab_size: int,
    chunk_tokens: int = 1024,
) -> Iterator[torch.Tensor]:
    """The teacher's logits [<= chunk_tokens, vocab_size] at the continuation positions of
    `sequences` (right-padded into one forward pass), sequence after sequence, a chunk at a time.

    Memory: the model's body runs on the batch; the output head then runs on the hidden states of
    at most `chunk_tokens` target positions at a time, so the logits in memory are [chunk_tokens, V]
    in the model's dtype, never [B, T, V] (nor any float32 copy of them). A teacher whose logits are
    not head(body) (see `_head_split`) runs whole, and its [B, T, V] logits are read chunk by chunk."""
    device = next(teacher.parameters()).device
    ids, mask = right_pad([list(s) for s in sequences], pad_id)
    at = torch.zeros_like(mask, dtype=torch.bool)
    for row, (seq, prompt_len) in enumerate(zip(sequences, prompt_lens)):
        at[row, prompt_len - 1 : len(seq) - 1] = True
    ids, mask = ids.to(device), mask.to(device)
    flat_at = at.reshape(-1).nonzero().squeeze(-1).to(device)
    split = _head_split(teacher)
    if split is not None:
        body, head = split
        states = body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        states = states.reshape(-1, states.shape[-1])[flat_at]
        logits_at = lambda part: head(states[part])
    else:
        logits = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logits = logits.reshape(-1, logits.shape[-1])
        logits_at = lambda part: logits[flat_at[part]]
    for start in range(0, flat_at.numel(), chunk_tokens):
        yield logits_at(slice(start, start + chunk_tokens))[:, :vocab_size]


def _cat_rows(parts: list[tuple[torch.Tensor, ...]], k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k rows of chunks, concatenated on the CPU."""
    if not parts:
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long), torch.zeros(0)
    return tuple(torch.cat([t.cpu() for t in tensors]) for tensors in zip(*parts))  # type: ignore[return-value]


def teacher_rows(
    teacher: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    prompt_lens: Sequence[int],
    pad_id: int,
    *,
    k: int,
    temperature: float,
    vocab_size: int,
    chunk_tokens: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's top-k rows (`teacher_topk`, on the CPU) at the continuation positions of
    `sequences`, sequence after sequence, in the memory of `teacher_logit_chunks`."""
    chunks = teacher_logit_chunks(teacher, sequences, prompt_lens, pad_id, vocab_size=vocab_size,
                                  chunk_tokens=chunk_tokens)
    return _cat_rows([teacher_topk(chunk, k, temperature) for chunk in chunks], k)


# --- the cache of a teacher's demonstrations, by one or several processes -------------------------


def shard_prompts(shard_tokens: int, max_new_tokens: int, batch_size: int) -> int:
    """Prompts per shard: as many whole batches as keep a shard at about shard_tokens target tokens
    (each prompt gives at most max_new_tokens), at least one batch."""
    return max(1, shard_tokens // (max_new_tokens * batch_size)) * batch_size


def write_teacher_cache(
    path: str | Path,
    teacher: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    k: int,
    max_new_tokens: int,
    seed: int,
    temperature: float = 1.0,
    dtype: str = "compact",
    targets: str = "topk_tail",
    samples: int = 12,
    sample_temperature: float = 1.0,
    sample_top_k: int = 0,
    sample_top_p: float = 1.0,
    batch_size: int = 64,
    shard_tokens: int = 65536,
    chunk_tokens: int = 1024,
    accelerator: Any = None,
    progress: bool = True,
) -> Optional[dict]:
    """Sample one continuation per prompt from the teacher and cache the teacher's targets over it
    (top-k + tail or sampled) at `path` (replaced whole, atomically). With an accelerate `accelerator` of R processes, process r
    samples and writes shards r, r + R, ... (module docstring); process 0 writes index.json after
    all have finished and returns the index with "timing" (sample / write seconds summed over the
    processes), the others return None. Every process must call it with the same arguments."""
    vocab = len(tokenizer)
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    main = rank == 0
    per_shard = shard_prompts(shard_tokens, max_new_tokens, batch_size)
    numbers = list(range(math.ceil(len(prompts) / per_shard)))
    fingerprint = fingerprint_model(teacher) if main else ""
    with atomic_dir(path) if main else contextlib.nullcontext(None) as out:
        if world > 1:
            from accelerate.utils import broadcast_object_list

            out = Path(broadcast_object_list([str(out) if main else None], from_process=0)[0])
        writer = CacheWriter(
            out, vocab_size=vocab, k=k, temperature=temperature, dtype=dtype, targets=targets, samples=samples,
            seed=seed, teacher_fingerprint=fingerprint,
            tokenizer_fingerprint=fingerprint_tokenizer(tokenizer), shard_tokens=None, chunk_tokens=chunk_tokens,
        )
        sample_seconds = write_seconds = 0.0
        mine = numbers[rank::world]
        batches = [(n, b) for n in mine for b in range(n * per_shard, min((n + 1) * per_shard, len(prompts)), batch_size)]
        bar = tqdm(total=len(batches), desc="teacher demonstrations + logits", leave=False, disable=not (progress and main))
        for number in mine:
            first, last = number * per_shard, min((number + 1) * per_shard, len(prompts))
            for start in range(first, last, batch_size):
                batch = [list(p) for p in prompts[start : min(start + batch_size, last)]]
                started = time.perf_counter()
                continuations = sample_continuations(
                    teacher, tokenizer, batch, max_new_tokens, seed + start, temperature=sample_temperature,
                    top_k=sample_top_k, top_p=sample_top_p, batch_size=len(batch), progress=False,
                )
                sample_seconds += time.perf_counter() - started
                started = time.perf_counter()
                writer.add_demonstrations(teacher, batch, continuations, tokenizer.pad_token_id, len(batch),
                                          seed=seed + start)
                write_seconds += time.perf_counter() - started
                bar.update()
            started = time.perf_counter()
            writer.flush(number)
            write_seconds += time.perf_counter() - started
        bar.close()
        entries = [(entry, sample_seconds if i == 0 else 0.0, write_seconds if i == 0 else 0.0)
                   for i, entry in enumerate(writer.shards)] or [(None, sample_seconds, write_seconds)]
        if world > 1:
            from accelerate.utils import gather_object

            accelerator.wait_for_everyone()  # every shard is on disk
            entries = gather_object(entries)
        if not main:
            return None
        shards = sorted((e for e, _, _ in entries if e is not None), key=lambda e: e["file"])
        index = writer.index_for(shards)
        atomic_write_json(Path(out) / INDEX, index)
    index["timing"] = {"sample_seconds": sum(s for _, s, _ in entries), "write_seconds": sum(w for _, _, w in entries)}
    return index

