"""Exact torch implementations of the three ops: the specification the Triton kernels match.

Everything here is plain differentiable torch (autograd gives the gradients), computed in
float32 (float64 stays float64), and written so that zero-probability terms contribute exactly
0 instead of `0 * inf = NaN`. These functions are what `backend="torch"` runs, except for
`token_logprobs_entropy`, whose torch backend computes these values with a closed-form backward
(token_logprobs.py).

Conventions shared by all ops
-----------------------------
* Rows are positions: logits are `[N, V]`; per-row results are `[N]`.
* `temperature` T softens logits as `softmax(logits / T)`, computed as `logits * (1 / T)` in
  the compute dtype (the same rounding as the kernels, which multiply by a precomputed 1/T;
  with logits of magnitude 1e4 a 1-ulp difference in logits / T would otherwise show).
* Losses are multiplied by `T**2` (the Hinton et al. knowledge-distillation convention that
  keeps gradient magnitudes comparable across temperatures). TRL's GKD
  `generalized_jsd_loss` and Liger-Kernel's `LigerJSD` / `LigerKLDIVLoss` do *not* apply this
  factor: divide by `T**2` to compare with them.
* `mask` (bool `[N]`, True = keep) removes rows completely: a masked row contributes 0 to the
  loss and receives an exactly-zero gradient, whatever its values.
* `reduction`: `"none"` -> per-row `[N]` (masked rows are 0), `"sum"` -> sum of rows,
  `"batchmean"` -> sum / number of unmasked rows (0, not NaN, when every row is masked).
* Results are float32 (float64 for float64 inputs) whatever the input dtype.

Divergences (P = teacher, Q = student, both after temperature)
-------------------------------------------------------------
* `forward_kl`: KL(P || Q) = sum P (log P - log Q)  (mode covering; classic KD).
* `reverse_kl`: KL(Q || P) = sum Q (log Q - log P)  (mode seeking).
* `jsd`: generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024, eq. 1) exactly as
  TRL's `GKDTrainer.generalized_jsd_loss` computes it (trl/experimental/gkd/gkd_trainer.py):
  M = beta P + (1 - beta) Q,  JSD_beta = beta KL(P || M) + (1 - beta) KL(Q || M).
  TRL special-cases the endpoints: `beta == 0` returns KL(P || Q) (forward KL) and
  `beta == 1` returns KL(Q || P) (reverse KL); Liger-Kernel's JSD kernel does the same. We
  follow them. Note that this makes the loss *discontinuous* in beta at both ends: the formula
  itself tends to 0 as beta -> 0 or 1 (it behaves like beta * KL(P || Q) near 0 and
  (1 - beta) * KL(Q || P) near 1), while the endpoints return the unscaled KLs.
"""

from __future__ import annotations

import math

import torch

LOSSES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("batchmean", "sum", "none")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _plogp_ratio(log_w: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Elementwise exp(log_w) * (log_a - log_b), exactly 0 where exp(log_w) == 0 (no NaN, also in backward)."""
    w = log_w.exp()
    keep = w > 0
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    a = torch.where(keep, log_a, zero)
    b = torch.where(keep, log_b, zero)
    return torch.where(keep, w * (a - b), zero)


def divergence(log_p: torch.Tensor, log_q: torch.Tensor, loss: str, beta: float) -> torch.Tensor:
    """Per-row divergence over the last dim between teacher log-probs `log_p` and student log-probs `log_q`."""
    if loss == "jsd" and beta == 0.0:
        loss = "forward_kl"
    elif loss == "jsd" and beta == 1.0:
        loss = "reverse_kl"
    if loss == "forward_kl":
        return _plogp_ratio(log_p, log_p, log_q).sum(-1)
    if loss == "reverse_kl":
        return _plogp_ratio(log_q, log_q, log_p).sum(-1)
    # log M = logaddexp(log beta + log P, log(1 - beta) + log Q), computed without leaving log space
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * _plogp_ratio(log_p, log_p, log_m).sum(-1) + (1.0 - beta) * _plogp_ratio(
        log_q, log_q, log_m
    ).sum(-1)


def _reduce(rows: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    n_valid = rows.new_tensor(rows.shape[0]) if mask is None else mask.sum().to(rows.dtype)
    return total / n_valid.clamp_min(1)


def _masked_rows(fn, n: int, mask: torch.Tensor | None, *row_tensors: torch.Tensor) -> torch.Tensor:
    """fn(*row_tensors) on the kept rows only, scattered into an [N] result (masked rows: 0, zero grad)."""
    if mask is None:
        return fn(*row_tensors)
    keep = mask.nonzero().squeeze(1)
    kept = fn(*(t.index_select(0, keep) for t in row_tensors))
    return kept.new_zeros(n).index_copy(0, keep, kept)


def distill_loss_ref(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    loss: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Dense distillation loss between student and teacher logits `[N, V]`; see the module docstring."""
    cdt = _compute_dtype(student_logits.dtype)
    t2 = float(temperature) ** 2

    def rows(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        log_q = torch.log_softmax(s.to(cdt) * (1.0 / temperature), dim=-1)
        log_p = torch.log_softmax(t.detach().to(cdt) * (1.0 / temperature), dim=-1)
        return divergence(log_p, log_q, loss, beta) * t2

    per_row = _masked_rows(rows, student_logits.shape[0], mask, student_logits, teacher_logits)
    return _reduce(per_row, mask, reduction)


def student_bucket_logprobs(
    student_logits: torch.Tensor, indices: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student log-probs of the k teacher indices `[N, k]` and of the tail (everything else) `[N]`.

    The tail log-mass is a log-sum-exp over the non-top-k logits (masked to -inf), not
    log(1 - sum of top-k probs), so it keeps full precision however small the tail is; it is
    exactly -inf when the k indices cover the whole vocabulary.
    """
    cdt = _compute_dtype(student_logits.dtype)
    log_q = torch.log_softmax(student_logits.to(cdt) * (1.0 / temperature), dim=-1)
    idx = indices.long()
    log_q_top = log_q.gather(1, idx)
    log_q_rest = log_q.scatter(1, idx, float("-inf"))
    m = log_q_rest.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    z = (log_q_rest - m).exp().sum(-1)
    has_tail = z > 0
    z_safe = torch.where(has_tail, z, torch.ones_like(z))
    log_q_tail = torch.where(has_tail, z_safe.log() + m.squeeze(1), torch.full_like(z, float("-inf")))
    return log_q_top, log_q_tail


def topk_distill_loss_ref(
    student_logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    teacher_tail_logmass: torch.Tensor,
    loss: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Distillation against a cached top-k teacher, over the k+1 buckets (top-k indices + tail).

    The teacher log-probs (`[N, k]` and the tail log-mass `[N]`) are used as given (they are
    already at the cache's temperature); only the student is softened by `temperature`. The
    divergence is the exact one between the two coarsened (k+1)-bucket distributions; with
    k = V and tail = -inf it equals `distill_loss_ref` on full teacher logits.
    """
    cdt = _compute_dtype(student_logits.dtype)
    t2 = float(temperature) ** 2

    def rows(s, tlp, idx, tail):
        log_q_top, log_q_tail = student_bucket_logprobs(s, idx, temperature)
        log_q = torch.cat([log_q_top, log_q_tail[:, None]], dim=1)
        log_p = torch.cat([tlp.detach().to(cdt), tail.detach().to(cdt)[:, None]], dim=1)
        return divergence(log_p, log_q, loss, beta) * t2

    per_row = _masked_rows(
        rows,
        student_logits.shape[0],
        mask,
        student_logits,
        teacher_topk_logprobs,
        teacher_topk_indices,
        teacher_tail_logmass,
    )
    return _reduce(per_row, mask, reduction)


def token_logprobs_entropy_ref(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log softmax(logits / T)[token], entropy of softmax(logits / T)), both `[N]`, differentiable."""
    cdt = _compute_dtype(logits.dtype)
    log_q = torch.log_softmax(logits.to(cdt) * (1.0 / temperature), dim=-1)
    logp = log_q.gather(1, tokens.long()[:, None]).squeeze(1)
    entropy = -_plogp_ratio(log_q, log_q, torch.zeros_like(log_q)).sum(-1)
    return logp, entropy


def head_logits_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """The output head the fused-head ops apply a chunk at a time: logits [N, V] = s(c (hidden @ weight.T + bias)),
    c the logit scale (Cohere's logit_scale) and s(z) = k tanh(z / k) the final soft-cap (Gemma-2's
    final_logit_softcapping k; none when None), in the order and dtype the models apply them."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits
