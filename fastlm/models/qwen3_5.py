"""Qwen3.5 text (dense): hybrid Gated DeltaNet linear attention + gated full attention.

What differs from Qwen3, and where fastlm's shared path takes it from the spec:
- Norms are ``(1 + w)·x̂`` (offset 1, zero-initialised weights, as Gemma 1-3), the q/k norms too.
- ``layer_types``: most layers (three of four in the published configs) are ``linear_attention``
  (``Qwen3_5GatedDeltaNet``, ``linear_attention``: its four input projections as one fused LoRA
  group, the conv + gated delta rule + gated norm in ``linear_attention.py``, out_proj fused);
  the others ``full_attention``.
- Full attention: q_proj yields per head [query | gate] (``attention_output_gate``): the
  attention output × sigmoid(gate) goes to o_proj; q/k norm; partial RoPE (the rotary module's
  cos/sin cover the first ``partial_rotary_factor``·head_dim dims, which is all the patched
  forward rotates).
The masks (a 2D padding mask for the linear layers), the rotary tables and the cache stay
transformers'. GGUF: llama.cpp's qwen35 (layout in fastlm/export/gguf_linear_attention.py); the
gguf_checks below refuse what it would not load or would run otherwise. Qwen3.5-MoE text is
``qwen3_5_moe.py``; the multimodal ``qwen3_5`` checkpoint is refused with a hint to load its
text model.
"""

from fastlm.models.gguf_limits import default_rope_only
from fastlm.models.spec import ArchitectureSpec, LinearAttention


def full_attention_interval(config) -> int:
    """n such that layer i is full attention iff (i + 1) % n == 0 (llama.cpp's
    ``full_attention_interval``); the layer count + 1 when no layer is.

    Usage: ``full_attention_interval(config)`` -> 4 for the published configs.
    """
    types = list(config.layer_types)
    return types.index("full_attention") + 1 if "full_attention" in types else len(types) + 1


def _full_attention_every_nth_layer(config) -> None:
    """llama.cpp's qwen35 knows the layer types by one interval alone."""
    n = full_attention_interval(config)
    expected = [
        "full_attention" if (i + 1) % n == 0 else "linear_attention"
        for i in range(len(config.layer_types))
    ]
    if list(config.layer_types) != expected:
        raise NotImplementedError(
            f"Qwen3.5 layer_types {list(config.layer_types)} are not full attention where "
            f"(i + 1) % {n} == 0 and linear attention elsewhere, the only pattern llama.cpp's "
            "qwen35 reads from a GGUF file (full_attention_interval); this model cannot be "
            "exported to GGUF."
        )


def _equal_linear_head_dims(config) -> None:
    """llama.cpp's qwen35 sizes the delta-rule state and the gated norm by the key head dim."""
    key, value = config.linear_key_head_dim, config.linear_value_head_dim
    if key != value:
        raise NotImplementedError(
            f"Qwen3.5 GGUF export needs linear_key_head_dim == linear_value_head_dim (got {key} "
            f"and {value}): llama.cpp's qwen35 assumes equal key and value head dims in its "
            "Gated DeltaNet layers, so it would not load this file."
        )


def _no_attention_bias(config) -> None:
    """llama.cpp's qwen35 has no q/k/v/o biases."""
    if getattr(config, "attention_bias", False):
        raise NotImplementedError(
            "Qwen3.5 with attention_bias=True is not exported to GGUF: llama.cpp's qwen35 has "
            "no attention biases."
        )


QWEN3_5_TEXT = ArchitectureSpec(
    model_type="qwen3_5_text",
    family="Qwen3.5 (text)",
    norm_class="Qwen3_5RMSNorm",
    attention_class="Qwen3_5Attention",
    mlp_class="Qwen3_5MLP",
    norm_offset=1.0,
    activation="swiglu",
    activation_config_attr="hidden_act",
    activation_config_values=("silu",),
    gguf_arch="QWEN35",
    qk_norm=True,
    attention_output_gate=True,
    linear_attention=LinearAttention(module_class="Qwen3_5GatedDeltaNet"),
    gguf_checks=(
        default_rope_only,
        _full_attention_every_nth_layer,
        _equal_linear_head_dims,
        _no_attention_bias,
    ),
)
