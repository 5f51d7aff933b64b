"""Reward-model preference pairs: chosen = an original text, rejected = a corruption of it.

On nursery data the corruptions come from the grammar module and are guaranteed
ungrammatical. On other data only the word-level corruptions apply (agreement needs
a grammar) and nothing checks them: they are merely very likely worse.
"""

from __future__ import annotations

import random
from typing import Iterable, Iterator, Sequence

from tnd.data import nursery


def make_pairs(texts: Iterable[str], kinds: Sequence[str], seed: int, use_grammar: bool) -> list[dict]:
    """One pair per text where some kind applies; the kind is drawn at random and recorded."""
    return list(iter_pairs(texts, kinds, seed, use_grammar))


def iter_pairs(texts: Iterable[str], kinds: Sequence[str], seed: int, use_grammar: bool) -> Iterator[dict]:
    """`make_pairs`' pairs one at a time, as the texts come (a corpus too large to hold is written as it is read)."""
    rng = random.Random(seed)
    corrupt = nursery.corrupt if use_grammar else _word_corrupt
    for text in texts:
        for kind in rng.sample(list(kinds), len(kinds)):
            rejected = corrupt(text, kind, rng)
            if rejected is not None and rejected != text:
                yield {"chosen": text, "rejected": rejected, "kind": kind}
                break


def _word_corrupt(text: str, kind: str, rng: random.Random) -> str | None:
    words = text.split()
    if kind == "agreement_swap" or len(words) < 2:
        return None
    i = rng.randrange(len(words) - 1)
    if kind == "adjacent_swap":
        words[i], words[i + 1] = words[i + 1], words[i]
    elif kind == "drop_word":
        del words[i]
    elif kind == "duplicate_word":
        words.insert(i, words[i])
    else:
        raise ValueError(f"unknown corruption kind {kind!r}")
    return " ".join(words)
