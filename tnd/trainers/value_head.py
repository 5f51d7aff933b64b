"""The student's value head: one scalar per position, read from the student's last hidden state.

The head is a separate `nn.Linear(hidden_size, 1)` on top of the (shared) student trunk, as in
TRL's `AutoModelForCausalLMWithValueHead`: the value loss back-propagates into the student's
body too, the language-model head stays untouched, and the student saved at the end is a plain
causal LM (the head is saved with the trainer state only).

Initialisation follows TRL PPOv2 / cleanrl's `layer_init`: weights ~ N(0, 1 / (hidden + 1)),
bias 0, drawn from a generator seeded by the caller (the global RNG is left alone).
"""

from __future__ import annotations

import torch
from torch import nn


class ValueHead(nn.Module):
    def __init__(self, hidden_size: int, seed: int = 0) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.summary.weight.normal_(0.0, 1.0 / (hidden_size + 1) ** 0.5, generator=generator)
            self.summary.bias.zero_()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[..., hidden] -> [...] values, computed in the head's dtype (float32 in the trainer) also under
        autocast, which would otherwise run the Linear in bf16/fp16 and round the values and returns."""
        with torch.autocast(hidden_states.device.type, enabled=False):
            return self.summary(hidden_states.to(self.summary.weight.dtype)).squeeze(-1)


def hidden_size_of(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if size is None:
        size = model.get_input_embeddings().embedding_dim
    return int(size)
