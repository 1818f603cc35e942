"""fastlm under PyTorch DDP and FSDP2 (``torchrun`` / ``accelerate launch``).

DDP needs nothing: it wraps the PEFT model, every rank runs fastlm's patched forwards, and the
LoRA gradients the autograd Functions return reach DDP's hooks like any other gradient.

FSDP2 (``torch.distributed.fsdp.fully_shard``) gathers a unit's parameters in a hook that runs
when *that unit's* forward is called. fastlm's patched forwards read some weights directly, without
calling their module: attention / MLP read their projections' base and LoRA A/B weights, the fused
cross-entropy reads ``lm_head.weight``. That is exact when those modules belong to an enclosing
unit (a decoder layer or the root). A projection or lm_head that is a unit of its own is no
longer a plain ``nn.Linear`` (FSDP swaps its class), so fastlm runs it unfused through its own
forward: still exact, but slower (``check_fsdp2`` warns). LoRA A/B linears as units of their own
(PEFT's FSDP wrap policy applied per module) would hand fastlm sharded tensors:
``gather_direct_reads`` gathers them (FSDP's end-of-backward callback then reduce-scatters their
gradients), ``check_fsdp2`` refuses them otherwise. ``fully_shard_model`` shards the way the
fused paths want: one unit per decoder layer, then the root.

4-bit (QLoRA) base weights cannot be sharded: their quantisation state is not a tensor FSDP2
shards and gathers. ``fully_shard_model`` keeps them out of sharding (``ignored_params``; they
stay whole on every GPU, as accelerate does for uint8 quant storage); sharded ones are refused.

Loss normalisation, as HF Trainer with ``average_tokens_across_devices``: each micro-batch's loss
is ``sum(token losses) / N`` with N the target tokens of all micro-batches of the optimizer step
on all ranks, and is multiplied by the world size before backward (DDP and FSDP2 average
gradients over ranks):

    n = global_num_items_in_batch([mb["labels"] for mb in micro_batches])
    for mb in micro_batches:
        (model(**mb, num_items_in_batch=n).loss * world_size()).backward()
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from fastlm.errors import FastLMError

try:  # torch.distributed is optional in some builds; FSDP2 is public from torch 2.6
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    dist = None  # type: ignore[assignment]
    FSDPModule = DTensor = ()  # type: ignore[assignment,misc]

logger = logging.getLogger("fastlm")

# Projections whose weights fastlm's attention / MLP forwards read directly.
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_GATHERS = "_fastlm_gathers"  # set on modules that carry gather_direct_reads' hooks


class UnsupportedDistributedError(FastLMError, RuntimeError):
    """A distributed set-up that fastlm's fused paths cannot run exactly."""


def world_size() -> int:
    """Processes in the default group (1 when torch.distributed is not initialised)."""
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size()


def count_target_tokens(labels: Iterable[torch.Tensor], ignore_index: int = -100) -> torch.Tensor:
    """Tokens that carry a loss in these unshifted label tensors (position 0 of a row predicts
    nothing), as a 0-d tensor: ``count_target_tokens([mb["labels"] for mb in micro_batches])``."""
    counts = [(y[..., 1:] != ignore_index).sum() for y in labels]
    if not counts:
        raise ValueError("count_target_tokens needs at least one labels tensor")
    return torch.stack(counts).sum()


def global_num_items_in_batch(
    labels: Iterable[torch.Tensor], ignore_index: int = -100, group=None
) -> torch.Tensor:
    """Target tokens of these micro-batches summed over all ranks (stays on the device): the
    ``num_items_in_batch`` that makes the loss a mean over the optimizer step's tokens.

    Usage: ``n = global_num_items_in_batch([mb["labels"] for mb in micro_batches])``.
    """
    count = count_target_tokens(labels, ignore_index)
    if world_size() > 1:
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    return count


def is_fsdp2(model: nn.Module) -> bool:
    """True when ``fully_shard`` was applied to ``model`` or to a module inside it."""
    return bool(FSDPModule) and any(isinstance(m, FSDPModule) for m in model.modules())


def is_plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` exactly, or one that ``fully_shard`` made a unit (class ``FSDPLinear``)."""
    return _original_class(module) is nn.Linear


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


def gather_direct_reads(model: nn.Module) -> nn.Module:
    """Gather, before fastlm reads them, the FSDP2 units whose forward fastlm skips: pre-forward
    hooks on the patched attention / MLP modules, and a hook after the backbone (before the fused
    cross-entropy) for lm_head. Before or after sharding; returns ``model``.

    Usage: ``gather_direct_reads(model)`` when LoRA A/B linears are FSDP units of their own.
    """
    from fastlm import models

    state = models.patch_state(model)
    if state is None:
        raise ValueError("gather_direct_reads expects a model patched by FastModel.from_pretrained")
    owners = (state.spec.attention_class, state.spec.mlp_class)

    def gather_projections(module, _args):
        for projection in _PROJECTIONS:
            child = getattr(module, projection, None)
            if child is not None:
                gather_linear(child)

    for module in model.modules():
        if _original_class(module).__name__ in owners and not getattr(module, _GATHERS, False):
            module.register_forward_pre_hook(gather_projections)
            setattr(module, _GATHERS, True)
    base = _base_model(model)
    backbone = getattr(base, base.base_model_prefix)
    if not getattr(backbone, _GATHERS, False):
        backbone.register_forward_hook(
            lambda _m, _a, _o: unshard_for_direct_read(base.get_output_embeddings())
        )
        setattr(backbone, _GATHERS, True)
    return model


def check_fsdp2(model: nn.Module) -> None:
    """After ``fully_shard`` / ``accelerator.prepare``: raise ``UnsupportedDistributedError`` for
    what fastlm cannot run exactly (sharded 4-bit weights; LoRA A/B linears that are units of
    their own and that a fused forward would read ungathered) and warn about projections that
    run unfused under this wrapping. No-op without FSDP2. Usage: ``check_fsdp2(model)``.
    """
    if not is_fsdp2(model):
        return
    _refuse_sharded_4bit(model)
    ungathered = _ungathered_lora_units(model)
    if ungathered:
        raise UnsupportedDistributedError(
            f"FSDP2 shards {ungathered[0]} as its own unit ({len(ungathered)} LoRA linears in "
            "all: PEFT's FSDP wrap policy per module), but fastlm's fused forwards read their "
            "weights without calling their forward, so FSDP never gathers them. Shard whole "
            "decoder layers (fastlm.distributed.fully_shard_model; accelerate: "
            "TRANSFORMER_BASED_WRAP), or call fastlm.distributed.gather_direct_reads(model)."
        )
    from fastlm import models

    unfused = [row["module"] for row in models.fused_report(model) if "FSDP" in row["reason"]]
    if unfused:
        logger.warning(
            "fastlm: %d projections / heads are FSDP2 units of their own and run unfused (exact, "
            "slower), e.g. %s. Shard whole decoder layers to keep the fused paths.",
            len(unfused),
            unfused[0],
        )


def _ungathered_lora_units(model: nn.Module) -> list[str]:
    """LoRA A/B units that a fused forward reads (``linear_weights`` hands them over) while
    nothing gathers them: neither ``gather_direct_reads`` hooks nor patch.py's read sites."""
    from fastlm.models import lora_layers, patch

    if "gather_linear" in vars(patch) or any(getattr(m, _GATHERS, False) for m in model.modules()):
        return []
    found = []
    for name, module in model.named_modules():
        units = [
            f"{name}.{kind}.{adapter}"
            for kind in ("lora_A", "lora_B")
            for adapter, linear in getattr(module, kind, {}).items()
            if isinstance(linear, FSDPModule)
        ]
        if units and lora_layers.linear_weights(module)[0] is not None:
            found += units
    return found


def fully_shard_model(model: nn.Module, **fsdp_kwargs) -> nn.Module:
    """FSDP2 as fastlm's fused paths want it: one unit per decoder layer, then the root
    (embedding, final norm and lm_head, gathered for the whole step). 4-bit base weights stay out
    of sharding. Keywords go to ``fully_shard`` (mesh, mp_policy, reshard_after_forward...).

    Usage: ``model = fully_shard_model(peft_model, mesh=init_device_mesh("cuda", (world,)))``.
    """
    from torch.distributed.fsdp import fully_shard

    quantized = {p for _, p in _4bit_weights(model)}
    if quantized:
        ignored = set(fsdp_kwargs.pop("ignored_params", None) or ())
        fsdp_kwargs["ignored_params"] = ignored | quantized
    layer_classes = set(getattr(_base_model(model), "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if _original_class(m).__name__ in layer_classes]
    if not layers:
        raise UnsupportedDistributedError(
            f"no decoder layers ({sorted(layer_classes)}) found in {type(model).__name__}"
        )
    for layer in layers:
        fully_shard(layer, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    return model


# --------------------------------------------------------------------------- helpers


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


def _original_class(module: nn.Module) -> type:
    # fully_shard swaps a unit's class for a subclass "FSDP<Name>" of (FSDPModule, original).
    cls = type(module)
    if FSDPModule and isinstance(module, FSDPModule):
        cls = next(c for c in cls.__mro__[1:] if not issubclass(c, FSDPModule))
    return cls


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _4bit_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """bitsandbytes 4-bit weights: a ``Params4bit``, or the weight of a ``Linear4bit``."""
    found = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None:
            continue
        if (
            type(weight).__name__ == "Params4bit"
            or "Linear4bit" in _original_class(module).__name__
        ):
            found.append((f"{name}.weight", weight))
    return found


def _refuse_sharded_4bit(model: nn.Module) -> None:
    sharded = [name for name, weight in _4bit_weights(model) if isinstance(weight, DTensor)]
    if sharded:
        raise UnsupportedDistributedError(
            f"FSDP2 shards the 4-bit weight {sharded[0]} ({len(sharded)} in all): its "
            "quantisation state is not a tensor FSDP2 can shard and gather, so the layer cannot "
            "be computed. Keep 4-bit weights out of sharding (fastlm.distributed."
            "fully_shard_model does; accelerate does for bnb_4bit_quant_storage=torch.uint8, "
            "fastlm's default) or use DDP."
        )
