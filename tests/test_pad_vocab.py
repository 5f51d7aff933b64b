"""tokenizer.pad_vocab_to: the built-in teacher and student get that many embedding and output rows (the cost of a
larger vocabulary; params/gpu_small.yaml), the rows past the tokenizer are never sampled, and the vocabulary
checks take a padded model while refusing a real mismatch."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tnd.cache import TeacherCache, write_teacher_cache
from tnd.config import ArchParams, ParamsError, parse_params
from tnd.data.nursery import generate_sentences
from tnd.data.tokenizer import encode, load_tokenizer, train_bpe
from tnd.errors import TndError
from tnd.generation import sample_continuations
from tnd.models import build_causal_lm, load_causal_lm, save_model

ARCH = ArchParams(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
PADDED = 512


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("artifacts") / "tokenizer"
    train_bpe(generate_sentences(500, 0), vocab_size=300).save_pretrained(path)
    tokenizer = load_tokenizer(path)
    assert len(tokenizer) < PADDED
    return tokenizer


def prompts(tokenizer, n: int = 6) -> list[list[int]]:
    return [[tokenizer.bos_token_id] + encode(tokenizer, s)[:2] for s in generate_sentences(n, 1)]


def favour_the_padding(model, tokenizer):
    """`model` with its logits past the tokenizer raised by 50: unmasked, it would sample only padded ids."""
    def hook(module, args, logits):
        logits = logits.clone()
        logits[..., len(tokenizer):] += 50.0
        return logits

    model.lm_head.register_forward_hook(hook)
    return model.eval()


def test_a_padded_model_has_the_padded_rows_and_loads_back(tokenizer, tmp_path):
    model = build_causal_lm(ARCH, tokenizer, seed=0, pad_vocab_to=PADDED)
    assert model.get_input_embeddings().num_embeddings == PADDED and model.lm_head.out_features == PADDED
    ids = torch.tensor(prompts(tokenizer, 2))
    assert model(input_ids=ids).logits.shape == (2, ids.shape[1], PADDED)
    assert build_causal_lm(ARCH, tokenizer, seed=0).lm_head.out_features == len(tokenizer)  # null: one row per token
    save_model(model, tokenizer, tmp_path / "teacher")
    loaded = load_causal_lm(tmp_path / "teacher", tokenizer, role="teacher")  # the vocabulary check lets it through
    assert loaded.config.vocab_size == PADDED


def test_padding_below_the_tokenizer_is_refused(tokenizer):
    with pytest.raises(TndError) as info:
        build_causal_lm(ARCH, tokenizer, seed=0, pad_vocab_to=len(tokenizer) - 1)
    assert str(info.value) == (f"tokenizer.pad_vocab_to = {len(tokenizer) - 1} is smaller than the tokenizer's "
                               f"{len(tokenizer)} tokens; set it to at least {len(tokenizer)}, or null")
    with pytest.raises(ParamsError, match=r"^params.yaml: tokenizer: pad_vocab_to \(1000\) must be at least "
                                          r"vocab_size \(2048\)"):
        parse_params({"tokenizer": {"pad_vocab_to": 1000}})
    assert parse_params({"tokenizer": {"source": "gpt2", "pad_vocab_to": 1000}}).tokenizer.pad_vocab_to == 1000


def test_a_padded_model_of_another_tokenizer_is_refused(tokenizer, tmp_path):
    other = train_bpe(generate_sentences(500, 7), vocab_size=300)  # other merges; both fit the 512 rows
    save_model(build_causal_lm(ARCH, other, seed=0, pad_vocab_to=PADDED), other, tmp_path / "student")
    with pytest.raises(TndError, match=r"^student: the tokenizer of .* differs from the pipeline's"):
        load_causal_lm(tmp_path / "student", tokenizer, role="student")


def test_padded_ids_are_never_sampled_nor_cached(tokenizer, tmp_path):
    model = favour_the_padding(build_causal_lm(ARCH, tokenizer, seed=0, pad_vocab_to=PADDED), tokenizer)
    batch = prompts(tokenizer)
    with torch.no_grad():
        assert (model(input_ids=torch.tensor(batch)).logits.argmax(-1) >= len(tokenizer)).all()  # the worst case
    samples = sample_continuations(model, tokenizer, batch, max_new_tokens=8, seed=0, progress=False)
    assert max(t for s in samples for t in s) < len(tokenizer)
    # the teacher's demonstrations and their top-k, as cache_teacher_logits writes them
    write_teacher_cache(tmp_path / "cache", model, tokenizer, batch, k=8, max_new_tokens=8, seed=0, progress=False)
    with TeacherCache(tmp_path / "cache") as cache:
        rows = [cache[i] for i in range(len(cache))]
    assert max(int(row.input_ids.max()) for row in rows) < len(tokenizer)
    assert max(int(row.topk_indices.max()) for row in rows) < len(tokenizer)


def test_the_project_samples_in_one_masked_function():
    # Every sampling site (teacher samples and demonstrations, PPO trials, evaluation) goes through
    # tnd.generation.sample_continuations, which masks the padded ids: no other code may sample.
    # The one exception: the sampled cache's draws of targets (tnd/cache/writer.py sample_targets) sample no
    # text, and their logits are cut to the tokenizer's ids before they get there (teacher_rows' [:, :vocab_size]).
    allowed = {ROOT / "tnd" / "generation.py", ROOT / "tnd" / "cache" / "writer.py"}
    sites = [f"{path.relative_to(ROOT)}:{n}" for folder in ("tnd", "stages") for path in (ROOT / folder).rglob("*.py")
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if re.search(r"\.generate\(|multinomial\(", line) and path not in allowed]
    assert sites == []
    writer = (ROOT / "tnd" / "cache" / "writer.py").read_text()
    assert writer.count("multinomial(") == 1 and ".generate(" not in writer and "[:, :vocab_size]" in writer
    assert Path(ROOT / "tnd" / "generation.py").read_text().count(".generate(") == 1
