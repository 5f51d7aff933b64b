"""The teacher-logit cache: round trips (exact for float32, within the grid for the compact code),
bit packing, the bounded-memory top-k, alignment of `batch()`, detection of corrupted / truncated /
stale caches, one cache from one process or two, and the stage end to end."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from stages.common import free_port
from tnd.cache import (
    FORMAT_VERSION,
    MAX_DEPTH,
    CacheError,
    CacheWriter,
    TeacherCache,
    decode_logprobs,
    encode_logprobs,
    fingerprint_model,
    fingerprint_tokenizer,
    index_bits,
    levels,
    pack_bits,
    reconstruction_kl,
    teacher_rows,
    teacher_topk,
    unpack_bits,
    value_bytes,
    write_teacher_cache,
)
from tnd.config import ArchParams
from tnd.data.tokenizer import encode, load_tokenizer, train_bpe
from tnd.errors import TndError
from tnd.models import build_causal_lm

SENTENCES = [
    "the cat sees the dog",
    "the dogs see a cat",
    "a bird sings in the tree",
    "the birds sing in the trees",
    "my friend likes the red ball",
    "the children play with a ball",
] * 4
ARCH = ArchParams(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_position_embeddings=64)


@pytest.fixture(scope="module")
def lm():
    tokenizer = train_bpe(SENTENCES, vocab_size=300, min_frequency=1)
    model = build_causal_lm(ARCH, tokenizer, seed=0).eval()
    sequences = [encode(tokenizer, s) + [tokenizer.eos_token_id] for s in SENTENCES[:6]]
    return tokenizer, model, sequences


def logits_for(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def write_cache(path, model, tokenizer, sequences, prompt_lens, k, dtype="float32", temperature=1.0, shard_tokens=8):
    vocab = model.config.vocab_size
    expected = []
    with CacheWriter(
        path,
        vocab_size=vocab,
        k=k,
        temperature=temperature,
        dtype=dtype,
        teacher_fingerprint=fingerprint_model(model),
        tokenizer_fingerprint=fingerprint_tokenizer(tokenizer),
        shard_tokens=shard_tokens,
    ) as writer:
        for ids, p in zip(sequences, prompt_lens):
            rows = logits_for(model, ids)[p - 1 : len(ids) - 1]
            writer.add(ids, p, rows)
            expected.append((ids, p, rows, teacher_topk(rows, k, temperature)))
    return expected


@pytest.fixture
def cache_dir(tmp_path, lm):
    tokenizer, model, sequences = lm
    write_cache(tmp_path / "teacher", model, tokenizer, sequences, [2] * len(sequences), k=4, dtype="compact")
    return tmp_path / "teacher"


def one_line_error(excinfo, *needles: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


# --- the stored quantities -----------------------------------------------------------------


@pytest.mark.parametrize("vocab", [2, 3, 300, 1205, 32000, 32768, 128256])
def test_bit_packing_round_trips_at_ceil_log2_v_bits(vocab):
    bits = index_bits(vocab)
    assert bits == max(1, math.ceil(math.log2(vocab)))
    generator = torch.Generator().manual_seed(vocab)
    for m in (1, 3, 128):
        values = torch.randint(0, vocab, (7, m), generator=generator)
        values[0] = vocab - 1  # the widest value
        packed = pack_bits(values, bits)
        assert packed.dtype == torch.uint8 and packed.shape == (7, math.ceil(m * bits / 8))
        assert torch.equal(unpack_bits(packed, bits, m), values)
    assert pack_bits(torch.zeros(0, 5, dtype=torch.long), bits).shape == (0, math.ceil(5 * bits / 8))


def test_bit_order_is_little_endian():
    # 3 values of 3 bits: 0b101, 0b011, 0b110 -> bit string 101 110 011 (LSB first) -> bytes 0b01110101, 0b1
    packed = pack_bits(torch.tensor([[5, 6, 3]]), 3)
    assert packed.tolist() == [[5 | 6 << 3 | (3 & 0b11) << 6, 3 >> 2]]


def test_compact_code_size_meets_the_issue_budget():
    # 17-bit indices + the code + float16 step + float32 tail at V = 128,256, k = 128
    row = math.ceil(128 * index_bits(128256) / 8) + value_bytes(128) + 2 + 4
    assert (math.ceil(128 * 17 / 8), value_bytes(128), levels(128)) == (272, 45, 233)
    assert row == 323 <= 330 - 6  # room for the token ids and offsets (5.3 bytes a token at 3 + 24 tokens)


def test_compact_code_is_within_half_a_step_and_sums_to_the_top_k_mass():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 5000, generator=generator) * 3
    logits[:100, 7] += 25  # top-1 mass close to 1: a deep, wide range
    logits[100:110] = 0.0  # flat rows: every depth 0, step 0
    for k in (1, 2, 5, 64):
        logprobs, _, tail = teacher_topk(logits, k)
        codes, step = encode_logprobs(logprobs)
        assert codes.shape == (300, value_bytes(k)) and step.dtype == torch.float16
        decoded = decode_logprobs(codes, step, tail, k)
        # the exact (k+1)-bucket distribution is preserved in total: top-k mass + tail = 1
        assert torch.allclose(decoded.exp().sum(-1) + tail.exp(), torch.ones(300), atol=1e-5)
        assert torch.all(decoded[:, :-1] >= decoded[:, 1:])
        # depths below the top one are on the grid: within half a step (and clamped at MAX_DEPTH)
        depth = (logprobs[:, :1] - logprobs).clamp(max=MAX_DEPTH)
        got = decoded[:, :1] - decoded
        assert torch.all((got - depth).abs() <= step.float().unsqueeze(-1) / 2 + 1e-4)
        kl = reconstruction_kl(logprobs, decoded)
        assert torch.all(kl >= 0) and float(kl.mean()) < 1e-3
    assert torch.all(step[100:110] == 0)


def test_compact_code_handles_minus_infinity_and_refuses_a_bad_code():
    logprobs = torch.tensor([[-0.1, -2.0, -math.inf, -math.inf], [-1.0, -1.0, -1.0, -1.0]])
    tail = torch.log1p(-logprobs.exp().sum(-1).clamp(max=1 - 1e-7))
    codes, step = encode_logprobs(logprobs)
    decoded = decode_logprobs(codes, step, tail, 4)
    assert torch.isfinite(decoded).all() and decoded[0, 2] < -MAX_DEPTH + 1  # clamped at the depth limit
    codes[0, 0] ^= 0b1  # one level bit too few
    with pytest.raises(ValueError, match="k - 1 levels"):
        decode_logprobs(codes, step, tail, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_teacher_topk_in_slices_matches_the_dense_reference(dtype):
    generator = torch.Generator().manual_seed(1)
    logits = (torch.randn(40, 3000, generator=generator) * 4).to(dtype)
    logits[:5, 11] += 40  # the top-k holds nearly all the mass: the tail must not cancel away
    logits[5:8, :20] = 2.0  # ties across the k-th place
    for temperature in (1.0, 2.0):
        logprobs, indices, tail = teacher_topk(logits, 16, temperature, vocab_slice=700)  # 5 slices
        reference = torch.log_softmax(logits.double() / temperature, dim=-1)
        values = reference.gather(-1, indices)
        assert torch.allclose(logprobs.double(), values, atol=1e-5)
        assert torch.all(values[:, :-1] >= values[:, 1:]) and torch.all(values.min(-1).values >= reference.topk(16).values[:, -1])
        rest = reference.scatter(-1, indices, -math.inf)
        assert torch.allclose(tail.double(), torch.logsumexp(rest, -1), rtol=1e-5, atol=1e-5)
        if temperature == 1.0:  # exact where 1 - sum(top-k) is below float32's resolution (2^-24 = e^-16.6)
            assert torch.all(tail[:5] < -17)
    assert torch.all(teacher_topk(logits, 3000)[2] == -math.inf)


def test_tail_logmass_is_the_mass_outside_the_topk(lm):
    _tokenizer, model, sequences = lm
    rows = logits_for(model, sequences[0]).double() * 5  # peaked, so the tail is small
    logprobs, indices, tail = teacher_topk(rows, 3)
    probs = torch.softmax(rows, dim=-1)  # float64 reference
    reference = torch.log1p(-probs.gather(-1, indices).sum(-1))
    assert torch.allclose(tail.double(), reference, atol=1e-4)
    assert torch.allclose(logprobs.double(), probs.gather(-1, indices).log(), atol=1e-5)
    assert torch.all(logprobs[:, :-1] >= logprobs[:, 1:])  # sorted, most likely first


def test_teacher_rows_run_the_head_on_chunks_and_match_the_whole_model(lm):
    tokenizer, model, sequences = lm
    prompt_lens = [2, 3, 1, 2, 4, 2]
    model.__dict__.pop("_tnd_head_split", None)  # probe anew
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].shape))
    try:
        rows = teacher_rows(model, sequences, prompt_lens, tokenizer.pad_token_id, k=5, temperature=1.0,
                            vocab_size=model.config.vocab_size, chunk_tokens=7)
    finally:
        hook.remove()
    n_targets = sum(len(s) - p for s, p in zip(sequences, prompt_lens))
    assert rows[0].shape == (n_targets, 5)
    # after the one-time check of the split (the whole model and body + head on one 1 x 8 probe), the head
    # saw 2-D chunks of at most 7 positions, never the [B, T, H] batch
    assert [tuple(shape[:2]) for shape in seen[:2]] == [(1, 8), (1, 8)]
    assert all(len(shape) == 2 and shape[0] <= 7 for shape in seen[2:]) and len(seen) > 4
    expected = [teacher_topk(logits_for(model, s)[p - 1 : len(s) - 1], 5) for s, p in zip(sequences, prompt_lens)]
    for got, want in zip(rows, (torch.cat(parts) for parts in zip(*expected))):
        assert torch.allclose(got.float(), want.float(), atol=1e-5) if got.is_floating_point() else torch.equal(got, want)
    # a model whose logits are not head(body) runs whole: the same rows
    object.__setattr__(model, "_tnd_head_split", False)
    try:
        whole = teacher_rows(model, sequences, prompt_lens, tokenizer.pad_token_id, k=5, temperature=1.0,
                             vocab_size=model.config.vocab_size, chunk_tokens=7)
    finally:
        del model.__dict__["_tnd_head_split"]
    for got, want in zip(rows, whole):
        assert torch.allclose(got.float(), want.float(), atol=1e-5)


def test_fingerprint_does_not_depend_on_the_number_of_hashing_threads(lm):
    _tokenizer, model, _ = lm
    assert fingerprint_model(model, threads=1) == fingerprint_model(model, threads=4)


# --- round trip -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "compact"])
def test_round_trip(tmp_path, lm, dtype):
    tokenizer, model, sequences = lm
    prompt_lens = [1, 2, 3, len(sequences[3]), 2, 1]  # one sequence with no continuation at all
    expected = write_cache(tmp_path / "c", model, tokenizer, sequences, prompt_lens, k=5, dtype=dtype)
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    assert len(index["shards"]) > 1  # shard_tokens=8 splits it
    assert index["n_sequences"] == len(sequences) and index["format_version"] == FORMAT_VERSION
    assert index["n_tokens"] == sum(len(s) - p for s, p in zip(sequences, prompt_lens))
    assert (index["k"], index["dtype"], index["vocab_size"]) == (5, dtype, model.config.vocab_size)
    assert index["index_bits"] == 9  # vocabulary 300

    cache = TeacherCache(tmp_path / "c", fingerprint_model(model), fingerprint_tokenizer(tokenizer))
    assert len(cache) == len(sequences) and cache.n_tokens == index["n_tokens"]
    kls = []
    for i, (ids, p, _rows, (logprobs, indices, tail)) in enumerate(expected):
        item = cache[i]
        assert item.input_ids.tolist() == ids and item.prompt_len == p
        assert torch.equal(item.topk_indices, indices) and item.topk_indices.dtype == torch.int64
        assert torch.equal(item.tail_logmass, tail)
        if dtype == "compact":
            assert torch.allclose(item.topk_logprobs, logprobs, atol=0.1)
            assert torch.allclose(item.topk_logprobs.exp().sum(-1) + tail.exp(), torch.ones(len(tail)), atol=1e-5)
        else:
            assert torch.equal(item.topk_logprobs, logprobs.to(getattr(torch, dtype)).float())
        kls.append(reconstruction_kl(logprobs, item.topk_logprobs))
    kl = torch.cat(kls)
    assert index["reconstruction_kl"]["mean"] == pytest.approx(float(kl.mean()), rel=1e-4, abs=1e-12)
    assert index["reconstruction_kl"]["max"] == pytest.approx(float(kl.max()), rel=1e-4, abs=1e-12)
    assert (index["reconstruction_kl"]["max"] == 0) == (dtype == "float32")
    assert cache[-1].input_ids.tolist() == sequences[-1]
    with pytest.raises(IndexError):
        cache[len(sequences)]


def test_shard_tensors_are_packed(cache_dir):
    from safetensors import safe_open

    index = json.loads((cache_dir / "index.json").read_text())
    assert (index["value_bytes"], index["levels"]) == (value_bytes(4), levels(4))
    with safe_open(str(cache_dir / "shard-00000.safetensors"), "pt") as handle:
        n = index["shards"][0]["n_tokens"]
        assert handle.get_tensor("topk_indices").dtype == torch.uint8
        assert handle.get_tensor("topk_indices").shape == (n, math.ceil(4 * 9 / 8))
        assert handle.get_tensor("topk_codes").shape == (n, value_bytes(4))
        assert handle.get_tensor("topk_step").dtype == torch.float16
        assert handle.get_tensor("input_ids").dtype == torch.int32
        assert handle.get_tensor("tail_logmass").dtype == torch.float32


def test_full_k_reproduces_the_dense_distribution(tmp_path, lm):
    tokenizer, model, sequences = lm
    vocab = model.config.vocab_size
    temperature = 2.0
    expected = write_cache(
        tmp_path / "c", model, tokenizer, sequences[:2], [2, 2], k=vocab, temperature=temperature
    )
    cache = TeacherCache(tmp_path / "c")
    for i, (_ids, _p, rows, _) in enumerate(expected):
        item = cache[i]
        assert torch.allclose(item.topk_logprobs.exp().sum(-1), torch.ones(len(rows)), atol=1e-5)
        assert torch.all(item.tail_logmass == -math.inf)
        dense = torch.full_like(rows, math.nan).scatter(-1, item.topk_indices, item.topk_logprobs)
        assert torch.allclose(dense, torch.log_softmax(rows / temperature, dim=-1), atol=1e-6)


# --- batch alignment --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "compact"])
def test_batch_aligns_each_row_with_the_position_predicting_its_token(tmp_path, lm, dtype):
    tokenizer, model, sequences = lm
    prompt_lens = [1, 3, 2, 4, 2, 1]
    write_cache(tmp_path / "c", model, tokenizer, sequences, prompt_lens, k=4, dtype=dtype)
    cache = TeacherCache(tmp_path / "c")
    order = [4, 0, 5, 2]
    batch = cache.batch(order, pad_id=tokenizer.pad_token_id)
    width = max(len(sequences[i]) for i in order)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["target_mask"].shape == (4, width)
    assert batch["topk_logprobs"].shape == batch["topk_indices"].shape == (4, width, 4)
    assert batch["topk_indices"].dtype == torch.int64 and batch["target_mask"].dtype == torch.bool

    for row, i in enumerate(order):
        item, length, p = cache[i], len(sequences[i]), prompt_lens[i]
        assert batch["input_ids"][row, :length].tolist() == sequences[i]
        assert torch.all(batch["input_ids"][row, length:] == tokenizer.pad_token_id)
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (width - length)
        positions = batch["target_mask"][row].nonzero().flatten().tolist()
        assert positions == list(range(p - 1, length - 1))
        for t in positions:  # the row at t is the teacher row for token t + 1
            j = t + 1 - p
            assert batch["input_ids"][row, t + 1] == item.input_ids[p + j]
            assert torch.equal(batch["topk_logprobs"][row, t], item.topk_logprobs[j])
            assert torch.equal(batch["topk_indices"][row, t], item.topk_indices[j])
            assert batch["tail_logmass"][row, t] == item.tail_logmass[j]
        off = ~batch["target_mask"][row]
        assert torch.all(batch["topk_logprobs"][row][off] == 0) and torch.all(batch["tail_logmass"][row][off] == 0)

    # A forward pass over the padded batch gives, at target_mask, the rows that were stored.
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["target_mask"]
    logprobs, indices, _tail = teacher_topk(logits[mask], 4)
    assert torch.equal(indices, batch["topk_indices"][mask])
    assert torch.allclose(logprobs, batch["topk_logprobs"][mask], atol=1e-5 if dtype == "float32" else 0.1)


# --- refusing bad caches ------------------------------------------------------------------


def test_flipped_byte_is_caught_on_first_read_naming_the_shard(cache_dir):
    index = json.loads((cache_dir / "index.json").read_text())
    shard = cache_dir / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01
    shard.write_bytes(bytes(data))
    cache = TeacherCache(cache_dir)  # opening reads no shard: cheap
    first_of_shard_1 = index["shards"][0]["n_sequences"]
    cache[0]  # shard 0 is intact
    with pytest.raises(CacheError) as excinfo:
        cache[first_of_shard_1]
    one_line_error(excinfo, "shard-00001.safetensors", "sha256 mismatch", "dvc repro -f cache_teacher_logits")
    assert isinstance(excinfo.value, TndError)
    with pytest.raises(CacheError, match="shard-00001.safetensors"):  # batch() reads through the same check
        cache.batch([0, first_of_shard_1], pad_id=0)


def test_hashes_are_checked_once_per_process(cache_dir, monkeypatch):
    cache = TeacherCache(cache_dir)
    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    for _ in range(3):
        cache.batch(range(len(cache)), pad_id=0)
        cache.close()  # the memory maps go, and are reopened by the next read; the check is not redone
    assert len(calls) == len(cache.index["shards"])


def test_corrupted_compact_code_is_refused_without_verify(cache_dir):
    from safetensors.torch import load_file, save_file

    shard = cache_dir / "shard-00000.safetensors"
    tensors = load_file(str(shard))
    tensors["topk_codes"][0, 0] ^= 0b1
    save_file(tensors, str(shard), metadata={"format_version": str(FORMAT_VERSION)})
    index = json.loads((cache_dir / "index.json").read_text())
    index["shards"][0]["bytes"] = shard.stat().st_size
    (cache_dir / "index.json").write_text(json.dumps(index))
    with pytest.raises(CacheError) as excinfo:
        TeacherCache(cache_dir, verify=False)[0]
    one_line_error(excinfo, "shard-00000.safetensors", "corrupted", "dvc repro")


def test_truncated_shard_is_detected_even_without_verify(cache_dir):
    shard = cache_dir / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    for verify in (True, False):
        with pytest.raises(CacheError) as excinfo:
            TeacherCache(cache_dir, verify=verify)
        one_line_error(excinfo, "shard-00000.safetensors", "truncated", "dvc repro")


def test_missing_shard_and_missing_index_are_detected(cache_dir):
    (cache_dir / "shard-00002.safetensors").unlink()
    with pytest.raises(CacheError) as excinfo:
        TeacherCache(cache_dir)
    one_line_error(excinfo, "shard-00002.safetensors", "missing", "dvc repro")
    (cache_dir / "index.json").unlink()
    with pytest.raises(CacheError) as excinfo:
        TeacherCache(cache_dir)
    one_line_error(excinfo, "index.json", "missing")
    with pytest.raises(CacheError) as excinfo:
        TeacherCache(cache_dir / "nowhere")
    one_line_error(excinfo, "nowhere", "dvc repro cache_teacher_logits")


def test_bad_index_is_refused(cache_dir):
    index_path = cache_dir / "index.json"
    good = index_path.read_text()
    index_path.write_text(good[: len(good) // 2])
    with pytest.raises(CacheError) as excinfo:
        TeacherCache(cache_dir)
    one_line_error(excinfo, "index.json", "not valid JSON", "dvc repro")
    index_path.write_text(json.dumps({**json.loads(good), "format_version": 99}))
    with pytest.raises(CacheError) as excinfo:
        TeacherCache(cache_dir)
    one_line_error(excinfo, "index.json", "format_version 99")
    index_path.write_text(json.dumps({**json.loads(good), "index_bits": 16}))
    with pytest.raises(CacheError) as excinfo:
        TeacherCache(cache_dir)
    one_line_error(excinfo, "index.json", "index_bits 16")
    index = json.loads(good)
    index["shards"][0]["n_tokens"] += 1
    index_path.write_text(json.dumps(index))
    with pytest.raises(CacheError) as excinfo:
        TeacherCache(cache_dir)[0]
    one_line_error(excinfo, "shard-00000.safetensors", "index.json")


def test_stale_cache_of_the_previous_format_is_refused(cache_dir):
    """A version-2 cache (float16 log-probs, int16 indices, sha256 checked at open) gets one line to rerun."""
    index_path = cache_dir / "index.json"
    stale = {key: value for key, value in json.loads(index_path.read_text()).items()
             if key not in ("index_bits", "value_bytes", "levels", "reconstruction_kl")}
    index_path.write_text(json.dumps({**stale, "format_version": 2, "dtype": "float16"}))
    with pytest.raises(CacheError) as excinfo:
        TeacherCache(cache_dir)
    one_line_error(excinfo, "index.json", "older cache format_version 2", f"reads version {FORMAT_VERSION}",
                   "dvc repro -f cache_teacher_logits")


def test_other_tokenizer_or_teacher_is_refused(cache_dir, lm):
    tokenizer, model, _ = lm
    other_tokenizer = train_bpe(SENTENCES[:3] + ["zebras quietly eat green apples"], vocab_size=300, min_frequency=1)
    assert fingerprint_tokenizer(other_tokenizer) != fingerprint_tokenizer(tokenizer)
    with pytest.raises(CacheError) as excinfo:
        TeacherCache(cache_dir, tokenizer_fingerprint=fingerprint_tokenizer(other_tokenizer))
    one_line_error(excinfo, "index.json", "different tokenizer", "dvc repro -f cache_teacher_logits")

    other_model = build_causal_lm(ARCH, tokenizer, seed=1)
    with pytest.raises(CacheError) as excinfo:
        TeacherCache(cache_dir, teacher_fingerprint=fingerprint_model(other_model))
    one_line_error(excinfo, "index.json", "different teacher")

    TeacherCache(cache_dir, fingerprint_model(model), fingerprint_tokenizer(tokenizer))  # the right ones pass


def test_fingerprints_survive_save_and_load(tmp_path, lm):
    from transformers import AutoModelForCausalLM

    tokenizer, model, _ = lm
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    assert fingerprint_model(AutoModelForCausalLM.from_pretrained(tmp_path / "m")) == fingerprint_model(model)
    assert fingerprint_tokenizer(load_tokenizer(tmp_path / "m")) == fingerprint_tokenizer(tokenizer)
    changed = build_causal_lm(ARCH, tokenizer, seed=0)
    assert fingerprint_model(changed) == fingerprint_model(model)
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 1e-3
    assert fingerprint_model(changed) != fingerprint_model(model)


def test_shard_not_in_index_is_ignored(cache_dir, lm):
    """A crash after writing a shard but before index.json leaves a stray file: ignored."""
    before = len(TeacherCache(cache_dir))
    index = json.loads((cache_dir / "index.json").read_text())
    stray = cache_dir / f"shard-{len(index['shards']):05d}.safetensors"
    stray.write_bytes(b"half a shard")
    (cache_dir / ".shard-00099.safetensors.abc.tmp").write_bytes(b"temp file of a write in progress")
    cache = TeacherCache(cache_dir)
    assert len(cache) == before


def test_writer_crash_leaves_no_index(tmp_path, lm):
    tokenizer, model, sequences = lm
    with pytest.raises(RuntimeError, match="boom"):
        with CacheWriter(tmp_path / "c", vocab_size=model.config.vocab_size, k=3, shard_tokens=4) as writer:
            for ids in sequences:
                writer.add(ids, 2, logits_for(model, ids)[1:-1])
            raise RuntimeError("boom")
    assert list((tmp_path / "c").glob("shard-*.safetensors"))  # shards were written ...
    with pytest.raises(CacheError) as excinfo:  # ... but without an index, nothing reads as valid
        TeacherCache(tmp_path / "c")
    one_line_error(excinfo, "index.json", "missing")


def test_writer_rejects_misaligned_rows(tmp_path, lm):
    _tokenizer, model, sequences = lm
    writer = CacheWriter(tmp_path / "c", vocab_size=model.config.vocab_size, k=3)
    ids = sequences[0]
    with pytest.raises(ValueError, match="one per continuation token"):
        writer.add(ids, 2, logits_for(model, ids)[1:])  # one row too many


def test_writer_sorts_unsorted_top_k_rows_for_the_compact_code(tmp_path):
    writer = CacheWriter(tmp_path / "c", vocab_size=10, k=3)
    logprobs = torch.log(torch.tensor([[0.2, 0.5, 0.1]]))
    writer.add_topk([1, 2], 1, logprobs, torch.tensor([[4, 7, 9]]), torch.log(torch.tensor([0.2])))
    writer.close()
    item = TeacherCache(tmp_path / "c")[0]
    assert item.topk_indices.tolist() == [[7, 4, 9]]
    assert torch.allclose(item.topk_logprobs.exp(), torch.tensor([[0.5, 0.2, 0.1]]), atol=0.02)


# --- one cache, one process or several ------------------------------------------------------------


def _tiny_teacher():
    torch.manual_seed(0)
    tokenizer = train_bpe(SENTENCES, vocab_size=300, min_frequency=1)
    model = build_causal_lm(ARCH, tokenizer, seed=0).eval()
    prompts = [[tokenizer.bos_token_id, *encode(tokenizer, s)[: 1 + i % 3]] for i, s in enumerate(SENTENCES[:22])]
    return tokenizer, model, prompts


CACHE_ARGS = {"k": 6, "max_new_tokens": 5, "seed": 7, "batch_size": 3, "shard_tokens": 30, "chunk_tokens": 8,
              "progress": False}


def _cache_worker(rank: int, port: int, out_dir: str) -> None:
    from accelerate import Accelerator

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.manual_seed(100 + rank)  # the global RNG differs per process: sampling must not read it
    tokenizer, model, prompts = _tiny_teacher()
    index = write_teacher_cache(Path(out_dir) / "cache", model, tokenizer, prompts, accelerator=Accelerator(cpu=True),
                                **CACHE_ARGS)
    assert (index is None) == (rank != 0)


def test_one_process_and_two_write_the_same_cache(tmp_path):
    tokenizer, model, prompts = _tiny_teacher()
    index = write_teacher_cache(tmp_path / "one", model, tokenizer, prompts, **CACHE_ARGS)
    assert len(index["shards"]) == 4  # 22 prompts, shards of 6 (two batches of 3: 30 // (5 x 3) batches)
    mp.spawn(_cache_worker, args=(free_port(), str(tmp_path / "two")), nprocs=2, join=True)
    one = {p.name: p.read_bytes() for p in (tmp_path / "one").iterdir()}
    two = {p.name: p.read_bytes() for p in (tmp_path / "two" / "cache").iterdir()}
    assert sorted(one) == ["index.json"] + [f"shard-{i:05d}.safetensors" for i in range(4)]
    index_one, index_two = (json.loads(files.pop("index.json")) for files in (one, two))
    assert one == two  # the same shards, byte for byte
    # and the same index, but for the reconstruction KL: a diagnostic of the teacher's unrounded log-probs, whose
    # last bits follow the threads the matrix products ran on (accelerate sets one per process)
    kl_one, kl_two = index_one.pop("reconstruction_kl"), index_two.pop("reconstruction_kl")
    assert index_one == index_two
    assert kl_two == pytest.approx(kl_one, rel=1e-4)
    cache = TeacherCache(tmp_path / "two" / "cache", fingerprint_model(model), fingerprint_tokenizer(tokenizer))
    assert [cache[i].input_ids[: len(p)].tolist() for i, p in enumerate(prompts)] == prompts  # prompt order
    continuations = [cache[i].input_ids[len(p) :].tolist() for i, p in enumerate(prompts)]
    assert len({tuple(c) for c in continuations}) > len(prompts) // 2  # sampled, not all alike


# --- the stage ------------------------------------------------------------------------------


@pytest.mark.slow
def test_stage_end_to_end(project):
    import stages.cache_teacher_logits
    import stages.prepare_data
    import stages.train_teacher
    from stages.common import CACHE, TEACHER, TOKENIZER
    from tnd.models import load_causal_lm

    cache_params = {"n_prompts": 50, "max_new_tokens": 6, "top_k": 8, "batch_size": 16, "shard_tokens": 64}
    project.write(cache=cache_params)  # 50 > data.n_prompts (40): prompts are cycled
    stages.prepare_data.main([])
    stages.train_teacher.main([])
    stages.cache_teacher_logits.main([])

    tokenizer = load_tokenizer(TOKENIZER)
    teacher = load_causal_lm(TEACHER, tokenizer, role="teacher")
    cache = TeacherCache(CACHE, fingerprint_model(teacher), fingerprint_tokenizer(tokenizer))
    assert len(cache) == 50
    index = json.loads((Path(CACHE) / "index.json").read_text())
    assert len(index["shards"]) > 1 and index["k"] == 8 and index["dtype"] == "compact"
    metrics = json.loads(Path("metrics/cache.json").read_text())
    assert metrics["n_sequences"] == 50 and metrics["n_tokens"] == cache.n_tokens > 0
    assert metrics["dense_fp16_bytes_per_token"] == 2 * len(tokenizer)
    assert metrics["compression_vs_dense"] > 1 and metrics["format"] == "compact" and metrics["processes"] == 1
    for key in ("bytes_on_disk", "bytes_per_token", "write_seconds", "tokens_per_second", "reconstruction_kl_mean"):
        assert metrics[key] > 0
    assert metrics["reconstruction_kl_mean"] == index["reconstruction_kl"]["mean"] < 1e-3

    # The stored rows are the teacher's: recompute one sequence.
    item = cache[7]
    assert 1 <= len(item.input_ids) - item.prompt_len <= 6
    with torch.no_grad():
        rows = teacher(input_ids=item.input_ids[None]).logits[0, item.prompt_len - 1 : -1, : len(tokenizer)]
    logprobs, indices, tail = teacher_topk(rows, 8)
    assert torch.equal(item.topk_indices, indices)
    assert torch.allclose(item.topk_logprobs, logprobs, atol=0.05)
    assert torch.allclose(item.tail_logmass, tail, atol=1e-4)

    # Same params, same cache (deterministic on CPU); the rerun replaces the directory whole.
    files = {p.name: p.read_bytes() for p in Path(CACHE).iterdir()}
    stages.cache_teacher_logits.main([])
    assert {p.name: p.read_bytes() for p in Path(CACHE).iterdir()} == files

    project.write(cache={**cache_params, "top_k": 100000})
    with pytest.raises(SystemExit) as excinfo:
        stages.cache_teacher_logits.main([])
    assert excinfo.value.code == 2


@pytest.mark.slow
def test_stage_in_two_processes_writes_the_same_files(project, monkeypatch):
    """engine.processes: 2 relaunches the stage under `accelerate launch` (gloo on CPU): the same cache."""
    import sys

    import stages.cache_teacher_logits
    import stages.prepare_data
    import stages.train_teacher
    from stages.common import CACHE

    cache_params = {"n_prompts": 40, "max_new_tokens": 6, "top_k": 8, "batch_size": 4, "shard_tokens": 24}
    project.write(cache=cache_params)
    stages.prepare_data.main([])
    stages.train_teacher.main([])
    stages.cache_teacher_logits.main([])
    one = {p.name: p.read_bytes() for p in Path(CACHE).iterdir()}
    assert len(one) == 11  # index.json + 10 shards of one batch each

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(sys.path))
    project.write(cache=cache_params, engine={"processes": 2})
    stages.cache_teacher_logits.main([])
    assert {p.name: p.read_bytes() for p in Path(CACHE).iterdir()} == one
    assert json.loads(Path("metrics/cache.json").read_text())["processes"] == 2
