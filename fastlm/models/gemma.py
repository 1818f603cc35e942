"""Gemma and Gemma 2: (1+w)·x̂ RMSNorm, tanh-GeGLU, embeddings scaled by √hidden (done by the model).

Gemma 2 adds pre/post feed-forward norms (plain RMSNorm modules, patched like the others),
attention-logit soft-capping (handed to the model's attention function, which must be eager:
SDPA cannot soft-cap), final-logit soft-capping (in the fused cross-entropy) and alternating
sliding-window layers (the model's own masks).
"""

from fastlm.models.gguf_limits import default_rope_only, rope_parameters
from fastlm.models.spec import ArchitectureSpec


def _gemma2_as_llama_cpp(config) -> None:
    """llama.cpp's gemma2 hard-codes what HF configures: alternate windows, 1/√head_dim scale."""
    layer_types = list(getattr(config, "layer_types", None) or [])
    alternating = [
        "sliding_attention" if i % 2 == 0 else "full_attention"
        for i in range(config.num_hidden_layers)
    ]
    if layer_types and layer_types != alternating:
        raise NotImplementedError(f"Gemma 2 layer_types {layer_types} are not llama.cpp's pattern")
    if config.query_pre_attn_scalar != config.head_dim:  # no GGUF key carries the query scale
        raise NotImplementedError(
            f"Gemma 2 query_pre_attn_scalar={config.query_pre_attn_scalar} != "
            f"head_dim={config.head_dim} is not exported"
        )
    rope_type = rope_parameters(config).get("rope_type", "default")
    if rope_type != "default":
        raise NotImplementedError(f"Gemma 2 RoPE type {rope_type!r} is not exported")
    # HF's None means "no cap"; the gemma2 arch has no way to say so: refuse rather than guess.
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if not getattr(config, key, None):
            raise NotImplementedError(f"Gemma 2 without {key} is not exported")


GEMMA = ArchitectureSpec(
    model_type="gemma",
    family="Gemma",
    norm_class="GemmaRMSNorm",
    attention_class="GemmaAttention",
    mlp_class="GemmaMLP",
    norm_offset=1.0,
    activation="geglu",
    activation_config_attr="hidden_act",
    activation_config_values=("gelu_pytorch_tanh",),
    gguf_arch="GEMMA",
    gguf_checks=(default_rope_only,),
)

GEMMA2 = ArchitectureSpec(
    model_type="gemma2",
    family="Gemma 2",
    norm_class="Gemma2RMSNorm",
    attention_class="Gemma2Attention",
    mlp_class="Gemma2MLP",
    norm_offset=1.0,
    activation="geglu",
    activation_config_attr="hidden_activation",
    activation_config_values=("gelu_pytorch_tanh",),
    gguf_arch="GEMMA2",
    attention_softcap_attr="attn_logit_softcapping",
    final_logit_softcap_attr="final_logit_softcapping",
    gguf_checks=(_gemma2_as_llama_cpp,),
)
