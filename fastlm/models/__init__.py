"""Architecture specs and the shared code that patches a loaded model instance.

A decoder family's ``ArchitectureSpec`` (``SPECS``) holds every fact fastlm needs about it:
module classes, norm and activation for the patches, the GGUF arch and the configs it refuses,
the embedding defaults. Encoder families (BERT...) get an ``EncoderSpec`` (``ENCODERS``).
"""

from __future__ import annotations

from fastlm.errors import UnsupportedArchitectureError
from fastlm.models.embedding_gemma2 import EMBEDDING_GEMMA2_TEXT
from fastlm.models.encoders import ENCODERS, EncoderSpec, encoder_spec
from fastlm.models.finite import check_finite_weights, nonfinite_tensors
from fastlm.models.finite_guard import install_finite_guard, verify_finite
from fastlm.models.gemma import GEMMA, GEMMA2
from fastlm.models.gemma3 import GEMMA3_TEXT
from fastlm.models.gemma4 import GEMMA4_TEXT
from fastlm.models.gpt_oss import GPT_OSS
from fastlm.models.llama import LLAMA
from fastlm.models.llama4 import LLAMA4_TEXT
from fastlm.models.mistral import MISTRAL
from fastlm.models.mistral4 import MISTRAL4
from fastlm.models.patch import (
    FusedReport,
    decoder_body,
    fused_report,
    is_patched,
    patch_model,
    patch_state,
    unpatch_model,
)
from fastlm.models.qwen import QWEN2, QWEN3
from fastlm.models.qwen3_5 import QWEN3_5_TEXT
from fastlm.models.qwen3_5_moe import QWEN3_5_MOE_TEXT
from fastlm.models.qwen3_moe import QWEN3_MOE
from fastlm.models.spec import PROJECTIONS, ArchitectureSpec, PromptStyle

SPECS: dict[str, ArchitectureSpec] = {
    spec.model_type: spec
    for spec in (
        LLAMA,
        MISTRAL,
        QWEN2,
        QWEN3,
        QWEN3_MOE,
        GEMMA,
        GEMMA2,
        GEMMA3_TEXT,
        GEMMA4_TEXT,
        QWEN3_5_TEXT,
        QWEN3_5_MOE_TEXT,
        GPT_OSS,
        LLAMA4_TEXT,
        MISTRAL4,
        EMBEDDING_GEMMA2_TEXT,
    )
}
# Multimodal checkpoints whose text model has a spec: model_type -> (family, text class, its type).
_TEXT_MODELS = {
    "gemma3": ("Gemma 3", "Gemma3ForCausalLM", "gemma3_text"),
    "gemma4": ("Gemma 4", "Gemma4ForCausalLM", "gemma4_text"),
    "qwen3_5": ("Qwen3.5", "Qwen3_5ForCausalLM", "qwen3_5_text"),
    "qwen3_5_moe": ("Qwen3.5-MoE", "Qwen3_5MoeForCausalLM", "qwen3_5_moe_text"),
    "embedding_gemma2": ("EmbeddingGemma 2", "EmbeddingGemma2TextModel", "embedding_gemma2_text"),
    "llama4": ("Llama 4", "Llama4ForCausalLM", "llama4_text"),
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
        if model_type in _TEXT_MODELS:
            family, text_class, text_type = _TEXT_MODELS[model_type]
            hint = (
                f" Multimodal {family} checkpoints are not supported; load the text-only "
                f"{text_class} (model_type {text_type!r})."
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
    for check in spec.load_checks:
        check(config)
    return spec


def embedding_pooling(model_type: str | None) -> str:
    """The default pooling of an embedding body of this family ("mean" when it has none).

    Usage: ``embedding_pooling("qwen3")`` -> ``"lasttoken"``.
    """
    spec = SPECS.get(model_type) or encoder_spec(model_type)
    return spec.embedding_pooling if spec else "mean"


def output_width(config) -> int:
    """Width of a body's last_hidden_state: hidden_size, unless the family's forward projects
    it (EmbeddingGemma 2: embedding_dim).

    Usage: ``output_width(model.config)`` -> ``768``.
    """
    spec = SPECS.get(getattr(config, "model_type", None))
    attr = spec.output_width_attr if spec else None
    return getattr(config, attr) if attr else config.hidden_size


__all__ = [
    "ENCODERS",
    "PROJECTIONS",
    "SPECS",
    "ArchitectureSpec",
    "EncoderSpec",
    "FusedReport",
    "PromptStyle",
    "check_finite_weights",
    "decoder_body",
    "embedding_pooling",
    "encoder_spec",
    "fused_report",
    "install_finite_guard",
    "is_patched",
    "nonfinite_tensors",
    "output_width",
    "patch_model",
    "patch_state",
    "spec_for",
    "unpatch_model",
    "verify_finite",
]
