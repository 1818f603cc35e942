"""Llama 4 text (``llama4_text``, ``Llama4ForCausalLM``): Llama's layers with NoPE and chunked
attention, and mixture-of-experts blocks with a shared expert.

What differs from Llama, and where fastlm's shared path takes it from the spec:
- RoPE rotates the interleaved pairs (2i, 2i + 1) of each head by a complex table (freqs_cis),
  not the halves (``rope_interleaved``): fastlm reorders q's and k's head dims even-then-odd
  (the same order for both, so q·k is unchanged) and runs its RoPE kernel with cos, sin = Re, Im.
- NoPE layers (``no_rope_layers`` 0: ``use_rope`` false, ``rope_layer_attr``) skip RoPE and
  scale each query by the attention temperature 1 + attn_scale·log1p(floor((t + 1) /
  floor_scale)) where ``attn_temperature_tuning`` (``attention_temperature``); RoPE layers
  L2-normalise q and k after RoPE where ``use_qk_norm`` (a weightless RMS norm, the module's
  ``qk_norm``: ``qk_norm_after_rope_attr``).
- RoPE layers are "chunked_attention" layers: each query sees the keys of its own chunk of
  ``attention_chunk_size`` tokens. transformers builds that mask; fastlm's flash kernel has no
  chunk pattern, so past one chunk those layers run the model's own attention function (eager
  or SDPA) with it, and ``fused_report`` says so (``attention_chunk_attr``). Within one chunk
  the mask is the causal one and the kernel runs (on CUDA).
- Layers in ``moe_layers`` (every ``interleave_moe_layer_step``-th) have a ``Llama4TextMoe``
  block (``moe``), the others a dense ``Llama4TextMLP`` of width ``intermediate_size_mlp`` (the
  fused LoRA MLP). The router (an ``nn.Linear``) takes the top k logits and the sigmoid of each
  (``scoring="topk_sigmoid"``; no renormalisation), and the weight scales each expert's *input*,
  out = shared(x) + sum_e expert_e(w_e · x) (``routing_weight_on="input"``). The experts are
  stored (E, in, out) (``gate_up_proj`` (E, H, 2·I) gate then up, ``down_proj`` (E, I, H)), run
  grouped with LoRA through PEFT's ``target_parameters`` (``moe.py``; PEFT reads them as
  (E, out, in), which the grouped path undoes); the shared expert is a ``Llama4TextMLP`` of
  width ``intermediate_size`` (the fused LoRA MLP), ungated. transformers' router returns
  (scores, logits) and its output recorder reads index 1, where fastlm's router puts the logits
  too (``router_logits_index``); the block returns (hidden, logits), as the layer unpacks.
- No load-balancing loss: ``Llama4ForCausalLM``'s forward adds none (``router_aux_loss_coef``
  is in the config, unused), so fastlm adds none; ``output_router_logits`` returns the logits.
The multimodal ``llama4`` checkpoint is refused with a hint to load its text model; GGUF export
is refused (fastlm's writer has no layout for the 3-D experts or the NoPE / chunk metadata).
"""

from fastlm.models.spec import ArchitectureSpec, AttentionTemperature, MixtureOfExperts

LLAMA4_TEXT = ArchitectureSpec(
    model_type="llama4_text",
    family="Llama 4 (text)",
    norm_class="Llama4TextRMSNorm",
    attention_class="Llama4TextAttention",
    mlp_class="Llama4TextMLP",  # dense layers and the shared expert
    norm_offset=0.0,
    activation="swiglu",
    activation_config_attr="hidden_act",
    activation_config_values=("silu",),
    gguf_arch=None,
    rope_interleaved=True,
    rope_layer_attr="use_rope",
    qk_norm_after_rope_attr="qk_norm",
    attention_temperature=AttentionTemperature(),
    attention_chunk_attr="attention_chunk_size",
    moe=MixtureOfExperts(
        block_class="Llama4TextMoe",
        router_class="Llama4Router",
        experts_class="Llama4TextExperts",
        router_attr="router",
        scoring="topk_sigmoid",
        normalize_top_k=False,
        experts_layout="in_out",
        routing_weight_on="input",
        router_logits_index=1,
        returns_router_logits=True,
        shared_expert_attr="shared_expert",
        num_experts_attr="num_local_experts",
        aux_loss_coef_attr=None,  # Llama4ForCausalLM adds no load-balancing loss
    ),
)
