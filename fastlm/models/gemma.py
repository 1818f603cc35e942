"""Gemma and Gemma 2: (1+w)·x̂ RMSNorm, tanh-GeGLU, embeddings scaled by √hidden (done by the model).

Gemma 2 adds pre/post feed-forward norms (plain RMSNorm modules, patched like the others),
attention-logit soft-capping (handed to the model's attention function, which must be eager:
SDPA cannot soft-cap), final-logit soft-capping (in the fused cross-entropy) and alternating
sliding-window layers (the model's own masks).
"""

from fastlm.models.spec import ArchitectureSpec

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
    attention_softcap_attr="attn_logit_softcapping",
    final_logit_softcap_attr="final_logit_softcapping",
)
