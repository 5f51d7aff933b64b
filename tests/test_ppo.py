"""CustomPPOTrainer / CustomPPOConfig: the PPO math on hand examples, config validation, one step in
every mode, padding invariance, non-finite rewards, determinism and resume, and a learning check."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

from tests.conftest import ROOT, tiny_arch
from tnd.batching import lm_positions
from tnd.config import ArchParams, DistillParams, Params, trainer_values
from tnd.errors import TndError
from tnd.generation import sample_continuations
from tnd.models import build_causal_lm
from tnd.trainers.ppo import STAT_KEYS, CustomPPOConfig, CustomPPOTrainer, PPOConfigError
from tnd.trainers.ppo_math import (
    AdaptiveKLController, FixedKLController, RunningMoments, ScoreProcessor, clipped_policy_loss, clipped_value_loss,
    compute_gae, masked_whiten, per_token_rewards,
)
from tnd.reward import build_reward_model

TINY = tiny_arch()


# --- fixtures and stand-ins ------------------------------------------------------------------


class FakeCache:
    """TeacherCache stand-in: teacher samples with their top-k log-probs, right-padded by batch()."""

    def __init__(self, teacher, tokenizer, prompts, k: int = 8, max_new_tokens: int = 6, temperature: float = 1.0):
        teacher.eval()
        conts = sample_continuations(teacher, tokenizer, prompts, max_new_tokens, seed=0)
        self.rows, self.temperature = [], temperature
        with torch.no_grad():
            for prompt, cont in zip(prompts, conts):
                ids = torch.tensor([prompt + cont])
                logp = torch.log_softmax(teacher(input_ids=ids).logits[0].float() / temperature, -1)
                top, idx = logp.topk(k, dim=-1)
                tail = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6))
                target = torch.zeros(ids.shape[1], dtype=torch.bool)
                target[len(prompt) - 1 : len(prompt) + len(cont) - 1] = True
                self.rows.append((ids[0], target, top, idx, tail))

    def __len__(self):
        return len(self.rows)

    def batch(self, indices, pad_id):
        rows = [self.rows[i] for i in indices]
        width, k = max(r[0].shape[0] for r in rows), rows[0][2].shape[1]
        out = {
            "input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
            "target_mask": torch.zeros((len(rows), width), dtype=torch.bool),
            "topk_logprobs": torch.zeros((len(rows), width, k)),
            "topk_indices": torch.zeros((len(rows), width, k), dtype=torch.long),
            "tail_logmass": torch.zeros((len(rows), width)),
        }
        for b, (ids, target, top, idx, tail) in enumerate(rows):
            n = ids.shape[0]
            out["input_ids"][b, :n] = ids
            out["attention_mask"][b, :n] = 1
            out["target_mask"][b, :n] = target
            out["topk_logprobs"][b, :n] = top
            out["topk_indices"][b, :n] = idx
            out["tail_logmass"][b, :n] = tail
        return out


class TokenReward(nn.Module):
    """A "reward model" scoring the fraction of non-pad tokens in `preferred`; NaN for rows nan_fn picks."""

    def __init__(self, preferred, pad_id, nan_fn=None):
        super().__init__()
        self.register_buffer("preferred", torch.tensor(sorted(preferred)))
        self.pad_id, self.nan_fn, self.calls = pad_id, nan_fn, 0
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask):
        hits = torch.isin(input_ids, self.preferred) & attention_mask.bool()
        score = hits.sum(1).float() / attention_mask.sum(1).float()
        if self.nan_fn is not None:
            score = torch.where(self.nan_fn(self.calls, len(score)), torch.full_like(score, float("nan")), score)
        self.calls += 1
        return SimpleNamespace(logits=score[:, None])


def make_trainer(tokenizer, prompts, reward=None, seed=0, with_demos=True, accelerator=None, lm_dataset=None,
                 **overrides):
    teacher = build_causal_lm(ArchParams(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tokenizer, 1)
    student = build_causal_lm(TINY, tokenizer, 2)
    if reward is None:
        reward = build_reward_model(TINY, tokenizer, 3)
    settings = dict(
        steps=10, batch_size=8, mini_batch_size=4, gradient_accumulation_steps=1, ppo_epochs=2,
        learning_rate=1e-3, max_new_tokens=6, demo_batch_size=4, seed=seed, kernel_backend="torch",
    )
    settings.update(overrides)
    config = CustomPPOConfig(**settings)
    demos = FakeCache(teacher, tokenizer, prompts) if with_demos else None
    return CustomPPOTrainer(
        teacher, student, reward, config, prompts, demonstrations=demos, tokenizer=tokenizer, accelerator=accelerator,
        lm_dataset=lm_dataset,
    )


def finite(stats, keys):
    return {k: stats[k] for k in keys if not math.isfinite(stats[k])}


COMMON = ("objective/kl", "objective/kl_coef", "objective/entropy", "env/reward_mean", "env/reward_std",
          "nonfinite_rewards", "lr", "time/step", "val/explained_variance", "returns/mean", "advantages/mean")
PPO_KEYS = ("policy/approx_kl", "policy/clipfrac", "policy/ratio_mean", "loss/policy", "loss/value", "loss/total",
            "val/clipfrac")


# --- the PPO math on hand examples ---------------------------------------------------------------


def test_gae_hand_example():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 1.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    adv, ret = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: d2 = 1 - .7 = .3; d1 = .9*.7 - .6 = .03; d0 = .9*.6 - .5 = .04; gamma*lam = .72
    expected0 = [0.04 + 0.72 * (0.03 + 0.72 * 0.3), 0.03 + 0.72 * 0.3, 0.3]
    # row 1: the masked last position counts as the end of the episode (V = 0, r = 0)
    expected1 = [-0.1 + 0.72 * 1.0, 1.0, 0.0]
    torch.testing.assert_close(adv, torch.tensor([expected0, expected1]))
    torch.testing.assert_close(ret, torch.tensor([[e + v for e, v in zip(expected0, [0.5, 0.6, 0.7])],
                                                  [expected1[0] + 1.0, 2.0, 0.0]]))


def test_whitening_uses_only_valid_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    # mean 2, unbiased variance 1 over the three valid tokens
    torch.testing.assert_close(masked_whiten(x, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False), torch.tensor([[1.0, 2.0, 3.0, 0.0]]),
                               atol=1e-6, rtol=0)


def test_per_token_rewards_put_score_on_last_token():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 7.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    rewards, kl = per_token_rewards(torch.tensor([10.0, 20.0]), logp, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -1.0], [1.0, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 10.1], [-0.1, 20.0, 0.0]]))


def test_clipped_policy_loss_hand_example():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 7.0]]))
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, -1.0, 2.0, 3.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    loss, info = clipped_policy_loss(logp[mask], old[mask], adv[mask], cliprange=0.2)
    # ratio 1.5, A=1 -> max(-1.5, -1.2) = -1.2 (clipped); ratio .5, A=-1 -> max(.5, .8) = .8 (clipped);
    # ratio 1.1, A=2 -> -2.2 (inside the range); the 4th token is padding, left out by the caller
    torch.testing.assert_close(loss, torch.tensor((-1.2 + 0.8 - 2.2) / 3))
    torch.testing.assert_close(info["clipfrac"], torch.tensor(2 / 3))
    torch.testing.assert_close(info["ratio_mean"], torch.tensor((1.5 + 0.5 + 1.1) / 3))
    k3 = [(r - 1) - math.log(r) for r in (1.5, 0.5, 1.1)]
    torch.testing.assert_close(info["approx_kl"], torch.tensor(sum(k3) / 3))


def test_clipped_value_loss_hand_example():
    values = torch.tensor([[1.0, 0.5, 3.0]])
    old = torch.tensor([[0.5, 0.0, 0.0]])
    returns = torch.tensor([[0.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    loss, info = clipped_value_loss(values[mask], old[mask], returns[mask], cliprange_value=0.2)
    # token 0: (1-0)^2 = 1 vs (0.7-0)^2 = .49 -> 1; token 1: (.5-1)^2 = .25 vs (.2-1)^2 = .64 -> .64
    torch.testing.assert_close(loss, torch.tensor(0.5 * (1.0 + 0.64) / 2))
    torch.testing.assert_close(info["clipfrac"], torch.tensor(0.5))


def test_adaptive_kl_controller_formula():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(9.0, n_steps=32)  # error 0.5 clipped to 0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 32 / 10000))
    ctl.update(5.4, n_steps=32)  # error -0.1
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 32 / 10000) * (1 - 0.1 * 32 / 10000))
    ctl.update(0.0, n_steps=10000)  # error -1 clipped to -0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 32 / 10000) * (1 - 0.1 * 32 / 10000) * 0.8)
    fixed = FixedKLController(0.3)
    fixed.update(100.0, 32)
    assert fixed.value == 0.3


def test_score_processing():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # clipping only
    assert ScoreProcessor(False, False, 2.5, RunningMoments())(scores).tolist() == [1.0, 2.0, 2.5, 2.5]
    # normalisation with a prior (mean 2.5, std 1) that weighs as many scores as the batch
    proc = ScoreProcessor(False, True, None, RunningMoments(2.5, 1.0, count=4))
    out = proc(scores)
    batch_var = scores.var(unbiased=False).item()  # 1.25; same mean -> pooled var = (4*1 + 4*1.25) / 8
    std = math.sqrt((4 * 1.0 + 4 * batch_var) / 8 * 8 / 7)  # Bessel-corrected over the 8, as TRL
    torch.testing.assert_close(out, (scores - 2.5) / std)
    # scaling divides by the running std without centring
    proc = ScoreProcessor(True, False, None, RunningMoments(2.5, 1.0, count=4))
    torch.testing.assert_close(proc(scores), scores / std)


def trl_running_moments(batches, mean=0.0, std=1.0, count=1e-24):
    """TRL's RunningMoments.update (trl/trainer/utils.py, v0.11), transcribed: (mean, std) after `batches`."""
    var = std**2
    for xs in batches:
        xs = torch.tensor(xs, dtype=torch.float64)
        xs_count = xs.numel()
        xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
        delta = xs_mean - mean
        tot_count = count + xs_count
        new_sum = xs_var * xs_count
        old_sum = var * count + delta**2 * count * xs_count / tot_count
        tot_sum = old_sum + new_sum
        mean += (delta * xs_count / tot_count).item()
        new_var = tot_sum / tot_count
        std = (new_var * tot_count / (tot_count - 1)).sqrt().item()
        var = new_var.item()
        count = tot_count
    return mean, std


@pytest.mark.parametrize("prior", [{}, {"mean": 2.0, "std": 3.0, "count": 10}])
def test_running_moments_match_trl(prior):
    batches = [[1.0, 2.0, 3.0], [4.0, -1.0], [0.5, 0.25, 7.0, 2.0]]
    moments = RunningMoments(**prior)
    for xs in batches:
        moments.update(torch.tensor(xs))
    mean, std = trl_running_moments(batches, **prior)
    assert moments.mean == pytest.approx(mean, rel=1e-12) and moments.std == pytest.approx(std, rel=1e-12)
    if not prior:  # no prior: the plain sample statistics of every score seen
        seen = torch.tensor(sum(batches, []), dtype=torch.float64)
        assert moments.std == pytest.approx(seen.std(unbiased=True).item(), rel=1e-9)
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert (restored.mean, restored.std) == (moments.mean, moments.std)


# --- config --------------------------------------------------------------------------------


def test_config_from_params_maps_sections():
    params = Params()
    cfg = CustomPPOConfig.from_params(params, reward_mean=0.5, reward_std=2.0)
    assert cfg.learning_rate == params.ppo.learning_rate and cfg.batch_size == params.ppo.batch_size
    assert cfg.mode == params.tnd.mode and cfg.demo_batch_size == params.tnd.demo_batch_size
    assert cfg.distill_loss == params.distill.loss and cfg.distill_coef == params.distill.coef
    assert cfg.kernel_backend == params.kernels.backend and cfg.seed == params.seed
    assert (cfg.reward_mean, cfg.reward_std) == (0.5, 2.0)
    seeded = Params.model_validate({"student": {"seed": 7}})  # the student's seed alone, for a study over seeds
    assert CustomPPOConfig.from_params(seeded).seed == seeded.student_seed == 7 and seeded.seed == params.seed
    with pytest.raises(PPOConfigError, match="unknown key 'not_a_field'"):
        CustomPPOConfig.from_params(params, not_a_field=1)
    with pytest.raises(PPOConfigError, match="unknown key 'distil_coef'; did you mean 'distill_coef'"):
        CustomPPOConfig(distil_coef=1.0)
    # every field is a params key under its trainer name, with the section's type, default and bounds
    assert set(CustomPPOConfig.model_fields) - {"reward_mean", "reward_std", "reward_count"} == set(trainer_values(params))
    assert CustomPPOConfig.model_fields["distill_beta"].metadata == DistillParams.model_fields["beta"].metadata


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(batch_size=32, mini_batch_size=8, gradient_accumulation_steps=3), "must be divisible by mini_batch_size"),
        (dict(batch_size=4, mini_batch_size=8), "must not exceed batch_size"),
        (dict(mode="demos"), 'mode = "demos" is not a valid choice; allowed: one of'),
        (dict(demos_as="sft"), "demos_as"),
        (dict(distill_loss="kl"), "distill_loss"),
        (dict(scheduler_name="step"), "scheduler_name"),
        (dict(kl_reference="ref"), "kl_reference"),
        (dict(gamma=1.5), "gamma = 1.5 is invalid: input should be less than or equal to 1"),
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(ppo_epochs=0), "ppo_epochs = 0 is invalid: input should be greater than 0"),
        (dict(score_clip=-1.0), "score_clip"),
        (dict(reward_mean=1.0), "given together"),
        (dict(reward_mean=1.0, reward_std=0.0), "reward_std"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(PPOConfigError, match=message) as info:
        CustomPPOConfig(**overrides)
    assert isinstance(info.value, TndError) and isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


def test_unknown_optimizer_is_a_clear_error(tokenizer, prompts):
    with pytest.raises(TndError, match="did you mean 'AdamW'.*valid names include AdamW, Adam, SGD"):
        make_trainer(tokenizer, prompts, optimizer_name="Adamw", mode="trials_only", with_demos=False)
    with pytest.raises(TndError, match="optimizer_kwargs"):
        make_trainer(tokenizer, prompts, optimizer_kwargs={"nonsense": 1}, mode="trials_only", with_demos=False)
    trainer = make_trainer(tokenizer, prompts, optimizer_name="SGD", optimizer_kwargs={"momentum": 0.9},
                           mode="trials_only", with_demos=False)
    assert isinstance(trainer.optimizer.optimizer, torch.optim.SGD)  # inside accelerate's AcceleratedOptimizer


@pytest.mark.parametrize("name", ["constant", "linear", "cosine"])
def test_scheduler_shapes(tokenizer, prompts, name):
    trainer = make_trainer(tokenizer, prompts, scheduler_name=name, warmup_steps=2, steps=10,
                           learning_rate=1.0, mode="trials_only", with_demos=False)
    lrs = []
    for _ in range(11):
        lrs.append(trainer.scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.scheduler.step()
    assert lrs[:3] == pytest.approx([0.0, 0.5, 1.0])  # warm-up
    if name == "constant":
        assert lrs[2:] == pytest.approx([1.0] * 9)
    elif name == "linear":
        assert lrs[2:] == pytest.approx([1 - i / 8 for i in range(9)])
    else:
        assert lrs[2:] == pytest.approx([0.5 * (1 + math.cos(math.pi * i / 8)) for i in range(9)])


def test_missing_demonstrations_is_a_clear_error(tokenizer, prompts):
    with pytest.raises(TndError, match="needs demonstrations"):
        make_trainer(tokenizer, prompts, with_demos=False)


# --- one step per mode ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, expect",
    [
        (dict(mode="trials_and_demos"), COMMON + PPO_KEYS + ("loss/distill",)),
        (dict(mode="trials_only"), COMMON + PPO_KEYS),
        (dict(mode="demos_only"), COMMON + ("loss/distill", "loss/total")),
        (dict(mode="trials_and_demos", demos_as="ppo"), COMMON + PPO_KEYS),
        (dict(mode="trials_and_demos", distill_online=True, lm_steps_per_ppo_step=1,
              kl_reference="initial_student", gradient_accumulation_steps=2, early_stopping=True),
         COMMON + PPO_KEYS + ("loss/distill", "loss/online_distill", "loss/lm")),
        (dict(mode="lm_only", lm_data="corpus", lm_steps_per_ppo_step=1, lm_dataset=[[1, 50, 60, 2], [1, 70, 2]]),
         COMMON + ("loss/lm",)),
    ],
    ids=["trials_and_demos", "trials_only", "demos_only", "demos_as_ppo", "online_lm_accum", "lm_only"],
)
def test_step_runs_in_each_mode(tokenizer, prompts, overrides, expect):
    trainer = make_trainer(tokenizer, prompts, **overrides)
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    stats = trainer.step(trainer.next_prompts())
    assert set(stats) == set(STAT_KEYS)
    assert not finite(stats, expect), finite(stats, expect)
    assert stats["skipped"] == 0.0 and stats["nonfinite_rewards"] == 0.0
    changed = any(not torch.equal(before[k], v) for k, v in trainer.student.state_dict().items())
    assert changed
    if overrides["mode"] in ("demos_only", "lm_only"):
        assert math.isnan(stats["loss/policy"])  # no PPO update in demos_only, lm_only
    if overrides["mode"] == "lm_only":  # nor any demonstration (tests/test_naoa.py: only the LM steps move it)
        assert math.isnan(stats["loss/distill"]) and stats["ppo/epochs"] == 0
    if overrides["mode"] == "trials_only":
        assert math.isnan(stats["loss/distill"])


def test_trials_only_never_uses_demonstrations(tokenizer, prompts):
    """trials_only with demos_as = ppo: no demonstration joins the batch, and none is needed."""
    for with_demos in (False, True):
        trainer = make_trainer(tokenizer, prompts, mode="trials_only", demos_as="ppo", with_demos=with_demos,
                               lm_steps_per_ppo_step=1)
        seen = []
        original = trainer.make_rollout
        trainer.make_rollout = lambda p, r, scores, is_demo: seen.append(is_demo.clone()) or original(p, r, scores, is_demo)
        if with_demos:
            trainer.demonstrations.batch = None  # any read of the demonstrations fails
        stats = trainer.step(trainer.next_prompts())
        assert len(seen) == 1 and not seen[0].any() and len(seen[0]) == 8
        assert math.isnan(stats["loss/distill"]) and math.isnan(stats["loss/lm"])
    with pytest.raises(PPOConfigError, match="trials_only"):
        CustomPPOConfig(mode="trials_only", distill_online=True)


@pytest.mark.parametrize("cache_temperature, distill_temperature", [(1.0, 1.0), (2.0, 2.0), (0.5, 0.5), (1.0, 2.0),
                                                                    (2.0, 1.0)])
def test_a_student_equal_to_the_teacher_has_zero_demonstration_loss(tokenizer, prompts, cache_temperature,
                                                                     distill_temperature):
    """At every temperature the trainer accepts, student == teacher gives a zero top-k loss; a distill
    temperature other than the cache's is refused (the cached teacher cannot be re-tempered)."""
    teacher = build_causal_lm(TINY, tokenizer, 1)
    cache = FakeCache(teacher, tokenizer, prompts, temperature=cache_temperature)
    config = CustomPPOConfig(batch_size=8, mini_batch_size=4, demo_batch_size=4, mode="demos_only",
                             distill_temperature=distill_temperature, kernel_backend="torch")
    build = lambda: CustomPPOTrainer(teacher, copy.deepcopy(teacher), build_reward_model(TINY, tokenizer, 3),  # noqa: E731
                                     config, prompts, demonstrations=cache, tokenizer=tokenizer)
    if cache_temperature != distill_temperature:
        with pytest.raises(PPOConfigError, match="cache temperature"):
            build()
        return
    trainer = build()
    for loss in ("forward_kl", "reverse_kl", "jsd"):
        trainer.config = config.model_copy(update={"distill_loss": loss})
        value = trainer.demo_distill_loss(trainer._demo_batch(list(range(len(cache)))))
        assert abs(value.item()) < 1e-5, (loss, value.item())


def test_params_refuse_a_distill_temperature_other_than_the_cache_temperature():
    from tnd.config import ParamsError, parse_params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["distill"]["temperature"] = 2.0
    with pytest.raises(ParamsError, match=r"distill.temperature \(2.0\) must equal cache.temperature \(1.0\)"):
        parse_params(raw)
    raw["cache"]["temperature"] = 2.0
    assert parse_params(raw).distill.temperature == 2.0
    raw["tnd"]["mode"], raw["distill"]["online"] = "trials_only", True
    with pytest.raises(ParamsError, match="distill.online"):
        parse_params(raw)


def test_online_distillation_with_a_mini_batch_of_demonstrations_only(tokenizer, prompts):
    """demos_as = ppo puts the demonstrations last in the rollout: some mini-batches hold no trial."""
    trainer = make_trainer(tokenizer, prompts, batch_size=4, mini_batch_size=1, demo_batch_size=4, demos_as="ppo",
                           distill_online=True, ppo_epochs=1)
    stats = trainer.step(trainer.next_prompts())
    assert math.isfinite(stats["loss/online_distill"]) and math.isfinite(stats["loss/policy"])


# --- the engine: fp32 trainable weights, mixed precision, gradient checkpointing ----------------------


def test_a_bf16_student_trains_in_fp32(tokenizer, prompts):
    """A bf16 checkpoint's small updates are not lost to bf16 rounding: the trainable weights are fp32."""
    student = build_causal_lm(TINY, tokenizer, 2).to(torch.bfloat16)
    before = {k: v.float().clone() for k, v in student.state_dict().items() if ".layers." in k}
    teacher = build_causal_lm(TINY, tokenizer, 1)
    config = CustomPPOConfig(batch_size=8, mini_batch_size=4, ppo_epochs=1, learning_rate=1e-6, max_new_tokens=6,
                             mode="trials_only", kernel_backend="torch")
    trainer = CustomPPOTrainer(teacher, student, build_reward_model(TINY, tokenizer, 3), config, prompts,
                               tokenizer=tokenizer)
    assert all(p.dtype == torch.float32 for p in trainer.trainable_parameters())
    trainer.train(steps=2)
    after = trainer.student.state_dict()
    changed = sum(int((after[k] != v).sum()) for k, v in before.items())
    total = sum(v.numel() for v in before.values())
    assert changed >= 0.99 * total, f"{changed} of {total} weights changed"


def test_bf16_mixed_precision_runs_and_keeps_fp32_weights(tokenizer, prompts, fresh_accelerate_state):
    trainer = make_trainer(tokenizer, prompts, mixed_precision="bf16")
    stats = trainer.step(trainer.next_prompts())
    assert not finite(stats, COMMON + PPO_KEYS + ("loss/distill",))
    assert all(p.dtype == torch.float32 for p in trainer.trainable_parameters())


def test_gradient_checkpointing_changes_nothing_but_memory(tokenizer, prompts):
    plain = _strip(make_trainer(tokenizer, prompts, lm_steps_per_ppo_step=1).train(steps=2)[-1])
    checkpointed = make_trainer(tokenizer, prompts, lm_steps_per_ppo_step=1, gradient_checkpointing=True)
    # layers recompute in train mode only: the student runs in train mode there, with dropout off
    assert checkpointed.student.training and any(getattr(m, "gradient_checkpointing", False)
                                                 for m in checkpointed.student.modules())
    _same(plain, _strip(checkpointed.train(steps=2)[-1]))


# --- the paper's recipe (params/tnd_original.yaml) ----------------------------------------------------


def test_teacher_demonstrations_continue_the_trials_prompts_and_scores_fall_by_log2_step(tokenizer, prompts):
    trainer = make_trainer(tokenizer, prompts, demos_as="ppo", demos_from="teacher", demo_score=3.0,
                           score_offset="log2_step", with_demos=False,  # no cache needed
                           use_score_scaling=False, use_score_norm=False)  # trial scores: raw - log2(step)
    seen = []
    original = trainer.make_rollout
    trainer.make_rollout = lambda p, r, scores, is_demo: seen.append((p, r, scores, is_demo)) or original(
        p, r, scores, is_demo)
    trainer.train(steps=2)
    for step, (p, r, scores, is_demo) in enumerate(seen, start=1):
        n = len(p) // 2
        assert is_demo.tolist() == [False] * n + [True] * n
        assert p[n:] == p[:n]  # the teacher continues the trials' prompts
        assert scores[is_demo].tolist() == pytest.approx([3.0 - math.log2(step)] * n)
    raw = trainer.compute_scores([q + c for q, c in zip(seen[1][0][:4], seen[1][1][:4])])
    assert seen[1][2][:4].tolist() == pytest.approx((raw - 1.0).tolist())  # step 2: log2(2) = 1
    with pytest.raises(PPOConfigError, match="needs tnd.demos_as: ppo"):
        CustomPPOConfig(demos_from="teacher")


def test_lm_steps_on_the_corpus_with_their_own_optimizer(tokenizer, prompts, tmp_path):
    """lm_data = corpus: the LM steps read the corpus (in every mode), on their own AdamW with warm-up; the
    value head and the PPO optimizer are not touched by them."""
    corpus = [[tokenizer.bos_token_id, 50 + i, 60 + i, tokenizer.eos_token_id] for i in range(5)]
    with pytest.raises(TndError, match="lm_dataset"):
        make_trainer(tokenizer, prompts, mode="trials_only", with_demos=False, lm_steps_per_ppo_step=1,
                     lm_data="corpus")
    trainer = make_trainer(tokenizer, prompts, mode="trials_only", with_demos=False, lm_steps_per_ppo_step=2,
                           lm_data="corpus", lm_batch_size=3, lm_learning_rate=0.1, lm_warmup_steps=2,
                           lm_on_rollout=True, lm_dataset=corpus)
    assert isinstance(trainer.lm_optimizer.optimizer, torch.optim.AdamW)
    read = []
    original = trainer.lm_loss
    trainer.lm_loss = lambda ids, mask, at: read.append(ids[mask.bool()].tolist()) or original(ids, mask, at)
    stats = trainer.step(trainer.next_prompts())
    assert math.isfinite(stats["loss/lm"]) and math.isfinite(stats["loss/lm_rollout"])
    rollout_reads, corpus_reads = read[:-2], read[-2:]
    assert all(len(r) == 3 * 4 and set(r) <= set(sum(corpus, [])) for r in corpus_reads)
    assert not any(set(r) <= set(sum(corpus, [])) for r in rollout_reads)  # the first: the rollout's sequences
    assert [g["lr"] for g in trainer.lm_optimizer.param_groups] == [pytest.approx(0.05)]  # warm-up: step 1 of 2
    # the value head has no LM gradient, so its (PPO) optimizer state is all it has
    lm_state = trainer.lm_optimizer.state_dict()["state"]
    assert len(lm_state) == len([p for p in trainer.student.parameters() if p.requires_grad])
    # a checkpoint holds the LM optimizer too: a resumed run continues bit-exactly
    trainer.save_checkpoint(tmp_path)
    step2 = _strip(trainer.step(trainer.next_prompts()))
    resumed = make_trainer(tokenizer, prompts, mode="trials_only", with_demos=False, lm_steps_per_ppo_step=2,
                           lm_data="corpus", lm_batch_size=3, lm_learning_rate=0.1, lm_warmup_steps=2,
                           lm_on_rollout=True, lm_dataset=corpus)
    resumed.load_checkpoint(tmp_path)
    _same(step2, _strip(resumed.step(resumed.next_prompts())))


def test_kl_to_initial_student_starts_at_zero_and_controller_moves(tokenizer, prompts):
    trainer = make_trainer(tokenizer, prompts, mode="trials_only", with_demos=False, kl_reference="initial_student",
                           init_kl_coef=0.2, kl_target=1.0, kl_horizon=100)
    first = trainer.step(trainer.next_prompts())
    assert first["objective/kl"] == 0.0  # the student is its own reference before any update
    assert trainer.kl_ctl.value == pytest.approx(0.2 * (1 - 0.2 * 8 / 100))  # KL 0 < target: error clipped to -0.2
    second = trainer.step(trainer.next_prompts())
    assert second["objective/kl"] != 0.0 and second["objective/kl_coef"] == trainer.kl_ctl.value / (
        1 + max(min(second["objective/kl"] / 1.0 - 1, 0.2), -0.2) * 8 / 100)


@pytest.mark.parametrize("early_stopping, epochs", [(False, 3.0), (True, 1.0)])
def test_early_stopping_ends_the_epochs(tokenizer, prompts, early_stopping, epochs):
    trainer = make_trainer(tokenizer, prompts, mode="trials_only", with_demos=False, ppo_epochs=3,
                           early_stopping=early_stopping, target_kl=1e-12,
                           use_score_scaling=False, use_score_norm=False)  # the k1 KL here > 0 on raw scores
    # the first mini-batch is on-policy (KL 0); the epoch's last one, after an update, sees KL > 1.5 * target_kl
    assert trainer.step(trainer.next_prompts())["ppo/epochs"] == epochs


def test_early_stopping_checks_the_last_mini_batch_policykl_after_each_epoch(tokenizer, prompts):
    """TRL's rule: once per epoch, on k1 `policy/policykl` of the epoch's last mini-batch."""
    trainer = make_trainer(tokenizer, prompts, mode="trials_only", with_demos=False, ppo_epochs=3,
                           early_stopping=True, target_kl=1e6)  # never stops: every epoch is checked
    policykl, checked = [], []
    original_terms, original_check = trainer.ppo_terms, trainer.early_stopping.should_stop

    def ppo_terms(*args, **kwargs):
        terms, parts = original_terms(*args, **kwargs)
        policykl.append(float(parts["policy/policykl"]))
        return terms, parts

    trainer.ppo_terms = ppo_terms
    trainer.early_stopping.should_stop = lambda kl: checked.append(kl) or original_check(kl)
    stats = trainer.step(trainer.next_prompts())
    assert stats["ppo/epochs"] == 3.0 and len(policykl) == 3 * 2  # 2 mini-batches per epoch
    assert checked == pytest.approx(policykl[1::2], rel=1e-12)


def test_logit_wrappers(tokenizer, prompts):
    trainer = make_trainer(tokenizer, prompts, mode="trials_only", with_demos=False)
    ids = torch.tensor([[0, 1, 20, 21], [1, 22, 23, 24]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    teacher = trainer.get_teacher_logits(ids, mask)
    logits, values = trainer.get_student_logits(ids, mask, return_values=True)
    assert teacher.shape == logits.shape == (2, 4, len(tokenizer)) and values.shape == (2, 4)
    assert not teacher.requires_grad and logits.requires_grad and values.requires_grad


def test_demos_as_ppo_adds_demonstrations_to_the_batch(tokenizer, prompts):
    trainer = make_trainer(tokenizer, prompts, demos_as="ppo", demo_score=3.0)
    seen = {}
    original = trainer.make_rollout

    def spy(p, r, scores, is_demo):
        seen.update(n=len(p), demo_scores=scores[is_demo].tolist())
        return original(p, r, scores, is_demo)

    trainer.make_rollout = spy
    trainer.step(trainer.next_prompts())
    assert seen["n"] == 8 + 4 and seen["demo_scores"] == [3.0] * 4


def _padded_rollout(trainer, tokenizer):
    prompts = [[tokenizer.bos_token_id, 20, 21, 22], [tokenizer.bos_token_id, 30]]
    responses = [[40, tokenizer.eos_token_id], [41, 42, 43, 44, tokenizer.eos_token_id]]
    return trainer.make_rollout(prompts, responses, torch.tensor([1.0, -1.0]), torch.zeros(2, dtype=torch.bool))


@pytest.mark.parametrize("fused_head", [False, True])
def test_the_minibatch_objective_is_its_logged_terms_weighted_by_their_coefficients(tokenizer, prompts, fused_head):
    """loss = pg_loss + vf_coef v_loss - ent_coef entropy + distill_online_coef online + distill_coef distill, each
    term as logged: a term dropped, or a coefficient applied twice, fails this."""
    coefs = dict(vf_coef=0.3, ent_coef=0.05, distill_online_coef=0.7, distill_coef=2.0)
    trainer = make_trainer(tokenizer, prompts, distill_online=True, kernel_fused_head=fused_head, **coefs)
    rollout = _padded_rollout(trainer, tokenizer)
    demo = trainer._demo_batch([0, 3, 5])
    loss, stats = trainer.minibatch_loss(rollout, torch.arange(2), demo, torch.arange(3))
    expected = (stats["loss/policy"] + coefs["vf_coef"] * stats["loss/value"]
                - coefs["ent_coef"] * stats["policy/entropy"]
                + coefs["distill_online_coef"] * stats["loss/online_distill"]
                + coefs["distill_coef"] * stats["loss/distill"])
    assert all(float(stats[k]) != 0 for k in ("loss/value", "policy/entropy", "loss/online_distill", "loss/distill"))
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("padding_free", [True, False])
def test_pad_positions_do_not_affect_the_loss(tokenizer, prompts, padding_free):
    trainer = make_trainer(tokenizer, prompts, distill_online=True, padding_free=padding_free)
    rollout = _padded_rollout(trainer, tokenizer)
    assert (rollout.attention_mask == 0).sum() == 5  # 2 left pads (row 1) + 3 right pads after eos (row 0)
    index, no_demos = torch.arange(2), torch.zeros(0, dtype=torch.long)
    loss, stats = trainer.minibatch_loss(rollout, index, None, no_demos)

    # the same batch with other token ids at every pad position
    other = type(rollout)(**{**rollout.__dict__})
    pads = rollout.attention_mask == 0
    other.input_ids = torch.where(pads, torch.randint(3, len(tokenizer), pads.shape), rollout.input_ids)
    assert not torch.equal(other.input_ids, rollout.input_ids)
    loss2, stats2 = trainer.minibatch_loss(other, index, None, no_demos)
    torch.testing.assert_close(loss2, loss)
    # and the old-policy pass gives the same log-probs, values and reference log-probs
    old = trainer._old_policy(rollout.input_ids, rollout.attention_mask, rollout.prompt_width, rollout.response_mask)
    old2 = trainer._old_policy(other.input_ids, other.attention_mask, other.prompt_width, other.response_mask)
    for key in ("logprobs", "values", "ref_logprobs", "entropy"):
        torch.testing.assert_close(old2[key], old[key])
    assert stats["policy/ratio_mean"] == pytest.approx(1.0)  # no dropout: the first pass is on-policy


@pytest.mark.parametrize("padding_free", [True, False])
def test_rollout_forward_batch_size_changes_only_how_many_rows_run_at_once(tokenizer, prompts, padding_free):
    """The rollout's no-grad forwards in chunks of 1 row or all rows at once: the same old policy."""
    one, many = (make_trainer(tokenizer, prompts, distill_online=True, padding_free=padding_free,
                              rollout_forward_batch_size=rows) for rows in (1, 64))
    a, b = _padded_rollout(one, tokenizer), _padded_rollout(many, tokenizer)
    for key in ("logprobs", "values", "ref_logprobs", "entropy", "teacher_logits", "advantages"):
        torch.testing.assert_close(getattr(a, key), getattr(b, key))


@pytest.mark.parametrize("padding_free", [True, False])
def test_pad_positions_do_not_affect_the_distill_loss(tokenizer, prompts, padding_free):
    trainer = make_trainer(tokenizer, prompts, padding_free=padding_free)
    demo = trainer._demo_batch([0, 3, 5])
    assert (demo["attention_mask"] == 0).any()
    loss = trainer.demo_distill_loss(demo)
    pads = demo["attention_mask"] == 0
    other = dict(demo, input_ids=torch.where(pads, torch.randint(3, len(tokenizer), pads.shape), demo["input_ids"]))
    torch.testing.assert_close(trainer.demo_distill_loss(other), loss)
    at = lm_positions(demo["attention_mask"], demo["target_mask"])
    torch.testing.assert_close(trainer.lm_loss(other["input_ids"], other["attention_mask"], at),
                               trainer.lm_loss(demo["input_ids"], demo["attention_mask"], at))


# --- non-finite rewards ------------------------------------------------------------------------------


def test_nan_rewards_are_excluded_and_counted(tokenizer, prompts):
    reward = TokenReward(range(3, 60), tokenizer.pad_token_id, nan_fn=lambda call, n: torch.arange(n) % 4 == 0)
    trainer = make_trainer(tokenizer, prompts, reward=reward, mode="trials_only", with_demos=False)
    seen = {}
    original = trainer.make_rollout
    trainer.make_rollout = lambda p, r, s, d: seen.setdefault("n", len(p)) and original(p, r, s, d)
    stats = trainer.step(trainer.next_prompts())
    assert stats["nonfinite_rewards"] == 2.0 and stats["skipped"] == 0.0
    assert seen["n"] == 6
    assert not finite(stats, COMMON + PPO_KEYS)


def test_all_nan_batch_is_skipped(tokenizer, prompts):
    reward = TokenReward(range(3, 60), tokenizer.pad_token_id, nan_fn=lambda call, n: torch.full((n,), call == 0))
    trainer = make_trainer(tokenizer, prompts, reward=reward, mode="trials_only", with_demos=False,
                           max_nonfinite_reward_fraction=1.0)
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    stats = trainer.step(trainer.next_prompts())
    assert stats["skipped"] == 1.0 and stats["nonfinite_rewards"] == 8.0
    assert all(torch.equal(before[k], v) for k, v in trainer.student.state_dict().items())
    stats = trainer.step(trainer.next_prompts())  # the next batch is fine again
    assert stats["skipped"] == 0.0 and math.isfinite(stats["loss/total"])


def test_too_many_nan_rewards_raise(tokenizer, prompts):
    reward = TokenReward(range(3, 60), tokenizer.pad_token_id, nan_fn=lambda call, n: torch.arange(n) < 5)
    trainer = make_trainer(tokenizer, prompts, reward=reward, mode="trials_only", with_demos=False,
                           max_nonfinite_reward_fraction=0.5)
    with pytest.raises(TndError, match=r"5 of 8 rewards so far were NaN/inf .*max_nonfinite_reward_fraction"):
        trainer.step(trainer.next_prompts())


# --- determinism and resume --------------------------------------------------------------------------


def _strip(stats):
    return {k: v for k, v in stats.items() if k != "time/step"}


def _same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert (math.isnan(a[key]) and math.isnan(b[key])) or a[key] == b[key], (key, a[key], b[key])


@pytest.mark.parametrize("mode", ["trials_and_demos", "trials_only"])
def test_same_seed_same_stats(tokenizer, prompts, mode):
    runs = []
    for _ in range(2):
        trainer = make_trainer(tokenizer, prompts, mode=mode, seed=7, use_score_norm=True, with_demos=mode != "trials_only")
        runs.append([_strip(s) for s in trainer.train(steps=2)])
    for a, b in zip(*runs):
        _same(a, b)


def test_resume_is_bit_exact(tokenizer, prompts, tmp_path):
    overrides = dict(seed=5, use_score_norm=True, reward_mean=0.0, reward_std=1.0, scheduler_name="cosine",
                     warmup_steps=1, lm_steps_per_ppo_step=1)
    full = make_trainer(tokenizer, prompts, **overrides)
    full.train(steps=1)
    full.save_checkpoint(tmp_path)
    step2 = _strip(full.train(steps=1)[0])

    resumed = make_trainer(tokenizer, prompts, **overrides)
    resumed.load_checkpoint(tmp_path)
    assert resumed.global_step == 1
    step2_resumed = _strip(resumed.train(steps=1)[0])
    _same(step2, step2_resumed)
    for (name, a), b in zip(full.student.state_dict().items(), resumed.student.state_dict().values()):
        assert torch.equal(a, b), name
    assert full.kl_ctl.value == resumed.kl_ctl.value


def test_on_step_callback_and_default_steps(tokenizer, prompts):
    trainer = make_trainer(tokenizer, prompts, steps=2, mode="trials_only", with_demos=False, ppo_epochs=1)
    calls = []
    trainer.train(on_step=lambda stats, step: calls.append(step))
    assert calls == [1, 2]
    assert trainer.train() == []  # already at config.steps


# --- learning sanity check ----------------------------------------------------------------------------


@pytest.mark.slow  # trains until the reward rises: tens of seconds
def test_ppo_increases_the_reward(tokenizer, prompts):
    """Reward = fraction of tokens from a small preferred set; a few dozen PPO steps must raise it."""
    preferred = range(3, 40)
    reward = TokenReward(preferred, tokenizer.pad_token_id)
    trainer = make_trainer(
        tokenizer, prompts, reward=reward, mode="trials_only", with_demos=False, batch_size=16,
        mini_batch_size=8, ppo_epochs=2, learning_rate=1e-2, init_kl_coef=0.0, adap_kl_ctrl=False, seed=3,
        max_new_tokens=6,
    )
    history = trainer.train(steps=60)  # about 2 s on one CPU core
    rewards = [s["env/reward_mean"] for s in history]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.3, rewards  # typically 0.1 -> 0.6


def test_library_defaults_equal_the_params_schema_defaults():
    """CustomPPOConfig() and a run from default params.yaml train the same way."""
    from tnd.config import Params

    assert CustomPPOConfig() == CustomPPOConfig.from_params(Params())
