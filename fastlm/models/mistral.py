"""Mistral: Llama's blocks (w·x̂ RMSNorm, SwiGLU), sliding-window attention from the config."""

from fastlm.models.spec import ArchitectureSpec

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
)
