"""kernels.fused_head in the trainer: the same rollout, losses, gradients and updates as the unfused path."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from stages.common import free_port
from tests.conftest import tiny_arch, tiny_prompts, tiny_tokenizer
from tests.test_distributed import _join
from tests.test_ppo import FakeCache, make_trainer
from tnd.config import ArchParams, CustomPPOConfig
from tnd.errors import TndError
from tnd.models import build_causal_lm
from tnd.trainers import ppo, ppo_inputs
from tnd.trainers.fused_head import HeadStates, HiddenAt
from tnd.reward import build_reward_model

FIXED = dict(mode="trials_and_demos", optimizer_name="SGD", learning_rate=0.5, ppo_epochs=1, ent_coef=0.01,
             distill_online=True, lm_on_rollout=True, temperature=1.3)


def fixed_rollout(trainer, tokenizer):
    prompts = tiny_prompts(tokenizer)
    responses = [[20 + i + 10 * t for t in range(1 + i % 4)] for i in range(len(prompts))]
    return trainer.make_rollout(prompts, responses, torch.linspace(-1.0, 1.0, len(prompts)),
                                torch.zeros(len(prompts), dtype=torch.bool))


def grads_after_one_minibatch(trainer, tokenizer):
    """(rollout, loss, stats, {name: grad}) of one mini-batch of PPO rows and demonstrations."""
    rollout = fixed_rollout(trainer, tokenizer)
    demo = trainer._demo_batch(list(range(4)))
    loss, stats = trainer.minibatch_loss(rollout, torch.arange(len(rollout)), demo, torch.arange(4))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.policy.named_parameters() if p.grad is not None}
    return rollout, loss, stats, grads


@pytest.mark.parametrize("padding_free", [True, False], ids=["packed", "padded"])
def test_one_minibatch_gives_the_same_loss_and_gradients(tokenizer, prompts, padding_free):
    """PPO (policy, entropy bonus, value), online distillation and top-k distillation on one mini-batch: every
    parameter's gradient, the tied embedding / output head included, as unfused."""
    out = {}
    for fused in (False, True):
        trainer = make_trainer(tokenizer, prompts, kernel_fused_head=fused, padding_free=padding_free, **FIXED)
        assert isinstance(trainer.policy, HiddenAt) is fused
        out[fused] = grads_after_one_minibatch(trainer, tokenizer)
    (r_u, loss_u, stats_u, g_u), (r_f, loss_f, stats_f, g_f) = out[False], out[True]
    # the rollout's old policy (no-grad scoring through the fused head)
    for name in ("logprobs", "entropy", "values", "ref_logprobs"):
        torch.testing.assert_close(getattr(r_f, name), getattr(r_u, name), rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(loss_f, loss_u, rtol=1e-5, atol=1e-6)
    for key in ("loss/policy", "loss/value", "loss/distill", "loss/online_distill", "policy/entropy", "policy/clipfrac"):
        torch.testing.assert_close(stats_f[key], stats_u[key], rtol=1e-5, atol=1e-6, msg=key)
    assert g_f.keys() == g_u.keys() and any("embed_tokens" in name for name in g_f)
    for name in g_u:
        scale = g_u[name].abs().max().clamp_min(1e-8)
        torch.testing.assert_close(g_f[name] / scale, g_u[name] / scale, rtol=0, atol=1e-5, msg=name)


def test_one_step_gives_the_same_update(tokenizer, prompts):
    """A whole step (sampling, rollout, PPO + distillation update, the LM update on the rollout): the same stats
    and the same weights after it."""
    after, stats = {}, {}
    for fused in (False, True):
        trainer = make_trainer(tokenizer, prompts, kernel_fused_head=fused, **FIXED)
        stats[fused] = trainer.step(trainer.next_prompts())
        after[fused] = torch.cat([p.detach().flatten() for p in trainer.trainable_parameters()])
    for key in ("loss/total", "loss/policy", "loss/distill", "loss/online_distill", "loss/lm_rollout", "objective/kl"):
        assert stats[True][key] == pytest.approx(stats[False][key], rel=1e-4, abs=1e-6), key
    torch.testing.assert_close(after[True], after[False], rtol=0, atol=1e-5)


def test_bf16_mixed_precision_matches_to_bf16_rounding(tokenizer, prompts, fresh_accelerate_state):
    out = {}
    for fused in (False, True):
        trainer = make_trainer(tokenizer, prompts, kernel_fused_head=fused, mixed_precision="bf16", **FIXED)
        out[fused] = grads_after_one_minibatch(trainer, tokenizer)
    (_, loss_u, _, g_u), (_, loss_f, _, g_f) = out[False], out[True]
    torch.testing.assert_close(loss_f, loss_u, rtol=2e-2, atol=2e-2)
    for name in g_u:
        assert g_f[name].dtype == torch.float32
        cosine = torch.nn.functional.cosine_similarity(g_f[name].flatten(), g_u[name].flatten(), dim=0)
        assert cosine > 0.99, name


def test_a_padded_vocabulary_is_masked_in_the_head(tokenizer, prompts):
    """Output rows past the tokenizer (the cache's top-k may name them): both paths give them logit -1e4, the
    same losses and gradients, and zero gradient in those rows of the head."""
    out = {}
    for fused in (False, True):
        teacher = build_causal_lm(ArchParams(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
                                  tokenizer, 1, pad_vocab_to=len(tokenizer) + 37)
        student = build_causal_lm(tiny_arch(), tokenizer, 2, pad_vocab_to=len(tokenizer) + 37)
        config = CustomPPOConfig(batch_size=8, mini_batch_size=8, max_new_tokens=6, demo_batch_size=4,
                                 kernel_backend="torch", kernel_fused_head=fused, **FIXED)
        trainer = ppo.CustomPPOTrainer(teacher, student, build_reward_model(tiny_arch(), tokenizer, 3), config,
                                       prompts, demonstrations=FakeCache(teacher, tokenizer, prompts),
                                       tokenizer=tokenizer)
        out[fused] = grads_after_one_minibatch(trainer, tokenizer)
    (_, loss_u, _, g_u), (_, loss_f, _, g_f) = out[False], out[True]
    torch.testing.assert_close(loss_f, loss_u, rtol=1e-5, atol=1e-6)
    name = next(n for n in g_u if "embed_tokens" in n)
    torch.testing.assert_close(g_f[name], g_u[name], rtol=1e-4, atol=1e-7)
    assert g_f[name][len(tokenizer):].abs().max() == 0


def test_the_forward_gives_hidden_states_not_logits(tokenizer, prompts):
    trainer = make_trainer(tokenizer, prompts, kernel_fused_head=True)
    ids = torch.tensor([prompts[0] + [5, 6]])
    at = torch.ones_like(ids, dtype=torch.bool)
    states = trainer.get_student_logits(ids, torch.ones_like(ids), at)
    assert isinstance(states, HeadStates) and states.states.shape == (ids.shape[1], tiny_arch().hidden_size)
    head = trainer.student.get_output_embeddings()
    # the head's weight leaves the forward as a view of the parameter: DDP sees the parameter used
    assert states.weight.grad_fn is not None and states.weight._base is head.weight


def test_a_head_that_does_more_is_refused(tokenizer, prompts):
    """A config saying the logits are soft-capped that the model does not apply (or the reverse) would make the
    fused losses another distribution's: refused, one line."""
    student = build_causal_lm(tiny_arch(), tokenizer, 2)
    student.config.final_logit_softcapping = 2.0  # Llama ignores it: its logits are not capped
    with pytest.raises(TndError, match="its head does more.*set kernels.fused_head: false"):
        HiddenAt(student, None, len(tokenizer))


def test_sharded_parameters_are_refused(tokenizer, prompts, monkeypatch):
    monkeypatch.setattr(ppo_inputs, "shards_parameters", lambda accelerator: True)
    with pytest.raises(ppo.PPOConfigError, match="which FSDP and DeepSpeed shard: set kernels.fused_head: false"):
        make_trainer(tokenizer, prompts, kernel_fused_head=True)


def _ddp_update() -> torch.Tensor:
    """One SGD update of the fused-head trainer on a fixed batch shared over the processes (DDP on two)."""
    from tnd.engine import shard

    tokenizer = tiny_tokenizer()
    prompts = tiny_prompts(tokenizer)
    trainer = make_trainer(tokenizer, prompts, kernel_fused_head=True, batch_size=8, mini_batch_size=8,
                           whiten_advantages=False, demo_batch_size=8, **FIXED)
    rows = shard(trainer.accelerator, list(range(8)))
    responses = [[20 + i + 10 * t for t in range(1 + i % 4)] for i in range(8)]
    rollout = trainer.make_rollout([prompts[i] for i in rows], [responses[i] for i in rows],
                                   torch.linspace(-1.0, 1.0, 8)[rows], torch.zeros(len(rows), dtype=torch.bool))
    before = torch.cat([p.detach().flatten().clone() for p in trainer.trainable_parameters()])
    trainer._optimize(rollout, trainer._demo_batch(list(range(8))))
    return torch.cat([p.detach().flatten() for p in trainer.trainable_parameters()]) - before


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    _join(rank, port)
    torch.save(_ddp_update(), os.path.join(out_dir, f"update{rank}.pt"))


@pytest.mark.slow
def test_ddp_two_processes_make_the_one_process_update(tmp_path):
    """DDP reduces the head's gradient, which the loss (not the forward) produces: two processes, each with half
    the batch, make one process's update."""
    one = _ddp_update()
    mp.spawn(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        two = torch.load(tmp_path / f"update{rank}.pt", weights_only=False)
        assert one.abs().max() > 1e-3
        torch.testing.assert_close(two, one, rtol=0, atol=1e-5)
