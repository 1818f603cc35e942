"""What distinguishes one decoder architecture from another, as data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# A check on a transformers config: raises NotImplementedError (saying what to change) for a
# config the target format would run differently from transformers; returns None otherwise.
ConfigCheck = Callable[[Any], None]


@dataclass(frozen=True)
class PromptStyle:
    """How a model family's card says to prefix queries and documents for embeddings.

    Usage: ``style.query_prompt("retrieve code")`` -> ``"Instruct: retrieve code\\nQuery:"``.
    """

    query_template: str  # with a "{task}" placeholder
    default_task: str
    document_prompt: str

    def query_prompt(self, task: str | None = None) -> str:
        """The query prefix for ``task`` (the card's default task when None)."""
        return self.query_template.format(task=task or self.default_task)


@dataclass(frozen=True)
class KVSharing:
    """Attention layers that reuse the K/V an earlier layer computed (Gemma 4's last layers).

    A reusing layer (``reuse_attr`` true) has no k/v projections or norms: it reads its (B, Hk, S,
    D) K and V from the dict passed as ``states_kwarg``, at ``getattr(module, key_attr)``; the
    storing layer (``store_attr`` true) writes its K and V there after its own cache update. The
    dict itself, and which layer stores for which, stay the model's.
    """

    reuse_attr: str  # module attribute, true on a layer that reads stored K/V
    store_attr: str  # module attribute, true on a layer whose K/V later layers read
    key_attr: str  # module attribute naming the slot (Gemma 4: the layer type)
    states_kwarg: str  # the attention forward's keyword that carries the dict


@dataclass(frozen=True)
class LinearAttention:
    """Gated DeltaNet linear-attention layers (Qwen3.5's ``linear_attention`` layer type).

    The module (``module_class``) projects its input with ``input_projections`` (one input: run
    as one fused LoRA group), mixes tokens by a causal depthwise conv and the gated delta rule
    with a gated RMSNorm (``linear_attention.py``), and projects back with
    ``output_projection``.
    """

    module_class: str
    input_projections: tuple[str, ...] = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")
    output_projection: str = "out_proj"


@dataclass(frozen=True)
class AttentionTemperature:
    """Per-position query scaling on the layers without RoPE (Llama 4's
    ``attn_temperature_tuning``, arXiv 2501.19399): the query at position t is multiplied by

        1 + attn_scale · log(1 + floor((t + 1) / floor_scale))

    with t counted as transformers counts it, arange(S) + the tokens already in the layer's
    cache (not the position_ids). ``enabled_attr``, ``floor_scale_attr`` and ``scale_attr`` are
    attention-module attributes; a layer whose ``enabled_attr`` is false scales nothing.
    """

    enabled_attr: str = "attn_temperature_tuning"
    floor_scale_attr: str = "floor_scale"
    scale_attr: str = "attn_scale"


@dataclass(frozen=True)
class ExpertGroups:
    """Group-limited expert selection (Mistral 4's router, DeepSeek's "group-limited greedy").

    The E experts form G equal groups of consecutive experts (G: the router's
    ``num_groups_attr``). With p the per-expert scores (N, E): each group's score is the sum of
    its ``group_score_top`` largest p; the router keeps the ``kept_groups_attr`` best groups,
    zeroes p outside them, and takes the top_k experts of what is left; the weights are p of
    those experts (not the zeroed copy), normalised and scaled as ``MixtureOfExperts`` says.
    """

    num_groups_attr: str = "num_group"  # router module attribute: G
    kept_groups_attr: str = "topk_group"  # router module attribute: groups kept per token
    group_score_top: int = 2  # a group scores the sum of its this many best expert scores


@dataclass(frozen=True)
class MixtureOfExperts:
    """A sparse mixture-of-experts block in place of (or beside) the MLP (Qwen3-MoE's,
    Qwen3.5-MoE's, gpt-oss's, Gemma 4's, Llama 4's, Mistral 4's).

    Per token x: the router's logits z = x R^T + b (E experts; b where the router has a bias).
    ``scoring`` "softmax": p = softmax(z), the top_k experts by p, their weights w = p[top]
    (divided by their sum + ``normalize_epsilon`` as ``normalize_top_k`` says), × the router's
    ``routed_scaling_attr`` where named (Mistral 4); with ``expert_groups`` the top_k are chosen
    among the experts of the best groups only (``ExpertGroups``, Mistral 4). ``scoring``
    "topk_softmax" (gpt-oss): the top_k experts by z, w = softmax(z[top]) over those k alone.
    ``scoring`` "topk_sigmoid" (Llama 4): the top_k experts by z, w = sigmoid(z[top]), each on
    its own (no sum to 1). out = sum over the top_k of w_e · expert_e(x), or of expert_e(w_e · x)
    where ``routing_weight_on`` is "input" (Llama 4 scales what enters the expert, and with the
    nonlinear expert that is another function), expert_e(x) = down_e(act(gate_e(x), up_e(x)))
    (+ each projection's bias b_e where ``gate_up_bias`` / ``down_bias`` name one).

    The experts' weights are 3-D parameters of the experts module, stored per ``experts_layout``:
    "out_in" (Qwen): ``gate_up`` (E, 2·I, H) and ``down`` (E, H, I), each (out, in) per expert;
    "in_out" (gpt-oss, Llama 4): ``gate_up`` (E, H, 2·I) and ``down`` (E, I, H), y = x W_e. The
    2·I gate_up outputs are gate then up (I each), or interleaved gate, up, gate, up... where
    ``gate_up_interleaved``. act is the spec's gated activation, or ``activation`` with the
    experts-module attributes ``activation_attrs`` as keyword arguments (gpt-oss:
    "clamped_swiglu" with alpha and limit, ``moe.clamped_swiglu``).

    Where the block has a shared expert (``shared_expert_attr``, a dense MLP of the spec's
    ``mlp_class`` that every token goes through), out += s(x) · shared(x), s(x) = sigmoid(x G^T)
    from the (H -> 1) linear ``shared_expert_gate_attr`` (1 without one: Llama 4, Mistral 4).
    Training adds ``aux_loss_coef_attr`` × the load-balancing loss (``moe.py``) over every
    router's logits z when the config's ``output_router_logits`` is on, where the family has that
    loss (``aux_loss_coef_attr`` None: it has none, Gemma 4, Llama 4, Mistral 4). fastlm's router
    and block forwards read these facts; the experts run grouped (``moe.py``).

    ``patched`` says how much of the block fastlm runs. "block": the block module is the MoE
    block alone, and fastlm's block forward runs it (router, grouped experts, shared expert).
    "experts": the block is a module that calls ``experts(x, top_k_index, top_k_weights)`` itself
    amid other work (Gemma 4's decoder layer, which also runs a dense MLP beside the experts and
    feeds the router another input than the experts): its own forward and its router stay
    transformers', and only that experts call runs grouped. The scoring facts above are then
    unused (the model's router computes w) and there is no shared expert. A ``block_class``
    module without the ``experts_attr`` attribute is not a MoE block (Gemma 4's layers when
    ``enable_moe_block`` is off): it is left alone.
    """

    block_class: str  # the MoE block module (it holds the router and the experts)
    router_class: str
    experts_class: str
    router_attr: str = "gate"  # the block's router module
    experts_attr: str = "experts"  # the block's experts module
    # "softmax" (over all experts, then top-k), "topk_softmax" or "topk_sigmoid" (top-k logits,
    # then softmax over those k / sigmoid of each)
    scoring: str = "softmax"
    top_k_attr: str = "top_k"  # router module attribute: experts per token
    # Renormalise the top-k weights: a router module attribute that says whether (Qwen3-MoE's
    # norm_topk_prob), or True / False where the router always / never does (Qwen3.5-MoE: True).
    normalize_top_k: str | bool = "norm_topk_prob"
    normalize_epsilon: float = 0.0  # added to the sum the weights are divided by (Mistral 4)
    routed_scaling_attr: str | None = None  # router module attribute: the weights' final factor
    # "softmax" scoring in fp32 (Qwen: softmax(z, dtype=float32)), or in the logits' own dtype
    # (Mistral 4: z.softmax(-1)); the weights end in the logits' dtype either way.
    scores_in_fp32: bool = True
    expert_groups: ExpertGroups | None = None  # group-limited top-k (Mistral 4)
    # "output": w_e · expert_e(x) (most families); "input": expert_e(w_e · x) (Llama 4)
    routing_weight_on: str = "output"
    # Where the router's output tuple holds the logits: the index transformers' output recorder
    # reads (its OutputRecorder(router_class, index=...)), so that output_router_logits records
    # the logits from fastlm's router too. 0: (logits, weights, experts), Qwen; 1: (weights,
    # logits, experts), Llama 4, whose router returns (scores, logits).
    router_logits_index: int = 0
    gate_up: str = "gate_up_proj"  # experts parameter (E, 2·I, H), or (E, H, 2·I) "in_out"
    down: str = "down_proj"  # experts parameter (E, H, I), or (E, I, H) "in_out"
    experts_layout: str = "out_in"  # "out_in": W_e is (out, in); "in_out": (in, out)
    gate_up_bias: str | None = None  # experts parameter (E, 2·I), added to each routed row
    down_bias: str | None = None  # experts parameter (E, H)
    gate_up_interleaved: bool = False  # gate_up's outputs alternate gate, up (gpt-oss)
    activation: str | None = None  # the experts' gated activation; None: the spec's
    activation_attrs: tuple[str, ...] = ()  # experts-module attributes it takes as keywords
    # The block returns (hidden states, router scores (N, k)) instead of the hidden states
    # alone: what the decoder layer unpacks (gpt-oss's GptOssMLP).
    returns_router_scores: bool = False
    # The block returns (hidden states, router logits (N, E)): Llama 4's Llama4TextMoe, whose
    # decoder layer drops the second.
    returns_router_logits: bool = False
    shared_expert_attr: str | None = None  # the block's shared expert (an mlp_class module)
    shared_expert_gate_attr: str | None = None  # the block's (H -> 1) linear gating it
    patched: str = "block"  # "block": fastlm's block forward; "experts": the experts call only
    num_experts_attr: str = "num_experts"  # config attribute
    experts_per_token_attr: str = "num_experts_per_tok"  # config attribute
    # Config attribute with the load-balancing loss coefficient; None: the family has no such
    # loss (its causal-LM forward adds none), so fastlm adds none either.
    aux_loss_coef_attr: str | None = "router_aux_loss_coef"

    def __post_init__(self) -> None:
        if self.scoring not in ("softmax", "topk_softmax", "topk_sigmoid"):
            raise ValueError(
                f"MixtureOfExperts scoring {self.scoring!r}: fastlm has 'softmax', "
                "'topk_softmax', 'topk_sigmoid'"
            )
        if self.scoring != "softmax" and self.normalize_top_k is not False:
            raise ValueError(
                f"MixtureOfExperts: {self.scoring!r} weights are not renormalised "
                "(normalize_top_k=False)"
            )
        if self.scoring != "softmax" and self.expert_groups is not None:
            raise ValueError("MixtureOfExperts: expert_groups select over softmax scores")
        if self.routing_weight_on not in ("output", "input"):
            raise ValueError(
                f"MixtureOfExperts routing_weight_on {self.routing_weight_on!r}: "
                "'output' or 'input'"
            )
        if self.router_logits_index not in (0, 1):
            raise ValueError("MixtureOfExperts router_logits_index: 0 or 1")
        if self.returns_router_scores and self.returns_router_logits:
            raise ValueError("MixtureOfExperts: the block returns router scores or logits")
        if self.experts_layout not in ("out_in", "in_out"):
            raise ValueError(
                f"MixtureOfExperts experts_layout {self.experts_layout!r}: 'out_in' or 'in_out'"
            )
        if self.activation_attrs and not self.activation:
            raise ValueError("MixtureOfExperts: activation_attrs without an activation")
        if self.shared_expert_gate_attr and not self.shared_expert_attr:
            raise ValueError("MixtureOfExperts: a shared_expert_gate_attr without a shared expert")
        if self.patched not in ("block", "experts"):
            raise ValueError(f"MixtureOfExperts patched {self.patched!r}: 'block' or 'experts'")
        returns = self.returns_router_scores or self.returns_router_logits
        if self.patched == "experts" and (self.shared_expert_attr or returns):
            raise ValueError(
                "MixtureOfExperts: patched='experts' runs the block's own forward, so fastlm adds "
                "no shared expert and returns no router scores"
            )


@dataclass(frozen=True)
class ArchitectureSpec:
    """Every fact fastlm needs about a decoder family: patching, GGUF export, embeddings.

    Modules are recognised by class name, so a spec never copies a model's forward.
    """

    model_type: str  # config.model_type
    family: str  # human name, used in messages
    norm_class: str  # RMSNorm class name
    attention_class: str
    mlp_class: str | None  # the dense MLP; None where every layer's is a MoE block (gpt-oss)
    norm_offset: float  # 0.0: y = w·x̂ (Llama, Gemma 4); 1.0: y = (1 + w)·x̂ (Gemma 1-3)
    activation: str  # "swiglu" (SiLU-gated) or "geglu" (tanh-GELU-gated)
    activation_config_attr: str  # config attribute that names the activation
    activation_config_values: tuple[str, ...]  # values of it this spec implements
    # GGUF: the gguf.MODEL_ARCH member llama.cpp runs the family as. llama.cpp's RMSNorm scales by
    # w alone, so a norm_offset family's norm weights are stored as norm_offset + w. None: GGUF
    # export refuses the family: llama.cpp has no arch for it (EmbeddingGemma 2), or fastlm's writer
    # has no layout for its tensors yet (Qwen3-MoE's 3-D experts).
    gguf_arch: str | None
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Gemma 3, Qwen3)
    v_norm: bool = False  # per-head RMSNorm on v (Gemma 4's has no weight: y = x̂)
    # Module attribute, true on a layer with no v_proj whose v is k_proj's output, taken before
    # k's norm and RoPE (Gemma 4's full layers with attention_k_eq_v).
    key_is_value_attr: str | None = None
    kv_sharing: KVSharing | None = None  # layers that reuse an earlier layer's K/V
    # q_proj yields per head [query | gate] (2·head_dim); the attention output is multiplied by
    # sigmoid(gate) before o_proj (Qwen3.5's full-attention layers).
    attention_output_gate: bool = False
    # Module attribute with per-head learned attention sinks (gpt-oss): one extra logit per head
    # in each query's softmax, with no value. Passed to the attention function as ``s_aux``, as
    # transformers does; fastlm's flash kernel takes them (forward and their gradient).
    attention_sinks_attr: str | None = None
    # The rotary tables hold one entry per rotated pair (D/2 wide, gpt-oss) instead of the
    # rotate_half layout's D with equal halves; the pairs (i, i + D/2) are the same.
    rope_half_tables: bool = False
    # RoPE rotates the interleaved pairs (2i, 2i + 1) of each head by one complex table freqs_cis
    # (B, S, D/2) that the model passes as its position embeddings (Llama 4), not the pairs
    # (i, i + D/2) by (cos, sin). fastlm moves each q and k head's even dims before its odd ones
    # and runs its RoPE kernel with cos, sin = Re, Im of the table: one permutation of both q's
    # and k's dims leaves every q·k, hence the attention, unchanged (v is not moved), so the
    # rotated q, k stay in that order (the KV cache holds k so).
    rope_interleaved: bool = False
    # Module attribute, false on a layer without RoPE (Llama 4's NoPE layers: no_rope_layers).
    rope_layer_attr: str | None = None
    # Module attribute holding a weightless RMS norm, x · rsqrt(mean(x²) + eps), that q and k go
    # through *after* RoPE on the layers that have it (Llama 4's L2 norm: its RoPE layers when
    # use_qk_norm). Where qk_norm (before RoPE, with weights) is another family's.
    qk_norm_after_rope_attr: str | None = None
    attention_temperature: AttentionTemperature | None = None  # on the layers without RoPE
    # Config attribute with the chunk size of the "chunked_attention" layers of config.layer_types
    # (Llama 4's attention_chunk_size): their mask (transformers') keeps each query within its
    # chunk of the sequence; past one chunk the flash kernel's packed launch runs the chunks as
    # sequences of their own (attention.CHUNK_KWARG); fused_report says so.
    attention_chunk_attr: str | None = None
    # Why the attention modules run transformers' own forward (Mistral 4's multi-head latent
    # attention: latent q/kv projections and a partly rotated head, which fastlm's patched
    # attention does not compute): LoRA on their linears is PEFT's, the norms inside them
    # fastlm's kernel, and fused_report lists each linear unfused with this reason.
    transformers_attention: str | None = None
    # Default LoRA target names where not the seven PROJECTIONS (Mistral 4: its MLA linears; a
    # name no layer has is skipped by PEFT, so alternatives of one config can be listed).
    lora_targets: tuple[str, ...] | None = None
    # The transformers class that loads the causal LM where AutoModelForCausalLM has no entry
    # for model_type (transformers 5.23 maps mistral4 to Mistral4ForCausalLM for pretraining and
    # image-text-to-text, not for causal LM); None: AutoModelForCausalLM.
    causal_lm_class: str | None = None
    linear_attention: LinearAttention | None = None  # linear-attention layers beside attention
    moe: MixtureOfExperts | None = None  # sparse MoE blocks in place of (some) MLPs, or beside them
    attention_softcap_attr: str | None = None  # module attribute with attention-logit soft-cap
    final_logit_softcap_attr: str | None = None  # config attribute with final-logit soft-cap
    # Configs fastlm cannot patch exactly, refused when the model is loaded: each raises
    # UnsupportedArchitectureError saying what is not supported, else returns None.
    load_checks: tuple[Callable[[Any], None], ...] = ()
    # Configs that gguf_arch cannot represent, refused before a GGUF export (in this order).
    gguf_checks: tuple[ConfigCheck, ...] = ()
    # Embeddings: the default pooling of a body of this family, the card's query/document
    # prefixes, and the config flag that makes the decoder attend both ways (an encoder).
    embedding_pooling: str = "mean"
    prompt_style: PromptStyle | None = None
    bidirectional_attention_attr: str | None = None
    # Config attribute with the width of the body's last_hidden_state where it is not
    # hidden_size: EmbeddingGemma 2 projects its final states to embedding_dim inside its forward,
    # and Sentence-Transformers' pooling is told that width.
    output_width_attr: str | None = None
    # An encoder with no causal-LM class (EmbeddingGemma 2): loaded only as an embedding body.
    embedding_only: bool = False
    # Linear layers outside the attention and MLP modules that run transformers' (or PEFT's) own
    # forward, as (attribute name, why): fused_report lists each as unfused with that reason, so
    # that a LoRA on them (or their cost) is not silent. Attribute names, not classes: they are
    # plain nn.Linear (EmbeddingGemma 2's per-layer-input block and embedding projection).
    transformers_linears: tuple[tuple[str, str], ...] = ()

    @property
    def layers_need_bounds(self) -> bool:
        """Whether packed sequences must reach the layers as cu_seq_lens keywords: layers that
        place or mix tokens by position but to which transformers' decoder layer does not hand
        position_ids (Llama 4's chunked and NoPE attention, Qwen3.5's linear attention)."""
        chunked = self.attention_chunk_attr is not None or self.attention_temperature is not None
        return chunked or self.linear_attention is not None


# The projections fastlm's patched attention and MLP forwards compute (and read directly), in the
# order LoRA targets them by default. Every family so far names them alike. A MoE block's experts
# hold 3-D parameters instead, which PEFT targets with target_parameters (``MixtureOfExperts``).
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
