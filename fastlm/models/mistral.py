"""Mistral: Llama's blocks (w·x̂ RMSNorm, SwiGLU), sliding-window attention from the config."""

from fastlm.models.gguf_limits import default_rope_only
from fastlm.models.spec import ArchitectureSpec


def _window_covers_context(config) -> None:
    """llama.cpp runs Mistral as "llama", which attends to the whole context: refuse a window
    shorter than the context (outputs would differ past it)."""
    window = getattr(config, "sliding_window", None)
    if window and window < config.max_position_embeddings:
        raise NotImplementedError(
            f"Mistral sliding_window={window} < max_position_embeddings="
            f"{config.max_position_embeddings} cannot be represented in GGUF (llama.cpp runs "
            "full attention); set config.sliding_window = None if full attention is acceptable"
        )


MISTRAL = ArchitectureSpec(
    model_type="mistral",
    family="Mistral",
    norm_class="MistralRMSNorm",
    attention_class="MistralAttention",
    mlp_class="MistralMLP",
    norm_offset=0.0,
    activation="swiglu",
    activation_config_attr="hidden_act",
    activation_config_values=("silu",),
    gguf_arch="LLAMA",  # llama.cpp runs Mistral as "llama" (without a sliding window)
    gguf_checks=(_window_covers_context, default_rope_only),
)
