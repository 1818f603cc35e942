"""Big models on small GPUs: 4-bit NF4 decoder-layer weights kept in CPU RAM, streamed to the GPU.

A QLoRA model's packed NF4 weights (``Params4bit``, 0.5 byte a weight, plus one absmax byte per
64) are 85-95 % of its bytes. Here each decoder layer's packed weights and absmax live in one
flat buffer in pinned CPU RAM; the GPU holds ``slots`` flat buffers (default 2) of one layer each,
and a layer is made resident by one asynchronous copy on a side CUDA stream while the layer
before it computes. Embeddings, head, norms, the small second-level quantisation state, LoRA
weights, their gradients and optimiser state stay on the GPU.

How a layer becomes resident (``WeightStreamer``):

- Each layer has a home slot (``residency.py``: which layer is where, and why direct-mapped). A
  layer's ``Params4bit.data`` and ``quant_state.absmax`` are re-pointed at its views of the slot
  when it is entered, and back at its host buffer when another layer takes the slot, so anything
  that reads the weight outside the forward (a merge, ``state_dict``) reads the right bytes from
  the host.
- A forward pre-hook on each decoder layer enters it: start its copy if it is not on the GPU,
  make the compute stream wait for the copy's event, bind the views, then start the copies of
  the next ``slots - 1`` layers (wrapping to layer 0 in inference, for the next token).
- A forward hook registers a gradient hook on the layer's output; it fires when the output's
  gradient is complete, before any of the layer's backward nodes run, and enters the layer the
  same way, prefetching in reverse order. Under fastlm's offloaded or reentrant checkpointing the
  recompute happens inside the layer's backward node, after this hook; with transformers
  versions that checkpoint ``__call__`` (5.17) the pre-hook also fires in the recompute (detected
  with the autograd graph-task id: backward order).
- A copy into a slot first waits (on the side stream) for an event recorded on the compute
  stream when the slot's previous occupant was evicted: all of that layer's kernels were enqueued
  by then (autograd runs every node of a layer before any node of the layer below it: the
  layer's input gradient needs all of them).

The bytes move through a ``CopyEngine`` (``copy_engine.py``); the host buffers are pinned,
pageable or files on disk as the ``HostBudget`` allows (``memory_plan.py``). Pinning the weights
leaves less RAM for offloaded checkpointing: the streamer lowers that ``PinnedBudget``
(``fastlm.offload.BUDGET`` unless given another) to half of what is left. Loading a model too big
for the GPU straight into this form is ``streamed_loading.py``.

    model, tok = FastModel.from_pretrained(path, load_in_4bit=True, offload_weights=True)
    stream_weights(model)            # or: stream an already loaded 4-bit model
    print(plan_memory(model, batch_size=1, seq_len=2048).format())
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import tempfile
import weakref
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from fastlm.models.nf4_experts import BLOCKSIZE as EXPERT_BLOCKSIZE
from fastlm.models.nf4_experts import is_nf4_expert_weight
from fastlm.models.spec import MixtureOfExperts
from fastlm.offload import checkpoint
from fastlm.offload.checkpoint import PinnedBudget, default_pinned_budget
from fastlm.offload.copy_engine import CopyEngine, default_engine
from fastlm.offload.memory_plan import (
    DEFAULT_SLOTS,
    HostBudget,
    HostMemoryError,
    MemoryPlan,
    gpu_memory_available,
    host_memory_available,
    host_placement,
    plan_memory,
    simulate_copies,
)
from fastlm.offload.residency import Copy, ResidencyPolicy, Wait
from fastlm.quant import packed_weights

logger = logging.getLogger("fastlm")

ALIGN = 256  # bytes: every tensor in a layer buffer starts at a multiple (vectorised loads)
_ATTR = "_fastlm_weight_streamer"
__all__ = [
    "FourBitWeight",
    "WeightStreamer",
    "WeightStreamingError",
    "decoder_layers",
    "expected_layer_nbytes",
    "four_bit_weights",
    "get_weight_streamer",
    "layer_nbytes",
    "place_trainable",
    "stream_weights",
    "unstream_weights",
]


class WeightStreamingError(RuntimeError):
    """Weight streaming cannot do what was asked (the message says why and what to do)."""


class FourBitWeight(NamedTuple):
    """A 4-bit weight of a layer as the streamer moves it: its packed bytes and its absmax."""

    holder: nn.Module  # whose parameter it is: a Linear4bit, or a MoE experts module
    name: str  # the parameter's name in it: "weight", or "gate_up_proj", "down_proj"...
    weight: Any  # bitsandbytes' Params4bit, or an NF4ExpertWeight
    kind: str  # where its bytes are: "data" (Params4bit.data) or "packed" (NF4ExpertWeight)
    state: Any  # its bitsandbytes QuantState


def four_bit_weights(module: nn.Module) -> list[FourBitWeight]:
    """Every 4-bit weight under ``module``: the Linear4bit layers' and the NF4 experts' (QLoRA on
    a mixture-of-experts model). Usage: ``four_bit_weights(model.model.layers[0])``."""
    found = [
        FourBitWeight(linear, "weight", weight, "data", weight.quant_state)
        for _, linear, weight in packed_weights(module)
    ]
    for holder in module.modules():
        for name, param in holder._parameters.items():
            if is_nf4_expert_weight(param):
                found.append(FourBitWeight(holder, name, param, "packed", param.nf4_state))
    return found


@dataclass
class _Streamed:
    """One streamed tensor: a packed weight (``Params4bit.data``, ``NF4ExpertWeight.packed``) or
    a quant_state's absmax."""

    owner: Any  # the Params4bit, the NF4ExpertWeight, or the QuantState
    kind: str  # "data", "packed" or "absmax": the owner's attribute that holds the tensor
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    host: torch.Tensor | None = None
    slot_view: torch.Tensor | None = None

    def current(self) -> torch.Tensor:
        return getattr(self.owner, self.kind)

    def current_ptr(self) -> int:
        # Params4bit.data_ptr() reads the parameter's storage without making a .data alias
        return self.owner.data_ptr() if self.kind == "data" else self.current().data_ptr()

    def bind(self, tensor: torch.Tensor) -> None:
        setattr(self.owner, self.kind, tensor)


@dataclass
class _Layer:
    index: int
    module: nn.Module
    tensors: list[_Streamed]
    weights: list[FourBitWeight]  # checked on entry
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


def layer_nbytes(module: nn.Module) -> int:
    """Bytes of one layer's streamed buffer (packed weights + absmax, each aligned).

    Usage: ``layer_nbytes(model.model.layers[0])``.
    """
    total = 0
    for item in four_bit_weights(module):
        packed = getattr(item.weight, item.kind)
        total += _align(packed.numel() * packed.element_size())
        total += _align(item.state.absmax.numel() * item.state.absmax.element_size())
    return total


def expected_layer_nbytes(
    module: nn.Module, blocksize: int, nested: bool, moe: MixtureOfExperts | None = None
) -> int:
    """``layer_nbytes`` of a not yet quantised (meta) layer, from its Linear4bit shapes and,
    with ``moe``, its experts' 3-D weights (stored NF4 as ``nf4_experts`` stores them).

    Usage: ``expected_layer_nbytes(layer, blocksize=64, nested=True)``.
    """
    total = 0
    for _, linear, weight in packed_weights(module):
        numel = linear.in_features * linear.out_features
        storage = torch.empty((), dtype=weight.quant_storage).element_size()
        total += _align((numel + 1) // (2 * storage) * storage)
        total += _align(-(-numel // blocksize) * (1 if nested else 4))
    for experts in _experts_modules(module, moe):
        for name in (moe.gate_up, moe.down):
            numel = getattr(experts, name).numel()
            total += _align((numel + 1) // 2)  # uint8 storage
            total += _align(-(-numel // EXPERT_BLOCKSIZE))  # nested: one byte a block
    return total


def _experts_modules(module: nn.Module, moe: MixtureOfExperts | None) -> list[nn.Module]:
    if moe is None:
        return []
    return [m for m in module.modules() if type(m).__name__ == moe.experts_class]


def decoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """(the module that owns the decoder layers, the ``layers`` ModuleList) of a causal LM.

    Usage: ``stack, layers = decoder_layers(model)``.
    """
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
    ``activation_budget``: the pinned budget of offloaded checkpointing, lowered to what the
    pinned weights leave (default: the one checkpointing uses, ``fastlm.offload.BUDGET``).
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device | str,
        slots: int = DEFAULT_SLOTS,
        resident_layers: int = 0,
        engine: CopyEngine | None = None,
        budget: HostBudget | None = None,
        activation_budget: PinnedBudget | None = None,
    ):
        self.model = model
        self.stack, self.layers = decoder_layers(model)
        self.device = _normalised(torch.device(device))
        self.engine = engine if engine is not None else default_engine(self.device)
        self.budget = budget if budget is not None else HostBudget()
        if activation_budget is None:  # looked up now: checkpointing reads the same global
            activation_budget = checkpoint.BUDGET
        self.activation_budget = activation_budget
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
        weights = four_bit_weights(module)
        if not weights:
            raise WeightStreamingError(
                f"decoder layer {index} has no 4-bit weights to stream: weight streaming takes a "
                "model loaded with load_in_4bit=True."
            )
        tensors, offset = [], 0
        for item in weights:
            state = item.state
            for owner, kind, tensor in (
                (item.weight, item.kind, getattr(item.weight, item.kind)),
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
        for item in weights:
            if item.kind == "data":  # bitsandbytes would repack a CPU weight for its kernel
                item.holder.support_avx512bf16_for_cpu = False
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
        """Allocate the GPU slots, install the hooks, log the weight plan and attach the
        streamer to the model (``get_weight_streamer`` finds it)."""
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
        self.model.__dict__[_ATTR] = self

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
        left = default_pinned_budget()
        if self.activation_budget.limit > left:
            self.activation_budget.limit = left

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
        streamed = {id(item.weight) for layer in self._layers.values() for item in layer.weights}
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
        for item in layer.weights:
            if item.holder._parameters.get(item.name) is not item.weight:
                self._tampered(layer, f"{type(item.holder).__name__}.{item.name} was replaced")
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
            for item in layer.weights:
                state = item.state
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
            if is_nf4_expert_weight(tensor):  # resident NF4 experts: their bytes, not dense
                nbytes = tensor.nbytes_stored()
            elif state is not None:
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
        for _, _, weight in packed_weights(layer):
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
