"""The top-k kernel on a sampled cache's rows (ids + log(count / S), -inf filler slots, -inf tail): it
computes the random-sampling KD loss KL(w || q) and its gradient q - w, as the torch reference does."""

from __future__ import annotations

import math

import pytest
import torch

import tnd_kernels as K
from tnd.cache import decode_samples, encode_samples

pytestmark = [pytest.mark.kernels, pytest.mark.filterwarnings("ignore::RuntimeWarning")]


@pytest.mark.parametrize("samples", [1, 12, 32])
def test_topk_kernel_on_sampled_rows_is_the_rs_kd_loss(device, samples):
    n, v = 5, 2053
    g = torch.Generator().manual_seed(3)
    teacher = torch.randn(n, v, generator=g) * 4
    draws = torch.multinomial(torch.softmax(teacher, -1), samples, replacement=True, generator=g)
    draws[0] = draws[0, :1]  # one id drawn every time
    log_w, ids = decode_samples(*encode_samples(draws), samples)
    student = (torch.randn(n, v, generator=g) * 3).to(device)
    tail = torch.full((n,), -math.inf, device=device)
    grads, losses = [], []
    for backend in ("triton", "torch"):
        x = student.clone().requires_grad_()
        loss = K.topk_distill_loss(x, log_w.to(device), ids.to(device), tail, loss="forward_kl", reduction="none",
                                   backend=backend)
        loss.sum().backward()
        grads.append(x.grad.float().cpu())
        losses.append(loss.detach().float().cpu())
    w = torch.zeros(n, v).scatter_add_(1, draws, torch.full(draws.shape, 1.0 / samples))
    q = torch.softmax(student.float().cpu(), -1)
    want = (w * (w.clamp_min(1e-30).log() - q.log())).sum(-1)  # KL(w || q)
    for got_loss, got_grad in zip(losses, grads):
        torch.testing.assert_close(got_loss, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_grad, q - w, rtol=1e-4, atol=1e-6)
