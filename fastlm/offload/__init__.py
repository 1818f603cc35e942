"""Activation offload for gradient checkpointing (CPU-resident weight streaming comes later)."""

from fastlm.offload.checkpoint import enable_offloaded_checkpointing, offloaded_checkpoint

__all__ = ["enable_offloaded_checkpointing", "offloaded_checkpoint"]
