"""PPO on the student's own samples ("trials") plus distillation on the teacher's cached
demonstrations: the TnD trainer (Ma, Wang & Chai, NAACL 2025). What it does for a user, its modes,
the paper's recipe and how it differs from TRL: docs/trainer.md.

One `step`, term by term as TRL's `PPOTrainer` (v0.11) computes it, laid out as cleanrl's ppo.py:

  rollout     one continuation per prompt (cut after the first eos); the reward model scores
              prompt + continuation (`compute_scores`), then scaling / normalisation / clipping;
              a non-finite score drops its sample
  old policy  logp_old, V_old, logp_ref at the response tokens (no grad; logits / temperature)
  rewards     r_t = -kl_coef (logp_old(t) - logp_ref(t)), plus the score on the last response token
  GAE         delta_t = r_t + gamma V(t+1) - V(t), A_t = delta_t + gamma lam A_(t+1), R_t = A_t + V_old(t);
              advantages whitened over the valid tokens
  update      ppo_epochs over shuffled mini-batches: clipped policy loss + vf_coef clipped value loss
              - ent_coef entropy (+ the demonstrations' distillation loss); gradients clipped; the
              epochs stop early on the policy KL
  KL control  adaptive (Ziegler et al.) or fixed
  extras      online distillation on the trials; LM steps on the rollout and on lm_data

Demonstrations (`demos_as`): "distill" adds distill_coef x their top-k distillation loss to every
mini-batch's loss, in the same optimizer steps, so Adam, clipping and the schedule see one objective
(demos_only runs the same loop without the PPO terms); "ppo" puts them into the PPO batch with the
fixed score `demo_score`.

Engine: accelerate (tnd/engine.py). The student and its value head are one prepared module
(`ForwardAt`) that every training forward goes through (one forward per backward: a mini-batch's PPO
rows and demonstrations side by side); generation runs on the unwrapped student. With N processes each
works on 1/N of every batch; what steers training (score statistics, the KL for the controller and for
early stopping, the non-finite count) is reduced over processes, the other stats are process 0's, and
advantages are whitened per process, as in TRL.

The PPO math is in small functions of its own (tnd/trainers/ppo_math.py), what the trainer refuses in
tnd/trainers/ppo_inputs.py; `minibatch_loss` writes the whole objective in one expression.

Forwards run padding-free when `padding_free` (tnd/packing.py); the losses are over the
mini-batch's response tokens, flat. Every step returns the keys of `STAT_KEYS`; one not computed in
that step is NaN. Dropout is off in the student for the whole run, so the first mini-batch has ratio 1
and a CPU run resumes bit-exactly from `state_dict()`.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import inspect
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from tnd.batching import lm_positions, prompt_response_batch, response_predictors, right_pad, stack_padded
from tnd.engine import (
    ForwardAt, clip_grad_norm, make_accelerator, prepare_frozen, set_deepspeed_micro_batch, shard, shards_parameters,
    unwrap_for_generation,
)
from tnd.config import CustomPPOConfig, PPOConfigError
from tnd.errors import TndError
from tnd.generation import sample_continuations
from tnd.packing import chunks, supports_packing
from tnd.trainers.fused_head import HeadStates, HiddenAt
from tnd.trainers.ppo_inputs import check_inputs
from tnd.trainers.ppo_math import (
    AdaptiveKLController, EarlyStopping, FixedKLController, RunningMoments, ScoreProcessor, clipped_policy_loss,
    clipped_value_loss, compute_gae, explained_variance, masked_mean, masked_whiten, per_token_rewards,
)
from tnd.reward import score_token_ids
from tnd.trainers.value_head import ValueHead, hidden_size_of

STAT_KEYS = (
    "objective/kl",  # mean over trials of the summed per-token KL (k1) to the reference
    "objective/kl_coef",  # the coefficient used for this step's rewards
    "objective/entropy",  # mean per-token entropy of the student over trial response tokens
    "env/reward_mean",  # raw reward-model score of the finite trials
    "env/reward_std",
    "env/score_mean",  # after score processing (0 with tnd.trial_reward: teacher)
    "env/teacher_logratio",  # tnd.trial_reward teacher | both: mean over trial tokens of logp_teacher - logp_student
    "policy/approx_kl",  # k3 estimator: mean of (ratio - 1) - log(ratio), over update mini-batches
    "policy/policykl",  # k1 estimator: mean of logp_old - logp (TRL's policy/policykl)
    "policy/clipfrac",
    "policy/ratio_mean",
    "policy/entropy",  # mean per-token entropy during the update
    "loss/policy",
    "loss/value",
    "loss/distill",  # demonstrations (top-k KL), before distill_coef
    "loss/online_distill",  # trials vs dense teacher logits, before distill_online_coef
    "loss/lm",  # interleaved LM steps (cross-entropy on tnd.lm_data)
    "loss/lm_rollout",  # the LM update on the PPO batch's sequences (tnd.lm_on_rollout)
    "loss/total",
    "val/explained_variance",
    "val/clipfrac",
    "val/mean",
    "returns/mean",
    "advantages/mean",
    "nonfinite_rewards",
    "skipped",
    "ppo/epochs",  # PPO epochs run (fewer than ppo_epochs after early stopping)
    "ppo/grad_norm",
    "tokens/response_length",
    "lr",
    "time/step",
    "student/updates",  # optimizer steps of the student so far (PPO mini-batch and LM steps): nAoA's x-axis
)


class PPOTerms(NamedTuple):
    """The PPO terms of a mini-batch, each a mean over its response tokens (0-d tensors)."""

    pg_loss: torch.Tensor  # the clipped policy loss
    v_loss: torch.Tensor  # the clipped value loss
    entropy: torch.Tensor  # the policy's mean entropy (the bonus)
    online_distill_loss: torch.Tensor  # distill.online on the trials (0 when off)


@dataclass
class Rollout:
    """One PPO batch: prompts left-padded to width P, responses right-padded to width R."""

    input_ids: torch.Tensor  # [B, P + R]
    attention_mask: torch.Tensor  # [B, P + R]
    prompt_width: int
    response_mask: torch.Tensor  # [B, R] bool: response tokens (up to and including eos)
    is_demo: torch.Tensor  # [B] bool
    scores: torch.Tensor  # [B] processed
    logprobs: torch.Tensor  # [B, R] old policy
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    teacher_logits: Optional[torch.Tensor] = None  # [B, R, V], online distillation only
    teacher_logprobs: Optional[torch.Tensor] = None  # [B, R], the teacher's trial reward only
    n_trials: int = 0  # trials in the batch over all processes (the KL controller's sample count)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def _scatter(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[M, ...] values of the True positions of `mask` (row-major) -> [*mask.shape, ...], zero elsewhere."""
    out = flat.new_zeros(*mask.shape, *flat.shape[1:])
    out[mask] = flat
    return out


def accelerator_for(config: CustomPPOConfig) -> Any:
    """The Accelerator a trainer with `config` needs: its mixed precision and gradient accumulation, and DDP
    told when some backward passes leave the value head out."""
    return make_accelerator(config.mixed_precision, config.gradient_accumulation_steps,
                            find_unused_parameters=config.value_head_sometimes_unused)


def _disable_dropout(model: nn.Module) -> None:
    """Dropout off in a model that must run in train mode (gradient checkpointing): nn.Dropout modules and
    the attention-dropout rate HF attention modules keep as a float (TRL's disable_dropout_in_model, plus that)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def _nan() -> float:
    return float("nan")


def _mean_or_nan(values: list[float]) -> float:
    """The plain mean; NaN when there is no value, as every stat not computed in a step (STAT_KEYS)."""
    return sum(values) / len(values) if values else float("nan")


# --- the trainer ----------------------------------------------------------------------------


class CustomPPOTrainer:
    def __init__(
        self,
        teacher: PreTrainedModel,
        student: PreTrainedModel,
        reward_model: nn.Module,
        config: CustomPPOConfig,
        train_dataset: list[list[int]],
        demonstrations: Any = None,
        tokenizer: PreTrainedTokenizerBase = None,
        accelerator: Any = None,
        lm_dataset: Optional[list[list[int]]] = None,
    ) -> None:
        if tokenizer is None:
            raise TndError("CustomPPOTrainer needs tokenizer= (pad and eos ids, reward-model bos)")
        self.config = config
        self.teacher, self.student, self.reward_model = teacher, student, reward_model
        self.tokenizer = tokenizer
        self.pad_id, self.eos_id, self.bos_id = tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id
        self.n_ids = len(tokenizer)  # the ids that can be sampled, whatever the models' output width
        self.train_dataset = [list(p) for p in train_dataset]
        self.demonstrations = demonstrations
        self.lm_dataset = [list(s) for s in lm_dataset] if lm_dataset is not None else None  # tnd.lm_data: corpus
        # One process, or several from `accelerate launch` / `torchrun`: each takes 1/N of every batch.
        self.accelerator = accelerator if accelerator is not None else accelerator_for(config)
        self.device = self.accelerator.device
        check_inputs(config, self.accelerator, tokenizer, {"teacher": teacher, "student": student, "reward": reward_model},
                     self.train_dataset, demonstrations, self.lm_dataset)

        # Trainable weights in fp32 whatever dtype the checkpoint was saved in: AdamW on bf16 weights loses
        # most small updates to rounding (mixed precision computes in bf16 under autocast, not in the weights).
        student.float()
        student.eval()  # dropout off for the whole run (see module docstring) ...
        if config.gradient_checkpointing:  # ... except that HF checkpoints activations in train mode only
            enable = getattr(student, "activation_checkpointing_enable", None)  # transformers 5 (4.x: gradient_...)
            if enable is not None:
                enable({"use_reentrant": False})
            else:
                student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            student.train()
            _disable_dropout(student)
        self.value_head = ValueHead(hidden_size_of(student), seed=config.seed)
        # prepared below, with the optimizers the hooks make; HiddenAt: hidden states for the fused head's losses
        self.policy = (HiddenAt(student, self.value_head, self.n_ids) if config.kernel_fused_head
                       else ForwardAt(student, self.value_head))
        # Padding-free passes, decided once per model on the bare model (see tnd/packing.py).
        self._packed = {"student": self._runs_packed(student), "teacher": self._runs_packed(teacher)}
        self.optimizer = self._setup_optimizer()
        self.scheduler = self._setup_scheduler()
        self.lm_optimizer, self.lm_scheduler = self._setup_lm_optimizer()
        # The schedulers are not prepared: accelerate's AcceleratedScheduler steps once per process and
        # optimizer step (it assumes per-process batches); ours step once per trainer step on every process.
        set_deepspeed_micro_batch(self.accelerator, config.mini_batch_size // self.accelerator.num_processes)
        # The KL reference is copied before `prepare`: FSDP wraps the student's layers in place, and a wrapped
        # module cannot be deep-copied.
        self.reference = copy.deepcopy(student) if config.kl_reference == "initial_student" else None
        optimizers = [self.optimizer] + ([self.lm_optimizer] if self.lm_optimizer is not None else [])
        self.policy, *optimizers = self.accelerator.prepare(self.policy, *optimizers)
        self.optimizer, self.lm_optimizer = optimizers[0], (optimizers[1] if len(optimizers) > 1 else None)
        bare = self.accelerator.unwrap_model(self.policy)
        self.student, self.value_head = bare.model, bare.value_head
        self._clipped = list(self.policy.parameters())  # for clip_grad_norm_, listed once rather than every step
        # Frozen models: placed (and sharded under FSDP), never wrapped in DDP.
        self.teacher_at = prepare_frozen(self.accelerator, ForwardAt(teacher))
        self.reward_model = prepare_frozen(self.accelerator, reward_model)
        self.reference_at = None  # None: the teacher is the KL reference
        if self.reference is not None:
            if not shards_parameters(self.accelerator):
                # the student as prepared: DDP has broadcast process 0's weights (FSDP's sync_module_states
                # does the same for the reference in prepare_frozen)
                self.reference.load_state_dict(self.student.state_dict())
            self._packed["reference"] = self._packed["student"]
            self.reference_at = prepare_frozen(self.accelerator, ForwardAt(self.reference))

        # `generator` draws prompts and demonstrations and is the same on every process (each then
        # takes its shard). Sampling and the mini-batch order are seeded per step and process
        # (`_step_seed`), so they need no state and a resumed run, on any process, repeats them.
        self.generator = torch.Generator().manual_seed(config.seed)
        self.global_step = 0
        self.student_updates = 0  # optimizer steps of the student (PPO mini-batch and LM steps)
        self.nonfinite_total = 0
        self.scored_total = 0
        # This process's finite trials of the last step, and those of them that entered an update (none in
        # demos_only / lm_only, where trials are sampled for monitoring only, nor in a skipped step): what the
        # student practised.
        self.last_trials: list[list[int]] = []
        self.last_trial_prompts: list[list[int]] = []  # the prompt of each of last_trials
        self.trained_trials: list[list[int]] = []
        self.early_stopping = self._setup_early_stopping()
        self.score_processor = self._setup_score_processing()
        self.kl_ctl = (
            AdaptiveKLController(config.init_kl_coef, config.kl_target, config.kl_horizon)
            if config.adap_kl_ctrl
            else FixedKLController(config.init_kl_coef)
        )
        self.accelerator.register_for_checkpointing(self)  # state_dict: what save_state does not hold already

    # --- setup (overridable) ---------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    def _setup_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        valid = sorted(
            name for name in dir(torch.optim)
            if isinstance(getattr(torch.optim, name), type)
            and issubclass(getattr(torch.optim, name), torch.optim.Optimizer)
            and name != "Optimizer"
        )
        if cfg.optimizer_name not in valid:
            close = [v for v in valid if v.lower() == cfg.optimizer_name.lower()]
            close = close or difflib.get_close_matches(cfg.optimizer_name, valid, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise PPOConfigError(
                f"ppo.optimizer_name = {cfg.optimizer_name!r} is not a torch.optim optimizer; {hint}"
                f"valid names include {', '.join(n for n in ('AdamW', 'Adam', 'SGD', 'RMSprop', 'Adagrad') if n in valid)}"
            )
        optimizer_cls = getattr(torch.optim, cfg.optimizer_name)
        params = self.trainable_parameters()
        kwargs = dict(cfg.optimizer_kwargs)
        # One fused kernel per step instead of a loop over the tensors: the optimizer step of a small model is
        # launch-bound, and fusing removes most of that overhead. optimizer_kwargs win.
        if ("fused" in inspect.signature(optimizer_cls).parameters and not {"fused", "foreach"} & set(kwargs)
                and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)):
            kwargs["fused"] = True
        try:
            return optimizer_cls(params, lr=cfg.learning_rate, **kwargs)
        except (TypeError, ValueError) as exc:
            raise PPOConfigError(
                f"ppo.optimizer_kwargs = {cfg.optimizer_kwargs!r} do not fit {cfg.optimizer_name} ({exc})"
            ) from None

    def _setup_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        """Learning rate per trainer step: warm-up over warmup_steps, then linear / cosine decay to 0
        at `steps`, or constant."""
        cfg = self.config
        try:
            if cfg.scheduler_name == "constant":
                return get_constant_schedule_with_warmup(self.optimizer, cfg.warmup_steps, **cfg.scheduler_kwargs)
            if cfg.scheduler_name == "linear":
                return get_linear_schedule_with_warmup(self.optimizer, cfg.warmup_steps, cfg.steps, **cfg.scheduler_kwargs)
            return get_cosine_schedule_with_warmup(self.optimizer, cfg.warmup_steps, cfg.steps, **cfg.scheduler_kwargs)
        except TypeError as exc:
            raise PPOConfigError(
                f"ppo.scheduler_kwargs = {cfg.scheduler_kwargs!r} do not fit the {cfg.scheduler_name} schedule ({exc})"
            ) from None

    def _setup_lm_optimizer(self) -> tuple[Optional[torch.optim.Optimizer], Any]:
        """The interleaved LM steps' own AdamW (as the paper's recipe: its LM steps and PPO keep separate
        optimizers) with a linear warm-up in trainer steps; (None, None): they share the PPO optimizer."""
        cfg = self.config
        if cfg.lm_learning_rate is None:
            return None, None
        params = [p for p in self.student.parameters() if p.requires_grad]  # not the value head
        optimizer = torch.optim.AdamW(params, lr=cfg.lm_learning_rate, eps=1e-8, weight_decay=0.0)
        return optimizer, get_constant_schedule_with_warmup(optimizer, cfg.lm_warmup_steps)

    def _setup_early_stopping(self) -> EarlyStopping:
        return EarlyStopping(self.config.early_stopping, self.config.target_kl)

    def _setup_score_processing(self) -> ScoreProcessor:
        cfg = self.config
        if cfg.reward_mean is not None:
            count = cfg.reward_count if cfg.reward_count is not None else cfg.batch_size
            moments = RunningMoments(cfg.reward_mean, cfg.reward_std, count)
        else:
            moments = RunningMoments()
        return ScoreProcessor(cfg.use_score_scaling, cfg.use_score_norm, cfg.score_clip, moments)

    # --- model wrappers -------------------------------------------------------------------

    @torch.no_grad()
    def get_teacher_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, at: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Teacher next-token logits, no grad: [M, V] at the positions `at` [B, T] marks (row-major), or
        [B, T, V] at every position when `at` is None (left or right padding)."""
        return self._logits_at(self.teacher_at, "teacher", input_ids, attention_mask, at)[0]

    @torch.no_grad()
    def get_reference_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """The KL reference's logits [M, V] at `at`: the teacher's, or the frozen initial student's."""
        if self.reference_at is None:
            return self.get_teacher_logits(input_ids, attention_mask, at)
        return self._logits_at(self.reference_at, "reference", input_ids, attention_mask, at)[0]

    def get_student_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, at: Optional[torch.Tensor] = None,
        return_values: bool = False, values: Optional[bool] = None,
    ):
        """Student next-token logits (and the value head's values), with grad, through the prepared policy:
        [M, V] (and [M]) at the positions `at` marks, or [B, T, V] (and [B, T]) when `at` is None.
        `values=False` returns (logits, None) without running the value head."""
        values = return_values if values is None else values
        logits, values = self._logits_at(self.policy, "student", input_ids, attention_mask, at, values)
        return (logits, values) if return_values else logits

    def _logits_at(self, model: nn.Module, name: str, input_ids, attention_mask, at, values: bool = False):
        """(logits, values) of a ForwardAt `model` under autocast: at `at`, or at every position ([B, T, ...],
        padded) when `at` is None. Rows past the tokenizer (a padded vocabulary) are masked as the sampler masks
        them (tnd.generation.TokenizerIdsOnly), so log-probs, entropy, KL and the distillation losses are those
        of the distribution that sampled."""
        full = at is None
        at = attention_mask.new_ones(attention_mask.shape, dtype=torch.bool) if full else at
        with self.accelerator.autocast():
            logits, values = model(input_ids.to(self.device), attention_mask.to(self.device), at.to(self.device),
                                   self._packed[name] and not full, values)
        if isinstance(logits, HeadStates):  # kernels.fused_head: the losses apply the head (and the mask below)
            return logits, values
        if logits.shape[-1] > self.n_ids:
            # Masked, not cut, so the losses run at the model's width. -1e4 rather than -inf: exp() of it is exactly 0
            # in fp32, bf16 and fp16, as the sampler's -inf, while 0 x logit in the entropy stays 0, not NaN.
            padded = torch.arange(logits.shape[-1], device=logits.device) >= self.n_ids
            logits = logits.masked_fill(padded, -1e4)
        if full:
            logits = logits.view(*input_ids.shape, -1)
            values = None if values is None else values.view(input_ids.shape)
        return logits, values

    def _runs_packed(self, model: nn.Module) -> bool:
        """config.padding_free and the model passes the packing check (on the bare model, once)."""
        packed = self.config.padding_free and supports_packing(model)
        if self.config.padding_free and not packed:
            warnings.warn(
                f"{type(model).__name__} fails the padding-free check (packed sequences mix, or its logits "
                "are more than output_head(base_model)); it runs on padded batches "
                "(ppo.padding_free: false silences this)",
                stacklevel=3,
            )
        return packed

    def _logprobs(self, logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logp, entropy) [M] of `tokens` [M] under softmax(logits / temperature), through the fused kernel."""
        import tnd_kernels

        if isinstance(logits, HeadStates):  # no gradient: the update's go through the policy terms (ppo_terms)
            return logits.token_logprobs_entropy(tokens, None, self.config.temperature, self.config.kernel_backend)[1:]
        return tnd_kernels.token_logprobs_entropy(
            logits, tokens, temperature=self.config.temperature, backend=self.config.kernel_backend
        )

    @torch.no_grad()
    def compute_scores(self, sequences: list[list[int]]) -> torch.Tensor:
        """Reward-model scores (float32 [n]) of prompt + continuation, in one batch, through the pipeline's
        one scoring function (bos in front, scored whole) under the run's autocast, as score_rewards scores the
        demonstrations: the stored rewards are these, in mixed precision too."""
        with self.accelerator.autocast():
            scores = score_token_ids(self.reward_model, self.tokenizer, sequences, batch_size=None)
        return scores.float().to(self.device)

    # --- rollout --------------------------------------------------------------------------

    def _sample(self, prompts: list[list[int]], by_teacher: bool = False) -> list[list[int]]:
        """One continuation per prompt by the student (or the teacher), cut after the first eos (kept), the
        whole batch in one `generate` on the bare model (full parameters gathered under FSDP). The seed is a
        function of (config.seed, global_step, process, which model), so a resumed run samples the same."""
        cfg = self.config
        wrapped = self.teacher_at if by_teacher else self.policy
        with unwrap_for_generation(self.accelerator, wrapped) as bare, self.accelerator.autocast():
            return sample_continuations(
                bare.model, self.tokenizer, prompts, cfg.max_new_tokens, self._step_seed(2 if by_teacher else 0),
                temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, batch_size=len(prompts),
                progress=False,
            )

    def _step_seed(self, stream: int, shared: bool = False) -> int:
        """A seed for this step, this process (the same on every process when `shared`) and one random stream
        (0: sampling, 1: mini-batch order, 2: the teacher's demonstrations, 3: the demonstrations' order)."""
        n = self.accelerator.num_processes
        step = self.global_step if shared else self.global_step * n + self.accelerator.process_index
        return ((self.config.seed + stream) * 1_000_003 + step) % (2**63)


    @torch.no_grad()
    def _old_policy(self, ids, mask, prompt_width, response_mask):
        """logp_old, values, entropy, ref logp [B, R] (and teacher logits [B, R, V] for online distillation),
        in chunks of at most rollout_forward_batch_size rows: without a graph a forward's activations are one
        layer's, so a chunk can be wider than a mini-batch, and fewer forwards cost less on a small model."""
        out = {k: [] for k in ("logprobs", "values", "entropy", "ref_logprobs", "teacher_logprobs", "teacher_logits")}
        teacher_reward = self.config.trial_reward != "reward_model"
        at = response_predictors(response_mask, prompt_width)
        tokens = ids[:, prompt_width:]
        for sl in chunks(mask, self.config.rollout_forward_batch_size, all(self._packed.values())):
            rmask = response_mask[sl]
            targets = tokens[sl][rmask]
            logits, values = self.get_student_logits(ids[sl], mask[sl], at[sl], return_values=True)
            logp, ent = self._logprobs(logits, targets)
            ref_logits = self.get_reference_logits(ids[sl], mask[sl], at[sl])
            ref_logp, _ = self._logprobs(ref_logits, targets)
            out["logprobs"].append(_scatter(logp, rmask))
            out["entropy"].append(_scatter(ent, rmask))
            out["values"].append(_scatter(values, rmask))
            out["ref_logprobs"].append(_scatter(ref_logp, rmask))
            if self.config.distill_online or teacher_reward:
                teacher_logits = ref_logits if self.reference_at is None else self.get_teacher_logits(
                    ids[sl], mask[sl], at[sl])
                if self.config.distill_online:
                    out["teacher_logits"].append(_scatter(teacher_logits, rmask))
                if teacher_reward:
                    teacher_logp = ref_logp if self.reference_at is None else self._logprobs(teacher_logits, targets)[0]
                    out["teacher_logprobs"].append(_scatter(teacher_logp, rmask))
        return {k: (torch.cat(v) if v else None) for k, v in out.items()}

    def _demo_rows(self, indices: list[int]) -> tuple[list[list[int]], list[list[int]]]:
        """Cached demonstrations split into prompt and continuation (for demos_as = ppo)."""
        batch = self.demonstrations.batch(indices, self.pad_id)
        prompts, continuations = [], []
        for ids, mask, target in zip(batch["input_ids"], batch["attention_mask"], batch["target_mask"]):
            positions = target.nonzero().flatten().tolist()
            if not positions:
                continue
            first, last = positions[0], positions[-1]
            prompts.append(ids[: first + 1].tolist())
            continuations.append(ids[first + 1 : last + 2].tolist())
        return prompts, continuations

    def _draw_demos(self) -> list[int]:
        return self._draw(len(self.demonstrations), self.config.demo_batch_size)

    def _draw(self, n: int, size: int) -> list[int]:
        """`size` indices into n items from the shared generator: without replacement when n allows."""
        if size <= n:
            return torch.randperm(n, generator=self.generator)[:size].tolist()
        return torch.randint(n, (size,), generator=self.generator).tolist()

    def _ppo_demonstrations(self, prompts: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
        """Demonstrations that join the PPO batch (demos_as = ppo): this process's share of a cached batch, or
        (demos_from = teacher, the paper's recipe) the teacher's continuations of this step's prompts."""
        if self.config.demos_from == "teacher":
            return prompts, self._sample(prompts, by_teacher=True)
        return self._demo_rows(shard(self.accelerator, self._draw_demos()))

    def make_rollout(
        self, prompts: list[list[int]], responses: list[list[int]], raw_scores: torch.Tensor, is_demo: torch.Tensor
    ) -> Rollout:
        """Old-policy quantities, per-token rewards, GAE advantages and returns for a scored batch."""
        cfg = self.config
        ids, mask, prompt_width, response_mask = prompt_response_batch(prompts, responses, self.pad_id)
        ids, mask, response_mask = ids.to(self.device), mask.to(self.device), response_mask.to(self.device)
        old = self._old_policy(ids, mask, prompt_width, response_mask)
        scores = raw_scores.to(self.device).float()
        rewards, kl = per_token_rewards(scores, old["logprobs"], old["ref_logprobs"], response_mask, self.kl_ctl.value,
                                        old["teacher_logprobs"], cfg.teacher_reward_coef)
        advantages, returns = compute_gae(rewards, old["values"], response_mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, response_mask)
        return Rollout(
            input_ids=ids, attention_mask=mask, prompt_width=prompt_width, response_mask=response_mask,
            is_demo=is_demo.to(self.device), scores=scores, logprobs=old["logprobs"],
            ref_logprobs=old["ref_logprobs"], teacher_logprobs=old["teacher_logprobs"], values=old["values"],
            entropy=old["entropy"], rewards=rewards, kl=kl,
            advantages=advantages.detach(), returns=returns.detach(), teacher_logits=old["teacher_logits"],
        )

    # --- losses on a mini-batch -------------------------------------------------------------

    def minibatch_loss(
        self, rollout: Optional[Rollout], index: torch.Tensor, demo: Optional[dict], demo_rows: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one mini-batch: the PPO terms on the rollout's rows `index` and the demonstrations'
        distillation on their rows `demo_rows`, from ONE forward of the policy over both side by side (DDP and
        FSDP synchronise one forward per backward). A term with no rows here is 0.

        Each term is a mean over the mini-batch's tokens on every process, not over this process's only: the
        term's per-process mean is weighted by this process's share of those tokens (`_token_weights`), so
        that DDP's average of the gradients is the gradient of the mean over all tokens, whatever the lengths
        on each process (one process: weights 1)."""
        cfg = self.config
        has_ppo = rollout is not None and len(index) > 0
        has_demos = demo is not None and len(demo_rows) > 0
        blocks = []
        if rollout is not None:
            response_mask = rollout.response_mask[index]
            blocks.append((rollout.input_ids[index], rollout.attention_mask[index],
                           response_predictors(response_mask, rollout.prompt_width)))
        if demo is not None:
            blocks.append((demo["input_ids"][demo_rows], demo["attention_mask"][demo_rows],
                           demo["target_mask"][demo_rows].bool()))
        ids, mask, at = stack_padded(blocks, self.pad_id)
        logits, values = self.get_student_logits(ids, mask, at, return_values=True, values=rollout is not None)
        # PPO rows come first (the count costs a device sync: only when demonstrations follow them)
        n_ppo = 0 if rollout is None else len(logits) if demo is None else int(at[: len(index)].sum())
        w_ppo, w_online, w_demo = self._token_weights(rollout, index, demo, demo_rows)

        zero = torch.zeros((), device=self.device)
        terms, stats = PPOTerms(zero, zero, zero, zero), {}
        if has_ppo:
            terms, stats = self.ppo_terms(rollout, index, logits[:n_ppo], values[:n_ppo])
        distill_loss = zero
        if has_demos:
            distill_loss = self.demo_distill_loss({k: v[demo_rows] for k, v in demo.items()}, logits[n_ppo:])
            stats["loss/distill"] = distill_loss.detach()

        # The objective: cleanrl's PPO loss, plus distillation on the trials (online) and on the demonstrations.
        loss = (w_ppo * (terms.pg_loss + cfg.vf_coef * terms.v_loss - cfg.ent_coef * terms.entropy)
                + w_online * cfg.distill_online_coef * terms.online_distill_loss
                + w_demo * cfg.distill_coef * distill_loss)

        # A process whose share of the mini-batch is empty still backpropagates through every parameter its
        # forward used, as its peers' backward needs.
        if not (has_ppo or has_demos):
            loss = loss + logits.sum() * 0.0
        if values is not None and not has_ppo:
            loss = loss + values.sum() * 0.0
        return loss, stats

    def _token_weights(self, rollout: Optional[Rollout], index: torch.Tensor, demo: Optional[dict],
                       demo_rows: torch.Tensor) -> tuple[Any, Any, Any]:
        """This process's weight of each loss term of a mini-batch (PPO, online distillation, demonstrations):
        its tokens over the mean tokens per process, n_p / (n / N), so the per-process means DDP averages make
        the mean over all n tokens. One all-reduce of three counts per mini-batch; (1, 1, 1) in one process."""
        if self.accelerator.num_processes == 1:
            return 1.0, 1.0, 1.0
        zero = torch.zeros((), dtype=torch.long, device=self.device)
        ppo = online = demo_tokens = zero
        if rollout is not None:
            response_mask = rollout.response_mask[index]
            ppo = response_mask.sum()
            if self.config.distill_online and rollout.teacher_logits is not None:
                online = (response_mask & ~rollout.is_demo[index][:, None]).sum()
        if demo is not None:
            demo_tokens = demo["target_mask"][demo_rows].bool().sum()
        local = torch.stack([ppo, online, demo_tokens]).double()
        per_process = self._tokens_per_process(local)
        return tuple((local / per_process.clamp_min(1e-12)).float())

    def _tokens_per_process(self, counts: torch.Tensor) -> torch.Tensor:
        """The mean over the processes of each of `counts` (this process's token counts); the counts themselves
        in one process."""
        n = self.accelerator.num_processes
        return counts if n == 1 else self.accelerator.reduce(counts.double(), "sum").to(counts.dtype) / n

    def ppo_terms(
        self, rollout: Rollout, index: torch.Tensor, logits: torch.Tensor | HeadStates, values: torch.Tensor,
    ) -> tuple[PPOTerms, dict[str, torch.Tensor]]:
        """The PPO terms of the rollout's rows `index` (and the online distillation on their trials), from the
        policy's `logits` [M, V] (or HeadStates) and `values` [M] at their M response predictions, with the
        stats of the update."""
        cfg = self.config
        ids, response_mask = rollout.input_ids[index], rollout.response_mask[index]
        # everything below is over the M response tokens of the mini-batch, flat and row-major
        tokens = ids[:, rollout.prompt_width :][response_mask]
        old = {name: getattr(rollout, name)[index][response_mask]
               for name in ("logprobs", "advantages", "values", "returns")}
        fused = isinstance(logits, HeadStates)
        if fused:  # kernels.fused_head: the head and the policy terms in one pass
            policy_terms, logp, entropy = logits.token_logprobs_entropy(
                tokens, self._policy_terms(old, len(tokens)), cfg.temperature, cfg.kernel_backend)
        else:
            logp, entropy = self._logprobs(logits, tokens)
        pg_loss, pg = clipped_policy_loss(logp, old["logprobs"], old["advantages"], cfg.cliprange)
        v_loss, vf = clipped_value_loss(values, old["values"], old["returns"], cfg.cliprange_value)
        entropy = entropy.mean()
        stats = {  # 0-d tensors: read once per step (a .item() here would be a GPU sync per mini-batch)
            "loss/policy": pg_loss.detach(), "loss/value": v_loss.detach(), "policy/entropy": entropy.detach(),
            "policy/clipfrac": pg["clipfrac"], "policy/approx_kl": pg["approx_kl"], "policy/policykl": pg["policykl"],
            "policy/ratio_mean": pg["ratio_mean"], "val/clipfrac": vf["clipfrac"],
        }
        if fused:
            # The head's pass differentiates the clipped loss and the entropy bonus together (`_policy_terms`):
            # its result is pg_loss - ent_coef * entropy, so here pg_loss carries both and entropy is 0.
            pg_loss, entropy = policy_terms, torch.zeros_like(entropy)
        elif not cfg.ent_coef:
            entropy = entropy.detach()  # a zero-weighted term would still cost a backward pass through it

        online_distill_loss = torch.zeros((), device=self.device)
        trials = ~rollout.is_demo[index]
        # With demos_as = ppo a mini-batch may hold demonstrations only: no trial tokens to distil on.
        if cfg.distill_online and rollout.teacher_logits is not None and bool(trials.any()):
            trial_tokens = (response_mask & trials[:, None])[response_mask]
            online_distill_loss = self.online_distill_loss(
                logits, rollout.teacher_logits[index][response_mask], trial_tokens)
            stats["loss/online_distill"] = online_distill_loss.detach()
        return PPOTerms(pg_loss, v_loss, entropy, online_distill_loss), stats

    def _policy_terms(self, old: dict[str, torch.Tensor], m: int) -> Callable:
        """The clipped policy loss - ent_coef x entropy over m tokens, as the fused head's per-chunk loss: each
        chunk's mean weighted by its share of the m tokens."""
        cfg = self.config

        def terms(logp, entropy, rows):
            loss = clipped_policy_loss(logp, old["logprobs"][rows], old["advantages"][rows], cfg.cliprange)[0]
            if cfg.ent_coef:  # as in ppo_terms: no entropy backward when it has no weight
                loss = loss - cfg.ent_coef * entropy.mean()
            return loss * (len(logp) / m)

        return terms

    def _distill_options(self) -> dict[str, Any]:
        cfg = self.config
        return {"loss": cfg.distill_loss, "beta": cfg.distill_beta, "temperature": cfg.distill_temperature,
                "reduction": "batchmean", "backend": cfg.kernel_backend}

    def online_distill_loss(self, student_logits, teacher_logits, mask) -> torch.Tensor:
        import tnd_kernels

        rows = mask.bool()
        if isinstance(student_logits, HeadStates):  # a second pass over the head for these rows
            return student_logits[rows].distill_loss(teacher_logits[rows], **self._distill_options())
        return tnd_kernels.distill_loss(student_logits[rows], teacher_logits[rows], **self._distill_options())

    def demo_distill_loss(self, demo: dict[str, torch.Tensor], logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """topk_distill_loss of the student's logits at the target positions (`logits` [M, V] when the caller
        has them) against the cached top-k.

        A sampled cache (cache.targets: sampled) reads as S slots of ids with log(count / S) and a -inf tail, so the
        same kernel gives the random-sampling KD estimator (Anshumann et al., 2025) unchanged: forward KL over those
        buckets is KL(w || q) = CE(w, q) - H(w) for the empirical distribution w of the draws. Its gradient q - w is
        unbiased for the full-KD gradient q - p; its value is, in expectation, KL(p || q) + H(p) - E[H(w)]: above the
        full KL by the constant H(p) - E[H(w)] >= 0 (the draws' entropy is biased low), so loss/distill reads higher
        than a top-k cache's for the same student."""
        import tnd_kernels

        rows = demo["target_mask"].bool()
        if logits is None:
            logits = self.get_student_logits(demo["input_ids"], demo["attention_mask"], rows)
        teacher = (demo["topk_logprobs"][rows], demo["topk_indices"][rows].long(), demo["tail_logmass"][rows])
        if isinstance(logits, HeadStates):
            return logits.topk_distill_loss(*teacher, **self._distill_options())
        return tnd_kernels.topk_distill_loss(logits, *teacher, **self._distill_options())

    def _demo_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        batch = self.demonstrations.batch(indices, self.pad_id)
        return {k: v.to(self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}

    # --- one step -------------------------------------------------------------------------

    def step(self, prompts: list[list[int]]) -> dict[str, float]:
        """One TnD step on `prompts` (this process's share of a batch of trials), in order:

        1. trials: the student continues the prompts, the reward model scores them
        2. the PPO batch: the finite trials (+ demonstrations with demos_as = ppo), processed scores, old
           policy, KL-penalised per-token rewards, GAE advantages (`rollout`)
        3. the update: ppo_epochs over mini-batches of PPO loss + distill_coef x top-k KL on this step's
           demonstrations (`_optimize`)
        4. LM updates: on the PPO batch (tnd.lm_on_rollout, or the lm_on_rollout mode in place of PPO on it),
           then lm_steps_per_ppo_step on lm_data
        5. the KL controller, on the trials' KL measured in 2

        demos_only and lm_only sample and score trials too (for monitoring) but never update on them.
        """
        cfg = self.config
        start = time.perf_counter()
        self.global_step += 1
        self.last_trials, self.last_trial_prompts, self.trained_trials = [], [], []
        stats: dict[str, float] = {key: _nan() for key in STAT_KEYS}
        stats.update({"objective/kl_coef": self.kl_ctl.value, "lr": self.scheduler.get_last_lr()[0],
                      "nonfinite_rewards": 0.0, "skipped": 0.0, "ppo/epochs": 0.0})

        rollout = self.rollout(prompts, stats) if prompts else None  # 1-2
        if prompts and rollout is None and cfg.trains_on_trials:
            stats["skipped"] = 1.0  # no finite score (on some process): no update this step
            self._finish_step(stats, start)
            return stats
        ppo_batch = rollout if cfg.uses_trials else None
        self.trained_trials = self.last_trials if rollout is not None and cfg.trains_on_trials else []
        # the step's demonstrations, all of them on every process: _optimize gives each mini-batch its share
        demo = self._demo_batch(self._draw_demos()) if cfg.demos_distilled else None
        if ppo_batch is not None or demo is not None:  # 3
            stats.update(self._optimize(ppo_batch, demo))
        if rollout is not None and cfg.lm_on_trials:  # 4
            stats["loss/lm_rollout"] = self._lm_update(rollout.input_ids, rollout.attention_mask)
        if cfg.lm_steps:
            stats["loss/lm"] = _mean_or_nan([self._lm_update(*self._lm_batch()) for _ in range(cfg.lm_steps)])
        if ppo_batch is not None:  # 5
            self.kl_ctl.update(stats["objective/kl"], ppo_batch.n_trials)
        self._finish_step(stats, start)
        return stats

    def rollout(self, prompts: list[list[int]], stats: dict[str, float]) -> Optional[Rollout]:
        """Steps 1-2 of `step`, with their stats; None when some process has no finite score. Score
        statistics, the non-finite count and the trials' KL are over all processes."""
        cfg = self.config
        accelerator = self.accelerator
        prompts = [list(p) for p in prompts]
        responses = self._sample(prompts)
        raw = self.compute_scores([p + r for p, r in zip(prompts, responses)])
        all_raw = accelerator.gather(raw)
        all_finite, finite = torch.isfinite(all_raw), torch.isfinite(raw)
        n_bad = int((~all_finite).sum())
        stats["nonfinite_rewards"] = float(n_bad)
        stats["tokens/response_length"] = sum(map(len, responses)) / len(responses)
        if all_finite.any():
            stats["env/reward_mean"] = all_raw[all_finite].mean().item()
            stats["env/reward_std"] = all_raw[all_finite].std(unbiased=False).item()
        if cfg.trains_on_trials:
            self._count_nonfinite(n_bad, len(all_raw))
        keep = finite.nonzero().flatten().tolist()
        if int(accelerator.gather(torch.tensor([len(keep)], device=self.device)).min()) == 0:
            return None  # a process left without a finite score skips the step, so all processes must

        if cfg.trial_reward == "teacher":  # the reward model only monitors: the reward is the teacher's, per token
            scores = torch.zeros_like(raw[finite])
        elif cfg.uses_trials:
            scores = self.score_processor(raw[finite], population=all_raw[all_finite])
        else:
            scores = raw[finite]
        stats["env/score_mean"] = scores.mean().item()
        prompts, responses = [prompts[i] for i in keep], [responses[i] for i in keep]
        self.last_trials, self.last_trial_prompts = responses, prompts  # the finite trials: what an update can learn from
        is_demo = torch.zeros(len(keep), dtype=torch.bool)
        if cfg.demos_in_ppo_batch:
            d_prompts, d_responses = self._ppo_demonstrations(prompts)
            prompts, responses = prompts + d_prompts, responses + d_responses
            scores = torch.cat([scores, torch.full((len(d_prompts),), float(cfg.demo_score), device=scores.device)])
            is_demo = torch.cat([is_demo, torch.ones(len(d_prompts), dtype=torch.bool)])
        if cfg.score_offset == "log2_step":  # the paper's scores fall as the student ages
            scores = scores - math.log2(self.global_step)
        rollout = self.make_rollout(prompts, responses, scores, is_demo)

        trial = ~rollout.is_demo
        local = torch.tensor([rollout.kl[trial].sum(1).double().sum().item(), float(trial.sum())],
                             dtype=torch.float64, device=self.device)
        kl_sum, n_trials = accelerator.reduce(local, "sum").tolist()
        rollout.n_trials = int(n_trials)
        stats["objective/kl"] = kl_sum / n_trials
        stats["objective/entropy"] = masked_mean(rollout.entropy, rollout.response_mask & trial[:, None]).item()
        if rollout.teacher_logprobs is not None:
            logratio = rollout.teacher_logprobs - rollout.logprobs
            stats["env/teacher_logratio"] = masked_mean(logratio, rollout.response_mask & trial[:, None]).item()
        stats["val/mean"] = masked_mean(rollout.values, rollout.response_mask).item()
        stats["returns/mean"] = masked_mean(rollout.returns, rollout.response_mask).item()
        stats["advantages/mean"] = masked_mean(rollout.advantages, rollout.response_mask).item()
        stats["val/explained_variance"] = explained_variance(rollout.values, rollout.returns, rollout.response_mask)
        return rollout

    def _count_nonfinite(self, n_bad: int, n: int) -> None:
        self.nonfinite_total += n_bad
        self.scored_total += n
        fraction = self.nonfinite_total / max(self.scored_total, 1)
        if fraction > self.config.max_nonfinite_reward_fraction:
            raise TndError(
                f"{self.nonfinite_total} of {self.scored_total} rewards so far were NaN/inf "
                f"({fraction:.0%} > ppo.max_nonfinite_reward_fraction = {self.config.max_nonfinite_reward_fraction}); "
                "check the reward model (rerun `dvc repro train_reward`) or raise the limit"
            )

    def _finish_step(self, stats: dict, start: float) -> None:
        with warnings.catch_warnings():  # a skipped first step steps the schedule before the optimizer
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
            if self.lm_scheduler is not None:
                self.lm_scheduler.step()
        if self.config.optimize_cuda_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()
        stats["student/updates"] = float(self.student_updates)
        stats["time/step"] = time.perf_counter() - start

    def _optimize(self, rollout: Optional[Rollout], demo: Optional[dict]) -> dict[str, float]:
        """ppo_epochs passes over shuffled mini-batches, each one `minibatch_loss` (PPO loss on its rows of
        the rollout + distill_coef x top-k KL on its slice of the demonstrations); an optimizer step every
        gradient_accumulation_steps mini-batches (`accelerator.accumulate`: DDP synchronises only then).

        `rollout` holds this process's rows, `demo` the step's whole batch of demonstrations: each epoch
        splits the demonstrations into mini-batches the same way on every process, then each process takes
        its share of each, so every mini-batch gets demo_batch_size / num_mini_batches of them whatever the
        number of processes (a split of each process's share would leave some mini-batches without any on
        every process once demo_batch_size / processes < num_mini_batches)."""
        cfg = self.config
        accelerator = self.accelerator
        shuffle = torch.Generator().manual_seed(self._step_seed(stream=1))
        demo_shuffle = torch.Generator().manual_seed(self._step_seed(stream=3, shared=True))
        empty = torch.zeros(0, dtype=torch.long)
        logs: dict[str, list[torch.Tensor]] = {}
        epochs_done = 0
        for _epoch in range(cfg.ppo_epochs):
            n_mb = cfg.num_mini_batches
            ppo_slices = (torch.tensor_split(torch.randperm(len(rollout), generator=shuffle), n_mb)
                          if rollout is not None else [empty] * n_mb)
            demo_slices = ([torch.tensor(shard(accelerator, rows.tolist()), dtype=torch.long) for rows in
                            torch.tensor_split(torch.randperm(demo["input_ids"].shape[0], generator=demo_shuffle), n_mb)]
                           if demo is not None else [empty] * n_mb)
            last_policykl = None
            for index, rows in zip(ppo_slices, demo_slices):
                with accelerator.accumulate(self.policy):
                    loss, parts = self.minibatch_loss(rollout, index.to(self.device), demo, rows.to(self.device))
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        self.student_updates += 1
                        grad_norm = clip_grad_norm(accelerator, self.optimizer, self._clipped, cfg.max_grad_norm)
                        if grad_norm is not None:  # DeepSpeed clips inside its engine and reports none
                            logs.setdefault("ppo/grad_norm", []).append(grad_norm.detach())
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                if parts:
                    parts["loss/total"] = loss.detach()
                    last_policykl = parts.get("policy/policykl", last_policykl)
                for key, value in parts.items():
                    logs.setdefault(key, []).append(value)
            epochs_done += 1
            # As TRL: after each epoch, the k1 policy KL of its last mini-batch, averaged over the processes
            # (every process joins the sum, also one whose share of the rollout left it no PPO mini-batch).
            if self.early_stopping.enabled:
                local = [0.0, 0.0] if last_policykl is None else [float(last_policykl), 1.0]
                kl_sum, n = accelerator.reduce(torch.tensor(local, dtype=torch.float64, device=self.device), "sum").tolist()
                if n and self.early_stopping.should_stop(kl_sum / n):
                    break
        means = torch.stack([torch.stack(values).double().mean() for values in logs.values()]).tolist() if logs else []
        out = dict(zip(logs, means))
        out["ppo/epochs"] = float(epochs_done)
        return out

    def _lm_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This process's share of lm_batch_size sequences of tnd.lm_data: (ids, attention mask, the positions
        whose next token is learned: every real token of a corpus text, a demonstration's continuation)."""
        cfg = self.config
        if cfg.lm_data == "corpus":
            rows = shard(self.accelerator, self._draw(len(self.lm_dataset), cfg.lm_batch_size))
            ids, mask = right_pad([self.lm_dataset[i] for i in rows], self.pad_id)
            return ids.to(self.device), mask.to(self.device), None
        demo = self._demo_batch(shard(self.accelerator, self._draw(len(self.demonstrations), cfg.lm_batch_size)))
        return demo["input_ids"], demo["attention_mask"], demo["target_mask"].bool()

    def lm_loss(self, ids: torch.Tensor, mask: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """Summed next-token cross-entropy of the student at the positions `at` (from tnd.batching.lm_positions)."""
        logits = self.get_student_logits(ids, mask, at)
        targets = ids[:, 1:][at[:, :-1]]
        if isinstance(logits, HeadStates):  # the cross-entropy is -log p at temperature 1
            return logits.token_logprobs_entropy(targets, lambda logp, _entropy, _rows: -logp.sum(),
                                                 backend=self.config.kernel_backend)[0]
        return F.cross_entropy(logits.float(), targets, reduction="sum")

    def _lm_update(self, ids: torch.Tensor, mask: torch.Tensor, at: Optional[torch.Tensor] = None) -> float:
        """One optimizer step (the LM optimizer when there is one) on the mean next-token cross-entropy at
        lm_positions(mask, at); rows in chunks of mini_batch_size, gradients accumulated and synchronised
        with the last chunk's backward. Returns the loss."""
        at = lm_positions(mask, at)
        optimizer = self.lm_optimizer or self.optimizer
        n_tokens = self._tokens_per_process(at.sum()[None])[0].clamp_min(1)  # a mean over every process's tokens
        total = torch.zeros((), device=self.device)
        chunks_ = torch.split(torch.arange(ids.shape[0], device=ids.device), self.config.mini_batch_size)
        for i, rows in enumerate(chunks_):
            last = i == len(chunks_) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.policy):
                loss = self.lm_loss(ids[rows], mask[rows], at[rows]) / n_tokens
                self.accelerator.backward(loss * self.accelerator.gradient_accumulation_steps)  # a whole step
            total += loss.detach()
        clip_grad_norm(self.accelerator, optimizer, self._clipped, self.config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.student_updates += 1
        return total.item()

    # --- training loop ----------------------------------------------------------------------

    def next_prompts(self) -> list[list[int]]:
        """This process's share of batch_size prompts drawn (without replacement within the batch) by the
        seeded generator."""
        n, size = len(self.train_dataset), self.config.batch_size
        if n == 0:
            return []
        index = torch.randperm(n, generator=self.generator)[:size] if size <= n else torch.randint(
            n, (size,), generator=self.generator)
        return shard(self.accelerator, [self.train_dataset[i] for i in index.tolist()])

    def train(
        self, steps: Optional[int] = None, on_step: Optional[Callable[[dict, int], None]] = None
    ) -> list[dict[str, float]]:
        """Run `steps` more steps (default: up to config.steps); on_step(stats, global_step) after each."""
        if steps is None:
            steps = max(self.config.steps - self.global_step, 0)
        history = []
        for _ in range(steps):
            prompts = self.next_prompts() if self.config.trains_on_trials or self.train_dataset else []
            stats = self.step(prompts)
            history.append(stats)
            if on_step is not None:
                on_step(stats, self.global_step)
        return history

    # --- checkpointing ----------------------------------------------------------------------

    def save_checkpoint(self, directory: str | os.PathLike) -> None:
        """Everything a resumed run needs, into `directory`; every process calls it. accelerate's save_state
        writes the policy and its optimizers (sharded under FSDP, each process its shards; otherwise process 0)
        and each process's RNG states, and the trainer's own state (`state_dict`), registered for
        checkpointing in __init__. On several nodes `directory` must be on storage that all of them see."""
        self.accelerator.save_state(str(directory))

    def load_checkpoint(self, directory: str | os.PathLike) -> None:
        """Continue from a save_checkpoint of a trainer built the same way (same params, processes and initial
        student: the KL reference is rebuilt from the student this trainer was given, not loaded)."""
        self.accelerator.load_state(str(directory))

    def state_dict(self) -> dict[str, Any]:
        """The trainer's own state, beside what save_state holds (weights, optimizers, RNGs): the step, the
        learning-rate schedules, the KL controller, the score statistics, the non-finite counts and the prompt
        generator (the data position). The same on every process."""
        return copy.deepcopy({
            "global_step": self.global_step,
            "student_updates": self.student_updates,
            "scheduler": self.scheduler.state_dict(),
            "lm_scheduler": None if self.lm_scheduler is None else self.lm_scheduler.state_dict(),
            "kl_ctl": self.kl_ctl.state_dict(),
            "score_stats": self.score_processor.state_dict(),
            "nonfinite": {"nonfinite_total": self.nonfinite_total, "scored_total": self.scored_total},
            "generator": self.generator.get_state(),
        })

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_step = int(state["global_step"])
        self.student_updates = int(state["student_updates"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.lm_scheduler is not None:
            self.lm_scheduler.load_state_dict(state["lm_scheduler"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.score_processor.load_state_dict(state["score_stats"])
        self.nonfinite_total = int(state["nonfinite"]["nonfinite_total"])
        self.scored_total = int(state["nonfinite"]["scored_total"])
        self.generator.set_state(state["generator"])

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        """The student's full weights on CPU, for saving; every process calls it (FSDP and ZeRO-3 gather the
        shards, and then only process 0's result is complete)."""
        state = self.accelerator.get_state_dict(self.policy)
        prefix = "model."
        return {k[len(prefix):]: v.detach().cpu() for k, v in state.items() if k.startswith(prefix)}
