"""GGUF layout of Qwen3.5 text (llama.cpp's ``qwen35``): Gated DeltaNet layers beside attention.

llama.cpp runs a Gated DeltaNet layer (``linear_attention``) from these tensors:

  in_proj_qkv -> attn_qkv     rows [q (Hk·dk) | k (Hk·dk) | v (Hv·dv)], conv'd together
  in_proj_z   -> attn_gate    the gated norm's gate z
  in_proj_b   -> ssm_beta     β = sigmoid(x·Wb)
  in_proj_a   -> ssm_alpha    a = x·Wa
  dt_bias     -> ssm_dt.bias  g = A·softplus(a + dt_bias), the per-head log-decay
  A_log       -> ssm_a        stored as A = −exp(A_log): llama.cpp multiplies by it as is
  conv1d      -> ssm_conv1d   (C, 1, K) -> (C, K), kept F32 (ggml_ssm_conv reads F32 only)
  norm        -> ssm_norm     y = w·x̂·silu(z): w as is (HF's gated norm has no 1 + w offset)
  out_proj    -> ssm_out

Value heads: with Hv = r·Hk, HF groups them by key head (value head j reads key head j // r);
llama.cpp broadcasts q/k by tiling (value head j reads key head j % Hk). So every value-head axis
is permuted from grouped (Hk, r, ·) to tiled (r, Hk, ·): the v rows of in_proj_qkv and the v
channels of conv1d, the rows of in_proj_z / in_proj_a / in_proj_b, A_log, dt_bias and the
columns of out_proj. Nothing changes when Hv = Hk.

Full attention: q_proj as is (llama.cpp reads each head's 2·head_dim rows as [query | gate], as
HF does); the other norms (input, post-attention, q/k, final) are HF's (1 + w)·x̂, stored 1 + w.
RoPE covers the first partial_rotary_factor·head_dim dims (rope.dimension_count); llama.cpp runs
it as M-RoPE, whose sections (rope.dimension_sections) only pick which of equal text positions a
pair rotates by, so any split covering every pair gives HF's rotation.

Which configs llama.cpp would run otherwise is refused before writing (the spec's gguf_checks).
Usage: ``QWEN35.tensor(config, 1.0, name, w)`` -> (HF name for gguf's name map, llama.cpp tensor).
"""

from __future__ import annotations

import torch

from fastlm.export.gguf_layout import GGUFLayout


def _tile_value_heads(tensor: torch.Tensor, dim: int, n_key: int, head: int) -> torch.Tensor:
    """Value heads along ``dim`` from HF's grouped (Hk, r, head) order to llama.cpp's tiled
    (r, Hk, head) order."""
    per_key = tensor.shape[dim] // (n_key * head)
    if per_key == 1:
        return tensor
    grouped = tensor.unflatten(dim, (n_key, per_key, head))
    return grouped.transpose(dim, dim + 1).flatten(dim, dim + 2).contiguous()


def qwen35_tensor(
    config, norm_offset: float, hf_name: str, tensor: torch.Tensor
) -> tuple[str, torch.Tensor]:
    """(HF name for gguf's name map, tensor in llama.cpp's qwen35 / qwen35moe layout).

    Usage: ``qwen35_tensor(config, 1.0, "model.norm.weight", w)`` -> (same name, 1 + w).
    """
    n_key, key_dim = config.linear_num_key_heads, config.linear_key_head_dim
    value_dim = config.linear_value_head_dim
    if ".linear_attn." not in hf_name:
        if norm_offset and hf_name.endswith("norm.weight"):
            return hf_name, tensor + norm_offset  # HF: (1 + w)·x̂; llama.cpp: w·x̂
        return hf_name, tensor
    leaf = hf_name.rsplit(".linear_attn.", 1)[1]
    if leaf == "in_proj_qkv.weight":  # only the v rows follow the value heads
        qk = 2 * n_key * key_dim
        v = _tile_value_heads(tensor[qk:], 0, n_key, value_dim)
        return hf_name, torch.cat([tensor[:qk], v])
    if leaf == "conv1d.weight":  # (C, 1, K): one depthwise kernel per q/k/v channel
        kernel = tensor.squeeze(1)
        qk = 2 * n_key * key_dim
        v = _tile_value_heads(kernel[qk:], 0, n_key, value_dim)
        return hf_name, torch.cat([kernel[:qk], v])
    if leaf == "in_proj_z.weight":
        return hf_name, _tile_value_heads(tensor, 0, n_key, value_dim)
    if leaf == "out_proj.weight":
        return hf_name, _tile_value_heads(tensor, 1, n_key, value_dim)
    if leaf in ("in_proj_a.weight", "in_proj_b.weight"):
        return hf_name, _tile_value_heads(tensor, 0, n_key, 1)
    if leaf == "A_log":
        return hf_name, _tile_value_heads(-torch.exp(tensor), 0, n_key, 1)
    if leaf == "dt_bias":  # gguf's name map knows Qwen3-Next's older name for it
        name = hf_name.rsplit(".", 1)[0] + ".dt_proj.bias"
        return name, _tile_value_heads(tensor, 0, n_key, 1)
    return hf_name, tensor  # norm.weight (no offset)


def _rope_sections(pairs: int) -> list[int]:
    """M-RoPE sections (t, h, w, e) covering ``pairs`` rotated pairs, interleaved or not:
    ⌈P/3⌉ + ⌈(P−1)/3⌉ + ⌈(P−2)/3⌉ = P (Qwen3.5's 32 pairs: 11, 11, 10)."""
    return [-(-pairs // 3), -(-(pairs - 1) // 3), -(-(pairs - 2) // 3), 0]


def add_qwen35_hparams(writer, config, rope: dict | None) -> None:
    """qwen35's keys beside the writer's common ones: partial M-RoPE, the layer pattern, the
    Gated DeltaNet sizes (qwen35moe reads the same).

    Usage: ``add_qwen35_hparams(gguf_writer, config, rope_parameters(config))``.
    """
    # lazy: fastlm.models loads transformers and peft, which fastlm.export alone does not
    from fastlm.models.qwen3_5 import full_attention_interval

    rotary_dims = int(config.head_dim * rope.get("partial_rotary_factor", 1.0))
    writer.add_rope_freq_base(rope.get("rope_theta", 10_000.0))
    writer.add_rope_dimension_count(rotary_dims)
    writer.add_rope_dimension_sections(_rope_sections(rotary_dims // 2))
    writer.add_full_attention_interval(full_attention_interval(config))
    writer.add_ssm_conv_kernel(config.linear_conv_kernel_dim)
    writer.add_ssm_state_size(config.linear_key_head_dim)
    writer.add_ssm_group_count(config.linear_num_key_heads)
    writer.add_ssm_time_step_rank(config.linear_num_value_heads)
    writer.add_ssm_inner_size(config.linear_num_value_heads * config.linear_value_head_dim)


# llama-quantize gives the linear-attention tensors types of their own (not mirrored here).
QWEN35 = GGUFLayout(
    tensor=qwen35_tensor,
    add_hparams=add_qwen35_hparams,
    refused_methods=("q4_k_m", "q5_k_m", "q6_k"),
)
