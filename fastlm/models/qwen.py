"""Qwen2 / Qwen2.5 (biased q/k/v projections) and Qwen3 (per-head q/k RMSNorm, explicit head_dim).

Both use w·x̂ RMSNorm and SwiGLU; sliding-window layers come from the config's layer_types.
Qwen3-Embedding bodies pool the last token and prefix queries with an instruction.
"""

from fastlm.models.gguf_limits import default_rope_only
from fastlm.models.spec import ArchitectureSpec, PromptStyle


def _no_sliding_window(config) -> None:
    """llama.cpp's qwen2/qwen3 arches attend to the whole context: refuse use_sliding_window."""
    if getattr(config, "use_sliding_window", False):
        raise NotImplementedError(f"{config.model_type} with use_sliding_window is not exported")


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
    gguf_arch="QWEN2",  # HF layout as is: llama.cpp's qwen arches use the half-split NeoX RoPE
    gguf_checks=(default_rope_only, _no_sliding_window),
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
    gguf_arch="QWEN3",
    qk_norm=True,
    gguf_checks=(default_rope_only, _no_sliding_window),
    embedding_pooling="lasttoken",
    # Qwen3-Embedding: "Instruct: {task}\nQuery:{query}"; documents have no prefix.
    prompt_style=PromptStyle(
        "Instruct: {task}\nQuery:",
        "Given a web search query, retrieve relevant passages that answer the query",
        "",
    ),
)
