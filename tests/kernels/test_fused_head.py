"""Fused head + loss vs the unfused path (head_logits_ref, then today's ops): loss and every gradient."""

from __future__ import annotations

import pytest
import torch

import tnd_kernels as K
from tnd_kernels import _common
from tnd_kernels.reference import head_logits_ref

pytestmark = [pytest.mark.kernels, pytest.mark.filterwarnings("ignore::RuntimeWarning")]

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16]
N, H, V, K_TOP = 11, 24, 1100, 5  # V = 1100: two vocabulary blocks of the kernels (conftest), the last partial


def close(got, want, dtype, what):
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    scale = max(want.abs().max().item(), 1e-3) if want.numel() else 1.0
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=3e-5 * scale, msg=lambda m: f"{what}: {m}")
    else:
        torch.testing.assert_close(got, want, rtol=3e-2, atol=2e-2 * scale, msg=lambda m: f"{what}: {m}")


def inputs(device, dtype, n=N, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, H, generator=g)).to(device=device, dtype=dtype)
    w = (torch.randn(V, H, generator=g) * 0.4).to(device=device, dtype=dtype)
    b = (torch.randn(V, generator=g)).to(device=device, dtype=dtype) if bias else None
    return h, w, b


def topk_teacher(n, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(n, V, generator=g) * 2, -1)
    top, idx = lp.topk(K_TOP, dim=-1)
    tail = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6))
    return top.to(device), idx.to(device), tail.to(device)


def leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_() for t in ts]


def grads_of(loss, ts):
    tensors = [t for t in ts if t is not None]
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def compare(fused, unfused, ts_f, ts_u, dtype, upstream=1.7):
    """Loss values, then the gradients of upstream x loss w.r.t. each of h, W, b."""
    close(fused, unfused, dtype, "loss")
    for what, gf, gu in zip(("h", "W", "b"), grads_of(fused * upstream, ts_f), grads_of(unfused * upstream, ts_u)):
        assert gf.dtype == gu.dtype, what
        close(gf, gu, dtype, f"grad {what}")


def head_kwargs(scale, cap):
    return {"logit_scale": scale, "softcap": cap}


HEADS = [(1.0, None), (0.7, None), (1.0, 3.0), (1.3, 2.5)]
HEAD_IDS = ["plain", "scale", "softcap", "scale+softcap"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("scale,cap", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("loss,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)], ids=["fwd", "rev", "jsd"])
def test_topk_distill_matches_unfused(device, backend, dtype, scale, cap, loss, beta):
    h, w, b = inputs(device, dtype)
    tlp, idx, tail = topk_teacher(N, device)
    mask = torch.ones(N, dtype=torch.bool, device=device)
    mask[[1, 6]] = False
    f, u = leaves(h, w, b), leaves(h, w, b)
    kw = dict(loss=loss, beta=beta, temperature=1.7, mask=mask, backend=backend)
    fused = K.fused_head_topk_distill_loss(f[0], f[1], tlp, idx, tail, bias=f[2], chunk_size=4,
                                           **head_kwargs(scale, cap), **kw)
    logits = head_logits_ref(u[0], u[1], u[2], scale, cap)
    unfused = K.topk_distill_loss(logits, tlp, idx, tail, **kw)
    compare(fused, unfused, f, u, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("scale,cap", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("loss,beta", [("forward_kl", 0.5), ("jsd", 0.5)], ids=["fwd", "jsd"])
def test_dense_distill_matches_unfused(device, backend, dtype, scale, cap, loss, beta):
    h, w, b = inputs(device, dtype)
    teacher = (torch.randn(N, V, generator=torch.Generator().manual_seed(3)) * 2).to(device=device, dtype=dtype)
    mask = torch.ones(N, dtype=torch.bool, device=device)
    mask[0] = False
    f, u = leaves(h, w, b), leaves(h, w, b)
    kw = dict(loss=loss, beta=beta, temperature=0.8, mask=mask, backend=backend)
    fused = K.fused_head_distill_loss(f[0], f[1], teacher, bias=f[2], chunk_size=3, **head_kwargs(scale, cap), **kw)
    unfused = K.distill_loss(head_logits_ref(u[0], u[1], u[2], scale, cap), teacher, **kw)
    compare(fused, unfused, f, u, dtype)


def ppo_like(logp, ent, old, adv, m):
    """A PPO-clip objective minus an entropy bonus, over m tokens: a sum of per-row terms."""
    ratio = torch.exp(logp - old)
    return (torch.max(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).sum() - 0.01 * ent.sum()) / m


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("scale,cap", HEADS, ids=HEAD_IDS)
def test_token_logprobs_entropy_matches_unfused(device, backend, dtype, scale, cap):
    h, w, b = inputs(device, dtype)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, V, (N,), generator=g).to(device)
    old = (torch.randn(N, generator=g) * 0.1 - 7).to(device)
    adv = torch.randn(N, generator=g).to(device)
    f, u = leaves(h, w, b), leaves(h, w, b)
    loss, logp, ent = K.fused_head_token_logprobs_entropy(
        f[0], f[1], tokens, lambda lp, e, rows: ppo_like(lp, e, old[rows], adv[rows], N), temperature=1.3,
        bias=f[2], chunk_size=4, backend=backend, **head_kwargs(scale, cap))
    logp_u, ent_u = K.token_logprobs_entropy(head_logits_ref(u[0], u[1], u[2], scale, cap), tokens, 1.3, backend=backend)
    close(logp, logp_u, dtype, "logp")
    close(ent, ent_u, dtype, "entropy")
    assert not logp.requires_grad and not ent.requires_grad
    compare(loss, ppo_like(logp_u, ent_u, old, adv, N), f, u, dtype)


def test_token_logprobs_without_a_loss_is_scoring_only(device):
    h, w, b = inputs(device, torch.float32)
    tokens = torch.arange(N, device=device)
    f = leaves(h, w, b)
    loss, logp, ent = K.fused_head_token_logprobs_entropy(f[0], f[1], tokens, bias=f[2], chunk_size=5)
    want = K.token_logprobs_entropy(head_logits_ref(h, w, b), tokens)
    assert loss is None
    close(logp, want[0], torch.float32, "logp")
    close(ent, want[1], torch.float32, "entropy")


@pytest.mark.parametrize("chunk", [1, 3, 4, 10, 11, 64, None])
def test_chunk_size_changes_nothing(device, chunk):
    """Chunks that divide N or not, one row, all of N at once, more than N: the same loss and gradients."""
    h, w, b = inputs(device, torch.float32)
    tlp, idx, tail = topk_teacher(N, device)
    f, u = leaves(h, w, b), leaves(h, w, b)
    fused = K.fused_head_topk_distill_loss(f[0], f[1], tlp, idx, tail, temperature=2.0, bias=f[2], chunk_size=chunk)
    unfused = K.topk_distill_loss(head_logits_ref(u[0], u[1], u[2]), tlp, idx, tail, temperature=2.0)
    compare(fused, unfused, f, u, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_chunk_with_every_row_masked(device, backend):
    """Chunks 0-3 and 8-10 kept, 4-7 all masked: that chunk adds nothing, and batchmean divides by the 7 kept."""
    h, w, b = inputs(device, torch.float32)
    tlp, idx, tail = topk_teacher(N, device)
    mask = torch.ones(N, dtype=torch.bool, device=device)
    mask[4:8] = False
    f, u = leaves(h, w, b), leaves(h, w, b)
    fused = K.fused_head_topk_distill_loss(f[0], f[1], tlp, idx, tail, mask=mask, bias=f[2], chunk_size=4, backend=backend)
    unfused = K.topk_distill_loss(head_logits_ref(u[0], u[1], u[2]), tlp, idx, tail, mask=mask, backend=backend)
    compare(fused, unfused, f, u, torch.float32)
    (gh,) = torch.autograd.grad(K.fused_head_topk_distill_loss(
        f[0], f[1], tlp, idx, tail, mask=mask, bias=f[2], chunk_size=4, backend=backend), f[0])
    assert gh[4:8].abs().max() == 0 and gh[:4].abs().max() > 0


def test_every_row_masked_gives_zero(device):
    h, w, b = inputs(device, torch.float32)
    tlp, idx, tail = topk_teacher(N, device)
    f = leaves(h, w, b)
    out = K.fused_head_topk_distill_loss(f[0], f[1], tlp, idx, tail, mask=torch.zeros(N, dtype=torch.bool, device=device),
                                         bias=f[2], chunk_size=4)
    gh, gw, gb = torch.autograd.grad(out, f)
    assert out.item() == 0.0 and gh.abs().max() == 0 and gw.abs().max() == 0 and gb.abs().max() == 0


def test_no_rows(device):
    """N = 0: a loss of 0 that still backpropagates (zero gradients), and empty log-probs."""
    h, w, b = inputs(device, torch.float32, n=0)
    tlp, idx, tail = topk_teacher(0, device)
    f = leaves(h, w, b)
    out = K.fused_head_topk_distill_loss(f[0], f[1], tlp, idx, tail, bias=f[2])
    gh, gw, gb = torch.autograd.grad(out, f)
    assert out.item() == 0.0 and gh.shape == (0, H) and gw.abs().max() == 0 and gb.abs().max() == 0
    loss, logp, ent = K.fused_head_token_logprobs_entropy(f[0], f[1], torch.zeros(0, dtype=torch.long, device=device),
                                                          lambda lp, e, rows: lp.sum())
    assert loss.item() == 0.0 and logp.shape == (0,) and ent.shape == (0,)


def test_tied_embeddings_accumulate(device):
    """W is also the input embedding: its gradient is the embedding's plus the head's, as unfused."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, V, (N,), generator=g).to(device)
    proj = torch.randn(H, H, generator=g).to(device) * 0.2
    tlp, idx, tail = topk_teacher(N, device)

    def run(fused):
        emb = torch.nn.Embedding(V, H).to(device)
        torch.nn.init.normal_(emb.weight, std=0.4, generator=torch.Generator().manual_seed(8))
        hidden = torch.tanh(emb(ids) @ proj)
        if fused:
            out = K.fused_head_topk_distill_loss(hidden, emb.weight, tlp, idx, tail, chunk_size=4)
        else:
            out = K.topk_distill_loss(hidden @ emb.weight.t(), tlp, idx, tail)
        out.backward()
        return out, emb.weight.grad

    (lf, gf), (lu, gu) = run(True), run(False)
    close(lf, lu, torch.float32, "loss")
    close(gf, gu, torch.float32, "tied grad")
    embedding_rows = torch.zeros(V, dtype=torch.bool, device=device)
    embedding_rows[ids] = True
    assert gf[~embedding_rows].abs().max() > 0  # the head's part reaches rows no input token used


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU autocast")
def test_autocast_runs_the_head_in_bf16():
    """Under bf16 autocast (the trainer's mixed precision) the chunks' logits are bf16 as the unfused head's;
    the fp32 parameters get fp32 gradients."""
    h, w, b = inputs("cpu", torch.float32)
    tlp, idx, tail = topk_teacher(N, "cpu")
    f, u = leaves(h, w, b), leaves(h, w, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = K.fused_head_topk_distill_loss(f[0], f[1], tlp, idx, tail, bias=f[2], chunk_size=4)
        logits = head_logits_ref(u[0], u[1], u[2])
    assert logits.dtype == torch.bfloat16
    seen = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        K.fused_head_loss(h, w, lambda x, rows: (seen.append(x.dtype), (x.float().sum(), ()))[1], bias=b, chunk_size=4)
    assert seen == [torch.bfloat16] * 3
    unfused = K.topk_distill_loss(logits, tlp, idx, tail)
    compare(fused, unfused, f, u, torch.bfloat16)
    assert all(g.dtype == torch.float32 for g in grads_of(
        K.fused_head_topk_distill_loss(f[0], f[1], tlp, idx, tail, bias=f[2], chunk_size=4), f))


def test_peak_is_a_chunk_of_logits():
    """No tensor of more than chunk x V elements is made while the loss runs (the point of the op)."""
    n, chunk = 64, 8
    h, w, b = inputs("cpu", torch.float32, n=n)
    tlp, idx, tail = topk_teacher(n, "cpu")
    f = leaves(h, w, b)
    largest = []

    class Watch(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple) else (out,):
                # [rows, V] tensors with memory of their own (not W's transpose, not an expanded stand-in)
                if (isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[1] == V and t.stride(0) != 0
                        and t.untyped_storage().data_ptr() != f[1].untyped_storage().data_ptr()):
                    largest.append(t.shape[0])
            return out

    with Watch():
        out = K.fused_head_topk_distill_loss(f[0], f[1], tlp, idx, tail, bias=f[2], chunk_size=chunk)
    out.backward()
    assert largest and max(largest) == chunk


def test_one_backward_only(device):
    h, w, b = inputs(device, torch.float32)
    tlp, idx, tail = topk_teacher(N, device)
    f = leaves(h, w, b)
    out = K.fused_head_topk_distill_loss(f[0], f[1], tlp, idx, tail, bias=f[2])
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="single backward"):
        out.backward()


@pytest.mark.parametrize("bad,match", [
    (dict(weight=torch.zeros(V, H + 1)), r"weight must be \[V >= 1, H=24\]"),
    (dict(weight=torch.zeros(0, H)), "gathered first"),
    (dict(bias=torch.zeros(V + 1)), r"bias must have shape \(1100,\)"),
    (dict(softcap=0.0), "softcap must be > 0"),
    (dict(logit_scale=float("inf")), "logit_scale must be finite"),
    (dict(chunk_size=0), "chunk_size must be a positive int"),
    (dict(vocab_limit=V + 1), r"vocab_limit must be an int in \[1, V=1100\]"),
    (dict(reduction="none"), "reduction must be 'batchmean' or 'sum'"),
    (dict(tail=torch.zeros(N - 1)), "teacher_tail_logmass must have N=11 rows"),
    (dict(loss="kl"), "loss must be one of"),
])
def test_bad_input_is_one_clear_error(bad, match):
    h, w, b = inputs("cpu", torch.float32)
    tlp, idx, tail = topk_teacher(N, "cpu")
    bad = dict(bad)
    args = dict(weight=w, bias=b, tail=tail)
    args.update({k: bad.pop(k) for k in ("weight", "bias", "tail") if k in bad})
    with pytest.raises(ValueError, match=match):
        K.fused_head_topk_distill_loss(h, args["weight"], tlp, idx, args["tail"], bias=args["bias"], **bad)


def test_a_dtensor_head_is_refused():
    class FakeDTensor(torch.Tensor):
        placements = ()

        def full_tensor(self):
            return self

    h, w, _ = inputs("cpu", torch.float32)
    with pytest.raises(ValueError, match="weight is a DTensor"):
        K.fused_head_token_logprobs_entropy(h, w.as_subclass(FakeDTensor), torch.zeros(N, dtype=torch.long))


def test_default_chunk_keeps_logits_near_the_hidden_states_size():
    assert K.default_chunk_size(8192, 128256, 1024) == 128  # 126 x the hidden size in V: 8192 / 126 -> 2**7
    assert K.default_chunk_size(100, 50, 64) == 100  # V <= H: one chunk
    assert K.default_chunk_size(4096, 2048, 128) == 512  # a small head: 2**20 logits per chunk, not 256 rows
    assert _common.next_pow2(K.default_chunk_size(8192, 32000, 512)) == K.default_chunk_size(8192, 32000, 512)


@pytest.mark.parametrize("chunk", [3, 4, 16])
def test_split_rows_gives_ranges_their_own_losses(device, chunk):
    """PPO rows 0-4 and demonstration rows 5-10 in one pass (chunks straddle row 5) = the two unfused losses."""
    h, w, b = inputs(device, torch.float32)
    g = torch.Generator().manual_seed(9)
    tokens = torch.randint(0, V, (5,), generator=g).to(device)
    old, adv = torch.randn(5, generator=g).to(device) - 7, torch.randn(5, generator=g).to(device)
    tlp, idx, tail = topk_teacher(6, device)
    f, u = leaves(h, w, b), leaves(h, w, b)

    def ppo(logits, rows):
        logp, ent = K.token_logprobs_entropy(logits, tokens[rows], 1.2)
        return ppo_like(logp, ent, old[rows], adv[rows], 5)

    def distill(logits, rows):
        return 0.3 * K.topk_distill_loss(logits, tlp[rows], idx[rows], tail[rows], reduction="sum") / 6

    (fused,) = K.fused_head_loss(f[0], f[1], K.split_rows((0, 5, ppo), (5, N, distill)), bias=f[2], chunk_size=chunk)
    logits = head_logits_ref(u[0], u[1], u[2])
    unfused = ppo_like(*K.token_logprobs_entropy(logits[:5], tokens, 1.2), old, adv, 5) + 0.3 * K.topk_distill_loss(
        logits[5:], tlp, idx, tail)
    compare(fused, unfused, f, u, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_limit_masks_the_padded_rows_as_the_trainer_does(device, backend):
    """Rows of W past the tokenizer: their logits -1e4 (the trainer's mask), so no probability and no gradient."""
    h, w, b = inputs(device, torch.float32)
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 1000, (N,), generator=g).to(device)
    f, u = leaves(h, w, b), leaves(h, w, b)
    loss, logp, _ = K.fused_head_token_logprobs_entropy(f[0], f[1], tokens, lambda lp, e, rows: -lp.sum(), bias=f[2],
                                                        vocab_limit=1000, chunk_size=4, backend=backend)
    logits = head_logits_ref(u[0], u[1], u[2]).masked_fill(torch.arange(V, device=device) >= 1000, -1e4)
    logp_u, _ = K.token_logprobs_entropy(logits, tokens, backend=backend)
    close(logp, logp_u, torch.float32, "logp")
    compare(loss, -logp_u.sum(), f, u, torch.float32)
    (gw,) = torch.autograd.grad(K.fused_head_token_logprobs_entropy(
        f[0], f[1], tokens, lambda lp, e, rows: -lp.sum(), vocab_limit=1000)[0], f[1])
    assert gw[1000:].abs().max() == 0 and gw[:1000].abs().max() > 0
