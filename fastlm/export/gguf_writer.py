"""Export a (LoRA-)fine-tuned model to GGUF for llama.cpp / Ollama, without llama.cpp's converter.

LoRA is merged in fp32 tensor by tensor (the model is left untouched), HF names are mapped with
``gguf.get_tensor_name_map``, and each architecture gets the layout llama.cpp expects: the common
rules here (Gemma 1/2/3's RMSNorm weights stored as ``1 + w``; Qwen 2/3 as they are, llama.cpp's
qwen arches use HF's half-split RoPE) and, per arch in ``LAYOUTS``, one interface
(``gguf_layout.GGUFLayout``) for the rest: Llama's q/k rows permuted to its interleaved RoPE
(Mistral too), Gemma 2/3's metadata (``gguf_dense``); Gemma 4 (``gguf_gemma4``); Qwen3.5's linear
attention (``gguf_linear_attention``); the MoE arches' 3-D experts split per projection
(``gguf_moe``), Llama 4's with the rest of its layout in ``gguf_llama4``, Mistral 4's with its
latent attention in ``gguf_mistral4``.
A byte-level BPE vocabulary is written with the llama.cpp pre-tokenizer of its split regex
(``BYTE_LEVEL_PRE_TOKENIZERS``: Llama 3, Qwen 2/3, Llama 4); another one is refused.
Which llama.cpp arch a family is written as, and which of its configs are refused, is in the
family's spec (``ArchitectureSpec.gguf_arch`` / ``gguf_checks`` in ``fastlm.models``).

Usage: ``save_pretrained_gguf(model, "out", tokenizer, quantization_method=["f16", "q4_k_m"])``.
The k-quant files (q4_k_m, q5_k_m, q6_k) take llama-quantize's per-tensor types and bytes
(``fastlm.export.gguf_quants``), quantised on the weights' device.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastlm.export import gguf_quants
from fastlm.export._atomic import check_free_disk, check_target, export_into
from fastlm.export.gguf_dense import GEMMA2, GEMMA3, LLAMA
from fastlm.export.gguf_gemma4 import GEMMA4
from fastlm.export.gguf_layout import GGUFLayout
from fastlm.export.gguf_linear_attention import QWEN35
from fastlm.export.gguf_llama4 import LLAMA4
from fastlm.export.gguf_mistral4 import MISTRAL4
from fastlm.export.gguf_moe import GPT_OSS, QWEN3MOE, QWEN35MOE, expert_tensors
from fastlm.export.merged import (
    check_plain_lora,
    input_folders,
    lora_base_model,
    merge_lora_weight,
    packed_weights,
    quant_state_keys,
    resolve_key,
)
from fastlm.quant import dequantized

logger = logging.getLogger("fastlm")

METHODS = ("f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k")
# Byte-level BPE pre-tokenizers llama.cpp implements, keyed by the tokenizer.json "Split" regex.
# Llama 3 ("llama-bpe") and Qwen 2/3 ("qwen2") differ only in digits: runs of 1-3 vs single.
_BPE_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_BPE_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# Llama 4 ("llama4") splits as GPT-4o's o200k: a word is a run of capitals then one of lower-case
# letters (caseless letters and marks count as both) with its contraction; digits go in runs of
# 1-3; punctuation keeps a trailing "/". llama.cpp runs "llama4" as its "gpt-4o", which differs
# from transformers on two kinds of word, in files of its own converter too: it cuts a word before
# each combining mark (हिन्दी, NFD accents), and takes a capital after a lower-case letter as a new
# word only in A-Z ("fooÜber" stays whole; transformers: "foo", "Über"). Nor does it honour the
# tokenizer's ignore_merges (a word the vocabulary holds whole but its merges do not rebuild comes
# out in pieces). Seen in xllamacpp 2026.10.11549.
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_O200K = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTION}|"
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTION}|"
    r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BYTE_LEVEL_PRE_TOKENIZERS = {
    _BPE_WORDS + r"\p{N}{1,3}" + _BPE_REST: "llama-bpe",
    _BPE_WORDS + r"\p{N}" + _BPE_REST: "qwen2",
    _O200K: "llama4",
}
# Tensors kept F32 whatever the file type: ggml_ssm_conv's kernel (llama.cpp reads it as F32
# only), and the MoE routers, which llama-quantize never quantises (a rounded router would send
# near-tied tokens to other experts). So is every tensor not named .weight (biases, sinks).
F32_TENSORS = ("ssm_conv1d.weight", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")
# What llama.cpp's tensor names end with (.scale: Gemma 4's router and per-expert scales).
_SUFFIXES = (".weight", ".bias", ".scale")
# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# gguf.MODEL_ARCH name -> what the arch needs beyond a rename (gguf_layout.py); the others are
# a rename plus this module's rules.
LAYOUTS: dict[str, GGUFLayout] = {
    "LLAMA": LLAMA,
    "GEMMA2": GEMMA2,
    "GEMMA3": GEMMA3,
    "QWEN35": QWEN35,
    "GEMMA4": GEMMA4,
    "QWEN3MOE": QWEN3MOE,
    "QWEN35MOE": QWEN35MOE,
    "GPT_OSS": GPT_OSS,
    "LLAMA4": LLAMA4,
    "MISTRAL4": MISTRAL4,
}
_PLAIN = GGUFLayout()


def save_pretrained_gguf(
    model: nn.Module,
    save_directory: str | os.PathLike,
    tokenizer,
    quantization_method: str | list[str] = "q8_0",
    name: str | None = None,
) -> list[Path]:
    """Write ``<save_directory>/<name>.<method>.gguf`` per method plus an Ollama ``Modelfile``.

    Usage: ``paths = save_pretrained_gguf(peft_model, "out", tok, ["f16", "q8_0"])``.
    ``model`` may be a ``peft.PeftModel`` (the active LoRA adapter is merged into the exported
    weights; the model itself is not modified). The files go into ``save_directory`` (other
    files there are kept) once all are written. Returns the written GGUF paths.
    """
    import gguf

    methods = [quantization_method] if isinstance(quantization_method, str) else quantization_method
    if not methods:
        raise ValueError(f"quantization_method is empty; give one or more of {METHODS}")
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"quantization_method {method!r} is not one of {METHODS}")
    base = lora_base_model(model)
    config = base.config
    spec = _gguf_spec(config)
    arch = gguf.MODEL_ARCH[spec.gguf_arch]
    for check in spec.gguf_checks:  # before any big work: fail fast on what llama.cpp can't run
        check(config)
    refused = [m for m in methods if m in LAYOUTS.get(arch.name, _PLAIN).refused(config)]
    if refused:
        raise NotImplementedError(
            f"{spec.family} GGUF export writes {[m for m in METHODS if m not in refused]}, not "
            f"{refused}: llama-quantize's per-tensor types for its {arch.name} tensors are not "
            "reproduced. Write f16 and run llama-quantize on it."
        )
    vocab = tokenizer_vocab(tokenizer, config)  # before any big work: fail fast on a bad vocab
    inputs = input_folders(model, tokenizer)
    out_dir = check_target(save_directory, inputs)
    # f16/bf16 take 2 bytes a weight, q8_0 ~1.06, the k-quants less: 2 bytes is an upper bound.
    weights = sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n)
    check_free_disk(out_dir, 2 * weights * len(methods), "GGUF export")
    stem = name or _default_name(config)
    names = [f"{stem}.{method}.gguf" for method in methods]
    with export_into(out_dir, inputs=inputs) as tmp:
        for method, file_name in zip(methods, names):
            _write_gguf(base, model, arch, vocab, tokenizer, method, tmp / file_name)
        text = modelfile_text(names[-1], getattr(tokenizer, "chat_template", None))
        (tmp / "Modelfile").write_text(text)
    return [out_dir / file_name for file_name in names]


def _gguf_spec(config):
    """The family's ``ArchitectureSpec``; a ValueError naming the exportable model types else."""
    # fastlm.models loads transformers and peft (~3 s more); fastlm.export alone loads torch only,
    # lazy: so that `fastlm export` refuses a bad --output-dir before paying for them
    from fastlm.models import SPECS

    spec = SPECS.get(getattr(config, "model_type", None))
    if spec is not None and spec.moe is not None and spec.gguf_arch is None:
        raise ValueError(
            f"GGUF export of {spec.family} ({config.model_type!r}) is not supported: fastlm's "
            "writer has no layout for its 3-D expert tensors; save merged_16bit and convert "
            "that with llama.cpp's convert_hf_to_gguf.py."
        )
    if spec is None or spec.gguf_arch is None:  # None: llama.cpp has no arch for the family
        exportable = sorted(t for t, s in SPECS.items() if s.gguf_arch)
        raise ValueError(f"GGUF export supports {exportable}, not {config.model_type!r}")
    return spec


def _default_name(config) -> str:
    raw = getattr(config, "_name_or_path", "") or config.model_type
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(raw)).name).strip("-") or config.model_type


# ----------------------------------------------------------------------------- tensors


def merged_state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, fp32 tensor) with the active LoRA adapter merged: W + scaling·B·A.

    Usage: ``dict(merged_state(peft_model))``. Works on a copy per tensor, never in place.
    A QLoRA model's 4-bit weights are dequantised first (the LoRA is merged into the weights it
    was trained against). LoRA on a 3-D experts parameter (PEFT's target_parameters) is merged
    per expert: W[e] + scaling·B_e·A_e.
    """
    base = lora_base_model(model)
    check_plain_lora(base)
    state = base.state_dict(keep_vars=True)
    packed = packed_weights(base)
    quant_state_parts = quant_state_keys(state, packed)
    seen = set()
    for param_name, param in state.items():
        resolved = None if param_name in quant_state_parts else resolve_key(base, param_name)
        if resolved is None:
            continue
        clean, lora = resolved
        if clean in seen:  # tied weights appear once
            continue
        seen.add(clean)
        tensor = dequantized(packed.get(param_name, param))
        if lora is not None:
            tensor = merge_lora_weight(lora, tensor)
        yield clean, tensor


def gguf_tensors(model: nn.Module, arch) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (GGUF name, fp32 tensor) in llama.cpp's layout for ``arch``.

    Usage: ``dict(gguf_tensors(model, gguf.MODEL_ARCH.LLAMA))``.
    """
    import gguf

    config = lora_base_model(model).config
    spec = _gguf_spec(config)
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    layout = LAYOUTS.get(arch.name, _PLAIN)
    for merged_name, merged in merged_state(model):
        if "rotary_emb" in merged_name:
            continue  # buffers recomputed by llama.cpp
        if tied and merged_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        pieces = [(merged_name, merged)]
        if layout.split_experts:  # one 3-D parameter -> llama.cpp's per-projection stacks
            pieces = expert_tensors(spec.moe, merged_name, merged, layout.fused_gate_up)
        if layout.split is not None:  # one tensor -> llama.cpp's pieces of it
            pieces = [piece for name, t in pieces for piece in layout.split(config, name, t)]
        for hf_name, tensor in pieces:
            yield _gguf_tensor(arch, config, spec.norm_offset, layout, name_map, hf_name, tensor)
    if layout.extra_tensors is not None:
        yield from layout.extra_tensors(config)


def _gguf_tensor(
    arch, config, norm_offset: float, layout: GGUFLayout, name_map, hf_name: str, tensor
) -> tuple[str, torch.Tensor]:
    """(GGUF name, tensor in llama.cpp's layout) of one HF tensor."""
    if layout.tensor is not None:  # the arch's own layout (names as llama.cpp has them)
        hf_name, tensor = layout.tensor(config, norm_offset, hf_name, tensor)
    elif norm_offset and hf_name.endswith("norm.weight"):
        tensor = tensor + norm_offset  # HF Gemma RMSNorm scales by (1 + w); llama.cpp's by w
    new_name = name_map.get_name(hf_name, try_suffixes=_SUFFIXES)
    if new_name is None:
        raise ValueError(f"no GGUF name for tensor {hf_name!r} of {arch.name}")
    if layout.bare_tensors_get_weight_suffix and not new_name.endswith(_SUFFIXES):
        new_name += ".weight"
    return new_name, tensor


def _rope(config) -> dict:
    from fastlm.models.gguf_limits import rope_parameters  # lazy: as in _gguf_spec

    return rope_parameters(config)


def _encode(name: str, tensor: torch.Tensor, method: str, mixture: dict):
    """(array, raw GGML type or None) for GGUFWriter.add_tensor; 1-D tensors stay F32.

    ``mixture`` (n_layers, tied, is_70b) feeds the k-quant methods' per-tensor type choice.
    """
    import gguf

    if name.endswith(F32_TENSORS) or not name.endswith(".weight"):
        return tensor.detach().cpu().numpy().astype(np.float32), None
    if method in gguf_quants.METHOD_TYPES:
        qtype = gguf_quants.llama_cpp_tensor_type(name, tuple(tensor.shape), method, **mixture)
        return gguf_quants.encode_tensor(tensor, qtype)
    array = tensor.detach().cpu().numpy()
    if array.ndim < 2:
        return array.astype(np.float32), None
    if (
        method == "q8_0"
        and array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0
    ):
        qtype = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(array, qtype), qtype
    if method == "bf16":
        qtype = gguf.GGMLQuantizationType.BF16
        return gguf.quants.quantize(array, qtype), qtype
    return array.astype(np.float16), None  # f16, and the q8_0 fallback for odd rows


# ----------------------------------------------------------------------------- metadata


def _write_gguf(base, model, arch, vocab: dict, tokenizer, method: str, target: Path) -> None:
    """One GGUF file at ``target`` (in the export's staging folder)."""
    import gguf

    writer = gguf.GGUFWriter(str(target), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(_default_name(base.config))
    _add_hparams(writer, arch, base.config, method)
    _add_tokenizer(writer, vocab, getattr(tokenizer, "chat_template", None))
    mixture = _mixture_context(arch, base.config)
    for gguf_name, tensor in gguf_tensors(model, arch):
        array, raw_dtype = _encode(gguf_name, tensor, method, mixture)
        writer.add_tensor(gguf_name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _mixture_context(arch, config) -> dict:
    """What llama-quantize's type choice reads besides a tensor's name and shape."""
    return {
        "n_layers": config.num_hidden_layers,
        # no output.weight is written for tied embeddings: llama.cpp then treats token_embd so
        "tied": bool(getattr(config, "tie_word_embeddings", False)),
        "is_70b": gguf_quants.is_70b(arch.name, config),
    }


def _add_hparams(writer, arch, config, method: str) -> None:
    layout = LAYOUTS.get(arch.name, _PLAIN)
    if layout.replaces_common_hparams:
        layout.add_hparams(writer, config, None)
        _add_file_type(writer, method)
        return
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    if getattr(config, "intermediate_size", None):  # Qwen3.5-MoE has no dense MLP width
        writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    rope = _rope(config)
    if layout.add_hparams is not None:
        layout.add_hparams(writer, config, rope)
    else:
        writer.add_rope_freq_base(rope.get("rope_theta", 10000.0))
        writer.add_rope_dimension_count(head_dim)
    _add_file_type(writer, method)


def _add_file_type(writer, method: str) -> None:
    import gguf

    writer.add_file_type(
        {
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
            "q5_k_m": gguf.LlamaFileType.MOSTLY_Q5_K_M,
            "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K,
        }[method]
    )
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ----------------------------------------------------------------------------- tokenizer


def tokenizer_vocab(tokenizer, config=None) -> dict:
    """Tokens, scores, types, merges, special ids and the llama.cpp tokenizer kind.

    Usage: ``tokenizer_vocab(tok)["model"]`` -> ``"llama"`` or ``"gpt2"``; raises ValueError for a
    vocabulary llama.cpp could not tokenise like the HF tokenizer.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(
        tokenizer, "_tokenizer", None
    )
    if backend is None:
        raise ValueError("GGUF export needs a fast (tokenizers) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError(
            f"unknown tokenizer kind for GGUF: {model.get('type')} (llama.cpp needs a "
            "SentencePiece-style or byte-level BPE vocabulary); this file would tokenise wrongly"
        )
    kind = _bpe_kind(spec)
    size = max(len(tokenizer), getattr(config, "vocab_size", 0) or 0)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [UNUSED] * size
    for text, index in model["vocab"].items():
        tokens[index] = text
        types[index] = (
            BYTE if kind == "llama" and re.fullmatch(r"<0x[0-9A-F]{2}>", text) else NORMAL
        )
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added["special"] else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    vocab = {
        "model": kind,
        "pre": "default" if kind == "llama" else _gpt2_pre(spec),
        "tokens": tokens,
        "types": types,
        "scores": _scores(tokens, types, merges) if kind == "llama" else None,
        "merges": merges if kind == "gpt2" else None,
        "add_space_prefix": "Prepend" in json.dumps(spec.get("normalizer"))
        or '"prepend_scheme": "always"' in json.dumps(spec.get("pre_tokenizer")),
    }
    for role in ("bos", "eos", "unk", "pad"):
        vocab[f"{role}_id"] = getattr(tokenizer, f"{role}_token_id", None)
    vocab["add_bos"], vocab["add_eos"] = _adds_bos_eos(tokenizer)
    return vocab


def _bpe_kind(spec: dict) -> str:
    """ "llama" for SentencePiece-style BPE (▁, byte fallback), "gpt2" for byte-level BPE."""
    text = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    if "ByteLevel" in text:
        return "gpt2"
    if (
        spec["model"].get("byte_fallback")
        and "\\u2581" in json.dumps(spec.get("normalizer")) + text
    ):
        return "llama"
    raise ValueError(
        "unknown tokenizer kind for GGUF: a BPE that is neither SentencePiece-style (▁ + byte "
        "fallback) nor byte-level; this file would tokenise wrongly"
    )


def _gpt2_pre(spec: dict) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE, from its split regex."""
    regexes = _split_regexes(spec.get("pre_tokenizer"))
    for regex in regexes:
        if regex in BYTE_LEVEL_PRE_TOKENIZERS:
            return BYTE_LEVEL_PRE_TOKENIZERS[regex]
    raise ValueError(
        f"unknown byte-level BPE pre-tokenizer for GGUF (split regex {regexes or 'none'}); "
        f"fastlm writes {sorted(set(BYTE_LEVEL_PRE_TOKENIZERS.values()))} (Llama 3, Qwen 2/3, "
        "Llama 4). "
        "A file with another one would tokenise differently in llama.cpp, so none is written; "
        "export merged_16bit and convert it with llama.cpp's converter instead."
    )


def _split_regexes(node) -> list[str]:
    """Every ``Split`` regex inside a tokenizer.json pre-tokenizer (Sequences included)."""
    if isinstance(node, list):
        return [regex for child in node for regex in _split_regexes(child)]
    if not isinstance(node, dict):
        return []
    found = []
    if node.get("type") == "Split" and isinstance(node.get("pattern"), dict):
        found += [node["pattern"]["Regex"]] if "Regex" in node["pattern"] else []
    return found + _split_regexes(node.get("pretokenizers"))


def _scores(tokens: list[str], types: list[int], merges: list[str]) -> list[float]:
    """SentencePiece-style scores: llama.cpp merges the bigram of highest score first, so a token
    made by BPE merge r scores -r (earlier merge wins); control/unused tokens never merge."""
    rank = {}
    for r, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", ""), r)
    scores = []
    for text, kind in zip(tokens, types):
        if kind in (CONTROL, UNUSED, UNKNOWN):
            scores.append(-1e9)
        else:
            scores.append(-float(rank.get(text, 0)))
    return scores


def _adds_bos_eos(tokenizer) -> tuple[bool, bool]:
    """Whether the tokenizer adds bos/eos itself, read off an encoding of plain text."""
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return bool(ids and bos is not None and ids[0] == bos), bool(
        ids and eos is not None and ids[-1] == eos
    )


def _add_tokenizer(writer, vocab: dict, chat_template: str | None) -> None:
    writer.add_tokenizer_model(vocab["model"])
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    if vocab["scores"] is not None:
        writer.add_token_scores(vocab["scores"])
    if vocab["merges"]:
        writer.add_token_merges(vocab["merges"])
    for role, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("unk", writer.add_unk_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        if vocab[f"{role}_id"] is not None:
            add(vocab[f"{role}_id"])
    writer.add_add_bos_token(vocab["add_bos"])
    writer.add_add_eos_token(vocab["add_eos"])
    if vocab["model"] == "llama":
        writer.add_add_space_prefix(vocab["add_space_prefix"])
    if chat_template:
        writer.add_chat_template(chat_template)


# ----------------------------------------------------------------------------- Ollama


def modelfile_text(gguf_name: str, chat_template: str | None) -> str:
    """An Ollama Modelfile: FROM, plus TEMPLATE/stop for chat formats recognised here.

    Usage: ``Path("Modelfile").write_text(modelfile_text("m.q8_0.gguf", tok.chat_template))``.
    """
    lines = [f"FROM ./{gguf_name}"]
    template = chat_template or ""
    if "<start_of_turn>" in template:  # Gemma turns
        lines += [
            'TEMPLATE """{{- range .Messages }}<start_of_turn>'
            '{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}\n'
            '{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n"""',
            'PARAMETER stop "<end_of_turn>"',
        ]
    elif "<|start_header_id|>" in template:  # Llama 3 turns
        lines += [
            'TEMPLATE """{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>'
            "\n\n{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>"
            '\n\n"""',
            'PARAMETER stop "<|eot_id|>"',
        ]
    return "\n".join(lines) + "\n"
