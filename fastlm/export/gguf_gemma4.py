"""Gemma 4 text (dense) in llama.cpp's GEMMA4 layout: its metadata and the one extra tensor.

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

Usage: ``GEMMA4`` (the writer's ``GGUFLayout``); ``add_hparams(writer, config)``;
``dict(extra_tensors(config))``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fastlm.export.gguf_layout import GGUFLayout

SLIDING, FULL = "sliding_attention", "full_attention"
# Written and checked in llama.cpp: f16 and bf16. The quantised methods would pick types for the
# per-layer-input tensors that no test has compared with llama-quantize's: refused until one does.
REFUSED_METHODS = ("q8_0", "q4_k_m", "q5_k_m", "q6_k")
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
    add_hparams=lambda writer, config, rope: add_hparams(writer, config),
    replaces_common_hparams=True,
    extra_tensors=extra_tensors,
    refused_methods=REFUSED_METHODS,
    bare_tensors_get_weight_suffix=True,  # layer_scalar -> blk.N.layer_output_scale.weight
)
