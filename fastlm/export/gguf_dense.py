"""GGUF layouts of the dense families whose llama.cpp arch needs a rule beyond the rename.

- Llama (and Mistral, written as llama.cpp's ``llama``): transformers rotates the half-split
  pairs (i, i + D/2) of each head, llama.cpp's ``llama`` the adjacent pairs (2i, 2i + 1), so the
  q and k rows of every head are permuted 0, D/2, 1, D/2 + 1, ... (``permute_rope_rows``).
  Llama 3.1's RoPE scaling becomes the ``rope_freqs`` tensor: per frequency the divisor llama.cpp
  applies to θ_i (``llama3_rope_factors``). Their norms are w·x̂ as in llama.cpp: no offset.
- Gemma 2: one RoPE base, the sliding window (llama.cpp fixes the pattern), both soft-caps.
- Gemma 3: a RoPE base per layer type, the sliding window and its per-layer pattern, soft-caps.
The Gemma norms' 1 + w is the writer's common rule (the spec's ``norm_offset``).

Usage: ``LLAMA``, ``GEMMA2``, ``GEMMA3`` (the writer's ``GGUFLayout``\\ s);
``permute_rope_rows(q_proj_weight, n_heads)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from fastlm.export.gguf_layout import GGUFLayout


def _rope(config) -> dict:
    from fastlm.models.gguf_limits import rope_parameters  # lazy: fastlm.models loads peft

    return rope_parameters(config)


def permute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's half-split RoPE rows -> llama.cpp's interleaved pairs (per head: 0,h/2,1,h/2+1,..).

    Usage: ``permute_rope_rows(k_proj_weight, config.num_key_value_heads)``.
    """
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.reshape(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def _llama_tensor(config, norm_offset: float, hf_name: str, tensor: torch.Tensor):
    if hf_name.endswith("q_proj.weight"):
        return hf_name, permute_rope_rows(tensor, config.num_attention_heads)
    if hf_name.endswith("k_proj.weight"):
        return hf_name, permute_rope_rows(tensor, config.num_key_value_heads)
    return hf_name, tensor  # Llama / Mistral norms are w·x̂ (norm_offset 0): as llama.cpp's


def llama3_rope_factors(config) -> torch.Tensor:
    """Per-frequency divisors of Llama 3.1 RoPE scaling; llama.cpp divides θ_i by rope_freqs[i].

    Usage: ``llama3_rope_factors(config)`` -> (head_dim / 2,) float32.
    """
    rope = _rope(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv_freq = 1.0 / rope["rope_theta"] ** (
        torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    )
    factor, old_ctx = rope["factor"], rope["original_max_position_embeddings"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    divisor = 1.0 / ((1 - smooth) / factor + smooth)  # the blend HF applies between the bands
    divisor = torch.where(wavelen < old_ctx / high, torch.ones_like(divisor), divisor)
    divisor = torch.where(wavelen > old_ctx / low, torch.full_like(divisor, factor), divisor)
    return divisor.float()


def _llama_extra_tensors(config) -> Iterator[tuple[str, torch.Tensor]]:
    """``rope_freqs.weight`` where the config has Llama 3.1's RoPE scaling; nothing otherwise."""
    import gguf

    if _rope(config).get("rope_type") == "llama3":
        yield (
            gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
            llama3_rope_factors(config),
        )


def _add_gemma2_hparams(writer, config, rope: dict | None) -> None:
    """Gemma 2: one RoPE base, the sliding window (pattern fixed in llama.cpp), soft-caps."""
    writer.add_rope_freq_base(rope.get("rope_theta", 10_000.0))
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_sliding_window(config.sliding_window)
    writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    writer.add_final_logit_softcapping(config.final_logit_softcapping)


def _add_gemma3_hparams(writer, config, rope: dict | None) -> None:
    """Gemma 3: per-layer-type RoPE bases, the sliding window and its pattern, soft-caps.

    Scaled RoPE is refused before writing (the spec's gguf_checks): only the bases are written.
    """
    full = rope.get("full_attention", rope)
    local = rope.get("sliding_attention", {})
    writer.add_rope_freq_base(full.get("rope_theta", 1_000_000.0))
    writer.add_rope_freq_base_swa(local.get("rope_theta", 10_000.0))
    writer.add_sliding_window(config.sliding_window)
    layer_types = list(getattr(config, "layer_types", []) or [])
    if layer_types:
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    if getattr(config, "attn_logit_softcapping", None):
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)


LLAMA = GGUFLayout(tensor=_llama_tensor, extra_tensors=_llama_extra_tensors)
GEMMA2 = GGUFLayout(add_hparams=_add_gemma2_hparams)
GEMMA3 = GGUFLayout(add_hparams=_add_gemma3_hparams)
