"""EmbeddingGemma 2 text: a bidirectional encoder of Gemma 4 layers, projected to embedding_dim.

Kept from Gemma 4 text (``GEMMA4_TEXT``, which this spec starts from): w·x̂ norms, GeGLU, q/k
norm and a weightless v norm, attention scaling 1.0, per-layer head_dim and kv heads (the wider
full layers: the modules hold them), transformers' rotary module per layer type.
What differs, and who does it:
- Every layer attends both ways (the modules' ``is_causal`` is False); sliding layers see the
  symmetric window |i − j| ≤ sliding_window. The masks are the model's own, so the patched
  attention gets them as transformers' does; fastlm's flash kernel takes causal windows only, so
  sliding layers run the model's attention function (``models/attention.py`` says so).
- No k = v layers, no KV sharing, no MoE block, no LM head and no final-logit soft-cap.
- Projection-only per-layer inputs (PLE): ``ple`` derives them from inputs_embeds and each
  layer's ``ple_block`` mixes its slice in after the MLP (gate, GELU, × input, projection,
  norm). Their linears run transformers' code (``transformers_linears``; fused_report lists
  them); their RMSNorms are fastlm's, like every norm of the class.
- ``embedding_projection`` maps the final states to ``embedding_dim`` inside the forward, so
  ``last_hidden_state`` is that wide (``output_width_attr``) and mean pooling over it is what
  Sentence-Transformers' Pooling → Normalize computes on this model.
The multimodal ``EmbeddingGemma2Model`` (model_type ``embedding_gemma2``) has no spec. llama.cpp
has no arch for this family: no GGUF export (``gguf_arch=None``).
"""

from dataclasses import replace

from fastlm.models.gemma4 import GEMMA4_TEXT

_PLE_BLOCK = "no fused path: EmbeddingGemma 2's per-layer-input block runs transformers' code"

EMBEDDING_GEMMA2_TEXT = replace(
    GEMMA4_TEXT,
    model_type="embedding_gemma2_text",
    family="EmbeddingGemma 2 (text)",
    norm_class="EmbeddingGemma2RMSNorm",
    attention_class="EmbeddingGemma2Attention",
    mlp_class="EmbeddingGemma2MLP",
    key_is_value_attr=None,
    kv_sharing=None,
    final_logit_softcap_attr=None,
    moe=None,  # no MoE variant
    gguf_arch=None,
    gguf_checks=(),
    embedding_pooling="mean",
    # No card prompts built in: a Sentence-Transformers folder's own prompts are used.
    prompt_style=None,
    bidirectional_attention_attr=None,  # always bidirectional: no flag to set
    output_width_attr="embedding_dim",
    embedding_only=True,
    transformers_linears=(
        ("per_layer_model_projection", "no fused path: per-layer inputs (PLE) from inputs_embeds"),
        ("per_layer_input_gate", _PLE_BLOCK),
        ("per_layer_projection", _PLE_BLOCK),
        ("embedding_projection", "no fused path: the projection to embedding_dim"),
    ),
)
