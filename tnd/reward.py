"""The reward model as the pipeline uses it: built or loaded, and scoring token ids and texts.

A sequence classifier with one scalar output. Texts are scored as bos + text + eos (as in
`tnd.batching.encode_for_lm`), right-padded, and the classifier reads the last non-pad token (HF finds
it through `config.pad_token_id`). Token-id sequences -- PPO's trials, the cached demonstrations,
evaluate's samples, the age rows' "ids" -- all go through `score_token_ids`: bos in front when missing,
no eos added, scored whole, refused in one line when longer than the model's positions or holding an id
it lacks. So a stored reward is the one PPO computes. How the model is trained:
tnd/trainers/reward.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from tnd.batching import collate, encode_for_lm
from tnd.data.tokenizer import encode
from tnd.errors import TndError, one_line
from tnd.models import check_vocab, llama_config

if TYPE_CHECKING:  # annotations only: the trainer runs without pydantic (the GPU image)
    from tnd.config import ArchParams

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


# --- building and loading ---------------------------------------------------------


def build_reward_model(arch: ArchParams, tokenizer: PreTrainedTokenizerBase, seed: int) -> LlamaForSequenceClassification:
    """A Llama-style decoder with a scalar head on the last non-pad token."""
    torch.manual_seed(seed)
    config = llama_config(arch, tokenizer, num_labels=1)
    config.pad_token_id = tokenizer.pad_token_id
    return LlamaForSequenceClassification(config)


def load_reward_model(source: str | Path, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A sequence classifier (save_pretrained dir or hub name) with one output and a vocabulary that fits."""
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(source))
    except Exception as exc:
        raise TndError(
            f"reward: could not load a sequence classifier from '{source}' ({one_line(exc, 200)}); "
            "check reward.source or rerun `dvc repro train_reward`"
        ) from None
    num_labels = model.config.num_labels
    if num_labels != 1:
        raise TndError(
            f"reward: the model at '{source}' has {num_labels} outputs (num_labels={num_labels}), a reward model "
            "needs exactly 1; use a scalar-head classifier or set reward.source: builtin"
        )
    check_vocab(model, tokenizer, "reward", source)
    # Batches are padded with the tokenizer's pad id; the head must look for that one.
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model


# --- scoring ----------------------------------------------------------------------


def forward_rewards(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The scalar head's output [B] (float32) for a collated batch, with the graph (training uses it too)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits.squeeze(-1).float()


def score_encoded(model: nn.Module, pad_id: int, sequences: list[list[int]], batch_size: int) -> torch.Tensor:
    """Rewards (float32 [n], on the CPU, no grad) of sequences encoded already, batch_size at a time, in eval mode."""
    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    scores = []
    try:
        with torch.no_grad():
            for start in range(0, len(sequences), batch_size):
                batch = collate(sequences[start : start + batch_size], pad_id)
                batch = {key: value.to(device) for key, value in batch.items()}
                scores.append(forward_rewards(model, batch).cpu())
    finally:
        model.train(was_training)
    return torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float32)


def with_bos(ids: Sequence[int] | torch.Tensor, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The one way a token-id sequence is prepared for the reward model: a bos in front when missing
    (every training sequence starts with one); an eos is never added, so an unfinished sample is scored
    as unfinished (the age model trained on such sequences; a text-trained one extrapolates, see
    `RewardTrainer._sequences`); an empty sequence with no bos is scored as the pad token alone."""
    ids = [int(t) for t in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids or [tokenizer.pad_token_id]


def check_scorable(model: nn.Module, sequences: list[list[int]]) -> None:
    """Refuse, in one line, what the reward model cannot score whole: a sequence longer than its
    positions (cutting it would score another text: the head reads the last token) or an id its
    embeddings lack (a raw IndexError, a device-side assert on CUDA)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    longest = max(map(len, sequences), default=0)
    if limit and longest > limit:
        raise TndError(
            f"reward: a sequence of {longest} tokens (bos included) is longer than the reward model's "
            f"max_position_embeddings ({limit}); lower the max_new_tokens that made it (ppo, cache or eval) "
            "or use a reward model with more positions (reward.arch.max_position_embeddings)"
        )
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    top = max((max(seq) for seq in sequences if seq), default=0)
    low = min((min(seq) for seq in sequences if seq), default=0)
    if rows is not None and (top >= rows or low < 0):
        bad = top if top >= rows else low
        raise TndError(
            f"reward: token id {bad} is outside the reward model's {rows} embeddings; the sequences come from "
            "another tokenizer or a model whose vocabulary is not the pipeline's: use models made with the "
            "pipeline's tokenizer (artifacts/tokenizer)"
        )


def score_token_ids(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    sequences: Iterable[Sequence[int] | torch.Tensor],
    batch_size: int | None = 64,
) -> torch.Tensor:
    """Rewards (float32 [n], on the CPU, no grad) of token-id sequences: how every reward the pipeline
    uses is computed -- PPO's trials (CustomPPOTrainer.compute_scores), the cached demonstrations
    (score_rewards) and evaluate's samples -- so a stored reward is the one PPO would compute.

    Each sequence goes through `with_bos` and is scored whole (never cut: `check_scorable` refuses
    what does not fit), right-padded, batch_size at a time (None: all in one batch), on the model's
    device; the classifier reads the last non-pad token.
    """
    encoded = [with_bos(seq, tokenizer) for seq in sequences]
    check_scorable(model, encoded)
    return score_encoded(model, tokenizer.pad_token_id, encoded, batch_size or max(len(encoded), 1))


def score_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int = 64,
    max_length: int = 48,
) -> torch.Tensor:
    """Rewards (float32 [n], no grad) of texts encoded as in reward training: bos + text + eos, cut to
    max_length (reward.train.max_length; `count_cut` counts the texts this cuts)."""
    return score_token_ids(model, tokenizer, encode_for_lm(tokenizer, list(texts), max_length), batch_size)


def count_cut(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> int:
    """How many texts score_texts cuts (bos + text + eos longer than max_length)."""
    return sum(len(encode(tokenizer, text)) + 2 > max_length for text in texts)


def reward_stats(rewards: torch.Tensor) -> dict:
    """Summary of the finite rewards; non-finite ones (nan, +-inf) are only counted.

    count is the number of rewards given, nan_count the non-finite ones among them;
    the statistics are None when no reward is finite.
    """
    values = torch.as_tensor(rewards).detach().flatten().double().cpu()
    finite = values[torch.isfinite(values)]
    stats: dict = {
        "count": int(values.numel()),
        "nan_count": int(values.numel() - finite.numel()),
        "nonfinite_fraction": float((values.numel() - finite.numel()) / values.numel()) if values.numel() else 0.0,
    }
    if finite.numel() == 0:
        stats.update({"mean": None, "std": None, "min": None, "max": None})
        stats.update({f"q{round(q * 100):02d}": None for q in QUANTILES})
        return stats
    stats.update(
        {
            "mean": float(finite.mean()),
            "std": float(finite.std(unbiased=False)),
            "min": float(finite.min()),
            "max": float(finite.max()),
        }
    )
    quantiles = torch.quantile(finite, torch.tensor(QUANTILES, dtype=torch.float64))
    stats.update({f"q{round(q * 100):02d}": float(v) for q, v in zip(QUANTILES, quantiles)})
    return stats
