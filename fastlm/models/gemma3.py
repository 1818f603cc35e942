"""Gemma 3 text: (1+w)·x̂ norms (pre/post feed-forward and q/k too), GeGLU, scaled embeddings.

Embedding scaling by √hidden, the local/global RoPE bases and the sliding-window masks are done by
the model's own modules (its scaled embedding, rotary modules and mask builder), which fastlm
leaves in place. EmbeddingGemma is this body with bidirectional attention and mean pooling.
"""

from fastlm.models.gguf_limits import rope_parameters
from fastlm.models.spec import ArchitectureSpec, PromptStyle


def _default_rope_per_layer_type(config) -> None:
    """Refuse scaled RoPE on full or sliding layers: only the two rope_theta bases are written."""
    rope = rope_parameters(config)
    for params in (rope.get("full_attention", rope), rope.get("sliding_attention", {})):
        if params and params.get("rope_type", "default") != "default":
            raise NotImplementedError(f"Gemma 3 RoPE scaling {params} is not exported yet")


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
    gguf_arch="GEMMA3",
    qk_norm=True,
    attention_softcap_attr="attn_logit_softcapping",
    final_logit_softcap_attr="final_logit_softcapping",
    gguf_checks=(_default_rope_per_layer_type,),
    embedding_pooling="mean",
    # EmbeddingGemma: "task: search result | query: {query}" / "title: none | text: {document}".
    prompt_style=PromptStyle("task: {task} | query: ", "search result", "title: none | text: "),
    bidirectional_attention_attr="use_bidirectional_attention",
)
