"""The teacher-logit cache: exact round trip, dense equivalence at k = V, alignment of
`batch()`, detection of corrupted/stale caches, and the stage end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tnd.cache import (
    CacheError,
    CacheWriter,
    TeacherCache,
    fingerprint_model,
    fingerprint_tokenizer,
    teacher_topk,
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
    write_cache(tmp_path / "teacher", model, tokenizer, sequences, [2] * len(sequences), k=4)
    return tmp_path / "teacher"


def one_line_error(excinfo, *needles: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


# --- round trip -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_is_exact(tmp_path, lm, dtype):
    tokenizer, model, sequences = lm
    prompt_lens = [1, 2, 3, len(sequences[3]), 2, 1]  # one sequence with no continuation at all
    expected = write_cache(tmp_path / "c", model, tokenizer, sequences, prompt_lens, k=5, dtype=dtype)
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    assert len(index["shards"]) > 1  # shard_tokens=8 splits it
    assert index["n_sequences"] == len(sequences)
    assert index["n_tokens"] == sum(len(s) - p for s, p in zip(sequences, prompt_lens))
    assert (index["k"], index["dtype"], index["vocab_size"]) == (5, dtype, model.config.vocab_size)

    cache = TeacherCache(tmp_path / "c", fingerprint_model(model), fingerprint_tokenizer(tokenizer))
    assert len(cache) == len(sequences) and cache.n_tokens == index["n_tokens"]
    store = getattr(torch, dtype)
    for i, (ids, p, _rows, (logprobs, indices, tail)) in enumerate(expected):
        item = cache[i]
        assert item.input_ids.tolist() == ids and item.prompt_len == p
        assert torch.equal(item.topk_logprobs, logprobs.to(store).float())
        assert torch.equal(item.topk_indices, indices)
        assert torch.equal(item.tail_logmass, tail)
        assert item.topk_indices.dtype == torch.int64
    assert cache[-1].input_ids.tolist() == sequences[-1]
    with pytest.raises(IndexError):
        cache[len(sequences)]


def test_indices_are_int16_for_small_vocab(cache_dir):
    from safetensors import safe_open

    with safe_open(str(cache_dir / "shard-00000.safetensors"), "pt") as handle:
        assert handle.get_tensor("topk_indices").dtype == torch.int16
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


def test_tail_logmass_is_the_mass_outside_the_topk(lm):
    _tokenizer, model, sequences = lm
    rows = logits_for(model, sequences[0]).double() * 5  # peaked, so the tail is small
    logprobs, indices, tail = teacher_topk(rows, 3)
    probs = torch.softmax(rows, dim=-1)  # float64 reference
    reference = torch.log1p(-probs.gather(-1, indices).sum(-1))
    assert torch.allclose(tail.double(), reference, atol=1e-4)
    assert torch.allclose(logprobs.double(), probs.gather(-1, indices).log(), atol=1e-5)
    assert torch.all(logprobs[:, :-1] >= logprobs[:, 1:])  # sorted, most likely first


# --- batch alignment --------------------------------------------------------------------


def test_batch_aligns_each_row_with_the_position_predicting_its_token(tmp_path, lm):
    tokenizer, model, sequences = lm
    prompt_lens = [1, 3, 2, 4, 2, 1]
    write_cache(tmp_path / "c", model, tokenizer, sequences, prompt_lens, k=4)
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
    assert torch.allclose(logprobs, batch["topk_logprobs"][mask], atol=1e-5)


# --- refusing bad caches ------------------------------------------------------------------


def test_flipped_byte_is_detected(cache_dir):
    shard = cache_dir / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError) as excinfo:
        TeacherCache(cache_dir)
    one_line_error(excinfo, "shard-00001.safetensors", "sha256 mismatch", "dvc repro -f cache_teacher_logits")
    assert isinstance(excinfo.value, TndError)


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
    index = json.loads(good)
    index["shards"][0]["n_tokens"] += 1
    index_path.write_text(json.dumps(index))
    with pytest.raises(CacheError) as excinfo:
        TeacherCache(cache_dir)
    one_line_error(excinfo, "shard-00000.safetensors", "do not match index.json")


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


def test_cache_is_picklable(cache_dir):
    import pickle

    cache = TeacherCache(cache_dir)
    clone = pickle.loads(pickle.dumps(cache))
    assert torch.equal(clone[3].topk_logprobs, cache[3].topk_logprobs)


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
    assert len(index["shards"]) > 1 and index["k"] == 8 and index["dtype"] == "float16"
    metrics = json.loads(Path("metrics/cache.json").read_text())
    assert metrics["n_sequences"] == 50 and metrics["n_tokens"] == cache.n_tokens > 0
    assert metrics["dense_fp16_bytes_per_token"] == 2 * len(tokenizer)
    assert metrics["compression_vs_dense"] > 1
    for key in ("bytes_on_disk", "bytes_per_token", "write_seconds", "tokens_per_second"):
        assert metrics[key] > 0

    # The stored rows are the teacher's: recompute one sequence.
    item = cache[7]
    assert 1 <= len(item.input_ids) - item.prompt_len <= 6
    with torch.no_grad():
        rows = teacher(input_ids=item.input_ids[None]).logits[0, item.prompt_len - 1 : -1, : len(tokenizer)]
    logprobs, indices, tail = teacher_topk(rows, 8)
    assert torch.allclose(item.topk_logprobs, logprobs, atol=1e-2)
    assert torch.allclose(item.tail_logmass, tail, atol=1e-4)

    # Same params, same cache (deterministic on CPU); the rerun replaces the directory whole.
    stages.cache_teacher_logits.main([])
    assert json.loads((Path(CACHE) / "index.json").read_text()) == index

    project.write(cache={**cache_params, "top_k": 100000})
    with pytest.raises(SystemExit) as excinfo:
        stages.cache_teacher_logits.main([])
    assert excinfo.value.code == 2
