"""How a llama.cpp arch differs from a rename of transformers' tensors: one interface for all.

Every family is written as transformers' tensors renamed by ``gguf.get_tensor_name_map``, with
the writer's common metadata and its one common rule (a Gemma-style norm stored as 1 + w;
``gguf_writer``). An arch that needs more (Llama's RoPE row order, Gemma 2/3's metadata:
``gguf_dense``; Qwen3.5's linear attention: ``gguf_linear_attention``; Gemma 4: ``gguf_gemma4``;
Llama 4: ``gguf_llama4``; Mistral 4: ``gguf_mistral4``; the other mixture-of-experts arches:
``gguf_moe``) describes it with a
``GGUFLayout`` in ``gguf_writer.LAYOUTS``, and the writer asks every arch the same questions
through it; there is no other per-arch branch in the writer.

Usage: ``layout = GGUFLayout(tensor=..., add_hparams=..., refused_methods=("q6_k",))``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class GGUFLayout:
    """An arch's differences from the plain rename, each optional."""

    # (config, norm_offset, HF name, fp32 tensor) -> (HF-style name gguf's name map knows, with
    # .weight, .bias or .scale, tensor in llama.cpp's layout); norm_offset is the spec's. None:
    # the writer's rules.
    tensor: Callable[[Any, float, str, torch.Tensor], tuple[str, torch.Tensor]] | None = None
    # (GGUFWriter, config, RoPE parameters or None): the arch's metadata keys.
    add_hparams: Callable[[Any, Any, dict | None], None] | None = None
    # True: add_hparams writes every key but the file type (the common ones are not written);
    # False: it adds to the common keys (which include neither rope.freq_base nor
    # rope.dimension_count).
    replaces_common_hparams: bool = False
    # config -> (GGUF name, tensor) pairs llama.cpp needs that transformers recomputes
    extra_tensors: Callable[[Any], Iterator[tuple[str, torch.Tensor]]] | None = None
    # quantization methods whose llama-quantize rules are not reproduced for this arch, or
    # config -> those methods (where it depends on the model: Gemma 4's per-layer inputs)
    refused_methods: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = ()
    # True: a bare HF tensor (no .weight/.bias/.scale: Gemma 4's layer_scalar) is named
    # "<gguf>.weight"
    bare_tensors_get_weight_suffix: bool = False
    # True: the family's 3-D expert parameters (its spec's ``moe``) are written as llama.cpp's
    # per-projection stacks, one (E, out, in) tensor each (``gguf_moe.expert_tensors``), before
    # ``tensor`` sees them.
    split_experts: bool = False
    # True (with split_experts): gate and up as one (E, 2·I, H) stack, ffn_gate_up_exps (Gemma 4)
    fused_gate_up: bool = False
    # (config, HF name, fp32 tensor) -> the HF-style (name, tensor) pieces one tensor is written
    # as, each then given to ``tensor`` (Mistral 4's kv_b_proj: k_b_proj and v_b_proj). None:
    # every tensor is one.
    split: Callable[[Any, str, torch.Tensor], list[tuple[str, torch.Tensor]]] | None = None

    def refused(self, config) -> tuple[str, ...]:
        """The quantization methods refused for this config. Usage: ``"q8_0" in l.refused(c)``."""
        methods = self.refused_methods
        return methods(config) if callable(methods) else methods
