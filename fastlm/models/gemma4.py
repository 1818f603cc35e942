"""Gemma 4 text: w·x̂ norms, GeGLU, q/k norm, a weightless v norm, k = v, KV sharing, and the
mixture-of-experts block beside the dense MLP (``enable_moe_block``).

What differs from Gemma 3, and where fastlm's shared path takes it from the spec:
- RMSNorm is ``w·x̂`` (offset 0, not Gemma 3's ``1 + w``); v's norm has no weight (``y = x̂``).
- Per-layer attention shapes: full layers have their own head_dim and kv heads (the modules
  hold them); full layers with ``attention_k_eq_v`` have no v_proj, and v is k_proj's output
  before k's norm and RoPE (``key_is_value_attr``).
- The last ``num_kv_shared_layers`` layers have no k/v projections: they read the K/V that the
  last earlier layer of their type stored (``kv_sharing``); their MLP may be double-wide
  (only a size).
- Attention scaling is 1.0 (the module's ``scaling``); full layers use proportional RoPE (a
  cos/sin table of the whole head_dim, identity on the unrotated part: transformers' rotary
  module computes it).
- The MoE block (``enable_moe_block``, ``moe``) is no module of its own: the decoder layer owns
  a ``router`` and ``experts`` and runs them *beside* the dense MLP,

      out = post_ff(post_ff_1(mlp(pre_ff(x))) + post_ff_2(experts(pre_ff_2(x), idx, w)))

  where the router reads the residual x itself: RMS-normalised without a scale, × ``scale`` ×
  H^-1/2, projected to E logits, softmax (fp32), top-k (``top_k_experts``), renormalised, ×
  ``per_expert_scale`` of each chosen expert. The experts are GeGLU (the config's
  ``hidden_activation``), stored (E, 2·I, H) gate then up, and (E, H, I). fastlm patches only
  the layer's experts call (``MixtureOfExperts.patched="experts"``): it runs as grouped GEMMs
  with LoRA through PEFT's ``target_parameters`` (``moe.py``); the layer's forward and the
  router stay transformers' (the RMSNorms in and around them run fastlm's kernel and the dense
  MLP the fused LoRA MLP, as on a dense layer). Replacing the call alone keeps the layer's
  arithmetic out of fastlm (nothing of it is copied), and the router's gradient (its proj,
  ``scale`` and ``per_expert_scale``) flows through the routing weights w into the grouped
  experts. Gemma 4 has no load-balancing loss:
  its causal-LM forward adds none (``output_router_logits`` records the router's
  probabilities, returned as they are), so fastlm adds none (``aux_loss_coef_attr`` None).
The embedding scaling, the per-layer inputs (their gate and projection), ``layer_scalar``, the
masks and the final-logit soft-cap's config value stay transformers'. The multimodal model is
refused at load. GGUF (``fastlm.export.gguf_gemma4``): llama.cpp's gemma4 runs the dense and the
MoE variant; its routing (softmax, top-k, renormalised, × per-expert scale) is transformers'
hard-coded arithmetic on both sides, so only what a config can change is checked here (the
``gguf_checks``: KV-sharing layout, RoPE types, shapes, the GELU).
"""

from fastlm.models.gguf_limits import rope_parameters
from fastlm.models.spec import ArchitectureSpec, KVSharing, MixtureOfExperts


def _gelu_as_llama_cpp(config) -> None:
    """llama.cpp's gemma4 runs GELU with the tanh approximation in the MLP and the experts."""
    if config.hidden_activation != "gelu_pytorch_tanh":
        raise NotImplementedError(
            f"Gemma 4 GGUF: hidden_activation={config.hidden_activation!r}, but llama.cpp's "
            "gemma4 runs 'gelu_pytorch_tanh' in the MLP and the experts. Export merged_16bit "
            "instead."
        )


def _kv_sharing_as_llama_cpp(config) -> None:
    """llama.cpp's KV-shared layers read fixed layers: sliding ones layer n - 2, full ones layer
    n - 1 (n = the first shared layer); transformers' read the last earlier layer of their type."""
    shared = config.num_kv_shared_layers or 0
    if not shared:
        return
    types = list(config.layer_types)
    first = len(types) - shared
    fixed = {"sliding_attention": first - 2, "full_attention": first - 1}
    for layer_type in sorted(set(types[first:])):
        source = max(i for i in range(first) if types[i] == layer_type)
        if source != fixed[layer_type]:
            raise NotImplementedError(
                f"Gemma 4 GGUF: llama.cpp's KV-shared {layer_type} layers read layer "
                f"{fixed[layer_type]}'s K/V, transformers' read layer {source}'s (layer_types "
                f"{types}, num_kv_shared_layers={shared}); llama.cpp runs only a last unshared "
                "layer that is full after one that is sliding. Export merged_16bit instead."
            )


def _rope_as_llama_cpp(config) -> None:
    """Sliding layers: plain RoPE; full layers: plain or proportional (written as rope_freqs)."""
    rope = rope_parameters(config)
    sliding = rope.get("sliding_attention", {}).get("rope_type", "default")
    full = rope.get("full_attention", {}).get("rope_type", "default")
    if sliding != "default" or full not in ("default", "proportional"):
        raise NotImplementedError(
            f"Gemma 4 GGUF: RoPE types sliding={sliding!r}, full={full!r} are not exported "
            "(llama.cpp's gemma4 runs default sliding and default or proportional full RoPE)."
        )


def _shapes_as_llama_cpp(config) -> None:
    """One head_dim per layer type, a causal text model, no biases, a full per-layer vocabulary:
    what llama.cpp's gemma4 has keys and tensors for."""
    problems = []
    for layer_type in sorted(set(config.layer_types)):
        dims = {
            config.per_layer_config[i].head_dim
            for i, t in enumerate(config.layer_types)
            if t == layer_type
        }
        if len(dims) > 1:
            problems.append(f"{layer_type} layers with head_dims {sorted(dims)}")
    if getattr(config, "use_bidirectional_attention", None) == "all":
        problems.append("use_bidirectional_attention='all'")
    if getattr(config, "attention_bias", False):
        problems.append("attention_bias=True")
    per_layer_vocab = getattr(config, "vocab_size_per_layer_input", config.vocab_size)
    if config.hidden_size_per_layer_input and per_layer_vocab != config.vocab_size:
        problems.append(
            f"vocab_size_per_layer_input={per_layer_vocab} != vocab_size={config.vocab_size}"
        )
    if problems:
        raise NotImplementedError(
            f"Gemma 4 GGUF: llama.cpp's gemma4 cannot run {'; '.join(problems)}. "
            "Export merged_16bit instead."
        )


GEMMA4_TEXT = ArchitectureSpec(
    model_type="gemma4_text",
    family="Gemma 4 (text)",
    norm_class="Gemma4RMSNorm",
    attention_class="Gemma4TextAttention",
    mlp_class="Gemma4TextMLP",
    norm_offset=0.0,
    activation="geglu",
    activation_config_attr="hidden_activation",
    activation_config_values=("gelu_pytorch_tanh",),
    gguf_arch="GEMMA4",
    qk_norm=True,
    v_norm=True,
    key_is_value_attr="use_alternative_attention",
    kv_sharing=KVSharing(
        reuse_attr="is_kv_shared_layer",
        store_attr="store_full_length_kv",
        key_attr="layer_type",
        states_kwarg="shared_kv_states",
    ),
    moe=MixtureOfExperts(
        block_class="Gemma4TextDecoderLayer",  # owns router and experts where enable_moe_block
        router_class="Gemma4TextRouter",  # transformers' own runs (patched="experts")
        experts_class="Gemma4TextExperts",
        router_attr="router",
        experts_attr="experts",
        patched="experts",
        experts_per_token_attr="top_k_experts",
        aux_loss_coef_attr=None,  # no load-balancing loss in Gemma 4's causal-LM forward
    ),
    final_logit_softcap_attr="final_logit_softcapping",
    gguf_checks=(
        _gelu_as_llama_cpp,
        _kv_sharing_as_llama_cpp,
        _rope_as_llama_cpp,
        _shapes_as_llama_cpp,
    ),
)
