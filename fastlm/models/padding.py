"""Which tokens of a padded batch are real, read from the 4D mask transformers built.

A tokenizer's ``attention_mask`` (B, S) of 1s and 0s reaches the attention calls as the mask
transformers builds from it (``masking_utils.sdpa_mask`` / ``eager_mask``):

    keep[b, 0, i, j] = pattern(i, j) and real[b, j]

where the pattern is causal (j <= i), causal with a window (i - j < window) or bidirectional, and
only keys are masked (``padding_mask_function``): a pad query keeps the pattern over the real keys.
Every pattern keeps i = j, so the diagonal holds ``real``; the mask is padding exactly when it
equals the formula rebuilt from its diagonal, element for element (bool: True kept; eager's
additive mask: 0 kept, dtype-min dropped). Anything else (a bias, a key dropped inside a row, a
different window) is a custom mask and is refused.

Where each row's real tokens are one span (right, left or both-sided padding), the rows are
variable-length sequences: gathering them into one run of T tokens (unpad), the packed kernel
over ``cu_seqlens`` computes, for every real query, exactly what the masked attention does, and
the output goes back to (B, S) with zeros at the pad queries (pad). The window and the causal
test use positions relative to the span's start, which is why a hole in a row is refused.
RoPE is the model's: q and k arrive already rotated with the positions it chose.

Chunked attention (Llama 4's "chunked_attention" layers, ``chunk``): the pattern also keeps a
query within its chunk of ``chunk`` positions, counted from the row's first real token as
transformers' mask counts them (left padding shifts the chunks). Each row's span of real tokens
is then cut every ``chunk`` tokens into sequences of their own, which the same launch runs.

Reading the mask costs a host copy (a synchronisation on CUDA) and a pass over B x S x S; the
answer is kept per mask tensor, so the layers of one forward pay it once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from fastlm.kernels.flash_attention import keep_pattern
from fastlm.models.tensor_memo import remembered

__all__ = ["Padding", "keeps_exactly", "pad", "padded_rows", "unpad"]


class Padding(NamedTuple):
    """The real tokens of a padded batch: ``indices`` (T,) int64, their places among the B·S
    tokens laid end to end; ``cu_seqlens`` int32 (B + 1,), row b's tokens at [cu[b], cu[b+1]) of
    the T (chunked: (B·C + 1,), chunk c of row b the (b·C + c)-th sequence); ``max_seqlen`` the
    longest; ``problem`` why the kernel cannot take them ("" if it
    can)."""

    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    problem: str = ""


# mask tensor -> (its version, (batch, seq_len, causal, window, chunk), Padding or None)
_SEEN: WeakIdKeyDictionary = WeakIdKeyDictionary()


def padded_rows(
    mask: torch.Tensor | None,
    batch: int,
    seq_len: int,
    causal: bool,
    window: int | None,
    chunk: int | None = None,
) -> Padding | None:
    """The real tokens where a (B, 1, S, S) mask is exactly padding on the causal (+ window) or
    bidirectional pattern (within chunks of ``chunk`` positions, if given: each row's real tokens
    cut at the chunk bounds); None for any other mask.

    Usage: ``padding = padded_rows(mask, q.shape[0], q.shape[2], causal=True, window=None)``.
    """
    if mask is None or tuple(mask.shape) != (batch, 1, seq_len, seq_len):
        return None
    key = (batch, seq_len, causal, window, chunk)
    return remembered(_SEEN, mask, key, lambda: _read(mask, seq_len, causal, window, chunk))


def keeps_exactly(mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """0-dim bool tensor: the mask keeps exactly ``keep`` and adds nothing to the kept scores.

    Usage: ``bool(keeps_exactly(mask, keep_pattern(s, True, None, mask.device)))``.
    """
    if mask.dtype == torch.bool:
        return (mask == keep).all()
    if mask.is_floating_point():  # eager's additive mask: 0 kept, dtype-min (or -inf) dropped
        dropped = mask <= torch.finfo(mask.dtype).min
        return torch.where(keep, mask == 0, dropped).all()
    return torch.zeros((), dtype=torch.bool, device=mask.device)


def unpad(t: torch.Tensor, padding: Padding) -> torch.Tensor:
    """The real tokens of ``t`` (B, H, S, D) as one run (T, H, D); a gather, differentiable.

    Usage: ``q_real = unpad(query, padding)``.
    """
    batch, heads, seq, d = t.shape
    # A view where the storage is (B, S, H, D), as the patched attention leaves q, k, v.
    return t.transpose(1, 2).reshape(batch * seq, heads, d).index_select(0, padding.indices)


def pad(out: torch.Tensor, padding: Padding, batch: int, seq_len: int) -> torch.Tensor:
    """The real tokens' output (T, H, D) back in place, (B, S, H, D), zeros at the padding.

    Usage: ``output = pad(out_real, padding, batch, seq_len)``.
    """
    full = out.new_zeros(batch * seq_len, *out.shape[1:])
    return full.index_copy(0, padding.indices, out).view(batch, seq_len, *out.shape[1:])


# --------------------------------------------------------------------------- helpers


def _read(
    mask: torch.Tensor, seq_len: int, causal: bool, window: int | None, chunk: int | None
) -> Padding | None:
    diagonal = mask[:, 0].diagonal(dim1=-2, dim2=-1)  # (B, S): every pattern keeps i = j
    real = diagonal if mask.dtype == torch.bool else diagonal == 0
    pattern = keep_pattern(seq_len, causal, window, mask.device)
    if chunk is not None:  # (B, 1, S, S): the chunks count from each row's first real token
        first = real.long().argmax(-1, keepdim=True)  # 0 for a row without real tokens
        chunks = (torch.arange(seq_len, device=mask.device) - first).div(
            chunk, rounding_mode="floor"
        )
        pattern = pattern & (chunks[:, None, :, None] == chunks[:, None, None, :])
    keep = pattern & real[:, None, None, :]
    starts = real & ~F.pad(real, (1, 0))[:, :-1]  # where a span of real tokens begins
    lengths = _sequence_lengths(real, chunk)
    checks = torch.stack([keeps_exactly(mask, keep), (starts.sum(-1) <= 1).all()]).long()
    exact, one_span, longest = torch.cat([checks, lengths.max()[None]]).tolist()  # one host copy
    if not exact:
        return None
    indices = real.flatten().nonzero().flatten()
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    problem = ""
    if not one_span:
        problem = "padding between a row's tokens (the kernel takes one span per row)"
    elif not longest:
        problem = "every token is padding"
    return Padding(indices, cu_seqlens, longest, problem)


def _sequence_lengths(real: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """Real tokens per sequence, row by row: one sequence a row, or one a chunk of a row
    (empty ones included: the launch skips them), so that the count never depends on the data."""
    lengths = real.sum(-1)
    if chunk is None:
        return lengths
    starts = torch.arange(0, real.shape[1], chunk, device=real.device)  # of the chunks, in a span
    return (lengths[:, None] - starts).clamp(0, chunk).flatten()
