"""Decides whether an op runs its Triton kernel or its PyTorch reference."""

from __future__ import annotations

import os

import torch

# Set before triton is imported (the interpreter reads it at import time); read here only so
# that tests on a CPU machine can drive the Triton code on CPU tensors.
_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` should go through the Triton kernel: CUDA tensors always do."""
    return tensor.is_cuda


def triton_can_run(tensor: torch.Tensor) -> bool:
    """True when a Triton launch on ``tensor`` can work (a GPU, or the CPU interpreter)."""
    return tensor.is_cuda or _INTERPRETER
