"""Answers about a tensor's content, remembered per tensor: a mask or an offsets tensor is read
on the host once (on a GPU each read is a synchronisation) however many layers of a forward ask.

An answer is kept for the tensor's identity (a ``WeakIdKeyDictionary``: dropped with the tensor,
so a new tensor never reads an old one's answer; a ``WeakKeyDictionary`` would compare keys with
the tensor's elementwise ``==``), its in-place version (content written in place, e.g. a CUDA
graph's static copy, is read anew) and the question's key.

Usage::

    _SEEN = WeakIdKeyDictionary()
    verdict = remembered(_SEEN, mask, (seq_len,), lambda: bool(mask.all()))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["remember", "remembered", "version_of"]


def version_of(tensor: torch.Tensor) -> int | None:
    """The in-place version of a tensor; None for an inference tensor (``torch.inference_mode``:
    generation), which keeps none and which nothing changes between the layers of a forward."""
    return None if tensor.is_inference() else tensor._version


def remembered(table: WeakIdKeyDictionary, tensor: torch.Tensor, key: tuple, compute: Callable):
    """``compute()`` for ``tensor`` and ``key``, or the answer ``table`` kept for both (tensors in
    ``key`` compare by identity)."""
    hit = table.get(tensor)
    if hit is not None and hit[0] == version_of(tensor) and _same_key(hit[1], key):
        return hit[2]
    answer = compute()
    remember(table, tensor, key, answer)
    return answer


def remember(table: WeakIdKeyDictionary, tensor: torch.Tensor, key: tuple, answer: Any) -> None:
    """Keep ``answer`` as what ``tensor``'s current content gives for ``key``."""
    table[tensor] = (version_of(tensor), key, answer)


def _same_key(a: tuple, b: tuple) -> bool:
    if len(a) != len(b):
        return False
    return all(
        x is y if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor) else x == y
        for x, y in zip(a, b)
    )
