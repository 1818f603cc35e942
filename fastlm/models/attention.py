"""Which attention a patched attention module runs, and fastlm's flash-attention hook.

The patched attention forward (``patch.py``) computes q, k, v and hands them to ``attend``:
- attn_implementation "eager" (or unset; Gemma 2 runs eager because SDPA cannot soft-cap):
  fastlm's flash-attention kernel (``fastlm.kernels.flash_attention``) where it computes exactly
  what eager would, else the model's own eager function;
- any other implementation ("sdpa", "flash_attention_2", "flex_attention"...): the model's own,
  as transformers runs it. "fastlm" (``register_fastlm_attention``) is this module's hook.

The kernel runs only when all of these hold; otherwise eager runs, and the first that fails is
the reason recorded:
    CUDA tensors · no attention dropout in training · no output_attentions · a sliding window
    only with a causal mask · as many keys as queries (a KV cache while decoding has more) · one
    head_dim <= 256 for q, k, v · query heads a multiple of kv heads · fp16 / bf16 / fp32 · a 4D
    mask that is exactly the causal (+ window) pattern, or padding on it (below).
Attention sinks (the ``s_aux`` keyword: gpt-oss's learned per-head logits, one softmax column
with no value) are no condition: every launch below takes them (in fp32, their gradient back in
their dtype), computing what gpt-oss's eager attention does with them; where eager runs instead,
it reads them itself.

Padded batches (a tokenizer's 0/1 ``attention_mask``, right, left or both-sided): where the 4D
mask transformers built from it is exactly padding on the causal (+ window) or bidirectional
pattern, with each row's real tokens one span (``padding.padded_rows``), the real tokens are
gathered into one run, the packed kernel runs with one sequence per row, and the output goes back
in place with zeros at the pad queries (unpad -> varlen -> pad). Every real query gets what eager
gives it; pad queries are no one's keys, so nothing downstream of a real token sees them. Any
other mask is a custom one and runs eager.

Packed (padding-free) batches: where ``packing.packed_sequences`` finds several sequences in a row
(the ``cu_seq_lens_q/k`` kwargs, else ``position_ids`` that restart), the packed kernel
(``flash_attention_varlen``) runs instead, on (B·S, H, D) views of q, k, v, when the mask is
either exactly the per-sequence causal (+ window) pattern of those sequences, or the causal
(+ window) pattern over the whole row: transformers builds the latter when a KV cache exists
(``use_cache`` in training), and eager would then let the sequences see each other. Where eager
runs instead, it gets the per-sequence mask in that case too, so no path mixes sequences.

SDPA models (transformers' default) take the padded and packed launches too: SDPA itself
needs an (B, 1, S, S) mask to keep the sequences apart (transformers builds one from restarting
``position_ids``, but none when a KV cache exists or only ``cu_seq_lens`` say where sequences
start). Where the kernel cannot run (CPU tensors, dropout...), SDPA runs with the per-sequence
mask in those cases. A padded batch's SDPA call takes the padded launch under the rules above.
Every other SDPA call, and every other implementation, is the model's own.

Each call's choice is an ``AttentionPath``; ``patch.py`` keeps the latest one per module, and
``fused_report`` lists it.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from fastlm.kernels._dispatch import use_triton
from fastlm.kernels.flash_attention import flash_attention, flash_attention_varlen, keep_pattern
from fastlm.models.packing import Packing, chunks_of, packed_sequences, sequence_ids
from fastlm.models.padding import Padding, keeps_exactly, pad, padded_rows, unpad
from fastlm.models.tensor_memo import remembered, version_of

__all__ = [
    "CHUNK_KWARG",
    "CHUNKED",
    "CUSTOM_MASK",
    "FLASH",
    "FLASH_VARLEN",
    "PADDED",
    "AttentionPath",
    "attend",
    "expected_path",
    "fastlm_attention_forward",
    "register_fastlm_attention",
]

FLASH = "fastlm-flash"  # AttentionPath.implementation of fastlm's Triton kernel
FLASH_VARLEN = "fastlm-flash-varlen"  # ... and of its packed-sequence launch
PADDED = "padding from the attention mask"  # FLASH_VARLEN's reason for a padded batch
CUSTOM_MASK = "a custom mask (not padding on the causal, window or bidirectional pattern)"
# attend()'s keyword for a chunked layer's chunk size (Llama 4's attention_chunk_size): queries
# see the keys of their own chunk only; the mask carries that, the kernel needs the size.
CHUNK_KWARG = "fastlm_attention_chunk"
CHUNKED = "chunks of the attention mask"  # FLASH_VARLEN's reason for a chunked layer


class AttentionPath(NamedTuple):
    """What an attention call ran: ``implementation`` (``FLASH``, ``FLASH_VARLEN``, "eager", or
    the model's attn_implementation such as "sdpa") and ``reason``: why not fastlm's kernel; ""
    for ``FLASH``; for ``FLASH_VARLEN``, where the sequence bounds came from."""

    implementation: str
    reason: str = ""


def attend(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """The patched attention's call of its attention function, q/k/v (B, H, S, D): returns
    ``(output (B, S, H, D), weights, AttentionPath)``.

    Usage: ``out, weights, path = attend(self, q, k, v, mask, scaling=self.scaling)``.
    """
    function = _model_function(module)
    if function is None:
        return _flash_or_eager(module, query, key, value, attention_mask, **kwargs)
    packing = _packing(query, key, kwargs) if _is_sdpa(module) else None
    if packing is not None:
        return _packed_sdpa(module, function, query, key, value, attention_mask, packing, **kwargs)
    if _is_sdpa(module) and attention_mask is not None:  # None: no padding
        plan = _plan(module, query, key, value, attention_mask, None, kwargs)
        if plan.padding is not None and not plan.reason:
            output, weights, path = _run_kernel(query, key, value, None, plan)
            return output, weights, path._replace(reason=f"{path.reason}, in place of sdpa")
    output, weights = function(module, query, key, value, attention_mask, **_theirs(kwargs))
    return output, weights, _model_path(module)


def expected_path(module: nn.Module, sinks: bool = False) -> AttentionPath:
    """The path ``attend`` will take for ``module`` as far as is known before a call (the mask,
    the KV cache, the device and the dtype come with the call); ``sinks``: its calls pass
    attention sinks (``s_aux``), which every kernel launch takes, so they change no path.

    Usage: ``expected_path(model.model.layers[0].self_attn).implementation``.
    """
    del sinks  # kept for callers that say whether the calls carry sinks
    if _model_function(module) is not None:
        return _model_path(module)
    if module.training and getattr(module, "attention_dropout", 0.0):
        return AttentionPath("eager", _DROPOUT)
    if module.head_dim > 256:
        return AttentionPath("eager", f"head_dim {module.head_dim} > 256")
    return AttentionPath(FLASH)


def fastlm_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """transformers AttentionInterface function (q/k/v (B, H, S, D)) returning ((B, S, H, D), None):
    the flash kernel, or the module's eager attention where the kernel would differ (see above).

    Usage: ``AttentionInterface.register("fastlm", fastlm_attention_forward)``.
    """
    output, weights, _ = _flash_or_eager(module, query, key, value, attention_mask, **kwargs)
    return output, weights


def register_fastlm_attention(name: str = "fastlm") -> str:
    """Register ``fastlm_attention_forward`` (and eager's mask builder) under ``name`` in
    transformers; usage: ``model.set_attn_implementation(register_fastlm_attention())``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(name, fastlm_attention_forward)
    AttentionMaskInterface.register(name, eager_mask)
    return name


# --------------------------------------------------------------------------- helpers

_DROPOUT = "attention dropout in training"
_HALF_OR_SINGLE = (torch.float16, torch.bfloat16, torch.float32)


def _model_function(module: nn.Module):
    """The model's own attention function, or None where fastlm's hook runs instead."""
    implementation = module.config._attn_implementation
    if implementation in (None, "eager"):
        return None
    function = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, _eager_function(module))
    return None if function is fastlm_attention_forward else function


def _model_path(module: nn.Module) -> AttentionPath:
    implementation = module.config._attn_implementation
    return AttentionPath(implementation, f'the model\'s attn_implementation="{implementation}"')


class _Plan(NamedTuple):
    """One call's kernel decision: ``reason`` ("" when the kernel runs), the dtype it runs in,
    its options (scale, softcap, sliding_window, causal, sinks), and the real tokens where the
    mask is padding (the kernel then runs on them alone)."""

    reason: str
    dtype: torch.dtype
    options: dict
    padding: Padding | None = None
    padding_reason: str = PADDED  # CHUNKED where the padded launch runs a chunked layer


def _packing(query, key, kwargs) -> Packing | None:
    """The sequences packed in the call's rows; none while decoding (more keys than queries).
    In a chunked layer, each sequence cut at its own chunk bounds (``chunks_of``): the keys
    each query sees when its sequence runs alone."""
    batch, q_len = query.shape[0], query.shape[2]
    packing = packed_sequences(kwargs, batch, q_len) if key.shape[2] == q_len else None
    chunk = _chunk(query, kwargs)
    if packing is None or packing.problem or chunk is None or packing.max_seqlen <= chunk:
        return packing
    return chunks_of(packing, chunk)


def _chunk(query, kwargs) -> int | None:
    """A chunked layer's chunk size where the call spans more than one chunk (within one chunk
    the pattern is the causal one), else None."""
    chunk = kwargs.get(CHUNK_KWARG)
    return chunk if chunk is not None and query.shape[2] > chunk else None


def _plan(module, query, key, value, attention_mask, packing, kwargs) -> _Plan:
    scaling = kwargs.get("scaling")
    scaling = module.head_dim**-0.5 if scaling is None else scaling
    softcap, window = kwargs.get("softcap"), kwargs.get("sliding_window")
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
    dtype = query.dtype
    if torch.is_autocast_enabled(query.device.type):  # eager's matmuls would run in this dtype
        dtype = torch.get_autocast_dtype(query.device.type)
    reason = _why_not_flash(module, query, key, value, causal, window, dtype, kwargs)
    padding = None
    chunk = _chunk(query, kwargs)
    if not reason:  # the mask last: the one check that costs a pass over S x S
        batch, q_len = query.shape[0], query.shape[2]
        reason, padding = _mask_problem(
            attention_mask, packing, batch, q_len, causal, window, chunk
        )
    # The sinks stay in their own dtype: the kernel runs them in fp32 whatever q's.
    options = dict(scale=scaling, softcap=softcap, sliding_window=window, causal=causal,
                   sinks=kwargs.get("s_aux"))  # fmt: skip
    chunked = padding is not None and chunk is not None
    return _Plan(reason, dtype, options, padding, CHUNKED if chunked else PADDED)


def _run_kernel(query, key, value, packing: Packing | None, plan: _Plan):
    """The flash kernel, or its packed launch: ``(output (B, S, H, D), None, AttentionPath)``."""
    q, k, v = query.to(plan.dtype), key.to(plan.dtype), value.to(plan.dtype)
    if plan.padding is not None:  # before packing: the mask says what eager would compute
        out = _padded_flash(q, k, v, plan.padding, **plan.options)
        return out, None, AttentionPath(FLASH_VARLEN, plan.padding_reason)
    if packing is not None:
        out = _packed_flash(q, k, v, packing, **plan.options)
        return out, None, AttentionPath(FLASH_VARLEN, f"packed sequences from {packing.source}")
    out = flash_attention(q, k, v, **plan.options)
    # (B, S, H, D), contiguous: the kernel stored it that way.
    return out.transpose(1, 2), None, AttentionPath(FLASH)


def _kept_apart(mask, packing: Packing | None, query, options: dict, chunked: bool = False):
    """The per-sequence (B, 1, S, S) bool mask where the call's mask spans the whole row of a
    packed batch (the fallback would mix its sequences) or where ``chunked`` (a chunked layer:
    ``packing`` holds each sequence's own chunks, the mask counts them from the row's start),
    else the call's own mask."""
    batch, q_len = query.shape[0], query.shape[2]
    causal, window = options["causal"], options["sliding_window"]
    if packing is None or packing.problem:
        return mask
    if not chunked and not _row_wide(mask, q_len, causal, window):
        return mask
    return _packed_keep(packing, batch, q_len, causal, window, query.device)


def _flash_or_eager(module, query, key, value, attention_mask, **kwargs):
    packing = _packing(query, key, kwargs)
    plan = _plan(module, query, key, value, attention_mask, packing, kwargs)
    if not plan.reason:
        return _run_kernel(query, key, value, packing, plan)
    chunked = _packed_chunks(query, attention_mask, packing, kwargs)
    mask = _kept_apart(attention_mask, packing, query, plan.options, chunked)
    if mask is not attention_mask:  # eager adds its mask: 0 kept, dtype-min dropped
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~mask, torch.finfo(query.dtype).min
        )
    causal, window = plan.options["causal"], plan.options["sliding_window"]
    output, weights = _eager_fallback(module, query, key, value, mask, causal, window, **kwargs)
    return output, weights, AttentionPath("eager", plan.reason)


def _is_sdpa(module: nn.Module) -> bool:
    return module.config._attn_implementation == "sdpa"


def _packed_sdpa(module, function, query, key, value, attention_mask, packing: Packing, **kwargs):
    """A packed batch on an SDPA model: the packed kernel where it computes what SDPA with the
    per-sequence mask would, else SDPA with that mask."""
    plan = _plan(module, query, key, value, attention_mask, packing, kwargs)
    if not plan.reason:
        output, weights, path = _run_kernel(query, key, value, packing, plan)
        return output, weights, path._replace(reason=f"{path.reason}, in place of sdpa")
    chunked = _packed_chunks(query, attention_mask, packing, kwargs)
    mask = _kept_apart(attention_mask, packing, query, plan.options, chunked)  # bool: SDPA's
    output, weights = function(module, query, key, value, mask, **_theirs(kwargs))
    reason = f"packed sequences from {packing.source}, but {plan.reason}"
    return output, weights, AttentionPath("sdpa", reason)


def _packed_flash(q, k, v, packing: Packing, **options):
    """The packed kernel on (B·S, H, D) views of q, k, v (B, H, S, D): a view wherever the
    storage is (B, S, H, D), as the patched attention leaves it. Returns (B, S, Hq, D)."""
    batch, heads, seq, d = q.shape
    q, k, v = (t.transpose(1, 2).reshape(batch * seq, t.shape[1], d) for t in (q, k, v))
    cu = packing.cu_seqlens.to(q.device)
    out = flash_attention_varlen(q, k, v, cu, packing.max_seqlen, **options)
    return out.view(batch, seq, heads, d)


def _padded_flash(q, k, v, padding: Padding, **options):
    """unpad -> packed kernel -> pad: the real tokens of q, k, v (B, H, S, D), one sequence per
    row, through the packed kernel. Returns (B, S, Hq, D), zeros at the padding."""
    batch, _, seq, _ = q.shape
    out = flash_attention_varlen(
        unpad(q, padding), unpad(k, padding), unpad(v, padding), padding.cu_seqlens,
        padding.max_seqlen, **options,
    )  # fmt: skip
    return pad(out, padding, batch, seq)


def _why_not_flash(module, query, key, value, causal, window, dtype, kwargs) -> str:
    """Why the kernel would not compute exactly what eager does, "" when it would: the first
    condition that fails, the mask aside (``_mask_problem``)."""
    q_len, d = query.shape[2], query.shape[-1]
    if not use_triton(query):
        return f"{query.device.type} tensors (the kernel runs on CUDA)"
    if kwargs.get("dropout", 0.0) and module.training:
        return _DROPOUT
    if kwargs.get("output_attentions", False):
        return "output_attentions=True"
    if window is not None and not causal:
        return "sliding window without a causal mask"
    if key.shape[2] != q_len:
        return "decoding with KV cache"
    if not key.shape[-1] == d == value.shape[-1]:
        return "q, k, v head_dims differ"
    if d > 256:
        return f"head_dim {d} > 256"
    if query.shape[1] % key.shape[1]:
        return "query heads not a multiple of kv heads"
    if dtype not in _HALF_OR_SINGLE:
        return f"{dtype} (the kernel takes fp16, bf16, fp32)"
    return ""


def _mask_problem(
    mask, packing, batch, seq_len, causal, window, chunk=None
) -> tuple[str, Padding | None]:
    """Why the kernel would not compute what the mask asks for ("" when it would), and the real
    tokens where the mask is padding. Packed sequences: their own pattern, or the whole row's
    (kept apart, see the module docstring). Else the plain pattern. Else padding on it, which the
    padded launch computes whether or not the rows also pack sequences (eager would mix them).
    ``chunk`` (a chunked layer past one chunk): the pattern within chunks, padded or not, through
    the padded launch with the rows cut at the chunk bounds. Packed sequences in a chunked layer
    (already cut at their own chunk bounds, ``_packing``): each as if alone, whatever chunks the
    mask counts from the row's start, as long as it pads no key."""
    if chunk is not None:
        if packing is not None:
            if packing.problem:
                return packing.problem, None
            if mask is not None and not _keeps_every_diagonal(mask):
                problem = f"padding with packed sequences in chunked attention ({packing.source})"
                return problem, None
            return "", None
        padding = padded_rows(mask, batch, seq_len, causal, window, chunk)
        return (padding.problem, padding) if padding is not None else (CUSTOM_MASK, None)
    if packing is not None:
        if packing.problem:
            return packing.problem, None
        if _row_wide(mask, seq_len, causal, window) or _mask_is_packed(
            mask, packing, batch, seq_len, causal, window
        ):
            return "", None
    elif mask is None or _mask_is_plain(mask, seq_len, causal, window):
        return "", None
    padding = padded_rows(mask, batch, seq_len, causal, window)
    if padding is not None:
        return padding.problem, padding
    if packing is not None:
        return f"a mask that is neither padding nor the packed sequences' ({packing.source})", None
    return CUSTOM_MASK, None


def _packed_chunks(query, mask, packing: Packing | None, kwargs) -> bool:
    """Whether a fallback must keep packed sequences to their own chunks: a chunked layer past
    one chunk, sequences packed, no key padded."""
    if packing is None or _chunk(query, kwargs) is None:
        return False
    return mask is None or _keeps_every_diagonal(mask)


def _keeps_every_diagonal(mask: torch.Tensor) -> bool:
    """Every token sees itself: no key is padding (which transformers' masks drop for every
    query, its own included). Read once per mask tensor and content: the layers share it."""

    def read() -> bool:
        diagonal = mask.diagonal(dim1=-2, dim2=-1)
        return bool((diagonal if diagonal.dtype == torch.bool else diagonal == 0).all())

    return remembered(_DIAGONALS, mask, (), read)


_DIAGONALS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # mask -> (its version, (), verdict)


def _row_wide(mask, seq_len: int, causal: bool, window: int | None) -> bool:
    # None: "causal, no padding" to sdpa-style mask builders.
    return mask is None or _mask_is_plain(mask, seq_len, causal, window)


# Verdicts per mask tensor (the layers of one forward share it): (mask._version, [((seq_len,
# causal, window, batch), the cu_seqlens checked against or None, verdict), ...]). Keyed by the
# tensor's identity and dropped with the tensor, so a new mask can never read an old one's
# verdict; weakref.WeakKeyDictionary would compare two keys with the tensor's elementwise ``==``.
_PLAIN_MASKS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _mask_is_plain(mask: torch.Tensor, seq_len: int, causal: bool, window: int | None) -> bool:
    """True when a 4D transformers mask is exactly the causal (+ window) pattern: no padding,
    no packed sequences. Checked once per mask tensor and content (its ``_version``)."""
    return _mask_is(mask, seq_len, causal, window, None, 1)


def _mask_is_packed(mask, packing: Packing, batch: int, seq_len: int, causal, window) -> bool:
    """True when a 4D mask keeps exactly the causal (+ window) pattern inside each packed
    sequence and nothing across them."""
    return _mask_is(mask, seq_len, causal, window, packing.cu_seqlens, batch)


def _mask_is(mask, seq_len, causal, window, cu_seqlens, batch) -> bool:
    if mask.dim() != 4 or tuple(mask.shape[-2:]) != (seq_len, seq_len):
        return False
    key = (seq_len, causal, window, batch)
    version, verdicts = _PLAIN_MASKS.get(mask, (None, []))
    if version != version_of(mask):  # None for an inference tensor: it keeps no version
        verdicts = []
    for seen_key, seen_cu, verdict in verdicts:
        if seen_key == key and seen_cu is cu_seqlens:
            return verdict
    keep = keep_pattern(seq_len, causal, window, mask.device)
    if cu_seqlens is not None:  # (B, 1, S, S): and only inside one sequence
        keep = keep & _same_sequence(cu_seqlens, batch, seq_len, mask.device)
    verdict = bool(keeps_exactly(mask, keep))
    _PLAIN_MASKS[mask] = (version_of(mask), [*verdicts, (key, cu_seqlens, verdict)])
    return verdict


def _same_sequence(cu_seqlens, batch: int, seq_len: int, device) -> torch.Tensor:
    """(B, 1, S, S) bool: query i and key j of a row are in one packed sequence."""
    ids = sequence_ids(cu_seqlens.to(device), batch * seq_len).view(batch, 1, seq_len)
    return ids[..., :, None] == ids[..., None, :]


def _packed_keep(packing: Packing, batch, seq_len, causal, window, device) -> torch.Tensor:
    """(B, 1, S, S) bool, True where a query may see a key: causal (+ window), one sequence."""
    keep = keep_pattern(seq_len, causal, window, device)
    return keep & _same_sequence(packing.cu_seqlens, batch, seq_len, device)


def _theirs(kwargs: dict) -> dict:
    """The call's keywords without fastlm's own (transformers' functions get theirs only)."""
    if CHUNK_KWARG not in kwargs:  # most calls: no copy
        return kwargs
    return {k: v for k, v in kwargs.items() if k != CHUNK_KWARG}


def _eager_function(module: nn.Module):
    """The eager attention function of the module's modeling file; Gemma 2's (which soft-caps)
    for a model whose file has none."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as eager
    return eager


def _eager_fallback(module, query, key, value, attention_mask, causal, window, **kwargs):
    q_len = query.shape[2]
    if attention_mask is None and causal and q_len > 1 and key.shape[2] == q_len:
        # None means "causal, no padding" to sdpa-style mask builders; eager would read it as
        # "no mask", so spell it out.
        keep = keep_pattern(q_len, True, window, query.device)
        attention_mask = torch.zeros(keep.shape, dtype=query.dtype, device=query.device)
        attention_mask = attention_mask.masked_fill(~keep, torch.finfo(query.dtype).min)[None, None]
    return _eager_function(module)(module, query, key, value, attention_mask, **_theirs(kwargs))
