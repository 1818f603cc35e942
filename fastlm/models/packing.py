"""Which sequences a padding-free (packed) batch holds, read the way transformers reads them.

A collator that packs (``DataCollatorWithFlattening``, TRL's ``padding_free``) lays several
sequences end to end in one row and says where they start in one or both of two ways; the
decoder layers pass both on to every attention call:
- ``cu_seq_lens_q/k`` and ``max_length_q/k`` keyword arguments (``return_flash_attn_kwargs``):
  token offsets a_0 = 0 < ... < a_n = T, sequence s at [a_s, a_s+1). Used first, as transformers'
  flash-attention path does.
- ``position_ids`` (B, S): a new sequence starts wherever a position is not the one before it
  plus one. ``masking_utils.find_packed_sequence_indices`` splits rows the same way, so the eager
  mask transformers builds from them has the same blocks. Rows are laid end to end, so a batch of
  several packed rows is one list of sequences over its B·S tokens.

Reading either costs one host copy (a synchronisation on CUDA); the answer is kept per tensor, so
the layers of one forward pay it once. A forward whose caller passed neither (``caller_signals``:
the model then makes its own 0..S-1 positions, one sequence per row) reads nothing, so an
ordinary training step keeps the host running ahead of the GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import NamedTuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from fastlm.models.tensor_memo import remember, remembered

__all__ = [
    "MAX_SEQUENCES",
    "Packing",
    "as_keywords",
    "assume_packing",
    "caller_signals",
    "chunks_of",
    "packed_sequences",
    "positions_in_sequences",
    "sequence_ids",
]

MAX_SEQUENCES = 65535  # the packed kernel's grid has one program column per sequence (CUDA's limit)


class Packing(NamedTuple):
    """Packed sequences over a batch's B·S tokens: ``cu_seqlens`` int32 (n + 1,), ``max_seqlen``,
    ``source`` ("cu_seq_lens" or "position_ids"), ``problem`` (why they cannot be used, "" if
    they can)."""

    cu_seqlens: torch.Tensor
    max_seqlen: int
    source: str
    problem: str = ""
    offsets: tuple[int, ...] = ()  # cu_seqlens as read on the host, where they were read


# signal tensor -> (its version, (batch, seq_len, the other tensor), Packing or None)
_SEEN: WeakIdKeyDictionary = WeakIdKeyDictionary()
# Whether the running forward's caller passed position_ids / cu_seq_lens: None when unknown (a
# body called directly), False when the model made its own positions.
_CALLER: ContextVar[bool | None] = ContextVar("fastlm_packing_caller", default=None)


@contextlib.contextmanager
def caller_signals(present: bool) -> Iterator[None]:
    """Within it, attention calls know whether the caller gave packing signals; without them
    position_ids are the model's own 0..S-1 and are not read (no synchronisation).

    Usage: ``with caller_signals("position_ids" in kwargs): model_body(**kwargs)``.
    """
    token = _CALLER.set(present)
    try:
        yield
    finally:
        _CALLER.reset(token)


def packed_sequences(kwargs: dict, batch: int, seq_len: int) -> Packing | None:
    """The sequences an attention call's batch packs, or None for one sequence per row.

    Usage: ``packing = packed_sequences(kwargs, query.shape[0], query.shape[2])``.
    """
    cu_q = kwargs.get("cu_seq_lens_q")
    signals = (cu_q, kwargs.get("cu_seq_lens_k"), kwargs.get("max_length_q"))
    if all(s is not None for s in (*signals, kwargs.get("max_length_k"))):
        if not isinstance(cu_q, torch.Tensor):  # a list: nothing to key a cache on
            return _from_cu_seq_lens(cu_q, batch, seq_len, signals[1])
        return _cached(cu_q, (batch, seq_len, signals[1]), _from_cu_seq_lens)
    position_ids = kwargs.get("position_ids")
    if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2:
        read = _from_position_ids if _CALLER.get() is not False else _one_per_row
        # Remembered per tensor: a recompute in the backward (another thread, where the caller's
        # context is unknown) finds the forward's answer.
        return _cached(position_ids, (batch, seq_len, None), read)
    return None


def assume_packing(kwargs: dict, batch: int, seq_len: int, packed: bool) -> None:
    """Record, without reading them, what ``kwargs``' int32 ``cu_seq_lens_q/k`` hold: sequences
    of at most ``max_length_q`` tokens (``packed``), or one sequence (not packed). The next
    ``packed_sequences`` over these tensors answers from it.

    For static copies of offsets already read and checked elsewhere: a CUDA graph's input
    buffers, which a capturing stream must not read back (``offload.layer_graphs``). The kernel
    needs only max_length_q >= the longest sequence, so a replay whose offsets differ from the
    capture's stays exact. Usage: ``assume_packing(buffers, 1, total, packed=True)``.
    """
    cu_q = kwargs["cu_seq_lens_q"]
    packing = Packing(cu_q, int(kwargs["max_length_q"]), "cu_seq_lens") if packed else None
    remember(_SEEN, cu_q, (batch, seq_len, kwargs["cu_seq_lens_k"]), packing)


def _one_per_row(position_ids: torch.Tensor, batch: int, seq_len: int, _) -> None:
    return None  # the model's own positions: nothing packed, nothing read


def sequence_ids(cu_seqlens: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """(T,) index of the sequence each token belongs to: ``sequence_ids(cu, 7)``."""
    starts = torch.zeros(n_tokens + 1, dtype=torch.long, device=cu_seqlens.device)
    inner = cu_seqlens[1:-1].long()  # equal offsets (empty sequences) add up
    starts.index_add_(0, inner, torch.ones_like(inner))
    return starts[:n_tokens].cumsum(0)


def as_keywords(packing: Packing, seq_len: int) -> dict:
    """One row's packed sequences as the ``cu_seq_lens_q/k`` and ``max_length_q/k`` keywords
    (what ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` adds), remembered as
    read, so that the layers that find them read nothing back.

    Usage: ``kwargs.update(as_keywords(packed_sequences(kwargs, 1, seq_len), seq_len))``."""
    cu = packing.cu_seqlens
    remember(_SEEN, cu, (1, seq_len, cu), packing._replace(source="cu_seq_lens"))
    return dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=packing.max_seqlen,
                max_length_k=packing.max_seqlen)  # fmt: skip


def chunks_of(packing: Packing, chunk: int) -> Packing:
    """The packed sequences cut every ``chunk`` tokens from each one's own first token: what a
    chunked-attention layer (Llama 4) lets each sequence see when it runs alone. Each sequence
    gives ceil(max_seqlen / chunk) pieces, empty ones kept, so the count needs no host read.

    Usage: ``pieces = chunks_of(packing, 8192)``."""
    key = (chunk, packing.max_seqlen)
    return remembered(_CHUNKED, packing.cu_seqlens, key, lambda: _cut(packing, chunk))


def _cut(packing: Packing, chunk: int) -> Packing:
    cu = packing.cu_seqlens
    pieces = -(-packing.max_seqlen // chunk)
    starts = torch.arange(0, pieces * chunk, chunk, device=cu.device)
    lengths = (cu[1:] - cu[:-1]).long()
    sizes = (lengths[:, None] - starts).clamp(0, chunk).flatten()  # (n * pieces,)
    bounds = torch.cat([cu[:1].long(), cu[:1].long() + sizes.cumsum(0)]).to(torch.int32)
    longest = min(chunk, packing.max_seqlen)
    return packing._replace(cu_seqlens=bounds, max_seqlen=longest, offsets=())


def positions_in_sequences(packing: Packing, n_tokens: int) -> torch.Tensor:
    """(T,) each token's position within its own packed sequence (0 at every sequence's first
    token): the positions a sequence has when it runs alone.

    Usage: ``t = positions_in_sequences(packing, batch * seq_len)``."""
    cu = packing.cu_seqlens.to(torch.long)
    index = torch.arange(n_tokens, device=cu.device)
    return index - cu[sequence_ids(cu, n_tokens)]


# --------------------------------------------------------------------------- helpers

# cu_seqlens -> (its version, (chunk, max_seqlen), the sequences cut into chunks): the chunked
# layers of one forward share one cut; offsets rewritten in place (a graph's static copy) cut anew.
_CHUNKED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _cached(signal: torch.Tensor, key: tuple, read) -> Packing | None:
    return remembered(_SEEN, signal, key, lambda: read(signal, *key))


def _from_position_ids(position_ids: torch.Tensor, batch: int, seq_len: int, _) -> Packing | None:
    if position_ids.shape[-1] != seq_len or position_ids.shape[0] not in (1, batch):
        return None
    rows = position_ids.expand(batch, -1)
    starts = torch.ones(rows.shape, dtype=torch.bool, device=rows.device)
    starts[:, 1:] = rows.diff(dim=-1) != 1  # as find_packed_sequence_indices splits them
    first = starts.flatten().nonzero().flatten()
    if first.numel() == batch:  # only the rows' own first tokens: nothing packed
        return None
    end = first.new_tensor([batch * seq_len])
    return _packing(torch.cat([first, end]).to(torch.int32), "position_ids")


def _from_cu_seq_lens(cu_q: torch.Tensor, batch: int, seq_len: int, cu_k) -> Packing | None:
    cu = torch.as_tensor(cu_q).to(torch.int32)
    if batch != 1:
        return Packing(cu, 0, "cu_seq_lens", f"cu_seq_lens with {batch} rows (packing is one row)")
    if cu_k is not cu_q and not torch.equal(cu, torch.as_tensor(cu_k).to(cu)):
        return Packing(cu, 0, "cu_seq_lens", "cu_seq_lens_q and cu_seq_lens_k differ")
    offsets = cu.tolist()
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != seq_len:
        problem = f"cu_seq_lens {offsets} do not run from 0 to the row's {seq_len} tokens"
        return Packing(cu, 0, "cu_seq_lens", problem)
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        return Packing(cu, 0, "cu_seq_lens", f"cu_seq_lens {offsets} are not ascending")
    return None if len(offsets) == 2 else _packing(cu, "cu_seq_lens", offsets)


def _packing(cu: torch.Tensor, source: str, offsets: list | None = None) -> Packing:
    offsets = cu.tolist() if offsets is None else offsets
    n = len(offsets) - 1
    max_seqlen = max(b - a for a, b in zip(offsets, offsets[1:]))
    if n > MAX_SEQUENCES:
        problem = f"{n} packed sequences (the kernel takes {MAX_SEQUENCES}; split the batch)"
        return Packing(cu, max_seqlen, source, problem)
    return Packing(cu, max_seqlen, source, offsets=tuple(offsets))
