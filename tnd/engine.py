"""accelerate in one place: the Accelerator a run trains under, the modules it prepares, and the
unwrapping that generation needs.

A run is one or several processes started by `accelerate launch` (or `torchrun`, or a plain
`python`): the Accelerator reads the launch from the environment (DDP over gloo on CPU or NCCL on
CUDA, FSDP or DeepSpeed from an accelerate config file) and this module adds what the trainer
needs on top:

* `make_accelerator`: mixed precision and gradient accumulation from the trainer's settings, and
  DDP told to expect parameters without a gradient when some backward passes leave the value head
  out (LM steps, demonstrations only): DDP then leaves their gradient None on every process, so the
  optimizer skips them as it does in one process.
* `ForwardAt`: a model's logits (and, for the policy, values) at chosen positions as one module
  call. DDP and FSDP act in a wrapped module's `forward`: the padding-free pass runs the body and
  the output head separately, so both must sit inside one forward that the wrapper sees.
* `prepare_frozen`: teacher, reference and reward model on each process's device in eval mode,
  and sharded like the policy under FSDP (TRL's `prepare_fsdp`), so a teacher larger than one
  device fits; never wrapped in DDP (nothing to synchronise).
* `clip_grad_norm`: accelerate's clipping, unscaling under fp16 only the optimizer that steps.
* `unwrap_for_generation`: the bare student for HF `generate`, with its full parameters gathered
  when FSDP or ZeRO-3 shards them (TRL's `unwrap_model_for_generation`).

DeepSpeed (configs/zero3.yaml) follows TRL's handling but is not run by the tests: deepspeed is not a
dependency and installs on neither the CI machine nor the GPU image.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Optional

import accelerate.optimizer
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, DistributedType
from torch import nn

from tnd.packing import forward_at


# accelerate's AcceleratedOptimizer.step asks importlib, twice per optimizer step, whether the optional
# `lomo_optim` package is installed: a search of sys.path on disk that costs a small model's PPO update
# a noticeable share of its time (benchmarks/ppo_step.py). The answer cannot change during a run: ask once.
accelerate.optimizer.is_lomo_available = functools.cache(accelerate.optimizer.is_lomo_available)


def make_accelerator(
    mixed_precision: str = "no", gradient_accumulation_steps: int = 1, find_unused_parameters: bool = False
) -> Accelerator:
    """The Accelerator for a run; CPU when there is no CUDA (gloo between processes)."""
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
    )


class ForwardAt(nn.Module):
    """`model`'s logits [M, V] at the M positions `at` marks (row-major), padding-free when `packed`
    (tnd/packing.py), and the value head's values [M] at the same positions when it has one
    and `values` is asked for."""

    def __init__(self, model: nn.Module, value_head: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.model, self.value_head = model, value_head

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, at: torch.Tensor, packed: bool, values: bool = False
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        logits, states = forward_at(self.model, input_ids, attention_mask, at, packed, hidden=values)
        return logits, (self.value_head(states).float() if values else None)


def shards_parameters(accelerator: Accelerator) -> bool:
    """FSDP or DeepSpeed: the prepared model's parameters are not whole on each process."""
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def clip_grad_norm(
    accelerator: Accelerator, optimizer: torch.optim.Optimizer, parameters: list[nn.Parameter], max_norm: float
) -> Optional[torch.Tensor]:
    """`accelerator.clip_grad_norm_` before `optimizer` steps, unscaling (fp16) that optimizer's gradients only.

    accelerate's clip_grad_norm_ unscales every optimizer it prepared (its own TODO says so). The trainer's
    PPO optimizer and the LM steps' own AdamW share the student's parameters, so under fp16 the student's
    gradients would be divided by the loss scale twice. The optimizers are hidden from it for the call,
    so that it unscales `optimizer` alone and otherwise clips as it does (FSDP, DeepSpeed, DTensors)."""
    prepared = accelerator._optimizers
    accelerator._optimizers = [o for o in prepared if o is optimizer or getattr(o, "optimizer", None) is optimizer]
    try:
        return accelerator.clip_grad_norm_(parameters, max_norm)
    finally:
        accelerator._optimizers = prepared


def prepare_frozen(accelerator: Accelerator, module: nn.Module) -> nn.Module:
    """A model that is only read: on this process's device, eval mode, no gradient; FSDP-sharded under FSDP."""
    module = module.requires_grad_(False).eval()
    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        plugin = accelerator.state.fsdp_plugin
        plugin.set_auto_wrap_policy(module)
        module = FSDP(
            module,
            sharding_strategy=plugin.sharding_strategy or plugin.reshard_after_forward,
            cpu_offload=plugin.cpu_offload,
            auto_wrap_policy=plugin.auto_wrap_policy,
            mixed_precision=plugin.mixed_precision_policy,
            sync_module_states=plugin.sync_module_states,
            use_orig_params=plugin.use_orig_params,
            limit_all_gathers=plugin.limit_all_gathers,
            device_id=accelerator.device,
        ).eval()
        return module
    return module.to(accelerator.device)


@contextlib.contextmanager
def unwrap_for_generation(accelerator: Accelerator, wrapped: nn.Module) -> Iterator[nn.Module]:
    """The bare module behind `wrapped` (DDP / FSDP / compiled), its full parameters gathered for the
    duration when FSDP shards them."""
    bare = accelerator.unwrap_model(wrapped)
    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(wrapped, writeback=False, recurse=True):
            yield bare
        return
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(wrapped.parameters())):
            yield bare
        return
    yield bare


def set_deepspeed_micro_batch(accelerator: Accelerator, rows: int) -> None:
    """DeepSpeed sizes its engine from a dataloader, which the trainer has none of: tell it the rows one
    process's mini-batch holds (TRL does the same)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = rows


def shard(accelerator: Accelerator, items: list) -> list:
    """This process's rows of a batch that every process drew identically."""
    return items[accelerator.process_index :: accelerator.num_processes]
