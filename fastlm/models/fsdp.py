"""FSDP2 as the patched forwards meet it: which modules are units, and gathering the units whose
weights fastlm reads without calling their forward.

FSDP2 (``torch.distributed.fsdp.fully_shard``) gathers a unit's parameters in a hook that runs
when *that unit's* forward is called, and swaps the unit's class for a subclass
``FSDP<Name>`` of (FSDPModule, original). The patched attention / MLP forwards read their
projections' base and LoRA A/B weights directly, and the fused cross-entropy reads
``lm_head.weight``; so every such read site first calls ``gather_linear`` (a projection) or
``unshard_for_direct_read`` (a head). A projection, a LoRA A/B linear or lm_head that is a unit of
its own is then gathered, and FSDP's end-of-backward callback reduce-scatters its gradients and
reshards it. Without FSDP2 every function here is a no-op.

Usage (a read site): ``gather_linear(attn.q_proj); weights = linear_weights(attn.q_proj)``.
"""

from __future__ import annotations

from torch import nn

from fastlm.errors import FastLMError

try:  # FSDP2 is public from torch 2.6; some builds have no torch.distributed
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    FSDPModule = DTensor = ()  # type: ignore[assignment,misc]


class UnsupportedDistributedError(FastLMError, RuntimeError):
    """A distributed set-up that fastlm's fused paths cannot run exactly."""


def is_fsdp2(model: nn.Module) -> bool:
    """True when ``fully_shard`` was applied to ``model`` or to a module inside it."""
    return bool(FSDPModule) and any(isinstance(m, FSDPModule) for m in model.modules())


def original_class(module: nn.Module) -> type:
    """The module's class before ``fully_shard`` made it a unit (``FSDPLinear`` -> ``Linear``)."""
    cls = type(module)
    if FSDPModule and isinstance(module, FSDPModule):
        cls = next(c for c in cls.__mro__[1:] if not issubclass(c, FSDPModule))
    return cls


def is_plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` exactly, or one that ``fully_shard`` made a unit (class ``FSDPLinear``)."""
    return original_class(module) is nn.Linear


def unshard_for_direct_read(*modules: nn.Module | None) -> None:
    """Gather any of ``modules`` that is an FSDP2 unit whose forward fastlm skips (it reads the
    weight directly); a no-op for anything else. FSDP's end-of-backward callback reduce-scatters
    the gradients and reshards. Usage: ``unshard_for_direct_read(head); w = head.weight``.
    """
    for module in modules:
        if FSDPModule and isinstance(module, FSDPModule):
            _unshard(module)


def gather_linear(module: nn.Module) -> None:
    """``unshard_for_direct_read`` on a projection, its PEFT base layer and its LoRA A/B.

    Called for every projection on every forward, so it only looks at ``_modules`` (~1 us).
    """
    if not FSDPModule:
        return
    if isinstance(module, FSDPModule):
        _unshard(module)
    children = module._modules
    if not children:
        return
    base = children.get("base_layer")
    if isinstance(base, FSDPModule):
        _unshard(base)
    for kind in ("lora_A", "lora_B"):
        adapters = children.get(kind)
        if adapters is not None:
            for linear in adapters._modules.values():
                if isinstance(linear, FSDPModule):
                    _unshard(linear)


def _unshard(module: nn.Module) -> None:
    if not any(isinstance(p, DTensor) for p in module.parameters(recurse=False)):
        return  # already gathered: by its unit's hook, by its group, or by an earlier call
    module.unshard()
    sharded = [n for n, p in module.named_parameters(recurse=False) if isinstance(p, DTensor)]
    if sharded:
        raise UnsupportedDistributedError(
            f"{type(module).__name__}.{sharded[0]} is still sharded after unshard(): fastlm's "
            "fused kernels need the full tensor. Shard with fastlm.distributed.fully_shard_model "
            "(one unit per decoder layer)."
        )
