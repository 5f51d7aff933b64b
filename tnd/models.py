"""Build, load and save the causal LMs (teacher, student), and the checks every model passes (the reward
model's own building and loading: tnd/reward.py).

Built-in models are small Llama-style decoders made from an `ArchParams`; any HF
model by name or path can stand in for each, provided its embeddings cover the
tokenizer's ids and, when its source has a tokenizer, that tokenizer is the pipeline's
(same vocabulary, merges and normalizer): the same id must mean the same token to every
model, or training runs on nonsense without a sign.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tnd.cache import fingerprint_vocabulary
from tnd.errors import TndError, one_line
from tnd.io import atomic_dir

if TYPE_CHECKING:  # annotations only: the trainer runs without pydantic (the GPU image)
    from tnd.config import ArchParams


def llama_config(
    arch: ArchParams, tokenizer: PreTrainedTokenizerBase, pad_vocab_to: Optional[int] = None, **extra
) -> LlamaConfig:
    """A built-in model's config: one embedding and output row per token of `tokenizer`, or `pad_vocab_to` rows
    (tokenizer.pad_vocab_to), the ones past the tokenizer never sampled (tnd.generation.TokenizerIdsOnly)."""
    if pad_vocab_to is not None and pad_vocab_to < len(tokenizer):
        raise TndError(
            f"tokenizer.pad_vocab_to = {pad_vocab_to} is smaller than the tokenizer's {len(tokenizer)} tokens; "
            f"set it to at least {len(tokenizer)}, or null"
        )
    return LlamaConfig(
        vocab_size=pad_vocab_to or len(tokenizer),
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_heads,
        intermediate_size=arch.intermediate_size,
        max_position_embeddings=arch.max_position_embeddings,
        attention_dropout=arch.dropout,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )


def build_causal_lm(
    arch: ArchParams, tokenizer: PreTrainedTokenizerBase, seed: int, pad_vocab_to: Optional[int] = None
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(arch, tokenizer, pad_vocab_to))


def load_causal_lm(source: str | Path, tokenizer: PreTrainedTokenizerBase, role: str) -> PreTrainedModel:
    """A causal LM saved with save_pretrained (or a hub name) whose vocabulary and tokenizer fit the pipeline's."""
    try:
        model = AutoModelForCausalLM.from_pretrained(str(source))
    except Exception as exc:
        raise TndError(
            f"{role}: could not load a causal LM from '{source}' ({one_line(exc, 200)}); "
            f"check {role}.source or rerun its stage"
        ) from None
    check_vocab(model, tokenizer, role, source)
    return model


def check_vocab(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, role: str, source: str | Path | None = None
) -> None:
    """Embeddings may be padded beyond the tokenizer, never smaller than it; and when the model's
    source has a tokenizer, it must be the pipeline's (a same-sized but different one trains silently)."""
    model_vocab = model.get_input_embeddings().num_embeddings
    if model_vocab < len(tokenizer):
        raise TndError(
            f"{role}: model vocabulary ({model_vocab}) is smaller than the tokenizer's ({len(tokenizer)}); "
            f"use a {role} trained with this tokenizer, or set tokenizer.source to the model's tokenizer"
        )
    own = source_tokenizer(source) if source is not None else None
    if own is not None and fingerprint_vocabulary(own) != fingerprint_vocabulary(tokenizer):
        pipeline = tokenizer.name_or_path or "the pipeline's tokenizer"
        raise TndError(
            f"{role}: the tokenizer of '{source}' differs from the pipeline's ('{pipeline}') in its vocabulary, "
            f"merges or normalizer, so the same ids would mean other tokens; use a {role} made with "
            f"'{pipeline}' (rerun its stage), or set tokenizer.source: {source} and rerun the pipeline"
        )


# Any of these makes a local directory hold a tokenizer (save_pretrained writes the first two).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")


def source_tokenizer(source: str | Path) -> PreTrainedTokenizerBase | None:
    """The tokenizer a model's source carries (save_model puts one beside the weights; a hub model
    usually has its own), or None when it has none (then only the vocabulary size can be checked)."""
    path = Path(source)
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except Exception:  # weights without a tokenizer (or none reachable): fall back to the size check
        return None


def save_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path, state_dict: Optional[dict] = None
) -> None:
    """save_pretrained into `path` atomically, with the tokenizer beside the weights; `state_dict` (default:
    the model's own) when the model's parameters are shards (FSDP, ZeRO-3) and the full weights were gathered."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
