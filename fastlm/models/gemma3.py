"""Gemma 3 text: (1+w)·x̂ norms (pre/post feed-forward and q/k too), GeGLU, scaled embeddings.

Embedding scaling by √hidden, the local/global RoPE bases and the sliding-window masks are done by
the model's own modules (its scaled embedding, rotary modules and mask builder), which fastlm
leaves in place.
"""

from fastlm.models.spec import ArchitectureSpec

GEMMA3_TEXT = ArchitectureSpec(
    model_type="gemma3_text",
    family="Gemma 3 (text)",
    norm_class="Gemma3RMSNorm",
    attention_class="Gemma3Attention",
    mlp_class="Gemma3MLP",
    norm_offset=1.0,
    activation="geglu",
    activation_config_attr="hidden_activation",
    activation_config_values=("gelu_pytorch_tanh",),
    qk_norm=True,
    attention_softcap_attr="attn_logit_softcapping",
    final_logit_softcap_attr="final_logit_softcapping",
)
