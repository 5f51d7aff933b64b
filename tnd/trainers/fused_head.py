"""kernels.fused_head: the student's forward stops at its last hidden states and the losses apply the output head
through tnd_kernels.fused_head, a chunk of rows at a time, so no [tokens, vocabulary] logits are made.

`HiddenAt` is the prepared module then (in place of tnd.engine.ForwardAt): it returns `HeadStates`, the hidden
states at the loss positions with the head to apply to them, where ForwardAt returns logits. The head's weight
goes out of the forward as a view, so DDP sees it used by the forward (find_unused_parameters included) and
reduces its gradient, which the loss produces. Rows past the tokenizer get logit -1e4 in every chunk
(vocab_limit), as the unfused path masks them.

A model whose logits are more than head_logits_ref(last hidden state) with the logit scale and soft-cap read
from its config (Cohere's logit_scale, Gemma-2's final_logit_softcapping) is refused with one line, as is a
sharded head (FSDP, DeepSpeed).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Callable, Optional

import torch
from torch import nn

import tnd_kernels as K
from tnd.engine import ForwardAt, forward_at  # forward_at as the engine imports it (its module is moving to tnd/)
from tnd.errors import TndError


def head_transform(model: nn.Module) -> tuple[float, Optional[float]]:
    """(logit scale, final soft-cap) of `model`'s logits, from its config (1.0 and None when it has neither)."""
    config = getattr(model, "config", None)
    scale = getattr(config, "logit_scale", None)
    cap = getattr(config, "final_logit_softcapping", None)
    return (1.0 if scale is None else float(scale)), (None if cap is None else float(cap))


class _Headless:
    """`model` seen by forward_at with an identity output head: where forward_at gives logits it gives the last
    hidden states, in both its packed and its padded form (the padded one runs the body only)."""

    def __init__(self, model: nn.Module) -> None:
        self.base_model = model.base_model
        if self.base_model is model or model.get_output_embeddings() is None:
            raise TndError(f"kernels.fused_head: {type(model).__name__} has no separate body and output head; "
                           "set kernels.fused_head: false")

    def get_output_embeddings(self) -> nn.Module:
        return nn.Identity()

    def __call__(self, input_ids, attention_mask, position_ids, use_cache, output_hidden_states=False):
        states = self.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=use_cache).last_hidden_state
        return SimpleNamespace(logits=states, hidden_states=(states,))


@dataclass
class HeadStates:
    """The last hidden states [M, H] at the loss positions and the output head that makes their logits."""

    states: torch.Tensor
    weight: torch.Tensor  # [V, H], a view of the head's parameter
    bias: Optional[torch.Tensor]
    logit_scale: float
    softcap: Optional[float]
    n_ids: int  # the tokenizer's ids: the rows from here on are masked
    autocast: Optional[torch.dtype]  # the forward's autocast dtype: the head runs in it, as the unfused head does

    def __len__(self) -> int:
        return self.states.shape[0]

    def __getitem__(self, rows) -> "HeadStates":
        return replace(self, states=self.states[rows])

    def sum(self) -> torch.Tensor:
        """A sum through the states and the head (times 0 it is the zero loss that still reaches every parameter)."""
        total = self.states.sum() + self.weight.sum()
        return total if self.bias is None else total + self.bias.sum()

    def _head(self) -> dict:
        return {"bias": self.bias, "logit_scale": self.logit_scale, "softcap": self.softcap, "vocab_limit": self.n_ids}

    def _autocast(self):
        device = self.states.device.type
        return torch.autocast(device, dtype=self.autocast) if self.autocast else contextlib.nullcontext()

    def token_logprobs_entropy(
        self, tokens: torch.Tensor, loss_fn: Optional[Callable] = None, temperature: float = 1.0, backend: str = "auto",
    ) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
        with self._autocast():
            return K.fused_head_token_logprobs_entropy(self.states, self.weight, tokens, loss_fn, temperature,
                                                       backend=backend, **self._head())

    def topk_distill_loss(self, *teacher, **options) -> torch.Tensor:
        with self._autocast():
            return K.fused_head_topk_distill_loss(self.states, self.weight, *teacher, **options, **self._head())

    def distill_loss(self, teacher_logits: torch.Tensor, **options) -> torch.Tensor:
        with self._autocast():
            return K.fused_head_distill_loss(self.states, self.weight, teacher_logits, **options, **self._head())


class HiddenAt(ForwardAt):
    """ForwardAt that returns HeadStates in place of logits (the value head reads the same states)."""

    def __init__(self, model: nn.Module, value_head: Optional[nn.Module], n_ids: int) -> None:
        super().__init__(model, value_head)
        self.n_ids = n_ids
        self.logit_scale, self.softcap = head_transform(model)
        check_head(model, self.logit_scale, self.softcap)

    def forward(self, input_ids, attention_mask, at, packed: bool, values: bool = False):
        states, _ = forward_at(_Headless(self.model), input_ids, attention_mask, at, packed)
        head = self.model.get_output_embeddings()
        bias = getattr(head, "bias", None)
        device = states.device.type
        out = HeadStates(
            states=states, weight=head.weight[:], bias=None if bias is None else bias[:],
            logit_scale=self.logit_scale, softcap=self.softcap, n_ids=min(self.n_ids, head.weight.shape[0]),
            autocast=torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None,
        )
        return out, (self.value_head(states).float() if values else None)


@torch.no_grad()
def check_head(model: nn.Module, logit_scale: float, softcap: Optional[float]) -> None:
    """Refuse a model whose logits are not the head applied to its last hidden state with this scale and soft-cap
    (a head that does more would make the fused losses those of another distribution, silently)."""
    device = next(model.parameters()).device
    ids = (torch.arange(1, 7, device=device).view(1, 6) * 7919) % model.get_input_embeddings().num_embeddings
    mask = torch.ones_like(ids)
    at = mask.bool()
    logits, _ = forward_at(model, ids, mask, at, packed=False)
    states, _ = forward_at(_Headless(model), ids, mask, at, packed=False)
    head = model.get_output_embeddings()
    fused = K.head_logits_ref(states, head.weight, getattr(head, "bias", None), logit_scale, softcap)
    scale = logits.float().abs().max().clamp_min(1e-6)
    if not bool((fused.float() - logits.float()).abs().max() / scale < 1e-3):
        raise TndError(
            f"kernels.fused_head: {type(model).__name__}'s logits are not its output head applied to its last hidden "
            f"state with logit_scale={logit_scale} and softcap={softcap} (its config's); its head does more, which "
            "the fused losses would leave out: set kernels.fused_head: false"
        )
