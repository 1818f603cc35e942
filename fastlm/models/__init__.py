"""Architecture specs and the shared code that patches a loaded model instance."""

from __future__ import annotations

from fastlm.errors import UnsupportedArchitectureError
from fastlm.models.finite import check_finite_weights, nonfinite_tensors
from fastlm.models.finite_guard import install_finite_guard, verify_finite
from fastlm.models.gemma import GEMMA, GEMMA2
from fastlm.models.gemma3 import GEMMA3_TEXT
from fastlm.models.llama import LLAMA
from fastlm.models.mistral import MISTRAL
from fastlm.models.patch import fused_report, is_patched, patch_model, patch_state, unpatch_model
from fastlm.models.qwen import QWEN2, QWEN3
from fastlm.models.spec import ArchitectureSpec

SPECS: dict[str, ArchitectureSpec] = {
    spec.model_type: spec for spec in (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA, GEMMA2, GEMMA3_TEXT)
}


def spec_for(config) -> ArchitectureSpec:
    """The spec for a transformers config; a clear error for anything else.

    Usage: ``spec = spec_for(model.config)``.
    """
    model_type = getattr(config, "model_type", None)
    spec = SPECS.get(model_type)
    if spec is None:
        supported = ", ".join(f"{s.family} ({s.model_type!r})" for s in SPECS.values())
        hint = ""
        if model_type == "gemma3":
            hint = (
                " Multimodal Gemma 3 checkpoints are not supported; load the text-only "
                "Gemma3ForCausalLM (model_type 'gemma3_text')."
            )
        raise UnsupportedArchitectureError(
            f"fastlm has no patches for model_type {model_type!r}. Supported: {supported}.{hint}"
        )
    value = getattr(config, spec.activation_config_attr, None)
    if value not in spec.activation_config_values:
        raise UnsupportedArchitectureError(
            f"{spec.family} with {spec.activation_config_attr}={value!r} is not supported; "
            f"fastlm implements {spec.activation_config_values}."
        )
    return spec


__all__ = [
    "SPECS",
    "ArchitectureSpec",
    "check_finite_weights",
    "fused_report",
    "install_finite_guard",
    "is_patched",
    "nonfinite_tensors",
    "patch_model",
    "patch_state",
    "spec_for",
    "unpatch_model",
    "verify_finite",
]
