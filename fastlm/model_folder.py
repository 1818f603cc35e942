"""Where ``from_pretrained`` finds a model, checked before transformers reads it.

A model is a local folder holding ``config.json`` (or the ``gguf_file`` asked for), a LoRA adapter
folder (``adapter_config.json`` naming its base model), or a Hugging Face Hub name that the cache
holds (or that transformers may download, when ``HF_HUB_OFFLINE`` is off). Without these checks
transformers answers a missing folder with "Repo id must be in the form ..." or "couldn't connect
to huggingface.co", a folder without config.json with "should have a model_type key", and a
truncated weights file with a safetensors header error that names no file.

Usage: ``path = resolve(name)``; then ``adapter_base(path)`` or ``check_model_folder(path)``.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

from fastlm.errors import DamagedCheckpointError, ModelNotFoundError

# "name" or "org/name", as huggingface_hub validates repository ids; "./x", "/x", "a/b/c" are paths
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
INDEX_NAME = "model.safetensors.index.json"  # a sharded checkpoint's map of tensors to files


def resolve(
    model_name: str, cached_files: tuple[str, ...] = ("config.json",), revision=None
) -> str:
    """``model_name`` as ``from_pretrained`` should get it: a local folder as an absolute path (so
    adapters and run files name it from anywhere), a Hub name unchanged when the Hugging Face cache
    holds one of ``cached_files`` or downloads are allowed; otherwise a ``ModelNotFoundError``."""
    path = Path(model_name).expanduser()
    if path.is_dir():
        return os.path.abspath(path)
    if path.exists():
        raise ModelNotFoundError(
            f"{model_name} is a file; pass the model's folder (the one with config.json and the "
            "weights)"
        )
    if ".." in model_name or not _HUB_NAME.match(model_name):
        raise ModelNotFoundError(f"{model_name}: no such folder")
    if any(_in_hub_cache(model_name, name, revision) for name in cached_files):
        return model_name
    if hub_offline():
        raise ModelNotFoundError(
            f"{model_name}: no such folder, and no Hub model of that name in the Hugging Face "
            "cache (HF_HUB_OFFLINE=1: nothing is downloaded). Pass the path of a model folder "
            "(with config.json), or set HF_HUB_OFFLINE=0 to download it."
        )
    return model_name  # transformers downloads it


def not_found(model_name: str, error: Exception) -> ModelNotFoundError:
    """The error for a Hub name that transformers could not download (``error``: its OSError)."""
    first_line = (str(error).strip().splitlines() or [repr(error)])[0]
    return ModelNotFoundError(
        f"{model_name}: no such folder, and the Hugging Face Hub did not provide it ({first_line})"
    )


def hub_offline() -> bool:
    """Whether huggingface_hub may download (``HF_HUB_OFFLINE``; ``fastlm`` commands set it)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _in_hub_cache(repo_id: str, filename: str, revision) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str)


def adapter_base(folder: str) -> str | None:
    """The base model that the LoRA adapter in ``folder`` names, resolved (``resolve``); None when
    ``folder`` is not an adapter folder (adapter_config.json and no config.json)."""
    path = Path(folder)
    if not (path / "adapter_config.json").is_file() or (path / "config.json").is_file():
        return None
    try:
        base = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        base = base.get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as error:
        raise DamagedCheckpointError(
            f"{path / 'adapter_config.json'}: unreadable ({error})"
        ) from None
    how = (
        "load the base model yourself, then the adapter on it: model, tokenizer = "
        "FastModel.from_pretrained(BASE_FOLDER); model = peft.PeftModel.from_pretrained(model, "
        f"{str(folder)!r}, is_trainable=True)"
    )
    if not base:
        raise ModelNotFoundError(
            f"{folder} is a LoRA adapter whose adapter_config.json names no base model "
            f"(base_model_name_or_path): {how}"
        )
    try:
        return resolve(base)
    except ModelNotFoundError as error:
        raise ModelNotFoundError(
            f"{folder} is a LoRA adapter for {base}, which is not here ({error}): {how}"
        ) from None


def check_model_folder(folder: str, config_files: tuple[str, ...] = ("config.json",)) -> None:
    """A local model folder has one of ``config_files`` and intact weights (``check_weights``);
    a ``ModelNotFoundError`` / ``DamagedCheckpointError`` that says what is wrong otherwise."""
    path = Path(folder)
    if not any((path / name).is_file() for name in config_files):
        nested = sorted(p.parent.name for p in path.glob(f"*/{config_files[0]}"))
        hint = f"; its subfolder {nested[0]}/ is one" if nested else ""
        raise ModelNotFoundError(
            f"{folder} has no {' or '.join(config_files)}, so it is not a Hugging Face model "
            f"folder{hint}"
        )
    check_weights(path)


def check_weights(folder: Path) -> None:
    """Every safetensors file of ``folder`` (the shards its index lists, else ``*.safetensors``)
    is there and complete: the 8-byte header length, the JSON header and the tensor data it
    describes all fit in the file. Reads the headers only (kilobytes per file)."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, AttributeError) as error:
            raise DamagedCheckpointError(f"{index}: unreadable ({error})") from None
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise DamagedCheckpointError(
                f"{folder / missing[0]} is missing ({index.name} lists {len(shards)} shards, "
                f"{len(missing)} are not there); copy or download the model again"
            )
        files = [folder / name for name in shards]
    else:
        files = sorted(folder.glob("*.safetensors"))
    for file in files:
        problem = _safetensors_problem(file)
        if problem:
            raise DamagedCheckpointError(
                f"{file} is damaged: {problem}; copy or download it again (an interrupted copy or "
                "download leaves a file like this)"
            )


def _safetensors_problem(file: Path) -> str | None:
    """Why ``file`` is not a complete safetensors file, or None."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"truncated: {size} bytes, shorter than a safetensors header"
        (header_size,) = struct.unpack("<Q", head)
        if header_size > size - 8:
            return f"truncated: {size:,} bytes, shorter than its {header_size:,}-byte header"
        try:
            header = json.loads(handle.read(header_size))
            end = max(
                (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                default=0,
            )
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            return "its header is not valid safetensors JSON"
    if 8 + header_size + end > size:
        return f"truncated: {size:,} bytes, its header describes {8 + header_size + end:,}"
    return None


def tensor_files(folder: str | os.PathLike) -> dict[str, Path]:
    """{tensor name: the safetensors file of ``folder`` that holds it}: from the shard index when
    there is one, else from the headers of its ``*.safetensors`` files (read, not loaded).

    Usage: ``files = tensor_files(path); files["lm_head.weight"]``.
    """
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    return {
        name: file for file in sorted(folder.glob("*.safetensors")) for name in _tensor_names(file)
    }


def _tensor_names(file: Path) -> list[str]:
    with open(file, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_size))
    return [name for name in header if name != "__metadata__"]
