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
  ``attention_chunk_size`` tokens. transformers builds that mask; past one chunk fastlm checks
  that it is exactly the chunked causal pattern (with padding, if any) and runs the flash
  kernel's packed launch with each row's real tokens cut at the chunk bounds
  (``attention_chunk_attr``; ``padding.padded_rows``), and ``fused_report`` says so; packed
  sequences in a chunked layer, or any other mask, run the model's own attention function.
  Within one chunk the mask is the causal one and the kernel runs as for Llama.
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
The multimodal ``llama4`` checkpoint is refused with a hint to load its text model.
GGUF: llama.cpp's llama4, each 3-D experts parameter split into per-projection stacks
(``fastlm/export/gguf_llama4.py``). llama.cpp hard-codes what this spec reads from the config
(the NoPE / chunked layer pattern, the chunk size, the temperature, whether q and k are
normalised): the gguf_checks below refuse every config it would run otherwise.
"""

from fastlm.models.gguf_limits import USE_MERGED, rope_parameters
from fastlm.models.spec import ArchitectureSpec, AttentionTemperature, MixtureOfExperts

# What llama.cpp's llama4 hard-codes (src/models/llama4.cpp, load_arch_hparams): a NoPE layer
# with full attention every 4th layer ((i + 1) % 4 == 0), chunked attention on the others in
# chunks of 8192 tokens (the file's sliding_window is not read for it), and the NoPE layers'
# query temperature 1 + 0.1·ln(1 + floor((t + 1) / 8192)).
LLAMA_CPP_NOPE_INTERVAL = 4
LLAMA_CPP_CHUNK = 8192
LLAMA_CPP_TEMPERATURE = {"attn_temperature_tuning": True, "floor_scale": 8192, "attn_scale": 0.1}
# llama.cpp normalises q and k after RoPE unless the model has this many experts (Maverick's).
LLAMA_CPP_EXPERTS_WITHOUT_QK_NORM = 128


def _layers_as_llama_cpp(config) -> None:
    """NoPE + full attention exactly at llama.cpp's every-4th layers, MoE blocks exactly at
    (i + 1) % interleave_moe_layer_step == 0 (the only layers llama.cpp builds them in)."""
    n = config.num_hidden_layers
    rope = [int((i + 1) % LLAMA_CPP_NOPE_INTERVAL != 0) for i in range(n)]
    types = ["chunked_attention" if use_rope else "full_attention" for use_rope in rope]
    if list(config.no_rope_layers) != rope or list(config.layer_types) != types:
        raise NotImplementedError(
            f"Llama 4 with no_rope_layers={list(config.no_rope_layers)} (layer_types "
            f"{list(config.layer_types)}) is not exported to GGUF: llama.cpp's llama4 runs NoPE, "
            f"full-attention layers at every 4th layer only (no_rope_layers={rope}); " + USE_MERGED
        )
    step = config.interleave_moe_layer_step
    moe = [i for i in range(n) if (i + 1) % step == 0]
    if list(config.moe_layers) != moe:
        raise NotImplementedError(
            f"Llama 4 with moe_layers={list(config.moe_layers)} is not exported to GGUF: "
            f"llama.cpp's llama4 builds MoE blocks at every interleave_moe_layer_step={step}th "
            f"layer only ({moe}); " + USE_MERGED
        )


def _attention_as_llama_cpp(config) -> None:
    """The chunk size and the NoPE temperature llama.cpp hard-codes; q/k normalised unless the
    model has 128 experts; no attention biases (llama4 loads no attn_output.bias)."""
    if config.attention_chunk_size != LLAMA_CPP_CHUNK:
        raise NotImplementedError(
            f"Llama 4 with attention_chunk_size={config.attention_chunk_size} is not exported "
            f"to GGUF: llama.cpp's llama4 always attends in chunks of {LLAMA_CPP_CHUNK} tokens; "
            + USE_MERGED
        )
    used = {key: getattr(config, key) for key in LLAMA_CPP_TEMPERATURE}
    if used != LLAMA_CPP_TEMPERATURE:
        raise NotImplementedError(
            f"Llama 4 with attention temperature {used} is not exported to GGUF: llama.cpp's "
            f"llama4 hard-codes {LLAMA_CPP_TEMPERATURE}; " + USE_MERGED
        )
    qk_norm = config.num_local_experts != LLAMA_CPP_EXPERTS_WITHOUT_QK_NORM
    if bool(config.use_qk_norm) != qk_norm:
        raise NotImplementedError(
            f"Llama 4 with use_qk_norm={config.use_qk_norm} and {config.num_local_experts} "
            f"experts is not exported to GGUF: llama.cpp's llama4 normalises q and k exactly "
            f"when there are not {LLAMA_CPP_EXPERTS_WITHOUT_QK_NORM} experts; " + USE_MERGED
        )
    if config.attention_bias:
        raise NotImplementedError(
            "Llama 4 with attention_bias=True is not exported to GGUF: llama.cpp's llama4 loads "
            "no attention output bias (the file would not load); " + USE_MERGED
        )


def _rope_as_llama_cpp(config) -> None:
    """Unscaled RoPE, or Llama 3's scaling (written as rope_freqs); no other scaling."""
    rope_type = rope_parameters(config).get("rope_type", "default")
    if rope_type not in ("default", "llama3"):
        raise NotImplementedError(
            f"Llama 4 RoPE type {rope_type!r} is not exported to GGUF: fastlm writes llama4 "
            "files with unscaled RoPE or Llama 3's scaling only; " + USE_MERGED
        )


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
    gguf_arch="LLAMA4",
    gguf_checks=(_rope_as_llama_cpp, _layers_as_llama_cpp, _attention_as_llama_cpp),
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
