"""The output head and a loss in one pass over N, so that no more than [chunk, V] logits exist at once.

Ops that take the last hidden states h [N, H] and the head W [V, H] (optional bias b [V], the model's
logit scale and final soft-capping) instead of logits [N, V]:

* `fused_head_token_logprobs_entropy`: per-token log-prob and entropy at given tokens, and a loss the
  caller defines on them per chunk (PPO's clipped objective, an entropy bonus, cross-entropy);
* `fused_head_topk_distill_loss`: the top-k + tail distillation loss against cached teacher rows;
* `fused_head_distill_loss`: the dense KL / JSD against teacher logits;
* `fused_head_loss`: the general form the three are built on (any per-chunk loss of the logits), and
  `split_rows`, which gives row ranges their own losses in one pass (PPO tokens and demonstrations).

Structure (Liger-Kernel's fused linear cross-entropy and fused linear JSD): forward walks N in chunks of
rows; per chunk it computes the chunk's logits with one matmul, the chunk's loss and its gradient w.r.t.
those logits (today's ops, on the Triton or the torch backend), and then, while the chunk's gradient is
still there, its contribution to the gradients of h, W and b (two more matmuls). Those gradients are
stored; backward only scales them by the upstream gradient. So the matmul work is that of the unfused
path (one forward, two backward), nothing [N, V] is kept, and the peak is [chunk, V] logits, their
gradient and the per-chunk loss's own buffers, plus the [V, H] fp32 gradient of W the unfused backward
makes too. Matmuls stay on BLAS / cuBLAS. One backward per forward (the gradients are scaled in place).

Math. Per row i, a_i = W h_i + b (the head), z_i = c a_i (c the logit scale), s_i = k tanh(z_i / k) when a
soft-cap k is set (else s_i = z_i), and the loss L = sum_chunks L_chunk(s_chunk) (each op's loss already
carries its temperature, 1/T and T**2 factors, see distill.py / topk_distill.py / token_logprobs.py). With
g_i = dL / da_i = c (1 - tanh(z_i / k)**2) * dL / ds_i  (the soft-cap's derivative; 1 without it):

  dL / dh_i = g_i^T W              ([chunk, V] @ [V, H] per chunk: rows of grad_h, written once)
  dL / dW   = sum_i g_i h_i^T      ([V, chunk] @ [chunk, H] per chunk, accumulated in fp32)
  dL / db   = sum_i g_i

dL / ds for a chunk is what the per-chunk op's autograd gives (its Triton kernels compute it in forward as
Liger's do; the torch backend differentiates the reference), and the scale and soft-cap are applied in
autograd around it, in the order and dtype the unfused model applies them (Cohere multiplies lm_head's
output by logit_scale; Gemma-2 caps with final_logit_softcapping), so the fused loss is the unfused
loss of head_logits_ref(h, W, b, c, k), the same rows. A loss that is a mean over rows is a sum per
chunk divided by the kept rows of all chunks (batchmean), so chunks never change its value.

Under autocast the chunk matmuls run in the autocast dtype, as the model's head would (W cast once per
call), with the gradient of W accumulated in fp32 over chunks (the unfused path rounds one bf16 matmul
over all N rows instead, so bf16 results agree to bf16 rounding, not bit for bit).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from . import _common as C
from .distill import check_distill_args, distill_loss
from .token_logprobs import check_token_args, token_logprobs_entropy
from .topk_distill import check_topk_args, topk_distill_loss

# chunk_loss(logits [n, V], rows: slice of the N rows) -> (loss of the chunk or None, per-row outputs [n])
ChunkLoss = Callable[[torch.Tensor, slice], "tuple[Optional[torch.Tensor], tuple[torch.Tensor, ...]]"]


# A chunk runs a dozen ops and an autograd call (about a millisecond on CPU whatever its size): at least this
# many logits per chunk keep that small against the chunk's own work when V is small.
MIN_CHUNK_ELEMENTS = 2**20


def default_chunk_size(n: int, v: int, h: int) -> int:
    """Liger's choice, chunks of about N * H / V rows (a power of two) so that a chunk's logits are about the
    size of the hidden states, but at least MIN_CHUNK_ELEMENTS / V rows; at most N."""
    n = max(n, 1)
    liger = C.next_pow2(math.ceil(n / max(1, math.ceil(v / max(h, 1)))))
    return min(max(liger, C.next_pow2(math.ceil(MIN_CHUNK_ELEMENTS / v))), n)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


class FusedHeadFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, chunk_loss, logit_scale, softcap, vocab_limit, chunk_size, dtype, need_grad,
                n_outputs):
        n = hidden.shape[0]
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.detach().to(dtype)
            b = None if bias is None else bias.detach().to(dtype)
            grad_h = torch.zeros_like(hidden) if need_grad and ctx.needs_input_grad[0] else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
                if need_grad and ctx.needs_input_grad[1] else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) \
                if need_grad and bias is not None and ctx.needs_input_grad[2] else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            outputs: list[list[torch.Tensor]] = [[] for _ in range(n_outputs)]
            padded = None if vocab_limit is None or vocab_limit == weight.shape[0] else (
                torch.arange(weight.shape[0], device=weight.device) >= vocab_limit)
            for start in range(0, n, chunk_size):
                rows = slice(start, min(start + chunk_size, n))
                h = hidden[rows].detach().to(dtype)
                a = torch.addmm(b, h, w.t()) if b is not None else h @ w.t()
                with torch.set_grad_enabled(need_grad):
                    a.requires_grad_(need_grad)
                    s = a * logit_scale if logit_scale != 1.0 else a
                    if softcap is not None:
                        s = torch.tanh(s / softcap) * softcap
                    if padded is not None:
                        s = s.masked_fill(padded, -1e4)
                    loss, outs = chunk_loss(s, rows)
                for acc, out in zip(outputs, outs):
                    acc.append(out.detach())
                if loss is None:
                    continue
                total += loss.detach().float()
                if not need_grad or not loss.requires_grad:
                    continue
                (g,) = torch.autograd.grad(loss, a)
                del s, a  # the chunk's logits and the per-chunk loss's buffers go before the matmuls
                if grad_h is not None:
                    grad_h[rows] = g @ w
                if grad_w is not None:
                    if g.dtype == torch.float32:
                        grad_w.addmm_(g.t(), h)
                    else:
                        grad_w += (g.t() @ h).float()
                if grad_b is not None:
                    grad_b += g.sum(0, dtype=torch.float32)
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        cat = [torch.cat(acc) if acc else torch.zeros(0, dtype=torch.float32, device=hidden.device) for acc in outputs]
        ctx.mark_non_differentiable(*cat)
        return (total, *cat)

    @staticmethod
    def backward(ctx, grad_loss, *_grad_outputs):
        C.OnceBackward.claim(ctx)
        grads = []
        for grad, dtype in zip(ctx.grads, ctx.dtypes):
            grads.append(None if grad is None else grad.mul_(grad_loss.to(grad.dtype)).to(dtype))
        ctx.grads = None
        return (*grads, None, None, None, None, None, None, None, None)


def check_head_args(hidden, weight, bias, logit_scale, softcap, chunk_size, vocab_limit=None) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2 or not hidden.is_floating_point():
        raise ValueError(f"hidden must be a float tensor [N, H] (flatten batch and sequence first), got shape "
                         f"{tuple(getattr(hidden, 'shape', ()))}")
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise ValueError(f"weight must be the output head's float weight [V, H], got {type(weight).__name__}")
    if hasattr(weight, "placements") and hasattr(weight, "full_tensor"):
        raise ValueError("weight is a DTensor (sharded, e.g. by FSDP2); pass weight.full_tensor() or use the "
                         "unfused path (logits, then the loss ops)")
    if weight.dim() != 2 or weight.shape[0] < 1 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [V >= 1, H={hidden.shape[1]}] (a sharded or partitioned head, e.g. under "
                         f"DeepSpeed ZeRO-3, must be gathered first), got shape {tuple(weight.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(getattr(bias, 'shape', ()))}")
    if not (math.isfinite(float(logit_scale)) and float(logit_scale) != 0.0):
        raise ValueError(f"logit_scale must be finite and nonzero, got {logit_scale}")
    if softcap is not None and not float(softcap) > 0.0:
        raise ValueError(f"softcap must be > 0 or None (no soft-capping), got {softcap}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None (about N*H/V rows), got {chunk_size!r}")
    if vocab_limit is not None and (isinstance(vocab_limit, bool) or not isinstance(vocab_limit, int)
                                    or not 1 <= vocab_limit <= weight.shape[0]):
        raise ValueError(f"vocab_limit must be an int in [1, V={weight.shape[0]}] or None (all rows), got {vocab_limit!r}")
    C.check_same_device(hidden, weight=weight, bias=bias)


def fused_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    chunk_loss: ChunkLoss,
    n_outputs: int = 0,
    bias: Optional[torch.Tensor] = None,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    vocab_limit: Optional[int] = None,
    chunk_size: Optional[int] = None,
) -> tuple[torch.Tensor, ...]:
    """(loss, *outputs): loss = the sum over chunks of `chunk_loss(logits, rows)[0]`, where `logits` [n, V] are
    head_logits_ref(hidden[rows], weight, bias, logit_scale, softcap), differentiable w.r.t. hidden, weight
    and bias, with the columns from `vocab_limit` on (a vocabulary padded past the tokenizer) set to -1e4 as
    the trainer masks them (exp of it is 0 in every float dtype; those rows of W get no gradient); outputs: the n_outputs per-row tensors `chunk_loss` returns second, concatenated over chunks
    (no gradient). `chunk_loss` may return None for the loss (outputs only). float32 loss (0 when N = 0)."""
    check_head_args(hidden, weight, bias, logit_scale, softcap, chunk_size, vocab_limit)
    n, h = hidden.shape
    chunk = chunk_size or default_chunk_size(n, weight.shape[0], h)
    params = [t for t in (hidden, weight, bias) if t is not None]
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in params)
    loss, *outputs = FusedHeadFunction.apply(
        hidden, weight, bias, chunk_loss, float(logit_scale), None if softcap is None else float(softcap), vocab_limit,
        chunk,
        _compute_dtype(hidden, weight), need_grad, n_outputs,
    )
    return (loss, *(out.detach() for out in outputs))


def split_rows(*parts: tuple[int, int, Callable[[torch.Tensor, slice], Optional[torch.Tensor]]]) -> ChunkLoss:
    """A chunk_loss for `fused_head_loss` made of row ranges with losses of their own, so that rows with
    different losses (a mini-batch's PPO tokens and its demonstrations) share one pass over the head (one
    [V, H] gradient buffer, one cast of W). parts: (start, stop, fn); fn(logits of its rows in the chunk, those
    rows as a slice from `start`) -> the loss of those rows, or None. A chunk may straddle parts."""

    def chunk_loss(logits, rows):
        total = None
        for start, stop, fn in parts:
            lo, hi = max(rows.start, start), min(rows.stop, stop)
            if lo >= hi:
                continue
            part = fn(logits[lo - rows.start : hi - rows.start], slice(lo - start, hi - start))
            if part is not None:
                total = part if total is None else total + part
        return total, ()

    return chunk_loss


def _check_rows(name: str, t: Optional[torch.Tensor], n: int) -> None:
    if t is not None and (not isinstance(t, torch.Tensor) or t.dim() < 1 or t.shape[0] != n):
        raise ValueError(f"{name} must have N={n} rows (one per hidden state), got shape {tuple(getattr(t, 'shape', ()))}")


def _check_like(check, hidden, weight, *args) -> None:
    """The unfused op's own checks, on a 1-row stand-in for the logits (they exist only a chunk at a time)."""
    if hidden.shape[0] > 0:
        check(weight.new_zeros(1, 1).expand(hidden.shape[0], weight.shape[0]), *args)


def fused_head_token_logprobs_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor, slice], torch.Tensor]] = None,
    temperature: float = 1.0,
    bias: Optional[torch.Tensor] = None,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    vocab_limit: Optional[int] = None,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(loss, logp [N], entropy [N]) of `tokens` under softmax(logits / T), logits the head's at `hidden`.

    logp and entropy are `token_logprobs_entropy`'s, without a gradient. The gradient flows through
    loss = sum over chunks of loss_fn(logp[rows], entropy[rows], rows), which must be a sum of per-row
    terms (e.g. PPO's clipped objective over M tokens: its terms for these rows, divided by M);
    loss_fn = None: no loss (None), e.g. the rollout's no-grad scoring. backend: the per-chunk op's."""
    check_head_args(hidden, weight, bias, logit_scale, softcap, chunk_size, vocab_limit)
    _check_rows("tokens", tokens, hidden.shape[0])
    backend = C.resolve_backend(backend, hidden)
    _check_like(lambda x: check_token_args(x, tokens, temperature, backend), hidden, weight)
    temperature = float(temperature)

    def chunk_loss(logits, rows):
        logp, ent = token_logprobs_entropy(logits, tokens[rows], temperature, backend=backend)
        return (None if loss_fn is None else loss_fn(logp, ent, rows)), (logp, ent)

    loss, logp, ent = fused_head_loss(hidden, weight, chunk_loss, 2, bias, logit_scale, softcap, vocab_limit, chunk_size)
    return (None if loss_fn is None else loss), logp, ent


def _summed_rows(hidden, weight, mask, reduction, bias, logit_scale, softcap, chunk_size, vocab_limit,
                 rows_loss) -> torch.Tensor:
    """rows_loss(logits, rows, mask[rows]) (a sum over the chunk's rows) summed over chunks, then divided by the
    kept rows of all chunks for batchmean (so that chunking leaves the mean as it is)."""
    if reduction == "none":
        raise ValueError("the fused head ops reduce over rows: reduction must be 'batchmean' or 'sum', not 'none'")
    (total,) = fused_head_loss(
        hidden, weight, lambda logits, rows: (rows_loss(logits, rows, None if mask is None else mask[rows]), ()), 0,
        bias, logit_scale, softcap, vocab_limit, chunk_size,
    )
    if reduction == "sum":
        return total
    kept = torch.full((), float(hidden.shape[0]), device=hidden.device) if mask is None else mask.sum().float()
    return total / kept.clamp_min(1.0)


def fused_head_topk_distill_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    teacher_tail_logmass: torch.Tensor,
    loss: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Optional[torch.Tensor] = None,
    reduction: str = "batchmean",
    bias: Optional[torch.Tensor] = None,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    vocab_limit: Optional[int] = None,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """`topk_distill_loss` of the head's logits at `hidden` (same arguments; reduction 'batchmean' or 'sum')."""
    check_head_args(hidden, weight, bias, logit_scale, softcap, chunk_size, vocab_limit)
    n = hidden.shape[0]
    for name, t in (("teacher_topk_logprobs", teacher_topk_logprobs), ("teacher_topk_indices", teacher_topk_indices),
                    ("teacher_tail_logmass", teacher_tail_logmass), ("mask", mask)):
        _check_rows(name, t, n)
    backend = C.resolve_backend(backend, hidden)
    _check_like(lambda x: check_topk_args(x, teacher_topk_logprobs, teacher_topk_indices, teacher_tail_logmass, loss,
                                          beta, temperature, mask, reduction, backend), hidden, weight)
    return _summed_rows(
        hidden, weight, mask, reduction, bias, logit_scale, softcap, chunk_size, vocab_limit,
        lambda logits, rows, kept: topk_distill_loss(
            logits, teacher_topk_logprobs[rows], teacher_topk_indices[rows], teacher_tail_logmass[rows], loss, beta,
            temperature, kept, "sum", backend),
    )


def fused_head_distill_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_logits: torch.Tensor,
    loss: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Optional[torch.Tensor] = None,
    reduction: str = "batchmean",
    bias: Optional[torch.Tensor] = None,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    vocab_limit: Optional[int] = None,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """`distill_loss` of the head's logits at `hidden` against `teacher_logits` [N, V] (same arguments;
    reduction 'batchmean' or 'sum')."""
    check_head_args(hidden, weight, bias, logit_scale, softcap, chunk_size, vocab_limit)
    n = hidden.shape[0]
    _check_rows("teacher_logits", teacher_logits, n)
    _check_rows("mask", mask, n)
    backend = C.resolve_backend(backend, hidden)
    _check_like(lambda x: check_distill_args(x.to(teacher_logits.dtype), teacher_logits, loss, beta, temperature, mask,
                                             reduction, backend), hidden, weight)
    return _summed_rows(
        hidden, weight, mask, reduction, bias, logit_scale, softcap, chunk_size, vocab_limit,
        lambda logits, rows, kept: distill_loss(logits, teacher_logits[rows], loss, beta, temperature, kept, "sum", backend),
    )
