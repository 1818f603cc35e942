"""How the weight streamer moves bytes between host and device: an interface and two engines.

The streamer calls nothing else (``copy_async`` / ``record`` / ``wait`` and buffer allocation).
``CudaCopyEngine`` uses a side stream, events and ``cudaHostRegister``-pinned buffers (exact
sizes: PyTorch's pinned allocator rounds up to a power of two); ``SyncCopyEngine`` copies at
once and records every operation, so the streaming logic is tested on the CPU.

    engine = default_engine(torch.device("cuda"))   # CudaCopyEngine; SyncCopyEngine on the CPU
    stream_weights(model, engine=SyncCopyEngine())   # every copy logged in engine.ops
"""

from __future__ import annotations

import contextlib
import itertools
import os
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["CopyEngine", "CudaCopyEngine", "SyncCopyEngine", "default_engine"]


class CopyEngine:
    """How bytes move between host and device; the streamer calls nothing else.

    ``copy_async(dst, src, after, label)`` starts ``dst.copy_(src)`` once event ``after`` (from
    ``record``) has completed, returns an event for its completion; ``record(label)`` returns an
    event that completes when the work enqueued so far on the compute stream has; ``wait(event)``
    makes the compute stream wait for it. ``alloc_device`` / ``alloc_host`` give flat uint8
    buffers (``alloc_host`` returns whether the buffer could be pinned).
    """

    device: torch.device

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, after=None, label=None):
        raise NotImplementedError

    def record(self, label=None):
        raise NotImplementedError

    def wait(self, event) -> None:
        raise NotImplementedError

    def alloc_device(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def alloc_host(self, nbytes: int, pin: bool) -> tuple[torch.Tensor, bool]:
        return torch.empty(nbytes, dtype=torch.uint8), False

    def release_host(self, tensor: torch.Tensor, pinned: bool) -> None:
        pass

    def synchronize(self) -> None:
        pass


@dataclass(frozen=True)
class _Event:
    label: Any
    number: int


class SyncCopyEngine(CopyEngine):
    """Copies at once on the calling thread and logs every operation in ``ops`` (CPU, tests).

    ``ops`` holds ``("copy", layer, slot)``, ``("record",)`` and ``("wait", layer, slot)``.
    ``pin_limit`` simulates the OS refusing to pin more than that many bytes (None: no limit).
    """

    def __init__(self, device: torch.device | str = "cpu", pin_limit: int | None = None):
        self.device = torch.device(device)
        self.pin_limit = pin_limit
        self.pinned_bytes = 0
        self.ops: list[tuple] = []
        self._count = itertools.count()

    def copy_async(self, dst, src, after=None, label=None):
        dst.copy_(src)
        self.ops.append(("copy", *(label or ())))
        return _Event(label, next(self._count))

    def record(self, label=None):
        self.ops.append(("record",))
        return _Event(label, next(self._count))

    def wait(self, event) -> None:
        self.ops.append(("wait", *(event.label or ())))

    def alloc_host(self, nbytes: int, pin: bool) -> tuple[torch.Tensor, bool]:
        tensor = torch.empty(nbytes, dtype=torch.uint8)
        if pin and (self.pin_limit is None or self.pinned_bytes + nbytes <= self.pin_limit):
            self.pinned_bytes += nbytes
            return tensor, True
        return tensor, False

    def release_host(self, tensor: torch.Tensor, pinned: bool) -> None:
        if pinned:
            self.pinned_bytes -= tensor.numel()


class CudaCopyEngine(CopyEngine):
    """Copies on a side CUDA stream, ordered with events; host buffers pinned in place."""

    def __init__(self, device: torch.device | str = "cuda"):
        device = torch.device(device)
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        self.stream = torch.cuda.Stream(self.device)
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def copy_async(self, dst, src, after=None, label=None):
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    def record(self, label=None):
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def wait(self, event) -> None:
        torch.cuda.current_stream(self.device).wait_event(event)

    def alloc_host(self, nbytes: int, pin: bool) -> tuple[torch.Tensor, bool]:
        page = self._page
        # Whole pages of their own, so that no two registered ranges share a page.
        raw = torch.empty(nbytes + 2 * page, dtype=torch.uint8)
        start = -raw.data_ptr() % page
        tensor = raw[start : start + nbytes]
        if not pin or nbytes == 0:
            return tensor, False
        try:
            cudart = torch.cuda.cudart()
            size = -(-nbytes // page) * page
            status = cudart.cudaHostRegister(tensor.data_ptr(), size, 0)
        except (AttributeError, RuntimeError, TypeError):
            return tensor, False
        if status != cudart.cudaError.success:
            self._drop_last_error()
            return tensor, False
        return tensor, True

    def release_host(self, tensor: torch.Tensor, pinned: bool) -> None:
        if pinned:
            with contextlib.suppress(AttributeError, RuntimeError, TypeError):
                cudart = torch.cuda.cudart()
                if cudart.cudaHostUnregister(tensor.data_ptr()) != cudart.cudaError.success:
                    self._drop_last_error()

    def _drop_last_error(self) -> None:
        # A failed runtime call stays CUDA's "last error" until read; PyTorch reads it after its
        # next kernel launch and would raise there, far from here. Read it now and drop it.
        with contextlib.suppress(RuntimeError):
            torch.zeros(1, device=self.device).add_(1)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


def default_engine(device: torch.device) -> CopyEngine:
    """``CudaCopyEngine`` on a CUDA device, else ``SyncCopyEngine``.

    Usage: ``engine = default_engine(torch.device("cuda", 0))``.
    """
    return CudaCopyEngine(device) if device.type == "cuda" else SyncCopyEngine(device)
