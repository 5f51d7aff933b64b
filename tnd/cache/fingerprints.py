"""Fingerprints of what a cache depends on: the teacher's weights and the tokenizer's meaning of ids."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import torch


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

