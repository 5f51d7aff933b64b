"""Fused distillation against a cached top-k teacher, over k + 1 buckets (top-k indices + tail).

The teacher cache holds, per position, k log-probs at the teacher's cache temperature, their
vocabulary indices and the log of the remaining (tail) mass. Student and teacher are compared on
the coarsened distribution with k + 1 buckets: each of the k teacher indices, plus one tail
bucket whose student probability is the student's mass outside those k indices. Every loss
(forward_kl, reverse_kl, jsd) is then the exact divergence between the two (k+1)-bucket
distributions; with k = V and tail = -inf it equals the dense `distill_loss`.

One Triton program per row: a pass over V for the student's online log-sum-exp, a loop over
the k indices (gathers) for the bucket log-probs and the loss, then, when a gradient is needed,
a pass over V writing the tail-bucket gradient q_j * c_tail for every j and a scatter that
overwrites the k top-k positions with their own gradient. With `inplace=True` the student
buffer is overwritten, so the k student log-probs are kept in a small [N, k] fp32 scratch
between the gather and the scatter. Fwd+bwd reads the student logits twice and writes the
gradient once (plus O(N k) traffic for the teacher and the gathers, and a third read of the
rows whose tail is below EXACT_TAIL_BELOW).

Student tail mass: Z_tail = Z_all - Z_topk, both sums taken relative to the same running max
(the clamp at 0 guards rounding), and exactly 0 when k = V. That subtraction has an absolute
error of about 1e-7 of the total mass, fine for most rows; when it leaves less than
EXACT_TAIL_BELOW (1e-3) of the mass, the row recounts the tail exactly: one more pass over the
row sums exp over the tokens not among the k indices, membership found by binary search in a
sorted [N, k] int32 copy of the indices. So the tail log-mass keeps ~fp32 relative precision
however small it is (no log(1 - sum) cancellation), at the cost of one extra read of the row
for those rows only. The reference (`topk_distill_loss_ref`) uses a masked log-sum-exp.

Indices must be distinct within a row and lie in [0, V) (not checked on the device; an index
outside it is treated as a -inf student logit instead of reading out of bounds).

Gradients, g_B = d L / d log Q_B for bucket B, G = sum_B g_B, q_j the student prob of token j:
  top-k token j (bucket b):   g_b - q_j G
  tail token j:               q_j (g_tail / Q_tail - G)
which is, with d_B = log Q_B - log P_B and L the row divergence:
  forward_kl: top-k q_j sum(P) - P_b;  tail q_j (sum(P) - P_tail / Q_tail)
  reverse_kl: q_j (d_B - L)
  jsd:        (1 - beta) q_j (log Q_B - log M_B - KL(Q || M))
"""

from __future__ import annotations

import torch

from . import _common as C
from ._common import exp, log_mixture, tl, triton, zero_row
from .distill import finish, jsd_logs, loss_id, mask_and_count
from .reference import topk_distill_loss_ref


@triton.jit
def _topk_distill_kernel(
    s_ptr,
    s_stride,
    tlp_ptr,
    tlp_stride,
    idx_ptr,
    idx_stride,
    sidx_ptr,
    tail_ptr,
    g_ptr,
    g_stride,
    scratch_ptr,
    loss_ptr,
    mask_ptr,
    nvalid_ptr,
    n_cols,
    k,
    inv_t,
    t_sq,
    temp,
    beta,
    log_beta,
    log_1m_beta,
    LOSS: tl.constexpr,  # 0 forward_kl, 1 reverse_kl, 2 jsd
    COVERS_ALL: tl.constexpr,  # k == V: no tail tokens
    HAS_MASK: tl.constexpr,
    MEAN: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,  # ceil(log2(k + 1)): binary-search steps over the sorted indices
    RECOUNT_BLOCK: tl.constexpr,  # vocabulary block of the exact tail recount (see RECOUNT_BLOCK below)
    EXACT_BELOW: tl.constexpr,  # recount the tail exactly when it is below this fraction of the mass
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    g_row = g_ptr + row * g_stride
    tlp_row = tlp_ptr + row * tlp_stride
    idx_row = idx_ptr + row * idx_stride
    scr_row = scratch_ptr + row * k

    if HAS_MASK:
        if tl.load(mask_ptr + row) == 0:  # masked row: loss 0, gradient exactly 0
            tl.store(loss_ptr + row, 0.0)
            if WRITE_GRAD:
                zero_row(g_row, n_cols, BLOCK)
            return

    # ---- pass 1 over V: student online log-sum-exp --------------------------------------------
    m_s = -3.0e38
    z_s = 0.0
    for start in range(0, n_cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        s = tl.load(s_row + offs, mask=offs < n_cols, other=float("-inf")).to(tl.float32) * inv_t
        nm = tl.maximum(m_s, tl.max(s, axis=0))
        z_s = z_s * exp(m_s - nm) + tl.sum(exp(s - nm), axis=0)
        m_s = nm
    log_zs = tl.log(z_s)  # log-probs are (x - m) - log z, see distill.py

    # ---- gather loop over the k buckets: bucket log-probs and loss terms ----------------------
    z_top = 0.0
    sum_p = 0.0
    l_fwd = 0.0  # sum P (log P - log Q)   (forward_kl)
    l_rev = 0.0  # sum Q (log Q - log P)   (reverse_kl)
    kl_pm = 0.0  # sum P (log P - log M)   (jsd)
    kl_qm = 0.0  # sum Q (log Q - log M)   (jsd)
    for kstart in range(0, k, BLOCK_K):
        koffs = kstart + tl.arange(0, BLOCK_K)
        kin = koffs < k
        idx = tl.load(idx_row + koffs, mask=kin, other=0).to(tl.int64)
        ok = kin & (idx >= 0) & (idx < n_cols)
        s = tl.load(s_row + idx, mask=ok, other=float("-inf")).to(tl.float32) * inv_t
        lq = (s - m_s) - log_zs
        lp = tl.load(tlp_row + koffs, mask=kin, other=float("-inf")).to(tl.float32)
        q = exp(lq)
        p = exp(lp)
        z_top += tl.sum(exp(s - m_s), axis=0)
        sum_p += tl.sum(p, axis=0)
        if LOSS == 0:
            l_fwd += tl.sum(tl.where(p > 0, p * (lp - lq), 0.0), axis=0)
        elif LOSS == 1:
            l_rev += tl.sum(tl.where(q > 0, q * (lq - lp), 0.0), axis=0)
        else:
            lm = log_mixture(lp, lq, log_beta, log_1m_beta)
            kl_pm += tl.sum(tl.where(p > 0, p * (lp - lm), 0.0), axis=0)
            kl_qm += tl.sum(tl.where(q > 0, q * (lq - lm), 0.0), axis=0)
        if WRITE_GRAD:
            tl.store(scr_row + koffs, lq, mask=kin)

    # ---- the tail bucket -----------------------------------------------------------------------
    if COVERS_ALL:
        z_tail = z_s * 0.0
    else:
        z_tail = tl.maximum(z_s - z_top, 0.0)
        if z_tail < EXACT_BELOW * z_s:
            # Z_all - Z_topk has lost most of its digits: sum the complement directly, finding
            # each token's membership by binary search in this row's sorted indices (cached).
            sidx_row = sidx_ptr + row * k
            z_tail = z_s * 0.0
            for start in range(0, n_cols, RECOUNT_BLOCK):
                offs = start + tl.arange(0, RECOUNT_BLOCK)
                inb = offs < n_cols
                e = exp(tl.load(s_row + offs, mask=inb, other=float("-inf")).to(tl.float32) * inv_t - m_s)
                lo = tl.zeros([RECOUNT_BLOCK], dtype=tl.int32)
                hi = tl.zeros([RECOUNT_BLOCK], dtype=tl.int32) + k
                for _ in range(SEARCH_STEPS):
                    mid = (lo + hi) // 2
                    right = tl.load(sidx_row + mid, mask=mid < k, other=n_cols) < offs
                    lo = tl.where(right, mid + 1, lo)
                    hi = tl.where(right, hi, mid)
                member = tl.load(sidx_row + lo, mask=lo < k, other=-1) == offs
                z_tail += tl.sum(tl.where(member, 0.0, e), axis=0)
    q_tail = z_tail / z_s
    lq_tail = tl.log(z_tail) - log_zs
    lp_tail = tl.load(tail_ptr + row).to(tl.float32)
    p_tail = exp(lp_tail)
    sum_p += p_tail
    if LOSS == 0:
        div = l_fwd + tl.where(p_tail > 0, p_tail * (lp_tail - lq_tail), 0.0)
        c_tail = sum_p - tl.where(q_tail > 0, p_tail / q_tail, 0.0)
    elif LOSS == 1:
        div = l_rev + tl.where(q_tail > 0, q_tail * (lq_tail - lp_tail), 0.0)
        c_tail = tl.where(q_tail > 0, lq_tail - lp_tail - div, 0.0)
    else:
        lm_tail = log_mixture(lp_tail, lq_tail, log_beta, log_1m_beta)
        kl_pm += tl.where(p_tail > 0, p_tail * (lp_tail - lm_tail), 0.0)
        kl_qm += tl.where(q_tail > 0, q_tail * (lq_tail - lm_tail), 0.0)
        div = beta * kl_pm + (1.0 - beta) * kl_qm
        c_tail = (1.0 - beta) * tl.where(q_tail > 0, lq_tail - lm_tail - kl_qm, 0.0)
    tl.store(loss_ptr + row, div * t_sq)

    if WRITE_GRAD:
        scale = temp
        if MEAN:
            scale = temp / tl.maximum(tl.load(nvalid_ptr).to(tl.float32), 1.0)
        # ---- pass 2 over V: every token gets the tail-bucket gradient q_j * c_tail -------------
        for start in range(0, n_cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inb = offs < n_cols
            q = exp((tl.load(s_row + offs, mask=inb, other=float("-inf")).to(tl.float32) * inv_t - m_s) - log_zs)
            g = tl.where(q > 0, q * c_tail, 0.0)
            tl.store(g_row + offs, (g * scale).to(g_ptr.dtype.element_ty), mask=inb)
        tl.debug_barrier()  # the scatter below must land after the dense stores above
        # ---- scatter: the k top-k tokens get their own bucket's gradient ------------------------
        for kstart in range(0, k, BLOCK_K):
            koffs = kstart + tl.arange(0, BLOCK_K)
            kin = koffs < k
            idx = tl.load(idx_row + koffs, mask=kin, other=0).to(tl.int64)
            ok = kin & (idx >= 0) & (idx < n_cols)
            lq = tl.load(scr_row + koffs, mask=kin, other=float("-inf"))
            lp = tl.load(tlp_row + koffs, mask=kin, other=float("-inf")).to(tl.float32)
            q = exp(lq)
            if LOSS == 0:
                g = q * sum_p - exp(lp)
            elif LOSS == 1:
                g = tl.where(q > 0, q * (lq - lp - div), 0.0)
            else:
                lm = log_mixture(lp, lq, log_beta, log_1m_beta)
                g = (1.0 - beta) * tl.where(q > 0, q * (lq - lm - kl_qm), 0.0)
            tl.store(g_row + idx, (g * scale).to(g_ptr.dtype.element_ty), mask=ok)


# Below this fraction of the student's mass, Z_all - Z_topk (fp32 error ~1e-7 of Z_all) is replaced
# by an exact complement sum: one more read of the row, only for such rows.
EXACT_TAIL_BELOW = 1e-3
# The recount's binary search keeps about six block-sized vectors live. At the dense passes' block (16 elements
# a thread at BLOCK 4096, 8 warps) they set the register count of the whole kernel: 80 a thread where the kernel
# without the recount needs 32, so 3 programs of 8 warps per multiprocessor, and 24 KB of loads in flight per
# multiprocessor in the two passes every row takes (the token op's kernels have 64). A 1024 block (4 a thread)
# needs 40 (6 programs, 48 KB; 2048 needs 59, 512 no fewer than 1024; sm_90, Triton 3.9, printed by
# `benchmarks/profile_gpu.py --parts static`), for a recount ~4x slower on the rows that take it.
RECOUNT_BLOCK = 1024


class TopkDistillLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, tlp, idx, tail, loss, beta, temperature, mask, reduction, inplace, need_grad):
        n, v = student.shape
        k = idx.shape[1]
        s = C.rows_contiguous(student)
        tlp = C.rows_contiguous(tlp.detach())
        idx = C.rows_contiguous(idx)
        tail = tail.detach().contiguous()
        mask_u8, nvalid = mask_and_count(mask, n, s.device)
        grad = (s if inplace else torch.empty_like(s)) if need_grad else s
        scratch = torch.empty((n, k) if need_grad else (1,), dtype=torch.float32, device=s.device)
        # sorted copy of the indices ([N, k] int32), for the exact tail recount of tiny tails
        sidx = idx.sort(dim=1).values.to(torch.int32) if k < v else idx
        rows = torch.empty(n, dtype=torch.float32, device=s.device)
        log_beta, log_1m_beta = jsd_logs(beta)
        block = C.block_size(v, C.MAX_BLOCK)
        _topk_distill_kernel[(n,)](
            s, s.stride(0), tlp, tlp.stride(0), idx, idx.stride(0), sidx, tail, grad, grad.stride(0), scratch,
            rows, mask_u8, nvalid, v, k, 1.0 / temperature, temperature * temperature, temperature,
            beta, log_beta, log_1m_beta,
            LOSS=loss_id(loss, beta), COVERS_ALL=k >= v, HAS_MASK=mask is not None,
            MEAN=reduction == "batchmean", WRITE_GRAD=need_grad, BLOCK=block,
            BLOCK_K=C.block_size(k, C.MAX_BLOCK_K), SEARCH_STEPS=k.bit_length(), RECOUNT_BLOCK=min(block, RECOUNT_BLOCK),
            EXACT_BELOW=EXACT_TAIL_BELOW,
            num_warps=C.num_warps(block),
        )
        if need_grad:
            ctx.save_for_backward(grad)
        ctx.need_grad = need_grad
        return finish(rows, nvalid, reduction)

    @staticmethod
    def backward(ctx, grad_output):
        if not ctx.need_grad:
            return (None,) * 11
        C.OnceBackward.claim(ctx)
        (grad,) = ctx.saved_tensors
        return (C.scale_rows_(grad, grad_output),) + (None,) * 10


def check_topk_args(student_logits, tlp, idx, tail, loss, beta, temperature, mask, reduction, backend):
    C.check_options(loss, beta, temperature, reduction)
    C.check_logits("student_logits", student_logits, backend)
    n, v = student_logits.shape
    if not isinstance(tlp, torch.Tensor) or tlp.dim() != 2 or tlp.shape[0] != n or tlp.shape[1] < 1:
        raise ValueError(f"teacher_topk_logprobs must be [N={n}, k >= 1], got shape {tuple(getattr(tlp, 'shape', ()))}")
    k = tlp.shape[1]
    if k > v:
        raise ValueError(f"teacher_topk_logprobs has k={k} entries per row but the vocabulary has only V={v}")
    if not tlp.is_floating_point():
        raise ValueError(f"teacher_topk_logprobs must be floating point, got {tlp.dtype}")
    if not isinstance(idx, torch.Tensor) or tuple(idx.shape) != (n, k):
        raise ValueError(f"teacher_topk_indices must have shape ({n}, {k}), got {tuple(getattr(idx, 'shape', ()))}")
    if idx.dtype not in C.INDEX_DTYPES:
        raise ValueError(f"teacher_topk_indices must be int16, int32 or int64, got {idx.dtype}")
    if idx.dtype == torch.int16 and v > 32768:
        raise ValueError(f"int16 teacher_topk_indices cannot address a vocabulary of V={v} (max 32768); use int32")
    if not isinstance(tail, torch.Tensor) or tuple(tail.shape) != (n,) or not tail.is_floating_point():
        raise ValueError(f"teacher_tail_logmass must be a float tensor of shape ({n},), got {tuple(getattr(tail, 'shape', ()))}")
    C.check_mask(mask, n)
    C.check_same_device(
        student_logits, teacher_topk_logprobs=tlp, teacher_topk_indices=idx, teacher_tail_logmass=tail, mask=mask
    )


def topk_distill_loss(
    student_logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    teacher_tail_logmass: torch.Tensor,
    loss: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
    backend: str = "auto",
    inplace: bool = False,
) -> torch.Tensor:
    """Distillation loss against a cached top-k teacher, over k+1 buckets (top-k + tail).

    student_logits [N, V] (softened by `temperature`); teacher_topk_logprobs [N, k] and
    teacher_tail_logmass [N] are teacher log-probs already at the cache temperature (used as
    given; the tail may be -inf, e.g. when k = V); teacher_topk_indices [N, k] int16/int32/int64,
    distinct within a row. The student's tail bucket is its mass outside those indices.
    loss / beta / mask / reduction / temperature**2 factor / backend / inplace: as `distill_loss`
    (forward_kl = KL(teacher || student) over the buckets, reverse_kl = KL(student || teacher),
    jsd = generalised JSD with TRL's beta endpoint convention). With `inplace=True` the
    student logits are CLOBBERED by the gradient. Returns float32.
    """
    backend = C.resolve_backend(backend, student_logits)
    check_topk_args(
        student_logits, teacher_topk_logprobs, teacher_topk_indices, teacher_tail_logmass,
        loss, beta, temperature, mask, reduction, backend,
    )
    beta, temperature = float(beta), float(temperature)
    if backend == "torch":
        return topk_distill_loss_ref(
            student_logits, teacher_topk_logprobs, teacher_topk_indices, teacher_tail_logmass,
            loss, beta, temperature, mask, reduction,
        )
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    return TopkDistillLossFunction.apply(
        student_logits, teacher_topk_logprobs, teacher_topk_indices, teacher_tail_logmass,
        loss, beta, temperature, mask, reduction, inplace, need_grad,
    )
