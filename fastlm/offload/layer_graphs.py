"""Checkpointed decoder layers replayed as CUDA graphs: one launch per layer, not hundreds.

A small-shape LoRA step is paced by the host: the GPU finishes each kernel before Python has
issued the next (Qwen3-4B QLoRA: ~5,900 launches a step at ~70 µs of host time each, against
~280 ms of GPU work). A CUDA graph records a layer's kernels once and replays them all with one
call. Under offloaded checkpointing (``checkpoint.py``) each decoder layer runs in two fixed
pieces a step -- the forward without grad, and the recompute with its backward -- so each piece
is captured once per layer and shape, and replayed from then on.

How a replay stays exact:
- **Static buffers.** A graph reads and writes fixed addresses. Every tensor a layer is called
  with (hidden states, RoPE cos/sin, position ids) is copied into a buffer of its *signature*
  (shapes, dtypes, strides, plain values, autocast, the layer's adapter state) before a replay;
  the outputs (layer output, input gradient, LoRA gradients) are written to buffers and copied
  out after it. The layers of one signature share its buffers (the LoRA gradients' too, where
  their shapes agree: each replay's are added to ``.grad`` before the next layer's replay), and
  all graphs share one private pool for scratch memory: graphs run one after another on one
  stream, and none keeps scratch memory past its end.
- **Masks are kept, not copied.** The attention decides on the host from a mask's content
  (plain causal, or which spans are padding), and the graph records that decision. So a layer's
  graphs keep the masks of its first call and replay only for masks equal to them (compared once
  per mask tensor); any other mask runs eagerly.
- **Eager first.** A layer runs eagerly the first time it meets a signature (Triton compiles,
  fastlm's caches fill), is captured the second time and replays after that.
- **Gradients** of the layer's trainable parameters are added to ``.grad`` after each replay as
  autograd adds them: set when None, summed otherwise.
- **The loss joins the pool.** With the layers' scratch kept in the pool, the step's peak
  outside it is the LM-head loss (a chunk of logits: 256 MiB), which would add to the pool.
  ``run_loss`` graphs the fused cross-entropy (loss and input gradient, computed together) into
  the same pool, eager first and captured second as a layer is; a head that trains or has a
  bias, or the loss's torch path, runs eagerly.
- **What is not graphed** runs eagerly as before; ``LAYER_GRAPHS.report()`` says why: dropout
  (a replay would draw the same numbers), inputs besides the hidden states that need gradients,
  packed batches without int32 ``cu_seq_lens_q/k`` and ``max_length_q/k`` (the boundaries
  would be read on the host; with them a replay reads its offsets on the device, and
  ``max_length_q`` is part of the signature), gradient hooks on the
  trainable parameters and distributed training (DDP and FSDP reduce gradients from autograd
  hooks, which a replay does not fire), mixture-of-experts blocks while their router logits
  are recorded (``output_router_logits``, the load-balancing loss: recorded by forward hooks,
  which a replay does not fire), experts whose grouped GEMM reads its group sizes on the host
  (operands ``torch._grouped_mm`` does not take; noticed in a layer's first, eager call),
  arguments other than tensors and plain values, more
  than ``max_signatures`` shapes (variable-length batches: pad to a multiple or pack), and any
  capture that failed -- e.g. an operation that waits for the GPU, such as reading a padding
  mask on the host. A failed capture leaves the pool usable: an anchor graph keeps it alive.
  Full fine-tuning is graphed: its gradient buffers are one layer's.

    LAYER_GRAPHS.enabled = True   # opt in (off by default until measured on a GPU)
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from fastlm.kernels.fused_linear_cross_entropy import scratch_bytes
from fastlm.kernels.grouped_gemm import HostSizes
from fastlm.models.moe import moe_block_forward, router_forward
from fastlm.models.packing import assume_packing, caller_signals, packed_sequences

logger = logging.getLogger("fastlm")

_PLAIN = (type(None), bool, int, float, str, torch.dtype)
_PACKING_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
EXPERTS_READ_SIZES = (
    "mixture-of-experts experts that read their group sizes on the host (operands "
    "torch._grouped_mm does not take: it wants bf16 on CUDA)"
)


class NotGraphable(Exception):
    """Why one call runs eagerly (the message goes into the report)."""


def _spec(value: Any, tensors: list[torch.Tensor]) -> Any:
    """A hashable description of an argument, with its tensors appended to ``tensors``."""
    if isinstance(value, torch.Tensor):
        if value.requires_grad:
            raise NotGraphable("an input besides the hidden states needs a gradient")
        tensors.append(value)
        return ("tensor", tuple(value.shape), value.stride(), value.dtype, value.device)
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(_spec(item, tensors) for item in value))
    if isinstance(value, _PLAIN):
        return (type(value), value)
    raise NotGraphable(f"an argument of type {type(value).__name__}")


def _rebuild(value: Any, buffers: list[torch.Tensor]) -> Any:
    """``value`` with its tensors replaced, in order, by ``buffers`` (consumed from the end)."""
    if isinstance(value, torch.Tensor):
        return buffers.pop()
    if isinstance(value, (tuple, list)):
        return type(value)(_rebuild(item, buffers) for item in value)
    return value


def _packed(kwargs: dict, hidden: torch.Tensor) -> bool | None:
    """Whether a call's batch packs sequences that a graph can keep apart: None for no packing
    signals, True / False for int32 cu_seq_lens (several sequences / one) with max_length_q at
    least the longest; NotGraphable otherwise. The graph's copies of the offsets are then never
    read on the host (``assume_packing``): a replay reads them on the device, and max_length_q,
    a plain value of the signature, fixes the kernel's grid."""
    batch, seq_len = hidden.shape[0], hidden.shape[1]
    if all(kwargs.get(key) is None for key in _PACKING_KEYS):
        if packed_sequences(kwargs, batch, seq_len) is not None:
            raise NotGraphable("a batch packed by position_ids alone (pass cu_seq_lens_q/k)")
        return None
    if any(kwargs.get(key) is None for key in _PACKING_KEYS):
        raise NotGraphable("a packed batch without all of cu_seq_lens_q/k and max_length_q/k")
    cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"]
    if not all(isinstance(cu, torch.Tensor) and cu.dtype == torch.int32 for cu in (cu_q, cu_k)):
        raise NotGraphable("cu_seq_lens that are not int32 tensors")
    packing = packed_sequences(kwargs, batch, seq_len)  # the step's own offsets, read once
    if packing is not None and packing.problem:
        raise NotGraphable(f"a packed batch the kernel does not take ({packing.problem})")
    if packing is not None and packing.max_seqlen > kwargs["max_length_q"]:
        raise NotGraphable("max_length_q below the longest packed sequence")
    return packing is not None


# Patched forwards that record state beside their outputs, which a replay would not record.
_RECORDING_FORWARDS = (moe_block_forward, router_forward)


def _bound_forward(module: nn.Module):
    """What a patched instance forward (a method) calls: a partial of fastlm's function, or
    None for an unpatched module."""
    return getattr(module.__dict__.get("forward"), "__func__", None)


def _forward_function(module: nn.Module):
    """The function behind a patched instance forward (a method over a partial), or None."""
    forward = _bound_forward(module)
    return getattr(forward, "func", forward)


def _active_collector() -> dict | None:
    """The outputs transformers is collecting in this call (its output recorders' hooks fill
    them), or None."""
    try:
        from transformers.utils.output_capturing import _active_collector as collector
    except ImportError:  # a transformers without output recorders: hooks return their outputs
        return None
    return collector.get()


def _is_mask(name: str, value: Any) -> bool:
    return "mask" in name and isinstance(value, torch.Tensor)


# mask -> (its _version, the kept mask it was compared with, equal?): one read per mask a forward
_COMPARED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _same_content(mask: torch.Tensor, kept: torch.Tensor) -> bool:
    """Whether a call's mask equals a kept one; compared once per mask tensor (a host read), as
    the attention reads each mask once a forward."""
    if mask is kept:
        return True
    if mask.shape != kept.shape or mask.dtype != kept.dtype:
        return False
    hit = _COMPARED.get(mask)
    if hit is not None and hit[0] == mask._version and hit[1]() is kept:
        return hit[2]
    equal = torch.equal(mask, kept)
    _COMPARED[mask] = (mask._version, weakref.ref(kept), equal)
    return equal


def _fresh_copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    # x * 1.0 is x exactly (signs of zero and NaNs included), in one multi-tensor launch.
    return list(torch._foreach_mul(tensors, 1.0))


class _Signature:
    """The static buffers of one call signature, shared by every layer called with it."""

    def __init__(self, hidden: torch.Tensor, tensors: list[torch.Tensor], kwargs, args):
        self.hidden = torch.empty_like(hidden)
        self.inputs = [torch.empty_like(t) for t in tensors]
        reversed_inputs = list(reversed(self.inputs))
        self.kwargs = {k: _rebuild(v, reversed_inputs) for k, v in kwargs.items()}
        self.args = tuple(_rebuild(a, reversed_inputs) for a in args)
        self._last: list[tuple[weakref.ref, int] | None] = [None] * len(tensors)
        self.out = self.grad_out = self.grad_in = None

    def load(self, hidden: torch.Tensor, tensors: list[torch.Tensor]) -> None:
        """Copy a call's tensors in; one the buffer already holds (cos/sin: the same tensors for
        every layer of a step) is not copied again."""
        self.hidden.copy_(hidden)
        for i, (buffer, tensor) in enumerate(zip(self.inputs, tensors)):
            last = self._last[i]
            if last is not None and last[0]() is tensor and last[1] == tensor._version:
                continue
            buffer.copy_(tensor)
            self._last[i] = (weakref.ref(tensor), tensor._version)

    def outputs_like(self, output: torch.Tensor) -> None:
        """The output buffers. Where the output is laid out as the input (a decoder layer's
        is), a graph writes its result over the input it has read by then -- the forward's
        output into ``hidden``, the backward's input gradient into ``grad_out`` -- so the
        signature holds two (batch, seq, hidden) buffers, not four."""
        if self.out is None:
            same = _same_layout(output, self.hidden)
            self.out = self.hidden if same else torch.empty_like(output)
            self.grad_out = torch.empty_like(output)
            self.grad_in = self.grad_out if same else torch.empty_like(self.hidden)


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride()


class _LayerGraphs:
    """One layer's two graphs for one signature, and how often each piece has run."""

    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.forward = self.backward = None
        self.forward_runs = self.backward_runs = 0
        self.grads: list[torch.Tensor] = []
        self.used: list[bool] = []
        self.failed = ""
        self.masks: dict[str, torch.Tensor] | None = None

    def check_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """The graphs keep the masks of the layer's first call and are replayed only for masks
        equal to them: the attention's decisions read from a mask (padding spans, whether it is
        plain causal) are taken on the host and recorded into the graph with it."""
        if self.masks is None:
            self.masks = masks
        elif not all(_same_content(masks[k], self.masks[k]) for k in masks):
            raise NotGraphable("a mask unlike the one the graphs were captured with")


class _Layer:
    """What is fixed about a layer: its trainable parameters and why it cannot be graphed."""

    def __init__(self, layer: nn.Module):
        self.params = [p for p in layer.parameters() if p.requires_grad]
        self.modules = list(layer.modules())
        self.adapters = [m for m in self.modules if hasattr(m, "disable_adapters")]
        self.dropouts = [
            m for m in self.modules
            if isinstance(m, nn.Dropout) or getattr(m, "attention_dropout", None) is not None
        ]  # fmt: skip
        self.problem = self._problem(layer)
        self.graphs: dict[Any, _LayerGraphs] = {}
        # Patched MoE forwards: their router logits may be recorded, and their backward may add
        # the load-balancing loss's gradient (the aux state bound into them), per call.
        self.routers = [m for m in self.modules if _forward_function(m) in _RECORDING_FORWARDS]
        bound = [getattr(_bound_forward(m), "keywords", {}) for m in self.routers]
        self.auxes = [keywords["aux"] for keywords in bound if "aux" in keywords]

    def recording(self) -> str:
        """Why this call must run eagerly because of what its MoE blocks record ("" if nothing):
        a replay fires no forward hook (transformers records router logits with them, for
        ``output_router_logits`` and the load-balancing loss) and bakes the aux-loss state in."""
        if not self.routers:
            return ""
        if any(aux.active for aux in self.auxes):
            return "a mixture-of-experts block with the load-balancing loss's gradient"
        collector = _active_collector()
        if collector is not None and "router_logits" in collector:
            return "a mixture-of-experts block whose router logits are recorded"
        return ""

    def _problem(self, layer: nn.Module) -> str:
        # Full fine-tuning is graphed too: the gradient buffers are one layer's, shared by the
        # layers of a signature (_grad_buffers), not a copy of every weight.
        if not self.params:
            return "no trainable parameters in the layer"
        if any(p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None)
               for p in self.params):  # fmt: skip
            return "gradient hooks on the trainable parameters"
        if any(type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor"
               for p in self.params):  # fmt: skip
            return "sharded parameters (FSDP)"
        return ""

    def state(self) -> tuple:
        """What changes a layer's kernels without changing its arguments: train/eval (dropout),
        adapters switched off or merged, forwards patched or unpatched."""
        dropout = any(
            m.training
            and (
                (isinstance(m, nn.Dropout) and m.p > 0)
                or (getattr(m, "attention_dropout", 0) or 0) > 0
            )
            for m in self.dropouts
        )
        adapters = tuple(
            (m.disable_adapters, getattr(m, "merged", False), tuple(m.active_adapters))
            for m in self.adapters
        )
        forwards = tuple(id(m.__dict__.get("forward")) for m in self.modules)
        return (dropout, adapters, forwards)


class LayerGraphs:
    """Captures and replays checkpointed layers (module doc). ``enabled``: graph at all;
    ``max_signatures``: distinct call shapes graphed per layer before new ones run eagerly.

    Usage: ``print(LAYER_GRAPHS.report())`` after a few training steps.
    """

    def __init__(self, enabled: bool = True, max_signatures: int = 4):
        self.enabled = enabled
        self.max_signatures = max_signatures
        # peak_bytes()' bookkeeping (benchmarks switch it on: it restarts the peak statistic)
        self.measure_peak = False
        self._peaks = {"before_pool": 0, "between_captures": 0, "held_at_capture": 0}
        self._captures_ended = 0  # before the first, no pool holds memory yet
        self._reserved_at_start = self._last_growth = 0  # the pool around the latest capture
        self.counts: Counter[str] = Counter()  # "replayed" / "captured" / "eager: <why>"
        self.pool_growth: Counter[str] = Counter()  # bytes the pool grew by, per capture kind
        self._layers: weakref.WeakKeyDictionary[nn.Module, _Layer] = weakref.WeakKeyDictionary()
        self._signatures: dict[Any, _Signature] = {}
        self._grads: dict[Any, list[torch.Tensor]] = {}  # _grad_buffers
        self._losses: dict[Any, _LossGraph] = {}  # run_loss, by shape
        self._pools: dict[torch.device, Any] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._anchors: dict[torch.device, Any] = {}  # _new_pool
        self._reserves: dict[torch.device, int] = {}  # _new_pool: the loss's scratch
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ public

    def plan(self, run: Callable, hidden: torch.Tensor, args: tuple) -> _Plan | None:
        """How to run one checkpointed call: a plan (graphed, or eager the first time), or None
        when it cannot be graphed (counted with its reason)."""
        if not self.enabled or not self._device_ok(hidden):
            return None
        try:
            return self._plan(run, hidden, args)
        except NotGraphable as why:
            self._count(f"eager: {why}")
            return None

    def would_graph(self, tensor: torch.Tensor) -> bool:
        """Whether layers whose inputs are like ``tensor`` are candidates for graphs at all (on,
        and on a device graphs exist on); each layer may still run eagerly for its own reason.

        Usage: ``LAYER_GRAPHS.would_graph(hidden)``.
        """
        return self.enabled and self._device_ok(tensor)

    def report(self) -> str:
        """One line per outcome, with how many layer pieces (forward or backward) it covered."""
        if not self.counts:
            return "layer graphs: no checkpointed layer has run on a GPU yet"
        lines = [f"layer graphs: {n} x {what}" for what, n in sorted(self.counts.items())]
        lines += [
            f"layer graphs: the pool grew {grown / 2**20:,.0f} MiB in captures of {who}"
            for who, grown in sorted(self.pool_growth.items())
        ]
        return "\n".join(lines)

    def run_loss(self, compute: Callable, hidden, weight, bias, labels, denom, cfg) -> tuple:
        """The chunked LM-head loss, ``compute(hidden, weight, bias, labels, denom, cfg)`` of
        ``fastlm.kernels.fused_linear_cross_entropy`` (the loss and its input gradients), as a
        graph in the layers' pool: its scratch (a chunk of logits, 256 MiB) then shares memory
        with theirs instead of adding to it -- with the layers graphed, the step's peak outside
        the pool is the loss. Eager the first time a shape comes, captured the second, replayed
        after; eager, counted with its reason, where it cannot be graphed.

        Usage: installed by ``enable_offloaded_checkpointing`` (``set_loss_runner``).
        """
        if not self.enabled or not self._device_ok(hidden):
            return compute(hidden, weight, bias, labels, denom, cfg)
        try:
            graph = self._loss_graph(hidden, weight, bias, labels, denom, cfg)
        except NotGraphable as why:
            self._count(f"loss eager: {why}")
            return compute(hidden, weight, bias, labels, denom, cfg)
        return graph.run(compute, hidden, weight, labels, denom, cfg)

    def pool_bytes(self) -> int:
        """GPU memory the graphs' private pool holds (scratch the allocator's statistics of
        allocated memory no longer count once a capture has ended): add it to their peak."""
        return self._pool_usage()[0]

    def _pool_usage(self) -> tuple[int, int]:
        """Bytes the private pools reserve, and of those the bytes of blocks still allocated
        (tensors a capture made and something still holds), which the allocator's statistics
        of allocated memory count as well."""
        pools = set(self._pools.values())
        if not pools:
            return 0, 0
        segments = torch.cuda.memory._snapshot()["segments"]
        ours = [s for s in segments if tuple(s.get("segment_pool_id", ())) in pools]
        return sum(s["total_size"] for s in ours), sum(s["allocated_size"] for s in ours)

    def peak_bytes(self) -> int:
        """Peak GPU memory in use since the last ``torch.cuda.reset_peak_memory_stats()``, the
        graphs' private pool included.

        The allocator counts a capture's scratch as allocated while the capture runs and not
        after it, though the pool keeps it for every replay; and it counts a pool's blocks that
        are still allocated, which the pool's size counts too. Adding the pool to the
        allocator's peak therefore counts memory twice. With ``measure_peak`` on, each capture
        instead notes the peak before it (the first: before any pool existed) and the memory
        held outside the pool, and restarts the peak statistic after it, so that the peak is
        ``max(peak before the first capture, (peak outside the pool since, or held at a
        capture) + pool)``. Outside the pool = allocated minus the pool's allocated blocks as
        they are at the interval's end: blocks enter a pool only in a capture and may leave it
        between, so that is the fewest the interval had -- the estimate never runs low.
        Off, the bound is the allocator's peak plus the pool (counted twice at worst).

        Usage: ``LAYER_GRAPHS.measure_peak = True`` before training, then ``peak_bytes()``.
        """
        allocated_peak = torch.cuda.max_memory_allocated()
        pool, pool_in_use = self._pool_usage()
        if not pool or not self.measure_peak:
            return allocated_peak + pool
        peaks = self._peaks
        outside = allocated_peak - pool_in_use
        after_pool = max(peaks["between_captures"], peaks["held_at_capture"], outside)
        return max(peaks["before_pool"], after_pool + pool)

    def _note_capture(self, device: torch.device, starting: bool) -> None:
        """peak_bytes()' bookkeeping around one capture (``measure_peak`` only): peaks and
        holdings outside the pool, and how much the capture grew the pool (``_last_growth``)."""
        if not starting:
            self._captures_ended += 1
        if not self.measure_peak:
            return
        peaks = self._peaks
        reserved, pool_in_use = self._pool_usage()
        if starting:
            self._reserved_at_start = reserved
        else:
            self._last_growth = reserved - self._reserved_at_start
        peaks["held_at_capture"] = max(
            peaks["held_at_capture"], torch.cuda.memory_allocated(device) - pool_in_use
        )
        if starting:
            which = "between_captures" if self._captures_ended else "before_pool"
            peak = torch.cuda.max_memory_allocated(device) - pool_in_use
            peaks[which] = max(peaks[which], peak)
        else:  # the capture's scratch is counted through the pool from now on
            torch.cuda.reset_peak_memory_stats(device)

    def reset(self) -> None:
        """Drop every graph and buffer (their memory returns to the allocator)."""
        with self._lock:
            self._layers = weakref.WeakKeyDictionary()
            self._signatures.clear()
            self._grads.clear()
            self._losses.clear()
            self._pools.clear()  # the next capture starts a new pool (and anchor)
            self._anchors.clear()
            self._reserves.clear()
            self.counts.clear()
            self.pool_growth.clear()
            self._peaks = dict.fromkeys(self._peaks, 0)
            self._captures_ended = 0

    # ------------------------------------------------------------------ planning

    def _device_ok(self, hidden: torch.Tensor) -> bool:
        """Graphs exist on CUDA only (the CPU tests replace this and the capture)."""
        return hidden.is_cuda

    def _plan(self, run: Callable, hidden: torch.Tensor, args: tuple) -> _Plan:
        layer, bound = _layer_of(run)
        info = self._layer_info(layer)
        if info.problem:
            raise NotGraphable(info.problem)
        recording = info.recording()
        if recording:
            raise NotGraphable(recording)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            raise NotGraphable("distributed training (gradients are reduced by autograd hooks)")
        kwargs = run.keywords
        packed = _packed(kwargs, hidden)
        masks = {k: v for k, v in kwargs.items() if _is_mask(k, v)}
        kwargs = {k: v for k, v in kwargs.items() if k not in masks}
        tensors: list[torch.Tensor] = []
        spec = (
            tuple((k, _spec(v, tensors)) for k, v in kwargs.items()),
            tuple(_spec(a, tensors) for a in args),
            tuple((k, _spec(v, [])) for k, v in masks.items()),
        )
        state = info.state()
        if state[0]:
            raise NotGraphable("dropout (a replay would draw the same random numbers)")
        device = hidden.device.type
        autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        hidden_spec = (tuple(hidden.shape), hidden.stride(), hidden.dtype, hidden.device)
        key = (hidden_spec, spec, autocast, state)
        graphs = info.graphs.get(key)
        if graphs is None:
            if len(info.graphs) >= self.max_signatures:
                raise NotGraphable(f"more than {self.max_signatures} call shapes")
            graphs = info.graphs[key] = _LayerGraphs(info.params)
        if graphs.failed:
            raise NotGraphable(graphs.failed)
        graphs.check_masks(masks)
        signature = self._signature(key[:3], hidden, tensors, kwargs, args)
        return _Plan(self, graphs, signature, bound, tensors, autocast, packed)

    def _loss_graph(self, hidden, weight, bias, labels, denom, cfg) -> _LossGraph:
        _, _, _, needs, use_kernel = cfg
        if not use_kernel:
            raise NotGraphable("the loss's torch path (it picks the labelled rows on the host)")
        if needs[1] or needs[2] or bias is not None:
            raise NotGraphable("an LM head that trains or has a bias (static gradient buffers)")
        # The graph reads the head's weight where it lies: a replay needs that same tensor.
        key = (
            tuple((tuple(t.shape), t.dtype, t.device) for t in (hidden, labels, denom)),
            (weight.data_ptr(), tuple(weight.shape), weight.stride(), weight.dtype),
            cfg,
        )
        graph = self._losses.get(key)
        if graph is None:
            if len(self._losses) >= self.max_signatures:
                raise NotGraphable(
                    f"more than {self.max_signatures} loss shapes (or a head weight made anew "
                    "each step)"
                )
            graph = self._losses[key] = _LossGraph(self)
        if graph.failed:
            raise NotGraphable(graph.failed)
        return graph

    def _layer_info(self, layer: nn.Module) -> _Layer:
        info = self._layers.get(layer)
        if info is None:
            info = self._layers[layer] = _Layer(layer)
        return info

    def _reserve(self, device: torch.device, size: int) -> None:
        """Ask the device's pool, when it is made, to start with a free block of ``size`` bytes
        (``_new_pool``); a pool made already keeps what it has."""
        self._reserves[device] = max(self._reserves.get(device, 0), size)

    def _signature(self, key, hidden, tensors, kwargs, args) -> _Signature:
        signature = self._signatures.get(key)
        if signature is None:
            signature = self._signatures[key] = _Signature(hidden, tensors, kwargs, args)
        return signature

    def _grad_buffers(
        self, signature: _Signature, params: list[nn.Parameter]
    ) -> list[torch.Tensor]:
        """The buffers a backward graph writes its parameters' gradients into, shared by the
        layers of one signature whose parameters have the same shapes: a replay's gradients are
        added to ``.grad`` before the next layer's replay runs (same stream), so one set serves
        them all, instead of one set a layer (LoRA's gradients, ~130 MB on Qwen3-4B r=16)."""
        key = (id(signature), tuple((p.shape, p.dtype, p.device) for p in params))
        buffers = self._grads.get(key)
        if buffers is None:
            buffers = self._grads[key] = [torch.empty_like(p) for p in params]
        return buffers

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    # ------------------------------------------------------------------ capture

    def _capture_or_reason(
        self, device: torch.device, body: Callable[[], None], load: Callable[[], None],
        prefix: str, who: str,
    ) -> tuple[Any, str]:  # fmt: skip
        """(a graph of ``body``, "") or, when the capture fails, (None, why): any failure means
        that piece runs eagerly, counted (under ``prefix``) and logged. ``load`` copies the
        call's inputs into the static buffers, before the capture and again after it: a CUDA
        capture runs nothing, but a capture that runs its body (the CPU tests' stand-in) may
        have written its outputs over them."""
        load()
        try:
            graph = self.capture(device, body)
        except Exception as error:  # noqa: BLE001 -- any failure means: run it eagerly
            reason = f"capture failed ({type(error).__name__}: {str(error).splitlines()[0]})"
            self._count(f"{prefix}eager: {reason}")
            logger.warning("layer graphs: %s: %s; it runs eagerly (for this shape).", who, reason)
            return None, reason
        if self.measure_peak:  # which captures made the pool as large as it is
            self.pool_growth[who] += self._last_growth
        load()
        return graph, ""

    def capture(self, device: torch.device, body: Callable[[], None]):
        """Record ``body``'s kernels into a new graph (nothing runs until ``replay()``)."""
        if device not in self._pools:
            self._new_pool(device)
        graph = torch.cuda.CUDAGraph()
        self._note_capture(device, starting=True)
        current, stream = torch.cuda.current_stream(device), self._streams[device]
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            # thread_local: the copy stream and other threads may keep working meanwhile.
            graph.capture_begin(pool=self._pools[device], capture_error_mode="thread_local")
            try:
                body()
            except BaseException:
                with contextlib.suppress(Exception):
                    graph.capture_end()
                raise
            graph.capture_end()
        current.wait_stream(stream)
        self._note_capture(device, starting=False)
        return graph

    def _new_pool(self, device: torch.device) -> None:
        """The device's private pool, its capture stream, and the pool's anchor: a one-kernel
        graph held as long as the pool is. The allocator forgets a pool once every graph
        captured into it is gone (a first capture that failed, ``reset``, a freed model) and
        then refuses the next capture that names it; the anchor keeps it alive."""
        pool, stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream(device)
        anchor, current = torch.cuda.CUDAGraph(), torch.cuda.current_stream(device)
        before = self._pool_usage()[0] if self.measure_peak else 0
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            anchor.capture_begin(pool=pool, capture_error_mode="thread_local")
            torch.zeros(1, device=device)
            # The loss's logits buffer (one block, 256 MiB at Qwen3's vocabulary) is the pool's
            # largest request, and its capture comes after the layers': their scratch, freed in
            # blocks sized to their own tensors, cannot hold it, and the pool grew by all of it
            # (510 + 256 MiB on Qwen3-4B). A free block for the loss's scratch made first is
            # split by the layers' captures and whole again when they end, for the loss to take.
            reserve = self._reserves.get(device, 0)
            if reserve:
                block = torch.empty(reserve, dtype=torch.uint8, device=device)
                del block  # freed inside the capture: a free block of the pool
            anchor.capture_end()
        current.wait_stream(stream)
        self._pools[device], self._streams[device], self._anchors[device] = pool, stream, anchor
        if self.measure_peak:
            self.pool_growth["the pool's reserve (the loss's scratch)"] += (
                self._pool_usage()[0] - before
            )


def _layer_of(run: Callable) -> tuple[nn.Module, Callable]:
    """The decoder layer a checkpointed call runs, and the call without its keyword arguments.

    transformers binds the layer as ``partial(forward, layer, **kwargs)`` (5.2x) or as
    ``partial(layer.__call__, **kwargs)`` (older)."""
    if not isinstance(run, partial):
        raise NotGraphable("a checkpointed function that is not a bound layer call")
    func, args = run.func, run.args
    if args and isinstance(args[0], nn.Module) and len(args) == 1:
        return args[0], partial(func, args[0])
    owner = getattr(func, "__self__", None)
    if not args and isinstance(owner, nn.Module):
        return owner, func
    raise NotGraphable("a checkpointed function that is not a bound layer call")


class _Plan:
    """One checkpointed call: its forward and backward, replayed, captured or eager."""

    def __init__(self, owner: LayerGraphs, graphs: _LayerGraphs, signature: _Signature,
                 bound: Callable, tensors: list[torch.Tensor], autocast: tuple,
                 packed: bool | None = None):  # fmt: skip
        self.owner, self.graphs, self.signature = owner, graphs, signature
        self.bound, self.tensors, self.autocast = bound, tensors, autocast
        self.packed = packed  # _packed: None, or whether cu_seq_lens hold several sequences

    def forward(self, run: Callable, hidden: torch.Tensor, args: tuple) -> torch.Tensor:
        """The layer's output (no grad): eager on first sight, then captured and replayed."""
        graphs, signature = self.graphs, self.signature
        if graphs.forward is None and graphs.forward_runs == 0:
            graphs.forward_runs += 1
            self.owner._count("eager: first call of a shape (capture follows)")
            reads = HostSizes.reads
            with torch.no_grad():
                output = _first(run(hidden, *args))
            if HostSizes.reads != reads:  # it would read again inside the capture, and fail
                graphs.failed = EXPERTS_READ_SIZES
            signature.outputs_like(output)
            return output
        load = partial(signature.load, hidden, self.tensors)
        if graphs.forward is None:
            if not self._try_capture("forward", hidden.device, self._forward_body, load):
                with torch.no_grad():
                    return _first(run(hidden, *args))
        else:
            load()
        graphs.forward.replay()
        graphs.forward_runs += 1
        self.owner._count("replayed")
        return signature.out.clone()

    def backward(self, hidden: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor | None:
        """The gradient of the layer input, the parameters' gradients added to ``.grad``; None
        when this backward must run eagerly (first sight, or a capture that failed)."""
        graphs, signature = self.graphs, self.signature
        if graphs.backward is None and (graphs.backward_runs == 0 or graphs.failed):
            graphs.backward_runs += 1
            self.owner._count("eager: first call of a shape (capture follows)")
            return None

        def load() -> None:
            signature.load(hidden, self.tensors)
            signature.grad_out.copy_(grad_output)

        if graphs.backward is None:
            graphs.grads = self.owner._grad_buffers(signature, graphs.params)
            if not self._try_capture("backward", hidden.device, self._backward_body, load):
                return None
        else:
            load()
        graphs.backward.replay()
        graphs.backward_runs += 1
        self.owner._count("replayed")
        _accumulate([p for p, u in zip(graphs.params, graphs.used) if u],
                    [g for g, u in zip(graphs.grads, graphs.used) if u])  # fmt: skip
        return signature.grad_in.clone()

    # ------------------------------------------------------------------ bodies

    def _context(self, grad: bool):
        enabled, dtype = self.autocast
        stack = contextlib.ExitStack()
        stack.enter_context(torch.enable_grad() if grad else torch.no_grad())
        device = self.signature.hidden.device.type
        stack.enter_context(torch.autocast(device, dtype, enabled=enabled))
        # The model's own positions are not read; packed offsets come from assume_packing.
        stack.enter_context(caller_signals(False))
        return stack

    def _call(self, hidden: torch.Tensor) -> torch.Tensor:
        signature = self.signature
        kwargs = {**signature.kwargs, **self.graphs.masks}
        if self.packed is not None:  # the buffers' offsets were checked on the call's own
            assume_packing(kwargs, hidden.shape[0], hidden.shape[1], self.packed)
        return _first(self.bound(hidden, *signature.args, **kwargs))

    def _forward_body(self) -> None:
        with self._context(grad=False):
            output = self._call(self.signature.hidden)
        self.signature.out.copy_(output)

    def _backward_body(self) -> None:
        graphs, signature = self.graphs, self.signature
        hidden = signature.hidden.detach().requires_grad_(True)
        with self._context(grad=True):
            output = self._call(hidden)
        grads = torch.autograd.grad(
            output, [hidden, *graphs.params], signature.grad_out, allow_unused=True
        )
        signature.grad_in.copy_(grads[0])
        graphs.used = [g is not None for g in grads[1:]]
        for buffer, grad in zip(graphs.grads, grads[1:]):
            if grad is not None:
                buffer.copy_(grad)

    def _try_capture(self, piece: str, device: torch.device, body: Callable[[], None],
                     load: Callable[[], None]) -> bool:  # fmt: skip
        graph, self.graphs.failed = self.owner._capture_or_reason(
            device, body, load, "", f"a layer's {piece}"
        )
        if graph is None:
            return False
        setattr(self.graphs, piece, graph)
        self.owner._count(f"captured ({piece})")
        return True


class _LossGraph:
    """One loss shape: its graph and static buffers. The hidden states' buffer takes their
    gradient at the graph's end (they are read by then), so the graph adds one (N, hidden)
    buffer, not two."""

    def __init__(self, owner: LayerGraphs):
        self.owner = owner
        self.graph = None
        self.runs = 0
        self.failed = ""
        self.hidden = self.labels = self.denom = self.loss = None

    def run(self, compute: Callable, hidden, weight, labels, denom, cfg) -> tuple:
        if self.graph is None and self.runs == 0:
            self.runs += 1
            self.owner._count("loss eager: first call of a shape (capture follows)")
            self.owner._reserve(hidden.device, scratch_bytes(hidden, weight, cfg))
            return compute(hidden, weight, None, labels, denom, cfg)
        if self.hidden is None:
            self.hidden, self.labels, self.denom = (
                torch.empty_like(t) for t in (hidden, labels, denom)
            )
            self.loss = torch.empty((), dtype=torch.float32, device=hidden.device)
        load = partial(self._load, hidden, labels, denom)
        if self.graph is None:
            if not self._capture(compute, weight, cfg, hidden.device, load):
                return compute(hidden, weight, None, labels, denom, cfg)
        else:
            load()
        self.graph.replay()
        self.runs += 1
        self.owner._count("loss replayed")
        grad = self.hidden.clone() if cfg[3][0] else None
        return self.loss.clone(), grad, None, None

    def _load(self, hidden, labels, denom) -> None:
        self.hidden.copy_(hidden)
        self.labels.copy_(labels)
        self.denom.copy_(denom)

    def _body(self, compute: Callable, weight, cfg) -> None:
        loss, grad_hidden, _, _ = compute(self.hidden, weight, None, self.labels, self.denom, cfg)
        self.loss.copy_(loss)
        if grad_hidden is not None:
            self.hidden.copy_(grad_hidden)

    def _capture(self, compute: Callable, weight, cfg, device, load: Callable[[], None]) -> bool:
        body = partial(self._body, compute, weight, cfg)
        self.graph, self.failed = self.owner._capture_or_reason(
            device, body, load, "loss ", "the loss"
        )
        if self.graph is None:
            return False
        self.owner._count("loss captured")
        return True


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _accumulate(params: list[nn.Parameter], grads: list[torch.Tensor]) -> None:
    """Add ``grads`` to the parameters' ``.grad`` as autograd's accumulation does."""
    present = [(p, g) for p, g in zip(params, grads) if p.grad is not None]
    missing = [(p, g) for p, g in zip(params, grads) if p.grad is None]
    if present:
        torch._foreach_add_([p.grad for p, _ in present], [g for _, g in present])
    if missing:
        for (p, _), copy in zip(missing, _fresh_copies([g for _, g in missing])):
            p.grad = copy


LAYER_GRAPHS = LayerGraphs(enabled=False)  # opt-in until the GPU runs have checked it
