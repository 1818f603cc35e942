"""GGUF layout of Mistral 4 (``mistral4``): llama.cpp's ``mistral4`` (its ``deepseek2`` graph).

Multi-head latent attention (MLA), H heads, per head q·k dims N + R (``qk_nope_head_dim``,
``qk_rope_head_dim``) and v dims V, latents of rank Q (``q_lora_rank``) and C
(``kv_lora_rank``). What llama.cpp reads, from which transformers tensor (numpy shapes):

  self_attn.q_a_proj (Q, hidden)       -> attn_q_a; q_a_layernorm (Q,) -> attn_q_a_norm
  self_attn.q_b_proj (H·(N + R), Q)    -> attn_q_b (or q_proj -> attn_q where Q is None)
  self_attn.kv_a_proj_with_mqa (C + R, hidden) -> attn_kv_a_mqa; kv_a_layernorm -> attn_kv_a_norm
  self_attn.kv_b_proj (H·(N + V), C)   -> attn_k_b (H, C, N): each head's N key rows,
                                          transposed; attn_v_b (H, V, C): its V value rows
                                          (``split_kv_b``, as llama.cpp's converter splits it)
  self_attn.o_proj                     -> attn_output
  mlp.gate (E, hidden)                 -> ffn_gate_inp, F32 in every file type
  mlp.experts                          -> ffn_{gate,up}_exps (E, I, hidden), ffn_down_exps:
                                          ``gguf_moe.expert_tensors`` ("out_in", gate then up)
  mlp.shared_experts.*                 -> ffn_{gate,up,down}_shexp, width I·n_shared_experts
  mlp.{gate,up,down}_proj              -> ffn_{gate,up,down} of the first_k_dense_replace layers

With the split kv_b llama.cpp runs MLA "absorbed": one KV head holding the normalised latent
(C) and the rotated key part (R), q's N dims multiplied into the latent by attn_k_b, the output
by attn_v_b: q·k and the values are transformers' (the same products, reassociated).

RoPE rows: transformers rotates the R dims of q and the shared k part as adjacent pairs (2i,
2i + 1) where ``rope_interleave`` (transformers' default), the pairs llama.cpp's ``mistral4``
rotates: the rows are written as they are. With ``rope_interleave`` off transformers rotates
the halves (i, i + R/2), and the R rows of each q head and of the k part are permuted 0, R/2, 1,
R/2 + 1, ... (``gguf_dense.permute_rope_rows``).

Metadata: head_count_kv 1, key_length C + R and value_length C (the cache's), key_length_mla
N + R and value_length_mla V (the heads'), q/kv LoRA ranks, rope.dimension_count R, the leading
dense blocks, the experts (count, used, width, shared count, weights_norm = norm_topk_prob,
weights_scale = routed_scaling_factor, softmax gating; expert_group_count / _used_count =
n_group / topk_group where groups are dropped), YaRN (factor, original context, beta fast /
slow, yarn_log_multiplier 0.1·mscale_all_dim) and the query scale 1 + β·ln(1 + ⌊t / T⌋)
(attention.temperature_scale β = ``llama_4_scaling_beta``, temperature_length T = YaRN's
original context; t from 0, as transformers).

What llama.cpp hard-codes, matched by transformers' Mistral 4 (no config switches it): softmax
router scores, a group's score the sum of its 2 best, the top k among the kept groups, the
weights p of those (not a masked copy), renormalised (the sum clamped at 6.1e-5 where
transformers adds 1e-20) and scaled; SiLU experts; the shared experts ungated. Where it
differs from what a config may say, the family's ``gguf_checks`` refuse the export
(``fastlm.models.mistral4``): RoPE other than YaRN with mscale = mscale_all_dim = 1 and
truncate (llama.cpp's ``mistral4`` assumes both mscales are 1: DeepSeek-V2's 0.707 moves the
tiny model's log-probs by 0.6); the latent norms' ε (transformers' is 1e-6 whatever
rms_norm_eps says, llama.cpp's rms_norm_eps); attention biases (llama.cpp loads none); 26 or 27
layers (48 with a 128256-token vocabulary) with a q latent (llama.cpp's loader takes that size
for DeepSeek-V2-Lite, without one, and does not load the file); a top k larger than the kept
groups' experts (both would fill it by ties). llama-quantize's k-quant mixtures are not
reproduced: q4_k_m, q5_k_m and q6_k are refused.

Usage: ``MISTRAL4`` (the writer's ``GGUFLayout``); ``dict(split_kv_b(config, name, w))``.
"""

from __future__ import annotations

import torch

from fastlm.export.gguf_dense import permute_rope_rows
from fastlm.export.gguf_layout import GGUFLayout
from fastlm.export.gguf_moe import REFUSED_METHODS, YARN_BETA_FAST, YARN_BETA_SLOW

KV_B = "self_attn.kv_b_proj.weight"


def split_kv_b(config, hf_name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """kv_b_proj (H·(N + V), C) as llama.cpp's k_b (H, C, N) and v_b (H, V, C); any other
    tensor as it is.

    Usage: ``dict(split_kv_b(config, "model.layers.0.self_attn.kv_b_proj.weight", w))``.
    """
    if not hf_name.endswith(KV_B):
        return [(hf_name, tensor)]
    nope, v = config.qk_nope_head_dim, config.v_head_dim
    per_head = tensor.reshape(config.num_attention_heads, nope + v, config.kv_lora_rank)
    k_b = per_head[:, :nope].transpose(1, 2).contiguous()  # (H, C, N)
    v_b = per_head[:, nope:].contiguous()  # (H, V, C)
    prefix = hf_name[: -len(KV_B)] + "self_attn."
    return [(prefix + "k_b_proj.weight", k_b), (prefix + "v_b_proj.weight", v_b)]


def mistral4_tensor(config, norm_offset: float, hf_name: str, tensor: torch.Tensor):
    """The RoPE rows of q and the shared k part as llama.cpp rotates them: as they are where
    ``rope_interleave``, else each head's R rows permuted from halves to adjacent pairs."""
    if getattr(config, "rope_interleave", True):
        return hf_name, tensor
    rope = config.qk_rope_head_dim
    if hf_name.endswith(("self_attn.q_b_proj.weight", "self_attn.q_proj.weight")):
        heads = config.num_attention_heads
        per_head = tensor.reshape(heads, -1, tensor.shape[-1])  # (H, N + R, in)
        rows = permute_rope_rows(per_head[:, -rope:].reshape(heads * rope, -1), heads)
        per_head = torch.cat([per_head[:, :-rope], rows.reshape(heads, rope, -1)], dim=1)
        return hf_name, per_head.reshape(tensor.shape)
    if hf_name.endswith("self_attn.kv_a_proj_with_mqa.weight"):  # (C + R, hidden)
        return hf_name, torch.cat([tensor[:-rope], permute_rope_rows(tensor[-rope:], 1)])
    return hf_name, tensor


def add_mistral4_hparams(writer, config, rope: dict | None) -> None:
    """Every mistral4 key but the file type: MLA's sizes, the experts and their groups, YaRN
    and the query temperature."""
    import gguf

    from fastlm.models.gguf_limits import rope_parameters  # lazy: fastlm.models loads peft

    rope = rope_parameters(config)
    nope, rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)  # the leading dense layers
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(1)  # absorbed MLA: one head of latent + rotated key part
    writer.add_key_length(config.kv_lora_rank + rope_dim)
    writer.add_value_length(config.kv_lora_rank)
    writer.add_key_length_mla(nope + rope_dim)
    writer.add_value_length_mla(config.v_head_dim)
    writer.add_q_lora_rank(config.q_lora_rank or 0)  # 0: q_proj (attn_q)
    writer.add_kv_lora_rank(config.kv_lora_rank)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_leading_dense_block_count(config.first_k_dense_replace or 0)

    writer.add_expert_count(config.n_routed_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    writer.add_expert_shared_count(config.n_shared_experts)
    writer.add_expert_weights_norm(bool(config.norm_topk_prob))
    writer.add_expert_weights_scale(config.routed_scaling_factor)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
    groups, kept = config.n_group or 1, config.topk_group or 1
    if groups > 1 and kept < groups:  # else every group is kept: no groups for llama.cpp
        writer.add_expert_group_count(groups)
        writer.add_expert_group_used_count(kept)

    original = rope["original_max_position_embeddings"]
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_rope_dimension_count(rope_dim)
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    # transformers' rule when the factor is left out: the context it was stretched to
    writer.add_rope_scaling_factor(rope.get("factor") or config.max_position_embeddings / original)
    writer.add_rope_scaling_orig_ctx_len(original)
    writer.add_rope_scaling_yarn_beta_fast(rope.get("beta_fast") or YARN_BETA_FAST)
    writer.add_rope_scaling_yarn_beta_slow(rope.get("beta_slow") or YARN_BETA_SLOW)
    # llama.cpp divides the key by 0.1 on load (its converter's convention for deepseek2)
    writer.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])
    writer.add_attn_temperature_scale(rope.get("llama_4_scaling_beta") or 0.0)  # 0: none
    writer.add_attn_temperature_length(original)


MISTRAL4 = GGUFLayout(
    tensor=mistral4_tensor,
    split=split_kv_b,
    add_hparams=add_mistral4_hparams,
    replaces_common_hparams=True,
    refused_methods=REFUSED_METHODS,
    split_experts=True,
)
