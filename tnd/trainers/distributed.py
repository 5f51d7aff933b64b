"""Data parallelism for the trainer, spelled out: every process holds a full student, takes its
share of each batch, and the gradients are averaged before every optimizer step.

Launched with `accelerate launch --multi_gpu --num_processes N -m stages.train_ppo` (or
`torchrun --nproc_per_node N`; on CPU too, `--cpu` would start one process), accelerate
sets up the process group (gloo on CPU, nccl on CUDA); this module only needs its
`torch.distributed` collectives. A single process (plain `python -m ...`, or the library used
directly) gets `SingleProcess`, whose collectives are the identity, so the trainer reads the
same either way and a one-process run computes exactly what it always did.

Why gradients are averaged by hand instead of wrapping the student in DistributedDataParallel:
the student also generates (HF `generate` on the bare module), computes the old policy and
distils in several differently-shaped passes per optimizer step; one explicit all-reduce
before each optimizer step is the whole of the synchronisation and is easy to check.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


class SingleProcess:
    """One process: every collective is the identity."""

    num_processes = 1
    process_index = 0

    def shard(self, items: list) -> list:
        return items

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def min(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def gather(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def average_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        pass

    def broadcast_parameters(self, modules: Iterable[nn.Module]) -> None:
        pass


class DataParallel(SingleProcess):
    """N processes in an initialised torch.distributed group (as `accelerate launch` makes).

    Collectives run on `device`, the accelerator's: NCCL (the CUDA backend) takes CUDA tensors
    only, so a statistic kept on the CPU travels there and back."""

    def __init__(self, num_processes: int, process_index: int, device: torch.device | str = "cpu") -> None:
        self.num_processes, self.process_index = num_processes, process_index
        self.device = torch.device(device)

    @classmethod
    def from_accelerator(cls, accelerator) -> SingleProcess:
        if accelerator is None or accelerator.num_processes == 1:
            return SingleProcess()
        return cls(accelerator.num_processes, accelerator.process_index, getattr(accelerator, "device", "cpu"))

    def shard(self, items: list) -> list:
        """This process's rows of a batch that every process drew identically."""
        return items[self.process_index :: self.num_processes]

    def _all_reduce(self, value: torch.Tensor, op) -> torch.Tensor:
        out = value.detach().to(self.device, copy=True)
        torch.distributed.all_reduce(out, op=op)
        return out.to(value.device)

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(value, torch.distributed.ReduceOp.SUM)

    def min(self, value: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(value, torch.distributed.ReduceOp.MIN)

    def gather(self, value: torch.Tensor) -> torch.Tensor:
        """Concatenate every process's tensor (same shape on all) along dim 0."""
        local = value.detach().to(self.device).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.num_processes)]
        torch.distributed.all_gather(parts, local)
        return torch.cat(parts).to(value.device)

    def average_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        # A parameter that no process gave a gradient (the value head in an LM step) keeps grad None,
        # so the optimizer leaves it alone as it does in one process; one that only some processes
        # gave a gradient (no rows here) gets zero from the others, and every process joins the same
        # all-reduces, so none can hang waiting for another.
        parameters = list(parameters)
        has_grad = torch.tensor([p.grad is not None for p in parameters], dtype=torch.float32)
        has_grad = self.sum(has_grad)
        for p, anywhere in zip(parameters, has_grad.tolist()):
            if not anywhere:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
            p.grad.div_(self.num_processes)

    def broadcast_parameters(self, modules: Iterable[nn.Module]) -> None:
        """Start every process from process 0's weights."""
        for module in modules:
            for tensor in module.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)
