"""GGUF layout of the mixture-of-experts families: llama.cpp's qwen3moe, qwen35moe and gpt-oss.

transformers keeps each MoE layer's experts in two 3-D parameters (the family spec's ``moe``):
``gate_up`` (every expert's gate and up projections, fused) and ``down``. llama.cpp reads one
3-D tensor per projection, expert e's (out, in) matrix at index e (numpy shapes; GGUF lists
ne fastest first, so ffn_gate_exps has ne = [H, I, E]):

  ffn_gate_exps (E, I, H)   ffn_up_exps (E, I, H)   ffn_down_exps (E, H, I)
  gpt-oss also: ffn_gate_exps.bias (E, I), ffn_up_exps.bias (E, I), ffn_down_exps.bias (E, H)
  (Gemma 4's gemma4 reads gate and up as one stack, ffn_gate_up_exps (E, 2I, H): each expert's
  gate rows, then its up rows; ``expert_tensors(..., fused_gate_up=True)``, ``gguf_gemma4``.)

From transformers' layouts (``expert_tensors``), per expert e:
- "out_in" (Qwen3-MoE, Qwen3.5-MoE): gate_up[e] is (2I, H), rows [gate | up]: gate = rows
  0..I-1, up = rows I..2I-1; down[e] (H, I) as is.
- "in_out" (gpt-oss): gate_up[e] is (H, 2I) with gate and up interleaved along the outputs:
  gate = gate_up[e][:, 0::2]ᵀ, up = gate_up[e][:, 1::2]ᵀ; down[e] (I, H) transposed; the
  gate_up bias (E, 2I) is split the same way (even columns gate, odd up).
LoRA on the experts (PEFT's target_parameters) is merged into the 3-D parameters before this
split (``gguf_writer.merged_state``), so each expert's file matrix is W_e + s·B_e A_e.

What llama.cpp's graphs hard-code, and transformers' configs must match (else the family's
``gguf_checks`` refuse the export):
- qwen3moe, qwen35moe: softmax over all E router logits, the top k, renormalised to sum 1
  (Qwen3-MoE's ``norm_topk_prob``; Qwen3.5-MoE always); experts SiLU(gate)·up; every layer MoE.
  qwen35moe adds the shared expert (ffn_{gate,up,down}_shexp) scaled by sigmoid(x·g), g the
  (1, H) ``shared_expert_gate`` stored as ffn_gate_inp_shexp (H,).
- gpt-oss: router logits with their bias, the top k, softmax over those k; experts
  (clamp(up, ±7) + 1)·g·sigmoid(1.702·g), g = min(gate, 7); attention sinks (attn_sinks, one
  logit per head); sliding-window layers at even indices (llama.cpp's default pattern); YaRN.
The routers (ffn_gate_inp, ffn_gate_inp_shexp) and every non-``.weight`` tensor stay F32 in all
file types, as llama-quantize leaves them (``gguf_writer.F32_TENSORS``): a rounded router would
route near-tied tokens otherwise. llama-quantize's k-quant mixtures give MoE tensors rules of
their own (not mirrored here): q4_k_m, q5_k_m and q6_k are refused.

Usage: ``expert_tensors(spec.moe, "model.layers.0.mlp.experts.gate_up_proj", w)`` -> the
gate and up stacks under names gguf's name map knows; ``QWEN3MOE`` / ``QWEN35MOE`` / ``GPT_OSS``
are the writer's ``GGUFLayout``\\ s.
"""

from __future__ import annotations

import torch

from fastlm.export.gguf_layout import GGUFLayout
from fastlm.export.gguf_linear_attention import add_qwen35_hparams, qwen35_tensor

# llama-quantize's per-tensor k-quant types for expert stacks are not reproduced.
REFUSED_METHODS = ("q4_k_m", "q5_k_m", "q6_k")
# HF's YaRN defaults where the config leaves beta_fast / beta_slow out (llama.cpp's are the same).
YARN_BETA_FAST, YARN_BETA_SLOW = 32.0, 1.0


def expert_tensors(
    moe, hf_name: str, tensor: torch.Tensor, fused_gate_up: bool = False
) -> list[tuple[str, torch.Tensor]]:
    """llama.cpp's per-projection (E, out, in) stacks for an experts parameter of ``moe`` (a
    ``MixtureOfExperts``), named ``<experts>.{gate,up,down}_proj.{weight,bias}`` as gguf's name
    map knows them; any other tensor is returned as it is. ``fused_gate_up``: gate and up as one
    (E, 2I, H) stack, ``<experts>.gate_up_proj.{weight,bias}`` (each expert's I gate rows, then
    its I up rows: llama.cpp's ffn_gate_up_exps).

    Usage: ``dict(expert_tensors(spec.moe, name, w))`` -> {"...gate_proj.weight": (E, I, H),
    "...up_proj.weight": (E, I, H)} for a gate_up parameter.
    """
    prefix, marker, leaf = hf_name.rpartition(f".{moe.experts_attr}.")
    if not marker:
        return [(hf_name, tensor)]
    base = f"{prefix}.{moe.experts_attr}."
    transposed = moe.experts_layout == "in_out"  # (E, in, out): each expert's matrix transposed
    if leaf == moe.gate_up:
        weight = tensor.transpose(1, 2) if transposed else tensor  # (E, 2I, H)
        gate, up = _gate_and_up(weight, moe.gate_up_interleaved)
        return _gate_up_stacks(base, "weight", gate, up, fused_gate_up)
    if leaf == moe.down:
        weight = tensor.transpose(1, 2) if transposed else tensor  # (E, H, I)
        return [(base + "down_proj.weight", weight.contiguous())]
    if moe.gate_up_bias and leaf == moe.gate_up_bias:  # (E, 2I)
        gate, up = _gate_and_up(tensor, moe.gate_up_interleaved)
        return _gate_up_stacks(base, "bias", gate, up, fused_gate_up)
    if moe.down_bias and leaf == moe.down_bias:  # (E, H)
        return [(base + "down_proj.bias", tensor)]
    raise ValueError(f"{hf_name}: an experts tensor with no GGUF layout")


def _gate_up_stacks(base: str, kind: str, gate, up, fused: bool) -> list[tuple[str, torch.Tensor]]:
    """The gate and up stacks (E, I, ...) under their names, or one (E, 2I, ...) stack."""
    if fused:
        return [(f"{base}gate_up_proj.{kind}", torch.cat([gate, up], dim=1))]
    return [(f"{base}gate_proj.{kind}", gate), (f"{base}up_proj.{kind}", up)]


def _gate_and_up(tensor: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate and up along dim 1 (the 2I outputs): alternating, or the first and second half."""
    if interleaved:
        return tensor[:, 0::2].contiguous(), tensor[:, 1::2].contiguous()
    gate, up = tensor.chunk(2, dim=1)
    return gate.contiguous(), up.contiguous()


def _add_experts(writer, config, count_attr: str, width_attr: str) -> None:
    """The routed experts' count, the experts per token and each expert's width."""
    writer.add_expert_count(getattr(config, count_attr))
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_feed_forward_length(getattr(config, width_attr))


def _add_qwen3moe_hparams(writer, config, rope: dict | None) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_rope_freq_base(rope.get("rope_theta", 10_000.0))
    writer.add_rope_dimension_count(head_dim)
    _add_experts(writer, config, "num_experts", "moe_intermediate_size")


def _qwen35moe_tensor(config, norm_offset: float, hf_name: str, tensor: torch.Tensor):
    if hf_name.endswith("shared_expert_gate.weight"):  # (1, H) -> llama.cpp's (H,) vector
        return hf_name, tensor.reshape(-1)
    return qwen35_tensor(config, norm_offset, hf_name, tensor)


def _add_qwen35moe_hparams(writer, config, rope: dict | None) -> None:
    add_qwen35_hparams(writer, config, rope)
    _add_experts(writer, config, "num_experts", "moe_intermediate_size")
    writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)


def _add_gpt_oss_hparams(writer, config, rope: dict | None) -> None:
    """gpt-oss: RoPE over the whole head (YaRN-scaled where the config says so), the window."""
    import gguf

    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_rope_dimension_count(config.head_dim)
    if rope.get("rope_type") == "yarn":
        original = rope["original_max_position_embeddings"]
        # transformers' rule when the factor is left out: the context it was stretched to
        factor = rope.get("factor") or config.max_position_embeddings / original
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_rope_scaling_yarn_beta_fast(rope.get("beta_fast") or YARN_BETA_FAST)
        writer.add_rope_scaling_yarn_beta_slow(rope.get("beta_slow") or YARN_BETA_SLOW)
    writer.add_sliding_window(config.sliding_window)
    _add_experts(writer, config, "num_local_experts", "intermediate_size")


QWEN3MOE = GGUFLayout(
    add_hparams=_add_qwen3moe_hparams, refused_methods=REFUSED_METHODS, split_experts=True
)
QWEN35MOE = GGUFLayout(
    tensor=_qwen35moe_tensor,
    add_hparams=_add_qwen35moe_hparams,
    refused_methods=REFUSED_METHODS,
    split_experts=True,
)
GPT_OSS = GGUFLayout(
    add_hparams=_add_gpt_oss_hparams,
    refused_methods=REFUSED_METHODS,
    split_experts=True,
    bare_tensors_get_weight_suffix=True,  # self_attn.sinks -> blk.N.attn_sinks.weight
)
