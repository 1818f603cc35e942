"""Gemma 4 text in llama.cpp's GEMMA4 layout (dense, and with the MoE block): its metadata, the
one extra tensor, the MoE block's names.

The tensors are transformers' own, named by ``gguf.get_tensor_name_map`` and stored as they are
(Gemma 4's RMSNorm is ``w·x̂``, so llama.cpp's ``x̂·w`` needs no ``1 + w``; the v norm has no
weight and no tensor; ``layer_scalar`` is ``blk.N.layer_output_scale.weight``). What llama.cpp
reads besides them, per layer type (sliding / full):

- head_dim: ``key_length`` (full) and ``key_length_swa`` (sliding); kv heads per layer
  (``head_count_kv`` array); the feed-forward width per layer (the KV-shared layers' MLPs may be
  double-wide); ``shared_kv_layers`` (llama.cpp picks the layers they read itself: the refusal of
  other layouts is in ``fastlm.models.gemma4``); the sliding window and its per-layer pattern.
- RoPE: a base per type; full layers use proportional RoPE, θ_i = p·base^(-2i/D)/factor on the
  first ``partial_rotary_factor·D/2`` frequencies and none on the rest (D = full head_dim).
  llama.cpp rotates all D dims (NeoX halves, as transformers' rotate_half) and divides θ_i by
  ``rope_freqs[i]``: so rope_freqs = ``factor`` on the rotated frequencies and 1e30 (θ ≈ 0: cos 1,
  sin 0, the identity) on the others.
- per-layer inputs: their width (``embedding_length_per_layer_input``); their scales
  (√width, 1/√hidden, 1/√2) and the embedding's √hidden are hard-coded alike in both.
- the final-logit soft-cap, 0 for none (llama.cpp's default would cap at 30).

The MoE block (``enable_moe_block``, every layer; llama.cpp's src/models/gemma4.cpp takes a layer
with ``ffn_gate_inp`` as one), E experts of width I, hidden H, numpy shapes:

  router.proj (E, H)                 -> ffn_gate_inp.weight (E, H), F32 in every file type
  router.scale (H,)                  -> ffn_gate_inp.scale (H,), F32
  router.per_expert_scale (E,)       -> ffn_down_exps.scale (E,), F32
  experts.gate_up_proj (E, 2I, H)    -> ffn_gate_up_exps.weight (E, 2I, H): gate rows, then up
                                        (``gguf_moe.expert_tensors``, fused: as transformers has it)
  experts.down_proj (E, H, I)        -> ffn_down_exps.weight (E, H, I)
  pre_feedforward_layernorm_2, post_feedforward_layernorm_1 / _2
                                     -> pre_ffw_norm_2, post_ffw_norm_1 / _2 (name map)
  metadata: expert_count (num_experts), expert_used_count (top_k_experts),
            expert_feed_forward_length (moe_intermediate_size)

and llama.cpp's graph computes transformers' layer: out = post_ffw_norm(post_ffw_norm_1(mlp(
ffn_norm(x))) + post_ffw_norm_2(moe(pre_ffw_norm_2(x)))), the router reading the residual x:
logits = ffn_gate_inp · (rms_norm(x) / √H · scale); softmax, the top k, renormalised to sum 1,
expert e's GeGLU output × its weight × ffn_down_exps.scale[e]. Softmax, renormalisation and the
scales are hard-coded on both sides (no config switches them); GELU (tanh) is checked in the
family's ``gguf_checks``.

File types: f16, bf16, and q8_0 where the model has no per-layer inputs (``refused_methods``).

Usage: ``GEMMA4`` (the writer's ``GGUFLayout``); ``add_hparams(writer, config)``;
``dict(extra_tensors(config))``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fastlm.export.gguf_layout import GGUFLayout

SLIDING, FULL = "sliding_attention", "full_attention"
# llama-quantize's k-quant mixtures are not reproduced: refused. q8_0 is llama-quantize's types
# (every matrix Q8_0, routers and vectors F32) but for per_layer_model_proj, which llama-quantize
# leaves unquantised: q8_0 is refused for a model with per-layer inputs.
K_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")
# HF names of the MoE block's two scale vectors -> names gguf's map knows (+ .scale):
# blk.N.ffn_gate_inp.scale (H,) and blk.N.ffn_down_exps.scale (E,).
SCALES = {"router.scale": "router.proj.scale", "router.per_expert_scale": "experts.down_proj.scale"}
# θ_i is divided by this on the frequencies proportional RoPE leaves unrotated: θ ≈ 0.
UNROTATED = 1e30


def head_dims(config) -> dict[str, int]:
    """head_dim per layer type (transformers' per-layer config); the first layer of each type."""
    dims = {}
    for index, layer_type in enumerate(config.layer_types):
        dims.setdefault(layer_type, config.per_layer_config[index].head_dim)
    return dims


def feed_forward_lengths(config) -> list[int]:
    """The MLP width of each layer: double on the KV-shared layers with use_double_wide_mlp."""
    first_shared = config.num_hidden_layers - (config.num_kv_shared_layers or 0)
    double = bool(getattr(config, "use_double_wide_mlp", False))
    return [
        config.intermediate_size * (2 if double and index >= first_shared else 1)
        for index in range(config.num_hidden_layers)
    ]


def add_hparams(writer, config) -> None:
    """Every GEMMA4 key but the file type (the writer adds that for all arches)."""
    from fastlm.models.gguf_limits import rope_parameters  # lazy: fastlm.models loads peft

    dims = head_dims(config)
    full_dim, sliding_dim = dims[FULL], dims.get(SLIDING, dims[FULL])
    rope = rope_parameters(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(feed_forward_lengths(config))
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(
        [config.per_layer_config[i].num_key_value_heads for i in range(config.num_hidden_layers)]
    )
    writer.add_key_length(full_dim)
    writer.add_value_length(full_dim)
    writer.add_key_length_swa(sliding_dim)
    writer.add_value_length_swa(sliding_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_freq_base(rope[FULL]["rope_theta"])
    writer.add_rope_freq_base_swa(rope.get(SLIDING, rope[FULL])["rope_theta"])
    writer.add_rope_dimension_count(full_dim)  # all of it: rope_freqs leaves the rest unrotated
    writer.add_rope_dimension_count_swa(sliding_dim)
    writer.add_sliding_window(config.sliding_window)
    writer.add_sliding_window_pattern([t == SLIDING for t in config.layer_types])
    writer.add_shared_kv_layers(config.num_kv_shared_layers or 0)
    writer.add_embedding_length_per_layer_input(config.hidden_size_per_layer_input or 0)
    writer.add_final_logit_softcapping(config.final_logit_softcapping or 0.0)
    if getattr(config, "enable_moe_block", False):
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.top_k_experts)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)


def refused_methods(config) -> tuple[str, ...]:
    """The k-quants; and q8_0 where the model has per-layer inputs."""
    return K_QUANTS + (("q8_0",) if config.hidden_size_per_layer_input else ())


def gemma4_tensor(config, norm_offset: float, hf_name: str, tensor: torch.Tensor):
    """transformers' tensor as it is; the router's two scale vectors renamed (``SCALES``)."""
    for leaf, name in SCALES.items():
        if hf_name.endswith("." + leaf):
            return hf_name[: -len(leaf)] + name, tensor
    return hf_name, tensor


def rope_freqs(config) -> torch.Tensor:
    """llama.cpp's per-frequency divisors of θ on the full layers (D/2 of them, float32)."""
    from fastlm.models.gguf_limits import rope_parameters  # lazy: as in add_hparams

    full = rope_parameters(config)[FULL]
    half = head_dims(config)[FULL] // 2
    if full.get("rope_type", "default") != "proportional":
        return torch.ones(half)
    rotated = int(full.get("partial_rotary_factor", 1.0) * head_dims(config)[FULL] // 2)
    divisors = torch.full((half,), UNROTATED)
    divisors[:rotated] = full.get("factor", 1.0)
    return divisors


def extra_tensors(config) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors llama.cpp's GEMMA4 needs that transformers recomputes: ``rope_freqs.weight``."""
    import gguf

    yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", rope_freqs(config)


GEMMA4 = GGUFLayout(
    tensor=gemma4_tensor,
    add_hparams=lambda writer, config, rope: add_hparams(writer, config),
    replaces_common_hparams=True,
    extra_tensors=extra_tensors,
    refused_methods=refused_methods,
    bare_tensors_get_weight_suffix=True,  # layer_scalar -> blk.N.layer_output_scale.weight
    split_experts=True,  # the MoE block's experts, as they are: gate_up fused, down
    fused_gate_up=True,
)
