"""Save a LoRA-trained model: the plain adapter, or LoRA merged into a standalone checkpoint.

from fastlm.export import save_pretrained_merged
save_pretrained_merged(model, "out/merged", tokenizer, save_method="merged_16bit")
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn
from tqdm.auto import tqdm

from fastlm import quant
from fastlm.export._atomic import ExportPathError, check_free_disk, check_target, export_into
from fastlm.model_folder import INDEX_NAME, tensor_files

logger = logging.getLogger("fastlm")

SAVE_METHODS = ("lora", "merged_16bit", "merged_4bit")
# PEFT's per-adapter containers: never written to a merged checkpoint as such.
_ADAPTER_PARTS = {
    "lora_A",
    "lora_B",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
_SHARD_NAME = re.compile(r"model-[0-9]{5}-of-[0-9]{5}\.safetensors")


@dataclass
class _Entry:
    """One tensor of the merged checkpoint: where it comes from and what it becomes."""

    name: str  # key in the written checkpoint
    source: str  # key in the (PEFT-wrapped) base model's state dict
    lora: nn.Module | None  # the LoRA layer to merge into this weight, if any
    shape: tuple[int, ...]
    dtype: torch.dtype
    packed: nn.Parameter | None = None  # the model's 4-bit weight (dequantised to merge)
    requantize: bool = False  # written as NF4 (merged_4bit)

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        if self.requantize:  # 4 bits a weight plus ~1 byte of absmax per 64
            return numel // 2 + numel // 64 + 1024
        return numel * self.dtype.itemsize


def save_pretrained_merged(
    model: nn.Module,
    save_directory: str | os.PathLike,
    tokenizer: Any = None,
    save_method: str = "merged_16bit",
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | str | None = None,
    base_checkpoint: str | os.PathLike | None = None,
) -> Path:
    """Save ``model`` as a LoRA adapter (``"lora"``) or a merged checkpoint.

    Usage: ``save_pretrained_merged(model, "out/merged", tokenizer, save_method="merged_16bit")``.
    ``"merged_16bit"``: LoRA merged in fp32, written in the model's dtype (or ``dtype``);
    ``"merged_4bit"``: the same, then re-quantised to bitsandbytes NF4 (double quant), a folder
    that ``from_pretrained`` loads as a 4-bit model. For a QLoRA model the LoRA is merged into the
    dequantised 4-bit weights -- the weights it was trained against -- unless
    ``base_checkpoint`` names the original 16-bit checkpoint folder, whose weights are then used
    (closer to the original model, but not the weights the adapter was fitted to).
    The merged folder loads with plain ``AutoModelForCausalLM.from_pretrained``. Files are
    written into ``save_directory`` (other files there are kept; docs/export.md lists what is
    replaced), each appearing only once all are complete; ``model`` is left unchanged. Refuses
    the folder the model, ``tokenizer`` or ``base_checkpoint`` was loaded from (a LoRA adapter
    folder loaded with ``FastModel.from_pretrained`` is known by its tokenizer). Returns the
    absolute path.
    """
    if save_method == "lora":
        return _save_lora(model, save_directory, tokenizer)
    if save_method in ("merged_16bit", "merged_4bit"):
        quantize = save_method == "merged_4bit"
        return _save_merged(
            model, save_directory, tokenizer, max_shard_size, dtype, base_checkpoint, quantize
        )
    raise ValueError(f"save_method must be one of {SAVE_METHODS}, got {save_method!r}.")


def parse_size(size: int | str) -> int:
    """Bytes in a size such as ``"5GB"``, ``"500MiB"`` or ``1024``.

    Usage: ``parse_size("5GB")  # 5_000_000_000`` (GB is 10⁹ as in transformers, GiB is 2³⁰).
    """
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"Cannot read the size {size!r}; write it like '5GB', '500MB' or 1024.")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


# ---------------------------------------------------------------------------------------------
# save_method="lora"


def _save_lora(model: nn.Module, save_directory: str | os.PathLike, tokenizer: Any) -> Path:
    from peft import PeftModel, get_peft_model_state_dict

    if not isinstance(model, PeftModel):
        raise ValueError(
            "save_method='lora' needs a PEFT model (from FastModel.get_peft_model); for a full "
            "fine-tune use save_method='merged_16bit'."
        )
    inputs = input_folders(model, tokenizer)
    folder = check_target(save_directory, inputs)
    needed = sum(t.numel() * t.element_size() for t in get_peft_model_state_dict(model).values())
    check_free_disk(folder, needed, "the LoRA adapter")
    # PEFT writes a model card; a README.md already in the folder is the user's (or an earlier
    # card): kept as it is.
    with export_into(folder, inputs=inputs, keep=("README.md",)) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return folder


# ---------------------------------------------------------------------------------------------
# save_method="merged_16bit"


def _save_merged(
    model: nn.Module,
    save_directory: str | os.PathLike,
    tokenizer: Any,
    max_shard_size: int | str,
    dtype: torch.dtype | str | None,
    base_checkpoint: str | os.PathLike | None = None,
    quantize: bool = False,
) -> Path:
    base = lora_base_model(model)
    target_dtype = _resolve_dtype(base, dtype)
    entries = _plan(base, target_dtype, quantize)
    original = _CheckpointReader(base_checkpoint) if base_checkpoint is not None else None
    if original is not None:
        original.check(entries)
    shards = _split(entries, parse_size(max_shard_size))
    inputs = [*input_folders(model, tokenizer), base_checkpoint]
    folder = check_target(save_directory, inputs)
    stale = _superseded_weights(folder, [_shard_name(i, len(shards)) for i in range(len(shards))])
    total = sum(entry.nbytes for entry in entries)
    check_free_disk(folder, total, "the merged model")
    with export_into(folder, inputs=inputs, remove=stale) as tmp:
        _write_shards(base, shards, tmp, total, original)
        _write_config(base, tmp, target_dtype, quantize)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    logger.info("Saved the merged model (%d shard(s)) to %s", len(shards), folder)
    return folder


def input_folders(model: nn.Module, tokenizer: Any = None) -> list[str]:
    """Local folders ``model`` (and ``tokenizer``) were loaded from: an export must not write there.

    Usage: ``check_target(out, input_folders(model, tokenizer))``. Hub ids and in-memory models
    give none. PEFT keeps the base model's path, not the adapter's: the adapter folder of
    ``FastModel.from_pretrained(adapter_folder)`` is the ``adapter_folder`` the loader records
    on the model, and the folder of the tokenizer passed in counts too (a tokenizer loaded from
    an adapter folder by other means).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = [
        getattr(getattr(base, "config", None), "_name_or_path", None),
        getattr(base, "name_or_path", None),
        getattr(model, "adapter_folder", None),
        getattr(tokenizer, "name_or_path", None),
    ]
    for config in (getattr(model, "peft_config", None) or {}).values():
        names.append(getattr(config, "base_model_name_or_path", None))
    return sorted({str(n) for n in names if n and os.path.isdir(n)})


def _superseded_weights(folder: Path, names: list[str]) -> list[str]:
    """Weight files in ``folder`` that writing the checkpoint ``names`` makes stale.

    Usage: ``_superseded_weights(Path("out"), ["model.safetensors"])``. The rule: the shards
    (``model-NNNNN-of-NNNNN.safetensors``) listed in the index this export replaces, and that
    index too when the new checkpoint is one file -- an earlier export's checkpoint. Files
    with other names, or not listed, are never removed. A ``model.safetensors`` beside a new
    sharded checkpoint would be loaded by transformers instead of it, and nothing says who wrote
    it: ExportPathError rather than deleting it.
    """
    sharded = len(names) > 1
    if sharded and os.path.lexists(folder / "model.safetensors"):
        raise ExportPathError(
            f"{folder} holds a model.safetensors that this export ({len(names)} shards and an "
            "index) would not replace, and transformers would load it instead of the new "
            "shards. Remove it, choose another folder, or raise max_shard_size to write one file."
        )
    index = folder / INDEX_NAME
    if not index.is_file():
        return []
    try:
        listed = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        logger.warning("%s is not a safetensors index: left as it is", index)
        return []
    stale = sorted(n for n in listed if _SHARD_NAME.fullmatch(str(n)) and n not in names)
    if not sharded and all(_SHARD_NAME.fullmatch(str(n)) for n in listed):
        stale.append(INDEX_NAME)  # else it would name shards that are gone
    return stale


def lora_base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a LoRA PeftModel (or the model itself, for a full fine-tune).

    Usage: ``base = lora_base_model(peft_model)``; other adapter types raise ValueError.
    """
    from peft import PeftModel, PeftType

    if not isinstance(model, PeftModel):
        return model  # a full fine-tune: nothing to merge, the weights are written as they are
    for name, config in model.peft_config.items():
        if config.peft_type != PeftType.LORA:
            raise ValueError(
                f"Adapter {name!r} is {config.peft_type}; save_pretrained_merged merges LoRA only."
            )
    return model.get_base_model()


def _resolve_dtype(base: nn.Module, dtype: torch.dtype | str | None) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if dtype is None:
        # The base weights' dtype: LoRA matrices are often fp32 beside a bf16 model.
        dtype = getattr(base, "dtype", None) or next(base.parameters()).dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}.")
    return dtype


def check_plain_lora(base: nn.Module) -> None:
    """Raise NotImplementedError naming any layer that is not plain LoRA on Linear/Embedding.

    Usage: ``check_plain_lora(lora_base_model(model))`` before merging.
    """
    from peft.tuners.lora import LoraLayer

    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.active_adapters:
            if module.use_dora.get(adapter, False):
                raise NotImplementedError(
                    f"{name} uses DoRA (use_dora=True, adapter {adapter!r}); "
                    "save_pretrained_merged merges plain LoRA only. Save it with "
                    "save_method='lora', or merge it with PEFT's merge_and_unload on a copy."
                )
            variant = getattr(module, "lora_variant", {}).get(adapter)
            if variant is not None:
                raise NotImplementedError(
                    f"{name} uses the LoRA variant {type(variant).__name__}; "
                    "save_pretrained_merged merges plain LoRA only (save_method='lora' works)."
                )
            if module.lora_bias.get(adapter, False):
                raise NotImplementedError(
                    f"{name} has a LoRA bias (lora_bias=True); save_pretrained_merged merges "
                    "plain LoRA only (save_method='lora' works)."
                )
        if not isinstance(module, _mergeable_lora_types()):
            raise NotImplementedError(
                f"{name} is a {type(module).__name__}; save_pretrained_merged merges LoRA on "
                "Linear, 4-bit Linear and Embedding layers and on parameters (target_parameters) "
                "only."
            )


def _mergeable_lora_types() -> tuple[type, ...]:
    from peft.tuners.lora import Embedding, ParamWrapper
    from peft.tuners.lora import Linear as LoraLinear

    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # no bitsandbytes: no 4-bit layers either
        return (LoraLinear, Embedding, ParamWrapper)
    return (LoraLinear, Linear4bit, Embedding, ParamWrapper)


def _tied_names(base: nn.Module) -> set[str]:
    config = getattr(base, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return set()
    tied = getattr(base, "_tied_weights_keys", None)
    # transformers 5: {"lm_head.weight": "model.embed_tokens.weight"}; older: a list.
    return set(tied) if tied else {"lm_head.weight"}


def packed_weights(base: nn.Module) -> dict[str, nn.Parameter]:
    """State-dict key -> 4-bit (bitsandbytes ``Params4bit``) weight, for every quantised layer.

    Usage: ``packed = packed_weights(lora_base_model(model))``.
    """
    return {f"{name}.weight": weight for name, _, weight in quant.packed_weights(base)}


def quant_state_keys(state_keys, packed: dict) -> set[str]:
    """The state-dict keys that serialise a 4-bit weight's quant_state (absmax, quant_map...)."""
    return {k for k in state_keys if k.rsplit(".weight.", 1)[0] + ".weight" in packed}


def _linear_weight_keys(base: nn.Module) -> set[str]:
    """Keys of the weights a 4-bit model quantises: the decoder's linear layers, not the head."""
    from peft.tuners.lora import LoraLayer

    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    keys = set()
    for name, module in base.named_modules():
        if module is head or isinstance(module, LoraLayer):
            continue
        if isinstance(module, nn.Linear) or hasattr(getattr(module, "weight", None), "quant_state"):
            keys.add(f"{name}.weight".replace(".base_layer.", "."))
    return keys


def _plan(base: nn.Module, dtype: torch.dtype, quantize: bool = False) -> list[_Entry]:
    """Every tensor of the merged checkpoint, in state-dict order, without reading any data."""
    check_plain_lora(base)
    if quantize:
        _refuse_4bit_experts(base)
    tied = _tied_names(base)
    entries: dict[str, _Entry] = {}
    state = base.state_dict()
    packed = packed_weights(base)
    skip = quant_state_keys(state, packed)
    to_quantize = _linear_weight_keys(base) if quantize else set()
    for key, tensor in state.items():
        if key in skip:
            continue
        resolved = resolve_key(base, key)
        if resolved is None:
            continue
        name, lora = resolved
        if name in tied:
            if key != name:  # the head itself was adapted: merging would silently untie it
                raise NotImplementedError(
                    f"{name} is tied to the input embeddings but was adapted ({key}); merging "
                    "would break the tie. Save with save_method='lora'."
                )
            continue
        if name in entries:
            raise RuntimeError(f"Both {entries[name].source} and {key} map to {name}.")
        weight = packed.get(key)
        shape = tuple(weight.quant_state.shape) if weight is not None else tuple(tensor.shape)
        out_dtype = dtype if tensor.is_floating_point() or weight is not None else tensor.dtype
        requantize = name in to_quantize and len(shape) == 2
        entries[name] = _Entry(name, key, lora, shape, out_dtype, weight, requantize)
    _refuse_adapted_tied_source(base, entries, tied)
    return list(entries.values())


def _refuse_4bit_experts(base: nn.Module) -> None:
    """merged_4bit of a mixture-of-experts model: NotImplementedError naming its experts, whose
    3-D weights bitsandbytes NF4 (nn.Linear only) would leave 16-bit: most of the model."""
    from fastlm.models import SPECS  # lazy: fastlm.export alone loads torch only

    spec = SPECS.get(getattr(getattr(base, "config", None), "model_type", None))
    if spec is None or spec.moe is None:
        return
    for name, module in base.named_modules():
        if type(module).__name__ == spec.moe.experts_class:
            name = name.replace(".base_layer", "")
            raise NotImplementedError(
                f"merged_4bit: {name} holds {spec.family}'s experts as 3-D weights, which "
                "bitsandbytes NF4 does not quantise (they would stay 16-bit beside 4-bit "
                "linears); save with save_method='merged_16bit'."
            )


def _refuse_adapted_tied_source(base: nn.Module, entries: dict[str, _Entry], tied: set) -> None:
    # With tied embeddings the in-memory head keeps using the *unadapted* embedding matrix, so a
    # merged (still tied) checkpoint would compute something else.
    sources = getattr(base, "_tied_weights_keys", None)
    sources = set(sources.values()) if isinstance(sources, dict) else set()
    if tied and not sources:
        sources = {"model.embed_tokens.weight"}
    for name in sources:
        entry = entries.get(name)
        if entry is not None and (entry.lora is not None or entry.source != name):
            raise NotImplementedError(
                f"{name} is tied to the LM head but was adapted ({entry.source}); merging would "
                "change the head too. Save with save_method='lora'."
            )


def resolve_key(base: nn.Module, key: str) -> tuple[str, nn.Module | None] | None:
    """``(checkpoint name, LoRA layer to merge or None)`` for a state-dict key of a LoRA model's
    base (PEFT's base_layer / ParamWrapper / modules_to_save wrappers looked through); None skips
    it (an adapter's own tensors). Usage: ``name, lora = resolve_key(base, key)``."""
    from peft.tuners.lora import LoraLayer

    parts = key.split(".")
    if _ADAPTER_PARTS & set(parts):
        return None
    if "token_adapter" in parts:
        raise NotImplementedError(
            f"{key}: trainable-token adapters are not merged by save_pretrained_merged yet; "
            "save with save_method='lora'."
        )
    parts = _resolve_modules_to_save(base, parts)
    if parts is None:
        return None
    lora = None
    wrapped = _param_wrapper_key(base, parts)
    if wrapped is not None:
        return wrapped
    if "base_layer" in parts:
        index = len(parts) - 1 - parts[::-1].index("base_layer")
        module = base.get_submodule(".".join(parts[:index]))
        if isinstance(module, LoraLayer) and parts[index + 1 :] == ["weight"]:
            lora = module
        parts = [part for part in parts if part != "base_layer"]
    return ".".join(parts), lora


def _param_wrapper_key(base: nn.Module, parts: list[str]) -> tuple[str, nn.Module | None] | None:
    """A parameter under PEFT's ParamWrappers (``experts.base_layer.base_layer.down_proj``):
    ``(experts.down_proj, the wrapper that adapts down_proj or None)``; None for other keys.

    One ParamWrapper adapts one parameter; two on one module nest, each the other's base_layer."""
    from peft.tuners.lora import ParamWrapper

    if "base_layer" not in parts:
        return None
    first = parts.index("base_layer")
    module = base.get_submodule(".".join(parts[:first]))
    if not isinstance(module, ParamWrapper):
        return None
    rest, wrappers = parts[first:], []
    while isinstance(module, ParamWrapper) and rest[:1] == ["base_layer"]:
        wrappers.append(module)
        module, rest = module.base_layer, rest[1:]
    adapting = [w for w in wrappers if rest == [w.parameter_name]]
    return ".".join(parts[:first] + rest), (adapting[0] if adapting else None)


def _resolve_modules_to_save(base: nn.Module, parts: list[str]) -> list[str] | None:
    # ModulesToSaveWrapper holds the frozen original and one trained copy per adapter; the
    # forward uses the active adapter's copy (or the original when adapters are disabled).
    for marker in ("original_module", "modules_to_save"):
        if marker not in parts:
            continue
        index = parts.index(marker)
        wrapper = base.get_submodule(".".join(parts[:index]))
        active = None
        if not wrapper.disable_adapters and wrapper.active_adapters[0] in wrapper.modules_to_save:
            active = wrapper.active_adapters[0]
        if marker == "original_module":
            return parts[:index] + parts[index + 1 :] if active is None else None
        if parts[index + 1] != active:
            return None
        return parts[:index] + parts[index + 2 :]
    return parts


def _split(entries: list[_Entry], limit: int) -> list[list[_Entry]]:
    """Greedy shards of at most ``limit`` bytes (a bigger tensor gets a shard of its own)."""
    shards: list[list[_Entry]] = []
    current: list[_Entry] = []
    size = 0
    for entry in entries:
        if current and size + entry.nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += entry.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def _shard_name(index: int, count: int) -> str:
    if count == 1:
        return "model.safetensors"
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def _write_shards(
    base: nn.Module,
    shards: list[list[_Entry]],
    folder: Path,
    total: int,
    original: _CheckpointReader | None = None,
) -> None:
    """Build one shard at a time, write it, drop it: at most one shard is ever held in memory."""
    state = base.state_dict()  # references to the live tensors, no copies
    weight_map: dict[str, str] = {}
    count = len(shards)
    with tqdm(total=sum(map(len, shards)), desc="Merging LoRA", unit="tensor") as progress:
        for index, shard in enumerate(shards):
            filename = _shard_name(index, count)
            tensors = {}
            for entry in shard:
                source = state[entry.source] if entry.packed is None else entry.packed
                if original is not None and entry.packed is not None:
                    source = original.get(entry.name)
                for name, tensor in _materialise(source, entry).items():
                    tensors[name] = tensor
                    weight_map[name] = filename
                progress.update(1)
            _write_shard(tensors, folder / filename)
            del tensors
    if count > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        (folder / INDEX_NAME).write_text(text)


def _write_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})


def _materialise(tensor: torch.Tensor, entry: _Entry) -> dict[str, torch.Tensor]:
    """The CPU tensor(s) to write for one entry: fresh copies (never views of the live model),
    dequantised if 4-bit, merged if LoRA, re-quantised to NF4 for merged_4bit."""
    if entry.packed is not None or entry.lora is not None or entry.requantize:
        weight = quant.dequantized(tensor)
        if entry.lora is not None:
            weight = merge_lora_weight(entry.lora, weight)
        if entry.requantize:
            return _nf4_tensors(entry.name, weight.to(entry.dtype))
        return {entry.name: weight.to("cpu", entry.dtype).contiguous()}
    return {entry.name: tensor.detach().to("cpu", entry.dtype, copy=True).contiguous()}


def _nf4_tensors(name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """``name`` quantised as transformers serialises a bitsandbytes NF4 weight (double quant)."""
    import bitsandbytes.functional as bnb_functional

    packed, quant_state = bnb_functional.quantize_4bit(
        weight, blocksize=64, compress_statistics=True, quant_type="nf4"
    )
    tensors = {name: packed}
    for key, value in quant_state.as_dict(packed=True).items():
        tensors[f"{name}.{key}"] = value
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


class _CheckpointReader:
    """Read tensors by name from a safetensors checkpoint folder (one file or an index)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.files = tensor_files(self.folder)
        if not self.files:
            raise FileNotFoundError(
                f"base_checkpoint={str(folder)!r} has no model.safetensors or "
                "model.safetensors.index.json; pass the original 16-bit checkpoint folder."
            )

    def check(self, entries: list[_Entry]) -> None:
        for entry in entries:
            if entry.packed is None:
                continue
            if entry.name not in self.files:
                raise KeyError(f"{entry.name} is not in base_checkpoint {self.folder}.")
            with safetensors.safe_open(self.files[entry.name], "pt") as handle:
                shape = tuple(handle.get_slice(entry.name).get_shape())
            if shape != entry.shape:
                raise ValueError(
                    f"base_checkpoint {self.folder}: {entry.name} has shape {shape}, the model "
                    f"{entry.shape}; is it the checkpoint this model was quantised from?"
                )

    def get(self, name: str) -> torch.Tensor:
        with safetensors.safe_open(self.files[name], "pt") as handle:
            return handle.get_tensor(name)


def merge_lora_weight(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """W + Σ scaling·B·A over the active adapters, in fp32, on a copy of ``weight``; for a
    PEFT ParamWrapper (LoRA on a 3-D experts parameter) W[e] + scaling·B_e·A_e per expert e.

    Usage: ``merged = merge_lora_weight(lora_layer, lora_layer.base_layer.weight)``.
    """
    merged = weight.detach().to(torch.float32, copy=True)
    if layer.disable_adapters:
        return merged
    for adapter in layer.active_adapters:
        if adapter in layer.merged_adapters:
            continue  # PEFT already folded it into the base weight
        if hasattr(layer, "parameter_name"):  # PEFT's ParamWrapper (target_parameters)
            if adapter not in layer.lora_A:
                continue
            delta = _parameter_delta(layer, adapter, merged.shape)
        elif adapter in layer.lora_A:
            delta = layer.lora_B[adapter].weight.float() @ layer.lora_A[adapter].weight.float()
            if getattr(layer, "fan_in_fan_out", False):
                delta = delta.T
        elif adapter in layer.lora_embedding_A:
            a, b = layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
            delta = (b.float() @ a.float()).T
        else:
            continue
        merged.add_(delta.detach().to(merged.device), alpha=layer.scaling[adapter])
    return merged


def _parameter_delta(wrapper: nn.Module, adapter: str, shape: torch.Size) -> torch.Tensor:
    """B_e A_e for every expert e of a ParamWrapper's parameter, in the parameter's layout (fp32).

    PEFT holds the E experts' factors in two Linears: A (E·r, in), whose rows e·r .. e·r + r - 1
    are expert e's A_e (r, in); B (out, r·E), whose column j·E + e is rank j of expert e's B_e
    (out, r). Then delta[e] = B_e A_e (out, in): the (E, out, in) parameter's slice e (Qwen3-MoE's
    experts); a parameter stored (E, in, out) takes delta[e]ᵀ; a 2-D one (E = 1) is B A.
    """
    experts = wrapper.num_experts
    a = wrapper.lora_A[adapter].weight.detach().float()  # (E·r, in)
    b = wrapper.lora_B[adapter].weight.detach().float()  # (out, r·E)
    a = a.view(experts, -1, a.shape[1])  # (E, r, in)
    b = b.view(b.shape[0], -1, experts).permute(2, 0, 1)  # (E, out, r)
    delta = torch.bmm(b, a)  # (E, out, in)
    if len(shape) == 3 and not wrapper._did_swap_in_out_features:  # stored (E, in, out)
        delta = delta.transpose(1, 2)
    return delta.reshape(shape)


def _write_config(base: nn.Module, folder: Path, dtype: torch.dtype, quantize: bool) -> None:
    config = getattr(base, "config", None)
    if config is None:
        return
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        # Merged 16-bit weights are plain floating point; a leftover quantization_config would
        # make from_pretrained try to quantise or dequantise them.
        del config.quantization_config
    if quantize:  # what from_pretrained needs to read the NF4 tensors back
        config.quantization_config = quant.nf4_config(dtype).to_dict()
    config.dtype = dtype
    config.save_pretrained(folder)
    generation_config = getattr(base, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(folder)
