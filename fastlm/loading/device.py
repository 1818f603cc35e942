"""Where a model is loaded and in which dtype: one answer for every loader.

device, dtype, device_map = placement(device_map="auto", dtype=None)
# -> ("cuda", torch.bfloat16, "auto") on a bf16 GPU; ("cpu", torch.float32, None) without one
device = resolve_device("auto")  # a ``--device`` value of the commands -> "cuda" or "cpu"
"""

from __future__ import annotations

import torch

from fastlm.errors import UnavailableDeviceError, UnsupportedDtypeError

DEVICES = ("auto", "cpu", "cuda")  # what ``resolve_device`` accepts


def target_device(device_map) -> str:
    """ "cpu" when asked for (``device_map="cpu"`` / ``{"": "cpu"}``) or when torch sees no GPU,
    else "cuda". Usage: ``target_device("auto")``."""
    if device_map in ("cpu", {"": "cpu"}) or not torch.cuda.is_available():
        return "cpu"
    return "cuda"


def resolve_device(name: str) -> str:
    """A ``--device`` value (one of ``DEVICES``) as the device to run on: "auto" is "cuda" when
    torch sees a GPU, else "cpu". Usage: ``resolve_device("auto")``.

    "cuda" without a GPU, or a name not in ``DEVICES``, raises ``UnavailableDeviceError``, which
    the ``fastlm`` command prints as one line.
    """
    if name not in DEVICES:
        raise UnavailableDeviceError(f"unknown --device {name!r} (auto, cpu or cuda)")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UnavailableDeviceError(
            "--device cuda, but torch sees no CUDA device (try --device cpu)"
        )
    return name


def resolve_dtype(dtype: torch.dtype | None, device: str) -> torch.dtype:
    """The compute dtype: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU.

    Usage: ``resolve_dtype(None, "cuda")``. A dtype the device cannot train in raises
    ``UnsupportedDtypeError`` saying what to pass instead.
    """
    if device == "cpu":
        if dtype in (None, torch.float32):
            return torch.float32
        raise UnsupportedDtypeError(
            f"dtype={dtype} on the CPU: fastlm trains in float32 on CPU (no fast half-precision "
            "matmuls there). Pass dtype=None or torch.float32, or run on a GPU."
        )
    bf16_ok = torch.cuda.is_bf16_supported()
    if dtype is None:
        return torch.bfloat16 if bf16_ok else torch.float16
    if dtype == torch.bfloat16 and not bf16_ok:
        raise UnsupportedDtypeError(
            f"{torch.cuda.get_device_name()} has no bfloat16 support: pass dtype=torch.float16 "
            "(or dtype=None to choose automatically)."
        )
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise UnsupportedDtypeError(f"dtype={dtype} is not a training dtype: use bf16/fp16/fp32.")
    return dtype


def placement(device_map, dtype: torch.dtype | None) -> tuple[str, torch.dtype, object]:
    """``(device, compute dtype, device_map for transformers)``: "auto" on a machine without a
    GPU becomes ``None`` (accelerate's "auto" would otherwise plan for devices that are not
    there). Usage: ``device, dtype, device_map = placement("auto", None)``."""
    device = target_device(device_map)
    dtype = resolve_dtype(dtype, device)
    if device_map == "auto" and device == "cpu":
        device_map = None
    return device, dtype, device_map
