"""Which linear layers can take the fused LoRA path, and the tensors they hand to it.

A layer runs fused only when fastlm computes exactly what PEFT would: a plain ``nn.Linear`` or
bitsandbytes NF4 ``Linear4bit``, or a PEFT LoRA layer over one of those with one active adapter,
no dropout, no DoRA or other variant, no LoRA bias. Anything else runs PEFT's own forward, and
``fused_report`` says why.
"""

from __future__ import annotations

from torch import nn

from fastlm.autograd import LoRAWeights
from fastlm.models.fsdp import is_plain_linear

try:  # peft is a dependency, but keep plain-model use importable without it
    from peft.tuners.lora import Linear as PeftLoraLinear
except ImportError:  # pragma: no cover
    PeftLoraLinear = ()  # type: ignore[assignment]
try:  # bitsandbytes is optional (the [quant] extra): without it there are no 4-bit layers
    from bitsandbytes.nn import Linear4bit as BnbLinear4bit
    from peft.tuners.lora.bnb import Linear4bit as PeftLoraLinear4bit
except ImportError:
    BnbLinear4bit = PeftLoraLinear4bit = ()  # type: ignore[assignment,misc]


def linear_weights(module: nn.Module) -> tuple[LoRAWeights | None, str]:
    """``(weights, "")`` when ``module`` can run fused, else ``(None, reason)``.

    Usage: ``weights, why_not = linear_weights(attn.q_proj)``.
    """
    base, why_not = base_weights(module)
    if base is not None or not isinstance(module, (PeftLoraLinear, PeftLoraLinear4bit)):
        return base, why_not
    return _peft_lora_weights(module)


def base_weights(module: nn.Module) -> tuple[LoRAWeights | None, str]:
    """``(LoRAWeights(weight, bias), "")`` of a plain or NF4 linear layer, else ``(None, reason)``.

    A 4-bit weight is handed over packed; the LoRA Functions dequantise it (lora_weights.py).
    """
    if is_plain_linear(module):  # also an FSDP2 unit (FSDPLinear): patch.py gathers it
        return LoRAWeights(module.weight, module.bias), ""
    if BnbLinear4bit and type(module) is BnbLinear4bit:
        quant_state = getattr(module.weight, "quant_state", None)
        if quant_state is None:
            return None, "Linear4bit weight is not quantised yet (move the model to its device)"
        if quant_state.quant_type != "nf4":
            return None, f"4-bit {quant_state.quant_type} weights (fused path takes nf4)"
        if getattr(quant_state, "packing_format_for_cpu", False):
            return None, "4-bit weight repacked for bitsandbytes' CPU inference kernel"
        return LoRAWeights(module.weight, module.bias), ""
    return None, f"{type(module).__name__} is not an nn.Linear, a 4-bit Linear or a PEFT LoRA layer"


def active_adapter(module, path: str = "fused") -> tuple[str | None, str]:
    """The one adapter a PEFT layer (or ParamWrapper) applies: (name, ""); (None, "") when none
    does (disabled, merged into the base weight, none active); (None, why) with several, which
    the ``path`` does not take. Usage: ``name, why_not = active_adapter(peft_layer)``."""
    if module.disable_adapters or module.merged:
        return None, ""
    active = [name for name in module.active_adapters if name in module.lora_A]
    if len(active) > 1:
        return None, f"{len(active)} active adapters ({path} path takes one)"
    return (active[0] if active else None), ""


def _peft_lora_weights(module) -> tuple[LoRAWeights | None, str]:
    base, why_not = base_weights(module.get_base_layer())
    if base is None:
        return None, f"base layer: {why_not}"
    name, why_not = active_adapter(module)
    if why_not:
        return None, why_not
    if name is None:  # disabled, merged or none active: the base layer alone is the exact answer
        return base, ""
    if not isinstance(module.lora_dropout[name], nn.Identity):
        return None, "lora_dropout > 0"
    if name in getattr(module, "lora_variant", {}):
        return None, f"LoRA variant {type(module.lora_variant[name]).__name__} (e.g. DoRA)"
    if module.use_dora.get(name, False):
        return None, "DoRA"
    if getattr(module, "lora_bias", {}).get(name, False):
        return None, "lora_bias=True"
    if getattr(module, "fan_in_fan_out", False):
        return None, "fan_in_fan_out weights"
    lora_a, lora_b = module.lora_A[name], module.lora_B[name]
    if lora_a.bias is not None or lora_b.bias is not None:
        return None, "LoRA A/B with bias"
    return base._replace(
        lora_A=lora_a.weight, lora_B=lora_b.weight, scaling=module.scaling[name]
    ), ""
