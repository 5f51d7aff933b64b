"""Quality measures shared by the teacher, PPO and evaluate stages.

Everything here works on models, tokenizers and lists of texts or token ids; where the
inputs come from (file layout) is the stages' business.

* sampling: `sample_rows` (prompt + continuation, with token ids), `sample_texts` (text only)
* `grammaticality` (nursery grammar), `distinct_n`, `mean_length`
* `token_kl`: mean per-token KL(reference || model) on texts, via `tnd_kernels.distill_loss`
* `perplexity_from_logprobs`: perplexity from `sequence_logprobs` (device-aware, unlike a
  plain batch loop on CPU tensors)
* word acquisition (the TnD paper's measure): `locate_words` finds where given words occur
  in texts and which tokens spell them, `sequence_logprobs` scores every token of those texts
  under a model, and `word_surprisals` sums each occurrence's token surprisals (bits) and
  averages them per word.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Mapping, NamedTuple, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tnd.data import nursery
from tnd.data.tokenizer import decode
from tnd.generation import sample_continuations
from tnd.trainers.lm import IGNORE_INDEX, collate, encode_for_lm

LN2 = math.log(2.0)


# --- sampling -----------------------------------------------------------------------------


def sample_rows(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    max_new_tokens: int,
    seed: int,
    temperature: float = 1.0,
    desc: str = "sampling",
    batch_size: int = 64,
) -> list[dict]:
    """One sampled continuation per prompt: prompt/continuation/full text, their token ids, length, ended."""
    continuations = sample_continuations(
        model, tokenizer, prompts, max_new_tokens, seed, temperature=temperature, batch_size=batch_size, desc=desc
    )
    rows = []
    for prompt, continuation in zip(prompts, continuations):
        rows.append(
            {
                "prompt": decode(tokenizer, prompt),
                "continuation": decode(tokenizer, continuation),
                "text": decode(tokenizer, prompt + continuation),
                "prompt_ids": list(prompt),
                "continuation_ids": list(continuation),
                "length": len(continuation),
                "ended": bool(continuation) and continuation[-1] == tokenizer.eos_token_id,
            }
        )
    return rows


def sample_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    max_new_tokens: int,
    seed: int,
    temperature: float = 1.0,
    desc: str = "sampling",
) -> list[dict]:
    """prompt + continuation decoded to text, one row per prompt."""
    rows = sample_rows(model, tokenizer, prompts, max_new_tokens, seed, temperature, desc)
    keep = ("prompt", "text", "length", "ended")
    return [{key: row[key] for key in keep} for row in rows]


def is_grammatical_row(row: dict) -> bool:
    """A sample is grammatical when it ended (eos) and the nursery grammar accepts its text."""
    return bool(row["ended"]) and nursery.is_grammatical(row["text"])


def grammaticality(rows: list[dict]) -> float:
    """Fraction of sampled texts that the nursery grammar accepts (unfinished ones count as wrong)."""
    ok = [is_grammatical_row(row) for row in rows]
    return sum(ok) / max(len(ok), 1)


# --- diversity and length -----------------------------------------------------------------


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique word n-grams / all word n-grams over all texts.

    Words are whitespace-separated; n-grams never cross texts. 0.0 when there is no n-gram.
    """
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        words = text.split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0


def mean_length(rows: Sequence[dict]) -> float:
    """Mean continuation length in tokens (eos included)."""
    return sum(row["length"] for row in rows) / max(len(rows), 1)


# --- KL to a reference model ------------------------------------------------------------------


def _shared_vocab(a: torch.Tensor, b: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both logits over the same vocabulary (embeddings may be padded beyond the tokenizer)."""
    if a.shape[-1] == b.shape[-1]:
        return a, b
    return a[..., :vocab], b[..., :vocab]


@torch.no_grad()
def token_kl(
    model: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    max_length: int,
    batch_size: int = 64,
    backend: str = "auto",
) -> float:
    """Mean per-token KL(reference || model) in nats on bos + text + eos.

    Both models read the same ids; the positions averaged over are those that predict a
    real next token (the tokens perplexity counts: every non-pad position but the last).
    Computed with `tnd_kernels.distill_loss(loss="forward_kl", reduction="sum")` / count.
    """
    from tnd_kernels import distill_loss

    model.eval()
    reference.eval()
    device = next(model.parameters()).device
    data = encode_for_lm(tokenizer, texts, max_length)
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = collate(data[start : start + batch_size], tokenizer.pad_token_id)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        keep = (batch["labels"][:, 1:] != IGNORE_INDEX).to(device).flatten()
        q = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        p = reference(input_ids=ids.to(reference.device), attention_mask=mask.to(reference.device)).logits[:, :-1]
        q, p = _shared_vocab(q, p.to(device), len(tokenizer))
        kl = distill_loss(
            q.flatten(0, 1), p.flatten(0, 1), loss="forward_kl", mask=keep, reduction="sum", backend=backend
        )
        total += float(kl)
        count += int(keep.sum())
    return total / max(count, 1)


# --- word acquisition: surprisal of words in context ---------------------------------------------


class WordOccurrence(NamedTuple):
    sequence: int  # index into the encoded sequences
    word: str
    positions: tuple[int, ...]  # positions in the sequence (bos + text + eos) of the word's tokens


_WORD = re.compile(r"[A-Za-z]+")


def _owner_positions(text: str, offsets: Sequence[tuple[int, int]]) -> list[int]:
    """For each token, the character it belongs to: its first non-space character.

    A token of whitespace only (byte-level BPE's lone "Ġ") belongs to the word after it.
    """
    owners = []
    for start, end in offsets:
        pos = start
        while pos < len(text) and text[pos].isspace():
            pos += 1
        owners.append(pos)
    return owners


def locate_words(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], words: Iterable[str], max_length: int
) -> tuple[list[list[int]], list[WordOccurrence]]:
    """Encode texts as bos + text + eos (as `encode_for_lm`) and find every occurrence of `words`.

    Words are maximal runs of letters, matched case-insensitively; an occurrence's tokens
    are those whose first non-space character lies inside it (so "Ġ" + "l" + "ittle" all
    belong to "little"). Occurrences cut off by max_length, or sharing a token with a
    neighbouring character (a BPE merge across the word's edge), are left out.
    Needs a fast (Rust) tokenizer for character offsets.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("locate_words needs a fast tokenizer (character offsets)")
    wanted = {w.lower() for w in words}
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    sequences: list[list[int]] = []
    occurrences: list[WordOccurrence] = []
    for index, text in enumerate(texts):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        sequences.append(([bos] + list(ids) + [eos])[:max_length])
        owners = _owner_positions(text, offsets)
        for match in _WORD.finditer(text):
            word = match.group().lower()
            if word not in wanted:
                continue
            start, end = match.span()
            tokens = [j for j, owner in enumerate(owners) if start <= owner < end]
            if not tokens:
                continue
            # the word's tokens must cover exactly its characters (no merge with a neighbour)
            if offsets[tokens[-1]][1] != end or tokens != list(range(tokens[0], tokens[-1] + 1)):
                continue
            positions = tuple(j + 1 for j in tokens)  # + 1 for the bos in front
            if positions[-1] >= len(sequences[-1]):
                continue
            occurrences.append(WordOccurrence(index, word, positions))
    return sequences, occurrences


@torch.no_grad()
def sequence_logprobs(
    model: PreTrainedModel, sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int = 64
) -> list[torch.Tensor]:
    """Per sequence, float64 [len]: log p(token_j | tokens before j) in nats (entry 0, the bos: 0)."""
    model.eval()
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    for start in range(0, len(sequences), batch_size):
        chunk = [list(s) for s in sequences[start : start + batch_size]]
        batch = collate(chunk, pad_id)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        logp = logp.double().cpu()
        for row, seq in enumerate(chunk):
            out.append(torch.cat([torch.zeros(1, dtype=torch.float64), logp[row, : len(seq) - 1]]))
    return out


def perplexity_from_logprobs(logprobs: Sequence[torch.Tensor]) -> float:
    """exp(mean next-token NLL) over every token but each sequence's first (the bos), as
    `tnd.trainers.lm.perplexity` computes it from the same sequences."""
    total = sum(float(lp[1:].sum()) for lp in logprobs)
    count = sum(max(len(lp) - 1, 0) for lp in logprobs)
    return math.exp(-total / max(count, 1))


def word_surprisals(logprobs: Sequence[torch.Tensor], occurrences: Sequence[WordOccurrence]) -> dict[str, dict]:
    """{word: {"count", "surprisal"}}: mean over occurrences of -log2 p(word | left context),
    the sum of the surprisals of the word's tokens."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for occ in occurrences:
        bits = -sum(float(logprobs[occ.sequence][p]) for p in occ.positions) / LN2
        sums[occ.word] = sums.get(occ.word, 0.0) + bits
        counts[occ.word] = counts.get(occ.word, 0) + 1
    return {w: {"count": counts[w], "surprisal": sums[w] / counts[w]} for w in sorted(sums)}


def word_surprisal(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    words: Iterable[str],
    max_length: int,
    batch_size: int = 64,
) -> dict[str, dict]:
    """`word_surprisals` of `words` in `texts` under `model` (locate, score, sum) in one call."""
    sequences, occurrences = locate_words(tokenizer, texts, words, max_length)
    needed = sorted({occ.sequence for occ in occurrences})  # score only the texts that hold a word
    slot = {index: k for k, index in enumerate(needed)}
    logprobs = sequence_logprobs(model, [sequences[i] for i in needed], tokenizer.pad_token_id, batch_size)
    return word_surprisals(logprobs, [o._replace(sequence=slot[o.sequence]) for o in occurrences])


def mean_word_surprisal(per_word: Mapping[str, dict]) -> float | None:
    """Mean over words (each word once, whatever its count); None when no word occurred."""
    values = [entry["surprisal"] for entry in per_word.values()]
    return sum(values) / len(values) if values else None


def word_category(word: str, categories: Mapping[str, Iterable[str]] = nursery.WORDS_BY_CATEGORY) -> str | None:
    """The first category (in `categories` order) that holds `word`."""
    for name, members in categories.items():
        if word in members:
            return name
    return None
