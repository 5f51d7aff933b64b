"""The trainer's fixes from the outside review (findings 3, 6, 7, 8, 10, 11 of issue 27, and the rewards
scored under the run's autocast): each test fails on the code before the fix."""

from __future__ import annotations

import contextlib
import types

import pytest
import torch
from accelerate import Accelerator, DistributedType
from accelerate.state import AcceleratorState, GradientState

import tests.test_ppo as tp
from tests.conftest import SENTENCES, tiny_prompts
from tests.test_ppo import make_trainer
from tnd.batching import encode_for_lm, response_predictors
from tnd.engine import clip_grad_norm
from tnd.trainers.fit import Validation, fit
from tnd.reward import score_token_ids
from tnd.trainers.value_head import ValueHead


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return tiny_prompts(tokenizer, 2)


# --- finding 3: fp16 with two optimizers over the same parameters ------------------------------------------


def _fp16_accelerator() -> Accelerator:
    """An Accelerator in the state accelerate builds for fp16 on CUDA, here with a CPU GradScaler (no GPU)."""
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    accelerator.native_amp = True
    accelerator.state._mixed_precision = "fp16"
    return accelerator


def test_clipping_unscales_only_the_optimizer_that_steps(fresh_accelerate_state):
    """Two prepared optimizers share the weights (the PPO optimizer and the LM steps' AdamW): the gradients are
    unscaled once, so clipping and the step see the true gradient."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x = torch.randn(8, 4)
    model(x).pow(2).mean().backward()
    expected = model.weight.grad.clone()
    model.zero_grad()

    accelerator = _fp16_accelerator()
    first = torch.optim.SGD(model.parameters(), lr=0.1)
    second = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, first, second = accelerator.prepare(model, first, second)
    model.forward = model._original_forward  # fp32 compute: only the scaler's arithmetic is under test
    accelerator.backward(model(x).pow(2).mean())  # scaled by 2**10
    norm = clip_grad_norm(accelerator, second, list(model.parameters()), 1e9)
    torch.testing.assert_close(model.weight.grad, expected)
    assert torch.isfinite(norm)


def test_fp16_lm_steps_with_their_own_optimizer_take_the_fp32_step(tokenizer, prompts, fresh_accelerate_state):
    """The trainer's LM step (tnd.lm_learning_rate: its own AdamW) under an fp16 loss scaler moves the student as
    in fp32 (before: the student's gradients were unscaled by both optimizers, 2**10 too small here)."""

    def lm_update(fp16: bool) -> torch.Tensor:
        accelerator = _fp16_accelerator() if fp16 else Accelerator(cpu=True)
        accelerator.autocast = contextlib.nullcontext  # fp32 compute: only the scaler's arithmetic is under test
        torch.manual_seed(0)
        trainer = make_trainer(tokenizer, prompts, mode="lm_only", with_demos=False, lm_data="corpus",
                               lm_steps_per_ppo_step=1, lm_learning_rate=1e-3, optimizer_name="SGD",
                               accelerator=accelerator, lm_dataset=encode_for_lm(tokenizer, SENTENCES, 16))
        trainer.policy.forward = getattr(trainer.policy, "_original_forward", trainer.policy.forward)
        before = torch.cat([p.detach().flatten().clone() for p in trainer.student.parameters()])
        trainer._lm_update(*trainer._lm_batch())
        after = torch.cat([p.detach().flatten() for p in trainer.student.parameters()])
        accelerator.state._mixed_precision = "no"
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        return after - before

    reference, scaled = lm_update(False), lm_update(True)
    assert reference.abs().max() > 1e-5
    torch.testing.assert_close(scaled, reference, rtol=1e-4, atol=1e-7)


# --- finding 7: the replicated warm-up (FSDP / DeepSpeed) under fp16 --------------------------------------


def test_replicated_fit_under_fp16_scales_the_loss():
    """Under FSDP / DeepSpeed `fit` trains a replica outside prepare: with fp16 it scales the loss itself, so a
    small gradient does not underflow (a stub accelerator reports FSDP; CPU fp16 autocast stands in for CUDA's)."""
    seen = []

    def first_layer_grad(autocast) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 1))
        x = torch.randn(256, 64)
        accelerator = types.SimpleNamespace(
            distributed_type=DistributedType.FSDP, num_processes=1, device=torch.device("cpu"), is_main_process=True,
            mixed_precision="fp16" if autocast else "no",
            autocast=(lambda: torch.autocast("cpu", dtype=torch.float16)) if autocast else contextlib.nullcontext,
            unwrap_model=lambda m, keep_fp32_wrapper=True: m, free_memory=lambda: None)
        cfg = types.SimpleNamespace(steps=1, batch_size=32, learning_rate=1e-3, weight_decay=0.0, warmup_steps=0,
                                    max_grad_norm=1e9, eval_every=0, patience=0, keep_best=False)

        def loss_fn(m, rows, device):  # a loss with small gradients, as late in training
            return 1e-6 * m(x[rows]).float().pow(2).mean(), {}

        clip = torch.nn.utils.clip_grad_norm_
        torch.nn.utils.clip_grad_norm_ = lambda params, *a, **k: (seen.append(model[0].weight.grad.clone()),
                                                                  clip(params, *a, **k))[1]
        try:
            fit(model, loss_fn, 256, cfg, 0, Validation(model, dict, cfg, enabled=False), accelerator, "student", "t")
        finally:
            torch.nn.utils.clip_grad_norm_ = clip
        return seen[-1]

    fp32, fp16 = first_layer_grad(False), first_layer_grad(True)
    assert (fp32 != 0).float().mean() == 1.0
    assert (fp16 != 0).float().mean() > 0.99  # before: 0.0, every entry underflowed
    torch.testing.assert_close(fp16, fp32, rtol=0.05, atol=fp32.abs().max().item() * 0.02)


# --- finding 8: the initial-student reference under FSDP ---------------------------------------------------


def _refuse_copy(self, memo):
    raise TypeError("cannot pickle 'module' object")


def test_initial_student_reference_is_copied_before_prepare_wraps_the_student(tokenizer, prompts):
    """Under FSDP `prepare` wraps the student's layers in place, and a wrapped layer cannot be deep-copied: the
    reference must be copied before (r10: the copy after prepare crashed). Here prepare marks a layer the same way."""
    accelerator = Accelerator(cpu=True)
    prepare = accelerator.prepare

    def wrapping_prepare(policy, *optimizers):
        layer = policy.model.model.layers[0]
        layer.__class__ = type("Wrapped", (type(layer),), {"__deepcopy__": _refuse_copy})
        return prepare(policy, *optimizers)

    accelerator.prepare = wrapping_prepare
    trainer = make_trainer(tokenizer, prompts, kl_reference="initial_student", accelerator=accelerator)
    assert type(trainer.student.model.layers[0]).__name__ == "Wrapped"
    assert type(trainer.reference.model.layers[0]).__name__ != "Wrapped"
    for (name, theirs), ours in zip(trainer.student.state_dict().items(), trainer.reference.state_dict().values()):
        assert torch.equal(theirs, ours), name
    trainer.step(trainer.next_prompts())  # and the reference serves the KL


# --- finding 10: a padded vocabulary -------------------------------------------------------------------------


def test_log_probs_and_entropy_are_the_samplers_with_a_padded_vocabulary(tokenizer, prompts, monkeypatch):
    """Rows past the tokenizer (tokenizer.pad_vocab_to) are never sampled: the PPO log-probs and entropy are over
    the tokenizer's ids, the distribution that sampled (before: -3.3 nats per token off, r13)."""
    n = len(tokenizer)
    build = tp.build_causal_lm
    monkeypatch.setattr(tp, "build_causal_lm", lambda arch, tok, seed: build(arch, tok, seed, pad_vocab_to=27 * n))
    trainer = make_trainer(tokenizer, prompts, with_demos=False, mode="trials_only", padding_free=False)
    assert trainer.student.get_output_embeddings().out_features == 27 * n
    stats = {}
    rollout = trainer.rollout(trainer.next_prompts(), stats)
    at = response_predictors(rollout.response_mask, rollout.prompt_width)
    with torch.no_grad():
        logits = trainer.policy(rollout.input_ids, rollout.attention_mask, at, False)[0]
    sampler = torch.log_softmax(logits[:, :n].float(), -1)
    tokens = rollout.input_ids[:, rollout.prompt_width:][rollout.response_mask]
    torch.testing.assert_close(rollout.logprobs[rollout.response_mask], sampler.gather(1, tokens[:, None])[:, 0])
    entropy = -(sampler.exp() * sampler).sum(-1)
    torch.testing.assert_close(rollout.entropy[rollout.response_mask], entropy)


# --- finding 11: the value head in float32 under autocast ----------------------------------------------------


def test_value_head_computes_in_float32_under_autocast():
    head = ValueHead(16, seed=0)
    hidden = torch.randn(5, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = head(hidden)
    assert values.dtype == torch.float32
    torch.testing.assert_close(values, head(hidden.float()), rtol=0, atol=0)


# --- the stored demonstration rewards are PPO's under mixed precision -----------------------------------------


def test_ppo_scores_under_the_runs_autocast_as_score_rewards_does(tokenizer, prompts, fresh_accelerate_state):
    trainer = make_trainer(tokenizer, prompts, mixed_precision="bf16")
    sequences = [p + [20 + i, 30 + i] for i, p in enumerate(prompts)]
    with trainer.accelerator.autocast():  # what stages/score_rewards.py computes
        stored = score_token_ids(trainer.reward_model, tokenizer, sequences, batch_size=None).float()
    with torch.no_grad():
        full_precision = score_token_ids(trainer.reward_model, tokenizer, sequences, batch_size=None)
    assert not torch.equal(stored, full_precision)  # bf16 rounding shows, so the test can tell them apart
    assert torch.equal(trainer.compute_scores(sequences), stored)


# --- finding 6: practice counts only trials that were trained on ----------------------------------------------


@pytest.mark.parametrize("mode, trained", [("trials_and_demos", True), ("demos_only", False), ("lm_only", False)])
def test_only_trials_that_entered_an_update_count_as_practice(tokenizer, prompts, mode, trained):
    extra = dict(lm_data="corpus", lm_steps_per_ppo_step=1) if mode == "lm_only" else {}
    trainer = make_trainer(tokenizer, prompts, mode=mode, lm_dataset=encode_for_lm(tokenizer, SENTENCES, 16), **extra)
    trainer.step(trainer.next_prompts())
    assert trainer.last_trials  # trials are sampled in every mode ...
    assert trainer.trained_trials == (trainer.last_trials if trained else [])  # ... and practised in two
