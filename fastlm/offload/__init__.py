"""Activation offload for gradient checkpointing (CPU-resident weight streaming comes later)."""

from fastlm.offload.checkpoint import (
    BUDGET,
    PinnedBudget,
    enable_offloaded_checkpointing,
    offloaded_checkpoint,
)

__all__ = ["BUDGET", "PinnedBudget", "enable_offloaded_checkpointing", "offloaded_checkpoint"]
