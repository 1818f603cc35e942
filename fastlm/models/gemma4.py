"""Gemma 4 text (dense): w·x̂ norms, GeGLU, q/k norm, a weightless v norm, k = v, KV sharing.

What differs from Gemma 3, and where fastlm's shared path takes it from the spec:
- RMSNorm is ``w·x̂`` (offset 0, not Gemma 3's ``1 + w``); v's norm has no weight (``y = x̂``).
- Per-layer attention shapes: full layers have their own head_dim and kv heads (the modules
  hold them); full layers with ``attention_k_eq_v`` have no v_proj, and v is k_proj's output
  before k's norm and RoPE (``key_is_value_attr``).
- The last ``num_kv_shared_layers`` layers have no k/v projections: they read the K/V that the
  last earlier layer of their type stored (``kv_sharing``); their MLP may be double-wide
  (only a size).
- Attention scaling is 1.0 (the module's ``scaling``); full layers use proportional RoPE (a
  cos/sin table of the whole head_dim, identity on the unrotated part: transformers' rotary
  module computes it).
The embedding scaling, the per-layer inputs (their gate and projection), ``layer_scalar``, the
masks and the final-logit soft-cap's config value stay transformers'. The MoE block
(``enable_moe_block``) and the multimodal model are refused at load.
"""

from fastlm.errors import UnsupportedArchitectureError
from fastlm.models.spec import ArchitectureSpec, KVSharing


def _dense_only(config) -> None:
    """Refuse the mixture-of-experts variant: its router and experts have no patched path."""
    if getattr(config, "enable_moe_block", False):
        raise UnsupportedArchitectureError(
            "mixture-of-experts Gemma 4 (enable_moe_block=True) is not supported yet; fastlm "
            "supports the dense Gemma 4 text models (the MoE block is issue 18's scope)."
        )


def _no_gguf_writer_yet(config) -> None:
    """gguf 0.19 knows llama.cpp's GEMMA4 arch, but fastlm's writer has no Gemma 4 layout."""
    raise NotImplementedError(
        "Gemma 4 GGUF export is not implemented yet: fastlm's GGUF writer does not write "
        "Gemma 4's per-layer embeddings, KV-shared and k = v layers or proportional RoPE. "
        "Export merged_16bit and convert that with llama.cpp's convert_hf_to_gguf.py."
    )


GEMMA4_TEXT = ArchitectureSpec(
    model_type="gemma4_text",
    family="Gemma 4 (text)",
    norm_class="Gemma4RMSNorm",
    attention_class="Gemma4TextAttention",
    mlp_class="Gemma4TextMLP",
    norm_offset=0.0,
    activation="geglu",
    activation_config_attr="hidden_activation",
    activation_config_values=("gelu_pytorch_tanh",),
    gguf_arch="GEMMA4",
    qk_norm=True,
    v_norm=True,
    key_is_value_attr="use_alternative_attention",
    kv_sharing=KVSharing(
        reuse_attr="is_kv_shared_layer",
        store_attr="store_full_length_kv",
        key_attr="layer_type",
        states_kwarg="shared_kv_states",
    ),
    final_logit_softcap_attr="final_logit_softcapping",
    load_checks=(_dense_only,),
    gguf_checks=(_no_gguf_writer_yet,),
)
