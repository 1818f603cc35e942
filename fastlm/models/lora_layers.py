"""Which linear layers can take the fused LoRA path, and the tensors they hand to it.

A layer runs fused only when fastlm computes exactly what PEFT would: a plain ``nn.Linear``, or a
PEFT ``lora.Linear`` with one active adapter, no dropout, no DoRA or other variant, no LoRA bias,
over a plain ``nn.Linear`` base. Anything else runs PEFT's own forward, and ``fused_report``
says why.
"""

from __future__ import annotations

from torch import nn

from fastlm.autograd import LoRAWeights

try:  # peft is a dependency, but keep plain-model use importable without it
    from peft.tuners.lora import Linear as PeftLoraLinear
except ImportError:  # pragma: no cover
    PeftLoraLinear = ()  # type: ignore[assignment]


def linear_weights(module: nn.Module) -> tuple[LoRAWeights | None, str]:
    """``(weights, "")`` when ``module`` can run fused, else ``(None, reason)``.

    Usage: ``weights, why_not = linear_weights(attn.q_proj)``.
    """
    if type(module) is nn.Linear:
        return LoRAWeights(module.weight, module.bias), ""
    if PeftLoraLinear and isinstance(module, PeftLoraLinear):
        return _peft_lora_weights(module)
    return None, f"{type(module).__name__} is not an nn.Linear or a PEFT LoRA Linear"


def _peft_lora_weights(module) -> tuple[LoRAWeights | None, str]:
    base = module.get_base_layer()
    if type(base) is not nn.Linear:
        return None, f"base layer is {type(base).__name__} (fused path needs a plain nn.Linear)"
    # Adapters disabled or merged into the base weight: the base layer alone is the exact answer.
    if module.disable_adapters or module.merged:
        return LoRAWeights(base.weight, base.bias), ""
    active = [name for name in module.active_adapters if name in module.lora_A]
    if not active:
        return LoRAWeights(base.weight, base.bias), ""
    if len(active) > 1:
        return None, f"{len(active)} active adapters (fused path takes one)"
    name = active[0]
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
    return (
        LoRAWeights(base.weight, base.bias, lora_a.weight, lora_b.weight, module.scaling[name]),
        "",
    )
