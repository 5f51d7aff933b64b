"""The study's two new knobs (issue 28): `tnd.trial_reward` (the reward model, the teacher's per-token
log-ratio as on-policy distillation, or both) and the `lm_on_rollout` mode (the paper's control: the same
texts as trials_and_demos, an LM update in place of PPO); and `student/updates`, nAoA's x-axis."""

from __future__ import annotations

import math

import pytest
import torch

from transformers import LlamaForCausalLM

from tests.test_ppo import TINY, make_trainer
from tnd.config import Params
from tnd.models import build_causal_lm, llama_config
from tnd.trainers.ppo import CustomPPOConfig, CustomPPOTrainer, PPOConfigError
from tnd.trainers.ppo_math import per_token_rewards
from tnd.reward import build_reward_model


def test_the_teacher_reward_is_the_per_token_log_ratio_on_top_of_the_kl_penalty():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.2, 0.0]])
    ref = torch.tensor([[-1.2, -1.0, -0.5], [-1.0, -0.4, 0.0]])
    teacher = torch.tensor([[-0.5, -3.0, -1.0], [-2.0, -0.1, 9.0]])
    scores = torch.tensor([2.0, -1.0])
    rewards, kl = per_token_rewards(scores, logp, ref, mask, kl_coef=0.1, teacher_logprobs=teacher, teacher_coef=0.5)
    expected = -0.1 * (logp - ref) + 0.5 * (teacher - logp)
    expected[0, 2] += 2.0
    expected[1, 1] += -1.0
    expected[1, 2] = 0.0  # outside the mask, whatever the teacher says there
    assert torch.allclose(rewards, expected)
    plain, _ = per_token_rewards(scores, logp, ref, mask, kl_coef=0.1)
    assert torch.allclose(rewards - plain, torch.where(mask, 0.5 * (teacher - logp), torch.zeros(())))


def _spy_rollout(trainer):
    seen = []
    original = trainer.make_rollout

    def spy(*args):
        rollout = original(*args)
        seen.append(rollout)
        return rollout

    trainer.make_rollout = spy
    return seen


@pytest.mark.parametrize("kl_reference", ["teacher", "initial_student"])
def test_trial_reward_teacher_scores_each_token_by_the_teacher_and_ignores_the_reward_model(
        tokenizer, prompts, kl_reference):
    coef = 0.7
    trainer = make_trainer(tokenizer, prompts, mode="trials_only", trial_reward="teacher", teacher_reward_coef=coef,
                           kl_reference=kl_reference, with_demos=False, whiten_advantages=False)
    seen = _spy_rollout(trainer)
    stats = trainer.step(trainer.next_prompts())
    rollout = seen[0]
    mask = rollout.response_mask
    assert torch.equal(rollout.scores, torch.zeros_like(rollout.scores))  # the reward model only monitors
    assert math.isfinite(stats["env/reward_mean"]) and stats["env/score_mean"] == 0.0
    # the teacher's log-probs of the sampled tokens, computed afresh
    ids, width = rollout.input_ids, rollout.prompt_width
    logits = trainer.teacher(input_ids=ids, attention_mask=rollout.attention_mask).logits[:, width - 1: -1]
    teacher_logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, width:, None])[..., 0]
    assert torch.allclose(rollout.teacher_logprobs[mask], teacher_logp[mask], atol=1e-5)
    kl_coef = trainer.config.init_kl_coef
    expected = -kl_coef * (rollout.logprobs - rollout.ref_logprobs) + coef * (teacher_logp - rollout.logprobs)
    assert torch.allclose(rollout.rewards[mask], expected[mask], atol=1e-5)
    assert stats["env/teacher_logratio"] == pytest.approx(
        (teacher_logp - rollout.logprobs)[mask].mean().item(), abs=1e-5)


def test_trial_reward_both_adds_the_processed_score_on_the_last_token(tokenizer, prompts):
    trainer = make_trainer(tokenizer, prompts, mode="trials_and_demos", trial_reward="both", teacher_reward_coef=0.3,
                           whiten_advantages=False)
    seen = _spy_rollout(trainer)
    trainer.step(trainer.next_prompts())
    rollout = seen[0]
    mask = rollout.response_mask
    assert rollout.scores.abs().sum() > 0
    dense = -trainer.config.init_kl_coef * (rollout.logprobs - rollout.ref_logprobs) + 0.3 * (
        rollout.teacher_logprobs - rollout.logprobs)
    last = mask.sum(1) - 1
    dense[torch.arange(len(last)), last] += rollout.scores
    assert torch.allclose(rollout.rewards[mask], dense[mask], atol=1e-5)


def _teacher_preferring(tokenizer, preferred, logit: float = 5.0):
    """A Llama whose next-token logits are the same in every context: `logit` on the `preferred` ids, 0 elsewhere
    (every embedding the same vector, every block's output projections zero, an untied head)."""
    config = llama_config(TINY, tokenizer)
    config.tie_word_embeddings = False
    teacher = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, weight in teacher.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                weight.zero_()
        teacher.get_input_embeddings().weight.fill_(1.0)
        head = teacher.get_output_embeddings().weight
        head.zero_()
        head[list(preferred)] = logit / head.shape[1]
    return teacher


@pytest.mark.slow  # trains until the student moves towards the teacher: about a minute
def test_on_policy_distillation_brings_the_student_towards_the_teacher(tokenizer, prompts):
    """trials_only with the teacher's reward alone (no reward model, no KL penalty): the trials' log-ratio to a
    teacher that prefers a few tokens everywhere rises, as test_ppo_increases_the_reward's reward does."""
    preferred = range(3, 40)
    teacher = _teacher_preferring(tokenizer, preferred)
    config = CustomPPOConfig(batch_size=16, mini_batch_size=8, ppo_epochs=2, learning_rate=1e-2, max_new_tokens=6,
                             seed=3, kernel_backend="torch", mode="trials_only", trial_reward="teacher",
                             init_kl_coef=0.0, adap_kl_ctrl=False)
    trainer = CustomPPOTrainer(teacher, build_causal_lm(TINY, tokenizer, 2), build_reward_model(TINY, tokenizer, 3),
                               config, prompts, tokenizer=tokenizer)
    history = trainer.train(steps=60)
    ratios = [s["env/teacher_logratio"] for s in history]
    first, last = sum(ratios[:5]) / 5, sum(ratios[-5:]) / 5
    assert last > first + 0.5, ratios


def test_lm_on_rollout_learns_by_lm_from_the_texts_trials_and_demos_would_use(tokenizer, prompts):
    runs = {}
    for mode in ("trials_and_demos", "lm_on_rollout"):
        trainer = make_trainer(tokenizer, prompts, mode=mode, seed=3)
        seen = _spy_rollout(trainer)
        lm_inputs = []
        original = trainer._lm_update
        trainer._lm_update = lambda ids, mask, at=None: lm_inputs.append(ids.clone()) or original(ids, mask, at)
        before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
        stats = trainer.step(trainer.next_prompts())
        runs[mode] = (seen[0], lm_inputs, stats, trainer)
        changed = any(not torch.equal(before[k], v) for k, v in trainer.student.state_dict().items())
        assert changed
    tnd_rollout, tnd_lm, tnd_stats, _ = runs["trials_and_demos"]
    rollout, lm_inputs, stats, trainer = runs["lm_on_rollout"]
    assert torch.equal(rollout.input_ids, tnd_rollout.input_ids)  # the same trials, sampled by the same student
    assert tnd_lm == [] and len(lm_inputs) == 1 and torch.equal(lm_inputs[0], rollout.input_ids)
    assert math.isnan(stats["loss/policy"]) and math.isfinite(stats["loss/lm_rollout"])
    assert math.isfinite(stats["loss/distill"])  # the demonstrations as in trials_and_demos
    assert trainer.trained_trials == trainer.last_trials and trainer.trained_trials


def test_lm_on_rollout_with_demos_as_ppo_takes_the_lm_step_on_trials_and_demonstrations(tokenizer, prompts):
    trainer = make_trainer(tokenizer, prompts, mode="lm_on_rollout", demos_as="ppo")
    seen = _spy_rollout(trainer)
    stats = trainer.step(trainer.next_prompts())
    assert seen[0].is_demo.any() and (~seen[0].is_demo).any()
    assert math.isnan(stats["loss/distill"]) and math.isnan(stats["loss/policy"])
    assert math.isfinite(stats["loss/lm_rollout"])


@pytest.mark.parametrize("overrides, per_step", [
    (dict(mode="trials_and_demos"), 4),  # 2 epochs x 2 mini-batches
    (dict(mode="trials_and_demos", gradient_accumulation_steps=2, lm_steps_per_ppo_step=1), 3),
    (dict(mode="lm_on_rollout"), 5),  # the demonstrations' 4 mini-batches and the LM step
    (dict(mode="lm_only", lm_data="corpus", lm_steps_per_ppo_step=2, lm_dataset=[[1, 50, 60, 2], [1, 70, 2]]), 2),
])
def test_student_updates_count_every_optimizer_step(tokenizer, prompts, overrides, per_step):
    trainer = make_trainer(tokenizer, prompts, **overrides)
    history = trainer.train(steps=2)
    assert [s["student/updates"] for s in history] == [per_step, 2 * per_step]
    assert trainer.state_dict()["student_updates"] == 2 * per_step


@pytest.mark.parametrize("mode", ["demos_only", "lm_only", "lm_on_rollout"])
def test_a_teacher_reward_without_ppo_on_the_trials_is_refused(mode):
    with pytest.raises(PPOConfigError, match="trial_reward: teacher"):
        CustomPPOConfig(mode=mode, trial_reward="teacher", lm_data="corpus", lm_steps_per_ppo_step=1)
    with pytest.raises(ValueError, match="trial_reward"):
        Params.model_validate({"tnd": {"mode": mode, "trial_reward": "both", "lm_data": "corpus",
                                       "lm_steps_per_ppo_step": 1}})
