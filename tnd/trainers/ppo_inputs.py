"""What CustomPPOTrainer refuses before it builds anything: each check names the problem and its fix in
one line (TndError for missing or mismatched inputs, PPOConfigError for a config the engine cannot run)."""

from __future__ import annotations

from typing import Any, Optional

from tnd.config import CustomPPOConfig, PPOConfigError
from tnd.engine import shards_parameters
from tnd.errors import TndError
from tnd.models import check_vocab


def check_inputs(
    cfg: CustomPPOConfig, accelerator: Any, tokenizer: Any, models: dict[str, Any], train_dataset: list[list[int]],
    demonstrations: Any, lm_dataset: Optional[list[list[int]]],
) -> None:
    """Refuse inputs the trainer cannot train on: `models` maps "teacher", "student" and "reward" to the models."""
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise TndError("tokenizer needs a pad and an eos token")
    # Sampling keeps to the tokenizer's ids (tnd.generation.TokenizerIdsOnly), so a model padded beyond
    # the tokenizer is fine; one with fewer rows would make a trial or demonstration id an IndexError.
    for role, model in models.items():
        if hasattr(model, "get_input_embeddings"):  # not e.g. a plain nn.Module reward function
            check_vocab(model, tokenizer, role)
    if cfg.trains_on_trials and not train_dataset:
        raise TndError("train_dataset is empty; the trials need prompts")
    if any(len(p) == 0 for p in train_dataset):
        raise TndError("train_dataset holds an empty prompt; every prompt needs at least one token")
    if cfg.reads_demo_cache and demonstrations is None:
        raise TndError(
            f"tnd.mode = {cfg.mode} needs demonstrations (a TeacherCache); pass demonstrations= "
            "or set tnd.mode: trials_only"
        )
    if cfg.reads_demo_cache and len(demonstrations) == 0:
        raise TndError("the demonstrations cache is empty; rerun `dvc repro cache_teacher_logits`")
    cache_temperature = getattr(demonstrations, "temperature", None)
    if cfg.demos_distilled and cache_temperature is not None and cache_temperature != cfg.distill_temperature:
        # The top-k loss softens the student only: the cached teacher is already at its temperature.
        raise PPOConfigError(
            f"distill_temperature ({cfg.distill_temperature}) must equal the demonstrations' cache temperature "
            f"({cache_temperature}): a top-k + tail teacher cannot be re-tempered exactly; set distill.temperature "
            "to cache.temperature (or rebuild the cache at the temperature you want)"
        )
    n = accelerator.num_processes
    if accelerator.gradient_accumulation_steps != cfg.gradient_accumulation_steps:
        raise PPOConfigError(
            f"the accelerator accumulates {accelerator.gradient_accumulation_steps} mini-batches, the config "
            f"{cfg.gradient_accumulation_steps}; build it with tnd.trainers.ppo.accelerator_for(config)"
        )
    if n > 1 and cfg.value_head_sometimes_unused and not getattr(
            accelerator.ddp_handler, "find_unused_parameters", False):
        raise PPOConfigError(
            "some backward passes leave the value head out (LM steps or demos_only), which DDP must be told: "
            "build the accelerator with tnd.trainers.ppo.accelerator_for(config)"
        )
    if cfg.kernel_fused_head and shards_parameters(accelerator):
        raise PPOConfigError(
            "kernels.fused_head applies the student's output head outside its forward and needs the head's whole "
            "weight on every process, which FSDP and DeepSpeed shard: set kernels.fused_head: false"
        )
    if cfg.mini_batch_size % n:
        raise PPOConfigError(
            f"ppo.mini_batch_size ({cfg.mini_batch_size}) must be divisible by the number of processes ({n}): "
            "each process takes an equal share of every mini-batch"
        )
    if cfg.lm_steps and cfg.lm_batch_size < n:
        raise PPOConfigError(f"tnd.lm_batch_size ({cfg.lm_batch_size}) must be at least the number of processes ({n})")
    if cfg.lm_steps and cfg.lm_data == "corpus" and not lm_dataset:
        raise TndError("tnd.lm_data = corpus needs the training corpus: pass lm_dataset= (token ids per text)")
    if cfg.distill_online and cfg.uses_trials:
        vt = models["teacher"].get_output_embeddings().out_features
        vs = models["student"].get_output_embeddings().out_features
        if vt != vs:
            raise TndError(
                f"distill.online needs the same vocabulary size in teacher ({vt}) and student ({vs}); "
                "set distill.online: false"
            )
