"""The torch reference (the spec): float64 gradchecks and agreement with independent formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tnd_kernels import token_logprobs_entropy
from tnd_kernels.reference import (
    distill_loss_ref,
    student_bucket_logprobs,
    token_logprobs_entropy_ref,
    topk_distill_loss_ref,
)

pytestmark = pytest.mark.kernels

MODES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 1.0)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("loss,beta", MODES)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_gradcheck_distill(loss, beta, reduction):
    g = _gen(0)
    s = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 7, generator=g, dtype=torch.float64)
    t[0, 3] = float("-inf")  # a zero-probability teacher token must not break the gradient
    if loss == "reverse_kl" or (loss == "jsd" and beta == 1.0):
        t[0, 3] = -30.0  # reverse KL is infinite there
    mask = torch.tensor([True, False, True, True])
    fn = lambda x: distill_loss_ref(x, t, loss, beta, 1.7, mask, reduction)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s,))


@pytest.mark.parametrize("loss,beta", MODES)
@pytest.mark.parametrize("k", [1, 3, 7])
def test_gradcheck_topk(loss, beta, k):
    g = _gen(1)
    s = torch.randn(3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    lp = torch.log_softmax(torch.randn(3, 7, generator=g, dtype=torch.float64), -1)
    vals, idx = lp.topk(k, dim=-1)
    tail = torch.logsumexp(lp.scatter(1, idx, float("-inf")), -1)
    mask = torch.tensor([True, True, False])
    fn = lambda x: topk_distill_loss_ref(x, vals, idx, tail, loss, beta, 0.8, mask, "sum")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s,))


def test_gradcheck_token_logprobs_entropy():
    g = _gen(2)
    x = torch.randn(5, 9, generator=g, dtype=torch.float64, requires_grad=True)
    tok = torch.randint(0, 9, (5,), generator=g)
    assert torch.autograd.gradcheck(lambda z: token_logprobs_entropy_ref(z, tok, 1.3), (x,))


def _trl_generalized_jsd(student_logits, teacher_logits, beta, temperature):
    """Re-statement of TRL GKDTrainer.generalized_jsd_loss (reduction='none', summed over V)."""
    s = F.log_softmax(student_logits / temperature, -1)
    t = F.log_softmax(teacher_logits / temperature, -1)
    if beta == 0:
        jsd = F.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s.dtype)
        m = torch.logsumexp(torch.stack([s + torch.log(1 - b), t + torch.log(b)]), dim=0)
        jsd = b * F.kl_div(m, t, reduction="none", log_target=True) + (1 - b) * F.kl_div(
            m, s, reduction="none", log_target=True
        )
    return jsd.sum(-1)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_matches_trl_times_t_squared(beta):
    g = _gen(3)
    s, t = torch.randn(6, 11, generator=g, dtype=torch.float64), torch.randn(6, 11, generator=g, dtype=torch.float64)
    temp = 1.5
    ours = distill_loss_ref(s, t, "jsd", beta, temp, reduction="none")
    torch.testing.assert_close(ours, _trl_generalized_jsd(s, t, beta, temp) * temp**2)


def test_kls_match_kl_div_and_endpoints():
    g = _gen(4)
    s, t = torch.randn(6, 11, generator=g, dtype=torch.float64), torch.randn(6, 11, generator=g, dtype=torch.float64)
    ls, lt = F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1)
    fwd = F.kl_div(ls, lt, reduction="batchmean", log_target=True) * 4
    rev = F.kl_div(lt, ls, reduction="batchmean", log_target=True) * 4
    torch.testing.assert_close(distill_loss_ref(s, t, "forward_kl", temperature=2.0), fwd)
    torch.testing.assert_close(distill_loss_ref(s, t, "reverse_kl", temperature=2.0), rev)
    torch.testing.assert_close(distill_loss_ref(s, t, "jsd", 0.0, temperature=2.0), fwd)
    torch.testing.assert_close(distill_loss_ref(s, t, "jsd", 1.0, temperature=2.0), rev)
    # symmetric JSD is bounded by log 2, and the beta -> 0 limit of the formula is 0 (the endpoint is special-cased)
    assert distill_loss_ref(s, t, "jsd", 0.5, reduction="none").max() <= math.log(2)
    assert distill_loss_ref(s, t, "jsd", 1e-9) < 1e-6


def test_mask_and_reductions():
    g = _gen(5)
    s, t = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    mask = torch.tensor([True, False, True, False])
    rows = distill_loss_ref(s, t, mask=mask, reduction="none")
    assert rows[1] == 0 and rows[3] == 0
    torch.testing.assert_close(rows[mask], distill_loss_ref(s[mask], t[mask], reduction="none"))
    torch.testing.assert_close(distill_loss_ref(s, t, mask=mask), rows.sum() / 2)
    torch.testing.assert_close(distill_loss_ref(s, t, mask=mask, reduction="sum"), rows.sum())
    none = torch.zeros(4, dtype=torch.bool)
    x = s.clone().requires_grad_()
    out = distill_loss_ref(x, t, mask=none)
    out.backward()
    assert out.item() == 0.0 and not torch.isnan(out) and torch.count_nonzero(x.grad) == 0


def test_topk_full_vocab_equals_dense():
    g = _gen(6)
    s, t = torch.randn(3, 9, generator=g, dtype=torch.float64), torch.randn(3, 9, generator=g, dtype=torch.float64)
    temp = 1.3
    vals, idx = F.log_softmax(t / temp, -1).topk(9, dim=-1)
    tail = torch.full((3,), float("-inf"), dtype=torch.float64)
    for loss, beta in MODES:
        dense = distill_loss_ref(s, t, loss, beta, temp, reduction="none")
        topk = topk_distill_loss_ref(s, vals, idx, tail, loss, beta, temp, reduction="none")
        torch.testing.assert_close(topk, dense)


def test_student_tail_is_exact_for_tiny_tails():
    s = torch.tensor([[30.0, 0.0, -5.0, 1.0]], dtype=torch.float32)
    idx = torch.tensor([[0, 3]])
    _, tail = student_bucket_logprobs(s, idx, 1.0)
    want = torch.logsumexp(torch.tensor([0.0, -5.0], dtype=torch.float64), 0) - torch.logsumexp(s.double(), -1)
    torch.testing.assert_close(tail.double(), want, rtol=1e-6, atol=0)  # log(1 - sum) would give -inf here


def test_entropy_matches_categorical():
    g = _gen(7)
    x = torch.randn(4, 13, generator=g, dtype=torch.float64)
    tok = torch.randint(0, 13, (4,), generator=g)
    logp, ent = token_logprobs_entropy_ref(x, tok, 0.7)
    dist = torch.distributions.Categorical(logits=x / 0.7)
    torch.testing.assert_close(logp, dist.log_prob(tok))
    torch.testing.assert_close(ent, dist.entropy())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("grads", ["both", "logp", "entropy"])
def test_torch_backend_token_logprobs_matches_reference(dtype, grads):
    """The torch backend's closed-form backward equals autograd through the reference, -inf logits included."""
    g = _gen(4)
    x = (torch.randn(6, 50, generator=g, dtype=torch.float64) * 3).to(dtype)
    x[0, :10] = float("-inf")
    x[1, 5] = 1e4
    tok = torch.randint(10, 50, (6,), generator=g)
    w1, w2 = torch.randn(6, generator=g), torch.randn(6, generator=g)
    outs = []
    for fn in (lambda z: token_logprobs_entropy(z, tok, 0.7, backend="torch"),
               lambda z: token_logprobs_entropy_ref(z, tok, 0.7)):
        z = x.clone().requires_grad_()
        logp, ent = fn(z)
        loss = {"both": (logp * w1.to(logp.dtype) + ent * w2.to(ent.dtype)).sum(),
                "logp": logp.sum(), "entropy": ent.sum()}[grads]
        loss.backward()
        assert z.grad.dtype == dtype and torch.isfinite(z.grad).all()
        outs.append((logp.detach(), ent.detach(), z.grad))
    for ours, ref in zip(*outs):
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)


def test_gradcheck_torch_backend_token_logprobs():
    g = _gen(5)
    x = torch.randn(5, 9, generator=g, dtype=torch.float64, requires_grad=True)
    tok = torch.randint(0, 9, (5,), generator=g)
    assert torch.autograd.gradcheck(lambda z: token_logprobs_entropy(z, tok, 1.3, backend="torch"), (x,))
