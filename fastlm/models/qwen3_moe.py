"""Qwen3-MoE (``qwen3_moe``): Qwen3's attention with sparse mixture-of-experts blocks.

What differs from Qwen3, and where fastlm's shared path takes it from the spec:
- Most layers' MLP is a ``Qwen3MoeSparseMoeBlock`` (``moe``): a softmax top-k router (its
  ``norm_topk_prob`` renormalises the k weights) over ``num_experts`` SwiGLU experts stored as
  3-D parameters (``gate_up_proj`` (E, 2·I, H), ``down_proj`` (E, H, I)); no shared expert. The
  experts run as grouped GEMMs over the routed tokens, LoRA on them through PEFT's
  ``target_parameters`` (``moe.py``).
- Layers in ``mlp_only_layers``, or off the ``decoder_sparse_step``, keep a dense
  ``Qwen3MoeMLP`` (the fused LoRA MLP).
- Training adds ``router_aux_loss_coef`` × the load-balancing loss when ``output_router_logits``.
GGUF: llama.cpp's qwen3moe, each 3-D experts parameter split into per-projection stacks
(``fastlm/export/gguf_moe.py``); the gguf_checks below refuse what it would run otherwise.
"""

from fastlm.models.gguf_limits import default_rope_only
from fastlm.models.qwen import _no_sliding_window
from fastlm.models.spec import ArchitectureSpec, MixtureOfExperts


def _every_layer_sparse(config) -> None:
    """llama.cpp's qwen3moe has a MoE block in every layer and no dense MLP tensors."""
    dense = list(getattr(config, "mlp_only_layers", None) or [])
    step = getattr(config, "decoder_sparse_step", 1)
    if dense or step != 1:
        raise NotImplementedError(
            f"Qwen3-MoE with dense MLP layers (mlp_only_layers={dense}, decoder_sparse_step="
            f"{step}) is not exported to GGUF: llama.cpp's qwen3moe has a MoE block in every "
            "layer, so it cannot run this model; use merged_16bit with transformers instead."
        )


def _renormalised_top_k(config) -> None:
    """llama.cpp's qwen3moe always renormalises the k routing weights to sum 1."""
    if not getattr(config, "norm_topk_prob", False):
        raise NotImplementedError(
            "Qwen3-MoE with norm_topk_prob=False is not exported to GGUF: llama.cpp's qwen3moe "
            "always renormalises the top-k routing weights, so it would compute another model; "
            "use merged_16bit with transformers instead."
        )


QWEN3_MOE = ArchitectureSpec(
    model_type="qwen3_moe",
    family="Qwen3-MoE",
    norm_class="Qwen3MoeRMSNorm",
    attention_class="Qwen3MoeAttention",
    mlp_class="Qwen3MoeMLP",
    norm_offset=0.0,
    activation="swiglu",
    activation_config_attr="hidden_act",
    activation_config_values=("silu",),
    gguf_arch="QWEN3MOE",
    gguf_checks=(default_rope_only, _no_sliding_window, _every_layer_sparse, _renormalised_top_k),
    qk_norm=True,
    moe=MixtureOfExperts(
        block_class="Qwen3MoeSparseMoeBlock",
        router_class="Qwen3MoeTopKRouter",
        experts_class="Qwen3MoeExperts",
    ),
)
