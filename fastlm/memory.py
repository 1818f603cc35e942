"""GPU memory figures during training: a Trainer callback and an on-demand report.

``allocated`` is what live tensors use, ``reserved`` what PyTorch's caching allocator holds from
the driver (what ``nvidia-smi`` roughly shows), ``peak`` the highest ``allocated`` since the last
reset: the number that decides whether a run fits a card. On a machine without CUDA the
process's resident and peak host memory are reported instead.

Usage::

    trainer = SFTTrainer(..., callbacks=[fastlm.MemoryCallback()])
    fastlm.print_memory("after loading")
"""

from __future__ import annotations

import logging
import resource
import sys

import torch
from transformers import TrainerCallback

logger = logging.getLogger("fastlm")
GIB = 1024**3


def memory_stats(device: int | torch.device | None = None) -> dict[str, float]:
    """Memory in GiB: ``allocated``, ``reserved``, ``peak`` on CUDA; host ``rss``/``peak_rss`` else.

    Usage: ``stats = memory_stats(); stats["peak"]``.
    """
    if torch.cuda.is_available():
        return {
            "allocated": torch.cuda.memory_allocated(device) / GIB,
            "reserved": torch.cuda.memory_reserved(device) / GIB,
            "peak": torch.cuda.max_memory_allocated(device) / GIB,
        }
    return {"rss": _current_rss_bytes() / GIB, "peak_rss": _peak_rss_bytes() / GIB}


def format_memory(stats: dict[str, float]) -> str:
    """``"allocated 3.21 GiB, reserved 4.00 GiB, peak 3.90 GiB"``."""
    return ", ".join(f"{name} {value:.2f} GiB" for name, value in stats.items())


def print_memory(label: str = "memory") -> dict[str, float]:
    """Print (and return) the current memory figures. Usage: ``print_memory("after step 1")``."""
    stats = memory_stats()
    print(f"{label}: {format_memory(stats)}")
    return stats


class MemoryCallback(TrainerCallback):
    """Adds ``mem_allocated_gib`` / ``mem_reserved_gib`` / ``mem_peak_gib`` to each Trainer log.

    Usage: ``SFTTrainer(..., callbacks=[MemoryCallback()])``; the figures go wherever the logs
    go (console, TensorBoard, W&B) and are in ``trainer.state.log_history``.
    """

    def on_train_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_log(self, args, state, control, logs=None, **kwargs):
        figures = {f"mem_{name}_gib": round(value, 3) for name, value in memory_stats().items()}
        if logs is not None:
            logs.update(figures)  # for the callbacks after this one
        # The Trainer appended its copy of the logs before calling back: complete that one too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(figures)
        logger.info("step %d memory: %s", state.global_step, format_memory(memory_stats()))

    def on_train_end(self, args, state, control, **kwargs):
        logger.info("memory at the end of training: %s", format_memory(memory_stats()))


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()
    except OSError:  # not Linux: the peak is the best figure there is
        return _peak_rss_bytes()
