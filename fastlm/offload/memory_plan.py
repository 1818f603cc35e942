"""Where a weight-streamed model's bytes live, and whether they fit: the memory plan.

Three things are decided here, all from plain numbers so that they can be tested without a GPU:

- ``host_placement``: which decoder layers' packed 4-bit weights go to pinned RAM (fast, truly
  asynchronous copies), which to ordinary pageable RAM (slower copies, when the pinned budget is
  spent) and which to files in ``offload_folder`` (when RAM is short) -- or a ``HostMemoryError``
  that says how much is missing, raised before anything is allocated.
- ``MemoryPlan``: what lives on the GPU (embeddings and head, small quantisation state, the
  streaming slots, layers kept resident, LoRA weights, their gradients and optimiser state, an
  activation estimate), what lives on the host, and the bytes copied per training step --
  counted by running the streamer's own residency policy, so the figure is what the streamer
  will do, not a formula beside it.
- ``gpu_memory_available`` / ``host_memory_available``: the budgets, honouring
  ``torch.cuda.set_per_process_memory_fraction`` and Linux's ``MemAvailable`` (which counts
  reclaimable page cache: ``MemFree`` alone would refuse loads that fit).

Usage::

    plan = plan_memory(model, batch_size=1, seq_len=2048)
    print(plan.format())
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from fastlm.offload.residency import Copy, ResidencyPolicy

logger = logging.getLogger("fastlm")

GIB = 1024**3
MIB = 1024**2
# RAM kept free of pinned pages for the rest of the system (the larger of the two).
PINNED_RESERVE_BYTES = 4 * GIB
PINNED_RESERVE_FRACTION = 0.2
# RAM kept free when deciding whether the streamed weights fit at all.
RAM_SAFETY_BYTES = 1 * GIB
# Host-to-device bandwidth assumed by the plan when it was not measured (PCIe 4 x16, pinned).
NOMINAL_BANDWIDTH = 20e9
DEFAULT_SLOTS = 2  # GPU slots of the weight streamer


class HostMemoryError(MemoryError):
    """The streamed weights do not fit in CPU RAM (and no ``offload_folder`` was given)."""


# --------------------------------------------------------------------------- budgets


def _meminfo() -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if parts:
                    values[name] = int(parts[0]) * 1024  # kB
    except OSError:
        pass
    return values


def host_memory_available() -> int:
    """Bytes of RAM that can be allocated now (Linux ``MemAvailable``, else free pages)."""
    info = _meminfo()
    if "MemAvailable" in info:
        return info["MemAvailable"]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # not POSIX: a conservative guess
        return 8 * GIB


def host_memory_total() -> int:
    """Bytes of physical RAM."""
    info = _meminfo()
    if "MemTotal" in info:
        return info["MemTotal"]
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 16 * GIB


@dataclass
class HostBudget:
    """How much RAM the streamed weights may take: ``pinned`` (page-locked) and ``ram`` in all.

    Defaults: RAM = MemAvailable - 1 GiB; pinned = MemAvailable - max(4 GiB, 20 % of RAM), since
    pinned pages can never be swapped out. Layers beyond the pinned budget use pageable RAM
    (slower copies, logged), beyond RAM files in ``folder`` (if given), else HostMemoryError.
    Usage: ``stream_weights(model, budget=HostBudget(pinned=16 * 2**30))``.
    """

    pinned: int | None = None
    ram: int | None = None
    folder: str | None = None

    def resolved(self) -> tuple[int, int]:
        available = host_memory_available()
        reserve = max(PINNED_RESERVE_BYTES, int(PINNED_RESERVE_FRACTION * host_memory_total()))
        ram = self.ram if self.ram is not None else max(0, available - RAM_SAFETY_BYTES)
        pinned = self.pinned if self.pinned is not None else max(0, available - reserve)
        return min(pinned, ram), ram


def host_placement(layer_bytes: list[int], budget: HostBudget) -> list[str]:
    """``"pinned"`` / ``"pageable"`` / ``"disk"`` for each streamed layer, in order.

    Raises HostMemoryError (before anything is allocated) when the layers do not fit in RAM and
    there is no folder to spill to. Usage: ``host_placement([n] * 64, HostBudget())``.
    """
    pinned_limit, ram_limit = budget.resolved()
    kinds, pinned, ram = [], 0, 0
    for nbytes in layer_bytes:
        if pinned + nbytes <= pinned_limit:
            kinds.append("pinned")
            pinned += nbytes
            ram += nbytes
        elif ram + nbytes <= ram_limit:
            kinds.append("pageable")
            ram += nbytes
        elif budget.folder is not None:
            kinds.append("disk")
        else:
            total = sum(layer_bytes)
            raise HostMemoryError(
                f"the streamed 4-bit weights need {total / GIB:.2f} GiB of CPU RAM "
                f"({len(layer_bytes)} layers of up to {max(layer_bytes) / MIB:.0f} MiB) but only "
                f"{ram_limit / GIB:.2f} GiB can be used (MemAvailable less "
                f"{RAM_SAFETY_BYTES / GIB:.0f} GiB). Free RAM, keep more layers on the GPU "
                "(offload_resident_layers=...), or pass offload_folder='...' to spill the rest "
                "to disk (slower)."
            )
    return kinds


def gpu_memory_available(device: torch.device | str | int | None = None) -> int | None:
    """Bytes this process may still allocate on a CUDA device (None without CUDA).

    Counts memory PyTorch has cached but not allocated, the driver's free memory, and the cap of
    ``torch.cuda.set_per_process_memory_fraction``.
    """
    if not torch.cuda.is_available():
        return None
    device = torch.device("cuda" if device is None else device)
    if device.type != "cuda":
        return None
    if device.index is None:  # memory queries need an index
        device = torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    cached = torch.cuda.memory_reserved(device) - allocated
    available = free + cached
    fraction_of = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if fraction_of is not None:
        try:
            fraction = float(fraction_of(device))
        except (RuntimeError, TypeError, ValueError):
            fraction = 1.0
        if fraction < 1.0:
            available = min(available, int(fraction * total) - allocated)
    return max(0, available)


# --------------------------------------------------------------------------- estimates


def _config_dims(config) -> dict[str, int]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    head_dim = int(_largest_over_layers(text, "head_dim") or hidden // heads)
    return {
        "hidden": hidden,
        "inter": _mlp_width(text),
        "layers": int(text.num_hidden_layers),
        "q": heads * head_dim,
        "kv": int(_largest_over_layers(text, "num_key_value_heads") or heads) * head_dim,
        "vocab": int(text.vocab_size),
    }


def _mlp_width(config) -> int:
    """The widest MLP intermediate one token passes through: the dense MLP's or shared
    expert's, or k routed experts' side by side (k x the expert width) in a mixture of experts
    (Qwen3.5-MoE has no dense ``intermediate_size`` at all)."""
    from fastlm.models import SPECS  # lazy: fastlm.models loads transformers and peft

    keys = ("intermediate_size", "intermediate_size_mlp", "shared_expert_intermediate_size")
    widths = [_largest_over_layers(config, key) for key in keys]
    spec = SPECS.get(getattr(config, "model_type", None))
    if spec is not None and spec.moe is not None:
        per_token = getattr(config, spec.moe.experts_per_token_attr, None)
        expert = getattr(config, "moe_intermediate_size", None) or widths[0]
        if per_token and expert:
            widths.append(per_token * expert)
    known = [int(w) for w in widths if w]
    if not known:
        raise AttributeError(f"{type(config).__name__} names no MLP width")
    return max(known)


def _largest_over_layers(config, key: str):
    """``config.key``, or its largest value over the layers where a config sets it per layer
    (Gemma 4's head_dim and KV heads in transformers >= 5.23, whose global attribute then
    raises): the estimate takes the widest layer."""
    layers = getattr(config, "per_layer_config", None)
    if layers:
        values = [getattr(layer, key, None) for layer in layers]
        if all(v is not None for v in values):
            return max(values)
    return getattr(config, key, None)


def lora_parameter_count(config, rank: int) -> int:
    """Parameters of LoRA rank ``rank`` on q, k, v, o, gate, up, down of every decoder layer."""
    d = _config_dims(config)
    h, i = d["hidden"], d["inter"]
    per_layer = (h + d["q"]) * 2 + (h + d["kv"]) * 2 + (h + i) * 3  # q,o  k,v  gate,up,down
    return rank * per_layer * d["layers"]


def activation_bytes(
    config,
    batch_size: int,
    seq_len: int,
    checkpointing: bool | str = True,
    compute_bytes: int = 2,
) -> dict[str, int]:
    """An estimate of training activations on the GPU, by part (not a measurement).

    ``checkpointing``: False (every layer's activations kept), True (one input per layer kept),
    "fastlm" (inputs offloaded to pinned RAM). The working set of the layer being recomputed is
    dominated by the fused MLP: two dequantised weights (gate's and up's) beside e and g, then
    down's beside e, g and h.
    """
    d = _config_dims(config)
    tokens = batch_size * seq_len
    h, i, n = d["hidden"], d["inter"], d["layers"]
    layer_input = tokens * h * compute_bytes
    if checkpointing is False:
        # q, k, v, attention output, two norms, MLP input, e, g (h recomputed), residuals
        per_layer = tokens * (6 * h + d["q"] + 2 * d["kv"] + 2 * i) * compute_bytes
        kept = n * per_layer
    elif checkpointing in ("fastlm", "unsloth") and layer_input >= 4 * MIB:
        kept = 0  # offloaded to pinned host memory (fastlm.offload.checkpoint)
    else:
        kept = n * layer_input
    # gate's and up's dequantised weights beside e and g, then down's beside e, g and h
    weight, width = h * i * compute_bytes, tokens * i * compute_bytes
    mlp = max(2 * weight + 2 * width, weight + 3 * width)
    working = mlp + tokens * 4 * h * compute_bytes
    loss = min(256 * MIB, tokens * d["vocab"] * compute_bytes) + 2 * tokens * h * 4
    return {"saved layer activations": kept, "layer working set": working, "loss": loss}


# --------------------------------------------------------------------------- the plan


@dataclass
class MemoryPlan:
    """What lives where (bytes), and the host-to-GPU traffic of one training step."""

    device: str
    layers: int
    streamed_layers: int
    slots: int
    slot_bytes: int
    gpu: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)
    copies_per_step: int = 0
    transfer_per_step: int = 0
    copies_per_inference_forward: int = 0
    bandwidth: float | None = None  # measured host-to-device bytes/s, None when not measured
    gpu_available: int | None = None  # bytes this process may use on the GPU in all
    host_available: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def gpu_total(self) -> int:
        return sum(self.gpu.values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    @property
    def transfer_seconds(self) -> float:
        """Seconds the copies of one step take at the measured (else nominal) bandwidth."""
        return self.transfer_per_step / (self.bandwidth or NOMINAL_BANDWIDTH)

    def fits(self) -> bool | None:
        """Whether the GPU part fits what is available (None when unknown)."""
        if self.gpu_available is None:
            return None
        return self.gpu_total <= self.gpu_available

    def format(self) -> str:
        """A table for the log: ``print(plan.format())``."""
        lines = [
            f"fastlm memory plan: {self.layers} decoder layers, {self.streamed_layers} streamed "
            f"from CPU RAM through {self.slots} GPU slots of {_size(self.slot_bytes).strip()} "
            f"({self.device})"
        ]
        for name, nbytes in self.gpu.items():
            lines.append(f"  GPU   {name:<44}{_size(nbytes)}")
        budget = "" if self.gpu_available is None else f" of {_size(self.gpu_available).strip()}"
        lines.append(f"  GPU   {'total (estimate)':<44}{_size(self.gpu_total)}{budget}")
        for name, nbytes in self.host.items():
            lines.append(f"  host  {name:<44}{_size(nbytes)}")
        lines.append(f"  host  {'RAM available':<44}{_size(self.host_available)}")
        how = "measured" if self.bandwidth else "nominal"
        bandwidth = (self.bandwidth or NOMINAL_BANDWIDTH) / 1e9
        lines.append(
            f"  copies per training step: {self.copies_per_step} layers, "
            f"{_size(self.transfer_per_step).strip()}, ~{self.transfer_seconds:.2f} s at "
            f"{bandwidth:.1f} GB/s ({how}); per inference forward: "
            f"{self.copies_per_inference_forward} layers"
        )
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _size(nbytes: float) -> str:
    if nbytes >= GIB:
        return f"{nbytes / GIB:9.2f} GiB"
    if nbytes >= MIB:
        return f"{nbytes / MIB:9.1f} MiB"
    return f"{nbytes / 1024:9.1f} KiB"


def simulate_copies(
    n_layers: int, streamed: list[int], slots: int, layer_bytes: dict[int, int], training: bool
) -> tuple[int, int]:
    """(layer copies, bytes) in one steady-state training step (or inference forward).

    Runs the streamer's ResidencyPolicy over two steps and counts the second.
    """
    policy = ResidencyPolicy(n_layers, streamed, slots)

    def step() -> list:
        actions = []
        for index in range(n_layers):
            actions += policy.access(index, backward=False, grad=training)
        if training:
            for index in reversed(range(n_layers)):
                actions += policy.access(index, backward=True, grad=True)
        return [a for a in actions if isinstance(a, Copy)]

    step()
    copies = step()
    return len(copies), sum(layer_bytes[c.layer] for c in copies)


def _trainable_bytes(model: nn.Module) -> tuple[int, int]:
    params = [p for p in model.parameters() if p.requires_grad]
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def plan_memory(
    model: nn.Module,
    batch_size: int = 1,
    seq_len: int | None = None,
    checkpointing: bool | str | None = None,
    optimizer_state_bytes_per_param: int = 8,
) -> MemoryPlan:
    """The memory plan of a model (weight-streamed or not) for a training batch.

    Usage: ``print(plan_memory(model, batch_size=1, seq_len=2048).format())``.
    ``checkpointing`` defaults to what the model has turned on; the optimiser state defaults to
    AdamW's two fp32 moments (8 bytes a parameter; 8-bit Adam: 2).
    """
    from fastlm.offload.streamer import get_weight_streamer  # lazy: streamer imports this module

    streamer = get_weight_streamer(model)
    config = model.config
    dims = _config_dims(config)
    seq_len = seq_len or getattr(model, "max_seq_length", None) or 2048
    if checkpointing is None:
        checkpointing = _checkpointing_mode(model)
    if streamer is not None:
        plan = streamer.weight_plan()
    else:
        plan = _resident_weight_plan(model)
    count, nbytes = _trainable_bytes(model)
    if count:
        plan.gpu["LoRA / trainable weights"] = nbytes
        plan.gpu["their gradients"] = nbytes
        plan.gpu["optimizer state (AdamW est.)"] = count * optimizer_state_bytes_per_param
    compute_bytes = 2 if _compute_dtype(model) != torch.float32 else 4
    for name, value in activation_bytes(
        config, batch_size, seq_len, checkpointing, compute_bytes
    ).items():
        plan.gpu[f"activations: {name} (est.)"] = value
    tokens = batch_size * seq_len
    if checkpointing in ("fastlm", "unsloth"):
        offloaded = dims["layers"] * tokens * dims["hidden"] * compute_bytes
        if offloaded >= 4 * MIB * dims["layers"]:
            plan.host["checkpointed layer inputs (pinned)"] = offloaded
    plan.notes.append(
        f"activations for batch {batch_size} x {seq_len} tokens, checkpointing={checkpointing!r}"
    )
    return plan


def _compute_dtype(model: nn.Module) -> torch.dtype:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def _checkpointing_mode(model: nn.Module) -> bool | str:
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            func = getattr(module, "_gradient_checkpointing_func", None)
            if getattr(func, "__name__", "") == "offloaded_checkpoint":
                return "fastlm"
            return True
    return False


def _resident_weight_plan(model: nn.Module) -> MemoryPlan:
    """The weights of a model that is not streamed: everything on its device."""
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        total += tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
    device = next(model.parameters()).device
    layers = _config_dims(model.config)["layers"]
    plan = MemoryPlan(str(device), layers, 0, 0, 0, host_available=host_memory_available())
    plan.gpu["weights (all resident)"] = total
    plan.gpu_available = gpu_memory_available(device)
    return plan


def packed_nbytes(shape: tuple[int, ...], blocksize: int = 64, nested: bool = True) -> int:
    """Bytes of one NF4 weight as streamed: packed nibbles plus its per-block absmax."""
    numel = math.prod(shape)
    blocks = -(-numel // blocksize)
    return (numel + 1) // 2 + blocks * (1 if nested else 4)


# --------------------------------------------------------------------------- decisions


def weights_bytes(config, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes outside the decoder layers, bytes of one decoder layer) of an NF4 model."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h, i = int(text.hidden_size), int(text.intermediate_size)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or h // heads)
    q = heads * head_dim
    kv = int(getattr(text, "num_key_value_heads", None) or heads) * head_dim
    numel = 2 * h * q + 2 * h * kv + 3 * h * i
    layer = numel // 2 + numel // 64
    itemsize = torch.empty((), dtype=dtype).element_size()
    embed = int(text.vocab_size) * h * itemsize
    tied = getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False))
    return embed * (1 if tied else 2), layer


def auto_resident_layers(
    config, dtype: torch.dtype, device: torch.device, sizes: dict[int, int], max_seq_length
) -> int:
    """How many decoder layers can stay on the GPU next to the streaming slots and a training
    margin (batch 1 at ``max_seq_length``, LoRA r=16 with AdamW); 0 without CUDA."""
    available = gpu_memory_available(device)
    if available is None or not sizes:
        return 0
    outside, _ = weights_bytes(config, dtype)
    layer = max(sizes.values())
    margin = _training_margin(config, max_seq_length or 2048)
    room = 0.9 * available - outside - DEFAULT_SLOTS * layer - margin
    return max(0, min(len(sizes), int(room // layer)))


def _training_margin(config, seq_len: int) -> int:
    lora = lora_parameter_count(config, 16) * 16  # fp32 weights, grads, two AdamW moments
    activations = sum(activation_bytes(config, 1, seq_len, True).values())
    return lora + activations + GIB // 2


def automatic_streaming_decision(
    config, dtype: torch.dtype, max_seq_length: int | None
) -> str | None:
    """Why a 4-bit model should be streamed (it does not fit the GPU with a training margin), or
    None when it fits. Logged as a warning when streaming is chosen."""
    available = gpu_memory_available("cuda")
    if available is None:
        return None
    try:
        outside, layer = weights_bytes(config, dtype)
        weights = outside + _config_dims(config)["layers"] * layer
        margin = _training_margin(config, max_seq_length or 2048)
    except (AttributeError, TypeError, ValueError):  # a config without the usual sizes
        logger.warning(  # the estimate never stops a load, but says it was not made
            "fastlm: cannot size %s for weight streaming; loading it on the GPU (pass "
            "offload_weights=True to stream it)", type(config).__name__,
        )  # fmt: skip
        return None
    try:
        experts = experts_weights(config, dtype)
    except Exception as error:  # noqa: BLE001 -- an estimate never stops a load; it says so
        logger.warning("fastlm: cannot size the experts of %s (%s)", type(config).__name__, error)
        experts = None
    if experts is not None:  # the dense formula above knows no experts
        weights, load_peak = experts
        if weights + margin <= 0.9 * available and load_peak > 0.9 * available:
            reason = (
                f"the 4-bit model's experts are quantised after a 16-bit load, whose peak is "
                f"about {load_peak / GIB:.1f} GiB, and {available / GIB:.1f} GiB of GPU memory "
                "are free; the streamed loader quantises them layer by layer and keeps on the "
                "GPU as many layers as fit (pass offload_weights=False to load it whole anyway)"
            )
            logger.warning("fastlm: loading the decoder layers through CPU RAM: %s.", reason)
            return reason
    if weights + margin <= 0.9 * available:
        return None
    reason = (
        f"the 4-bit model needs about {weights / GIB:.1f} GiB for its weights plus "
        f"~{margin / GIB:.1f} GiB to train at {max_seq_length or 2048} tokens, and "
        f"{available / GIB:.1f} GiB of GPU memory are free; pass offload_weights=False to load "
        "it on the GPU anyway"
    )
    logger.warning("fastlm: streaming the decoder layers from CPU RAM: %s.", reason)
    return reason


def experts_weights(config, dtype: torch.dtype) -> tuple[int, int] | None:
    """(GPU bytes of the 4-bit model's weights, GPU bytes at the peak of loading it whole) of a
    mixture-of-experts config, or None for a dense family. Counted on the model built on the
    meta device (every family's exact shapes, no formula per family): linear and expert weights
    NF4 (half a byte and an absmax per 64), embeddings, norms and routers in ``dtype``; loaded
    whole, transformers brings the experts in at ``dtype`` and fastlm quantises them after
    (``FastModel.from_pretrained``), so the peak holds them 16-bit."""
    from fastlm.models import spec_for  # lazy: fastlm.models loads transformers and peft

    spec = spec_for(config)
    if spec.moe is None:
        return None
    experts, linear, other = _weight_numels(config, spec)
    itemsize = torch.empty((), dtype=dtype).element_size()
    nf4 = (experts + linear) // 2 + (experts + linear) // 64
    weights = nf4 + other * itemsize
    load_peak = linear // 2 + linear // 64 + (experts + other) * itemsize
    return weights, load_peak


def meta_causal_lm(config) -> nn.Module:
    """The causal LM of ``config`` on the meta device (every shape, no memory), of the class its
    spec names where AutoModelForCausalLM has no entry (Mistral 4).

    Usage: ``sizes = {n: p.shape for n, p in meta_causal_lm(config).named_parameters()}``."""
    import transformers

    from fastlm.models import SPECS  # lazy: fastlm.models loads transformers and peft

    spec = SPECS.get(getattr(config, "model_type", None))
    name = spec.causal_lm_class if spec is not None else None
    with torch.device("meta"):
        if name:
            return getattr(transformers, name)(config)
        return transformers.AutoModelForCausalLM.from_config(config)


def _weight_numels(config, spec) -> tuple[int, int, int]:
    """(expert elements, other linear-weight elements of the decoder layers, everything else)."""
    model = meta_causal_lm(config)
    experts = linear = other = 0
    for module_name, module in model.named_modules():
        in_layers = ".layers." in f".{module_name}."
        for name, param in module.named_parameters(recurse=False):
            if type(module).__name__ == spec.moe.experts_class and param.dim() == 3:
                experts += param.numel()
            elif in_layers and isinstance(module, nn.Linear) and name == "weight":
                linear += param.numel()
            else:
                other += param.numel()
    return experts, linear, other
