"""Decides whether an op runs its Triton kernel or its PyTorch reference."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

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


_FORCED_GPU_SHAPES = False


def gpu_launch_shapes(tensor: torch.Tensor) -> bool:
    """True when a launcher should pick its GPU tiles; False picks the interpreter's small ones."""
    return tensor.is_cuda or _FORCED_GPU_SHAPES


@contextlib.contextmanager
def forced_gpu_launch_shapes() -> Iterator[None]:
    """GPU tiles for CPU tensors too, so kernels can be compiled for a GPU on a machine without one
    (``tests/kernels/compile_for_gpu.py``). Usage: ``with forced_gpu_launch_shapes(): ...``."""
    global _FORCED_GPU_SHAPES
    previous, _FORCED_GPU_SHAPES = _FORCED_GPU_SHAPES, True
    try:
        yield
    finally:
        _FORCED_GPU_SHAPES = previous
