"""Plain language-model pretraining (teacher, and the student's warm-up).

AdamW with linear warm-up and cosine decay, random mini-batches drawn by a seeded
generator, gradient clipping; the loop reads top to bottom.

Held-out validation (`Validation`, shared with the reward trainer) works as transformers'
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
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from tnd.data.tokenizer import encode
from tnd.generation import right_pad

if TYPE_CHECKING:  # annotations only: the trainer runs without pydantic (the GPU image)
    from tnd.config import LMTrainParams

IGNORE_INDEX = -100


class Validation:
    """Held-out validation during a training loop: the validation curve, the best validation and its
    weights (a CPU copy), and early stopping.

    `evaluate()` returns metrics of the held-out data; `score(metrics)` orders validations (a tuple,
    greater is better; default: the lowest eval_loss), and only a strictly greater score is an
    improvement, so a tie keeps the earlier weights. evaluate() runs under no_grad with the model in
    eval mode (dropout off), then the model's mode is restored. The loop calls `step(step, train_loss)`
    after every optimizer step and stops when it returns True; `finish(steps_run)` loads the best weights
    back (cfg.keep_best) and
    returns the summary. cfg needs steps, eval_every (0: no validation), patience (0: never stop early)
    and keep_best; `enabled=False` (no held-out data) turns validation off whatever cfg says.
    `epoch_steps` (the steps of one pass over the training data) caps the interval: validations are
    min(eval_every, epoch_steps) steps apart.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        evaluate: Callable[[], dict[str, float]],
        cfg,
        score: Callable[[dict], tuple[float, ...]] = lambda metrics: (-metrics["eval_loss"],),
        on_eval: Callable[[dict], None] | None = None,
        enabled: bool = True,
        epoch_steps: int | None = None,
    ) -> None:
        self.model, self.evaluate, self.cfg = model, evaluate, cfg
        self.enabled = enabled and cfg.eval_every > 0
        self.every = max(1, min(cfg.eval_every, epoch_steps or cfg.eval_every))
        self.score = score
        self.on_eval = on_eval
        self.curve: list[dict] = []  # one row per validation: step, train_loss (mean since the last), metrics
        self.best: dict | None = None  # the best validation's row
        self._best_state: dict[str, torch.Tensor] | None = None
        self._since_best = 0
        self._train_losses: list[float] = []

    def step(self, step: int, train_loss: float) -> bool:
        """Record one training step; validate when due (every `self.every` steps and at the last step).
        True when training should stop: patience validations in a row without improvement."""
        self._train_losses.append(train_loss)
        if not self.enabled or (step % self.every and step != self.cfg.steps):
            return False
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                metrics = dict(self.evaluate())
        finally:
            self.model.train(was_training)
        score = self.score(metrics)
        # NaN never improves; equal does not count as better (the earlier, shorter-trained weights stay)
        if all(map(math.isfinite, score)) and (self.best is None or score > self.score(self.best)):
            self._best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            self._since_best = 0
            improved = True
        else:
            self._since_best += 1
            improved = False
        row = {"step": step, "train_loss": sum(self._train_losses) / len(self._train_losses), **metrics}
        self._train_losses = []
        if improved:
            self.best = row
        row["best_step"] = self.best["step"] if self.best else 0
        self.curve.append(row)
        if self.on_eval:
            self.on_eval(dict(row))
        return self.cfg.patience > 0 and self._since_best >= self.cfg.patience

    def finish(self, steps_run: int) -> dict:
        """Load the best weights back (cfg.keep_best; a no-op when the last validation was the best) and
        return the summary: steps_run, stopped_early, and with validation best_step and best_<metrics>."""
        out: dict = {"steps_run": steps_run, "stopped_early": steps_run < self.cfg.steps}
        if self.best is None:
            return out
        if self.cfg.keep_best and self._best_state is not None and self.best["step"] != steps_run:
            self.model.load_state_dict(self._best_state)
        out["best_step"] = self.best["step"]
        out.update({f"best_{k}": v for k, v in self.best.items() if k.startswith("eval_")})
        self._best_state = None
        return out


def encode_for_lm(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> list[list[int]]:
    """bos + text + eos, truncated to max_length (the eos is dropped when truncated)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return [([bos] + encode(tokenizer, text) + [eos])[:max_length] for text in texts]


def collate(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; pad positions get no loss."""
    input_ids, attention_mask = right_pad(sequences, pad_id)
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


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
) -> dict[str, float]:
    """Train `model` in place for at most cfg.steps; returns the final running loss (train_loss), steps_run
    and stopped_early.

    With `eval_texts` and cfg.eval_every > 0, the first cfg.eval_size of them validate the model (mean
    next-token NLL, `eval_loss`, and its exp, `eval_perplexity`) every cfg.eval_every steps, at most an
    epoch apart: see
    `Validation`. Each validation row ({step, train_loss, eval_loss, eval_perplexity, best_step}) goes to
    `on_eval`; the result adds best_step, best_eval_loss and best_eval_perplexity.
    """
    data = encode_for_lm(tokenizer, texts, cfg.max_length)
    # sorted by length: batches of alike lengths pad least (the mean does not depend on the order)
    held_out = sorted(encode_for_lm(tokenizer, list(eval_texts or [])[: cfg.eval_size], cfg.max_length), key=len)

    def evaluate() -> dict[str, float]:
        nll = mean_nll(model, held_out, tokenizer.pad_token_id, cfg.batch_size)
        return {"eval_loss": nll, "eval_perplexity": math.exp(min(nll, 700.0))}

    validation = Validation(model, evaluate, cfg, on_eval=on_eval, enabled=bool(held_out),
                            epoch_steps=math.ceil(len(data) / cfg.batch_size))
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, max(cfg.steps, 1))
    model.train()
    running = float("nan")
    steps_run = 0
    progress = tqdm(range(1, cfg.steps + 1), desc=desc, leave=False)
    for step in progress:
        index = torch.randint(len(data), (cfg.batch_size,), generator=generator).tolist()
        batch = {k: v.to(model.device) for k, v in collate([data[i] for i in index], tokenizer.pad_token_id).items()}
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        running = loss.item() if math.isnan(running) else 0.95 * running + 0.05 * loss.item()
        if step % log_every == 0 or step == cfg.steps:
            progress.set_postfix(loss=f"{running:.3f}")
            if on_log:
                on_log({"train_loss": loss.item(), "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0]}, step)
        steps_run = step
        if validation.step(step, loss.item()):
            break
    progress.close()
    summary = validation.finish(steps_run)
    model.eval()
    return {"train_loss": running, **summary}


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
