"""Reading a cache: `TeacherCache`, random access to the sequences of a cache directory, checked
against index.json (the layout: `tnd/cache/codec.py`)."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from safetensors import safe_open

from tnd.batching import right_pad
from tnd.errors import one_line
from tnd.io import read_json

from .codec import (
    DTYPES,
    FORMAT_VERSION,
    INDEX,
    RERUN,
    SAMPLE_TENSORS,
    SEQUENCE_TENSORS,
    SHARD_KEYS,
    TARGETS,
    TOPK_TENSORS,
    VALUE_TENSORS,
    CacheError,
    decode_logprobs,
    decode_samples,
    distinct_counts,
    group_bytes,
    index_bits,
    levels,
    unpack_bits,
    value_bytes,
)


@dataclass
class CachedSequence:
    """One demonstration. Row j of the top-k tensors predicts input_ids[prompt_len + j]. Of a sampled
    cache they are the sampled rows as the top-k loss reads them (codec: "The sampled targets")."""

    input_ids: torch.Tensor  # int64 [L]
    prompt_len: int
    topk_logprobs: torch.Tensor  # float32 [L - prompt_len, k]
    topk_indices: torch.Tensor  # int64 [L - prompt_len, k]
    tail_logmass: torch.Tensor  # float32 [L - prompt_len]


class TeacherCache:
    """Random access to a cache directory written by `CacheWriter`; shards are memory-mapped.

    Opening reads index.json, checks its format_version, the fingerprints (when given) and every
    listed shard's size; a shard's sha256 is checked (when `verify`) the first time the shard is
    read. Any problem is a `CacheError` naming the file. `k` is the width of a row: the top-k's k, or
    a sampled cache's samples.
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
        self.targets = self.index["targets"]
        self.sampled = self.targets == "sampled"
        self.k = int(self.index["samples" if self.sampled else "k"])
        self.vocab_size = int(self.index["vocab_size"])
        self.temperature = float(self.index["temperature"])
        self.dtype = self.index.get("dtype")
        self.bits = index_bits(self.vocab_size)
        self._handles: dict[int, Any] = {}
        self._headers: dict[int, tuple[torch.Tensor, ...]] = {}
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
            index = read_json(index_path)
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
        if index.get("targets") not in TARGETS:
            self._fail(INDEX, f"not valid: targets {index.get('targets')!r} is none of {', '.join(TARGETS)}")
        width = "samples" if index["targets"] == "sampled" else "k"
        required = ("teacher_fingerprint", "tokenizer_fingerprint", "vocab_size", width, "temperature",
                    "index_bits", "n_sequences", "n_tokens", "shards") + (("dtype",) if width == "k" else ())
        missing = [key for key in required if key not in index]
        if missing:
            self._fail(INDEX, f"not valid: missing {', '.join(missing)}")
        if width == "k" and index["dtype"] not in DTYPES:
            self._fail(INDEX, f"not valid: unknown dtype {index['dtype']!r}")
        if not (isinstance(index["vocab_size"], int) and isinstance(index[width], int)
                and 1 <= index[width] <= index["vocab_size"]):
            self._fail(INDEX, f"not valid: vocab_size and {width} must be integers with 1 <= {width} <= vocab_size")
        if index["index_bits"] != index_bits(index["vocab_size"]):
            self._fail(INDEX, f"not valid: index_bits {index['index_bits']!r} does not fit vocab_size "
                              f"{index['vocab_size']} (expected {index_bits(index['vocab_size'])})")
        if index.get("dtype") == "compact" and (index.get("value_bytes"), index.get("levels")) != (
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

    def _row_tensors(self) -> tuple[str, ...]:
        if self.sampled:
            return SAMPLE_TENSORS
        return TOPK_TENSORS + VALUE_TENSORS.get(self.dtype, ("topk_logprobs",))

    def _load_shard_header(self, number: int, handle: Any) -> tuple[torch.Tensor, ...]:
        """seq_offsets, target_offsets and prompt_lengths of shard `number`, and for a sampled cache
        id_starts [n_tokens + 1]: where each row's distinct ids start in its sample_ids."""
        shard = self.index["shards"][number]
        file = shard["file"]
        names = SEQUENCE_TENSORS + self._row_tensors()
        missing = [name for name in names if name not in handle.keys()]
        if missing:
            self._fail(file, f"not a teacher-cache shard of this format (missing tensors {', '.join(missing)})")
        seq_offsets = handle.get_tensor("seq_offsets")
        target_offsets = handle.get_tensor("target_offsets")
        prompt_lengths = handle.get_tensor("prompt_lengths").long()
        n, rows = shard["n_sequences"], shard["n_tokens"]
        id_starts = None
        if self.sampled:
            groups = handle.get_slice("sample_groups")
            if groups.get_dtype() != "U8" or list(groups.get_shape()) != [rows, group_bytes(self.k)]:
                self._fail(file, f"tensor sample_groups is {groups.get_dtype()} {groups.get_shape()}, index.json "
                                 f"implies U8 {[rows, group_bytes(self.k)]} (inconsistent cache)")
            id_starts = torch.cat([torch.zeros(1, dtype=torch.int64),
                                   distinct_counts(handle.get_tensor("sample_groups"), self.k).cumsum(0)])
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
            "sample_groups": ("U8", [rows, group_bytes(self.k)]),
            "sample_ids": ("U8", [-(-int(id_starts[-1]) * self.bits // 8)] if id_starts is not None else None),
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
        if id_starts is None:
            return seq_offsets, target_offsets, prompt_lengths
        return seq_offsets, target_offsets, prompt_lengths, id_starts

    # --- access ---

    @property
    def n_tokens(self) -> int:
        """Number of target (continuation) tokens, i.e. of stored rows."""
        return int(self.index["n_tokens"])

    def __len__(self) -> int:
        return int(self.index["n_sequences"])

    def _locate(self, i: int) -> tuple[Any, int, int, int, int, int, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for a cache of {n}")
        i %= n
        number = int(torch.searchsorted(self._shard_starts, torch.tensor(i), right=True)) - 1
        local = i - int(self._shard_starts[number])
        handle = self._handle(number)
        seq_offsets, target_offsets, prompt_lengths = self._headers[number][:3]
        s0, s1 = (int(x) for x in seq_offsets[local : local + 2])
        t0, t1 = (int(x) for x in target_offsets[local : local + 2])
        return handle, number, s0, s1, t0, t1, int(prompt_lengths[local])

    def _raw(self, i: int) -> tuple[torch.Tensor, int, str, dict[str, torch.Tensor]]:
        """input_ids, prompt_len, shard file and the stored rows of sequence i (memory-mapped slices;
        a sampled cache's distinct ids unpacked)."""
        handle, number, s0, s1, t0, t1, prompt_len = self._locate(i)
        if self.sampled:
            first, last = (int(x) for x in self._headers[number][3][[t0, t1]])
            byte = first * self.bits // 8
            packed = handle.get_slice("sample_ids")[byte : -(-last * self.bits // 8)]
            rows = {"sample_groups": handle.get_slice("sample_groups")[t0:t1],
                    "sample_ids": unpack_bits(packed.reshape(1, -1), self.bits, last - first,
                                              first * self.bits - 8 * byte).reshape(-1)}
        else:
            rows = {name: handle.get_slice(name)[t0:t1] for name in self._row_tensors()}
        return handle.get_slice("input_ids")[s0:s1].long(), prompt_len, self.index["shards"][number]["file"], rows

    def _decode(self, rows: dict[str, torch.Tensor], files: list[str]) -> tuple[torch.Tensor, ...]:
        """(topk_logprobs fp32, topk_indices int64, tail_logmass fp32) of stored rows."""
        if self.sampled:
            try:
                logprobs, indices = decode_samples(rows["sample_groups"], rows["sample_ids"], self.k)
            except ValueError as exc:
                self._fail(files[0] if len(set(files)) == 1 else INDEX, f"{exc} (corrupted; files {sorted(set(files))})")
            self._check_ids(indices, files)
            return logprobs, indices, torch.full((indices.shape[0],), -math.inf)
        indices = unpack_bits(rows["topk_indices"], self.bits, self.k)
        tails = rows["tail_logmass"].float()
        if self.dtype == "compact":
            try:
                logprobs = decode_logprobs(rows["topk_codes"], rows["topk_step"], tails, self.k)
            except ValueError as exc:
                self._fail(files[0] if len(set(files)) == 1 else INDEX, f"{exc} (corrupted; files {sorted(set(files))})")
        else:
            logprobs = rows["topk_logprobs"].float()
        self._check_ids(indices, files)
        return logprobs, indices, tails

    def _check_ids(self, indices: torch.Tensor, files: list[str]) -> None:
        if indices.numel() and int(indices.max()) >= self.vocab_size:
            self._fail(files[0] if len(set(files)) == 1 else INDEX, f"a token id >= vocab_size (corrupted; files "
                                                                   f"{sorted(set(files))})")

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
    index = read_json(path / INDEX)
    shards = sum(os.path.getsize(path / shard["file"]) for shard in index["shards"])
    return (path / INDEX).stat().st_size + shards
