"""The teacher-logit cache: top-k teacher log-probs for sampled demonstrations, on disk.

Layout of one cache directory (normally `cache/teacher/`)::

    index.json                 written last, atomically; the only list of valid shards
    shard-00000.safetensors    each written atomically (temp file + os.replace)
    shard-00001.safetensors
    ...

A shard holds whole sequences (a sequence never spans two shards) and these tensors,
with n_seq sequences and n_targets = the number of continuation tokens in them:

    input_ids       int32   [sum of sequence lengths]  prompt + continuation, concatenated
    seq_offsets     int64   [n_seq + 1]   sequence i is input_ids[seq_offsets[i]:seq_offsets[i+1]]
    prompt_lengths  int32   [n_seq]       the first prompt_lengths[i] tokens of sequence i are prompt
    topk_logprobs   dtype   [n_targets, k] top-k of log_softmax(teacher_logits / temperature)
    topk_indices    int16 (vocab < 32768) else int32 [n_targets, k]
    tail_logmass    float32 [n_targets]   log(1 - sum(exp(topk_logprobs))), -inf when k == vocab
    target_offsets  int64   [n_seq + 1]   sequence i's rows are [target_offsets[i]:target_offsets[i+1]]

Row j of sequence i (0 <= j < n_continuation) is the teacher's distribution at position
prompt_len + j - 1, i.e. the one that predicts continuation token input_ids[prompt_len + j].
Top-k entries are sorted by decreasing log-prob. `tail_logmass` is computed from the logits
(logsumexp over the non-top-k logits minus the full logsumexp), not from the rounded
top-k values, so it stays exact when the top-k mass is close to 1.

index.json also records format_version, the teacher and tokenizer fingerprints, vocab
size, k, temperature, dtype, totals, and per shard: file, n_sequences, n_tokens (target
tokens), bytes and sha256. Files in the directory that index.json does not list (a shard
left by a crash before the index was written) are ignored.

`TeacherCache` reads it back: it checks the index, every shard's size and sha256, and the
fingerprints, and fails with one-line `CacheError`s that name the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from tqdm.auto import tqdm

from tnd.errors import TndError
from tnd.generation import right_pad
from tnd.io import atomic_write_bytes, atomic_write_json

# 2: the tokenizer fingerprint covers merges, normalizer and pre-tokenizer (`tokenizer_content`); a
# version-1 cache is refused by its version rather than as "made by a different tokenizer".
FORMAT_VERSION = 2
INDEX = "index.json"
RERUN = "rerun `dvc repro -f cache_teacher_logits`"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SHARD_TENSORS = (
    "input_ids",
    "seq_offsets",
    "prompt_lengths",
    "topk_logprobs",
    "topk_indices",
    "tail_logmass",
    "target_offsets",
)


class CacheError(TndError):
    """The teacher-logit cache is missing, corrupted, or made by another teacher/tokenizer."""


# --- fingerprints ---------------------------------------------------------------------


def fingerprint_model(model: torch.nn.Module) -> str:
    """sha256 (hex) over the state_dict: names, dtypes, shapes and raw bytes, sorted by name."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{str(tensor.dtype)}\0{tuple(tensor.shape)}\0".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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
    logits: torch.Tensor, k: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(topk_logprobs [N,k] fp32, topk_indices [N,k] int64, tail_logmass [N] fp32) from logits [N,V].

    logprobs are log_softmax(logits / temperature); the tail is logsumexp of the logits
    outside the top-k minus the full logsumexp (-inf when k == V), computed in float32.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    vocab = logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k = {k} must be between 1 and the vocabulary size ({vocab})")
    scaled = logits.float() / temperature
    total = torch.logsumexp(scaled, dim=-1)
    top_values, top_indices = torch.topk(scaled, k, dim=-1, sorted=True)
    topk_logprobs = top_values - total.unsqueeze(-1)
    if k == vocab:
        tail = torch.full_like(total, -math.inf)
    else:
        rest = scaled.scatter(-1, top_indices, -math.inf)
        tail = torch.logsumexp(rest, dim=-1) - total
    return topk_logprobs, top_indices, tail


def index_dtype(vocab_size: int) -> torch.dtype:
    return torch.int16 if vocab_size < 32768 else torch.int32


# --- writer --------------------------------------------------------------------------------


class CacheWriter:
    """Appends sequences and their teacher logits; writes shards as they fill, index.json on close.

    Write into a fresh directory (the stage uses `tnd.io.atomic_dir`): shards are written
    atomically one by one and index.json last, so a crash leaves no index (or the old one)
    and the half-written cache does not read as valid.

        with CacheWriter(tmp, vocab_size=V, k=32, ...) as writer:
            writer.add(prompt + continuation, len(prompt), logits[len(prompt) - 1 : -1])
    """

    def __init__(
        self,
        path: str | Path,
        *,
        vocab_size: int,
        k: int,
        temperature: float = 1.0,
        dtype: str = "float16",
        teacher_fingerprint: str = "",
        tokenizer_fingerprint: str = "",
        shard_tokens: int = 65536,
    ):
        if dtype not in DTYPES:
            raise ValueError(f"dtype = {dtype!r}; allowed: {', '.join(DTYPES)}")
        if not 1 <= k <= vocab_size:
            raise ValueError(f"k = {k} must be between 1 and vocab_size ({vocab_size})")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.vocab_size, self.k, self.temperature = int(vocab_size), int(k), float(temperature)
        self.dtype = dtype
        self.teacher_fingerprint, self.tokenizer_fingerprint = teacher_fingerprint, tokenizer_fingerprint
        self.shard_tokens = int(shard_tokens)
        self.shards: list[dict] = []
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self._ids: list[torch.Tensor] = []
        self._prompt_lengths: list[int] = []
        self._logprobs: list[torch.Tensor] = []
        self._indices: list[torch.Tensor] = []
        self._tails: list[torch.Tensor] = []
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
        if self.closed:
            raise RuntimeError("CacheWriter is closed")
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
        self._ids.append(ids.to(torch.int32))
        self._prompt_lengths.append(int(prompt_len))
        self._logprobs.append(topk_logprobs.detach().to("cpu", DTYPES[self.dtype]))
        self._indices.append(topk_indices.detach().to("cpu", index_dtype(self.vocab_size)))
        self._tails.append(tail_logmass.detach().to("cpu", torch.float32))
        self._n_targets += n_targets
        if self._n_targets >= self.shard_tokens:
            self._flush()

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
        from one forward pass per `batch_size` demonstrations. The teacher's logits beyond
        `vocab_size` (padded embedding rows) are dropped."""
        device = next(teacher.parameters()).device
        for start in tqdm(range(0, len(prompts), batch_size), desc="teacher logits", leave=False):
            batch_prompts = [list(p) for p in prompts[start : start + batch_size]]
            sequences = [p + list(c) for p, c in zip(batch_prompts, continuations[start : start + batch_size])]
            ids, mask = right_pad(sequences, pad_id)
            logits = teacher(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[..., : self.vocab_size]
            for row, (prompt, seq) in enumerate(zip(batch_prompts, sequences)):
                rows = logits[row, len(prompt) - 1 : len(seq) - 1]
                self.add_topk(seq, len(prompt), *teacher_topk(rows, self.k, self.temperature))

    def _empty_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.zeros(0, self.k), torch.zeros(0, self.k, dtype=torch.long), torch.zeros(0)

    def _flush(self) -> None:
        if not self._ids:
            return
        seq_lengths = torch.tensor([0] + [t.numel() for t in self._ids], dtype=torch.int64)
        target_lengths = torch.tensor([0] + [t.shape[0] for t in self._tails], dtype=torch.int64)
        tensors = {
            "input_ids": torch.cat(self._ids),
            "seq_offsets": seq_lengths.cumsum(0),
            "prompt_lengths": torch.tensor(self._prompt_lengths, dtype=torch.int32),
            "topk_logprobs": torch.cat(self._logprobs).contiguous(),
            "topk_indices": torch.cat(self._indices).contiguous(),
            "tail_logmass": torch.cat(self._tails).contiguous(),
            "target_offsets": target_lengths.cumsum(0),
        }
        data = safetensors_save(tensors, metadata={"format_version": str(FORMAT_VERSION)})
        name = f"shard-{len(self.shards):05d}.safetensors"
        atomic_write_bytes(self.path / name, data)
        self.shards.append(
            {
                "file": name,
                "n_sequences": len(self._ids),
                "n_tokens": self._n_targets,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
        self._reset()

    def close(self) -> dict:
        """Write the last shard, then index.json; returns the index."""
        if self.closed:
            return self.index
        self._flush()
        self.index = {
            "format_version": FORMAT_VERSION,
            "teacher_fingerprint": self.teacher_fingerprint,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "vocab_size": self.vocab_size,
            "k": self.k,
            "temperature": self.temperature,
            "dtype": self.dtype,
            "n_sequences": sum(s["n_sequences"] for s in self.shards),
            "n_tokens": sum(s["n_tokens"] for s in self.shards),
            "shards": self.shards,
        }
        atomic_write_json(self.path / INDEX, self.index)
        self.closed = True
        return self.index

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()  # on error, no index is written: the partial cache never reads as valid


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

    Opening reads index.json, checks its format_version, the fingerprints (when given) and
    every listed shard's size and (when `verify`) sha256; any problem is a `CacheError`.
    """

    def __init__(
        self,
        path: str | Path,
        teacher_fingerprint: Optional[str] = None,
        tokenizer_fingerprint: Optional[str] = None,
        verify: bool = True,
    ):
        self.path = Path(path)
        self.index = self._read_index()
        self._check_fingerprint("teacher", teacher_fingerprint)
        self._check_fingerprint("tokenizer", tokenizer_fingerprint)
        self.k = int(self.index["k"])
        self.vocab_size = int(self.index["vocab_size"])
        self.temperature = float(self.index["temperature"])
        self.dtype = self.index["dtype"]
        self._handles: dict[int, Any] = {}
        self._shard_seq_offsets: list[torch.Tensor] = []
        self._shard_target_offsets: list[torch.Tensor] = []
        self._shard_prompt_lengths: list[torch.Tensor] = []
        starts = [0]
        for number, shard in enumerate(self.index["shards"]):
            self._check_shard_file(shard, verify)
            self._load_shard_header(number, shard)
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
            self._fail(INDEX, f"not valid JSON ({' '.join(str(exc).split())})")
        if not isinstance(index, dict):
            self._fail(INDEX, "not valid: expected a JSON object")
        version = index.get("format_version")
        if version != FORMAT_VERSION:
            self._fail(INDEX, f"unknown format_version {version!r} (this code reads version {FORMAT_VERSION})")
        required = ("teacher_fingerprint", "tokenizer_fingerprint", "vocab_size", "k", "temperature", "dtype",
                    "n_sequences", "n_tokens", "shards")
        missing = [key for key in required if key not in index]
        if missing:
            self._fail(INDEX, f"not valid: missing {', '.join(missing)}")
        if index["dtype"] not in DTYPES:
            self._fail(INDEX, f"not valid: unknown dtype {index['dtype']!r}")
        if not isinstance(index["shards"], list) or not all(
            isinstance(s, dict) and {"file", "n_sequences", "n_tokens", "bytes", "sha256"} <= s.keys()
            for s in index["shards"]
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

    def _check_shard_file(self, shard: dict, verify: bool) -> None:
        file = self.path / shard["file"]
        if not file.is_file():
            self._fail(shard["file"], "missing (listed in index.json)")
        size = file.stat().st_size
        if size != shard["bytes"]:
            self._fail(shard["file"], f"size {size} bytes, index.json says {shard['bytes']} (truncated or corrupted)")
        if verify:
            digest = hashlib.sha256()
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            if digest.hexdigest() != shard["sha256"]:
                self._fail(shard["file"], "sha256 mismatch (corrupted or truncated)")

    def _handle(self, number: int) -> Any:
        handle = self._handles.get(number)
        if handle is None:
            file = self.index["shards"][number]["file"]
            try:
                handle = safe_open(str(self.path / file), framework="pt")
            except Exception as exc:
                self._fail(file, f"not a readable safetensors file ({' '.join(str(exc).split())[:120]})")
            self._handles[number] = handle
        return handle

    def _load_shard_header(self, number: int, shard: dict) -> None:
        handle = self._handle(number)
        file = shard["file"]
        missing = [name for name in SHARD_TENSORS if name not in handle.keys()]
        if missing:
            self._fail(file, f"not a teacher-cache shard (missing tensors {', '.join(missing)})")
        seq_offsets = handle.get_tensor("seq_offsets")
        target_offsets = handle.get_tensor("target_offsets")
        prompt_lengths = handle.get_tensor("prompt_lengths").long()
        n = shard["n_sequences"]
        shapes = {name: list(handle.get_slice(name).get_shape()) for name in SHARD_TENSORS}
        expected_index = str(index_dtype(self.vocab_size)).removeprefix("torch.")
        dtypes = {name: handle.get_slice(name).get_dtype() for name in ("topk_indices", "topk_logprobs")}
        ok = (
            len(seq_offsets) == n + 1
            and len(target_offsets) == n + 1
            and len(prompt_lengths) == n
            and int(target_offsets[-1]) == shard["n_tokens"]
            and shapes["input_ids"] == [int(seq_offsets[-1])]
            and shapes["topk_logprobs"] == [shard["n_tokens"], self.k]
            and shapes["topk_indices"] == [shard["n_tokens"], self.k]
            and shapes["tail_logmass"] == [shard["n_tokens"]]
            and torch.equal(seq_offsets.diff() - prompt_lengths, target_offsets.diff())
        )
        if not ok:
            self._fail(file, "tensor shapes do not match index.json (inconsistent cache)")
        if dtypes["topk_indices"].lower() != {"int16": "i16", "int32": "i32"}[expected_index]:
            self._fail(file, f"topk_indices has dtype {dtypes['topk_indices']}, expected {expected_index}")
        self._shard_seq_offsets.append(seq_offsets)
        self._shard_target_offsets.append(target_offsets)
        self._shard_prompt_lengths.append(prompt_lengths)

    # --- access ---

    @property
    def n_tokens(self) -> int:
        """Number of target (continuation) tokens, i.e. of stored top-k rows."""
        return int(self.index["n_tokens"])

    def __len__(self) -> int:
        return int(self.index["n_sequences"])

    def __getitem__(self, i: int) -> CachedSequence:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for a cache of {n}")
        i %= n
        number = int(torch.searchsorted(self._shard_starts, torch.tensor(i), right=True)) - 1
        local = i - int(self._shard_starts[number])
        handle = self._handle(number)
        s0, s1 = (int(x) for x in self._shard_seq_offsets[number][local : local + 2])
        t0, t1 = (int(x) for x in self._shard_target_offsets[number][local : local + 2])
        return CachedSequence(
            input_ids=handle.get_slice("input_ids")[s0:s1].long(),
            prompt_len=int(self._shard_prompt_lengths[number][local]),
            topk_logprobs=handle.get_slice("topk_logprobs")[t0:t1].float(),
            topk_indices=handle.get_slice("topk_indices")[t0:t1].long(),
            tail_logmass=handle.get_slice("tail_logmass")[t0:t1].float(),
        )

    def __iter__(self):
        return (self[i] for i in range(len(self)))

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

        or pass the flattened [B*T] tensors with mask=target_mask.reshape(-1).
        """
        items = [self[int(i)] for i in indices]
        if not items:
            raise ValueError("batch() needs at least one index")
        width = max(item.input_ids.numel() for item in items)
        size = len(items)
        out = {
            "input_ids": torch.full((size, width), int(pad_id), dtype=torch.long),
            "attention_mask": torch.zeros((size, width), dtype=torch.long),
            "target_mask": torch.zeros((size, width), dtype=torch.bool),
            "topk_logprobs": torch.zeros((size, width, self.k), dtype=torch.float32),
            "topk_indices": torch.zeros((size, width, self.k), dtype=torch.long),
            "tail_logmass": torch.zeros((size, width), dtype=torch.float32),
            "prompt_lengths": torch.tensor([item.prompt_len for item in items], dtype=torch.long),
        }
        for row, item in enumerate(items):
            length, start = item.input_ids.numel(), item.prompt_len - 1
            out["input_ids"][row, :length] = item.input_ids
            out["attention_mask"][row, :length] = 1
            end = length - 1  # positions start .. length - 2 predict the continuation
            if end > start:
                out["target_mask"][row, start:end] = True
                out["topk_logprobs"][row, start:end] = item.topk_logprobs
                out["topk_indices"][row, start:end] = item.topk_indices
                out["tail_logmass"][row, start:end] = item.tail_logmass
        return out

    # --- lifetime (handles are reopened lazily, so the cache can go to DataLoader workers) ---

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "TeacherCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state


def cache_bytes(path: str | Path) -> int:
    """Bytes on disk of index.json and the shards it lists."""
    path = Path(path)
    index = json.loads((path / INDEX).read_text(encoding="utf-8"))
    shards = sum(os.path.getsize(path / shard["file"]) for shard in index["shards"])
    return (path / INDEX).stat().st_size + shards
