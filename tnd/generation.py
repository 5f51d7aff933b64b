"""Sampling continuations of prompts, batched, seeded, with a progress bar."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from tnd.batching import left_pad


@torch.no_grad()
def sample_continuations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    max_new_tokens: int,
    seed: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_size: int = 64,
    desc: str = "sampling",
    progress: bool = True,
) -> list[list[int]]:
    """Token ids of one sampled continuation per prompt, cut after the first eos (kept); every id is one
    of the tokenizer's, also when the model's embeddings are padded beyond it (see TokenizerIdsOnly)."""
    model.eval()
    continuations: list[list[int]] = []
    only_tokenizer_ids = _tokenizer_ids_only(model, tokenizer)
    devices = [model.device] if model.device.type == "cuda" else []
    # HF generate samples from the global RNG: seed it, and leave the caller's state as it was.
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False, disable=not progress):
            ids, mask = left_pad(prompts[start : start + batch_size], tokenizer.pad_token_id)
            out = model.generate(
                input_ids=ids.to(model.device),
                attention_mask=mask.to(model.device),
                do_sample=True,
                temperature=temperature,
                top_k=top_k or None,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                logits_processor=only_tokenizer_ids,
            )
            for row in out[:, ids.shape[1] :].cpu().tolist():
                continuations.append(_cut_after_eos(row, tokenizer.eos_token_id))
    return continuations


def _cut_after_eos(tokens: list[int], eos_id: int) -> list[int]:
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


class TokenizerIdsOnly(LogitsProcessor):
    """Gives the ids at and above `n_ids` (embedding rows beyond the tokenizer) no probability.

    Embeddings may be padded beyond the tokenizer (legal: Qwen pads to a multiple of 64). Such an
    id decodes to nothing, and the reward model, the teacher or a student built on the tokenizer has
    no row for it: handed on, it is an IndexError (a device-side assert on CUDA). Sampling keeps to
    the tokenizer's ids rather than the trainer requiring the reward model to cover the sampler's
    padded rows, which would refuse a legal pairing (a padded hub student with the built-in reward
    model). A trained model gives those rows almost no mass, so the distribution barely moves.
    HF runs custom processors before temperature / top-k / top-p.
    """

    def __init__(self, n_ids: int) -> None:
        self.n_ids = n_ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        scores[:, self.n_ids :] = float("-inf")
        return scores


def _tokenizer_ids_only(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> LogitsProcessorList | None:
    """A TokenizerIdsOnly when the model's output is wider than the tokenizer, else None (nothing to mask)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    width = getattr(head, "out_features", None) or getattr(model.config, "vocab_size", 0)
    return LogitsProcessorList([TokenizerIdsOnly(len(tokenizer))]) if width > len(tokenizer) else None
