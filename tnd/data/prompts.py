"""Trial prompts: the opening tokens of texts, for the student (and the teacher) to continue."""

from __future__ import annotations

import random

from tnd.data.tokenizer import encode


def make_prompts(tokenizer, texts: list[str], n: int, prompt_tokens: int, seed: int) -> list[dict]:
    """bos + the first `prompt_tokens` tokens of texts that have something left to continue.

    The bos is part of the ids because every model here is trained on bos-prefixed text:
    generation, the teacher cache and the reward model all take these ids as they are.
    """
    usable = [ids for ids in (encode(tokenizer, t) for t in texts) if len(ids) > prompt_tokens]
    if not usable:
        return []
    rng = random.Random(seed)
    chosen = [usable[rng.randrange(len(usable))][:prompt_tokens] for _ in range(n)]
    return [{"prompt": tokenizer.decode(ids).strip(), "prompt_ids": [tokenizer.bos_token_id] + ids} for ids in chosen]
