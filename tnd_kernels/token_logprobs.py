"""Fused per-token log-prob and entropy of softmax(logits / T), with gradients for both.

Forward: one pass over each row with an online log-sum-exp that also accumulates
A = sum_j e_j (s_j - m) (e_j = exp(s_j - m), rescaled whenever the running max m moves), so
  logp = (s_tok - m) - log Z,   entropy = log Z - A / Z   (both terms >= 0: no cancellation).
It saves only the row max, log Z and the entropy ([N] fp32 each) besides the logits, so a no-grad call (PPO
rollouts, reference-policy scoring) reads the logits once and writes 3 N floats.

Backward: one pass writing, with q = softmax(s), H the entropy,
  d/dlogits_j = (grad_logp (1[j = tok] - q_j) - grad_entropy q_j (log q_j + H)) / T
in the logits dtype. Unlike the distillation ops the gradient is not precomputed in forward
(it depends on two upstream gradients), so forward allocates nothing of size [N, V]; backward
allocates the gradient, or with `inplace=True` writes it into the logits buffer (clobbering it).
Fwd+bwd reads the logits twice and writes the gradient once.

`backend="torch"` runs `TokenLogprobsEntropyTorch`: the reference's values in plain torch with
the same closed-form backward (no autograd graph through the entropy).
"""

from __future__ import annotations

import torch

from . import _common as C
from ._common import exp, tl, triton
from .reference import _compute_dtype


@triton.jit
def _token_logprobs_fwd_kernel(
    x_ptr,
    x_stride,
    tok_ptr,
    logp_ptr,
    ent_ptr,
    max_ptr,
    logz_ptr,
    n_cols,
    inv_t,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    m = -3.0e38
    z = 0.0
    acc = 0.0  # sum e_j (s_j - m)
    for start in range(0, n_cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        s = tl.load(x_row + offs, mask=offs < n_cols, other=float("-inf")).to(tl.float32) * inv_t
        nm = tl.maximum(m, tl.max(s, axis=0))
        alpha = exp(m - nm)
        e = exp(s - nm)
        acc = alpha * (acc + (m - nm) * z) + tl.sum(tl.where(e > 0, e * (s - nm), 0.0), axis=0)
        z = z * alpha + tl.sum(e, axis=0)
        m = nm
    log_z = tl.log(z)
    tok = tl.load(tok_ptr + row).to(tl.int64)
    ok = (tok >= 0) & (tok < n_cols)
    s_tok = tl.load(x_row + tok, mask=ok, other=float("nan")).to(tl.float32) * inv_t
    tl.store(logp_ptr + row, (s_tok - m) - log_z)  # (x - m) - log z, not x - lse: see distill.py
    tl.store(ent_ptr + row, log_z - acc / z)
    tl.store(max_ptr + row, m)
    tl.store(logz_ptr + row, log_z)


@triton.jit
def _token_logprobs_bwd_kernel(
    x_ptr,
    x_stride,
    g_ptr,
    g_stride,
    tok_ptr,
    max_ptr,
    logz_ptr,
    ent_ptr,
    glogp_ptr,
    gent_ptr,
    n_cols,
    inv_t,
    HAS_GLOGP: tl.constexpr,
    HAS_GENT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    g_row = g_ptr + row * g_stride
    m = tl.load(max_ptr + row)
    log_z = tl.load(logz_ptr + row)
    ent = tl.load(ent_ptr + row)
    tok = tl.load(tok_ptr + row).to(tl.int64)
    glogp = 0.0
    gent = 0.0
    if HAS_GLOGP:
        glogp = tl.load(glogp_ptr + row).to(tl.float32)
    if HAS_GENT:
        gent = tl.load(gent_ptr + row).to(tl.float32)
    for start in range(0, n_cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < n_cols
        lq = (tl.load(x_row + offs, mask=inb, other=float("-inf")).to(tl.float32) * inv_t - m) - log_z
        q = exp(lq)
        g = tl.where(offs == tok, glogp, 0.0) - glogp * q
        g -= gent * tl.where(q > 0, q * (lq + ent), 0.0)
        tl.store(g_row + offs, (g * inv_t).to(g_ptr.dtype.element_ty), mask=inb)


class TokenLogprobsEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tokens, temperature, inplace):
        n, v = logits.shape
        x = C.rows_contiguous(logits)
        tok = tokens.contiguous()
        logp = torch.empty(n, dtype=torch.float32, device=x.device)
        ent = torch.empty_like(logp)
        row_max = torch.empty_like(logp)
        log_z = torch.empty_like(logp)
        block = C.block_size(v, C.MAX_BLOCK)
        _token_logprobs_fwd_kernel[(n,)](
            x, x.stride(0), tok, logp, ent, row_max, log_z, v, 1.0 / temperature, BLOCK=block, num_warps=C.num_warps(block)
        )
        ctx.save_for_backward(x, tok, row_max, log_z, ent)
        ctx.temperature, ctx.inplace = temperature, inplace
        ctx.set_materialize_grads(False)  # an output without a gradient arrives as None: its term is skipped
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        x, tok, row_max, log_z, ent = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or (grad_logp is None and grad_ent is None):
            return None, None, None, None
        if ctx.inplace:
            C.OnceBackward.claim(ctx)
        n, v = x.shape
        grad = x if ctx.inplace else torch.empty_like(x)
        dummy = ent
        block = C.block_size(v, C.MAX_BLOCK)
        _token_logprobs_bwd_kernel[(n,)](
            x, x.stride(0), grad, grad.stride(0), tok, row_max, log_z, ent,
            dummy if grad_logp is None else grad_logp.contiguous(),
            dummy if grad_ent is None else grad_ent.contiguous(),
            v, 1.0 / ctx.temperature, HAS_GLOGP=grad_logp is not None, HAS_GENT=grad_ent is not None,
            BLOCK=block, num_warps=C.num_warps(block),
        )
        return grad, None, None, None


class TokenLogprobsEntropyTorch(torch.autograd.Function):
    """The torch backend: the reference's values with the kernel's closed-form backward.

    Built under autograd, the reference's entropy records about ten [N, V] ops per call even
    when only logp gets a gradient (PPO with ent_coef = 0 logs the entropy and never
    differentiates it), and for a small model those [N, V] ops are much of a mini-batch's work.
    Here forward runs without a graph and saves log q; backward applies the formula in the
    module docstring, skipping the entropy term when it has no gradient.
    """

    @staticmethod
    def forward(ctx, logits, tokens, temperature):
        z = logits.to(_compute_dtype(logits.dtype))
        if temperature != 1.0:  # PPO samples at T = 1: an [N, V] multiply saved
            z = z * (1.0 / temperature)
        log_q, q = torch.log_softmax(z, dim=-1), torch.softmax(z, dim=-1)
        logp = log_q.gather(1, tokens.long()[:, None]).squeeze(1)
        ent = -(q * log_q).nan_to_num_(0.0).sum(-1)  # q = 0 where log q = -inf: that term is 0
        ctx.save_for_backward(log_q, q, tokens, ent)
        ctx.temperature, ctx.logits_dtype = temperature, logits.dtype
        ctx.set_materialize_grads(False)  # as above
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        log_q, q, tokens, ent = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or (grad_logp is None and grad_ent is None):
            return None, None, None
        inv_t = 1.0 / ctx.temperature
        grad = None
        if grad_logp is not None:  # d logp / dz = onehot(token) - q
            g = grad_logp[:, None].to(q.dtype) * inv_t
            grad = (q * -g).scatter_add_(1, tokens.long()[:, None], g)
        if grad_ent is not None:  # d H / dz = -q (log q + H)
            term = (q * (log_q + ent[:, None])).nan_to_num_(0.0).mul_(grad_ent[:, None].to(q.dtype) * -inv_t)
            grad = term if grad is None else grad.add_(term)
        return grad.to(ctx.logits_dtype), None, None


def check_token_args(logits, tokens, temperature, backend):
    C.check_logits("logits", logits, backend)
    n = logits.shape[0]
    if not isinstance(tokens, torch.Tensor) or tuple(tokens.shape) != (n,):
        raise ValueError(f"tokens must have shape ({n},), got {tuple(getattr(tokens, 'shape', ()))}")
    if tokens.dtype not in C.INDEX_DTYPES + (torch.uint8,):
        raise ValueError(f"tokens must be an integer tensor, got {tokens.dtype}")
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    C.check_same_device(logits, tokens=tokens)


def token_logprobs_entropy(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    backend: str = "auto",
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp [N], entropy [N]) of softmax(logits / T): logp = log softmax(logits / T)[tokens].

    logits [N, V] fp32/bf16/fp16, tokens [N] integer in [0, V) (on the Triton path an
    out-of-range token gives logp = NaN instead of an error). Both outputs are float32 and
    differentiable w.r.t. the logits (backward takes grad_logp and grad_entropy; either may be
    unused). The Triton path saves only three [N] floats besides the logits and allocates the
    [N, V] gradient in backward; `inplace=True` writes it into `logits` instead (CLOBBERING the
    caller's logits during backward; then a single backward is supported).
    """
    backend = C.resolve_backend(backend, logits)
    check_token_args(logits, tokens, temperature, backend)
    temperature = float(temperature)
    if backend == "torch":
        return TokenLogprobsEntropyTorch.apply(logits, tokens, temperature)
    return TokenLogprobsEntropyFunction.apply(logits, tokens, temperature, inplace)
