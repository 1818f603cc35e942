"""fastlm under PyTorch DDP and FSDP2 (``torchrun`` / ``accelerate launch``).

DDP needs nothing: it wraps the PEFT model, every rank runs fastlm's patched forwards, and the
LoRA gradients the autograd Functions return reach DDP's hooks like any other gradient.

FSDP2 (``torch.distributed.fsdp.fully_shard``) gathers a unit's parameters in a hook that runs
when *that unit's* forward is called. fastlm's patched forwards read some weights directly, without
calling their module: attention / MLP read their projections' base and LoRA A/B weights, the fused
cross-entropy reads ``lm_head.weight``. Each of those read sites gathers what it reads first
(``fastlm.models.fsdp``): a projection, a LoRA A/B linear (PEFT's FSDP wrap policy applied per
module) or lm_head that is a unit of its own runs fused and exact, and FSDP's end-of-backward
callback reduce-scatters its gradients. ``fully_shard_model`` shards the way the fused paths want
(one unit per decoder layer, then the root: no per-projection gathers).

4-bit (QLoRA) base weights cannot be sharded: their quantisation state is not a tensor FSDP2
shards and gathers. ``fully_shard_model`` keeps them out of sharding (``ignored_params``; they
stay whole on every GPU, as accelerate does for uint8 quant storage); ``check_fsdp2`` refuses
sharded ones.

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

from fastlm import models, quant
from fastlm.models.fsdp import (
    DTensor,
    UnsupportedDistributedError,
    gather_linear,
    is_fsdp2,
    is_plain_linear,
    original_class,
    unshard_for_direct_read,
)
from fastlm.models.spec import PROJECTIONS

try:  # torch.distributed is optional in some builds
    import torch.distributed as dist
except ImportError:  # pragma: no cover
    dist = None  # type: ignore[assignment]

# In reading order; the last five live in fastlm.models.fsdp (the patched forwards use them).
__all__ = [
    "world_size",
    "count_target_tokens",
    "global_num_items_in_batch",
    "fully_shard_model",
    "check_fsdp2",
    "gather_direct_reads",
    "UnsupportedDistributedError",
    "is_fsdp2",
    "is_plain_linear",
    "unshard_for_direct_read",
    "gather_linear",
]

logger = logging.getLogger("fastlm")

_GATHERS = "_fastlm_gathers"  # set on modules that carry gather_direct_reads' hooks


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


def gather_direct_reads(model: nn.Module) -> nn.Module:
    """Gather, before the patched forwards run, the FSDP2 units whose forward fastlm skips:
    pre-forward hooks on the patched attention / MLP modules, and a hook after the backbone
    (before the fused cross-entropy) for lm_head. Before or after sharding; returns ``model``.

    The read sites gather on their own (``fastlm.models.fsdp.gather_linear``), so these hooks
    only move the same gathers to the start of each module's forward; a second gather of a unit
    is a no-op. Usage: ``gather_direct_reads(model)``.
    """
    state = models.patch_state(model)
    if state is None:
        raise ValueError("gather_direct_reads expects a model patched by FastModel.from_pretrained")
    owners = (state.spec.attention_class, state.spec.mlp_class)

    def gather_projections(module, _args):
        for projection in PROJECTIONS:
            child = getattr(module, projection, None)
            if child is not None:
                gather_linear(child)

    for module in model.modules():
        if original_class(module).__name__ in owners and not getattr(module, _GATHERS, False):
            module.register_forward_pre_hook(gather_projections)
            setattr(module, _GATHERS, True)
    base = _base_model(model)
    backbone = models.decoder_body(base)
    if not getattr(backbone, _GATHERS, False):
        backbone.register_forward_hook(
            lambda _m, _a, _o: unshard_for_direct_read(base.get_output_embeddings())
        )
        setattr(backbone, _GATHERS, True)
    return model


def check_fsdp2(model: nn.Module) -> None:
    """After ``fully_shard`` / ``accelerator.prepare``: raise ``UnsupportedDistributedError`` for
    sharded 4-bit weights (fastlm cannot compute them) and warn about projections that run
    unfused under this wrapping. No-op without FSDP2. Usage: ``check_fsdp2(model)``.

    Projections, LoRA A/B linears and lm_head as units of their own need no check: every read
    site of the patched forwards gathers what it reads (``tests/distributed/test_read_sites.py``
    fails on a read site that does not).
    """
    if not is_fsdp2(model):
        return
    _refuse_sharded_4bit(model)
    unfused = [row["module"] for row in models.fused_report(model) if "FSDP" in row["reason"]]
    if unfused:
        logger.warning(
            "fastlm: %d projections / heads are FSDP2 units of their own and run unfused (exact, "
            "slower), e.g. %s. Shard whole decoder layers to keep the fused paths.",
            len(unfused),
            unfused[0],
        )


def fully_shard_model(model: nn.Module, **fsdp_kwargs) -> nn.Module:
    """FSDP2 as fastlm's fused paths want it: one unit per decoder layer, then the root
    (embedding, final norm and lm_head, gathered for the whole step). 4-bit base weights stay out
    of sharding. Keywords go to ``fully_shard`` (mesh, mp_policy, reshard_after_forward...).

    Usage: ``model = fully_shard_model(peft_model, mesh=init_device_mesh("cuda", (world,)))``.
    """
    from torch.distributed.fsdp import fully_shard  # lazy: builds without torch.distributed

    quantized = {weight for _, _, weight in quant.packed_weights(model)}
    if quantized:
        ignored = set(fsdp_kwargs.pop("ignored_params", None) or ())
        fsdp_kwargs["ignored_params"] = ignored | quantized
    layer_classes = set(getattr(_base_model(model), "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if original_class(m).__name__ in layer_classes]
    if not layers:
        raise UnsupportedDistributedError(
            f"no decoder layers ({sorted(layer_classes)}) found in {type(model).__name__}"
        )
    for layer in layers:
        fully_shard(layer, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    return model


# --------------------------------------------------------------------------- helpers


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _refuse_sharded_4bit(model: nn.Module) -> None:
    sharded = [
        f"{name}.weight"
        for name, _, weight in quant.packed_weights(model)
        if isinstance(weight, DTensor)
    ]
    if sharded:
        raise UnsupportedDistributedError(
            f"FSDP2 shards the 4-bit weight {sharded[0]} ({len(sharded)} in all): its "
            "quantisation state is not a tensor FSDP2 can shard and gather, so the layer cannot "
            "be computed. Keep 4-bit weights out of sharding (fastlm.distributed."
            "fully_shard_model does; accelerate does for bnb_4bit_quant_storage=torch.uint8, "
            "fastlm's default) or use DDP."
        )
