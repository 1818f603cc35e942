"""GGUF layout of Llama 4 text (``llama4_text``): llama.cpp's ``llama4``.

What llama.cpp reads, from which transformers tensor (numpy shapes; E experts of width I, dense
MLP width I_mlp, hidden H):

  self_attn.{q,k,v,o}_proj      -> attn_{q,k,v,output}   as they are: transformers' Llama 4
                                   rotates the interleaved pairs (2i, 2i + 1), as llama.cpp's
                                   llama4 does (unlike Llama 1-3, no row permutation)
  feed_forward.router (E, H)    -> ffn_gate_inp (E, H), F32 in every file type
  feed_forward.experts          -> ffn_gate_exps, ffn_up_exps (E, I, H), ffn_down_exps (E, H, I):
                                   gate_up_proj (E, H, 2I) gate then up and down_proj (E, I, H),
                                   "in_out", split and transposed by ``gguf_moe.expert_tensors``
  feed_forward.shared_expert.*  -> ffn_{gate,up,down}_shexp, width I (llama.cpp sizes the
                                   shared expert with expert_feed_forward_length, transformers
                                   with intermediate_size: the same)
  feed_forward.{gate,up,down}   -> ffn_{gate,up,down} of the dense layers, width I_mlp
                                   (feed_forward_length is intermediate_size_mlp, not
                                   intermediate_size as in the writer's common keys)
  Llama 3 RoPE scaling          -> rope_freqs, as for Llama (``gguf_dense.LLAMA``)

Metadata: the usual sizes with feed_forward_length = intermediate_size_mlp, the expert count,
experts per token and width, interleave_moe_layer_step (llama.cpp's MoE layers are those with
(i + 1) % step == 0), and attention.sliding_window = attention_chunk_size (non-zero: chunked).

What llama.cpp's llama4 hard-codes (src/models/llama4.cpp, ``load_arch_hparams`` and the graph;
src/llama-graph.cpp ``build_moe_ffn`` and ``llm_graph_input_attn_temp``), and the family's
``gguf_checks`` (``fastlm.models.llama4``) require of a config, else refuse it:
- Layers: NoPE and full attention at every 4th layer ((i + 1) % 4 == 0: ``n_no_rope_layer_step``
  4 and ``set_swa_pattern(4)``, no key for either), RoPE and chunked attention elsewhere, with
  chunks of 8192 tokens whatever the file says (a sliding_window of 0 switches chunking off and
  RoPE on at every layer but the last, and the graph then aborts on its zero temperature scale).
- Attention temperature on the NoPE layers' queries: 1 + 0.1·ln(1 + floor((t + 1) / 8192)),
  transformers' with attn_scale 0.1, floor_scale 8192 and attn_temperature_tuning on.
- QK norm: a weightless RMS norm (eps rms_norm_eps) of q and k after RoPE on the RoPE layers,
  on unless the model has 128 experts (llama.cpp takes that for Maverick): ``use_qk_norm`` must
  be E != 128.
- Routing: sigmoid of the router logits, the top k (the top k logits: sigmoid is monotone), no
  renormalisation, each weight multiplying the expert's *input* (``weight_before_ffn``, llama4
  only); experts SiLU(gate)·up; the shared expert ungated, added.
llama-quantize's k-quant mixtures for expert stacks are not reproduced: q4_k_m, q5_k_m and q6_k
are refused (as for ``gguf_moe``'s arches).

Usage: ``LLAMA4`` (the writer's ``GGUFLayout``; the experts split by ``split_experts``).
"""

from __future__ import annotations

from fastlm.export.gguf_dense import LLAMA
from fastlm.export.gguf_layout import GGUFLayout
from fastlm.export.gguf_moe import REFUSED_METHODS


def _add_llama4_hparams(writer, config, rope: dict | None) -> None:
    """Every llama4 key but the file type: the common ones with the dense MLP's width, the
    experts, the MoE interleave and the chunked attention."""
    from fastlm.models.gguf_limits import rope_parameters  # lazy: fastlm.models loads peft

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size_mlp)  # the dense layers' MLP
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_freq_base(rope_parameters(config)["rope_theta"])
    writer.add_rope_dimension_count(head_dim)  # llama.cpp asserts RoPE spans the whole head
    writer.add_expert_count(config.num_local_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_feed_forward_length(config.intermediate_size)  # experts and shared expert
    writer.add_interleave_moe_layer_step(config.interleave_moe_layer_step)
    writer.add_sliding_window(config.attention_chunk_size)


LLAMA4 = GGUFLayout(
    add_hparams=_add_llama4_hparams,
    replaces_common_hparams=True,
    extra_tensors=LLAMA.extra_tensors,  # rope_freqs where the config has Llama 3 scaling
    refused_methods=REFUSED_METHODS,
    split_experts=True,
)
