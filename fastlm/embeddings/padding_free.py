"""Padding-free embedding batches: a set of texts laid end to end in one row, the body run once.

A padded batch (B, S) of texts with lengths L_b runs the body's projections, MLPs and norms over
B·S tokens, B·S − Σ L_b of them padding. Packed, the same texts are one row of T = Σ L_b tokens:

    input_ids     (1, T)   the real tokens of every row, in order
    position_ids  (1, T)   0..L_b−1 per text (restarting: RoPE and transformers' masks see texts)
    cu_seq_lens   (B + 1,) text b at [a_b, a_b+1), a_0 = 0, a_B = T (also as cu_seq_lens_q/k)

These are the packing signals ``fastlm.models.packing`` reads: every attention call keeps the
texts apart (the varlen kernel over ``cu_seq_lens`` on CUDA; elsewhere the per-text mask), so
each text's token states are what the padded batch gives its real tokens, and pooling per text
(``pooling.pool_packed``) gives the padded batch's vectors. Nothing crosses a text boundary:
changing one text leaves the others' vectors as they were.

Which bodies take it (``body_problem``): fastlm-patched ones (their attention routes packed rows)
with eager or SDPA attention, no linear-attention layers (their recurrent state would run across
texts in transformers' fallback) and no bidirectional sliding-window layers (the kernel's window
is causal only: those layers would run SDPA over a T × T mask, costlier than the padding saved).
A batch without padding runs as it is (nothing to strip; its layers can replay as CUDA graphs).
Anything else runs padded, and ``BatchPath.reason`` says why.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fastlm.models import patch_state

__all__ = [
    "PADDED",
    "PADDING_FREE",
    "BatchPath",
    "PackedTexts",
    "body_problem",
    "bucketed",
    "join_packed",
    "pack_texts",
]

PADDING_FREE = "padding-free"  # BatchPath.layout: the texts in one packed row
PADDED = "padded"  # ... and a (B, S) batch padded to its longest text
NO_PADDING = "no padding in the batch (every text fills the row)"  # pack_texts' reason
_ATTENTION = (None, "eager", "sdpa", "fastlm")  # the implementations models/attention.py routes


class BatchPath(NamedTuple):
    """How an embedding forward laid out its texts: ``layout`` (``PADDING_FREE`` or ``PADDED``)
    and ``reason``: why padded ("" when padding-free)."""

    layout: str
    reason: str = ""


class PackedTexts(NamedTuple):
    """One row of texts (see module doc): ``inputs`` for the body (input_ids, position_ids,
    cu_seq_lens_q/k, max_length_q/k[, token_type_ids]); ``cu_seqlens`` int32 (B + 1,);
    ``max_length`` the longest text."""

    inputs: dict
    cu_seqlens: torch.Tensor
    max_length: int


def body_problem(backbone: nn.Module) -> str:
    """Why ``backbone`` cannot run packed rows exactly ("" when it can).

    Usage: ``reason = body_problem(model.backbone)``.
    """
    state = patch_state(backbone)
    config = backbone.config
    if state is None:
        return (
            f"{config.model_type} body runs transformers' code (padding-free rows need fastlm's "
            "patched attention)"
        )
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in _ATTENTION:
        return f'attn_implementation="{implementation}" (padding-free rows: eager or sdpa)'
    if state.spec.linear_attention is not None:
        return "linear-attention layers (their recurrent state is not split at text boundaries)"
    for module in backbone.modules():
        if type(module).__name__ != state.spec.attention_class:
            continue
        if not getattr(module, "is_causal", True) and getattr(module, "sliding_window", None):
            return (
                "bidirectional sliding-window layers (the varlen kernel's window is causal "
                "only; they would run SDPA over the whole packed row)"
            )
    return ""


def pack_texts(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
    *,
    unpadded: bool = False,
) -> PackedTexts | str:
    """A padded batch (B, S) (either padding side) as one packed row, or why it cannot be.
    A batch without padding packs only with `unpadded` (to join a padded one: ``join_packed``).

    Usage: ``packed = pack_texts(ids, mask); hidden = body(**packed.inputs).last_hidden_state``.
    """
    real = attention_mask.bool()  # (B, S)
    lengths = real.sum(dim=1)
    starts = real & ~F.pad(real, (1, 0))[:, :-1]  # where a span of real tokens begins
    shortest, longest, total, spans = torch.stack(
        [lengths.min(), lengths.max(), lengths.sum(), starts.sum(dim=1).max()]
    ).tolist()  # one host copy: the kernel's max_length and the row's length T
    if shortest == 0:
        return "a text with no tokens"
    if shortest == input_ids.shape[1] and not unpadded:
        # Nothing to strip: the padded batch is the same work, and its fixed shape replays the
        # layers' CUDA graphs without the padding text a packed row needs (``bucketed``).
        return NO_PADDING
    if spans > 1:
        return "padding between a text's tokens (a custom attention_mask)"
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)  # (B + 1,)
    firsts = cu_seqlens[:-1].long().repeat_interleave(lengths, output_size=total)
    position_ids = torch.arange(total, device=input_ids.device) - firsts  # 0..L_b−1 per text
    inputs = {
        "input_ids": input_ids[real][None],  # row-major: row b's tokens in order, then row b+1
        "position_ids": position_ids[None],
        "cu_seq_lens_q": cu_seqlens,
        "cu_seq_lens_k": cu_seqlens,
        "max_length_q": longest,
        "max_length_k": longest,
        "use_cache": False,  # a cache would make transformers build one row-wide mask
    }
    if token_type_ids is not None:
        inputs["token_type_ids"] = token_type_ids[real][None]
    return PackedTexts(inputs, cu_seqlens, longest)


def join_packed(parts: list[PackedTexts]) -> PackedTexts:
    """Several packed rows as one: their texts end to end, in order (part 0's texts first).

    The body then runs once for all of them -- a loss's queries, positives and negatives in one
    call instead of one call per side, which halves the launches of a host-paced step -- and
    each text still attends to itself only (the joined ``cu_seqlens`` keeps every boundary).

    Usage: ``joined = join_packed([pack_texts(q_ids, q_mask), pack_texts(d_ids, d_mask)])``.
    """
    if len(parts) == 1:
        return parts[0]
    with_types = ["token_type_ids" in part.inputs for part in parts]
    if any(with_types) and not all(with_types):
        raise ValueError("join_packed: token_type_ids in some parts only")
    ends = torch.stack([part.cu_seqlens[-1] for part in parts])
    shifts = F.pad(ends.cumsum(0), (1, 0))[:-1].to(torch.int32)  # where each part starts
    later = [part.cu_seqlens[1:] + shift for part, shift in zip(parts, shifts)]
    cu_seqlens = torch.cat([parts[0].cu_seqlens[:1], *later])
    longest = max(part.max_length for part in parts)
    inputs = {
        key: torch.cat([part.inputs[key] for part in parts], dim=1)
        for key in ("input_ids", "position_ids", "token_type_ids")
        if key in parts[0].inputs
    }
    inputs |= {
        "cu_seq_lens_q": cu_seqlens,
        "cu_seq_lens_k": cu_seqlens,
        "max_length_q": longest,
        "max_length_k": longest,
        "use_cache": False,
    }
    return PackedTexts(inputs, cu_seqlens, longest)


def bucketed(packed: PackedTexts, max_text: int) -> PackedTexts:
    """The same texts in a row of a steadier shape, for layer graphs (which replay a layer only
    for a shape they captured): the row's T tokens padded with token 0 up to a multiple of a
    quarter of T's power of two (at least 64; T = 10,800 -> 12,288), and the attention's
    max_length_q/k raised to a power of two at least the longest text (the kernel needs only an
    upper bound).

    The padding is a fixed number of extra texts for the bucket, each at most ``max_text``
    tokens (the model's max_seq_length, rounded down to a power of two, and at most the
    bucket's quarter), so that no padding text is longer than a text the model takes, and a
    bucket's rows keep one ``cu_seq_lens`` length and one max_length. They are sequences of their
    own: no real text attends to them, and ``cu_seqlens`` / ``max_length`` (what pooling reads)
    still list the real texts only.
    Usage: ``packed = bucketed(join_packed(parts), model.max_seq_length)``.
    """
    total = int(packed.inputs["input_ids"].shape[1])
    step = max(64, (1 << (total + 1).bit_length() - 1) // 4)
    piece = min(step, 1 << (max(max_text, 1).bit_length() - 1))  # a power of two <= max_text
    count = -(-step // piece)  # padding texts: enough for up to `step` tokens
    padded = -(-(total + count) // step) * step  # at least one token per padding text
    lengths = _split(padded - total, count)
    ids = packed.inputs["input_ids"]
    tail = torch.cat([torch.arange(n, device=ids.device) for n in lengths])
    inputs = dict(packed.inputs)
    inputs["input_ids"] = torch.cat([ids, ids.new_zeros(1, padded - total)], dim=1)
    inputs["position_ids"] = torch.cat([packed.inputs["position_ids"], tail[None]], dim=1)
    if "token_type_ids" in inputs:
        types = inputs["token_type_ids"]
        inputs["token_type_ids"] = torch.cat([types, types.new_zeros(1, padded - total)], dim=1)
    ends = packed.cu_seqlens.new_tensor(list(itertools.accumulate(lengths, initial=total))[1:])
    cu = torch.cat([packed.cu_seqlens, ends])  # int32, as the kernel and the graphs take it
    # Bounded by `piece`, not by the padding texts' own lengths: every row of the bucket then
    # has the same max_length (a step's longest real text still raises it past a power of two).
    longest = 1 << max(4, (max(packed.max_length, piece) - 1).bit_length())
    inputs |= {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest,
               "max_length_k": longest}  # fmt: skip
    return PackedTexts(inputs, packed.cu_seqlens, packed.max_length)


def _split(tokens: int, count: int) -> list[int]:
    """``tokens`` as ``count`` lengths that differ by at most one, each at least 1."""
    base, extra = divmod(tokens, count)
    return [base + 1] * extra + [base] * (count - extra)
