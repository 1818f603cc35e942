"""Tiny, odd-sized models and tokenizers, built locally (no hub), and helpers to compare them."""

from __future__ import annotations

import copy
import string

import torch
from transformers import (
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

try:  # transformers >= 5.23 (gemma4); without it the Gemma 4 tests are skipped
    from transformers import Gemma4TextConfig
except ImportError:  # pragma: no cover
    Gemma4TextConfig = None
try:  # transformers >= 5.23 (embedding_gemma2); without it its tests are skipped
    from transformers import EmbeddingGemma2TextConfig
except ImportError:  # pragma: no cover
    EmbeddingGemma2TextConfig = None
try:  # transformers with qwen3_moe's fused 3-D experts (5.x); without it the MoE tests skip
    from transformers import Qwen3MoeConfig
except ImportError:  # pragma: no cover
    Qwen3MoeConfig = None
try:  # transformers with gpt_oss; without it the gpt-oss tests are skipped
    from transformers import GptOssConfig
except ImportError:  # pragma: no cover
    GptOssConfig = None
try:  # transformers with qwen3_5; without it the Qwen3.5 tests are skipped
    from transformers import Qwen3_5TextConfig
except ImportError:  # pragma: no cover
    Qwen3_5TextConfig = None
try:  # transformers with qwen3_5_moe; without it the Qwen3.5-MoE tests are skipped
    from transformers import Qwen3_5MoeTextConfig
except ImportError:  # pragma: no cover
    Qwen3_5MoeTextConfig = None
try:  # transformers with llama4; without it the Llama 4 tests are skipped
    from transformers import Llama4TextConfig
except ImportError:  # pragma: no cover
    Llama4TextConfig = None
try:  # transformers with mistral4; without it the Mistral 4 tests are skipped
    from transformers import Mistral4Config
except ImportError:  # pragma: no cover
    Mistral4Config = None

VOCAB = 131  # odd on purpose
# A tiny model's name that is not its model_type: Gemma 4 text ("gemma4_text") with its MoE block.
GEMMA4_TEXT_MOE = "gemma4_text_moe"
# Odd sizes shared by the Llama-shaped families (GQA 6/2, hidden 72, intermediate 100).
_LLAMA_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=72,
    intermediate_size=100,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
# The Gemma families: MQA 3/1, head_dim 24 (heads·head_dim = hidden), intermediate 90.
_GEMMA_LIKE = dict(
    _LLAMA_LIKE, intermediate_size=90, num_attention_heads=3, num_key_value_heads=1, head_dim=24
)
# Gemma 2 and 3: three layers (sliding and full), a window shorter than the test sequences so
# that it matters.
_GEMMA2_LIKE = dict(_GEMMA_LIKE, num_hidden_layers=3, query_pre_attn_scalar=24, sliding_window=4)
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
# Gemma 4 text: five layers, every kind present. Sliding layers have head_dim 24 and 2 kv heads,
# full layers 40 and 1 (per_layer_config); full layers have k = v (no v_proj). The last two
# layers reuse K/V (KV sharing: layer 3 reads what sliding layer 2 stored, layer 4 what full
# layer 1 stored) and have double-wide MLPs; per-layer inputs (width 10) gate every layer.
_GEMMA4_TEXT = dict(
    _LLAMA_LIKE,
    intermediate_size=90,
    num_hidden_layers=5,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,
    global_head_dim=40,
    num_global_key_value_heads=1,
    sliding_window=4,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"]
    + ["sliding_attention", "full_attention"],
    attention_k_eq_v=True,
    num_kv_shared_layers=2,
    use_double_wide_mlp=True,
    vocab_size_per_layer_input=VOCAB,
    hidden_size_per_layer_input=10,
    final_logit_softcapping=5.0,
    tie_word_embeddings=True,
)
# Gemma 4 text with the mixture-of-experts block (enable_moe_block): the five layers above, each
# with a router over 5 experts of width 27 (odd) that sends each token to 2 of them, beside the
# dense MLP. Gemma 4 has no aux loss (no coefficient in its config).
_GEMMA4_TEXT_MOE = dict(
    _GEMMA4_TEXT, enable_moe_block=True, num_experts=5, top_k_experts=2, moe_intermediate_size=27
)
# Qwen3.5 text: three layers, linear attention (Gated DeltaNet) around one full-attention layer.
# Full attention: 4 query heads over 2 kv heads of head_dim 24, q_proj twice as wide (query and
# output gate), RoPE on the first quarter (6 dims). Linear attention: 2 key heads of 12 and 4
# value heads of 10 (grouped values), conv kernel 4 (conv width 2·24 + 40 = 88).
_QWEN3_5_TEXT = dict(
    _LLAMA_LIKE,
    num_hidden_layers=3,
    num_attention_heads=4,
    head_dim=24,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=12,
    linear_value_head_dim=10,
    linear_conv_kernel_dim=4,
    layer_types=["linear_attention", "full_attention", "linear_attention"],
    tie_word_embeddings=False,
)
# Qwen3-MoE: three layers, the middle one a dense MLP (mlp_only_layers); the others route each
# token to 2 of 5 experts of width 27 (odd), renormalised top-k weights, aux loss on (its
# coefficient large enough that its gradient counts in the comparisons).
_QWEN3_MOE = dict(
    _LLAMA_LIKE,
    num_hidden_layers=3,
    num_attention_heads=4,
    head_dim=24,
    num_experts=5,
    num_experts_per_tok=2,
    moe_intermediate_size=27,
    mlp_only_layers=[1],
    norm_topk_prob=True,
    output_router_logits=True,
    router_aux_loss_coef=0.05,
    tie_word_embeddings=False,
)
# Qwen3.5-MoE text: Qwen3.5's three hybrid layers, each with a MoE block: 2 of 5 experts of
# width 27 per token (the router always renormalises), a shared expert of width 35 behind its
# sigmoid gate, aux loss on (coefficient 0.05, as Qwen3-MoE's). No dense intermediate_size.
_QWEN3_5_MOE_TEXT = dict(
    {k: v for k, v in _QWEN3_5_TEXT.items() if k != "intermediate_size"},
    num_experts=5,
    num_experts_per_tok=2,
    moe_intermediate_size=27,
    shared_expert_intermediate_size=35,
    output_router_logits=True,
    router_aux_loss_coef=0.05,
)
# gpt-oss: three layers, sliding (window 4), full, sliding; 4 query heads over 2 kv heads of
# head_dim 12 (heads·head_dim 48 ≠ hidden 40), biased q/k/v/o, learned sinks; each token routed
# to 2 of 5 experts of width 24 (biased, gate/up interleaved), YaRN RoPE, aux loss coefficient
# 0.05. swiglu_limit 1.0: the experts' gate/up values cross it (gpt_oss_extras), so both clamps
# act on some rows and not on others.
_GPT_OSS = dict(
    vocab_size=VOCAB,
    hidden_size=40,
    intermediate_size=24,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=12,
    sliding_window=4,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    num_local_experts=5,
    num_experts_per_tok=2,
    swiglu_limit=1.0,
    output_router_logits=True,
    router_aux_loss_coef=0.05,
    max_position_embeddings=256,
    rope_parameters={
        "rope_type": "yarn",
        "rope_theta": 150000.0,
        "factor": 4.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
        "original_max_position_embeddings": 64,
    },
    tie_word_embeddings=False,
)
# Llama 4 text: four layers. Layers 0, 1 and 3 rotate their heads' interleaved pairs, attend
# within chunks of 4 tokens (shorter than the test sequences) and L2-normalise q and k; layer 2
# is NoPE, with the attention temperature (floor_scale 3, attn_scale 0.5: it changes along the
# sequence). Layers 1 and 3 have a MoE block (interleave_moe_layer_step 2): 2 of 5 experts of
# width 27 per token and a shared expert of width 27; layers 0 and 2 a dense MLP of width 100.
# GQA 4/2, head_dim 24 (heads·head_dim 96 ≠ hidden 72), Llama 3 RoPE scaling. No aux loss.
_LLAMA4_TEXT = dict(
    _LLAMA_LIKE,
    num_hidden_layers=4,
    num_attention_heads=4,
    head_dim=24,
    intermediate_size=27,
    intermediate_size_mlp=100,
    num_local_experts=5,
    num_experts_per_tok=2,
    interleave_moe_layer_step=2,
    no_rope_layers=[1, 1, 0, 1],
    attention_chunk_size=4,
    use_qk_norm=True,
    attn_temperature_tuning=True,
    floor_scale=3,
    attn_scale=0.5,
    rope_parameters=_LLAMA3_ROPE,
    tie_word_embeddings=False,
)
# Mistral 4: three layers, the first dense (first_k_dense_replace 1, width 100), the others MoE
# blocks: 9 experts of width 27 in 3 groups of 3; each token's 2 best groups (a group scores its
# 2 best experts) give its 3 experts, weights renormalised and ×2.5; shared experts of width
# 2·27. Multi-head latent attention: 4 heads, q latent 20, kv latent 18, q·k heads of 12 + 8
# (rotated, interleaved) dims, v heads of 14; YaRN RoPE with the Llama 4 query scaling past
# original_max_position_embeddings 8 (inside the test sequences). No aux loss.
_MISTRAL4 = dict(
    vocab_size=VOCAB,
    hidden_size=72,
    intermediate_size=100,
    moe_intermediate_size=27,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=9,
    num_experts_per_tok=3,
    n_group=3,
    topk_group=2,
    n_shared_experts=2,
    first_k_dense_replace=1,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    q_lora_rank=20,
    kv_lora_rank=18,
    qk_rope_head_dim=8,
    qk_nope_head_dim=12,
    v_head_dim=14,
    max_position_embeddings=32,
    rope_parameters={
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 8,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale_all_dim": 1.0,
        "mscale": 1.0,
        "llama_4_scaling_beta": 0.1,
    },
    pad_token_id=0,
    tie_word_embeddings=False,
)
# EmbeddingGemma 2 text: four bidirectional layers, sliding and full alternating (the last must
# be full). Sliding layers: head_dim 24, 2 kv heads, symmetric window |i - j| <= 3 (shorter than
# the test texts); full layers: head_dim 40, 1 kv head. Per-layer inputs of width 10; the final
# states are projected to an embedding of 50.
_EMBEDDING_GEMMA2_TEXT = dict(
    _LLAMA_LIKE,
    intermediate_size=90,
    num_hidden_layers=4,
    num_attention_heads=4,
    head_dim=24,
    global_head_dim=40,
    num_global_key_value_heads=1,
    sliding_window=3,
    layer_types=["sliding_attention", "full_attention"] * 2,
    hidden_size_per_layer_input=10,
    embedding_dim=50,
)
# model_type: (config class, its arguments)
_CONFIGS = {
    "llama": (
        LlamaConfig,
        dict(
            _LLAMA_LIKE,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            rope_parameters=_LLAMA3_ROPE,
        ),
    ),
    "gemma3_text": (
        Gemma3TextConfig,
        dict(
            _GEMMA2_LIKE,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            final_logit_softcapping=None,
            tie_word_embeddings=True,
        ),
    ),
    "mistral": (MistralConfig, dict(_LLAMA_LIKE, sliding_window=4, tie_word_embeddings=False)),
    "qwen2": (Qwen2Config, dict(_LLAMA_LIKE, tie_word_embeddings=True)),
    # explicit head_dim: heads·head_dim (96) ≠ hidden (72)
    "qwen3": (
        Qwen3Config,
        dict(_LLAMA_LIKE, num_attention_heads=4, head_dim=24, tie_word_embeddings=False),
    ),
    "gemma": (GemmaConfig, dict(_GEMMA_LIKE, hidden_act="gelu_pytorch_tanh")),
    "gemma2": (
        Gemma2Config,
        dict(
            _GEMMA2_LIKE,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            attn_logit_softcapping=2.0,  # small, so that capping changes the scores
            final_logit_softcapping=3.0,
        ),
    ),
}
if Gemma4TextConfig is not None:
    _CONFIGS["gemma4_text"] = (Gemma4TextConfig, _GEMMA4_TEXT)
    _CONFIGS[GEMMA4_TEXT_MOE] = (Gemma4TextConfig, _GEMMA4_TEXT_MOE)  # model_type gemma4_text
if Qwen3_5TextConfig is not None:
    _CONFIGS["qwen3_5_text"] = (Qwen3_5TextConfig, _QWEN3_5_TEXT)
if Qwen3MoeConfig is not None:
    _CONFIGS["qwen3_moe"] = (Qwen3MoeConfig, _QWEN3_MOE)
if Qwen3_5MoeTextConfig is not None:
    _CONFIGS["qwen3_5_moe_text"] = (Qwen3_5MoeTextConfig, _QWEN3_5_MOE_TEXT)
if GptOssConfig is not None:
    _CONFIGS["gpt_oss"] = (GptOssConfig, _GPT_OSS)
if Llama4TextConfig is not None:
    _CONFIGS["llama4_text"] = (Llama4TextConfig, _LLAMA4_TEXT)
if Mistral4Config is not None:
    _CONFIGS["mistral4"] = (Mistral4Config, _MISTRAL4)
if EmbeddingGemma2TextConfig is not None:
    _CONFIGS["embedding_gemma2_text"] = (EmbeddingGemma2TextConfig, _EMBEDDING_GEMMA2_TEXT)
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def tiny_config(model_type: str, **overrides):
    """A 2–3 layer config with odd sizes (GQA, non-power-of-two dims); ``model_type`` is a
    config's model_type, or GEMMA4_TEXT_MOE."""
    if model_type not in _CONFIGS:
        raise ValueError(model_type)
    config_class, kwargs = _CONFIGS[model_type]
    config = config_class(**copy.deepcopy(kwargs))  # configs may edit the dicts they are given
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_batch(vocab: int = VOCAB, batch: int = 3, seq: int = 11, seed: int = 0):
    """Right-padded batch: rows of different lengths, mask and -100 labels on the padding."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    for row, length in enumerate([seq, seq - 3, seq - 6][:batch]):
        attention_mask[row, length:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _fast_tokenizer(backend, chat_template: str, **kwargs) -> PreTrainedTokenizerFast:
    """``backend`` as a transformers tokenizer with the <pad>/<bos>/<eos>/<unk> specials."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        **kwargs,
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer (fits VOCAB) with pad/bos/eos and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    chars = string.ascii_letters + string.digits + string.punctuation + " \n"
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for char in chars:
        vocab.setdefault(char, len(vocab))
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return _fast_tokenizer(backend, CHAT_TEMPLATE)


def bpe_tokenizer(
    merges: list[tuple[str, str]],
    specials: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>"),
    unk_token: str | None = "<unk>",
    chat_template: str = CHAT_TEMPLATE,
    **kwargs,
) -> PreTrainedTokenizerFast:
    """A tiny SentencePiece-style BPE (llama.cpp can load it): ``specials``, 256 byte tokens
    <0xNN> (byte fallback), ▁ + lowercase letters, then ``merges``; ``kwargs`` go to
    PreTrainedTokenizerFast (e.g. add_bos_token)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {token: index for index, token in enumerate(specials)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for char in "▁abcdefghijklmnopqrstuvwxyz":
        vocab[char] = len(vocab)
    for left, right in merges:
        vocab[left + right] = len(vocab)
    model = models.BPE(vocab=vocab, merges=merges, unk_token=unk_token, byte_fallback=True)
    backend = Tokenizer(model)
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return _fast_tokenizer(backend, chat_template, **kwargs)


def random_norms(model: torch.nn.Module) -> None:
    """Random (not unit) norm weights, so that the (1 + w) vs w offset matters in comparisons.
    BERT's LayerNorms keep theirs."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and "LayerNorm" not in name:
                param.normal_(0.0, 0.3)


def starve_expert(model: torch.nn.Module, expert: int, norm_offset: float = 0.0) -> None:
    """Make every MoE router of a tiny model (Qwen3-MoE's, Qwen3.5-MoE's, gpt-oss's, Llama 4's)
    skip ``expert`` on any
    batch, LoRA (B != 0) included: embedding column 0 is set to 0.3 (the other entries are
    ~0.02), so every token's state stays positive there through the layers (normalised: >= 1.5
    on tiny_batch); each router reads nothing from that column but for ``expert``, whose weight
    there is -8 / (the MoE input norm's scale there: its weight w, or 1 + w for a
    ``norm_offset`` 1 family): its logit is lower by >= 12 than without, the others' routing is
    untouched (a per-token positive scale does not reorder them). A router with a bias
    (gpt-oss's, whose token embeddings gpt_oss_extras scales up, so column 0 weighs less) also
    gets -8 on ``expert``'s bias."""
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 0.3
        for layer in model.model.layers:
            block = getattr(layer, "mlp", None) or layer.feed_forward  # Llama 4: feed_forward
            router = getattr(block, "gate", None) or getattr(block, "router", None)
            if router is not None and getattr(router, "weight", None) is not None:
                scale = norm_offset + layer.post_attention_layernorm.weight[0]
                router.weight[:, 0] = 0.0
                router.weight[expert, 0] = -8.0 / scale
                if getattr(router, "bias", None) is not None:
                    router.bias[expert] = -8.0


def gpt_oss_extras(model: torch.nn.Module) -> None:
    """What a freshly initialised tiny gpt-oss lacks for a test to see every term, and routing
    that spreads over the experts: its biases start at zero (attention, experts) or near it
    (router) and its sinks near zero. Here the sinks are drawn ~N(0, 1), attention biases
    ~N(0, 0.05), expert biases ~N(0, 0.1); the router (weight and bias) ×10 and the token
    embeddings ×6, so that routing depends on the token more than on the biases every token
    shares (each expert but the starved one gets tokens on tiny_batch); the experts' gate_up
    weights ×25, so that gate/up values (|.| ~ 0.7) cross swiglu_limit 1.0 on some rows."""
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(6.0)
        for name, param in model.named_parameters():
            if name.endswith("sinks"):
                param.normal_(0.0, 1.0)
            elif ".router." in name:
                param.mul_(10.0)
            elif name.endswith("bias"):  # q/k/v/o_proj.bias, experts' gate_up/down_proj_bias
                param.normal_(0.0, 0.05 if ".self_attn." in name else 0.1)
            elif name.endswith("experts.gate_up_proj"):
                param.mul_(25.0)


def gemma4_moe_extras(model: torch.nn.Module, starved: int) -> None:
    """Gemma 4's router (layer.router, reading the residual stream) starts with unit ``scale``
    and ``per_expert_scale`` and a near-uniform softmax: here both scales are drawn from
    U(0.5, 1.5) (so that a router reading the wrong input, or dropping a scale, shows), and the
    projection ×10, so that routing depends on the token and spreads over the experts. Then
    ``starved`` gets no token, as in starve_expert: embedding column 0 is 0.3 (the residual
    stream stays positive there through the layers), and each router reads nothing from it but
    for ``starved``, whose logit there is -8·x̂_0 (the router scales its normalised input by
    scale·H^-1/2, which the weight undoes)."""
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 0.3
        for layer in model.model.layers:
            router = layer.router
            router.scale.uniform_(0.5, 1.5)
            router.per_expert_scale.uniform_(0.5, 1.5)
            router.proj.weight.mul_(10.0)
            router.proj.weight[:, 0] = 0.0
            router.proj.weight[starved, 0] = -8.0 / (router.scale[0] * router.scalar_root_size)


def llama4_extras(model: torch.nn.Module) -> None:
    """Llama 4's router starts near zero (|logits| < 1: sigmoid weights 0.43 .. 0.68 on
    tiny_batch): ×30, which keeps the routing (the top k of the logits) and spreads the sigmoid
    weights over 0.2 .. 0.99; and its experts' weights ×10, so that the routed experts' output is
    of the residual stream's size, not 1e-3 of it. Then a weight applied to an expert's output
    instead of its input, or a softmax for the sigmoid, shows in the logits."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("feed_forward.router.weight"):
                param.mul_(30.0)
            elif name.endswith(("feed_forward.experts.gate_up_proj", "experts.down_proj")):
                param.mul_(10.0)


def mistral4_extras(model: torch.nn.Module, starved: int) -> None:
    """Mistral 4's experts start at N(0, 0.02), so that the routed experts' output is 1e-3 of the
    residual stream: ×10, so that what the router decides (the groups, the scaling) shows. And
    starve_expert made firmer: with LoRA (B != 0) on the dense MLP and the latent attention the
    residual stream grows and turned column 0 negative by layer 1 (the starved expert then got
    most tokens), so column 0 of the embeddings is 1.0 (it stays >= 0.5 through the layers) and
    the starved expert's router weight there ×10."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
                param.mul_(10.0)
            elif name.endswith("mlp.gate.weight"):
                param[starved, 0] *= 10.0
        model.get_input_embeddings().weight[:, 0] = 1.0


# MoE model_type -> its norm offset (starve_expert)
_MOE_NORM_OFFSETS = {
    "qwen3_moe": 0.0,
    "qwen3_5_moe_text": 1.0,
    "gpt_oss": 0.0,
    "llama4_text": 0.0,
    "mistral4": 0.0,
}
# model_type -> the class to build it with where AutoModelForCausalLM has none (transformers 5.23)
_CAUSAL_LM_CLASSES = {"mistral4": "Mistral4ForCausalLM"}


def save_tiny_model(model_type: str, path, seed: int = 0, **overrides):
    """Build a random tiny model in fp32, save it (with the tokenizer) and return the path."""
    import transformers

    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    if model_type in _CAUSAL_LM_CLASSES:
        model = getattr(transformers, _CAUSAL_LM_CLASSES[model_type])(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    random_norms(model)
    if model_type == "gpt_oss":
        gpt_oss_extras(model)
    if model_type in _MOE_NORM_OFFSETS:  # an expert without tokens, on any batch
        experts = getattr(model.config, "num_experts", None) or model.config.num_local_experts
        starve_expert(model, experts - 1, _MOE_NORM_OFFSETS[model_type])
    if model_type == "llama4_text":  # after starving: its -8 scales too, as the routing keeps
        llama4_extras(model)
    if model_type == "mistral4":  # after starving: it strengthens that
        mistral4_extras(model, starved=model.config.num_local_experts - 1)
    if model_type == GEMMA4_TEXT_MOE:  # its router is the layer's, with scales of its own
        gemma4_moe_extras(model, starved=model.config.num_experts - 1)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


# MXFP4, as the OCP Microscaling Formats (MX) v1.0 spec defines it: blocks of 32 FP4 E2M1
# elements sharing one E8M0 scale, a power of two stored as its exponent + 127.
MX_BLOCK = 32
E8M0_BIAS = 127
E2M1_EMAX = 2  # E2M1's largest exponent: its largest value is 6 = 1.5 · 2^2


def e2m1_value(code: int) -> float:
    """The value of a 4-bit E2M1 code: sign in bit 3, exponent in bits 2-1 (bias 1), mantissa in
    bit 0; exponent 0 is subnormal (0 and 0.5). Codes 0-7: 0, .5, 1, 1.5, 2, 3, 4, 6."""
    sign = -1.0 if code & 0b1000 else 1.0
    exponent, mantissa = (code >> 1) & 0b11, code & 1
    if exponent == 0:
        return sign * 0.5 * mantissa
    return sign * 2.0 ** (exponent - 1) * (1 + 0.5 * mantissa)


E2M1_VALUES = torch.tensor([e2m1_value(code) for code in range(16)])


def mxfp4_representable(shape, exponents: tuple[int, int], generator) -> torch.Tensor:
    """Random weights that MXFP4 holds exactly, in gpt-oss's (E, in, out) layout: random E2M1
    values, each block of 32 inputs times 2^e, e drawn from ``exponents`` (inclusive)."""
    experts, inputs, outputs = shape
    codes = torch.randint(0, 16, (experts, outputs, inputs), generator=generator)
    low, high = exponents
    blocks = (experts, outputs, inputs // MX_BLOCK)
    scales = torch.randint(low, high + 1, blocks, generator=generator).float()
    values = E2M1_VALUES[codes] * torch.exp2(scales).repeat_interleave(MX_BLOCK, -1)
    return values.transpose(1, 2).contiguous()


def mxfp4_encode(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(blocks, scales)`` of an exactly representable (E, in, out) experts weight, as OpenAI's
    checkpoints store it: per expert (out, in), blocks of 32 along ``in``. The block's scale is
    the spec's 2^X, X = floor(log2(max |v|)) - E2M1_EMAX, stored as X + 127 (uint8 (E, out,
    in/32)); its elements v / 2^X as E2M1 codes, two a byte, the first in the low nibble
    (uint8 (E, out, in/32, 16); the MX spec defines the codes, OpenAI's layout the packing).
    A value MXFP4 does not hold exactly raises ValueError."""
    experts, inputs, outputs = weight.shape
    rows = weight.transpose(1, 2).reshape(experts, outputs, inputs // MX_BLOCK, MX_BLOCK)
    largest = rows.abs().amax(-1)
    _, exponent = torch.frexp(largest)  # largest = m · 2^exponent, m in [0.5, 1)
    shared = torch.where(largest > 0, exponent - 1 - E2M1_EMAX, 0)
    elements = rows / torch.exp2(shared.float()).unsqueeze(-1)
    matches = elements.unsqueeze(-1) == E2M1_VALUES  # 0 matches +0 first
    if not matches.any(-1).all():
        raise ValueError("a weight MXFP4 does not hold exactly")
    codes = matches.to(torch.uint8).argmax(-1).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (shared + E8M0_BIAS).to(torch.uint8)


# What OpenAI's gpt-oss config.json says of its MXFP4 weights (only the experts are MXFP4).
MXFP4_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
}


def save_tiny_mxfp4_gpt_oss(path, seed: int = 0) -> tuple:
    """The tiny gpt-oss (save_tiny_model's) with MX-sized experts (hidden 96, intermediate 64:
    3 and 2 blocks of 32 inputs) saved as OpenAI ships gpt-oss: MXFP4 config, each experts
    weight as ``<name>_blocks`` / ``<name>_scales`` (mxfp4_encode), no floating-point copy.
    The weights are random MXFP4-exact ones about the tiny model's sizes (gate_up ~0.3, down
    ~0.02). Returns (path, {parameter name: the (E, in, out) weight the bytes define})."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    path = Path(save_tiny_model("gpt_oss", path, seed, hidden_size=96, intermediate_size=64))
    tensors = load_file(path / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    expected = {}
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        exponents = (-4, -2) if name.endswith("gate_up_proj") else (-8, -6)
        expected[name] = mxfp4_representable(tensors.pop(name).shape, exponents, generator)
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = mxfp4_encode(expected[name])
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = MXFP4_CONFIG
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path, expected


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖a − e‖ / ‖e‖."""
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def experts_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every experts module's two 3-D weights (the family spec's ``moe.gate_up`` and ``down``),
    by name, PEFT wrappers looked through: ``experts_weights(model)``."""
    from fastlm.models import spec_for

    moe = spec_for(model.config).moe
    return {
        f"{name}.{param}": getattr(module, param)
        for name, module in model.named_modules()
        if type(module).__name__ == moe.experts_class
        for param in (moe.gate_up, moe.down)
    }


def copy_lora(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Copy every LoRA parameter of ``source`` into the same-named one of ``target``."""
    values = {n: p for n, p in source.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for name, param in target.named_parameters():
            if "lora_" in name:
                param.copy_(values[name])


def llama_cpp_server(path, n_ctx: int = 256):
    """An in-process llama.cpp server (xllamacpp; the test is skipped without it) on the GGUF
    file ``path``: one slot, two threads."""
    import pytest

    xllamacpp = pytest.importorskip("xllamacpp")
    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.n_ctx = n_ctx
    params.n_parallel = 1
    params.cpuparams.n_threads = 2
    return xllamacpp.Server(params)


def on_device(batch: dict, device) -> dict:
    """``batch`` with its tensors on ``device``, nested dicts too (an embedding batch's sides);
    other values (flags) as they are."""
    return {
        k: on_device(v, device) if isinstance(v, dict)
        else v.to(device) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }  # fmt: skip


def train_step(model: torch.nn.Module, batch: dict, **call_kwargs):
    """One forward + backward from zero gradients: (output, {name: gradient}) of every parameter
    that got one. ``call_kwargs`` go to the forward (e.g. ``output_router_logits=True``)."""
    model.zero_grad(set_to_none=True)
    output = model(**batch, **call_kwargs)
    output.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return output, grads
