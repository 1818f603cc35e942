"""Gradient checkpointing whose saved layer inputs live in pinned CPU RAM instead of the GPU.

Plain checkpointing keeps one (batch, seq, hidden) input per decoder layer on the GPU for the
whole step — 1 GiB for a 32-layer 7B model at 4,096 tokens. Here each layer's input is copied to
pinned host memory on a side stream as soon as the forward has produced it (the GPU copy is then
free), and copied back on the side stream while the layer after it is still being recomputed in
backward, so the copy overlaps compute. The layer runs under the autocast state of the forward,
so the recomputed graph is the one the forward built.

Pinned memory is finite: ``BUDGET`` (half the available RAM by default) caps what is offloaded;
beyond it, or when pinning fails, a layer keeps its input on the GPU (plain checkpointing for
that layer) and a warning says so once -- never a false out-of-memory error. Inputs under
``MIN_OFFLOAD_BYTES`` (short sequences) stay on the GPU too: there the copies cost more time
than the memory is worth.

    enable_offloaded_checkpointing(model)   # what use_gradient_checkpointing="fastlm" does
"""

from __future__ import annotations

import logging
import os
import threading
import weakref

import torch
from torch import nn

from fastlm.kernels.fused_linear_cross_entropy import set_loss_runner
from fastlm.offload.layer_graphs import LAYER_GRAPHS

logger = logging.getLogger("fastlm")

# Layer inputs smaller than this stay on the GPU: for short sequences the copies cost more time
# than the memory they save is worth (plain checkpointing is then the faster choice).
MIN_OFFLOAD_BYTES = 4 * 1024**2
_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


def default_pinned_budget() -> int:
    """Half of the RAM that is available now: pinned pages cannot be swapped out."""
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # not POSIX: a conservative 8 GiB
        return 8 * 1024**3
    return pages // 2


class PinnedBudget:
    """Bytes of pinned host memory the offloaded layer inputs may hold at once.

    ``reserve`` says whether a tensor may go to the host; when the budget is spent (or pinning
    fails) the layer keeps its input on the GPU -- plain checkpointing for that layer -- and this
    is logged once, instead of failing with an out-of-memory error.
    Usage: ``offload.BUDGET.limit = 16 * 2**30``.
    """

    def __init__(self, limit: int | None = None, min_bytes: int = MIN_OFFLOAD_BYTES):
        self.limit = default_pinned_budget() if limit is None else limit
        self.min_bytes = min_bytes
        self.in_use = 0
        self.fallbacks = 0
        self._lock = threading.Lock()
        self._warned: set[str] = set()  # the kinds of fallback already logged

    def reserve(self, nbytes: int) -> bool:
        if nbytes < self.min_bytes:
            return False
        with self._lock:
            if self.in_use + nbytes > self.limit:
                budget_gib = self.limit / 2**30
                self._input_stays(f"the pinned-memory budget of {budget_gib:.1f} GiB is spent")
                return False
            self.in_use += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.in_use -= nbytes

    def fall_back(self, kind: str, message: str) -> None:
        """Count one fallback; log ``message`` the first time a fallback of ``kind`` happens.
        Usage: ``budget.fall_back("activations", "... checkpointed instead ...")``."""
        self.fallbacks += 1
        if kind not in self._warned:
            self._warned.add(kind)
            logger.warning(message)

    def _input_stays(self, why: str) -> None:
        self.fall_back(
            "checkpoint",
            f"offloaded checkpointing: {why}; some layer inputs stay on the GPU (plain "
            "checkpointing for them). Raise fastlm.offload.BUDGET.limit to offload more.",
        )


BUDGET = PinnedBudget()


class _SavedInput:
    """A layer input kept for the backward: on the host (pinned) or, on fallback, on the GPU.

    Entries are stacked in forward order so that the backward of one layer can start copying
    the input of the layer before it (the next to be recomputed) while it computes.
    """

    def __init__(self, tensor: torch.Tensor, budget: PinnedBudget):
        self.device = tensor.device
        self.budget = budget
        self.nbytes = tensor.numel() * tensor.element_size()
        self.host = self.ready = self.on_device = None
        if tensor.is_cuda and budget.reserve(self.nbytes):
            try:
                self.host, self.ready = _to_host(tensor)
            except RuntimeError as error:  # pinning refused by the OS or the driver
                budget.release(self.nbytes)
                budget._input_stays(f"pinning host memory failed ({error})")
        if self.host is None:
            self.on_device = tensor.detach()

    def prefetch(self) -> None:
        """Start the copy back to the GPU on the side stream (no-op if it is there already)."""
        if self.on_device is not None or self.host is None:
            return
        self.on_device, self.ready = to_device(self.host, self.device, self.ready)

    def take(self) -> torch.Tensor:
        """The input on its device, ready to use on the current stream; frees the host copy."""
        self.prefetch()
        tensor, self.on_device = self.on_device, None
        if self.host is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.ready)
            tensor.record_stream(current)  # allocated on the side stream, used on this one
            self._free_host()
        return tensor

    def _free_host(self) -> None:
        if self.host is not None:
            self.host = None
            self.budget.release(self.nbytes)

    def __del__(self):  # a graph freed without backward (e.g. an exception) returns its budget
        self._free_host()


def to_device(host: torch.Tensor, device: torch.device, after):
    """Start an asynchronous copy of a pinned host tensor to ``device`` on the side stream, once
    event ``after`` has completed; returns (device tensor, same strides; completion event)."""
    stream = _copy_stream(device)
    with torch.cuda.stream(stream):
        if after is not None:
            stream.wait_event(after)
        tensor = torch.empty_strided(host.shape, host.stride(), dtype=host.dtype, device=device)
        tensor.copy_(host, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    return tensor, done


def _to_host(tensor: torch.Tensor):
    """Start an asynchronous copy to pinned memory (same strides: a dense view keeps its layout);
    returns (host tensor, completion event)."""
    stream = _copy_stream(tensor.device)
    stream.wait_stream(torch.cuda.current_stream(tensor.device))
    host = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, pin_memory=True)
    with torch.cuda.stream(stream):
        host.copy_(tensor, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    tensor.record_stream(stream)  # the allocator must not reuse it before the copy has read it
    return host, done


class PendingLayers:
    """The layers whose backward has not run yet, in forward order: what the backward of one
    layer starts copying in for the next (the layer before it).

    One list for all threads, behind a lock: the forward runs on the thread that calls the
    model, but autograd runs the backward of CUDA nodes on its own device thread, so a list per
    thread would leave the backward's look-ahead empty (no copy would overlap compute). Weak
    references: a graph dropped without a backward (a forward with grad whose loss is discarded)
    frees its entries as usual. Entries have ``prefetch()``.
    """

    def __init__(self) -> None:
        self._refs: list[weakref.ref] = []
        self._lock = threading.Lock()

    def push(self, item) -> None:
        with self._lock:
            self._refs = [ref for ref in self._refs if ref() is not None]
            self._refs.append(weakref.ref(item))

    def remove(self, item) -> None:
        with self._lock:
            self._refs = [ref for ref in self._refs if ref() is not None and ref() is not item]

    def last(self):
        """The most recent entry still alive (the next layer to be recomputed), or None."""
        with self._lock:
            while self._refs:
                item = self._refs[-1]()
                if item is not None:
                    return item
                self._refs.pop()
            return None

    def alive(self) -> list:
        with self._lock:
            return [item for item in (ref() for ref in self._refs) if item is not None]


PENDING = PendingLayers()


class _OffloadedCheckpoint(torch.autograd.Function):
    """out = run(hidden); saves hidden on the host; backward recomputes run and backpropagates."""

    @staticmethod
    def forward(ctx, run, hidden: torch.Tensor, *args):
        device_type = hidden.device.type
        ctx.autocast = (
            torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type),
        )
        ctx.run, ctx.args = run, args
        ctx.plan = LAYER_GRAPHS.plan(run, hidden, args)
        if ctx.plan is not None:  # a CUDA graph (no dropout: no RNG state to keep)
            output = ctx.plan.forward(run, hidden, args)
        else:
            _keep_rng_states(ctx, hidden)
            with torch.no_grad():
                output = run(hidden, *args)
        ctx.saved = _SavedInput(hidden, BUDGET)
        PENDING.push(ctx.saved)
        return _first(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        saved = ctx.saved
        PENDING.remove(saved)
        hidden = saved.take()
        following = PENDING.last()
        if following is not None:  # recomputed next (the layer before): bring its input in now
            following.prefetch()
        if ctx.plan is not None:
            grad = ctx.plan.backward(hidden, grad_output)
            if grad is not None:  # replayed; the parameters' gradients are in their .grad
                others = len(ctx.args)  # none needs a gradient (the plan checked)
                ctx.saved = ctx.run = ctx.args = ctx.plan = None
                return (None, grad, *([None] * others))
            _keep_rng_states(ctx, hidden)  # a first backward or a failed capture: eagerly
        hidden = hidden.detach().requires_grad_(True)
        # Other inputs with gradients (Gemma 4's per-layer input) are detached too and their
        # gradients returned: a graph several layers share is then walked once, by autograd.
        args = tuple(_as_leaf(arg) for arg in ctx.args)
        enabled, dtype = ctx.autocast
        devices = [hidden.device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, hidden.device)
            with (
                torch.enable_grad(),
                torch.autocast(hidden.device.type, dtype=dtype, enabled=enabled),
            ):
                output = _first(ctx.run(hidden, *args))
        torch.autograd.backward(output, grad_output)
        ctx.saved = ctx.run = ctx.args = ctx.plan = None
        return (None, hidden.grad, *(_leaf_grad(arg) for arg in args))


def _keep_rng_states(ctx, hidden: torch.Tensor) -> None:
    """The recompute must draw the same random numbers (LoRA dropout): keep the RNG states."""
    ctx.cpu_rng = torch.get_rng_state()
    ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _as_leaf(arg):
    if isinstance(arg, torch.Tensor) and arg.requires_grad:
        return arg.detach().requires_grad_(True)
    return arg


def _leaf_grad(arg):
    return arg.grad if isinstance(arg, torch.Tensor) and arg.requires_grad else None


def offloaded_checkpoint(run, hidden: torch.Tensor, *args):
    """Checkpoint ``run(hidden, *args)`` with ``hidden`` kept in pinned host memory.

    The signature of transformers' ``_gradient_checkpointing_func``: keyword arguments are
    already bound into ``run`` with functools.partial.
    """
    if not torch.is_grad_enabled():
        return run(hidden, *args)
    return _OffloadedCheckpoint.apply(run, hidden, *args)


def layers_will_replay(body: nn.Module, like: torch.Tensor) -> bool:
    """Whether ``body``'s next forward on tensors like ``like`` can replay its layers as CUDA
    graphs: graphs are on, the tensor is on their device, gradients are on and the body is
    training with fastlm's offloaded checkpointing (the only path that graphs layers). Callers
    that pad inputs to steady shapes for the graphs' sake ask this first, so that no other run
    pays for padding it does not need.

    Usage: ``if layers_will_replay(backbone, ids): packed = bucketed(packed, max_seq_length)``.
    """
    if not (LAYER_GRAPHS.would_graph(like) and torch.is_grad_enabled()):
        return False
    # transformers sets the flag and the function on each layer; the first speaks for them all.
    for module in body.modules():
        if getattr(module, "gradient_checkpointing", False) and module.training:
            return getattr(module, "_gradient_checkpointing_func", None) is offloaded_checkpoint
    return False


def set_checkpoint_function(model: nn.Module, function) -> None:
    """``function`` as the checkpoint function of every layer transformers checkpoints.

    Usage: ``set_checkpoint_function(peft_model, offloaded_checkpoint)``.
    """
    for module in model.modules():
        if hasattr(module, "_gradient_checkpointing_func"):
            module._gradient_checkpointing_func = function


def enable_offloaded_checkpointing(model: nn.Module) -> None:
    """Turn on checkpointing for every decoder layer, with their inputs offloaded to the host.

    Usage: ``enable_offloaded_checkpointing(peft_model)``.
    """
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    set_checkpoint_function(model, offloaded_checkpoint)
    # The recompute runs its own backward from the layer input, so the first layer's input (the
    # frozen embedding output) must be part of the graph.
    model.enable_input_require_grads()
    # With the layers graphed, the loss joins their memory pool (LayerGraphs.run_loss); while
    # they are off this runs the loss as a plain call.
    set_loss_runner(_run_loss)


def _run_loss(compute, *args):
    return LAYER_GRAPHS.run_loss(compute, *args)  # looked up per call: tests swap the instance
