"""Qwen2 / Qwen2.5 (biased q/k/v projections) and Qwen3 (per-head q/k RMSNorm, explicit head_dim).

Both use w·x̂ RMSNorm and SwiGLU; sliding-window layers come from the config's layer_types.
"""

from fastlm.models.spec import ArchitectureSpec

QWEN2 = ArchitectureSpec(
    model_type="qwen2",
    family="Qwen2 / Qwen2.5",
    norm_class="Qwen2RMSNorm",
    attention_class="Qwen2Attention",
    mlp_class="Qwen2MLP",
    norm_offset=0.0,
    activation="swiglu",
    activation_config_attr="hidden_act",
    activation_config_values=("silu",),
)

QWEN3 = ArchitectureSpec(
    model_type="qwen3",
    family="Qwen3",
    norm_class="Qwen3RMSNorm",
    attention_class="Qwen3Attention",
    mlp_class="Qwen3MLP",
    norm_offset=0.0,
    activation="swiglu",
    activation_config_attr="hidden_act",
    activation_config_values=("silu",),
    qk_norm=True,
)
