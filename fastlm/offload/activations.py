"""Decoder layers whose saved activations wait in pinned CPU RAM: no recompute in the backward.

Checkpointing (``checkpoint.py``) keeps a layer's input and runs the layer again in the backward:
a second forward, a third of a LoRA step's matmul work (frozen weights need no dW) and, for the
small shapes that the host paces, a third more kernel launches. Here each layer runs once, with
grad. Every large tensor its autograd graph saves is copied to pinned host memory on a side
stream as it is saved, and the GPU copy is freed once that copy is done. In the backward the
tensors come back a layer ahead. The GPU holds about two layers' activations at a time; the host
holds the rest (about 12 GiB for an 8B model at 4,096 tokens).

- **The bus.** Each saved byte crosses PCIe twice. A layer's copies overlap the next layer's
  compute. Before queueing a layer, the host waits until the copies of the layer ``_AHEAD``
  before it are done. A GPU that outruns the bus then slows to the bus instead of filling up
  with activations waiting to be copied.
- **Pinned RAM.** The shared ``BUDGET`` (``checkpoint.py``) caps it. A layer whose activations
  would not fit is checkpointed instead, with its input offloaded, and a warning says so once.
- **What stays.** Tensors under the budget's ``min_bytes`` stay on the GPU, as do parameters and
  tensors that are not dense (views with gaps); they are kept as autograd keeps them.

    enable_offloaded_activations(model)   # what use_gradient_checkpointing="activations" does
"""

from __future__ import annotations

import collections
import logging
import threading
import weakref

import torch
from torch import nn

from fastlm.offload import checkpoint
from fastlm.offload.checkpoint import offloaded_checkpoint

logger = logging.getLogger("fastlm")
_AHEAD = 1  # layers whose copies may still be running when the host queues the next layer
_LOCAL = threading.local()  # per thread: the stashes whose copies may still run


def _is_dense(tensor: torch.Tensor) -> bool:
    """True when the tensor's elements fill one block of memory (any order of dims, no gaps)."""
    expected = 1
    for size, stride in sorted(zip(tensor.shape, tensor.stride()), key=lambda pair: pair[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _offloadable(tensor: torch.Tensor) -> bool:
    """Which saved tensors go to the host (the CPU tests widen it to CPU tensors)."""
    return tensor.is_cuda


def _copy_out(tensor: torch.Tensor):
    """(host copy, completion event or None) of a saved tensor, same strides."""
    if tensor.is_cuda:
        return checkpoint._to_host(tensor)
    return tensor.clone(memory_format=torch.preserve_format), None  # the CPU tests' stand-in


def _copy_in(host: torch.Tensor, device: torch.device, after):
    """(device copy, completion event or None) of a host tensor, started after ``after``."""
    if device.type != "cuda":
        return host.clone(memory_format=torch.preserve_format), None
    return checkpoint.to_device(host, device, after)


class _Stashed:
    """One saved tensor: on the host after the forward, back on its device for the backward."""

    __slots__ = ("host", "ready", "device", "on_device", "nbytes", "budget")

    def __init__(self, tensor: torch.Tensor, nbytes: int, budget) -> None:
        self.device, self.nbytes, self.budget = tensor.device, nbytes, budget
        self.on_device = None
        self.host, self.ready = _copy_out(tensor)

    def prefetch(self) -> None:
        if self.on_device is None and self.host is not None:
            self.on_device, self.ready = _copy_in(self.host, self.device, self.ready)

    def take(self) -> torch.Tensor:
        """The tensor on its device, usable on the current stream; frees the host copy."""
        self.prefetch()
        if self.host is not None:
            if self.ready is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(self.ready)
                self.on_device.record_stream(current)  # made on the side stream, used here
            self.host = None
            self.budget.release(self.nbytes)
        return self.on_device

    def __del__(self):  # a graph dropped without a backward returns its budget
        if self.host is not None:
            self.host = None
            self.budget.release(self.nbytes)


class _LayerStash:
    """The saved tensors of one layer's forward: autograd's pack/unpack hooks for that layer."""

    def __init__(self, budget) -> None:
        self.budget = budget
        self.items: list[_Stashed] = []
        self.nbytes = 0  # what went to the host
        self.started = False

    def pack(self, tensor: torch.Tensor):
        nbytes = tensor.numel() * tensor.element_size()
        if (
            isinstance(tensor, nn.Parameter)
            or not _offloadable(tensor)
            or not _is_dense(tensor)
            or not self.budget.reserve(nbytes)
        ):
            return tensor
        item = _Stashed(tensor, nbytes, self.budget)
        self.items.append(item)
        self.nbytes += nbytes
        return item

    def unpack(self, packed):
        if not isinstance(packed, _Stashed):
            return packed
        if not self.started:  # this layer's backward begins: bring it in, and the one before
            self.started = True
            checkpoint.PENDING.remove(self)
            self.prefetch()
            self.items = []  # the graph holds them now: each is freed after its node's backward
            following = checkpoint.PENDING.last()
            if following is not None:
                following.prefetch()
        return packed.take()

    def prefetch(self) -> None:
        for item in self.items:
            item.prefetch()

    def wait_copied(self) -> None:
        """Host wait until this layer's copies to the host are done (one stream: the last)."""
        events = [i.ready for i in self.items if i.ready is not None and i.host is not None]
        if events:
            events[-1].synchronize()


def _estimate() -> int:
    """Bytes the last stashed layer sent to the host (the next is assumed alike), or 0."""
    return getattr(_LOCAL, "last_nbytes", 0)


def offloaded_activations(run, hidden: torch.Tensor, *args):
    """Run ``run(hidden, *args)`` once, its large saved tensors kept on the host until backward.

    The signature of transformers' ``_gradient_checkpointing_func`` (keyword arguments bound
    into ``run``). Falls back to ``offloaded_checkpoint`` when the pinned budget cannot hold
    another layer like the last one.
    """
    if not torch.is_grad_enabled():
        return run(hidden, *args)
    budget = checkpoint.BUDGET
    estimate = _estimate()
    if estimate and budget.in_use + estimate > budget.limit:
        budget.fall_back(
            "activations",
            f"offloaded activations: the pinned-memory budget ({budget.limit / 2**30:.1f} GiB) "
            "has no room for another layer's activations; such layers are checkpointed "
            "(recomputed) instead. Raise fastlm.offload.BUDGET.limit to keep more.",
        )
        return offloaded_checkpoint(run, hidden, *args)
    stash = _LayerStash(budget)
    with torch.autograd.graph.saved_tensors_hooks(stash.pack, stash.unpack):
        output = run(hidden, *args)
    if stash.items:
        _LOCAL.last_nbytes = stash.nbytes
        checkpoint.PENDING.push(stash)
        _throttle(stash)
    return output


def _throttle(stash: _LayerStash) -> None:
    """Keep the host at most ``_AHEAD`` layers ahead of the copies to the host."""
    recent = getattr(_LOCAL, "recent", None)
    if recent is None:
        recent = _LOCAL.recent = collections.deque()
    recent.append(weakref.ref(stash))
    while len(recent) > _AHEAD:
        older = recent.popleft()()
        if older is not None:
            older.wait_copied()


def enable_offloaded_activations(model: nn.Module) -> None:
    """Every decoder layer runs once, its saved activations offloaded to pinned host memory.

    Usage: ``enable_offloaded_activations(peft_model)``.
    """
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpoint.set_checkpoint_function(model, offloaded_activations)
    # The fallback (offloaded_checkpoint) recomputes from the layer input: it must be in the graph.
    model.enable_input_require_grads()
