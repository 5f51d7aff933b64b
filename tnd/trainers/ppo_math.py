"""The PPO math, as small functions, each tested on its own (tests/test_ppo.py): masked statistics, GAE,
per-token rewards, the clipped policy and value losses, the KL controllers, score processing and early
stopping. Named and computed as TRL's PPOTrainer (v0.11) does; the trainer (tnd/trainers/ppo.py) calls them
and writes the mini-batch objective from their results in one expression (`CustomPPOTrainer.minibatch_loss`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch



def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over positions where mask is True (values elsewhere, even NaN, are ignored)."""
    mask = mask.bool()
    return torch.where(mask, values, torch.zeros_like(values)).sum() / mask.sum().clamp_min(1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked positions; unbiased (Bessel) as TRL's masked_var."""
    mask = mask.bool()
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked positions; masked positions become 0."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over left-aligned response tokens [B, R].

    delta_t = r_t + gamma * V_(t+1) - V_t, A_t = delta_t + gamma * lam * A_(t+1), with V and r
    zero outside the mask (so the value after the last response token is 0: episode end).
    Returns (advantages, returns = advantages + values), both zero outside the mask.
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    length = rewards.shape[1]
    last_gae = torch.zeros_like(rewards[:, 0])
    advantages_reversed = []
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t < length - 1 else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages_reversed.append(last_gae)
    advantages = torch.stack(advantages_reversed[::-1], dim=1) * mask
    returns = advantages + values
    return advantages, returns


def per_token_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float,
    teacher_logprobs: Optional[torch.Tensor] = None, teacher_coef: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """r_t = -kl_coef * (logp_t - logp_ref_t) + teacher_coef * (logp_teacher_t - logp_t), plus the score on the
    last response token. The teacher term (tnd.trial_reward: teacher | both) is on-policy distillation's reward:
    its sum over a trial is minus the sampled estimate of the reverse KL(student || teacher) (MiniLLM, GKD).

    Returns (rewards [B, R], kl [B, R]); both zero outside the mask.
    """
    mask = mask.bool()
    kl = torch.where(mask, logprobs - ref_logprobs, torch.zeros_like(logprobs))
    rewards = -kl_coef * kl
    if teacher_logprobs is not None:
        rewards = rewards + teacher_coef * torch.where(mask, teacher_logprobs - logprobs, torch.zeros_like(logprobs))
    last = mask.long().sum(1) - 1
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards, kl


def clipped_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, cliprange: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip over the valid tokens given (e.g. a mini-batch's response tokens, flat [M]):
    mean of max(-A ratio, -A clip(ratio, 1-eps, 1+eps))."""
    logratio = logprobs - old_logprobs
    ratio = torch.exp(logratio)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = torch.max(pg_losses, pg_losses2).mean()
    with torch.no_grad():
        info = {
            "clipfrac": (pg_losses2 > pg_losses).float().mean(),
            "approx_kl": ((ratio - 1) - logratio).mean(),  # k3
            "policykl": -logratio.mean(),  # k1
            "ratio_mean": ratio.mean(),
        }
    return loss, info


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, cliprange_value: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """0.5 * mean over the valid tokens given of max((V - R)^2, (V_old + clip(V - V_old, +-eps_v) - R)^2)."""
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf_losses1 = (values - returns) ** 2
    vf_losses2 = (values_clipped - returns) ** 2
    loss = 0.5 * torch.max(vf_losses1, vf_losses2).mean()
    with torch.no_grad():
        info = {"clipfrac": (vf_losses2 > vf_losses1).float().mean()}
    return loss, info


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over valid tokens (NaN when Var(R) = 0)."""
    var_returns = masked_var(returns, mask, unbiased=False)
    if var_returns <= 0:
        return float("nan")
    return float(1 - masked_var(returns - values, mask, unbiased=False) / var_returns)


class AdaptiveKLController:
    """Ziegler et al. (2019): e = clip(KL / target - 1, -0.2, 0.2); coef *= 1 + e * n_steps / horizon."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), int(horizon)

    def update(self, current: float, n_steps: int) -> None:
        proportional_error = min(max(current / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class FixedKLController(AdaptiveKLController):
    def __init__(self, kl_coef: float) -> None:
        super().__init__(kl_coef, 1.0, 1)

    def update(self, current: float, n_steps: int) -> None:
        pass


class RunningMoments:
    """Running mean / std of all scores seen, as TRL's RunningMoments: a parallel (Chan et al.) update
    of the mean and the population variance, and `std` the Bessel-corrected sqrt(var * n / (n - 1)).

    `count` starts at a tiny positive number so the prior (mean, std) weighs nothing unless a count
    is given (e.g. the statistics of score_rewards)."""

    def __init__(self, mean: float = 0.0, std: float = 1.0, count: float = 1e-24) -> None:
        self.mean, self.std, self.var, self.count = float(mean), float(std), float(std) ** 2, float(count)

    def update(self, xs: torch.Tensor) -> None:
        xs = xs.detach().double().flatten()
        n = xs.numel()
        if n == 0:
            return
        xs_mean = float(xs.mean())
        xs_var = float(xs.var(unbiased=False))
        delta = xs_mean - self.mean
        total = self.count + n
        self.var = (self.var * self.count + xs_var * n + delta**2 * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total
        self.std = self._bessel_std()

    def state_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), float(state["count"])
        self.std = float(state["std"]) if "std" in state else self._bessel_std()  # states saved before std was kept

    def _bessel_std(self) -> float:
        # one score in all: no Bessel correction (TRL divides by zero there)
        return math.sqrt(self.var * self.count / (self.count - 1)) if self.count > 1 else math.sqrt(self.var)


class ScoreProcessor:
    """Raw scores -> PPO scores: running statistics updated with each batch's finite scores first,
    then normalisation (s - mean) / std (use_score_norm) or scaling s / std (use_score_scaling),
    then clipping to [-score_clip, score_clip]. With several processes the statistics are updated
    with every process's scores (`population`), so all processes process scores alike."""

    def __init__(self, use_scaling: bool, use_norm: bool, clip: Optional[float], moments: RunningMoments) -> None:
        self.use_scaling, self.use_norm, self.clip, self.moments = use_scaling, use_norm, clip, moments

    def __call__(self, scores: torch.Tensor, population: Optional[torch.Tensor] = None) -> torch.Tensor:
        scores = scores.float()
        if self.use_scaling or self.use_norm:
            self.moments.update(scores if population is None else population)
            factor = self.moments.std + torch.finfo(scores.dtype).eps
            if self.use_norm:
                scores = (scores - self.moments.mean) / factor
            else:
                scores = scores / factor
        if self.clip is not None:
            scores = scores.clamp(-self.clip, self.clip)
        return scores

    def state_dict(self) -> dict:
        return self.moments.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.moments.load_state_dict(state)


class EarlyStopping:
    """Skip the remaining PPO epochs once an epoch ends with a policy KL above factor * target_kl
    (TRL's rule: k1 `policy/policykl` of the epoch's last mini-batch, checked after each epoch)."""

    def __init__(self, enabled: bool, target_kl: float, factor: float = 1.5) -> None:
        self.enabled, self.target_kl, self.factor = enabled, target_kl, factor

    def should_stop(self, policykl: float) -> bool:
        return self.enabled and policykl > self.factor * self.target_kl
