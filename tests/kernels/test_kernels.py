"""Triton kernels vs the torch reference: values and gradients (interpreted on CPU, compiled on CUDA)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tnd_kernels as K
from tnd_kernels.reference import distill_loss_ref, token_logprobs_entropy_ref, topk_distill_loss_ref

pytestmark = [pytest.mark.kernels, pytest.mark.filterwarnings("ignore::RuntimeWarning")]

MODES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.5), ("jsd", 1.0)]
MODE_IDS = ["fwd", "rev", "jsd0", "jsd.5", "jsd1"]
DTYPES = [torch.float32, torch.bfloat16]


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """fp32: tight. bf16 inputs: values are computed in fp32 on both sides; gradients are rounded to bf16.
    The scale has a floor: a value that is exactly 0 in the reference (a one-token vocabulary) comes out of
    the compiled kernel's exp2/log2 as a few 1e-9."""
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    scale = max(want.abs().max().item(), 1e-3) if want.numel() else 1.0
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5 * scale, msg=lambda m: f"{what}: {m}")
    else:
        torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-2 * scale, msg=lambda m: f"{what}: {m}")


def logits(n, v, device, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g) * scale).to(device=device, dtype=dtype)


def run_distill(student, teacher, *, loss, beta, temperature, mask, reduction, inplace=False, weight_seed=0):
    """(triton value, reference value, triton grad, reference grad) with a random upstream gradient."""
    x_k = student.clone().requires_grad_()
    x_r = student.clone().requires_grad_()
    out_k = K.distill_loss(x_k, teacher, loss, beta, temperature, mask, reduction, backend="triton", inplace=inplace)
    out_r = distill_loss_ref(x_r, teacher, loss, beta, temperature, mask, reduction)
    w = torch.randn(out_r.shape, generator=torch.Generator().manual_seed(weight_seed)).to(out_r.device)
    (out_k * w).sum().backward()
    (out_r * w).sum().backward()
    return out_k, out_r, x_k.grad, x_r.grad


# ---------------------------------------------------------------------------------------------
# dense distill_loss


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("loss,beta", MODES, ids=MODE_IDS)
def test_distill_matches_reference(device, loss, beta, reduction, dtype):
    n, v = 5, 2053  # odd V, 3 blocks of 1024, the last one partial
    s, t = logits(n, v, device, dtype, 1), logits(n, v, device, dtype, 2)
    mask = torch.tensor([True, False, True, True, True], device=device)
    out_k, out_r, g_k, g_r = run_distill(s, t, loss=loss, beta=beta, temperature=2.0, mask=mask, reduction=reduction)
    assert out_k.dtype == torch.float32 and g_k.dtype == dtype
    close(out_k, out_r, dtype, "loss")
    close(g_k, g_r, dtype, "grad")
    assert torch.count_nonzero(g_k[1]) == 0


@pytest.mark.parametrize("shape", [(1, 2053), (3, 100), (2, 1024), (4, 1)], ids=str)
@pytest.mark.parametrize("loss,beta", MODES, ids=MODE_IDS)
def test_distill_shapes_and_temperature(device, shape, loss, beta):
    s, t = logits(*shape, device, torch.float32, 3), logits(*shape, device, torch.float32, 4)
    out_k, out_r, g_k, g_r = run_distill(s, t, loss=loss, beta=beta, temperature=0.7, mask=None, reduction="batchmean")
    close(out_k, out_r, torch.float32, "loss")
    close(g_k, g_r, torch.float32, "grad")


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("loss,beta", MODES, ids=MODE_IDS)
def test_distill_all_masked(device, loss, beta, reduction):
    s, t = logits(3, 300, device, torch.bfloat16, 5), logits(3, 300, device, torch.bfloat16, 6)
    mask = torch.zeros(3, dtype=torch.bool, device=device)
    x = s.clone().requires_grad_()
    out = K.distill_loss(x, t, loss, beta, 1.0, mask, reduction, backend="triton")
    out.sum().backward()
    assert torch.all(out == 0) and not torch.isnan(out).any()
    assert torch.count_nonzero(x.grad) == 0


@pytest.mark.parametrize("loss,beta", MODES, ids=MODE_IDS)
def test_distill_extreme_logits(device, loss, beta):
    n, v = 3, 1500
    g = torch.Generator().manual_seed(7)
    s = (torch.randint(-1, 2, (n, v), generator=g) * 1e4).float().to(device)
    t = (torch.randint(-1, 2, (n, v), generator=g) * 1e4).float().to(device)
    s[:, 5] = 1e4  # every row has a max (not only -inf / 0)
    t[:, 5] = 1e4
    infinite = loss == "reverse_kl" or (loss == "jsd" and beta == 1.0)
    if not infinite:
        t[0, 100:900] = float("-inf")  # teacher zero-probability tokens, across block boundaries
    out_k, out_r, g_k, g_r = run_distill(s, t, loss=loss, beta=beta, temperature=1.5, mask=None, reduction="none")
    assert torch.isfinite(out_k).all() and torch.isfinite(g_k).all()
    close(out_k, out_r, torch.float32, "loss")
    close(g_k, g_r, torch.float32, "grad")


def test_reverse_kl_is_infinite_where_teacher_has_zero_mass(device):
    s, t = logits(2, 300, device, torch.float32, 8), logits(2, 300, device, torch.float32, 9)
    t[1, 10] = float("-inf")
    with torch.no_grad():
        got = K.distill_loss(s, t, "reverse_kl", reduction="none", backend="triton")
    want = distill_loss_ref(s, t, "reverse_kl", reduction="none")
    assert torch.isinf(got[1]) and torch.isinf(want[1])
    close(got[0], want[0], torch.float32, "finite row")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("loss,beta", MODES, ids=MODE_IDS)
def test_distill_inplace_same_grads(device, loss, beta, dtype):
    s, t = logits(4, 2053, device, dtype, 10), logits(4, 2053, device, dtype, 11)
    mask = torch.tensor([True, True, False, True], device=device)
    out_a, _, g_a, _ = run_distill(s, t, loss=loss, beta=beta, temperature=1.0, mask=mask, reduction="sum")
    out_b, _, g_b, _ = run_distill(s, t, loss=loss, beta=beta, temperature=1.0, mask=mask, reduction="sum", inplace=True)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    torch.testing.assert_close(g_a, g_b, rtol=0, atol=0)


def test_inplace_clobbers_student_buffer(device):
    s, t = logits(2, 500, device, torch.float32, 12), logits(2, 500, device, torch.float32, 13)
    x = s.clone().requires_grad_()
    K.distill_loss(x, t, backend="triton", inplace=True).backward()
    assert torch.equal(x.detach(), x.grad)  # the student buffer now holds the gradient


def test_no_grad_and_teacher_gets_no_grad(device):
    s, t = logits(3, 700, device, torch.float32, 14), logits(3, 700, device, torch.float32, 15)
    tt = t.clone().requires_grad_()
    x = s.clone().requires_grad_()
    K.distill_loss(x, tt, "jsd", backend="triton").backward()
    assert tt.grad is None and x.grad is not None
    with torch.no_grad():
        for loss, beta in MODES:
            got = K.distill_loss(s, t, loss, beta, backend="triton")
            close(got, distill_loss_ref(s, t, loss, beta), torch.float32, loss)


def test_single_backward_only(device):
    s, t = logits(2, 64, device, torch.float32, 16), logits(2, 64, device, torch.float32, 17)
    x = s.clone().requires_grad_()
    out = K.distill_loss(x, t, backend="triton")
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="single backward"):
        out.backward()


# ---------------------------------------------------------------------------------------------
# topk_distill_loss


def teacher_topk(teacher, k, cache_temperature, idx_dtype):
    lp = F.log_softmax(teacher.float() / cache_temperature, -1)
    vals, idx = lp.topk(k, dim=-1)
    tail = torch.logsumexp(lp.scatter(1, idx, float("-inf")), -1)
    return vals, idx.to(idx_dtype), tail


def run_topk(student, vals, idx, tail, *, loss, beta, temperature, mask, reduction, inplace=False):
    x_k = student.clone().requires_grad_()
    x_r = student.clone().requires_grad_()
    out_k = K.topk_distill_loss(
        x_k, vals, idx, tail, loss, beta, temperature, mask, reduction, backend="triton", inplace=inplace
    )
    out_r = topk_distill_loss_ref(x_r, vals, idx, tail, loss, beta, temperature, mask, reduction)
    w = torch.randn(out_r.shape, generator=torch.Generator().manual_seed(0)).to(out_r.device)
    (out_k * w).sum().backward()
    (out_r * w).sum().backward()
    return out_k, out_r, x_k.grad, x_r.grad


@pytest.mark.parametrize("idx_dtype", [torch.int16, torch.int32, torch.int64], ids=["i16", "i32", "i64"])
@pytest.mark.parametrize("k", [1, 20, 2053])
@pytest.mark.parametrize("loss,beta", MODES, ids=MODE_IDS)
def test_topk_matches_reference(device, loss, beta, k, idx_dtype):
    n, v = 4, 2053
    s = logits(n, v, device, torch.float32, 20)
    vals, idx, tail = teacher_topk(logits(n, v, device, torch.float32, 21), k, 1.3, idx_dtype)
    mask = torch.tensor([True, True, False, True], device=device)
    out_k, out_r, g_k, g_r = run_topk(s, vals, idx, tail, loss=loss, beta=beta, temperature=2.0, mask=mask, reduction="none")
    close(out_k, out_r, torch.float32, "loss")
    close(g_k, g_r, torch.float32, "grad")
    assert torch.count_nonzero(g_k[2]) == 0


@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
@pytest.mark.parametrize("loss,beta", MODES, ids=MODE_IDS)
def test_topk_bf16_and_reductions(device, loss, beta, reduction):
    s = logits(3, 1100, device, torch.bfloat16, 22)
    vals, idx, tail = teacher_topk(logits(3, 1100, device, torch.float32, 23), 16, 1.0, torch.int32)
    out_k, out_r, g_k, g_r = run_topk(
        s, vals.bfloat16(), idx, tail, loss=loss, beta=beta, temperature=1.0, mask=None, reduction=reduction
    )
    close(out_k, out_r, torch.bfloat16, "loss")
    close(g_k, g_r, torch.bfloat16, "grad")


@pytest.mark.parametrize("loss,beta", MODES, ids=MODE_IDS)
def test_topk_full_vocab_equals_dense(device, loss, beta):
    n, v, temp = 3, 600, 1.7
    s, t = logits(n, v, device, torch.float32, 24), logits(n, v, device, torch.float32, 25)
    vals, idx, _ = teacher_topk(t, v, temp, torch.int32)
    tail = torch.full((n,), float("-inf"), device=device)
    x_a, x_b = s.clone().requires_grad_(), s.clone().requires_grad_()
    a = K.topk_distill_loss(x_a, vals, idx, tail, loss, beta, temp, reduction="sum", backend="triton")
    b = K.distill_loss(x_b, t, loss, beta, temp, reduction="sum", backend="triton")
    a.backward()
    b.backward()
    close(a, b, torch.float32, "loss")
    close(x_a.grad, x_b.grad, torch.float32, "grad")


@pytest.mark.parametrize("loss,beta", MODES, ids=MODE_IDS)
def test_topk_all_masked_and_extremes(device, loss, beta):
    n, v = 3, 1100
    g = torch.Generator().manual_seed(26)
    s = (torch.randint(-1, 2, (n, v), generator=g) * 1e4).float().to(device)
    s[:, 3] = 1e4
    vals, idx, tail = teacher_topk(logits(n, v, device, torch.float32, 27), 8, 1.0, torch.int32)
    x = s.clone().requires_grad_()
    none = torch.zeros(n, dtype=torch.bool, device=device)
    out = K.topk_distill_loss(x, vals, idx, tail, loss, beta, mask=none, backend="triton")
    out.backward()
    assert out.item() == 0.0 and torch.count_nonzero(x.grad) == 0
    out_k, out_r, g_k, g_r = run_topk(s, vals, idx, tail, loss=loss, beta=beta, temperature=1.5, mask=None, reduction="none")
    assert torch.isfinite(out_k).all() and torch.isfinite(g_k).all()
    close(out_k, out_r, torch.float32, "loss")
    close(g_k, g_r, torch.float32, "grad")


@pytest.mark.parametrize("k", [5, 2053])
@pytest.mark.parametrize("loss,beta", MODES, ids=MODE_IDS)
def test_topk_inplace_same_grads(device, loss, beta, k):
    s = logits(3, 2053, device, torch.bfloat16, 28)
    vals, idx, tail = teacher_topk(logits(3, 2053, device, torch.float32, 29), k, 1.0, torch.int32)
    kw = dict(loss=loss, beta=beta, temperature=1.0, mask=None, reduction="batchmean")
    out_a, _, g_a, _ = run_topk(s, vals, idx, tail, **kw)
    out_b, _, g_b, _ = run_topk(s, vals, idx, tail, inplace=True, **kw)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    torch.testing.assert_close(g_a, g_b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# token_logprobs_entropy


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape,temperature", [((1, 2053), 1.0), ((6, 2053), 0.6), ((3, 50), 2.0)], ids=str)
def test_token_logprobs_entropy_matches_reference(device, shape, temperature, dtype):
    n, v = shape
    x = logits(n, v, device, dtype, 30, scale=4.0)
    tok = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(31)).to(device)
    x_k, x_r = x.clone().requires_grad_(), x.clone().requires_grad_()
    lp_k, h_k = K.token_logprobs_entropy(x_k, tok, temperature, backend="triton")
    lp_r, h_r = token_logprobs_entropy_ref(x_r, tok, temperature)
    close(lp_k, lp_r, torch.float32, "logp")
    close(h_k, h_r, torch.float32, "entropy")
    g = torch.Generator().manual_seed(32)
    w1, w2 = torch.randn(n, generator=g).to(device), torch.randn(n, generator=g).to(device)
    (lp_k * w1 + h_k * w2).sum().backward()
    (lp_r * w1 + h_r * w2).sum().backward()
    assert x_k.grad.dtype == dtype
    close(x_k.grad, x_r.grad, dtype, "grad")


@pytest.mark.parametrize("which", ["logp", "entropy"])
def test_token_logprobs_one_output_and_inplace(device, which):
    x = logits(3, 2053, device, torch.float32, 33)
    x[0, :7] = 1e4
    x[1, 100:] = -1e4
    tok = torch.tensor([3, 2000, 0], device=device)
    grads = []
    for backend, inplace in (("torch", False), ("triton", False), ("triton", True)):
        xx = x.clone().requires_grad_()
        lp, h = K.token_logprobs_entropy(xx, tok, 1.2, backend=backend, inplace=inplace)
        (lp if which == "logp" else h).sum().backward()
        grads.append(xx.grad.clone())
    assert torch.isfinite(grads[1]).all()
    close(grads[1], grads[0], torch.float32, "grad")
    torch.testing.assert_close(grads[2], grads[1], rtol=0, atol=0)


def test_token_logprobs_no_grad(device):
    x = logits(4, 999, device, torch.bfloat16, 34)
    tok = torch.tensor([0, 1, 998, 500], device=device)
    with torch.no_grad():
        lp, h = K.token_logprobs_entropy(x, tok, backend="triton")
    lp_r, h_r = token_logprobs_entropy_ref(x, tok)
    close(lp, lp_r, torch.float32, "logp")
    close(h, h_r, torch.float32, "entropy")


@pytest.mark.parametrize("gap", [4.0, 12.0, 24.0], ids=["tail1e-1", "tail1e-5", "tail1e-10"])
@pytest.mark.parametrize("loss,beta", MODES, ids=MODE_IDS)
def test_topk_tiny_student_tail_is_exact(device, loss, beta, gap):
    """A student that puts almost all its mass on the teacher's top-k: no log(1 - sum) cancellation."""
    n, v, k = 3, 1500, 16
    vals, idx, tail = teacher_topk(logits(n, v, device, torch.float32, 40), k, 1.0, torch.int32)
    s = logits(n, v, device, torch.float32, 41, scale=1.0)
    s.scatter_(1, idx.long(), s.gather(1, idx.long()) + gap)
    out_k, out_r, g_k, g_r = run_topk(s, vals, idx, tail, loss=loss, beta=beta, temperature=1.0, mask=None, reduction="none")
    assert torch.isfinite(out_k).all()
    close(out_k, out_r, torch.float32, "loss")
    close(g_k, g_r, torch.float32, "grad")
