"""Big models on small GPUs: 4-bit NF4 decoder-layer weights kept in CPU RAM, streamed to the GPU.

A QLoRA model's packed NF4 weights (``Params4bit``, 0.5 byte a weight, plus one absmax byte per
64) are 85-95 % of its bytes. Here each decoder layer's packed weights and absmax live in one
flat buffer in pinned CPU RAM; the GPU holds ``slots`` flat buffers (default 2) of one layer each,
and a layer is made resident by one asynchronous copy on a side CUDA stream while the layer
before it computes. Embeddings, head, norms, the small second-level quantisation state, LoRA
weights, their gradients and optimiser state stay on the GPU.

How a layer becomes resident (``WeightStreamer``):

- Residency is direct-mapped: the layer at streamed position ``p`` always uses slot
  ``p % slots`` (its *home* slot), at the same offsets. A layer's ``Params4bit.data`` and
  ``quant_state.absmax`` are re-pointed at its views of the slot when it is entered, and back at
  its host buffer when another layer takes the slot, so anything that reads the weight outside
  the forward (a merge, ``state_dict``) reads the right bytes from the host.
- A forward pre-hook on each decoder layer enters it: start its copy if it is not on the GPU,
  make the compute stream wait for the copy's event, bind the views, then start the copies of
  the next ``slots - 1`` layers (wrapping to layer 0 in inference, for the next token).
- A forward hook registers a gradient hook on the layer's output; it fires when the output's
  gradient is complete, before any of the layer's backward nodes run, and enters the layer the
  same way, prefetching in reverse order. Under fastlm's offloaded or reentrant checkpointing the
  recompute happens inside the layer's backward node, after this hook; with transformers
  versions that checkpoint ``__call__`` (5.17) the pre-hook also fires in the recompute (detected
  with the autograd graph-task id: backward order).
- Why home slots: bitsandbytes' own ``MatMul4Bit`` (modules that do not run fused, e.g. LoRA
  dropout) keeps a *view* of the packed weight from the forward in ``ctx`` -- outside autograd's
  saved tensors, so checkpointing cannot re-create it. With a layer always in the same slot at
  the same offsets, that view reads the right bytes again whenever the layer is resident, which
  the gradient hook guarantees for its backward. fastlm's fused LoRA Functions save the
  ``Params4bit`` itself (autograd keeps the leaf object, whose ``.data`` is the binding at
  backward time). So training is exact with or without gradient checkpointing.
- A copy into a slot first waits (on the side stream) for an event recorded on the compute
  stream when the slot's previous occupant was evicted: all of that layer's kernels were enqueued
  by then (autograd runs every node of a layer before any node of the layer below it: the
  layer's input gradient needs all of them).

The copy engine is an interface (``copy_async`` / ``record`` / ``wait`` and buffer allocation):
``CudaCopyEngine`` uses a side stream, events and ``cudaHostRegister``-pinned buffers (exact
sizes: PyTorch's pinned allocator rounds up to a power of two); ``SyncCopyEngine`` copies at
once and records every operation, so the streaming logic is tested on the CPU.

Loading without materialising the model on the GPU (``load_streamed_model``): the model is built
on the meta device (buffers such as RoPE's ``inv_freq`` computed normally), its linear layers
replaced by transformers' own bitsandbytes quantizer, then the safetensors checkpoint is read one
tensor at a time; each decoder layer is quantised on the GPU (bitsandbytes' kernel: fast, and the
same bytes as ``from_pretrained``) and moved to its host buffer before the next. Quantising on the
CPU with bitsandbytes works but takes ~1 s per 8 M weights on a core (an hour for 32B). Peak GPU
memory while loading: embeddings, head and one 16-bit weight matrix. Pre-quantised NF4 checkpoints
load the same way without quantising. ``build_random_nf4_model`` does the same from a config
with random weights (benchmarks of shapes too big to save on disk).

    model, tok = FastModel.from_pretrained(path, load_in_4bit=True, offload_weights=True)
    stream_weights(model)            # or: stream an already loaded 4-bit model
    print(plan_memory(model, batch_size=1, seq_len=2048).format())
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from fastlm.offload.memory_plan import (
    DEFAULT_SLOTS,
    HostBudget,
    HostMemoryError,
    MemoryPlan,
    auto_resident_layers,
    gpu_memory_available,
    host_memory_available,
    host_placement,
    plan_memory,
    simulate_copies,
)

logger = logging.getLogger("fastlm")

ALIGN = 256  # bytes: every tensor in a layer buffer starts at a multiple (vectorised loads)
_ATTR = "_fastlm_weight_streamer"
__all__ = [
    "CopyEngine",
    "CudaCopyEngine",
    "HostBudget",
    "HostMemoryError",
    "ResidencyPolicy",
    "SyncCopyEngine",
    "WeightStreamer",
    "WeightStreamingError",
    "build_random_nf4_model",
    "get_weight_streamer",
    "load_streamed_model",
    "place_trainable",
    "stream_weights",
    "unstream_weights",
]


class WeightStreamingError(RuntimeError):
    """Weight streaming cannot do what was asked (the message says why and what to do)."""


# --------------------------------------------------------------------------- copy engines


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
    """``CudaCopyEngine`` on a CUDA device, else ``SyncCopyEngine``."""
    return CudaCopyEngine(device) if device.type == "cuda" else SyncCopyEngine(device)


# --------------------------------------------------------------------------- residency policy


class Copy(NamedTuple):
    """Copy streamed ``layer`` into ``slot``; ``evict``: the layer that held the slot, if any."""

    layer: int
    slot: int
    evict: int | None


class Wait(NamedTuple):
    """The compute stream waits for ``layer``'s copy; its weights are then bound to ``slot``."""

    layer: int
    slot: int


class ResidencyPolicy:
    """Which streamed layer is in which GPU slot: pure bookkeeping, no tensors.

    A streamed layer is on the host, in flight (copy started) or resident. The layer at streamed
    position ``p`` always uses slot ``p % slots``. ``access(layer, backward, grad)`` returns the
    actions for entering ``layer``: its copy if needed, the wait, then the copies of the next
    ``slots - 1`` streamed layers in the direction of travel (forward; backward; wrapping to layer
    0 in inference), stopping at a layer whose slot is taken by the current one or an earlier
    target. Usage: ``ResidencyPolicy(32, list(range(32)), 2).access(0, False, True)``.
    """

    def __init__(self, n_layers: int, streamed: list[int], slots: int):
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.n_layers = n_layers
        self.slots = slots
        self.position = {layer: p for p, layer in enumerate(streamed)}
        self.state = dict.fromkeys(self.position, "host")
        self.owner: list[int | None] = [None] * slots

    def home(self, layer: int) -> int:
        return self.position[layer] % self.slots

    def access(self, layer: int, backward: bool, grad: bool) -> list:
        actions: list = []
        if layer in self.position:
            actions += self._fetch(layer)
            if self.state[layer] == "inflight":
                self.state[layer] = "resident"
                actions.append(Wait(layer, self.home(layer)))
        for target in self.upcoming(layer, backward, grad):
            actions += self._fetch(target)
        return actions

    def upcoming(self, layer: int, backward: bool, grad: bool) -> list[int]:
        """The streamed layers to prefetch after entering ``layer``."""
        n = self.n_layers
        if backward:
            order: Any = range(layer - 1, -1, -1)
        elif grad:  # training: the backward comes next and starts with the layers just used
            order = range(layer + 1, n)
        else:  # inference: the next forward (next token) starts at layer 0
            order = itertools.chain(range(layer + 1, n), range(0, layer))
        taken = {self.home(layer)} if layer in self.position else set()
        targets: list[int] = []
        for target in order:
            if len(targets) >= self.slots - 1:
                break
            if target not in self.position:
                continue
            slot = self.home(target)
            if slot in taken:
                break
            taken.add(slot)
            targets.append(target)
        return targets

    def _fetch(self, layer: int) -> list:
        if self.state[layer] != "host":
            return []
        slot = self.home(layer)
        evicted = self.owner[slot]
        if evicted is not None:
            self.state[evicted] = "host"
        self.owner[slot] = layer
        self.state[layer] = "inflight"
        return [Copy(layer, slot, evicted)]


# --------------------------------------------------------------------------- the streamer


@dataclass
class _Streamed:
    """One streamed tensor: a packed weight (``Params4bit.data``) or a quant_state's absmax."""

    owner: Any  # the Params4bit, or the QuantState
    kind: str  # "data" or "absmax"
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    host: torch.Tensor | None = None
    slot_view: torch.Tensor | None = None

    def current(self) -> torch.Tensor:
        return self.owner.data if self.kind == "data" else self.owner.absmax

    def current_ptr(self) -> int:
        # Params4bit.data_ptr() reads the parameter's storage without making a .data alias
        return self.owner.data_ptr() if self.kind == "data" else self.owner.absmax.data_ptr()

    def bind(self, tensor: torch.Tensor) -> None:
        if self.kind == "data":
            self.owner.data = tensor
        else:
            self.owner.absmax = tensor


@dataclass
class _Layer:
    index: int
    module: nn.Module
    tensors: list[_Streamed]
    weights: list[tuple[nn.Module, Any]]  # (Linear4bit, its Params4bit): checked on entry
    nbytes: int
    kind: str = "pinned"  # where the host copy lives: pinned / pageable / disk
    host: torch.Tensor | None = None
    ready: Any = None  # the copy's completion event
    bound: str = "host"  # what the tensors point at: "host" or "slot"


@dataclass
class StreamStats:
    """What the streamer did since the last ``reset``: layer copies, bytes, waits, entries."""

    copies: int = 0
    bytes: int = 0
    waits: int = 0
    entries: int = 0

    def reset(self) -> None:
        self.copies = self.bytes = self.waits = self.entries = 0


_NO_MAP = object()  # the model had no hf_device_map before streaming


def _in_backward() -> bool:
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _quantised_weights(module: nn.Module) -> list[tuple[nn.Module, Any]]:
    """(Linear4bit, Params4bit) of every quantised linear layer in ``module``, each once."""
    seen, found = set(), []
    for sub in module.modules():
        weight = sub._parameters.get("weight") if hasattr(sub, "_parameters") else None
        if weight is None or getattr(weight, "quant_state", None) is None:
            continue
        if id(weight) not in seen:
            seen.add(id(weight))
            found.append((sub, weight))
    return found


def layer_nbytes(module: nn.Module) -> int:
    """Bytes of one layer's streamed buffer (packed weights + absmax, each aligned)."""
    total = 0
    for _, weight in _quantised_weights(module):
        state = weight.quant_state
        total += _align(weight.numel() * weight.element_size())
        total += _align(state.absmax.numel() * state.absmax.element_size())
    return total


def _expected_layer_nbytes(module: nn.Module, blocksize: int, nested: bool) -> int:
    """``layer_nbytes`` of a not yet quantised (meta) layer, from its Linear4bit shapes."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # pragma: no cover
        return 0
    total = 0
    for sub in module.modules():
        if isinstance(sub, Linear4bit):
            numel = sub.in_features * sub.out_features
            storage = torch.empty((), dtype=sub.weight.quant_storage).element_size()
            total += _align((numel + 1) // (2 * storage) * storage)
            total += _align(-(-numel // blocksize) * (1 if nested else 4))
    return total


def decoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """(the module that owns the decoder layers, the ``layers`` ModuleList) of a causal LM."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    expected = getattr(text, "num_hidden_layers", None)
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList) and (expected is None or len(layers) == expected):
            return module, layers
    raise WeightStreamingError(
        f"{type(model).__name__}: no decoder-layer list (a ModuleList named 'layers' of "
        f"{expected} layers) to stream."
    )


def _normalised(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _release_buffers(engine: CopyEngine, buffers: list) -> None:
    for tensor, pinned in buffers:
        engine.release_host(tensor, pinned)
    buffers.clear()


class WeightStreamer:
    """Streams the NF4 weights of a model's decoder layers from CPU RAM through GPU slots.

    Build it with ``stream_weights(model)`` (an already loaded 4-bit model) or through
    ``load_streamed_model`` / ``build_random_nf4_model``. Layers ``[0, resident_layers)`` stay on
    the GPU; the others are streamed. ``stats`` counts copies; ``location(i)`` says where layer
    ``i`` is; ``make_resident()`` moves everything back to the GPU and removes the hooks.
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device | str,
        slots: int = DEFAULT_SLOTS,
        resident_layers: int = 0,
        engine: CopyEngine | None = None,
        budget: HostBudget | None = None,
    ):
        self.model = model
        self.stack, self.layers = decoder_layers(model)
        self.device = _normalised(torch.device(device))
        self.engine = engine if engine is not None else default_engine(self.device)
        self.budget = budget if budget is not None else HostBudget()
        n = len(self.layers)
        if slots < 1:
            raise ValueError(f"offload slots must be at least 1, got {slots}")
        self.resident_layers = max(0, min(int(resident_layers), n))
        self.streamed = list(range(self.resident_layers, n))
        self.slots = slots
        self.policy = ResidencyPolicy(n, self.streamed, slots)
        self.stats = StreamStats()
        self.bandwidth: float | None = None
        self._layers: dict[int, _Layer] = {}
        self._placement: dict[int, str] = {}
        self._buffers: list[tuple[torch.Tensor, bool]] = []
        self._slot_buffers: list[torch.Tensor] = []
        # A fresh slot may reuse memory that enqueued kernels still read: its first copy waits
        # for them like any later one.
        self._slot_used = [True] * slots
        self._handles: list = []
        self._moved_warned = False
        self._plan_logged = False
        self._closed = False
        self._warned_pageable = False
        self._finalizer = weakref.finalize(self, _release_buffers, self.engine, self._buffers)

    # ---------------------------------------------------------------- setting up

    def plan_host(self, layer_bytes: dict[int, int]) -> dict[int, str]:
        """Decide pinned / pageable / disk for every streamed layer (HostMemoryError if RAM is
        short and there is no folder) before anything is allocated."""
        sizes = [layer_bytes[i] for i in self.streamed]
        kinds = host_placement(sizes, self.budget)
        self._placement = dict(zip(self.streamed, kinds))
        return self._placement

    def adopt(self, index: int) -> None:
        """Move layer ``index``'s packed weights and absmax into its host buffer (freeing their
        device memory) and point the model at them."""
        module = self.layers[index]
        weights = _quantised_weights(module)
        if not weights:
            raise WeightStreamingError(
                f"decoder layer {index} has no 4-bit weights to stream: weight streaming takes a "
                "model loaded with load_in_4bit=True."
            )
        tensors, offset = [], 0
        for _, weight in weights:
            state = weight.quant_state
            for owner, kind, tensor in (
                (weight, "data", weight.data),
                (state, "absmax", state.absmax),
            ):
                nbytes = tensor.numel() * tensor.element_size()
                shape = tuple(tensor.shape)
                tensors.append(_Streamed(owner, kind, offset, nbytes, tensor.dtype, shape))
                offset = _align(offset + nbytes)
        layer = _Layer(index, module, tensors, weights, offset)
        layer.kind = self._placement.get(index, "pinned")
        layer.host, layer.kind = self._alloc_host(offset, layer.kind)
        for item in tensors:
            flat = item.current().contiguous().reshape(-1).view(torch.uint8)
            view = layer.host[item.offset : item.offset + item.nbytes]
            view.copy_(flat)
            item.host = view.view(item.dtype).view(item.shape)
            item.bind(item.host)
        for linear, _ in weights:
            # bitsandbytes would repack a CPU weight in place for its inference kernel
            linear.support_avx512bf16_for_cpu = False
        self._layers[index] = layer

    def _alloc_host(self, nbytes: int, kind: str) -> tuple[torch.Tensor, str]:
        if kind == "disk":
            return _disk_buffer(self.budget.folder, nbytes), "disk"
        tensor, pinned = self.engine.alloc_host(nbytes, pin=kind == "pinned")
        if kind == "pinned" and not pinned:
            kind = "pageable"
            if not self._warned_pageable:
                self._warned_pageable = True
                logger.warning(
                    "fastlm weight streaming: pinning host memory failed; the layers that could "
                    "not be pinned use pageable RAM (slower, synchronous copies)."
                )
        if pinned:
            self._buffers.append((tensor, True))
        return tensor, kind

    def finish(self) -> None:
        """Allocate the GPU slots, install the hooks, log the weight plan."""
        missing = [i for i in self.streamed if i not in self._layers]
        if missing:
            raise WeightStreamingError(f"layers {missing} were not adopted before finish()")
        slot_bytes = max((self._layers[i].nbytes for i in self.streamed), default=0)
        self._slot_buffers = [self.engine.alloc_device(slot_bytes) for _ in range(self.slots)]
        for index in self.streamed:
            layer = self._layers[index]
            slot = self._slot_buffers[self.policy.home(index)]
            for item in layer.tensors:
                view = slot[item.offset : item.offset + item.nbytes]
                item.slot_view = view.view(item.dtype).view(item.shape)
        self._install_hooks()
        self._publish_device_map()
        self._measure_bandwidth()
        self._shrink_activation_budget()
        kinds = [self._layers[i].kind for i in self.streamed]
        pageable = kinds.count("pageable") + kinds.count("disk")
        if pageable:
            logger.warning(
                "fastlm weight streaming: %d of %d streamed layers are not in pinned RAM "
                "(%d pageable, %d on disk): their copies are slower and synchronous.",
                pageable,
                len(kinds),
                kinds.count("pageable"),
                kinds.count("disk"),
            )
        logger.info("%s", self.weight_plan().format())

    def _install_hooks(self) -> None:
        for index, layer in enumerate(self.layers):
            pre = functools.partial(self._pre_hook, index)
            post = functools.partial(self._post_hook, index)
            self._handles.append(layer.register_forward_pre_hook(pre))
            self._handles.append(layer.register_forward_hook(post))
        self._handles.append(
            self.stack.register_forward_pre_hook(self._stack_pre_hook, with_kwargs=True)
        )

    def _publish_device_map(self) -> None:
        # Accelerate (and so the HF Trainer and TRL) calls model.to(device) on any model whose
        # hf_device_map has fewer than two entries, which would pull the streamed 4-bit weights
        # onto the GPU. A map that tells the truth (streamed layers live on the CPU) makes it
        # leave the placement alone, as it does for any big-model dispatch.
        self._previous_device_map = self.model.__dict__.get("hf_device_map", _NO_MAP)
        device = self.device.index if self.device.type == "cuda" else self.device.type
        names = {id(m): n for n, m in self.model.named_modules()}
        placement, module, prefix = {}, self.model, ""
        for part in names[id(self.layers)].split("."):  # siblings along the path to the layers
            placement.update({prefix + n: device for n, _ in module.named_children() if n != part})
            module, prefix = getattr(module, part), f"{prefix}{part}."
        for index in range(len(self.layers)):
            placement[f"{prefix}{index}"] = "cpu" if index in self._layers else device
        self.model.hf_device_map = placement

    def _restore_device_map(self) -> None:
        previous = getattr(self, "_previous_device_map", _NO_MAP)
        if previous is _NO_MAP:
            self.model.__dict__.pop("hf_device_map", None)
        else:
            self.model.hf_device_map = previous

    def _measure_bandwidth(self) -> None:
        if self.device.type != "cuda" or not self.streamed:
            return
        layer = self._layers[self.streamed[0]]
        if layer.kind != "pinned" or layer.nbytes == 0:
            return
        target = self._slot_buffers[0][: layer.nbytes]
        best = 0.0
        for _ in range(3):  # the first copy of a buffer pays for mapping it
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)
            start.record()
            target.copy_(layer.host, non_blocking=True)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000
            best = max(best, layer.nbytes / seconds if seconds > 0 else 0.0)
        self.bandwidth = best or None

    def _shrink_activation_budget(self) -> None:
        # Offloaded checkpointing sized its pinned budget at import, before these weights were
        # pinned: keep it within half of what is left.
        from fastlm.offload import checkpoint

        left = checkpoint.default_pinned_budget()
        if checkpoint.BUDGET.limit > left:
            checkpoint.BUDGET.limit = left

    # ---------------------------------------------------------------- hooks

    def _pre_hook(self, index: int, module: nn.Module, args) -> None:
        # A training forward is followed by its backward, not by the next forward: even when
        # the layer runs under no_grad inside a reentrant / offloaded checkpoint (transformers
        # versions whose checkpoint wraps __call__).
        checkpointed = module.training and getattr(module, "gradient_checkpointing", False)
        grad = torch.is_grad_enabled() or checkpointed
        self.enter(index, backward=_in_backward(), grad=grad)

    def _post_hook(self, index: int, module: nn.Module, args, output) -> None:
        if _in_backward():
            return
        out = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(functools.partial(self._grad_hook, index))

    def _grad_hook(self, index: int, grad: torch.Tensor) -> None:
        self.enter(index, backward=True)

    def _stack_pre_hook(self, module: nn.Module, args, kwargs) -> None:
        self.place_trainable()
        if not self._plan_logged and module.training and torch.is_grad_enabled():
            self._plan_logged = True
            tokens = kwargs.get("input_ids")
            if tokens is None:
                tokens = kwargs.get("inputs_embeds")
            if tokens is None and args:
                tokens = args[0]
            batch, seq = (tokens.shape[0], tokens.shape[1]) if tokens is not None else (1, None)
            plan = plan_memory(self.model, batch_size=batch, seq_len=seq)
            logger.info("%s", plan.format())

    def place_trainable(self) -> None:
        """Move parameters created in the layers after streaming began (PEFT puts new LoRA
        weights on their base weight's device: the host) to the GPU."""
        streamed = {id(w) for layer in self._layers.values() for _, w in layer.weights}
        moved = 0
        for layer in self.layers:
            for param in layer.parameters():
                if param.device != self.device and id(param) not in streamed:
                    param.data = param.data.to(self.device)
                    if param.grad is not None:
                        param.grad = param.grad.to(self.device)
                    moved += 1
        if moved and not self._moved_warned:
            self._moved_warned = True
            logger.info("fastlm weight streaming: moved %d new parameters to the GPU", moved)

    # ---------------------------------------------------------------- entering a layer

    def enter(self, index: int, backward: bool = False, grad: bool | None = None) -> None:
        """Make layer ``index`` resident (wait for its copy) and prefetch the next layers
        (``grad``: a training forward, which the backward follows; default: grad mode)."""
        if self._closed:
            return
        self.stats.entries += 1
        layer = self._layers.get(index)
        if layer is not None:
            self._check(layer)
        grad = torch.is_grad_enabled() if grad is None else grad
        for action in self.policy.access(index, backward, grad):
            if isinstance(action, Copy):
                self._copy(action)
            else:
                self._wait(action)

    def _copy(self, action: Copy) -> None:
        layer = self._layers[action.layer]
        if action.evict is not None:
            evicted = self._layers[action.evict]
            for item in evicted.tensors:
                item.bind(item.host)
            evicted.bound = "host"
        # The slot's previous occupant may still be read by enqueued kernels: the copy waits.
        after = self.engine.record() if self._slot_used[action.slot] else None
        target = self._slot_buffers[action.slot][: layer.nbytes]
        label = (action.layer, action.slot)
        layer.ready = self.engine.copy_async(target, layer.host, after=after, label=label)
        self.stats.copies += 1
        self.stats.bytes += layer.nbytes

    def _wait(self, action: Wait) -> None:
        layer = self._layers[action.layer]
        self.engine.wait(layer.ready)
        layer.ready = None
        for item in layer.tensors:
            item.bind(item.slot_view)
        layer.bound = "slot"
        self._slot_used[action.slot] = True
        self.stats.waits += 1

    def _check(self, layer: _Layer) -> None:
        for linear, weight in layer.weights:
            if linear._parameters.get("weight") is not weight:
                self._tampered(layer, f"{type(linear).__name__}.weight was replaced")
        # Host and device pointers share CUDA's unified address space: a pointer check suffices.
        for item in layer.tensors:
            expected = item.host if layer.bound == "host" else item.slot_view
            if item.current_ptr() != expected.data_ptr():
                self._tampered(layer, f"its {item.kind} tensor was re-pointed")

    def _tampered(self, layer: _Layer, what: str) -> None:
        raise WeightStreamingError(
            f"decoder layer {layer.index} is weight-streamed but {what} outside the streamer "
            "(model.to()/.cuda(), PiSSA/LoftQ initialisation, or another change of the 4-bit "
            "weights). Streamed weights are read-only: make such changes before streaming, or "
            "call fastlm.offload.unstream_weights(model) first."
        )

    # ---------------------------------------------------------------- inspection

    def location(self, index: int) -> str:
        """``"gpu"`` (a resident layer), ``"host"``, ``"inflight:<slot>"`` or ``"slot:<slot>"``."""
        if index not in self._layers:
            return "gpu"
        state = self.policy.state[index]
        if state == "host":
            return "host"
        return f"{'slot' if state == 'resident' else 'inflight'}:{self.policy.home(index)}"

    def host_kinds(self) -> dict[int, str]:
        """Where each streamed layer's host copy lives: pinned / pageable / disk."""
        return {i: layer.kind for i, layer in self._layers.items()}

    def weight_plan(self) -> MemoryPlan:
        """The weights part of the memory plan (``memory_plan`` adds training)."""
        streamed_ids = set()
        state_bytes = 0
        for layer in self._layers.values():
            for item in layer.tensors:
                streamed_ids.add(id(item.owner))
            for _, weight in layer.weights:
                state = weight.quant_state
                nested = state.state2
                small = [state.code, state.offset]
                small += [nested.absmax, nested.code] if nested is not None else []
                state_bytes += sum(
                    t.numel() * t.element_size() for t in small if isinstance(t, torch.Tensor)
                )
        resident_ids = {
            id(p) for i in range(self.resident_layers) for p in self.layers[i].parameters()
        }
        resident = other = 0
        seen = set()
        for tensor in itertools.chain(self.model.parameters(), self.model.buffers()):
            if id(tensor) in seen or id(tensor) in streamed_ids or tensor.requires_grad:
                continue
            seen.add(id(tensor))
            nbytes = tensor.numel() * tensor.element_size()
            state = getattr(tensor, "quant_state", None)
            if state is not None:
                nbytes += state.absmax.numel() * state.absmax.element_size()
            if id(tensor) in resident_ids:
                resident += nbytes
            else:
                other += nbytes
        slot_bytes = max((layer.nbytes for layer in self._layers.values()), default=0)
        plan = MemoryPlan(
            device=str(self.device),
            layers=len(self.layers),
            streamed_layers=len(self.streamed),
            slots=self.slots,
            slot_bytes=slot_bytes,
            bandwidth=self.bandwidth,
            host_available=host_memory_available(),
        )
        plan.gpu["embeddings, head, norms"] = other
        if self.resident_layers:
            plan.gpu[f"{self.resident_layers} resident layers"] = resident
        plan.gpu["quantisation state (2nd level)"] = state_bytes
        plan.gpu[f"streaming slots ({self.slots})"] = self.slots * slot_bytes
        for kind in ("pinned", "pageable", "disk"):
            total = sum(layer.nbytes for layer in self._layers.values() if layer.kind == kind)
            if total:
                plan.host[f"streamed weights ({kind})"] = total
        sizes = {i: layer.nbytes for i, layer in self._layers.items()}
        n = len(self.layers)
        plan.copies_per_step, plan.transfer_per_step = simulate_copies(
            n, self.streamed, self.slots, sizes, training=True
        )
        plan.copies_per_inference_forward, _ = simulate_copies(
            n, self.streamed, self.slots, sizes, training=False
        )
        available = gpu_memory_available(self.device)
        if available is not None:
            plan.gpu_available = available + torch.cuda.memory_allocated(self.device)
        return plan

    # ---------------------------------------------------------------- undoing

    def make_resident(self) -> nn.Module:
        """Copy every streamed layer to its own GPU memory, remove the hooks and free the host
        buffers: the model is an ordinary 4-bit model again. Returns the model."""
        self.engine.synchronize()
        for layer in self._layers.values():
            buffer = self.engine.alloc_device(layer.nbytes)
            buffer.copy_(layer.host)
            for item in layer.tensors:
                view = buffer[item.offset : item.offset + item.nbytes]
                item.bind(view.view(item.dtype).view(item.shape))
        self.engine.synchronize()
        self.close()
        return self.model

    def close(self) -> None:
        """Remove the hooks and release the slots and host buffers (after ``make_resident``)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._restore_device_map()
        self._slot_buffers = []
        self._layers.clear()
        self._closed = True
        self._finalizer()
        owner = _streamer_owner(self.model)
        if owner is not None:
            owner.__dict__.pop(_ATTR, None)


def _disk_buffer(folder: str | os.PathLike | None, nbytes: int) -> torch.Tensor:
    """A file-backed (memory-mapped) uint8 buffer in ``folder``; the file is unlinked at once,
    so the space returns to the disk when the mapping is released."""
    if folder is None:
        raise HostMemoryError("a layer was placed on disk but no offload_folder was given")
    os.makedirs(folder, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix="fastlm-layer-", suffix=".bin", dir=folder)
    try:
        os.ftruncate(fd, max(nbytes, 1))
    finally:
        os.close(fd)
    try:
        tensor = torch.from_file(path, shared=True, size=max(nbytes, 1), dtype=torch.uint8)
    finally:
        os.unlink(path)
    return tensor[:nbytes]


# --------------------------------------------------------------------------- public helpers


def _streamer_owner(model: nn.Module) -> nn.Module | None:
    for module in model.modules():
        if _ATTR in module.__dict__:
            return module
    return None


def get_weight_streamer(model: nn.Module) -> WeightStreamer | None:
    """The WeightStreamer of a (possibly PEFT-wrapped) model, or None if it is not streamed."""
    owner = _streamer_owner(model)
    return None if owner is None else owner.__dict__[_ATTR]


def _model_device(layers: nn.ModuleList) -> torch.device:
    for layer in layers:
        for _, weight in _quantised_weights(layer):
            return weight.device
    raise WeightStreamingError(
        "the model has no 4-bit weights in its decoder layers: weight streaming takes a model "
        "loaded with load_in_4bit=True."
    )


def stream_weights(
    model: nn.Module,
    slots: int = DEFAULT_SLOTS,
    resident_layers: int = 0,
    engine: CopyEngine | None = None,
    budget: HostBudget | None = None,
    device: torch.device | str | None = None,
) -> WeightStreamer:
    """Stream the decoder layers of an already loaded NF4 model from CPU RAM.

    Usage: ``stream_weights(model, slots=2)``. Layers ``[0, resident_layers)`` stay on the GPU.
    The model must fit on the GPU to have been loaded this way; for bigger models use
    ``FastModel.from_pretrained(..., load_in_4bit=True, offload_weights=True)``.
    """
    if get_weight_streamer(model) is not None:
        raise WeightStreamingError("this model is already weight-streamed")
    _, layers = decoder_layers(model)
    device = torch.device(device) if device is not None else _model_device(layers)
    streamer = WeightStreamer(model, device, slots, resident_layers, engine, budget)
    streamer.plan_host({i: layer_nbytes(layers[i]) for i in streamer.streamed})
    for index in streamer.streamed:
        streamer.adopt(index)
    streamer.finish()
    model.__dict__[_ATTR] = streamer
    return streamer


def place_trainable(model: nn.Module) -> None:
    """Move the parameters PEFT created in streamed layers (on their base weight's device, the
    host) to the GPU now rather than at the first forward. Usage: after ``get_peft_model``."""
    streamer = get_weight_streamer(model)
    if streamer is not None:
        streamer.place_trainable()


def unstream_weights(model: nn.Module) -> nn.Module:
    """Undo ``stream_weights``: every layer back on the GPU (it must fit), hooks removed."""
    streamer = get_weight_streamer(model)
    return model if streamer is None else streamer.make_resident()


# --------------------------------------------------------------------------- loading


@contextlib.contextmanager
def _parameters_on_meta():
    """Create parameters on the meta device (no memory, no random init); buffers stay real, so
    values computed at construction (RoPE's inv_freq, Gemma's embed_scale) are right."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param) -> None:
        original(module, name, param)
        param = module._parameters.get(name)
        if param is not None and param.device.type != "meta":
            meta = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
            module._parameters[name] = meta

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


class _CheckpointSource:
    """Tensors of a safetensors checkpoint (one file or sharded), read one at a time."""

    def __init__(self, folder: Path):
        import safetensors

        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            raise WeightStreamingError(
                f"{folder} has no safetensors checkpoint: weight streaming reads *.safetensors "
                "files (convert .bin checkpoints with save_pretrained(safe_serialization=True))."
            )
        self._handles = [safetensors.safe_open(str(folder / f), "pt", device="cpu") for f in files]
        self._where = {key: h for h in self._handles for key in h.keys()}  # noqa: SIM118

    def keys(self):
        return self._where.keys()

    def keys_under(self, prefix: str) -> list[str]:
        return [key for key in self._where if key.startswith(prefix)]

    def get(self, key: str, meta: torch.Tensor | None = None) -> torch.Tensor | None:
        handle = self._where.get(key)
        return None if handle is None else handle.get_tensor(key)


class _RandomSource:
    """Random weights generated on the target device (a seeded generator per tensor)."""

    def __init__(self, device: torch.device, seed: int, std: float, zero_norms: bool):
        self.device, self.seed, self.std, self.zero_norms = device, seed, std, zero_norms
        self._count = itertools.count()

    def keys(self):
        return ()

    def keys_under(self, prefix: str) -> list[str]:
        return []

    def get(self, key: str, meta: torch.Tensor | None = None) -> torch.Tensor | None:
        number = next(self._count)
        if meta is None:
            return None
        dtype = meta.dtype if meta.is_floating_point() else torch.float32
        if meta.dim() == 1:  # norm weights and biases
            fill = 0.0 if ("norm" not in key or self.zero_norms) else 1.0
            return torch.full(tuple(meta.shape), fill, dtype=dtype, device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(self.seed * 100003 + number)
        out = torch.empty(tuple(meta.shape), dtype=dtype, device=self.device)
        return out.normal_(0.0, self.std, generator=generator)


def _bnb_config(quantization_config, dtype: torch.dtype):
    from fastlm.api import nf4_config

    return nf4_config(dtype, quantization_config)


def _skeleton(config, dtype, bnb_config, pre_quantized, device, trust_remote_code, attn):
    from transformers import AutoModelForCausalLM
    from transformers.quantizers import AutoHfQuantizer

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn is not None:
        kwargs["attn_implementation"] = attn
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    quantizer = AutoHfQuantizer.from_config(bnb_config, pre_quantized=pre_quantized)
    quantizer.preprocess_model(
        model=model, dtype=dtype, device_map={"": device}, checkpoint_files=None, use_kernels=False
    )
    return model, quantizer


def _find_key(source, model_prefix: str, key: str) -> str:
    """The checkpoint's name of model key ``key`` (checkpoints of the bare base model lack the
    ``model.`` prefix)."""
    keys = source.keys()
    if not keys or key in keys:
        return key
    stripped = key[len(model_prefix) + 1 :] if key.startswith(model_prefix + ".") else None
    return stripped if stripped is not None and stripped in keys else key


def _load_module_tensors(
    module, name, *, source, device, dtype, pre_quantized, prefix, missing, tied
) -> None:
    """Load the parameters and persistent buffers of ``module`` (not its children)."""
    import bitsandbytes as bnb

    for pname, meta in list(module._parameters.items()):
        full_name = f"{name}.{pname}" if name else pname
        if meta is None or meta.device.type != "meta" or full_name in tied:
            continue
        key = _find_key(source, prefix, full_name)
        quantised = isinstance(module, bnb.nn.Linear4bit) and pname == "weight"
        if quantised and pre_quantized:
            value = source.get(key)
            if value is None:
                missing.append(key)
                continue
            stats = {k[len(key) + 1 :]: source.get(k) for k in source.keys_under(key + ".")}
            param = bnb.nn.Params4bit.from_prequantized(
                data=value, quantized_stats=stats, requires_grad=False, device=device, module=module
            )
        elif quantised:
            shape_like = torch.empty(module.out_features, module.in_features, device="meta")
            value = source.get(key, shape_like.to(dtype))
            if value is None:
                missing.append(key)
                continue
            value = value.to(device=device, dtype=dtype)
            # what transformers' Bnb4bitQuantize does, so the bytes are the same
            param = bnb.nn.Params4bit(value, requires_grad=False, **meta.__dict__).to(device)
        else:
            value = source.get(key, meta)
            if value is None:
                missing.append(key)
                continue
            if value.is_floating_point():
                value = value.to(device=device, dtype=meta.dtype)
            else:
                value = value.to(device=device)
            param = nn.Parameter(value, requires_grad=value.is_floating_point())
        setattr(module, pname, param)
    for bname, buffer in list(module._buffers.items()):
        if buffer is None:
            continue
        persistent = bname not in module._non_persistent_buffers_set
        value = None
        if persistent:
            value = source.get(_find_key(source, prefix, f"{name}.{bname}" if name else bname))
        if value is None:
            value = buffer
        module._buffers[bname] = value.to(device=device)


def _materialise(
    model: nn.Module,
    quantizer,
    source,
    device: torch.device,
    dtype: torch.dtype,
    pre_quantized: bool,
    streamer: WeightStreamer | None,
) -> None:
    stack, layers = decoder_layers(model)
    in_layer = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
    prefix = getattr(model, "base_model_prefix", "model")
    named = list(model.named_modules())
    missing: list[str] = []
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})  # tie_weights() sets them
    load = functools.partial(
        _load_module_tensors, source=source, device=device, dtype=dtype,
        pre_quantized=pre_quantized, prefix=prefix, missing=missing, tied=tied,
    )  # fmt: skip
    for name, module in named:  # everything outside the decoder layers first
        if id(module) not in in_layer:
            load(module, name)
    model.tie_weights()
    by_layer: dict[int, list] = {}
    for name, module in named:
        if id(module) in in_layer:
            by_layer.setdefault(in_layer[id(module)], []).append((name, module))
    for index in range(len(layers)):
        for name, module in by_layer.get(index, []):
            load(module, name)
        if streamer is not None and index in streamer.streamed:
            streamer.adopt(index)
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        shown = ", ".join(still_meta[:5]) + (" ..." if len(still_meta) > 5 else "")
        raise WeightStreamingError(
            f"the checkpoint lacks {len(still_meta)} weights the model needs ({shown}); "
            f"looked for {', '.join(missing[:3])}. Load it without offload_weights to see "
            "transformers' own report."
        )
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)


def _build(
    config,
    source_factory,
    *,
    dtype: torch.dtype,
    device: torch.device,
    quantization_config,
    pre_quantized: bool,
    slots: int,
    resident_layers: int | str,
    engine: CopyEngine | None,
    budget: HostBudget | None,
    trust_remote_code: bool,
    attn_implementation: str | None,
    stream: bool = True,
    max_seq_length: int | None = None,
) -> nn.Module:
    bnb_config = _bnb_config(quantization_config, dtype)
    model, quantizer = _skeleton(
        config, dtype, bnb_config, pre_quantized, device, trust_remote_code, attn_implementation
    )
    streamer = None
    if stream:
        _, layers = decoder_layers(model)
        nested = bool(bnb_config.bnb_4bit_use_double_quant)
        sizes = {i: _expected_layer_nbytes(layer, 64, nested) for i, layer in enumerate(layers)}
        if resident_layers == "auto":
            resident_layers = auto_resident_layers(config, dtype, device, sizes, max_seq_length)
        streamer = WeightStreamer(model, device, slots, int(resident_layers), engine, budget)
        streamer.plan_host(sizes)
    _materialise(model, quantizer, source_factory(), device, dtype, pre_quantized, streamer)
    if streamer is not None:
        streamer.finish()
        model.__dict__[_ATTR] = streamer
    model.eval()
    return model


def load_streamed_model(
    model_name: str,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cuda",
    quantization_config=None,
    slots: int = DEFAULT_SLOTS,
    resident_layers: int | str = 0,
    folder: str | os.PathLike | None = None,
    engine: CopyEngine | None = None,
    budget: HostBudget | None = None,
    token: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    config=None,
    max_seq_length: int | None = None,
) -> nn.Module:
    """Load a safetensors checkpoint as an NF4 model whose decoder layers stream from CPU RAM.

    Usage: ``model = load_streamed_model("./qwen-32b", dtype=torch.bfloat16)``. The model is
    never materialised on the GPU: one 16-bit weight matrix at a time is quantised there.
    ``folder``: spill layers that do not fit in RAM to files there. Pre-quantised NF4
    checkpoints (a ``quantization_config`` in config.json) load without re-quantising.
    """
    from transformers import AutoConfig, GenerationConfig

    folder_path = _checkpoint_folder(model_name, token, revision)
    if config is None:
        config = AutoConfig.from_pretrained(
            folder_path, trust_remote_code=trust_remote_code, revision=revision
        )
    device = torch.device(device)
    stored = getattr(config, "quantization_config", None)
    pre_quantized = stored is not None
    if pre_quantized:
        quantization_config = _stored_nf4_config(stored, quantization_config)
    if budget is None:
        budget = HostBudget(folder=None if folder is None else str(folder))
    elif folder is not None:
        budget.folder = str(folder)
    model = _build(
        config,
        lambda: _CheckpointSource(folder_path),
        dtype=dtype,
        device=device,
        quantization_config=quantization_config,
        pre_quantized=pre_quantized,
        slots=slots,
        resident_layers=resident_layers,
        engine=engine,
        budget=budget,
        trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation,
        max_seq_length=max_seq_length,
    )
    model.config.name_or_path = model_name
    with contextlib.suppress(OSError, ValueError):
        model.generation_config = GenerationConfig.from_pretrained(folder_path)
    return model


def _stored_nf4_config(stored, given):
    from transformers import BitsAndBytesConfig

    if isinstance(stored, dict):
        stored = BitsAndBytesConfig.from_dict(stored)
    if not (getattr(stored, "load_in_4bit", False) and stored.bnb_4bit_quant_type == "nf4"):
        raise NotImplementedError(
            "offload_weights streams bitsandbytes NF4 weights; this checkpoint is quantised "
            f"otherwise ({getattr(stored, 'quant_method', stored)}). Load it without offloading."
        )
    if given is not None and given.bnb_4bit_compute_dtype is not None:
        stored.bnb_4bit_compute_dtype = given.bnb_4bit_compute_dtype
    return stored


def _checkpoint_folder(model_name: str, token, revision) -> Path:
    if os.path.isdir(model_name):
        return Path(model_name)
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            model_name,
            revision=revision,
            token=token,
            allow_patterns=["*.json", "*.safetensors"],
        )
    )


def build_random_nf4_model(
    config,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cuda",
    seed: int = 0,
    slots: int = DEFAULT_SLOTS,
    resident_layers: int | str = 0,
    engine: CopyEngine | None = None,
    budget: HostBudget | None = None,
    std: float | None = None,
    attn_implementation: str | None = "sdpa",
    stream: bool = True,
    quantization_config=None,
) -> nn.Module:
    """A random-weight NF4 model of ``config``'s shape, quantised layer by layer straight into
    (pinned) CPU RAM -- for benchmarks of shapes too big to save.

    Usage: ``model = build_random_nf4_model(AutoConfig.for_model("qwen2", ...))``. Linear and
    embedding weights ~ N(0, std = config.initializer_range), norms 1 (0 for Gemma's 1 + w),
    biases 0. ``stream=False`` keeps every layer on the GPU (the same weights for a seed).
    """
    device = torch.device(device)
    std = std if std is not None else float(getattr(config, "initializer_range", 0.02))
    zero_norms = str(getattr(config, "model_type", "")).startswith("gemma")
    return _build(
        config,
        lambda: _RandomSource(device, seed, std, zero_norms),
        dtype=dtype,
        device=device,
        quantization_config=quantization_config,
        pre_quantized=False,
        slots=slots,
        resident_layers=resident_layers,
        engine=engine,
        budget=budget,
        trust_remote_code=False,
        attn_implementation=attn_implementation,
        stream=stream,
    )
