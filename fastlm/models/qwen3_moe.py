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
GGUF export is refused (``gguf_arch`` None): llama.cpp has a qwen3moe arch, but fastlm's writer
has no layout for the experts' 3-D tensors yet; export merged_16bit and convert that instead.
"""

from fastlm.models.spec import ArchitectureSpec, MixtureOfExperts

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
    gguf_arch=None,
    qk_norm=True,
    moe=MixtureOfExperts(
        block_class="Qwen3MoeSparseMoeBlock",
        router_class="Qwen3MoeTopKRouter",
        experts_class="Qwen3MoeExperts",
    ),
)
