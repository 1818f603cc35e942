"""Gradient checkpointing, one way for every model fastlm loads.

enable_checkpointing(peft_model, "fastlm")   # True: plain; "fastlm" / "unsloth": offloaded
enable_checkpointing(peft_model, "activations")  # no recompute: saved activations offloaded
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch import nn
from transformers import PreTrainedModel

from fastlm.offload.activations import enable_offloaded_activations, offloaded_activations
from fastlm.offload.checkpoint import (
    enable_offloaded_checkpointing,
    offloaded_checkpoint,
    set_checkpoint_function,
)

logger = logging.getLogger("fastlm")
# The methods a trainer calls to turn checkpointing on (transformers 5.x names both).
_ENABLERS = ("activation_checkpointing_enable", "gradient_checkpointing_enable")

CHECKPOINTING_MODES = (True, False, "fastlm", "unsloth", "activations")


def enable_checkpointing(model: nn.Module, mode: bool | str = True) -> None:
    """True: transformers' non-reentrant checkpointing. "fastlm" / "unsloth": the same, with each
    layer's saved input offloaded to pinned CPU memory (``fastlm.offload``). "activations": no
    recompute; every large tensor a layer saves for its backward waits in pinned CPU memory
    (``fastlm.offload.activations``). The KV cache is turned off (it cannot be used while
    checkpointing). False (or None) does nothing.

    Usage: ``enable_checkpointing(model, "unsloth")``.
    """
    release_checkpoint_function(model)  # an earlier offloaded mode no longer comes back
    if not mode:
        return
    if mode in ("fastlm", "unsloth"):
        enable_offloaded_checkpointing(model)
        keep_checkpoint_function(model, offloaded_checkpoint)
    elif mode == "activations":
        enable_offloaded_activations(model)
        keep_checkpoint_function(model, offloaded_activations)
    elif mode is True:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise ValueError(
            f"use_gradient_checkpointing={mode!r}: use True, False, 'fastlm' (offloaded), "
            "'unsloth' (the same as 'fastlm') or 'activations' (offloaded, no recompute)."
        )
    set_use_cache(model, False)


class TrainerCheckpointing:
    """The checkpointing methods a Trainer calls at ``train()``, for a model that wraps a
    transformers body (``CHECKPOINTED_BODY`` names the attribute): non-reentrant checkpointing of
    the body's layers, a fastlm offloaded mode kept on. Mixed into ``FastSentenceTransformer``
    and ``FastReranker``.

    Usage: ``class Wrapper(TrainerCheckpointing, nn.Module): CHECKPOINTED_BODY = "backbone"``.
    """

    CHECKPOINTED_BODY = "model"

    def activation_checkpointing_enable(
        self,
        activation_checkpointing_kwargs: dict | None = None,
        every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """Checkpointing of the body's layers (transformers 5.x Trainers call this)."""
        body = getattr(self, self.CHECKPOINTED_BODY)
        turn_on_checkpointing(body, activation_checkpointing_kwargs, every_n_layers, offload)

    gradient_checkpointing_enable = activation_checkpointing_enable  # the older name (Trainers)


def turn_on_checkpointing(
    body: nn.Module, kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False
) -> None:
    """Non-reentrant checkpointing of ``body``'s layers, with transformers' arguments passed on
    where they are not the defaults (older transformers take neither). A fastlm offloaded mode
    on ``body`` stays on (``keep_checkpoint_function``).

    Usage: ``turn_on_checkpointing(self.backbone, activation_checkpointing_kwargs)``.
    """
    options = {"use_reentrant": False, **(kwargs or {})}
    extra = {"every_n_layers": every_n_layers} if every_n_layers != 1 else {}
    if offload:
        extra["offload"] = True
    enable = getattr(body, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=options, **extra)
    else:
        body.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options, **extra)


def keep_checkpoint_function(model: nn.Module, function: Callable) -> None:
    """Keep ``function`` as every layer's checkpoint function when something turns
    checkpointing on again.

    The HF Trainer does that at ``train()`` when its arguments ask for checkpointing (TRL's
    SFTConfig does by default), and PEFT's k-bit preparation does too: transformers then puts
    torch's checkpoint back on every layer, and fastlm's offloaded mode would be gone without a
    word (more GPU memory, and no layer graphs). Each transformers model inside ``model`` gets
    instance wrappers of both enable methods: the call runs as transformers wrote it (its
    flags, ``every_n_layers``), then the layers get ``function`` back, which is logged once.
    ``release_checkpoint_function`` removes the wrappers.

    Usage: ``keep_checkpoint_function(peft_model, offloaded_checkpoint)``.
    """
    said = []
    for module in model.modules():
        if not isinstance(module, PreTrainedModel):
            continue
        for name in _ENABLERS:
            original = getattr(type(module), name, None)
            if original is not None:
                setattr(module, name, _keeping(module, original, function, said))


def release_checkpoint_function(model: nn.Module) -> None:
    """Undo ``keep_checkpoint_function``: the models' own enable methods again.

    Usage: ``release_checkpoint_function(peft_model)``.
    """
    for module in model.modules():
        for name in _ENABLERS:
            if name in vars(module):
                delattr(module, name)


def _keeping(module: nn.Module, original: Callable, function: Callable, said: list) -> Callable:
    def enable(*args, **kwargs):
        result = original(module, *args, **kwargs)
        set_checkpoint_function(module, function)
        if not said:
            said.append(True)
            logger.info(
                "checkpointing was turned on again (e.g. by the Trainer); the layers keep "
                "fastlm's %s",
                function.__name__,
            )
        return result

    return enable


def set_use_cache(model: nn.Module, value: bool) -> None:
    """``config.use_cache`` of every module that has a config (PEFT wrappers, the body, the LM).

    Usage: ``set_use_cache(model, True)`` before generating."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "use_cache"):
            config.use_cache = value
