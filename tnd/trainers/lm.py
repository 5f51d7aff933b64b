"""Plain language-model pretraining (teacher, and the student's warm-up).

AdamW with linear warm-up and cosine decay, random mini-batches drawn by a seeded
generator, gradient clipping; the loop reads top to bottom.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from tnd.data.tokenizer import encode
from tnd.generation import right_pad

if TYPE_CHECKING:  # annotations only: the trainer runs without pydantic (the GPU image)
    from tnd.config import LMTrainParams

IGNORE_INDEX = -100


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
) -> dict[str, float]:
    """Train `model` in place for cfg.steps; returns the final running loss."""
    data = encode_for_lm(tokenizer, texts, cfg.max_length)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, max(cfg.steps, 1))
    model.train()
    running = float("nan")
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
    model.eval()
    return {"train_loss": running}


@torch.no_grad()
def perplexity(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int, batch_size: int = 64
) -> float:
    """exp(mean next-token NLL) over all tokens of `texts` (eos included, bos not predicted)."""
    model.eval()
    data = encode_for_lm(tokenizer, texts, max_length)
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = {k: v.to(model.device) for k, v in collate(data[start : start + batch_size], tokenizer.pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += int((targets != IGNORE_INDEX).sum())
    return math.exp(total_nll / max(total_tokens, 1))
