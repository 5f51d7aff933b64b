"""Kernel tests run compiled on CUDA when a GPU is present, else under the Triton interpreter on CPU."""

from __future__ import annotations

import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # Must be set before tnd_kernels (and so the @triton.jit decorators) is imported.
    os.environ["TRITON_INTERPRET"] = "1"
    # If some earlier import built the kernels compiled, rebuild them interpreted.
    if any(name == "tnd_kernels" or name.startswith("tnd_kernels.") for name in sys.modules):
        for name in [n for n in sys.modules if n == "tnd_kernels" or n.startswith("tnd_kernels.")]:
            del sys.modules[name]

DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture(autouse=True)
def _several_blocks(monkeypatch):
    """Vocabulary block of 1024 everywhere, so V = 2053 runs 3 blocks (the last one partial), compiled too."""
    from tnd_kernels import _common

    monkeypatch.setattr(_common, "MAX_BLOCK", 1024)
    monkeypatch.setattr(_common, "MAX_BLOCK_K", 64)


@pytest.fixture
def device() -> str:
    return DEVICE
