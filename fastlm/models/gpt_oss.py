"""gpt-oss (``gpt_oss``): attention with learned sinks, and a sparse mixture of biased experts.

What differs from the Llama-shaped families, and where fastlm's shared path takes it from the
spec:
- Attention: biased q/k/v/o (the fused LoRA projections take biases), sliding-window layers
  alternating with full ones, and per-head learned sinks (``attention_sinks_attr``): one extra
  logit per head in each query's softmax, with no value. They go to the attention as ``s_aux``,
  and fastlm's flash kernel takes them (``fastlm.kernels.flash_attention``: in the running
  denominator and the saved log-sum-exp; their own gradient from it), so gpt-oss's eager
  attention runs the kernel under the usual conditions (``fastlm.models.attention``: CUDA, no
  dropout, the causal / window mask or padding on it, packed sequences), and transformers' eager
  where they fail (gpt-oss has no SDPA path; flash / flex where loaded so run transformers').
  ``fused_report(model).attention`` says which ran on every layer. The rotary tables are D/2
  wide (``rope_half_tables``), YaRN-scaled by default.
- Every layer's MLP is a ``GptOssMLP`` (``moe``; there is no dense MLP): the router has a bias,
  picks the top k experts by logit and softmaxes those k (``scoring="topk_softmax"``); the
  experts are stored (E, in, out) (``gate_up_proj`` (E, H, 2·I), ``down_proj`` (E, I, H)) with
  per-expert biases, gate and up interleaved in gate_up's outputs, and the clamped SwiGLU
  ``(clamp(up, ±limit) + 1) · g·sigmoid(alpha·g)``, g = min(gate, limit) (config
  ``swiglu_alpha``, ``swiglu_limit``; ``moe.clamped_swiglu``). They run as grouped GEMMs, LoRA on
  them through PEFT's ``target_parameters=["mlp.experts.gate_up_proj",
  "mlp.experts.down_proj"]`` (``moe.py``). The block returns (hidden, router scores), as the
  decoder layer unpacks.
- Training adds ``router_aux_loss_coef`` × the load-balancing loss when ``output_router_logits``:
  transformers records the full router logits and softmaxes them over all experts for it, as
  for Qwen3-MoE, so the aux loss and its gradient are the shared ones.
MXFP4 checkpoints (openai/gpt-oss-*, the experts stored as ``*_blocks`` / ``*_scales``): fastlm
has no MXFP4 kernels, so the loader asks transformers for ``Mxfp4Config(dequantize=True)`` (unless
given a ``quantization_config``): the experts come in dequantised to the load dtype, as this
spec's ``GptOssExperts``, and train; one warning says so ("MXFP4 experts dequantised to <dtype>").
Quantised experts (``Mxfp4GptOssExperts``, from a caller's ``Mxfp4Config(dequantize=False)`` where
transformers' kernels run) are not this spec's class and do not train; the warning says that
instead. Tested on a tiny MXFP4 checkpoint from an encoder that follows the OCP MX spec
(``tests/models/test_gpt_oss_mxfp4.py``): the experts equal the format's values exactly, run
fused, and the loss and LoRA gradients match transformers + PEFT loading the same file.
``load_in_4bit`` on an MXFP4 checkpoint: transformers loads one quantisation at a time, so it
gets the NF4 config alone (the linears become NF4) and fastlm decodes the experts' bytes itself
(``fastlm/loading/mxfp4.py``, one expert at a time) and stores them NF4; one warning says so
("MXFP4 experts decoded and stored NF4 (QLoRA)"). The NF4 bytes and quant states equal, bit for
bit, those of ``load_in_4bit`` on a 16-bit copy (``save_pretrained_merged(..., "merged_16bit")``).
On a 16-bit checkpoint ``load_in_4bit`` quantises the linear layers (attention) to NF4 and stores
the experts' 3-D weights NF4 too (``nf4_experts.py``); the router, not an ``nn.Linear``, and the
biases stay in the load dtype.
GGUF: llama.cpp's gpt-oss, each 3-D experts parameter split into per-projection stacks
(``fastlm/export/gguf_moe.py``), the sinks as ``attn_sinks``; the gguf_checks below refuse what
it would run otherwise, and write OpenAI's published YaRN (``truncate=False``) with a warning.
"""

import logging

from fastlm.models.gguf_limits import rope_parameters
from fastlm.models.spec import ArchitectureSpec, MixtureOfExperts

logger = logging.getLogger("fastlm")

# llama.cpp's gpt-oss graph hard-codes its experts' clamped SwiGLU: (swiglu_alpha, swiglu_limit).
LLAMA_CPP_SWIGLU = (1.702, 7.0)


def _swiglu_as_llama_cpp(config) -> None:
    """The experts' activation constants llama.cpp's gpt-oss graph hard-codes."""
    used = (getattr(config, "swiglu_alpha", 1.702), config.swiglu_limit)
    if used != LLAMA_CPP_SWIGLU:
        raise NotImplementedError(
            f"gpt-oss with (swiglu_alpha, swiglu_limit) = {used} is not exported to GGUF: "
            f"llama.cpp's gpt-oss hard-codes {LLAMA_CPP_SWIGLU}, so it would compute another "
            "model; use merged_16bit with transformers instead."
        )


def _layers_as_llama_cpp(config) -> None:
    """llama.cpp's gpt-oss: sliding layers at even indices, full at odd ones (its default
    pattern), biased attention output, an output matrix of its own."""
    n = config.num_hidden_layers
    expected = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    if list(config.layer_types) != expected:
        raise NotImplementedError(
            f"gpt-oss layer_types {list(config.layer_types)} are not sliding at even and full "
            "at odd indices, the only pattern llama.cpp's gpt-oss runs; this model cannot be "
            "exported to GGUF."
        )
    if not getattr(config, "attention_bias", True) or config.tie_word_embeddings:
        raise NotImplementedError(
            "gpt-oss without attention biases or with tied embeddings is not exported to GGUF: "
            "llama.cpp's gpt-oss requires attn_output.bias and output.weight tensors; this "
            "model cannot be exported to GGUF."
        )


def _yarn_as_llama_cpp(config) -> None:
    """llama.cpp's YaRN computes its own attention factor 1 + 0.1·ln(factor) (another is
    refused) and rounds the correction range [low, high] outward to whole dims (transformers'
    ``truncate=True``; ``truncate=False`` is written with a warning: llama.cpp runs every
    gpt-oss that way, and the tiny model's log-probs stay within the f16 bound)."""
    rope = rope_parameters(config)
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "yarn"):
        raise NotImplementedError(f"gpt-oss RoPE type {rope_type!r} is not exported to GGUF")
    if rope_type != "yarn":
        return
    own = [k for k in ("attention_factor", "mscale", "mscale_all_dim") if rope.get(k)]
    if own:
        raise NotImplementedError(
            f"gpt-oss YaRN with {own} is not exported to GGUF: llama.cpp's YaRN takes its "
            "attention factor from the scaling factor alone."
        )
    if not rope.get("truncate", True):  # written, as every llama.cpp gpt-oss file is: said
        logger.warning(
            "GGUF of gpt-oss YaRN with truncate=False (OpenAI's published configs): llama.cpp "
            "rounds YaRN's correction range to whole dims, as in every llama.cpp gpt-oss file, "
            "so the frequencies inside that range differ from transformers' (gpt-oss-20b's by "
            "up to 76%%, 0.1 rad of phase after ~450 positions)"
        )


GPT_OSS = ArchitectureSpec(
    model_type="gpt_oss",
    family="gpt-oss",
    norm_class="GptOssRMSNorm",
    attention_class="GptOssAttention",
    mlp_class=None,  # no dense MLP: every layer's is the MoE block
    norm_offset=0.0,
    # Unused by gpt-oss's experts (the clamped SwiGLU below): the config's default, kept so that
    # a config naming another activation is refused rather than silently ignored.
    activation="swiglu",
    activation_config_attr="hidden_act",
    activation_config_values=("silu",),
    gguf_arch="GPT_OSS",
    gguf_checks=(_yarn_as_llama_cpp, _swiglu_as_llama_cpp, _layers_as_llama_cpp),
    attention_sinks_attr="sinks",
    rope_half_tables=True,
    moe=MixtureOfExperts(
        block_class="GptOssMLP",
        router_class="GptOssTopKRouter",
        experts_class="GptOssExperts",
        router_attr="router",
        scoring="topk_softmax",
        normalize_top_k=False,
        experts_layout="in_out",
        gate_up_bias="gate_up_proj_bias",
        down_bias="down_proj_bias",
        gate_up_interleaved=True,
        activation="clamped_swiglu",
        activation_attrs=("alpha", "limit"),
        returns_router_scores=True,
        num_experts_attr="num_local_experts",
    ),
)
