"""Fused Triton kernels for distillation and policy-gradient losses, with exact torch references.

Public ops (each takes `backend="auto" | "triton" | "torch"`; "auto" runs Triton on CUDA
tensors and the torch reference otherwise; "triton" on CPU tensors needs TRITON_INTERPRET=1
before this package is imported):

* `distill_loss(student_logits, teacher_logits, loss=..., beta=..., temperature=..., mask=...,
  reduction=..., backend=..., inplace=...)` - forward KL / reverse KL / generalised JSD.
* `topk_distill_loss(student_logits, teacher_topk_logprobs, teacher_topk_indices,
  teacher_tail_logmass, ...)` - the same against a cached top-k teacher, over k+1 buckets.
* `token_logprobs_entropy(logits, tokens, temperature=..., backend=...)` - per-token
  log-prob and entropy, differentiable in both (its torch backend: the reference's values with
  a closed-form backward).
* `fused_head_token_logprobs_entropy`, `fused_head_topk_distill_loss`, `fused_head_distill_loss`
  and the general `fused_head_loss` (with `split_rows`) - the same from the last hidden states and the output head
  (`head_logits_ref`), a chunk of rows at a time: no [N, V] logits (fused_head.py).

`tnd_kernels.reference` holds the exact torch implementations (the specification). The
package imports without triton; then only the torch backend is available.
"""

from ._common import HAS_TRITON
from .distill import distill_loss
from .fused_head import (
    default_chunk_size,
    fused_head_distill_loss,
    fused_head_loss,
    fused_head_token_logprobs_entropy,
    fused_head_topk_distill_loss,
    split_rows,
)
from .reference import (
    LOSSES,
    REDUCTIONS,
    distill_loss_ref,
    head_logits_ref,
    token_logprobs_entropy_ref,
    topk_distill_loss_ref,
)
from .token_logprobs import token_logprobs_entropy
from .topk_distill import topk_distill_loss

__all__ = [
    "HAS_TRITON",
    "LOSSES",
    "REDUCTIONS",
    "default_chunk_size",
    "distill_loss",
    "distill_loss_ref",
    "fused_head_distill_loss",
    "fused_head_loss",
    "fused_head_token_logprobs_entropy",
    "fused_head_topk_distill_loss",
    "head_logits_ref",
    "split_rows",
    "token_logprobs_entropy",
    "token_logprobs_entropy_ref",
    "topk_distill_loss",
    "topk_distill_loss_ref",
]
