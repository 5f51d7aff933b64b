"""Tokenizers: a byte-level BPE trained here, or an existing one by name or path."""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from tnd.errors import TndError, one_line

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style) with pad/bos/eos; every word gets its space-prefixed form."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, padding_side="left"
    )


def load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer saved with save_pretrained, or a hub name; pad falls back to eos."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
    except Exception as exc:
        raise TndError(
            f"tokenizer: could not load '{source}' ({one_line(exc, 200)}); "
            "check tokenizer.source or rerun `dvc repro prepare_data`"
        ) from None
    if tokenizer.eos_token_id is None:
        raise TndError(f"tokenizer: '{source}' has no eos token; the pipeline needs one to end samples")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.bos_token_id is None:
        tokenizer.bos_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation appends on the right
    return tokenizer


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_many(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], batch: int = 1024) -> Iterator[list[int]]:
    """`encode` of each text, in order, `batch` texts to a call (a fast tokenizer encodes a batch in parallel)."""
    texts = iter(texts)
    while chunk := list(islice(texts, batch)):
        yield from tokenizer(chunk, add_special_tokens=False)["input_ids"]


def decode(tokenizer: PreTrainedTokenizerBase, ids: Iterable[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()
