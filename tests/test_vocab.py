"""Token ids mean the same to every model: the tokenizer checks of teacher, student and reward model,
sampling within the tokenizer's ids, and no out-of-range id ever reaching the reward model."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer
from torch import nn
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from tests.test_reward import ARCH, _sentences
from tnd.cache import fingerprint_tokenizer, fingerprint_vocabulary
from tnd.data.tokenizer import BOS, EOS, PAD, encode, load_tokenizer, train_bpe
from tnd.errors import TndError
from tnd.generation import sample_continuations
from tnd.models import build_causal_lm, llama_config, load_causal_lm, save_model
from tnd.trainers import CustomPPOConfig, CustomPPOTrainer
from tnd.reward import build_reward_model, load_reward_model


@pytest.fixture(scope="module")
def pipeline_tokenizer(tmp_path_factory):
    """The pipeline's tokenizer, loaded from its directory as the stages do (so it has a path)."""
    path = tmp_path_factory.mktemp("artifacts") / "tokenizer"
    train_bpe(_sentences(500, 0), vocab_size=300).save_pretrained(path)
    return load_tokenizer(path)


def _variant(tokenizer, edit) -> PreTrainedTokenizerFast:
    """A copy of `tokenizer` whose BPE model (vocab, merges) `edit` changed in place."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    edit(spec["model"])
    core = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS)


def _swap_two_ids(model: dict) -> None:
    vocab = model["vocab"]
    a, b = sorted(token for token, i in vocab.items() if i > 10)[:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]


def _drop_last_merge(model: dict) -> None:
    model["merges"] = model["merges"][:-1]


def test_the_fingerprint_covers_merges_and_survives_save_and_load(pipeline_tokenizer, tmp_path):
    fewer_merges = _variant(pipeline_tokenizer, _drop_last_merge)
    assert fewer_merges.get_vocab() == pipeline_tokenizer.get_vocab()  # the vocabulary alone cannot tell
    assert fingerprint_vocabulary(fewer_merges) != fingerprint_vocabulary(pipeline_tokenizer)
    assert fingerprint_tokenizer(fewer_merges) != fingerprint_tokenizer(pipeline_tokenizer)
    pipeline_tokenizer.save_pretrained(tmp_path / "t")
    again = load_tokenizer(tmp_path / "t")
    assert fingerprint_vocabulary(again) == fingerprint_vocabulary(pipeline_tokenizer)
    assert fingerprint_tokenizer(again) == fingerprint_tokenizer(pipeline_tokenizer)


@pytest.mark.parametrize("edit", [_swap_two_ids, _drop_last_merge], ids=["ids-swapped", "merges-differ"])
def test_a_student_with_a_same_sized_other_tokenizer_is_refused(pipeline_tokenizer, tmp_path, edit):
    other = _variant(pipeline_tokenizer, edit)
    assert len(other) == len(pipeline_tokenizer)  # the size check alone lets it through
    save_model(build_causal_lm(ARCH, other, seed=0), other, tmp_path / "student")
    with pytest.raises(TndError) as excinfo:
        load_causal_lm(tmp_path / "student", pipeline_tokenizer, role="student")
    message = str(excinfo.value)
    assert "\n" not in message and message.startswith("student: the tokenizer of ")
    assert str(tmp_path / "student") in message and str(pipeline_tokenizer.name_or_path) in message
    assert "tokenizer.source" in message


def test_a_reward_model_with_another_tokenizer_is_refused(pipeline_tokenizer, tmp_path):
    other = _variant(pipeline_tokenizer, _swap_two_ids)
    save_model(build_reward_model(ARCH, other, seed=0), other, tmp_path / "rm")
    with pytest.raises(TndError, match=r"^reward: the tokenizer of .* differs from the pipeline's"):
        load_reward_model(tmp_path / "rm", pipeline_tokenizer)


def test_models_saved_with_the_pipeline_tokenizer_load(pipeline_tokenizer, tmp_path):
    save_model(build_causal_lm(ARCH, pipeline_tokenizer, seed=0), pipeline_tokenizer, tmp_path / "teacher")
    load_causal_lm(tmp_path / "teacher", pipeline_tokenizer, role="teacher")


def test_weights_without_a_tokenizer_fall_back_to_the_size_check(pipeline_tokenizer, tmp_path):
    build_causal_lm(ARCH, pipeline_tokenizer, seed=0).save_pretrained(tmp_path / "bare")
    load_causal_lm(tmp_path / "bare", pipeline_tokenizer, role="student")  # no tokenizer there: sizes agree
    config = llama_config(ARCH, pipeline_tokenizer)
    config.vocab_size = len(pipeline_tokenizer) - 5
    LlamaForCausalLM(config).save_pretrained(tmp_path / "small")
    with pytest.raises(TndError, match=r"model vocabulary \(\d+\) is smaller than the tokenizer's"):
        load_causal_lm(tmp_path / "small", pipeline_tokenizer, role="student")


# --- padded embeddings (legal: Qwen pads to a multiple of 64) --------------------------------------


def _padded_lm(tokenizer, extra: int = 8) -> LlamaForCausalLM:
    """A causal LM with `extra` embedding rows beyond the tokenizer, and a head that all but always
    picks one of them -- the worst case of a padded vocabulary."""
    config = llama_config(ARCH, tokenizer)
    config.vocab_size = len(tokenizer) + extra
    config.tie_word_embeddings = False
    model = LlamaForCausalLM(config)
    head = nn.Linear(ARCH.hidden_size, config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[len(tokenizer) :] = 30.0
    model.lm_head = head
    return model


def test_sampling_keeps_to_the_tokenizer_ids(pipeline_tokenizer):
    model = _padded_lm(pipeline_tokenizer)
    prompts = [[pipeline_tokenizer.bos_token_id] + encode(pipeline_tokenizer, s) for s in _sentences(6, 1)]
    samples = sample_continuations(model, pipeline_tokenizer, prompts, max_new_tokens=8, seed=0, progress=False)
    ids = [t for s in samples for t in s]
    assert ids and max(ids) < len(pipeline_tokenizer)


def test_a_padded_student_never_hands_the_reward_model_an_id_it_lacks(pipeline_tokenizer):
    tok = pipeline_tokenizer
    prompts = [[tok.bos_token_id] + encode(tok, s)[:2] for s in _sentences(8, 2)]
    reward = build_reward_model(ARCH, tok, seed=3)  # exactly the tokenizer's rows
    config = CustomPPOConfig(
        steps=1, batch_size=4, mini_batch_size=2, ppo_epochs=1, max_new_tokens=6, mode="trials_only",
        padding_free=False, kernel_backend="torch", seed=0,
    )
    trainer = CustomPPOTrainer(
        build_causal_lm(ARCH, tok, 1), _padded_lm(tok), reward, config, prompts, tokenizer=tok
    )
    stats = trainer.step(prompts[:4])
    assert stats["skipped"] == 0.0 and torch.isfinite(torch.tensor(stats["env/reward_mean"]))


def test_the_trainer_refuses_a_reward_model_smaller_than_the_tokenizer(pipeline_tokenizer):
    from transformers import LlamaForSequenceClassification

    tok = pipeline_tokenizer
    config = llama_config(ARCH, tok, num_labels=1)
    config.vocab_size = len(tok) - 5
    small = LlamaForSequenceClassification(config)
    ppo = CustomPPOConfig(steps=1, batch_size=4, mini_batch_size=2, mode="trials_only", kernel_backend="torch")
    with pytest.raises(TndError, match=r"^reward: model vocabulary \(\d+\) is smaller than the tokenizer's"):
        CustomPPOTrainer(
            build_causal_lm(ARCH, tok, 1), build_causal_lm(ARCH, tok, 2), small, ppo, [[1, 5]], tokenizer=tok
        )
