"""Gradient checkpointing, one way for every model fastlm loads.

enable_checkpointing(peft_model, "fastlm")   # True: plain; "fastlm" / "unsloth": offloaded
enable_checkpointing(peft_model, "activations")  # no recompute: saved activations offloaded
"""

from __future__ import annotations

from torch import nn

from fastlm.offload.activations import enable_offloaded_activations
from fastlm.offload.checkpoint import enable_offloaded_checkpointing

CHECKPOINTING_MODES = (True, False, "fastlm", "unsloth", "activations")


def enable_checkpointing(model: nn.Module, mode: bool | str = True) -> None:
    """True: transformers' non-reentrant checkpointing. "fastlm" / "unsloth": the same, with each
    layer's saved input offloaded to pinned CPU memory (``fastlm.offload``). "activations": no
    recompute; every large tensor a layer saves for its backward waits in pinned CPU memory
    (``fastlm.offload.activations``). The KV cache is turned off (it cannot be used while
    checkpointing). False (or None) does nothing.

    Usage: ``enable_checkpointing(model, "unsloth")``.
    """
    if not mode:
        return
    if mode in ("fastlm", "unsloth"):
        enable_offloaded_checkpointing(model)
    elif mode == "activations":
        enable_offloaded_activations(model)
    elif mode is True:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise ValueError(
            f"use_gradient_checkpointing={mode!r}: use True, False, 'fastlm' (offloaded), "
            "'unsloth' (the same as 'fastlm') or 'activations' (offloaded, no recompute)."
        )
    set_use_cache(model, False)


def set_use_cache(model: nn.Module, value: bool) -> None:
    """``config.use_cache`` of every module that has a config (PEFT wrappers, the body, the LM).

    Usage: ``set_use_cache(model, True)`` before generating."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "use_cache"):
            config.use_cache = value
