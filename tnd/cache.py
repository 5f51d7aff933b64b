"""The teacher-logit cache: top-k teacher log-probs for sampled demonstrations, on disk.

Layout of one cache directory (normally `cache/teacher/`)::

    index.json                 written last, atomically, by one process; the only list of valid shards
    shard-00000.safetensors    each written atomically (temp file + os.replace)
    shard-00001.safetensors
    ...

A shard holds whole sequences (a sequence never spans two shards) and these tensors, with
n_seq sequences and N = the number of continuation tokens ("targets", one stored row each):

    input_ids       int32   [sum of sequence lengths]  prompt + continuation, concatenated
    seq_offsets     int64   [n_seq + 1]   sequence i is input_ids[seq_offsets[i]:seq_offsets[i+1]]
    prompt_lengths  int32   [n_seq]       the first prompt_lengths[i] tokens of sequence i are prompt
    target_offsets  int64   [n_seq + 1]   sequence i's rows are [target_offsets[i]:target_offsets[i+1]]
    topk_indices    uint8   [N, ceil(k b / 8)]  the k token ids of a row, b = ceil(log2 V) bits each
    tail_logmass    float32 [N]   log(1 - top-k mass), exact; -inf when k == V
    and the top-k log-probs, by the index's `dtype`:
      compact (default):
        topk_codes  uint8   [N, value_bytes]   the log-probs' levels, unary-coded (below)
        topk_step   float16 [N]   the level step of the row, in nats
      float16 | bfloat16 | float32:
        topk_logprobs dtype [N, k]

Row j of sequence i (0 <= j < n_continuation) is the teacher's distribution at position
prompt_len + j - 1, i.e. the one that predicts continuation token input_ids[prompt_len + j].
Top-k entries are sorted by decreasing log-prob l_1 >= l_2 >= ... >= l_k, l = log_softmax(logits / T).

Bit packing: a row's values v_1..v_m of b bits each form one little-endian bit string (bit t of
v_i is bit i b + t of the row; bit s of the row is bit s mod 8 of byte s div 8), zero-padded to
whole bytes. Indices take b = ceil(log2 V) bits: 17 at V = 128,256, 15 at 32,000, 11 at 1,205.

The compact log-probs. Only the depths d_i = min(l_1 - l_i, D) for i = 2..k are stored (d_1 = 0,
D = MAX_DEPTH = 30 nats: a token e^-30 times less likely than the top one weighs nothing), on a
grid of L levels with a per-row step s = d_k / L (rounded up to float16): q_i = round(d_i / s),
0 <= q_2 <= ... <= q_k <= L. A non-decreasing sequence is coded in unary: for i = 2..k, the
(i-1)-th one bit of the row's code sits at position q_i + (i - 2), so the code has exactly k - 1
ones and q_k <= L zeros before the last one, and q_i = the number of zeros before the (i-1)-th
one. The code is value_bytes = ceil(45 (k - 1) / 128) bytes (2.8125 bits per log-prob) and L =
8 value_bytes - (k - 1): L = 233 at k = 128. The top-1 log-prob is not stored: the exact tail
fixes the top-k mass M = 1 - exp(tail), and decoding renormalises to it,

    l^_i = log M - s q_i - logsumexp_j(-s q_j),   log M = log(-expm1(tail)),

so the stored (k+1)-bucket distribution (the k decoded probabilities and the exact tail) sums
to 1, and its error is the rounding of each depth to the grid: |l^_i - l_i - c| <= s / 2 for one
constant c per row (plus the clamp at D). At V = 128,256, k = 128 a row takes 272 (indices) +
45 (codes) + 2 (step) + 4 (tail) = 323 bytes, against 772 for float16 values and int32 indices;
`reconstruction_kl` (KL of the stored distribution from the exact one, over the k + 1 buckets)
measures what the rounding costs and the writer records it in index.json.

index.json records format_version, the teacher and tokenizer fingerprints, vocab size, k,
temperature, dtype, index_bits, value_bytes and levels (compact), totals, the mean and largest
reconstruction KL, and per shard: file, n_sequences, n_tokens (target tokens), bytes and
sha256, computed once as the shard is written. Files in the directory that index.json does not
list (a shard left by a crash before the index was written) are ignored.

`TeacherCache` reads it back. Opening reads index.json, checks it, the fingerprints and every
listed shard's size (a stat, no read); a shard's sha256 is checked the first time the shard is
read (once per process), so opening a large cache is cheap. Problems are one-line `CacheError`s
that name the file and the fix.

Several processes write one cache (`write_teacher_cache`): shard j holds prompts [j P, (j+1) P)
(P = shard_prompts: a whole number of batches), process r of R writes shards r, r + R, ..., each
batch of prompts sampled with its own seed (seed + the index of its first prompt), and process 0
writes index.json once all have finished. So the same params give the same shards whatever R, and the same
index.json but for its `reconstruction_kl` diagnostic: it is computed from the teacher's unrounded log-probs,
whose last bits depend on the threads a process's matrix products run on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from tqdm.auto import tqdm

from tnd.batching import right_pad
from tnd.errors import TndError, one_line
from tnd.generation import sample_continuations
from tnd.io import atomic_dir, atomic_write_bytes, atomic_write_json

# 2: the tokenizer fingerprint covers merges, normalizer and pre-tokenizer (`tokenizer_content`).
# 3: bit-packed indices, the compact log-prob code, per-batch sampling seeds (several processes), sha256
#    checked on first read, the threaded teacher fingerprint. Older caches are refused by their version.
FORMAT_VERSION = 3
INDEX = "index.json"
RERUN = "rerun `dvc repro -f cache_teacher_logits`"
DTYPES = {"compact": None, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
COMMON_TENSORS = ("input_ids", "seq_offsets", "prompt_lengths", "target_offsets", "topk_indices", "tail_logmass")
VALUE_TENSORS = {"compact": ("topk_codes", "topk_step")}  # any other dtype: ("topk_logprobs",)
MAX_DEPTH = 30.0  # nats below the top-1 log-prob beyond which the compact code clamps
VOCAB_SLICE = 16384  # vocabulary columns upcast to float32 at a time in teacher_topk


class CacheError(TndError):
    """The teacher-logit cache is missing, corrupted, or made by another teacher/tokenizer."""


# --- fingerprints ---------------------------------------------------------------------


def fingerprint_model(model: torch.nn.Module, threads: Optional[int] = None) -> str:
    """sha256 (hex) over the state_dict: per tensor, in name order, its name, dtype, shape and the
    sha256 of its raw bytes. The per-tensor hashes run on `threads` threads (default: up to 16, one
    per core; hashlib releases the GIL), so a large model hashes at several times one core's speed."""
    state = model.state_dict()
    names = sorted(state)

    def digest(name: str) -> bytes:
        tensor = state[name].detach()
        blob = hashlib.sha256()
        if tensor.numel():
            flat = tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            step = 1 << 26  # 64 MiB pieces: the GIL is released for each update
            for start in range(0, flat.size, step):
                blob.update(flat[start : start + step])
        return blob.digest()

    workers = threads or min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = list(pool.map(digest, names))
    total = hashlib.sha256()
    for name, tensor_digest in zip(names, digests):
        tensor = state[name]
        total.update(f"{name}\0{str(tensor.dtype)}\0{tuple(tensor.shape)}\0".encode())
        total.update(tensor_digest)
    return total.hexdigest()


def tokenizer_content(tokenizer: Any) -> dict:
    """What token ids mean to a tokenizer: its vocabulary (token -> id, added tokens included) and,
    where it has them, its merges, model options, normalizer and pre-tokenizer. Two tokenizers with
    the same content turn the same text into the same ids; the special-token roles are not part of it.
    """
    content: dict = {"vocab": sorted(tokenizer.get_vocab().items())}
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast (Rust) tokenizers
    if backend is not None:
        spec = json.loads(backend.to_str())
        model = {key: value for key, value in (spec.get("model") or {}).items() if key != "vocab"}
        if "merges" in model:  # ["a", "b"] in newer `tokenizers`, "a b" in older ones: one form
            model["merges"] = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        content.update(model=model, normalizer=spec.get("normalizer"), pre_tokenizer=spec.get("pre_tokenizer"))
    elif getattr(tokenizer, "bpe_ranks", None):  # slow BPE tokenizers (GPT-2 style)
        content["merges"] = [" ".join(pair) for pair, _ in sorted(tokenizer.bpe_ranks.items(), key=lambda kv: kv[1])]
    return content


def fingerprint_vocabulary(tokenizer: Any) -> str:
    """sha256 (hex) of `tokenizer_content`: equal when two tokenizers give ids the same meaning."""
    blob = json.dumps(tokenizer_content(tokenizer), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def fingerprint_tokenizer(tokenizer: Any) -> str:
    """sha256 (hex) over the tokenizer's content (`tokenizer_content`) and its special tokens."""
    special = {
        name: [getattr(tokenizer, f"{name}_token", None), getattr(tokenizer, f"{name}_token_id", None)]
        for name in ("pad", "bos", "eos", "unk")
    }
    extra = sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []))
    blob = json.dumps(
        {"content": fingerprint_vocabulary(tokenizer), "special": special, "all_special": extra}, sort_keys=True
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# --- the stored quantities ---------------------------------------------------------------


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


def index_bits(vocab_size: int) -> int:
    """Bits per stored token id: ceil(log2 vocab_size), at least 1."""
    return max(1, (int(vocab_size) - 1).bit_length())


def value_bytes(k: int) -> int:
    """Bytes of a row's compact log-prob code: 2.8125 bits per log-prob below the top one."""
    return -(-45 * (int(k) - 1) // 128)


def levels(k: int) -> int:
    """L, the grid levels of the compact code: the bits of the code not taken by its k - 1 ones."""
    return 8 * value_bytes(k) - (int(k) - 1)


def _spans(m: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For m values of `bits` bits in a little-endian bit string: each value's first byte, its bit
    offset in that byte, and how many bytes a value can touch."""
    offsets = torch.arange(m, dtype=torch.int64) * bits
    return offsets // 8, offsets % 8, (bits + 7 + 7) // 8


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [N, ceil(m bits / 8)]: the m non-negative integers (< 2^bits) of each row of `values`
    [N, m], `bits` bits each, as one little-endian bit string (see the module docstring)."""
    n, m = values.shape
    n_bytes = -(-m * bits // 8)
    first, shift, span = _spans(m, bits)
    shifted = values.long() << shift.to(values.device)
    out = torch.zeros(n, n_bytes + span, dtype=torch.int64, device=values.device)
    for j in range(span):  # the bits of different values never share a bit: adding is or-ing
        out.index_add_(1, first.to(values.device) + j, (shifted >> (8 * j)) & 0xFF)
    return out[:, :n_bytes].to(torch.uint8)


def unpack_bits(data: torch.Tensor, bits: int, m: int) -> torch.Tensor:
    """int64 [N, m]: the inverse of `pack_bits`."""
    first, shift, span = _spans(m, bits)
    padded = torch.cat([data, data.new_zeros(data.shape[0], span)], dim=1).long()
    first = first.to(data.device)
    word = padded[:, first]
    for j in range(1, span):
        word |= padded[:, first + j] << (8 * j)
    return (word >> shift.to(data.device)) & ((1 << bits) - 1)


def _popcount_select() -> tuple[torch.Tensor, torch.Tensor]:
    """For every byte value: its number of one bits, and the position of its r-th one bit (r = 0..7)."""
    popcount = torch.zeros(256, dtype=torch.int64)
    select = torch.zeros(256, 8, dtype=torch.int64)
    for byte in range(256):
        ones = [bit for bit in range(8) if byte >> bit & 1]
        popcount[byte] = len(ones)
        select[byte, : len(ones)] = torch.tensor(ones, dtype=torch.int64)
    return popcount, select


_POPCOUNT, _SELECT = _popcount_select()


def encode_logprobs(topk_logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The compact code of sorted top-k log-probs [N, k]: (codes uint8 [N, value_bytes(k)], step fp16 [N])."""
    n, k = topk_logprobs.shape
    if k == 1:  # nothing below the top one: its log-prob is log(1 - exp(tail))
        return torch.zeros(n, 0, dtype=torch.uint8), torch.zeros(n, dtype=torch.float16)
    n_levels = levels(k)
    lp = topk_logprobs.float()
    depth = torch.nan_to_num(lp[:, :1] - lp[:, 1:], nan=0.0, posinf=MAX_DEPTH).clamp(0.0, MAX_DEPTH)  # [N, k-1]
    deepest = depth[:, -1]
    step = (deepest / n_levels).to(torch.float16)
    short = step.float() * n_levels < deepest  # float16 rounded down: one ulp up, so q_k <= L
    step = torch.where(short, torch.nextafter(step, torch.full_like(step, math.inf)), step)
    safe = step.float().clamp_min(torch.finfo(torch.float16).tiny).unsqueeze(-1)
    q = torch.where(step.unsqueeze(-1) > 0, torch.round(depth / safe), 0.0).clamp(0, n_levels).long()
    q = torch.cummax(q, dim=-1).values  # non-decreasing (it already is, unless rounding ties go astray)
    position = q + torch.arange(k - 1, device=lp.device)  # of the one bit of each level: distinct, increasing
    codes = torch.zeros(n, value_bytes(k), dtype=torch.int64, device=lp.device)
    codes.scatter_add_(1, position // 8, 1 << (position % 8))
    return codes.to(torch.uint8), step


def decode_logprobs(codes: torch.Tensor, step: torch.Tensor, tail_logmass: torch.Tensor, k: int) -> torch.Tensor:
    """float32 [N, k] top-k log-probs from the compact code (`encode_logprobs`), renormalised so that
    their mass is 1 - exp(tail_logmass). Raises ValueError on a code without k - 1 ones."""
    n = codes.shape[0]
    if k == 1:
        depth = torch.zeros(n, 1)
    else:
        byte = codes.long()
        ones = _POPCOUNT.to(codes.device)[byte]  # [N, B]
        through = ones.cumsum(-1)  # ones in bytes 0..b
        if n and not bool((through[:, -1] == k - 1).all()):
            raise ValueError("compact code: a row does not hold k - 1 levels")
        rank = torch.arange(1, k, device=codes.device).expand(n, k - 1).contiguous()
        where = torch.searchsorted(through, rank)  # the byte holding the rank-th one
        within = rank - (through.gather(1, where) - ones.gather(1, where)) - 1
        bit = _SELECT.to(codes.device)[byte.gather(1, where), within]
        q = (8 * where + bit - (rank - 1)).float()  # zeros before the rank-th one
        depth = torch.cat([q.new_zeros(n, 1), q * step.float().unsqueeze(-1)], dim=-1)
    top_logmass = torch.log(-torch.expm1(tail_logmass.float()))
    return top_logmass.unsqueeze(-1) - depth - torch.logsumexp(-depth, dim=-1, keepdim=True)


def reconstruction_kl(exact: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """KL(exact || stored) [N] (float64) over the k + 1 buckets of each row, from the exact top-k
    log-probs [N, k] and the stored ones; the tail bucket is stored exactly and adds nothing.

    Computed as sum_i p_i (e^-d_i - 1 + d_i), d_i = log p_i - log q_i: the KL when both sides sum to
    1, and otherwise the generalised KL (sum p log p/q - sum p + sum q), so each term is >= 0 and
    float32 rounding of the two sides (or an unnormalised float16 row) does not make it negative."""
    p_log = exact.float()
    diff = p_log - stored.float()
    terms = p_log.exp() * (torch.expm1(-diff) + diff).clamp_min(0.0)
    return torch.where(p_log > -math.inf, terms, 0.0).sum(-1, dtype=torch.float64)


# --- writer --------------------------------------------------------------------------------


class CacheWriter:
    """Appends sequences and their teacher top-k; writes shards as they fill, index.json on close.

    Write into a fresh directory (the stage uses `tnd.io.atomic_dir`): shards are written
    atomically one by one and index.json last, so a crash leaves no index (or the old one)
    and the half-written cache does not read as valid.

        with CacheWriter(tmp, vocab_size=V, k=32, ...) as writer:
            writer.add(prompt + continuation, len(prompt), logits[len(prompt) - 1 : -1])

    With shard_tokens=None shards are written only by `flush(number)`, under the number given
    (several processes writing one cache; `write_teacher_cache`).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        vocab_size: int,
        k: int,
        temperature: float = 1.0,
        dtype: str = "compact",
        teacher_fingerprint: str = "",
        tokenizer_fingerprint: str = "",
        shard_tokens: Optional[int] = 65536,
        chunk_tokens: int = 1024,
    ):
        if dtype not in DTYPES:
            raise ValueError(f"dtype = {dtype!r}; allowed: {', '.join(DTYPES)}")
        if not 1 <= k <= vocab_size:
            raise ValueError(f"k = {k} must be between 1 and vocab_size ({vocab_size})")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.vocab_size, self.k, self.temperature = int(vocab_size), int(k), float(temperature)
        self.dtype = dtype
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
        self._kl_sum, self._kl_max = 0.0, 0.0
        self._n_targets = 0

    def add(self, input_ids: Sequence[int] | torch.Tensor, prompt_len: int, logits: torch.Tensor) -> None:
        """One demonstration: its full token ids, its prompt length, and the teacher logits
        [len(input_ids) - prompt_len, V] at the positions that predict each continuation token
        (that is, logits[prompt_len - 1 : len(input_ids) - 1] of a forward pass over input_ids)."""
        topk = teacher_topk(logits, self.k, self.temperature) if logits.shape[0] else None
        self.add_topk(input_ids, prompt_len, *(topk or self._empty_rows()))

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

    def add_batch(
        self, sequences: list[torch.Tensor], prompt_lens: list[int], logprobs: torch.Tensor,
        indices: torch.Tensor, tails: torch.Tensor,
    ) -> None:
        """Sequences (int64 ids), their prompt lengths and their rows, concatenated in sequence order
        (not validated: see `add_topk`); the rows are encoded now."""
        if self.closed:
            raise RuntimeError("CacheWriter is closed")
        rows = self.encode(logprobs, indices, tails)
        kl = rows.pop("kl")
        if kl.numel():
            self._kl_sum += float(kl.sum())
            self._kl_max = max(self._kl_max, float(kl.max()))
        for name, value in rows.items():
            self._rows.setdefault(name, []).append(value)
        for ids, prompt_len in zip(sequences, prompt_lens):
            self._ids.append(ids.to(torch.int32))
            self._prompt_lengths.append(prompt_len)
            self._target_lengths.append(ids.numel() - prompt_len)
        self._n_targets += int(tails.shape[0])
        if self.shard_tokens is not None and self._n_targets >= self.shard_tokens:
            self.flush()

    def encode(self, logprobs: torch.Tensor, indices: torch.Tensor, tails: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored form of rows (CPU tensors by shard tensor name), and `kl` [N]: each row's
        `reconstruction_kl` (the stored distribution decoded against the exact one)."""
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
    ) -> None:
        """Each prompt + its continuation, with the teacher's top-k at the continuation's positions,
        from one forward pass per `batch_size` demonstrations (`teacher_rows`: the output head on
        chunk_tokens rows at a time). The teacher's logits beyond `vocab_size` (padded embedding
        rows) are dropped."""
        for start in range(0, len(prompts), batch_size):
            batch_prompts = [list(p) for p in prompts[start : start + batch_size]]
            sequences = [p + list(c) for p, c in zip(batch_prompts, continuations[start : start + batch_size])]
            rows = teacher_rows(
                teacher, sequences, [len(p) for p in batch_prompts], pad_id,
                k=self.k, temperature=self.temperature, vocab_size=self.vocab_size, chunk_tokens=self.chunk_tokens,
            )
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
            "teacher_fingerprint": self.teacher_fingerprint,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "vocab_size": self.vocab_size,
            "k": self.k,
            "temperature": self.temperature,
            "dtype": self.dtype,
            "index_bits": self.bits,
            "n_sequences": sum(s["n_sequences"] for s in shards),
            "n_tokens": n_tokens,
            "reconstruction_kl": {"mean": kl_mean, "max": max((s["kl_max"] for s in shards), default=0.0)},
            "shards": [{key: s[key] for key in SHARD_KEYS} for s in shards],
        }
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


SHARD_KEYS = ("file", "n_sequences", "n_tokens", "bytes", "sha256")


# --- the teacher's rows, in bounded memory --------------------------------------------------


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
    `sequences` (right-padded into one forward pass), sequence after sequence.

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
    outs = []
    for start in range(0, flat_at.numel(), chunk_tokens):
        chunk = logits_at(slice(start, start + chunk_tokens))[:, :vocab_size]
        outs.append([t.cpu() for t in teacher_topk(chunk, k, temperature)])
    if not outs:
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long), torch.zeros(0)
    return tuple(torch.cat(parts) for parts in zip(*outs))  # type: ignore[return-value]


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
    sample_temperature: float = 1.0,
    sample_top_k: int = 0,
    sample_top_p: float = 1.0,
    batch_size: int = 64,
    shard_tokens: int = 65536,
    chunk_tokens: int = 1024,
    accelerator: Any = None,
    progress: bool = True,
) -> Optional[dict]:
    """Sample one continuation per prompt from the teacher and cache the teacher's top-k over it at
    `path` (replaced whole, atomically). With an accelerate `accelerator` of R processes, process r
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
            out, vocab_size=vocab, k=k, temperature=temperature, dtype=dtype, teacher_fingerprint=fingerprint,
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
                writer.add_demonstrations(teacher, batch, continuations, tokenizer.pad_token_id, len(batch))
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


# --- reader --------------------------------------------------------------------------------


@dataclass
class CachedSequence:
    """One demonstration. Row j of the top-k tensors predicts input_ids[prompt_len + j]."""

    input_ids: torch.Tensor  # int64 [L]
    prompt_len: int
    topk_logprobs: torch.Tensor  # float32 [L - prompt_len, k]
    topk_indices: torch.Tensor  # int64 [L - prompt_len, k]
    tail_logmass: torch.Tensor  # float32 [L - prompt_len]


class TeacherCache:
    """Random access to a cache directory written by `CacheWriter`; shards are memory-mapped.

    Opening reads index.json, checks its format_version, the fingerprints (when given) and every
    listed shard's size; a shard's sha256 is checked (when `verify`) the first time the shard is
    read. Any problem is a `CacheError` naming the file.
    """

    def __init__(
        self,
        path: str | Path,
        teacher_fingerprint: Optional[str] = None,
        tokenizer_fingerprint: Optional[str] = None,
        verify: bool = True,
    ):
        self.path = Path(path)
        self.verify = verify
        self.index = self._read_index()
        self._check_fingerprint("teacher", teacher_fingerprint)
        self._check_fingerprint("tokenizer", tokenizer_fingerprint)
        self.k = int(self.index["k"])
        self.vocab_size = int(self.index["vocab_size"])
        self.temperature = float(self.index["temperature"])
        self.dtype = self.index["dtype"]
        self.bits = index_bits(self.vocab_size)
        self._handles: dict[int, Any] = {}
        self._headers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._verified: set[int] = set()
        starts = [0]
        for shard in self.index["shards"]:
            self._check_shard_file(shard)
            starts.append(starts[-1] + shard["n_sequences"])
        self._shard_starts = torch.tensor(starts, dtype=torch.int64)
        if starts[-1] != self.index["n_sequences"]:
            total = self.index["n_sequences"]
            self._fail(INDEX, f"not valid: its shards hold {starts[-1]} sequences but n_sequences = {total}")

    # --- opening and checking ---

    def _fail(self, file: str, problem: str) -> None:
        raise CacheError(f"{self.path / file}: {problem}; {RERUN}")

    def _read_index(self) -> dict:
        index_path = self.path / INDEX
        if not self.path.is_dir():
            raise CacheError(f"{self.path}: teacher-logit cache not found; run `dvc repro cache_teacher_logits`")
        if not index_path.is_file():
            self._fail(INDEX, "missing (the cache was never finished, or was deleted)")
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            self._fail(INDEX, f"not valid JSON ({one_line(exc)})")
        if not isinstance(index, dict):
            self._fail(INDEX, "not valid: expected a JSON object")
        version = index.get("format_version")
        if isinstance(version, int) and 1 <= version < FORMAT_VERSION:
            self._fail(INDEX, f"written in the older cache format_version {version} (this code reads version "
                              f"{FORMAT_VERSION}; the format changed)")
        if version != FORMAT_VERSION:
            self._fail(INDEX, f"unknown format_version {version!r} (this code reads version {FORMAT_VERSION})")
        required = ("teacher_fingerprint", "tokenizer_fingerprint", "vocab_size", "k", "temperature", "dtype",
                    "index_bits", "n_sequences", "n_tokens", "shards")
        missing = [key for key in required if key not in index]
        if missing:
            self._fail(INDEX, f"not valid: missing {', '.join(missing)}")
        if index["dtype"] not in DTYPES:
            self._fail(INDEX, f"not valid: unknown dtype {index['dtype']!r}")
        if not (isinstance(index["vocab_size"], int) and isinstance(index["k"], int)
                and 1 <= index["k"] <= index["vocab_size"]):
            self._fail(INDEX, "not valid: vocab_size and k must be integers with 1 <= k <= vocab_size")
        if index["index_bits"] != index_bits(index["vocab_size"]):
            self._fail(INDEX, f"not valid: index_bits {index['index_bits']!r} does not fit vocab_size "
                              f"{index['vocab_size']} (expected {index_bits(index['vocab_size'])})")
        if index["dtype"] == "compact" and (index.get("value_bytes"), index.get("levels")) != (
            value_bytes(index["k"]), levels(index["k"])
        ):
            self._fail(INDEX, f"not valid: value_bytes / levels do not match k = {index['k']}")
        if not isinstance(index["shards"], list) or not all(
            isinstance(s, dict) and set(SHARD_KEYS) <= s.keys() for s in index["shards"]
        ):
            self._fail(INDEX, "not valid: each shard entry needs file, n_sequences, n_tokens, bytes, sha256")
        for shard in index["shards"]:
            if Path(shard["file"]).name != shard["file"]:
                self._fail(INDEX, f"not valid: shard file {shard['file']!r} is not a plain file name")
        return index

    def _check_fingerprint(self, what: str, expected: Optional[str]) -> None:
        found = self.index[f"{what}_fingerprint"]
        if expected is not None and found != expected:
            self._fail(
                INDEX,
                f"cache was made by a different {what} (fingerprint {str(found)[:12]}, "
                f"expected {expected[:12]}); the {what} changed since the cache was written",
            )

    def _check_shard_file(self, shard: dict) -> None:
        file = self.path / shard["file"]
        if not file.is_file():
            self._fail(shard["file"], "missing (listed in index.json)")
        size = file.stat().st_size
        if size != shard["bytes"]:
            self._fail(shard["file"], f"size {size} bytes, index.json says {shard['bytes']} (truncated or corrupted)")

    def _verify_shard(self, number: int) -> None:
        """sha256 of shard `number` against index.json, once per process (the first read)."""
        shard = self.index["shards"][number]
        self._check_shard_file(shard)
        digest = hashlib.sha256()
        with open(self.path / shard["file"], "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != shard["sha256"]:
            self._fail(shard["file"], "sha256 mismatch (corrupted or truncated)")
        self._verified.add(number)

    def _handle(self, number: int) -> Any:
        handle = self._handles.get(number)
        if handle is None:
            if self.verify and number not in self._verified:
                self._verify_shard(number)
            file = self.index["shards"][number]["file"]
            try:
                handle = safe_open(str(self.path / file), framework="pt")
            except Exception as exc:
                self._fail(file, f"not a readable safetensors file ({one_line(exc, 120)})")
            self._handles[number] = handle
            if number not in self._headers:
                self._headers[number] = self._load_shard_header(number, handle)
        return handle

    def _load_shard_header(self, number: int, handle: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shard = self.index["shards"][number]
        file = shard["file"]
        names = COMMON_TENSORS + VALUE_TENSORS.get(self.dtype, ("topk_logprobs",))
        missing = [name for name in names if name not in handle.keys()]
        if missing:
            self._fail(file, f"not a teacher-cache shard of this format (missing tensors {', '.join(missing)})")
        seq_offsets = handle.get_tensor("seq_offsets")
        target_offsets = handle.get_tensor("target_offsets")
        prompt_lengths = handle.get_tensor("prompt_lengths").long()
        n, rows = shard["n_sequences"], shard["n_tokens"]
        expected = {
            "input_ids": ("I32", None),
            "seq_offsets": ("I64", [n + 1]),
            "prompt_lengths": ("I32", [n]),
            "target_offsets": ("I64", [n + 1]),
            "topk_indices": ("U8", [rows, -(-self.k * self.bits // 8)]),
            "tail_logmass": ("F32", [rows]),
            "topk_codes": ("U8", [rows, value_bytes(self.k)]),
            "topk_step": ("F16", [rows]),
            "topk_logprobs": ({"float16": "F16", "bfloat16": "BF16", "float32": "F32"}.get(self.dtype), [rows, self.k]),
        }
        for name in names:
            dtype, shape = expected[name]
            found = (handle.get_slice(name).get_dtype(), list(handle.get_slice(name).get_shape()))
            if found[0] != dtype or (shape is not None and found[1] != shape):
                self._fail(file, f"tensor {name} is {found[0]} {found[1]}, index.json implies {dtype} "
                                 f"{shape if shape is not None else '[...]'} (inconsistent cache)")
        ok = (
            int(target_offsets[-1]) == rows
            and int(seq_offsets[0]) == 0 and int(target_offsets[0]) == 0
            and list(handle.get_slice("input_ids").get_shape()) == [int(seq_offsets[-1])]
            and torch.equal(seq_offsets.diff() - prompt_lengths, target_offsets.diff())
            and bool((prompt_lengths >= 1).all())
        )
        if not ok:
            self._fail(file, "tensor shapes do not match index.json (inconsistent cache)")
        return seq_offsets, target_offsets, prompt_lengths

    # --- access ---

    @property
    def n_tokens(self) -> int:
        """Number of target (continuation) tokens, i.e. of stored top-k rows."""
        return int(self.index["n_tokens"])

    def __len__(self) -> int:
        return int(self.index["n_sequences"])

    def _locate(self, i: int) -> tuple[Any, str, int, int, int, int, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for a cache of {n}")
        i %= n
        number = int(torch.searchsorted(self._shard_starts, torch.tensor(i), right=True)) - 1
        local = i - int(self._shard_starts[number])
        handle = self._handle(number)
        seq_offsets, target_offsets, prompt_lengths = self._headers[number]
        s0, s1 = (int(x) for x in seq_offsets[local : local + 2])
        t0, t1 = (int(x) for x in target_offsets[local : local + 2])
        return handle, self.index["shards"][number]["file"], s0, s1, t0, t1, int(prompt_lengths[local])

    def _raw(self, i: int) -> tuple[torch.Tensor, int, str, dict[str, torch.Tensor]]:
        """input_ids, prompt_len, shard file and the stored rows of sequence i (memory-mapped slices)."""
        handle, file, s0, s1, t0, t1, prompt_len = self._locate(i)
        names = ("topk_indices", "tail_logmass") + VALUE_TENSORS.get(self.dtype, ("topk_logprobs",))
        return handle.get_slice("input_ids")[s0:s1].long(), prompt_len, file, {
            name: handle.get_slice(name)[t0:t1] for name in names
        }

    def _decode(self, rows: dict[str, torch.Tensor], files: list[str]) -> tuple[torch.Tensor, ...]:
        """(topk_logprobs fp32, topk_indices int64, tail_logmass fp32) of stored rows."""
        indices = unpack_bits(rows["topk_indices"], self.bits, self.k)
        tails = rows["tail_logmass"].float()
        if self.dtype == "compact":
            try:
                logprobs = decode_logprobs(rows["topk_codes"], rows["topk_step"], tails, self.k)
            except ValueError as exc:
                self._fail(files[0] if len(set(files)) == 1 else INDEX, f"{exc} (corrupted; files {sorted(set(files))})")
        else:
            logprobs = rows["topk_logprobs"].float()
        if indices.numel() and int(indices.max()) >= self.vocab_size:
            self._fail(files[0] if len(set(files)) == 1 else INDEX, f"a token id >= vocab_size (corrupted; files "
                                                                   f"{sorted(set(files))})")
        return logprobs, indices, tails

    def __getitem__(self, i: int) -> CachedSequence:
        input_ids, prompt_len, file, rows = self._raw(i)
        logprobs, indices, tails = self._decode(rows, [file])
        return CachedSequence(input_ids=input_ids, prompt_len=prompt_len, topk_logprobs=logprobs,
                              topk_indices=indices, tail_logmass=tails)

    def batch(self, indices: Iterable[int], pad_id: int) -> dict[str, torch.Tensor]:
        """Right-padded tensors for sequences `indices`, aligned for the top-k distillation loss.

        Returns, with B = len(indices), T = the longest sequence, k = self.k:

            input_ids       int64   [B, T]     prompt + continuation, then pad_id
            attention_mask  int64   [B, T]     1 on real tokens
            target_mask     bool    [B, T]     True at t when input_ids[t + 1] is a continuation token,
                                               i.e. t in [prompt_len - 1, len - 2]
            topk_logprobs   float32 [B, T, k]  the teacher's row for the token at t + 1 (0 elsewhere)
            topk_indices    int64   [B, T, k]  (0 elsewhere)
            tail_logmass    float32 [B, T]     (0 elsewhere)
            prompt_lengths  int64   [B]

        Position t holds what the student's logits at t (which predict token t + 1) are
        compared with, so with `logits = student(input_ids, attention_mask).logits` [B,T,V]:

            m = batch["target_mask"]
            topk_distill_loss(logits[m], batch["topk_logprobs"][m], batch["topk_indices"][m],
                              batch["tail_logmass"][m])

        or pass the flattened [B*T] tensors with mask=target_mask.reshape(-1). The stored rows of
        all B sequences are decoded together.
        """
        items = [self._raw(int(i)) for i in indices]
        if not items:
            raise ValueError("batch() needs at least one index")
        input_ids, attention_mask = right_pad([ids for ids, _, _, _ in items], pad_id)
        size, width = input_ids.shape
        out = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "target_mask": torch.zeros((size, width), dtype=torch.bool),
            "topk_logprobs": torch.zeros((size, width, self.k), dtype=torch.float32),
            "topk_indices": torch.zeros((size, width, self.k), dtype=torch.long),
            "tail_logmass": torch.zeros((size, width), dtype=torch.float32),
            "prompt_lengths": torch.tensor([prompt_len for _, prompt_len, _, _ in items], dtype=torch.long),
        }
        for row, (ids, prompt_len, _, _) in enumerate(items):
            out["target_mask"][row, prompt_len - 1 : ids.numel() - 1] = True  # the positions that predict its continuation
        stored = {name: torch.cat([rows[name] for _, _, _, rows in items]) for name in items[0][3]}
        logprobs, topk_indices, tails = self._decode(stored, [file for _, _, file, _ in items])
        mask = out["target_mask"]  # row-major: sequence after sequence, as the rows were concatenated
        out["topk_logprobs"][mask] = logprobs
        out["topk_indices"][mask] = topk_indices
        out["tail_logmass"][mask] = tails
        return out

    # --- lifetime (the memory maps are reopened lazily, on the next read) ---

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "TeacherCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def cache_bytes(path: str | Path) -> int:
    """Bytes on disk of index.json and the shards it lists."""
    path = Path(path)
    index = json.loads((path / INDEX).read_text(encoding="utf-8"))
    shards = sum(os.path.getsize(path / shard["file"]) for shard in index["shards"])
    return (path / INDEX).stat().st_size + shards
