"""The sampled teacher targets (cache.targets: sampled): the random-sampling KD estimator is unbiased
(exactly, over every draw of a small case), the draws follow the teacher at the cache temperature,
sampled caches round-trip, refuse corruption and other format versions, are the same from one
writer or from batches reseeded as the stage does, and a trainer distilling on one resumes bit-exactly."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import tnd_kernels
from tnd.cache import (
    FORMAT_VERSION,
    CacheError,
    CacheWriter,
    TeacherCache,
    decode_samples,
    distinct_counts,
    encode_samples,
    pack_bits,
    sample_targets,
    unpack_bits,
    write_teacher_cache,
)
from tests.conftest import ROOT
from tnd.config import ArchParams, ParamsError, parse_params
from tnd.data.tokenizer import encode, train_bpe
from tnd.models import build_causal_lm

SENTENCES = ["the cat sees the dog", "the dogs see a cat", "a bird sings in the tree", "my friend likes the red ball"] * 4
ARCH = ArchParams(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_position_embeddings=64)


@pytest.fixture(scope="module")
def lm():
    tokenizer = train_bpe(SENTENCES, vocab_size=300, min_frequency=1)
    model = build_causal_lm(ARCH, tokenizer, seed=0).eval()
    prompts = [[tokenizer.bos_token_id, *encode(tokenizer, s)[: 1 + i % 2]] for i, s in enumerate(SENTENCES[:10])]
    return tokenizer, model, prompts


def one_line_error(excinfo, *needles: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


# --- the estimator -------------------------------------------------------------------------------


def test_sampled_loss_gradient_is_unbiased_over_every_draw():
    """V = 4, S = 3: the expectation over all 4^3 ordered draws, each weighted by its probability under
    the teacher, of the top-k loss's gradient on the decoded sampled row equals the full forward-KL
    gradient q - p; the loss's expectation is KL(p || q) + H(p) - E[H(w)], the constant the docs name.
    (The Triton kernel on such rows: tests/kernels/test_sampled_rows.py.)"""
    vocab, samples = 4, 3
    p = torch.softmax(torch.tensor([1.5, 0.2, -0.7, 0.4], dtype=torch.float64), -1)
    student = torch.tensor([[0.3, -1.0, 0.8, 0.1]], dtype=torch.float64)
    q = torch.softmax(student, -1)[0]
    grad_mean = torch.zeros(vocab, dtype=torch.float64)
    loss_mean = entropy_mean = 0.0
    for draw in itertools.product(range(vocab), repeat=samples):
        prob = float(torch.prod(p[list(draw)]))
        groups, ids = encode_samples(torch.tensor([draw]))
        log_w, slots = decode_samples(groups, ids, samples)
        logits = student.float().clone().requires_grad_(True)
        loss = tnd_kernels.topk_distill_loss(logits, log_w, slots, torch.full((1,), -math.inf), loss="forward_kl",
                                             reduction="sum", backend="torch")
        loss.backward()
        w = torch.bincount(torch.tensor(draw), minlength=vocab).double() / samples
        assert torch.allclose(logits.grad[0].double(), q - w, atol=1e-6)  # the RS-KD gradient, exactly
        grad_mean += prob * logits.grad[0].double()
        loss_mean += prob * float(loss.detach())
        entropy_mean += prob * float(-(w[w > 0] * w[w > 0].log()).sum())
    assert torch.allclose(grad_mean, q - p, atol=1e-6)
    kl = float((p * (p.log() - q.log())).sum())
    entropy = float(-(p * p.log()).sum())
    assert loss_mean == pytest.approx(kl + entropy - entropy_mean, abs=1e-5)
    assert entropy - entropy_mean > 0.05  # the constant is there: the loss is not an unbiased KL


def test_topk_without_the_draws_is_biased():
    """The contrast the estimator is for: the top-2 + tail loss's gradient is not q - p on the top tokens' rest."""
    p = torch.softmax(torch.tensor([1.5, 0.2, -0.7, 0.4]), -1)
    logits = torch.tensor([[0.3, -1.0, 0.8, 0.1]], requires_grad=True)
    top, idx = p.log().topk(2)
    tail = torch.log1p(-top.exp().sum()).reshape(1)
    tnd_kernels.topk_distill_loss(logits, top[None], idx[None], tail, reduction="sum", backend="torch").backward()
    assert not torch.allclose(logits.grad[0], torch.softmax(logits.detach(), -1)[0] - p, atol=1e-3)


def test_draws_follow_the_teacher_at_the_cache_temperature():
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0, -3.0]]).repeat(4, 1)
    draws = sample_targets(logits, 5000, temperature=2.0, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (4, 5000) and bool((draws[:, 1:] >= draws[:, :-1]).all())  # sorted within a row
    freq = torch.bincount(draws.reshape(-1), minlength=5).double() / draws.numel()
    expected = torch.softmax(logits[0].double() / 2.0, -1)
    assert torch.allclose(freq, expected, atol=0.01), (freq, expected)  # 20,000 draws: sd < 0.004
    assert not torch.allclose(freq, torch.softmax(logits[0].double(), -1), atol=0.03)  # not at temperature 1
    again = sample_targets(logits, 5000, temperature=2.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


# --- round trip and refusals ----------------------------------------------------------------------


def random_draws(n: int, vocab: int, samples: int, generator: torch.Generator) -> torch.Tensor:
    """Draws with many repeats (a peaked teacher) and some rows of one id only."""
    peaked = torch.randint(0, 3, (n, samples), generator=generator) * 37 % vocab
    wide = torch.randint(0, vocab, (n, samples), generator=generator)
    draws = torch.where(torch.rand(n, samples, generator=generator) < 0.6, peaked, wide)
    draws[::5] = draws[::5, :1]
    return draws


def write_sampled(path, vocab: int = 1000, samples: int = 12, n_seq: int = 9, shard_tokens: int = 20):
    generator = torch.Generator().manual_seed(1)
    expected = []
    with CacheWriter(path, vocab_size=vocab, targets="sampled", samples=samples, shard_tokens=shard_tokens) as writer:
        for i in range(n_seq):
            prompt_len, n_targets = 1 + i % 3, i % 4 * 3
            ids = torch.randint(0, vocab, (prompt_len + n_targets,), generator=generator)
            draws = random_draws(n_targets, vocab, samples, generator)
            writer.add_batch([ids], [prompt_len], draws)
            expected.append((ids, prompt_len, draws))
    return expected


def counts_of(log_w: torch.Tensor, ids: torch.Tensor, samples: int) -> list[dict[int, int]]:
    return [{int(i): round(float(w.exp()) * samples) for i, w in zip(row_ids, row_w) if w > -math.inf}
            for row_ids, row_w in zip(ids, log_w)]


@pytest.mark.parametrize("vocab,samples", [(1000, 12), (128256, 4), (300, 32)])
def test_sampled_round_trip(tmp_path, vocab, samples):
    expected = write_sampled(tmp_path / "c", vocab=vocab, samples=samples)
    cache = TeacherCache(tmp_path / "c")
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    assert (index["targets"], index["samples"], cache.k, index["format_version"]) == ("sampled", samples, samples, 4)
    assert "k" not in index and "reconstruction_kl" not in index  # a sampled cache has neither
    assert len(index["shards"]) > 1
    for i, (ids, prompt_len, draws) in enumerate(expected):
        row = cache[i]
        assert torch.equal(row.input_ids, ids) and row.prompt_len == prompt_len
        want = [{int(v): int(c) for v, c in zip(*d.unique(return_counts=True))} for d in draws]
        assert counts_of(row.topk_logprobs, row.topk_indices, samples) == want
        assert all(len(set(r.tolist())) == samples for r in row.topk_indices)  # distinct slots, fillers included
        assert bool((row.tail_logmass == -math.inf).all())
    batch = cache.batch(range(len(expected)), pad_id=0)
    mask = batch["target_mask"]
    all_draws = torch.cat([d for _, _, d in expected])
    got = counts_of(batch["topk_logprobs"][mask], batch["topk_indices"][mask], samples)
    assert got == [{int(v): int(c) for v, c in zip(*d.unique(return_counts=True))} for d in all_draws]
    distinct = sum(len(g) for g in got)
    assert index["distinct_mean"] == pytest.approx(distinct / len(got))


def test_sampled_bytes_are_a_few_per_distinct_id(tmp_path):
    """At V = 128,256 a row costs its group bits and 17 bits per distinct id, not per draw."""
    write_sampled(tmp_path / "c", vocab=128256, samples=12, n_seq=40, shard_tokens=10_000)
    shard = load_file(str(tmp_path / "c" / "shard-00000.safetensors"))
    rows, distinct = shard["sample_groups"].shape[0], json.loads((tmp_path / "c" / "index.json").read_text())
    assert shard["sample_groups"].shape[1] == 2  # 11 bits
    assert shard["sample_ids"].numel() == math.ceil(distinct["distinct_mean"] * rows * 17 / 8 - 1e-6)


def test_flipped_byte_in_a_sampled_shard_is_refused(tmp_path):
    write_sampled(tmp_path / "c")
    shard = tmp_path / "c" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x10
    shard.write_bytes(bytes(data))
    cache = TeacherCache(tmp_path / "c")
    with pytest.raises(CacheError) as excinfo:
        cache.batch(range(len(cache)), pad_id=0)
    one_line_error(excinfo, "shard-00001.safetensors", "sha256 mismatch", "dvc repro -f cache_teacher_logits")


@pytest.mark.parametrize("damage", ["groups", "order"])
def test_inconsistent_sampled_rows_are_refused_without_verify(tmp_path, damage):
    write_sampled(tmp_path / "c", shard_tokens=10_000)
    path = tmp_path / "c" / "shard-00000.safetensors"
    tensors = load_file(str(path))
    groups = tensors["sample_groups"]
    if damage == "groups":  # a row with one more distinct id than sample_ids holds: the header check sees the size
        row = int(((groups[:, 0] & 1) == 0).nonzero()[0])
        groups[row, 0] |= 1
        needles = ("shard-00000.safetensors", "sample_ids", "inconsistent cache")
    else:  # the first two ids of a row swapped: no longer ascending
        m = distinct_counts(groups, 12)
        row = int((m >= 2).nonzero()[0])
        start = int(m[:row].sum())
        ids = unpack_bits(tensors["sample_ids"].reshape(1, -1), 10, int(m.sum()))
        ids[0, [start, start + 1]] = ids[0, [start + 1, start]]
        tensors["sample_ids"] = pack_bits(ids, 10).reshape(-1)
        needles = ("shard-00000.safetensors", "not strictly ascending", "corrupted")
    save_file(tensors, str(path), metadata={"format_version": str(FORMAT_VERSION)})
    index_path = tmp_path / "c" / "index.json"
    index = json.loads(index_path.read_text())
    index["shards"][0]["bytes"] = path.stat().st_size
    index_path.write_text(json.dumps(index))
    cache = TeacherCache(tmp_path / "c", verify=False)
    with pytest.raises(CacheError) as excinfo:
        cache.batch(range(len(cache)), pad_id=0)
    one_line_error(excinfo, *needles)


def test_a_format_3_cache_is_refused_by_its_version(tmp_path):
    """Format 3 had no `targets`: the version, not a missing key, is what the one line names."""
    write_sampled(tmp_path / "c")
    index_path = tmp_path / "c" / "index.json"
    index = json.loads(index_path.read_text())
    old = {key: value for key, value in index.items() if key not in ("targets", "samples", "distinct_mean")}
    index_path.write_text(json.dumps({**old, "format_version": 3, "k": 12, "dtype": "compact"}))
    with pytest.raises(CacheError) as excinfo:
        TeacherCache(tmp_path / "c")
    one_line_error(excinfo, "index.json", "older cache format_version 3", f"reads version {FORMAT_VERSION}",
                   "dvc repro -f cache_teacher_logits")
    index_path.write_text(json.dumps({**index, "targets": "dense"}))
    with pytest.raises(CacheError) as excinfo:
        TeacherCache(tmp_path / "c")
    one_line_error(excinfo, "index.json", "targets 'dense'", "topk_tail, sampled")


def test_params_refuse_sampled_targets_with_a_loss_other_than_forward_kl():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["cache"]["targets"], raw["distill"]["loss"], raw["tnd"]["mode"] = "sampled", "reverse_kl", "demos_only"
    with pytest.raises(ParamsError, match=r"distill.loss = reverse_kl with cache.targets = sampled.*set distill.loss: "
                                          r"forward_kl or cache.targets: topk_tail") as excinfo:
        parse_params(raw)
    assert "\n" not in str(excinfo.value)
    raw["distill"]["loss"] = "forward_kl"
    assert parse_params(raw).cache.targets == "sampled"


# --- writing as the stage does -------------------------------------------------------------------


ARGS = {"k": 6, "max_new_tokens": 5, "seed": 7, "batch_size": 3, "shard_tokens": 30, "chunk_tokens": 4,
        "progress": False, "targets": "sampled", "samples": 8}


def test_the_stage_writer_is_deterministic_whatever_the_global_rng(tmp_path, lm):
    tokenizer, model, prompts = lm
    torch.manual_seed(0)
    one = write_teacher_cache(tmp_path / "one", model, tokenizer, prompts, **ARGS)
    torch.manual_seed(1)  # the global RNG is not what the draws read
    write_teacher_cache(tmp_path / "two", model, tokenizer, prompts, **ARGS)
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir()) and len(one["shards"]) > 1
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    other = write_teacher_cache(tmp_path / "three", model, tokenizer, prompts, **{**ARGS, "seed": 8})
    assert other["shards"][0]["sha256"] != one["shards"][0]["sha256"]
    cache = TeacherCache(tmp_path / "one")
    assert cache.k == 8 and cache.sampled and one["targets"] == "sampled"


def test_a_trainer_distilling_on_a_sampled_cache_resumes_bit_exactly(tmp_path, lm):
    from tnd.trainers.ppo import CustomPPOConfig, CustomPPOTrainer
    from tnd.reward import build_reward_model

    tokenizer, teacher, prompts = lm
    write_teacher_cache(tmp_path / "cache", teacher, tokenizer, prompts, **ARGS)

    def trainer():
        student = build_causal_lm(ARCH, tokenizer, 2)
        config = CustomPPOConfig(steps=4, batch_size=4, mini_batch_size=2, ppo_epochs=1, learning_rate=1e-2,
                                 max_new_tokens=4, demo_batch_size=4, seed=3, kernel_backend="torch", mode="demos_only")
        return CustomPPOTrainer(teacher, student, build_reward_model(ARCH, tokenizer, 3), config, prompts,
                                demonstrations=TeacherCache(tmp_path / "cache"), tokenizer=tokenizer)

    full = trainer()
    first = full.train(steps=1)[0]
    assert math.isfinite(first["loss/distill"]) and first["loss/distill"] > 0
    full.save_checkpoint(tmp_path / "ckpt")
    second = full.train(steps=1)[0]
    resumed = trainer()
    resumed.load_checkpoint(tmp_path / "ckpt")
    again = resumed.train(steps=1)[0]
    assert again["loss/distill"] == second["loss/distill"]
    for (name, a), b in zip(full.student.state_dict().items(), resumed.student.state_dict().values()):
        assert torch.equal(a, b), name
