"""Qwen3.5-MoE text (``qwen3_5_moe_text``): Qwen3.5's hybrid layers with sparse MoE blocks.

What differs from Qwen3.5 (dense), and where fastlm's shared path takes it from the spec:
- Token mixing is Qwen3.5's, module for module (the transformers classes are renamed copies):
  Gated DeltaNet ``linear_attention`` layers (``linear_attention.py``) and gated full attention
  (``attention_output_gate``, q/k norm, partial RoPE); norms ``(1 + w)·x̂``.
- Every layer's MLP is a ``Qwen3_5MoeSparseMoeBlock`` (``moe``): a softmax top-k router that
  always renormalises its k weights (no ``norm_topk_prob``) over ``num_experts`` SwiGLU experts
  stored as Qwen3-MoE's (``gate_up_proj`` (E, 2·I, H), ``down_proj`` (E, H, I)), run as grouped
  GEMMs, LoRA on them through PEFT's ``target_parameters`` (``moe.py``); plus a shared expert,
  a dense ``Qwen3_5MoeMLP`` of width ``shared_expert_intermediate_size`` (the fused LoRA MLP;
  PEFT's ``gate_proj``/``up_proj``/``down_proj`` targets land on it), scaled per token by
  sigmoid of ``shared_expert_gate`` (H -> 1, transformers' Linear).
- Training adds ``router_aux_loss_coef`` × the load-balancing loss when ``output_router_logits``.
GGUF: llama.cpp's qwen35moe, Qwen3.5's layout (``gguf_linear_attention.py``) with each 3-D
experts parameter split into per-projection stacks and the shared expert beside them
(``gguf_moe.py``); Qwen3.5's gguf_checks refuse what it would run otherwise.
The multimodal ``qwen3_5_moe`` checkpoint is refused with a hint to load its text model.
"""

from fastlm.models.gguf_limits import default_rope_only
from fastlm.models.qwen3_5 import (
    _equal_linear_head_dims,
    _full_attention_every_nth_layer,
    _no_attention_bias,
)
from fastlm.models.spec import ArchitectureSpec, LinearAttention, MixtureOfExperts

QWEN3_5_MOE_TEXT = ArchitectureSpec(
    model_type="qwen3_5_moe_text",
    family="Qwen3.5-MoE (text)",
    norm_class="Qwen3_5MoeRMSNorm",
    attention_class="Qwen3_5MoeAttention",
    mlp_class="Qwen3_5MoeMLP",
    norm_offset=1.0,
    activation="swiglu",
    activation_config_attr="hidden_act",
    activation_config_values=("silu",),
    gguf_arch="QWEN35MOE",
    gguf_checks=(
        default_rope_only,
        _full_attention_every_nth_layer,
        _equal_linear_head_dims,
        _no_attention_bias,
    ),
    qk_norm=True,
    attention_output_gate=True,
    linear_attention=LinearAttention(module_class="Qwen3_5MoeGatedDeltaNet"),
    moe=MixtureOfExperts(
        block_class="Qwen3_5MoeSparseMoeBlock",
        router_class="Qwen3_5MoeTopKRouter",
        experts_class="Qwen3_5MoeExperts",
        normalize_top_k=True,
        shared_expert_attr="shared_expert",
        shared_expert_gate_attr="shared_expert_gate",
    ),
    transformers_linears=(
        ("shared_expert_gate", "the shared expert's (H -> 1) sigmoid gate: transformers' Linear"),
    ),
)
