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
  (``transformers_attention``), each of their linear layers run by fastlm as one fused LoRA
  Function while it runs (a 4-bit weight dequantised inside it), the two RMSNorms inside them
  fastlm's kernel; ``fused_report`` lists the linears fused and the attention as
  transformers' forward. The default
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
``Mistral4ForCausalLM`` (``causal_lm_class``), and so must whoever reloads a merged folder.
GGUF: llama.cpp's mistral4 (its deepseek2 graph), kv_b_proj split into the absorbed MLA's k_b and
v_b, each 3-D experts parameter into per-projection stacks (``fastlm/export/gguf_mistral4.py``).
llama.cpp hard-codes what some configs set otherwise (YaRN's mscales, the latent norms' ε, no
attention biases, "lite" DeepSeek models by their layer count): the gguf_checks below refuse them.
"""

from fastlm.models.gguf_limits import USE_MERGED, rope_parameters
from fastlm.models.spec import ArchitectureSpec, ExpertGroups, MixtureOfExperts

# transformers' q_a_layernorm and kv_a_layernorm: Mistral4RMSNorm's default ε, whatever the
# config says; llama.cpp's deepseek2 normalises them with the file's rms_norm_eps.
LATENT_NORM_EPS = 1e-6
# llama.cpp's deepseek2 loader takes these models for DeepSeek-V2-Lite-style ones (q_proj, no q
# latent) by their size alone: 26 or 27 layers, or 48 with a 128256-token vocabulary.
LLAMA_CPP_LITE_LAYERS = (26, 27)
LLAMA_CPP_LITE_48_VOCAB = 128256


def _yarn_as_llama_cpp(config) -> None:
    """YaRN with mscale = mscale_all_dim = 1 and no attention_factor: llama.cpp's mistral4
    assumes both are 1 (its attention scale is (1 + 0.1·ln factor)² / √(N + R), its RoPE
    unscaled), and rounds the correction range outward (transformers' truncate=True)."""
    rope = rope_parameters(config)
    rope_type = rope.get("rope_type", "default")
    if rope_type != "yarn":
        raise NotImplementedError(
            f"Mistral 4 RoPE type {rope_type!r} is not exported to GGUF: fastlm writes Mistral 4's "
            "YaRN only; " + USE_MERGED
        )
    used = {k: rope.get(k) for k in ("mscale", "mscale_all_dim")}
    if used != {"mscale": 1.0, "mscale_all_dim": 1.0} or rope.get("attention_factor") is not None:
        raise NotImplementedError(
            f"Mistral 4 YaRN with {used}, attention_factor={rope.get('attention_factor')} is not "
            "exported to GGUF: llama.cpp's mistral4 takes mscale = mscale_all_dim = 1 and derives "
            "its attention factor from the scaling factor alone; " + USE_MERGED
        )
    if not rope.get("truncate", True):
        raise NotImplementedError(
            "Mistral 4 YaRN with truncate=False is not exported to GGUF: llama.cpp rounds the "
            "correction range to whole dims (truncate=True); " + USE_MERGED
        )


def _attention_as_llama_cpp(config) -> None:
    """No attention biases, the latent norms' ε as the other norms', and a layer count that
    llama.cpp's loader does not take for a DeepSeek-V2-Lite (which has no q latent)."""
    if config.attention_bias:
        raise NotImplementedError(
            "Mistral 4 with attention_bias=True is not exported to GGUF: llama.cpp's mistral4 "
            "loads no attention biases (the file would not load); " + USE_MERGED
        )
    if config.rms_norm_eps != LATENT_NORM_EPS:
        raise NotImplementedError(
            f"Mistral 4 with rms_norm_eps={config.rms_norm_eps} is not exported to GGUF: "
            f"transformers normalises the q and kv latents with ε={LATENT_NORM_EPS}, llama.cpp "
            "with rms_norm_eps; " + USE_MERGED
        )
    lite = config.num_hidden_layers in LLAMA_CPP_LITE_LAYERS or (
        config.num_hidden_layers == 48 and config.vocab_size == LLAMA_CPP_LITE_48_VOCAB
    )
    if lite and config.q_lora_rank:
        raise NotImplementedError(
            f"Mistral 4 with {config.num_hidden_layers} layers and q_lora_rank="
            f"{config.q_lora_rank} is not exported to GGUF: llama.cpp takes a model of that size "
            "for a DeepSeek-V2-Lite without a q latent and would not load the file; " + USE_MERGED
        )


def _routing_as_llama_cpp(config) -> None:
    """The top k fit in the kept groups: beyond them both would fill it with experts of the
    dropped groups by breaking ties (transformers zeroes their scores, llama.cpp sets -inf), in
    no defined order."""
    groups, kept = config.n_group or 1, config.topk_group or 1
    in_kept = kept * (config.n_routed_experts // groups)
    if config.num_experts_per_tok > in_kept:
        raise NotImplementedError(
            f"Mistral 4 with num_experts_per_tok={config.num_experts_per_tok} > the {in_kept} "
            f"experts of its topk_group={kept} groups is not exported to GGUF: transformers and "
            "llama.cpp would fill the top k from the dropped groups by ties, in no defined "
            "order; " + USE_MERGED
        )


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
    gguf_arch="MISTRAL4",
    gguf_checks=(_yarn_as_llama_cpp, _attention_as_llama_cpp, _routing_as_llama_cpp),
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
