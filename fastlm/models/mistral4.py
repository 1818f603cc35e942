"""Mistral 4 (``mistral4``, ``Mistral4ForCausalLM``): multi-head latent attention, and
mixture-of-experts blocks with group-limited routing and shared experts.

What differs from Mistral, and where fastlm's shared path takes it from the spec:
- Attention is DeepSeek's multi-head latent attention (``Mistral4Attention``): q through a latent
  (``q_a_proj`` -> RMSNorm -> ``q_b_proj``, or ``q_proj`` where ``q_lora_rank`` is None), k and v
  from one latent (``kv_a_proj_with_mqa`` -> RMSNorm -> ``kv_b_proj``) plus one rotated key part
  shared by the heads, RoPE on the last ``qk_rope_head_dim`` dims of each head (interleaved
  pairs where ``rope_interleave``), the KV cache holding the latents, q scaled per position
  (``llama_4_scaling_beta``), and q·k head dims unlike v's. fastlm's patched attention computes
  q, k, v from q/k/v_proj and has none of this, so these modules run transformers' forward
  (``transformers_attention``): LoRA on their linears is PEFT's, the two RMSNorms inside them
  fastlm's kernel, and ``fused_report`` lists each linear unfused with the reason. The default
  LoRA targets name the MLA linears (``lora_targets``). A fused MLA path would need: one fused
  LoRA group for q_a_proj and kv_a_proj_with_mqa (one input), the latent norms, kv_b_proj's
  expansion per head (or its absorption into q and o for decoding), RoPE on the rope slice, and
  a flash kernel taking q·k dims (nope + rope) unlike v's.
- Layers from ``first_k_dense_replace`` on have a ``Mistral4MoE`` block (``moe``), the others a
  dense ``Mistral4MLP`` (the fused LoRA MLP). The router (``Mistral4TopkRouter``): p =
  softmax(z) in the logits' dtype (``scores_in_fp32=False``), the experts in ``n_group`` groups,
  each scored by the sum of its two best p, the ``topk_group`` best groups kept, the top k of
  their experts chosen (``expert_groups``); w = p of those, divided by their sum + 1e-20 where
  ``norm_topk_prob`` (``normalize_epsilon``), × ``routed_scaling_factor``
  (``routed_scaling_attr``). The experts are Qwen-like, (E, 2·I, H) gate then up and (E, H, I),
  run grouped with LoRA through PEFT's ``target_parameters`` (``moe.py``); the shared experts are
  one ``Mistral4MLP`` of width ``moe_intermediate_size`` × ``n_shared_experts`` (the fused LoRA
  MLP), ungated.
- No load-balancing loss: ``Mistral4ForCausalLM``'s forward adds none, so fastlm adds none;
  ``output_router_logits`` returns the router's logits.
transformers 5.23 has no AutoModelForCausalLM entry for mistral4: fastlm loads it with
``Mistral4ForCausalLM`` (``causal_lm_class``), and so must whoever reloads a merged folder. GGUF
export is refused (fastlm's writer has no layout for MLA or the 3-D experts).
"""

from fastlm.models.spec import ArchitectureSpec, ExpertGroups, MixtureOfExperts

MISTRAL4 = ArchitectureSpec(
    model_type="mistral4",
    family="Mistral 4",
    norm_class="Mistral4RMSNorm",
    attention_class="Mistral4Attention",
    mlp_class="Mistral4MLP",  # dense layers and the shared experts
    norm_offset=0.0,
    activation="swiglu",
    activation_config_attr="hidden_act",
    activation_config_values=("silu",),
    gguf_arch=None,
    transformers_attention=(
        "multi-head latent attention (latent q and kv projections, RoPE on part of each head, "
        "latents in the KV cache), which fastlm's patched attention does not compute"
    ),
    lora_targets=(
        "q_proj",  # where q_lora_rank is None
        "q_a_proj",
        "q_b_proj",
        "kv_a_proj_with_mqa",
        "kv_b_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ),
    causal_lm_class="Mistral4ForCausalLM",
    moe=MixtureOfExperts(
        block_class="Mistral4MoE",
        router_class="Mistral4TopkRouter",
        experts_class="Mistral4Experts",
        router_attr="gate",
        scoring="softmax",
        normalize_top_k="norm_topk_prob",
        normalize_epsilon=1e-20,
        routed_scaling_attr="routed_scaling_factor",
        scores_in_fp32=False,
        expert_groups=ExpertGroups(num_groups_attr="num_group", kept_groups_attr="topk_group"),
        shared_expert_attr="shared_experts",
        num_experts_attr="num_local_experts",
        aux_loss_coef_attr=None,  # Mistral4ForCausalLM adds no load-balancing loss
    ),
)
