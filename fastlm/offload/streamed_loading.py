"""Loading a 4-bit model too big for the GPU straight into weight-streamed form.

The model is built on the meta device (buffers such as RoPE's ``inv_freq`` computed normally),
its linear layers replaced by transformers' own bitsandbytes quantizer, then the safetensors
checkpoint is read one tensor at a time; each decoder layer is quantised on the GPU
(bitsandbytes' kernel: fast, and the same bytes as ``from_pretrained``) and moved to its host
buffer (``WeightStreamer.adopt``) before the next. Quantising on the CPU with bitsandbytes works
but takes ~1 s per 8 M weights on a core (an hour for 32B). Peak GPU memory while loading:
embeddings, head and one 16-bit weight matrix. Pre-quantised NF4 checkpoints load the same way
without quantising. ``build_random_nf4_model`` does the same from a config with random weights
(benchmarks of shapes too big to save on disk).

    model = load_streamed_model("./qwen-32b", dtype=torch.bfloat16)
    model = build_random_nf4_model(AutoConfig.for_model("qwen2", num_hidden_layers=64, ...))
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
from pathlib import Path
from typing import Any

import safetensors
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig, GenerationConfig
from transformers.quantizers import AutoHfQuantizer

from fastlm.model_folder import tensor_files
from fastlm.models import spec_for
from fastlm.models.nf4_experts import quantize_experts
from fastlm.models.spec import MixtureOfExperts
from fastlm.offload.copy_engine import CopyEngine
from fastlm.offload.memory_plan import DEFAULT_SLOTS, HostBudget, auto_resident_layers
from fastlm.offload.streamer import (
    WeightStreamer,
    WeightStreamingError,
    decoder_layers,
    expected_layer_nbytes,
)
from fastlm.quant import is_4bit_linear, nf4_config

__all__ = ["build_random_nf4_model", "load_streamed_model"]


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
        files = tensor_files(folder)  # tensor -> file (the index, else the files' headers)
        if not files:
            raise WeightStreamingError(
                f"{folder} has no safetensors checkpoint: weight streaming reads *.safetensors "
                "files (convert .bin checkpoints with save_pretrained(safe_serialization=True))."
            )
        opened = {f: safetensors.safe_open(str(f), "pt", device="cpu") for f in set(files.values())}
        self._where = {key: opened[file] for key, file in files.items()}

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


def _skeleton(config, dtype, bnb_config, pre_quantized, device, trust_remote_code, attn):
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


def _expert_converters(model_type: str) -> list:
    """transformers' checkpoint conversions that stack a MoE model's per-expert tensors into its
    3-D experts parameters (``experts.*.gate_proj.weight`` + ``up_proj`` -> ``gate_up_proj``),
    those whose operations ``_stacked_experts`` performs; [] for others.

    Usage: ``_expert_converters("qwen3_moe")``."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    found = []
    for converter in get_checkpoint_conversion_mapping(model_type) or []:
        operations = [
            (type(op).__name__, getattr(op, "dim", None))
            for op in getattr(converter, "operations", [])
        ]
        if len(converter.target_patterns) == 1 and operations in (
            [("MergeModulelist", 0)],
            [("MergeModulelist", 0), ("Concatenate", 1)],
        ):
            found.append(converter)
    return found


def _stacked_experts(source, prefix: str, full_name: str, meta, converters) -> torch.Tensor | None:
    """A 3-D experts parameter (E, out, in) from a checkpoint that stores each expert's
    projections apart: each source pattern's E tensors stacked (transformers' MergeModulelist
    on dim 0), the patterns concatenated along out (its Concatenate on dim 1: gate rows, then
    up rows). None when no conversion names it or a tensor is missing."""
    for converter in converters:
        (target,) = converter.target_patterns
        if not full_name.endswith(target):
            continue
        base = full_name[: -len(target)]
        parts = []
        for pattern in converter.source_patterns:
            keys = [
                _find_key(source, prefix, base + pattern.replace("*", str(expert)))
                for expert in range(meta.shape[0])
            ]
            tensors = [source.get(key) for key in keys]
            if any(t is None for t in tensors):
                return None
            parts.append(torch.stack(tensors))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    return None


def _load_module_tensors(
    module, name, *, source, device, dtype, pre_quantized, prefix, missing, tied, converters=()
) -> None:
    """Load the parameters and persistent buffers of ``module`` (not its children)."""
    import bitsandbytes as bnb  # lazy: the optional "quant" extra (nf4_config checked it is there)

    for pname, meta in list(module._parameters.items()):
        full_name = f"{name}.{pname}" if name else pname
        if meta is None or meta.device.type != "meta" or full_name in tied:
            continue
        key = _find_key(source, prefix, full_name)
        quantised = is_4bit_linear(module) and pname == "weight"
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
            if value is None and meta.dim() == 3:  # experts a checkpoint stores one by one
                value = _stacked_experts(source, prefix, full_name, meta, converters)
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
    moe: MixtureOfExperts | None = None,
) -> None:
    stack, layers = decoder_layers(model)
    in_layer = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
    prefix = getattr(model, "base_model_prefix", "model")
    named = list(model.named_modules())
    missing: list[str] = []
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})  # tie_weights() sets them
    converters = _expert_converters(model.config.model_type) if moe is not None else []
    load = functools.partial(
        _load_module_tensors, source=source, device=device, dtype=dtype,
        pre_quantized=pre_quantized, prefix=prefix, missing=missing, tied=tied,
        converters=converters,
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
        complete = all(p.device.type != "meta" for p in layers[index].parameters())
        if moe is not None and complete:  # before the layer leaves the device: one at a time
            quantize_experts(layers[index], moe, log=False)
        if streamer is not None and index in streamer.streamed and complete:
            streamer.adopt(index)  # an incomplete layer is reported below, with the rest
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    _refuse_experts_stored_apart(still_meta, source, moe)
    if still_meta:
        shown = ", ".join(still_meta[:5]) + (" ..." if len(still_meta) > 5 else "")
        raise WeightStreamingError(
            f"the checkpoint lacks {len(still_meta)} weights the model needs ({shown}); "
            f"looked for {', '.join(missing[:3])}. Load it without offload_weights to see "
            "transformers' own report."
        )
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)


def _refuse_experts_stored_apart(still_meta: list[str], source, moe) -> None:
    """A MoE checkpoint that stores each expert's projections as their own tensors
    (``experts.0.gate_proj.weight``...) where no conversion ``_stacked_experts`` performs
    assembled them (Qwen's are: ``_expert_converters``)."""
    if moe is None:
        return
    missing = [n for n in still_meta if n.rsplit(".", 1)[-1] in (moe.gate_up, moe.down)]
    apart = [k for k in source.keys() if ".experts.0." in k]  # noqa: SIM118 (not a dict)
    if missing and apart:
        raise WeightStreamingError(
            f"offload_weights=True: this checkpoint stores each expert's projections apart "
            f"({apart[0]}...) in a way transformers' conversion for this model type does not "
            "stack as fastlm's streamed loader does; load it without offload_weights "
            "(load_in_4bit stores the experts NF4 too), then fastlm.offload.stream_weights(model) "
            "if it must stream."
        )


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
    bnb_config = nf4_config(dtype, quantization_config)
    model, quantizer = _skeleton(
        config, dtype, bnb_config, pre_quantized, device, trust_remote_code, attn_implementation
    )
    streamer = None
    moe = spec_for(config).moe  # a MoE model's experts are stored NF4 too, layer by layer
    if stream:
        _, layers = decoder_layers(model)
        nested = bool(bnb_config.bnb_4bit_use_double_quant)
        sizes = {i: expected_layer_nbytes(layer, 64, nested, moe) for i, layer in enumerate(layers)}
        if resident_layers == "auto":
            resident_layers = auto_resident_layers(config, dtype, device, sizes, max_seq_length)
        streamer = WeightStreamer(model, device, slots, int(resident_layers), engine, budget)
        streamer.plan_host(sizes)
    _materialise(model, quantizer, source_factory(), device, dtype, pre_quantized, streamer, moe)
    if streamer is not None:
        streamer.finish()
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
    from huggingface_hub import snapshot_download  # lazy: only a hub name needs the hub client

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
    embedding weights ~ N(0, std = config.initializer_range), norms 1 (0 where the norm computes
    (1 + w)·x̂, as Gemma's do), biases 0. ``stream=False`` keeps every layer on the GPU (the same
    weights for a seed). The architecture must be one fastlm supports (``fastlm.models.SPECS``),
    whose spec says how its norms read their weight; others raise UnsupportedArchitectureError.
    """
    device = torch.device(device)
    std = std if std is not None else float(getattr(config, "initializer_range", 0.02))
    zero_norms = spec_for(config).norm_offset == 1.0
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
