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
transformers'. Qwen3.5-MoE (``qwen3_5_moe``) has no spec; the multimodal ``qwen3_5`` checkpoint
is refused with a hint to load its text model.
"""

from fastlm.models.spec import ArchitectureSpec, LinearAttention


def _no_gguf_writer_yet(config) -> None:
    """gguf knows llama.cpp's QWEN35 arch, but fastlm's writer has no layout for it."""
    raise NotImplementedError(
        "Qwen3.5 GGUF export is not implemented yet: fastlm's GGUF writer does not write Gated "
        "DeltaNet (linear-attention) layers, the gated q_proj or partial RoPE. Export "
        "merged_16bit and convert that with llama.cpp's convert_hf_to_gguf.py."
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
    gguf_checks=(_no_gguf_writer_yet,),
)
