"""Shared plumbing for the kernels: optional triton import, backend dispatch, argument checks, launch sizes."""

from __future__ import annotations

import os

import torch

from .reference import LOSSES, REDUCTIONS

try:  # the package must import (and the torch backend work) without triton
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised by a subprocess test
    HAS_TRITON = False

    class _NoTriton:
        """Stand-in so the kernel modules can still be imported; nothing built from it can run."""

        @staticmethod
        def constexpr(value=None):  # annotations, and the module-level constants made with it
            return value

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton()  # type: ignore[assignment]

# Kernels are built when their module is imported: as interpreted functions when
# TRITON_INTERPRET=1 was set by then (that is how they run on CPU tensors).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Largest vocabulary block one program iteration handles. Per-row programs loop over V in
# blocks of min(next_pow2(V), MAX_BLOCK) with an online log-sum-exp. The interpreter is
# fastest with big numpy blocks but tests want several blocks, hence the smaller value there.
MAX_BLOCK = 1024 if INTERPRET else 4096
MAX_BLOCK_K = 256

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int16, torch.int32, torch.int64)
LOSS_IDS = {name: i for i, name in enumerate(LOSSES)}


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """'auto' -> 'triton' for CUDA tensors (when triton is installed), 'torch' otherwise."""
    if backend == "auto":
        return "triton" if (tensor.is_cuda and HAS_TRITON) else "torch"
    if backend == "torch":
        return "torch"
    if backend != "triton":
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the triton package, which is not installed; use backend='torch'")
    if not tensor.is_cuda and not INTERPRET:
        raise RuntimeError(
            f"backend='triton' on a {tensor.device.type} tensor runs only under the Triton interpreter: "
            "set TRITON_INTERPRET=1 before importing tnd_kernels, or use backend='torch'"
        )
    return "triton"


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def block_size(n: int, cap: int) -> int:
    return max(16, min(next_pow2(n), cap))


def num_warps(block: int) -> int:
    return 4 if block <= 1024 else (8 if block <= 4096 else 16)


def check_options(loss: str, beta: float, temperature: float, reduction: str) -> None:
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_logits(name: str, x: torch.Tensor, backend: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, V] (flatten batch and sequence first), got shape {tuple(x.shape)}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name} must have N >= 1 rows and V >= 1 columns, got shape {tuple(x.shape)}")
    if backend == "triton" and x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16 for backend='triton', got {x.dtype}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


def check_same_device(ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but the logits are on {ref.device}")


def check_mask(mask: torch.Tensor | None, n: int) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = keep), got {getattr(mask, 'dtype', type(mask).__name__)}")
    if tuple(mask.shape) != (n,):
        raise ValueError(f"mask must have shape ({n},), got {tuple(mask.shape)}")


def rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dim is unit-stride (rows may be strided), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


class OnceBackward:
    """Backward of the Liger-style ops scales a gradient computed in forward in place: allow it once."""

    @staticmethod
    def claim(ctx) -> None:
        if getattr(ctx, "_tnd_backward_done", False):
            raise RuntimeError(
                "tnd_kernels fused ops support a single backward pass (their gradient is precomputed "
                "in forward and scaled in place); use backend='torch' to backward twice"
            )
        ctx._tnd_backward_done = True


@triton.jit
def exp(x):
    """e**x as one ex2.approx.ftz (MUFU.EX2): tl.exp also fixes up subnormal results, 4 more instructions a
    call, and several passes of these kernels are bound by instruction issue, not memory (benchmarks/README.md,
    "Profiling the kernels"). A probability under 2**-126 flushed to 0 changes no loss or gradient."""
    return tl.exp2(x * 1.4426950408889634)


@triton.jit
def zero_row(g_row, n_cols, BLOCK: tl.constexpr):
    """Write a row of exact zeros at g_row: the gradient of a masked row."""
    for start in range(0, n_cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        tl.store(g_row + offs, tl.zeros([BLOCK], dtype=g_row.dtype.element_ty), mask=offs < n_cols)


# tl.inline_asm_elementwise has no interpreter implementation: interpreted kernels take tl.log instead
PTX = tl.constexpr(not INTERPRET)


@triton.jit
def log_1_to_2(x):
    """ln x for x in [1, 2]: one lg2.approx (MUFU.LG2; absolute error at most 2**-22 on [0.5, 2], CUDA's
    __log2f) times ln 2. tl.log is libdevice's logf, about 25 instructions, and the JSD's two passes that take
    one per element are bound by instruction issue (benchmarks/README.md, "Profiling the kernels")."""
    if PTX:
        return 0.6931471805599453 * tl.inline_asm_elementwise(
            "lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.log(x)


@triton.jit
def log_mixture(lp, lq, log_beta, log_1m_beta):
    """log m for the generalised JSD's mixture m = beta p + (1 - beta) q, from log p and log q: a
    log-sum-exp of (log beta + log p, log (1 - beta) + log q), stable for any magnitudes. One of the two
    shifted terms is exp(0) = 1, so the log's argument lies in [1, 2] (NaN when both are -inf, as before)."""
    a = lp + log_beta
    b = lq + log_1m_beta
    mx = tl.maximum(a, b)
    return mx + log_1_to_2(exp(a - mx) + exp(b - mx))


@triton.jit
def _scale_rows_kernel(
    grad_ptr,
    grad_row_stride,
    gout_ptr,
    gout_stride,
    n_cols,
    BLOCK: tl.constexpr,
):
    """grad[row, :] *= gout[row * gout_stride] (gout_stride = 0 for a scalar); rows with factor 1 are skipped."""
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(gout_ptr + row * gout_stride).to(tl.float32)
    if g != 1.0:
        base = grad_ptr + row * grad_row_stride
        for start in range(0, n_cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inb = offs < n_cols
            x = tl.load(base + offs, mask=inb, other=0.0).to(tl.float32)
            tl.store(base + offs, (x * g).to(grad_ptr.dtype.element_ty), mask=inb)


def scale_rows_(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """In-place grad *= grad_output (a scalar, or one factor per row), without a host sync."""
    n, v = grad.shape
    gout = grad_output.detach()
    if gout.dim() == 0 or gout.numel() == 1:
        gout, gstride = gout.reshape(1).contiguous(), 0
    else:
        gout, gstride = gout.reshape(n).contiguous(), 1
    block = block_size(v, MAX_BLOCK)
    _scale_rows_kernel[(n,)](grad, grad.stride(0), gout, gstride, v, BLOCK=block, num_warps=num_warps(block))
    return grad
