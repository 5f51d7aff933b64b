"""Trial prompts: the opening tokens of texts, for the student (and the teacher) to continue."""

from __future__ import annotations

import random
from array import array
from typing import Iterable

from tnd.data.tokenizer import encode_many


def make_prompts(tokenizer, texts: Iterable[str], n: int, prompt_tokens: int, seed: int) -> list[dict]:
    """bos + the first `prompt_tokens` tokens of texts that have something left to continue.

    The bos is part of the ids because every model here is trained on bos-prefixed text:
    generation, the teacher cache and the reward model all take these ids as they are.
    The texts are read once, in order, and their openings kept in one flat array of ints (a corpus of
    millions is a few bytes a text, not a list of lists).
    """
    width, flat = prompt_tokens + 1, array("q")
    for ids in encode_many(tokenizer, texts):
        if len(ids) > prompt_tokens:
            flat.append(tokenizer.bos_token_id)
            flat.extend(ids[:prompt_tokens])
    usable = len(flat) // width
    if not usable:
        return []
    rng = random.Random(seed)
    drawn = (rng.randrange(usable) for _ in range(n))
    return _prompt_rows(tokenizer, [flat[i * width : (i + 1) * width].tolist() for i in drawn])


def _openings(tokenizer, texts: Iterable[str], prompt_tokens: int) -> list[list[int]]:
    """bos + the first `prompt_tokens` token ids of each text that has something left to continue."""
    return [[tokenizer.bos_token_id] + ids[:prompt_tokens]
            for ids in encode_many(tokenizer, texts) if len(ids) > prompt_tokens]


def _prompt_rows(tokenizer, openings: list[list[int]]) -> list[dict]:
    """prompts.jsonl's rows: the opening's text (without the bos) and its ids."""
    return [{"prompt": tokenizer.decode(ids[1:]).strip(), "prompt_ids": list(ids)} for ids in openings]


def make_eval_prompts(
    tokenizer, texts: list[str], n: int, prompt_tokens: int, seed: int, train_prompts: list[dict]
) -> tuple[list[dict], dict]:
    """`n` prompts as make_prompts makes them, from texts whose prompt is none of `train_prompts` (held-out prompts:
    the opening tokens of a small grammar repeat, so most texts' prompts are training prompts too).

    Drawn without replacement from those texts; when they are fewer than `n` (too few distinct openings of
    `prompt_tokens` tokens), all of them and then prompts that are training prompts, counted. Returns the prompts
    and {"n_eval_prompts", "eval_prompts_distinct", "eval_prompts_in_train"} (the last: how many of the prompts
    are training prompts, 0 when the texts allow)."""
    exclude = {tuple(p["prompt_ids"]) for p in train_prompts}
    usable = _openings(tokenizer, texts, prompt_tokens)
    held_out = [ids for ids in usable if tuple(ids) not in exclude]
    seen = [ids for ids in usable if tuple(ids) in exclude]
    rng = random.Random(seed)

    def draw(pool: list[list[int]], k: int) -> list[list[int]]:
        if not pool or k <= 0:
            return []
        return rng.sample(pool, k) if len(pool) >= k else [pool[rng.randrange(len(pool))] for _ in range(k)]

    chosen = draw(held_out, min(n, len(held_out)))
    chosen += draw(seen or held_out, n - len(chosen))  # what the texts cannot give without a training prompt
    rng.shuffle(chosen)
    prompts = _prompt_rows(tokenizer, chosen)
    stats = {"n_eval_prompts": len(prompts), "eval_prompts_distinct": len({tuple(ids) for ids in chosen}),
             "eval_prompts_in_train": sum(tuple(ids) in exclude for ids in chosen)}
    return prompts, stats
