"""Reading and writing Sentence-Transformers model directories (without importing the library).

A Sentence-Transformers directory is a Hugging Face model directory plus:

- ``modules.json``: the module pipeline, e.g. Transformer → Pooling → [Dense…] → Normalize, each
  with its sub-folder (``""`` for the transformer, ``1_Pooling``, ``2_Dense``…);
- ``sentence_bert_config.json`` (transformer: ``max_seq_length``, ``do_lower_case``);
- ``<n>_Pooling/config.json``: the pooling mode, legacy booleans (``pooling_mode_mean_tokens``…)
  or the newer ``pooling_mode`` string;
- ``<n>_Dense/config.json`` + ``model.safetensors`` (``linear.weight``, ``linear.bias``);
- ``config_sentence_transformers.json``: prompts, default prompt, similarity function.

fastlm writes the long-standing layout (legacy pooling keys, ``sentence_transformers.models.*``
module types), which Sentence-Transformers 2.x to 6.x all load.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from fastlm.embeddings.pooling import Dense
from fastlm.versions import installed_version

_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_OUR_TO_LEGACY = {mode: key for key, mode in _LEGACY_POOLING_KEYS.items()}


@dataclass
class SentenceTransformerLayout:
    """What fastlm needs from a Sentence-Transformers directory."""

    transformer_path: str  # absolute path of the Hugging Face model inside the directory
    pooling: str | None = None
    include_prompt: bool = True
    dense: list[Dense] = field(default_factory=list)
    normalize: bool = False
    max_seq_length: int | None = None
    do_lower_case: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    similarity_fn_name: str | None = None


def is_sentence_transformer_dir(path: str) -> bool:
    """True when ``path`` is a local directory with a ``modules.json``."""
    return os.path.isfile(os.path.join(path, "modules.json"))


def read_layout(path: str) -> SentenceTransformerLayout:
    """Parse a Sentence-Transformers directory. Usage: ``layout = read_layout("./minilm")``."""
    modules = _read_json(os.path.join(path, "modules.json"))
    layout = None
    pending: list[tuple[str, str]] = []
    for entry in sorted(modules, key=lambda e: e.get("idx", 0)):
        kind = entry["type"].rsplit(".", 1)[-1]
        folder = os.path.join(path, entry.get("path", ""))
        if kind == "Transformer":
            if layout is not None:
                raise ValueError(f"{path}: more than one Transformer module is not supported")
            layout = SentenceTransformerLayout(transformer_path=folder)
            _read_transformer_config(layout, folder)
        else:
            pending.append((kind, folder))
    if layout is None:
        raise ValueError(f"{path}/modules.json has no Transformer module (fastlm needs one)")
    for kind, folder in pending:
        if kind == "Pooling":
            _read_pooling(layout, folder)
        elif kind == "Dense":
            layout.dense.append(_read_dense(folder))
        elif kind == "Normalize":
            layout.normalize = True
        else:
            raise ValueError(
                f"{path}: Sentence-Transformers module {kind!r} is not supported by fastlm "
                "(supported: Transformer, Pooling, Dense, Normalize)"
            )
    extra = _read_json(os.path.join(path, "config_sentence_transformers.json"), default={})
    layout.prompts = dict(extra.get("prompts") or {})
    layout.default_prompt_name = extra.get("default_prompt_name")
    layout.similarity_fn_name = extra.get("similarity_fn_name")
    return layout


def write_layout(
    path: str,
    *,
    pooling: str,
    hidden_size: int,
    dense: list[Dense],
    normalize: bool,
    max_seq_length: int,
    do_lower_case: bool,
    prompts: dict[str, str],
    default_prompt_name: str | None,
) -> None:
    """Write the module files around a Hugging Face model already saved in ``path``."""
    from safetensors.torch import save_file

    entries = [_module_entry(0, "", "Transformer")]
    _write_json(
        os.path.join(path, "sentence_bert_config.json"),
        {"max_seq_length": max_seq_length, "do_lower_case": do_lower_case},
    )
    pooling_dir = os.path.join(path, "1_Pooling")
    os.makedirs(pooling_dir, exist_ok=True)
    pooling_config = {"word_embedding_dimension": hidden_size}
    pooling_config.update({key: mode == pooling for key, mode in _LEGACY_POOLING_KEYS.items()})
    pooling_config["include_prompt"] = True
    _write_json(os.path.join(pooling_dir, "config.json"), pooling_config)
    entries.append(_module_entry(1, "1_Pooling", "Pooling"))
    for layer in dense:
        idx = len(entries)
        folder = f"{idx}_Dense"
        os.makedirs(os.path.join(path, folder), exist_ok=True)
        _write_json(os.path.join(path, folder, "config.json"), layer.config())
        weights = {
            f"linear.{k}": v.detach().cpu().contiguous()
            for k, v in layer.linear.state_dict().items()
        }
        save_file(weights, os.path.join(path, folder, "model.safetensors"))
        entries.append(_module_entry(idx, folder, "Dense"))
    if normalize:
        idx = len(entries)
        os.makedirs(os.path.join(path, f"{idx}_Normalize"), exist_ok=True)
        entries.append(_module_entry(idx, f"{idx}_Normalize", "Normalize"))
    _write_json(os.path.join(path, "modules.json"), entries)
    _write_json(
        os.path.join(path, "config_sentence_transformers.json"),
        {
            "__version__": _versions(),
            "prompts": prompts,
            "default_prompt_name": default_prompt_name,
            "similarity_fn_name": "cosine",
        },
    )


# --------------------------------------------------------------------------- helpers


def _module_entry(idx: int, folder: str, kind: str) -> dict:
    return {
        "idx": idx,
        "name": str(idx),
        "path": folder,
        "type": f"sentence_transformers.models.{kind}",
    }


def _read_transformer_config(layout: SentenceTransformerLayout, folder: str) -> None:
    for name in ("sentence_bert_config.json", "sentence_roberta_config.json"):
        config = _read_json(os.path.join(folder, name), default=None)
        if config is not None:
            break
    else:
        config = {}
    task = config.get("transformer_task", "feature-extraction")
    if task != "feature-extraction":
        raise ValueError(f"{folder}: transformer_task={task!r} is not an embedding model")
    layout.max_seq_length = config.get("max_seq_length")
    layout.do_lower_case = bool(config.get("do_lower_case", False))


def _read_pooling(layout: SentenceTransformerLayout, folder: str) -> None:
    config = _read_json(os.path.join(folder, "config.json"))
    mode = config.get("pooling_mode")
    if mode is None:
        modes = [m for key, m in _LEGACY_POOLING_KEYS.items() if config.get(key, False)]
        mode = modes if len(modes) != 1 else modes[0]
    if isinstance(mode, (list, tuple)):
        mode = mode[0] if len(mode) == 1 else list(mode)
    if (
        not isinstance(mode, str)
        or mode not in _OUR_TO_LEGACY
        or mode
        in (
            "mean_sqrt_len_tokens",
            "weightedmean",
        )
    ):
        raise ValueError(
            f"{folder}: pooling {mode!r} is not supported (fastlm pools with one of mean, cls, "
            "lasttoken, max)"
        )
    layout.pooling = mode
    layout.include_prompt = bool(config.get("include_prompt", True))


def _read_dense(folder: str) -> Dense:
    config = _read_json(os.path.join(folder, "config.json"))
    if config.get("use_residual", False):
        raise ValueError(f"{folder}: Dense with use_residual=True is not supported")
    layer = Dense(
        config["in_features"],
        config["out_features"],
        bias=config.get("bias", True),
        activation=config.get("activation_function", "torch.nn.modules.activation.Tanh"),
    )
    safetensors_path = os.path.join(folder, "model.safetensors")
    if os.path.isfile(safetensors_path):
        from safetensors.torch import load_file

        state = load_file(safetensors_path)
    else:
        state = torch.load(
            os.path.join(folder, "pytorch_model.bin"), map_location="cpu", weights_only=True
        )
    state = {k.removeprefix("linear."): v for k, v in state.items()}
    layer.linear.load_state_dict(state)
    return layer


def _versions() -> dict:
    import transformers

    found = {
        "sentence_transformers": installed_version("sentence-transformers") or "5.0.0",
        "transformers": transformers.__version__,
        "pytorch": torch.__version__,
    }
    return found


def _read_json(path: str, default=...):
    if not os.path.isfile(path):
        if default is ...:
            raise FileNotFoundError(path)
        return default
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _write_json(path: str, value) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2)
        handle.write("\n")
