"""The reward model: a sequence classifier with one scalar output, and how it is trained.

Two losses (reward.objective):
  pairwise   -- Bradley-Terry on preference pairs {"chosen", "rejected", "kind"}:
                loss = -log sigmoid(r(chosen) - r(rejected) - margin)
  regression -- mean squared error to a numeric label, on rows {"text", "label"}
                (`tnd.data.sources.load_labelled_texts`)
  age        -- the same regression, on samples of the teacher's pretraining checkpoints labelled
                log2(step), rows {"text", "ids", "label"} (stage sample_ages): the TnD paper's age predictor

Texts are always scored as bos + text + eos (as in `tnd.batching.encode_for_lm`),
right-padded, and the classifier reads the last non-pad token (HF finds it through
`config.pad_token_id`). Token-id sequences -- PPO's trials, the cached demonstrations,
evaluate's samples, the age rows' "ids" -- all go through `score_token_ids`: bos in front when
missing, no eos added, scored whole, refused in one line when longer than the model's positions
or holding an id it lacks. So the age model trains on exactly the sequences PPO scores
(`RewardTrainer._sequences`); what the texts of the other objectives leave out is said there.
Training runs in the loop the teacher's has (tnd/trainers/fit.py: AdamW, linear warm-up and cosine
decay, seeded random mini-batches, gradient clipping, a progress bar, on accelerate's engine) with
the same held-out validation (`Validation`: every cfg.train.eval_every steps, early stopping after
cfg.train.patience, the best weights kept) on the validation rows, when given.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from tnd.batching import collate, encode_for_lm
from tnd.data.tokenizer import encode
from tnd.engine import make_accelerator
from tnd.errors import TndError, one_line
from tnd.models import check_vocab, llama_config
from tnd.trainers.fit import Validation, fit

if TYPE_CHECKING:  # annotations only: the trainer runs without pydantic (the GPU image)
    from tnd.config import ArchParams, RewardParams

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


def _forward_rewards(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits.squeeze(-1).float()


def _score_encoded(model: nn.Module, pad_id: int, sequences: list[list[int]], batch_size: int) -> torch.Tensor:
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
                scores.append(_forward_rewards(model, batch).cpu())
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
    return _score_encoded(model, tokenizer.pad_token_id, encoded, batch_size or max(len(encoded), 1))


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


# --- losses and metrics -------------------------------------------------------------


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """mean of -log sigmoid(r_chosen - r_rejected - margin)."""
    return -F.logsigmoid(chosen - rejected - margin).mean()


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().flatten(), y.double().flatten()
    if x.numel() < 2:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    denom = x.norm() * y.norm()
    return float((x * y).sum() / denom) if denom > 0 else float("nan")


def pairwise_metrics(chosen: torch.Tensor, rejected: torch.Tensor, kinds: Sequence[str | None]) -> dict:
    """pairwise_accuracy (r_chosen > r_rejected, ties count as wrong), overall and per kind."""
    wins = (chosen > rejected).double()
    metrics = {
        "pairwise_accuracy": float(wins.mean()) if wins.numel() else float("nan"),
        "reward_margin": float((chosen - rejected).mean()) if wins.numel() else float("nan"),
        "n_eval_pairs": int(wins.numel()),
    }
    for kind in sorted({k for k in kinds if k}):
        index = torch.tensor([k == kind for k in kinds])
        metrics[f"pairwise_accuracy_{kind}"] = float(wins[index].mean())
    return metrics


def corruption_separation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sentences: Sequence[str],
    kinds: Sequence[str],
    corrupt: Callable[[str, str, random.Random], str | None],
    seed: int,
    batch_size: int = 64,
    max_length: int = 48,
    prefix: str = "fresh",
) -> dict:
    """How often r(sentence) > r(corrupted sentence), over every applicable kind of corruption.

    Returns {prefix}_accuracy, {prefix}_accuracy_<kind> and {prefix}_pairs(_<kind>).
    """
    rng = random.Random(seed)
    chosen, rejected, pair_kinds = [], [], []
    for sentence in sentences:
        for kind in kinds:
            bad = corrupt(sentence, kind, rng)
            if bad is not None and bad != sentence:
                chosen.append(sentence)
                rejected.append(bad)
                pair_kinds.append(kind)
    good_scores = score_texts(model, tokenizer, sorted(set(chosen)), batch_size, max_length)
    by_text = dict(zip(sorted(set(chosen)), good_scores.tolist()))
    r_chosen = torch.tensor([by_text[s] for s in chosen], dtype=torch.float32)
    r_rejected = score_texts(model, tokenizer, rejected, batch_size, max_length)
    wins = (r_chosen > r_rejected).double()
    metrics: dict = {
        f"{prefix}_accuracy": float(wins.mean()) if wins.numel() else float("nan"),
        f"{prefix}_pairs": int(wins.numel()),
    }
    for kind in kinds:
        index = torch.tensor([k == kind for k in pair_kinds], dtype=torch.bool)
        if index.any():
            metrics[f"{prefix}_accuracy_{kind}"] = float(wins[index].mean())
            metrics[f"{prefix}_pairs_{kind}"] = int(index.sum())
    return metrics


# --- training ------------------------------------------------------------------------


def _validation_score(metrics: dict[str, float]) -> tuple[float, ...]:
    """Pairwise: held-out accuracy first (what PPO needs of a reward is the ranking), the loss to break its ties:
    the Bradley-Terry loss of held-out pairs swings with a few confident mistakes while the accuracy still
    climbs, so stopping on the loss stops too early and keeps a less accurate model. Regression: the MSE."""
    if "eval_accuracy" in metrics:
        return (metrics["eval_accuracy"], -metrics["eval_loss"])
    return (-metrics["eval_loss"],)


ROW_KEYS = {"pairwise": ("chosen", "rejected"), "regression": ("text", "label"), "age": ("ids", "label")}


class RewardTrainer:
    """Trains a scalar reward model in place with the objective in `cfg.objective`.

    pairwise rows: {"chosen", "rejected", "kind"}; regression rows: {"text", "label"}; age rows:
    {"ids", "label"} (sample_ages adds the "text", for people). How each row is encoded: `_sequences`.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: RewardParams, seed: int):
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.seed = seed
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id

    # data
    def _encode(self, texts: list[str]) -> list[list[int]]:
        """Texts as bos + text + eos, cut to cfg.train.max_length: finished texts.

        Preference pairs are whole sentences and stay so: PPO also scores unfinished trials (no eos),
        on which a pairwise model extrapolates. Training on prefixes too is not done: a pair cut before
        its corruption is two equal texts, and cut after it the rejected prefix may still begin a good
        sentence, so the label "chosen is better" holds only for the whole sentences."""
        return encode_for_lm(self.tokenizer, texts, self.cfg.train.max_length)

    def _sequences(self, rows: Sequence[dict]) -> list[list[int]]:
        """What a regression or age row is trained and evaluated on.

        A row with "ids" (an age row: prompt + continuation as sampled) is `with_bos(ids)`, the very
        sequence `score_token_ids` scores for that trial in PPO: not re-tokenized (sampled ids need not
        be the tokenizer's encoding of their text), no eos unless the sample ended, never cut
        (`check_scorable` refuses what the model cannot hold). A row with only a "text" (a user's
        labelled file) is a finished text, bos + text + eos (`_encode`): its label is that of the whole
        text, and a prefix's label is unknown, so an unfinished trial is scored by extrapolation."""
        sequences = [with_bos(r["ids"], self.tokenizer) if "ids" in r else self._encode([r["text"]])[0] for r in rows]
        check_scorable(self.model, sequences)
        return sequences

    def _check_rows(self, rows: Sequence[dict], what: str) -> None:
        keys = ROW_KEYS[self.cfg.objective]
        rerun = "rerun `dvc repro sample_ages`" if self.cfg.objective == "age" else "rerun prepare_data or check data.source"
        if not rows:
            raise TndError(f"reward: no {what} rows for objective '{self.cfg.objective}'; {rerun}")
        missing = [k for k in keys if k not in rows[0]]
        if missing:
            raise TndError(
                f"reward: {what} rows lack {', '.join(missing)} (objective '{self.cfg.objective}' needs "
                f"{', '.join(keys)}); {rerun} or fix reward.objective"
            )

    def _held_out_metrics(self, rows: Sequence[dict]) -> Callable[[], dict[str, float]]:
        """The validation of `rows` (encoded once): eval_loss (the training objective: Bradley-Terry with
        the margin, or MSE) and eval_accuracy (pairwise) or eval_pearson (regression)."""
        batch_size, pad_id = max(self.cfg.train.batch_size, 64), self.tokenizer.pad_token_id
        if self.cfg.objective == "pairwise":
            chosen = self._encode([r["chosen"] for r in rows])
            rejected = self._encode([r["rejected"] for r in rows])

            def evaluate() -> dict[str, float]:
                r_chosen = _score_encoded(self.model, pad_id, chosen, batch_size)
                r_rejected = _score_encoded(self.model, pad_id, rejected, batch_size)
                return {
                    "eval_loss": float(bradley_terry_loss(r_chosen, r_rejected, self.cfg.margin)),
                    "eval_accuracy": float((r_chosen > r_rejected).double().mean()),
                }
        else:
            texts = self._sequences(rows)
            labels = torch.tensor([float(r["label"]) for r in rows], dtype=torch.float32)

            def evaluate() -> dict[str, float]:
                scores = _score_encoded(self.model, pad_id, texts, batch_size)
                return {"eval_loss": float(F.mse_loss(scores, labels)), "eval_pearson": pearson(scores, labels)}

        return evaluate

    def train(
        self,
        rows: Sequence[dict],
        on_log: Callable[[dict, int], None] | None = None,
        log_every: int = 50,
        desc: str = "reward model",
        eval_rows: Sequence[dict] | None = None,
        on_eval: Callable[[dict], None] | None = None,
        accelerator: Accelerator | None = None,
    ) -> dict[str, float]:
        """Train for at most cfg.train.steps (`tnd.trainers.fit.fit`, on `accelerator`: default one process,
        no mixed precision); returns the final running loss (and batch accuracy for pairwise),
        steps_run and stopped_early.

        With `eval_rows` and cfg.train.eval_every > 0, the first cfg.train.eval_size of them validate the
        model every eval_every steps, at most an epoch apart (`Validation`; the best is that
        of the highest held-out accuracy, ties to the lowest eval_loss, for pairwise; of the lowest eval_loss,
        the MSE, for regression); each validation row ({step, train_loss, eval_loss, eval_accuracy or
        eval_pearson, best_step}) goes to `on_eval`, and the result adds best_step and best_eval_*.
        """
        self._check_rows(rows, "training")
        cfg = self.cfg.train
        pairwise = self.cfg.objective == "pairwise"
        if pairwise:
            chosen = self._encode([r["chosen"] for r in rows])
            rejected = self._encode([r["rejected"] for r in rows])
            n = len(chosen)
        else:
            texts = self._sequences(rows)
            labels = torch.tensor([float(r["label"]) for r in rows], dtype=torch.float32)
            n = len(texts)
        held_out = list(eval_rows or [])[: cfg.eval_size]
        if held_out:
            self._check_rows(held_out, "validation")
        evaluate = self._held_out_metrics(held_out) if held_out else dict
        pad_id = self.tokenizer.pad_token_id

        def loss_fn(wrapped: nn.Module, index: list[int], device: torch.device):
            if pairwise:
                batch = collate([chosen[i] for i in index] + [rejected[i] for i in index], pad_id)
                scores = _forward_rewards(wrapped, {k: v.to(device) for k, v in batch.items()})
                r_chosen, r_rejected = scores[: len(index)], scores[len(index) :]
                loss = bradley_terry_loss(r_chosen, r_rejected, self.cfg.margin)
                return loss, {"accuracy": float((r_chosen > r_rejected).float().mean())}
            batch = collate([texts[i] for i in index], pad_id)
            scores = _forward_rewards(wrapped, {k: v.to(device) for k, v in batch.items()})
            return F.mse_loss(scores, labels[index].to(device)), {}

        validation = Validation(self.model, evaluate, cfg, score=_validation_score, on_eval=on_eval,
                                enabled=bool(held_out), epoch_steps=math.ceil(n / cfg.batch_size))
        return fit(self.model, loss_fn, n, cfg, self.seed, validation, accelerator or make_accelerator(), "reward",
                   desc, on_log, log_every)

    def evaluate(self, rows: Sequence[dict], batch_size: int | None = None) -> dict:
        """pairwise: pairwise_accuracy (+ per kind); regression and age: mse and pearson, of the sequences
        they train on (`_sequences`), scored through `score_token_ids` as PPO scores."""
        self._check_rows(rows, "evaluation")
        batch_size = batch_size or max(self.cfg.train.batch_size, 64)
        max_length = self.cfg.train.max_length
        if self.cfg.objective == "pairwise":
            r_chosen = score_texts(self.model, self.tokenizer, [r["chosen"] for r in rows], batch_size, max_length)
            r_rejected = score_texts(self.model, self.tokenizer, [r["rejected"] for r in rows], batch_size, max_length)
            return pairwise_metrics(r_chosen, r_rejected, [r.get("kind") for r in rows])
        scores = score_token_ids(self.model, self.tokenizer, self._sequences(rows), batch_size)
        labels = torch.tensor([float(r["label"]) for r in rows], dtype=torch.float32)
        return {"mse": float(F.mse_loss(scores, labels)), "pearson": pearson(scores, labels), "n_eval": len(rows)}
