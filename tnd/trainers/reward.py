"""How the reward model (tnd/reward.py: building, loading, scoring) is trained.

Three losses (reward.objective):
  pairwise   -- Bradley-Terry on preference pairs {"chosen", "rejected", "kind"}:
                loss = -log sigmoid(r(chosen) - r(rejected) - margin)
  regression -- mean squared error to a numeric label, on rows {"text", "label"}
                (`tnd.data.sources.load_labelled_texts`)
  age        -- the same regression, on samples of the teacher's pretraining checkpoints labelled
                log2(step), rows {"text", "ids", "label"} (stage sample_ages): the TnD paper's age predictor

The age model trains on exactly the sequences PPO scores (`RewardTrainer._sequences`, through
`tnd.reward.with_bos`); what the texts of the other objectives leave out is said there.
Training runs in the loop the teacher's has (tnd/trainers/fit.py: AdamW, linear warm-up and cosine
decay, seeded random mini-batches, gradient clipping, a progress bar, on accelerate's engine) with
the same held-out validation (`Validation`: every cfg.train.eval_every steps, early stopping after
cfg.train.patience, the best weights kept) on the validation rows, when given.
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tnd.batching import collate, encode_for_lm
from tnd.engine import make_accelerator
from tnd.errors import TndError
from tnd.reward import forward_rewards, score_encoded, check_scorable, score_texts, score_token_ids, with_bos
from tnd.trainers.fit import Validation, fit

if TYPE_CHECKING:  # annotations only: the trainer runs without pydantic (the GPU image)
    from tnd.config import RewardParams


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
                r_chosen = score_encoded(self.model, pad_id, chosen, batch_size)
                r_rejected = score_encoded(self.model, pad_id, rejected, batch_size)
                return {
                    "eval_loss": float(bradley_terry_loss(r_chosen, r_rejected, self.cfg.margin)),
                    "eval_accuracy": float((r_chosen > r_rejected).double().mean()),
                }
        else:
            texts = self._sequences(rows)
            labels = torch.tensor([float(r["label"]) for r in rows], dtype=torch.float32)

            def evaluate() -> dict[str, float]:
                scores = score_encoded(self.model, pad_id, texts, batch_size)
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
                scores = forward_rewards(wrapped, {k: v.to(device) for k, v in batch.items()})
                r_chosen, r_rejected = scores[: len(index)], scores[len(index) :]
                loss = bradley_terry_loss(r_chosen, r_rejected, self.cfg.margin)
                return loss, {"accuracy": float((r_chosen > r_rejected).float().mean())}
            batch = collate([texts[i] for i in index], pad_id)
            scores = forward_rewards(wrapped, {k: v.to(device) for k, v in batch.items()})
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
