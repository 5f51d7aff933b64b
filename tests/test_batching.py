"""tnd.batching on hand examples: padding both ways, LM collation and encoding, positions, PPO batch layout."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from tnd.batching import (
    IGNORE_INDEX,
    collate,
    encode_for_lm,
    left_pad,
    lm_positions,
    lm_sequence,
    positions,
    prompt_response_batch,
    response_predictors,
    right_pad,
    stack_padded,
)

PAD = 0


def test_right_and_left_pad():
    ids, mask = right_pad([[5, 6, 7], [8], []], PAD)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]] and ids.dtype == torch.long
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]] and mask.dtype == torch.long
    ids, mask = left_pad([[5, 6, 7], torch.tensor([8]), []], PAD)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert right_pad([], PAD)[0].shape == (0, 0)


def test_collate_labels_only_real_tokens():
    batch = collate([[5, 6], [7]], PAD)
    assert batch["input_ids"].tolist() == [[5, 6], [7, 0]]
    assert batch["labels"].tolist() == [[5, 6], [7, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0]]


def test_lm_sequence_frames_and_cuts():
    tok = SimpleNamespace(bos_token_id=1, eos_token_id=2)
    assert lm_sequence(tok, [5, 6], 8) == [1, 5, 6, 2]
    assert lm_sequence(tok, [5, 6, 7], 3) == [1, 5, 6]  # cut: the eos goes first


def test_encode_for_lm_is_lm_sequence_of_the_tokens():
    class Tok(SimpleNamespace):
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [10 + len(word) for word in text.split()]}

    tok = Tok(bos_token_id=1, eos_token_id=2)
    assert encode_for_lm(tok, ["a bb", "ccc dd e"], 4) == [[1, 11, 12, 2], [1, 13, 12, 11]]


def test_positions_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    assert positions(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 2]]


def test_lm_positions_need_a_real_next_token():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert lm_positions(mask).tolist() == [[True, True, False, False], [True, True, True, False]]
    at = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 1]])
    assert lm_positions(mask, at).tolist() == [[False, True, False, False], [True, False, False, False]]
    assert at.tolist() == [[0, 1, 1, 0], [1, 0, 0, 1]]  # the caller's `at` is not changed


def test_prompt_response_batch_and_its_predictors():
    ids, mask, width, response_mask = prompt_response_batch([[1, 5, 6], [1]], [[7, 2], [8, 9, 2]], PAD)
    assert width == 3
    assert ids.tolist() == [[1, 5, 6, 7, 2, 0], [0, 0, 1, 8, 9, 2]]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert response_mask.tolist() == [[True, True, False], [True, True, True]]
    at = response_predictors(response_mask, width)
    # the position before each response token predicts it
    assert ids[:, 1:][at[:, :-1]].tolist() == ids[:, width:][response_mask].tolist()
    assert at.tolist() == [[False, False, True, True, False, False], [False, False, True, True, True, False]]


def test_stack_padded():
    a = (torch.tensor([[5, 6, 7]]), torch.tensor([[1, 1, 1]]), torch.tensor([[True, True, False]]))
    b = (torch.tensor([[8]]), torch.tensor([[1]]), torch.tensor([[True]]))
    ids, mask, at = stack_padded([a, b], PAD)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert at.tolist() == [[True, True, False], [True, False, False]]
    assert stack_padded([a], PAD) is not None and stack_padded([a], PAD)[0] is a[0]  # one block: as it is
    empty = tuple(t[:0] for t in a)
    ids, mask, at = stack_padded([empty], PAD)
    assert ids.tolist() == [[PAD]] and mask.tolist() == [[1]] and at.tolist() == [[False]]
