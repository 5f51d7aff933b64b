"""Plain language-model pretraining (teacher, and the student's warm-up): next-token cross-entropy on
the training texts, in the loop of tnd/trainers/fit.py (AdamW, warm-up and cosine decay, seeded random
mini-batches, clipping, on accelerate's engine).

Held-out validation (`tnd.trainers.fit.Validation`, shared with the reward trainer) works as transformers'
Trainer with `load_best_model_at_end` and `EarlyStoppingCallback`: every `cfg.eval_every`
steps -- or every epoch when an epoch is shorter, so that a small corpus, which a few epochs
overfit, is validated often enough -- and at the last step the loss on the first
`cfg.eval_size` held-out texts is measured,
the weights of the best validation are kept, training stops after `cfg.patience` validations
in a row without a better one, and the model ends on the best weights (`cfg.keep_best`).
Validation draws no random numbers, so the steps it lets run are those of a run without it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from accelerate import Accelerator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tnd.batching import IGNORE_INDEX, collate, encode_for_lm
from tnd.engine import make_accelerator
from tnd.trainers.fit import Validation, fit

if TYPE_CHECKING:  # annotations only: the trainer runs without pydantic (the GPU image)
    from tnd.config import LMTrainParams


def pretrain_lm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    cfg: LMTrainParams,
    seed: int,
    on_log: Callable[[dict, int], None] | None = None,
    log_every: int = 50,
    desc: str = "pretraining",
    eval_texts: Sequence[str] | None = None,
    on_eval: Callable[[dict], None] | None = None,
    accelerator: Accelerator | None = None,
    name: str = "teacher",
    on_step: Callable[[int, bool], None] | None = None,
) -> dict[str, float]:
    """Train `model` in place for at most cfg.steps (`tnd.trainers.fit.fit`, on `accelerator`: default one
    process, no mixed precision); returns the final running loss (train_loss), steps_run and stopped_early.

    With `eval_texts` and cfg.eval_every > 0, the first cfg.eval_size of them validate the model (mean
    next-token NLL, `eval_loss`, and its exp, `eval_perplexity`) every cfg.eval_every steps, at most an
    epoch apart: see `Validation`. Each validation row ({step, train_loss, eval_loss, eval_perplexity,
    best_step}) goes to `on_eval`; the result adds best_step, best_eval_loss and best_eval_perplexity.
    `on_step(step, last)` runs after every step (`fit`), e.g. to keep checkpoints at `age_steps`.
    """
    data = encode_for_lm(tokenizer, texts, cfg.max_length)
    # sorted by length: batches of alike lengths pad least (the mean does not depend on the order)
    held_out = sorted(encode_for_lm(tokenizer, list(eval_texts or [])[: cfg.eval_size], cfg.max_length), key=len)

    def evaluate() -> dict[str, float]:
        nll = mean_nll(model, held_out, tokenizer.pad_token_id, cfg.batch_size)
        return {"eval_loss": nll, "eval_perplexity": math.exp(min(nll, 700.0))}

    def loss_fn(wrapped: torch.nn.Module, rows: list[int], device: torch.device):
        batch = {k: v.to(device) for k, v in collate([data[i] for i in rows], tokenizer.pad_token_id).items()}
        return wrapped(**batch).loss, {}

    validation = Validation(model, evaluate, cfg, on_eval=on_eval, enabled=bool(held_out),
                            epoch_steps=math.ceil(len(data) / cfg.batch_size))
    return fit(model, loss_fn, len(data), cfg, seed, validation, accelerator or make_accelerator(), name, desc,
               on_log, log_every, on_step)


def age_steps(n: int, steps: int) -> list[int]:
    """The steps at which pretraining keeps the age-predictor reward's checkpoints (teacher.train.age_checkpoints):
    about `n` steps evenly spaced in log(step) from 1 to `steps` -- round(steps ** (i / (n - 1))) -- so each is
    about as many bits of age (log2 step, the label) from the next; fewer when rounding makes early ones
    coincide. n = 12 of 1500: 1, 2, 4, 7, 14, 28, 54, 105, 204, 397, 772, 1500; n = 1: the last alone."""
    if n < 1 or steps < 1:
        return []
    if n == 1:
        return [steps]
    return sorted({round(steps ** (i / (n - 1))) for i in range(n)})


@torch.no_grad()
def mean_nll(model: PreTrainedModel, data: Sequence[Sequence[int]], pad_id: int, batch_size: int = 64) -> float:
    """Mean next-token NLL (nats) over every token of the encoded sequences but each one's first."""
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = collate([list(x) for x in data[start : start + batch_size]], pad_id)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += int((targets != IGNORE_INDEX).sum())
    return total_nll / max(total_tokens, 1)


@torch.no_grad()
def perplexity(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int, batch_size: int = 64
) -> float:
    """exp(mean next-token NLL) over all tokens of `texts` (eos included, bos not predicted)."""
    model.eval()
    return math.exp(mean_nll(model, encode_for_lm(tokenizer, texts, max_length), tokenizer.pad_token_id, batch_size))
