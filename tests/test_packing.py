"""Padding-free forward passes (tnd/packing.py): the layout, equality with the padded batch in
outputs and gradients, the model check, and the trainer's use of them."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import tnd.trainers.ppo as ppo_module
from tnd.config import ArchParams
from tnd.models import build_causal_lm
from tnd.packing import chunks, forward_at, layout, pack, supports_packing
from tests.test_ppo import make_trainer

TINY = ArchParams(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64)


def batch(spans: list[tuple[int, int]], width: int, vocab: int, seed: int = 0):
    """Random ids with real tokens at columns [a, b) of each row (left and right padding around them)."""
    ids = torch.randint(3, vocab, (len(spans), width), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(len(spans), width, dtype=torch.long)
    for row, (a, b) in enumerate(spans):
        mask[row, a:b] = 1
    return ids, mask


def test_layout_is_first_fit():
    # width 6: 3 + 2 fit in row 0, 4 starts row 1, 2 joins it, 6 needs a row of its own, and 1 goes
    # back to the gap in row 0
    assert layout([3, 2, 4, 2, 6, 1], 6) == ([0, 0, 1, 1, 2, 0], [0, 3, 0, 4, 0, 5], [6, 6, 6])


def test_pack_places_real_tokens_and_restarts_positions():
    _, mask = batch([(1, 4), (0, 2), (2, 6)], width=6, vocab=10)  # 3, 2 and 4 real tokens
    dest, positions, rows = pack(mask)
    assert rows == 2
    assert dest.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    # row 0: seq 0 (0 1 2), seq 1 (0 1), tail (0); row 1: seq 2 (0 1 2 3), tail (0 1)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_causal_lm(TINY, tokenizer, seed=0).eval()


def test_packed_outputs_and_gradients_equal_the_padded_batch(model, tokenizer):
    ids, mask = batch([(2, 5), (0, 7), (1, 3), (3, 8), (0, 1)], width=8, vocab=len(tokenizer))
    at = mask.bool().clone()
    at[1, 0] = False  # any subset of the real tokens
    results = {}
    for packed in (True, False):
        model.zero_grad()
        logits, hidden = forward_at(model, ids, mask, at, packed=packed, hidden=True)
        (logits.logsumexp(-1).sum() + hidden.square().sum()).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        results[packed] = (logits.detach(), hidden.detach(), grads)
    assert pack(mask)[2] < mask.shape[0]  # the packed run really used fewer rows
    assert results[True][0].shape == (int(at.sum()), len(tokenizer))
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-5, atol=1e-5)
    for packed_grad, padded_grad in zip(results[True][2], results[False][2]):
        torch.testing.assert_close(packed_grad, padded_grad, rtol=1e-4, atol=1e-5)


def test_forward_at_refuses_a_padding_position(model, tokenizer):
    ids, mask = batch([(0, 2), (0, 3)], width=4, vocab=len(tokenizer))
    with pytest.raises(ValueError, match="padding position"):
        forward_at(model, ids, mask, torch.ones_like(mask, dtype=torch.bool), packed=True)


class Wrapped(nn.Module):
    """A causal LM around a real one, with its body and head exposed as forward_at's packed path uses them."""

    def __init__(self, inner: nn.Module, body: nn.Module) -> None:
        super().__init__()
        self.inner, self.base_model = inner, body

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, **kwargs):
        return self.inner(**kwargs)


class LosesPositions(nn.Module):
    """A body that attends across the whole row: the packing boundaries in position_ids are lost."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, position_ids=None, **kwargs):
        return self.inner(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)


class NoPositionIds(LosesPositions):
    def forward(self, input_ids, attention_mask, **kwargs):  # no position_ids argument at all
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


class ScaledLogits(Wrapped):
    """Logits that are more than head(body(x)), as with a logit scale or soft-cap."""

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        out.logits = 2 * out.logits
        return out


def test_supports_packing(model):
    assert supports_packing(model)
    assert supports_packing(Wrapped(model, model.base_model))  # the stand-ins differ from this one only
    assert not supports_packing(Wrapped(model, LosesPositions(model.base_model)))
    assert not supports_packing(Wrapped(model, NoPositionIds(model.base_model)))
    assert not supports_packing(ScaledLogits(model, model.base_model))


def test_chunks_fit_max_rows():
    _, mask = batch([(0, 2)] * 6 + [(0, 6)] * 2, width=6, vocab=10)
    # padded: 3 rows each; packed: 6 x 2 tokens fill 2 rows, then one row per 6-token sequence
    assert chunks(mask, 3, packed=False) == [slice(0, 3), slice(3, 6), slice(6, 8)]
    assert chunks(mask, 3, packed=True) == [slice(0, 7), slice(7, 8)]


def test_trainer_padding_free_matches_padded(tokenizer, prompts):
    history = {}
    for padding_free in (True, False):
        trainer = make_trainer(tokenizer, prompts, padding_free=padding_free)
        history[padding_free] = trainer.train(2)
        assert set(trainer._packed.values()) == {padding_free}
    for packed, padded in zip(history[True], history[False]):
        for key in ("loss/total", "loss/policy", "loss/value", "loss/distill", "objective/kl", "env/reward_mean"):
            assert packed[key] == pytest.approx(padded[key], rel=1e-4, abs=1e-6), key


def test_trainer_falls_back_to_padded_batches_with_a_warning(tokenizer, prompts, monkeypatch):
    monkeypatch.setattr(ppo_module, "supports_packing", lambda model: False)
    with pytest.warns(UserWarning, match=r"fails the padding-free check .*; it runs on padded batches"):
        trainer = make_trainer(tokenizer, prompts)  # each model is checked once, as the trainer is built
    stats = trainer.step(trainer.next_prompts())
    assert set(trainer._packed.values()) == {False}
    assert torch.isfinite(torch.tensor(stats["loss/total"]))  # the padded path trained (nan and inf fail)


def test_padding_free_off_never_checks_models(tokenizer, prompts, monkeypatch):
    monkeypatch.setattr(ppo_module, "supports_packing", lambda model: pytest.fail("checked"))
    trainer = make_trainer(tokenizer, prompts, padding_free=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.step(trainer.next_prompts())
