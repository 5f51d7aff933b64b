"""The training loop of the models trained by plain gradient descent: the teacher, the student's
warm-up and the reward model (the PPO trainer has its own loop, tnd/trainers/ppo.py).

One step: draw `batch_size` row indices with a seeded generator (the same draw on every process, each
of which takes its share), the caller's loss on them, backward, clip, AdamW, the learning-rate schedule
(linear warm-up, cosine decay). A running loss on the progress bar, `on_log` every `log_every` steps, a
non-finite loss stops the run with one line, and held-out validation with early stopping and the best
weights kept (`Validation`).

On accelerate's engine, as train_ppo: the model and its optimizer are prepared by the accelerator the
caller made (`tnd.engine.make_accelerator`: its device, mixed precision, and DDP across the processes
`accelerate launch` started), the backward and the clipping go through it. Under FSDP or DeepSpeed it
trains a replica per process instead (see `fit`): the models trained here fit one device, and validation
and saving read whole weights. Validation runs on every
process with the same weights and the metrics are averaged over the processes, so all of them take the
same early-stopping decision.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Optional

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from tnd.engine import shard, shards_parameters
from tnd.errors import TndError

# loss_fn(model, rows, device) -> (loss, extras): the loss of the rows (indices into the caller's data) and
# float statistics of the batch shown beside it (e.g. {"accuracy": ...}).
LossFn = Callable[[torch.nn.Module, list[int], torch.device], tuple[torch.Tensor, dict[str, float]]]


class Validation:
    """Held-out validation during a training loop: the validation curve, the best validation and its
    weights (a CPU copy), and early stopping.

    `evaluate()` returns metrics of the held-out data; `score(metrics)` orders validations (a tuple,
    greater is better; default: the lowest eval_loss), and only a strictly greater score is an
    improvement, so a tie keeps the earlier weights. evaluate() runs under no_grad with the model in
    eval mode (dropout off), then the model's mode is restored. The loop calls `step(step, train_loss)`
    after every optimizer step and stops when it returns True; `finish(steps_run)` loads the best weights
    back (cfg.keep_best) and returns the summary. cfg needs steps, eval_every (0: no validation), patience
    (0: never stop early) and keep_best; `enabled=False` (no held-out data) turns validation off whatever
    cfg says. `epoch_steps` (the steps of one pass over the training data) caps the interval: validations
    are min(eval_every, epoch_steps) steps apart. `agree(metrics)` (the loop's: an average over the
    processes) makes every process see the same metrics.
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
        self.agree: Callable[[dict], dict] = lambda metrics: metrics
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
                metrics = self.agree(dict(self.evaluate()))
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


def fit(
    model: torch.nn.Module,
    loss_fn: LossFn,
    n_rows: int,
    cfg,
    seed: int,
    validation: Validation,
    accelerator: Accelerator,
    name: str,
    desc: str,
    on_log: Optional[Callable[[dict, int], None]] = None,
    log_every: int = 50,
    on_step: Optional[Callable[[int, bool], None]] = None,
) -> dict[str, Any]:
    """Train `model` in place for at most cfg.steps steps of cfg.batch_size rows drawn from range(n_rows);
    cfg also gives learning_rate, weight_decay, warmup_steps and max_grad_norm. `name` is the params
    section (`teacher`, `student`, `reward`) that errors point at. Returns train_loss (a running mean),
    train_<extra> for each of loss_fn's extras, and validation.finish's summary. The model ends in eval
    mode on `accelerator.device`, unwrapped. `on_step(step, last)` runs after each step's update and
    validation, on every process, with `last` true at the step training ends on (the last, or an early stop)."""
    # Under FSDP or DeepSpeed (train_ppo's student warm-up when train_ppo runs sharded) this loop does not shard:
    # each process trains a replica of the (small) model on whole batches, the same on every process, and
    # train_ppo's prepare then starts every process from process 0's weights (fsdp_sync_module_states).
    replicated = shards_parameters(accelerator)
    share = 1 if replicated else accelerator.num_processes
    if cfg.batch_size % share:
        raise TndError(f"{name}.train.batch_size ({cfg.batch_size}) must be divisible by the number of processes "
                       f"({share}): each process takes an equal share of every batch")
    validation.agree = lambda metrics: _mean_over_processes(accelerator, metrics)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, max(cfg.steps, 1))
    # The replica trains outside accelerate's prepare, so fp16 needs its own loss scaling (a no-op otherwise).
    scaler = torch.amp.GradScaler(accelerator.device.type, enabled=replicated and accelerator.mixed_precision == "fp16")
    if replicated:
        wrapped = model.to(accelerator.device)
    else:
        wrapped, optimizer = accelerator.prepare(model, optimizer)
    wrapped.train()
    running: dict[str, float] = {}
    steps_run = 0
    progress = tqdm(range(1, cfg.steps + 1), desc=desc, leave=False, disable=not accelerator.is_main_process)
    for step in progress:
        rows = torch.randint(n_rows, (cfg.batch_size,), generator=generator).tolist()
        with accelerator.autocast() if replicated else contextlib.nullcontext():  # prepared: autocast in forward
            loss, extras = loss_fn(wrapped, rows if replicated else shard(accelerator, rows), accelerator.device)
        if not torch.isfinite(loss):
            raise TndError(f"{name}: training loss became {loss.item()} at step {step}; lower "
                           f"{name}.train.learning_rate or check the training data for extreme values")
        if replicated:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(wrapped.parameters(), cfg.max_grad_norm)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        for key, value in {"loss": loss.item(), **extras}.items():
            running[key] = value if key not in running else 0.95 * running[key] + 0.05 * value
        if step % log_every == 0 or step == cfg.steps:
            progress.set_postfix({key: f"{value:.3f}" for key, value in running.items()})
            if on_log:
                on_log({"train_loss": loss.item(), "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                        **{f"train_batch_{k}": v for k, v in extras.items()}}, step)
        steps_run = step
        stop = validation.step(step, loss.item())
        if on_step:
            on_step(step, stop or step == cfg.steps)
        if stop:
            break
    progress.close()
    accelerator.unwrap_model(wrapped, keep_fp32_wrapper=False)  # the model's own forward back (no autocast patch)
    accelerator.free_memory()  # drops the wrapper (DDP's hooks go with it) before a later stage prepares the model
    summary = validation.finish(steps_run)
    model.eval()
    return {**{f"train_{k}": v for k, v in running.items()}, **summary}


def _mean_over_processes(accelerator: Accelerator, metrics: dict[str, float]) -> dict[str, float]:
    if accelerator.num_processes == 1 or not metrics:
        return metrics
    values = torch.tensor(list(metrics.values()), dtype=torch.float64, device=accelerator.device)
    return dict(zip(metrics, accelerator.reduce(values, "mean").tolist()))
