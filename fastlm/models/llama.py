"""Llama (2, 3, 3.1, 3.2, 3.3): w·x̂ RMSNorm, SwiGLU, rotate-half RoPE (llama3 scaling included)."""

from fastlm.models.spec import ArchitectureSpec

LLAMA = ArchitectureSpec(
    model_type="llama",
    family="Llama",
    norm_class="LlamaRMSNorm",
    attention_class="LlamaAttention",
    mlp_class="LlamaMLP",
    norm_offset=0.0,
    activation="swiglu",
    activation_config_attr="hidden_act",
    activation_config_values=("silu",),
    gguf_arch="LLAMA",  # llama3 RoPE scaling is written as llama.cpp's rope_freqs tensor
)
