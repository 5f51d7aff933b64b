"""Quality measures shared by the teacher, PPO and evaluate stages."""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tnd.data import nursery
from tnd.data.tokenizer import decode
from tnd.generation import sample_continuations


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
    continuations = sample_continuations(
        model, tokenizer, prompts, max_new_tokens, seed, temperature=temperature, desc=desc
    )
    rows = []
    for prompt, continuation in zip(prompts, continuations):
        rows.append(
            {
                "prompt": decode(tokenizer, prompt),
                "text": decode(tokenizer, prompt + continuation),
                "length": len(continuation),
                "ended": bool(continuation) and continuation[-1] == tokenizer.eos_token_id,
            }
        )
    return rows


def grammaticality(rows: list[dict]) -> float:
    """Fraction of sampled texts that the nursery grammar accepts (unfinished ones count as wrong)."""
    ok = [row["ended"] and nursery.is_grammatical(row["text"]) for row in rows]
    return sum(ok) / max(len(ok), 1)
