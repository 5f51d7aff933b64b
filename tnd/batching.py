"""Padding and batching of token-id sequences: the one place that pads, collates and lays out batches.

A sequence is a list (or 1-D tensor) of token ids. Right padding (tokens first, pads after) is what the
LM loss, the reward model and the teacher-logit cache use; left padding is what generation wants (the
last column is every prompt's end). A PPO batch is both: prompts left-padded, responses right-padded
after them (`prompt_response_batch`). Texts become sequences as bos + text + eos (`encode_for_lm`).
Padding-free forwards (tnd/packing.py) start from these padded batches.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from tnd.data.tokenizer import encode

IGNORE_INDEX = -100  # label of a position that gets no LM loss (transformers' and torch's default)


def _pad(sequences: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(seq) for seq in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            cols = slice(width - len(seq), width) if left else slice(0, len(seq))
            ids[row, cols] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, cols] = 1
    return ids, mask


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, width] (long) and attention mask (long, 1 = token), tokens first, pads after."""
    return _pad(sequences, pad_id, left=False)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As right_pad, pads first: what generation wants (the last column is every prompt's end)."""
    return _pad(sequences, pad_id, left=True)


def collate(sequences: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch {input_ids, attention_mask, labels}; pad positions are labelled IGNORE_INDEX."""
    input_ids, attention_mask = right_pad(sequences, pad_id)
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def lm_sequence(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], max_length: int) -> list[int]:
    """bos + ids + eos, cut to max_length (the eos is dropped when cut): how every text is framed."""
    return ([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id])[:max_length]


def encode_for_lm(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Each text as `lm_sequence` of its tokens."""
    return [lm_sequence(tokenizer, encode(tokenizer, text), max_length) for text in texts]


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def lm_positions(mask: torch.Tensor, at: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, T] bool: the positions of `at` (default: every real token) whose next token is real."""
    at = mask.bool() if at is None else at.bool().clone()
    at[:, :-1] &= mask[:, 1:].bool()
    at[:, -1] = False  # no next token after the last column
    return at


def prompt_response_batch(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Prompts left-padded, responses right-padded after them: ids [B, P + R], attention mask, the prompt
    width P, and the response mask [B, R] (bool)."""
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    response_ids, response_mask = right_pad(responses, pad_id)
    ids = torch.cat([prompt_ids, response_ids], 1)
    mask = torch.cat([prompt_mask, response_mask], 1)
    return ids, mask, prompt_ids.shape[1], response_mask.bool()


def response_predictors(response_mask: torch.Tensor, prompt_width: int) -> torch.Tensor:
    """[B, P + R] bool, for a `prompt_response_batch`: the positions P-1 .. P+R-2, whose outputs predict
    the response tokens."""
    at = torch.zeros(response_mask.shape[0], prompt_width + response_mask.shape[1], dtype=torch.bool,
                     device=response_mask.device)
    at[:, prompt_width - 1 : -1] = response_mask
    return at


def stack_padded(blocks: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], pad_id: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blocks of (ids, attention mask, positions) [B_i, T_i] as one batch: each padded on the right to the
    widest, rows stacked in order. No rows at all: one row of a single pad token that marks no position."""
    if len(blocks) == 1 and len(blocks[0][0]):
        return blocks[0]
    width = max(ids.shape[1] for ids, _, _ in blocks)
    ids, mask, at = (torch.cat([torch.nn.functional.pad(block[i], (0, width - block[i].shape[1]), value=fill)
                                for block in blocks])
                     for i, fill in ((0, pad_id), (1, 0), (2, False)))
    if not len(ids):
        ids, mask, at = ids.new_full((1, 1), pad_id), mask.new_ones((1, 1)), at.new_zeros((1, 1))
    return ids, mask, at
