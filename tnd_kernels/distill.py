"""Fused dense distillation loss (forward KL / reverse KL / generalised JSD) with its gradient.

One Triton program per row loops over the vocabulary in blocks with an online log-sum-exp
(fp32 accumulation, any of fp32/bf16/fp16 in). The gradient w.r.t. the student logits is
computed in the forward pass and written in the student's dtype (Liger-Kernel style); backward
only scales it by grad_output, in place. Passes over the row (each reads student + teacher):

* forward_kl / reverse_kl: 1 pass for the loss (the KL is accumulated online, rescaled as the
  running maxima move), + 1 pass writing the gradient  -> fwd+bwd reads each input twice.
* jsd (0 < beta < 1): log M needs both normalisers, so 1 pass for them, 1 for the loss and
  KL(Q || M), + 1 writing the gradient                 -> fwd+bwd reads each input 3 times.

Gradients, with s = student / T, q = softmax(s), p = softmax(teacher / T), L the row divergence
(the T**2 loss factor and the 1/T of d s / d logits give a net factor T):
  forward_kl: dL/ds = q - p
  reverse_kl: dL/ds = q * (log q - log p - L)
  jsd:        dL/ds = (1 - beta) * q * (log q - log m - KL(q || m)),  m = beta p + (1 - beta) q
"""

from __future__ import annotations

import math

import torch

from . import _common as C
from ._common import exp, log_mixture, tl, triton, zero_row
from .reference import distill_loss_ref

@triton.jit
def _distill_kernel(
    s_ptr,
    s_stride,
    t_ptr,
    t_stride,
    g_ptr,
    g_stride,
    loss_ptr,
    mask_ptr,
    nvalid_ptr,
    n_cols,
    inv_t,
    t_sq,
    temp,
    beta,
    log_beta,
    log_1m_beta,
    LOSS: tl.constexpr,  # 0 forward_kl, 1 reverse_kl, 2 jsd
    HAS_MASK: tl.constexpr,
    MEAN: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    g_row = g_ptr + row * g_stride

    if HAS_MASK:
        if tl.load(mask_ptr + row) == 0:  # masked row: loss 0, gradient exactly 0
            tl.store(loss_ptr + row, 0.0)
            if WRITE_GRAD:
                zero_row(g_row, n_cols, BLOCK)
            return

    # ---- pass 1: online normalisers of both rows; for the KLs also the loss itself ----------
    m_s = -3.0e38  # finite "minus infinity" for running maxima: keeps max - max free of inf - inf
    z_s = 0.0
    m_t = -3.0e38
    z_t = 0.0
    acc = 0.0  # sum_w e_w * ((w - m_w) - (o - m_o)), w = weighting side (teacher for fwd, student for rev)
    for start in range(0, n_cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < n_cols
        s = tl.load(s_row + offs, mask=inb, other=float("-inf")).to(tl.float32) * inv_t
        t = tl.load(t_row + offs, mask=inb, other=float("-inf")).to(tl.float32) * inv_t
        nm_s = tl.maximum(m_s, tl.max(s, axis=0))
        nm_t = tl.maximum(m_t, tl.max(t, axis=0))
        a_s = exp(m_s - nm_s)
        a_t = exp(m_t - nm_t)
        e_s = exp(s - nm_s)
        e_t = exp(t - nm_t)
        if LOSS == 0:
            d = (t - nm_t) - (s - nm_s)
            blk = tl.sum(tl.where(e_t > 0, e_t * d, 0.0), axis=0)
            shift = (m_t - nm_t) - (m_s - nm_s)
            acc = tl.where(acc == float("inf"), acc, a_t * (acc + shift * z_t)) + blk
        elif LOSS == 1:
            d = (s - nm_s) - (t - nm_t)
            blk = tl.sum(tl.where(e_s > 0, e_s * d, 0.0), axis=0)
            shift = (m_s - nm_s) - (m_t - nm_t)
            acc = tl.where(acc == float("inf"), acc, a_s * (acc + shift * z_s)) + blk
        z_s = z_s * a_s + tl.sum(e_s, axis=0)
        z_t = z_t * a_t + tl.sum(e_t, axis=0)
        m_s = nm_s
        m_t = nm_t
    log_zs = tl.log(z_s)
    log_zt = tl.log(z_t)
    # log-probs are formed as (x - m) - log z, never as x - (m + log z): with |x| ~ 1e4 a rounded
    # log-sum-exp costs ~1e-4 relative error in every probability (log_softmax avoids it too)

    kl_qm = 0.0
    if LOSS == 0:
        div = acc / z_t - log_zt + log_zs
    elif LOSS == 1:
        div = acc / z_s - log_zs + log_zt
    else:
        # ---- pass 2 (jsd): loss and KL(q || m) need log m = logaddexp(log beta p, log (1-beta) q)
        kl_pm = 0.0
        for start in range(0, n_cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inb = offs < n_cols
            lq = (tl.load(s_row + offs, mask=inb, other=float("-inf")).to(tl.float32) * inv_t - m_s) - log_zs
            lp = (tl.load(t_row + offs, mask=inb, other=float("-inf")).to(tl.float32) * inv_t - m_t) - log_zt
            lm = log_mixture(lp, lq, log_beta, log_1m_beta)
            p = exp(lp)
            q = exp(lq)
            kl_pm += tl.sum(tl.where(p > 0, p * (lp - lm), 0.0), axis=0)
            kl_qm += tl.sum(tl.where(q > 0, q * (lq - lm), 0.0), axis=0)
        div = beta * kl_pm + (1.0 - beta) * kl_qm
    tl.store(loss_ptr + row, div * t_sq)

    # ---- last pass: d loss / d logits, in the student dtype ----------------------------------
    if WRITE_GRAD:
        scale = temp
        if MEAN:
            scale = temp / tl.maximum(tl.load(nvalid_ptr).to(tl.float32), 1.0)
        for start in range(0, n_cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inb = offs < n_cols
            lq = (tl.load(s_row + offs, mask=inb, other=float("-inf")).to(tl.float32) * inv_t - m_s) - log_zs
            lp = (tl.load(t_row + offs, mask=inb, other=float("-inf")).to(tl.float32) * inv_t - m_t) - log_zt
            q = exp(lq)
            if LOSS == 0:
                g = q - exp(lp)
            elif LOSS == 1:
                g = tl.where(q > 0, q * (lq - lp - div), 0.0)
            else:
                lm = log_mixture(lp, lq, log_beta, log_1m_beta)
                g = (1.0 - beta) * tl.where(q > 0, q * (lq - lm - kl_qm), 0.0)
            tl.store(g_row + offs, (g * scale).to(g_ptr.dtype.element_ty), mask=inb)


def loss_id(loss: str, beta: float) -> int:
    """Kernel mode; jsd at beta 0 / 1 is forward / reverse KL (TRL's and Liger's endpoint convention)."""
    if loss == "jsd" and beta == 0.0:
        return 0
    if loss == "jsd" and beta == 1.0:
        return 1
    return C.LOSS_IDS[loss]


def jsd_logs(beta: float) -> tuple[float, float]:
    return (math.log(beta) if beta > 0 else 0.0), (math.log1p(-beta) if beta < 1 else 0.0)


def finish(rows: torch.Tensor, nvalid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce per-row losses (already masked) without a host sync."""
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total / nvalid.clamp_min(1)


def mask_and_count(mask: torch.Tensor | None, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 view of the mask or a dummy, number of kept rows as a float32 device scalar)."""
    if mask is None:
        return torch.empty(1, dtype=torch.uint8, device=device), torch.full((), float(n), device=device)
    return mask.contiguous().view(torch.uint8), mask.sum().to(torch.float32)


class DistillLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, loss, beta, temperature, mask, reduction, inplace, need_grad):
        n, v = student.shape
        s = C.rows_contiguous(student)
        t = C.rows_contiguous(teacher.detach())
        mask_u8, nvalid = mask_and_count(mask, n, s.device)
        grad = (s if inplace else torch.empty_like(s)) if need_grad else s
        rows = torch.empty(n, dtype=torch.float32, device=s.device)
        log_beta, log_1m_beta = jsd_logs(beta)
        block = C.block_size(v, C.MAX_BLOCK)
        _distill_kernel[(n,)](
            s, s.stride(0), t, t.stride(0), grad, grad.stride(0), rows, mask_u8, nvalid,
            v, 1.0 / temperature, temperature * temperature, temperature, beta, log_beta, log_1m_beta,
            LOSS=loss_id(loss, beta), HAS_MASK=mask is not None, MEAN=reduction == "batchmean",
            WRITE_GRAD=need_grad, BLOCK=block, num_warps=C.num_warps(block),
        )
        if need_grad:
            ctx.save_for_backward(grad)
        ctx.need_grad = need_grad
        return finish(rows, nvalid, reduction)

    @staticmethod
    def backward(ctx, grad_output):
        if not ctx.need_grad:
            return (None,) * 9
        C.OnceBackward.claim(ctx)
        (grad,) = ctx.saved_tensors
        return C.scale_rows_(grad, grad_output), None, None, None, None, None, None, None, None


def check_distill_args(student_logits, teacher_logits, loss, beta, temperature, mask, reduction, backend):
    C.check_options(loss, beta, temperature, reduction)
    C.check_logits("student_logits", student_logits, backend)
    C.check_logits("teacher_logits", teacher_logits, backend)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits shape {tuple(teacher_logits.shape)} != student_logits shape {tuple(student_logits.shape)}"
        )
    C.check_mask(mask, student_logits.shape[0])
    C.check_same_device(student_logits, teacher_logits=teacher_logits, mask=mask)


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    loss: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
    backend: str = "auto",
    inplace: bool = False,
) -> torch.Tensor:
    """Distillation loss between student and teacher logits `[N, V]`, times `temperature**2`.

    loss: "forward_kl" = KL(teacher || student), "reverse_kl" = KL(student || teacher),
    "jsd" = generalised JSD of GKD / TRL `generalized_jsd_loss` / Liger `LigerJSD`:
    beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q, P teacher, Q student;
    beta = 0 / 1 are special-cased to forward / reverse KL as TRL and Liger do (the formula
    itself tends to 0 there). Both distributions are softened by `temperature`; the result is
    multiplied by temperature**2 (Hinton KD convention; TRL GKD and Liger omit that factor).
    mask: bool [N], True = keep; masked rows contribute 0 and get a zero gradient.
    reduction: "batchmean" (sum / number of kept rows, 0 when none), "sum", or "none" ([N]).
    Returns float32. The teacher gets no gradient.

    backend: "auto" (Triton on CUDA tensors, torch otherwise), "triton" or "torch" (the
    reference in `tnd_kernels.reference`). The Triton path computes the gradient during forward,
    so it allocates one [N, V] gradient buffer in the student dtype and nothing else of that
    size; `inplace=True` writes that gradient into `student_logits` itself (Liger-Kernel style):
    the caller's logits are then CLOBBERED and must not be used again (nor be needed by another
    autograd node). A single backward is supported on the Triton path.
    """
    backend = C.resolve_backend(backend, student_logits)
    check_distill_args(student_logits, teacher_logits, loss, beta, temperature, mask, reduction, backend)
    beta, temperature = float(beta), float(temperature)
    if backend == "torch":
        return distill_loss_ref(student_logits, teacher_logits, loss, beta, temperature, mask, reduction)
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    return DistillLossFunction.apply(
        student_logits, teacher_logits, loss, beta, temperature, mask, reduction, inplace, need_grad
    )
