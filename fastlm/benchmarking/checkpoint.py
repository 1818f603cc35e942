"""Random-init checkpoints that every benchmarked system loads from the same local folder.

`ensure_checkpoint(shape, cache_root)` builds `<cache_root>/<shape.name>` once (bf16 safetensors,
weights drawn after `torch.manual_seed(0)`, on the GPU when there is one) and reuses it while the
shape's fingerprint is unchanged. A word-level tokenizer covering the whole vocabulary is saved
next to the weights: Unsloth's loader requires tokenizer files, and its pad token is distinct from
EOS so no loader adds a token (which would resize the embeddings).
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from pathlib import Path

from fastlm.benchmarking.shapes import Shape, make_config

MARKER = "fastlm_bench.json"  # written last: its presence means the folder is complete
CACHE = "/tmp/fastlm-bench"  # the scripts' default --cache


def checkpoint_dir(shape: Shape, cache_root: str | Path) -> Path:
    return Path(cache_root) / shape.name


def is_complete(path: Path, shape: Shape) -> dict | None:
    """The metadata of the checkpoint in `path` if it is complete and of `shape`, else None."""
    marker = path / MARKER
    if not marker.is_file():
        return None
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("fingerprint") != shape.fingerprint():
        return None
    if not any(path.glob("*.safetensors")):
        return None
    return meta


def _save_tokenizer(path: Path, vocab_size: int, bos: int | None, eos: int | None) -> None:
    """A whitespace word-level tokenizer: token i is "<t{i}>", specials at the config's ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    taken = {i for i in (bos, eos) if i is not None and 0 <= i < vocab_size}
    free = [i for i in range(vocab_size) if i not in taken]
    unk, pad = free[0], free[-1]  # distinct from EOS: nobody swaps in a new pad token
    names = {i: f"<t{i}>" for i in range(vocab_size)}
    specials = {"unk_token": (unk, "<|unk|>"), "pad_token": (pad, "<|pad|>")}
    if bos is not None and bos in taken:
        specials["bos_token"] = (bos, "<|bos|>")
    if eos is not None and eos in taken:
        specials["eos_token"] = (eos, "<|eos|>")
    for idx, name in specials.values():
        names[idx] = name
    tok = Tokenizer(models.WordLevel({n: i for i, n in names.items()}, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, **{k: name for k, (_, name) in specials.items()}
    )
    fast.save_pretrained(str(path))


def _first_id(value) -> int | None:
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def build_checkpoint(
    shape: Shape, path: Path, device: str, auto_class: str = "AutoModelForCausalLM", finish=None
) -> dict:
    """Build and save the random-init bf16 checkpoint of `shape` into `path` (replacing it).

    `auto_class` names the transformers Auto class; `finish(path, config)` may add files (and
    return extra metadata) before the completion marker is written.
    """
    import torch
    import transformers

    t0 = time.perf_counter()
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    config = make_config(shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = getattr(transformers, auto_class).from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(path))
    n_params = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the parent keeps no GPU memory while children run
    _save_tokenizer(
        path,
        shape.vocab_size,
        _first_id(getattr(config, "bos_token_id", None)),
        _first_id(getattr(config, "eos_token_id", None)),
    )
    meta = {
        "shape": shape.name,
        "fingerprint": shape.fingerprint(),
        "built_on": device,
        "torch": torch.__version__,
        "parameters": n_params,
        "build_s": round(time.perf_counter() - t0, 2),
        "seed": 0,
    }
    if finish is not None:
        meta.update(finish(path, config) or {})
    (path / MARKER).write_text(json.dumps(meta, indent=2))
    return meta


def ensure_checkpoint(shape: Shape, cache_root: str | Path, device: str | None = None) -> dict:
    """Path and metadata of the shape's checkpoint, built only if missing or stale."""
    path = checkpoint_dir(shape, cache_root)
    meta = is_complete(path, shape)
    if meta is not None:
        return {"path": str(path), "reused": True, **meta}
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    meta = build_checkpoint(shape, path, device)
    return {"path": str(path), "reused": False, **meta}
